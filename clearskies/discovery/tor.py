"""Onion-routed peers: a Tor process, our onion service, and dialling through Tor.

``TorService`` either starts a private ``tor`` process (its state under
``<data_dir>/tor``) or attaches to a running tor through its control port,
waits until tor has bootstrapped, then publishes a version 3 onion service
that forwards a fixed public port to the daemon's local TCP port.  The
service's private key is kept in ``<data_dir>/onion-service/private_key``
(mode 0600), so the ``.onion`` name, and with it the address we advertise
(``tor:<name>.onion:<port>``), stays the same across restarts.  Outgoing
connections to ``tor:`` addresses use :meth:`TorService.client_endpoint`;
the peer protocol inside the Tor stream is unchanged (plaintext start, then
TLS-PSK).

txtorcon is imported only when the service starts, so a daemon without
``--tor`` never loads it.  We start the tor process ourselves and attach
txtorcon to its control socket once tor says the socket is open: this
avoids two races of ``txtorcon.launch`` (it dials the control socket before
tor listens on it, and misses a bootstrap that finishes before it
subscribes), and lets us end the process if we are stopped half-way.

When tor is missing or cannot bootstrap, the service logs why (quoting tor's
own explanation), :attr:`TorService.ready` fails with :class:`TorUnavailable`
and the rest of the daemon carries on.  What ``--tor`` and ``--tor-only``
reveal to whom is written down in ``protocol/tor.md``.
"""

from __future__ import annotations

import base64
import binascii
import collections
import os
import re
import shlex
import shutil
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, succeed
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    UNIXClientEndpoint,
    clientFromString,
)
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from clearskies.discovery.socks import SocksClientEndpoint
from clearskies.errors import ConfigurationError
from clearskies.interfaces import IRunner
from clearskies.threads import SyncRunner

#: The port our onion service offers to other peers.  Any port works inside
#: Tor; a fixed one keeps the advertised address the same across restarts,
#: whatever local port the daemon happens to listen on.
DEFAULT_ONION_PORT = 60106
#: Seconds tor may take to open its control port and bootstrap.
DEFAULT_LAUNCH_TIMEOUT = 180.0
#: Seconds until the first descriptor of our onion service is uploaded.
DEFAULT_PUBLISH_TIMEOUT = 300.0
#: Seconds a stopping tor gets before it is killed.
STOP_GRACE = 10.0
#: How many lines of tor's own output we keep for error messages.
MAX_LOG_LINES = 200
#: Longest line of tor output we keep; longer ones are cut.
MAX_LOG_LINE = 2000
#: Longest UNIX socket path we hand to tor (the kernel limit is 107 bytes).
MAX_SOCKET_PATH = 100

TOR_DIRECTORY = "tor"
ONION_DIRECTORY = "onion-service"
KEY_FILE = "private_key"
HOSTNAME_FILE = "hostname"
TORRC_FILE = "torrc"
CONTROL_SOCKET = "control.socket"
SOCKS_SOCKET = "socks.socket"

_ONION_HOSTNAME = re.compile(r"[a-z2-7]{56}\.onion")
_OPTION_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_CONTROL_OPENED = re.compile(r"Opened Control listener(?: connection)?(?: \(ready\))? on (\S.*)$")
#: Options we set for a tor we start; extra configuration may not change them.
_RESERVED_OPTIONS = frozenset({
    "datadirectory", "controlport", "controlsocket", "cookieauthentication",
    "__owningcontrollerprocess", "runasdaemon",
})
_KEY_TYPE = "ED25519-V3"
_EXPANDED_KEY_BYTES = 64
#: Warnings tor prints on every start; they never explain a failure.
_NOISE = (
    "running Tor as root",
    "SafeLogging",
    "TestingTorNetwork is set",
    "alternate directory authorities",
    "V3AuthVotingInterval is very low",
)


class TorUnavailable(ConfigurationError):
    """Tor cannot be used: not installed, not reachable, or it failed to bootstrap or publish.

    The message says what went wrong, quotes tor's own explanation when there
    is one, and says what to do.  Peers reached without Tor are not affected.
    """


