"""The share registry: every share the daemon runs, each one a child service.

A share is brought up in two steps: its runtime is prepared (the database
read, the folder checked), then it becomes a child of :class:`Shares`, which
starts it; it stops with the registry, or alone when it is detached.
"""

from __future__ import annotations

import os
from typing import Callable

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from clearskies.daemon.activity import Activity, Quiet
from clearskies.daemon.sparekeys import SpareKeys
from clearskies.daemon.resources import Resources, new_peer_id
from clearskies.daemon.runtime import ShareRuntime
from clearskies.errors import ConfigurationError
from clearskies.interfaces import IShareHost
from clearskies.keys import ShareKeys
from clearskies.share import location
from clearskies.share.database import ShareInfo
from clearskies.share.folder import remove_marker
from clearskies.share.service import create_share as register_share
from clearskies.sync.sealed import sessions as sealed
from clearskies.transfer.sigcache import SignatureCache

#: Config key: shares attached with --merge whose first scan has not yet recorded
#: the folder's own files (protocol/merge.md, "Attaching into a folder that holds files").
ADOPTING = "adopting_shares"
#: Config key: share ID → that share's own settings (settings.SHARE_DEFAULTS; and
#: ``paused``, set by ``clearskies pause DIR``).
SHARE_SETTINGS = "share_settings"
#: Under the data directory: signatures of big files made ahead (clearskies.transfer.sigcache).
SIGNATURES_DIR = "signatures"


