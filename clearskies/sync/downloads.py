"""Downloads of one share: start, verify, install in batches, record (protocol/transfer.md).

:class:`Downloads` turns a wanted file handed to a session into a
:class:`~clearskies.transfer.receiver.FileReceiver` (filled from a local copy when
the share already holds the content, else asked of the peer), and once its
payload has arrived verifies it, puts it in place and commits its record.
Verification and fsync run several at once outside the share's merge lock;
the renames and the database commit are then done in batches under it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from clearskies import diskerrors
from clearskies.errors import PathObstacle, UnsafePathError
from clearskies.interfaces import ILocalShare, ISyncSession
from clearskies.share import merge
from clearskies.share.hashing import HashResult, hash_file
from clearskies.share.records import FileRecord
from clearskies.sync.copies import LocalCopies
from clearskies.sync.diskspace import DiskWatch
from clearskies.sync.limits import SUPERSEDED
from clearskies.sync.announced import Known, answers
from clearskies.sync.merging import Relay
from clearskies.sync.unresolved import UnresolvedRecords
from clearskies.sync.wanted import Wanted, WantedFiles
from clearskies.transfer.install import finish_many
from clearskies.transfer.receiver import (
    CONFLICT, CORRUPT, OK, SMALL_FILE, FileReceiver, FinishResult,
)
from clearskies.transfer.seals import BufferedSeals


def _holds_content(path: Path, record: FileRecord) -> bool:
    """True when the file at ``path`` has ``record``'s bytes and mode (worker thread)."""
    outcome = hash_file(str(path))
    return (isinstance(outcome, HashResult) and outcome.sha256 == record.sha256
            and outcome.size == record.size and record.mode in (None, outcome.mode))


