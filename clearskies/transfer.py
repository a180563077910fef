"""Moving file content between peers (protocol/transfer.md).

Receiving: :class:`FileReceiver` writes a download into a hidden temporary
file next to its target, hashing as the bytes arrive, then verifies size and
SHA-256, applies mtime and permissions, fsyncs, and renames over the target
only if the target did not change locally meanwhile.  The temporary name
depends only on the target's name and the expected hash, so a download cut
off by a lost connection or a restart resumes with ``range``.

Sending: :class:`FileSender` streams one file as a ``file_data`` message, a
chunk at a time, as a Twisted push producer, so a slow peer or a full socket
buffer stops the disk reads.  :class:`SendQueue` serialises everything one
connection writes: one file at a time, small messages in between.

Threads: received bytes are written and hashed by the injected runner in
batches (:class:`clearskies.backpressure.BatchWriter`, which pauses the
connection while more than ``MAX_QUEUED_BATCHES`` wait); a small download is held in memory and created,
hashed and fsynced in one worker job, several at once (:class:`BufferedSeals`);
verifying, fsync, renames (:func:`finish_many`) and the sender's opens and
reads run in the runner too.  The reactor thread keeps only the calls that
set a download up (stat of a partial file, opening the temporary file).

A receiver's life is an explicit state machine (:data:`RECEIVER_TRANSITIONS`,
drawn in ``protocol/receiver.dot``); a call its state does not allow raises
:class:`IllegalTransition`.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections import deque
from collections.abc import Callable
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IConsumer, IDelayedCall, IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from clearskies import diskerrors, diskjobs, wire
from clearskies.backpressure import BatchWriter
from clearskies.errors import ProtocolError
from clearskies.ratelimit import MAX_WAIT, RateLimiter
from clearskies.share.records import FileRecord
from clearskies.threads import Runner

TEMP_SUFFIX = ".!clearsky"
"""Ends the name of every partial download; the scanner must skip such files."""

BLOCK_SIZE = 1024 * 1024
"""Read/write block for copying and re-hashing in worker threads."""

SMALL_FILE = 128 * 1024
"""Downloads up to this size may be held in memory until sealed (``buffer_limit``)."""

FLUSH_AHEAD = 32 * 1024 * 1024
"""Bytes a download writes before a worker starts flushing them to disk (the last fsync stays)."""

WRITE_BATCH = 512 * 1024
"""Received bytes collected before they go to the writer thread as one batch."""

MAX_QUEUED_BATCHES = 4
"""Batches a download may have waiting for its writer; beyond that its connection is paused."""

MAX_QUEUED_FILES = 64
"""Most ``get`` requests one connection may have waiting for their turn."""

MAX_QUEUED_MESSAGE_BYTES = 32 * 1024 * 1024
"""Most bytes of messages held back while a file is being sent (two maximal lines)."""

#: A sender opens at most this many queued small files (and bytes of them) in one worker job.
PREPARE_FILES = 32
PREPARE_BYTES = 4 * 1024 * 1024

OK = "ok"
CORRUPT = "corrupt"
CONFLICT = "conflict"

#: Write permission bits, removed on disk from a read-only share's files when
#: the ``read_only_files`` setting is on.
WRITE_BITS = 0o222


def unwritable_mode(mode: int | None) -> int:
    """A record's permission bits (0o644 when it has none) without write permission."""
    return (mode if mode is not None else 0o644) & 0o777 & ~WRITE_BITS


def temp_name(name: str, sha256: str) -> str:
    """``.<name>.<first 16 hex of sha256>.!clearsky``, shortened to fit in 255 bytes."""
    room = 255 - (1 + 1 + 16 + len(TEMP_SUFFIX))
    encoded = name.encode("utf-8")
    if len(encoded) > room:
        name = encoded[:room].decode("utf-8", "ignore")
    return ".%s.%s%s" % (name, sha256[:16], TEMP_SUFFIX)


def is_temp_name(name: str) -> bool:
    """True for names of our partial downloads (never part of a share's content)."""
    return name.startswith(".") and name.endswith(TEMP_SUFFIX)


def get_error_message(path: str, message: str) -> dict[str, Any]:
    """The answer to a ``get`` we cannot serve."""
    return {"type": "get_error", "path": path, "message": message}


