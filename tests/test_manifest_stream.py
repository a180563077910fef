"""Manifests streamed a page at a time, paced by the connection; merges a page at a time."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from clearskies import wire
from clearskies.daemon.localshare import LocalShareFiles
from clearskies.share.database import ShareInfo, ShareStore
from clearskies.share.records import FileRecord
from clearskies.sync import ShareSync, SyncSession
from clearskies.threads import SyncRunner
from clearskies.transfer import SendQueue
from tests.fakes import (
    US, THEM, FakeConnection, MemoryShare, PausingTransport, file_record, message, open_session)

PAGED = ("vv", "manifest_pages")


@pytest.fixture
def share(tmp_path: Path) -> MemoryShare:
    root = tmp_path / "share"
    root.mkdir()
    return MemoryShare(root)


@pytest.fixture
def small_pages(monkeypatch):
    monkeypatch.setattr("clearskies.sync.limits.MANIFEST_PAGE", 2)


def paced_session(share: MemoryShare, features: tuple[str, ...] = PAGED):
    """A session whose transport takes one message, then pauses its producer until drained."""
    sync = ShareSync(share, Clock())
    connection = FakeConnection(features=features)
    connection.transport = PausingTransport(limit=0)
    session = SyncSession(sync, connection)
    session.start(None)
    connection.sent()
    return sync, session, connection


def drain_messages(connection: FakeConnection) -> list[dict]:
    """Let the connection take everything, a message at a time; every body sent."""
    bodies: list[dict] = []
    for _ in range(1000):
        sent = [e.body for e in connection.sent() if isinstance(e, wire.Message)]
        if not sent and connection.transport.producer is None:
            return bodies
        bodies.extend(sent)
        connection.transport.drain()
    raise AssertionError("the session never stopped sending")


# -- sending ------------------------------------------------------------------------------


def test_a_manifest_bigger_than_a_page_goes_out_a_page_at_a_time(share, small_pages):
    """Each page is read from the store only once the connection has taken the one before."""
    for name in "abcde":
        share.add_local(name, name.encode(), {US: 1})
    _, session, connection = paced_session(share)
    session.event_received(message({"type": "get_manifest"}))
    pages = []
    for expected in (["a", "b"], ["c", "d"], ["e"]):
        (page,) = [e.body for e in connection.sent()]
        assert [f["path"] for f in page["files"]] == expected
        assert share.pages_read <= page["page"] + 2  # one page read ahead, no more
        assert session.manifest_sent_revision is None
        pages.append(page)
        connection.transport.drain()
    assert connection.sent() == []
    assert [p.get("more") for p in pages] == [True, True, None]
    assert [p["page"] for p in pages] == [0, 1, 2]
    assert {p["revision"] for p in pages} == {5}
    assert session.manifest_sent_revision == 5
    assert connection.transport.producer is None  # the producer slot is given back


def test_page_boundaries_exact_multiples_and_empty_shares(share, small_pages):
    """A manifest that fills its last page ends there; an empty share sends one empty page."""
    _, session, connection = open_session(share, Clock(), features=PAGED)
    connection.sent()
    session.event_received(message({"type": "get_manifest"}))
    assert [e.body for e in connection.sent()] == [
        {"type": "manifest", "peer": US, "revision": 0, "version": 0, "files": [], "page": 0}]
    for name in "abcd":
        share.add_local(name, name.encode(), {US: 1})
    _, session, connection = open_session(share, Clock(), features=PAGED)
    connection.sent()
    session.event_received(message({"type": "get_manifest"}))
    pages = [e.body for e in connection.sent()]
    assert [[f["path"] for f in p["files"]] for p in pages] == [["a", "b"], ["c", "d"]]
    assert [p.get("more") for p in pages] == [True, None]


def test_directories_left_out_for_old_peers_do_not_leave_short_or_empty_pages(
        share, small_pages):
    """Pages are counted in records sent: records left out do not shorten a page."""
    share.add_local("a", b"a", {US: 1})
    for name in ("b", "c", "d"):
        share.records[name] = FileRecord(path=name, utime=1.0, is_dir=True, vv={US: 1})
    share.add_local("e", b"e", {US: 1})
    share.add_local("f", b"f", {US: 1})
    _, session, connection = open_session(share, Clock(), features=PAGED)
    connection.sent()
    session.event_received(message({"type": "get_manifest"}))
    pages = [e.body for e in connection.sent()]
    assert [[f["path"] for f in p["files"]] for p in pages] == [["a", "e"], ["f"]]


def test_a_peer_without_pages_gets_one_message_read_in_pages(share, small_pages):
    """The draft's single message still holds every record, read from the store by pages."""
    for name in "abcde":
        share.add_local(name, name.encode(), {US: 1})
    _, session, connection = paced_session(share, features=("vv",))
    session.event_received(message({"type": "get_manifest"}))
    (single,) = drain_messages(connection)
    assert [f["path"] for f in single["files"]] == list("abcde")
    assert "page" not in single and "more" not in single
    assert share.pages_read == 3


