"""Extension thumbnails (protocol/thumbnails.md) on one session, against a scripted and a
hostile peer: asks and answers, oversize and unasked replies, floods, timeouts."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from clearskies import wire
from clearskies.errors import ProtocolError
from clearskies.sync.thumbs import (
    ASK_TIMEOUT, BURST, FLOOD, MAX_ANSWERING, MAX_ASKING, MAX_PAYLOAD, REFILL_EVERY)
from clearskies.thumbnails import Busy, ThumbnailError
from tests.fakes import MemoryShare, message, open_session

FEATURES = ("vv", "progress", "thumbnails")
SHA = "ab" * 32
JPEG = b"\xff\xd8\xff" + b"thumbnail" * 100


def _session(tmp_path: Path, features: tuple[str, ...] = FEATURES):
    root = tmp_path / "share"
    root.mkdir()
    clock = Clock()
    _, session, connection = open_session(MemoryShare(root), clock, features=features)
    connection.sent()
    return session, connection, clock


def _data(session, ask_id: int, payload: bytes, **extra) -> None:
    body = {"type": "thumbnail.data", "id": ask_id, "path": "a.jpg", **extra}
    session.event_received(wire.Message(body=body, text=b"", has_payload=True))
    for start in range(0, len(payload), 64 * 1024):
        session.event_received(wire.PayloadChunk(payload[start:start + 64 * 1024]))
    session.event_received(wire.PayloadEnd())


def _outcome(d: Deferred) -> list:
    out: list = []
    d.addBoth(out.append)
    return out


def test_ask_and_receive_a_thumbnail(tmp_path: Path) -> None:
    """An ask goes out as thumbnail.get with the path and SHA-256; the payload of the
    answer fires it."""
    session, connection, _ = _session(tmp_path)
    got = _outcome(session.thumbs.ask("photos/a.jpg", SHA))
    [sent] = connection.sent()
    assert sent.body == {"type": "thumbnail.get", "id": 1, "path": "photos/a.jpg",
                         "sha256": SHA}
    _data(session, 1, JPEG, size=len(JPEG))
    assert got == [JPEG] and connection.closed is None


def test_an_oversize_reply_closes_the_connection(tmp_path: Path) -> None:
    """A payload past MAX_PAYLOAD bytes (or announced as such) is a protocol error."""
    session, _, _ = _session(tmp_path)
    session.thumbs.ask("a.jpg", SHA)
    with pytest.raises(ProtocolError, match="larger than"):
        _data(session, 1, b"\xff" * (MAX_PAYLOAD + 1))
    (tmp_path / "again").mkdir()
    session2, _, _ = _session(tmp_path / "again")
    session2.thumbs.ask("a.jpg", SHA)
    with pytest.raises(ProtocolError, match="over"):
        _data(session2, 1, JPEG, size=MAX_PAYLOAD + 1)


def test_an_unasked_reply_closes_the_connection(tmp_path: Path) -> None:
    """thumbnail.data answering no ask of ours (or answering twice) is a protocol error;
    an unasked thumbnail.error is ignored."""
    session, _, _ = _session(tmp_path)
    session.event_received(message({"type": "thumbnail.error", "id": 7, "path": "a.jpg",
                                    "code": "not_found", "message": "no"}))
    with pytest.raises(ProtocolError, match="nothing we asked"):
        _data(session, 7, JPEG)
    asked = _outcome(session.thumbs.ask("a.jpg", SHA))
    _data(session, 1, JPEG)
    assert asked == [JPEG]
    with pytest.raises(ProtocolError, match="nothing we asked"):
        _data(session, 1, JPEG)


def test_errors_timeouts_and_a_lost_connection_fail_the_ask(tmp_path: Path) -> None:
    """thumbnail.error fails the ask with the peer's reason (busy: Busy); no answer within
    ASK_TIMEOUT or a lost connection fails it too; at most MAX_ASKING are outstanding."""
    session, _, clock = _session(tmp_path)
    refused = _outcome(session.thumbs.ask("a.jpg", SHA))
    busy = _outcome(session.thumbs.ask("b.jpg", SHA))
    session.event_received(message({"type": "thumbnail.error", "id": 1, "path": "a.jpg",
                                    "code": "not_an_image", "message": "a text file"}))
    session.event_received(message({"type": "thumbnail.error", "id": 2, "path": "b.jpg",
                                    "code": "busy", "message": "later"}))
    assert refused[0].check(ThumbnailError) and refused[0].value.code == "not_an_image"
    assert busy[0].check(Busy)
    late = _outcome(session.thumbs.ask("c.jpg", SHA))
    clock.advance(ASK_TIMEOUT)
    assert late[0].check(ThumbnailError)
    waiting = [_outcome(session.thumbs.ask("d%d.jpg" % n, SHA)) for n in range(MAX_ASKING)]
    over = _outcome(session.thumbs.ask("e.jpg", SHA))
    assert over[0].check(Busy) and all(w == [] for w in waiting)
    session.connection_lost("gone")
    assert all(w and w[0].check(ThumbnailError) for w in waiting)


def test_without_the_feature_nothing_is_asked_or_answered(tmp_path: Path) -> None:
    """A peer without the feature is never asked; its thumbnail.get is ignored as any
    unknown message, and a thumbnail.data payload from it is a protocol error."""
    session, connection, _ = _session(tmp_path, features=("vv", "progress"))
    session.thumbs.connect(lambda path, sha: succeed(JPEG))
    failed = _outcome(session.thumbs.ask("a.jpg", SHA))
    assert failed[0].check(ThumbnailError) and failed[0].value.code == "not_supported"
    session.event_received(message({"type": "thumbnail.get", "id": 1, "path": "a.jpg",
                                    "sha256": SHA}))
    assert connection.sent() == []
    with pytest.raises(ProtocolError):
        _data(session, 1, JPEG)


def test_answering_sends_the_thumbnail_or_a_reason(tmp_path: Path) -> None:
    """A thumbnail.get is answered by the daemon's thumbnail as a payload; a path that is
    unsafe or a SHA-256 that is malformed is refused without asking the daemon; what the
    daemon refuses goes back as thumbnail.error with its code."""
    session, connection, _ = _session(tmp_path)
    asked: list = []

    def answer(path: str, sha256: str) -> Deferred:
        asked.append((path, sha256))
        if path == "notes.jpg":
            d: Deferred = Deferred()
            d.errback(ThumbnailError("not_an_image", "not an image"))
            return d
        return succeed(JPEG)
    session.thumbs.connect(answer)
    session.event_received(message({"type": "thumbnail.get", "id": 5, "path": "a/b.jpg",
                                    "sha256": SHA}))
    [header, *chunks, end] = connection.sent()
    assert header.body["type"] == "thumbnail.data" and header.body["id"] == 5
    assert header.has_payload and b"".join(c.data for c in chunks) == JPEG
    for bad_path in ("../etc/passwd", "/etc/passwd", "a//b.jpg"):
        session.event_received(message({"type": "thumbnail.get", "id": 6, "path": bad_path,
                                        "sha256": SHA}))
        [refusal] = connection.sent()
        assert refusal.body["type"] == "thumbnail.error" and refusal.body["code"] == "refused"
    session.event_received(message({"type": "thumbnail.get", "id": 7, "path": "x.jpg",
                                    "sha256": "no"}))
    assert connection.sent()[0].body["code"] == "refused"
    session.event_received(message({"type": "thumbnail.get", "id": 8, "path": "notes.jpg",
                                    "sha256": SHA}))
    assert connection.sent()[0].body["code"] == "not_an_image"
    assert asked == [("a/b.jpg", SHA), ("notes.jpg", SHA)]
    with pytest.raises(ProtocolError, match="id"):
        session.event_received(message({"type": "thumbnail.get", "id": "x", "path": "a",
                                        "sha256": SHA}))


def test_a_flood_of_asks_is_refused_then_disconnected(tmp_path: Path) -> None:
    """At most MAX_ANSWERING answers are made at once and BURST asks taken in a burst; the
    rest are refused busy at once (no work done); past FLOOD refusals in a row the
    connection is closed.  The allowance refills with time."""
    session, connection, clock = _session(tmp_path)
    pending: list[Deferred] = []

    def answer(path: str, sha256: str) -> Deferred:
        d: Deferred = Deferred()
        pending.append(d)
        return d
    session.thumbs.connect(answer)

    def ask(n: int) -> None:
        session.event_received(message({"type": "thumbnail.get", "id": n, "path": "%d.jpg" % n,
                                        "sha256": SHA}))
    for n in range(1, 11):
        ask(n)
    assert len(pending) == MAX_ANSWERING
    refusals = connection.sent()
    assert len(refusals) == 10 - MAX_ANSWERING
    assert {r.body["code"] for r in refusals} == {"busy"}
    for d in pending:
        d.callback(JPEG)
    assert [e.body["id"] for e in connection.sent() if isinstance(e, wire.Message)] == \
        list(range(1, MAX_ANSWERING + 1))
    # Answers made at once take the rest of the burst; then busy until time passes.
    session.thumbs.connect(lambda path, sha256: succeed(JPEG))
    for n in range(11, 11 + BURST):
        ask(n)
    replies = [e.body for e in connection.sent() if isinstance(e, wire.Message)]
    assert [r["type"] for r in replies].count("thumbnail.data") == BURST - 10
    assert [r.get("code") for r in replies].count("busy") == 10
    clock.advance(REFILL_EVERY * 2)
    ask(100)
    assert [e.body["type"] for e in connection.sent() if isinstance(e, wire.Message)] == \
        ["thumbnail.data"]
    with pytest.raises(ProtocolError, match="flood"):
        for n in range(FLOOD + 10):
            ask(1000 + n)
