"""Delta transfer's file work (protocol/rsync.md): signatures and deltas streamed, deltas applied.

Sending: :class:`StreamSender` streams a payload of unknown length (a
signature or a delta, made a piece at a time by :mod:`clearskies.rdiff` in
a worker thread while the connection takes it); :func:`open_signature` and
:func:`open_delta` open the file it is made from, in a worker.

Receiving: :class:`DeltaApplier` applies an arriving delta to the old
copy as it comes, in a worker, writing the download's temporary file (the
connection pauses when the worker falls behind), then checks its size and
SHA-256.  Nothing is written outside that hidden file, and a delta that
fails leaves the old copy as it was.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IPushProducer
from twisted.python.failure import Failure

from clearskies import diskjobs, rdiff, rdiffblocks, rdiffpatch
from clearskies.interfaces import IRunner
from clearskies.transfer.sender import FileSender

UNKNOWN_LENGTH = 1 << 62
"""The length a stream claims until it ends (only the ``0`` chunk ends it)."""

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
                 runner: IRunner, **kwargs: Any) -> None:
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


def open_signature(local_path: Path, min_size: int, cached: Any = None
                   ) -> rdiff.SignatureReader | rdiff.SplitSignatureReader | Any:
    """The signature of our old copy at ``local_path``, to be read a piece at a time (worker).

    ``cached(fd)``, when given, returns the signature made ahead for exactly
    the open file ``fd`` (clearskies.transfer.sigcache), or None: then the
    file is signed now.

    From :data:`clearskies.rdiff.SPLIT_SIGNATURE` bytes on, a
    :class:`~clearskies.rdiff.SplitSignatureReader`: the caller should run
    its ``make_second`` in another worker.  OSError when there is no
    usable old copy: missing, not a regular file, under ``min_size`` or
    over :data:`clearskies.rdiff.MAX_OLD_SIZE` bytes.
    """
    fd, size = _open_regular(local_path)
    if not min_size <= size <= rdiff.MAX_OLD_SIZE:
        os.close(fd)
        raise OSError(errno.EFBIG if size > rdiff.MAX_OLD_SIZE else errno.ENODATA,
                      "no old copy worth a delta")
    if cached is not None:
        try:
            reader = cached(fd)
        except BaseException:
            os.close(fd)
            raise
        if reader is not None:
            os.close(fd)
            return reader
    if size >= rdiff.SPLIT_SIGNATURE:
        return rdiff.SplitSignatureReader(fd, size)
    return rdiff.SignatureReader(fd, size)


def open_delta(local_path: Path, expected_size: int | None, signature: rdiff.Signature,
               second: rdiff.Signature | None = None
               ) -> rdiff.DeltaReader | rdiff.SplitDeltaReader:
    """The delta from a peer's old copy (``signature``) to our file, read a piece at a time (worker).

    With ``second`` (another copy of the same signature) and a file of at
    least :data:`clearskies.rdiff.SPLIT_DELTA` bytes, a
    :class:`~clearskies.rdiff.SplitDeltaReader`: the caller should run its
    ``make_second`` in another worker.  OSError when the file cannot be
    served as recorded, as for ``get``.
    """
    signatures = [signature] if second is None else [signature, second]
    try:
        fd, size = _open_regular(local_path)
    except BaseException:
        for s in signatures:
            s.close()
        raise
    if expected_size is not None and size != expected_size:
        os.close(fd)
        for s in signatures:
            s.close()
        raise OSError(errno.ESTALE, "the file changed since it was last scanned")
    if second is not None:
        if size >= rdiff.SPLIT_DELTA:
            return rdiff.SplitDeltaReader(fd, size, signature, second)
        second.close()
    return rdiff.DeltaReader(fd, signature)


def open_block_delta(local_path: Path, expected_size: int,
                     previous: tuple[int, int, bytes] | None
                     ) -> rdiffblocks.BlockDeltaReader | None:
    """The delta to our file from ``previous`` (size, block length, block checksums of
    the version the peer holds: clearskies.transfer.sigcache), made from checksums
    (worker); None when that is not worth it (more than
    :data:`clearskies.rdiffblocks.MAX_CHANGED` of the file changed, or nothing to
    compare with): then librsync makes it.  OSError as for :func:`open_delta`."""
    if previous is None:
        return None
    old_size, block, old_crcs = previous
    fd, size = _open_regular(local_path)
    try:
        if size != expected_size:
            raise OSError(errno.ESTALE, "the file changed since it was last scanned")
        new_crcs = rdiffblocks.block_crcs(fd, size, block)
        if rdiffblocks.changed_share(size, block, old_size, old_crcs,
                                     new_crcs) > rdiffblocks.MAX_CHANGED:
            os.close(fd)
            return None
        return rdiffblocks.BlockDeltaReader(fd, size, block, old_size, old_crcs, new_crcs)
    except BaseException:
        os.close(fd)
        raise


PATCHER: Any = rdiffpatch.DirectPatcher
"""What applies a delta: our own reader of the delta's commands, whose copies
from the old file the kernel does (``copy_file_range``).  Measured on a 1 GiB
file with 1 MiB changed (bench/README.md, "W3: applying the delta
ourselves"): about a third less CPU and time than librsync's patch
(:class:`clearskies.rdiff.Patcher`, which takes the same arguments), which
hands every byte of the result through Python."""

MAX_QUEUED_DELTA = 4 * 1024 * 1024
"""Delta bytes waiting for the patching worker before the connection is paused."""

WRITE_BACK = 32 * 1024 * 1024
"""Patched bytes after which the kernel is asked to start writing them to disk, so
the final fsync of a big file is short (as downloads do, ``FLUSH_AHEAD``)."""


class DeltaApplier:
    """An arriving delta, applied to the old copy as it comes, into the download's temporary file.

    The reactor only queues the payload's pieces (:meth:`write`); one
    worker job at a time feeds them to a :data:`PATCHER`
    that reads ``old`` and writes ``temp``, so the patch runs while the
    sender is still making the delta.  More than :data:`MAX_QUEUED_DELTA`
    waiting pauses ``producer``.  At most ``limit`` delta bytes are taken
    (:func:`max_delta_size`).  Then :meth:`drained` and :meth:`complete`
    (a job for :meth:`~clearskies.transfer.receiver.FileReceiver.fill_with`)
    verify the result; after any failure :meth:`discard` removes ``temp``.
    ``old`` is only ever read.
    """

    def __init__(self, old: Path, temp: Path, size: int, sha256: str, *, runner: IRunner,
                 producer: IPushProducer | None = None) -> None:
        self.old = old
        self.temp = temp
        self.size = size
        self.sha256 = sha256
        self.limit = max_delta_size(size)
        self.received = 0
        #: Why the delta cannot be used (set on the reactor thread), or None.
        self.error: Exception | None = None
        self._runner = runner
        self._producer = producer
        self._pausing = False
        self._queue: list[bytes] = []
        self._queued = 0
        self._running = False
        self._waiters: list[Deferred[None]] = []
        self._patcher: rdiffpatch.DirectPatcher | rdiff.Patcher | None = None
        self._fds: list[int] = []
        self._inode: tuple[int, int] | None = None
        self._flushed = 0

    def write(self, data: bytes) -> None:
        if self.error is not None:
            return
        self.received += len(data)
        if self.received > self.limit:
            self._failed(rdiff.RdiffError("the delta is larger than %d bytes" % self.limit))
            return
        self._queue.append(bytes(data))
        self._queued += len(data)
        if self._queued > MAX_QUEUED_DELTA and self._producer is not None and not self._pausing:
            self._pausing = True
            self._producer.pauseProducing()
        if not self._running:
            self._start()

    def _failed(self, error: Exception) -> None:
        if self.error is None:
            self.error = error
        self._queue, self._queued = [], 0
        self._resume()

    def _resume(self) -> None:
        if self._pausing and self._producer is not None:
            self._pausing = False
            self._producer.resumeProducing()

    def _start(self) -> None:
        batch, self._queue = self._queue, []
        self._running = True
        self._runner.run(self._apply, batch).addBoth(self._applied, sum(map(len, batch)))

    def _apply(self, batch: list[bytes]) -> None:
        """(Worker thread.)  Open the files on the first batch, then patch on."""
        if self._patcher is None:
            old_fd, _ = _open_regular(self.old)
            self._fds.append(old_fd)
            out = os.open(self.temp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | diskjobs.OPEN_FLAGS,
                          0o600)
            self._fds.append(out)
            st = os.fstat(out)
            self._inode = (st.st_dev, st.st_ino)
            self._patcher = PATCHER(old_fd, out, self.size, wrote=self._write_back)
        for data in batch:
            self._patcher.feed(data)

    def _write_back(self, written: int) -> None:
        """(Worker thread.)  Start writing back each WRITE_BACK bytes; waits for nothing."""
        if written - self._flushed >= WRITE_BACK and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._fds[1], self._flushed, written - self._flushed,
                             os.POSIX_FADV_DONTNEED)
            self._flushed = written

    def _applied(self, result: object, count: int) -> None:
        self._running = False
        self._queued -= count
        if isinstance(result, Failure):
            error = result.value
            self._failed(error if isinstance(error, Exception) else RuntimeError(str(error)))
        if self._queued <= MAX_QUEUED_DELTA:
            self._resume()
        if self._queue and self.error is None:
            self._start()
            return
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def drained(self) -> Deferred[None]:
        """Fires once every piece received so far is applied (or the delta failed)."""
        if not self._running and (not self._queue or self.error is not None):
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._waiters.append(waiter)
        return waiter

    def complete(self) -> tuple[Any, int, int]:
        """(Worker thread, after :meth:`drained`.)  End the patch and verify the result.

        Returns (SHA-256 hasher, byte count, the open descriptor of
        ``temp``), as :func:`clearskies.transfer.jobs.copy_into` does.
        Raises RdiffError when the delta was bad or the result is not
        ``size`` bytes with SHA-256 ``sha256``; ``temp`` is then gone.
        """
        try:
            if self.error is not None:
                raise self.error
            if self._patcher is None:
                self._apply([])  # an empty payload: still a (truncated) delta
            assert self._patcher is not None
            hasher, written = self._patcher.finish()
            if written != self.size:
                raise rdiff.RdiffError("the delta made %d bytes, expected %d"
                                       % (written, self.size))
            if hasher.hexdigest() != self.sha256:
                raise rdiff.RdiffError("the patched file does not match its SHA-256")
        except BaseException:
            self._close_and_remove()
            raise
        old_fd, out = self._fds
        self._fds = []
        os.close(old_fd)
        return hasher, written, out

    def discard(self) -> Deferred[None]:
        """Give up: close the files and remove ``temp``; fires once done (not before a running job ends)."""
        self._failed(self.error or rdiff.RdiffError("discarded"))
        return self.drained().addCallback(
            lambda _: self._runner.run(self._close_and_remove))

    def _close_and_remove(self) -> None:
        """(Worker thread.)  Close what is open; remove ``temp`` if it is still the file we made."""
        if self._patcher is not None:
            self._patcher.close()
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)
        inode, self._inode = self._inode, None
        if inode is not None:
            try:
                st = os.lstat(self.temp)
            except FileNotFoundError:
                return
            if (st.st_dev, st.st_ino) == inode:
                _unlink(self.temp)


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


__all__ = [
    "UNKNOWN_LENGTH", "MAX_QUEUED_DELTA", "max_delta_size", "StreamSender", "open_signature",
    "open_delta", "DeltaApplier",
]