class Shares(MultiService):
    """Share ID → :class:`ShareRuntime` (``by_id``), and making, opening and removing them.

    ``announce`` is called when a share appears, so that discovery tells the
    world at once.  What each runtime sees of the daemon comes in through
    :meth:`attach_host`, before the first share is opened.
    """

    _log = Logger()

    def __init__(self, resources: Resources, activity: Activity, spare_keys: SpareKeys,
                 announce: Callable[[], None]) -> None:
        super().__init__()
        self._resources = resources
        self._host: IShareHost | None = None
        self._activity = activity
        self._spare_keys = spare_keys
        self._announce = announce
        self.by_id: dict[str, ShareRuntime] = {}

    def attach_host(self, host: IShareHost) -> None:
        """Give the registry what its runtimes see of the daemon (``IShareHost``).

        A link made after construction because the dependency is mutual: the
        host reports to the dialling, which is made from this registry (it
        dials for the registry's shares and hands each session to its share).
        """
        self._host = host

    @property
    def host(self) -> IShareHost | None:
        """The host given to :meth:`attach_host` (None before)."""
        return self._host

    def stopService(self) -> Deferred[None]:
        """Stop every share, one after the other."""
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        Service.stopService(self)
        for runtime in list(self.by_id.values()):
            await runtime.stopService()

    # -- finding shares --------------------------------------------------------------

    def share_by_path(self, path: str) -> ShareRuntime | None:
        path = os.path.realpath(path)
        for runtime in self.by_id.values():
            if str(runtime.root) == path:
                return runtime
        return None

    def require_share(self, path: str) -> ShareRuntime:
        runtime = self.share_by_path(path)
        if runtime is None:
            raise ConfigurationError("%s is not a share of this daemon" % path)
        return runtime

    # -- making shares -----------------------------------------------------------------

    async def create_share(self, path: str) -> ShareRuntime:
        """Make a new share of an existing directory, with fresh keys."""
        path = os.path.realpath(path)
        if not os.path.isdir(path):
            raise ConfigurationError("%s is not a directory; create it first" % path)
        await self.check_location(path)
        self.check_not_nested(path)
        keys = await self._spare_keys.fresh()
        return await self.add_share(keys, path, new_peer_id())

    async def share_with_keys(self, keys: ShareKeys, path: str) -> ShareRuntime:
        """Make an existing, empty directory the share whose saved keys are given (a
        restore: it fills from the share's peers, untrusted ones included)."""
        path = os.path.realpath(path)
        if not os.path.isdir(path):
            raise ConfigurationError("%s is not a directory; create it first" % path)
        if keys.share_id in self.by_id:
            raise ConfigurationError("this daemon already has that share, at %s"
                                     % self.by_id[keys.share_id].root)
        if await self._resources.files_runner.run(os.listdir, path):
            raise ConfigurationError("%s is not empty; restore into an empty directory" % path)
        await self.check_location(path)
        self.check_not_nested(path)
        return await self.add_share(keys, path, new_peer_id())

    async def check_location(self, path: str) -> None:
        """ConfigurationError if ``path`` may not be a share (clearskies.share.location)."""
        refused = await self._resources.files_runner.run(location.refusal, path,
                                                         self._resources.own_paths())
        if refused is not None:
            raise ConfigurationError(refused)

    async def size_warning(self, path: str) -> str | None:
        """A warning for a share that is a home directory or very large (else None)."""
        warning = await self._resources.files_runner.run(location.size_warning, path)
        if warning is not None:
            self._log.warn("{warning}", warning=warning)
        return warning

    def check_not_nested(self, path: str) -> None:
        for runtime in self.by_id.values():
            root = str(runtime.root)
            inside = os.path.commonpath([root, path])
            if inside in (root, path):
                raise ConfigurationError(
                    "%s overlaps the share %s; shares cannot be nested" % (path, runtime.root))

    async def add_share(self, keys: ShareKeys, path: str, peer_id: str) -> ShareRuntime:
        """Store a share's keys and record, then run it."""
        resources = self._resources
        await resources.files_runner.run(keys.save, resources.keys_path(keys.share_id))
        info = await register_share(resources.store, resources.files_runner, path,
                                    keys.share_id, peer_id, keys.access, resources.now())
        runtime = await self.open_share(info, keys, new=True)
        self._announce()
        return runtime

    async def open_share(self, info: ShareInfo, keys: ShareKeys | None = None,
                         new: bool = False) -> ShareRuntime:
        """Run a stored share: prepare its runtime, then start it as a child service."""
        resources = self._resources
        if keys is None:
            keys = await resources.files_runner.run(ShareKeys.load,
                                                    resources.keys_path(info.share_id))
        if self._host is None:
            raise RuntimeError("a share opened before the registry was given its host")
        runtime = ShareRuntime(self._host, resources.reactor, resources.store,
                               resources.files_runner, info, keys,
                               self._activity.upload_limiter, self._activity.download_limiter)
        runtime.signatures = SignatureCache(
            os.path.join(resources.data_dir, SIGNATURES_DIR), resources.files_runner,
            resources.reactor, idle=signing_idle(runtime, resources.reactor.seconds))
        own = self.share_settings(info.share_id)
        runtime.share_paused = bool(own.get("paused"))
        if self._activity.paused or runtime.share_paused:
            runtime.service.pause()  # before it starts: no start scan until resume
        runtime.service.set_watching(own.get("watcher", True) is not False)
        self.by_id[info.share_id] = runtime
        adopt = info.share_id in resources.config.get(ADOPTING, [])
        await runtime.prepare(new=new, adopt=adopt)
        if keys.access == "untrusted":
            # What it keeps is known (status) before any peer connects.
            sealed.sealed_peers(runtime, resources.reactor, lambda: 0).side.loaded()
        runtime.setServiceParent(self)
        return runtime

    # -- attached with --merge -----------------------------------------------------------

    async def set_adopting(self, share_id: str, adopting: bool) -> None:
        """Remember (or forget) that a share's first scan must date its files before the share's."""
        config = self._resources.config
        listed = [s for s in config.get(ADOPTING, []) if s != share_id]
        if adopting:
            listed.append(share_id)
        if listed != config.get(ADOPTING, []):
            await self._resources.save_config(ADOPTING, listed)

    def share_adopted(self, share_id: str) -> None:
        """The first scan of a share attached with --merge has recorded the folder's files."""
        Deferred.fromCoroutine(self.set_adopting(share_id, False)).addErrback(
            lambda f: self._log.failure("could not record a finished first scan", f))

    # -- a share's own settings ------------------------------------------------------------

    def share_settings(self, share_id: str) -> dict:
        """The settings stored for one share (only those set)."""
        stored = self._resources.config.get(SHARE_SETTINGS)
        own = stored.get(share_id) if isinstance(stored, dict) else None
        return dict(own) if isinstance(own, dict) else {}

    async def set_share_setting(self, share_id: str, key: str, value: object) -> None:
        """Store one (checked) setting of a share and apply it to the running share."""
        stored = self._resources.config.get(SHARE_SETTINGS)
        stored = dict(stored) if isinstance(stored, dict) else {}
        own = self.share_settings(share_id)
        own[key] = value
        stored[share_id] = own
        await self._resources.save_config(SHARE_SETTINGS, stored)
        runtime = self.by_id.get(share_id)
        if runtime is None:
            return
        if key == "watcher":
            runtime.service.set_watching(value is not False)
        elif key == "paused":
            runtime.set_share_paused(bool(value), daemon_paused=self._activity.paused)

    async def forget_share_settings(self, share_id: str) -> None:
        stored = self._resources.config.get(SHARE_SETTINGS)
        if isinstance(stored, dict) and share_id in stored:
            stored = {k: v for k, v in stored.items() if k != share_id}
            await self._resources.save_config(SHARE_SETTINGS, stored)

    # -- removing shares -----------------------------------------------------------------

    async def remove_share(self, path: str, forget: Callable[[str], None]) -> None:
        """Stop the share at ``path`` and forget it: keys, records, settings.

        ``forget(share_id)`` is called once it is stopped, for what other rooms
        of the daemon hold about it (its codes, its dial targets).
        """
        runtime = self.require_share(path)
        share_id = runtime.share_id
        # Gone at once: a second detach while this one waits is told it is not a share.
        del self.by_id[share_id]
        for session in list(runtime.sync.sessions.values()):
            session.connection.close("share removed")
        if runtime.parent is self:
            await runtime.disownServiceParent()
        else:
            await runtime.stopService()
        forget(share_id)
        await self._resources.store.remove_share(share_id)
        await self.set_adopting(share_id, False)
        await self.forget_share_settings(share_id)
        try:
            os.unlink(self._resources.keys_path(share_id))
        except FileNotFoundError:
            pass
        # The marker we wrote goes too (only if it still names this share), so the
        # folder can be shared or attached again; the files stay.
        try:
            await self._resources.files_runner.run(remove_marker, str(runtime.root), share_id)
        except OSError as e:
            self._log.warn("could not remove the marker of the detached share in {root}: {why}",
                           root=runtime.root, why=e.strerror or e)


#: Seconds a share must have had nothing to scan, fetch or send before it makes
#: signatures ahead: a big file's signature costs seconds of CPU and a read of the
#: whole file, which the next transfer (often a few seconds away) needs more.
SIGNING_QUIET = 10.0


def signing_idle(runtime: ShareRuntime, now: Callable[[], float],
                 quiet_for: float = SIGNING_QUIET) -> Callable[[], bool]:
    """When a share may make signatures ahead (clearskies.transfer.sigcache): nothing
    scanned, fetched or sent to a peer for ``quiet_for`` seconds, as seen by the looks
    the cache takes (every second)."""
    quiet = Quiet()
    busy_at: list[float] = [now()]

    def idle() -> bool:
        if not quiet.look(runtime.sync) or runtime.service.status.state != "idle":
            busy_at[0] = now()
            return False
        return now() - busy_at[0] >= quiet_for

    return idle
