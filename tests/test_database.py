"""The state database: schema migrations, records and revisions, peers, codes, config."""

import os
import random
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from clearskies.errors import ConfigurationError
from clearskies.share.database import (
    ROWS_PER_STATEMENT, SCHEMA_DIR, AccessCodeInfo, CacheKey, LocalChange, PeerInfo,
    ShareCounts, ShareInfo, ShareStore, StateDatabase, has_live_files, insert_rows, migrations)
from clearskies.share.records import FileRecord
from clearskies.threads import SerialRunner, SyncRunner
from tests.helpers import (
    STATE_PEER, STATE_SHARE, async_test, result_of, state_database, stored_file, temporary_dir)

SHARE = STATE_SHARE
PEER = STATE_PEER
OTHER = "b" * 32


@pytest.fixture
def db(tmp_path):
    database = state_database(tmp_path / "state.sqlite3")
    yield database
    database.close()


file = stored_file


# -- schema --------------------------------------------------------------------

def test_migrates_an_empty_file(tmp_path):
    """A zero-byte file becomes a database at the latest schema version with every table."""
    path = tmp_path / "state.sqlite3"
    path.write_bytes(b"")
    database = StateDatabase(path)
    assert database.schema_version == len(migrations()) >= 1
    tables = {row[0] for row in database._conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"shares", "files", "peers", "access_codes", "config"} <= tables
    database.close()


def test_new_database_is_private_and_uses_wal(tmp_path):
    """The file is created mode 0600, in WAL mode, with foreign keys on."""
    database = StateDatabase(tmp_path / "state.sqlite3")
    assert stat.S_IMODE(os.stat(tmp_path / "state.sqlite3").st_mode) == 0o600
    assert database._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert database._conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert database._conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    database.close()


def _schema(tmp_path, *scripts):
    folder = tmp_path / "schema"
    folder.mkdir(exist_ok=True)
    for number, script in enumerate(scripts, 1):
        (folder / ("%03d_step.sql" % number)).write_text(script)
    return folder


def test_upgrades_step_by_step_and_keeps_data(tmp_path):
    """A database at version 1 is taken to version 2 by the next file, data intact."""
    path = tmp_path / "state.sqlite3"
    one = _schema(tmp_path, "CREATE TABLE t (a INTEGER);")
    first = StateDatabase(path, one)
    first._conn.execute("INSERT INTO t VALUES (7)")
    first.close()
    two = _schema(tmp_path, "CREATE TABLE t (a INTEGER);", "ALTER TABLE t ADD COLUMN b TEXT;")
    second = StateDatabase(path, two)
    assert second.schema_version == 2
    assert second._conn.execute("SELECT a, b FROM t").fetchall() == [(7, None)]
    second.close()


def test_failed_migration_rolls_back(tmp_path):
    """A migration that fails half-way leaves the previous version and no partial change."""
    path = tmp_path / "state.sqlite3"
    StateDatabase(path, _schema(tmp_path, "CREATE TABLE t (a INTEGER);")).close()
    broken = _schema(tmp_path, "CREATE TABLE t (a INTEGER);",
                     "CREATE TABLE u (x INTEGER); INSERT INTO nowhere VALUES (1);")
    with pytest.raises(ConfigurationError, match="002_step.sql"):
        StateDatabase(path, broken)
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    assert conn.execute("SELECT name FROM sqlite_master WHERE name = 'u'").fetchone() is None
    conn.close()


def test_refuses_newer_schema(tmp_path):
    """A database written by a newer version is refused with a clear message."""
    path = tmp_path / "state.sqlite3"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(ConfigurationError, match="newer version"):
        StateDatabase(path)


def test_schema_files_must_be_contiguous(tmp_path):
    """A gap in the numbering of schema files is an error, not a silent skip."""
    folder = tmp_path / "schema"
    folder.mkdir()
    (folder / "001_a.sql").write_text("")
    (folder / "003_c.sql").write_text("")
    with pytest.raises(ConfigurationError):
        migrations(folder)
    assert [n for n, _ in migrations(SCHEMA_DIR)][0] == 1


# -- shares ----------------------------------------------------------------------

