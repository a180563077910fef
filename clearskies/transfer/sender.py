"""Sending one file (protocol/transfer.md, section 3 "Answering").

:class:`FileSender` streams one file as a ``file_data`` message, a chunk at a
time, as a Twisted push producer, so a slow peer or a full socket buffer
stops the disk reads.  :func:`open_to_send` opens and checks the file in a
worker thread; :class:`clearskies.transfer.sendqueue.SendQueue` decides when
each file's turn comes on its connection.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IConsumer, IDelayedCall, IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from clearskies import diskjobs, wire
from clearskies.ratelimit import MAX_WAIT, RateLimiter
from clearskies.interfaces import IRunner


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
                 limiter: RateLimiter | None = None, runner: IRunner,
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
             limiter: RateLimiter | None = None, runner: IRunner) -> FileSender:
        """Open ``local_path`` to answer a ``get`` for ``path``, on the calling thread.

        Raises OSError when it cannot be served as recorded: missing,
        unreadable, not a regular file (symlinks are not followed), a size
        other than ``expected_size``, or a range outside the file.
        :func:`~clearskies.transfer.refusals.describe_os_error` turns that
        into the ``get_error`` text.  (:class:`~clearskies.transfer.sendqueue.SendQueue`
        opens files in a worker instead.)
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


__all__ = ["OpenedFile", "open_to_send", "FileSender"]
