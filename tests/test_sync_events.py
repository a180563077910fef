"""What the sync engine reports as it happens (ISyncEvents): each download started,
finished or failed, each upload and each conflict copy, with path, peer and size."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock
from zope.interface import implementer
from zope.interface.verify import verifyObject

from clearskies.interfaces import ISyncEvents
from tests.fakes import THEM, MemoryShare, deliver_file, file_record, message, open_session


@implementer(ISyncEvents)
class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def sync_event(self, kind: str, fields: dict) -> None:
        self.events.append((kind, fields))

    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.events]


@pytest.fixture
def share(tmp_path: Path) -> MemoryShare:
    root = tmp_path / "share"
    root.mkdir()
    return MemoryShare(root)


def test_a_download_is_reported_started_then_failed_then_finished(share: MemoryShare) -> None:
    clock = Clock()
    sync, session, connection = open_session(share, clock)
    recorder = Recorder()
    assert verifyObject(ISyncEvents, recorder)
    sync.events = recorder
    good = b"the real content"
    record = file_record("f.txt", good, {THEM: 1})
    session.event_received(message({"type": "update", "file": record.to_wire()}))
    deliver_file(session, "f.txt", b"something else!!")
    clock.advance(31)
    deliver_file(session, "f.txt", good)
    assert recorder.kinds() == ["download_started", "download_failed", "download_started",
                                "download_finished"]
    assert recorder.events[0][1] == {"file": "f.txt", "peer_id": THEM, "size": len(good)}
    assert recorder.events[1][1]["reason"] == "did not match its hash"
    assert recorder.events[3][1] == {"file": "f.txt", "peer_id": THEM, "size": len(good)}


def test_a_listener_that_raises_does_not_stop_the_download(share: MemoryShare) -> None:
    clock = Clock()
    sync, session, _ = open_session(share, clock)

    @implementer(ISyncEvents)
    class Broken:
        def sync_event(self, kind: str, fields: dict) -> None:
            raise RuntimeError("boom")

    sync.events = Broken()
    data = b"x" * 100
    session.event_received(message({"type": "update",
                                    "file": file_record("g", data, {THEM: 1}).to_wire()}))
    deliver_file(session, "g", data)
    assert (share.root / "g").read_bytes() == data


def test_a_connection_lost_mid_download_is_a_failure(share: MemoryShare) -> None:
    clock = Clock()
    sync, session, _ = open_session(share, clock)
    recorder = Recorder()
    sync.events = recorder
    session.event_received(message({"type": "update",
                                    "file": file_record("h", b"y" * 10, {THEM: 1}).to_wire()}))
    sync.detach(session)
    assert recorder.kinds() == ["download_started", "download_failed"]
    assert recorder.events[1][1]["reason"] == "the connection ended"
