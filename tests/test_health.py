"""Share health: warnings for shares and peers not synced for too long (fake clock)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from twisted.internet.task import Clock

from clearskies.daemon.health import (
    HEALTH_KEY, SAVE_SPACING, HealthTimes, PeerSighting, ShareHealth, stale_warnings)
from clearskies.share.database import PeerInfo

DAY = 86400.0
WEEK = 7 * DAY


class Resources:
    """The little of ``daemon.resources.Resources`` the health needs, in memory."""

    def __init__(self, clock: Clock, config: dict[str, Any] | None = None) -> None:
        self.clock = clock
        self.config: dict[str, Any] = dict(config or {})
        self.saved: list[Any] = []

    def now(self) -> float:
        return self.clock.seconds()

    async def save_config(self, key: str, value: Any) -> None:
        self.config[key] = value
        self.saved.append((key, value))


def runtime(share_id: str = "s" * 64, sessions: dict | None = None,
            peers: dict | None = None, state: str = "idle") -> Any:
    seen: list[str] = []
    return SimpleNamespace(
        share_id=share_id,
        sync=SimpleNamespace(sessions=sessions or {}),
        service=SimpleNamespace(status=SimpleNamespace(state=state)),
        peers=peers or {}, seen=seen, peer_seen=seen.append)


def test_a_share_never_in_sync_warns_once_the_time_has_passed_since_it_was_followed():
    times = HealthTimes(None, since=1000.0)
    assert stale_warnings(1000.0 + WEEK, WEEK, times, False, []) == []
    warnings = stale_warnings(1000.0 + WEEK + 1, WEEK, times, False, [])
    assert len(warnings) == 1 and "since it was set up here, 7 days ago" in warnings[0]


def test_a_share_in_sync_now_or_a_connected_peer_never_warns():
    times = HealthTimes(0.0, since=0.0)
    peer = PeerSighting("p" * 32, "laptop", 0.0, connected=True)
    assert stale_warnings(10 * WEEK, WEEK, times, True, [peer]) == []


def test_each_peer_not_seen_for_too_long_is_named():
    times = HealthTimes(5 * WEEK, since=0.0)
    peers = [PeerSighting("a" * 32, "laptop", 5 * WEEK - 3 * DAY, False),
             PeerSighting("b" * 32, None, 5 * WEEK - 9 * DAY, False)]
    assert stale_warnings(5 * WEEK, WEEK, times, False, peers) == [
        "peer %s not seen for 9 days" % ("b" * 16)]


def test_zero_turns_the_warnings_off():
    assert stale_warnings(10 * WEEK, 0, HealthTimes(None, 0.0), False, []) == []


def test_in_sync_moves_last_in_sync_and_stale_after_follows_the_setting():
    clock = Clock()
    clock.advance(1_800_000_000)
    resources = Resources(clock, {"stale_after": 3600})
    session = SimpleNamespace(in_sync=True)
    share = runtime(sessions={"p" * 32: session})
    health = ShareHealth(resources, lambda: [share])
    health.check()
    assert health.summary(share) == {"last_in_sync": 1_800_000_000}
    # The peer goes; an hour and a bit later the share warns.
    share.sync.sessions.clear()
    clock.advance(3601)
    health.check()
    summary = health.summary(share)
    assert summary["last_in_sync"] == 1_800_000_000
    assert summary["warnings"] == ["not in sync with any peer for 1 hour"]


def test_a_share_that_is_scanning_is_not_in_sync():
    clock = Clock()
    share = runtime(sessions={"p": SimpleNamespace(in_sync=True)}, state="scanning")
    health = ShareHealth(Resources(clock), lambda: [share])
    health.check()
    assert health.times(share.share_id).last_in_sync is None


def test_times_are_saved_now_and_then_and_survive_a_restart():
    """A restart reads the kept times: an old share does not look fresh."""
    clock = Clock()
    clock.advance(1_800_000_000)
    resources = Resources(clock)
    share = runtime(sessions={"p" * 32: SimpleNamespace(in_sync=True)})
    health = ShareHealth(resources, lambda: [share])
    health.check()
    assert len(resources.saved) == 1  # the first sighting is written at once
    clock.advance(60)
    health.check()
    assert len(resources.saved) == 1  # not every minute
    clock.advance(SAVE_SPACING)
    health.check()
    assert len(resources.saved) == 2
    kept = resources.config[HEALTH_KEY][share.share_id]
    assert kept["last_in_sync"] == clock.seconds()
    # The daemon stops (and saves); ten days later it starts again, alone.
    health.save()
    clock.advance(10 * DAY)
    alone = runtime()
    restarted = ShareHealth(Resources(clock, resources.config), lambda: [alone])
    assert restarted.summary(alone)["warnings"] == ["not in sync with any peer for 10 days"]


def test_connected_peers_are_marked_seen_now_and_then():
    """A peer connected for weeks stays "seen": its last_seen is refreshed."""
    clock = Clock()
    share = runtime(sessions={"p" * 32: SimpleNamespace(in_sync=False)})
    health = ShareHealth(Resources(clock), lambda: [share])
    health.check()
    clock.advance(60)
    health.check()
    assert share.seen == ["p" * 32]
    clock.advance(SAVE_SPACING)
    health.check()
    assert share.seen == ["p" * 32] * 2


def test_a_peer_of_the_peers_table_not_seen_for_long_is_warned_about():
    clock = Clock()
    clock.advance(100 * DAY)
    peers = {"q" * 32: PeerInfo("s" * 64, "q" * 32, "desktop", last_seen=clock.seconds() - 8 * DAY)}
    share = runtime(peers=peers)
    resources = Resources(clock, {HEALTH_KEY: {share.share_id: {"last_in_sync": clock.seconds(),
                                                                "since": 0}}})
    health = ShareHealth(resources, lambda: [share])
    assert health.summary(share)["warnings"] == ["peer desktop not seen for 8 days"]


def test_stored_garbage_is_read_as_nothing_known():
    clock = Clock()
    clock.advance(50.0)
    share = runtime()
    health = ShareHealth(Resources(clock, {HEALTH_KEY: {share.share_id: "junk"}}),
                         lambda: [share])
    assert health.times(share.share_id) == HealthTimes(None, 50.0)
