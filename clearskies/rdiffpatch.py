"""Applying an rdiff delta without librsync (protocol/rsync.md, section 6).

A delta is a magic number and a list of commands (librsync's encoding):
``0`` ends it; ``1``..``64`` are that many literal bytes following the
command; ``0x41``..``0x44`` are literal bytes whose count follows in 1, 2,
4 or 8 big-endian bytes; ``0x45``..``0x54`` copy a range of the old file,
its position then its length each in 1, 2, 4 or 8 big-endian bytes
(``0x45 + 4 * i + j``: position width ``(1, 2, 4, 8)[i]``, length width
``(1, 2, 4, 8)[j]``).  Every other command byte is invalid.

:class:`DirectPatcher` applies such a delta as it arrives, with the same
contract as :class:`clearskies.rdiff.Patcher`: copies are done by the
kernel (``os.copy_file_range``, falling back to ``pread``/``pwrite``
where the file system refuses), literal bytes are written as they come,
and the result is hashed (SHA-256) from the old file's ranges and the
literal bytes, so nothing is read back; a write to the old file while the
delta is applied (whose copies might then differ from what was hashed)
makes :meth:`DirectPatcher.finish` refuse the result.  A delta that does not start
with the magic, copies from outside the old file, would make more than
the limit, has far more commands than its result needs
(:data:`BYTES_PER_COMMAND`), ends inside a command, has an unknown command
or has bytes after its end is refused (:class:`clearskies.rdiff.RdiffError`) before
anything of the offending command is written.

This blocks: callers run it in a worker thread.
"""

from __future__ import annotations

import errno
import hashlib
import os
import struct
from collections.abc import Callable
from typing import Any

from clearskies.rdiff import DELTA_MAGIC, RdiffError

OP_END = 0x00
OP_LITERAL_LAST_INLINE = 0x40
OP_LITERAL_N1 = 0x41
OP_COPY_N1_N1 = 0x45
OP_COPY_N8_N8 = 0x54

_WIDTHS = (1, 2, 4, 8)
_FORMATS = {1: ">B", 2: ">H", 4: ">I", 8: ">Q"}

PIECE = 1024 * 1024
"""Bytes of the old file read (to hash) per step of a copy."""

BYTES_PER_COMMAND = 256
"""A delta may have one command per this many bytes of its result (plus
:data:`SPARE_COMMANDS`); more is refused.  A delta made against our own
signatures (blocks of at least 2 KiB) has at most about two commands per
block: a copy covers at least a block, and at most one literal run lies
between two copies.  The bound keeps a delta of millions of one-byte
commands from costing minutes of CPU here."""

SPARE_COMMANDS = 4096
"""Commands a delta may have whatever the size of its result."""


