"""A share's files as the sync layer reads and changes them (the ``LocalShare`` seam).

:class:`LocalShareFiles` answers the sync layer's questions about records and
files and carries out its disk work: every file operation runs in the CPU
thread pool (the module-level functions here are those jobs), every database
call goes through the store's own thread.  A path whose record moved on since a
decision was made against it is left alone.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from clearskies import diskjobs
from clearskies.errors import UnsafePathError
from clearskies.interfaces import IRunner
from clearskies.share.database import CacheKey, StateDatabase, StoredRecord
from clearskies.share.pages import PagedStore
from clearskies.share.records import FileRecord, clamp_mtime_ns
from clearskies.share.service import ShareService
from clearskies.share.versions import KeepJob, VersionStore
from clearskies.transfer.modes import unwritable_mode
from clearskies.transfer.sigcache import SignatureCache

if TYPE_CHECKING:
    from clearskies.daemon.versions import ShareVersions

Keep = Callable[[str, str, FileRecord], None]
"""A job keeping a file as a version: (local path, share path, our record)."""


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


def _remove(path: str, stored: StoredRecord | None, keep: Keep | None = None) -> bool:
    """Delete the file or empty folder at ``path`` if it is as ``stored`` says.

    ``keep``: a file goes by being kept as a version (clearskies.daemon.versions)
    instead of unlinked; when it cannot be kept (OSError) it stays.
    """
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
    if keep is not None:
        keep(path, stored.path, stored.record)
    else:
        os.unlink(path)
    return True


def _remove_all(jobs: list[tuple[str | None, StoredRecord | None]], keep: Keep | None,
                versions: VersionStore | None, quietly: bool = True) -> list[bool]:
    """``_remove`` for a batch; then one fsync of the versions folder, if files went there.

    ``quietly``: a failure fails only its own item (else it is raised).
    """
    done = [job[0] is not None and (_quietly(_remove, *job, keep) if quietly
                                    else _remove(*job, keep)) for job in jobs]
    if keep is not None and versions is not None and any(done):
        versions.sync()
    return done


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


def _manifest_page(db: StateDatabase, share_id: str, after: str | None,
                   limit: int) -> tuple[int, list[FileRecord]]:
    """The share's revision and a page of its records, read together (database thread)."""
    return db.get_revision(share_id), db.records_page(share_id, after, limit)


#: key can connect under ever new peer IDs, so past this the peer not seen for


