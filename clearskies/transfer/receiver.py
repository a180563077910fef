"""Receiving one file (protocol/transfer.md, section 4 "Receiving").

:class:`FileReceiver` writes a download into a hidden temporary file next to
its target (:mod:`clearskies.transfer.names`), hashing as the bytes arrive,
then verifies size and SHA-256, applies mtime and permissions, fsyncs, and
renames over the target only if the target did not change locally
meanwhile.  The temporary name depends only on the target's name and the
expected hash, so a download cut off by a lost connection or a restart
resumes with ``range``.

Threads: received bytes are written and hashed by the injected runner in
batches (:class:`clearskies.backpressure.BatchWriter`, which pauses the
connection while more than ``MAX_QUEUED_BATCHES`` wait); a small download
is held in memory and created, hashed and fsynced in one worker job,
several at once (:class:`clearskies.transfer.seals.BufferedSeals`);
verifying, fsync and renames run in the runner too
(:mod:`clearskies.transfer.jobs`).  The reactor thread keeps only the calls
that set a download up (stat of a partial file, opening the temporary file).

A receiver's life is an explicit state machine
(:mod:`clearskies.transfer.states`, drawn in ``protocol/receiver.dot``); a
call its state does not allow raises
:class:`~clearskies.transfer.states.IllegalTransition`.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure

from clearskies import diskerrors, diskjobs
from clearskies.backpressure import BatchWriter
from clearskies.share.records import FileRecord
from clearskies.interfaces import IRunner
from clearskies.transfer import jobs
from clearskies.transfer.modes import unwritable_mode
from clearskies.transfer.names import temp_name
from clearskies.transfer.seals import BufferedSeals
from clearskies.transfer.states import (
    BUSY, DONE, FAILED, NEW, VERIFIED, WRITING, IllegalTransition, ReceiverMachine,
)

SMALL_FILE = 128 * 1024
"""Downloads up to this size may be held in memory until sealed (``buffer_limit``)."""

FLUSH_AHEAD = 32 * 1024 * 1024
"""Bytes a download writes before a worker starts flushing them to disk (the last fsync stays)."""

WRITE_BATCH = 512 * 1024
"""Received bytes collected before they go to the writer thread as one batch."""

MAX_QUEUED_BATCHES = 4
"""Batches a download may have waiting for its writer; beyond that its connection is paused."""

OK = "ok"
CORRUPT = "corrupt"
CONFLICT = "conflict"


@dataclass(frozen=True)
class FinishResult:
    """How a download ended.

    ``status`` is OK (the content is at ``path``; ``size``/``mtime_ns``/
    ``inode`` are its cache key), CONFLICT (verified content waits in the
    temporary file ``path``: call ``keep_as`` or ``abort``) or CORRUPT
    (wrong size or hash; the temporary file is gone; ``reason`` says why).
    """

    status: str
    path: Path
    size: int | None = None
    mtime_ns: int | None = None
    inode: int | None = None
    reason: str = ""


class FileReceiver:
    """One download into ``local_path``, verified against ``expected``.

    Use: read :attr:`offset` (ask the peer for ``range [offset, size - offset]``
    when it is not 0), feed the payload to :meth:`write`, then
    :meth:`finish`.  Or fill it with :meth:`copy_local` instead of the
    network.  :meth:`abort` ends it early, keeping the partial file for a
    later resume or not.
    """

    _log = Logger()

    def __init__(self, root: Path, local_path: Path, expected: FileRecord, *,
                 runner: IRunner, resume: bool = True, buffer_limit: int = 0,
                 sealer: BufferedSeals | None = None, unwritable: bool = False,
                 wake: Callable[[Callable[[], None]], None] | None = None) -> None:
        """``unwritable``: the file is put in place without write permission
        (a read-only share's option); its record keeps the share's mode.
        ``wake``: the reactor's ``callFromThread``, for the writer (BatchWriter)."""
        if expected.deleted or expected.is_dir or expected.sha256 is None or expected.size is None:
            raise ValueError("only a file record with size and sha256 can be downloaded")
        self.root = Path(root)
        self.local_path = Path(local_path)
        self.expected = expected
        # What the sealing jobs apply: the expected record, with the mode to set on disk.
        self._on_disk = (dataclasses.replace(expected, mode=unwritable_mode(expected.mode))
                         if unwritable else expected)
        self.temp_path = self.local_path.with_name(
            temp_name(self.local_path.name, expected.sha256))
        self._runner = runner
        self._sealer = sealer
        self._wake = wake
        diskjobs.check_inside(self.root, self.local_path, resolve=False)
        #: The download's state machine (RECEIVER_TRANSITIONS).
        self.machine = ReceiverMachine()
        self._fd: int | None = None
        self._hasher: Any = hashlib.sha256()
        self._writer: BatchWriter | None = None
        #: Paused while this download's writes fall behind: the connection it arrives on.
        self.producer: IPushProducer | None = None
        self._pieces: list[bytes] = []  # received, not yet handed to the writer
        self._pending = 0
        self._received = 0
        self._overflow = False
        self._unflushed = 0
        self._flushing = False
        # A file of at most ``buffer_limit`` bytes is held in memory and created,
        # hashed and fsynced by one runner call in seal(): no file-system calls
        # on the reactor thread per small file.  It is never resumed (fetching it
        # again costs less); seal() replaces any leftover temporary file.
        small = expected.size <= buffer_limit
        self._offset = self._existing_prefix() if resume and not small else 0
        # A resumed file is hashed whole at the end, in the runner.
        self._rehash = self._offset > 0
        self._buffer: list[bytes] | None = [] if small else None
        #: The local disk error that stopped this download (state FAILED), if any.
        self.disk_error: OSError | None = None

    @property
    def offset(self) -> int:
        """Bytes of the content already on disk from an earlier attempt."""
        return self._offset

    @property
    def received(self) -> int:
        """Bytes written so far, counting the resumed prefix."""
        return self._offset + self._received

    def _existing_prefix(self) -> int:
        try:
            st = os.lstat(self.temp_path)
        except OSError:
            return 0
        if not stat.S_ISREG(st.st_mode) or st.st_size > self.expected.size:
            return 0
        return st.st_size

    # -- filling the temporary file ------------------------------------------------

    def write(self, data: bytes) -> None:
        """Append payload bytes, straight to the file (a small file: to its buffer).

        An OSError of the local disk (full, read-only, …) does not escape:
        the receiver drops the rest of the payload, and :meth:`seal` (or
        :meth:`finish`) raises that error, so the connection carries on.
        """
        try:
            self._write(data)
        except OSError as e:
            self._disk_failed(e)

    @property
    def state(self) -> str:
        """One of RECEIVER_STATES."""
        return self.machine.state

    def _write(self, data: bytes) -> None:
        if self.machine.state == NEW:
            if self._buffer is None:
                self._open_for_writing()
            else:
                self.machine.fire("open")
        if self.machine.fire("write") == FAILED:
            return
        if self._overflow or self.received + len(data) > self.expected.size:
            # More than the record's size: refuse to fill the disk; finish() reports it.
            self._overflow = True
            return
        if self._buffer is not None:
            self._buffer.append(data)
            self._received += len(data)
            return
        # Pieces are batched and written and hashed by a worker: per-piece
        # write and hash calls on the reactor thread cost most of its time.
        self._pieces.append(data if type(data) is bytes else bytes(data))
        self._pending += len(data)
        self._received += len(data)
        if self._pending >= WRITE_BATCH:
            self._write_pending()

    def _disk_failed(self, error: OSError) -> None:
        """A write failed: keep the error for seal(); drop the partial if it is what fills the disk."""
        self.disk_error = error
        self._close_fd()
        self._buffer = None
        self.machine.fire("disk_failed")
        if diskerrors.frees_space(error):
            self._remove_temp()

    def _remove_temp(self) -> None:
        try:
            os.unlink(self.temp_path)
        except FileNotFoundError:
            pass
        except OSError as e:
            self._log.warn("could not remove partial download {path}: {why}",
                           path=self.expected.path, why=e.strerror)

    def _write_pending(self) -> None:
        """Hand the collected pieces to the writer thread as one batch."""
        if not self._pieces:
            return
        assert self._writer is not None and self._fd is not None
        pieces, count = self._pieces, self._pending
        self._pieces, self._pending = [], 0
        self._writer.submit(pieces)
        self._unflushed += count
        if self._unflushed >= FLUSH_AHEAD and not self._flushing:
            # Write back while receiving, so the final fsync of a big file is short.
            self._unflushed = 0
            self._flushing = True
            self._runner.run(jobs.flush_copy, os.dup(self._fd)).addBoth(self._flushed)

    def _flushed(self, result: object) -> None:
        self._flushing = False
        if isinstance(result, Failure):  # the final fsync still decides
            self._log.info("early flush of {path} failed: {why}", path=self.expected.path,
                           why=result.getErrorMessage())

    def _open_for_writing(self) -> None:
        self._prepare_directory()
        if self._offset == 0:
            # Starting over: whatever sits under the temp name (even a symlink) goes.
            try:
                os.unlink(self.temp_path)
            except FileNotFoundError:
                pass
        fd = os.open(self.temp_path, os.O_RDWR | os.O_CREAT | diskjobs.OPEN_FLAGS, 0o600)
        try:
            os.ftruncate(fd, self._offset)
            os.lseek(fd, self._offset, os.SEEK_SET)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._writer = BatchWriter(self._runner, fd, self._offset,
                                   None if self._rehash else self._hasher,
                                   producer=self.producer, max_queued=MAX_QUEUED_BATCHES,
                                   wake=self._wake)
        self.machine.fire("open")

    def _prepare_directory(self) -> None:
        if not self.root.is_dir():
            # A share folder moved away or unmounted is never recreated by a download.
            raise FileNotFoundError(errno.ENOENT, "the share folder is missing", str(self.root))
        parent = self.local_path.parent
        if not parent.is_dir():
            parent.mkdir(parents=True, exist_ok=True)
        diskjobs.check_inside(self.root, self.local_path, resolve=True)

    def copy_local(self, source: Path) -> Deferred[None]:
        """Fill the download from a local file said to hold the same content.

        Replaces whatever was received so far; :meth:`finish` still verifies
        it, so a source that changed meanwhile ends as CORRUPT.
        """
        return self.fill_with(jobs.copy_into, Path(source), self.temp_path, self.expected.size)

    def fill_with(self, job: Callable[..., tuple[Any, int, int]], *args: Any) -> Deferred[None]:
        """Fill the temporary file whole by ``job(*args)`` in a worker thread.

        The job writes :attr:`temp_path` and returns (SHA-256 hasher of its
        content, byte count, open read-write descriptor), as
        :func:`~clearskies.transfer.jobs.copy_into` does; :meth:`finish`
        then verifies and installs it like a download.  If the job fails the
        download is back where it started (nothing received), so it may
        still be asked of a peer.
        """
        if self.machine.state not in (NEW, WRITING):
            raise IllegalTransition("copy into a download that is %s" % self.machine.state)
        closed = self._close_fd()
        self._buffer = None
        self._prepare_directory()
        self.machine.fire("copy")
        d = closed.addCallback(lambda _: self._runner.run(job, *args))

        def copied(result: tuple[Any, int, int]) -> None:
            self._hasher, self._received, self._fd = result
            self._writer = BatchWriter(self._runner, self._fd, self._received, self._hasher,
                                       producer=self.producer, max_queued=MAX_QUEUED_BATCHES,
                                       wake=self._wake)
            self._offset = 0
            self._rehash = False
            self._overflow = self._received > self.expected.size
            self.machine.fire("copied")

        def failed(failure: Failure) -> Failure:
            self.machine.fire("copy_failed")
            return failure

        return d.addCallbacks(copied, failed)

    # -- finishing -------------------------------------------------------------------

    def seal(self) -> Deferred[str | None]:
        """Verify and fsync the temporary file without putting it in place yet.

        Fires with None when the content is good (then call :meth:`finish`,
        :meth:`keep_as` or :meth:`abort`), else with why it was rejected (the
        temporary file is gone).  Lets a caller verify many downloads at
        once and install them together.
        """
        return Deferred.fromCoroutine(self._seal_temp())

    async def _seal_temp(self) -> str | None:
        try:
            return await self._seal_checked()
        except OSError as e:
            # The disk refused (fsync, a small file's write, mkdir, chmod): the
            # download is over; a partial that fills the disk goes.
            if self.machine.state != FAILED:
                self._disk_failed(e)
            self.machine.fire("seal_failed")
            raise

    async def _seal_checked(self) -> str | None:
        if self.machine.state == FAILED:
            assert self.disk_error is not None
            raise self.disk_error
        if self.machine.state == NEW:
            if self._buffer is None:
                self._open_for_writing()  # nothing arrived: an empty file or a complete resume
            else:
                self.machine.fire("open")
        self.machine.fire("seal")
        if self._buffer is not None:
            data, self._buffer = b"".join(self._buffer), None
            args = (self.root, self.local_path, self.temp_path, data, self._overflow,
                    diskjobs.Content.of(self._on_disk))
            if self._sealer is not None:
                problem = await self._sealer.seal(*args)
            else:
                problem = await self._runner.run(jobs.seal_buffered, *args)
        else:
            writer = self._writer
            assert writer is not None
            try:
                self._write_pending()
                await writer.flush()
            except BaseException:
                self._close_fd()
                raise
            self._writer = None
            fd, self._fd = self._fd, None
            assert fd is not None
            hasher = None if self._rehash else self._hasher
            problem = await self._runner.run(
                jobs.seal, fd, self.temp_path, hasher, self._overflow, self._on_disk)
        if problem is not None:
            self.machine.fire("rejected")
            self._log.info("download of {path} failed verification: {why}",
                           path=self.expected.path, why=problem)
            return problem
        self.machine.fire("sealed")
        return None

    def finish(self, is_unchanged: Callable[[], bool | Deferred[bool]], *,
               sync_directory: bool = True) -> Deferred[FinishResult]:
        """Verify (unless :meth:`seal` did), then put the content in place if ``is_unchanged()`` allows.

        ``is_unchanged`` is called on the reactor thread after verification,
        just before the rename; it answers (directly or by Deferred) whether
        the target is still as our last scan saw it.  With ``sync_directory``
        false the caller must fsync the target's directory itself
        (:func:`clearskies.diskjobs.sync_directories`), e.g. once for a batch of downloads.
        """
        return Deferred.fromCoroutine(self._finish(is_unchanged, sync_directory))

    async def _finish(self, is_unchanged: Callable[[], bool | Deferred[bool]],
                      sync_directory: bool) -> FinishResult:
        if self.machine.state != VERIFIED:
            problem = await self._seal_temp()
            if problem is not None:
                return FinishResult(CORRUPT, self.local_path, reason=problem)
        if not await maybeDeferred(is_unchanged):
            return FinishResult(CONFLICT, self.temp_path,
                                reason="the file changed locally during the download")
        self.machine.fire("install")
        try:
            size, mtime_ns, inode = await self._runner.run(
                jobs.install, self.temp_path, self.local_path, sync_directory)
        except BaseException:
            self.machine.fire("install_failed")
            raise
        self.machine.fire("installed")
        return FinishResult(OK, self.local_path, size, mtime_ns, inode)

    def keep_as(self, other_path: Path) -> Deferred[FinishResult]:
        """After a CONFLICT result: keep the verified content at ``other_path`` instead.

        Never overwrites: if ``other_path`` already holds this very content
        the temporary file is simply dropped; if it holds something else,
        the Deferred fails with FileExistsError and the temporary file stays.
        """
        if self.machine.state != VERIFIED:
            raise IllegalTransition("keep_as on a download that is %s" % self.machine.state)
        other_path = Path(other_path)
        diskjobs.check_inside(self.root, other_path, resolve=False)
        if not other_path.parent.is_dir():
            other_path.parent.mkdir(parents=True, exist_ok=True)
        diskjobs.check_inside(self.root, other_path, resolve=True)
        self.machine.fire("install")
        d = self._runner.run(jobs.keep, self.temp_path, other_path, self.expected.sha256)

        def kept(info: tuple[int, int, int]) -> FinishResult:
            self.machine.fire("installed")
            return FinishResult(OK, other_path, *info)

        def failed(failure: Failure) -> Failure:
            self.machine.fire("install_failed")
            return failure

        return d.addCallbacks(kept, failed)

    def abort(self, keep_partial: bool) -> None:
        """Give up; with ``keep_partial`` the bytes so far stay for a resume.

        A buffered small file keeps nothing: fetching it again is cheaper than
        writing a partial out on the reactor thread.  Not allowed while a
        copy, a verification or a rename is running.
        """
        if self.machine.state == DONE:
            return
        if self.machine.state == BUSY:
            raise IllegalTransition("cannot abort a download while its file work is running")
        self._close_fd(keep=keep_partial)
        self.machine.fire("abort")
        self._buffer = None
        if not keep_partial:
            self._remove_temp()

    def _close_fd(self, keep: bool = False) -> Deferred[None]:
        """Close the temporary file; with ``keep`` the bytes received so far are written first.

        Fires once it is closed (its writer's last job may still be running).
        """
        writer, self._writer = self._writer, None
        pieces, self._pieces, self._pending = self._pieces, [], 0
        fd, self._fd = self._fd, None
        if writer is not None:
            return writer.close(pieces if keep else None)  # and the descriptor with it
        if fd is not None:
            os.close(fd)
        return succeed(None)


__all__ = [
    "SMALL_FILE", "FLUSH_AHEAD", "WRITE_BATCH", "MAX_QUEUED_BATCHES", "OK", "CORRUPT",
    "CONFLICT", "FinishResult", "FileReceiver",
]
