"""Backpressure: received data that the disk cannot take yet pauses its source.

:class:`BatchWriter` writes one download's data in worker threads.  When it
falls behind, it pauses the producer the data comes from (the peer's
connection) until a worker has caught up, instead of writing on the reactor
thread; so its queue is bounded and the reactor never waits for the disk.

:class:`SharedPause` lets several parts pause one producer (a download rate
limit and a download's writer pause the same connection): a transport's
``pauseProducing`` / ``resumeProducing`` do not count, so the first resume
would undo every pause.
"""

from __future__ import annotations

import errno
import os
from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from clearskies.interfaces import IRunner

#: Batches a writer may have waiting before it pauses its producer.
MAX_QUEUED = 4
#: A producer that goes on delivering while paused still meets a hard bound:
#: past this many times ``max_queued`` waiting batches the download fails.
OVERRUN_FACTOR = 4


@implementer(IPushProducer)
class SharedPause:
    """One producer, paused while any of its users asks; resumed when the last lets go.

    Each user pairs its own ``pauseProducing`` with one ``resumeProducing``;
    a resume without a pause before it is ignored.
    """

    def __init__(self, producer: IPushProducer) -> None:
        self._producer = producer
        self._holds = 0

    @property
    def paused(self) -> bool:
        return self._holds > 0

    def pauseProducing(self) -> None:
        self._holds += 1
        if self._holds == 1:
            self._producer.pauseProducing()

    def resumeProducing(self) -> None:
        if self._holds == 0:
            return
        self._holds -= 1
        if self._holds == 0:
            self._producer.resumeProducing()

    def stopProducing(self) -> None:
        self._producer.stopProducing()


class WriterOverrun(OSError):
    """More batches waited than the hard bound: the producer did not pause."""

    def __init__(self, waiting: int) -> None:
        super().__init__(errno.ENOBUFS, "%d batches of a download waited for the disk: "
                         "its source did not pause" % waiting)


