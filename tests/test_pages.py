"""Per-file lists kept in the state database and read back page by page (clearskies.share.pages)."""

import pytest
from zope.interface.verify import verifyObject

from clearskies.interfaces import IPagedLists

from clearskies.share import pages
from clearskies.share.database import CacheKey, ShareInfo, ShareStore, StateDatabase
from clearskies.share.pages import PagedStore, StagedFile
from clearskies.share.records import FileRecord
from clearskies.threads import SyncRunner
from tests.helpers import STATE_PEER, STATE_SHARE, result_of, state_database, stored_file

SHARE = STATE_SHARE
PEER = STATE_PEER
OTHER = "b" * 32


@pytest.fixture
def db(tmp_path):
    database = state_database(tmp_path / "state.sqlite3")
    yield database
    database.close()


file = stored_file


def all_pages(read, limit):
    """Every row of a paged query, checking that no page exceeds ``limit``."""
    found, after = [], None
    while True:
        page = read(after, limit)
        assert len(page) <= limit
        found.extend(page)
        if len(page) < limit:
            return found
        after = page[-1].path if hasattr(page[-1], "path") else page[-1].record.path


def test_record_columns_round_trip():
    """Every field of a record survives the table columns, tombstones and directories too."""
    for record in [
        file("a", file_id="i", key="k", conflict_source="c"),
        FileRecord(path="d", utime=1.5, is_dir=True, mode=0o755, vv={PEER: 2}),
        FileRecord(path="x", utime=2.0, deleted=True, size=3, mode=0o600, key="k",
                   vv={PEER: 1, OTHER: 4}),
    ]:
        assert pages.record_from(pages.record_values(record)) == record


def test_stage_pages_in_path_order_and_separately_per_token(db):
    """Staged files come back in byte order, page by page, and each stage holds only its own."""
    one, two = pages.stage_open(db), pages.stage_open(db)
    names = ["b", "a b", "a/x", "a", "é", "z/0"] + ["m%03d" % n for n in range(20)]
    pages.stage_add(db, one, [StagedFile(n, 1, 2, 2**64 - 5, 0o644, None) for n in names])
    pages.stage_add(db, two, [StagedFile("only", 1, 2, 3, 0o600, 7)])
    got = all_pages(lambda after, limit: pages.stage_page(db, one, after, limit), 4)
    assert [f.path for f in got] == sorted(names)
    assert got[0].inode == 2**64 - 5  # inodes above SQLite's signed range come back whole
    assert got[0].cache_key == CacheKey(2**64 - 5, 1, 2)
    assert pages.stage_page(db, two) == [StagedFile("only", 1, 2, 3, 0o600, 7)]
    pages.stage_close(db, one)
    assert pages.stage_page(db, one) == []
    assert len(pages.stage_page(db, two)) == 1


