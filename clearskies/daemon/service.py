"""The daemon's root service: it builds the rooms, starts them in order and stops them.

``Daemon`` is a ``MultiService``.  ``makeService`` (tap.py) builds it without
touching the disk; ``startService`` then takes the data directory's lock,
opens the state database, brings back every share, key, access code and
pending attach, and starts listening.  Its children are the log file, the
two places for blocking work (``clearskies.threads``: the database thread for
SQLite, the files place for key generation, scans and file work, with its
disk helper process for small downloads), the shares
(one child service each, under :class:`Shares`), the control socket, the peer
listeners, Tor, the connection manager and the discovery sources.

Each room gets the rooms it uses as constructor arguments (or, for one made
after it, a callable).  Two pairs depend on each other, so one side of each is
linked once both exist: :meth:`Shares.attach_host` and
:meth:`AccessCodes.attach_dialler`.  The control commands see the daemon
through ``IDaemonControl``; everything else reaches the room that owns a thing.

A start that fails fails :attr:`Daemon.ready`; what that does to the process
is the entry point's business (``clearskies.tap``).
"""

from __future__ import annotations

import os
import socket
from typing import Any

from twisted.application.internet import TimerService
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from clearskies import SOFTWARE
from clearskies.accesscode import access_id, parse_code
from clearskies.daemon.activity import RATE_INTERVAL, Activity
from clearskies.daemon.codes import JOIN_CHECK_INTERVAL, AccessCodes
from clearskies.daemon.dialling import Dialling, offered_features
from clearskies.daemon.health import HEALTH_INTERVAL, ShareHealth
from clearskies.daemon.identical import IDENTICAL_INTERVAL, IdenticalCopies
from clearskies.daemon.verify import VERIFY_TICK, Verification
from clearskies.daemon.discovery import Discovery
from clearskies.daemon.eventfeed import EventFeed, EventFeedService
from clearskies.daemon.host import ShareHost
from clearskies.daemon.keyring import DaemonKeyRing
from clearskies.daemon.sparekeys import SpareKeys
from clearskies.daemon.spreading import CodeSpreading
from clearskies.daemon.listeners import ControlListener, PeerListeners
from clearskies.daemon.options import DaemonSettings, settle_options
from clearskies.daemon.resources import Resources
from clearskies.daemon.shares import Shares
from clearskies.daemon.startup import StartupFailure, lock_data_dir, startup_reason
from clearskies.daemon.thumbs import ShareThumbnails
from clearskies.daemon.tor import NEUTRAL_NAME, TorLink
from clearskies.errors import ConfigurationError, ShareError
from clearskies.events import EventBus
from clearskies.interfaces import IDaemonControl
from clearskies.logfile import LogFileService
from clearskies.share.database import ShareStore
from clearskies.threads import make_runners


