"""Where blocking work runs: two places, each named for what it does.

Hashing, directory walks, file I/O and SQLite must never run on the reactor
thread.  The daemon has exactly two places for them, made together by
:func:`make_runners` and handed to whoever needs one:

``database``
    one thread (:class:`SerialRunner`): every SQLite call, alone and in
    submission order;
``files``
    (:class:`FilesRunner`) the rest: hashing, directory walks, reading,
    writing, fsyncing and renaming files, key generation.  Its thread pool
    runs most of it.  Most of those jobs wait on the disk rather than the
    CPU, so it has more threads than there are cores; the scanner caps its
    hashing jobs at one per core itself.  The small-file download jobs of
    :mod:`clearskies.diskjobs` (sealing, the unchanged check, installing)
    go to a helper process instead when it can take them
    (:mod:`clearskies.helperprocess`): they make several system calls per
    file, and in a worker thread each call trades the GIL with the reactor
    thread; in a process of their own, downloads of many small files are
    about 11 % faster (bench/README.md).  If the helper cannot start or
    keeps dying, those jobs run on the pool too.

Code that needs one takes an :class:`~clearskies.interfaces.IRunner` and calls
``runner.run(fn, *args)``, which returns a Deferred fired on the reactor
thread with ``fn``'s result (or its exception), for any ``fn``.  The
functions given to a runner return plain values and never touch Twisted
objects.  Tests pass a :class:`SyncRunner` so everything happens at once,
in order.

Queues: a pool's queue holds what its callers submitted; each caller bounds
its own share of it (the scanner's hash jobs, ``sync.MAX_FINISHING``
downloads, a download's ``transfer.receiver.MAX_QUEUED_BATCHES``, whose producer is
paused beyond that); the helper's queue holds at most the download batches
those bounds let through.
"""

from __future__ import annotations

import os
from typing import Any, Callable, TypeVar

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from clearskies.helperprocess import HelperProcess, helper_job
from clearskies.interfaces import IRunner

T = TypeVar("T")

#: Threads of the ``files`` pool: its jobs mostly wait in fsync and other
#: file-system calls (on this kind of disk several fsyncs at once finish
#: sooner than one after another, bench/README.md).
FILES_THREADS = max(8, 2 * (os.cpu_count() or 1))


@implementer(IRunner)
class SyncRunner:
    """Runs the callable immediately on the calling thread (tests only)."""

    def run(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        try:
            return succeed(fn(*args))
        except BaseException:
            return fail(Failure())


@implementer(IRunner)
class ThreadPoolRunner(Service):
    """A Twisted ThreadPool owned by a service: started and stopped with it.

    Work submitted before ``startService`` waits in the pool's queue.
    ``stopService`` joins the threads, which waits for the jobs in progress
    (callers keep jobs short, e.g. hashing in batches).
    """

    def __init__(self, reactor: IReactorFromThreads, pool_size: int | None = None,
                 name: str = "clearskies-files") -> None:
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

    def __init__(self, reactor: IReactorFromThreads, name: str = "clearskies-database") -> None:
        super().__init__(reactor, 1, name)


@implementer(IRunner)
class FilesRunner(MultiService):
    """The ``files`` place: a thread pool, and the helper process for the download jobs.

    :func:`~clearskies.helperprocess.helper_job` picks the jobs the helper
    runs; everything else, and those too whenever the helper cannot take
    them (not started yet, stopped, broken), runs on the pool.  The helper
    stops first: it finishes the jobs it holds while the pool still runs.
    """

    def __init__(self, reactor: Any, pool_size: int, name: str = "clearskies-files") -> None:
        super().__init__()
        self.setName(name)
        self.pool = ThreadPoolRunner(reactor, pool_size, name)
        self.pool.setServiceParent(self)
        self.helper = HelperProcess(reactor, name + "-helper")
        self.helper.setServiceParent(self)  # (children stop in reverse order)

    @property
    def pool_size(self) -> int:
        return self.pool.pool_size

    def run(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        name = helper_job(fn, args)
        if name is not None:
            answer = self.helper.submit(name, args)
            if answer is not None:
                return answer
        return self.pool.run(fn, *args)


class Runners(MultiService):
    """The daemon's two places for blocking work, started and stopped together.

    ``database`` stops last (children stop in reverse order), so file jobs
    that end in a database call still find it.
    """

    def __init__(self, database: ThreadPoolRunner, files: FilesRunner) -> None:
        super().__init__()
        self.setName("clearskies-runners")
        self.database = database
        self.files = files
        database.setServiceParent(self)
        files.setServiceParent(self)


def make_runners(reactor: Any, files_threads: int = FILES_THREADS) -> Runners:
    """The ``database`` thread and the ``files`` place, for one daemon."""
    return Runners(SerialRunner(reactor, "clearskies-database"),
                   FilesRunner(reactor, files_threads, "clearskies-files"))
