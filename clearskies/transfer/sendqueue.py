"""What one connection writes, in an order the framing allows (protocol/transfer.md, 3.1).

:class:`SendQueue` serialises a connection's output: one file at a time
(:class:`~clearskies.transfer.sender.FileSender`), small messages in
between, both queues bounded.  It opens waiting files in worker threads, a
batch of small ones per job, and answers a ``get`` whose file cannot be
served with ``get_error`` (:mod:`clearskies.transfer.refusals`).  A run
of large messages (a manifest's pages) is paced with :meth:`SendQueue.send_paced`:
the next goes once the connection has taken the last one in.
"""

from __future__ import annotations

import errno
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IConsumer, IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from clearskies import wire
from clearskies.errors import ProtocolError
from clearskies.ratelimit import RateLimiter
from clearskies.interfaces import IRunner
from clearskies.transfer.refusals import describe_os_error, get_error_message
from clearskies.transfer.sender import FileSender, OpenedFile, open_to_send
from clearskies.transfer.deltas import StreamSender


MAX_QUEUED_FILES = 64
"""Most ``get`` requests one connection may have waiting for their turn."""

MAX_QUEUED_MESSAGE_BYTES = 32 * 1024 * 1024
"""Most bytes of messages held back while a file is being sent (two maximal lines)."""

#: A sender opens at most this many queued small files (and bytes of them) in one worker job.
PREPARE_FILES = 32
PREPARE_BYTES = 4 * 1024 * 1024


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


def _open_stream(open_stream: Callable[[], Any]) -> list[Any]:
    """Open a stream's reader (worker thread); an OSError takes its place."""
    try:
        return [open_stream()]
    except OSError as e:
        return [e]


def _close_quietly(opened: Any) -> None:
    """Close an opened file or stream reader that will not be sent."""
    (opened.file if isinstance(opened, OpenedFile) else opened).close()


@dataclass(frozen=True)
class SendResult:
    """What became of one queued file: sent (``size`` payload bytes) or not (``error``)."""

    path: str
    sent: bool
    size: int = 0
    error: str | None = None


@implementer(IPushProducer)
class _Pacer:
    """The connection's producer while a paced message is being taken in.

    The transport pauses it when its buffer is over its bound and resumes
    it once the buffer has drained; that is all a paced sender waits for.
    """

    def __init__(self, queue: SendQueue) -> None:
        self._queue = queue
        self.paused = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self._queue._release_paced()

    def stopProducing(self) -> None:
        self._queue._release_paced(stopped=True)