# -- pure helpers -------------------------------------------------------------


def format_onion_address(hostname: str, port: int) -> str:
    """The address we advertise for an onion service: ``tor:<56 chars>.onion:PORT``."""
    if not _ONION_HOSTNAME.fullmatch(hostname):
        raise ValueError("%r is not a version 3 onion name" % (hostname,))
    if not 1 <= port <= 65535:
        raise ValueError("port %d is outside 1-65535" % (port,))
    return "tor:%s:%d" % (hostname, port)


def check_extra_config(extra: Mapping[str, Any]) -> dict[str, str | list[str]]:
    """Validate extra torrc options: a name maps to a value, or to a list for repeated options.

    Raises ConfigurationError for names tor could not have, values spanning
    lines, and options this module sets itself.
    """
    checked: dict[str, str | list[str]] = {}
    for name, value in extra.items():
        if not isinstance(name, str) or not _OPTION_NAME.fullmatch(name):
            raise ConfigurationError("%r is not a tor option name" % (name,))
        if name.lower() in _RESERVED_OPTIONS:
            raise ConfigurationError("tor option %s is managed by ClearSkies; remove it" % name)
        repeated = isinstance(value, (list, tuple))
        lines = []
        for item in (value if repeated else [value]):
            if isinstance(item, bool) or not isinstance(item, (str, int)):
                raise ConfigurationError("tor option %s wants text or a number, not %r" % (name, item))
            text = str(item)
            if any(c in text for c in "\r\n\0"):
                raise ConfigurationError("tor option %s has a line break in its value" % name)
            lines.append(text)
        checked[name] = lines if repeated else lines[0]
    return checked


