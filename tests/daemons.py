"""A harness for end-to-end tests that run real ClearSkies daemons as processes.

Each ``DaemonProcess`` is one peer: its own ``HOME``, ``XDG_DATA_HOME``, data
directory and a free TCP port on 127.0.0.1, started as
``twistd -n --pidfile= clearskies …`` with stdout and stderr going to a log
file.  (``python -m twisted`` would be the ``twist`` runner, which knows
neither ``-n`` nor ``--pidfile``; ``TWISTD`` runs twistd with this
interpreter instead.)  Tests drive it the way a user would, through the
``clearskies`` command (``cli``), or directly through the control socket
(``control_request``), and compare directories with ``tree_snapshot`` /
``assert_trees_equal``.

Use the ``daemon_factory`` fixture so that every process is killed at the end
of the test, pass or fail::

    from tests.daemons import daemon_factory  # noqa: F401

    def test_two_peers(daemon_factory):
        alice = daemon_factory("alice")
        bob = daemon_factory("bob", "--tracker", "http://127.0.0.1:1/")
        code = alice.cli_json("share", str(alice.shares))["access_code"]
        …

When a test fails, the last lines of each daemon's log are printed during
teardown, so they show up in pytest's report.  Everything listens on
127.0.0.1 only, and LAN discovery is off unless a test passes
``lan=LanSettings.private()`` (a private UDP port and multicast group on
loopback).
"""

from __future__ import annotations

import atexit
import hashlib
import importlib.util
import json
import os
import random
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlencode

import pytest

from clearskies.control.client import ControlClient, DaemonNotRunning

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parent.parent

#: twistd, run by the interpreter running the tests (``twisted.scripts.twistd``
#: has no ``__main__`` block, so ``-m`` would do nothing).
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]

#: How long ``start`` waits for the control socket to answer.
START_TIMEOUT = 30.0
#: How long ``stop`` waits after SIGTERM before it sends SIGKILL.
STOP_TIMEOUT = 15.0
#: Lines of the daemon's log quoted when it fails to start.
LOG_TAIL_LINES = 40

#: The share marker at a share's root and the suffix of partial downloads
#: (the same names as clearskies.share.ignore; repeated so this module only
#: depends on the control client).
MARKER_NAME = ".clearskies"
VERSIONS_NAME = ".clearskies-versions"  # a share's kept versions, never synced
TEMP_SUFFIX = ".!clearsky"

#: Leave room under the 107-byte UNIX socket limit for "/control".
_MAX_DATA_DIR_BYTES = 96

Snapshot = dict[str, tuple[str, int]]


class DaemonError(AssertionError):
    """A daemon did not start, or stopped when it should not have; the message quotes its log."""


class CliError(AssertionError):
    """A ``clearskies`` command exited non-zero although the test expected success."""

    def __init__(self, message: str, result: subprocess.CompletedProcess[str]) -> None:
        super().__init__(message)
        self.result = result


def daemon_ready() -> bool:
    """Whether the real daemon exists yet (``clearskies.daemon``); end-to-end tests skip until then."""
    return importlib.util.find_spec("clearskies.daemon") is not None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on right now.

    The kernel picks it; another process could take it before the daemon
    binds it, which is rare enough on a test machine.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


@dataclass(frozen=True)
class LanSettings:
    """LAN discovery for a test: a private UDP port and multicast group, on loopback only."""

    port: int
    group: str
    interface: str = "127.0.0.1"

    @classmethod
    def private(cls) -> LanSettings:
        """A free UDP port and a random group in 239.194.0.0/16, away from the default group."""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        return cls(port, "239.194.%d.%d" % (random.randrange(256), random.randrange(1, 255)))

    def argv(self) -> list[str]:
        return ["--lan-port", str(self.port), "--lan-group", self.group,
                "--lan-interface", self.interface]


def wait_until(predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.1,
               message: str | None = None) -> T:
    """Call ``predicate`` until it returns something truthy, and return that.

    Raises ``TimeoutError`` (with ``message``, or the predicate's name, and
    its last result) after ``timeout`` seconds.  Exceptions from the
    predicate propagate: catch them inside it if they mean "not yet".
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            what = message or getattr(predicate, "__name__", repr(predicate))
            raise TimeoutError("%s: still not true after %g s (last result: %r)"
                               % (what, timeout, result))
        time.sleep(interval)


def _tail(path: Path, lines: int, max_bytes: int = 256 * 1024) -> str:
    """The last ``lines`` lines of a text file, reading at most ``max_bytes`` of it."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except FileNotFoundError:
        return ""
    text = data.decode("utf-8", errors="replace")
    return "".join(text.splitlines(keepends=True)[-lines:]) if lines > 0 else ""