@dataclass
class _FileRequest:
    path: str
    local_path: Path
    expected_size: int | None
    request_range: tuple[int, int] | None
    on_sent: Callable[[int], None] | None
    done: Deferred[SendResult]
    #: A payload made while it is sent (protocol/rsync.md): its first line, and
    #: what opens its reader in a worker thread when its turn comes.
    header: dict | None = None
    open_stream: Callable[[], Any] | None = None


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

    def __init__(self, consumer: IConsumer, clock: IReactorTime, *, runner: IRunner,
                 max_files: int = MAX_QUEUED_FILES,
                 max_message_bytes: int = MAX_QUEUED_MESSAGE_BYTES,
                 chunk_size: int = wire.SEND_CHUNK_SIZE,
                 limiter: RateLimiter | None = None) -> None:
        self._consumer = consumer
        self._runner = runner
        self._clock = clock
        self._limiter = limiter
        count_wire_bytes = getattr(consumer, "count_wire_bytes", None)
        if limiter is not None and count_wire_bytes is not None:
            count_wire_bytes(limiter)  # a compressed connection (protocol/gzip.md)
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
        # Senders of paced messages waiting for the connection to take them in,
        # and the producer standing in the consumer's producer slot meanwhile.
        self._paced: list[Deferred[None]] = []
        self._pacer: _Pacer | None = None

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

    def send_paced(self, data: bytes) -> Deferred[None]:
        """Write one of a run of large messages; the Deferred fires when the next may go.

        That is once this message has left the queue (after the file being
        sent, if any) and the connection's buffer has drained below its
        bound: a sender of many pages thus holds one or two at a time, and
        never more than one waits here.  While it waits, the queue holds
        the consumer's producer slot (files take it over when they start).
        The Deferred also fires once the connection is gone: the sender
        must then stop.  Raises ProtocolError as :meth:`send_message` does.
        """
        waiter: Deferred[None] = Deferred()
        if self._stopped:
            waiter.callback(None)
            return waiter
        if self._current is None and self._pacer is None:
            self._pacer = _Pacer(self)
            self._consumer.registerProducer(self._pacer, True)
        self._paced.append(waiter)
        try:
            self.send_message(data)
        except ProtocolError:
            self._paced.remove(waiter)
            raise
        self._release_paced()
        return waiter

    def _release_paced(self, stopped: bool = False) -> None:
        """Let paced senders go on if what they wrote is taken in (or can never be)."""
        if not stopped and not self._stopped and (
                self._current is not None or self._messages
                or (self._pacer is not None and self._pacer.paused)):
            return
        self._drop_pacer()
        waiters, self._paced = self._paced, []
        for waiter in waiters:
            waiter.callback(None)

    def _drop_pacer(self) -> None:
        """Give the consumer's producer slot back (to a file sender, or to nobody)."""
        pacer, self._pacer = self._pacer, None
        if pacer is not None and not self._stopped:
            self._consumer.unregisterProducer()

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

    def send_stream(self, path: str, header: dict, open_stream: Callable[[], Any], *,
                    on_sent: Callable[[int], None] | None = None) -> Deferred[SendResult]:
        """Queue a payload made as it is sent: ``!header``, then what its reader hands out.

        ``open_stream()`` runs in a worker thread when its turn comes and
        returns a reader (``read(n)``, ``close()``, both safe in a worker);
        an OSError from it is answered with ``get_error`` for ``path``, as a
        file that cannot be opened is.  It waits in line with the files.
        """
        if self._stopped:
            return succeed(SendResult(path, False, error="connection closed"))
        if self.waiting_files >= self._max_files:
            raise ProtocolError("more than %d file requests pending" % self._max_files)
        request = _FileRequest(path, Path(), None, None, on_sent, Deferred(), header, open_stream)
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
            if not isinstance(opened, OSError):
                _close_quietly(opened)
            request.done.callback(SendResult(request.path, False, error="connection closed"))
        files, self._files = self._files, deque()
        for request in files:
            request.done.callback(SendResult(request.path, False, error="connection closed"))
        self._release_paced(stopped=True)

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
                break
            self._open_in_worker()
        if self._paced:
            self._release_paced()

    def _open_in_worker(self) -> None:
        """Open the next file, and the small ones right behind it, in one worker job.

        A job per file would cost the sender more than the reads of many
        small files; the batch is bounded by PREPARE_FILES and PREPARE_BYTES
        (small files are read whole, so their content waits in memory).
        """
        batch = [self._files.popleft()]
        if batch[0].open_stream is not None:
            self._opening = batch
            self._runner.run(_open_stream, batch[0].open_stream).addBoth(self._opened)
            return
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
        return (request.open_stream is None and request.request_range is None and request.expected_size is not None
                and request.expected_size <= self._chunk_size)

    def _opened(self, results: list[OpenedFile | OSError] | Failure) -> None:
        batch, self._opening = self._opening, []
        if isinstance(results, Failure):
            self._log.failure("opening files to send failed", results)
            results = [OSError(errno.EIO, "the file could not be read")] * len(batch)
        if self._stopped:
            for request, opened in zip(batch, results):
                if not isinstance(opened, OSError):
                    _close_quietly(opened)
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

    def _start(self, request: _FileRequest, opened: Any) -> None:
        self._drop_pacer()  # the file's sender registers itself; paced senders wait for it
        if request.header is not None:
            sender: FileSender = StreamSender(
                self._clock, request.header, opened, chunk_size=self._chunk_size,
                on_sent=request.on_sent, limiter=self._limiter, runner=self._runner)
            self._current = sender
            sender.begin(self._consumer).addCallbacks(
                self._file_sent, self._file_stopped,
                callbackArgs=(request, sender), errbackArgs=(request, sender))
            return
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
    "MAX_QUEUED_FILES", "MAX_QUEUED_MESSAGE_BYTES", "PREPARE_FILES", "PREPARE_BYTES",
    "SendResult", "SendQueue",
]
