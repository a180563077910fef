"""The event bus (clearskies.events) and what the daemon tells it (clearskies.daemon.eventfeed)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from twisted.logger import LogLevel

from clearskies.daemon.eventfeed import MAX_LOG_EVENTS, EventFeed, LogEvents
from clearskies.events import EventBus, TooManySubscribers


def _bus(history: int = 1000, max_subscribers: int = 64) -> EventBus:
    return EventBus(lambda: 1000.0, history=history, max_subscribers=max_subscribers)


def test_events_are_numbered_in_order_and_kept_for_since() -> None:
    bus = _bus()
    seen = []
    bus.add_listener(seen.append)
    for n in range(5):
        bus.publish("tick", n=n)
    assert [e["id"] for e in seen] == [1, 2, 3, 4, 5]
    assert seen[0] == {"id": 1, "time": 1000.0, "type": "tick", "n": 0}
    events, gap = bus.since(3)
    assert [e["id"] for e in events] == [4, 5] and not gap
    assert bus.since(5) == ([], False)


def test_since_says_when_events_are_gone() -> None:
    bus = _bus(history=3)
    for _ in range(10):
        bus.publish("tick")
    events, gap = bus.since(2)
    assert [e["id"] for e in events] == [8, 9, 10] and gap
    # Up to date: no gap.
    assert bus.since(10) == ([], False)
    # An id from before a restart (above last_id) starts over.
    events, gap = bus.since(500)
    assert [e["id"] for e in events] == [8, 9, 10]


def test_a_slow_subscriber_is_dropped_not_buffered() -> None:
    bus = _bus()
    dropped = []
    slow = bus.subscribe(limit=3, dropped=lambda: dropped.append(True))
    fast = bus.subscribe(limit=3)
    for _ in range(3):
        bus.publish("tick")
    assert len(fast.take()) == 3
    bus.publish("tick")
    assert dropped == [True] and slow.dropped and slow.closed and not slow.queue
    assert bus.subscriber_count == 1
    assert len(fast.take()) == 1


def test_subscribers_are_bounded_and_can_resume_with_since() -> None:
    bus = _bus(max_subscribers=2)
    bus.publish("a")
    bus.publish("b")
    first = bus.subscribe(since=1)
    assert [e["type"] for e in first.take()] == ["b"]
    bus.subscribe()
    with pytest.raises(TooManySubscribers):
        bus.subscribe()
    first.close()
    bus.subscribe()


def _runtime(share_id: str, wanted: dict, sessions: dict, in_flight: dict,
             state: str = "idle") -> SimpleNamespace:
    class Wanted(dict):
        """Like the sync layer's wanted files: a dict with a byte total."""

        @property
        def bytes(self) -> int:
            return sum(self.values())

    sync = SimpleNamespace(wanted=Wanted(wanted), in_sync=not wanted, sessions=sessions,
                           in_flight=in_flight, finishing={})
    return SimpleNamespace(root="/s/" + share_id, share_id=share_id, sync=sync,
                           peers={"p1": SimpleNamespace(name="bob")},
                           service=SimpleNamespace(status=SimpleNamespace(state=state,
                                                                          reason=None)))


