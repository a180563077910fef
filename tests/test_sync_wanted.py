"""What a share wants: a bounded window in memory, the rest in the database (clearskies/sync/wanted.py).

Each test keeps a tiny window (``memory_limit``) so that a few dozen files
exercise the paths a 100,000-file share takes: entries moved to the table,
read back page by page, changed while they are there or on their way back.
"""

from __future__ import annotations

import random

import pytest

from clearskies.share.database import ShareInfo, ShareStore
from clearskies.share.pages import PagedStore
from clearskies.share.records import FileRecord
from clearskies.sync.wanted import Wanted, WantedFiles
from clearskies.threads import SyncRunner
from tests.fakes import HeldRunner
from tests.helpers import result_of

SHARE = "f" * 64
A, B = "a" * 32, "b" * 32


def record(n: int, size: int | None = None, sha: str = "1") -> FileRecord:
    return FileRecord(path="d/%04d" % n, utime=1.0, size=n if size is None else size,
                      sha256=sha * 64, mtime=(1, 0), vv={A: 1})


def lists(tmp_path, runner=None) -> PagedStore:
    store = ShareStore(tmp_path / "state.sqlite3", runner or SyncRunner())
    if isinstance(runner, HeldRunner):
        store.call(lambda db: db.add_share(ShareInfo(SHARE, "/srv", A, "read_write", created=1.0)))
        runner.release_all()
    else:
        store.call(lambda db: db.add_share(ShareInfo(SHARE, "/srv", A, "read_write", created=1.0)))
    return PagedStore(store)


def stored_paths(paged: PagedStore, runner: HeldRunner | None = None) -> list[str]:
    d = paged.wanted_page(SHARE, None, 10_000)
    if runner is not None:
        runner.release_all()
    return [row.record.path for row in result_of(d)]


def test_memory_stays_bounded_and_the_totals_count_everything(tmp_path):
    paged = lists(tmp_path)
    wanted = WantedFiles(paged, SHARE, memory_limit=10)
    for n in range(100):
        wanted.want(record(n), A)
    assert wanted.in_memory <= 10
    assert len(wanted) == 100 and wanted.bytes == sum(range(100))
    assert wanted.limit is not None
    # The window is exactly the first paths; the table holds the rest.
    assert sorted(wanted) == ["d/%04d" % n for n in range(wanted.in_memory)]
    assert stored_paths(paged) == ["d/%04d" % n for n in range(wanted.in_memory, 100)]


def test_draining_the_window_brings_every_file_back_in_path_order(tmp_path):
    paged = lists(tmp_path)
    wanted = WantedFiles(paged, SHARE, memory_limit=10)
    for n in random.Random(7).sample(range(100), 100):
        wanted.want(record(n), A)
    fetched = []
    while wanted:
        first = min(wanted)
        fetched.append(first)
        assert wanted[first].sources == {A}
        del wanted[first]
        assert wanted.in_memory <= 10
    assert fetched == ["d/%04d" % n for n in range(100)]
    assert wanted.bytes == 0 and stored_paths(paged) == [] and wanted.limit is None


def test_changes_past_the_window_go_to_the_table(tmp_path):
    paged = lists(tmp_path)
    wanted = WantedFiles(paged, SHARE, memory_limit=10)
    for n in range(40):
        wanted.want(record(n), A)
    far = "d/0030"
    assert far not in wanted and wanted.possibly(far) and result_of(wanted.contains(far))
    wanted.want(record(30), B)  # same content, another source
    row = result_of(paged.wanted_many(SHARE, [far]))[far]
    assert row.sources == {A, B}
    wanted.want(record(31, size=1000, sha="2"), B)  # other content: its sources only
    assert result_of(paged.wanted_many(SHARE, ["d/0031"]))["d/0031"].sources == {B}
    assert len(wanted) == 40 and wanted.bytes == sum(range(40)) - 31 + 1000
    wanted.supersede(record(32))  # a local edit with the wanted content: still wanted
    wanted.supersede(record(33, sha="9"))  # other content: no longer
    wanted.discard("d/0034")
    wanted.discard("d/0099")  # never wanted: nothing counted
    assert len(wanted) == 38 and not result_of(wanted.contains("d/0033"))
    assert "d/0032" in stored_paths(paged)
    wanted.drop_source(A)
    assert result_of(paged.wanted_many(SHARE, [far]))[far].sources == {B}
    wanted.put(Wanted(record(35), sources={B}))
    assert result_of(paged.wanted_many(SHARE, ["d/0035"]))["d/0035"].sources == {B}
    assert len(wanted) == 38


def test_downloads_under_way_stay_in_memory(tmp_path):
    paged = lists(tmp_path)
    busy = {"d/0009"}
    wanted = WantedFiles(paged, SHARE, memory_limit=10, busy=busy.__contains__)
    for n in range(11):
        wanted.want(record(n), A)
    assert "d/0009" in wanted and wanted.limit == "d/0009"
    assert stored_paths(paged) == ["d/0010"]


