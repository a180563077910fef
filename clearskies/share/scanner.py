"""Finding local changes: walk the share, compare with the database, hash what moved.

A scan runs in steps so the reactor stays responsive, and holds about a
page (``batch_size`` entries) of the tree at a time, whatever its size:

1. check the root and its marker, load the ignore rules (worker thread);
2. list the tree in path order a page at a time (``listing.TreeWalk``, in
   a worker; the next page is listed while one is compared), or the
   subtrees a partial scan asks for at once;
3. merge each page of the listing with a page of database rows (pure code
   on the reactor, rows fetched on the database thread);
4. hash only files whose cache key (size, mtime_ns, inode) changed, in
   jobs of several small files, ``concurrency`` jobs at a time, in the
   background while further pages are compared (at most a page waits);
   new files that could be the far end of a move wait in a temporary
   table (``pages.stage_*``) until every vanished file is known;
5. write records in transactions of about ``batch_size`` rows and tell
   ``on_batch`` what was written; deletions last, once the root is known
   to be still there.

Rules this module implements:

- Symlinks are never followed and never synced: they are skipped (and
  counted in ``ScanResult.skipped``), like sockets, FIFOs and devices, and
  names that cannot travel on the wire (not UTF-8, not NFC, control
  characters, backslashes).
- Every directory gets an ``is_dir`` record, so empty directories sync.
  Only a change of its permission bits is a change of a directory.
- A vanished path becomes a tombstone (``deleted``) that keeps the previous
  version vector plus our own bump.  Nothing is tombstoned under a
  directory that could not be listed, for an entry that vanished between
  listing and stat, for ignored paths, or when the root or its marker is
  missing (then the scan fails with ShareError before writing anything).
- Every local change bumps our own counter in the version vector.
- ``utime``: the scan time on the share's first scan; later, the mtime if
  it is before ``since`` (the previous full scan, or when the watcher saw
  the change), else ``since``; and always a little after the record it
  replaces, so peers that only compare utimes accept it.
- A path that disappeared and a new path with the same content in the
  same scan form a move.  When the new path also has the old file's inode,
  size and mtime (a rename), its content is not hashed again.
- A file whose mtime is within ``racy_window`` of the scan start is stored
  without a cache key, so it is hashed again next time: a write in the same
  timestamp tick would otherwise go unnoticed.  (One dated further in the
  future gets its cache key: a write would move its mtime back to now.)
- Times from the disk are kept within the range records allow
  (``clamp_mtime_ns``): a file dated 2286 is recorded as dated 2262.
- Whatever is found and not synced is listed with the reason in
  ``Scanner.skipped``; an entry the daemon may not read
  (``clearskies.share.paths.unreadable``) keeps its record as it was.
"""

from __future__ import annotations

import bisect
import os
from collections import deque
import threading
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Iterable

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from clearskies.errors import ShareError
# The listing and the pure record rules live in their own modules; their names
# stay importable from here, where callers found them.
from clearskies.share.changes import (  # noqa: F401
    UTIME_STEP, Comparison, MovePairer, _is_live_file, bump, dir_record, file_record,
    local_utime, same_mode, tombstone)
from clearskies.share.database import (
    CacheKey, LocalChange, ShareStore, StoredRecord, has_live_files)
from clearskies.share.hashing import HashFile, HashResult, hash_file, hash_files
from clearskies.share.ignore import IgnoreRules
from clearskies.share.listing import (  # noqa: F401
    BAD_NAME, NOT_UTF8, SPECIAL, SYMLINK, TOO_DEEP, UNREADABLE, Listing, LocalEntry, TreeWalk,
    check_share_root, list_directories, name_problem, normalize_scopes, read_marker,
    scope_ranges, walk_share, write_marker)
from clearskies.share.pages import PagedStore, StagedFile
from clearskies.share.records import FileRecord
from clearskies.share.skipped import SkippedPaths
from clearskies.interfaces import IRunner

HASH_JOB_FILES = 64
#: A partial scan asks for the rows of this many path ranges in one database call,
#: at most _FIRST_PAGE_ROWS rows each (a bigger range then goes on page by page).
_RANGES_PER_QUERY = 256
_FIRST_PAGE_ROWS = 32
HASH_JOB_BYTES = 16 * 1024 * 1024


# -- the scan -----------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Move:
    """A path that moved: the sync layer can send ``move`` instead of delete + update."""

    source: str
    destination: FileRecord