def describe_os_error(error: OSError) -> str:
    """A reason for a peer: says what went wrong without naming local paths."""
    if isinstance(error, FileNotFoundError):
        return "no such file"
    if isinstance(error, PermissionError):
        return "permission denied"
    if error.errno == errno.ELOOP:
        return "not a regular file"
    return error.strerror or "cannot read the file"


# -- receiving -------------------------------------------------------------------------


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


# -- the receiver's state machine (protocol/receiver.dot) ------------------------------

_NEW, _WRITING, _BUSY, _VERIFIED, _DONE = "new", "writing", "busy", "verified", "done"
_FAILED = "failed"
"""The local disk refused a write: the rest of the payload is dropped and seal()
raises that error (clearskies.diskerrors)."""

RECEIVER_STATES = (_NEW, _WRITING, _BUSY, _VERIFIED, _DONE, _FAILED)

RECEIVER_TRANSITIONS: dict[tuple[str, str], str] = {
    # Filling the temporary file (or the memory buffer of a small file).
    (_NEW, "open"): _WRITING,
    (_WRITING, "write"): _WRITING,
    (_FAILED, "write"): _FAILED,  # the rest of the payload is dropped
    (_NEW, "copy"): _BUSY,
    (_WRITING, "copy"): _BUSY,
    (_BUSY, "copied"): _WRITING,
    (_BUSY, "copy_failed"): _NEW,
    # Verifying and fsyncing (seal).
    (_WRITING, "seal"): _BUSY,
    (_BUSY, "sealed"): _VERIFIED,
    (_BUSY, "rejected"): _DONE,
    (_NEW, "disk_failed"): _FAILED,
    (_WRITING, "disk_failed"): _FAILED,
    (_BUSY, "disk_failed"): _FAILED,
    (_FAILED, "seal_failed"): _DONE,
    # Putting the verified content in place (finish, finish_many, keep_as).
    (_VERIFIED, "install"): _BUSY,
    (_BUSY, "installed"): _DONE,
    (_BUSY, "install_failed"): _VERIFIED,
    # Giving up (not while file work runs).
    (_NEW, "abort"): _DONE,
    (_WRITING, "abort"): _DONE,
    (_VERIFIED, "abort"): _DONE,
    (_FAILED, "abort"): _DONE,
    (_DONE, "abort"): _DONE,
}
"""(state, input) -> next state.  Any other pair raises IllegalTransition."""


class IllegalTransition(RuntimeError):
    """An input the machine's current state does not take: the caller's bug, not the peer's."""