def test_changes_during_a_refill_are_placed_once_the_page_is_in(tmp_path):
    runner = HeldRunner()
    paged = lists(tmp_path, runner)
    refilled = []
    wanted = WantedFiles(paged, SHARE, memory_limit=10, refilled=lambda: refilled.append(1))
    for n in range(30):
        wanted.want(record(n), A)
    runner.release_all()
    assert len(wanted) == 30
    for path in sorted(wanted):  # drain: the refill starts and waits in the runner
        del wanted[path]
    assert wanted._refilling
    # Meanwhile peers announce files past the old window (one the page brings
    # in, one past the page), a source leaves, a file is superseded by a local
    # edit, and the table is asked about one.
    wanted.want(record(7, size=700, sha="4"), B)
    wanted.want(record(12, size=500, sha="3"), B)
    wanted.drop_source(A)
    wanted.supersede(record(13, sha="9"))
    asked = wanted.contains("d/0014")
    assert wanted  # the held changes count: not settled
    runner.release_all()  # the page; then what was held, replayed, and the question
    assert refilled and not wanted._refilling
    assert wanted  # the replayed writes are not done: still not settled
    runner.release_all()
    assert result_of(asked)
    assert wanted.limit == "d/0009" and sorted(wanted) == ["d/%04d" % n for n in range(5, 10)]
    assert wanted["d/0007"].record.size == 700 and wanted["d/0007"].sources == {B}
    assert wanted["d/0005"].sources == set()
    d = paged.wanted_many(SHARE, ["d/0012", "d/0013", "d/0014"])
    runner.release_all()
    stored = result_of(d)
    assert stored["d/0012"].record.size == 500 and stored["d/0012"].sources == {B}
    assert "d/0013" not in stored and stored["d/0014"].sources == set()
    assert stored_paths(paged, runner) == ["d/%04d" % n for n in range(10, 30) if n != 13]
    assert len(wanted) == 24
    assert wanted.bytes == sum(range(5, 30)) - 7 + 700 - 12 + 500 - 13


def test_without_a_database_everything_stays_in_memory():
    wanted = WantedFiles()
    for n in range(50):
        wanted.want(record(n), A)
    assert wanted.in_memory == 50 and wanted.limit is None
    with pytest.raises(TypeError):
        wanted.clear()


# -- the engine with a small window ------------------------------------------------


def _engine(tmp_path, window: int):
    from twisted.internet.task import Clock

    from clearskies.sync import ShareSync, SyncSession
    from tests.fakes import FakeConnection, MemoryShare

    root = tmp_path / "share"
    root.mkdir()
    share = MemoryShare(root)
    clock = Clock()
    sync = ShareSync(share, clock, wanted_window=window)
    connection = FakeConnection()
    session = SyncSession(sync, connection)
    session.start(None)
    connection.sent()
    return sync, session, connection, clock


def _engine_with_manifest(tmp_path, window: int, count: int):
    """An engine whose peer announced ``count`` small files in one manifest."""
    from tests.fakes import file_record, message

    sync, session, connection, clock = _engine(tmp_path, window)
    files = {"f%02d" % n: b"content %d" % n for n in range(count)}
    session.event_received(message({"type": "manifest", "revision": 3, "files": [
        file_record(p, d, {"b" * 32: 1}).to_wire() for p, d in files.items()]}))
    clock.advance(0)
    return sync, session, connection, clock, files


def _gets(connection) -> list[str]:
    from clearskies import wire

    return [e.body["path"] for e in connection.sent()
            if isinstance(e, wire.Message) and e.body["type"] == "get"]


def test_a_peers_manifest_past_the_window_is_fetched_in_path_order(tmp_path):
    """30 files against a window of 10: every one is asked for, each once, in order."""
    from tests.fakes import deliver_file

    sync, session, connection, clock, files = _engine_with_manifest(tmp_path, window=10, count=30)
    assert len(sync.wanted) == 30 and sync.wanted.in_memory <= 10
    asked: list[str] = []
    for _ in range(100):
        gets = _gets(connection)
        if not gets:
            break
        asked.extend(gets)
        for path in gets:
            deliver_file(session, path, files[path])
        clock.advance(0)
    assert asked == sorted(files)
    assert not sync.wanted and all((sync.share.root / p).read_bytes() == d
                                   for p, d in files.items())


def test_when_every_file_in_the_window_is_refused_later_ones_still_go(tmp_path):
    """The peer cannot give the first files (get_error): the window looks further."""
    from tests.fakes import deliver_file, message

    sync, session, connection, clock, files = _engine_with_manifest(tmp_path, window=10, count=30)
    first = _gets(connection)
    assert first and first == sorted(first)
    for path in first:
        session.event_received(message({"type": "get_error", "path": path,
                                        "error": "not readable here"}))
    clock.advance(0)
    later = _gets(connection)
    assert later and min(later) > max(first)  # not the refused ones again
    for path in later:
        deliver_file(session, path, files[path])
    assert all((sync.share.root / p).exists() for p in later)
    assert not any((sync.share.root / p).exists() for p in first)