def test_shares(db):
    """Shares can be added, found by ID or path, listed, put in error state and removed."""
    with pytest.raises(ConfigurationError):
        db.add_share(ShareInfo("6" * 64, "/srv/share", PEER, "read_write", created=2.0))
    db.add_share(ShareInfo("6" * 64, "/srv/other", OTHER, "read_only", created=2.0))
    assert db.get_share(SHARE).path == "/srv/share"
    assert db.get_share_by_path("/srv/other").access == "read_only"
    assert [s.path for s in db.list_shares()] == ["/srv/other", "/srv/share"]
    db.set_share_state(SHARE, "error", "disk gone")
    assert (db.get_share(SHARE).state, db.get_share(SHARE).error) == ("error", "disk gone")
    db.set_last_scan(SHARE, 123.5)
    assert db.get_share(SHARE).last_scan == 123.5
    db.remove_share("6" * 64)
    assert db.get_share("6" * 64) is None


def test_has_live_files_ignores_deletions_and_folders(db):
    """The scanner asks whether anything live is recorded (a move needs a vanished file)."""
    assert not has_live_files(db, SHARE)
    db.apply_changes(SHARE, [file("gone", deleted=True, size=None, sha=None),
                             FileRecord(path="dir", utime=1.0, is_dir=True, vv={PEER: 1})])
    assert not has_live_files(db, SHARE)
    db.apply_changes(SHARE, [file("a")])
    assert has_live_files(db, SHARE)
    assert not has_live_files(db, OTHER)


def test_remove_share_cascades(db):
    """Removing a share removes its records, peers and access codes."""
    db.apply_changes(SHARE, [file("a")])
    db.upsert_peer(PeerInfo(SHARE, OTHER))
    db.add_access_code(AccessCodeInfo("c" * 64, "d" * 32, SHARE, "read_only", created=1.0))
    db.remove_share(SHARE)
    for table in ("files", "peers", "access_codes"):
        assert db._conn.execute("SELECT COUNT(*) FROM %s" % table).fetchone()[0] == 0


# -- records -----------------------------------------------------------------------

def test_apply_changes_bumps_revision_once_and_stamps_rows(db):
    """One call = one revision; every row written carries it; empty input changes nothing."""
    assert db.apply_changes(SHARE, [file("a"), file("b")]) == 1
    assert db.apply_changes(SHARE, [file("b", sha="1" * 64)]) == 2
    assert db.apply_changes(SHARE, []) == 2
    assert db.get_revision(SHARE) == 2
    assert {s.path: s.revision for s in db.records_between(SHARE)} == {"a": 1, "b": 2}


def test_records_round_trip(db):
    """Files, directories and tombstones come back exactly as stored, with cache keys."""
    records = [
        FileRecord(path="d", utime=1.5, is_dir=True, mode=0o755, vv={PEER: 2}),
        FileRecord(path="d/f", utime=2.25, size=3, mtime=(7, 8), mode=0o600, sha256="e" * 64,
                   vv={PEER: 1, OTHER: 4}, file_id="ab" * 16, key="cd" * 32,
                   conflict_source="d/g"),
        FileRecord(path="gone", utime=3.0, deleted=True, vv={OTHER: 9}, file_id="12" * 16),
    ]
    db.apply_changes(SHARE, records, {"d/f": CacheKey(11, 3, 7_000_000_008)})
    assert [db.get_record(SHARE, r.path) for r in records] == records
    assert db.get_stored(SHARE, "d/f").cache == CacheKey(11, 3, 7_000_000_008)
    assert db.get_stored(SHARE, "d").cache is None
    assert db.get_record(SHARE, "missing") is None


def test_batched_reads_and_writes_keep_every_value_exact(db):
    """Rows written and read in one step each (JSON inside SQLite) lose nothing:
    times with all 17 digits, odd paths, big inodes, empty and many-key vectors."""
    rng = random.Random(7)
    times = [1 / 3, 1765123456.1234567, 0.1, 1e-300, 2.0 ** 60, 123456789.98765431]
    times += [rng.uniform(0, 2e9) for _ in range(300)]
    names = ['q"uote', "back\\slash", "new\nline", "tab\t", "\u00e9/\U0001f600", "\u2028"]
    records = [FileRecord(path=(names[i % len(names)] + "/%04d" % i), utime=t, size=i,
                          mtime=(i, 999_999_999), mode=0o644, sha256="%064x" % i,
                          vv={PEER: i + 1, OTHER: 2**62} if i % 2 else {PEER: 1})
               for i, t in enumerate(times)]
    keys = {r.path: CacheKey(2**64 - 1 - i, r.size, 2**62 + i) for i, r in enumerate(records)}
    db.apply_changes(SHARE, records, keys)
    found = db.get_stored_many(SHARE, [r.path for r in records] + ["absent"])
    assert {p: s.record for p, s in found.items()} == {r.path: r for r in records}
    assert {p: s.cache for p, s in found.items()} == keys
    assert [s.record for s in db.records_between(SHARE)] == sorted(records, key=lambda r: r.path)
    assert db.get_stored_many(SHARE, []) == {}


