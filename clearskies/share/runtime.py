"""One share inside the running daemon: its engine, its sync, its peers.

``ShareRuntime`` ties the share engine (``ShareService``: scanning and
watching) to the sync layer (``ShareSync``), and implements the
``ILocalShare`` seam the sync layer uses to read and change the share.
Every file operation runs in the CPU thread pool; every database call goes
through the store's own thread.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from clearskies import diskjobs
from clearskies.errors import UnsafePathError
from clearskies.interfaces import ILocalShare
from clearskies.keys import ShareKeys
from clearskies.share.database import CacheKey, PeerInfo, ShareCounts, ShareInfo, StoredRecord
from clearskies.share import location
from clearskies.share.records import FileRecord, clamp_mtime_ns
from clearskies.share.scanner import Move
from clearskies.share.service import ShareService
from clearskies.sync import ShareSync, readonly
from clearskies.transfer import WRITE_BITS, unwritable_mode

if TYPE_CHECKING:
    from clearskies.daemon import Daemon


def expected_on_disk(stored: StoredRecord | None) -> diskjobs.Expected:
    """What the database says about a path, as the plain values disk jobs take."""
    if stored is None or stored.record.deleted:
        return ("absent",)
    if stored.record.is_dir:
        return ("directory",)
    cache = stored.cache
    return ("file", stored.record.size, stored.record.sha256,
            None if cache is None else (cache.inode, cache.size, cache.mtime_ns))


def _matches(path: str, stored: StoredRecord | None) -> bool:
    """True if the file at ``path`` still holds the content ``stored`` records."""
    expected = expected_on_disk(stored)
    return expected[0] == "file" and diskjobs.matches(path, *expected[1:])


def _unchanged(path: str, stored: StoredRecord | None) -> bool:
    """The path on disk is as the database says: the same file, or absent when it is absent."""
    return diskjobs.unchanged(path, expected_on_disk(stored))


def _remove(path: str, stored: StoredRecord | None) -> bool:
    if not os.path.lexists(path):
        return True
    if stored is None or stored.record.deleted:
        return False  # something we never recorded: not ours to delete
    if stored.record.is_dir:
        try:
            os.rmdir(path)
        except OSError:
            return False  # holds files we still keep: the directory stays
        return True
    if not _matches(path, stored):
        return False
    os.unlink(path)
    return True


def _make_directory(path: str, mode: int | None) -> None:
    os.makedirs(path, exist_ok=True)
    if mode is not None:
        os.chmod(path, mode & 0o7777 | 0o700)


def _rename(source: str, destination: str, stored: StoredRecord | None) -> bool:
    if not _matches(source, stored):
        return False
    if os.path.lexists(destination):
        return False
    os.makedirs(os.path.dirname(destination), exist_ok=True)
    os.rename(source, destination)
    return True


def _set_write_permission(jobs: list[tuple[str, StoredRecord]], writable: bool) -> int:
    """Give files their record's mode back, or take write permission away; returns how many.

    Only files that are as the database says are touched, and only when
    their bits are the ones the daemon set (a user's own chmod stays).
    """
    changed = 0
    for path, stored in jobs:
        mode = stored.record.mode if stored.record.mode is not None else 0o644
        now, wanted = (unwritable_mode(mode), mode) if writable else (mode, unwritable_mode(mode))
        try:
            st = os.lstat(path)
            if stat.S_IMODE(st.st_mode) == now and now != wanted and _matches(path, stored):
                os.chmod(path, wanted)
                changed += 1
        except OSError:
            continue  # gone or not ours to change: the next scan sees it
    return changed


def _if_still(stored: StoredRecord | None, decided_on: FileRecord | None) -> StoredRecord | None:
    """The stored row, or None when it moved on from the record a decision was made against.

    The scanner may record a new local edit between a merge decision and the
    disk work it asks for; with None the work refuses (``_remove`` and
    ``_rename`` only touch what the row vouches for), so the edit survives.
    """
    if decided_on is not None and stored is not None and stored.record != decided_on:
        return None
    return stored


def _quietly(job: Any, *args: Any) -> bool:
    """One file of a batch: a failure (permissions, a vanished file) fails only that one."""
    try:
        return bool(job(*args))
    except OSError:
        return False


def _cache_key_of(path: str) -> CacheKey | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return CacheKey(st.st_ino, st.st_size, clamp_mtime_ns(st.st_mtime_ns))


#: Peers remembered per share (the peers table and ``peers``): any holder of a
#: key can connect under ever new peer IDs, so past this the peer not seen for
#: longest is forgotten, never a connected one (protocol/sync.md).
MAX_KNOWN_PEERS = 128


def peers_to_forget(peers: dict[str, PeerInfo], keep: frozenset[str] | set[str],
                    limit: int = MAX_KNOWN_PEERS) -> list[str]:
    """The peer IDs to forget so ``peers`` holds at most ``limit``: those not
    seen for longest (never seen first), never one in ``keep`` (connected ones,
    the one just recorded).  Fewer when ``keep`` alone passes the limit."""
    excess = len(peers) - limit
    if excess <= 0:
        return []
    candidates = [p for p in peers.values() if p.peer_id not in keep]
    candidates.sort(key=lambda p: (p.last_seen if p.last_seen is not None else float("-inf"),
                                   p.peer_id))
    return [p.peer_id for p in candidates[:excess]]


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
class ShareRuntime:
    """A share the daemon runs: engine + sync + what we know of its peers."""

    _log = Logger()

    def __init__(self, daemon: Daemon, info: ShareInfo, keys: ShareKeys) -> None:
        self.daemon = daemon
        self.info = info
        self.keys = keys
        self.share_id = info.share_id
        self.our_peer_id = info.peer_id
        self.peer_id = info.peer_id
        self.root = Path(info.path)
        self.store = daemon.store
        self.runner = daemon.cpu_runner
        # The many small per-download jobs (see clearskies.diskjobs).
        self.disk_runner = daemon.disk_runner
        self.service = ShareService(daemon.reactor, daemon.store, info, daemon.cpu_runner)
        self.paths = self.service.paths
        self.signing = readonly.ShareSigning(keys, info.peer_id, persist=self._persist_signed)
        self.sync = ShareSync(
            self, daemon.reactor, signing=self.signing,
            upload_limiter=daemon.upload_limiter, download_limiter=daemon.download_limiter,
            # Extension "addresses" (protocol/sync.md): what we advertise, what peers tell us.
            advertised_addresses=lambda: [str(a) for a in daemon.advertised_addresses()],
            addresses_received=self.peer_addresses_received)
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
        self.service.add_change_listener(self._local_changes)
        self.service.on_recovered = self._recovered

    # -- lifetime ----------------------------------------------------------------

    async def start(self, new: bool = False, adopt: bool = False) -> None:
        """Bring the share up; ``adopt``: it was just attached into a folder whose files
        lose to the share's (Scanner.adopting).

        A share whose folder may not be shared (one made by an older version
        around the daemon's data directory, say) stays in the error state and
        syncs with nobody.
        """
        own = self.daemon.own_paths()
        refused = await self.runner.run(location.refusal, str(self.root), own)
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
        await self.follow_read_only_files()
        if self.daemon.paused:
            self.sync.pause()
        self.service.startService()
        if adopt:
            recorded = self.service.local_files_recorded()
            if recorded is None:
                self._adopted()
            else:
                recorded.addCallback(lambda _: self._adopted())

    def _adopted(self) -> None:
        if not self.service.scanner.adopting:  # (not when stopped or failed first)
            self.daemon.share_adopted(self.share_id)

    async def stop(self) -> None:
        if self._recount_call is not None and self._recount_call.active():
            self._recount_call.cancel()
        for session in list(self.sync.sessions.values()):
            session.connection.close("share stopping")
        self.sync.stop()
        await self.service.stopService()

    @property
    def error(self) -> str | None:
        return self.service.error

    def check_root(self) -> None:
        """Look at the share folder and its marker now (a download found the folder gone)."""
        self.service.check_root()

    def _recovered(self) -> None:
        """The folder is back: dial its peers now rather than at their next backoff."""
        connector = self.daemon.connector
        if connector is not None:
            connector.retry_now(self.share_id)
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
        wanted = bool(self.signing.read_only and self.daemon.config.get("read_only_files"))
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

    async def _set_write_permission(self, writable: bool) -> int:
        changed, after = 0, None
        while True:
            page = await self.store.records_between(self.share_id, "", None, after)
            jobs = [(local, row) for row in page
                    if not row.record.deleted and not row.record.is_dir
                    and (local := self._safe_local(row.path)) is not None]
            changed += await self.runner.run(_set_write_permission, jobs, writable)
            if not page:
                return changed
            after = page[-1].path

    # -- ILocalShare (what ShareSync uses) --------------------------------------------

    def revision(self) -> int:
        return max(self._revision, self.service.status.revision)

    def manifest(self) -> Deferred[tuple[int, list[FileRecord]]]:
        return Deferred.fromCoroutine(self._manifest())

    async def _manifest(self) -> tuple[int, list[FileRecord]]:
        revision = await self.store.get_revision(self.share_id)
        records: list[FileRecord] = []
        async for page in self.store.iter_records(self.share_id):
            records.extend(page)
        return revision, records

    def get_record(self, path: str) -> Deferred[FileRecord | None]:
        return self.store.get_record(self.share_id, path)

    def get_records(self, paths: list[str]) -> Deferred[dict[str, FileRecord]]:
        """Our records of many paths in one database round trip."""
        d = self.store.get_stored_many(self.share_id, paths)
        return d.addCallback(lambda found: {p: s.record for p, s in found.items()})

    def unchanged_many(self, paths: list[str],
                       local_paths: list[Path] | None = None) -> Deferred[dict[str, bool]]:
        """``is_unchanged`` for many paths: one database query, one worker call.

        ``local_paths``: their local paths, when the caller has them already
        (each costs file-system checks to work out again).
        """
        return Deferred.fromCoroutine(self._unchanged_many(paths, local_paths))

    async def _unchanged_many(self, paths: list[str],
                              local_paths: list[Path] | None = None) -> dict[str, bool]:
        stored = await self.store.get_stored_many(self.share_id, paths)
        if local_paths is None:
            local_paths = [self.local_path(p) for p in paths]
        locals_ = [(p, str(local), stored.get(p)) for p, local in zip(paths, local_paths)]
        return await self.disk_runner.run(
            diskjobs.unchanged_many,
            [(p, local, expected_on_disk(row)) for p, local, row in locals_])

    def local_path(self, path: str) -> Path:
        return self.paths.to_local(path)

    def is_ignored(self, path: str) -> bool:
        return self.service.is_ignored(path)

    def is_unchanged(self, path: str) -> Deferred[bool]:
        return Deferred.fromCoroutine(self._is_unchanged(path))

    async def _is_unchanged(self, path: str) -> bool:
        stored = await self.store.get_stored(self.share_id, path)
        return await self.runner.run(_unchanged, str(self.local_path(path)), stored)

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
                key = await self.runner.run(_cache_key_of, str(self.local_path(record.path)))
                if key is not None and key.size == record.size:
                    keys[record.path] = key
        revision = await self.store.apply_changes(self.share_id, records, keys)
        self._revision = max(self._revision, revision)
        self.last_sync = self.daemon.now()
        self._counts_dirty = True  # recounted when someone asks (fresh_counts)
        self.recount_unshared()
        return revision

    def find_local_copy(self, sha256: str) -> Deferred[Path | None]:
        return Deferred.fromCoroutine(self._find_local_copy(sha256))

    async def _find_local_copy(self, sha256: str) -> Path | None:
        for stored in await self.store.find_by_sha256(self.share_id, sha256):
            local = str(self.local_path(stored.path))
            if await self.runner.run(_matches, local, stored):
                return Path(local)
        return None

    def hashes_present(self, hashes: list[str]) -> Deferred[set[str]]:
        """Which of ``hashes`` some live file of the share has, in one database query.

        A hash left out has no local copy to take the content from.
        """
        d = self.store.find_by_sha256_many(self.share_id, hashes)
        return d.addCallback(set)

    def remove_local(self, path: str) -> Deferred[bool]:
        return Deferred.fromCoroutine(self._remove_local(path))

    async def _remove_local(self, path: str) -> bool:
        stored = await self.store.get_stored(self.share_id, path)
        return await self.runner.run(_remove, str(self.local_path(path)), stored)

    def make_directory(self, path: str, mode: int | None) -> Deferred[None]:
        return self.runner.run(_make_directory, str(self.local_path(path)), mode)

    def rename_many(self, moves: list[tuple[str, str]],
                    decided_on: list[FileRecord] | None = None) -> Deferred[list[bool]]:
        """``rename_local`` for many files: one database query, one worker job.

        ``decided_on``: for each move, our record of the source that the
        caller's decision was made against; see :meth:`remove_many`.
        """
        return Deferred.fromCoroutine(self._rename_many(moves, decided_on))

    async def _rename_many(self, moves: list[tuple[str, str]],
                           decided_on: list[FileRecord] | None) -> list[bool]:
        if not moves:
            return []
        stored = await self.store.get_stored_many(self.share_id, [src for src, _ in moves])
        jobs = [(self._safe_local(src), self._safe_local(dst),
                 _if_still(stored.get(src), decided_on[index] if decided_on else None))
                for index, (src, dst) in enumerate(moves)]
        destinations = [dst for src, dst in moves]
        self.expect_own_renames(destinations)
        try:
            done = await self.runner.run(
                lambda: [None not in job[:2] and _quietly(_rename, *job) for job in jobs])
        except BaseException:
            self.own_renames_failed(destinations)
            raise
        self.own_renames_failed([dst for dst, ok in zip(destinations, done) if not ok])
        return done

    def expect_own_renames(self, paths: list[str]) -> None:
        """We are about to rename files into these paths: their "moved in" events are ours."""
        self.service.expected_arrivals.expect(paths)

    def own_renames_failed(self, paths: list[str]) -> None:
        self.service.expected_arrivals.cancel(paths)

    def remove_many(self, paths: list[str],
                    decided_on: list[FileRecord] | None = None) -> Deferred[list[bool]]:
        """``remove_local`` for many paths: one database query, one worker job.

        ``decided_on``: for each path, our record that the caller's merge
        found superseded.  A path whose record has changed since (the scanner
        recorded a new local edit meanwhile) is left alone: that edit was not
        part of the decision, and deleting it would lose it.
        """
        return Deferred.fromCoroutine(self._remove_many(paths, decided_on))

    async def _remove_many(self, paths: list[str],
                           decided_on: list[FileRecord] | None) -> list[bool]:
        if not paths:
            return []
        stored = await self.store.get_stored_many(self.share_id, paths)
        jobs = [(self._safe_local(path),
                 _if_still(stored.get(path), decided_on[index] if decided_on else None))
                for index, path in enumerate(paths)]
        return await self.runner.run(
            lambda: [job[0] is not None and _quietly(_remove, *job) for job in jobs])

    def _safe_local(self, path: str) -> str | None:
        """The local path, or None for one our disk cannot take safely (that item fails)."""
        try:
            return str(self.local_path(path))
        except UnsafePathError:
            return None

    def rename_local(self, source: str, destination: str,
                     decided_on: FileRecord | None = None) -> Deferred[bool]:
        return Deferred.fromCoroutine(self._rename_local(source, destination, decided_on))

    async def _rename_local(self, source: str, destination: str,
                            decided_on: FileRecord | None) -> bool:
        stored = _if_still(await self.store.get_stored(self.share_id, source), decided_on)
        return await self.runner.run(_rename, str(self.local_path(source)),
                                     str(self.local_path(destination)), stored)

    def note_refused(self, path: str, why: str) -> bool:
        return self.service.scanner.skipped.refused(path, why)

    def peer_manifest_seen(self, peer_id: str, revision: Any) -> None:
        known = self.peers.get(peer_id)
        if known is None or revision is None:
            return
        updated = PeerInfo(
            share_id=known.share_id, peer_id=known.peer_id, name=known.name,
            last_seen=self.daemon.now(), addresses=known.addresses,
            manifest_revision=revision, acked_revision=known.acked_revision)
        self._remember(updated, "could not store a peer's revision")

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
        now = self.daemon.reactor.seconds()
        if self.counts is not None and (
                not self._counts_dirty
                or now - self._counted_at < COUNT_SPACING * self._count_duration):
            return self.counts
        self._counts_dirty = False
        self.counts = await self.store.share_counts(self.share_id)
        self._counted_at = self.daemon.reactor.seconds()
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
            self._recount_call = self.daemon.reactor.callLater(0.2, self._recount)
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

    def last_manifest_revision(self, peer_id: str) -> Any:
        """The revision of ``peer_id``'s manifest we have all of, to ask only for news.

        A read-only share must also keep every page of that manifest to relay
        it and to know the share's version: if it does not, the whole
        manifest is asked for again.
        """
        known = self.peers.get(peer_id)
        revision = known.manifest_revision if known is not None else None
        if revision is not None and self.signing.read_only:
            kept = self.signing.store.complete_revision(peer_id)
            if kept is None or kept < revision:
                return None
        return revision

    def peer_connected(self, info: Any, connection: Any) -> None:
        peer = connection.transport.getPeer() if connection.transport else None
        address = None
        host = getattr(peer, "host", None)
        dialled = getattr(connection, "dialled_address", None)
        if dialled is not None:
            address = str(dialled)  # what we dialled: a tor: address stays one
        elif host and not info.we_are_server:
            port = getattr(peer, "port", None)
            address = ("tcp:[%s]:%d" % (host, port)) if ":" in host else (
                "tcp:%s:%d" % (host, port))
        known = self.peers.get(info.their_peer_id)
        addresses = list(known.addresses) if known else []
        if address and address not in addresses:
            addresses = ([address] + addresses)[:8]
        record = PeerInfo(
            share_id=self.share_id, peer_id=info.their_peer_id, name=info.their_name,
            last_seen=self.daemon.now(), addresses=tuple(addresses),
            manifest_revision=known.manifest_revision if known else None,
            acked_revision=known.acked_revision if known else None)
        self._remember(record, "could not store a peer")

    def peer_addresses_received(self, peer_id: str, addresses: list[str]) -> None:
        """A peer told us where it can be reached: remember it and offer it for dialling."""
        known = self.peers.get(peer_id)
        if known is not None:
            merged = list(dict.fromkeys(list(addresses) + list(known.addresses)))[:8]
            if tuple(merged) != known.addresses:
                record = PeerInfo(
                    share_id=known.share_id, peer_id=peer_id, name=known.name,
                    last_seen=self.daemon.now(), addresses=tuple(merged),
                    manifest_revision=known.manifest_revision,
                    acked_revision=known.acked_revision)
                self._remember(record, "could not store a peer's addresses")
        self.daemon.add_peer_candidates(self.share_id, peer_id, addresses)

    def _remember(self, record: PeerInfo, failed: str) -> None:
        """Keep ``record`` in ``peers`` and the peers table, both bounded by MAX_KNOWN_PEERS."""
        self.peers[record.peer_id] = record
        forget = peers_to_forget(self.peers, set(self.sync.sessions) | {record.peer_id})
        for peer_id in forget:
            del self.peers[peer_id]
        self.store.upsert_peer(record, forget).addErrback(
            lambda f: self._log.failure(failed, f))

    def peer_disconnected(self, session: Any) -> None:
        if self.daemon.connector is not None:
            address = getattr(session.connection, "dialled_address", None)
            self.daemon.connector.connection_lost(self.share_id, session.peer_id, address)