def test_changes_during_the_stream_follow_its_last_page(share, small_pages):
    """Every page carries the revision read with the first; a change made meanwhile goes after."""
    for name in "abcde":
        share.add_local(name, name.encode(), {US: 1})
    _, session, connection = paced_session(share)
    session.event_received(message({"type": "get_manifest"}))
    first = [e.body for e in connection.sent()]
    record = share.add_local("f", b"f", {US: 1})  # revision 6, while page 0 is on its way
    session.push_changes([record], [], share.rev)
    connection.transport.drain()
    rest = drain_messages(connection)
    manifest = first + [b for b in rest if b["type"] == "manifest"]
    assert {p["revision"] for p in manifest} == {5}
    assert [f["path"] for p in manifest for f in p["files"]] == list("abcdef")
    assert rest[-1] == {"type": "update", "revision": 6, "file": record.to_wire()}
    assert session.manifest_sent_revision == 6 and session.in_sync


def test_a_peer_that_disconnects_mid_stream_stops_it(share, small_pages):
    """Once the connection is gone no further page is read or written, and nothing fails."""
    for name in "abcdefg":
        share.add_local(name, name.encode(), {US: 1})
    sync, session, connection = paced_session(share)
    session.event_received(message({"type": "get_manifest"}))
    assert len(connection.sent()) == 1
    read = share.pages_read
    session.connection_lost("gone")
    connection.transport.drain()
    assert connection.sent() == [] and share.pages_read == read
    assert session.manifest_sent_revision is None and connection.closed is None
    # The next connection gets the whole manifest.
    _, again, connection = open_session(share, Clock(), features=PAGED)
    connection.sent()
    again.event_received(message({"type": "get_manifest"}))
    pages = [e.body for e in connection.sent()]
    assert [f["path"] for p in pages for f in p["files"]] == list("abcdefg")


def test_a_second_get_manifest_during_the_stream_is_not_answered_twice(share, small_pages):
    """One manifest at a time per connection, as before."""
    for name in "abcde":
        share.add_local(name, name.encode(), {US: 1})
    _, session, connection = paced_session(share)
    session.event_received(message({"type": "get_manifest"}))
    session.event_received(message({"type": "get_manifest"}))
    pages = [e.body for e in connection.sent()] + drain_messages(connection)
    assert [p["page"] for p in pages] == [0, 1, 2]


def test_the_share_reads_a_page_and_its_revision_together(tmp_path):
    """manifest_page answers the revision and the records after a path, from the database."""
    store = ShareStore(tmp_path / "state.sqlite3", SyncRunner())
    share_id = "5" * 64
    store.add_share(ShareInfo(share_id, str(tmp_path), US, "read_write", created=1.0))
    records = [file_record(name, name.encode(), {US: 1}) for name in "dbca"]
    store.apply_changes(share_id, records[:2])
    store.apply_changes(share_id, records[2:])
    files = LocalShareFiles(share_id, store, SyncRunner(), SimpleNamespace(paths=None))
    pages = []
    files.manifest_page(None, 3).addCallback(pages.append)
    files.manifest_page("c", 3).addCallback(pages.append)
    assert [(revision, [r.path for r in page]) for revision, page in pages] == [
        (2, ["a", "b", "c"]), (2, ["d"])]


# -- the send queue's pacing ----------------------------------------------------------------