def test_pages_are_in_path_order(db):
    """records_page walks every record once, in the order Python sorts the paths."""
    names = ["b", "a b", "a/x", "a", "\u00e9", "z/\U0001f600", "a-b", "A"]
    db.apply_changes(SHARE, [file(n) for n in names])
    seen, after = [], None
    while True:
        page = db.records_page(SHARE, after, limit=3)
        seen.extend(r.path for r in page)
        if len(page) < 3:
            break
        after = page[-1].path
    assert seen == sorted(names)


def test_records_between_bounds(db):
    """records_between honours low, high and after."""
    db.apply_changes(SHARE, [file(n) for n in ["a", "a b", "a/1", "a/2", "b"]])
    paths = [s.path for s in db.records_between(SHARE, "a/", "a0")]
    assert paths == ["a/1", "a/2"]
    assert [s.path for s in db.records_between(SHARE, "a", "a\x00")] == ["a"]
    assert [s.path for s in db.records_between(SHARE, "", None, "a/1", 2)] == ["a/2", "b"]


def test_changed_since_pages_by_revision(db):
    """changed_since returns rows above a revision ordered by (revision, path), pageable."""
    db.apply_changes(SHARE, [file("c"), file("d")])  # 1
    db.apply_changes(SHARE, [file("b"), file("a")])  # 2
    db.apply_changes(SHARE, [file("c", sha="2" * 64)])  # 3
    first = db.changed_since(SHARE, 1, limit=2)
    assert [(s.revision, s.path) for s in first] == [(2, "a"), (2, "b")]
    rest = db.changed_since(SHARE, 1, after=(first[-1].revision, first[-1].path))
    assert [(s.revision, s.path) for s in rest] == [(3, "c")]


def test_find_by_sha256_skips_tombstones(db):
    """Only live files with the content are found."""
    db.apply_changes(SHARE, [file("x", sha="7" * 64), file("y", sha="7" * 64), file("z")])
    db.apply_changes(SHARE, [FileRecord(path="y", utime=11.0, deleted=True)])
    assert [s.path for s in db.find_by_sha256(SHARE, "7" * 64)] == ["x"]


def test_find_by_sha256_many_groups_live_files_by_hash(db):
    """One lookup for many hashes: live files per hash, tombstones and unknown hashes left out."""
    db.apply_changes(SHARE, [file("x", sha="7" * 64), file("y", sha="7" * 64),
                             file("z", sha="8" * 64), file("w", sha="9" * 64)])
    db.apply_changes(SHARE, [FileRecord(path="w", utime=11.0, deleted=True)])
    found = db.find_by_sha256_many(SHARE, ["7" * 64, "8" * 64, "9" * 64, "6" * 64])
    assert {h: [s.path for s in rows] for h, rows in found.items()} == {
        "7" * 64: ["x", "y"], "8" * 64: ["z"]}


def test_apply_local_changes_skips_rows_changed_meanwhile(db):
    """A scan result is dropped for a row rewritten since the scan read it."""
    db.apply_changes(SHARE, [file("a"), file("b")])  # both at revision 1
    db.apply_changes(SHARE, [file("b", sha="3" * 64)])  # b moves to revision 2
    revision, written = db.apply_local_changes(SHARE, [
        LocalChange(file("a", sha="4" * 64), None, 1),
        LocalChange(file("b", sha="4" * 64), None, 1),
        LocalChange(file("c"), CacheKey(1, 1, 1), None),
    ])
    assert revision == 3
    assert [r.path for r in written] == ["a", "c"]
    assert db.get_record(SHARE, "b").sha256 == "3" * 64
    stale_only = db.apply_local_changes(SHARE, [LocalChange(file("b"), None, 1)])
    assert stale_only == (3, [])