class ReceiverMachine:
    """Where one download is: a transition table, an observer for tests and logs."""

    def __init__(self, observer: Callable[[str, str, str], None] | None = None) -> None:
        self.state = _NEW
        #: Called with (state, input, next state) after every transition.
        self.observer = observer

    def fire(self, event: str) -> str:
        """Take ``event``; the new state.  IllegalTransition if this state does not take it."""
        after = RECEIVER_TRANSITIONS.get((self.state, event))
        if after is None:
            raise IllegalTransition("%s of a download that is %s" % (event, self.state))
        before, self.state = self.state, after
        if self.observer is not None:
            self.observer(before, event, after)
        return after


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
                 runner: Runner, resume: bool = True, buffer_limit: int = 0,
                 sealer: BufferedSeals | None = None, unwritable: bool = False) -> None:
        """``unwritable``: the file is put in place without write permission
        (a read-only share's option); its record keeps the share's mode."""
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
        #: The local disk error that stopped this download (state _FAILED), if any.
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
        if self.machine.state == _NEW:
            if self._buffer is None:
                self._open_for_writing()
            else:
                self.machine.fire("open")
        if self.machine.fire("write") == _FAILED:
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
            self._runner.run(_flush_copy, os.dup(self._fd)).addBoth(self._flushed)

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
                                   producer=self.producer, max_queued=MAX_QUEUED_BATCHES)
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
        if self.machine.state not in (_NEW, _WRITING):
            raise IllegalTransition("copy into a download that is %s" % self.machine.state)
        closed = self._close_fd()
        self._buffer = None
        self._prepare_directory()
        self.machine.fire("copy")
        d = closed.addCallback(lambda _: self._runner.run(
            _copy_into, Path(source), self.temp_path, self.expected.size))

        def copied(result: tuple[Any, int, int]) -> None:
            self._hasher, self._received, self._fd = result
            self._writer = BatchWriter(self._runner, self._fd, self._received, self._hasher,
                                       producer=self.producer, max_queued=MAX_QUEUED_BATCHES)
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
            if self.machine.state != _FAILED:
                self._disk_failed(e)
            self.machine.fire("seal_failed")
            raise

    async def _seal_checked(self) -> str | None:
        if self.machine.state == _FAILED:
            assert self.disk_error is not None
            raise self.disk_error
        if self.machine.state == _NEW:
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
                problem = await self._runner.run(_seal_buffered, *args)
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
                _seal, fd, self.temp_path, hasher, self._overflow, self._on_disk)
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
        if self.machine.state != _VERIFIED:
            problem = await self._seal_temp()
            if problem is not None:
                return FinishResult(CORRUPT, self.local_path, reason=problem)
        if not await maybeDeferred(is_unchanged):
            return FinishResult(CONFLICT, self.temp_path,
                                reason="the file changed locally during the download")
        self.machine.fire("install")
        try:
            size, mtime_ns, inode = await self._runner.run(
                _install, self.temp_path, self.local_path, sync_directory)
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
        if self.machine.state != _VERIFIED:
            raise IllegalTransition("keep_as on a download that is %s" % self.machine.state)
        other_path = Path(other_path)
        diskjobs.check_inside(self.root, other_path, resolve=False)
        if not other_path.parent.is_dir():
            other_path.parent.mkdir(parents=True, exist_ok=True)
        diskjobs.check_inside(self.root, other_path, resolve=True)
        self.machine.fire("install")
        d = self._runner.run(_keep, self.temp_path, other_path, self.expected.sha256)

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
        writing a partial out on the reactor thread.  Not allowed while a copy, a verification or a rename is running.
        """
        if self.machine.state == _DONE:
            return
        if self.machine.state == _BUSY:
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


class BufferedSeals:
    """Seals small in-memory downloads several at a time: one worker job per batch.

    A download of a few kilobytes costs less to write and fsync than the
    thread hop that carries it to a worker; hundreds of them a second also
    keep every worker thread contending with the reactor thread for the
    GIL.  So at most ``max_jobs`` seal jobs run at once: two let their
    fsyncs overlap (the file system commits them together), while a third
    cost the reactor more in GIL waits than it saved (W2, bench/README.md).
    Seals that arrive while they are all busy wait, and go
    together, up to ``max_batch`` at a time, to the next free one.  The
    waiting line holds at most the downloads the sync layer lets finish at
    once (``sync.MAX_FINISHING``), each at most ``SMALL_FILE`` bytes.
    """

    def __init__(self, runner: Runner, *, max_batch: int = 32, max_jobs: int = 2) -> None:
        self._runner = runner
        self.max_batch = max_batch
        self.max_jobs = max_jobs
        self._queue: list[tuple[tuple[Any, ...], Deferred[str | None]]] = []
        self._jobs = 0

    def seal(self, root: Path, target: Path, temp: Path, data: bytes, overflow: bool,
             expected: diskjobs.Content) -> Deferred[str | None]:
        """Like running :func:`_seal_buffered` in a worker: fires with None or the problem."""
        done: Deferred[str | None] = Deferred()
        self._queue.append(((root, target, temp, data, overflow, expected), done))
        self._start()
        return done

    def _start(self) -> None:
        while self._queue and self._jobs < self.max_jobs:
            batch = self._queue[:self.max_batch]
            del self._queue[:self.max_batch]
            self._jobs += 1
            job = self._runner.run(diskjobs.seal_buffered_many, [args for args, _ in batch])
            job.addBoth(self._done, batch)

    def _done(self, outcome: list[str | None | BaseException] | Failure,
              batch: list[tuple[tuple[Any, ...], Deferred[str | None]]]) -> None:
        self._jobs -= 1
        for index, (_, done) in enumerate(batch):
            result = outcome if isinstance(outcome, Failure) else outcome[index]
            if isinstance(result, (Failure, BaseException)):
                done.errback(result if isinstance(result, Failure) else Failure(result))
            else:
                done.callback(result)
        self._start()


def finish_many(runner: Runner, items: list[tuple[FileReceiver, bool]]
                ) -> Deferred[list[FinishResult | Failure]]:
    """Put many sealed downloads in place with one runner call; one result per item.

    ``items`` pairs each receiver (after :meth:`FileReceiver.seal`) with the
    answer of its unchanged-since-scan check, taken just before: False gives
    CONFLICT (the verified content waits in the temporary file).  The others
    are renamed and their directories fsynced once each in a single worker
    job, so a batch of small files costs one thread hop instead of one per
    file.  A rename that fails gives that item a Failure; the rest go on.
    """
    return Deferred.fromCoroutine(_finish_many(runner, items))


async def _finish_many(runner: Runner, items: list[tuple[FileReceiver, bool]]
                       ) -> list[FinishResult | Failure]:
    results: list[FinishResult | Failure | None] = []
    moving: list[tuple[int, FileReceiver]] = []
    for index, (receiver, unchanged) in enumerate(items):
        if receiver.state != _VERIFIED:
            results.append(Failure(IllegalTransition(
                "install of a download that is %s" % receiver.state)))
            continue
        if not unchanged:
            results.append(FinishResult(CONFLICT, receiver.temp_path,
                                        reason="the file changed locally during the download"))
            continue
        results.append(None)
        moving.append((index, receiver))
    if not moving:
        return [r for r in results if r is not None]
    for _, receiver in moving:
        receiver.machine.fire("install")
    try:
        outcomes = await runner.run(
            diskjobs.install_batch, [(r.temp_path, r.local_path) for _, r in moving])
    except BaseException:
        for _, receiver in moving:
            receiver.machine.fire("install_failed")
        raise
    for (index, receiver), outcome in zip(moving, outcomes):
        if isinstance(outcome, BaseException):
            receiver.machine.fire("install_failed")
            results[index] = Failure(outcome)
        else:
            receiver.machine.fire("installed")
            results[index] = FinishResult(OK, receiver.local_path, *outcome)
    return [r for r in results if r is not None]


# Worker-thread jobs: plain values in and out, no Twisted objects.


def _hash_fd(fd: int) -> str:
    hasher = hashlib.sha256()
    position = 0
    while block := os.pread(fd, BLOCK_SIZE, position):
        hasher.update(block)
        position += len(block)
    return hasher.hexdigest()


def _seal(fd: int, temp: Path, hasher: Any, overflow: bool,
          expected: FileRecord) -> str | None:
    """Verify the temporary file; if good, set its metadata, fsync it and close it.

    Returns None when it is ready for the rename, else why it was deleted.
    """
    try:
        size = os.fstat(fd).st_size
        if overflow:
            problem = "the peer sent more than %d bytes" % expected.size
        elif size != expected.size:
            problem = "got %d bytes, expected %d" % (size, expected.size)
        else:
            digest = hasher.hexdigest() if hasher is not None else _hash_fd(fd)
            problem = None if digest == expected.sha256 else "SHA-256 mismatch"
        if problem is None:
            os.fchmod(fd, (expected.mode if expected.mode is not None else 0o644) & 0o777)
            if expected.mtime_ns is not None:
                os.utime(fd, ns=(expected.mtime_ns, expected.mtime_ns))
            os.fsync(fd)
    finally:
        os.close(fd)
    if problem is not None:
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
    return problem


def _seal_buffered(root: Path, target: Path, temp: Path, data: bytes, overflow: bool,
                   expected: diskjobs.Content) -> str | None:
    """Verify a small download held in memory, then write and fsync its temporary file.

    Returns None when it is ready for the rename, else why it was refused
    (then nothing was written).
    """
    [outcome] = diskjobs.seal_buffered_many([(root, target, temp, data, overflow, expected)])
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def _install(temp: Path, target: Path, sync_directory: bool = True) -> tuple[int, int, int]:
    os.replace(temp, target)
    if sync_directory:
        diskjobs.fsync_directory(target.parent)
    return diskjobs.stat_key(target)


def _keep(temp: Path, other: Path, sha256: str) -> tuple[int, int, int]:
    try:
        os.link(temp, other)  # fails rather than overwrite
    except FileExistsError:
        fd = os.open(other, os.O_RDONLY | diskjobs.OPEN_FLAGS)
        try:
            same = _hash_fd(fd) == sha256
        finally:
            os.close(fd)
        if not same:
            raise
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        # No hard links here: check, then rename (a tiny window, but no clobbering by us).
        if os.path.lexists(other):
            raise FileExistsError(errno.EEXIST, "conflict copy path is taken") from None
        os.rename(temp, other)
        diskjobs.fsync_directory(other.parent)
        return diskjobs.stat_key(other)
    os.unlink(temp)
    diskjobs.fsync_directory(other.parent)
    return diskjobs.stat_key(other)


def _flush_copy(fd: int) -> None:
    """fdatasync a duplicate descriptor, then close it: the receiver may close its own meanwhile."""
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


def _copy_into(source: Path, temp: Path, limit: int) -> tuple[Any, int, int]:
    """Copy ``source`` into ``temp`` (at most ``limit + 1`` bytes), hashing on the way.

    Returns the hasher, the byte count and the still open descriptor of ``temp``.
    """
    hasher = hashlib.sha256()
    copied = 0
    src = os.open(source, os.O_RDONLY | diskjobs.OPEN_FLAGS)
    try:
        dst = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | diskjobs.OPEN_FLAGS, 0o600)
        try:
            while copied <= limit:
                block = os.read(src, min(BLOCK_SIZE, limit + 1 - copied))
                if not block:
                    break
                diskjobs.write_all(dst, block)
                hasher.update(block)
                copied += len(block)
        except BaseException:
            os.close(dst)
            raise
    finally:
        os.close(src)
    return hasher, copied, dst


# -- sending -------------------------------------------------------------------------------


@dataclass
class OpenedFile:
    """A file opened to be sent: positioned at ``start`` plus what ``first`` holds."""

    file: BinaryIO
    start: int
    length: int
    first: bytes = b""


def open_to_send(local_path: Path, expected_size: int | None,
                 request_range: tuple[int, int] | None, first_chunk: int) -> OpenedFile:
    """Open, check and (``first_chunk`` > 0) read the start of a file to send (worker thread).

    Raises OSError when it cannot be served as recorded (see FileSender.open).
    """
    fd = os.open(local_path, os.O_RDONLY | diskjobs.OPEN_FLAGS)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        if expected_size is not None and st.st_size != expected_size:
            raise OSError(errno.ESTALE, "the file changed since it was last scanned")
        if request_range is None:
            start, length = 0, st.st_size
        else:
            start, length = request_range
            if start < 0 or length < 0 or start + length > st.st_size:
                raise OSError(errno.EINVAL, "the requested range lies outside the file")
        os.lseek(fd, start, os.SEEK_SET)
        first = os.read(fd, min(first_chunk, length)) if first_chunk and length else b""
    except BaseException:
        os.close(fd)
        raise
    return OpenedFile(os.fdopen(fd, "rb", buffering=0), start, length, first)


def _open_many_to_send(jobs: list[tuple[Path, int | None, tuple[int, int] | None]],
                       first_chunk: int) -> list[OpenedFile | OSError]:
    """:func:`open_to_send` for several files (worker thread); an error takes its file's place."""
    out: list[OpenedFile | OSError] = []
    for local_path, expected_size, request_range in jobs:
        try:
            out.append(open_to_send(local_path, expected_size, request_range, first_chunk))
        except OSError as e:
            out.append(e)
    return out