def check_onion_key(text: str) -> str:
    """Return the key blob ``ED25519-V3:<base64 of 64 bytes>`` or raise ValueError."""
    kind, colon, blob = text.strip().partition(":")
    if kind != _KEY_TYPE or not colon:
        raise ValueError("not an %s key" % _KEY_TYPE)
    try:
        raw = base64.b64decode(blob, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the key is not valid base64") from None
    if len(raw) != _EXPANDED_KEY_BYTES:
        raise ValueError("the key has %d bytes instead of %d" % (len(raw), _EXPANDED_KEY_BYTES))
    return "%s:%s" % (kind, blob)


def explaining_line(lines: Iterable[str]) -> str | None:
    """The line of tor's output most likely to explain a failure.

    The last ``[warn]`` line that is not one tor prints on every start, else
    the last ``[err]`` line, else the last bootstrap progress line; None when
    there is nothing.  A warning comes first because tor's final error line
    usually just says "see warnings above".
    """
    last_err = last_warn = last_progress = None
    for line in lines:
        if "[err]" in line:
            last_err = line
        elif "[warn]" in line and not any(noise in line for noise in _NOISE):
            last_warn = line
        elif "Bootstrapped " in line:
            last_progress = line
    found = last_warn or last_err or last_progress
    return found.strip() if found else None


def parse_bootstrap_status(text: str) -> dict[str, str] | None:
    """The fields of a ``BOOTSTRAP`` status line, or None for any other status line.

    Tor sends these as ``STATUS_CLIENT`` events and answers
    ``GETINFO status/bootstrap-phase`` with the same shape::

        NOTICE BOOTSTRAP PROGRESS=100 TAG=done SUMMARY="Done"
        WARN BOOTSTRAP PROGRESS=5 TAG=conn SUMMARY="..." WARNING="..." REASON=...

    The severity is returned under ``SEVERITY``; ``PROGRESS`` is checked to be
    an integer 0-100.
    """
    try:
        words = shlex.split(text)
    except ValueError:
        return None
    if len(words) < 2 or words[1] != "BOOTSTRAP":
        return None
    fields = {"SEVERITY": words[0]}
    for word in words[2:]:
        key, equals, value = word.partition("=")
        if equals:
            fields[key] = value
    progress = fields.get("PROGRESS", "")
    if not progress.isdigit() or int(progress) > 100:
        return None
    return fields


def parse_listeners(text: str) -> list[str]:
    """The addresses of ``GETINFO net/listeners/socks``: quoted, space-separated."""
    try:
        return shlex.split(text)
    except ValueError:
        return []


def _quote_path(path: str) -> str | None:
    """A UNIX socket path as tor's ``unix:"..."`` syntax, or None if it cannot be one."""
    if len(path.encode()) > MAX_SOCKET_PATH or any(c in path for c in '"\\\r\n\0'):
        return None
    return 'unix:"%s"' % path


def tor_arguments(tor_dir: str, owner_pid: int,
                  extra: Mapping[str, str | list[str]]) -> tuple[list[str], str | None]:
    """The command line for a tor we start, and the control socket path (None: TCP).

    Every option is passed on the command line; the torrc named with ``-f``
    is an empty file of ours, so the system's /etc/tor/torrc never applies.
    Control and SOCKS ports are UNIX sockets inside ``tor_dir`` (mode 0700)
    when the path fits, else TCP ports on 127.0.0.1 chosen by tor.
    """
    torrc = os.path.join(tor_dir, TORRC_FILE)
    control_path = os.path.join(tor_dir, CONTROL_SOCKET)
    control = _quote_path(control_path)
    socks = _quote_path(os.path.join(tor_dir, SOCKS_SOCKET))
    if control is None or socks is None:
        control = socks = "127.0.0.1:auto"
        control_path = None
    args = ["-f", torrc, "--defaults-torrc", torrc]
    options: list[tuple[str, str]] = [
        ("DataDirectory", tor_dir),
        ("ControlPort", control),
        ("CookieAuthentication", "1"),
        # Extended errors say why an onion service cannot be reached.
        ("SocksPort", socks + " ExtendedErrors"),
        ("__OwningControllerProcess", str(owner_pid)),
        ("Log", "notice stdout"),
        ("RunAsDaemon", "0"),
    ]
    for name, value in extra.items():
        for item in (value if isinstance(value, list) else [value]):
            options.append((name, item))
    for name, value in options:
        args += [name, value]
    return args, control_path


class TorOutput:
    """A bounded, file-like sink for what tor prints: keeps only the last lines."""

    def __init__(self, max_lines: int = MAX_LOG_LINES) -> None:
        self.lines: collections.deque[str] = collections.deque(maxlen=max_lines)
        self._partial = ""

    def write(self, data: str | bytes) -> list[str]:
        """Take more output; return the lines it completed."""
        if isinstance(data, bytes):
            data = data.decode("utf-8", "replace")
        *complete, partial = (self._partial + data).split("\n")
        self._partial = partial[-MAX_LOG_LINE:]
        added = []
        for line in complete:
            line = line.rstrip("\r")[:MAX_LOG_LINE]
            if line:
                self.lines.append(line)
                added.append(line)
        return added

    def text(self) -> str:
        """Everything kept, one line per line."""
        return "\n".join(list(self.lines) + ([self._partial] if self._partial else []))

    def explain(self) -> str | None:
        """See :func:`explaining_line`."""
        return explaining_line(self.text().splitlines())


def find_tor_binary() -> str | None:
    """The ``tor`` program on PATH, or in the sbin directories where Debian installs it."""
    found = shutil.which("tor")
    if found:
        return found
    for directory in ("/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"):
        candidate = os.path.join(directory, "tor")
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


# -- blocking file work (through an IRunner) ----------------------------------


def prepare_directories(data_dir: str) -> tuple[str, str]:
    """Create ``<data_dir>/tor`` and ``<data_dir>/onion-service`` (mode 0700) and
    tor's empty torrc; return the two directories."""
    made = []
    for name in (TOR_DIRECTORY, ONION_DIRECTORY):
        path = os.path.join(data_dir, name)
        os.makedirs(path, mode=0o700, exist_ok=True)
        os.chmod(path, 0o700)
        made.append(path)
    with open(os.path.join(made[0], TORRC_FILE), "w", encoding="ascii") as f:
        f.write("# Empty on purpose: ClearSkies gives tor its options on the command line.\n")
    return made[0], made[1]


def read_onion_key(directory: str) -> str | None:
    """The stored key blob, or None when there is none yet.

    A damaged file raises ConfigurationError rather than being replaced,
    because a new key would mean a new address that no peer knows.
    """
    path = os.path.join(directory, KEY_FILE)
    try:
        with open(path, encoding="ascii") as f:
            text = f.read(512)
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigurationError("cannot read the onion service key %s: %s" % (path, e)) from None
    try:
        return check_onion_key(text)
    except ValueError as e:
        raise ConfigurationError(
            "the onion service key %s is damaged (%s); restore it from a backup, "
            "or move it away to get a new .onion address" % (path, e)) from None


def write_onion_key(directory: str, key: str, hostname: str) -> None:
    """Store the key (mode 0600, written atomically and synced) and the hostname next to it."""
    key = check_onion_key(key)
    for name, text, mode in ((KEY_FILE, key, 0o600), (HOSTNAME_FILE, hostname, 0o644)):
        path = os.path.join(directory, name)
        temporary = path + ".new"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            os.fchmod(fd, mode)
            os.write(fd, (text + "\n").encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# -- the tor process ----------------------------------------------------------


class TorProcess(ProcessProtocol):
    """A tor we started: keeps its output, reports its control address and its end."""

    _log = Logger()

    def __init__(self, output: TorOutput) -> None:
        self.output = output
        self.control_address: str | None = None
        self.ended = False
        self.exit_reason = ""
        self._control_waiters: list[Deferred[str]] = []
        self._end_waiters: list[Deferred[None]] = []

    def when_control_open(self) -> Deferred[str]:
        """Fires with the control listener's address; fails if tor ends first."""
        if self.control_address is not None:
            return succeed(self.control_address)
        if self.ended:
            return _failed(Failure(TorUnavailable(self.exit_reason)))
        d: Deferred[str] = Deferred()
        self._control_waiters.append(d)
        return d

    def when_ended(self) -> Deferred[None]:
        """Fires once the process has exited and been reaped."""
        if self.ended:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._end_waiters.append(d)
        return d

    def signal(self, name: str) -> None:
        """Send a signal (``"TERM"``, ``"KILL"``) unless tor has exited already."""
        if self.transport is None or self.ended:
            return
        try:
            self.transport.signalProcess(name)
        except ProcessExitedAlready:
            pass

    def outReceived(self, data: bytes) -> None:
        for line in self.output.write(data):
            if ("[warn]" in line or "[err]" in line) and not any(n in line for n in _NOISE):
                self._log.warn("tor: {line}", line=line)
            opened = _CONTROL_OPENED.search(line)
            if opened and self.control_address is None:
                self.control_address = opened.group(1).strip()
                waiters, self._control_waiters = self._control_waiters, []
                for d in waiters:
                    d.callback(self.control_address)

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        self.ended = True
        self.output.write(b"\n")  # a last line without a newline still counts
        code = getattr(reason.value, "exitCode", None)
        signal = getattr(reason.value, "signal", None)
        self.exit_reason = ("tor exited with status %s" % code if code is not None
                            else "tor was killed by signal %s" % signal)
        waiters, self._control_waiters = self._control_waiters, []
        for d in waiters:
            d.errback(TorUnavailable(self.exit_reason))
        ends, self._end_waiters = self._end_waiters, []
        for d in ends:
            d.callback(None)


# -- the service --------------------------------------------------------------


class TorService(Service):
    """Runs (or attaches to) tor, publishes our onion service, dials ``tor:`` peers.

    ``local_port_getter`` is called when the service is published and must
    return the TCP port the daemon accepts peers on (reachable on 127.0.0.1).
    ``control_endpoint`` (a client endpoint string such as
    ``unix:/run/tor/control``) selects a running tor; otherwise a tor is
    started from ``tor_binary`` or the one found on PATH.  ``extra_config``
    adds options to a tor we start (tests use it to join a private network).
    ``txtorcon_module`` replaces the txtorcon library (tests pass a fake).
    """

    name = "tor"
    _log = Logger()

    def __init__(self, reactor: Any, data_dir: str, local_port_getter: Callable[[], int],
                 control_endpoint: str | None = None, tor_binary: str | None = None,
                 extra_config: Mapping[str, Any] | None = None, *,
                 public_port: int = DEFAULT_ONION_PORT,
                 launch_timeout: float = DEFAULT_LAUNCH_TIMEOUT,
                 publish_timeout: float = DEFAULT_PUBLISH_TIMEOUT,
                 runner: IRunner | None = None,
                 txtorcon_module: Any = None) -> None:
        if control_endpoint is not None and (tor_binary is not None or extra_config):
            raise ConfigurationError(
                "a tor program and extra tor options only apply to a tor ClearSkies starts, "
                "not to the running tor at %s" % (control_endpoint,))
        if not 1 <= public_port <= 65535:
            raise ConfigurationError("the onion service port must be 1-65535, not %r" % (public_port,))
        self._reactor = reactor
        self.data_dir = os.path.abspath(data_dir)
        self._local_port_getter = local_port_getter
        self.control_endpoint = control_endpoint
        self.tor_binary = tor_binary
        self.extra_config = check_extra_config(extra_config or {})
        self.public_port = public_port
        self.launch_timeout = launch_timeout
        self.publish_timeout = publish_timeout
        self._runner: IRunner = runner if runner is not None else SyncRunner()
        self._txtorcon = txtorcon_module
        self.output = TorOutput()
        self.error: TorUnavailable | None = None
        self.process: TorProcess | None = None
        self._ending: set[TorProcess] = set()
        self._tor: Any = None
        self._socks: IStreamClientEndpoint | None = None
        self._address: str | None = None
        self._starting: Deferred[str] | None = None
        self._waiters: list[Deferred[str]] = []
        self._result: str | Failure | None = None
        self._bootstrap = ""

    # -- what the daemon uses -------------------------------------------------

    @property
    def tor_directory(self) -> str:
        """DataDirectory of a tor we start."""
        return os.path.join(self.data_dir, TOR_DIRECTORY)

    @property
    def onion_directory(self) -> str:
        """Where the onion service key is kept."""
        return os.path.join(self.data_dir, ONION_DIRECTORY)

    def onion_address(self) -> str | None:
        """``tor:<name>.onion:<port>`` once the service is published, else None."""
        return self._address

    @property
    def ready(self) -> Deferred[str]:
        """A new Deferred on every access: fires with :meth:`onion_address` once
        published, or fails with :class:`TorUnavailable` (also when stopped first)."""
        if self._result is not None:
            return succeed(self._result) if isinstance(self._result, str) else _failed(self._result)
        waiter: Deferred[str] = Deferred()
        self._waiters.append(waiter)
        return waiter

    def client_endpoint(self, host: str, port: int) -> IStreamClientEndpoint:
        """An endpoint reaching ``host:port`` through Tor: an onion name, or (for
        ``--tor-only``) a public host.  The name goes to tor unresolved."""
        if self._tor is None:
            raise TorUnavailable("Tor is not running yet, so %s:%d cannot be reached through it"
                                 % (host, port))
        if self._socks is None:
            raise TorUnavailable(
                "tor has no SOCKS listener on a UNIX socket or 127.0.0.1, so %s:%d cannot be "
                "reached through it; add a SocksPort to tor's configuration" % (host, port))
        return SocksClientEndpoint(self._socks, host, port)

    def web_agent(self, pool: Any = None) -> Any:
        """An ``IAgent`` whose requests go through Tor (for trackers under ``--tor-only``);
        host names are resolved by the Tor exit, not locally."""
        if self._tor is None:
            raise TorUnavailable("Tor is not running yet, so no request can go through it")
        return self._tor.web_agent(pool=pool, socks_endpoint=self._socks)

    # -- service life cycle ---------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.error = None
        self._result = None
        self._address = None
        self._bootstrap = ""
        self._starting = Deferred.fromCoroutine(self._start())
        self._starting.addBoth(self._finished_starting)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    async def _start(self) -> str:
        txtorcon = self._import_txtorcon()
        tor_dir, onion_dir = await self._runner.run(prepare_directories, self.data_dir)
        deadline = self._reactor.seconds() + self.launch_timeout
        if self.control_endpoint is not None:
            self._tor = await self._connect(txtorcon, deadline)
        else:
            self._tor = await self._launch(txtorcon, tor_dir, deadline)
        await self._await_bootstrap(deadline)
        self._socks = await self._socks_endpoint()
        key = await self._runner.run(read_onion_key, onion_dir)
        onion = await self._publish(key)
        if key is None:
            await self._runner.run(write_onion_key, onion_dir, onion.private_key, onion.hostname)
            self._log.info("made a new onion service key in {directory}", directory=onion_dir)
        return format_onion_address(onion.hostname, self.public_port)

    def _finished_starting(self, result: str | Failure) -> None:
        self._starting = None
        if isinstance(result, str):
            self._address = result
            self._log.info("onion service published: {address}", address=result)
            self._tor.protocol.when_disconnected().addBoth(self._lost, self._tor)
        else:
            if result.check(TorUnavailable):
                error = result.value
            elif result.check(ConfigurationError, OSError):  # our files in the data dir
                error = TorUnavailable(str(result.value))
            elif result.check(CancelledError):
                error = TorUnavailable("the Tor service was stopped before tor was ready")
            else:
                self._log.failure("unexpected error while starting tor", result)
                error = TorUnavailable("Tor could not be started: %s" % (_describe(result.value),))
            self.error = error
            if not result.check(CancelledError):
                self._log.error("Tor is not available; peers are reached without it: {why}",
                                why=str(error))
                # Do not leave a half-started tor behind.
                Deferred.fromCoroutine(self._end_tor()).addErrback(
                    lambda f: self._log.failure("cannot end tor", f))
            result = Failure(error)
        self._result = result
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if isinstance(result, str):
                waiter.callback(result)
            else:
                waiter.errback(result)

    def _lost(self, reason: object, tor: Any) -> None:
        """The control connection closed while we were using tor (tor died or was stopped)."""
        if tor is not self._tor:
            return  # we closed it ourselves
        why = self.process.exit_reason if self.process and self.process.ended else "connection closed"
        self.error = TorUnavailable("lost tor's control connection (%s); onion peers are "
                                    "unreachable until the daemon restarts; %s" % (why, self._tor_says()))
        self._log.error("{why}", why=str(self.error))
        self._result = Failure(self.error)
        Deferred.fromCoroutine(self._end_tor()).addErrback(
            lambda f: self._log.failure("cannot end tor", f))

    async def _stop(self) -> None:
        if self._starting is not None:
            self._starting.cancel()
        await self._end_tor()
        for process in list(self._ending):  # still ending after a failed start
            try:
                await process.when_ended().addTimeout(STOP_GRACE, self._reactor)
            except TimeoutError:
                process.signal("KILL")

    async def _end_tor(self) -> None:
        """Close the control connection and end a tor we started (TERM, later KILL)."""
        tor, self._tor = self._tor, None
        process, self.process = self.process, None
        self._address = None
        self._socks = None
        if tor is not None:
            try:
                await tor.quit().addTimeout(STOP_GRACE, self._reactor)
            except Exception as e:
                self._log.warn("tor's control connection did not close cleanly: {why}", why=_describe(e))
        if process is None:
            return
        self._ending.add(process)
        try:
            # A tor we own exits when its control connection closes; make sure.
            process.signal("TERM")
            try:
                await process.when_ended().addTimeout(STOP_GRACE, self._reactor)
            except TimeoutError:
                self._log.warn("tor did not exit within {seconds} s; killing it", seconds=STOP_GRACE)
                process.signal("KILL")
                await process.when_ended()
        finally:
            self._ending.discard(process)

    # -- steps ----------------------------------------------------------------

    def _import_txtorcon(self) -> Any:
        if self._txtorcon is not None:
            return self._txtorcon
        try:
            import txtorcon
        except ImportError as e:
            raise TorUnavailable(
                "the Python library txtorcon is missing (%s); install it "
                "(pip install txtorcon) to use Tor" % (e,)) from None
        return txtorcon

    def _remaining(self, deadline: float) -> float:
        return max(0.0, deadline - self._reactor.seconds())

    async def _connect(self, txtorcon: Any, deadline: float) -> Any:
        where = self.control_endpoint
        try:
            endpoint = clientFromString(self._reactor, where)
        except (ValueError, TypeError, KeyError) as e:
            raise TorUnavailable(
                "%r is not a control port endpoint (%s); write it like "
                "unix:/run/tor/control or tcp:127.0.0.1:9051" % (where, e)) from None
        self._log.info("connecting to tor's control port at {where}", where=where)
        try:
            return await txtorcon.connect(self._reactor, endpoint).addTimeout(
                self._remaining(deadline), self._reactor)
        except CancelledError:
            raise
        except TimeoutError:
            raise TorUnavailable("tor's control port at %s did not answer within %d s"
                                 % (where, self.launch_timeout)) from None
        except Exception as e:
            raise TorUnavailable(
                "cannot use tor's control port at %s (%s); is tor running with a "
                "ControlPort, and may this user read its control socket and auth "
                "cookie?" % (where, _describe(e))) from None

    async def _launch(self, txtorcon: Any, tor_dir: str, deadline: float) -> Any:
        binary = self.tor_binary or find_tor_binary()
        if binary is None:
            raise TorUnavailable(
                "the tor program is not installed; install the tor package "
                "(Debian/Ubuntu: apt install tor), or use a running tor through its "
                "control port (--tor-control)")
        if not (os.path.isfile(binary) and os.access(binary, os.X_OK)):
            raise TorUnavailable(
                "%s is not an executable tor program; install the tor package "
                "(Debian/Ubuntu: apt install tor) or give the right path" % (binary,))
        args, control_path = tor_arguments(tor_dir, os.getpid(), self.extra_config)
        self.process = process = TorProcess(self.output)
        self._log.info("starting tor ({binary}) in {directory}", binary=binary, directory=tor_dir)
        self._reactor.spawnProcess(process, binary, [binary] + args,
                                   env={"HOME": tor_dir}, path=tor_dir)
        try:
            address = await process.when_control_open().addTimeout(
                self._remaining(deadline), self._reactor)
        except CancelledError:
            raise
        except TimeoutError:
            raise TorUnavailable("tor did not open its control port within %d s; %s"
                                 % (self.launch_timeout, self._tor_says())) from None
        except TorUnavailable as e:
            raise TorUnavailable("tor failed to start (%s); %s" % (e, self._tor_says())) from None
        if control_path is not None:
            endpoint = UNIXClientEndpoint(self._reactor, control_path)
        else:
            host, _, port = address.rpartition(":")
            if host != "127.0.0.1" or not port.isdigit():
                raise TorUnavailable("tor opened its control port on %r, not on 127.0.0.1"
                                     % (address,))
            endpoint = TCP4ClientEndpoint(self._reactor, host, int(port))
        try:
            tor = await txtorcon.connect(self._reactor, endpoint).addTimeout(
                self._remaining(deadline), self._reactor)
            # From now on tor exits as soon as this control connection closes.
            await tor.protocol.queue_command("TAKEOWNERSHIP")
        except CancelledError:
            raise
        except Exception as e:
            raise TorUnavailable("cannot talk to the tor we started (%s); %s"
                                 % (_describe(e), self._tor_says())) from None
        return tor

    async def _await_bootstrap(self, deadline: float) -> None:
        """Wait until tor reports 100 %; fail with tor's own warning otherwise."""
        protocol = self._tor.protocol
        outcome: Deferred[str] = Deferred()  # "done", or "ended" if tor exits first

        def settle(what: str) -> None:
            if not outcome.called:
                outcome.callback(what)

        def status(text: str) -> None:
            fields = parse_bootstrap_status(text)
            if fields is None:
                return
            percent = int(fields["PROGRESS"])
            summary = fields.get("SUMMARY", "")
            if "WARNING" in fields:
                summary = "%s (%s)" % (summary, fields["WARNING"])
            if summary != self._bootstrap:
                self._bootstrap = "%d%%: %s" % (percent, summary)
                self._log.info("tor bootstrap {percent}%: {summary}", percent=percent, summary=summary)
            if percent == 100:
                settle("done")

        await protocol.add_event_listener("STATUS_CLIENT", status)
        try:
            if self.process is not None:
                self.process.when_ended().addCallback(lambda _: settle("ended"))
            status(await protocol.get_info_single("status/bootstrap-phase"))
            try:
                what = await outcome.addTimeout(self._remaining(deadline), self._reactor)
            except TimeoutError:
                raise TorUnavailable("tor did not finish bootstrapping within %d s; %s"
                                     % (self.launch_timeout, self._tor_says())) from None
            if what == "ended":
                raise TorUnavailable("tor stopped while bootstrapping (%s); %s"
                                     % (self.process.exit_reason, self._tor_says()))
        finally:
            if not (self.process and self.process.ended):
                try:
                    await protocol.remove_event_listener("STATUS_CLIENT", status)
                except Exception:
                    pass

    async def _socks_endpoint(self) -> IStreamClientEndpoint | None:
        """The first SOCKS listener tor reports on a UNIX socket or 127.0.0.1 (None: none)."""
        try:
            text = await self._tor.protocol.get_info_single("net/listeners/socks")
        except Exception as e:
            self._log.warn("cannot list tor's SOCKS ports: {why}", why=_describe(e))
            return None
        for listener in parse_listeners(text):
            if listener.startswith("unix:"):
                return UNIXClientEndpoint(self._reactor, listener[len("unix:"):])
            host, _, port = listener.rpartition(":")
            if host == "127.0.0.1" and port.isdigit():
                return TCP4ClientEndpoint(self._reactor, host, int(port))
        return None

    async def _publish(self, key: str | None) -> Any:
        local_port = self._local_port_getter()
        if isinstance(local_port, bool) or not isinstance(local_port, int) \
                or not 1 <= local_port <= 65535:
            raise TorUnavailable("the daemon has no local port to publish (got %r)" % (local_port,))
        ports = ["%d 127.0.0.1:%d" % (self.public_port, local_port)]
        self._log.info("publishing the onion service (port {public} to 127.0.0.1:{local})",
                       public=self.public_port, local=local_port)
        try:
            return await self._tor.create_onion_service(
                ports, private_key=key, version=3, progress=self._publish_progress,
            ).addTimeout(self.publish_timeout, self._reactor)
        except CancelledError:
            raise
        except TimeoutError:
            raise TorUnavailable(
                "the onion service was not published within %d s; %s" % (
                    self.publish_timeout, self._tor_says())) from None
        except Exception as e:
            raise TorUnavailable("tor could not publish the onion service (%s); %s" % (
                _describe(e), self._tor_says())) from None

    def _tor_says(self) -> str:
        said = self.output.explain()
        if said:
            return "tor said: " + said
        if self._bootstrap:
            return "tor's last bootstrap status: " + self._bootstrap
        return "tor gave no reason"

    def _publish_progress(self, percent: float, tag: str, summary: str) -> None:
        self._log.debug("onion service {percent}%: {summary}", percent=int(percent), summary=summary)


def _describe(error: BaseException) -> str:
    """A one-line description of an error for messages."""
    text = str(error).strip().splitlines()
    return "%s: %s" % (type(error).__name__, text[0]) if text else type(error).__name__


def _failed(failure: Failure) -> Deferred[Any]:
    d: Deferred[Any] = Deferred()
    d.errback(failure)
    return d
