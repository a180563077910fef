"""The daemon's state in one SQLite file: shares, file records, peers, codes, config.

``StateDatabase`` is synchronous and is used only from the database thread.
``ShareStore`` is the face the rest of the daemon sees: each call is sent to
that thread through a ``SerialRunner`` and answered with a Deferred.

Durability: WAL journal with ``synchronous=NORMAL``.  In WAL mode that never
corrupts the file and loses nothing when the *process* dies (the commit is in
the WAL before ``COMMIT`` returns); only a power cut or kernel crash can drop
the last few commits, and those describe files that are still on disk, so the
next scan finds them again.  ``FULL`` would fsync on every commit, which costs
more than it buys for a cache of the disk's state.

Revisions: each share has a counter.  Every committed change set bumps it
once and stamps each row it wrote with the new value, so "what changed since
revision N" is a range query and the counter always equals the highest stamp.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator, Mapping, Sequence, TypeVar

from twisted.internet.defer import Deferred

from clearskies.errors import ConfigurationError
from clearskies.share.records import FileRecord
from clearskies.interfaces import IRunner

T = TypeVar("T")

SCHEMA_DIR = Path(__file__).with_name("schema")
#: Temporary tables every connection makes for itself (lists that last only
#: while the daemon runs; clearskies.share.pages), and their names.
SCRATCH_FILE = "scratch.sql"
SCRATCH_TABLES = ("wanted_sources", "wanted", "announced")
DB_FILENAME = "state.sqlite3"
PAGE_SIZE = 1000
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_MAX_SQL_PARAMETERS = 900  # below SQLite's oldest default limit of 999
ACCESS_LEVELS = ("read_write", "read_only", "untrusted", "unknown")
_MIGRATION_FILE = re.compile(r"(\d{3})_[a-z0-9_]+\.sql")

_FILE_COLUMNS = (
    "path, utime, deleted, is_dir, size, mtime_sec, mtime_nsec, mode, sha256, vv,"
    " file_id, file_key, conflict_source, revision, local_inode, local_size, local_mtime_ns"
)
#: The same columns for :func:`select_json` (``utime`` through ``quote``, which keeps it exact).
_FILE_COLUMNS_JSON = _FILE_COLUMNS.replace("utime", "quote(utime)", 1)
_SHARE_COLUMNS = "share_id, path, peer_id, access, revision, state, error, last_scan, created"
_PEER_COLUMNS = ("share_id, peer_id, name, last_seen, addresses, manifest_revision,"
                 " acked_revision")
_CODE_COLUMNS = "access_id, code, share_id, level, created, expires, one_time, used, revoked"


@dataclass(frozen=True, slots=True)
class CacheKey:
    """What a local file looked like when it was last hashed.

    If size, mtime and inode all still match, the content is taken as
    unchanged and the file is not read again.
    """

    inode: int
    size: int
    mtime_ns: int


@dataclass(frozen=True, slots=True)
class StoredRecord:
    """A record as stored: the protocol record plus our local bookkeeping."""

    record: FileRecord
    revision: int  # the share revision that last changed this row
    cache: CacheKey | None

    @property
    def path(self) -> str:
        return self.record.path


@dataclass(frozen=True, slots=True)
class LocalChange:
    """A change found by a scan, to be written only if the row did not move meanwhile.

    ``expected_revision`` is the row's revision stamp the scan compared with
    (None: there was no row).  If another writer (the sync layer storing a
    downloaded file) changed the row since, the change is dropped and the
    next scan looks at the path again.
    """

    record: FileRecord
    cache: CacheKey | None
    expected_revision: int | None


@dataclass(frozen=True, slots=True)
class ShareInfo:
    share_id: str
    path: str
    peer_id: str
    access: str
    revision: int = 0
    state: str = "ok"  # "ok" or "error"
    error: str | None = None
    last_scan: float | None = None  # start time of the last completed full scan
    created: float = 0.0


@dataclass(frozen=True, slots=True)
class ShareCounts:
    files: int
    directories: int
    deleted: int
    bytes: int


@dataclass(frozen=True, slots=True)
class PeerInfo:
    share_id: str
    peer_id: str
    name: str | None = None
    last_seen: float | None = None
    addresses: tuple[str, ...] = ()
    manifest_revision: int | float | None = None  # last revision of their manifest we saw
    acked_revision: int | None = None  # our revision they acknowledged


@dataclass(frozen=True, slots=True)
class AccessCodeInfo:
    access_id: str
    code: str  # hex of the 16 secret bytes; never log it
    share_id: str
    level: str
    created: float
    expires: float | None = None
    one_time: bool = True
    used: bool = False
    revoked: bool = False

    def usable(self, now: float) -> bool:
        """True if a peer presenting this code may still be let in."""
        if self.revoked or (self.one_time and self.used):
            return False
        return self.expires is None or now < self.expires

    def __repr__(self) -> str:  # keep the secret out of logs and tracebacks
        return "AccessCodeInfo(access_id=%r, share_id=%r, level=%r)" % (
            self.access_id, self.share_id, self.level)


def migrations(schema_dir: Path = SCHEMA_DIR) -> list[tuple[int, Path]]:
    """The numbered schema files, checked to run 1, 2, 3… without gaps."""
    found = []
    for entry in schema_dir.iterdir():
        match = _MIGRATION_FILE.fullmatch(entry.name)
        if match:
            found.append((int(match.group(1)), entry))
    found.sort()
    numbers = [number for number, _ in found]
    if numbers != list(range(1, len(found) + 1)):
        raise ConfigurationError(
            "schema files in %s are not numbered 001, 002, …: %r" % (schema_dir, numbers))
    return found


def migrate(conn: sqlite3.Connection, schema_dir: Path = SCHEMA_DIR) -> int:
    """Bring the schema up to date, one file per transaction; return the version.

    The version lives in ``PRAGMA user_version``, which SQLite writes inside
    the same transaction as the file's statements, so a crash never leaves a
    half-applied step behind.
    """
    steps = migrations(schema_dir)
    current = conn.execute("PRAGMA user_version").fetchone()[0]
    if current > len(steps):
        raise ConfigurationError(
            "the state database has schema version %d but this version of ClearSkies only "
            "knows %d; run the newer version again or restore a backup" % (current, len(steps)))
    for number, path in steps[current:]:
        script = path.read_text(encoding="utf-8")
        try:
            conn.executescript(
                "BEGIN IMMEDIATE;\n%s\n;PRAGMA user_version = %d;\nCOMMIT;" % (script, number))
        except sqlite3.Error as e:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise ConfigurationError(
                "could not upgrade the state database with %s: %s" % (path.name, e)) from e
        current = number
    return current


class StateDatabase:
    """Synchronous access to the state database; use from one thread only."""

    def __init__(self, path: str | os.PathLike[str], schema_dir: Path = SCHEMA_DIR) -> None:
        self.path = Path(path)
        try:
            if not self.path.exists():
                # Create it private: it holds access codes.  SQLite gives its
                # -wal and -shm files the same permissions.
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
        except OSError as e:
            raise ConfigurationError(
                "cannot create the state database %s: %s" % (self.path, e.strerror)) from e
        try:
            self._conn = sqlite3.connect(self.path, isolation_level=None,
                                         check_same_thread=False, timeout=30)
            mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        except sqlite3.DatabaseError as e:
            raise ConfigurationError(
                "cannot open the state database %s: %s" % (self.path, e)) from e
        if mode != "wal":
            raise ConfigurationError("the state database %s cannot use WAL mode (got %r); "
                                     "is it on a network file system?" % (self.path, mode))
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        self.schema_version = migrate(self._conn, schema_dir)
        scratch = schema_dir / SCRATCH_FILE
        if scratch.exists():  # (test schemas may have none)
            self._conn.executescript(scratch.read_text(encoding="utf-8"))

    def close(self) -> None:
        self._conn.close()

    @property
    def connection(self) -> sqlite3.Connection:
        """The connection, for queries kept in other modules (clearskies.share.pages)."""
        return self._conn

    def transaction(self) -> Any:
        """A write transaction (``with db.transaction() as conn:``), committed on exit."""
        return self._transaction()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def integrity_check(self) -> str:
        """SQLite's own consistency check: ``"ok"`` when the file is sound."""
        return "\n".join(row[0] for row in self._conn.execute("PRAGMA integrity_check"))

    # -- shares -------------------------------------------------------------

    def add_share(self, share: ShareInfo) -> ShareInfo:
        """Insert a new share; ConfigurationError if its ID or path is taken."""
        if share.access not in ACCESS_LEVELS:
            raise ValueError("unknown access level %r" % share.access)
        try:
            with self._transaction() as conn:
                conn.execute(
                    "INSERT INTO shares (%s) VALUES (?,?,?,?,?,?,?,?,?)" % _SHARE_COLUMNS,
                    (share.share_id, share.path, share.peer_id, share.access, share.revision,
                     share.state, share.error, share.last_scan, share.created))
        except sqlite3.IntegrityError as e:
            raise ConfigurationError(
                "a share with this ID or at %s already exists; remove it first" % share.path
            ) from e
        return share

    def get_share(self, share_id: str) -> ShareInfo | None:
        row = self._conn.execute(
            "SELECT %s FROM shares WHERE share_id = ?" % _SHARE_COLUMNS, (share_id,)).fetchone()
        return ShareInfo(*row) if row else None

    def get_share_by_path(self, path: str) -> ShareInfo | None:
        row = self._conn.execute(
            "SELECT %s FROM shares WHERE path = ?" % _SHARE_COLUMNS, (path,)).fetchone()
        return ShareInfo(*row) if row else None

    def list_shares(self) -> list[ShareInfo]:
        rows = self._conn.execute("SELECT %s FROM shares ORDER BY path" % _SHARE_COLUMNS)
        return [ShareInfo(*row) for row in rows]

    def remove_share(self, share_id: str) -> None:
        """Forget a share and everything about it (records, peers, codes)."""
        with self._transaction() as conn:
            conn.execute("DELETE FROM shares WHERE share_id = ?", (share_id,))
            for table in SCRATCH_TABLES:  # (temporary tables: no cascade from shares)
                conn.execute("DELETE FROM temp.%s WHERE share_id = ?" % table, (share_id,))

    def set_share_state(self, share_id: str, state: str, error: str | None = None) -> None:
        with self._transaction() as conn:
            conn.execute("UPDATE shares SET state = ?, error = ? WHERE share_id = ?",
                         (state, error, share_id))

    def set_last_scan(self, share_id: str, when: float) -> None:
        with self._transaction() as conn:
            conn.execute("UPDATE shares SET last_scan = ? WHERE share_id = ?", (when, share_id))

    def get_revision(self, share_id: str) -> int:
        row = self._conn.execute(
            "SELECT revision FROM shares WHERE share_id = ?", (share_id,)).fetchone()
        if row is None:
            raise KeyError(share_id)
        return row[0]

    def share_counts(self, share_id: str) -> ShareCounts:
        row = self._conn.execute(
            "SELECT COALESCE(SUM(deleted = 0 AND is_dir = 0), 0),"
            " COALESCE(SUM(deleted = 0 AND is_dir = 1), 0), COALESCE(SUM(deleted), 0),"
            " COALESCE(SUM(CASE WHEN deleted = 0 THEN size END), 0)"
            " FROM files WHERE share_id = ?", (share_id,)).fetchone()
        return ShareCounts(*row)

    # -- file records -------------------------------------------------------

    def get_record(self, share_id: str, path: str) -> FileRecord | None:
        stored = self.get_stored(share_id, path)
        return stored.record if stored else None

    def get_stored(self, share_id: str, path: str) -> StoredRecord | None:
        row = self._conn.execute(
            "SELECT %s FROM files WHERE share_id = ? AND path = ?" % _FILE_COLUMNS,
            (share_id, path)).fetchone()
        return _stored_from_row(row) if row else None

    def get_stored_many(self, share_id: str, paths: Sequence[str]) -> dict[str, StoredRecord]:
        """The stored rows of many paths at once (absent paths are left out)."""
        if not paths:
            return {}
        rows = select_json(self._conn, _FILE_COLUMNS_JSON,
                           "FROM files WHERE share_id = ? AND path IN"
                           " (SELECT value FROM json_each(?))",
                           (share_id, as_json(list(dict.fromkeys(paths)))))
        found: dict[str, StoredRecord] = {}
        for row in rows:
            stored = _stored_from_json(row)
            found[stored.path] = stored
        return found

    def records_between(self, share_id: str, low: str = "", high: str | None = None,
                        after: str | None = None, limit: int = PAGE_SIZE) -> list[StoredRecord]:
        """One page of rows with ``low <= path < high`` and ``path > after``, in path order.

        Paths compare as UTF-8 bytes, which is the order of Python's ``str``
        comparison, so a caller can merge a page with a sorted Python list.
        """
        where, args = path_range(low, high, after, limit)
        rows = select_json(self._conn, _FILE_COLUMNS_JSON, "FROM files WHERE share_id = ?"
                           + where, [share_id, *args])
        rows.sort(key=lambda row: row[0])  # (already in order: a linear check)
        return [_stored_from_json(row) for row in rows]

    def conflict_copies(self, share_id: str, limit: int = PAGE_SIZE) -> list[FileRecord]:
        """Live conflict copies of the share (records with a ``conflict_source``), by path."""
        rows = self._conn.execute(
            "SELECT %s FROM files INDEXED BY files_conflict_copies"
            " WHERE share_id = ? AND conflict_source IS NOT NULL"
            " AND deleted = 0 ORDER BY path LIMIT ?" % _FILE_COLUMNS, (share_id, limit))
        return [_stored_from_row(row).record for row in rows]

    def records_between_many(self, share_id: str, ranges: Sequence[tuple[str, str | None]],
                             limit: int = PAGE_SIZE) -> list[list[StoredRecord]]:
        """The first page of :meth:`records_between` for each (low, high) range.

        One call for many small ranges (a partial scan of many single files)
        instead of one database round trip per range.
        """
        return [self.records_between(share_id, low, high, None, limit) for low, high in ranges]

    def records_page(self, share_id: str, after: str | None = None,
                     limit: int = PAGE_SIZE) -> list[FileRecord]:
        """The next ``limit`` records (tombstones included) after ``after``, in path order.

        Call again with the last path returned until the page is short; this
        is how a manifest is built without loading the whole share.
        """
        return [s.record for s in self.records_between(share_id, "", None, after, limit)]

    def changed_since(self, share_id: str, revision: int, after: tuple[int, str] | None = None,
                      limit: int = PAGE_SIZE) -> list[StoredRecord]:
        """Rows stamped with a revision above ``revision``, ordered by (revision, path).

        Page on with ``after=(last.revision, last.path)``.
        """
        sql = "SELECT %s FROM files WHERE share_id = ? AND revision > ?" % _FILE_COLUMNS
        args: list[Any] = [share_id, revision]
        if after is not None:
            sql += " AND (revision, path) > (?, ?)"
            args.extend(after)
        sql += " ORDER BY revision, path LIMIT ?"
        args.append(limit)
        return [_stored_from_row(row) for row in self._conn.execute(sql, args)]

    def find_by_sha256(self, share_id: str, sha256: str) -> list[StoredRecord]:
        """Live (not deleted) files with this content, for copying instead of downloading."""
        rows = self._conn.execute(
            # Without statistics SQLite prefers the primary key (a scan of the whole
            # share, per downloaded file); the partial index answers at once.
            "SELECT %s FROM files INDEXED BY files_by_sha256"
            " WHERE share_id = ? AND sha256 = ? AND deleted = 0"
            " ORDER BY path" % _FILE_COLUMNS, (share_id, sha256))
        return [_stored_from_row(row) for row in rows]

    def find_by_sha256_many(self, share_id: str,
                            hashes: Sequence[str]) -> dict[str, list[StoredRecord]]:
        """:meth:`find_by_sha256` for many hashes at once (hashes without a live file are left out)."""
        found: dict[str, list[StoredRecord]] = {}
        unique = list(dict.fromkeys(hashes))
        for start in range(0, len(unique), 500):
            chunk = unique[start:start + 500]
            rows = self._conn.execute(
                "SELECT %s FROM files INDEXED BY files_by_sha256"
                " WHERE share_id = ? AND sha256 IN (%s) AND deleted = 0"
                " ORDER BY path" % (_FILE_COLUMNS, ",".join("?" * len(chunk))),
                [share_id, *chunk])
            for row in rows:
                stored = _stored_from_row(row)
                found.setdefault(stored.record.sha256, []).append(stored)
        return found

    def apply_changes(self, share_id: str, records: Sequence[FileRecord],
                      cache_keys: Mapping[str, CacheKey] | None = None) -> int:
        """Store records in one transaction; return the new share revision.

        The revision is bumped once and every row written is stamped with it.
        ``cache_keys`` gives the local file's cache key per path when the
        content on disk is known to match (e.g. a file the sync layer just
        wrote); rows without one get hashed on the next scan.  Records must
        describe what is on disk: don't store a remote record before its
        content has been written locally.  Empty input changes nothing.
        """
        if not records:
            return self.get_revision(share_id)
        keys = cache_keys or {}
        with self._transaction() as conn:
            revision = self._bump_revision(conn, share_id)
            _write_rows(conn, [_row_from_record(share_id, r, revision, keys.get(r.path))
                               for r in records])
        return revision

    def apply_local_changes(self, share_id: str, changes: Sequence[LocalChange]
                            ) -> tuple[int, list[FileRecord]]:
        """Store scan results whose rows are still as the scan saw them.

        Returns the new revision and the records actually written (a change
        whose row was rewritten meanwhile is skipped).  Nothing written → the
        revision is not bumped.
        """
        with self._transaction() as conn:
            current: dict[str, int] = {}
            paths = [change.record.path for change in changes]
            for start in range(0, len(paths), _MAX_SQL_PARAMETERS):
                chunk = paths[start:start + _MAX_SQL_PARAMETERS]
                current.update(conn.execute(
                    "SELECT path, revision FROM files WHERE share_id = ? AND path IN (%s)"
                    % ",".join("?" * len(chunk)), [share_id, *chunk]))
            fresh = [c for c in changes if current.get(c.record.path) == c.expected_revision]
            if not fresh:
                return self._current_revision(conn, share_id), []
            revision = self._bump_revision(conn, share_id)
            _write_rows(conn, [_row_from_record(share_id, c.record, revision, c.cache)
                               for c in fresh])
        return revision, [c.record for c in fresh]

    def refresh_cache_keys(self, share_id: str,
                           items: Sequence[tuple[str, CacheKey, int]]) -> None:
        """Store new cache keys for rows whose record is unchanged: no revision bump.

        Each item is (path, cache key, expected row revision); rows rewritten
        since the caller read them are left alone.
        """
        with self._transaction() as conn:
            conn.executemany(
                "UPDATE files SET local_inode = ?, local_size = ?, local_mtime_ns = ?"
                " WHERE share_id = ? AND path = ? AND revision = ?",
                [(_signed(key.inode), key.size, key.mtime_ns, share_id, path, revision)
                 for path, key, revision in items])

    @staticmethod
    def _current_revision(conn: sqlite3.Connection, share_id: str) -> int:
        row = conn.execute("SELECT revision FROM shares WHERE share_id = ?",
                           (share_id,)).fetchone()
        if row is None:
            raise KeyError(share_id)
        return row[0]

    def _bump_revision(self, conn: sqlite3.Connection, share_id: str) -> int:
        revision = self._current_revision(conn, share_id) + 1
        conn.execute("UPDATE shares SET revision = ? WHERE share_id = ?", (revision, share_id))
        return revision

    # -- peers --------------------------------------------------------------

    def upsert_peer(self, peer: PeerInfo, forget: Sequence[str] = ()) -> None:
        """Insert or replace everything we know about one peer of one share, and
        forget the peers ``forget`` of that share in the same transaction (the
        runtime bounds the table, see ShareRuntime)."""
        with self._transaction() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO peers (%s) VALUES (?,?,?,?,?,?,?)" % _PEER_COLUMNS,
                (peer.share_id, peer.peer_id, peer.name, peer.last_seen,
                 json.dumps(list(peer.addresses)), peer.manifest_revision, peer.acked_revision))
            conn.executemany("DELETE FROM peers WHERE share_id = ? AND peer_id = ?",
                             [(peer.share_id, peer_id) for peer_id in forget])

    def forget_peers(self, share_id: str, peer_ids: Sequence[str]) -> None:
        """Forget several peers of one share at once."""
        with self._transaction() as conn:
            conn.executemany("DELETE FROM peers WHERE share_id = ? AND peer_id = ?",
                             [(share_id, peer_id) for peer_id in peer_ids])

    def get_peer(self, share_id: str, peer_id: str) -> PeerInfo | None:
        row = self._conn.execute(
            "SELECT %s FROM peers WHERE share_id = ? AND peer_id = ?" % _PEER_COLUMNS,
            (share_id, peer_id)).fetchone()
        return _peer_from_row(row) if row else None

    def list_peers(self, share_id: str) -> list[PeerInfo]:
        rows = self._conn.execute(
            "SELECT %s FROM peers WHERE share_id = ? ORDER BY peer_id" % _PEER_COLUMNS,
            (share_id,))
        return [_peer_from_row(row) for row in rows]

    def remove_peer(self, share_id: str, peer_id: str) -> None:
        with self._transaction() as conn:
            conn.execute("DELETE FROM peers WHERE share_id = ? AND peer_id = ?",
                         (share_id, peer_id))

    # -- access codes -------------------------------------------------------

    def add_access_code(self, code: AccessCodeInfo) -> None:
        with self._transaction() as conn:
            conn.execute(
                "INSERT INTO access_codes (%s) VALUES (?,?,?,?,?,?,?,?,?)" % _CODE_COLUMNS,
                (code.access_id, code.code, code.share_id, code.level, code.created,
                 code.expires, int(code.one_time), int(code.used), int(code.revoked)))

    def get_access_code(self, access_id: str) -> AccessCodeInfo | None:
        row = self._conn.execute(
            "SELECT %s FROM access_codes WHERE access_id = ?" % _CODE_COLUMNS,
            (access_id,)).fetchone()
        return _code_from_row(row) if row else None

    def list_access_codes(self, share_id: str | None = None) -> list[AccessCodeInfo]:
        if share_id is None:
            rows = self._conn.execute(
                "SELECT %s FROM access_codes ORDER BY created, access_id" % _CODE_COLUMNS)
        else:
            rows = self._conn.execute(
                "SELECT %s FROM access_codes WHERE share_id = ? ORDER BY created, access_id"
                % _CODE_COLUMNS, (share_id,))
        return [_code_from_row(row) for row in rows]

    def mark_access_code_used(self, access_id: str) -> None:
        self._set_code_flag(access_id, "used")

    def revoke_access_code(self, access_id: str) -> None:
        self._set_code_flag(access_id, "revoked")

    def _set_code_flag(self, access_id: str, column: str) -> None:
        with self._transaction() as conn:
            cursor = conn.execute("UPDATE access_codes SET %s = 1 WHERE access_id = ?" % column,
                                  (access_id,))
            if cursor.rowcount != 1:
                raise KeyError(access_id)

    def delete_access_code(self, access_id: str) -> None:
        with self._transaction() as conn:
            conn.execute("DELETE FROM access_codes WHERE access_id = ?", (access_id,))

    # -- config -------------------------------------------------------------

    def get_config(self, key: str, default: Any = None) -> Any:
        row = self._conn.execute("SELECT value FROM config WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def set_config(self, key: str, value: Any) -> None:
        """Store any JSON-serialisable value under ``key``."""
        text = json.dumps(value)
        with self._transaction() as conn:
            conn.execute("INSERT OR REPLACE INTO config (key, value) VALUES (?, ?)", (key, text))

    def all_config(self) -> dict[str, Any]:
        return {key: json.loads(value)
                for key, value in self._conn.execute("SELECT key, value FROM config")}

    # -- signed messages (read-only shares) ---------------------------------------

    def put_signed(self, share_id: str,
                   rows: Sequence[tuple[str, str, str, bytes | None, bytes | None]]) -> None:
        """Store (kind, key, part, text, signature) rows; a row without text is deleted."""
        with self._transaction() as conn:
            for kind, key, part, text, signature in rows:
                if text is None:
                    conn.execute("DELETE FROM signed_messages WHERE share_id = ? AND kind = ?"
                                 " AND key = ? AND part = ?", (share_id, kind, key, part))
                else:
                    conn.execute("INSERT OR REPLACE INTO signed_messages (share_id, kind, key,"
                                 " part, text, signature) VALUES (?, ?, ?, ?, ?, ?)",
                                 (share_id, kind, key, part, text, signature))

    def list_signed(self, share_id: str) -> list[tuple[str, str, str, bytes, bytes]]:
        return [(kind, key, part, bytes(text), bytes(signature))
                for kind, key, part, text, signature in self._conn.execute(
                    "SELECT kind, key, part, text, signature FROM signed_messages"
                    " WHERE share_id = ? ORDER BY rowid", (share_id,))]


# -- many rows in one SQLite step ---------------------------------------------------
#
# Python's sqlite3 lets go of the GIL around every step of a statement: one per
# row read, and one per row of an ``executemany``.  On the database thread of a
# busy daemon each hand-off back costs the reactor thread a wait for the lock
# (bench/README.md, "Fewer hand-offs of the database thread").  So the lists
# that cross the database by the thousand during a sync go in and come out as
# one JSON text each: one step, one hand-off.


def select_json(conn: sqlite3.Connection, columns: str, tail: str,
                args: Sequence[Any]) -> list[list[Any]]:
    """The rows of ``SELECT columns tail`` read in one step, each a list of its values.

    ``columns`` must give every REAL column through ``quote()`` (JSON would
    write it with 15 digits, losing bits; ``quote`` writes it exactly): the
    caller turns those strings back with ``float``.  No BLOB columns.  The
    rows keep ``tail``'s ORDER BY (SQLite concatenates them in the order the
    inner query gives them; callers that page sort again to be sure).
    """
    text = conn.execute(
        "SELECT '[' || group_concat(j, ',') || ']' FROM (SELECT json_array(%s) AS j %s)"
        % (columns, tail), args).fetchone()[0]
    return json.loads(text) if text else []


def path_range(low: str, high: str | None, after: str | None,
               limit: int) -> tuple[str, list[Any]]:
    """`` AND path >= low [AND path < high] [AND path > after] ORDER BY path LIMIT limit``
    and its arguments: one page of a path range, for a query's tail."""
    sql, args = " AND path >= ?", [low]
    if high is not None:
        sql += " AND path < ?"
        args.append(high)
    if after is not None:
        sql += " AND path > ?"
        args.append(after)
    return sql + " ORDER BY path LIMIT ?", [*args, limit]


def as_json(rows: Sequence[Sequence[Any]]) -> str:
    """Values to hand to ``json_each(?)`` (a list of paths to look up, in one parameter)."""
    return json.dumps(rows, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


#: Rows one INSERT statement of :func:`insert_rows` takes (18 columns: 1,800 parameters).
ROWS_PER_STATEMENT = 100


def insert_rows(conn: sqlite3.Connection, head: str, rows: Sequence[Sequence[Any]],
                tail: str = "") -> None:
    """``head VALUES (?, …), (?, …), … tail`` for ``rows``, ROWS_PER_STATEMENT a statement.

    One SQLite step a statement: ``executemany`` steps once per row, and
    hands the GIL to another thread and waits to get it back each time.
    Rows that arrive as JSON (``json_each``) step once too, but reading
    each column back out of the JSON costs SQLite three times as much.
    """
    if not rows:
        return
    one = "(%s)" % ", ".join("?" * len(rows[0]))
    for start in range(0, len(rows), ROWS_PER_STATEMENT):
        chunk = rows[start:start + ROWS_PER_STATEMENT]
        conn.execute("%s VALUES %s%s" % (head, ", ".join([one] * len(chunk)), tail),
                     [value for row in chunk for value in row])


def _stored_from_json(row: list[Any]) -> StoredRecord:
    row[1] = float(row[1])
    return _stored_from_row(row)


def _row_from_record(share_id: str, r: FileRecord, revision: int,
                     cache: CacheKey | None) -> tuple[Any, ...]:
    mtime = r.mtime or (None, None)
    if r.deleted:
        cache = None
    row = (share_id, r.path, r.utime, int(r.deleted), int(r.is_dir), r.size, mtime[0],
           mtime[1], r.mode, r.sha256, json.dumps(r.vv, sort_keys=True, separators=(",", ":")),
           r.file_id, r.key, r.conflict_source, revision,
           _signed(cache.inode) if cache else None, cache.size if cache else None,
           cache.mtime_ns if cache else None)
    for value in row:
        if isinstance(value, int) and not _INT64_MIN <= value <= _INT64_MAX:
            # Records and cache keys are range-checked where they come in (from
            # peers, from the disk); one that is not is a bug, said plainly.
            raise ValueError("the record of %r holds %d, which does not fit the database"
                             % (r.path, value))
    return row


def _write_rows(conn: sqlite3.Connection, rows: Sequence[Sequence[Any]]) -> None:
    """INSERT OR REPLACE rows of ``files`` (from :func:`_row_from_record`)."""
    insert_rows(conn, "INSERT OR REPLACE INTO files (share_id, %s)" % _FILE_COLUMNS, rows)


def has_live_files(db: StateDatabase, share_id: str) -> bool:
    """Whether the share records any live file.  The look ends at the first one found,
    where ``share_counts`` reads every row (only a share of nothing but deletions
    and folders is read whole)."""
    return bool(db.connection.execute(
        "SELECT EXISTS (SELECT 1 FROM files WHERE share_id = ? AND deleted = 0"
        " AND is_dir = 0)", (share_id,)).fetchone()[0])


def identical_conflict_copies(db: StateDatabase, share_id: str, limit: int = PAGE_SIZE
                              ) -> list[tuple[StoredRecord, StoredRecord]]:
    """(copy, its file) for live conflict copies holding what their file holds now."""
    columns = ", ".join("%s.%s" % (side, c.strip()) for side in ("c", "f")
                        for c in _FILE_COLUMNS.split(","))
    rows = db.connection.execute(
        "SELECT %s FROM files AS c INDEXED BY files_conflict_copies"
        " JOIN files AS f ON f.share_id = c.share_id AND f.path = c.conflict_source"
        " WHERE c.share_id = ? AND c.conflict_source IS NOT NULL AND c.deleted = 0"
        " AND c.is_dir = 0 AND f.deleted = 0 AND f.is_dir = 0 AND f.sha256 = c.sha256"
        " AND f.size = c.size ORDER BY c.path LIMIT ?" % columns, (share_id, limit))
    width = len(_FILE_COLUMNS.split(","))
    return [(_stored_from_row(row[:width]), _stored_from_row(row[width:])) for row in rows]


def _stored_from_row(row: Sequence[Any]) -> StoredRecord:
    (path, utime, deleted, is_dir, size, mtime_sec, mtime_nsec, mode, sha256, vv, file_id,
     file_key, conflict_source, revision, inode, local_size, local_mtime_ns) = row
    record = FileRecord(
        path=path, utime=utime, deleted=bool(deleted), size=size,
        mtime=(mtime_sec, mtime_nsec) if mtime_sec is not None else None, mode=mode,
        sha256=sha256, is_dir=bool(is_dir), vv=json.loads(vv), file_id=file_id, key=file_key,
        conflict_source=conflict_source)
    cache = CacheKey(inode % 2**64, local_size, local_mtime_ns) if inode is not None else None
    return StoredRecord(record, revision, cache)


def _signed(inode: int) -> int:
    """An inode number (up to 2**64 - 1 on some file systems) as SQLite's signed INTEGER."""
    return inode - 2**64 if inode >= 2**63 else inode


def _peer_from_row(row: Sequence[Any]) -> PeerInfo:
    share_id, peer_id, name, last_seen, addresses, manifest_revision, acked = row
    return PeerInfo(share_id, peer_id, name, last_seen, tuple(json.loads(addresses)),
                    manifest_revision, acked)


def _code_from_row(row: Sequence[Any]) -> AccessCodeInfo:
    access_id, code, share_id, level, created, expires, one_time, used, revoked = row
    return AccessCodeInfo(access_id, code, share_id, level, created, expires,
                          bool(one_time), bool(used), bool(revoked))


class ShareStore:
    """Asynchronous face of ``StateDatabase``: every call runs on the database thread.

    Give it a ``SerialRunner`` in the daemon (one thread, calls in order) and
    a ``SyncRunner`` in tests.  The database is opened by the first call, on
    that thread.  Each method returns a Deferred of what the same-named
    ``StateDatabase`` method returns.
    """

    def __init__(self, db_path: str | os.PathLike[str], runner: IRunner,
                 schema_dir: Path = SCHEMA_DIR) -> None:
        self.db_path = Path(db_path)
        self._runner = runner
        self._schema_dir = schema_dir
        self._db: StateDatabase | None = None

    def call(self, function: Callable[..., T], *args: Any) -> Deferred[T]:
        """Run ``function(state_database, *args)`` on the database thread.

        For queries kept in other modules (clearskies.share.pages).
        """
        return self._runner.run(self._invoke, function, args)

    def _call(self, method: Callable[..., T], *args: Any) -> Deferred[T]:
        return self._runner.run(self._invoke, method, args)

    def _invoke(self, method: Callable[..., T], args: tuple[Any, ...]) -> T:
        if self._db is None:
            self._db = StateDatabase(self.db_path, self._schema_dir)
        return method(self._db, *args)

    def close(self) -> Deferred[None]:
        return self._runner.run(self._close)

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def integrity_check(self) -> Deferred[str]:
        return self._call(StateDatabase.integrity_check)

    # shares
    def add_share(self, share: ShareInfo) -> Deferred[ShareInfo]:
        return self._call(StateDatabase.add_share, share)

    def get_share(self, share_id: str) -> Deferred[ShareInfo | None]:
        return self._call(StateDatabase.get_share, share_id)

    def get_share_by_path(self, path: str) -> Deferred[ShareInfo | None]:
        return self._call(StateDatabase.get_share_by_path, path)

    def list_shares(self) -> Deferred[list[ShareInfo]]:
        return self._call(StateDatabase.list_shares)

    def remove_share(self, share_id: str) -> Deferred[None]:
        return self._call(StateDatabase.remove_share, share_id)

    def set_share_state(self, share_id: str, state: str,
                        error: str | None = None) -> Deferred[None]:
        return self._call(StateDatabase.set_share_state, share_id, state, error)

    def set_last_scan(self, share_id: str, when: float) -> Deferred[None]:
        return self._call(StateDatabase.set_last_scan, share_id, when)

    def get_revision(self, share_id: str) -> Deferred[int]:
        return self._call(StateDatabase.get_revision, share_id)

    def share_counts(self, share_id: str) -> Deferred[ShareCounts]:
        return self._call(StateDatabase.share_counts, share_id)

    # file records
    def get_record(self, share_id: str, path: str) -> Deferred[FileRecord | None]:
        return self._call(StateDatabase.get_record, share_id, path)

    def get_stored(self, share_id: str, path: str) -> Deferred[StoredRecord | None]:
        return self._call(StateDatabase.get_stored, share_id, path)

    def get_stored_many(self, share_id: str,
                        paths: Sequence[str]) -> Deferred[dict[str, StoredRecord]]:
        return self._call(StateDatabase.get_stored_many, share_id, list(paths))

    def records_between(self, share_id: str, low: str = "", high: str | None = None,
                        after: str | None = None,
                        limit: int = PAGE_SIZE) -> Deferred[list[StoredRecord]]:
        return self._call(StateDatabase.records_between, share_id, low, high, after, limit)

    def records_between_many(self, share_id: str, ranges: Sequence[tuple[str, str | None]],
                             limit: int = PAGE_SIZE) -> Deferred[list[list[StoredRecord]]]:
        return self._call(StateDatabase.records_between_many, share_id, list(ranges), limit)

    def records_page(self, share_id: str, after: str | None = None,
                     limit: int = PAGE_SIZE) -> Deferred[list[FileRecord]]:
        return self._call(StateDatabase.records_page, share_id, after, limit)

    async def iter_records(self, share_id: str,
                           page_size: int = PAGE_SIZE) -> AsyncIterator[list[FileRecord]]:
        """All records of a share in path order, one page (list) at a time."""
        after = None
        while True:
            page = await self.records_page(share_id, after, page_size)
            if page:
                yield page
            if len(page) < page_size:
                return
            after = page[-1].path

    def changed_since(self, share_id: str, revision: int, after: tuple[int, str] | None = None,
                      limit: int = PAGE_SIZE) -> Deferred[list[StoredRecord]]:
        return self._call(StateDatabase.changed_since, share_id, revision, after, limit)

    def find_by_sha256(self, share_id: str, sha256: str) -> Deferred[list[StoredRecord]]:
        return self._call(StateDatabase.find_by_sha256, share_id, sha256)

    def find_by_sha256_many(self, share_id: str,
                            hashes: Sequence[str]) -> Deferred[dict[str, list[StoredRecord]]]:
        return self._call(StateDatabase.find_by_sha256_many, share_id, list(hashes))

    def apply_changes(self, share_id: str, records: Sequence[FileRecord],
                      cache_keys: Mapping[str, CacheKey] | None = None) -> Deferred[int]:
        return self._call(StateDatabase.apply_changes, share_id, list(records),
                          dict(cache_keys or {}))

    def apply_local_changes(self, share_id: str, changes: Sequence[LocalChange]
                            ) -> Deferred[tuple[int, list[FileRecord]]]:
        return self._call(StateDatabase.apply_local_changes, share_id, list(changes))

    def refresh_cache_keys(self, share_id: str,
                           items: Sequence[tuple[str, CacheKey, int]]) -> Deferred[None]:
        return self._call(StateDatabase.refresh_cache_keys, share_id, list(items))

    # peers
    def upsert_peer(self, peer: PeerInfo, forget: Sequence[str] = ()) -> Deferred[None]:
        return self._call(StateDatabase.upsert_peer, peer, list(forget))

    def forget_peers(self, share_id: str, peer_ids: Sequence[str]) -> Deferred[None]:
        return self._call(StateDatabase.forget_peers, share_id, list(peer_ids))

    def get_peer(self, share_id: str, peer_id: str) -> Deferred[PeerInfo | None]:
        return self._call(StateDatabase.get_peer, share_id, peer_id)

    def list_peers(self, share_id: str) -> Deferred[list[PeerInfo]]:
        return self._call(StateDatabase.list_peers, share_id)

    def remove_peer(self, share_id: str, peer_id: str) -> Deferred[None]:
        return self._call(StateDatabase.remove_peer, share_id, peer_id)

    # access codes
    def add_access_code(self, code: AccessCodeInfo) -> Deferred[None]:
        return self._call(StateDatabase.add_access_code, code)

    def get_access_code(self, access_id: str) -> Deferred[AccessCodeInfo | None]:
        return self._call(StateDatabase.get_access_code, access_id)

    def list_access_codes(self, share_id: str | None = None) -> Deferred[list[AccessCodeInfo]]:
        return self._call(StateDatabase.list_access_codes, share_id)

    def mark_access_code_used(self, access_id: str) -> Deferred[None]:
        return self._call(StateDatabase.mark_access_code_used, access_id)

    def revoke_access_code(self, access_id: str) -> Deferred[None]:
        return self._call(StateDatabase.revoke_access_code, access_id)

    def delete_access_code(self, access_id: str) -> Deferred[None]:
        return self._call(StateDatabase.delete_access_code, access_id)

    # config
    def get_config(self, key: str, default: Any = None) -> Deferred[Any]:
        return self._call(StateDatabase.get_config, key, default)

    def set_config(self, key: str, value: Any) -> Deferred[None]:
        return self._call(StateDatabase.set_config, key, value)

    def all_config(self) -> Deferred[dict[str, Any]]:
        return self._call(StateDatabase.all_config)

    # signed messages
    def put_signed(self, share_id: str,
                   rows: Sequence[tuple[str, str, str, bytes | None, bytes | None]]
                   ) -> Deferred[None]:
        return self._call(StateDatabase.put_signed, share_id, rows)

    def list_signed(self, share_id: str) -> Deferred[list[tuple[str, str, str, bytes, bytes]]]:
        return self._call(StateDatabase.list_signed, share_id)
