"""One share inside the running daemon: its engine, its sync, its peers.

``ShareRuntime`` is the per-share service.  It ties the share engine
(``ShareService``: scanning and watching) to the sync layer (``ShareSync``),
and implements the ``ILocalShare`` seam the sync layer uses to read and change the share
(its file operations are in :mod:`clearskies.daemon.localshare`).  It sees the
daemon only through ``IShareHost``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from clearskies.daemon.localshare import LocalShareFiles, _cache_key_of
from clearskies.daemon.shareevents import ShareEvents
from clearskies.daemon.sharepeers import SharePeers, peers_to_forget
from clearskies.daemon.versions import ShareVersions
from clearskies.interfaces import ILocalShare, IRunner, IShareHost
from clearskies.keys import ShareKeys
from clearskies.ratelimit import RateLimiter
from clearskies.share.database import CacheKey, PeerInfo, ShareCounts, ShareInfo
from clearskies.share import location
from clearskies.share.records import FileRecord
from clearskies.share.scanner import Move
from clearskies.share.service import ShareService
from clearskies.sync import ShareSync, readonly
from clearskies.transfer.modes import WRITE_BITS


def private_paths(root: str, own: list[str]) -> tuple[str, ...]:
    """The daemon's own paths that lie inside ``root``, share-relative (never synced)."""
    real_root = os.path.realpath(root)
    inside = []
    for path in own:
        real = os.path.realpath(path)
        if real != real_root and real.startswith(real_root.rstrip("/") + "/"):
            inside.append(os.path.relpath(real, real_root).replace(os.sep, "/"))
    return tuple(inside)


#: A share's totals are recounted at most once per this many times the last
#: count took (see ShareRuntime.fresh_counts).
COUNT_SPACING = 4.0