#: A ScanResult keeps the first this many records and moves it wrote (it counts them all).
RESULT_RECORDS = 1000


@dataclass
class ScanResult:
    full: bool
    #: Written, in write order: the first RESULT_RECORDS (``changes`` counts them all;
    #: every batch goes to ``on_batch`` whole).
    records: list[FileRecord] = field(default_factory=list)
    moves: list[Move] = field(default_factory=list)  # the first RESULT_RECORDS
    changes: int = 0  # records written
    moved: int = 0  # moves written
    files: int = 0  # regular files listed
    directories: int = 0
    unchanged: int = 0
    hashed_files: int = 0
    hashed_bytes: int = 0
    skipped: int = 0  # paths found but not synced (see Scanner.skipped for which and why)
    skipped_paths: list[tuple[str, str]] = field(default_factory=list)
    unstable: list[str] = field(default_factory=list)  # look at these again later
    directory_paths: list[str] = field(default_factory=list)  # directories listed
    revision: int = 0
    started: float = 0.0
    duration: float = 0.0

    def add_written(self, records: list[FileRecord], moves: list[Move]) -> None:
        """Count a committed batch, keeping the first RESULT_RECORDS of each kind."""
        self.changes += len(records)
        self.moved += len(moves)
        self.records.extend(records[:max(0, RESULT_RECORDS - len(self.records))])
        self.moves.extend(moves[:max(0, RESULT_RECORDS - len(self.moves))])


