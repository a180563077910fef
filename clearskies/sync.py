"""Keeping one share identical with its connected peers (protocol/sync.md).

Two classes:

* ``ShareSync`` — one per share.  It owns what the share still needs
  (``wanted``: path → the record whose content we must fetch), decides what
  to do with every record a peer announces (``clearskies.share.merge``),
  schedules downloads across all connected peers, and relays changes.
* ``SyncSession`` — one per authenticated connection.  It turns wire
  messages into calls on ``ShareSync`` and back, and owns the connection's
  transfers (at most ``window`` outstanding ``get`` requests, one incoming
  payload at a time, uploads through a producer queue).

What the sync layer needs from the share engine is the small ``LocalShare``
seam below, so the whole layer can be tested against a fake.
"""

from __future__ import annotations

import errno
import itertools
import math
import os
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from twisted.internet.defer import Deferred, DeferredList, DeferredLock, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from clearskies import diskerrors, readonly, wire
from clearskies.discovery.addresses import UnsupportedProtocolError, parse_address
from clearskies.errors import PathObstacle, ProtocolError, UnsafePathError
from clearskies.share import merge
from clearskies.share.hashing import HashResult, hash_file
from clearskies.share.records import MAX_SIZE, FileRecord, validate_wire_path
from clearskies.backpressure import SharedPause
from clearskies.ratelimit import RateLimiter, ReadThrottle
from clearskies.transfer import (
    CONFLICT, CORRUPT, OK, SMALL_FILE, BufferedSeals, FileReceiver, FinishResult, SendQueue,
    finish_many, get_error_message,
)

WINDOW = 16
"""Outstanding ``get`` requests per connection."""

RETRY_AFTER = 30.0
"""Seconds before a file that failed from one peer is asked from it again."""

MAX_RANGE = 2**63
MAX_ADDRESSES = 8
"""Entries in one ``clearskies.addresses`` message (extension ``addresses``)."""
TRACE = bool(os.environ.get("CLEARSKIES_TRACE"))
"""Log every message and merge decision (debug level): for hunting protocol problems."""

MAX_REFUSED_RECORDS = 64
"""Invalid records one manifest message may hold: each is refused alone (listed,
logged once), but past this many the connection is closed instead."""

MAX_WAITING_GETS = 64
"""File requests a peer may have waiting on one connection before it is cut off."""
MANIFEST_PAGE = 1000
"""Records per manifest message for peers that negotiated ``manifest_pages``: a big
share's manifest would not fit the 16 MiB line limit, and pages merge as they arrive."""

MAX_FINISHING = 64
"""Received files waiting for verification and installation before no more are requested."""

SUPERSEDED = "superseded"
"""An install given up because a local edit came after the decision to download."""

COPY_LOOKAHEAD = 512
"""Wanted hashes asked about at once: is there a local file to copy instead of fetching?"""

COPY_ANSWER_TTL = 10.0
"""Seconds an answer "no local copy" is trusted; after that the file is looked up alone."""

SPACE_CHECK = 2.0
"""Seconds between measurements of free space while files wait for room (clearskies.diskerrors)."""


class LocalShare(Protocol):
    """What syncing needs from one share's engine (implemented by the share service)."""

    share_id: str
    our_peer_id: str
    root: Path

    def revision(self) -> int:
        """Our current manifest revision."""

    def manifest(self) -> Deferred[tuple[int, list[FileRecord]]]:
        """Every record, sorted by path, with the revision they make up."""

    def get_record(self, path: str) -> Deferred[FileRecord | None]:
        """Our record for ``path``."""

    def local_path(self, path: str) -> Path:
        """The checked local path for a peer-supplied one (UnsafePathError)."""

    def is_ignored(self, path: str) -> bool:
        """True for paths the user excluded: never announced, never overwritten."""

    def is_unchanged(self, path: str) -> Deferred[bool]:
        """True when the file on disk is as our last scan recorded it."""

    def commit_remote(self, records: list[FileRecord],
                      written: dict[str, tuple[int, int, int]] | None = None) -> Deferred[int]:
        """Store records whose on-disk state is now in place; returns the new revision.

        ``written`` gives (size, mtime_ns, inode) of files just written, so the
        next scan knows them.
        """

    def find_local_copy(self, sha256: str) -> Deferred[Path | None]:
        """A local file that holds this content (for copying instead of downloading)."""

    def remove_local(self, path: str) -> Deferred[bool]:
        """Delete the local file or empty directory if unchanged since the scan."""

    def make_directory(self, path: str, mode: int | None) -> Deferred[None]:
        """Create a directory (and parents) inside the share."""

    def rename_local(self, source: str, destination: str,
                     decided_on: FileRecord | None = None) -> Deferred[bool]:
        """Move a file within the share if the source is unchanged since the scan.

        ``decided_on``: our record of the source that the caller decided
        against; if the database holds a newer one, the move is refused.
        """

    def peer_manifest_seen(self, peer_id: str, revision: Any) -> None:
        """Remember the revision of a peer's manifest, to ask for changes since it next time."""

    def note_refused(self, path: str, why: str) -> bool:
        """List a peer's record that cannot be taken (``status --skipped``); True if new."""

    @property
    def runner(self) -> Any:
        """The thread runner for blocking file work."""

    @property
    def disk_runner(self) -> Any:
        """The runner for downloads' small-file jobs (``clearskies.diskjobs``)."""


def _holds_content(path: Path, record: FileRecord) -> bool:
    """True when the file at ``path`` has ``record``'s bytes and mode (worker thread)."""
    outcome = hash_file(str(path))
    return (isinstance(outcome, HashResult) and outcome.sha256 == record.sha256
            and outcome.size == record.size and record.mode in (None, outcome.mode))


@dataclass
class Wanted:
    """Content the share needs: the record, who has it, and who failed to give it."""

    record: FileRecord
    sources: set[str] = field(default_factory=set)
    failed: dict[str, float] = field(default_factory=dict)
    fetch_path: str | None = None  # what to ask peers for, when not record.path

    @property
    def remote_path(self) -> str:
        return self.fetch_path or self.record.path


