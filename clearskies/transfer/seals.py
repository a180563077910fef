"""Sealing small downloads several at a time (protocol/transfer.md, 4.2).

A small download is held in memory until its payload ends; sealing it means
checking it, then writing and fsyncing its temporary file.  :class:`BufferedSeals`
hands such seals to the runner in batches (:func:`clearskies.diskjobs.seal_buffered_many`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from clearskies import diskjobs
from clearskies.interfaces import IRunner


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

    def __init__(self, runner: IRunner, *, max_batch: int = 32, max_jobs: int = 2) -> None:
        self._runner = runner
        self.max_batch = max_batch
        self.max_jobs = max_jobs
        self._queue: list[tuple[tuple[Any, ...], Deferred[str | None]]] = []
        self._jobs = 0

    def seal(self, root: Path, target: Path, temp: Path, data: bytes, overflow: bool,
             expected: diskjobs.Content) -> Deferred[str | None]:
        """Like running :func:`clearskies.transfer.jobs.seal_buffered` in a worker:
        fires with None or the problem."""
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


__all__ = ["BufferedSeals"]