class LocalShareFiles:
    """The file and record operations of one share (part of ``LocalShare``).

    ``service`` is the share's engine (its scanner, ignore rules, paths and
    expected arrivals); ``files_runner`` (the daemon's files pool) runs the
    blocking jobs, the many small ones of downloads included (clearskies.diskjobs).
    ``versions``, when set, keeps what peers' changes delete or replace.
    """

    _log = Logger()
    versions: ShareVersions | None = None
    #: Signatures of big installed files made ahead (the rsync extension), or None.
    signatures: SignatureCache | None = None

    def __init__(self, share_id: str, store: Any, files_runner: IRunner,
                 service: ShareService) -> None:
        self.share_id = share_id
        self.store = store
        self.lists = PagedStore(store)  # what peers announced, page by page (IPagedLists)
        self.files_runner = files_runner
        self.service = service
        self.paths = service.paths
        #: Files found rotted on disk (path → the SHA-256 they should hold,
        #: clearskies.daemon.verify): never a local copy of anything.
        self.damaged_paths: dict[str, str] = {}

    def manifest(self) -> Deferred[tuple[int, list[FileRecord]]]:
        """The revision and every record, in one list (read-only shares' comparisons only)."""
        return Deferred.fromCoroutine(self._manifest())

    def manifest_page(self, after: str | None,
                      limit: int) -> Deferred[tuple[int, list[FileRecord]]]:
        """The revision and the next ``limit`` records after ``after``, from one database call."""
        return self.store.call(_manifest_page, self.share_id, after, limit)

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

    def recorded_many(self, paths: list[str]
                      ) -> Deferred[tuple[dict[str, diskjobs.Expected], dict[str, FileRecord]]]:
        """What the disk should hold at each path, and our records: one database query.

        The install job checks each target against the first just before
        its rename; :meth:`keeper_for` takes the second.
        """
        d = self.store.get_stored_many(self.share_id, paths)
        return d.addCallback(lambda stored: (
            {path: expected_on_disk(stored.get(path)) for path in paths},
            {path: row.record for path, row in stored.items()}))

    def local_path(self, path: str) -> Path:
        return self.paths.to_local(path)

    def is_ignored(self, path: str) -> bool:
        return self.service.is_ignored(path)

    def is_damaged(self, path: str) -> bool:
        return path in self.damaged_paths

    def is_unchanged(self, path: str) -> Deferred[bool]:
        return Deferred.fromCoroutine(self._is_unchanged(path))

    async def _is_unchanged(self, path: str) -> bool:
        stored = await self.store.get_stored(self.share_id, path)
        return await self.files_runner.run(_unchanged, str(self.local_path(path)), stored)

    def find_local_copy(self, sha256: str) -> Deferred[Path | None]:
        return Deferred.fromCoroutine(self._find_local_copy(sha256))

    async def _find_local_copy(self, sha256: str) -> Path | None:
        for stored in await self.store.find_by_sha256(self.share_id, sha256):
            if stored.path in self.damaged_paths:
                continue
            local = str(self.local_path(stored.path))
            if await self.files_runner.run(_matches, local, stored):
                return Path(local)
        if self.versions is not None and sha256 in self.versions.hashes:
            return await self.versions.local_copy(sha256)  # a kept version has it
        return None

    def hashes_present(self, hashes: list[str]) -> Deferred[set[str]]:
        """Which of ``hashes`` some live file of the share has, in one database query.

        A hash left out has no local copy to take the content from.
        """
        d = self.store.find_by_sha256_many(self.share_id, hashes)
        kept = self.versions.hashes if self.versions is not None else {}
        # (Content only a damaged file holds is fetched; find_local_copy skips those.)
        return d.addCallback(lambda live: (set(live) - set(self.damaged_paths.values()))
                             | {h for h in hashes if h in kept})

    def remove_local(self, path: str) -> Deferred[bool]:
        return Deferred.fromCoroutine(self._remove_local(path))

    async def _remove_local(self, path: str) -> bool:
        stored = await self.store.get_stored(self.share_id, path)
        [done] = await self._remove_kept([(str(self.local_path(path)), stored)], {},
                                         quietly=False)
        return done

    async def _remove_kept(self, jobs: list[tuple[str | None, StoredRecord | None]],
                           changes: dict[str, FileRecord], quietly: bool = True) -> list[bool]:
        """Remove files, keeping them as versions when the share keeps them."""
        failed: list[tuple[str, str]] = []
        keep = self.versions.remover(changes, failed) if self.versions is not None else None
        try:
            done = await self.files_runner.run(
                _remove_all, jobs, keep, self.versions.store if self.versions else None,
                quietly)
        except OSError:
            self._not_kept(failed)
            raise
        finally:
            if keep is not None:
                keep.close()
        if keep is not None and self.versions is not None:
            self.versions.note_kept([row.record.sha256 for (_, row), ok in zip(jobs, done)
                                     if ok and row is not None and not row.record.is_dir])
        self._not_kept(failed)
        return done

    def _not_kept(self, failed: list[tuple[str, str]]) -> None:
        if failed and self.versions is not None:
            self._log.warn("{count} file(s) deleted by peers were not deleted here: they could "
                           "not be kept in {folder} ({why}); make it writable, or choose "
                           "'clearskies config set versions off --share {root}'",
                           count=len(failed), folder=str(self.versions.store.directory),
                           why=failed[0][1], root=str(self.versions.store.root))

    def make_directory(self, path: str, mode: int | None) -> Deferred[None]:
        return self.files_runner.run(_make_directory, str(self.local_path(path)), mode)

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
            done = await self.files_runner.run(
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

    def remove_many(self, paths: list[str], decided_on: list[FileRecord] | None = None,
                    changes: list[FileRecord] | None = None) -> Deferred[list[bool]]:
        """``remove_local`` for many paths: one database query, one worker job.

        ``decided_on``: for each path, our record that the caller's merge
        found superseded.  A path whose record has changed since (the scanner
        recorded a new local edit meanwhile) is left alone: that edit was not
        part of the decision, and deleting it would lose it.  ``changes``:
        the peers' records deleting them (for the versions kept).
        """
        return Deferred.fromCoroutine(self._remove_many(paths, decided_on, changes))

    async def _remove_many(self, paths: list[str], decided_on: list[FileRecord] | None,
                           changes: list[FileRecord] | None = None) -> list[bool]:
        if not paths:
            return []
        stored = await self.store.get_stored_many(self.share_id, paths)
        jobs = [(self._safe_local(path),
                 _if_still(stored.get(path), decided_on[index] if decided_on else None))
                for index, path in enumerate(paths)]
        return await self._remove_kept(jobs, {r.path: r for r in changes or []})

    def keeper_for(self, records: list[FileRecord], ours: dict[str, FileRecord] | None = None
                   ) -> Deferred[KeepJob | None]:
        """The job keeping what downloads of ``records`` are about to replace, or None.

        ``ours``: our records of those paths, as :meth:`recorded_many` read them
        (so no second query); without it they are read.
        """
        return Deferred.fromCoroutine(self._keeper_for(records, ours))

    async def _keeper_for(self, records: list[FileRecord], ours: dict[str, FileRecord] | None
                          ) -> KeepJob | None:
        if self.versions is None or not self.versions.policy.keeping or not records:
            return None
        if ours is None:
            stored = await self.store.get_stored_many(self.share_id, [r.path for r in records])
            ours = {path: row.record for path, row in stored.items()}
        jobs: dict[str, tuple[str, FileRecord, FileRecord]] = {}
        for record in records:
            mine = ours.get(record.path)
            if mine is None or mine.deleted or mine.is_dir:
                continue  # nothing there to keep (asked first: a local path costs checks)
            if mine.same_content(record):
                continue  # the same bytes again: the file itself stays what it was
            local = self._safe_local(record.path)
            if local is None:
                continue
            jobs[local] = (record.path, mine, record)
        self.versions.note_kept([ours.sha256 for _, ours, _ in jobs.values()])
        return self.versions.replacer(jobs)

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
        return await self.files_runner.run(_rename, str(self.local_path(source)),
                                           str(self.local_path(destination)), stored)

    def note_refused(self, path: str, why: str) -> bool:
        return self.service.scanner.skipped.refused(path, why)

    async def _set_write_permission(self, writable: bool) -> int:
        changed, after = 0, None
        while True:
            page = await self.store.records_between(self.share_id, "", None, after)
            jobs = [(local, row) for row in page
                    if not row.record.deleted and not row.record.is_dir
                    and (local := self._safe_local(row.path)) is not None]
            changed += await self.files_runner.run(_set_write_permission, jobs, writable)
            if not page:
                return changed
            after = page[-1].path
