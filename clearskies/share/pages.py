"""Per-file lists kept in the state database and read back one page at a time.

Whatever grows with the number of files in a share has its whole list
here, not in memory: what a scan found and must look at again (the
``scan_stage`` temporary table of the database connection), what each
peer announced (``announced``), the files the share still needs
(``wanted`` and ``wanted_sources``; schema/004_pages.sql), and a read-only
share's kept signed messages (``signed_messages``, read by ``signed_page``).  Callers hold
one page (``PAGE_SIZE`` rows, or what they ask for) at a time.

The functions take a ``StateDatabase`` and run on the database thread;
``PagedStore`` is their asynchronous face, through ``ShareStore.call``.
Every page is in path order (UTF-8 byte order, the order of Python's
``str`` comparison) and goes on after the ``after`` path of the page
before; a page shorter than ``limit`` is the last.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from typing import Any, AsyncIterator, Iterable, Sequence

from twisted.internet.defer import Deferred
from zope.interface import implementer

from clearskies.interfaces import IPagedLists
from clearskies.share.database import (
    PAGE_SIZE, CacheKey, ShareStore, StateDatabase, as_json, insert_rows, select_json)
from clearskies.share.records import FileRecord

#: Paths per ``IN (…)`` list: below SQLite's oldest default limit of 999 parameters.
_CHUNK = 500
_RECORD_COLUMNS = ("path, utime, deleted, is_dir, size, mtime_sec, mtime_nsec, mode, sha256,"
                   " vv, file_id, file_key, conflict_source")
_RECORD_COLUMNS_JSON = _RECORD_COLUMNS.replace("utime", "quote(utime)", 1)
_UPDATED = [c.strip() for c in _RECORD_COLUMNS.split(",")][1:] + ["fetch_path"]
_tokens = itertools.count(1)


def record_values(record: FileRecord) -> tuple[Any, ...]:
    """The record in the 13 columns of ``_RECORD_COLUMNS`` (those of ``files``)."""
    mtime = record.mtime or (None, None)
    return (record.path, record.utime, int(record.deleted), int(record.is_dir), record.size,
            mtime[0], mtime[1], record.mode, record.sha256,
            json.dumps(record.vv, sort_keys=True, separators=(",", ":")), record.file_id,
            record.key, record.conflict_source)


def _record_from_json(values: list[Any]) -> FileRecord:
    """:func:`record_from` of a row read by ``select_json`` (``utime`` quoted)."""
    values[1] = float(values[1])
    return record_from(values)


def _in_json(column: str = "path") -> str:
    return "%s IN (SELECT value FROM json_each(?))" % column


def record_from(values: Sequence[Any]) -> FileRecord:
    """The inverse of :func:`record_values`."""
    (path, utime, deleted, is_dir, size, mtime_sec, mtime_nsec, mode, sha256, vv, file_id,
     file_key, conflict_source) = values
    return FileRecord(
        path=path, utime=utime, deleted=bool(deleted), size=size,
        mtime=(mtime_sec, mtime_nsec) if mtime_sec is not None else None, mode=mode,
        sha256=sha256, is_dir=bool(is_dir), vv=json.loads(vv), file_id=file_id, key=file_key,
        conflict_source=conflict_source)


def _chunks(items: Sequence[Any]) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start:start + _CHUNK]


# -- what a scan sets aside (a temporary table) ----------------------------------


@dataclass(frozen=True, slots=True)
class StagedFile:
    """A file a scan found and looks at later: its stat, and the row it was compared with."""

    path: str
    size: int
    mtime_ns: int
    inode: int
    mode: int
    revision: int | None  # the row's revision stamp when compared (None: there was none)

    @property
    def cache_key(self) -> CacheKey:
        return CacheKey(self.inode, self.size, self.mtime_ns)


def _ensure_stage(db: StateDatabase) -> None:
    # TEMP: private to the connection, never in the database file, gone on close.
    # SQLite keeps it in its page cache and spills to a temporary file beyond that.
    db.connection.execute(
        "CREATE TEMP TABLE IF NOT EXISTS scan_stage (token INTEGER NOT NULL,"
        " path TEXT NOT NULL, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,"
        " inode INTEGER NOT NULL, mode INTEGER NOT NULL, revision INTEGER,"
        " PRIMARY KEY (token, path)) WITHOUT ROWID")


def stage_open(db: StateDatabase) -> int:
    """A new, empty stage; the token names it in the calls below."""
    _ensure_stage(db)
    return next(_tokens)


def stage_add(db: StateDatabase, token: int, files: Sequence[StagedFile]) -> None:
    """Set files aside (a path staged again replaces the earlier one)."""
    conn = db.connection
    conn.execute("BEGIN")  # touches only the temporary database: no lock on the main one
    try:
        conn.executemany(
            "INSERT OR REPLACE INTO temp.scan_stage VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(token, f.path, f.size, f.mtime_ns, f.inode - 2**64 if f.inode >= 2**63
              else f.inode, f.mode, f.revision) for f in files])
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def stage_page(db: StateDatabase, token: int, after: str | None = None,
               limit: int = PAGE_SIZE) -> list[StagedFile]:
    """The next ``limit`` staged files after the path ``after``, in path order."""
    rows = db.connection.execute(
        "SELECT path, size, mtime_ns, inode, mode, revision FROM temp.scan_stage"
        " WHERE token = ? AND path > ? ORDER BY path LIMIT ?",
        (token, "" if after is None else after, limit))
    return [StagedFile(path, size, mtime_ns, inode % 2**64, mode, revision)
            for path, size, mtime_ns, inode, mode, revision in rows]


def stage_close(db: StateDatabase, token: int) -> None:
    """Drop a stage's rows."""
    _ensure_stage(db)
    db.connection.execute("DELETE FROM temp.scan_stage WHERE token = ?", (token,))