class BatchWriter:
    """Writes and hashes one download's batches in worker threads, in arrival order.

    The reactor only queues batches (lists of received pieces).  One runner
    job at a time drains the queue, writing at explicit offsets and feeding
    the hasher, so neither the write calls nor the hashing hold the reactor.
    Once more than ``max_queued`` batches wait, ``producer`` is paused; it
    is resumed when a job has brought the queue back within that bound (or
    the writer fails or closes).  With ``wake`` (the reactor's
    ``callFromThread``) it is resumed as soon as the job has taken the queued
    batches, so the next data is read and decrypted while they are written.
    The writer owns the descriptor it was given once :meth:`close` is called.
    Without a producer, or if it keeps delivering, more than
    ``OVERRUN_FACTOR * max_queued`` waiting batches fail the download with
    :class:`WriterOverrun`.
    """

    _log = Logger()

    def __init__(self, runner: IRunner, fd: int, position: int, hasher: Any, *,
                 producer: IPushProducer | None = None, max_queued: int = MAX_QUEUED,
                 wake: Callable[[Callable[[], None]], None] | None = None) -> None:
        self._runner = runner
        self._wake = wake
        self._fd: int | None = fd
        self._position = position  # changed only by the one job that runs at a time
        self._hasher = hasher  # None: the whole file is hashed when sealed
        self._queue: deque[list[bytes]] = deque()
        self._running = False
        self._closed = False
        self._keep = False  # closed with the last batches still to write
        self._closing: list[Deferred[None]] = []
        self._waiters: list[Deferred[None]] = []
        self._producer = producer
        self._max_queued = max(1, max_queued)
        #: Whether this writer holds a pause of its producer.
        self.pausing = False
        self.error: Exception | None = None

    @property
    def waiting(self) -> int:
        """Batches queued and not yet taken by a worker."""
        return len(self._queue)

    def submit(self, batch: list[bytes]) -> None:
        """Queue a batch; raises the error of an earlier write that failed."""
        if self.error is not None:
            raise self.error
        if len(self._queue) >= OVERRUN_FACTOR * self._max_queued:
            self.error = WriterOverrun(len(self._queue) + 1)
            self._queue.clear()
            self._resume()
            raise self.error
        self._queue.append(batch)
        if len(self._queue) > self._max_queued:
            # The workers fall behind (busy pool, slow disk): stop the source, not the reactor.
            self._pause()
        if not self._running:
            self._start()

    def flush(self) -> Deferred[None]:
        """Fires when every queued batch is written and hashed (fails with a write error)."""
        if not self._running and (not self._queue or self.error is not None):
            return fail(self.error) if self.error is not None else succeed(None)
        waiter: Deferred[None] = Deferred()
        self._waiters.append(waiter)
        if not self._running:
            self._start()
        return waiter

    def close(self, last: list[bytes] | None) -> Deferred[None]:
        """Stop, and close the descriptor (the writer's from now on); fires once it is closed.

        Without ``last``, what is queued is dropped; with ``last`` (possibly
        empty), what is queued plus ``last`` is written first, by a worker.
        The descriptor is closed on the reactor thread once no worker job
        uses it any more (at once if none does): the calling thread neither
        writes nor waits for the disk.
        """
        self._closed = True
        self._resume()
        closed: Deferred[None] = Deferred()
        self._closing.append(closed)
        if last is None:
            self._queue.clear()
        else:
            self._keep = True
            if last:
                self._queue.append(last)
        if not self._running:
            if self._queue and self.error is None:
                self._start()
            else:
                self._close_descriptor()
        return closed

    def _close_descriptor(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
        if self._keep and self.error is not None:
            self._log.warn("writing a partial download failed: {why}", why=str(self.error))
        closing, self._closing = self._closing, []
        for closed in closing:
            closed.callback(None)

    def _pause(self) -> None:
        if self._producer is not None and not self.pausing:
            self.pausing = True
            self._producer.pauseProducing()

    def _resume(self) -> None:
        if self.pausing:
            self.pausing = False
            assert self._producer is not None
            self._producer.resumeProducing()

    def _taken(self) -> None:
        """(Reactor.)  A job took the queued batches: the source may deliver again."""
        if self.error is None and not self._closed and len(self._queue) <= self._max_queued:
            self._resume()

    def _start(self) -> None:
        self._running = True
        self._runner.run(self._drain).addBoth(self._drained)

    def _drained(self, result: object) -> None:
        self._running = False
        if isinstance(result, Failure) and self.error is None:
            self.error = result.value if isinstance(result.value, Exception) else None
        if self.error is not None or len(self._queue) <= self._max_queued:
            # Caught up (or failed: the rest of the payload is read and dropped).
            self._resume()
        if self._queue and self.error is None and (self._keep or not self._closed):
            self._start()  # batches queued while the job was finishing
            return
        if self._closed:
            self._close_descriptor()
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if self.error is not None:
                waiter.errback(self.error)
            else:
                waiter.callback(None)

    def _drain(self) -> None:
        """Write and hash queued batches until none is left (worker thread).

        One such job runs at a time, so the position and the hasher have a
        single user; the reactor thread only appends to and clears the queue.
        """
        while self.error is None:
            # Everything queued goes out as one write: the further the worker
            # falls behind, the fewer GIL hand-overs it needs per byte.
            batch: list[bytes] = []
            while True:
                try:
                    batch += self._queue.popleft()
                except IndexError:
                    break
            if not batch:
                return
            if self.pausing and self._wake is not None:
                self._wake(self._taken)  # (read here, checked again on the reactor)
            try:
                self._write(batch)
            except Exception as e:
                self.error = e
                self._queue.clear()

    def _write(self, batch: list[bytes]) -> None:
        # One buffer, so the write and the hash each release the GIL once per
        # batch: a worker that waits for the GIL after every small piece
        # falls far behind a busy reactor thread.
        data = batch[0] if len(batch) == 1 else b"".join(batch)
        position, fd = self._position, self._fd
        assert fd is not None
        with memoryview(data) as view:
            done = 0
            while done < len(view):
                done += os.pwrite(fd, view[done:], position + done)
        if self._hasher is not None:
            self._hasher.update(data)
        self._position = position + len(data)