class ScanProgress:
    """Live counters for the CLI; the byte counter is bumped from worker threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset("idle")

    def reset(self, phase: str) -> None:
        self.phase = phase
        self.files_total = self.files_done = 0
        self.bytes_total = self.bytes_done = 0

    def add_bytes(self, n: int) -> None:
        with self._lock:
            self.bytes_done += n

    def as_dict(self) -> dict[str, object]:
        return {"phase": self.phase, "files_done": self.files_done,
                "files_total": self.files_total, "bytes_done": self.bytes_done,
                "bytes_total": self.bytes_total}


#: Told of each committed batch: its records, its moves and the share revision it made.
Batch = Callable[[list[FileRecord], list[Move], int], None]


class Scanner:
    """Scans one share's folder and records local changes in the store."""

    _log = Logger()

    def __init__(self, root: str, share_id: str, peer_id: str, store: ShareStore,
                 runner: IRunner, clock: IReactorTime, *, hasher: HashFile = hash_file,
                 concurrency: int | None = None, batch_size: int = 1000,
                 racy_window: float = 1.0) -> None:
        self.root = root
        self.share_id = share_id
        self.peer_id = peer_id
        self._store = store
        self._runner = runner
        self._clock = clock
        self._hasher = hasher
        self._concurrency = concurrency or os.cpu_count() or 1
        self._batch_size = batch_size
        self._racy_window = racy_window
        self.rules = IgnoreRules()
        self.progress = ScanProgress()
        #: Permission bits of files that differ from the record without being a
        #: local change: 0o222 when the daemon keeps a read-only share's files
        #: unwritable on disk.
        self.ignored_mode_bits = 0
        self._private_paths: tuple[str, ...] = ()
        #: Set on a share just attached with --merge: files found by its first
        #: scan are dated 0, before anything in the share, so the share's
        #: version of each name wins (protocol/merge.md, "Attaching into a
        #: folder that holds files").
        self.adopting = False
        self._stopping = False
        #: What the share does not sync and why (the sync layer adds refused records).
        self.skipped = SkippedPaths()

    @property
    def private_paths(self) -> tuple[str, ...]:
        """Share-relative paths never listed nor synced: the daemon's own data
        directory, should it lie inside the share (IgnoreRules ``private``)."""
        return self._private_paths

    @private_paths.setter
    def private_paths(self, paths: tuple[str, ...]) -> None:
        self._private_paths = tuple(paths)
        # In force at once (serving, merging), not only from the next scan on.
        self.rules = IgnoreRules(self.rules.user_patterns, self._private_paths)

    def stop(self) -> None:
        """Make a running scan give up at its next step (what it wrote stays valid)."""
        self._stopping = True

    def _check_stop(self) -> None:
        if self._stopping:
            raise CancelledError("the share is stopping")

    def scan(self, paths: Iterable[str] | None = None, since: float | None = None,
             on_batch: Batch | None = None) -> Deferred[ScanResult]:
        """Scan everything (``paths=None``) or the given share-relative subtrees.

        ``since``: when the changes were first noticed (partial scans); the
        default is the start of the previous full scan.  ``on_batch`` gets
        the records and moves of each committed transaction.
        """
        return Deferred.fromCoroutine(self._scan(paths, since, on_batch))

    async def _scan(self, paths: Iterable[str] | None, since: float | None,
                    on_batch: Batch | None) -> ScanResult:
        self._stopping = False
        full = paths is None
        scopes = None if full else normalize_scopes(paths)
        result = ScanResult(full=full, started=self._clock.seconds())
        try:
            await self._run(result, scopes, since, on_batch or (lambda records, moves, revision: None))
        finally:
            self.progress.reset("idle")
        result.duration = self._clock.seconds() - result.started
        return result

    async def _run(self, result: ScanResult, scopes: list[str] | None, since: float | None,
                   on_batch: Batch) -> None:
        progress = self.progress
        progress.reset("listing")
        share = await self._store.get_share(self.share_id)
        if share is None:
            raise ShareError("share %s is not in the database" % self.share_id)
        if result.full or since is None:
            since = share.last_scan
        self.rules = await self._runner.run(self._prepare)
        if scopes == []:
            return
        listing = Listing()
        result.skipped_paths = listing.skipped  # filled as the walk goes
        ahead: list[Deferred[list[LocalEntry]]] = []  # a walk page listed in advance
        if scopes is None:
            walk = TreeWalk(self.root, self.rules, listing, lambda: self._stopping)
            sources: list[tuple[tuple[str, str | None], EntrySource]] = [
                (("", None), self._walk_pages(walk, ahead))]
        else:
            # Partial scans list what changed (a few subtrees) at once, as before.
            listing = await self._runner.run(walk_share, self.root, scopes, self.rules,
                                             lambda: self._stopping)
            result.skipped_paths = listing.skipped
            sources = self._scope_sources(listing, scopes)
        # Nothing recorded as a live file: nothing can have vanished, so no new
        # file can be a move and none needs setting aside until the end.
        recorded = await self._store.call(has_live_files, self.share_id)
        writer = _Writer(self._store, self.share_id, self._batch_size, result, on_batch)
        # A partial scan's listing is in memory anyway: its new files wait there.
        stage = None if not recorded or scopes is not None else \
            await self._pages.stage_open()
        try:
            plan = _Planner(self, result, since, writer, stage,
                            hold=recorded and scopes is not None)
            progress.phase = "comparing"
            await self._compare(sources, listing, share.revision, plan)
            await plan.drain()
            self._check_stop()
            # The root could have gone while we walked: what the listing did not
            # find counts as gone (deletions, move sources) only if it is still here.
            await self._runner.run(check_share_root, self.root, self.share_id)
            progress.phase = "hashing"
            await plan.staged()
            await plan.drain()
            progress.phase = "writing"
            await plan.deletions()
            await writer.flush()
        finally:
            for d in ahead:  # a scan that ended early leaves its next page unread
                d.addErrback(lambda _: None)
            if stage is not None:
                try:
                    await self._pages.stage_close(stage)
                except Exception:
                    self._log.failure("clearing a scan's staged files")
        self._note_skipped(result, scopes)
        if result.full:
            await self._store.set_last_scan(self.share_id, result.started)

    def _walk_pages(self, walk: TreeWalk, ahead: list[Deferred[list[LocalEntry]]]
                    ) -> EntrySource:
        """The walk's pages; the next is listed (in a worker) while this one is compared."""
        async def next_page() -> tuple[list[LocalEntry], bool]:
            entries = await (ahead.pop(0) if ahead else
                             self._runner.run(walk.take, self._batch_size))
            done = len(entries) < self._batch_size
            if not done:
                ahead.append(self._runner.run(walk.take, self._batch_size))
            return entries, done
        return next_page

    def _scope_sources(self, listing: Listing, scopes: list[str]
                       ) -> list[tuple[tuple[str, str | None], EntrySource]]:
        keys = [entry.path for entry in listing.entries]
        sources: list[tuple[tuple[str, str | None], EntrySource]] = []
        for scope in scopes:
            for low, high in scope_ranges(scope):
                start = bisect.bisect_left(keys, low)
                stop = bisect.bisect_left(keys, high)
                sources.append(((low, high), _once(listing.entries[start:stop])))
        return sources

    def _prepare(self) -> IgnoreRules:
        check_share_root(self.root, self.share_id)
        return IgnoreRules.load(self.root, self.private_paths)

    def _note_skipped(self, result: ScanResult, scopes: list[str] | None) -> None:
        """Keep the list of what is not synced; log each path once, when it first shows."""
        result.skipped = len(result.skipped_paths)
        new = self.skipped.scanned(result.skipped_paths, scopes)
        if new:
            path, why = new[0]
            if not path.isprintable():  # a newline in a name must not forge a log line
                path = path.encode("unicode_escape").decode("ascii")
            self._log.warn(
                "{count} path(s) in {root} cannot be synced and are left alone, e.g. {example} "
                "({why}); see: clearskies status {root} --skipped",
                count=len(new), root=self.root, example=path, why=why)

    async def _compare(self, sources: list[tuple[tuple[str, str | None], EntrySource]],
                       listing: Listing, listed_at_revision: int, plan: _Planner) -> None:
        """Merge each range's listing with its stored rows, a page of each at a time,
        and hand every compared page to ``plan``."""
        unknown = listing.protected  # grows as the walk goes, always ahead of the rows
        marked: set[str] = set()
        taken = [0]

        def protected(row: StoredRecord) -> bool:
            if row.revision > listed_at_revision:
                # Written (by the sync layer) after our listing began: the listing
                # cannot know the file, which does not make it deleted.
                return True
            if unknown:
                if taken[0] < len(unknown):  # (the list only grows)
                    marked.update(unknown[taken[0]:])
                    taken[0] = len(unknown)
                parts = row.path.split("/")
                if any("/".join(parts[:n]) in marked for n in range(1, len(parts) + 1)):
                    return True
            return self.rules.is_ignored(row.path, row.record.is_dir)

        def newer(row: StoredRecord) -> bool:
            return row.revision > listed_at_revision

        result = plan.result
        # The start of many ranges in one round trip (a partial scan of many single
        # files must not cost a query hop per file); a range with more rows than
        # that start goes on page by page.
        for chunk in range(0, len(sources), _RANGES_PER_QUERY):
            self._check_stop()
            some = sources[chunk:chunk + _RANGES_PER_QUERY]
            first_limit = self._batch_size if len(some) == 1 else min(
                self._batch_size, _FIRST_PAGE_ROWS)
            first_pages = await self._store.records_between_many(
                self.share_id, [bounds for bounds, _ in some], first_limit)
            for ((low, high), source), rows in zip(some, first_pages):
                rows_done = len(rows) < first_limit
                last_row = rows[-1].path if rows else None
                entries: list[LocalEntry] = []
                entries_done = False
                while True:
                    self._check_stop()
                    if not entries and not entries_done:
                        entries, entries_done = await source()
                    if not rows and not rows_done:
                        rows = await self._store.records_between(
                            self.share_id, low, high, last_row, self._batch_size)
                        rows_done = len(rows) < self._batch_size
                        last_row = rows[-1].path if rows else last_row
                    if not entries and not rows:
                        break
                    # Up to where both sides are known: at least one side is used up.
                    bound: str | None = None
                    if not entries_done and entries:
                        bound = entries[-1].path
                    if not rows_done and rows and (bound is None or rows[-1].path < bound):
                        bound = rows[-1].path
                    if bound is None:
                        these, entries = entries, []
                        mine, rows = rows, []
                    else:
                        cut = bisect.bisect_right([e.path for e in entries], bound)
                        these, entries = entries[:cut], entries[cut:]
                        cut = bisect.bisect_right([r.path for r in rows], bound)
                        mine, rows = rows[:cut], rows[cut:]
                    comparison = Comparison(ignored_mode_bits=self.ignored_mode_bits)
                    comparison.add_page(these, mine, protected, newer)
                    result.unchanged += comparison.unchanged
                    for entry in these:
                        if entry.is_dir:
                            result.directories += 1
                            result.directory_paths.append(entry.path)
                        else:
                            result.files += 1
                    await plan.page(comparison)

    @property
    def _pages(self) -> PagedStore:
        return PagedStore(self._store)


