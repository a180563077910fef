"""Starting up: one daemon per data directory, and saying why a start failed.

The daemon itself only raises or fails its ``ready`` Deferred; what a failed
start does to the process (a message on the real standard error, exit status
1) is decided by the entry point (``clearskies.tap``), with these helpers.
"""

from __future__ import annotations

import fcntl
import os
import sys
from typing import Any

from twisted.application.service import Service
from twisted.python.failure import Failure

from clearskies.errors import ConfigurationError, ShareError

#: Exit status of a daemon that could not start (systemd's Restart=on-failure sees it).
EXIT_CANNOT_START = 1
#: The file in the data directory whose lock says a daemon is using it.
LOCK_NAME = "daemon.lock"


class StartupFailure(ConfigurationError):
    """The daemon cannot start, found before anything runs (``Daemon.startService``).

    An ordinary exception, so that twistd (which exits 1 on it) reports it to
    the parent it daemonized from; when nothing catches it, the process ends
    saying why, without a traceback (see ``report_startup_failures``)."""


def report_startup_failures() -> None:
    """Let an uncaught StartupFailure end the process with status 1, its reason on the
    real standard error and no traceback (the entry point installs this)."""
    previous = sys.excepthook
    if getattr(previous, "_clearskies_quiet", False):
        return

    def hook(kind: Any, value: Any, traceback: Any) -> None:
        if issubclass(kind, StartupFailure):
            cannot_start(str(value))
        else:
            previous(kind, value, traceback)

    hook._clearskies_quiet = True  # type: ignore[attr-defined]
    sys.excepthook = hook


def cannot_start(why: str) -> None:
    """Say why the daemon cannot start on its real standard error (twistd sends
    sys.stderr to the log, which may go nowhere), where the user or systemd sees it."""
    stream = sys.__stderr__
    if stream is not None:
        try:
            stream.write("clearskies: cannot start: %s\n" % why)
            stream.flush()
        except (OSError, ValueError):
            pass


def startup_reason(failure: Failure) -> str:
    """Why a start failed, as the user reads it: our own errors say it themselves,
    anything else points at the log (where the traceback went)."""
    if failure.check(ConfigurationError, ShareError):
        return failure.getErrorMessage()
    return "%s (see the log: clearskies log)" % (failure.getErrorMessage()
                                                 or failure.type.__name__)


def lock_data_dir(data_dir: str) -> int:
    """Create ``data_dir`` if needed and take its lock; the open descriptor holds it.

    ConfigurationError, saying what to do, when the directory cannot be used or
    another daemon holds it.  Synchronous and quick: it runs before anything
    listens or dials.
    """
    path = os.path.join(data_dir, LOCK_NAME)
    try:
        os.makedirs(data_dir, mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise ConfigurationError(
            "cannot use the data directory %s: %s; check that it is a directory this user "
            "may read and write, or choose another with --data-dir"
            % (data_dir, e.strerror or e)) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        try:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        except OSError:
            holder = ""
        os.close(fd)
        raise ConfigurationError(
            "another daemon%s is using the data directory %s; stop it first "
            "(clearskies --data-dir %s stop) or choose another --data-dir"
            % (" (pid %s)" % holder if holder.isdigit() else "", data_dir, data_dir)) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, b"%d\n" % os.getpid(), 0)
    return fd


def exit_now(status: int) -> None:
    """End the process with ``status`` (after the reactor's shutdown)."""
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


def exit_on_startup_failure(reactor: Any, failure: Failure) -> None:
    """A start that failed after the reactor started: say why, stop the reactor, and
    once every service has stopped (the database is closed) exit non-zero, so that
    a service manager sees it.  (twistd itself would exit 0 after the reactor stops.)"""
    cannot_start(startup_reason(failure))
    reactor.addSystemEventTrigger("after", "shutdown", exit_now, EXIT_CANNOT_START)
    if reactor.running:
        reactor.stop()
    else:
        reactor.callWhenRunning(reactor.stop)


class DaemonizedStartReport(Service):
    """Tells the parent of a daemonized twistd (run without ``-n``) how the start went.

    twistd's parent process waits on a pipe and exits with what the child
    writes there; twistd writes "started" as soon as ``startService`` returns,
    before our start (listening, opening the shares) is done, so a port
    already taken would leave the user with exit status 0 and no daemon.
    This service takes the pipe over from twistd's ``config["statusPipe"]``
    (the options object of ``twistd``, our options' parent) when the
    daemon's children start, which is after twistd has forked and after the
    data directory's lock was taken (a refusal there is twistd's to report), and writes the
    outcome of ``ready`` instead: ``0``, or ``1`` and the reason, which the
    parent prints before exiting 1.  Under ``-n`` there is no pipe and it does nothing.
    """

    #: The parent reads this many bytes of the answer at most.
    MAX_ANSWER = 100

    def __init__(self, twistd_config: Any, ready: Any) -> None:
        self._config = twistd_config
        self.pipe: int | None = None
        # Before anything else handles the outcome (tap's errback consumes a failure).
        ready.addBoth(self._answer)

    def startService(self) -> None:
        super().startService()
        config = self._config
        if config is None or not hasattr(config, "get"):
            return
        pipe = config.get("statusPipe")
        if pipe is None:
            return
        config["statusPipe"] = None  # twistd now writes nothing there: we answer
        self.pipe = pipe

    def _answer(self, result: object) -> object:
        if self.pipe is None:
            return result  # run with -n: nobody waits
        if isinstance(result, Failure):
            reason = startup_reason(result)
            answer = ("1 " + reason).encode("utf-8", "replace")[:self.MAX_ANSWER]
        else:
            answer = b"0"
        self.answer(answer)
        return result

    def answer(self, answer: bytes) -> None:
        """Write ``answer`` once and close the pipe."""
        pipe, self.pipe = self.pipe, None
        if pipe is None:
            return
        try:
            os.write(pipe, answer)
        except OSError:
            pass  # the parent is gone: nobody is waiting
        finally:
            os.close(pipe)

    def stopService(self) -> Any:
        # Stopped before the start finished (a signal): the parent must not wait forever.
        self.answer(b"1 stopped before it had started")
        return super().stopService()