# -- what peers announced --------------------------------------------------------


def put_announced(db: StateDatabase, share_id: str, peer_id: str,
                  records: Sequence[FileRecord], acked: bool = False) -> None:
    """Remember the peer's records (the latest per path replaces the one before).

    ``acked``: each live file's SHA-256 is also taken as content the peer
    holds (a manifest's records); otherwise the acknowledgement stays.
    """
    with db.transaction() as conn:
        insert_rows(
            conn, "INSERT INTO announced (share_id, peer_id, %s, acked)" % _RECORD_COLUMNS,
            [(share_id, peer_id, *record_values(r),
              r.sha256 if acked and not r.deleted and r.sha256 else None) for r in records],
            " ON CONFLICT (share_id, peer_id, path) DO UPDATE SET utime = excluded.utime,"
            " deleted = excluded.deleted, is_dir = excluded.is_dir, size = excluded.size,"
            " mtime_sec = excluded.mtime_sec, mtime_nsec = excluded.mtime_nsec,"
            " mode = excluded.mode, sha256 = excluded.sha256, vv = excluded.vv,"
            " file_id = excluded.file_id, file_key = excluded.file_key,"
            " conflict_source = excluded.conflict_source, announced = 1,"
            " acked = COALESCE(excluded.acked, announced.acked)")


def announced_page(db: StateDatabase, share_id: str, peer_id: str, after: str | None = None,
                   limit: int = PAGE_SIZE) -> list[FileRecord]:
    """The peer's next ``limit`` records after the path ``after``, in path order."""
    rows = db.connection.execute(
        "SELECT %s FROM announced WHERE share_id = ? AND peer_id = ? AND path > ?"
        " AND announced ORDER BY path LIMIT ?" % _RECORD_COLUMNS,
        (share_id, peer_id, "" if after is None else after, limit))
    return [record_from(row) for row in rows]


