"""What peers announced lives in the state database, one connection's rows at a time
(clearskies.sync.announced), and the sync layer reads it back a batch at a time."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from clearskies import wire
from clearskies.share.records import FileRecord
from clearskies.sync.announced import answers
from clearskies.sync import ShareSync, SyncSession
from tests.fakes import (
    US, THEM, FakeConnection, MemoryShare, deliver_file, file_record, message, open_session)

OTHER = "c" * 32
#: More records than one manifest page and than one ``IN (…)`` chunk of the lookups.
MANY = 2_345


@pytest.fixture
def share(tmp_path: Path) -> MemoryShare:
    root = tmp_path / "share"
    root.mkdir()
    return MemoryShare(root)


def _rows(share: MemoryShare, session: SyncSession) -> list[FileRecord]:
    """Every row the database holds for the session's connection."""
    found: list[FileRecord] = []
    after = None
    while True:
        page = share.lists.announced_page(share.share_id, session.remote_index.key, after,
                                          500).result
        found.extend(page)
        if len(page) < 500:
            return found
        after = page[-1].path


def _records(prefix: str, count: int, peer: str) -> list[FileRecord]:
    return [file_record("%s/%05d.txt" % (prefix, n), b"x%d" % n, {peer: 1})
            for n in range(count)]


def _send_manifest(session: SyncSession, records: list[FileRecord], page: int = 1000) -> None:
    """The records as a paged manifest (extension manifest_pages)."""
    for number, start in enumerate(range(0, len(records), page)):
        body = {"type": "manifest", "revision": 7, "page": number,
                "files": [r.to_wire() for r in records[start:start + page]]}
        if start + page < len(records):
            body["more"] = True
        session.event_received(message(body))


def test_a_manifest_of_many_pages_is_kept_in_the_database(share):
    """Every record of a manifest bigger than a page is in the announced table; the
    session holds no per-file map."""
    _, session, _ = open_session(share, Clock(), features=("vv", "manifest_pages"))
    records = _records("d", MANY, THEM)
    _send_manifest(session, records)
    assert _rows(share, session) == records
    assert not any(isinstance(v, dict) and len(v) >= MANY
                   for v in vars(session.remote_index).values())


def test_a_file_two_peers_announced_lists_both_as_sources_across_pages(share):
    """A wanted file's other sources come from one lookup per batch, across pages."""
    clock = Clock()
    sync, first, _ = open_session(share, clock, features=("vv", "manifest_pages"))
    second = SyncSession(sync, FakeConnection(peer_id=OTHER, port=6000,
                                              features=("vv", "manifest_pages")))
    second.start(None)
    sync.pause()  # nothing is fetched: the wanted list stays whole
    records = _records("d", MANY, THEM)
    _send_manifest(second, records)
    _send_manifest(first, records)
    assert len(sync.wanted) == MANY
    assert all(w.sources == {THEM, OTHER} for w in sync.wanted.values())


def test_a_peer_leaving_mid_manifest_leaves_no_rows(share):
    """A connection lost between two manifest pages drops what its peer announced."""
    sync, session, _ = open_session(share, Clock(), features=("vv", "manifest_pages"))
    records = _records("d", 1500, THEM)
    session.event_received(message({"type": "manifest", "revision": 7, "page": 0, "more": True,
                                    "files": [r.to_wire() for r in records[:1000]]}))
    assert len(_rows(share, session)) == 1000
    session.connection_lost(None)
    assert _rows(share, session) == []
    assert share.lists.announced_many(share.share_id, session.remote_index.key,
                                      [records[0].path]).result == {}


def test_two_connections_with_one_peer_keep_their_own_rows(share):
    """A replacing connection does not see what the one it replaced announced."""
    sync, old, _ = open_session(share, Clock(), features=("vv",), port=7000)
    _send_manifest(old, _records("d", 3, THEM))
    new = SyncSession(sync, FakeConnection(peer_id=THEM, port=5000, features=("vv",)))
    new.start(None)
    assert sync.sessions[THEM] is new
    assert _rows(share, new) == []
    _send_manifest(new, _records("e", 2, THEM))
    old.connection_lost(None)  # the replaced connection closes: its rows go, not the new ones
    assert _rows(share, old) == []
    assert [r.path for r in _rows(share, new)] == ["e/00000.txt", "e/00001.txt"]


def test_rows_left_by_an_earlier_run_are_dropped_when_the_share_starts(share):
    """Rows no connection of this run wrote (a daemon stopped by kill -9) go at start."""
    share.lists.put_announced(share.share_id, THEM + "#0", _records("d", 3, THEM)).result
    ShareSync(share, Clock())
    assert share.lists.announced_page(share.share_id, THEM + "#0").result == []


def test_a_downloaded_file_is_not_echoed_to_the_peer_that_announced_it(share):
    """Relaying looks up what each peer announced: the source hears nothing back, the
    other peer gets the update."""
    sync, session, connection = open_session(share, Clock())
    other = SyncSession(sync, FakeConnection(peer_id=OTHER, port=6000))
    other.start(None)
    for s in (session, other):
        s.event_received(message({"type": "get_manifest"}))
        s.connection.sent()
    record = file_record("a.txt", b"hello", {THEM: 1})
    session.event_received(message({"type": "update", "revision": 4, "file": record.to_wire()}))
    connection.sent()
    deliver_file(session, "a.txt", b"hello")
    assert share.records["a.txt"] == record
    back = [e.body for e in connection.sent() if isinstance(e, wire.Message)]
    assert not [b for b in back if b["type"] == "update"]
    relayed = [e.body for e in other.connection.sent() if isinstance(e, wire.Message)]
    assert [b["file"]["path"] for b in relayed if b["type"] == "update"] == ["a.txt"]
    assert US not in record.vv


def test_queries_sent_together_are_all_awaited_before_a_failure_is_raised():
    """``answers``: the first failure is raised once every query has answered, so the
    others neither fail unheard nor fire into a caller that already gave up."""
    later: Deferred[int] = Deferred()
    result = Deferred.fromCoroutine(answers(fail(KeyError("first")), succeed(1), later))
    assert not result.called  # still waiting for ``later``
    later.errback(ValueError("second"))
    failure = []
    result.addErrback(failure.append)
    assert failure and failure[0].check(KeyError)
    assert Deferred.fromCoroutine(answers(succeed(1), succeed("a"))).result == [1, "a"]