#: The next page of a range's listing, and whether it was the last.
EntrySource = Callable[[], Awaitable[tuple[list[LocalEntry], bool]]]


def _once(entries: list[LocalEntry]) -> EntrySource:
    async def whole() -> tuple[list[LocalEntry], bool]:
        return entries, True
    return whole


class _Writer:
    """Collects changes and commits them in transactions of about ``size`` rows."""

    def __init__(self, store: ShareStore, share_id: str, size: int, result: ScanResult,
                 on_batch: Batch) -> None:
        self._store = store
        self._share_id = share_id
        self._size = size
        self._result = result
        self._on_batch = on_batch
        self._changes: list[LocalChange] = []
        self._moves: list[Move] = []
        self._refresh: list[tuple[str, CacheKey, int]] = []

    async def add(self, *changes: LocalChange, move: Move | None = None) -> None:
        """Queue changes that must land together (a move's two halves)."""
        self._changes.extend(changes)
        if move is not None:
            self._moves.append(move)
        if len(self._changes) >= self._size:
            await self.flush()

    async def refresh(self, path: str, key: CacheKey, revision: int) -> None:
        self._refresh.append((path, key, revision))
        if len(self._refresh) >= self._size:
            await self.flush()

    async def flush(self) -> None:
        changes, self._changes = self._changes, []
        moves, self._moves = self._moves, []
        refresh, self._refresh = self._refresh, []
        if refresh:
            await self._store.refresh_cache_keys(self._share_id, refresh)
        if not changes:
            return
        revision, written = await self._store.apply_local_changes(self._share_id, changes)
        self._result.revision = max(self._result.revision, revision)
        if not written:
            return
        paths = {record.path for record in written}
        moves = [m for m in moves if m.source in paths and m.destination.path in paths]
        self._result.add_written(written, moves)
        self._on_batch(written, moves, revision)