def announced_many(db: StateDatabase, share_id: str, peer_id: str,
                   paths: Sequence[str]) -> dict[str, FileRecord]:
    """The peer's records of these paths (paths it never announced are left out)."""
    if not paths:
        return {}
    rows = select_json(db.connection, _RECORD_COLUMNS_JSON,
                       "FROM announced WHERE share_id = ? AND peer_id = ? AND announced AND "
                       + _in_json(), (share_id, peer_id, as_json(list(dict.fromkeys(paths)))))
    return {row[0]: _record_from_json(row) for row in rows}


def set_acked(db: StateDatabase, share_id: str, peer_id: str,
              items: Sequence[tuple[str, str]]) -> None:
    """The peer holds our content ``sha256`` at ``path``: (path, sha256) items.

    A path the peer never announced gets a row holding only this, which
    ``announced_page`` and ``announced_many`` do not return.
    """
    with db.transaction() as conn:
        conn.executemany(
            "INSERT INTO announced (share_id, peer_id, path, utime, acked, announced)"
            " VALUES (?, ?, ?, 0, ?, 0) ON CONFLICT (share_id, peer_id, path)"
            " DO UPDATE SET acked = excluded.acked",
            [(share_id, peer_id, path, sha256) for path, sha256 in items])


def acked_many(db: StateDatabase, share_id: str, peer_id: str,
               paths: Sequence[str]) -> dict[str, str]:
    """path -> the SHA-256 the peer is known to hold, for those of ``paths`` it holds."""
    found: dict[str, str] = {}
    for chunk in _chunks(list(dict.fromkeys(paths))):
        found.update(db.connection.execute(
            "SELECT path, acked FROM announced WHERE share_id = ? AND peer_id = ?"
            " AND acked IS NOT NULL AND path IN (%s)" % ",".join("?" * len(chunk)),
            [share_id, peer_id, *chunk]))
    return found


def forget_announced(db: StateDatabase, share_id: str, peer_id: str | None = None) -> None:
    """Drop what one peer (or, with None, every peer) of the share announced."""
    with db.transaction() as conn:
        if peer_id is None:
            conn.execute("DELETE FROM announced WHERE share_id = ?", (share_id,))
        else:
            conn.execute("DELETE FROM announced WHERE share_id = ? AND peer_id = ?",
                         (share_id, peer_id))


def signed_page(db: StateDatabase, share_id: str, kind: str,
                after: tuple[str, str] | None = None, limit: int = PAGE_SIZE
                ) -> list[tuple[str, str, bytes, bytes]]:
    """Read-only shares: the next ``limit`` kept signed messages of one kind ("manifest"
    or "update") after (key, part) ``after``, as (key, part, text, signature), in
    (key, part) order: what ``ShareStore.list_signed`` returns whole, a page at a time."""
    sql = "SELECT key, part, text, signature FROM signed_messages WHERE share_id = ? AND kind = ?"
    args: list[Any] = [share_id, kind]
    if after is not None:
        sql += " AND (key, part) > (?, ?)"
        args.extend(after)
    rows = db.connection.execute(sql + " ORDER BY key, part LIMIT ?", [*args, limit])
    return [(key, part, bytes(text), bytes(signature)) for key, part, text, signature in rows]


# -- what the share wants --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WantedRow:
    """A file the share needs, and which peers have it."""

    record: FileRecord
    fetch_path: str | None
    sources: frozenset[str]

    @property
    def remote_path(self) -> str:
        return self.fetch_path or self.record.path


