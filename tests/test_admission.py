"""Admission of unauthenticated connections: slots, fairness, deadlines (pure, driven by inputs)."""

from __future__ import annotations

import pytest

from clearskies.admission import Admission, source_group


def test_source_groups():
    """IPv4 counts per /24, IPv6 per /64, loopback per address, mapped IPv4 as IPv4."""
    assert source_group("192.0.2.7") == "192.0.2.0/24"
    assert source_group("::ffff:192.0.2.9") == "192.0.2.0/24"
    assert source_group("2001:db8:1:2:3:4:5:6") == "2001:db8:1:2::/64"
    assert source_group("127.0.3.4") == "127.0.3.4"
    assert source_group("::1") == "::1"
    assert source_group("not an address") == "not an address"


def test_below_capacity_everyone_is_admitted():
    """Until the table is full every newcomer gets a slot, whatever its source."""
    table = Admission(4)
    for n in range(4):
        assert table.arrive(n, "127.0.0.1", now=float(n)).admit
    assert len(table) == 4


def test_full_table_evicts_the_oldest_silent_connection_of_the_biggest_group():
    """A newcomer displaces the oldest connection without start from the most represented group."""
    table = Admission(4)
    table.arrive("a1", "192.0.2.1", 0.0)
    table.arrive("b1", "198.51.100.1", 1.0)
    table.arrive("a2", "192.0.2.2", 2.0)
    table.arrive("a3", "192.0.2.3", 3.0)
    verdict = table.arrive("new", "203.0.113.5", 4.0)
    assert verdict.admit and verdict.evict == "a1"
    assert "a1" not in table and "new" in table


def test_started_connections_are_kept_before_silent_ones():
    """A connection that sent start is evicted only after every silent one, even if older."""
    table = Admission(2)
    table.arrive("legit", "127.0.0.2", 0.0)
    table.started("legit")
    table.arrive("idle", "127.0.0.3", 1.0)
    assert table.arrive("n1", "127.0.0.4", 2.0).evict == "idle"
    assert table.arrive("n2", "127.0.0.5", 3.0).evict == "n1"
    assert "legit" in table


def test_many_single_addresses_cannot_keep_a_newcomer_out():
    """64 addresses with one silent connection each: a 65th address always gets a slot."""
    table = Admission(64)
    for n in range(64):
        table.arrive(("attacker", n), "127.0.1.%d" % n, float(n))
    verdict = table.arrive("legit", "127.0.0.1", 100.0)
    assert verdict.admit and verdict.evict == ("attacker", 0)
    table.started("legit")
    # Attackers reconnecting as fast as they like never displace it.
    for n in range(500):
        assert table.arrive(("again", n), "127.0.1.%d" % (n % 64), 101.0 + n).evict != "legit"
    assert "legit" in table


def test_started_slots_are_taken_only_from_a_bigger_group():
    """With every slot past start, a newcomer evicts only from a group two slots bigger."""
    table = Admission(3)
    for key, host in (("a1", "192.0.2.1"), ("a2", "192.0.2.2"), ("b1", "198.51.100.1")):
        table.arrive(key, host, 0.0)
        table.started(key)
    refused = table.arrive("b2", "198.51.100.2", 1.0)
    assert not refused.admit and refused.reason == "all 3 handshake slots are taken"
    verdict = table.arrive("c1", "203.0.113.1", 1.0)
    assert verdict.admit and verdict.evict == "a1"


def test_slow_started_connections_give_way_to_an_equal_newcomer():
    """Single started connections from many groups: a newcomer evicts one only once it is 3 s old."""
    table = Admission(4)
    for n in range(4):
        table.arrive(n, "127.0.1.%d" % n, float(n))
        table.started(n)
    assert not table.arrive("early", "127.0.0.1", 2.5).admit
    verdict = table.arrive("legit", "127.0.0.1", 3.0)
    assert verdict.admit and verdict.evict == 0
    assert "took 3 s" in verdict.reason


def test_within_a_group_the_busiest_address_gives_way():
    """Inside one group a newcomer from a quieter address evicts from the busiest one."""
    table = Admission(3)
    for key in ("x1", "x2", "x3"):
        table.arrive(key, "192.0.2.1", 0.0)
        table.started(key)
    verdict = table.arrive("y1", "192.0.2.2", 1.0)
    assert verdict.admit and verdict.evict == "x1"
    table.started("y1")
    assert not table.arrive("x4", "192.0.2.1", 2.0).admit


@pytest.mark.parametrize("used, start, handshake", [(0, 10.0, 20.0), (32, 10.0, 20.0),
                                                    (48, 6.5, 13.0), (64, 3.0, 6.0)])
def test_deadlines_shrink_with_pressure(used, start, handshake):
    """Deadlines stay full up to half the slots, then fall linearly to their minimums."""
    table = Admission(64)
    for n in range(used):
        table.arrive(n, "127.0.0.1", 0.0)
    assert table.start_timeout() == pytest.approx(start)
    assert table.handshake_timeout() == pytest.approx(handshake)


def test_overdue_follows_stage_and_pressure():
    """Silent connections expire at the start deadline, started ones at the handshake deadline."""
    table = Admission(64)
    table.arrive("silent", "127.0.0.2", 0.0)
    table.arrive("started", "127.0.0.3", 0.0)
    table.started("started")
    assert table.overdue(9.9) == [] and table.next_deadline() == 10.0
    assert [key for key, _ in table.overdue(10.0)] == ["silent"]
    table.leave("silent")
    assert table.next_deadline() == 20.0
    for n in range(63):  # a flood arrives: the started one's deadline comes closer
        table.arrive(n, "127.0.1.%d" % n, 15.0)
    late = dict(table.overdue(15.0))
    assert late["started"] == "handshake did not finish within 6 s"


def test_leave_frees_the_slot_and_is_idempotent():
    """A proven, failed or closed connection frees its slot once; unknown keys are ignored."""
    table = Admission(1)
    table.arrive("a", "127.0.0.2", 0.0)
    table.started("a")
    table.leave("a")
    table.leave("a")
    table.leave("never seen")
    assert len(table) == 0
    assert table.arrive("b", "127.0.0.2", 1.0).admit


def test_a_flood_that_reconnects_is_evicted_before_a_peer_waiting_its_turn():
    """A peer with two shares arriving into a flood ties in number with the attackers,
    who reconnect after each eviction: the attackers' churn sends them out first."""
    table = Admission(4)
    now = 0.0
    for n in range(24):  # the flood, reconnecting at once, every 50 ms
        table.arrive(("x", n), "127.0.0.9", now)
        now += 0.05
    assert table.arrive("bob1", "127.0.0.2", now).admit
    assert table.arrive("bob2", "127.0.0.2", now).admit
    evicted = []
    for n in range(24, 60):
        now += 0.05
        evicted.append(table.arrive(("x", n), "127.0.0.9", now).evict)
    assert "bob1" in table and "bob2" in table
    assert "bob1" not in evicted and "bob2" not in evicted
    assert table.churn("127.0.0.9", now) > 10 and table.churn("127.0.0.2", now) == 0
