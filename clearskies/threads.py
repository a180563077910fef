"""Where blocking work runs: the seam between the reactor and worker threads.

Hashing, directory walks and SQLite must never run on the reactor thread.
Code that needs them takes a ``Runner`` and calls ``runner.run(fn, *args)``,
which returns a Deferred fired on the reactor thread with ``fn``'s result.
The functions given to a runner return plain values and never touch Twisted
objects.  Tests pass a ``SyncRunner`` so everything happens at once, in order.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Protocol, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

T = TypeVar("T")


class Runner(Protocol):
    """Runs a blocking callable somewhere and reports its result on the reactor."""

    def run(self, fn: Callable[..., T], *args: Any) -> Deferred[T]: ...


class SyncRunner:
    """Runs the callable immediately on the calling thread (tests only)."""

    def run(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        try:
            return succeed(fn(*args))
        except BaseException:
            return fail(Failure())


class ThreadPoolRunner(Service):
    """A Twisted ThreadPool owned by a service: started and stopped with it.

    Work submitted before ``startService`` waits in the pool's queue.
    ``stopService`` joins the threads, which waits for the jobs in progress
    (callers keep jobs short, e.g. hashing in batches).
    """

    def __init__(self, reactor: IReactorFromThreads, pool_size: int | None = None,
                 name: str = "clearskies-worker") -> None:
        size = pool_size if pool_size is not None else (os.cpu_count() or 1)
        if size < 1:
            raise ValueError("a thread pool needs at least one thread")
        self._reactor = reactor
        self.pool_size = size
        self._pool = ThreadPool(minthreads=size, maxthreads=size, name=name)
        self.setName(name)

    def run(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        return deferToThreadPool(self._reactor, self._pool, fn, *args)

    def startService(self) -> None:
        super().startService()
        self._pool.start()

    def stopService(self) -> None:
        super().stopService()
        self._pool.stop()


class SerialRunner(ThreadPoolRunner):
    """One dedicated thread: every job runs alone, in submission order.

    The database uses this, so all SQLite work happens on a single thread and
    never overlaps.
    """

    def __init__(self, reactor: IReactorFromThreads, name: str = "clearskies-db") -> None:
        super().__init__(reactor, 1, name)