def put_wanted(db: StateDatabase, share_id: str,
               items: Sequence[tuple[FileRecord, str | None, Iterable[str]]]) -> tuple[int, int]:
    """Want (record, fetch path, sources) items; returns (files added, change in bytes).

    A path wanted with other content gets the new record, fetch path and
    sources only (who had the old content need not have this).  With the same
    content the sources are added; the fetch path becomes None when the new
    one is None (the content is now announced under its own path) and stays
    as it was otherwise.
    """
    added = grown = 0
    with db.transaction() as conn:
        # What is there already, for every path at once.
        rows = select_json(conn, "path, sha256, size, deleted, is_dir, fetch_path",
                           "FROM wanted WHERE share_id = ? AND " + _in_json(),
                           (share_id, as_json(list({r.path: None for r, _, _ in items}))))
        old: dict[str, list[Any]] = {row[0]: row[1:] for row in rows}
        upserts: list[tuple[Any, ...]] = []
        new_content: list[str] = []
        sources_of: list[tuple[str, str]] = []
        for record, fetch_path, sources in items:
            before = old.get(record.path)
            if before is None:
                added += 1
            else:
                grown -= before[1] or 0
                if tuple(before[:4]) != (record.sha256, record.size, int(record.deleted),
                                         int(record.is_dir)):
                    new_content.append(record.path)
                    sources_of = [s for s in sources_of if s[0] != record.path]
                elif fetch_path is not None:
                    fetch_path = before[4]
            grown += record.size or 0
            old[record.path] = [record.sha256, record.size, int(record.deleted),
                                int(record.is_dir), fetch_path]
            upserts.append((share_id, *record_values(record), fetch_path))
            sources_of.extend((record.path, peer) for peer in sources)
        if new_content:  # who had the old content need not have this
            conn.execute("DELETE FROM wanted_sources WHERE share_id = ? AND " + _in_json(),
                         (share_id, as_json(new_content)))
        # An upsert: a REPLACE would delete the row, and its sources with it.
        insert_rows(conn, "INSERT INTO wanted (share_id, %s, fetch_path)" % _RECORD_COLUMNS,
                    upserts, " ON CONFLICT (share_id, path) DO UPDATE SET %s"
                    % ", ".join("%s = excluded.%s" % (c, c) for c in _UPDATED))
        insert_rows(conn, "INSERT OR IGNORE INTO wanted_sources (share_id, path, peer_id)",
                    [(share_id, path, peer) for path, peer in sources_of])
    return added, grown


#: A wanted row's columns for ``select_json``: the record, the fetch path, the sources.
_WANTED_COLUMNS = (
    "%s, fetch_path, (SELECT group_concat(peer_id, ' ') FROM wanted_sources s"
    " WHERE s.share_id = w.share_id AND s.path = w.path)" % _RECORD_COLUMNS_JSON)


def _wanted_row(row: list[Any]) -> WantedRow:
    return WantedRow(_record_from_json(row[:13]), row[13], frozenset((row[14] or "").split()))


def wanted_page(db: StateDatabase, share_id: str, after: str | None = None,
                limit: int = PAGE_SIZE, source: str | None = None) -> list[WantedRow]:
    """The next ``limit`` wanted files after the path ``after``, with their sources;
    with ``source``, only those that peer has."""
    sql = "FROM wanted w WHERE share_id = ? AND path > ?"
    args: list[Any] = [share_id, "" if after is None else after]
    if source is not None:
        sql += (" AND EXISTS (SELECT 1 FROM wanted_sources s WHERE s.share_id = w.share_id"
                " AND s.path = w.path AND s.peer_id = ?)")
        args.append(source)
    rows = select_json(db.connection, _WANTED_COLUMNS, sql + " ORDER BY path LIMIT ?",
                       [*args, limit])
    rows.sort(key=lambda row: row[0])  # (already in order: a linear check)
    return [_wanted_row(row) for row in rows]


def wanted_many(db: StateDatabase, share_id: str, paths: Sequence[str]) -> dict[str, WantedRow]:
    """The wanted files among ``paths`` (the others are left out)."""
    if not paths:
        return {}
    rows = select_json(db.connection, _WANTED_COLUMNS,
                       "FROM wanted w WHERE share_id = ? AND " + _in_json(),
                       (share_id, as_json(list(dict.fromkeys(paths)))))
    return {row[0]: _wanted_row(row) for row in rows}


