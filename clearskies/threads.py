"""Where blocking work runs: the seam between the reactor and worker threads
(and the disk helper process, :class:`ProcessRunner`).

Hashing, directory walks and SQLite must never run on the reactor thread.
Code that needs them takes a ``Runner`` and calls ``runner.run(fn, *args)``,
which returns a Deferred fired on the reactor thread with ``fn``'s result.
The functions given to a runner return plain values and never touch Twisted
objects.  Tests pass a ``SyncRunner`` so everything happens at once, in order.
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Any, Callable, Protocol, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

import clearskies
from clearskies.diskhelper import JOBS, FrameError, FrameReader, encode_frame

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


#: Helpers in a row that may end before answering anything; then threads take over.
MAX_SILENT_HELPERS = 3


class HelperGone(OSError):
    """The disk helper process ended while it held this job."""

    #: Not a problem of the disk (``diskerrors.is_disk_error``): the job is simply retried.
    internal = True


class ProcessRunner(Service):
    """Runs the jobs of :mod:`clearskies.diskjobs` in a helper process.

    Why a process and not threads: those jobs make several system calls per
    small file, and in a worker thread each call hands the GIL to and from
    the reactor thread (measured in ``bench/README.md``).  The helper
    (:mod:`clearskies.diskhelper`) is started by the first job and again
    after it ends; the jobs it held then fail with :class:`HelperGone`.  If
    it cannot be started at all, or keeps ending before it answers anything,
    jobs run on ``fallback`` (worker threads) from then on.
    """

    _log = Logger()

    def __init__(self, reactor: Any, fallback: Runner, name: str = "clearskies-disk") -> None:
        self._reactor = reactor
        self._fallback = fallback
        self._names = {function: name for name, function in JOBS.items()}
        self._helper: _Helper | None = None
        self._silent_ends = 0  # helpers in a row that ended without answering
        self._broken = False
        #: How the helper is started (tests replace it).
        self.command = [sys.executable, "-m", "clearskies.diskhelper"]
        self.setName(name)

    def run(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        name = self._names.get(fn)
        if name is None:
            raise ValueError("%r is not a disk job" % (fn,))
        if not self.running or self._broken:
            return self._fallback.run(fn, *args)
        helper = self._helper or self._start_helper()
        if helper is None:
            return self._fallback.run(fn, *args)
        return helper.submit(name, args)

    @property
    def helper_pid(self) -> int | None:
        """The helper's process ID while one runs (for tests and status)."""
        return self._helper.transport.pid if self._helper is not None else None

    def _start_helper(self) -> _Helper | None:
        package_parent = os.path.dirname(os.path.dirname(os.path.abspath(clearskies.__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (package_parent, env.get("PYTHONPATH")) if p)
        # Batches of file data are big and short-lived: with a fixed mmap
        # threshold, glibc hands their memory back when they are freed.
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
        helper = _Helper(self._helper_ended)
        try:
            self._reactor.spawnProcess(helper, self.command[0], self.command, env=env,
                                       childFDs={0: "w", 1: "r", 2: "r"})
        except OSError as e:
            self._log.warn("cannot start the disk helper ({why}); using threads", why=e)
            self._broken = True
            return None
        self._helper = helper
        return helper

    def _helper_ended(self, helper: _Helper, reason: Failure) -> None:
        if self._helper is helper:
            self._helper = None
        if helper.answered:
            self._silent_ends = 0
        elif self.running:
            self._silent_ends += 1
            if self._silent_ends >= MAX_SILENT_HELPERS:
                self._log.warn("the disk helper keeps ending before it answers ({why}); "
                               "using threads", why=reason.getErrorMessage())
                self._broken = True

    def stopService(self) -> Deferred[None]:
        """Let the helper finish its jobs and exit (killed after 10 s)."""
        super().stopService()
        helper = self._helper
        if helper is None:
            return succeed(None)
        helper.transport.closeStdin()
        kill = self._reactor.callLater(10.0, helper.kill)
        ended: Deferred[None] = Deferred()

        def done(_: object) -> None:
            if kill.active():
                kill.cancel()
            ended.callback(None)

        helper.ended.addBoth(done)
        return ended


class _Helper(ProcessProtocol):
    """One helper process: sends jobs, matches answers to their Deferreds."""

    _log = Logger()

    def __init__(self, on_ended: Callable[[_Helper, Failure], None]) -> None:
        self._reader: FrameReader | None = FrameReader()
        self._pending: dict[int, Deferred[Any]] = {}
        self._next_id = 0
        self._on_ended = on_ended
        self.answered = False
        self.ended: Deferred[None] = Deferred()

    def submit(self, name: str, args: tuple[Any, ...]) -> Deferred[Any]:
        job_id, self._next_id = self._next_id, self._next_id + 1
        frame = encode_frame((job_id, name, args))
        done: Deferred[Any] = Deferred()
        self._pending[job_id] = done
        self.transport.writeSequence(frame)
        return done

    def outReceived(self, data: bytes) -> None:
        if self._reader is None:
            return  # the stream broke: the helper is being killed
        try:
            answers = self._reader.feed(data)
        except FrameError as e:
            self._log.error("the disk helper's answers are broken ({why}); restarting it",
                            why=str(e))
            self._reader = None
            self.kill()
            return
        for job_id, ok, value in answers:
            done = self._pending.pop(job_id, None)
            if done is None:
                continue
            self.answered = True
            if ok:
                done.callback(value)
            else:
                done.errback(Failure(value))

    def errReceived(self, data: bytes) -> None:
        self._log.warn("disk helper: {text}", text=data[:2000].decode("utf-8", "replace"))

    def kill(self) -> None:
        try:
            self.transport.signalProcess("KILL")
        except ProcessExitedAlready:
            pass

    def childConnectionLost(self, childFD: int) -> None:
        # The helper closes its stdout only by ending: that is the moment its
        # jobs are lost (``processEnded`` may come later, once it is reaped).
        if childFD == 1:
            self._gone(Failure(HelperGone(errno.EIO, "the disk helper closed its output")))

    def processEnded(self, reason: Failure) -> None:
        self._gone(reason)

    def _gone(self, reason: Failure) -> None:
        if self.ended.called:
            return
        self.kill()  # (if it closed its output without exiting)
        # Forgotten by the runner first: a failed job's callbacks may submit more.
        self._on_ended(self, reason)
        self.ended.callback(None)
        pending, self._pending = self._pending, {}
        for done in pending.values():
            done.errback(Failure(HelperGone(errno.EIO, "the disk helper process ended")))