class _Planner:
    """Turns compared pages into records: directories, renames, hashing, deletions.

    Per page, directories and changes to recorded files are written at once.
    New files (no live record) could be the far end of a move whose
    vanished source comes later in the listing: they are set aside in the
    database (``stage``) and looked at once the whole listing is compared
    (``staged``), unless nothing can have vanished (``stage`` None); with
    ``hold`` they wait in memory instead (a partial scan's few files).
    """

    def __init__(self, scanner: Scanner, result: ScanResult, since: float | None,
                 writer: _Writer, stage: int | None, hold: bool = False) -> None:
        self._scanner = scanner
        self.result = result
        self._since = since
        self._now = result.started
        self._racy_after_ns = int((result.started - scanner._racy_window) * 1e9)
        # A file dated further ahead was dated so on purpose (or comes from a
        # skewed clock): a write now would move its mtime back, to now.
        self._racy_until_ns = int((result.started + scanner._racy_window) * 1e9)
        self._writer = writer
        self._stage = stage
        #: Recorded files the listing did not find: deletions, or sources of moves.
        self._gone: list[StoredRecord] = []
        self._pairer = MovePairer(())
        self._held: list[tuple[LocalEntry, StoredRecord | None]] | None = [] if hold else None
        # Files waiting for a hashing job, how many jobs run, and who waits for room.
        self._queue: deque[tuple[LocalEntry, StoredRecord | None]] = deque()
        self._running = 0
        self._waiting: list[Deferred[None]] = []
        self._failure: Failure | None = None

    def _utime(self, mtime_ns: int | None, previous: FileRecord | None) -> float:
        if self._scanner.adopting and previous is None:
            return 0.0
        mtime = None if mtime_ns is None else mtime_ns / 1e9
        return local_utime(mtime, self._since, self._now, previous)

    def _mode(self, on_disk: int, previous: FileRecord | None) -> int:
        """The mode to record: the disk's, with the daemon-managed bits kept from before."""
        ignored = self._scanner.ignored_mode_bits
        if not ignored or previous is None or previous.mode is None:
            return on_disk
        return on_disk & ~ignored | previous.mode & ignored

    def _cache(self, inode: int, size: int, mtime_ns: int) -> CacheKey | None:
        if self._racy_after_ns <= mtime_ns <= self._racy_until_ns:
            return None  # may still change within the same timestamp tick
        return CacheKey(inode, size, mtime_ns)

    async def page(self, comparison: Comparison) -> None:
        """Write what one compared page shows, hashing what needs it."""
        peer_id = self._scanner.peer_id
        for entry, row in comparison.directories:
            previous = row.record if row else None
            record = dir_record(entry, previous, peer_id, self._utime(entry.mtime_ns, previous))
            await self._writer.add(LocalChange(record, None, row.revision if row else None))
        self._gone.extend(comparison.gone)
        to_hash: list[tuple[LocalEntry, StoredRecord | None]] = []
        staged: list[StagedFile] = []
        for entry, row in comparison.files:
            previous = row.record if row else None
            if previous is None or previous.deleted:
                if self._stage is not None:
                    staged.append(StagedFile(entry.path, entry.size, entry.mtime_ns, entry.inode,
                                             entry.mode, row.revision if row else None))
                    continue
                if self._held is not None:
                    self._held.append((entry, row))
                    continue
            elif _is_live_file(previous) and row.cache == entry.cache_key:
                await self._same_content(entry, row)
                continue
            to_hash.append((entry, row))
        if staged:
            await self._scanner._pages.stage_add(self._stage, staged)
        await self.hash_all(to_hash)

    async def _same_content(self, entry: LocalEntry, row: StoredRecord) -> None:
        """A permission change: the content is known, nothing to hash."""
        previous = row.record
        record = file_record(entry.path, previous.sha256, entry.size, entry.mtime_ns,
                             self._mode(entry.mode, previous), previous,
                             self._scanner.peer_id, self._utime(entry.mtime_ns, previous))
        await self._writer.add(LocalChange(record, row.cache, row.revision))

    async def staged(self) -> None:
        """The new files set aside, now that every vanished file is known.

        First every rename (a vanished file's inode, size and mtime at a new
        path: no hashing), then the rest is hashed, which may pair a file
        with a vanished one of the same content: renames are matched before
        any copy can take their source, as when the whole listing was held.
        """
        if self._held is not None:
            self._pairer = MovePairer(self._gone)
            held, self._held = self._held, []
            await self.hash_all([item for item in held if not await self._renamed(*item)])
        if self._stage is None:
            return
        self._pairer = MovePairer(self._gone)
        await self._staged_pass(renames=True)
        await self._writer.flush()  # the renames' rows are rewritten: the next pass skips them
        await self._staged_pass(renames=False)

    async def _staged_pass(self, renames: bool) -> None:
        """One pass over the stage, a page at a time: renames, or hashing the rest."""
        scanner = self._scanner
        after = None
        while True:
            scanner._check_stop()
            page = await scanner._pages.stage_page(self._stage, after, scanner._batch_size)
            if not page:
                return
            after = page[-1].path
            rows = await scanner._store.get_stored_many(scanner.share_id,
                                                        [f.path for f in page])
            to_hash: list[tuple[LocalEntry, StoredRecord | None]] = []
            for staged in page:
                row = rows.get(staged.path)
                if (row.revision if row else None) != staged.revision:
                    continue  # rewritten meanwhile (a rename, or the sync layer's download)
                entry = LocalEntry(staged.path, False, staged.size, staged.mtime_ns,
                                   staged.inode, staged.mode)
                if renames:
                    await self._renamed(entry, row)
                else:
                    to_hash.append((entry, row))
            await self.hash_all(to_hash)
            if len(page) < scanner._batch_size:
                return

    async def _renamed(self, entry: LocalEntry, row: StoredRecord | None) -> bool:
        """Record a new file as a vanished one's rename, if it has its inode, size and mtime."""
        source = self._pairer.by_cache_key(entry.cache_key)
        if source is None:
            return False
        await self._moved(entry.path, source.record.sha256, entry.size, entry.mtime_ns,
                          entry.mode, entry.inode, row, source)
        return True

    async def _moved(self, path: str, sha256: str, size: int, mtime_ns: int, mode: int,
                     inode: int, row: StoredRecord | None, source: StoredRecord) -> None:
        peer_id = self._scanner.peer_id
        previous = row.record if row else None
        record = file_record(path, sha256, size, mtime_ns, self._mode(mode, source.record),
                             previous, peer_id, self._utime(mtime_ns, previous),
                             source=source.record)
        gone = tombstone(source.record, peer_id, self._utime(None, source.record))
        await self._writer.add(
            LocalChange(gone, None, source.revision),
            LocalChange(record, self._cache(inode, size, mtime_ns),
                        row.revision if row else None),
            move=Move(source.path, record))

    async def hash_all(self, to_hash: list[tuple[LocalEntry, StoredRecord | None]]) -> None:
        """Queue files for hashing by ``concurrency`` jobs running in the background.

        Pages overlap: this returns once no more than a page of files waits
        (the listing and comparing of the next page go on meanwhile).
        ``drain`` waits for the rest.  The first error stops the scan and is
        raised here or by ``drain``.
        """
        if to_hash:
            progress = self._scanner.progress
            progress.files_total += len(to_hash)
            progress.bytes_total += sum(entry.size for entry, _ in to_hash)
            self._queue.extend(to_hash)
            while self._queue and self._running < self._scanner._concurrency:
                self._running += 1
                Deferred.fromCoroutine(self._hash_worker())  # (it keeps its own errors)
        while len(self._queue) > self._scanner._batch_size and self._failure is None:
            waiting: Deferred[None] = Deferred()
            self._waiting.append(waiting)
            await waiting
        self._raise_failure()

    async def drain(self) -> None:
        """Wait until every queued file is hashed and written; raise the first error."""
        while self._running and self._failure is None:
            waiting: Deferred[None] = Deferred()
            self._waiting.append(waiting)
            await waiting
        self._raise_failure()

    def _raise_failure(self) -> None:
        if self._failure is not None:
            failure, self._failure = self._failure, None
            failure.raiseException()

    def _next_job(self) -> list[tuple[LocalEntry, StoredRecord | None]]:
        """Up to HASH_JOB_FILES files / HASH_JOB_BYTES from the queue."""
        job: list[tuple[LocalEntry, StoredRecord | None]] = []
        size = 0
        while self._queue and len(job) < HASH_JOB_FILES and size < HASH_JOB_BYTES:
            item = self._queue.popleft()
            job.append(item)
            size += item[0].size
        return job

    async def _hash_worker(self) -> None:
        try:
            while self._queue and self._failure is None:
                await self._hash_job(self._next_job())
                self._wake()
        except BaseException:
            if self._failure is None:
                self._failure = Failure()
            self._queue.clear()
            self._scanner.stop()  # the other workers stop at their next job
        finally:
            self._running -= 1
            self._wake()

    def _wake(self) -> None:
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)

    async def _hash_job(self, job: list[tuple[LocalEntry, StoredRecord | None]]) -> None:
        scanner = self._scanner
        scanner._check_stop()
        scanner.progress.phase = "hashing"
        paths = [os.path.join(scanner.root, entry.path) for entry, _ in job]
        outcomes = await scanner._runner.run(
            hash_files, paths, scanner._hasher, scanner.progress.add_bytes)
        for (entry, row), outcome in zip(job, outcomes):
            scanner.progress.files_done += 1
            if isinstance(outcome, HashResult):
                self.result.hashed_files += 1
                self.result.hashed_bytes += outcome.size
                await self._hashed(entry.path, outcome, row)
            elif outcome.denied:
                # Left as it is (its record too) until it can be read.
                self.result.skipped_paths.append((entry.path, UNREADABLE))
            else:
                self.result.unstable.append(entry.path)

    async def _hashed(self, path: str, h: HashResult, row: StoredRecord | None) -> None:
        previous = row.record if row else None
        cache = self._cache(h.inode, h.size, h.mtime_ns)
        if (previous is not None and _is_live_file(previous) and previous.sha256 == h.sha256
                and previous.size == h.size
                and same_mode(previous.mode, h.mode, self._scanner.ignored_mode_bits)):
            # Touched, not changed: remember the new stat, announce nothing.
            if cache is not None and row is not None:
                await self._writer.refresh(path, cache, row.revision)
            return
        source = None
        if previous is None or previous.deleted:
            source = self._pairer.by_content(h.sha256, h.size, path)
        if source is not None:
            await self._moved(path, h.sha256, h.size, h.mtime_ns, h.mode, h.inode, row, source)
            return
        record = file_record(path, h.sha256, h.size, h.mtime_ns, self._mode(h.mode, previous),
                             previous, self._scanner.peer_id, self._utime(h.mtime_ns, previous))
        await self._writer.add(LocalChange(record, cache, row.revision if row else None))

    async def deletions(self) -> None:
        peer_id = self._scanner.peer_id
        for row in self._gone:
            if row.path in self._pairer.claimed:
                continue
            # The deletion happened after ``since`` (the last look at it).
            record = tombstone(row.record, peer_id, self._utime(None, row.record))
            await self._writer.add(LocalChange(record, None, row.revision))