def wanted_totals(db: StateDatabase, share_id: str) -> tuple[int, int]:
    """How many files the share wants, and their bytes."""
    count, size = db.connection.execute(
        "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM wanted WHERE share_id = ?",
        (share_id,)).fetchone()
    return count, size


def remove_wanted(db: StateDatabase, share_id: str, paths: Sequence[str]) -> tuple[int, int]:
    """No longer want these paths (fetched, superseded, or no longer needed);
    returns (files removed, their bytes)."""
    removed = freed = 0
    with db.transaction() as conn:
        for chunk in _chunks(list(dict.fromkeys(paths))):
            where = " WHERE share_id = ? AND path IN (%s)" % ",".join("?" * len(chunk))
            count, size = conn.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM wanted"
                                       + where, [share_id, *chunk]).fetchone()
            conn.execute("DELETE FROM wanted" + where, [share_id, *chunk])
            removed, freed = removed + count, freed + size
    return removed, freed


def remove_wanted_superseded(db: StateDatabase, share_id: str,
                             records: Sequence[FileRecord]) -> tuple[int, int]:
    """Local edits came first: no longer want their paths unless for the same content;
    returns (files removed, their bytes)."""
    removed = freed = 0
    with db.transaction() as conn:
        for record in records:
            row = conn.execute("SELECT sha256, size, deleted, is_dir FROM wanted"
                               " WHERE share_id = ? AND path = ?",
                               (share_id, record.path)).fetchone()
            if row is None:
                continue
            wanted = FileRecord(path=record.path, utime=0.0, sha256=row[0], size=row[1],
                                deleted=bool(row[2]), is_dir=bool(row[3]))
            if not record.same_content(wanted):
                conn.execute("DELETE FROM wanted WHERE share_id = ? AND path = ?",
                             (share_id, record.path))
                removed, freed = removed + 1, freed + (row[1] or 0)
    return removed, freed


def take_wanted_page(db: StateDatabase, share_id: str, after: str | None,
                     limit: int) -> list[WantedRow]:
    """The next ``limit`` wanted files after ``after``, removed from the table (they are
    kept elsewhere from now on)."""
    with db.transaction() as conn:
        rows = wanted_page(db, share_id, after, limit)
        if rows:
            # The page is every row in (after, its last path]: one range goes, with
            # its sources (ON DELETE CASCADE), and no count is needed.
            conn.execute("DELETE FROM wanted WHERE share_id = ? AND path > ? AND path <= ?",
                         (share_id, "" if after is None else after, rows[-1].record.path))
    return rows


def clear_wanted(db: StateDatabase, share_id: str) -> None:
    """Forget every wanted file of the share (a daemon that stopped left them)."""
    with db.transaction() as conn:
        conn.execute("DELETE FROM wanted WHERE share_id = ?", (share_id,))


def drop_source(db: StateDatabase, share_id: str, peer_id: str) -> None:
    """The peer left: it is no longer a source of any wanted file."""
    with db.transaction() as conn:
        conn.execute("DELETE FROM wanted_sources WHERE share_id = ? AND peer_id = ?",
                     (share_id, peer_id))


