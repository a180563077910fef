"""The daemon: every share, the peer listener, discovery and the control socket.

``Daemon`` is a ``MultiService``.  ``makeService`` (tap.py) builds it without
touching the disk; ``startService`` then opens the state database, brings
back every share, key, access code and pending attach from the data
directory, and starts listening.  Blocking work (key generation, SQLite,
scans) runs in thread pools.

The daemon is also the handshake's ``KeyRing``: it answers, synchronously,
which shares and access codes it holds.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import socket
import sys
from dataclasses import dataclass, field
from typing import Any

from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet import endpoints
from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python.failure import Failure

from clearskies import SOFTWARE
from clearskies.accesscode import (
    DEAD_CODE_TEXT,
    AccessCode,
    access_id,
    new_access_code,
    parse_code,
)
from clearskies.admission import Admission
from clearskies.control.protocol import ControlFactory, listen_control
from clearskies.discovery.addresses import (
    Address,
    make_address,
    parse_address,
    parse_user_address,
)
from clearskies.discovery.connector import ConnectionManager
from clearskies.errors import CannotStart, ConfigurationError, ShareError
from clearskies.handshake import ConnectTarget
from clearskies.keys import ShareKeys, generate_share_keys
from clearskies.logfile import LogFileService
from clearskies.peer import FailureLimiter, PeerProtocol, PeerServerFactory, connect_peer
from clearskies.share.database import AccessCodeInfo, PeerInfo, ShareInfo, ShareStore  # noqa: F401
from clearskies.ratelimit import RateLimiter
from clearskies.share import location
from clearskies.share.runtime import ShareRuntime
from clearskies.share.service import create_share as register_share
from clearskies.sync import SyncSession
from clearskies.threads import make_runners

DEFAULT_LISTEN = "tcp:60106"
"""Where peers reach us unless told otherwise (the LAN announcement port, but TCP)."""

FEATURES = ("vv", "directories", "progress", "manifest_pages", "read_only_manifest", "addresses",
            "revision_batches")
"""Feature strings we offer in the handshake (protocol/handshake.md)."""

RATE_INTERVAL = 1.0
#: How often remembered peer addresses are handed to the connection manager again.
#: They go in as "tracker" candidates, which are forgotten after an hour without a
#: refresh, so this must stay well below that (protocol/discovery.md).
REMEMBERED_INTERVAL = 20 * 60.0
#: Remembered addresses offered per share, most recently seen peers first: enough for
#: every likely peer, and few enough to leave room for tracker and LAN candidates.
MAX_REMEMBERED = 64

#: Config key: shares attached with --merge whose first scan has not yet recorded
#: the folder's own files (protocol/merge.md, "Attaching into a folder that holds files").
ADOPTING = "adopting_shares"

#: Tor modes: off, reachable through Tor as well ("on"), or nothing outside Tor ("only").
TOR_MODES = ("off", "on", "only")
#: Where the onion service's connections arrive (protocol/tor.md).
ONION_LISTEN = "tcp:0:interface=127.0.0.1"
#: The name peers see under --tor-only when none was chosen (never the host name).
NEUTRAL_NAME = "ClearSkies peer"
#: Failed handshakes through the onion service all come from 127.0.0.1, so they are
#: limited as one class, with a higher threshold and a short block (protocol/tor.md).
ONION_FAILURE_THRESHOLD = 60
ONION_BLOCK = 5.0
ONION_MAX_BLOCK = 60.0
#: Every onion connection comes from 127.0.0.1 and crosses Tor (seconds per round
#: trip): its handshake deadlines shrink less under pressure.
ONION_MIN_START_TIMEOUT = 10.0
ONION_MIN_HANDSHAKE_TIMEOUT = 20.0


def is_loopback_listen(description: str) -> bool:
    """Whether a server endpoint string is TCP bound to a 127.0.0.0/8 address only."""
    import ipaddress

    kind, _, rest = description.partition(":")
    if kind != "tcp":
        return False
    for part in rest.split(":"):
        name, equals, value = part.partition("=")
        if equals and name == "interface":
            try:
                return ipaddress.ip_address(value).is_loopback
            except ValueError:
                return False
    return False


#: Exit status of a daemon that could not start (systemd's Restart=on-failure sees it).
EXIT_CANNOT_START = 1
#: The file in the data directory whose lock says a daemon is using it.
LOCK_NAME = "daemon.lock"


class StartupFailure(ConfigurationError):
    """The daemon cannot start; the reason is already on standard error.

    An ordinary exception, so that twistd (which exits 1 on it) reports it to
    the parent it daemonized from; when nothing catches it, the process ends
    without a traceback (see ``_quiet_startup_failures``)."""


def _quiet_startup_failures() -> None:
    """Let an uncaught StartupFailure end the process with status 1 and no traceback."""
    previous = sys.excepthook
    if getattr(previous, "_clearskies_quiet", False):
        return

    def hook(kind: Any, value: Any, traceback: Any) -> None:
        if not issubclass(kind, StartupFailure):
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


def new_peer_id() -> str:
    return secrets.token_hex(16)


@dataclass
class DaemonSettings:
    data_dir: str
    listen: str | None = None  # None: DEFAULT_LISTEN, or any free port if it is taken
    name: str | None = None
    shares: list[str] = field(default_factory=list)
    join_code: str | None = None
    join_into: str | None = None
    #: --merge: the folder of --into may already hold files (protocol/merge.md).
    join_merge: bool = False
    peers: list[str] = field(default_factory=list)
    trackers: list[str] = field(default_factory=list)
    #: None: the stored setting (default on).  listen, name, peers and trackers
    #: likewise come from the stored settings when not given (see _settle_options);
    #: ``no_trackers`` / ``no_peers`` forget the stored ones.
    lan: bool | None = None
    #: False: ``listen`` was implied by another option (--tor-only), not chosen.
    remember_listen: bool = True
    no_trackers: bool = False
    no_peers: bool = False
    lan_port: int = 60106
    lan_group: str | None = None
    lan_interface: str = "0.0.0.0"
    #: None: keep the mode stored in the data directory (default off); else one of TOR_MODES.
    tor_mode: str | None = None
    tor_control: str | None = None
    #: Extra torrc options for a tor we start (testing and advanced use).
    tor_config: dict[str, Any] = field(default_factory=dict)


#: A pending attach that no peer has accepted for this long gives up (protocol/control.md).
JOIN_GIVE_UP = 7 * 86400.0
#: How often pending attaches are checked against JOIN_GIVE_UP.
JOIN_CHECK_INTERVAL = 600.0
#: ``cannot_start`` answers with reason ``unknown`` after which an attach fails: a
#: peer may not know a code another peer holds, so one such answer is not the end.
JOIN_UNKNOWN_LIMIT = 3
#: Dead codes remembered (in memory) so that their holders hear why, not just "unknown".
MAX_DEAD_CODES = 1024
#: Why an attach failed, as the user reads it (``PendingJoin.failed`` → text).
JOIN_FAILURES = dict(DEAD_CODE_TEXT, gave_up=(
    "no peer accepted the access code within %d days; check that the machine that made "
    "it is running and reachable, then attach again" % (JOIN_GIVE_UP // 86400)),
    synced_elsewhere=("this share is already synced at {detail}; detach it first or use "
                      "that folder (the access code was not used)"),
    synced_read_only=("this share is already synced read-only at {detail}; a share cannot "
                      "be made read-write in place yet: detach it first, then attach with "
                      "this code (the access code was not used)"))


@dataclass
class PendingJoin:
    """An access code we were given and have not used yet (persisted).

    ``failed`` (a key of JOIN_FAILURES) marks an attach that gave up: it is no
    longer dialled or announced, and stays listed until it is detached or
    attached again.
    """

    code: bytes
    path: str
    peer_id: str
    peers: list[str] = field(default_factory=list)
    added: float = 0.0
    failed: str | None = None
    unknown_refusals: int = 0
    #: What the failure's text names (the folder a share is already synced at).
    detail: str | None = None
    #: Why the last accepted attempt could not be finished here (not kept on disk).
    trouble: str | None = None

    @property
    def access_id(self) -> str:
        return access_id(self.code)

    @property
    def problem(self) -> str:
        if self.failed is not None:
            text = JOIN_FAILURES.get(self.failed, self.failed)
            return "attach failed: " + text.replace("{detail}", self.detail or "another folder")
        if self.trouble is not None:
            return self.trouble
        return "waiting for a peer that holds the access code"

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code.hex(), "path": self.path, "peer_id": self.peer_id,
                "peers": list(self.peers), "added": self.added, "failed": self.failed,
                "unknown_refusals": self.unknown_refusals, "detail": self.detail}

    @classmethod
    def from_dict(cls, d: dict[str, Any], now: float = 0.0) -> PendingJoin:
        failed = d.get("failed")
        return cls(bytes.fromhex(d["code"]), d["path"], d["peer_id"], list(d.get("peers", [])),
                   added=float(d.get("added") or now),
                   failed=failed if failed in JOIN_FAILURES else None,
                   unknown_refusals=int(d.get("unknown_refusals") or 0),
                   detail=d["detail"] if isinstance(d.get("detail"), str) else None)


class RateMeter:
    """Bytes per second over the last few seconds, from a running byte total."""

    def __init__(self, smoothing: float = 0.5) -> None:
        self.smoothing = smoothing
        self.rate = 0.0
        self._last_total = 0

    def sample(self, total: int, interval: float) -> None:
        current = max(0, total - self._last_total) / interval
        self._last_total = total
        self.rate = self.smoothing * current + (1 - self.smoothing) * self.rate


class Daemon(MultiService):
    """One ClearSkies daemon and everything it runs."""

    _log = Logger()

    def __init__(self, reactor: Any, settings: DaemonSettings) -> None:
        super().__init__()
        self.reactor = reactor
        self.settings = settings
        self.data_dir = settings.data_dir
        self.name = settings.name or socket.gethostname()
        # First child: it starts before (and stops after) everything that logs.
        self.log_file = LogFileService(self.data_dir)
        self.log_file.setServiceParent(self)
        # Where blocking work runs: the database thread and the files pool (clearskies.threads).
        self.runners = make_runners(reactor)
        self.runners.setServiceParent(self)
        self.db_runner = self.runners.database
        self.cpu_runner = self.disk_runner = self.runners.files  # the names its users know
        self.store: ShareStore | None = None
        self.shares: dict[str, ShareRuntime] = {}
        self.codes: dict[str, AccessCode] = {}
        # Access ID → (why the code is dead, the code), for codes no longer in self.codes
        # (bounded): their holders are told why, with a proof (protocol/handshake.md).
        self._dead_codes: dict[str, tuple[str, bytes]] = {}
        self.joins: dict[str, PendingJoin] = {}
        self._finished_joins: dict[str, PendingJoin] = {}
        self._port_number = 0
        self.config: dict[str, Any] = {}
        self.paused = False
        self.peer_port: IListeningPort | None = None
        self.control_port: IListeningPort | None = None
        self.peer_factory: PeerServerFactory | None = None
        self.connector: ConnectionManager | None = None
        self.lan = None
        self.trackers: list[Any] = []
        self.tor_mode = "off"
        self.tor_control: str | None = None
        self.tor: Any = None  # clearskies.discovery.tor.TorService when Tor is on
        self.onion_factory: PeerServerFactory | None = None
        self.onion_listener: IListeningPort | None = None
        self.upload = RateMeter()
        self.download = RateMeter()
        # Daemon-wide limits (config upload_limit / download_limit, bytes/s, 0 = none).
        self.upload_limiter = RateLimiter(reactor)
        self.download_limiter = RateLimiter(reactor)
        self.ready: Deferred[None] = Deferred()
        self._stopping = False
        self._lock_fd: int | None = None
        self._listen_kept = False  # the peer endpoint comes from the stored settings
        self._spare_keys: Deferred[ShareKeys | None] | None = None
        TimerService(RATE_INTERVAL, self._sample_rates).setServiceParent(self)
        TimerService(JOIN_CHECK_INTERVAL, self._check_joins).setServiceParent(self)

    # -- start and stop ------------------------------------------------------------

    def startService(self) -> None:
        # First of all, before the log file opens and long before anything
        # listens or dials: one daemon per data directory.
        try:
            self._lock_fd = lock_data_dir(self.data_dir)
        except ConfigurationError as e:
            cannot_start(str(e))
            _quiet_startup_failures()
            raise StartupFailure(str(e)) from None
        super().startService()
        self._log.info("{software} starting (pid {pid}), data in {data_dir}",
                       software=SOFTWARE, pid=os.getpid(), data_dir=self.data_dir)
        d = Deferred.fromCoroutine(self._start())
        d.addCallbacks(self._started, self._start_failed)

    def _started(self, _: object) -> None:
        self._log.info("ClearSkies daemon ready: {count} share(s), peers on port {port}",
                       count=len(self.shares), port=self.listening_port)
        self.ready.callback(None)

    def _start_failed(self, failure: Failure) -> None:
        if failure.check(ConfigurationError, ShareError):
            why = failure.getErrorMessage()
            self._log.error("cannot start: {why}", why=why)
        else:
            self._log.failure("cannot start the daemon", failure)
            why = "%s (see the log: clearskies log)" % (
                failure.getErrorMessage() or failure.type.__name__)
        self.ready.errback(failure)
        if self.reactor.running:
            cannot_start(why)
            # Once every service has stopped (the database is closed): a non-zero
            # exit, so that a service manager sees the failure.  twistd itself
            # would exit 0 after the reactor stops.
            self.reactor.addSystemEventTrigger("after", "shutdown", _exit_now,
                                               EXIT_CANNOT_START)
            self.reactor.stop()

    async def _start(self) -> None:
        os.makedirs(self.data_dir, mode=0o700, exist_ok=True)
        os.makedirs(self.keys_dir, mode=0o700, exist_ok=True)
        self.store = ShareStore(os.path.join(self.data_dir, "state.sqlite3"), self.db_runner)
        self.config = await self.store.all_config()
        await self._settle_options()
        self.apply_limits()
        for info in await self.store.list_shares():
            await self._open_share(info)
        for info in await self.store.list_access_codes():
            code = AccessCode(code=bytes.fromhex(info.code), share_id=info.share_id,
                              level=info.level, created=info.created, expires=info.expires,
                              one_time=info.one_time, used=info.used, revoked=info.revoked)
            if code.is_live(self.now()):
                self.codes[code.access_id] = code
            elif code.share_id not in self.shares:
                self._remember_dead_code(code, "cancelled")
            else:
                self._remember_dead_code(code, code.dead_reason(self.now()))
        completed: list[tuple[str, PendingJoin]] = []
        for entry in self.config.get("pending_joins", []):
            join = PendingJoin.from_dict(entry, self.now())
            self.joins[join.access_id] = join
            runtime = self.share_by_path(join.path)
            if runtime is not None and join.failed is None:
                completed.append((runtime.share_id, join))
        for share_id, join in completed:
            # Completed just before a crash: the share was stored, the join not yet dropped.
            await self._join_stored(share_id, join)
        if any("added" not in entry for entry in self.config.get("pending_joins", [])):
            await self._save_joins()  # stored by an older version: its give-up time starts now
        self._check_joins()  # (an attach that ran out while the daemon was stopped)
        for path in self.settings.shares:
            if self.share_by_path(path) is None:
                await self.create_share(path)
        if self.settings.join_code:
            code = parse_code(self.settings.join_code)
            # (Once attached, a restart with the same options finds the share.)
            if access_id(code) not in self.joins \
                    and self.share_by_path(self.settings.join_into) is None:
                await self.add_join(code, self.settings.join_into, list(self.settings.peers),
                                    merge=self.settings.join_merge)
        await self._choose_tor_mode()
        await self._listen_peers()
        self._start_tor()
        self._start_discovery()
        self.control_port = await listen_control(
            self.reactor, self.control_path, ControlFactory(self._dispatcher(), SOFTWARE))
        self._make_spare_keys()

    async def _settle_options(self) -> None:
        """Options given on the command line are stored; those not given come from the
        stored settings, so a plain restart comes back as it was (README, "Settings")."""
        from clearskies.settings import SettingError, check_setting

        s = self.settings
        given: dict[str, Any] = {}
        if s.listen is not None and s.remember_listen:
            given["listen"] = s.listen
        if s.name:
            given["name"] = s.name
        if s.lan is not None:
            given["lan"] = s.lan
        if s.trackers or s.no_trackers:
            given["trackers"] = list(s.trackers)
        if (s.peers and not s.join_code) or s.no_peers:
            # (--peer with --code names where the code's share is: the attach keeps it.)
            given["peers"] = list(s.peers)
        for key, value in given.items():
            try:
                value = check_setting(key, value)
            except SettingError as e:
                raise ConfigurationError(str(e)) from None
            if self.config.get(key) != value:
                self.config[key] = value
                await self.store.set_config(key, value)
        stored: dict[str, Any] = {}
        for key in ("listen", "name", "lan", "trackers", "peers"):
            if key in given or self.config.get(key) is None:
                continue
            if (key == "listen" and s.listen is not None) or (key == "peers" and s.peers):
                continue  # given for this run only
            try:
                stored[key] = check_setting(key, self.config[key])
            except SettingError as e:
                self._log.warn("ignoring the stored setting {key}: {why}", key=key, why=str(e))
        if "listen" in stored:
            s.listen = stored["listen"]
            self._listen_kept = True
        if "name" in stored:
            self.name = stored["name"]
        s.lan = stored.get("lan", True) if s.lan is None else s.lan
        if "trackers" in stored:
            s.trackers = stored["trackers"]
        if "peers" in stored:
            s.peers = stored["peers"]

    def stopService(self) -> Deferred[None]:
        self._stopping = True
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self.control_port is not None:
            await self.control_port.stopListening()
        for port in (self.peer_port, self.onion_listener):
            if port is not None:
                await port.stopListening()
        for factory in (self.peer_factory, self.onion_factory):
            if factory is None:
                continue
            for protocol in list(factory.connections | factory.handshaking):
                protocol.close("daemon shutting down")
        for runtime in list(self.shares.values()):
            await runtime.stop()
        if self.store is not None:
            await self.store.close()  # before the database thread stops with the children
        await super().stopService()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # (the lock goes with it)
            self._lock_fd = None

    def _dispatcher(self) -> Any:
        from clearskies.control.commands import DaemonCommands
        return DaemonCommands(self)

    # -- paths --------------------------------------------------------------------

    @property
    def keys_dir(self) -> str:
        return os.path.join(self.data_dir, "keys")

    @property
    def control_path(self) -> str:
        return os.path.join(self.data_dir, "control")

    def keys_path(self, share_id: str) -> str:
        return os.path.join(self.keys_dir, share_id + ".json")

    def own_paths(self) -> list[str]:
        """What the daemon keeps for itself and no share may hold or lie in: the data
        directory (keys, database, log) and the control socket."""
        return [self.data_dir, self.control_path]

    def now(self) -> float:
        return self.reactor.seconds()

    # -- shares --------------------------------------------------------------------

    def share_by_path(self, path: str) -> ShareRuntime | None:
        path = os.path.realpath(path)
        for runtime in self.shares.values():
            if str(runtime.root) == path:
                return runtime
        return None

    def require_share(self, path: str) -> ShareRuntime:
        runtime = self.share_by_path(path)
        if runtime is None:
            raise ConfigurationError("%s is not a share of this daemon" % path)
        return runtime

    async def create_share(self, path: str) -> ShareRuntime:
        """Make a new share of an existing directory, with fresh keys."""
        path = os.path.realpath(path)
        if not os.path.isdir(path):
            raise ConfigurationError("%s is not a directory; create it first" % path)
        await self.check_location(path)
        self._check_not_nested(path)
        keys = await self._fresh_share_keys()
        return await self._add_share(keys, path, new_peer_id())

    async def check_location(self, path: str) -> None:
        """ConfigurationError if ``path`` may not be a share (clearskies.share.location)."""
        refused = await self.cpu_runner.run(location.refusal, path, self.own_paths())
        if refused is not None:
            raise ConfigurationError(refused)

    async def size_warning(self, path: str) -> str | None:
        """A warning for a share that is a home directory or very large (else None)."""
        warning = await self.cpu_runner.run(location.size_warning, path)
        if warning is not None:
            self._log.warn("{warning}", warning=warning)
        return warning

    async def _fresh_share_keys(self) -> ShareKeys:
        """Keys for a new share: the spare set made in the background, if it is ready.

        RSA generation takes 30–150 ms of a worker; keeping one set ready
        (in memory only, never on disk) lets ``share`` answer without it.
        """
        spare, self._spare_keys = self._spare_keys, None
        keys = await spare if spare is not None else None  # (still being made: wait for it)
        if keys is None:
            keys = await self.cpu_runner.run(generate_share_keys)
        self._make_spare_keys()
        return keys

    def _make_spare_keys(self) -> None:
        if self._spare_keys is None and not self._stopping:
            self._spare_keys = self.cpu_runner.run(generate_share_keys)
            # A set that failed is simply made again when it is needed.
            self._spare_keys.addErrback(lambda failure: None)

    def _check_not_nested(self, path: str) -> None:
        for runtime in self.shares.values():
            root = str(runtime.root)
            inside = os.path.commonpath([root, path])
            if inside in (root, path):
                raise ConfigurationError(
                    "%s overlaps the share %s; shares cannot be nested" % (path, runtime.root))

    async def _add_share(self, keys: ShareKeys, path: str, peer_id: str) -> ShareRuntime:
        await self.cpu_runner.run(keys.save, self.keys_path(keys.share_id))
        info = await register_share(self.store, self.cpu_runner, path, keys.share_id, peer_id,
                                    keys.access, self.now())
        runtime = await self._open_share(info, keys, new=True)
        self._announce_changed()
        return runtime

    async def _open_share(self, info: ShareInfo, keys: ShareKeys | None = None,
                          new: bool = False) -> ShareRuntime:
        if keys is None:
            keys = await self.cpu_runner.run(ShareKeys.load, self.keys_path(info.share_id))
        runtime = ShareRuntime(self, info, keys)
        runtime.sync.upload_limiter = self.upload_limiter
        runtime.sync.download_limiter = self.download_limiter
        if self.paused:
            runtime.service.pause()  # before it starts: no start scan until resume
        self.shares[info.share_id] = runtime
        adopt = info.share_id in self.config.get(ADOPTING, [])
        await runtime.start(new=new, adopt=adopt)
        return runtime

    async def _set_adopting(self, share_id: str, adopting: bool) -> None:
        """Remember (or forget) that a share's first scan must date its files before the share's."""
        listed = [s for s in self.config.get(ADOPTING, []) if s != share_id]
        if adopting:
            listed.append(share_id)
        if listed != self.config.get(ADOPTING, []):
            self.config[ADOPTING] = listed
            await self.store.set_config(ADOPTING, listed)

    def share_adopted(self, share_id: str) -> None:
        """The first scan of a share attached with --merge has recorded the folder's files."""
        Deferred.fromCoroutine(self._set_adopting(share_id, False)).addErrback(
            lambda f: self._log.failure("could not record a finished first scan", f))

    async def remove_share(self, path: str) -> None:
        runtime = self.require_share(path)
        share_id = runtime.share_id
        # Gone at once: a second detach while this one waits is told it is not a share.
        del self.shares[share_id]
        for session in list(runtime.sync.sessions.values()):
            session.connection.close("share removed")
        await runtime.stop()
        for code_id in [c for c, code in self.codes.items() if code.share_id == share_id]:
            self._remember_dead_code(self.codes.pop(code_id), "cancelled")
        if self.connector is not None:
            self.connector.remove_target(share_id)
        await self.store.remove_share(share_id)
        await self._set_adopting(share_id, False)
        try:
            os.unlink(self.keys_path(share_id))
        except FileNotFoundError:
            pass

    # -- access codes -------------------------------------------------------------------

    async def create_code(self, path: str, level: str, one_time: bool,
                          lifetime: float | None) -> AccessCode:
        runtime = self.require_share(path)
        if level not in ("read_write", "read_only"):
            raise ConfigurationError("mode must be read_write or read_only (untrusted "
                                     "peers are not supported yet)")
        if runtime.keys.access != "read_write" and level == "read_write":
            raise ConfigurationError("a read-only share can only hand out read_only codes")
        code = new_access_code(runtime.share_id, level, self.now(), lifetime=lifetime,
                               one_time=one_time)
        await self.store.add_access_code(AccessCodeInfo(
            access_id=code.access_id, code=code.code.hex(), share_id=code.share_id,
            level=code.level, created=code.created, expires=code.expires,
            one_time=code.one_time))
        self.codes[code.access_id] = code
        self._announce_changed()
        return code

    async def cancel_code(self, access_id_prefix: str) -> None:
        matches = [a for a in self.codes if a.startswith(access_id_prefix)]
        if len(matches) != 1:
            raise ConfigurationError("no single live access code matches %r" % access_id_prefix)
        code = self.codes.pop(matches[0])
        code.revoked = True
        self._remember_dead_code(code, "cancelled")
        await self.store.revoke_access_code(code.access_id)

    async def add_join(self, code: bytes, path: str, peers: list[str],
                       merge: bool = False) -> PendingJoin:
        """Remember a code we were given and start looking for its share.

        Nothing is written to ``path`` until a peer has accepted the code
        (:meth:`_join_completed`).  A folder that already holds files is
        refused unless ``merge`` (protocol/merge.md, "Attaching into a folder
        that holds files").
        """
        path = os.path.realpath(path)
        if self.share_by_path(path) is not None:
            raise ConfigurationError("%s is already a share" % path)
        if any(join.path == path and join.failed is None for join in self.joins.values()):
            raise ConfigurationError("%s is already waiting to be attached" % path)
        await self.check_location(path)
        self._check_not_nested(path)
        for peer in peers:
            self.check_peer_address(peer)
        problem = await self.cpu_runner.run(location.attach_problem, path, merge)
        if problem is not None:
            raise ConfigurationError(problem)
        # An attach that failed here, or with this code, is replaced by this one.
        for old in [j for j in self.joins.values()
                    if j.failed is not None and (j.path == path or j.code == code)]:
            del self.joins[old.access_id]
        join = PendingJoin(code, path, new_peer_id(), list(peers), added=self.now())
        self.joins[join.access_id] = join
        await self._save_joins()
        for peer in peers:
            self.add_manual_peer(join.access_id, peer)
        self._announce_changed()
        return join

    async def _join_stored(self, share_id: str, join: PendingJoin) -> None:
        """The attach's share is stored: its peer addresses become the share's, then
        the pending attach is forgotten (in that order, so a crash loses neither)."""
        if join.peers:
            peers = self.config.setdefault("manual_peers", {})
            known = peers.setdefault(share_id, [])
            known.extend(p for p in join.peers if p not in known)
            await self.store.set_config("manual_peers", peers)
        self.joins.pop(join.access_id, None)
        await self._save_joins()

    def _join_refused(self, access_id_: str, reason: str | None, proven: bool,
                      manual: bool) -> None:
        """A peer answered our attach's ``start`` with ``cannot_start`` and ``reason``.

        A reason proven to come from the code's maker ends the attach.  Anyone can
        answer ``unknown`` (or an unproven reason), so that counts only from an
        address the user gave, JOIN_UNKNOWN_LIMIT times: a host that announced the
        code's ID on the LAN cannot end an attach by answering in the maker's place.
        """
        join = self.joins.get(access_id_)
        if join is None or join.failed is not None or reason is None:
            return  # no reason (an older peer): nothing is known, the dials go on
        if not proven:
            if not manual:
                return
            reason = "unknown"
            join.unknown_refusals += 1
            if join.unknown_refusals < JOIN_UNKNOWN_LIMIT:
                Deferred.fromCoroutine(self._save_joins()).addErrback(
                    lambda f: self._log.failure("could not record a refused attach", f))
                return
        self._fail_join(join, reason)

    def _fail_join(self, join: PendingJoin, reason: str) -> None:
        """Give up an attach: no more dials or announcements; status says why."""
        join.failed = reason
        self._log.warn("attaching {path} failed: {why}", path=join.path,
                       why=join.problem.removeprefix("attach failed: "))
        if self.connector is not None:
            # (Later: the dial that brought the answer is still finishing.)
            self.reactor.callLater(0, self.connector.remove_target, join.access_id)
        self._announce_changed()
        Deferred.fromCoroutine(self._save_joins()).addErrback(
            lambda f: self._log.failure("could not record a failed attach", f))

    def _check_joins(self) -> None:
        """Pending attaches that no peer accepted within JOIN_GIVE_UP give up (timer)."""
        now = self.now()
        for join in list(self.joins.values()):
            if join.failed is None and now - join.added >= JOIN_GIVE_UP:
                self._fail_join(join, "gave_up")

    def _remember_dead_code(self, code: AccessCode, reason: str | None) -> None:
        if reason is None:
            return
        self._dead_codes.pop(code.access_id, None)
        self._dead_codes[code.access_id] = (reason, code.code)
        while len(self._dead_codes) > MAX_DEAD_CODES:
            del self._dead_codes[next(iter(self._dead_codes))]

    async def _save_joins(self) -> None:
        self.config["pending_joins"] = [j.to_dict() for j in self.joins.values()]
        await self.store.set_config("pending_joins", self.config["pending_joins"])

    # -- KeyRing (the handshake's view of us) -----------------------------------------------

    def share_keys(self, share_id: str) -> ShareKeys | None:
        runtime = self.shares.get(share_id)
        if runtime is None or runtime.error is not None:
            return None
        return runtime.keys

    def peer_id(self, share_id: str) -> str:
        return self.shares[share_id].peer_id

    def live_code(self, access_id: str) -> AccessCode | None:
        code = self.codes.get(access_id)
        if code is None or not code.is_live(self.now()) or code.share_id not in self.shares:
            return None
        return code

    def pending_join(self, access_id: str) -> ConnectTarget | None:
        join = self.joins.get(access_id)
        if join is None or join.failed is not None:
            return None
        return ConnectTarget.join(join.code, join.peer_id, note=join)

    def dead_code(self, access_id: str) -> tuple[str, bytes] | None:
        code = self.codes.get(access_id)
        if code is not None:
            reason = code.dead_reason(self.now())
            return (reason, code.code) if reason is not None else None
        return self._dead_codes.get(access_id)

    def code_used(self, access_id: str) -> None:
        code = self.codes.get(access_id)
        if code is None:
            return
        code.used = True
        if not code.is_live(self.now()):
            del self.codes[access_id]
            self._remember_dead_code(code, code.dead_reason(self.now()))
        self.store.mark_access_code_used(access_id).addErrback(
            lambda f: self._log.failure("could not record a used access code", f))

    def create_share_from_keys(self, keys: ShareKeys, target: ConnectTarget) -> Deferred:
        join: PendingJoin = target.note
        return Deferred.fromCoroutine(self._join_completed(keys, join))

    async def _join_completed(self, keys: ShareKeys, join: PendingJoin) -> None:
        if self.joins.get(join.access_id) is not join:
            raise ConfigurationError("the attach of %s was cancelled" % join.path)
        # The share (keys and record) is stored before the pending attach is
        # forgotten: a crash in between must leave one of the two on disk.
        existing = self.shares.get(keys.share_id)
        if existing is not None and str(existing.root) != join.path:
            # One share syncs one folder.  Failing here fails the handshake before
            # the keys are acknowledged, so the code is not spent (its maker spends
            # it on the acknowledgment), and the attach stops with the reason.
            read_only = existing.keys.access == "read_only" and keys.access == "read_write"
            join.detail = str(existing.root)
            self._fail_join(join, "synced_read_only" if read_only else "synced_elsewhere")
            raise ConfigurationError(join.problem)
        if existing is None:
            # Only now, with the keys in hand, is anything written: the folder
            # (if it is new) and, by _add_share, its marker.  If that fails the
            # handshake fails and the join stays pending (detach drops it).
            try:
                await self.cpu_runner.run(_make_attach_folder, join.path)
            except OSError as e:
                # The code is not spent (no acknowledgment goes out): it is tried again.
                join.trouble = ("a peer accepted the code, but %s cannot be created: %s; "
                                "fix that (or detach and attach elsewhere) and it is "
                                "tried again" % (join.path, e.strerror or e))
                raise ConfigurationError(join.trouble) from None
            # Kept until the first scan has recorded the folder's own files, so
            # that a restart before then still dates them before the share's.
            await self._set_adopting(keys.share_id, True)
            await self._add_share(keys, join.path, join.peer_id)
        await self._join_stored(keys.share_id, join)
        # The dial carrying this very handshake is still in flight: move the code's
        # candidates to the share once that connection's session has started.
        self._finished_joins[keys.share_id] = join
        self._log.info("attached {path} to share {share}", path=join.path,
                       share=keys.share_id[:16])

    # -- peer connections -------------------------------------------------------------------

    def session_factory(self, connection: PeerProtocol) -> Any:
        info = connection.established
        runtime = self.shares.get(info.share_id)
        if runtime is None:
            connection.close("share is gone")
            return _ClosedSession()
        if info.access not in ("read_write", "read_only"):
            # An untrusted peer may only ever hold encrypted files (not supported yet).
            connection.close("access level %s is not supported" % info.access)
            return _ClosedSession()
        finished_join = self._finished_joins.pop(info.share_id, None)
        if finished_join is not None and self.connector is not None:
            self.reactor.callLater(0, self.connector.remove_target, finished_join.access_id)
            # We know who is at the address we attached through: no second connection.
            known = info.their_peer_id if len(finished_join.peers) == 1 else None
            for address in finished_join.peers:
                self.connector.add_candidate(info.share_id, parse_user_address(address),
                                             peer_id=known, source="manual")
        session = SyncSession(runtime.sync, connection)
        runtime.peer_connected(info, connection)
        session.start(runtime.last_manifest_revision(info.their_peer_id))
        return _TrackedSession(session, runtime, info.their_peer_id)

    async def _listen_peers(self) -> None:
        listen = self.settings.listen or DEFAULT_LISTEN
        if self.tor_only and not is_loopback_listen(listen):
            self._log.warn("Tor only: not listening on {listen}; peers reach us through "
                           "the onion service on {local}", listen=listen, local=ONION_LISTEN)
            listen = ONION_LISTEN
        factory = PeerServerFactory(
            self.reactor, self, self.name, self.session_factory, features=FEATURES,
            limiter=self._onion_limiter() if self.tor_only else None,
            admission=self._onion_admission() if self.tor_only else None)
        try:
            self.peer_port = await self._listen(listen, factory)
        except ConfigurationError as e:
            if self._listen_kept:
                raise ConfigurationError(
                    "%s (an endpoint kept from an earlier start); start with --listen "
                    "ENDPOINT to choose another, which is kept instead" % e) from None
            if self.settings.listen is not None:
                raise
            # A stable default port keeps remembered addresses valid; taken → any port.
            self._log.info("port {listen} is taken; listening on a free port instead",
                           listen=listen)
            self.peer_port = await self._listen("tcp:0", factory)
        self.peer_factory = factory
        self._port_number = getattr(self.peer_port.getHost(), "port", 0)
        if self.tor_only:
            # The one (loopback) listener is the onion service's target.
            self.onion_factory, self.onion_listener = factory, self.peer_port
        elif self.tor_mode == "on":
            # A separate loopback port, so that onion connections (which all come
            # from 127.0.0.1) have their own failure limit and never lock out
            # the clearnet port's local peers, nor the other way round.
            self.onion_factory = PeerServerFactory(
                self.reactor, self, self.name, self.session_factory, features=FEATURES,
                limiter=self._onion_limiter(), admission=self._onion_admission())
            self.onion_listener = await self._listen(ONION_LISTEN, self.onion_factory)

    async def _listen(self, description: str, factory: PeerServerFactory) -> IListeningPort:
        endpoint = endpoints.serverFromString(self.reactor, description)
        try:
            return await endpoint.listen(factory)
        except Exception as e:
            raise ConfigurationError("cannot listen for peers on %s: %s"
                                     % (description, e)) from None

    def _onion_admission(self) -> Admission:
        return Admission(min_start_timeout=ONION_MIN_START_TIMEOUT,
                         min_handshake_timeout=ONION_MIN_HANDSHAKE_TIMEOUT)

    def _onion_limiter(self) -> FailureLimiter:
        return FailureLimiter(self.reactor, threshold=ONION_FAILURE_THRESHOLD,
                              base_delay=ONION_BLOCK, max_delay=ONION_MAX_BLOCK)

    # -- Tor ---------------------------------------------------------------------------------

    @property
    def tor_only(self) -> bool:
        return self.tor_mode == "only"

    async def _choose_tor_mode(self) -> None:
        """Command-line Tor settings win and are kept; otherwise the stored ones apply.

        Kept so that a daemon started once with --tor-only and later started
        again without options (``clearskies share`` does that) never leaks.
        """
        stored = self.config.get("tor") or {}
        if self.settings.tor_mode is not None:
            mode, control = self.settings.tor_mode, self.settings.tor_control
            wanted = {"mode": mode, "control": control}
            if wanted != stored:
                self.config["tor"] = wanted
                await self.store.set_config("tor", wanted)
        else:
            mode, control = stored.get("mode", "off"), stored.get("control")
        if mode not in TOR_MODES:
            raise ConfigurationError("unknown Tor mode %r in the stored settings; start once "
                                     "with --tor, --tor-only or --no-tor" % (mode,))
        self.tor_mode, self.tor_control = mode, control
        if self.tor_only and not self.settings.name:
            self.name = self.config.get("name") or NEUTRAL_NAME
            self._log.info("Tor only: peers see this daemon as {name!r} (set it with --name)",
                           name=self.name)

    def set_name(self, name: str) -> None:
        """The name peers see, from the next handshake on, whoever opens it."""
        self.name = name
        for factory in (self.peer_factory, self.onion_factory):
            if factory is not None:
                factory.settings.name = name

    def _start_tor(self) -> None:
        if self.tor_mode == "off":
            return
        from clearskies.discovery.tor import TorService

        try:
            self.tor = TorService(
                self.reactor, self.data_dir, lambda: self.onion_listener.getHost().port,
                control_endpoint=self.tor_control,
                extra_config=self.settings.tor_config if self.tor_control is None else None,
                runner=self.cpu_runner)
        except ConfigurationError as e:
            self._log.error("Tor is not available; peers are reached without it: {why}",
                            why=str(e))
            return
        self.tor.setServiceParent(self)
        self.tor.ready.addCallbacks(self._tor_ready, lambda _: None)  # the service logs failures

    def _tor_ready(self, address: str) -> None:
        self._log.info("reachable through Tor at {address}", address=address)
        if self.tor_only:
            self._start_trackers()
        # Tell trackers, the LAN and connected peers where we can now be reached.
        for tracker in self.trackers:
            tracker.refresh()
        if self.lan is not None:
            self.lan.announce_now()
        for runtime in self.shares.values():
            for session in list(runtime.sync.sessions.values()):
                session.send_addresses()

    def onion_address(self) -> str | None:
        """``tor:<name>.onion:<port>`` while our onion service is published."""
        return self.tor.onion_address() if self.tor is not None else None

    def _endpoint(self, address: Address) -> Deferred[Any]:
        """The client endpoint for ``address``: through Tor for ``tor:`` (and, under
        --tor-only, every) address, once Tor is ready; directly otherwise."""
        if address.proto != "tor" and not self.tor_only:
            return succeed(endpoints.clientFromString(self.reactor, address.endpoint_string()))
        tor = self.tor
        if tor is None:
            return fail(ConfigurationError(
                "%s can only be reached through Tor; start the daemon with --tor" % (address,)))
        return tor.ready.addCallback(lambda _: tor.client_endpoint(address.host, address.port))

    @property
    def listening_port(self) -> int:
        return self._port_number

    def dial(self, address: Address, target_id: str) -> Deferred:
        """Open a connection to ``address`` for a share or a pending join."""
        target = self._target_for(target_id)
        if target is None:
            return Deferred.fromCoroutine(_fail(ConfigurationError("nothing to connect for")))
        try:
            d = self._endpoint(address)
        except Exception as e:  # e.g. Tor went away: this dial fails, others go on
            d = fail(e)
        def session_factory(connection: PeerProtocol) -> Any:
            # Known before the session starts, so the peers table records the address
            # we dialled (a tor: one through Tor), not the proxy's socket address.
            connection.dialled_address = address  # type: ignore[attr-defined]
            return self.session_factory(connection)

        d.addCallback(lambda endpoint: connect_peer(self.reactor, endpoint, target, self,
                                                    self.name, session_factory,
                                                    features=FEATURES))

        def dialled(protocol: PeerProtocol) -> _Dialled:
            protocol.dialled_address = address  # type: ignore[attr-defined]
            return _Dialled(protocol)

        def refused(failure: Failure) -> Failure:
            join = self.joins.get(target_id)
            if failure.check(CannotStart) and join is not None:
                self._join_refused(target_id, failure.value.reason, failure.value.proven,
                                   manual=address in _addresses(join.peers))
            return failure  # still a failed dial: the connector backs off as usual

        return d.addCallbacks(dialled, refused)

    def _target_for(self, target_id: str) -> ConnectTarget | None:
        runtime = self.shares.get(target_id)
        if runtime is not None:
            if getattr(runtime, "error", None) is not None:
                return None  # a share in error syncs with nobody; the dial backs off
            return ConnectTarget.share(runtime.keys, runtime.peer_id)
        return self.pending_join(target_id)

    def is_connected(self, target_id: str, peer_id: str) -> bool:
        runtime = self.shares.get(target_id)
        return runtime is not None and peer_id in runtime.sync.sessions

    def own_peer_ids(self) -> set[str]:
        ids = {r.peer_id for r in self.shares.values()}
        ids.update(j.peer_id for j in self.joins.values())
        return ids

    def own_addresses(self) -> list[Address]:
        port = self.listening_port
        own = []
        if port:
            own = [make_address("tcp", "127.0.0.1", port), make_address("tcp", "::1", port)]
        onion = self.onion_address()
        if onion is not None:
            _, host, onion_port = onion.split(":")
            own.append(make_address("tor", host, int(onion_port)))
        return own

    def check_peer_address(self, text: str) -> Address:
        """Parse a manual peer address; under --tor-only only ``tor:`` addresses are taken."""
        address = parse_user_address(text)
        if self.tor_only and address.proto != "tor":
            raise ConfigurationError(
                "%s is not a tor: address; with --tor-only the daemon only connects to "
                "peers by their tor:NAME.onion:PORT address" % (text,))
        return address

    def add_manual_peer(self, target_id: str, address: str) -> None:
        if self.connector is None:
            return
        try:
            parsed = self.check_peer_address(address)
        except ConfigurationError as e:
            self._log.warn("ignoring manual peer: {why}", why=str(e))
            return
        self.connector.add_candidate(target_id, parsed, source="manual")

    def _start_discovery(self) -> None:
        self.connector = ConnectionManager(
            self.reactor, self.dial, self.is_connected, self.own_peer_ids, self.own_addresses,
            protocols=("tcp", "tor") if self.tor_mode != "off" else ("tcp",))
        self.connector.setServiceParent(self)
        for target_id in self.registrations_ids():
            for address in self.settings.peers + self.manual_peers(target_id):
                self.add_manual_peer(target_id, address)
        for join in self.joins.values():
            if join.failed is not None:
                continue
            for address in join.peers:
                self.add_manual_peer(join.access_id, address)
        # Also at once: a restarted daemon finds its known peers without any other source.
        TimerService(REMEMBERED_INTERVAL, self._offer_remembered_peers).setServiceParent(self)
        self._start_lan()
        if not self.tor_only:  # under --tor-only: once Tor is ready (_tor_ready)
            self._start_trackers()

    def advertised_addresses(self) -> list[Address]:
        """Addresses we tell trackers and peers about beyond what they see themselves:
        our onion address once it is published (protocol/sync.md, "Addresses")."""
        return [address for address in self.own_addresses() if address.proto == "tor"]

    def add_peer_candidates(self, share_id: str, peer_id: str | None,
                            addresses: Any) -> None:
        """Offer a peer's remembered or advertised addresses (protocol form) for dialling.

        They are hints like a tracker's, so they use the "tracker" lifetime: retried
        with back-off, forgotten after an hour unless offered again (which
        :meth:`_offer_remembered_peers` does while they stay in the peers table).
        Under --tor-only only ``tor:`` addresses are taken.
        """
        if self.connector is None:
            return
        for text in addresses:
            try:
                address = parse_address(text) if isinstance(text, str) else text
            except ValueError:
                continue
            if self.tor_only and address.proto != "tor":
                continue
            self.connector.add_candidate(share_id, address, peer_id=peer_id, source="tracker")

    def _offer_remembered_peers(self) -> None:
        """Hand the peers table's addresses to the connection manager (start-up and timer)."""
        for share_id, runtime in list(self.shares.items()):
            peers = sorted(runtime.peers.values(), key=lambda p: p.last_seen or 0, reverse=True)
            budget = MAX_REMEMBERED
            for peer in peers:
                if budget <= 0:
                    break
                addresses = list(peer.addresses)[:budget]
                budget -= len(addresses)
                self.add_peer_candidates(share_id, peer.peer_id, addresses)

    def manual_peers(self, target_id: str) -> list[str]:
        return list(self.config.get("manual_peers", {}).get(target_id, []))

    async def remember_manual_peer(self, share_id: str, address: str) -> None:
        self.check_peer_address(address)
        peers = self.config.setdefault("manual_peers", {})
        listed = peers.setdefault(share_id, [])
        if address not in listed:
            listed.append(address)
            await self.store.set_config("manual_peers", peers)
        self.add_manual_peer(share_id, address)

    def registrations_ids(self) -> list[str]:
        return list(self.shares)

    def registrations(self) -> list[tuple[str, str]]:
        """(ID, our peer ID) for every share, live code and pending join: what we announce."""
        out = [(share_id, runtime.peer_id) for share_id, runtime in self.shares.items()]
        for code in list(self.codes.values()):
            if self.live_code(code.access_id) is not None:
                out.append((code.access_id, self.shares[code.share_id].peer_id))
        out.extend((join.access_id, join.peer_id) for join in self.joins.values()
                   if join.failed is None)
        return out

    def _on_discovered(self, target_id: str, peer_id: str | None, address: Address,
                       source: str) -> None:
        if self.connector is None:
            return
        if target_id in self.codes:
            return  # the code's holder connects to us, not the other way round
        join = self.joins.get(target_id)
        if target_id in self.shares or (join is not None and join.failed is None):
            self.connector.add_candidate(target_id, address, peer_id=peer_id, source=source)

    def _start_lan(self) -> None:
        if not self.settings.lan or self.tor_only:
            return
        from clearskies.discovery.lan import DEFAULT_GROUP, LanDiscovery

        def announcements() -> list[tuple[str, str, int]]:
            return [(i, p, self.listening_port) for i, p in self.registrations()]

        def hint(announcement: Any, host: str) -> None:
            if self.live_code(announcement.id) is not None and self.lan is not None:
                # Someone holding our code is looking: answer now, so it need not wait
                # for our next periodic burst (it dials us; bursts are >= 2 s apart).
                self.lan.announce_now()
                return
            try:
                address = make_address("tcp", host, announcement.port)
            except ValueError:
                return
            self._on_discovered(announcement.id, announcement.peer, address, "lan")
            if announcement.onion is not None and self.tor is not None:
                # Also through Tor, should the direct way be blocked.
                name, _, port = announcement.onion.rpartition(":")
                try:
                    onion = make_address("tor", name, int(port))
                except ValueError:
                    return
                self._on_discovered(announcement.id, announcement.peer, onion, "lan")

        def our_onion() -> str | None:
            # (Announced only with --tor: under --tor-only there are no LAN announcements.)
            address = self.onion_address()
            return address[len("tor:"):] if address is not None else None

        # On a real network also IPv4 broadcast and IPv6 ff02::1 (protocol/discovery-lan.md); a
        # daemon told to use one interface (tests: 127.0.0.1) sticks to multicast there.
        everywhere = self.settings.lan_interface == "0.0.0.0"
        self.lan = LanDiscovery(
            self.reactor, announcements, hint, port=self.settings.lan_port,
            group=self.settings.lan_group or DEFAULT_GROUP,
            interface=self.settings.lan_interface, broadcast=everywhere, ipv6=everywhere,
            get_onion=our_onion)
        self.lan.setServiceParent(self)

    def _start_trackers(self) -> None:
        from clearskies.discovery.tracker_client import TrackerClient

        def on_peers(target_id: str, peers: list[tuple[str, Address]]) -> None:
            for peer_id, address in peers:
                self._on_discovered(target_id, peer_id, address, "tracker")

        # Under --tor-only every tracker request goes through Tor (protocol/tor.md).
        agent = self.tor.web_agent() if self.tor_only and self.settings.trackers else None
        def ports() -> tuple[int | None, int | None]:
            # Under --tor-only our TCP port is loopback only: register the onion address alone.
            return (None if self.tor_only else self.listening_port), None

        for url in self.settings.trackers:
            client = TrackerClient(self.reactor, url, self.registrations, ports, on_peers,
                                   agent=agent, extra_addresses=self.advertised_addresses)
            client.setServiceParent(self)
            self.trackers.append(client)

    def _announce_changed(self) -> None:
        """A share, code or join appeared: tell the LAN and the trackers now."""
        if self.lan is not None:
            self.lan.announce_now()
        for tracker in self.trackers:
            tracker.refresh()

    # -- pause and rates -------------------------------------------------------------------

    def pause(self) -> None:
        """No new downloads or uploads (``get`` answers "paused") and no scans or
        announcements of local changes until :meth:`resume`; a file already
        streaming finishes."""
        self.paused = True
        for runtime in self.shares.values():
            runtime.sync.pause()
            runtime.service.pause()

    def resume(self) -> None:
        self.paused = False
        for runtime in self.shares.values():
            runtime.service.resume()
            runtime.sync.resume()

    def apply_limits(self) -> None:
        """Set the rate limiters from the config; running transfers follow at once."""
        for key, limiter in (("upload_limit", self.upload_limiter),
                             ("download_limit", self.download_limiter)):
            value = self.config.get(key) or 0
            rate = value if isinstance(value, int) and not isinstance(value, bool) else 0
            if rate != limiter.rate:
                limiter.set_rate(max(0, rate))
                self._log.info("{key} is now {rate} bytes/s (0: no limit)", key=key, rate=rate)

    def _sample_rates(self) -> None:
        sent = sum(r.sync.bytes_sent for r in self.shares.values())
        received = sum(r.sync.bytes_received for r in self.shares.values())
        self.upload.sample(sent, RATE_INTERVAL)
        self.download.sample(received, RATE_INTERVAL)

    async def record_peer(self, share_id: str, info: Any, address: str | None) -> None:
        existing = await self.store.get_peer(share_id, info.their_peer_id)
        addresses = list(existing.addresses) if existing else []
        if address and address not in addresses:
            addresses = ([address] + addresses)[:8]
        await self.store.upsert_peer(PeerInfo(
            share_id=share_id, peer_id=info.their_peer_id, name=info.their_name,
            last_seen=self.now(), addresses=tuple(addresses),
            manifest_revision=existing.manifest_revision if existing else None,
            acked_revision=existing.acked_revision if existing else None))