@implementer(IPushProducer)
class FileSender:
    """Streams one file as ``!{"type":"file_data",…}`` + chunks + ``0``.

    A push producer: it registers itself with the consumer, reads and writes
    one chunk per reactor turn, and stops reading while paused.  The Deferred
    from :meth:`begin` fires with the payload bytes sent, or fails with
    ConnectionLost if the consumer stopped it.  With a ``limiter`` (upload
    limit) it sends smaller chunks and waits, between chunks, for the bucket.

    Each chunk is read through ``runner``, a worker thread in the daemon (a
    cold disk never holds the reactor); ``first`` is a chunk already read
    from ``file``.  The file is closed only once no read of it is running.
    """

    _log = Logger()

    def __init__(self, clock: IReactorTime, path: str, file: BinaryIO, start: int, length: int,
                 *, include_range: bool = False, chunk_size: int = wire.SEND_CHUNK_SIZE,
                 on_sent: Callable[[int], None] | None = None,
                 limiter: RateLimiter | None = None, runner: Runner,
                 first: bytes = b"") -> None:
        if not 1 <= chunk_size <= wire.MAX_CHUNK_SIZE:
            raise ValueError("chunk_size must be 1 to %d" % wire.MAX_CHUNK_SIZE)
        self.path = path
        self.start = start
        self.length = length
        self._clock = clock
        self._file = file
        self._include_range = include_range
        self._chunk_size = chunk_size
        self._on_sent = on_sent
        self._limiter = limiter
        self._remaining = length
        self._sent = 0
        self._consumer: IConsumer | None = None
        self._call: IDelayedCall | None = None
        self._paused = False
        self._finished = False
        self._done: Deferred[int] = Deferred()
        self._runner = runner
        self._reading = False  # a worker is reading the next chunk
        self._ready: memoryview | None = memoryview(first) if first else None  # read, not sent

    @classmethod
    def open(cls, clock: IReactorTime, path: str, local_path: Path, *,
             expected_size: int | None = None, request_range: tuple[int, int] | None = None,
             chunk_size: int = wire.SEND_CHUNK_SIZE,
             on_sent: Callable[[int], None] | None = None,
             limiter: RateLimiter | None = None, runner: Runner) -> FileSender:
        """Open ``local_path`` to answer a ``get`` for ``path``, on the calling thread.

        Raises OSError when it cannot be served as recorded: missing,
        unreadable, not a regular file (symlinks are not followed), a size
        other than ``expected_size``, or a range outside the file.
        :func:`describe_os_error` turns that into the ``get_error`` text.
        (:class:`SendQueue` opens files in a worker instead.)
        """
        opened = open_to_send(local_path, expected_size, request_range, 0)
        return cls(clock, path, opened.file, opened.start, opened.length,
                   include_range=request_range is not None, chunk_size=chunk_size,
                   on_sent=on_sent, limiter=limiter, runner=runner)

    def header(self) -> dict[str, Any]:
        """The ``file_data`` message; ``range`` only when the request had one."""
        body: dict[str, Any] = {"type": "file_data", "path": self.path}
        if self._include_range:
            body["range"] = [self.start, self.length]
        return body

    def begin(self, consumer: IConsumer) -> Deferred[int]:
        """Register with ``consumer`` and start streaming."""
        if self._consumer is not None:
            raise RuntimeError("a FileSender streams only once")
        self._consumer = consumer
        consumer.registerProducer(self, True)
        if not self._finished:
            consumer.write(wire.encode_payload_start(self.header()))
            self._schedule()
        return self._done

    def _schedule(self, delay: float = 0.0) -> None:
        if self._call is None and not self._paused and not self._finished:
            self._call = self._clock.callLater(delay, self._step)

    def _step(self) -> None:
        self._call = None
        if self._paused or self._finished or self._reading:
            return
        assert self._consumer is not None
        chunk_size = self._chunk_size
        if self._limiter is not None and self._remaining:
            wait = self._limiter.delay()
            if wait > 0:  # over the upload limit: no disk read until the bucket refills
                self._schedule(min(wait, MAX_WAIT))
                return
            chunk_size = self._limiter.chunk_size(chunk_size)
        if self._ready is not None:
            # Read ahead before the limit was known (or while paused): sent in
            # pieces of at most the chunk size the limiter allows now.
            ready = self._ready
            data, rest = bytes(ready[:chunk_size]), ready[chunk_size:]
            self._ready = rest if len(rest) else None
            self._send(data)
            return
        wanted = min(chunk_size, self._remaining)
        if not wanted:
            self._send(b"")  # an empty file or range: the payload ends at once
            return
        self._reading = True
        self._runner.run(self._file.read, wanted).addBoth(self._read)

    def _read(self, result: bytes | Failure) -> None:
        """A worker's read is back: send it, keep it while paused, or close up."""
        self._reading = False
        if self._finished:  # stopped while the worker read
            self._file.close()
            return
        if isinstance(result, Failure):
            result = self._read_failed(result.value)
        if self._paused:
            self._ready = memoryview(result)
            return
        self._send(result)

    def _read_failed(self, error: BaseException) -> bytes:
        # The header is out: end the payload short; the receiver's check rejects it.
        self._log.warn("reading {path} failed while sending: {why}",
                       path=self.path, why=getattr(error, "strerror", None) or str(error))
        return b""

    def _send(self, data: bytes) -> None:
        assert self._consumer is not None
        if not data:
            if self._remaining:
                self._log.warn("{path} ended {missing} bytes early while being sent",
                               path=self.path, missing=self._remaining)
            self._end()
            return
        self._remaining -= len(data)
        self._sent += len(data)
        self._consumer.write(wire.encode_chunk_header(len(data)))
        self._consumer.write(data)
        if self._on_sent is not None:
            self._on_sent(len(data))
        if self._limiter is not None:
            self._limiter.consume(len(data))
        if self._finished:  # stopped from inside write()
            return
        if not self._remaining:
            self._end()
        else:
            self._schedule()

    def _end(self) -> None:
        assert self._consumer is not None
        self._finished = True
        self._file.close()
        self._consumer.write(wire.PAYLOAD_END)
        self._consumer.unregisterProducer()
        self._done.callback(self._sent)

    # IPushProducer

    def pauseProducing(self) -> None:
        self._paused = True
        if self._call is not None:
            self._call.cancel()
            self._call = None

    def resumeProducing(self) -> None:
        self._paused = False
        self._schedule()

    def stopProducing(self) -> None:
        if self._finished:
            return
        self._finished = True
        if self._call is not None:
            self._call.cancel()
            self._call = None
        if not self._reading:  # else the read's return closes it
            self._file.close()
        self._done.errback(ConnectionLost("stopped while sending %s" % (self.path,)))