def test_refresh_cache_keys_needs_same_revision(db):
    """Cache keys are refreshed without a revision bump, and only on unchanged rows."""
    db.apply_changes(SHARE, [file("a"), file("b")])
    db.refresh_cache_keys(SHARE, [("a", CacheKey(1, 2, 3), 1), ("b", CacheKey(4, 5, 6), 0)])
    assert db.get_stored(SHARE, "a").cache == CacheKey(1, 2, 3)
    assert db.get_stored(SHARE, "b").cache is None
    assert db.get_revision(SHARE) == 1


def test_share_counts(db):
    """Counts of live files, directories, tombstones and live bytes."""
    db.apply_changes(SHARE, [file("a", size=10), file("b", size=5),
                             FileRecord(path="d", utime=1.0, is_dir=True),
                             FileRecord(path="c", utime=1.0, deleted=True)])
    assert db.share_counts(SHARE) == ShareCounts(files=2, directories=1, deleted=1, bytes=15)


# -- peers, codes, config ----------------------------------------------------------------

def test_peers(db):
    """Peers are upserted whole and read back, including float manifest versions."""
    db.upsert_peer(PeerInfo(SHARE, OTHER, "laptop", 5.0, ("tcp:127.0.0.1:1",), 3, 2))
    db.upsert_peer(PeerInfo(SHARE, OTHER, "laptop", 6.0, ("tcp:127.0.0.1:2",),
                            1795715305.0485027, 4))
    peer = db.get_peer(SHARE, OTHER)
    assert peer == PeerInfo(SHARE, OTHER, "laptop", 6.0, ("tcp:127.0.0.1:2",),
                            1795715305.0485027, 4)
    assert db.list_peers(SHARE) == [peer]
    db.remove_peer(SHARE, OTHER)
    assert db.get_peer(SHARE, OTHER) is None


def test_access_codes(db):
    """Codes are stored, listed, marked used, revoked and deleted; usable() follows."""
    code = AccessCodeInfo("c" * 64, "d" * 32, SHARE, "read_only", created=100.0,
                          expires=200.0)
    db.add_access_code(code)
    assert db.get_access_code("c" * 64) == code
    assert code.usable(150.0) and not code.usable(200.0)
    db.mark_access_code_used("c" * 64)
    assert not db.get_access_code("c" * 64).usable(150.0)
    forever = AccessCodeInfo("e" * 64, "f" * 32, SHARE, "read_write", created=101.0,
                             one_time=False)
    db.add_access_code(forever)
    db.mark_access_code_used("e" * 64)
    assert db.get_access_code("e" * 64).usable(10**9)
    db.revoke_access_code("e" * 64)
    assert not db.get_access_code("e" * 64).usable(0)
    assert [c.access_id for c in db.list_access_codes(SHARE)] == ["c" * 64, "e" * 64]
    db.delete_access_code("c" * 64)
    assert [c.access_id for c in db.list_access_codes()] == ["e" * 64]
    with pytest.raises(KeyError):
        db.revoke_access_code("0" * 64)
    assert "f" * 32 not in repr(forever)


def test_config(db):
    """Config values are JSON and come back with their types."""
    assert db.get_config("missing", "default") == "default"
    db.set_config("rate", {"up": 100, "down": None})
    db.set_config("name", "box")
    assert db.get_config("rate") == {"up": 100, "down": None}
    assert db.all_config() == {"rate": {"up": 100, "down": None}, "name": "box"}


# -- the asynchronous face -----------------------------------------------------------------

def test_store_with_sync_runner(tmp_path):
    """ShareStore opens lazily and answers with fired Deferreds under SyncRunner."""
    store = ShareStore(tmp_path / "state.sqlite3", SyncRunner())
    result_of(store.add_share(ShareInfo(SHARE, "/s", PEER, "read_write", created=1.0)))
    assert result_of(store.apply_changes(SHARE, [file("a")])) == 1
    assert result_of(store.get_record(SHARE, "a")) == file("a")

    async def collect():
        return [[r.path for r in page] async for page in store.iter_records(SHARE, 1)]

    assert result_of(Deferred.fromCoroutine(collect())) == [["a"]]
    result_of(store.close())