@implementer(IPagedLists)
class PagedStore:
    """The functions above as Deferreds, run on the store's database thread."""

    def __init__(self, store: ShareStore) -> None:
        self._store = store

    # scan stage
    def stage_open(self) -> Deferred[int]:
        return self._store.call(stage_open)

    def stage_add(self, token: int, files: Sequence[StagedFile]) -> Deferred[None]:
        return self._store.call(stage_add, token, list(files))

    def stage_page(self, token: int, after: str | None = None,
                   limit: int = PAGE_SIZE) -> Deferred[list[StagedFile]]:
        return self._store.call(stage_page, token, after, limit)

    def stage_close(self, token: int) -> Deferred[None]:
        return self._store.call(stage_close, token)

    # announced records
    def put_announced(self, share_id: str, peer_id: str, records: Sequence[FileRecord],
                      acked: bool = False) -> Deferred[None]:
        return self._store.call(put_announced, share_id, peer_id, list(records), acked)

    def announced_page(self, share_id: str, peer_id: str, after: str | None = None,
                       limit: int = PAGE_SIZE) -> Deferred[list[FileRecord]]:
        return self._store.call(announced_page, share_id, peer_id, after, limit)

    def announced_many(self, share_id: str, peer_id: str,
                       paths: Sequence[str]) -> Deferred[dict[str, FileRecord]]:
        return self._store.call(announced_many, share_id, peer_id, list(paths))

    def set_acked(self, share_id: str, peer_id: str,
                  items: Sequence[tuple[str, str]]) -> Deferred[None]:
        return self._store.call(set_acked, share_id, peer_id, list(items))

    def acked_many(self, share_id: str, peer_id: str,
                   paths: Sequence[str]) -> Deferred[dict[str, str]]:
        return self._store.call(acked_many, share_id, peer_id, list(paths))

    def forget_announced(self, share_id: str, peer_id: str | None = None) -> Deferred[None]:
        return self._store.call(forget_announced, share_id, peer_id)

    def signed_page(self, share_id: str, kind: str, after: tuple[str, str] | None = None,
                    limit: int = PAGE_SIZE) -> Deferred[list[tuple[str, str, bytes, bytes]]]:
        return self._store.call(signed_page, share_id, kind, after, limit)

    # wanted files
    def put_wanted(self, share_id: str,
                   items: Sequence[tuple[FileRecord, str | None, Iterable[str]]]
                   ) -> Deferred[tuple[int, int]]:
        return self._store.call(put_wanted, share_id,
                                [(r, f, tuple(s)) for r, f, s in items])

    def wanted_page(self, share_id: str, after: str | None = None, limit: int = PAGE_SIZE,
                    source: str | None = None) -> Deferred[list[WantedRow]]:
        return self._store.call(wanted_page, share_id, after, limit, source)

    def wanted_many(self, share_id: str, paths: Sequence[str]) -> Deferred[dict[str, WantedRow]]:
        return self._store.call(wanted_many, share_id, list(paths))

    def wanted_totals(self, share_id: str) -> Deferred[tuple[int, int]]:
        return self._store.call(wanted_totals, share_id)

    def remove_wanted(self, share_id: str, paths: Sequence[str]) -> Deferred[tuple[int, int]]:
        return self._store.call(remove_wanted, share_id, list(paths))

    def remove_wanted_superseded(self, share_id: str,
                                 records: Sequence[FileRecord]) -> Deferred[tuple[int, int]]:
        return self._store.call(remove_wanted_superseded, share_id, list(records))

    def take_wanted_page(self, share_id: str, after: str | None,
                         limit: int) -> Deferred[list[WantedRow]]:
        return self._store.call(take_wanted_page, share_id, after, limit)

    def clear_wanted(self, share_id: str) -> Deferred[None]:
        return self._store.call(clear_wanted, share_id)

    def drop_source(self, share_id: str, peer_id: str) -> Deferred[None]:
        return self._store.call(drop_source, share_id, peer_id)

    # whole lists, one page at a time
    async def iter_announced(self, share_id: str, peer_id: str,
                             page_size: int = PAGE_SIZE) -> AsyncIterator[list[FileRecord]]:
        """Everything the peer announced, one page (list) at a time."""
        after = None
        while True:
            page = await self.announced_page(share_id, peer_id, after, page_size)
            if page:
                yield page
            if len(page) < page_size:
                return
            after = page[-1].path

    async def iter_wanted(self, share_id: str,
                          page_size: int = PAGE_SIZE) -> AsyncIterator[list[WantedRow]]:
        """Every wanted file, one page (list) at a time."""
        after = None
        while True:
            page = await self.wanted_page(share_id, after, page_size)
            if page:
                yield page
            if len(page) < page_size:
                return
            after = page[-1].record.path
