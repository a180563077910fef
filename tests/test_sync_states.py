"""The sync session's state machine: its table, its drawing, and a session driven through it."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet.task import Clock

from clearskies import wire
from clearskies.errors import ProtocolError
from clearskies.sync import states
from tests.dotfile import edges
from tests.fakes import THEM, MemoryShare, deliver_file, file_record, message, open_session


@pytest.fixture
def share(tmp_path: Path) -> MemoryShare:
    root = tmp_path / "share"
    root.mkdir()
    return MemoryShare(root)


def test_session_drawing_and_table_agree():
    """protocol/session.dot draws exactly the transitions and outputs of both tables."""
    table = {(before, event, after, tuple(outputs))
             for transitions in (states.TRANSITIONS, states.INBOX_TRANSITIONS)
             for (before, event), (after, outputs) in transitions.items()}
    assert edges("session.dot") == table


def test_inbox_merges_one_batch_at_a_time():
    """The inbox machine: a merge, its end, a wait for the first scan; a second merge raises."""
    steps: list[tuple[str, str, str, list[str]]] = []
    inbox = states.InboxMachine(lambda *step: steps.append(step))
    assert inbox.fire("merge") == []
    with pytest.raises(states.IllegalTransition):
        inbox.fire("merge")
    assert inbox.fire("merged") == ["send_progress", "merge_next"]
    assert inbox.fire("scan_pending") == []
    assert inbox.fire("scan_done") == ["merge_next"]
    assert inbox.fire("merge") == [] and inbox.fire("merge_failed") == ["merge_next"]
    assert [after for _, _, after, _ in steps] == [
        "merging", "idle", "awaiting_scan", "idle", "merging", "idle"]


def test_a_session_inbox_is_merging_until_the_batch_is_merged(share):
    """Records arriving while a merge is held wait in the inbox; then both batches are merged."""
    from twisted.internet.defer import Deferred

    clock = Clock()
    sync, session, connection = open_session(share, clock)
    held: list[Deferred] = []
    real = sync.receive_records

    def slow(peer, records):
        d: Deferred = Deferred()
        held.append(d)
        d.addCallback(lambda _: real(peer, records))
        return d

    sync.receive_records = slow
    session.event_received(message({"type": "update", "revision": 1, "file": file_record(
        "a.txt", b"a", {THEM: 1}).to_wire()}))
    session.event_received(message({"type": "update", "revision": 2, "file": file_record(
        "b.txt", b"b", {THEM: 2}).to_wire()}))
    assert session.metadata.inbox.state == states.MERGING and session.merging
    assert len(held) == 1
    held[0].callback(None)
    assert len(held) == 2  # the second update went as the next batch
    held[1].callback(None)
    assert session.metadata.inbox.state == states.IDLE and not session.merging


def test_machine_returns_the_outputs_of_each_input():
    """Driven by hand: each input gives its outputs, in order, and the observer sees each step."""
    steps: list[tuple[str, str, str, list[str]]] = []
    machine = states.SessionMachine(lambda *step: steps.append(step))
    outputs = [machine.fire(event) for event in (
        "message", "attached", "message", "file_data", "chunk", "chunk", "payload_end",
        "connection_lost", "message", "chunk")]
    assert outputs == [
        ["dispatch"], ["ask_manifest", "send_addresses"], ["dispatch"], ["begin_payload"],
        ["write_chunk"], ["write_chunk"], ["finish_file"],
        ["abort_downloads", "stop_sending", "detach"], [], []]
    assert [after for _, _, after, _ in steps] == [
        "new", "open", "open", "receiving", "receiving", "receiving", "open",
        "closed", "closed", "closed"]


def test_payload_outside_file_data_is_the_peers_fault():
    """A chunk or a payload end with no file_data open is a ProtocolError (the peer's)."""
    machine = states.SessionMachine()
    machine.fire("attached")
    with pytest.raises(ProtocolError, match="payload data outside a file_data message"):
        machine.fire("chunk")
    with pytest.raises(ProtocolError, match="payload end outside a file_data message"):
        machine.fire("payload_end")
    assert machine.state == states.OPEN


def test_our_own_misuse_raises_illegal_transition():
    """Starting twice, or a duplicate after attaching, is our bug: IllegalTransition."""
    machine = states.SessionMachine()
    machine.fire("attached")
    with pytest.raises(states.IllegalTransition):
        machine.fire("attached")
    with pytest.raises(states.IllegalTransition):
        machine.fire("duplicate")
    assert machine.state == states.OPEN


def test_a_session_walks_the_drawn_states_while_a_file_arrives(share):
    """start, a requested file's payload and the connection's end move a real session as drawn."""
    clock = Clock()
    sync, session, connection = open_session(share, clock)
    steps: list[tuple[str, str, str, list[str]]] = []
    session.machine.observer = lambda *step: steps.append(step)
    assert session.machine.state == states.OPEN
    data = b"hello, machine"
    session.event_received(message({"type": "update", "revision": 1,
                                    "file": file_record("f.txt", data, {THEM: 1}).to_wire()}))
    assert "get" in connection.sent_types()
    deliver_file(session, "f.txt", data)
    assert (share.root / "f.txt").read_bytes() == data
    session.connection_lost(None)
    assert [(before, event, after) for before, event, after, _ in steps] == [
        ("open", "message", "open"), ("open", "message", "open"),
        ("open", "file_data", "receiving"), ("receiving", "chunk", "receiving"),
        ("receiving", "payload_end", "open"), ("open", "connection_lost", "closed")]
    assert not session.alive and THEM not in sync.sessions


def test_payload_data_with_no_file_asked_for_raises(share):
    """A chunk on a session with no file_data open raises ProtocolError, as before the machine."""
    _, session, _ = open_session(share, Clock())
    with pytest.raises(ProtocolError):
        session.event_received(wire.PayloadChunk(b"junk"))
    assert session.machine.state == states.OPEN


def test_a_duplicate_session_closes_and_drops_what_still_arrives(share):
    """The second connection with a peer that loses the tie is closed and ignores later messages."""
    clock = Clock()
    sync, first, _ = open_session(share, clock, port=4000)
    second_sync_session, connection = _second(sync, port=9000)
    assert second_sync_session.machine.state == states.CLOSED
    assert connection.closed == "duplicate connection with the same peer"
    second_sync_session.event_received(message({"type": "get_manifest"}))
    assert connection.sent_types() == []
    assert sync.sessions[THEM] is first


def _second(sync, port: int):
    from clearskies.sync import SyncSession
    from tests.fakes import FakeConnection

    connection = FakeConnection(port=port)
    session = SyncSession(sync, connection)
    session.start(None)
    return session, connection


def test_the_session_and_the_share_runtime_provide_their_seams(share):
    """SyncSession provides ISyncSession; the share runtime declares all of ILocalShare."""
    from zope.interface.verify import verifyClass, verifyObject

    from clearskies.interfaces import ILocalShare, ISyncSession
    from clearskies.daemon.runtime import ShareRuntime

    _, session, _ = open_session(share, Clock())
    assert verifyObject(ISyncSession, session)
    assert verifyClass(ILocalShare, ShareRuntime)