def test_a_paced_message_fires_once_the_transport_has_drained():
    """The queue holds the producer slot while the message is taken in, then gives it back."""
    transport = PausingTransport(limit=10)
    queue = SendQueue(transport, Clock(), runner=SyncRunner())
    big = queue.send_paced(b"x" * 20 + b"\n")
    assert not big.called and transport.producer is not None
    transport.drain()
    assert big.called and transport.producer is None
    small = queue.send_paced(b"{}\n")
    assert small.called and transport.producer is None
    assert transport.everything() == b"x" * 20 + b"\n{}\n"


def test_a_paced_message_waits_for_the_file_in_flight(tmp_path):
    """Behind a file, the message waits its turn and fires only after the file is sent."""
    (tmp_path / "a").write_bytes(b"A" * 2500)
    clock, transport = Clock(), PausingTransport(limit=1500)
    queue = SendQueue(transport, clock, runner=SyncRunner(), chunk_size=1000)
    queue.send_file("a", tmp_path / "a", expected_size=2500)
    clock.advance(0)
    paced = queue.send_paced(b'{"type":"manifest"}\n')
    assert not paced.called and b"manifest" not in transport.value()
    for _ in range(100):
        if paced.called:
            break
        clock.advance(0)
        transport.drain()
    assert paced.called
    assert transport.everything().endswith(b'0\n{"type":"manifest"}\n')


def test_a_file_takes_over_the_producer_slot_from_a_waiting_paced_message(tmp_path):
    """A file that starts while a paced message drains registers itself; the message waits."""
    (tmp_path / "a").write_bytes(b"A" * 2500)
    clock, transport = Clock(), PausingTransport(limit=10)
    queue = SendQueue(transport, clock, runner=SyncRunner(), chunk_size=1000)
    paced = queue.send_paced(b"x" * 20 + b"\n")
    queue.send_file("a", tmp_path / "a", expected_size=2500)
    clock.advance(0)
    assert queue.sending == "a" and not paced.called
    for _ in range(100):
        if paced.called:
            break
        clock.advance(0)
        transport.drain()
    assert paced.called and transport.producer is None


def test_stopping_the_queue_releases_paced_senders():
    """A paced sender waiting on a connection that is gone goes on (and finds it gone)."""
    transport = PausingTransport(limit=0)
    queue = SendQueue(transport, Clock(), runner=SyncRunner())
    paced = queue.send_paced(b"{}\n")
    assert not paced.called
    queue.stop()
    assert paced.called
    assert queue.send_paced(b"{}\n").called


# -- the inbox ------------------------------------------------------------------------------


def manifest_page(paths: str, page: int, more: bool) -> wire.Message:
    body = {"type": "manifest", "peer": THEM, "revision": 3, "page": page,
            "files": [file_record(p, p.encode(), {THEM: 1}).to_wire() for p in paths]}
    if more:
        body["more"] = True
    return message(body)


def test_pages_arriving_during_a_merge_wait_a_page_a_batch_and_pause_reading(
        share, monkeypatch):
    """What waits behind a merge is merged a page at a time, in order; too much pauses reading."""
    monkeypatch.setattr("clearskies.sync.limits.MERGE_BATCH", 2)
    monkeypatch.setattr("clearskies.sync.limits.MAX_WAITING_RECORDS", 4)
    sync, session, connection = open_session(share, Clock(), features=PAGED)
    merges: list[tuple[list[str], Deferred[None]]] = []

    def receive_records(session, records):
        merges.append(([r.path for r in records], Deferred()))
        return merges[-1][1]

    monkeypatch.setattr(sync, "receive_records", receive_records)
    for number, paths in enumerate(["ab", "cd", "ef"]):
        session.event_received(manifest_page(paths, number, more=True))
    assert connection.transport.producerState == "producing"  # four records wait
    session.event_received(manifest_page("gh", 3, more=False))
    for path in "ij":
        record = file_record(path, path.encode(), {THEM: 2})
        session.event_received(message({"type": "update", "revision": 4,
                                        "file": record.to_wire()}))
    assert connection.transport.producerState == "paused"  # eight wait
    merges[0][1].callback(None)
    assert connection.transport.producerState == "paused"  # six
    merges[1][1].callback(None)
    assert connection.transport.producerState == "producing"  # four
    for index in range(2, 5):
        merges[index][1].callback(None)
    assert [paths for paths, _ in merges] == [list(p) for p in ("ab", "cd", "ef", "gh", "ij")]
    assert not session.merging and connection.transport.producerState == "producing"