@dataclass(frozen=True)
class SendResult:
    """What became of one queued file: sent (``size`` payload bytes) or not (``error``)."""

    path: str
    sent: bool
    size: int = 0
    error: str | None = None


@dataclass
class _FileRequest:
    path: str
    local_path: Path
    expected_size: int | None
    request_range: tuple[int, int] | None
    on_sent: Callable[[int], None] | None
    done: Deferred[SendResult]


class SendQueue:
    """Everything one connection writes, in an order the framing allows.

    A file's payload must not be interrupted, so while a file is being sent
    other messages wait (bounded) and go out before the next file starts.
    When no file is in flight, messages are written at once.  Files are
    opened only when their turn comes, so a file deleted or changed while
    waiting is answered with ``get_error``.  Opening a file and reading it
    happen through ``runner``, in worker threads (see FileSender).
    """

    _log = Logger()

    def __init__(self, consumer: IConsumer, clock: IReactorTime, *, runner: Runner,
                 max_files: int = MAX_QUEUED_FILES,
                 max_message_bytes: int = MAX_QUEUED_MESSAGE_BYTES,
                 chunk_size: int = wire.SEND_CHUNK_SIZE,
                 limiter: RateLimiter | None = None) -> None:
        self._consumer = consumer
        self._runner = runner
        self._clock = clock
        self._limiter = limiter
        self._max_files = max_files
        self._max_message_bytes = max_message_bytes
        self._chunk_size = chunk_size
        self._messages: deque[bytes] = deque()
        self._message_bytes = 0
        self._files: deque[_FileRequest] = deque()
        self._current: FileSender | None = None
        # Requests a worker is opening, and those it opened (or could not
        # open), in order, waiting for their turn.
        self._opening: list[_FileRequest] = []
        self._prepared: deque[tuple[_FileRequest, OpenedFile | OSError]] = deque()
        self._stopped = False

    @property
    def sending(self) -> str | None:
        """The path whose payload is being written (or whose file is being opened), if any."""
        if self._current is not None:
            return self._current.path
        if self._opening:
            return self._opening[0].path
        return self._prepared[0][0].path if self._prepared else None

    @property
    def waiting_files(self) -> int:
        return len(self._files) + len(self._prepared) + max(0, len(self._opening) - 1)

    @property
    def waiting_message_bytes(self) -> int:
        return self._message_bytes

    def send_message(self, data: bytes) -> None:
        """Write encoded message bytes now, or right after the file being sent.

        Raises ProtocolError when more than ``max_message_bytes`` wait: the
        peer is not reading, and the connection should be closed.
        """
        if self._stopped:
            return
        if self._current is None:
            self._consumer.write(data)
            return
        if self._message_bytes + len(data) > self._max_message_bytes:
            raise ProtocolError("the peer is not reading: over %d bytes of messages queued"
                                % self._max_message_bytes)
        self._messages.append(data)
        self._message_bytes += len(data)

    def send_file(self, path: str, local_path: Path, *, expected_size: int | None = None,
                  request_range: tuple[int, int] | None = None,
                  on_sent: Callable[[int], None] | None = None) -> Deferred[SendResult]:
        """Queue the answer to a ``get``: ``file_data`` with the content, or ``get_error``.

        Raises ProtocolError when the peer already has ``max_files`` requests waiting.
        The Deferred never fails; after the connection is gone it reports ``sent=False``.
        """
        if self._stopped:
            return succeed(SendResult(path, False, error="connection closed"))
        if self.waiting_files >= self._max_files:
            raise ProtocolError("more than %d file requests pending" % self._max_files)
        request = _FileRequest(path, Path(local_path), expected_size, request_range, on_sent,
                               Deferred())
        self._files.append(request)
        self._pump()
        return request.done

    def stop(self) -> None:
        """The connection is gone: stop reading, drop what waits, report unsent files."""
        if self._stopped:
            return
        self._stopped = True
        current, self._current = self._current, None
        if current is not None:
            current.stopProducing()
        self._messages.clear()
        self._message_bytes = 0
        prepared, self._prepared = self._prepared, deque()
        for request, opened in prepared:
            if isinstance(opened, OpenedFile):
                opened.file.close()
            request.done.callback(SendResult(request.path, False, error="connection closed"))
        files, self._files = self._files, deque()
        for request in files:
            request.done.callback(SendResult(request.path, False, error="connection closed"))

    def _pump(self) -> None:
        while self._current is None and not self._opening and not self._stopped:
            while self._messages:
                data = self._messages.popleft()
                self._message_bytes -= len(data)
                self._consumer.write(data)
            if self._prepared:
                request, opened = self._prepared.popleft()
                if isinstance(opened, OSError):
                    self._refuse(request, opened)
                else:
                    self._start(request, opened)
                continue
            if not self._files:
                return
            self._open_in_worker()

    def _open_in_worker(self) -> None:
        """Open the next file, and the small ones right behind it, in one worker job.

        A job per file would cost the sender more than the reads of many
        small files; the batch is bounded by PREPARE_FILES and PREPARE_BYTES
        (small files are read whole, so their content waits in memory).
        """
        batch = [self._files.popleft()]
        size = 0
        while (self._files and len(batch) < PREPARE_FILES
               and self._small(self._files[0]) and self._small(batch[-1])
               and size + (self._files[0].expected_size or 0) <= PREPARE_BYTES):
            size += self._files[0].expected_size or 0
            batch.append(self._files.popleft())
        self._opening = batch
        jobs = [(r.local_path, r.expected_size, r.request_range) for r in batch]
        self._runner.run(_open_many_to_send, jobs, self._chunk_size).addBoth(self._opened)

    def _small(self, request: _FileRequest) -> bool:
        return (request.request_range is None and request.expected_size is not None
                and request.expected_size <= self._chunk_size)

    def _opened(self, results: list[OpenedFile | OSError] | Failure) -> None:
        batch, self._opening = self._opening, []
        if isinstance(results, Failure):
            self._log.failure("opening files to send failed", results)
            results = [OSError(errno.EIO, "the file could not be read")] * len(batch)
        if self._stopped:
            for request, opened in zip(batch, results):
                if isinstance(opened, OpenedFile):
                    opened.file.close()
                request.done.callback(SendResult(request.path, False, error="connection closed"))
            return
        self._prepared.extend(zip(batch, results))
        self._pump()

    def _refuse(self, request: _FileRequest, error: OSError) -> None:
        """Answer a ``get`` whose file cannot be sent with ``get_error``."""
        reason = describe_os_error(error)
        self._log.info("cannot send {path}: {why}", path=request.path, why=reason)
        self._consumer.write(wire.encode(get_error_message(request.path, reason)))
        request.done.callback(SendResult(request.path, False, error=reason))

    def _start(self, request: _FileRequest, opened: OpenedFile) -> None:
        sender = FileSender(
            self._clock, request.path, opened.file, opened.start, opened.length,
            include_range=request.request_range is not None, chunk_size=self._chunk_size,
            on_sent=request.on_sent, limiter=self._limiter, runner=self._runner,
            first=opened.first)
        self._current = sender
        sender.begin(self._consumer).addCallbacks(
            self._file_sent, self._file_stopped,
            callbackArgs=(request, sender), errbackArgs=(request, sender))

    def _file_sent(self, size: int, request: _FileRequest, sender: FileSender) -> None:
        if self._current is sender:
            self._current = None
        request.done.callback(SendResult(request.path, True, size))
        self._pump()

    def _file_stopped(self, failure: Failure, request: _FileRequest, sender: FileSender) -> None:
        failure.trap(ConnectionLost)
        if self._current is sender:
            self._current = None
        request.done.callback(SendResult(request.path, False, error="connection closed"))
        self.stop()


__all__ = [
    "TEMP_SUFFIX", "OK", "CORRUPT", "CONFLICT", "FinishResult", "FileReceiver", "FileSender",
    "SendQueue", "SendResult", "SMALL_FILE", "temp_name", "is_temp_name", "get_error_message",
    "describe_os_error",
]