class Downloads:
    """Fetches, verifies and installs the wanted files of one share."""

    _log = Logger()

    def __init__(self, share: ILocalShare, clock: IReactorTime, *, wanted: WantedFiles,
                 in_flight: dict[str, ISyncSession], placeholders: set[str],
                 unresolved: UnresolvedRecords, lock: DeferredLock, disk: DiskWatch,
                 copies: LocalCopies, relay: Relay, pump: Callable[[], None],
                 pump_at: Callable[[float, float], None],
                 refused: Callable[[ISyncSession, object, str], None],
                 report_progress: Callable[[], None],
                 announced: Callable[[list[FileRecord], ISyncSession | None], Deferred[Known]],
                 unwritable_files: bool = False,
                 report: Callable[..., None] | None = None) -> None:
        """``announced``: what the sessions announced of records about to be committed
        (for ``relay``, which tells no peer what it told us).  ``report``:
        ``report(kind, **fields)`` of each download finished or failed and each conflict
        copy made (ISyncEvents)."""
        self.share = share
        self.clock = clock
        self.wanted = wanted
        self.in_flight = in_flight
        self.placeholders = placeholders
        self.unresolved = unresolved
        self._lock = lock
        self.disk = disk
        self.copies = copies
        self._relay = relay
        self._pump = pump
        self._pump_at = pump_at
        self._refused = refused
        self._report_progress = report_progress
        self._announced = announced
        self._report = report or (lambda kind, **fields: None)
        # The peer each file being installed came from (for the conflict it may make).
        self._from: dict[str, str] = {}
        #: Put downloaded files in place without write permission (a read-only
        #: share's ``read_only_files`` setting).
        self.unwritable_files = unwritable_files
        self._seals: BufferedSeals | None = None
        # A big download's writer resumes its connection from its worker thread's
        # side as soon as it has taken what waited (a test's Clock has no threads).
        self._wake = clock.callFromThread if IReactorFromThreads.providedBy(clock) else None
        # Verified downloads waiting for the next install batch.
        self._ready: list[tuple[FileReceiver, FileRecord, Deferred[str]]] = []
        self._installing = False

    def _buffered_seals(self) -> BufferedSeals:
        """Small downloads of this share are written and fsynced in batches."""
        if self._seals is None:
            self._seals = BufferedSeals(self.share.files_runner)
        return self._seals

    def crashed(self, failure: Failure, path: str, peer_id: str) -> None:
        self._log.failure("download of {path} failed", failure, path=path)
        self.in_flight.pop(path, None)
        self._report("download_failed", file=path, peer_id=peer_id,
                     reason=failure.getErrorMessage()[:200])
        # Asked of that peer again only after RETRY_AFTER: whatever went
        # wrong, the next pump must not run into it again at once, forever.
        self.wanted.failed(path, peer_id, self.clock.seconds())

    def _receiver(self, local_path: Path, record: FileRecord) -> FileReceiver:
        return FileReceiver(self.share.root, local_path, record, runner=self.share.files_runner,
                            buffer_limit=SMALL_FILE, sealer=self._buffered_seals(),
                            unwritable=self.unwritable_files, wake=self._wake)

    async def start(self, session: ISyncSession, wanted: Wanted) -> None:
        record = wanted.record
        try:
            local_path = self.share.local_path(record.path)
        except UnsafePathError as e:
            self._refused(session, record.path, str(e))
            self._report("download_failed", file=record.path, peer_id=session.peer_id,
                         reason=str(e)[:200])
            self.wanted.pop(record.path, None)
            self.in_flight.pop(record.path, None)
            if isinstance(e, PathObstacle):  # in the way since the merge: it waits
                announced = await session.remote_index.many([record.path])
                self.unresolved.keep(record.path, session.peer_id,
                                     announced.get(record.path, record))
            now = self.clock.seconds()
            self._pump_at(now, now)  # its window slot is free: the next files go
            return
        copy = await self.copies.find(record)
        receiver = self._receiver(local_path, record)
        if copy is not None:
            try:
                await receiver.copy_local(copy)
            except OSError as e:
                if diskerrors.is_disk_error(e):  # our disk refused the copy: not the source
                    self.disk.failed(None, receiver, e)
                    self.in_flight.pop(record.path, None)
                    self._pump()
                    return
                # The copy went away meanwhile (a peer's rename deletes the old
                # name while we copy from it): fetch the content instead.
                self._log.info("local copy for {path} is gone ({why}); fetching it",
                               path=record.path, why=e.strerror)
                receiver.abort(keep_partial=False)
                receiver = self._receiver(local_path, record)
                copy = None
        if copy is not None or record.size == 0:
            # Content already here (or nothing to fetch): no network needed.
            try:
                await self.finish(session, receiver, record)
            finally:
                self.in_flight.pop(record.path, None)
            self._pump()
            return
        if self.in_flight.get(record.path) is not session or not session.alive:
            receiver.abort(keep_partial=True)
            self.in_flight.pop(record.path, None)
            return
        session.request(receiver, wanted.remote_path)

    async def finish(self, session: ISyncSession, receiver: FileReceiver,
                              record: FileRecord, asked: str | None = None) -> None:
        """A payload ended: verify, put in place, record; or queue a retry.

        ``asked`` is the remote path requested: content that does not match
        because we asked under a name the content has since left (a conflict
        copy) does not hold the peer back for RETRY_AFTER.
        """
        current = self.wanted.get(record.path)
        if current is None or current.record != record:
            receiver.abort(keep_partial=False)  # superseded while we fetched it
            self._report("download_failed", file=record.path, peer_id=session.peer_id,
                         reason="superseded by a newer change")
            return
        # Verification and fsync run outside the lock, several at once; the
        # renames and the database commit are then done in batches.
        self._from[record.path] = session.peer_id
        try:
            problem = await receiver.seal()
            result = (CORRUPT if problem is not None
                      else await self._install_batched(receiver, record))
        except OSError as e:
            self.disk.failed(session, receiver, e)
            self._report("download_failed", file=record.path, peer_id=session.peer_id,
                         reason=str(e)[:200])
            return
        finally:
            self._from.pop(record.path, None)
        if result == OK:
            self._report("download_finished", file=record.path, peer_id=session.peer_id,
                         size=record.size or 0)
            self.disk.succeeded(record.path)
            if self.wanted.get(record.path) is current:
                # (A newer record that arrived meanwhile, if only with a merged
                # vector, is still wanted: dropping it would leave ours stale.)
                del self.wanted[record.path]
            if not self.wanted:
                self._report_progress()
        else:
            self._report("download_failed", file=record.path, peer_id=session.peer_id,
                         reason="did not match its hash" if result == CORRUPT else str(result))
        if result == CORRUPT:
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
        # What each target should hold, as our database says: the install job
        # checks the disk against it just before each rename.
        checks: list[tuple[bool, Any]]
        ours: dict[str, FileRecord] | None = None
        known: Known = {}
        try:
            # Asked in the same trip: what the peers announced of these paths, for the
            # relay after the commit (a record one announced meanwhile is at worst
            # sent back to it once, which it ignores).
            (expected, ours), known = await answers(
                self.share.recorded_many([record.path for _, record, _ in batch]),
                self._announced([record for _, record, _ in batch], None))
            checks = [(True, expected[record.path]) for _, record, _ in batch]
        except Exception:
            failure = Failure()
            checks = [(False, failure) for _ in batch]
        # A local edit the scanner recorded meanwhile drops the path from ``wanted``
        # (local_changes).  The disk matches that newer record, so the check would
        # pass; but the download was chosen against the older one and must not
        # replace the edit.  (The scanner's commit reaches us before the query's
        # answer: both come through the one database thread.)
        for index, (receiver, record, _) in enumerate(batch):
            wanted = self.wanted.get(record.path)
            if checks[index][0] and (wanted is None or not wanted.record.same_content(record)):
                receiver.abort(keep_partial=False)
                checks[index] = (False, SUPERSEDED)
        # All checks and renames of the batch, and the fsync of their directories,
        # in one worker job.
        checked = [(receiver, on_disk)
                   for (receiver, _, _), (ok, on_disk) in zip(batch, checks) if ok]
        # The share's watcher then knows the renames it is about to see are ours.
        self.share.expect_own_renames([receiver.expected.path for receiver, _ in checked])
        keep = None
        try:
            keep = await self.share.keeper_for(  # kept versions of what gets replaced
                [receiver.expected for receiver, _ in checked], ours)
            installed_now = await finish_many(self.share.files_runner, checked, keep)
        except Exception:
            installed_now = [Failure()] * len(checked)
        finally:
            if keep is not None:
                keep.close()  # the job is over: the file describing its versions too
        self.share.own_renames_failed([
            receiver.expected.path for (receiver, _), result in zip(checked, installed_now)
            if isinstance(result, Failure) or result.status != OK])
        installs = iter(installed_now)
        finishes = [next(installs) if ok else outcome for ok, outcome in checks]
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
                self._relay(records, revision, None, known)
                results.extend((done, OK) for done in installed)
        for done, outcome in results:
            if isinstance(outcome, Failure):
                done.errback(outcome)
            else:
                done.callback(outcome)

    async def _finish_other(self, receiver: FileReceiver, record: FileRecord,
                            result: FinishResult) -> str:
        if result.status == CONFLICT:
            if await self.share.files_runner.run(_holds_content,
                                                 self.share.local_path(record.path), record):
                # The path already holds these very bytes and mode (a download that
                # reached the disk before its record was stored): nothing to keep apart.
                done = await receiver.finish(lambda: True)
                if done.status != OK:
                    return done.status
                known = await self._announced([record], None)
                revision = await self.share.commit_remote(
                    [record], {record.path: (done.size, done.mtime_ns, done.inode)})
                self.placeholders.discard(record.path)
                self._relay([record], revision, None, known)
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
                    self.unresolved.keep(record.path, sources[0], record)
                self._log.warn("{path} changed here while downloading and {copy} is taken "
                               "by another file; deciding again after the next scan",
                               path=record.path, copy=conflict.path)
                return SUPERSEDED
            known = await self._announced([conflict], None)
            revision = await self.share.commit_remote(
                [conflict], {conflict.path: (kept.size, kept.mtime_ns, kept.inode)})
            self._relay([conflict], revision, None, known)
            self._log.info("{path} changed here while downloading; theirs kept as {copy}",
                           path=record.path, copy=conflict.path)
            self._report("conflict", file=record.path, copy=conflict.path,
                         peer_id=self._from.get(record.path), size=kept.size,
                         kept="ours")
            return OK
        return result.status