def _stamp(st: os.stat_result) -> tuple[int, int, int, int]:
    """What any write to a file changes (the ctime: no user can set it back)."""
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _parameters(op: int) -> tuple[int, ...]:
    """Widths of the numbers following command byte ``op`` (ValueError: not a command)."""
    if OP_LITERAL_N1 <= op < OP_COPY_N1_N1:
        return (_WIDTHS[op - OP_LITERAL_N1],)
    if OP_COPY_N1_N1 <= op <= OP_COPY_N8_N8:
        index = op - OP_COPY_N1_N1
        return (_WIDTHS[index // 4], _WIDTHS[index % 4])
    raise ValueError(op)


class DirectPatcher:
    """Applies a delta, fed a piece at a time (:meth:`feed`), to an old file.

    ``old_fd`` is read (never past its end), the result written to
    ``out_fd`` from its start and hashed (:attr:`hasher`, :attr:`written`);
    nothing past ``limit`` bytes is ever written.  ``wrote(total)`` is
    called after each write with the bytes written so far.  Descriptors
    stay the caller's.
    """

    def __init__(self, old_fd: int, out_fd: int, limit: int,
                 wrote: Callable[[int], None] | None = None) -> None:
        self._old_fd = old_fd
        self._out_fd = out_fd
        self.limit = limit
        self._wrote = wrote
        st = os.fstat(old_fd)
        self.old_size = st.st_size
        self._old_stamp = _stamp(st)
        self.hasher: Any = hashlib.sha256()
        self.written = 0
        self.done = False
        self.commands = 0
        self.max_commands = limit // BYTES_PER_COMMAND + SPARE_COMMANDS
        self._magic = b""
        self._command = b""  # a command's bytes so far, while they are incomplete
        self._literal = 0  # literal bytes of the current command still to come
        self._buffer = bytearray(PIECE)
        self._kernel_copy = hasattr(os, "copy_file_range")

    # -- the delta ------------------------------------------------------------------

    def feed(self, data: bytes | memoryview, eof: bool = False) -> None:
        """Apply the next bytes of the delta (``eof``: there are no more)."""
        view = memoryview(data).cast("B")
        if len(self._magic) < 4:
            take = 4 - len(self._magic)
            self._magic += bytes(view[:take])
            view = view[take:]
            if len(self._magic) == 4 and struct.unpack(">I", self._magic)[0] != DELTA_MAGIC:
                raise RdiffError("not an rdiff delta")
        while view:
            if self.done:
                raise RdiffError("bytes after the end of the delta")
            if self._literal:
                piece = view[:self._literal]
                self._write(piece)
                self._literal -= len(piece)
                view = view[len(piece):]
                continue
            view = self._take_command(view)
        if eof:
            if len(self._magic) < 4:
                raise RdiffError("not an rdiff delta")
            if not self.done:
                raise RdiffError("truncated delta")

    def _take_command(self, view: memoryview) -> memoryview:
        """Read (part of) one command from ``view``, run it when whole; the rest of ``view``."""
        op = self._command[0] if self._command else view[0]
        if not self._command:
            self.commands += 1
            if self.commands > self.max_commands:
                raise RdiffError("the delta has more than %d commands for at most %d bytes"
                                 % (self.max_commands, self.limit))
        if op == OP_END:
            self.done = True
            return view[1:]
        if op <= OP_LITERAL_LAST_INLINE:
            self._begin_literal(op)
            return view[1:]
        try:
            widths = _parameters(op)
        except ValueError:
            raise RdiffError("unknown delta command %#04x" % op) from None
        need = 1 + sum(widths) - len(self._command)
        self._command += bytes(view[:need])
        view = view[need:]
        if len(self._command) < 1 + sum(widths):
            return view  # the rest of the command comes with the next piece
        numbers, at = [], 1
        for width in widths:
            numbers.append(struct.unpack(_FORMATS[width], self._command[at:at + width])[0])
            at += width
        self._command = b""
        if len(numbers) == 1:
            self._begin_literal(numbers[0])
        else:
            self._copy(numbers[0], numbers[1])
        return view

    def _begin_literal(self, length: int) -> None:
        self._check_room(length)
        self._literal = length

    def _check_room(self, length: int) -> None:
        if self.written + length > self.limit:
            raise RdiffError("the delta makes more than %d bytes" % self.limit)

    # -- the files ------------------------------------------------------------------

    def _write(self, data: memoryview) -> None:
        self.hasher.update(data)
        at = self.written
        while data:
            done = os.pwrite(self._out_fd, data, at)
            data = data[done:]
            at += done
        self._advance(at)

    def _advance(self, at: int) -> None:
        self.written = at
        if self._wrote is not None:
            self._wrote(at)

    def _copy(self, position: int, length: int) -> None:
        if position + length > self.old_size:
            raise RdiffError("the delta copies bytes %d..%d of an old file of %d bytes"
                         % (position, position + length, self.old_size))
        self._check_room(length)
        view = memoryview(self._buffer)
        end = position + length
        while position < end:
            want = min(PIECE, end - position)
            got = os.preadv(self._old_fd, [view[:want]], position)
            if not got:
                raise RdiffError("the old file shrank while patching")
            self.hasher.update(view[:got])
            self._put(view[:got], position)
            position += got

    def _put(self, data: memoryview, position: int) -> None:
        """Write ``data``, read from the old file at ``position``, at the end of the result."""
        at, end = self.written, self.written + len(data)
        if self._kernel_copy:
            try:
                while at < end:
                    done = os.copy_file_range(self._old_fd, self._out_fd, end - at,
                                              position + at - self.written, at)
                    if not done:
                        raise RdiffError("the old file shrank while patching")
                    at += done
                self._advance(at)
                return
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                self._kernel_copy = False  # then by hand, from where the kernel stopped
        rest = data[at - self.written:]
        while rest:
            done = os.pwrite(self._out_fd, rest, at)
            rest = rest[done:]
            at += done
        self._advance(at)

    def finish(self) -> tuple[Any, int]:
        """The delta is all fed: (SHA-256 hasher of the result, its byte count).

        RdiffError if the old file was written to meanwhile: the kernel's
        copies read it a second time, after it was hashed, so they might
        not be what the hash saw.
        """
        self.feed(b"", eof=True)
        if _stamp(os.fstat(self._old_fd)) != self._old_stamp:
            raise RdiffError("the old copy changed while the delta was applied")
        return self.hasher, self.written

    def close(self) -> None:
        """Nothing to free (the descriptors are the caller's); for symmetry with rdiff.Patcher."""


__all__ = ["PIECE", "BYTES_PER_COMMAND", "SPARE_COMMANDS", "DirectPatcher"]