def _make_attach_folder(path: str) -> None:
    """Create the folder of a share just attached, unless it is there (blocking)."""
    try:
        os.mkdir(path)
    except FileExistsError:
        pass


class _TrackedSession:
    """Wraps a SyncSession so the share runtime hears when the connection ends."""

    def __init__(self, session: SyncSession, runtime: ShareRuntime, peer_id: str) -> None:
        self.session = session
        self.runtime = runtime
        self.peer_id = peer_id

    def event_received(self, event: Any) -> None:
        if self.runtime.error is not None:
            # The folder is gone or lost its marker: apply nothing from peers (it would
            # write into an empty mount point) until a scan finds it again.
            self.session.connection.close("the share is unavailable on this peer", quiet=True)
            return
        self.session.event_received(event)

    def connection_lost(self, reason: Any) -> None:
        self.session.connection_lost(reason)
        self.runtime.peer_disconnected(self.session)


class _Dialled:
    """What a successful dial hands the connection manager: the peer ID it reached."""

    def __init__(self, protocol: PeerProtocol) -> None:
        self.protocol = protocol
        self.peer_id = protocol.established.their_peer_id


class _ClosedSession:
    def event_received(self, event: Any) -> None:
        pass

    def connection_lost(self, reason: Any) -> None:
        pass


def _addresses(texts: list[str]) -> set[Address]:
    """The addresses a user typed that parse."""
    out = set()
    for text in texts:
        try:
            out.add(parse_user_address(text))
        except ValueError:
            continue
    return out


def _exit_now(status: int) -> None:
    """End the process with ``status`` (after the reactor's shutdown)."""
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


async def _fail(error: Exception) -> None:
    raise error


__all__ = ["Daemon", "DaemonSettings", "PendingJoin", "FEATURES", "DeferredList"]
