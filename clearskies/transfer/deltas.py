"""Delta transfer's file work (protocol/rsync.md): signatures and deltas streamed, deltas applied.

Sending: :class:`StreamSender` streams a payload of unknown length (a
signature or a delta, made a piece at a time by :mod:`clearskies.rdiff` in
a worker thread while the connection takes it); :func:`open_signature` and
:func:`open_delta` open the file it is made from, in a worker.

Receiving: :class:`DeltaSpool` writes an arriving delta into a hidden
temporary file beside the target (a worker writes, the connection pauses
when the disk falls behind); :func:`patch_into` then builds the download's
temporary file from the old copy plus the delta and checks its size and
SHA-256, in a worker.  Nothing is written outside those two hidden files,
and a delta that fails leaves the old copy as it was.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer

from clearskies import diskjobs, rdiff
from clearskies.backpressure import BatchWriter
from clearskies.threads import Runner
from clearskies.transfer.names import temp_name
from clearskies.transfer.sender import FileSender

UNKNOWN_LENGTH = 1 << 62
"""The length a stream claims until it ends (only the ``0`` chunk ends it)."""

SPOOL_BATCH = 512 * 1024
"""Delta bytes collected before a worker writes them to the spool file."""


def max_delta_size(size: int) -> int:
    """Most delta bytes taken for a result of ``size`` bytes.

    A delta of all-new content is the content plus a few bytes of command
    per literal run; anything past this is not a delta for that file.
    """
    return size + size // 64 + 64 * 1024


class StreamSender(FileSender):
    """Streams ``!<header>`` + chunks + ``0`` from a reader whose length is not known ahead.

    ``reader.read(n)`` (run in a worker thread) returns up to ``n`` bytes
    and b"" at the end; ``reader.close()`` frees it.  Otherwise exactly a
    :class:`~clearskies.transfer.sender.FileSender`: a push producer, one
    piece in memory, paused when the connection is.
    """

    def __init__(self, clock: Any, header: dict[str, Any], reader: Any, *,
                 runner: Runner, **kwargs: Any) -> None:
        super().__init__(clock, str(header.get("path", "")), reader, 0, UNKNOWN_LENGTH,
                         runner=runner, **kwargs)
        self._header = dict(header)

    def header(self) -> dict[str, Any]:
        return dict(self._header)

    def _send(self, data: bytes) -> None:
        if not data:
            self._remaining = 0  # the stream's end is the payload's end
        super()._send(data)


def _open_regular(local_path: Path) -> tuple[int, int]:
    """Open a regular file to read (never through a symlink); (descriptor, size)."""
    fd = os.open(local_path, os.O_RDONLY | diskjobs.OPEN_FLAGS)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd, st.st_size


def open_signature(local_path: Path, min_size: int) -> rdiff.SignatureReader:
    """The signature of our old copy at ``local_path``, to be read a piece at a time (worker).

    OSError when there is no usable old copy: missing, not a regular file,
    under ``min_size`` or over :data:`clearskies.rdiff.MAX_OLD_SIZE` bytes.
    """
    fd, size = _open_regular(local_path)
    if not min_size <= size <= rdiff.MAX_OLD_SIZE:
        os.close(fd)
        raise OSError(errno.EFBIG if size > rdiff.MAX_OLD_SIZE else errno.ENODATA,
                      "no old copy worth a delta")
    return rdiff.SignatureReader(fd, size)


def open_delta(local_path: Path, expected_size: int | None,
               signature: rdiff.Signature) -> rdiff.DeltaReader:
    """The delta from a peer's old copy (``signature``) to our file, read a piece at a time (worker).

    OSError when the file cannot be served as recorded, as for ``get``.
    """
    try:
        fd, size = _open_regular(local_path)
    except BaseException:
        signature.close()
        raise
    if expected_size is not None and size != expected_size:
        os.close(fd)
        signature.close()
        raise OSError(errno.ESTALE, "the file changed since it was last scanned")
    return rdiff.DeltaReader(fd, signature)


def spool_path(local_path: Path, sha256: str) -> Path:
    """Where the delta for ``local_path``'s new content ``sha256`` waits to be applied."""
    return local_path.with_name(temp_name(local_path.name + ".delta", sha256))


class DeltaSpool:
    """An arriving delta, written by workers to a hidden file; bounded by ``limit`` bytes.

    :meth:`write` takes the payload's pieces (dropping everything once past
    ``limit``: :attr:`overflow`); :meth:`close` fires once every byte is on
    disk and the file is closed.  The caller applies it with
    :func:`patch_into`, which deletes it.
    """

    def __init__(self, path: Path, limit: int, *, runner: Runner,
                 producer: IPushProducer | None = None) -> None:
        self.path = path
        self.limit = limit
        self.received = 0
        self.overflow = False
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | diskjobs.OPEN_FLAGS, 0o600)
        self._writer = BatchWriter(runner, fd, 0, None, producer=producer)
        self._pieces: list[bytes] = []
        self._pending = 0

    def write(self, data: bytes) -> None:
        if self.overflow:
            return
        self.received += len(data)
        if self.received > self.limit:
            self.overflow = True
            self._pieces, self._pending = [], 0
            return
        self._pieces.append(bytes(data))
        self._pending += len(data)
        if self._pending >= SPOOL_BATCH:
            pieces, self._pieces, self._pending = self._pieces, [], 0
            self._writer.submit(pieces)

    def close(self) -> Deferred[None]:
        """Write what is left, close the file; fails with the first write error."""
        pieces, self._pieces, self._pending = self._pieces, [], 0
        writer = self._writer
        if writer.error is not None:
            return writer.close(None).addCallback(lambda _: _raise(writer.error))
        return writer.close(pieces).addCallback(
            lambda _: _raise(writer.error) if writer.error is not None else None)

    def discard(self) -> None:
        """Drop what arrived (the file too)."""
        self._writer.close(None).addCallback(lambda _: _unlink(self.path))


def _raise(error: BaseException | None) -> None:
    if error is not None:
        raise error


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def patch_into(old: Path, delta: Path, temp: Path, size: int,
               sha256: str) -> tuple[Any, int, int]:
    """Build ``temp`` from ``old`` plus the delta at ``delta``, then check it (worker thread).

    Returns (SHA-256 hasher, byte count, the open descriptor of ``temp``),
    as :func:`clearskies.transfer.jobs.copy_into` does.  Raises
    :class:`clearskies.rdiff.RdiffError` when the delta is bad or the result
    is not ``size`` bytes with SHA-256 ``sha256``; ``temp`` is then gone.
    The delta file is deleted either way; ``old`` is only read.
    """
    try:
        old_fd, _ = _open_regular(old)
        try:
            delta_fd = os.open(delta, os.O_RDONLY | diskjobs.OPEN_FLAGS)
            try:
                out = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | diskjobs.OPEN_FLAGS,
                              0o600)
                try:
                    hasher, written = rdiff.patch_file(old_fd, delta_fd, out, size)
                    if written != size:
                        raise rdiff.RdiffError("the delta made %d bytes, expected %d"
                                               % (written, size))
                    if hasher.hexdigest() != sha256:
                        raise rdiff.RdiffError("the patched file does not match its SHA-256")
                except BaseException:
                    os.close(out)
                    _unlink(temp)
                    raise
            finally:
                os.close(delta_fd)
        finally:
            os.close(old_fd)
    finally:
        _unlink(delta)
    return hasher, written, out


__all__ = [
    "UNKNOWN_LENGTH", "SPOOL_BATCH", "max_delta_size", "StreamSender", "open_signature",
    "open_delta", "spool_path", "DeltaSpool", "patch_into",
]