_live: set[DaemonProcess] = set()


@atexit.register
def _kill_leftovers() -> None:
    """Last resort if a test run ends without its fixtures' teardown."""
    for daemon in list(_live):
        daemon.kill9()


class DaemonProcess:
    """One daemon process with its own home, data directory, port and log.

    Nothing is started by the constructor.  The port stays the same across
    ``restart()``, so peers that know the address can reconnect.
    """

    def __init__(self, tmp_path: str | os.PathLike[str], name: str,
                 extra: Iterable[str] = (), lan: LanSettings | None = None) -> None:
        self.name = name
        self.extra = list(extra)
        self.lan = lan
        self.base = Path(tmp_path) / name
        self.home = self.base / "home"
        self.xdg_data_home = self.base / "xdg-data"
        self.shares = self.base / "shares"
        self.log_path = self.base / "daemon.log"
        for directory in (self.home, self.xdg_data_home, self.shares):
            directory.mkdir(parents=True, exist_ok=True)
        data_dir = self.base / "data"
        self._short_data_dir: Path | None = None
        if len(os.fsencode(str(data_dir))) > _MAX_DATA_DIR_BYTES:
            # A deep pytest tmp_path would push the control socket past 107 bytes.
            self._short_data_dir = Path(tempfile.mkdtemp(prefix="cs-e2e-"))
            data_dir = self._short_data_dir
        self.data_dir = data_dir
        self.control_path = str(data_dir / "control")
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.env = self._environment()

    def __repr__(self) -> str:
        state = "running pid %d" % self.proc.pid if self.running else "not running"
        return "<DaemonProcess %s port %d, %s>" % (self.name, self.port, state)

    @property
    def address(self) -> str:
        """``HOST:PORT`` other peers can use to reach this daemon."""
        return "127.0.0.1:%d" % self.port

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "HOME": str(self.home),
            "XDG_DATA_HOME": str(self.xdg_data_home),
            "XDG_CONFIG_HOME": str(self.base / "xdg-config"),
            "XDG_CACHE_HOME": str(self.base / "xdg-cache"),
            "CLEARSKIES_DATA_DIR": str(self.data_dir),
            "PYTHONUNBUFFERED": "1",
            # Run the code of this checkout, whatever is installed.
            "PYTHONPATH": os.pathsep.join(
                [str(REPO_ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
        })
        return env

    def daemon_argv(self) -> list[str]:
        """The command line that runs the daemon in the foreground."""
        return [
            *TWISTD, "-n", "--pidfile=", "clearskies",
            "--data-dir", str(self.data_dir),
            "--listen", "tcp:%d:interface=127.0.0.1" % self.port,
            *(self.lan.argv() if self.lan is not None else ["--no-lan"]),
            "--name", self.name, *self.extra,
        ]

    # -- lifetime ----------------------------------------------------------------

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start the daemon and return once its control socket answers.

        Raises ``DaemonError`` quoting the log's last lines if the process
        exits first or does not answer within ``timeout`` (it is killed then).
        """
        if self.running:
            raise RuntimeError("%r is already running" % self)
        argv = self.daemon_argv()
        with open(self.log_path, "ab") as log:
            log.write(("=== %s: starting %s\n" % (
                time.strftime("%H:%M:%S"), " ".join(argv))).encode())
            log.flush()
            self.proc = subprocess.Popen(argv, env=self.env, cwd=self.base,
                                         stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT)
        _live.add(self)
        deadline = time.monotonic() + timeout
        while True:
            code = self.proc.poll()
            if code is not None:
                _live.discard(self)
                raise DaemonError(self._failure(
                    "exited with code %d before its control socket answered" % code))
            if self._answers():
                return
            if time.monotonic() >= deadline:
                self.kill9()
                raise DaemonError(self._failure(
                    "did not answer on %s within %g s" % (self.control_path, timeout)))
            time.sleep(0.05)

    def _answers(self) -> bool:
        try:
            with ControlClient(self.control_path, timeout=1.0):
                return True
        except (DaemonNotRunning, OSError):
            return False

    def _failure(self, what: str) -> str:
        return "daemon %s %s; last lines of %s:\n%s" % (
            self.name, what, self.log_path, self.log_tail(LOG_TAIL_LINES))

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL; return the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        _live.discard(self)
        return self.proc.returncode

    def kill9(self) -> int | None:
        """SIGKILL at once, as a crash or power cut would; return the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        _live.discard(self)
        return self.proc.returncode

    def restart(self, timeout: float = START_TIMEOUT, new_port: bool = False) -> None:
        """Stop (gracefully if still running) and start again with the same data.

        The port stays the same unless ``new_port``: then the daemon comes back
        on another free port, as after a move to another network.
        """
        self.stop()
        if new_port:
            old = self.port
            while self.port == old:
                self.port = free_port()
        self.start(timeout)

    def cleanup(self, stop_timeout: float = 5.0) -> None:
        """Stop the process (SIGKILL if SIGTERM is not enough) and remove any short data dir."""
        try:
            self.stop(stop_timeout)
        finally:
            self.kill9()
            if self._short_data_dir is not None:
                shutil.rmtree(self._short_data_dir, ignore_errors=True)

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines of the daemon's log (all its runs, appended)."""
        return _tail(self.log_path, lines)

    # -- talking to it -----------------------------------------------------------

    def control_request(self, body: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
        """One request over the control socket; an error reply raises ``ControlError``."""
        with ControlClient(self.control_path, timeout=timeout) as client:
            return client.request(body)

    def cli(self, *args: str, check: bool = True,
            timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run ``clearskies --data-dir DATA *args`` with this daemon's environment.

        With ``check``, a non-zero exit raises ``CliError`` showing the
        command's output and the daemon's recent log.
        """
        argv = [sys.executable, "-m", "clearskies.cli", "--data-dir", str(self.data_dir),
                *args]
        result = subprocess.run(argv, env=self.env, cwd=self.base, stdin=subprocess.DEVNULL,
                                capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise CliError(
                "clearskies %s (daemon %s) exited with %d\n--- stdout:\n%s--- stderr:\n%s"
                "--- daemon log:\n%s" % (
                    " ".join(args), self.name, result.returncode, result.stdout,
                    result.stderr, self.log_tail(LOG_TAIL_LINES)),
                result)
        return result

    def cli_json(self, *args: str, timeout: float = 60.0) -> Any:
        """Run ``clearskies --json *args``, which must succeed, and parse its output."""
        return json.loads(self.cli("--json", *args, timeout=timeout).stdout)


# -- comparing directories -------------------------------------------------------


def _file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def tree_snapshot(path: str | os.PathLike[str], ignore: Iterable[str] = ()) -> Snapshot:
    """Map each relative ``/``-separated path under ``path`` to (content, permission bits).

    Content is the file's SHA-256, ``"<dir>"`` for a directory,
    ``"<symlink> TARGET"`` for a symbolic link (never followed) and
    ``"<special>"`` for anything else.  Left out: the share marker
    ``.clearskies`` and the kept versions ``.clearskies-versions`` at the root,
    partial downloads ``*.!clearsky`` anywhere,
    and the root-relative paths in ``ignore`` with everything under them.
    """
    root = os.fspath(path)
    skipped = {MARKER_NAME, VERSIONS_NAME, *ignore}
    snapshot: Snapshot = {}
    for directory, dirnames, filenames in os.walk(root):
        relative_dir = os.path.relpath(directory, root)
        kept = []
        for name in sorted(dirnames + filenames):
            relative = name if relative_dir == "." else relative_dir + "/" + name
            if relative in skipped or name.endswith(TEMP_SUFFIX):
                continue
            full = os.path.join(directory, name)
            try:
                info = os.lstat(full)
                if stat.S_ISDIR(info.st_mode):
                    content = "<dir>"
                    kept.append(name)
                elif stat.S_ISREG(info.st_mode):
                    content = _file_sha256(full)
                elif stat.S_ISLNK(info.st_mode):
                    content = "<symlink> " + os.readlink(full)
                else:
                    content = "<special>"
            except FileNotFoundError:
                continue  # removed while we looked (a daemon at work): the tree without it
            snapshot[relative.replace(os.sep, "/")] = (content, stat.S_IMODE(info.st_mode))
        dirnames[:] = [d for d in dirnames if d in kept]  # os.walk descends only into these
    return dict(sorted(snapshot.items()))


def _describe(entry: tuple[str, int]) -> str:
    content, mode = entry
    kind = content if content.startswith("<") else "file " + content[:12]
    return "%s %04o" % (kind, mode)


def assert_trees_equal(a: str | os.PathLike[str] | Mapping[str, tuple[str, int]],
                       b: str | os.PathLike[str] | Mapping[str, tuple[str, int]],
                       compare_modes: bool = True, ignore: Iterable[str] = (),
                       max_lines: int = 50) -> None:
    """Assert two trees (paths or ``tree_snapshot`` results) hold the same things.

    With ``compare_modes`` the permission bits of files and symlinks must
    match too; directory modes never count, since each peer creates
    directories under its own umask.  The error lists every difference
    (at most ``max_lines`` of them), one per line.
    """
    ignore = list(ignore)
    label_a = "a" if isinstance(a, Mapping) else os.fspath(a)
    label_b = "b" if isinstance(b, Mapping) else os.fspath(b)
    snap_a = dict(a) if isinstance(a, Mapping) else tree_snapshot(a, ignore)
    snap_b = dict(b) if isinstance(b, Mapping) else tree_snapshot(b, ignore)
    problems = []
    for path in sorted(snap_a.keys() | snap_b.keys()):
        left, right = snap_a.get(path), snap_b.get(path)
        if right is None:
            problems.append("only in a: %s (%s)" % (path, _describe(left)))
        elif left is None:
            problems.append("only in b: %s (%s)" % (path, _describe(right)))
        elif left[0] != right[0]:
            problems.append("differs:   %s (a: %s, b: %s)" % (
                path, _describe(left), _describe(right)))
        elif compare_modes and left[0] != "<dir>" and left[1] != right[1]:
            problems.append("mode:      %s (a: %04o, b: %04o)" % (path, left[1], right[1]))
    if problems:
        shown = problems[:max_lines]
        if len(problems) > max_lines:
            shown.append("… and %d more" % (len(problems) - max_lines))
        raise AssertionError("trees differ in %d paths (a = %s, b = %s):\n  %s" % (
            len(problems), label_a, label_b, "\n  ".join(shown)))


# -- the fixture -----------------------------------------------------------------


def wait_same_trees(a: Any, b: Any, timeout: float = 30.0, interval: float = 0.2) -> None:
    """Wait until two trees are identical; on timeout fail with their differences.

    ``a`` and ``b`` are directories or daemons (whose ``shares`` are compared).
    """
    left, right = getattr(a, "shares", a), getattr(b, "shares", b)
    try:
        wait_until(lambda: tree_snapshot(left) == tree_snapshot(right), timeout=timeout,
                   interval=interval)
    except TimeoutError:
        assert_trees_equal(left, right)
        raise


class TrackerProcess:
    """A real ``twistd -n clearskies-tracker`` on 127.0.0.1 (the documented command).

    ``start()`` returns it once it answers; ``restart()`` keeps the port, not
    the state.  ``ttl`` is passed as ``--ttl``; ``fd_limit`` caps its open files
    (the limit a service meets in the wild, for flood tests).
    """

    def __init__(self, base: str | os.PathLike[str], ttl: int | None = None,
                 fd_limit: int | None = None) -> None:
        self.port = free_port()
        self.log_path = Path(base) / "tracker.log"
        self.ttl = ttl
        self.fd_limit = fd_limit
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return "http://127.0.0.1:%d" % self.port

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def argv(self) -> list[str]:
        ttl = ["--ttl", str(self.ttl)] if self.ttl is not None else []
        return [str(Path(sys.executable).with_name("twistd")), "-n", "--pidfile=",
                "clearskies-tracker", "--listen", "tcp:%d:interface=127.0.0.1" % self.port, *ttl]

    def start(self) -> TrackerProcess:
        env = {**os.environ, "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": os.pathsep.join(
                   [str(REPO_ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
        limit = self.fd_limit

        def limit_files() -> None:
            import resource
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.argv(), cwd=self.log_path.parent, env=env, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT,
                preexec_fn=limit_files if limit is not None else None)

        def answers() -> bool:
            assert self.alive(), "the tracker exited:\n" + self.output()[-4000:]
            try:
                return b"ClearSkies tracker" in self.get("/")
            except OSError:
                return False
        wait_until(answers, timeout=30, message="the tracker answers on " + self.url)
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if self.alive():
            assert self.process is not None
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def output(self) -> str:
        """Everything the tracker logged so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def get(self, path: str) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=5) as response:
            return response.read()

    def status(self) -> dict[str, int]:
        """The counts on the status page: ``IDs``, ``peers``, …"""
        counts = {}
        for line in self.get("/").decode().splitlines():
            key, sep, value = line.partition(": ")
            if sep and value.isdigit():
                counts[key] = int(value)
        return counts

    def track(self, ids: list[tuple[str, str]], tcp_port: int) -> dict:
        """One plain registration, as a peer would send it; the parsed answer."""
        query = urlencode([("tcp_port", str(tcp_port))] + [("id", "%s@%s" % p) for p in ids])
        return json.loads(self.get("/clearskies/track?" + query))


class DaemonSet:
    """Makes daemons for one test and kills them all on ``close()``."""

    def __init__(self, tmp_path: str | os.PathLike[str],
                 process_class: type[DaemonProcess] = DaemonProcess,
                 stop_timeout: float = 5.0) -> None:
        self.tmp_path = Path(tmp_path)
        self.process_class = process_class
        self.stop_timeout = stop_timeout
        self.daemons: dict[str, DaemonProcess] = {}

    def make(self, name: str = "peer", *extra: str, start: bool = True,
             lan: LanSettings | None = None) -> DaemonProcess:
        """A new daemon called ``name`` (unique per test), started unless ``start=False``.

        LAN discovery is off unless ``lan`` names a private port and group.
        """
        if name in self.daemons:
            raise ValueError("there is already a daemon called %r in this test" % name)
        daemon = self.process_class(self.tmp_path, name, extra, lan=lan)
        self.daemons[name] = daemon
        if start:
            daemon.start()
        return daemon

    def close(self) -> None:
        """Stop every daemon; kill what does not stop; keep going past errors."""
        for daemon in self.daemons.values():
            try:
                daemon.cleanup(self.stop_timeout)
            except Exception as e:  # one stubborn process must not leave the others running
                sys.stderr.write("could not clean up %r: %s\n" % (daemon, e))

    def log_report(self) -> str:
        """Every daemon's recent log, for a failing test's report."""
        return "".join("--- log of daemon %s (%s):\n%s" % (d.name, d.log_path, d.log_tail())
                       for d in self.daemons.values())

    def __enter__(self) -> DaemonSet:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    """``daemon_factory(name, *extra_args, start=True, lan=None) -> DaemonProcess``; all killed at teardown."""
    with DaemonSet(tmp_path) as daemons:
        yield daemons.make
        # pytest shows teardown output only for failing tests: the logs land in the report.
        sys.stdout.write(daemons.log_report())


def start_sharing(base: str | os.PathLike[str], name: str = "target") -> tuple[DaemonProcess, Any]:
    """A started daemon sharing its own folder, and that share's keys (what an attacker
    holding the keys, or a scripted peer, connects with).  The caller stops the daemon."""
    from clearskies.keys import ShareKeys  # only the tests that need keys pay for the import

    daemon = DaemonProcess(base, name)
    try:
        daemon.start()
        daemon.cli_json("share", str(daemon.shares))
        [path] = (Path(daemon.data_dir) / "keys").glob("*.json")
        return daemon, ShareKeys.load(path)
    except BaseException:
        daemon.cleanup()
        raise


def synced_pair(daemon_factory: Callable[..., DaemonProcess], files: Mapping[str, bytes],
                timeout: float = 30.0) -> tuple[DaemonProcess, DaemonProcess, Path, Path]:
    """Alice sharing ``files``, Bob attached, both trees already identical."""
    alice = daemon_factory("alice")
    bob = daemon_factory("bob")
    a, b = Path(alice.shares), Path(bob.shares)
    for name, data in files.items():
        (a / name).parent.mkdir(parents=True, exist_ok=True)
        (a / name).write_bytes(data)
    code = alice.cli_json("share", str(a))["access_code"]
    bob.cli("attach", code, str(b), "--peer", alice.address)
    wait_same_trees(alice, bob, timeout)
    return alice, bob, a, b


def share_and_attach(owner: DaemonProcess, joiner: DaemonProcess, *share_args: str,
                     direct: bool = True) -> str:
    """``owner`` shares its folder, ``joiner`` attaches with the code; returns the code.

    ``direct`` hands the joiner the owner's address (``--peer``); without it the
    joiner has nothing but the code and must find the owner by discovery.
    """
    code = owner.cli_json("share", str(owner.shares), *share_args)["access_code"]
    via = ("--peer", owner.address) if direct else ()
    joiner.cli("attach", code, str(joiner.shares), *via)
    return code


def stop_with_cli(daemon: DaemonProcess, timeout: float = 15.0) -> None:
    """Stop a daemon the way a user does and wait until its process is gone."""
    daemon.cli("stop")
    wait_until(lambda: not daemon.running, timeout=timeout, message="%s stopping" % daemon.name)


def share_status(daemon: DaemonProcess, path: str | os.PathLike[str], **fields: Any) -> dict:
    """The daemon's ``share_status`` reply for the share at ``path`` (extra request ``fields``)."""
    return daemon.control_request({"type": ".clearskies.share_status", "path": str(path),
                                   **fields})