def test_the_feed_publishes_what_changed_between_looks() -> None:
    bus = _bus()
    receiver = SimpleNamespace(expected=SimpleNamespace(path="big", size=100), received=10)
    session = SimpleNamespace(peer_id="p1", in_sync=False, peer_progress={"items": 1,
                                                                           "bytes": 100},
                              receiving=receiver)
    runtime = _runtime("s1", {"big": 100}, {"p1": session}, {"big": session})
    runtimes = [runtime]
    rates = [(0.0, 0.0)]
    feed = EventFeed(bus, lambda: runtimes, lambda: rates[0])
    feed.look()
    kinds = [e["type"] for e in bus.since(0)[0]]
    assert kinds == ["share_added", "share_status", "share_progress", "peer_connected",
                     "peer_progress", "download_progress"]
    last = bus.last_id
    feed.look()
    assert bus.last_id == last  # nothing changed, nothing said
    receiver.received = 60
    rates[0] = (0.0, 50.0)
    feed.look()
    new = bus.since(last)[0]
    assert [(e["type"], e.get("received"), e.get("bytes_remaining")) for e in new] == [
        ("share_progress", None, 40), ("download_progress", 60, None), ("rates", None, None)]
    assert new[0]["bytes_to_download"] == 100  # the whole file, until it is in place
    # The file arrives, the peer leaves, the share goes.
    last = bus.last_id
    del runtime.sync.in_flight["big"]
    runtime.sync.wanted.clear()
    runtime.sync.sessions.clear()
    feed.look()
    kinds = [e["type"] for e in bus.since(last)[0]]
    # (Downloads started and finished the engine reports itself, as they happen.)
    assert "peer_disconnected" in kinds and "download_finished" not in kinds
    runtimes.clear()
    feed.look()
    assert bus.since(0)[0][-1]["type"] == "share_removed"


def test_logged_warnings_become_events_a_bounded_number_per_look() -> None:
    bus = _bus()
    observer = LogEvents(bus)
    observer({"log_level": LogLevel.info, "log_format": "nothing to see"})
    observer({"log_level": LogLevel.info, "log_format": "concurrent changes to {path}: kept "
              "both, copy at {copy}", "path": "a.txt", "copy": "a (conflict).txt"})
    observer({"log_level": LogLevel.warn, "log_format": "could not write {path}",
              "path": "SYNCAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"})
    events = bus.since(0)[0]
    # (Conflicts the engine reports itself, not through the log.)
    assert [e["type"] for e in events] == ["warning"]
    assert "SYNCAAAA" not in events[0]["message"]  # codes never leave in an event
    for _ in range(MAX_LOG_EVENTS + 50):
        observer({"log_level": LogLevel.error, "log_format": "boom"})
    assert bus.last_id == MAX_LOG_EVENTS
    observer.new_look()
    observer({"log_level": LogLevel.error, "log_format": "boom"})
    assert bus.last_id == MAX_LOG_EVENTS + 1


def test_what_a_listener_logs_while_handed_a_logged_event_is_not_published_again() -> None:
    bus = _bus()
    observer = LogEvents(bus)
    bus.add_listener(lambda event: observer({"log_level": LogLevel.warn,
                                             "log_format": "a client fell behind"}))
    observer({"log_level": LogLevel.warn, "log_format": "first"})
    assert [e["message"] for e in bus.since(0)[0]] == ["first"]


def test_what_a_share_engine_reports_becomes_an_event_and_a_recent_change() -> None:
    from clearskies.daemon.shareevents import RECENT_CHANGES, ShareEvents

    bus = _bus()
    published: list = []

    class Host:
        def now(self) -> float:
            return 5.0

        def share_event(self, share_id: str, path: str, kind: str, fields: dict) -> None:
            published.append(bus.publish(kind, path=path, share_id=share_id, **fields))

    events = ShareEvents(Host(), "s1", "/s/one")  # type: ignore[arg-type]
    events.sync_event("download_started", {"file": "a", "peer_id": "p", "size": 3})
    events.sync_event("download_finished", {"file": "a", "peer_id": "p", "size": 3})
    events.sync_event("conflict", {"file": "b", "copy": "b.CONFLICT.12345678",
                                   "peer_id": "p", "size": 1})
    assert [e["type"] for e in published] == ["download_started", "download_finished",
                                              "conflict"]
    assert published[1] == {"id": 2, "time": published[1]["time"], "type": "download_finished",
                            "path": "/s/one", "share_id": "s1", "file": "a", "peer_id": "p",
                            "size": 3}
    assert [c["kind"] for c in events.recent] == ["received", "conflict"]
    for n in range(RECENT_CHANGES + 10):
        events.sync_event("upload_started", {"file": str(n), "peer_id": "p", "size": 1})
    assert len(events.recent) == RECENT_CHANGES  # bounded
    assert events.recent[-1]["file"] == str(RECENT_CHANGES + 9)
