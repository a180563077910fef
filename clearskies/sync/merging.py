"""Carrying out what peers announce: merge decisions on records and moves (protocol/merge.md).

:class:`RecordMerger` takes the records and moves one peer sent, asks
``clearskies.share.merge`` what to do with each against our own record, and
does it: deletions and folders at once, content by adding it to the wanted
files, renames when we hold the very content, conflict copies when both
sides changed.  Merges run one at a time (one lock per share), so two peers
never race on one path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from twisted.internet.defer import Deferred, DeferredLock, succeed
from twisted.logger import Logger

from clearskies.errors import PathObstacle, UnsafePathError
from clearskies.interfaces import ILocalShare, ISyncSession
from clearskies.share import merge
from clearskies.share.records import FileRecord
from clearskies.sync.announced import Known, announced_by, answers
from clearskies.sync.limits import TRACE
from clearskies.sync.unresolved import UnresolvedRecords
from clearskies.sync.wanted import WantedFiles

Relay = Callable[[list[FileRecord], int, "ISyncSession | None", Known], None]
"""Pass records just committed (at a revision) on to every peer but the one named,
with what the others announced of them (``announced_by``, looked up before the commit)."""


class RecordMerger:
    """Merges one share's incoming records and moves, one batch at a time."""

    _log = Logger()

    def __init__(self, share: ILocalShare, wanted: WantedFiles,
                 sessions: dict[str, ISyncSession], unresolved: UnresolvedRecords,
                 lock: DeferredLock, relay: Relay, pump: Callable[[], None],
                 report: Callable[..., None] | None = None) -> None:
        self.share = share
        self.wanted = wanted
        self.sessions = sessions
        self.unresolved = unresolved
        self._lock = lock
        self._relay = relay
        self._pump = pump
        self._report = report or (lambda kind, **fields: None)  # conflicts, deletions
        # Folders deleted remotely whose contents have yet to go: path -> the deletion.
        self.pending_rmdirs: dict[str, FileRecord] = {}
        # Paths emptied here for a conflict copy until theirs arrives: told to nobody.
        self.placeholders: set[str] = set()
        # What the other sessions announced of the batch being merged (one query
        # each per batch), for the other sources of wanted files; see _take.
        self._elsewhere: Known = {}
        self._elsewhere_paths: set[str] = set()
        # Our folders a peer's file replaces, waiting for their contents' deletions.
        self.emptying: set[str] = set()

    def receive_records(self, session: ISyncSession, records: list[FileRecord]) -> Deferred[None]:
        """Merge what a peer announced; serialised so two peers cannot race on one path."""
        return self._lock.run(lambda: Deferred.fromCoroutine(self._merge(session, records)))

    async def _merge(self, session: ISyncSession, records: list[FileRecord]) -> None:
        # One database round trip for the batch (a manifest page): our records of these
        # paths, what the other peers announced of them.  What this peer announced is
        # remembered meanwhile (the database thread answers in order: later queries see it).
        unread = {r.path for r in records} if len(records) > 1 else set()
        taken = [r for r in records if not self.share.is_ignored(r.path)]
        self._elsewhere_paths = {r.path for r in taken}
        reads = Deferred.fromCoroutine(answers(
            self.share.get_records(sorted(unread)) if unread else succeed({}),
            Deferred.fromCoroutine(announced_by(
                [s for s in self.sessions.values() if s.peer_id != session.peer_id],
                sorted(self._elsewhere_paths)))))
        remembered = session.remote_index.put(taken)
        try:
            prefetched, self._elsewhere = await reads
            await self._merge_taken(session, taken, unread, prefetched)
        finally:
            await remembered

    async def _merge_taken(self, session: ISyncSession, taken: list[FileRecord],
                           unread: set[str], prefetched: dict[str, FileRecord]) -> None:
        committed: list[FileRecord] = []
        for_origin: list[FileRecord] = []
        removals: list[FileRecord] = []
        superseded: list[FileRecord] = []  # our record each removal was decided against
        replaced: list[tuple[FileRecord, FileRecord, FileRecord]] = []  # folders made files
        for remote in taken:
            self.unresolved.settle(remote.path)  # decided anew below
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
            if (decision.action == merge.ACCEPT
                    and decision.record.deleted and local is not None
                    and not local.deleted and not local.is_dir):
                removals.append(decision.record)  # deleted together after the loop
                superseded.append(local)
                continue
            if (decision.action == merge.ACCEPT and local is not None and local.is_dir
                    and not local.deleted and not decision.record.deleted
                    and not decision.record.is_dir):
                # A folder replaced by a file: its contents' deletions come in this
                # batch and go after the loop; the folder after them.
                replaced.append((remote, local, decision.record))
                continue
            try:
                applied = await self._apply(session, local, remote, decision)
            except UnsafePathError as e:
                # A valid path that our disk cannot take (through a symlink, a file
                # where a directory should be): refuse it, keep syncing the rest.
                self.refused(session, remote.path, str(e))
                if isinstance(e, PathObstacle):  # it may go away: the record waits
                    self.unresolved.keep(remote.path, session.peer_id, remote)
                continue
            except OSError as e:
                # The disk refused (permissions, a full disk): this record waits and
                # is tried again; the rest of the batch goes on.
                self._log.warn("could not apply {path} from {peer}: {why}; trying again later",
                               path=remote.path, peer=session.peer_id[:8],
                               why=e.strerror or str(e))
                self.unresolved.keep(remote.path, session.peer_id, remote)
                continue
            committed.extend(applied)
            # What the sender told us needs no echo; what we made of it (merged
            # vectors, conflict copies) it must hear too.
            for_origin.extend(r for r in applied if r != remote)
        if removals:
            try:
                removed = await self.share.remove_many([r.path for r in removals], superseded,
                                                       removals)
            except UnsafePathError as e:
                self._log.warn("not applying deletions from {peer}: {why}",
                               peer=session.peer_id[:8], why=str(e))
                removed = [False] * len(removals)
            for record, gone in zip(removals, removed):
                # Not removed: changed here since the scan; the edit wins and is announced.
                if gone:
                    self.wanted.discard(record.path)
                    committed.append(record)
                else:
                    self._blocked_deletion(session, record)
        for remote, local, record in replaced:
            committed.extend(await self._folder_to_file(session, remote, local, record))
        committed.extend(await self._retry_directory_deletions())
        if self.emptying and committed:
            self._retry_emptied(committed)
        if self.unresolved.waiting and committed:
            self.unresolved.retry(waiting_below_new_folders(committed, self.unresolved.waiting))
        self._elsewhere = {}
        if committed:
            known = await announced_by(self.sessions.values(), [r.path for r in committed],
                                       but=session)
            revision = await self.share.commit_remote(committed)
            self._relay(committed, revision, session, known)
            if for_origin:
                session.push_changes(
                    [r for r in for_origin if not (r.deleted and r.path in self.placeholders)],
                    [], revision, force=True)
        self._pump()

    async def _folder_to_file(self, session: ISyncSession, remote: FileRecord,
                              local: FileRecord, record: FileRecord) -> list[FileRecord]:
        """Their file takes the path of our folder (newer than it, protocol/merge.md 4.1).

        The folder goes once it is empty (its entries' deletions are records of
        their own); the path then stays empty here until the file arrives.
        A folder that still holds something waits and is decided again.
        """
        try:
            emptied = await self.share.remove_local(local.path)
        except UnsafePathError as e:
            self.refused(session, remote.path, str(e))
            emptied = False
        except OSError:
            emptied = False
        if not emptied:
            # Tried again as soon as a deletion inside it is carried out.
            self.emptying.add(local.path)
            self.unresolved.keep(remote.path, session.peer_id, remote)
            return []
        self.emptying.discard(local.path)
        self.placeholders.add(local.path)
        placeholder = FileRecord(path=local.path, utime=local.utime, deleted=True,
                                 vv=dict(local.vv))
        return [placeholder, *await self._take(session, record)]

    def _retry_emptied(self, committed: list[FileRecord]) -> None:
        """Folders waiting to be replaced by a file, in which something was just deleted."""
        self.emptying &= set(self.unresolved.waiting)
        emptied = [folder for folder in self.emptying
                   if any(r.deleted and r.path.startswith(folder + "/") for r in committed)]
        if emptied:
            self.unresolved.retry(emptied)

    def _blocked_deletion(self, session: ISyncSession, record: FileRecord) -> None:
        """A deletion not carried out: if a symlink or unreadable folder is in the
        way (not a local edit, which wins), it waits like any blocked record."""
        try:
            self.share.local_path(record.path)
        except PathObstacle as e:
            self.refused(session, record.path, str(e))
            self.unresolved.keep(record.path, session.peer_id, record)
        except UnsafePathError:
            pass

    async def _retry_directory_deletions(self) -> list[FileRecord]:
        """Directories deleted remotely go once their contents have gone (deepest first)."""
        done = []
        for path in sorted(self.pending_rmdirs, reverse=True):
            if await self.share.remove_local(path):
                done.append(self.pending_rmdirs.pop(path))
        return done

    def receive_move(self, session: ISyncSession, source: str,
                     destination: FileRecord) -> Deferred[None]:
        """A peer renamed a file: rename ours too when we hold that very content."""
        return self._lock.run(
            lambda: Deferred.fromCoroutine(self._move(session, source, destination)))

    async def _move(self, session: ISyncSession, source: str, destination: FileRecord) -> None:
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
                    await session.remote_index.put([destination, tombstone])
                    records = [decision.record, tombstone]
                    records.extend(await self._retry_directory_deletions())
                    await self._commit_and_relay(session, records)
                    return
        await self._merge(session, [destination, tombstone])

    def receive_moves(self, session: ISyncSession,
                      moves: list[tuple[str, FileRecord]]) -> Deferred[None]:
        """Apply a batch of moves: renames of content we hold go in one disk job."""
        return self._lock.run(
            lambda: Deferred.fromCoroutine(self._moves(session, moves)))

    async def _moves(self, session: ISyncSession, moves: list[tuple[str, FileRecord]]) -> None:
        if len(moves) == 1:
            for source, destination in moves:
                await self._move(session, source, destination)
            return
        known = await self.share.get_records(sorted({p for s, d in moves for p in (s, d.path)}))
        touched: set[str] = set()
        plan: list[tuple[str, FileRecord, FileRecord, FileRecord]] = []
        slow: list[tuple[str, FileRecord]] = []
        announced: list[FileRecord] = []
        for source, destination in moves:
            tombstone = FileRecord(path=source, utime=destination.utime, deleted=True,
                                   vv=dict(destination.vv))
            announced.extend((destination, tombstone))
            ours, there = known.get(source), known.get(destination.path)
            decision = None
            if not ({source, destination.path} & touched) and renamable(
                    self.share, source, destination, ours, there):
                decision = merge.merge_remote(there, destination, local_unacked=False,
                                              our_peer_id=self.share.our_peer_id)
            touched.update((source, destination.path))
            if decision is not None and decision.action == merge.ACCEPT:
                plan.append((source, destination, decision.record, tombstone))
            else:
                slow.append((source, destination))
        renaming = self.share.rename_many([(src, dest.path) for src, dest, _, _ in plan],
                                          [known[src] for src, _, _, _ in plan])
        # Remembered while the renames run, after their own query (see _merge); those
        # that go the long way below are remembered again there, which changes nothing.
        remembered = session.remote_index.put(announced)
        try:
            try:
                done = await renaming
            except UnsafePathError:
                done = [False] * len(plan)
            records: list[FileRecord] = []
            for (source, destination, record, tombstone), renamed in zip(plan, done):
                if renamed:
                    records.extend((record, tombstone))
                else:
                    slow.append((source, destination))
            if records:
                records.extend(await self._retry_directory_deletions())
                await self._commit_and_relay(session, records)
            for source, destination in slow:
                await self._move(session, source, destination)
        finally:
            await remembered

    async def _commit_and_relay(self, session: ISyncSession, records: list[FileRecord]) -> None:
        known = await announced_by(self.sessions.values(), [r.path for r in records],
                                   but=session)
        revision = await self.share.commit_remote(records)
        self._relay(records, revision, session, known)

    async def _rename_if_safe(self, source: str, destination: str, ours: FileRecord) -> bool:
        try:
            return await self.share.rename_local(source, destination, ours)
        except (UnsafePathError, OSError):
            # Handled as delete + new file, which refuses the unsafe side and
            # keeps what the disk refuses for another try.
            return False

    async def _apply(self, session: ISyncSession, local: FileRecord | None, remote: FileRecord,
                     decision: merge.MergeDecision) -> list[FileRecord]:
        """Carry out one merge decision; returns records whose disk state is already final."""
        if decision.action == merge.IGNORE:
            if (local is not None and not local.deleted and not local.is_dir
                    and remote.same_content(local)):
                session.acknowledge(local)
            return []
        if decision.action == merge.ACCEPT:
            if decision.record.deleted and local is not None and not local.deleted:
                self._report("deleted", file=local.path, peer_id=session.peer_id)
            if decision.record.deleted and local is not None and local.is_dir:
                # Its contents may still be on their way out: retried after each batch.
                self.pending_rmdirs[local.path] = decision.record
                return []
            if (decision.record.is_dir and local is not None and not local.deleted
                    and not local.is_dir):
                # A file replaced by a folder: ours goes first, unless it changed
                # here since the scan; then, decided again once the scanner has
                # recorded it, the folder keeps the path and ours becomes a
                # conflict copy (protocol/merge.md 4.2, step 3).
                if not await self._removed(local, decision):
                    await self._wait_for_scan(session, local, remote)
                    return []
            if await already_here(self.share, local, decision.record):
                self.wanted.discard(decision.record.path)
                return [decision.record]  # only the version changed: nothing to fetch
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
                    # that record): theirs just replaces ours at the path (a folder
                    # once our file, unchanged since the scan, is gone).
                    if decision.record.is_dir and not await self._removed(local, decision):
                        await self._wait_for_scan(session, local, remote)
                        return []
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
                    await self._wait_for_scan(session, local, remote)
                    self._log.warn(
                        "could not move {path} aside for a conflict copy (it changed here "
                        "since the last scan, or {copy} is taken); deciding again after "
                        "the next scan", path=local.path, copy=conflict.path)
                    return []
            out.extend(await self._take(session, decision.record))
        self._log.info("concurrent changes to {path}: kept both, copy at {copy}",
                       path=remote.path, copy=conflict.path)
        self._report("conflict", file=remote.path, copy=conflict.path, peer_id=session.peer_id,
                     size=conflict.size or 0, kept="ours" if decision.local_wins else "theirs")
        return out

    async def _removed(self, local: FileRecord, decision: merge.MergeDecision) -> bool:
        """Our file gone for the peer's folder, if unchanged since the scan (kept as a version)."""
        (removed,) = await self.share.remove_many([local.path], [local], [decision.record])
        return removed

    async def _wait_for_scan(self, session: ISyncSession, local: FileRecord,
                             remote: FileRecord) -> None:
        """Our file changed since the scan: their record waits until the scanner has it."""
        self.unresolved.keep(remote.path, session.peer_id, remote)
        if await self.share.get_record(local.path) != local:
            # The scanner has recorded the edit already: decide now.
            session.merge_again([remote])

    async def _take(self, session: ISyncSession, record: FileRecord,
                    fetch_path: str | None = None) -> list[FileRecord]:
        """Make ``record`` the path's state: delete, mkdir now, or queue the content."""
        if record.deleted:
            removed = await self.share.remove_local(record.path)
            if not removed:
                # Changed locally since the scan: the edit wins, the scan will announce it.
                return []
            self.wanted.discard(record.path)
            return [record]
        if record.is_dir:
            await self.share.make_directory(record.path, record.mode)
            return [record]
        remote_path = self.wanted.remote_path(record, fetch_path)
        also: set[str] = set()
        for other in list(self.sessions.values()):
            if other.peer_id == session.peer_id:
                continue  # a source already
            elsewhere = self._elsewhere.get(other)
            if elsewhere is None or remote_path not in self._elsewhere_paths:
                # Not looked up with the batch (attached since, or another fetch path).
                elsewhere = await other.remote_index.many([remote_path])
            known = elsewhere.get(remote_path)
            if known is not None and known.same_content(record):
                also.add(other.peer_id)
        self.wanted.want(record, session.peer_id, fetch_path, also)
        return []

    def refused(self, session: ISyncSession, path: object, why: str) -> None:
        """A peer's record we do not take: listed as skipped, logged once per path and reason."""
        key = path if isinstance(path, str) else "(not a path: %s)" % repr(path)[:100]
        if self.share.note_refused(key, why):
            shown = key if len(key) <= 200 else key[:100] + "…" + key[-100:]
            self._log.warn("not taking {path} from {peer}: {why}", path=shown,
                           peer=session.peer_id[:8], why=why)