@implementer(ILocalShare)
class ShareRuntime(LocalShareFiles, SharePeers, Service):
    """A share the daemon runs: engine + sync + what we know of its peers.

    :meth:`prepare` reads what the share needs from the database; the share
    then runs while the service runs (a child of ``clearskies.daemon.shares.Shares``).
    """

    _log = Logger()

    def __init__(self, host: IShareHost, reactor: Any, store: Any, files_runner: IRunner,
                 info: ShareInfo, keys: ShareKeys,
                 upload_limiter: RateLimiter, download_limiter: RateLimiter) -> None:
        self.host = host
        self.reactor = reactor
        self.info = info
        self.keys = keys
        self.our_peer_id = info.peer_id
        self.peer_id = info.peer_id
        self.root = Path(info.path)
        LocalShareFiles.__init__(self, info.share_id, store, files_runner,
                                 ShareService(reactor, store, info, files_runner))
        # What peers' changes replace or delete is kept (clearskies.daemon.versions).
        self.versions = ShareVersions(info.share_id, self.root, store, files_runner, reactor)
        # What the engine reports (events), and the share's recent changes.
        self.share_events = ShareEvents(host, info.share_id, self.root, config=store)
        #: Its connections at level untrusted (clearskies.sync.sealed.sessions.SealedPeers),
        #: made at the first one.
        self.sealed: Any = None
        self.signing = readonly.ShareSigning(keys, info.peer_id, persist=self._persist_signed)
        self.sync = ShareSync(
            self, reactor, signing=self.signing,
            upload_limiter=upload_limiter, download_limiter=download_limiter,
            # Extension "addresses" (protocol/sync.md): what we advertise, what peers tell us.
            advertised_addresses=lambda: [str(a) for a in host.advertised_addresses()],
            addresses_received=self.peer_addresses_received,
            events=self.share_events)
        self.unshared: list[str] = []
        # Read-only share: files of the share's version we lack, and whether that
        # version is known in full (every page of its manifests here).
        self.missing: list[str] = []
        self.share_version_known = False
        self._recount_call: Any = None
        self._recount_again = False
        self.peers: dict[str, PeerInfo] = {}
        self._revision = info.revision
        self.last_sync: float | None = None
        self.counts: ShareCounts | None = None
        self._counts_dirty = True
        self._counted_at = 0.0
        self._count_duration = 0.0
        self._prepared = False
        self._adopt = False
        #: Paused on its own (``clearskies pause DIR``): no scans, no sessions.
        self.share_paused = False
        self.service.add_change_listener(self._local_changes)
        self.service.on_recovered = self._recovered

    # -- lifetime ----------------------------------------------------------------

    async def prepare(self, new: bool = False, adopt: bool = False) -> None:
        """Read what the share needs before it runs; ``adopt``: it was just attached
        into a folder whose files lose to the share's (Scanner.adopting).

        A share whose folder may not be shared (one made by an older version
        around the daemon's data directory, say) stays in the error state, is
        never started and syncs with nobody.
        """
        own = self.host.own_paths()
        refused = await self.files_runner.run(location.refusal, str(self.root), own)
        if refused is not None:
            self._log.error("share {root} not started: {why}", root=str(self.root), why=refused)
            self.service.refuse(refused)
            return
        self.service.scanner.private_paths = private_paths(str(self.root), own)
        self.service.scanner.adopting = adopt
        self.peers = {p.peer_id: p for p in await self.store.list_peers(self.share_id)}
        forget = peers_to_forget(self.peers, frozenset())  # a table from an older version
        if forget:
            for peer_id in forget:
                del self.peers[peer_id]
            await self.store.forget_peers(self.share_id, forget)
        if self.signing.read_only:
            changes = self.signing.store.load(await self.store.list_signed(self.share_id))
            if changes:  # rows kept under an older key, or no longer kept
                self._persist_signed(changes)
            self.recount_unshared()
        self.counts = await self.store.share_counts(self.share_id)
        if self.versions is not None:
            await self.versions.load()
        await self.share_events.load()
        await self.follow_read_only_files()
        self._prepared, self._adopt = True, adopt

    def startService(self) -> None:
        """Start scanning, watching and syncing (a prepared share only)."""
        super().startService()
        if not self._prepared:
            return  # refused: it stays in the error state
        if self.host.paused or self.share_paused:
            self.sync.pause()
        if self.versions is not None:
            self.versions.start()
        self.service.startService()
        if self._adopt:
            recorded = self.service.local_files_recorded()
            if recorded is None:
                self._adopted()
            else:
                recorded.addCallback(lambda _: self._adopted())

    def _adopted(self) -> None:
        if not self.service.scanner.adopting:  # (not when stopped or failed first)
            self.host.share_adopted(self.share_id)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self._recount_call is not None and self._recount_call.active():
            self._recount_call.cancel()
        if self.versions is not None:
            self.versions.stop()
        if self.signatures is not None:
            self.signatures.stop()
        for session in list(self.sync.sessions.values()):
            session.connection.close("share stopping")
        self.sync.stop()
        await self.service.stopService()

    def set_share_paused(self, paused: bool, daemon_paused: bool) -> None:
        """Pause this share alone (it neither sends nor receives: its connections
        close and none is made or accepted), or resume it."""
        self.share_paused = paused
        if paused:
            self.sync.pause()
            self.service.pause()
            for session in list(self.sync.sessions.values()):
                session.connection.close("share paused")
            return
        if not daemon_paused:
            self.service.resume()
            self.sync.resume()
        if self.running:
            self.host.retry_peers(self.share_id)

    @property
    def error(self) -> str | None:
        return self.service.error

    def check_root(self) -> None:
        """Look at the share folder and its marker now (a download found the folder gone)."""
        self.service.check_root()

    def _recovered(self) -> None:
        """The folder is back: dial its peers now rather than at their next backoff."""
        self.host.retry_peers(self.share_id)
        self.sync.pump()

    def local_files_recorded(self) -> Deferred[None] | None:
        """Merging waits on this while an adopting first scan is due (ShareService)."""
        return self.service.local_files_recorded()

    async def follow_read_only_files(self) -> None:
        """Apply the daemon's ``read_only_files`` setting to this share's files.

        On a read-only share with the setting on, files are kept without write
        permission on disk, so an accidental edit fails instead of becoming a
        local change nobody receives; their records keep the share's mode, and
        the scanner does not count the missing write bits as a change.
        Turning it off gives the files their modes back.
        """
        wanted = bool(self.signing.read_only and self.host.read_only_files())
        if wanted == self.sync.unwritable_files:
            return
        if wanted:
            # The scanner first, so the chmods below are never taken for local changes.
            self.service.scanner.ignored_mode_bits = WRITE_BITS
            self.sync.unwritable_files = True
        changed = await self._set_write_permission(writable=not wanted)
        if not wanted:
            self.sync.unwritable_files = False
            self.service.scanner.ignored_mode_bits = 0
        self._log.info("{share}: {count} files made {how}", share=self.share_id[:8],
                       count=changed, how="read-only" if wanted else "writable again")

    # -- ILocalShare (what ShareSync uses) ---------------------------------------------

    def revision(self) -> int:
        return max(self._revision, self.service.status.revision)

    def commit_remote(self, records: list[FileRecord],
                      written: dict[str, tuple[int, int, int]] | None = None) -> Deferred[int]:
        return Deferred.fromCoroutine(self._commit_remote(records, written or {}))

    async def _commit_remote(self, records: list[FileRecord],
                             written: dict[str, tuple[int, int, int]]) -> int:
        keys: dict[str, CacheKey] = {}
        skipped = self.service.scanner.skipped
        for record in records:
            skipped.accepted(record.path)  # a record of it was taken after all
            if record.deleted or record.is_dir:
                continue
            if record.path in written:
                size, mtime_ns, inode = written[record.path]
                keys[record.path] = CacheKey(inode, size, mtime_ns)
                continue
            # Content unchanged on disk (a kept version or a moved-aside copy): keep
            # the cache key valid so the next scan does not hash it again.
            stored = await self.store.get_stored(self.share_id, record.path)
            if stored is not None and stored.cache is not None and \
                    stored.record.sha256 == record.sha256:
                keys[record.path] = stored.cache
            else:
                key = await self.files_runner.run(_cache_key_of, str(self.local_path(record.path)))
                if key is not None and key.size == record.size:
                    keys[record.path] = key
        revision = await self.store.apply_changes(self.share_id, records, keys)
        if self.signatures is not None:  # big downloads: their signature made ahead
            for record in records:
                if record.path in written and record.sha256 and \
                        self.signatures.wants(written[record.path][0]):
                    size, mtime_ns, inode = written[record.path]
                    self.signatures.installed(self.share_id, record.path,
                                              self.local_path(record.path), record.sha256,
                                              (inode, size, mtime_ns))
        self._revision = max(self._revision, revision)
        self.last_sync = self.host.now()
        self._counts_dirty = True  # recounted when someone asks (fresh_counts)
        self.recount_unshared()
        return revision

    # -- events ----------------------------------------------------------------------

    def _local_changes(self, records: list[FileRecord], moves: list[Move],
                       revision: int) -> None:
        # Announced at once, with the batch's own revision: a peer session
        # counts as holding every revision up to the last one it was sent, so
        # a later commit (say, a download) must not be pushed to it first.
        self._revision = max(self._revision, revision)
        self._counts_dirty = True
        self.recount_unshared()
        self.sync.local_changes(records, revision,
                                [(move.source, move.destination) for move in moves])

    async def fresh_counts(self) -> ShareCounts:
        """File and byte totals, recounted only if something changed since last asked.

        Counting reads every row, so it is done on demand (status, list), not
        after each commit: that would make a sync of N files cost O(N²).
        And while files keep changing, a recount waits until COUNT_SPACING
        times the last count's duration has passed: a status poll many times
        a second on a big share then gets totals a moment old instead of
        keeping the database thread busy counting.
        """
        now = self.reactor.seconds()
        if self.counts is not None and (
                not self._counts_dirty
                or now - self._counted_at < COUNT_SPACING * self._count_duration):
            return self.counts
        self._counts_dirty = False
        self.counts = await self.store.share_counts(self.share_id)
        self._counted_at = self.reactor.seconds()
        self._count_duration = self._counted_at - now
        return self.counts

    # -- read-only shares (clearskies.sync.readonly) ----------------------------------

    def _persist_signed(self, changes: list[readonly.Change]) -> None:
        rows = [(kind, key, part, m.text if m else None, m.signature if m else None)
                for kind, key, part, m in changes]
        self.store.put_signed(self.share_id, rows).addErrback(
            lambda f: self._log.failure("could not store signed messages", f))
        self.recount_unshared()  # the share's version changed

    @property
    def matches_share_version(self) -> bool:
        """A read-only share holds the whole share's version (as last counted, and counted since)."""
        return (self.share_version_known and not self.missing
                and self._recount_call is None)

    def recount_unshared(self) -> None:
        """Soon, count the local changes a read-only share keeps to itself."""
        if not self.signing.read_only:
            return
        if self._recount_call is None:
            self._recount_call = self.reactor.callLater(0.2, self._recount)
        else:
            self._recount_again = True  # a count under way may have read too early

    def _recount(self) -> None:
        self._recount_again = False

        def done(comparison: readonly.Comparison) -> None:
            self._recount_call = None
            self.unshared = comparison.unshared
            self.missing = comparison.missing
            self.share_version_known = comparison.settled
            if self._recount_again:
                self.recount_unshared()

        def failed(f: Any) -> None:
            self._recount_call = None
            self._log.failure("could not count local changes", f)

        Deferred.fromCoroutine(readonly.compare_with_share(self, self.signing.store)).addCallbacks(
            done, failed)
