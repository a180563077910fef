"""rdiff deltas made from block checksums, without reading for matches (protocol/rsync.md).

librsync's delta finds the old file's blocks anywhere in the new one: a
rolling sum at every position and an MD4 of every block that might match,
about 1.5 CPU seconds per GiB even when almost nothing changed.  A sender
that kept a CRC-32 of each block of the previous version of its file
(:func:`block_crcs`, made ahead with that version's signature) and knows the
receiver holds exactly that version (its signature is the one we made) can
instead compare each block's CRC-32 with the new file's, and send a copy
for each unchanged run and the bytes of the changed blocks
(:class:`BlockDeltaReader`): about 0.3 CPU seconds per GiB.  Only blocks
that stayed in place are found, so this is used only when few blocks
changed (:data:`MAX_CHANGED`); content shifted by an insertion is left to
librsync.  A false match (a CRC-32 collision) only costs a download: the
receiver checks the result's SHA-256 and fetches the file whole when it
differs.

This blocks: callers run it in a worker thread.
"""

from __future__ import annotations

import os
import struct
import zlib

from clearskies.rdiff import DELTA_MAGIC, PIECE, RdiffError

CRC_BYTES = 4
"""Bytes of each block's checksum (a big-endian CRC-32)."""

MAX_CHANGED = 1 / 8
"""Largest share of changed blocks for which a delta is made from checksums;
more, and librsync (which also finds moved content) is worth its time."""

_WIDTHS = ((1, ">B"), (2, ">H"), (4, ">I"), (8, ">Q"))


def block_crcs(fd: int, size: int, block: int) -> bytes:
    """The CRC-32 of each ``block``-byte block of the first ``size`` bytes of ``fd``
    (the last block may be shorter), 4 big-endian bytes each.

    RdiffError if the file is shorter than ``size``.
    """
    step = max(1, PIECE // block) * block
    out = bytearray()
    position = 0
    while position < size:
        want = min(step, size - position)
        data = os.pread(fd, want, position)
        if len(data) != want:
            raise RdiffError("the file shrank while its blocks were summed")
        view = memoryview(data)
        for at in range(0, want, block):
            out += struct.pack(">I", zlib.crc32(view[at:at + block]))
        position += want
    return bytes(out)


def _width(value: int) -> tuple[int, str]:
    for index, (width, fmt) in enumerate(_WIDTHS):
        if value < 1 << (8 * width):
            return index, fmt
    raise ValueError(value)


def copy_command(position: int, length: int) -> bytes:
    """librsync's COPY command, in the narrowest widths that hold its numbers."""
    pi, pf = _width(position)
    li, lf = _width(length)
    return bytes([0x45 + 4 * pi + li]) + struct.pack(pf, position) + struct.pack(lf, length)


def literal_command(length: int) -> bytes:
    """librsync's LITERAL command for ``length`` bytes (which follow it)."""
    if 1 <= length <= 64:
        return bytes([length])
    index, fmt = _width(length)
    return bytes([0x41 + index]) + struct.pack(fmt, length)


class BlockDeltaReader:
    """The delta from the previous version (``old_size`` bytes, block checksums
    ``old_crcs``) to the file ``fd`` (owned) of ``size`` bytes, whose checksums are
    ``new_crcs``; ``read(n)`` as a file's, b"" at the end.

    Copies of unchanged runs (every block whose length and CRC-32 are the
    old one's, at the same place) come at once; the changed blocks are read
    from the file as they are sent.  :func:`changed_share` says whether it
    is worth it.
    """

    def __init__(self, fd: int, size: int, block: int, old_size: int, old_crcs: bytes,
                 new_crcs: bytes) -> None:
        self._fd = fd
        self.size = size
        self.block = block
        self._runs = _runs(size, block, old_size, old_crcs, new_crcs)
        self._run = 0
        self._literal_at = -1  # where in the file the current literal run goes on, or -1
        self._literal_end = 0
        self._started = False
        self.done = False

    def read(self, n: int = PIECE) -> bytes:
        out = bytearray()
        if not self._started:
            out += struct.pack(">I", DELTA_MAGIC)
            self._started = True
        while len(out) < n and not self.done:
            if self._literal_at >= 0:
                want = min(n - len(out), self._literal_end - self._literal_at)
                data = os.pread(self._fd, want, self._literal_at)
                if len(data) != want:
                    raise RdiffError("the file shrank while its delta was made")
                out += data
                self._literal_at += want
                if self._literal_at == self._literal_end:
                    self._literal_at = -1
                    self._run += 1
                continue
            if self._run == len(self._runs):
                out += b"\0"
                self.done = True
                break
            start, end, same = self._runs[self._run]
            if same:
                out += copy_command(start, end - start)
                self._run += 1
            else:
                out += literal_command(end - start)
                self._literal_at, self._literal_end = start, end
        return bytes(out)

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


def _runs(size: int, block: int, old_size: int, old_crcs: bytes,
          new_crcs: bytes) -> list[tuple[int, int, bool]]:
    """(start, end, unchanged) byte ranges of the new file, alternating, in order."""
    old_blocks = len(old_crcs) // CRC_BYTES
    runs: list[tuple[int, int, bool]] = []
    for index in range(len(new_crcs) // CRC_BYTES):
        start = index * block
        end = min(start + block, size)
        at = index * CRC_BYTES
        same = (index < old_blocks and min(start + block, old_size) - start == end - start
                and old_crcs[at:at + CRC_BYTES] == new_crcs[at:at + CRC_BYTES])
        if runs and runs[-1][2] == same:
            runs[-1] = (runs[-1][0], end, same)
        else:
            runs.append((start, end, same))
    return runs


def changed_share(size: int, block: int, old_size: int, old_crcs: bytes,
                  new_crcs: bytes) -> float:
    """The share of the new file's bytes that are not unchanged blocks (0 to 1)."""
    if not size:
        return 0.0
    changed = sum(end - start for start, end, same
                  in _runs(size, block, old_size, old_crcs, new_crcs) if not same)
    return changed / size


__all__ = ["CRC_BYTES", "MAX_CHANGED", "block_crcs", "copy_command", "literal_command",
           "BlockDeltaReader", "changed_share"]
