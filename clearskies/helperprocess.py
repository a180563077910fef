"""The daemon's side of the disk helper process (:mod:`clearskies.diskhelper`).

Why a process: the small-file download jobs (:data:`HELPER_JOBS`) make
several system calls per file, and in a worker thread each call hands the
GIL to and from the reactor thread; in a process of their own they do not
compete with the reactor at all (measured in ``bench/README.md``).  The
``files`` place (:class:`clearskies.threads.FilesRunner`) asks
:meth:`HelperProcess.submit` first and runs the job on its threads when
the answer is None.
"""

from __future__ import annotations

import fcntl
import os
import sys
from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IReactorProcess
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

import clearskies
from clearskies.helperframes import FrameError, FrameReader, encode_frame

#: The jobs the helper runs, by qualified name: ``clearskies.diskhelper.JOBS``
#: holds the same names (tests check), with the functions; this layer may
#: not import :mod:`clearskies.diskjobs`, a layer above it.
HELPER_JOBS = frozenset({
    "clearskies.diskjobs.seal_buffered_many",
    "clearskies.diskjobs.install_batch",
})

#: Helpers in a row that may end before answering anything; then threads take over.
MAX_SILENT_HELPERS = 3

#: Seconds the helper has to finish its jobs once the daemon stops, before it is killed.
STOP_TIMEOUT = 10.0


class HelperGone(OSError):
    """The disk helper process ended while it held this job.

    An OSError (callers handle a failed disk job as one) without an errno:
    it says nothing about the disk, so it is never taken for a failing one
    (:mod:`clearskies.diskerrors`); the download is simply tried again.
    """


def helper_job(fn: Callable[..., Any], args: tuple[Any, ...]) -> str | None:
    """The name under which the helper runs ``fn(*args)``, or None: it stays in this process.

    A job given a callable (``install_batch``'s ``keep``, a closure over
    this process's state: the kept versions) runs here.
    """
    name = "%s.%s" % (getattr(fn, "__module__", None), getattr(fn, "__qualname__", None))
    if name not in HELPER_JOBS or any(callable(arg) for arg in args):
        return None
    return name


class HelperProcess(Service):
    """Runs :data:`HELPER_JOBS` in one helper process, started by the first job.

    The helper is started again after it ends; the jobs it held then fail
    with :class:`HelperGone`.  If it cannot be started at all, or keeps
    ending before it answers anything (:data:`MAX_SILENT_HELPERS` in a
    row), :meth:`submit` answers None from then on: the caller runs the
    jobs on threads.  ``stopService`` closes the helper's input: it
    finishes the jobs it holds and exits (killed after
    :data:`STOP_TIMEOUT`).
    """

    _log = Logger()

    def __init__(self, reactor: Any, name: str = "clearskies-files-helper") -> None:
        self._reactor = reactor
        self._helper: _Helper | None = None
        self._silent_ends = 0  # helpers in a row that ended without answering
        self._next_id = 0
        self.broken = not IReactorProcess.providedBy(reactor)
        #: How the helper is started (tests replace it).
        self.command = [sys.executable, "-m", "clearskies.diskhelper"]
        self.setName(name)

    def submit(self, name: str, args: tuple[Any, ...]) -> Deferred[Any] | None:
        """Run job ``name`` in the helper: its answer; None if the helper cannot take it."""
        if not self.running or self.broken:
            return None
        job_id, self._next_id = self._next_id, self._next_id + 1
        try:
            frame = encode_frame((job_id, name, args))
        except FrameError:
            return None  # an argument that does not pickle: the caller's threads
        helper = self._helper or self._start_helper()
        if helper is None:
            return None
        return helper.submit(job_id, frame)

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
            process = self._reactor.spawnProcess(helper, self.command[0], self.command,
                                                 env=env, childFDs={0: "w", 1: "r", 2: "r"})
        except OSError as e:
            self._log.warn("cannot start the disk helper process ({why}); "
                           "downloads are written by threads", why=e)
            self.broken = True
            return None
        _widen_pipe(getattr(process, "pipes", {}).get(0))
        self._helper = helper
        return helper

    def _helper_ended(self, helper: _Helper, reason: Failure) -> None:
        if self._helper is helper:
            self._helper = None
        if helper.answered:
            self._silent_ends = 0
        elif self.running and not self.broken:
            self._silent_ends += 1
            if self._silent_ends >= MAX_SILENT_HELPERS:
                self._log.warn("the disk helper process keeps ending before it answers "
                               "({why}); downloads are written by threads",
                               why=reason.getErrorMessage())
                self.broken = True

    def stopService(self) -> Deferred[None]:
        """Let the helper finish its jobs and exit (killed after STOP_TIMEOUT)."""
        super().stopService()
        helper = self._helper
        if helper is None:
            return succeed(None)
        helper.transport.closeStdin()
        kill = self._reactor.callLater(STOP_TIMEOUT, helper.kill)
        ended: Deferred[None] = Deferred()

        def done(_: object) -> None:
            if kill.active():
                kill.cancel()
            ended.callback(None)

        helper.ended.addBoth(done)
        return ended


#: Bytes the pipe to the helper holds (Linux lets any process ask for up to 1 MiB):
#: a batch of small downloads (up to a few MiB) then goes in a few writes, not one
#: per 64 KiB with a wait for the helper in between.
PIPE_SIZE = 1024 * 1024


def _widen_pipe(writer: Any) -> None:
    """Ask for a larger pipe to the helper; where that is refused, the default stays."""
    set_size = getattr(fcntl, "F_SETPIPE_SZ", None)
    if writer is None or set_size is None:
        return
    try:
        fcntl.fcntl(writer.fileno(), set_size, PIPE_SIZE)
    except OSError:
        pass


class _Helper(ProcessProtocol):
    """One helper process: sends jobs, matches answers to their Deferreds."""

    _log = Logger()

    def __init__(self, on_ended: Callable[[_Helper, Failure], None]) -> None:
        self._reader: FrameReader | None = FrameReader()
        self._pending: dict[int, Deferred[Any]] = {}
        self._on_ended = on_ended
        self.answered = False
        self._lost = False  # its jobs failed, the runner forgot it
        #: Fires (with None) once the helper has ended and been reaped.
        self.ended: Deferred[None] = Deferred()

    def submit(self, job_id: int, frame: list[bytes]) -> Deferred[Any]:
        """Send a job's frame; fires with its answer."""
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
            self._gone(Failure(HelperGone("the disk helper closed its output")))

    def processEnded(self, reason: Failure) -> None:
        # Reaped, every pipe closed: nothing of it is left in the reactor.
        self._gone(reason)
        self.ended.callback(None)

    def _gone(self, reason: Failure) -> None:
        if self._lost:
            return
        self._lost = True
        self.kill()  # (if it closed its output without exiting)
        # Forgotten by the runner first: a failed job's callbacks may submit more.
        self._on_ended(self, reason)
        pending, self._pending = self._pending, {}
        for done in pending.values():
            done.errback(Failure(HelperGone("the disk helper process ended")))