class SerialRunnerTests(TestCase):
    @async_test
    async def test_all_calls_on_one_thread(self) -> None:
        """With a SerialRunner every database call runs on the same non-reactor thread."""
        runner = SerialRunner(reactor)
        runner.startService()
        self.addCleanup(runner.stopService)
        store = ShareStore(os.path.join(temporary_dir(self), "state.sqlite3"), runner)
        threads = []

        def where(db):
            threads.append(threading.get_ident())

        await store.add_share(ShareInfo(SHARE, "/s", PEER, "read_write", created=1.0))
        for n in range(5):
            await store.apply_changes(SHARE, [file("f%d" % n)])
            await store._call(where)
        self.assertEqual(await store.get_revision(SHARE), 5)
        await store.close()

        self.assertEqual(len(set(threads)), 1)
        self.assertNotEqual(threads[0], threading.get_ident())


# -- crash consistency -----------------------------------------------------------------------

_WRITER = textwrap.dedent("""
    import sys
    from clearskies.share.database import StateDatabase, ShareInfo
    from clearskies.share.records import FileRecord
    db = StateDatabase(sys.argv[1])
    share = sys.argv[2]
    if db.get_share(share) is None:
        db.add_share(ShareInfo(share, "/crash", "a" * 32, "read_write", created=1.0))
    n = 0
    while True:
        n += 1
        db.apply_changes(share, [
            FileRecord(path="dir%d/file%05d" % (n % 7, i), utime=float(n), size=i,
                       mtime=(n, 0), mode=0o644, sha256="%064x" % (n * 100000 + i),
                       vv={"a" * 32: n})
            for i in range(500)])
        if n == 1:
            print("ready", flush=True)
""")


def test_sigkill_during_bulk_writes_leaves_consistent_db(tmp_path):
    """Killing a writer at random instants leaves a sound DB whose revision matches its rows."""
    path = str(tmp_path / "state.sqlite3")
    rng = random.Random(1234)
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, path, SHARE],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.05, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        db = StateDatabase(path)
        assert db.integrity_check() == "ok"
        stamped = db._conn.execute(
            "SELECT MAX(revision) FROM files WHERE share_id = ?", (SHARE,)).fetchone()[0]
        assert db.get_revision(SHARE) == stamped >= 1
        # every committed batch is whole: 500 rows carry each stamp seen last
        assert db._conn.execute("SELECT COUNT(*) FROM files WHERE revision = ?",
                                (stamped,)).fetchone()[0] == 500
        db.close()


def test_inode_numbers_above_2_63_round_trip(db):
    """A 64-bit file system's inode past 2**63 is stored (as a signed value) and read back."""
    big = CacheKey(2**64 - 5, 10, 1_700_000_000_000_000_000)
    db.apply_changes(SHARE, [file("big-inode")], {"big-inode": big})
    assert db.get_stored(SHARE, "big-inode").cache == big
    db.refresh_cache_keys(SHARE, [("big-inode", big, db.get_revision(SHARE))])
    assert db.get_stored(SHARE, "big-inode").cache == big


def test_an_integer_beyond_64_bits_is_a_clear_error(db):
    """A number no record should carry names the path instead of an OverflowError."""
    with pytest.raises(ValueError, match="'huge' holds"):
        db.apply_changes(SHARE, [file("huge")], {"huge": CacheKey(1, 1, 10**19)})
    assert db.get_record(SHARE, "huge") is None


def test_insert_rows_takes_any_number_of_rows_in_order() -> None:
    """Rows past one statement's worth, a key repeated within a statement and across
    two: the last row of a key wins, as row by row; an upsert tail applies to each."""
    import sqlite3

    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE t (k TEXT PRIMARY KEY, v REAL, n INTEGER)")
    count = 2 * ROWS_PER_STATEMENT + 17
    rows = [("k%d" % (i % (count - 5)), i + 0.1, i) for i in range(count)]
    insert_rows(conn, "INSERT OR REPLACE INTO t (k, v, n)", rows)
    expected = {}
    for k, v, n in rows:
        expected[k] = (v, n)
    assert {k: (v, n) for k, v, n in conn.execute("SELECT k, v, n FROM t")} == expected
    insert_rows(conn, "INSERT INTO t (k, v, n)", [("k0", 0.5, 1), ("k0", 0.25, 2)],
                " ON CONFLICT (k) DO UPDATE SET n = t.n + excluded.n")
    assert conn.execute("SELECT v, n FROM t WHERE k = 'k0'").fetchone() == (
        expected["k0"][0], expected["k0"][1] + 3)
    insert_rows(conn, "INSERT INTO t (k, v, n)", [])  # nothing: no statement