def renamable(share: ILocalShare, source: str, destination: FileRecord,
              ours: FileRecord | None, there: FileRecord | None) -> bool:
    """A move we can carry out as a local rename of the very content it names."""
    return (not (share.is_ignored(source) or share.is_ignored(destination.path)
                 or destination.deleted or destination.is_dir)
            and ours is not None and not ours.deleted and not ours.is_dir
            and ours.sha256 == destination.sha256
            # A rename cannot carry a new mode: renamed and chmodded goes the long way.
            and destination.mode in (None, ours.mode)
            and (there is None or there.deleted)
            and merge.vv_compare(ours.vv, destination.vv) in (merge.BEFORE, merge.EQUAL))


def waiting_below_new_folders(committed: list[FileRecord], waiting: Iterable[str]) -> list[str]:
    """Records that waited because a path of theirs was a file here are merged
    again at once when that path has just become a folder (a file a peer
    replaced by a folder, decided after the records inside it came)."""
    folders = tuple(r.path + "/" for r in committed if r.is_dir and not r.deleted)
    return [path for path in waiting if path.startswith(folders)] if folders else []


async def already_here(share: ILocalShare, local: FileRecord | None,
                       record: FileRecord) -> bool:
    """True when our file already is ``record`` (bytes, mode, mtime) and unchanged on
    disk since the scan: a newer version of the same file (both sides recorded it,
    say, and merged their vectors) costs no fetch, no copy and no rename."""
    if (local is None or local.deleted or local.is_dir or record.deleted or record.is_dir
            or not record.same_content(local) or record.mode != local.mode
            or record.mtime != local.mtime):
        return False
    return await share.is_unchanged(record.path)