@implementer(IDaemonControl)
class Daemon(MultiService):
    """One ClearSkies daemon: the root of its service tree, and the composition of its rooms."""

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
        # Where blocking work runs: the database thread and the files place (clearskies.threads).
        self.runners = make_runners(reactor)
        self.runners.setServiceParent(self)
        self.resources = Resources(reactor, self.data_dir, self.runners.database,
                                   self.runners.files)
        self.activity = Activity(reactor, lambda: self.share_registry.by_id.values())
        self.spare_keys = SpareKeys(self.resources)
        self.share_registry = Shares(self.resources, self.activity, self.spare_keys,
                                     self._announce_changed)
        self.share_registry.setServiceParent(self)
        self.access_codes = AccessCodes(self.resources, self.share_registry,
                                        self._announce_changed)
        self.keyring = DaemonKeyRing(self.share_registry, self.access_codes)
        self.tor_link = TorLink(self.resources, settings)
        self.dialling = Dialling(self.resources, self.share_registry, self.access_codes,
                                 self.tor_link, self.keyring, lambda: self.listeners.port_number,
                                 lambda: self.name,
                                 features=offered_features(settings.compress))
        self.access_codes.attach_dialler(self.dialling)
        # Extension code_spread: our codes held by our peers, theirs by us.
        self.code_spreading = CodeSpreading(self.resources, self.share_registry,
                                            self.access_codes)
        self.access_codes.on_change = self.code_spreading.changed
        self.dialling.code_spreading = self.code_spreading
        # Extension thumbnails (protocol/thumbnails.md), and the web UI's thumbnails.
        self.thumbnails = ShareThumbnails(self.data_dir, self.runners.files,
                                          self.share_registry.share_by_path)
        self.dialling.thumbnails = self.thumbnails
        self.listeners = PeerListeners(reactor, self.keyring, self.dialling.session_factory,
                                       features=self.dialling.features)
        self.listeners.setServiceParent(self)
        # What happened, numbered, for GUIs (control socket events, HTTP API).
        self.events = EventBus(self.resources.now)
        self.control = ControlListener(reactor, self.resources.control_path, self._dispatcher(),
                                       events=self.events)
        self.control.setServiceParent(self)
        self.web = None if settings.no_web else self._web_listener()
        self.discovery = Discovery(reactor, settings, self.share_registry, self.access_codes,
                                   self.dialling, self.tor_link, lambda: self.listeners.port_number)
        # What each share's runtime sees of all this (and nothing else of the daemon).
        self.share_host = ShareHost(self.resources, self.activity, self.share_registry,
                                    self.dialling, self.discovery, events=self.events)
        self.share_registry.attach_host(self.share_host)
        self.ready: Deferred[None] = Deferred()
        self._lock_fd: int | None = None
        self._listen_kept = False  # the peer endpoint comes from the stored settings
        TimerService(RATE_INTERVAL, self.activity.sample_rates).setServiceParent(self)
        TimerService(JOIN_CHECK_INTERVAL, self.access_codes.check_joins).setServiceParent(self)
        # How long each share and peer has gone without syncing (status warns).
        self.health = ShareHealth(self.resources, lambda: self.share_registry.by_id.values())
        TimerService(HEALTH_INTERVAL, self._check_health).setServiceParent(self)
        # Stored files read back against their SHA-256, slowly (bit rot).
        self.verification = Verification(self.resources,
                                         lambda: self.share_registry.by_id.values())
        TimerService(VERIFY_TICK, self._verify_tick).setServiceParent(self)
        # Conflict copies left identical to their file by a conflict settled both ways.
        self.identical_copies = IdenticalCopies(lambda: self.share_registry.by_id.values())
        TimerService(IDENTICAL_INTERVAL, self._identical_tick).setServiceParent(self)
        EventFeedService(RATE_INTERVAL, EventFeed(
            self.events, lambda: self.share_registry.by_id.values(), self.rates)
        ).setServiceParent(self)

    # -- start -----------------------------------------------------------------------

    def startService(self) -> None:
        # First of all, before the log file opens and long before anything
        # listens or dials: one daemon per data directory.
        try:
            self._lock_fd = lock_data_dir(self.data_dir)
        except ConfigurationError as e:
            raise StartupFailure(str(e)) from None
        super().startService()
        self._log.info("{software} starting (pid {pid}), data in {data_dir}",
                       software=SOFTWARE, pid=os.getpid(), data_dir=self.data_dir)
        d = Deferred.fromCoroutine(self._start())
        d.addCallbacks(self._started, self._start_failed)

    def _started(self, _: object) -> None:
        self._log.info("ClearSkies daemon ready: {count} share(s), peers on port {port}",
                       count=len(self.share_registry.by_id), port=self.listeners.port_number)
        self.ready.callback(None)

    def _start_failed(self, failure: Failure) -> None:
        if failure.check(ConfigurationError, ShareError):
            self._log.error("cannot start: {why}", why=startup_reason(failure))
        else:
            self._log.failure("cannot start the daemon", failure)
        self.ready.errback(failure)

    async def _start(self) -> None:
        resources = self.resources
        os.makedirs(self.data_dir, mode=0o700, exist_ok=True)
        os.makedirs(resources.keys_dir, mode=0o700, exist_ok=True)
        # The state database: every SQLite call on the database thread.
        resources.store = ShareStore(os.path.join(self.data_dir, "state.sqlite3"),
                                     resources.database_runner)
        resources.config = await resources.store.all_config()
        await self._settle_options()
        self.activity.apply_limits(resources.config)
        for info in await resources.store.list_shares():
            await self.share_registry.open_share(info)
        await self.access_codes.restore()
        await self.code_spreading.restore()
        for path in self.settings.shares:
            if self.share_by_path(path) is None:
                await self.create_share(path)
        if self.settings.join_code:
            code = parse_code(self.settings.join_code)
            # (Once attached, a restart with the same options finds the share.)
            if access_id(code) not in self.access_codes.joins \
                    and self.share_by_path(self.settings.join_into) is None:
                await self.add_join(code, self.settings.join_into, list(self.settings.peers),
                                    merge=self.settings.join_merge)
        await self._choose_tor_mode()
        await self._listen_peers()
        self._start_tor()
        self._start_discovery()
        await self.control.listen()
        if self.web is not None:
            await self.web.listen()
        self.spare_keys.make()

    async def _settle_options(self) -> None:
        """Options given on the command line are stored; those not given come from the
        stored settings, so a plain restart comes back as it was (README, "Settings")."""
        resources = self.resources
        settled = await settle_options(self.settings, resources.config, resources.store.set_config)
        if settled.listen_kept:
            self._listen_kept = True
        if settled.name is not None:
            self.name = settled.name

    async def _choose_tor_mode(self) -> None:
        await self.tor_link.choose_mode()
        if self.tor_link.tor_only and not self.settings.name:
            self.name = self.resources.config.get("name") or NEUTRAL_NAME
            self._log.info("Tor only: peers see this daemon as {name!r} (set it with --name)",
                           name=self.name)

    async def _listen_peers(self) -> None:
        await self.listeners.listen(self.settings.listen, self.tor_link.mode, self.name,
                                    chosen=self.settings.listen is not None,
                                    kept=self._listen_kept)

    def _start_tor(self) -> None:
        self.tor_link.start(self, self.listeners.onion_port, self._tor_ready)

    def _tor_ready(self, address: str) -> None:
        self._log.info("reachable through Tor at {address}", address=address)
        self.discovery.tor_ready(address)

    def _start_discovery(self) -> None:
        self.dialling.start(self, self.settings.peers)
        self.discovery.start(self)

    def _dispatcher(self) -> Any:
        from clearskies.control.commands import DaemonCommands
        return DaemonCommands(self)

    def _web_listener(self) -> Any:
        from clearskies.web.service import WebListener
        web = WebListener(self.reactor, self.data_dir, self._dispatcher(), self.events,
                          self.settings.web, thumbnails=self.thumbnails.for_browser)
        web.setServiceParent(self)
        return web

    def web_login(self) -> dict | None:
        """A one-time login URL for the web UI, or None when it is off."""
        return None if self.web is None else self.web.login()

    # -- stop ------------------------------------------------------------------------

    def stopService(self) -> Deferred[None]:
        self.spare_keys.stop()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        # In order: nobody new gets in, every share stops, the database closes; then
        # the rest (the thread pools among them) stop together.
        # A step that fails is logged and the next still runs: the database must close.
        if self.resources.store is not None and self.ready.called:
            await self._stop_step(self.health.save(), "keeping share health")
            await self._stop_step(self.verification.save(), "keeping verification state")
        for child in (self.control, self.web, self.listeners, self.share_registry):
            if child is None:
                continue
            if child.running:
                await self._stop_step(maybeDeferred(child.stopService), child)
        store = self.resources.store
        if store is not None:
            # before the database thread stops with the children
            await self._stop_step(maybeDeferred(store.close), "the database")
        Service.stopService(self)
        rest = [child for child in reversed(list(self)) if child.running]
        await DeferredList([maybeDeferred(child.stopService) for child in rest])
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # (the lock goes with it)
            self._lock_fd = None

    async def _stop_step(self, step: Deferred, what: Any) -> None:
        try:
            await step
        except Exception:
            self._log.failure("stopping {what} failed", what=what)

    # -- the rooms together ------------------------------------------------------------

    async def create_share(self, path: str) -> Any:
        """Make a new share of an existing directory, with fresh keys."""
        return await self.share_registry.create_share(path)

    async def share_with_keys(self, keys: Any, path: str) -> Any:
        """Make an empty directory the share whose saved keys are given."""
        return await self.share_registry.share_with_keys(keys, path)

    async def remove_share(self, path: str) -> None:
        def forget(share_id: str) -> None:
            self.health.forget(share_id)
            self.verification.forget(share_id)
            self.access_codes.share_removed(share_id)
            self.code_spreading.share_removed(share_id)
            self.dialling.forget_target(share_id)

        await self.share_registry.remove_share(path, forget)

    def _check_health(self) -> None:
        if self.resources.store is not None and self.ready.called:
            self.health.check()

    def _verify_tick(self) -> None:
        if self.resources.store is not None and self.ready.called:
            self.verification.tick()

    def _identical_tick(self) -> None:
        if self.resources.store is not None and self.ready.called:
            self.identical_copies.tick()

    def _announce_changed(self) -> None:
        self.discovery.announce_changed()

    def set_name(self, name: str) -> None:
        """The name peers see, from the next handshake on, whoever opens it."""
        self.name = name
        self.listeners.set_name(name)

    def apply_limits(self) -> None:
        """Set the rate limiters from the config; running transfers follow at once."""
        self.activity.apply_limits(self.resources.config)

    def now(self) -> float:
        return self.resources.now()

    # -- what the control commands see (IDaemonControl) ----------------------------------
    # (Its attributes are properties: each reads the room that owns the value.)

    @property
    def shares(self) -> dict[str, Any]:
        """Share ID -> the share's runtime (the share registry's ``by_id``)."""
        return self.share_registry.by_id

    @property
    def codes(self) -> dict[str, Any]:
        """Access ID -> live access code we made (kept by the access codes)."""
        return self.access_codes.codes

    @property
    def joins(self) -> dict[str, Any]:
        """Access ID -> pending (or failed) attach (kept by the access codes)."""
        return self.access_codes.joins

    @property
    def paused(self) -> bool:
        """True between ``pause`` and ``resume`` (the activity room's state)."""
        return self.activity.paused

    @property
    def tor_mode(self) -> str:
        """``"off"``, ``"on"`` or ``"only"`` (chosen by the Tor link at start)."""
        return self.tor_link.mode

    @property
    def listening_port(self) -> int:
        """The TCP port peers reach us on (the peer listeners'; 0 before it is known)."""
        return self.listeners.port_number

    def request_stop(self) -> None:
        self.reactor.callLater(0.1, self.reactor.stop)

    def pause(self) -> None:
        self.activity.pause()
        self.events.publish("paused")

    def resume(self) -> None:
        self.activity.resume()
        self.events.publish("resumed")

    def is_tracking(self) -> bool:
        return any(getattr(t, "registered", False) for t in self.discovery.trackers)

    def rates(self) -> tuple[float, float]:
        return self.activity.upload.rate, self.activity.download.rate

    def onion_address(self) -> str | None:
        return self.tor_link.onion_address()

    def tor_error(self) -> str | None:
        return self.tor_link.error()

    def share_by_path(self, path: str) -> Any:
        return self.share_registry.share_by_path(path)

    async def size_warning(self, path: str) -> str | None:
        return await self.share_registry.size_warning(path)

    async def create_code(self, path: str, level: str, one_time: bool,
                          lifetime: float | None) -> Any:
        return await self.access_codes.create_code(path, level, one_time, lifetime)

    async def cancel_code(self, access_id_prefix: str) -> None:
        await self.access_codes.cancel_code(access_id_prefix)

    async def add_join(self, code: bytes, path: str, peers: list[str],
                       merge: bool = False) -> Any:
        return await self.access_codes.add_join(code, path, peers, merge=merge)

    async def remove_join(self, path: str) -> bool:
        return await self.access_codes.remove_join(path)

    async def remember_manual_peer(self, share_id: str, address: str) -> None:
        await self.dialling.remember_manual_peer(share_id, address)

    def share_health(self, runtime: Any) -> dict[str, Any]:
        return {**self.health.summary(runtime), **self.verification.summary(runtime)}

    async def verify_share(self, runtime: Any) -> dict[str, Any]:
        return await self.verification.verify_now(runtime)

    def share_setting(self, share_id: str, key: str) -> Any:
        return self.share_registry.share_settings(share_id).get(key)

    async def set_share_setting(self, share_id: str, key: str, value: Any) -> None:
        await self.share_registry.set_share_setting(share_id, key, value)

    def setting(self, key: str) -> Any:
        return self.resources.config.get(key)

    async def set_setting(self, key: str, value: Any) -> None:
        self.resources.config[key] = value
        if key == "name":
            self.set_name(value)
        if key in ("upload_limit", "download_limit"):
            self.apply_limits()
        await self.resources.store.set_config(key, value)
        if key == "read_only_files":
            for runtime in list(self.share_registry.by_id.values()):
                await runtime.follow_read_only_files()