class WantedFiles(dict[str, Wanted]):
    """The files a share needs, by path, with a running total of their bytes.

    Status requests ask for that total often; walking 100,000 entries for
    each would stall the reactor.  Entries are only added, replaced and
    removed through ``[]``, ``del`` and ``pop`` (a ``Wanted`` never gets
    another record), which keep the total.
    """

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __setitem__(self, path: str, wanted: Wanted) -> None:
        old = self.get(path)
        if old is not None:
            self.bytes -= old.record.size or 0
        super().__setitem__(path, wanted)
        self.bytes += wanted.record.size or 0

    def __delitem__(self, path: str) -> None:
        self.bytes -= self[path].record.size or 0
        super().__delitem__(path)

    def pop(self, path: str, *default: Any) -> Any:  # type: ignore[override]
        if path in self:
            self.bytes -= self[path].record.size or 0
        return super().pop(path, *default)

    def _unsupported(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("WantedFiles keeps a byte total: use [], del and pop")

    clear = popitem = setdefault = update = __ior__ = _unsupported  # type: ignore[assignment]


class ShareSync:
    """Converges one share with all its connected peers."""

    _log = Logger()

    def __init__(self, share: LocalShare, clock: IReactorTime, *,
                 rng: random.Random | None = None, window: int = WINDOW) -> None:
        self.share = share
        self.clock = clock
        # Only picks which peer to ask: no secret, so no system call per pick.
        self.rng = rng or random.Random()
        self._seals: BufferedSeals | None = None
        self.window = window
        self.sessions: dict[str, SyncSession] = {}
        self.wanted = WantedFiles()
        self.in_flight: dict[str, SyncSession] = {}
        self.paused = False
        self._lock = DeferredLock()
        self.pending_rmdirs: dict[str, FileRecord] = {}
        self.placeholders: set[str] = set()
        # Records that could not be carried out yet (our file could not be moved aside
        # for a conflict copy, the disk refused, a symlink or unreadable folder in the
        # way): path -> (peer ID, its record). Merged again once the scanner records
        # the path or a folder above it anew, after `clearskies scan`, when the peer
        # sends it again, or after RETRY_AFTER; reported (and not in sync) until then.
        self.unresolved: dict[str, tuple[str, FileRecord]] = {}
        self._unresolved_call: Any = None
        self._retry_call: Any = None
        # Payloads received and being verified/installed (path -> session): out of
        # the request window, so the next files stream while the disk catches up.
        self.finishing: dict[str, SyncSession] = {}
        self._ready: list[tuple[FileReceiver, FileRecord, Deferred[str]]] = []
        self._installing = False
        # Hashes with no local file, looked up COPY_LOOKAHEAD at a time (sha256 ->
        # (when asked, some live file has it)), so that a share filling up with new
        # content costs one database query per batch, not one per file.
        self._copy_answers: dict[str, tuple[float, bool]] = {}
        self._copy_lookup: Deferred[None] | None = None
        self.bytes_received = 0
        self.bytes_sent = 0
        # Downloads the local disk refused, and when to try them again.
        self.disk = diskerrors.DiskTrouble(str(share.root))
        self._space_call: Any = None
        # Read-only shares (clearskies.readonly): signing and relaying; None = plain.
        self.signing: readonly.ShareSigning | None = None
        #: Put downloaded files in place without write permission (set by the
        #: daemon for a read-only share when ``read_only_files`` is on).
        self.unwritable_files = False
        # Daemon-wide rate limits, shared by every share (set by the daemon).
        self.upload_limiter: RateLimiter | None = None
        self.download_limiter: RateLimiter | None = None
        # Extension "addresses" (set by the daemon): where we can be reached beyond what
        # peers see themselves, and what to do with a peer's list (peer ID, addresses).
        self.advertised_addresses: Callable[[], list[str]] | None = None
        self.addresses_received: Callable[[str, list[str]], None] | None = None

    # -- sessions --------------------------------------------------------------

    def attach(self, session: SyncSession) -> bool:
        """Register a new session; False when it duplicates a live one and must close."""
        existing = self.sessions.get(session.peer_id)
        if existing is not None and existing is not session:
            if existing.keep_over(session):
                return False
            existing.connection.close("replaced by a newer connection from the same peer")
            self.detach(existing)
        self.sessions[session.peer_id] = session
        return True

    def detach(self, session: SyncSession) -> None:
        if self.sessions.get(session.peer_id) is session:
            del self.sessions[session.peer_id]
        for path in [p for p, s in self.in_flight.items() if s is session]:
            del self.in_flight[path]
        if session.peer_id not in self.sessions:
            for wanted in self.wanted.values():
                wanted.sources.discard(session.peer_id)
        self.pump()

    # -- state for status reports ---------------------------------------------

    @property
    def items_to_download(self) -> int:
        return len(self.wanted)

    @property
    def bytes_to_download(self) -> int:
        return self.wanted.bytes

    @property
    def settled(self) -> bool:
        """Every record merged so far is carried out: nothing to fetch, no conflict waiting."""
        return not self.wanted and not self.unresolved

    @property
    def in_sync(self) -> bool:
        """Settled, nothing from a peer left to merge, every peer has our latest revision."""
        return self.settled and all(s.in_sync and not s.merging
                                    for s in self.sessions.values())

    # -- local changes -----------------------------------------------------------

    def local_changes(self, records: Iterable[FileRecord], revision: int,
                      moves: Iterable[tuple[str, FileRecord]] = ()) -> None:
        """The scanner found changes: tell every peer that has our manifest."""
        records = list(records)
        retry: dict[str, list[FileRecord]] = {}
        for record in records:
            waiting = self._settle(record.path)
            if waiting is not None:
                retry.setdefault(waiting[0], []).append(waiting[1])
            wanted = self.wanted.get(record.path)
            if wanted is not None and not record.same_content(wanted.record):
                # A local edit supersedes what we were fetching; merge decides again later.
                self.wanted.pop(record.path, None)
            if not record.deleted and self.pending_rmdirs:
                # Something new lives here now: its directories stay.
                for directory in [d for d in self.pending_rmdirs
                                  if record.path == d or record.path.startswith(d + "/")]:
                    del self.pending_rmdirs[directory]
        if self.unresolved:
            # A folder above a waiting path changed (a symlink or file in the way
            # removed, permissions given back): its records may go through now.
            changed = {record.path for record in records}
            for path in [p for p in self.unresolved if _has_ancestor_in(p, changed)]:
                waiting = self._settle(path)
                if waiting is not None:
                    retry.setdefault(waiting[0], []).append(waiting[1])
        for session in list(self.sessions.values()):
            session.push_changes(records, list(moves), revision)
        for peer_id, remote in retry.items():
            self._decide_again(peer_id, remote)

    def _decide_again(self, peer_id: str, records: list[FileRecord]) -> None:
        """Merge a peer's records again, against what the scanner has just recorded."""
        session = self.sessions.get(peer_id)
        if session is None:
            # The peer is gone; it sends the path again when it is back.
            for record in records:
                self._unsettled(record.path, peer_id, record)
            return
        session.merge_again(records)

    def _unsettled(self, path: str, peer_id: str, record: FileRecord) -> None:
        """A peer's record for ``path`` could not be carried out: keep it, retry it later."""
        self.unresolved.setdefault(path, (peer_id, record))
        if self._unresolved_call is None:
            self._unresolved_call = self.clock.callLater(RETRY_AFTER, self._retry_unresolved)

    def _settle(self, path: str) -> tuple[str, FileRecord] | None:
        """``path`` is being decided anew: no longer waiting."""
        waiting = self.unresolved.pop(path, None)
        if not self.unresolved and self._unresolved_call is not None:
            if self._unresolved_call.active():
                self._unresolved_call.cancel()
            self._unresolved_call = None
        return waiting

    def retry_unresolved(self) -> None:
        """Merge the waiting records again now (the user rescanned the share)."""
        if self._unresolved_call is not None and self._unresolved_call.active():
            self._unresolved_call.cancel()
        self._retry_unresolved()

    def _retry_unresolved(self) -> None:
        self._unresolved_call = None
        by_peer: dict[str, list[FileRecord]] = {}
        for peer_id, record in self.unresolved.values():
            by_peer.setdefault(peer_id, []).append(record)
        for peer_id, records in by_peer.items():
            session = self.sessions.get(peer_id)
            if session is not None:
                session.merge_again(records)
        if self.unresolved:
            self._unresolved_call = self.clock.callLater(RETRY_AFTER, self._retry_unresolved)

    # -- remote records ----------------------------------------------------------

    def receive_records(self, session: SyncSession, records: list[FileRecord]) -> Deferred[None]:
        """Merge what a peer announced; serialised so two peers cannot race on one path."""
        return self._lock.run(lambda: Deferred.fromCoroutine(self._merge(session, records)))

    async def _merge(self, session: SyncSession, records: list[FileRecord]) -> None:
        committed: list[FileRecord] = []
        for_origin: list[FileRecord] = []
        # One database round trip for the whole batch (a manifest page), not one per record.
        prefetched: dict[str, FileRecord] = {}
        unread: set[str] = set()
        get_many = getattr(self.share, "get_records", None)
        if get_many is not None and len(records) > 1:
            unread = {r.path for r in records}
            prefetched = await get_many(sorted(unread))
        remove_many = getattr(self.share, "remove_many", None)
        removals: list[FileRecord] = []
        superseded: list[FileRecord] = []  # our record each removal was decided against
        for remote in records:
            if self.share.is_ignored(remote.path):
                continue
            session.remote_index[remote.path] = remote
            self._settle(remote.path)  # decided anew below
            if remote.path in unread:
                unread.discard(remote.path)  # a repeated path is read again, fresh
                local = prefetched.get(remote.path)
            else:
                local = await self.share.get_record(remote.path)
            decision = merge.merge_remote(
                local, remote,
                local_unacked=session.local_unacked(local),
                our_peer_id=self.share.our_peer_id,
            )
            if TRACE:
                self._log.debug("{path} from {peer}: {action} (ours {ours}, theirs {theirs})",
                                path=remote.path, peer=session.peer_id[:8],
                                action=decision.action, ours=local.vv if local else None,
                                theirs=remote.vv)
            if (remove_many is not None and decision.action == merge.ACCEPT
                    and decision.record.deleted and local is not None
                    and not local.deleted and not local.is_dir):
                removals.append(decision.record)  # deleted together after the loop
                superseded.append(local)
                continue
            try:
                applied = await self._apply(session, local, remote, decision)
            except UnsafePathError as e:
                # A valid path that our disk cannot take (through a symlink, a file
                # where a directory should be): refuse it, keep syncing the rest.
                self.refused(session, remote.path, str(e))
                if isinstance(e, PathObstacle):  # it may go away: the record waits
                    self._unsettled(remote.path, session.peer_id, remote)
                continue
            except OSError as e:
                # The disk refused (permissions, a full disk): this record waits and
                # is tried again; the rest of the batch goes on.
                self._log.warn("could not apply {path} from {peer}: {why}; trying again later",
                               path=remote.path, peer=session.peer_id[:8],
                               why=e.strerror or str(e))
                self._unsettled(remote.path, session.peer_id, remote)
                continue
            committed.extend(applied)
            # What the sender told us needs no echo; what we made of it (merged
            # vectors, conflict copies) it must hear too.
            for_origin.extend(r for r in applied if r != remote)
        if removals:
            try:
                removed = await remove_many([r.path for r in removals], superseded)
            except UnsafePathError as e:
                self._log.warn("not applying deletions from {peer}: {why}",
                               peer=session.peer_id[:8], why=str(e))
                removed = [False] * len(removals)
            for record, gone in zip(removals, removed):
                # Not removed: changed here since the scan; the edit wins and is announced.
                if gone:
                    self.wanted.pop(record.path, None)
                    committed.append(record)
                else:
                    self._blocked_deletion(session, record)
        committed.extend(await self._retry_directory_deletions())
        if committed:
            revision = await self.share.commit_remote(committed)
            self.relay(committed, revision, origin=session)
            if for_origin:
                session.push_changes(
                    [r for r in for_origin if not (r.deleted and r.path in self.placeholders)],
                    [], revision, force=True)
        self.pump()

    def _blocked_deletion(self, session: SyncSession, record: FileRecord) -> None:
        """A deletion not carried out: if a symlink or unreadable folder is in the
        way (not a local edit, which wins), it waits like any blocked record."""
        try:
            self.share.local_path(record.path)
        except PathObstacle as e:
            self.refused(session, record.path, str(e))
            self._unsettled(record.path, session.peer_id, record)
        except UnsafePathError:
            pass

    async def _retry_directory_deletions(self) -> list[FileRecord]:
        """Directories deleted remotely go once their contents have gone (deepest first)."""
        done = []
        for path in sorted(self.pending_rmdirs, reverse=True):
            if await self.share.remove_local(path):
                done.append(self.pending_rmdirs.pop(path))
        return done

    def receive_move(self, session: SyncSession, source: str,
                     destination: FileRecord) -> Deferred[None]:
        """A peer renamed a file: rename ours too when we hold that very content."""
        return self._lock.run(
            lambda: Deferred.fromCoroutine(self._move(session, source, destination)))

    async def _move(self, session: SyncSession, source: str, destination: FileRecord) -> None:
        tombstone = FileRecord(path=source, utime=destination.utime, deleted=True,
                               vv=dict(destination.vv))
        if not (self.share.is_ignored(source) or self.share.is_ignored(destination.path)
                or destination.deleted or destination.is_dir):
            ours = await self.share.get_record(source)
            there = await self.share.get_record(destination.path)
            if (ours is not None and not ours.deleted and not ours.is_dir
                    and ours.sha256 == destination.sha256
                    # A rename cannot carry a new mode: renamed and chmodded goes the long way.
                    and destination.mode in (None, ours.mode)
                    and (there is None or there.deleted)
                    and merge.vv_compare(ours.vv, destination.vv) in (merge.BEFORE, merge.EQUAL)):
                decision = merge.merge_remote(there, destination, local_unacked=False,
                                              our_peer_id=self.share.our_peer_id)
                if decision.action == merge.ACCEPT and \
                        await self._rename_if_safe(source, destination.path, ours):
                    session.remote_index[destination.path] = destination
                    session.remote_index[source] = tombstone
                    records = [decision.record, tombstone]
                    records.extend(await self._retry_directory_deletions())
                    revision = await self.share.commit_remote(records)
                    self.relay(records, revision, origin=session)
                    return
        await self._merge(session, [destination, tombstone])

    def receive_moves(self, session: SyncSession,
                      moves: list[tuple[str, FileRecord]]) -> Deferred[None]:
        """Apply a batch of moves: renames of content we hold go in one disk job."""
        return self._lock.run(
            lambda: Deferred.fromCoroutine(self._moves(session, moves)))

    async def _moves(self, session: SyncSession, moves: list[tuple[str, FileRecord]]) -> None:
        rename_many = getattr(self.share, "rename_many", None)
        get_many = getattr(self.share, "get_records", None)
        if rename_many is None or get_many is None or len(moves) == 1:
            for source, destination in moves:
                await self._move(session, source, destination)
            return
        known = await get_many(sorted({p for s, d in moves for p in (s, d.path)}))
        touched: set[str] = set()
        plan: list[tuple[str, FileRecord, FileRecord, FileRecord]] = []
        slow: list[tuple[str, FileRecord]] = []
        for source, destination in moves:
            tombstone = FileRecord(path=source, utime=destination.utime, deleted=True,
                                   vv=dict(destination.vv))
            ours, there = known.get(source), known.get(destination.path)
            decision = None
            if not ({source, destination.path} & touched) and self._renamable(
                    source, destination, ours, there):
                decision = merge.merge_remote(there, destination, local_unacked=False,
                                              our_peer_id=self.share.our_peer_id)
            touched.update((source, destination.path))
            if decision is not None and decision.action == merge.ACCEPT:
                plan.append((source, destination, decision.record, tombstone))
            else:
                slow.append((source, destination))
        try:
            done = await rename_many([(src, dest.path) for src, dest, _, _ in plan],
                                     [known[src] for src, _, _, _ in plan])
        except UnsafePathError:
            done = [False] * len(plan)
        records: list[FileRecord] = []
        for (source, destination, record, tombstone), renamed in zip(plan, done):
            if renamed:
                session.remote_index[destination.path] = destination
                session.remote_index[source] = tombstone
                records.extend((record, tombstone))
            else:
                slow.append((source, destination))
        if records:
            records.extend(await self._retry_directory_deletions())
            revision = await self.share.commit_remote(records)
            self.relay(records, revision, origin=session)
        for source, destination in slow:
            await self._move(session, source, destination)

    def _renamable(self, source: str, destination: FileRecord, ours: FileRecord | None,
                   there: FileRecord | None) -> bool:
        """A move we can carry out as a local rename of the very content it names."""
        return (not (self.share.is_ignored(source) or self.share.is_ignored(destination.path)
                     or destination.deleted or destination.is_dir)
                and ours is not None and not ours.deleted and not ours.is_dir
                and ours.sha256 == destination.sha256
                # A rename cannot carry a new mode: renamed and chmodded goes the long way.
                and destination.mode in (None, ours.mode)
                and (there is None or there.deleted)
                and merge.vv_compare(ours.vv, destination.vv) in (merge.BEFORE, merge.EQUAL))

    async def _rename_if_safe(self, source: str, destination: str, ours: FileRecord) -> bool:
        try:
            return await self.share.rename_local(source, destination, ours)
        except (UnsafePathError, OSError):
            # Handled as delete + new file, which refuses the unsafe side and
            # keeps what the disk refuses for another try.
            return False

    async def _apply(self, session: SyncSession, local: FileRecord | None, remote: FileRecord,
                     decision: merge.MergeDecision) -> list[FileRecord]:
        """Carry out one merge decision; returns records whose disk state is already final."""
        if decision.action == merge.IGNORE:
            if (local is not None and not local.deleted and not local.is_dir
                    and remote.same_content(local)):
                session.acknowledge(local)
            return []
        if decision.action == merge.ACCEPT:
            if decision.record.deleted and local is not None and local.is_dir:
                # Its contents may still be on their way out: retried after each batch.
                self.pending_rmdirs[local.path] = decision.record
                return []
            return await self._take(session, decision.record)
        if decision.action == merge.KEEP:
            return [decision.record]  # ours stays on disk; its merged vv goes out
        # Concurrent change: keep both contents.
        out: list[FileRecord] = []
        conflict = decision.conflict
        assert conflict is not None and local is not None
        if decision.local_wins:
            # Ours keeps the path (with the merged vv); theirs is fetched as a copy.
            out.append(decision.record)
            out.extend(await self._take(session, conflict, fetch_path=remote.path))
        else:
            # Theirs takes the path; ours moves aside first, then theirs is fetched.
            if not local.deleted and not local.is_dir:
                kept = await self.share.get_record(conflict.path)
                if kept is not None and not kept.deleted and kept.sha256 == local.sha256:
                    # Our content already has its copy (a peer kept it so and we took
                    # that record): theirs just replaces ours at the path.
                    pass
                elif await self.share.rename_local(local.path, conflict.path, local):
                    out.append(conflict)
                    # Until theirs arrives the path is empty here: record that (for the
                    # scanner), but tell nobody; it is a placeholder, not a deletion.
                    out.append(FileRecord(path=local.path, utime=local.utime, deleted=True,
                                          vv=dict(local.vv)))
                    self.placeholders.add(local.path)
                else:
                    # Changed here since the scan (or the copy's name is taken): neither
                    # side may be dropped.  Decided again once the scanner has recorded
                    # the path anew; until then the share is not in sync.
                    self._unsettled(remote.path, session.peer_id, remote)
                    if await self.share.get_record(local.path) != local:
                        # The scanner has recorded the edit already: decide now.
                        session.merge_again([remote])
                    self._log.warn(
                        "could not move {path} aside for a conflict copy (it changed here "
                        "since the last scan, or {copy} is taken); deciding again after "
                        "the next scan", path=local.path, copy=conflict.path)
                    return []
            out.extend(await self._take(session, decision.record))
        self._log.info("concurrent changes to {path}: kept both, copy at {copy}",
                       path=remote.path, copy=conflict.path)
        return out

    async def _take(self, session: SyncSession, record: FileRecord,
                    fetch_path: str | None = None) -> list[FileRecord]:
        """Make ``record`` the path's state: delete, mkdir now, or queue the content."""
        if record.deleted:
            removed = await self.share.remove_local(record.path)
            if not removed:
                # Changed locally since the scan: the edit wins, the scan will announce it.
                return []
            self.wanted.pop(record.path, None)
            return [record]
        if record.is_dir:
            await self.share.make_directory(record.path, record.mode)
            return [record]
        wanted = self.wanted.get(record.path)
        if wanted is None or wanted.record != record:
            wanted = Wanted(record, fetch_path=fetch_path)
            self.wanted[record.path] = wanted
        elif fetch_path is None and wanted.fetch_path is not None:
            # The content is now announced under its own path: ask for that instead.
            wanted.fetch_path = None
            wanted.failed.clear()
        wanted.sources.add(session.peer_id)
        for other in self.sessions.values():
            known = other.remote_index.get(wanted.remote_path)
            if known is not None and known.same_content(record):
                wanted.sources.add(other.peer_id)
        return []

    def refused(self, session: SyncSession, path: object, why: str) -> None:
        """A peer's record we do not take: listed as skipped, logged once per path and reason."""
        key = path if isinstance(path, str) else "(not a path: %s)" % repr(path)[:100]
        note = getattr(self.share, "note_refused", None)
        if note is None or note(key, why):
            shown = key if len(key) <= 200 else key[:100] + "…" + key[-100:]
            self._log.warn("not taking {path} from {peer}: {why}", path=shown,
                           peer=session.peer_id[:8], why=why)

    def relay(self, records: list[FileRecord], revision: int,
              origin: SyncSession | None) -> None:
        records = [r for r in records if not (r.deleted and r.path in self.placeholders)]
        for session in list(self.sessions.values()):
            if session is not origin:
                # Never tell a peer what it told us (it would only answer with progress).
                news = [r for r in records if session.remote_index.get(r.path) != r]
                session.push_changes(news, [], revision)
            elif session.manifest_sent_revision is not None:
                # The origin already holds these records: nothing to send it.
                session.manifest_sent_revision = max(session.manifest_sent_revision, revision)

    # -- downloads ---------------------------------------------------------------

    def pump(self) -> None:
        """Hand wanted files to sessions with room in their request window."""
        if self.paused or not self.sessions or getattr(self.share, "error", None):
            return
        if len(self.finishing) >= MAX_FINISHING:
            return  # the disk is behind: no more downloads until some are installed
        # Walk ``wanted`` in order (the manifest's path order, so one directory's
        # files come together) and stop once every window is full: called after
        # every finished file, this must not cost O(wanted).  (While files wait for the
        # disk, those skipped are walked too: a cost only while the disk refuses.)
        now = self.clock.seconds()
        disk = self.disk if self.disk else None
        if disk is not None:
            blocked = disk.blocked_until(now)
            if blocked is not None:  # the file system failed as a whole: wait, then probe
                self._retry_at(blocked, now)
                return
        open_sessions = {p: s for p, s in self.sessions.items() if s.has_room()}
        starts: list[tuple[SyncSession, Wanted]] = []
        next_retry: float | None = None
        for path, wanted in self.wanted.items():
            if not open_sessions:
                break
            if path in self.in_flight or path in self.finishing:
                continue
            if disk is not None:
                fits, retry_at = disk.may_fetch(path, wanted.record.size or 0, now)
                if not fits:
                    if retry_at is not None:
                        next_retry = retry_at if next_retry is None else min(next_retry, retry_at)
                    continue
            candidates = []
            for peer_id in wanted.sources:
                session = open_sessions.get(peer_id)
                if session is None:
                    continue
                failed_at = wanted.failed.get(peer_id)
                if failed_at is not None and now - failed_at < RETRY_AFTER:
                    retry_at = failed_at + RETRY_AFTER
                    next_retry = retry_at if next_retry is None else min(next_retry, retry_at)
                    continue
                candidates.append(session)
            if not candidates:
                continue
            session = candidates[0] if len(candidates) == 1 else self.rng.choice(candidates)
            self.in_flight[path] = session
            if not session.has_room():
                del open_sessions[session.peer_id]
            starts.append((session, wanted))
            if disk is not None:
                disk.reserve(wanted.record.size or 0)
                if disk.share_wide is not None:
                    break  # one file probes the file system that failed
        if starts:
            self._look_ahead(starts, now)
        for session, wanted in starts:  # may change ``wanted``: not while iterating it
            Deferred.fromCoroutine(self._start_download(session, wanted)).addErrback(
                self._download_crashed, wanted.record.path, session.peer_id)
        if next_retry is not None:
            self._retry_at(next_retry, now)

    def _retry_at(self, when: float, now: float) -> None:
        """Pump again at ``when`` (or earlier, if a retry is already planned before it)."""
        call = self._retry_call
        if call is not None and call.active() and call.getTime() <= when:
            return
        if call is not None and call.active():
            call.cancel()
        self._retry_call = self.clock.callLater(max(0.0, when - now), self._retry)

    def _retry(self) -> None:
        self._retry_call = None
        self.pump()

    # -- local disk errors (clearskies.diskerrors) ---------------------------------

    def _disk_failed(self, session: SyncSession | None, receiver: FileReceiver,
                     error: OSError) -> None:
        """Writing a download failed here: note it, free its space if space is short, retry later.

        A local problem is never the peer's fault: the connection stays, the
        file waits (see clearskies.diskerrors), and the share's status says why.
        """
        record = receiver.expected
        try:
            receiver.abort(keep_partial=not diskerrors.frees_space(error))
        except RuntimeError:
            pass  # its file work is still running; what it leaves is resumed or replaced
        if not diskerrors.is_disk_error(error):
            # Not something the user fixes on the disk (a directory where the file
            # goes, the share folder gone): ask this peer again after RETRY_AFTER.
            wanted = self.wanted.get(record.path)
            if wanted is not None and session is not None:
                wanted.failed[session.peer_id] = self.clock.seconds()
            self._log.warn("could not write {path}: {why}; trying again later",
                           path=record.path, why=error.strerror or str(error))
            check_root = getattr(self.share, "check_root", None)
            if check_root is not None and error.errno == errno.ENOENT:
                check_root()
            return
        now = self.clock.seconds()
        problem = self.disk.failed(record.path, str(receiver.local_path), record.size or 0,
                                   error.errno, now)
        # Once as a warning; later attempts of the same file quietly (no traceback: not a bug).
        log = self._log.warn if problem.tries == 1 else self._log.info
        log("{message} (attempt {tries}, next in {delay:.0f} s)",
            message=diskerrors.advice(error.errno, str(receiver.local_path), str(self.share.root)),
            tries=problem.tries, delay=problem.retry_at - now)
        if error.errno in diskerrors.SPACE_ERRNOS:
            self._watch_space(0.0)

    def _disk_succeeded(self, path: str) -> None:
        if self.disk:
            was = self.disk.share_wide
            self.disk.succeeded(path)
            if was is not None:
                self._log.info("writing to {root} works again; downloads resume",
                               root=str(self.share.root))

    def _watch_space(self, delay: float = SPACE_CHECK) -> None:
        if self._space_call is None and self.disk.waits_for_space:
            self._space_call = self.clock.callLater(delay, self._measure_space)

    def _measure_space(self) -> None:
        """While files wait for room: how much is free, minus what downloads under way take."""
        self._space_call = None
        self.disk.status(self.wanted)  # forget files no longer wanted
        if not self.disk.waits_for_space:
            self.pump()
            return

        def measured(free: int) -> None:
            busy = sum(self.wanted[p].record.size or 0
                       for p in itertools.chain(self.in_flight, self.finishing)
                       if p in self.wanted)
            self.disk.measured(free - busy)
            self.pump()

        def failed(failure: Failure) -> None:
            self._log.info("cannot measure free space in {root}: {why}",
                           root=str(self.share.root), why=failure.getErrorMessage())

        d = self.share.runner.run(free_bytes, str(self.share.root))
        d.addCallbacks(measured, failed)
        d.addBoth(lambda _: self._watch_space())

    def disk_status(self) -> dict[str, Any]:
        """Status fields for downloads the disk refused: ``problem``, ``disk_errors``, or none."""
        return self.disk.status(self.wanted) if self.disk else {}

    def _look_ahead(self, starts: list[tuple[SyncSession, Wanted]], now: float) -> None:
        """Ask in one query which hashes of these and the next wanted files exist locally.

        A stale "absent" only costs fetching content that appeared here
        meanwhile; a hash found present is still looked up file by file.
        """
        hashes_present = getattr(self.share, "hashes_present", None)
        if hashes_present is None or self._copy_lookup is not None:
            return

        def unknown(record: FileRecord) -> bool:
            answer = self._copy_answers.get(record.sha256) if record.size else None
            return bool(record.size) and (answer is None or now - answer[0] >= COPY_ANSWER_TTL)

        if not any(unknown(wanted.record) for _, wanted in starts):
            return
        self._copy_answers = {h: a for h, a in self._copy_answers.items()
                              if now - a[0] < COPY_ANSWER_TTL}
        hashes: dict[str, None] = {}
        for wanted in [w for _, w in starts] + list(itertools.islice(
                (w for p, w in self.wanted.items() if p not in self.finishing),
                4 * COPY_LOOKAHEAD)):
            if len(hashes) >= COPY_LOOKAHEAD:
                break
            if unknown(wanted.record):
                hashes[wanted.record.sha256] = None

        def answered(present: set[str]) -> None:
            for digest in hashes:
                self._copy_answers[digest] = (now, digest in present)

        def failed(failure: Failure) -> None:
            self._log.failure("looking up local copies failed", failure)

        def done(_: object) -> None:
            self._copy_lookup = None

        lookup = maybeDeferred(hashes_present, list(hashes))
        lookup.addCallbacks(answered, failed)
        lookup.addCallback(done)
        if not lookup.called:
            self._copy_lookup = lookup

    async def _local_copy(self, record: FileRecord) -> Path | None:
        """A local file with this content (copied instead of fetched), or None."""
        if not record.size:
            return None
        if self._copy_lookup is not None:
            await self._copy_lookup  # (fires with None: every waiter may await it)
        answer = self._copy_answers.get(record.sha256)
        if answer is not None and not answer[1] and \
                self.clock.seconds() - answer[0] < COPY_ANSWER_TTL:
            # Used once: a second file with this content may copy the first.
            del self._copy_answers[record.sha256]
            return None
        return await self.share.find_local_copy(record.sha256)

    def _buffered_seals(self) -> BufferedSeals:
        """Small downloads of this share are written and fsynced in batches."""
        if self._seals is None:
            self._seals = BufferedSeals(self.share.disk_runner)
        return self._seals

    def _download_crashed(self, failure: Failure, path: str, peer_id: str) -> None:
        self._log.failure("download of {path} failed", failure, path=path)
        self.in_flight.pop(path, None)
        wanted = self.wanted.get(path)
        if wanted is not None:
            # Asked of that peer again only after RETRY_AFTER: whatever went
            # wrong, the next pump must not run into it again at once, forever.
            wanted.failed[peer_id] = self.clock.seconds()

    async def _start_download(self, session: SyncSession, wanted: Wanted) -> None:
        record = wanted.record
        try:
            local_path = self.share.local_path(record.path)
        except UnsafePathError as e:
            self.refused(session, record.path, str(e))
            self.wanted.pop(record.path, None)
            self.in_flight.pop(record.path, None)
            if isinstance(e, PathObstacle):  # in the way since the merge: it waits
                self._unsettled(record.path, session.peer_id,
                                session.remote_index.get(record.path, record))
            now = self.clock.seconds()
            self._retry_at(now, now)  # its window slot is free: the next files go
            return
        copy = await self._local_copy(record)
        receiver = FileReceiver(self.share.root, local_path, record, runner=self.share.runner,
                                buffer_limit=SMALL_FILE, sealer=self._buffered_seals(),
                                unwritable=self.unwritable_files)
        if copy is not None:
            try:
                await receiver.copy_local(copy)
            except OSError as e:
                if diskerrors.is_disk_error(e):  # our disk refused the copy: not the source
                    self._disk_failed(None, receiver, e)
                    self.in_flight.pop(record.path, None)
                    self.pump()
                    return
                # The copy went away meanwhile (a peer's rename deletes the old
                # name while we copy from it): fetch the content instead.
                self._log.info("local copy for {path} is gone ({why}); fetching it",
                               path=record.path, why=e.strerror)
                receiver.abort(keep_partial=False)
                receiver = FileReceiver(self.share.root, local_path, record,
                                        runner=self.share.runner, buffer_limit=SMALL_FILE,
                                        sealer=self._buffered_seals(),
                                        unwritable=self.unwritable_files)
                copy = None
        if copy is not None or record.size == 0:
            # Content already here (or nothing to fetch): no network needed.
            try:
                await self.finish_download(session, receiver, record)
            finally:
                self.in_flight.pop(record.path, None)
            self.pump()
            return
        if self.in_flight.get(record.path) is not session or not session.alive:
            receiver.abort(keep_partial=True)
            self.in_flight.pop(record.path, None)
            return
        session.request(receiver, wanted.remote_path)

    async def finish_download(self, session: SyncSession, receiver: FileReceiver,
                              record: FileRecord, asked: str | None = None) -> None:
        """A payload ended: verify, put in place, record; or queue a retry.

        ``asked`` is the remote path requested: content that does not match
        because we asked under a name the content has since left (a conflict
        copy) does not hold the peer back for RETRY_AFTER.
        """
        current = self.wanted.get(record.path)
        if current is None or current.record != record:
            receiver.abort(keep_partial=False)  # superseded while we fetched it
            return
        # Verification and fsync run outside the lock, several at once; the
        # renames and the database commit are then done in batches.
        try:
            problem = await receiver.seal()
            result = (CORRUPT if problem is not None
                      else await self._install_batched(receiver, record))
        except OSError as e:
            self._disk_failed(session, receiver, e)
            return
        if result == OK:
            self._disk_succeeded(record.path)
            if self.wanted.get(record.path) is current:
                # (A newer record that arrived meanwhile, if only with a merged
                # vector, is still wanted: dropping it would leave ours stale.)
                del self.wanted[record.path]
            if not self.wanted:
                self.report_progress()
        elif result == CORRUPT:
            if asked is None or asked == current.remote_path:
                current.failed[session.peer_id] = self.clock.seconds()
            self._log.warn("{path} from {peer} did not match its hash; will fetch again",
                           path=record.path, peer=session.peer_id)

    def _install_batched(self, receiver: FileReceiver, record: FileRecord) -> Deferred[str]:
        """Queue a verified download for the next install batch; fires with its status."""
        done: Deferred[str] = Deferred()
        self._ready.append((receiver, record, done))
        if not self._installing:
            self._installing = True
            Deferred.fromCoroutine(self._install_ready()).addErrback(
                lambda f: self._log.failure("installing downloads failed", f))
        return done

    async def _install_ready(self) -> None:
        try:
            while self._ready:
                batch, self._ready = self._ready, []
                await self._lock.run(
                    lambda b=batch: Deferred.fromCoroutine(self._install_locked(b)))
        finally:
            self._installing = False

    async def _install_locked(self,
                              batch: list[tuple[FileReceiver, FileRecord, Deferred[str]]]) -> None:
        """Rename a batch into place, fsync their directories once, commit them in one go.

        The database learns of a file only after its rename is durable.
        """
        results: list[tuple[Deferred[str], str | Failure]] = []
        installed: list[Deferred[str]] = []
        records: list[FileRecord] = []
        written: dict[str, tuple[int, int, int]] = {}
        # Checks and renames are issued together so their thread hops overlap.
        unchanged_many = getattr(self.share, "unchanged_many", None)
        if unchanged_many is not None:
            try:
                answers = await unchanged_many([record.path for _, record, _ in batch],
                                               [receiver.local_path for receiver, _, _ in batch])
                checks = [(True, answers[record.path]) for _, record, _ in batch]
            except Exception:
                failure = Failure()
                checks = [(False, failure) for _ in batch]
        else:
            checks = await DeferredList(
                [maybeDeferred(self.share.is_unchanged, record.path) for _, record, _ in batch],
                consumeErrors=True)
        # A local edit the scanner recorded meanwhile drops the path from ``wanted``
        # (local_changes).  The check above compared the disk with that newer
        # record, so it passes; but the download was chosen against the older one
        # and must not replace the edit.  (The scanner's commit reaches us before
        # the check's answer: both come through the one database thread.)
        for index, (receiver, record, _) in enumerate(batch):
            wanted = self.wanted.get(record.path)
            if checks[index][0] and (wanted is None or not wanted.record.same_content(record)):
                receiver.abort(keep_partial=False)
                checks[index] = (False, SUPERSEDED)
        # All renames of the batch, and the fsync of their directories, in one worker job.
        checked = [(receiver, unchanged)
                   for (receiver, _, _), (ok, unchanged) in zip(batch, checks) if ok]
        # The share's watcher then knows the renames it is about to see are ours.
        expect = getattr(self.share, "expect_own_renames", None)
        renamed = [receiver.expected.path for receiver, unchanged in checked if unchanged]
        if expect is not None:
            expect(renamed)
        try:
            installed_now = await finish_many(self.share.disk_runner, checked)
        except Exception:
            installed_now = [Failure()] * len(checked)
        if expect is not None:
            self.share.own_renames_failed([
                receiver.expected.path for (receiver, unchanged), result
                in zip(checked, installed_now) if unchanged and isinstance(result, Failure)])
        installs = iter(installed_now)
        finishes = [next(installs) if ok else unchanged for ok, unchanged in checks]
        for (receiver, record, done), result in zip(batch, finishes):
            if result == SUPERSEDED:
                results.append((done, SUPERSEDED))
                continue
            try:
                if isinstance(result, Failure):
                    result.raiseException()
                if result.status == OK:
                    self.placeholders.discard(record.path)
                    records.append(record)
                    written[record.path] = (result.size, result.mtime_ns, result.inode)
                    installed.append(done)
                    continue
                status = await self._finish_other(receiver, record, result)
            except Exception:
                results.append((done, Failure()))
                continue
            results.append((done, status))
        if records:
            try:
                revision = await self.share.commit_remote(records, written)
            except Exception:
                failure = Failure()
                results.extend((done, failure) for done in installed)
            else:
                self.relay(records, revision, origin=None)
                results.extend((done, OK) for done in installed)
        for done, outcome in results:
            if isinstance(outcome, Failure):
                done.errback(outcome)
            else:
                done.callback(outcome)

    async def _finish_other(self, receiver: FileReceiver, record: FileRecord,
                            result: FinishResult) -> str:
        if result.status == CONFLICT:
            if await self.share.runner.run(_holds_content, self.share.local_path(record.path),
                                           record):
                # The path already holds these very bytes and mode (a download that
                # reached the disk before its record was stored): nothing to keep apart.
                done = await receiver.finish(lambda: True)
                if done.status != OK:
                    return done.status
                revision = await self.share.commit_remote(
                    [record], {record.path: (done.size, done.mtime_ns, done.inode)})
                self.placeholders.discard(record.path)
                self.relay([record], revision, origin=None)
                return OK
            # The file changed here while we fetched it: keep both, ours at the path.
            conflict = merge.conflict_record(record)
            try:
                kept = await receiver.keep_as(self.share.local_path(conflict.path))
            except FileExistsError:
                # Another file has the copy's name: fetching again would end the same
                # way.  Theirs waits and is merged again once the scanner has recorded
                # our edit (a conflict then names the copy after the content it keeps).
                receiver.abort(keep_partial=False)
                wanted = self.wanted.pop(record.path, None)
                sources = sorted(wanted.sources) if wanted is not None else []
                if sources:
                    self._unsettled(record.path, sources[0], record)
                self._log.warn("{path} changed here while downloading and {copy} is taken "
                               "by another file; deciding again after the next scan",
                               path=record.path, copy=conflict.path)
                return SUPERSEDED
            revision = await self.share.commit_remote(
                [conflict], {conflict.path: (kept.size, kept.mtime_ns, kept.inode)})
            self.relay([conflict], revision, origin=None)
            self._log.info("{path} changed here while downloading; theirs kept as {copy}",
                           path=record.path, copy=conflict.path)
            return OK
        return result.status

    def download_failed(self, session: SyncSession, path: str,
                        asked: tuple[FileRecord, str] | None = None) -> None:
        """The peer could not send ``path``; ``asked`` is the (record, remote path) requested.

        A refusal for what we no longer want in that form (a conflict copy
        first asked for under the original name, since announced under its
        own) does not hold the peer back for RETRY_AFTER.
        """
        wanted = self.wanted.get(path)
        if wanted is not None and (asked is None or asked == (wanted.record, wanted.remote_path)):
            wanted.failed[session.peer_id] = self.clock.seconds()
        if self.in_flight.get(path) is session:
            del self.in_flight[path]
        self.pump()

    def report_progress(self) -> None:
        for session in list(self.sessions.values()):
            session.send_progress()

    # -- pause -------------------------------------------------------------------

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        self.pump()

    def stop(self) -> None:
        """The share stops: no retry is left scheduled on the reactor."""
        for call in (self._unresolved_call, self._retry_call):
            if call is not None and call.active():
                call.cancel()
        self._unresolved_call = self._retry_call = None


class SyncSession:
    """One authenticated connection of a share: messages in, messages and files out."""

    _log = Logger()

    def __init__(self, sync: ShareSync, connection: Any, *, window: int | None = None) -> None:
        self.sync = sync
        self.connection = connection
        info = connection.established
        self.peer_id: str = info.their_peer_id
        self.we_initiated: bool = not info.we_are_server
        self.opener_key = _opener_key(connection, sync.share.our_peer_id, self.peer_id,
                                      self.we_initiated)
        self.supports_dirs = "directories" in (info.features or ())
        self.window = window or sync.window
        self.alive = True
        self.remote_index: dict[str, FileRecord] = {}
        self.acked: dict[str, str] = {}
        self.manifest_sent_revision: int | None = None
        self.peer_revision: Any = None
        self.pending: dict[str, FileReceiver] = {}
        self.receiving: FileReceiver | None = None
        self.receiving_path: str | None = None  # the remote path its payload was asked for
        self.sends = SendQueue(connection.transport, sync.clock, limiter=sync.upload_limiter,
                               runner=sync.share.runner)
        self.reading = SharedPause(connection.transport)  # a rate limit and slow writes pause it
        self._read_throttle = (ReadThrottle(self.reading, sync.download_limiter, sync.clock)
                               if sync.download_limiter is not None else None)
        connection.message_writer = self._write  # keep-alives queue behind payloads too
        self.peer_progress: dict[str, Any] | None = None
        self.messages_sent = 0
        self.last_sent_revision = 0  # the newest revision we sent this peer anything of
        # The peer's newest revision whose changes are all merged here (what progress
        # acknowledges); a revision that has only arrived, still queued, does not count.
        self.peer_revision_merged: Any = None
        self._asked_revision: Any = None  # the revision our get_manifest named
        self.peer_addresses: list[str] = []  # from its last clearskies.addresses
        self._addresses_sent: list[str] = []
        self._manifest_to_remember: Any = None
        self._queued_changes: list[tuple[list[FileRecord], list[tuple[str, FileRecord]], int]] = []
        self._building_manifest = False
        self._gets_queued: list[tuple[str, tuple[int, int] | None]] = []  # awaiting a lookup
        self._gets_looked_up = 0  # requests whose records are being read
        # Batches waiting to be merged: [kind, items, revision they complete, manifest
        # revision to remember once merged]; a revision counts only after its merge.
        self._inbox: list[list[Any]] = []
        self._merging = False

    # -- lifecycle ---------------------------------------------------------------

    def _send(self, body: dict[str, Any]) -> None:
        self.messages_sent += 1
        if TRACE:
            self._log.debug("sending {type} to {peer}", peer=self.peer_id[:8], type=body["type"])
        signing = self.sync.signing
        if signing is not None and body["type"] in readonly.SIGNED_TYPES \
                and signing.signs_for(self.access):
            self._write(signing.encode(body))
            return
        self._write(wire.encode(body))

    @property
    def access(self) -> str:
        return self.connection.established.access

    @property
    def _relaying(self) -> bool:
        """A read-only share passes on only the signed messages it holds."""
        return self.sync.signing is not None and self.sync.signing.read_only

    def _write(self, data: bytes) -> None:
        """Every message goes through the send queue, so none lands inside a payload."""
        try:
            self.sends.send_message(data)
        except ProtocolError as e:
            self.connection.close(str(e))

    def start(self, last_revision: Any = None) -> None:
        if not self.sync.attach(self):
            self.connection.close("duplicate connection with the same peer")
            return
        if self.sync.signing is None or self.sync.signing.requests_manifest_from(self.access):
            request: dict[str, Any] = {"type": "get_manifest"}
            if last_revision is not None:
                request["revision"] = last_revision
                self._asked_revision = last_revision
            self._send(request)
        self.send_addresses()

    def keep_over(self, newcomer: SyncSession) -> bool:
        """Of two connections with one peer, both sides keep the same one.

        The one opened by the smaller peer ID wins; between two opened by the
        same peer, the one from the lower source port.  Both ends see the same
        (opener, port) pair, so they never each close a different connection.
        """
        return self.opener_key <= newcomer.opener_key

    def connection_lost(self, reason: Any) -> None:
        self.alive = False
        for receiver in self.pending.values():
            receiver.abort(keep_partial=True)
        if self.receiving is not None:
            self.receiving.abort(keep_partial=True)
        self.pending.clear()
        self.receiving = None
        self.sends.stop()
        if self._read_throttle is not None:
            self._read_throttle.stop()
        self.sync.detach(self)

    @property
    def in_sync(self) -> bool:
        """The peer has our latest revision (and, if it reports progress, all its content)."""
        if self._relaying:
            # We change nothing; the peer's revisions are the read_write peer's own.
            return self.peer_progress is None or self.peer_progress["items"] == 0
        revision = self.sync.share.revision()
        if (self.manifest_sent_revision is None or self.manifest_sent_revision < revision
                or self._queued_changes):
            return False
        if "progress" not in (self.connection.established.features or ()):
            return True
        # Revisions made of what this peer sent us were never sent back: only what
        # we did send needs acknowledging.
        progress = self.peer_progress
        return progress is not None and progress["revision"] >= self.last_sent_revision \
            and progress["items"] == 0

    # -- wire events ---------------------------------------------------------------

    def event_received(self, event: wire.Event) -> None:
        problem = getattr(self.sync.share, "error", None)
        if problem:
            # An unmounted disk must not be refilled (or emptied) from the network.
            self.connection.close("share is in error: %s" % problem)
            return
        if isinstance(event, wire.PayloadChunk):
            if self.receiving is None:
                raise ProtocolError("payload data outside a file_data message")
            self.receiving.write(event.data)
            self.sync.bytes_received += len(event.data)
            if self._read_throttle is not None:
                self._read_throttle.received(len(event.data))
            return
        if isinstance(event, wire.PayloadEnd):
            if self.receiving is None:
                raise ProtocolError("payload end outside a file_data message")
            receiver, self.receiving = self.receiving, None
            self._finish(receiver)
            return
        if TRACE:
            self._log.debug("{peer} sent {type}", peer=self.peer_id[:8], type=event.type)
        handler = getattr(self, "_on_" + event.type.replace(".", "_"), None)
        if event.has_payload and event.type != "file_data":
            raise ProtocolError("unexpected payload on a %r message" % event.type)
        if (handler is not None and event.type in readonly.SIGNED_TYPES
                and self.sync.signing is not None
                and not self.sync.signing.admit(self, event, self.access)):
            return
        if handler is not None:
            handler(event.body, event)

    def _on_get_manifest(self, body: dict, event: wire.Message) -> None:
        seen = body.get("revision", body.get("version"))
        if seen is not None and (isinstance(seen, bool) or not isinstance(seen, (int, float))):
            raise ProtocolError("get_manifest revision must be a number")
        if self._relaying:
            if not self._building_manifest:
                self._building_manifest = True
                self.sync.share.manifest().addCallback(self._send_signed).addErrback(
                    self._fail, "relaying signed manifests")
            return
        current = self.sync.share.revision()
        if seen == current and self.manifest_sent_revision is None:
            self.manifest_sent_revision = current
            self.last_sent_revision = max(self.last_sent_revision, current)
            self._send({"type": "manifest_current"})
            self._flush_queued()
            return
        if self._building_manifest:
            return
        self._building_manifest = True
        self.sync.share.manifest().addCallback(self._send_manifest).addErrback(
            self._fail, "building the manifest")

    def _send_manifest(self, result: tuple[int, list[FileRecord]]) -> None:
        self._building_manifest = False
        if not self.alive:
            return
        revision, records = result
        files = [r.to_wire() for r in records if self._shareable(r)]
        paged = "manifest_pages" in (self.connection.established.features or ())
        step = MANIFEST_PAGE if paged else max(1, len(files))
        for page, start in enumerate(range(0, max(1, len(files)), step)):
            body: dict[str, Any] = {
                "type": "manifest", "peer": self.sync.share.our_peer_id,
                "revision": revision, "version": revision, "files": files[start:start + step],
            }
            if paged:
                body["page"] = page  # extension manifest_pages: which page, from 0
            if start + step < len(files):
                body["more"] = True  # extension manifest_pages: more pages follow
            self._send(body)
        self.manifest_sent_revision = revision
        self.last_sent_revision = max(self.last_sent_revision, revision)
        self._flush_queued()

    def _send_signed(self, result: tuple[int, list[FileRecord]]) -> None:
        self._building_manifest = False
        if self.alive and self.sync.signing is not None:
            revision, records = result
            self.sync.signing.serve(self, records, revision)
            self.manifest_sent_revision = revision

    def _on_manifest_current(self, body: dict, event: wire.Message) -> None:
        # We hold that revision completely (it was remembered only once its content
        # was all here), and this connection must hear so: the peer's view of us
        # starts afresh with each connection.
        revision = self._asked_revision
        if isinstance(revision, int) and not isinstance(revision, bool) and (
                not isinstance(self.peer_revision_merged, int)
                or revision > self.peer_revision_merged):
            self.peer_revision_merged = revision
        self.send_progress()

    def _on_read_only_manifest_manifest(self, body: dict, event: wire.Message) -> None:
        """Extension: a read-only peer's signed manifests and which of their files it holds."""
        if self.sync.signing is None:
            return
        records = self.sync.signing.admit_read_only_manifest(self, body, self.access)
        if records:
            self._receive(sorted(records, key=lambda r: r.path))

    def _on_manifest(self, body: dict, event: wire.Message) -> None:
        files = body.get("files")
        if not isinstance(files, list):
            raise ProtocolError("manifest without a files list")
        revision = body.get("revision", body.get("version"))
        if revision is not None and not _is_revision(revision):
            raise ProtocolError("manifest revision must be a number from 0 to 2**63-1")
        records: dict[str, FileRecord] = {}
        refused = 0
        for entry in files:
            if not isinstance(entry, dict):
                raise ProtocolError("a manifest entry is not a record object")
            record = self._record(entry)
            if record is None:
                refused += 1
                if refused > MAX_REFUSED_RECORDS:
                    # A peer that sends this much junk is broken or hostile; taking
                    # the rest one by one would only spend the reactor on it.
                    raise ProtocolError("more than %d invalid records in one manifest"
                                        % MAX_REFUSED_RECORDS)
                continue
            previous = records.get(record.path)
            records[record.path] = record if previous is None else merge.winner(previous, record)
        self.peer_revision = revision
        last_page = body.get("more") is not True
        for record in records.values():
            if not record.deleted and record.sha256:
                self.acked[record.path] = record.sha256
        # A paged manifest's revision is complete only with its last page; it is
        # remembered (send_progress) only once its content is all here: a restart
        # before then must ask for the whole manifest again, not "anything new?".
        self._enqueue("records", sorted(records.values(), key=lambda r: r.path),
                      revision if last_page else None, revision if last_page else None)

    def _on_update(self, body: dict, event: wire.Message) -> None:
        record = self._record(body.get("file"))
        self._enqueue("records", [record] if record is not None else [],
                      self._completes(body))

    def _record(self, entry: object) -> FileRecord | None:
        """A peer's file record, or None if a value in it is malformed or out of range.

        Only that record is refused (listed and logged once); the rest of the
        message, and the connection, go on.  A path that tries to leave the
        share is an attack, not a slip: it still closes the connection.
        """
        try:
            return FileRecord.from_wire(entry)
        except UnsafePathError:
            raise
        except ProtocolError as e:
            self.sync.refused(self, entry.get("path") if isinstance(entry, dict) else None,
                              str(e))
            return None

    def _on_move(self, body: dict, event: wire.Message) -> None:
        source = validate_wire_path(body.get("source"))
        destination = self._record(body.get("destination"))
        self._enqueue("moves", [(source, destination)] if destination is not None else [],
                      self._completes(body))

    def _completes(self, body: dict) -> Any:
        """The peer's revision whose changes have all arrived with this update or move.

        With ``revision_batches`` every message of a revision but its last says
        ``"more": true``: until the last, only the revisions before it are whole.
        """
        revision = body.get("revision")
        if not isinstance(revision, int) or isinstance(revision, bool):
            return None
        if body.get("more") is True and self._batches_marked:
            return revision - 1
        return revision

    @property
    def _batches_marked(self) -> bool:
        return "revision_batches" in (self.connection.established.features or ())

    def _receive(self, records: list[FileRecord]) -> None:
        self._enqueue("records", records)

    def merge_again(self, records: list[FileRecord]) -> None:
        """Records of this peer whose merge could not be carried out: merge them again."""
        self._receive(records)

    def _enqueue(self, kind: str, items: list[Any], revision: Any = None,
                 manifest_revision: Any = None) -> None:
        """Merge what arrives in order; what arrives during a merge waits and goes in one batch.

        A burst of 1,000 updates (a deleted directory) or moves (a renamed one)
        is thus applied in a few large batches: one database round trip and one
        disk job each, instead of a thousand.  ``revision`` is the peer's
        revision the items complete: it is acknowledged only once they are merged.
        """
        if not (isinstance(revision, int) and not isinstance(revision, bool)):
            revision = None
        if self._inbox and self._inbox[-1][0] == kind:
            batch = self._inbox[-1]
            batch[1].extend(items)
        else:
            batch = [kind, list(items), None, None]
            self._inbox.append(batch)
        if revision is not None and (batch[2] is None or revision > batch[2]):
            batch[2] = revision
        if manifest_revision is not None:
            batch[3] = manifest_revision
        if not self._merging:
            self._merge_inbox()

    @property
    def merging(self) -> bool:
        """Records from this peer are still waiting to be merged, or being merged."""
        return self._merging or bool(self._inbox)

    def _merge_inbox(self) -> None:
        if not self._inbox or not self.alive:
            return
        recorded = getattr(self.sync.share, "local_files_recorded", None)
        waiting = recorded() if recorded is not None else None
        if waiting is not None:
            # A share just attached with --merge: its folder's files are recorded
            # (dated before the share) first, so the share's records meet them.
            self._merging = True

            def resume(_: object) -> None:
                self._merging = False
                self._merge_inbox()
            waiting.addBoth(resume)
            return
        kind, items, revision, manifest_revision = self._inbox.pop(0)
        self._merging = True
        if kind == "moves":
            d = self.sync.receive_moves(self, items)
        else:
            d = self.sync.receive_records(self, items)

        def merged(_: object) -> None:
            # Changes go out in revision order, so all up to ``revision`` are merged now.
            if revision is not None and (not isinstance(self.peer_revision_merged, int)
                                         or revision > self.peer_revision_merged):
                self.peer_revision_merged = revision
            if manifest_revision is not None:
                self._manifest_to_remember = manifest_revision
            self._merging = False
            self.send_progress()

        d.addCallback(merged)
        d.addErrback(self._fail, "merging records")

        def next_batch(_: object) -> None:
            self._merging = False
            self._merge_inbox()

        d.addBoth(next_batch)

    def _on_get(self, body: dict, event: wire.Message) -> None:
        path = validate_wire_path(body.get("path"))
        requested_range = _parse_range(body.get("range"))
        waiting = self.sends.waiting_files + len(self._gets_queued) + self._gets_looked_up
        if waiting >= MAX_WAITING_GETS:
            raise ProtocolError("more than %d file requests waiting" % MAX_WAITING_GETS)
        self._gets_queued.append((path, requested_range))
        if not self._gets_looked_up:
            self._look_up_gets()

    def _look_up_gets(self) -> None:
        """Read the records of all queued requests in one database call, then serve them.

        Requests arriving meanwhile wait for the next call, so a burst of
        small files costs a few database hops, not one per file.  The
        database answers in order: files are still sent in request order.
        """
        batch, self._gets_queued = self._gets_queued, []
        self._gets_looked_up = len(batch)
        Deferred.fromCoroutine(self._serve_batch(batch)).addErrback(
            self._fail, "serving requested files")

    async def _serve_batch(self, batch: list[tuple[str, tuple[int, int] | None]]) -> None:
        try:
            records = await self._records_of(sorted({path for path, _ in batch}))
        finally:
            self._gets_looked_up = 0
        if not self.alive:
            return
        for path, requested_range in batch:
            try:
                self._serve(path, requested_range, records.get(path))
            except ProtocolError:
                raise
            except Exception:
                self._log_failure(Failure(), "serving " + path)
                self._send(get_error_message(path, "cannot read the file here"))
        if self._gets_queued:
            self._look_up_gets()

    async def _records_of(self, paths: list[str]) -> dict[str, FileRecord]:
        get_many = getattr(self.sync.share, "get_records", None)
        if get_many is not None:
            return await get_many(paths)
        found = {}
        for path in paths:
            record = await self.sync.share.get_record(path)
            if record is not None:
                found[path] = record
        return found

    def _serve(self, path: str, requested_range: tuple[int, int] | None,
               record: FileRecord | None) -> None:
        if (record is None or record.deleted or record.is_dir or record.size is None
                or self.sync.share.is_ignored(path) or self.sync.paused):
            why = "paused" if self.sync.paused else "no such file in this share"
            self._send(get_error_message(path, why))
            return
        local = self.sync.share.local_path(path)
        self.sends.send_file(path, local, expected_size=record.size,
                             request_range=requested_range, on_sent=self._sent_bytes)

    def _sent_bytes(self, count: int) -> None:
        self.sync.bytes_sent += count

    def _on_file_data(self, body: dict, event: wire.Message) -> None:
        if not event.has_payload:
            raise ProtocolError("file_data without a payload")
        path = validate_wire_path(body.get("path"))
        receiver = self.pending.pop(path, None)
        if receiver is None:
            raise ProtocolError("file_data for %r, which we did not ask for" % path)
        data_range = _parse_range(body.get("range"))
        start = data_range[0] if data_range else 0
        if start != receiver.offset:
            receiver.abort(keep_partial=False)
            raise ProtocolError("file_data for %r starts at %d, we asked for %d"
                                % (path, start, receiver.offset))
        receiver.producer = self.reading
        self.receiving = receiver
        self.receiving_path = path

    def send_addresses(self) -> None:
        """Extension ``addresses``: tell the peer where else it can reach us.

        Sent at the start and again when the list changes (Tor became ready);
        nothing goes to peers that did not negotiate the feature, and an empty
        list is not sent.
        """
        if "addresses" not in (self.connection.established.features or ()):
            return
        source = self.sync.advertised_addresses
        addresses = list(dict.fromkeys(source()))[:MAX_ADDRESSES] if source else []
        if not addresses or addresses == self._addresses_sent:
            return
        self._addresses_sent = addresses
        self._send({"type": "clearskies.addresses", "addresses": addresses})

    def _on_clearskies_addresses(self, body: dict, event: wire.Message) -> None:
        """Extension: the peer's addresses; unknown transports and bad entries are skipped."""
        entries = body.get("addresses")
        if not isinstance(entries, list) or len(entries) > MAX_ADDRESSES:
            raise ProtocolError("clearskies.addresses needs a list of at most %d addresses"
                                % (MAX_ADDRESSES,))
        found: list[str] = []
        for entry in entries:
            try:
                address = str(parse_address(entry))
            except UnsupportedProtocolError:
                continue
            except ValueError as e:
                self._log.info("{peer} advertised a bad address: {why}",
                               peer=self.peer_id[:8], why=str(e))
                continue
            if address not in found:
                found.append(address)
        self.peer_addresses = found
        if found and self.sync.addresses_received is not None:
            self.sync.addresses_received(self.peer_id, found)

    def _on_clearskies_progress(self, body: dict, event: wire.Message) -> None:
        """Extension: how far the peer has got with our changes (for status and wait)."""
        revision = body.get("revision")
        items = body.get("items")
        if (isinstance(revision, bool) or not isinstance(revision, int)
                or isinstance(items, bool) or not isinstance(items, int)):
            raise ProtocolError("clearskies.progress needs integer revision and items")
        size = body.get("bytes", 0)
        self.peer_progress = {"revision": revision, "items": items,
                              "bytes": size if isinstance(size, int) else 0}

    def send_progress(self) -> None:
        """Tell the peer which of its revisions we hold completely (extension message).

        Only once every change up to that revision is carried out: merged,
        renamed or deleted on disk, downloaded, and no conflict left to settle.
        Until then nothing is sent; the acknowledgement that was last sent stands.
        """
        if not self.sync.settled:
            return
        if self._manifest_to_remember is not None:
            self.sync.share.peer_manifest_seen(self.peer_id, self._manifest_to_remember)
            self._manifest_to_remember = None
        if "progress" not in (self.connection.established.features or ()):
            return
        if not isinstance(self.peer_revision_merged, int):
            return
        self._send({"type": "clearskies.progress", "revision": self.peer_revision_merged,
                    "items": self.sync.items_to_download,
                    "bytes": self.sync.bytes_to_download})

    def _on_get_error(self, body: dict, event: wire.Message) -> None:
        path = validate_wire_path(body.get("path"))
        receiver = self.pending.pop(path, None)
        if receiver is None:
            return
        receiver.abort(keep_partial=True)
        self._log.info("{peer} cannot send {path}: {message}", peer=self.peer_id, path=path,
                       message=str(body.get("message", ""))[:200])
        self.sync.download_failed(self, receiver.expected.path, (receiver.expected, path))

    # -- requests ------------------------------------------------------------------

    def has_room(self) -> bool:
        in_flight = sum(1 for s in self.sync.in_flight.values() if s is self)
        return self.alive and in_flight < self.window

    def request(self, receiver: FileReceiver, remote_path: str) -> None:
        record = receiver.expected
        if remote_path in self.pending:
            # Already asking this peer for that path (for another target): later.
            receiver.abort(keep_partial=True)
            if self.sync.in_flight.get(record.path) is self:
                del self.sync.in_flight[record.path]
            return
        self.pending[remote_path] = receiver
        message: dict[str, Any] = {"type": "get", "path": remote_path}
        if receiver.offset:
            message["range"] = [receiver.offset, record.size - receiver.offset]
        if TRACE:
            self._log.debug("asking {peer} for {path} from byte {offset}",
                            peer=self.peer_id[:8], path=remote_path, offset=receiver.offset)
        self._send(message)

    def _finish(self, receiver: FileReceiver) -> None:
        record = receiver.expected
        sync = self.sync
        if sync.in_flight.get(record.path) is self:
            del sync.in_flight[record.path]
            sync.finishing[record.path] = self
            sync.pump()  # the window has room again while this file is installed

        def done(_: object) -> None:
            if sync.finishing.get(record.path) is self:
                del sync.finishing[record.path]
            if sync.in_flight.get(record.path) is self:
                del sync.in_flight[record.path]
            sync.pump()

        d = Deferred.fromCoroutine(
            self.sync.finish_download(self, receiver, record, asked=self.receiving_path))
        d.addErrback(self._log_failure, "finishing " + record.path)
        d.addBoth(done)

    # -- pushing our changes ---------------------------------------------------------

    def push_changes(self, records: list[FileRecord], moves: list[tuple[str, FileRecord]],
                     revision: int, force: bool = False) -> None:
        """Send changes at ``revision`` unless the peer has them (``force``: send anyway)."""
        if not self.alive:
            return
        if self._relaying:
            if self.manifest_sent_revision is not None and self.sync.signing is not None:
                self.sync.signing.relay(self, records, self.sync.share.manifest)
                self.manifest_sent_revision = max(self.manifest_sent_revision, revision)
            return
        if self.manifest_sent_revision is None:
            self._queued_changes.append((records, moves, revision))
            return
        if revision <= self.manifest_sent_revision and not force:
            return
        moved_to = {dest.path: source for source, dest in moves}
        moved_from = set(moved_to.values())
        out: list[dict[str, Any]] = []
        for record in records:
            if not self._shareable(record):
                continue
            if record.deleted and record.path in moved_from:
                continue  # carried by the move message
            if record.path in moved_to:
                out.append({
                    "type": "move", "revision": revision, "source": moved_to[record.path],
                    "destination": record.to_wire()})
                if self._reference_peer():
                    # Peers without move support still need the deletion.
                    out.append({
                        "type": "update", "revision": revision,
                        "file": FileRecord(path=moved_to[record.path], utime=record.utime,
                                           deleted=True, vv=dict(record.vv)).to_wire()})
                continue
            out.append({"type": "update", "revision": revision, "file": record.to_wire()})
        if self._batches_marked:
            # Extension revision_batches: the peer knows when it holds all of a revision.
            for body in out[:-1]:
                body["more"] = True
        for body in out:
            self._send(body)
        self.manifest_sent_revision = max(self.manifest_sent_revision, revision)
        if out:
            self.last_sent_revision = max(self.last_sent_revision, revision)

    def _flush_queued(self) -> None:
        queued, self._queued_changes = self._queued_changes, []
        for records, moves, revision in queued:
            self.push_changes(records, moves, revision)

    def _reference_peer(self) -> bool:
        return "vv" not in (self.connection.established.features or ())

    def _shareable(self, record: FileRecord) -> bool:
        return self.supports_dirs or not record.is_dir

    # -- acknowledgement (for peers without version vectors) ---------------------------

    def acknowledge(self, record: FileRecord) -> None:
        if record.sha256:
            self.acked[record.path] = record.sha256

    def local_unacked(self, local: FileRecord | None) -> bool:
        """Our version of a path has changes this peer has not confirmed holding."""
        if local is None or local.deleted or local.is_dir:
            return False
        if local.vv.get(self.sync.share.our_peer_id, 0) == 0:
            return False
        return self.acked.get(local.path) != local.sha256

    # -- errors -------------------------------------------------------------------------

    def _fail(self, failure: Failure, doing: str) -> None:
        if failure.check(ProtocolError):
            self._log.warn("closing connection to {peer}: {why}", peer=self.peer_id,
                           why=failure.getErrorMessage())
            self.connection.close(failure.getErrorMessage())
            return
        self._log_failure(failure, doing)

    def _log_failure(self, failure: Failure, doing: str) -> None:
        self._log.failure("error while {doing} with {peer}", failure, doing=doing,
                          peer=self.peer_id)


def _is_revision(value: object) -> bool:
    """A peer's revision: an integer, or the reference peer's float "version", in range."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and 0 <= value <= MAX_SIZE)


def free_bytes(root: str) -> int:
    """Bytes an unprivileged writer may still use on the file system of ``root`` (worker thread)."""
    st = os.statvfs(root)
    return st.f_bavail * st.f_frsize


def _opener_key(connection: Any, our_peer_id: str, their_peer_id: str,
                we_opened: bool) -> tuple[str, int]:
    """(peer ID of the side that opened the TCP connection, its source port)."""
    transport = connection.transport
    try:
        address = transport.getHost() if we_opened else transport.getPeer()
        port = int(getattr(address, "port", 0) or 0)
    except Exception:
        port = 0
    return (our_peer_id if we_opened else their_peer_id, port)


def _parse_range(value: object) -> tuple[int, int] | None:
    if value is None:
        return None
    if (not isinstance(value, list) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < MAX_RANGE
                       for v in value)):
        raise ProtocolError("range must be [start, length] of non-negative integers")
    return (value[0], value[1])


__all__ = ["ShareSync", "SyncSession", "LocalShare", "Wanted", "get_error_message"]


def _has_ancestor_in(path: str, folders: set[str]) -> bool:
    """True when a folder strictly above ``path`` is one of ``folders``."""
    cut = path.rfind("/")
    while cut > 0:
        path = path[:cut]
        if path in folders:
            return True
        cut = path.rfind("/")
    return False