def test_stage_is_not_in_the_database_file(tmp_path, db):
    """The stage is a temporary table: another connection never sees it."""
    token = pages.stage_open(db)
    pages.stage_add(db, token, [StagedFile("a", 1, 2, 3, 0o644, None)])
    other = StateDatabase(tmp_path / "state.sqlite3")
    try:
        tables = {row[0] for row in other.connection.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert "scan_stage" not in tables
    finally:
        other.close()


def test_announced_records_page_and_replace(db):
    """A peer's announced records: the latest per path, paged in path order, per peer."""
    records = [file("f%04d" % n) for n in range(2500)]
    pages.put_announced(db, SHARE, PEER, records[::-1])
    pages.put_announced(db, SHARE, OTHER, [file("other")])
    newer = file("f0001", sha="1" * 64, size=9)
    pages.put_announced(db, SHARE, PEER, [newer])
    got = all_pages(lambda after, limit: pages.announced_page(db, SHARE, PEER, after, limit), 1000)
    assert [r.path for r in got] == [r.path for r in records]
    assert got[1] == newer
    assert pages.announced_many(db, SHARE, PEER, ["f0001", "missing", "other"]) == {
        "f0001": newer}
    pages.forget_announced(db, SHARE, PEER)
    assert pages.announced_page(db, SHARE, PEER) == []
    assert [r.path for r in pages.announced_page(db, SHARE, OTHER)] == ["other"]


def test_acknowledged_content(db):
    """A manifest's live files count as held by the peer; an acknowledgement alone lists nothing."""
    pages.put_announced(db, SHARE, PEER, [
        file("held", sha="1" * 64), FileRecord(path="gone", utime=1.0, deleted=True)], acked=True)
    pages.set_acked(db, SHARE, PEER, [("sent", "2" * 64)])
    assert pages.acked_many(db, SHARE, PEER, ["held", "gone", "sent", "x"]) == {
        "held": "1" * 64, "sent": "2" * 64}
    assert [r.path for r in pages.announced_page(db, SHARE, PEER)] == ["gone", "held"]
    # An update (not a manifest) keeps what was acknowledged before.
    pages.put_announced(db, SHARE, PEER, [file("sent", sha="3" * 64)])
    assert pages.acked_many(db, SHARE, PEER, ["sent"]) == {"sent": "2" * 64}
    assert "sent" in pages.announced_many(db, SHARE, PEER, ["sent"])


def test_wanted_files_with_sources_and_totals(db):
    """Wanted files page with their sources (or only those one peer has); totals count files
    and bytes; a leaving peer is no source any more; new content forgets the old sources."""
    items = [(file("w%04d" % n, size=n), None, [PEER]) for n in range(1500)]
    assert pages.put_wanted(db, SHARE, items) == (1500, sum(range(1500)))
    # The same content: sources add up; it is still fetched under its own path.
    assert pages.put_wanted(db, SHARE, [(file("w0002", size=2), "elsewhere", [OTHER])]) == (0, 0)
    # Wanted under another path first, then announced under its own: its own path.
    pages.put_wanted(db, SHARE, [(file("x", size=1), "elsewhere", [PEER])])
    pages.put_wanted(db, SHARE, [(file("x", size=1), None, [OTHER])])
    assert pages.wanted_many(db, SHARE, ["x"])["x"].remote_path == "x"
    assert pages.remove_wanted(db, SHARE, ["x", "x", "not wanted"]) == (1, 1)
    assert pages.wanted_totals(db, SHARE) == (1500, sum(range(1500)))
    got = all_pages(lambda after, limit: pages.wanted_page(db, SHARE, after, limit), 1000)
    assert len(got) == 1500
    assert got[2].sources == {PEER, OTHER} and got[2].remote_path == "w0002"
    assert got[3].sources == {PEER} and got[3].remote_path == "w0003"
    pages.put_wanted(db, SHARE, [(file("w0003", sha="9" * 64, size=3), None, [OTHER])])
    assert pages.wanted_page(db, SHARE, "w0002", 1)[0].sources == {OTHER}
    assert [w.record.path for w in pages.wanted_page(db, SHARE, None, 10, source=OTHER)] == [
        "w0002", "w0003"]
    assert set(pages.wanted_many(db, SHARE, ["w0002", "nope", "w0100"])) == {"w0002", "w0100"}
    pages.drop_source(db, SHARE, PEER)
    assert pages.wanted_page(db, SHARE, None, 1)[0].sources == frozenset()
    assert pages.remove_wanted(db, SHARE, ["w%04d" % n for n in range(1000)]) == (
        1000, sum(range(1000)))
    assert pages.wanted_totals(db, SHARE) == (500, sum(range(1000, 1500)))
    # A local edit supersedes other content only; a page taken leaves the table.
    assert pages.remove_wanted_superseded(db, SHARE, [
        file("w1000", size=1000), file("w1001", sha="7" * 64, size=5), file("nope")]) == (1, 1001)
    pages.put_wanted(db, SHARE, [(file("w%04d" % n, size=n), None, [OTHER])
                                 for n in (1000, 1002, 1004)])
    taken = pages.take_wanted_page(db, SHARE, "w1000", 2)
    assert [w.record.path for w in taken] == ["w1002", "w1003"]
    assert pages.wanted_totals(db, SHARE) == (497, sum(range(1000, 1500)) - 1001 - 1002 - 1003)
    # Only that page left, with its sources; the paths either side of it stayed.
    assert set(pages.wanted_many(db, SHARE, ["w1000", "w1002", "w1003", "w1004"])) == {
        "w1000", "w1004"}
    assert db.connection.execute("SELECT path FROM wanted_sources ORDER BY path").fetchall() \
        == [("w1000",), ("w1004",)]
    assert pages.take_wanted_page(db, SHARE, "w1499", 5) == []
    assert [w.record.path for w in pages.take_wanted_page(db, SHARE, "w1497", 5)] == [
        "w1498", "w1499"]
    pages.clear_wanted(db, SHARE)
    assert pages.wanted_totals(db, SHARE) == (0, 0)


def test_lists_go_with_their_share(db):
    """Removing a share removes its announced and wanted rows."""
    pages.put_announced(db, SHARE, PEER, [file("a")])
    pages.put_wanted(db, SHARE, [(file("a"), None, [PEER])])
    db.remove_share(SHARE)
    for table in ("announced", "wanted", "wanted_sources"):
        assert db.connection.execute("SELECT COUNT(*) FROM %s" % table).fetchone() == (0,)


def test_paged_store_iterates_whole_lists(tmp_path):
    """The asynchronous face reads a list of several pages whole, one page at a time."""
    store = ShareStore(tmp_path / "state.sqlite3", SyncRunner())
    result_of(store.add_share(ShareInfo(SHARE, "/srv/share", PEER, "read_write", created=1.0)))
    paged = PagedStore(store)
    assert verifyObject(IPagedLists, paged)
    result_of(paged.put_announced(SHARE, PEER, [file("f%03d" % n) for n in range(250)]))
    result_of(paged.put_wanted(SHARE, [(file("w%03d" % n), None, {PEER}) for n in range(250)]))

    async def collect(iterator):
        return [[item for item in page] for page in [p async for p in iterator]]

    from twisted.internet.defer import Deferred
    announced = result_of(Deferred.fromCoroutine(collect(paged.iter_announced(SHARE, PEER, 100))))
    wanted = result_of(Deferred.fromCoroutine(collect(paged.iter_wanted(SHARE, 100))))
    assert [len(p) for p in announced] == [len(p) for p in wanted] == [100, 100, 50]
    assert result_of(paged.wanted_totals(SHARE)) == (250, 250)
    result_of(store.close())


def test_signed_messages_page_by_kind_in_key_order(db):
    """A read-only share's kept signed messages come back one kind at a time, page by page."""
    rows = [("manifest", "o%d" % (n % 3), "1/%d" % n, b"text %d" % n, b"sig") for n in range(7)]
    rows.append(("update", "a/path", "", b"update", b"sig"))
    db.put_signed(SHARE, rows)
    got, after = [], None
    while True:
        page = pages.signed_page(db, SHARE, "manifest", after, 2)
        got.extend(page)
        if len(page) < 2:
            break
        after = page[-1][:2]
    assert [(key, part) for key, part, _, _ in got] == sorted(
        (key, part) for _, key, part, _, _ in rows[:7])
    assert pages.signed_page(db, SHARE, "update") == [("a/path", "", b"update", b"sig")]


def test_announced_and_wanted_never_reach_the_database_file(tmp_path):
    """Lists that last only while the daemon runs stay out of the file (and its WAL),
    are gone on reopening, and leave with their share."""
    import sqlite3

    path = tmp_path / "state.sqlite3"
    database = state_database(path)
    pages.put_announced(database, SHARE, PEER, [file("a"), file("b")], acked=True)
    pages.put_wanted(database, SHARE, [(file("w", size=3), None, [PEER])])
    assert [r.path for r in pages.announced_page(database, SHARE, PEER)] == ["a", "b"]
    assert pages.wanted_totals(database, SHARE) == (1, 3)
    other = sqlite3.connect(path)
    tables = {name for (name,) in other.execute("SELECT name FROM sqlite_master")}
    other.close()
    assert tables.isdisjoint({"announced", "wanted", "wanted_sources"})
    database.remove_share(SHARE)
    assert pages.announced_page(database, SHARE, PEER) == []
    assert pages.wanted_totals(database, SHARE) == (0, 0)
    pages.put_announced(database, SHARE, OTHER, [file("c")])
    database.close()
    again = StateDatabase(path)
    assert pages.announced_page(again, SHARE, OTHER) == []
    again.close()


def test_upgrade_drops_the_old_tables_of_the_lists(tmp_path):
    """A database of schema 5 loses its announced/wanted tables (and their rows) on upgrade."""
    import shutil
    import sqlite3

    from clearskies.share.database import SCHEMA_DIR

    five = tmp_path / "schema5"
    five.mkdir()
    for entry in SCHEMA_DIR.glob("00[1-5]_*.sql"):
        shutil.copy(entry, five)
    path = tmp_path / "state.sqlite3"
    old = StateDatabase(path, five)
    assert old.schema_version == 5
    old.connection.execute("INSERT INTO main.shares (share_id, path, peer_id, access, created)"
                           " VALUES ('s', '/s', 'p', 'read_write', 1)")
    old.connection.execute("INSERT INTO main.wanted (share_id, path, utime) VALUES ('s', 'p', 1)")
    old.close()
    new = StateDatabase(path)
    assert new.schema_version == 6
    new.close()
    conn = sqlite3.connect(path)
    tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master")}
    conn.close()
    assert tables.isdisjoint({"announced", "wanted", "wanted_sources", "wanted_sources_by_peer"})


def test_one_batch_of_wanted_files_applies_its_items_in_order(db):
    """A path twice in one put_wanted: counted once, the later item wins, and new content
    in the same batch forgets the sources the earlier item gave (as two calls would)."""
    first = file("p", sha="1" * 64, size=10)
    assert pages.put_wanted(db, SHARE, [(file("q", size=4), None, [PEER])]) == (1, 4)
    assert pages.put_wanted(db, SHARE, [
        (first, "there", [PEER]),
        (first, "elsewhere", [OTHER]),            # same content: sources add, fetch path stays
        (file("q", sha="2" * 64, size=6), None, [OTHER]),   # new content: old sources go
    ]) == (1, 10 + 6 - 4)
    rows = pages.wanted_many(db, SHARE, ["p", "q"])
    assert rows["p"].sources == {PEER, OTHER} and rows["p"].remote_path == "there"
    assert rows["q"].sources == {OTHER} and rows["q"].record.sha256 == "2" * 64
    assert pages.put_wanted(db, SHARE, [
        (file("p", sha="3" * 64, size=1), None, [PEER]),
        (file("p", sha="4" * 64, size=2), None, [OTHER]),
    ]) == (0, 2 - 10)
    assert pages.wanted_many(db, SHARE, ["p"])["p"].sources == {OTHER}
    assert pages.wanted_totals(db, SHARE) == (2, 8)
