"""Tests for clearskies.discovery.connector.ConnectionManager, with a fake dial and a Clock."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock

from clearskies.addresses import Address
from clearskies.discovery.connector import ConnectionManager

SHARE = "a" * 64
CODE = "c" * 64
OWN_PEER = "0" * 32
PEER_B = "b" * 32
PEER_C = "e" * 32
ONION = "a" * 56 + ".onion"

WAN = Address("tcp", "203.0.113.5", 4000)
WAN2 = Address("tcp", "198.51.100.9", 4000)
LAN = Address("tcp", "192.168.1.20", 4000)
OWN = Address("tcp", "192.168.1.2", 4000)


@dataclass
class Connection:
    peer_id: str | None = None


class Dialer:
    """Records dials; each returns a Deferred the test fires (or fails at once if ``refuse``)."""

    def __init__(self, clock: Clock, refuse: bool = False) -> None:
        self.clock = clock
        self.refuse = refuse
        self.calls: list[tuple[float, Address, str, Deferred]] = []

    def __call__(self, address: Address, target: str) -> Deferred:
        if self.refuse:
            d = fail(ConnectionRefusedError())
        else:
            d = Deferred()
        self.calls.append((self.clock.seconds(), address, target, d))
        return d

    @property
    def addresses(self) -> list[Address]:
        return [call[1] for call in self.calls]

    def times(self, address: Address) -> list[float]:
        return [call[0] for call in self.calls if call[1] == address]


def make(refuse: bool = False, connected: set | None = None, **kwargs):
    clock = Clock()
    dialer = Dialer(clock, refuse)
    connected = set() if connected is None else connected
    manager = ConnectionManager(
        clock, dialer,
        lambda target, peer: (target, peer) in connected,
        lambda: [OWN_PEER],
        lambda: [OWN, Address("tcp", "0.0.0.0", 4100)],
        **kwargs,
    )
    manager.startService()
    return clock, dialer, manager


def run_for(clock: Clock, seconds: int) -> None:
    """Advance one second at a time, so a dial made too early would show."""
    for _ in range(seconds):
        clock.advance(1)


def test_skips_self_and_undialable_transports() -> None:
    """Our own peer ID and listening addresses, utp, and tor (unless enabled) are never dialled."""
    clock, dialer, manager = make()
    assert not manager.add_candidate(SHARE, WAN, OWN_PEER, "tracker")
    assert not manager.add_candidate(SHARE, OWN, PEER_B, "lan")
    assert not manager.add_candidate(SHARE, Address("tcp", "127.0.0.1", 4100), None, "manual")
    assert not manager.add_candidate(SHARE, Address("utp", "203.0.113.5", 4001), PEER_B, "tracker")
    assert not manager.add_candidate(SHARE, Address("tor", ONION, 80), None, "manual")
    assert manager.add_candidate(SHARE, Address("tcp", "127.0.0.1", 4101), None, "manual")
    clock.advance(0)
    assert dialer.addresses == [Address("tcp", "127.0.0.1", 4101)]

    clock, dialer, manager = make(protocols=("tcp", "tor"))
    assert manager.add_candidate(SHARE, Address("tor", ONION, 80))
    clock.advance(0)
    assert dialer.addresses == [Address("tor", ONION, 80)]


def test_bad_arguments_raise() -> None:
    """An unknown source, a non-Address, or a malformed peer ID is a programming error."""
    _clock, _dialer, manager = make()
    with pytest.raises(ValueError, match="source"):
        manager.add_candidate(SHARE, WAN, None, "dht")
    with pytest.raises(TypeError):
        manager.add_candidate(SHARE, "tcp:1.2.3.4:5")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="peer ID"):
        manager.add_candidate(SHARE, WAN, "XYZ")


def test_one_dial_per_address_and_per_peer() -> None:
    """Repeated announcements make one dial; a second address of the same peer waits its turn."""
    clock, dialer, manager = make()
    for source in ("tracker", "lan", "tracker", "manual"):
        manager.add_candidate(SHARE, WAN, PEER_B, source)
    manager.add_candidate(SHARE, WAN2, PEER_B, "tracker")
    clock.advance(0)
    run_for(clock, 50)  # less than the 60 s dial timeout
    assert dialer.addresses == [WAN]
    [status_wan] = [s for s in manager.candidates(SHARE) if s.address == WAN]
    assert status_wan.sources == {"tracker", "lan", "manual"} and status_wan.dialling
    dialer.calls[0][3].errback(ConnectionRefusedError())
    clock.advance(0)
    assert dialer.addresses == [WAN, WAN2]


def test_connected_peer_is_not_dialled_until_lost() -> None:
    """A peer already connected for the target is skipped; after connection_lost it is dialled."""
    connected = {(SHARE, PEER_B)}
    clock, dialer, manager = make(connected=connected)
    manager.add_candidate(SHARE, WAN, PEER_B, "tracker")
    manager.add_candidate(CODE, WAN, PEER_B, "tracker")  # same peer, other target: dialled
    run_for(clock, 50)
    assert [(a, t) for _, a, t, _ in dialer.calls] == [(WAN, CODE)]
    connected.clear()
    manager.connection_lost(SHARE, PEER_B, Address("tcp", "203.0.113.5", 51234))
    clock.advance(0)
    assert len(dialer.calls) == 1
    clock.advance(1)
    assert [(a, t) for _, a, t, _ in dialer.calls] == [(WAN, CODE), (WAN, SHARE)]


def test_backoff_doubles_to_a_minute() -> None:
    """Failed dials to one address are retried after 2, 4, 8 … s, then every 60 s."""
    clock, dialer, manager = make(refuse=True)
    manager.add_candidate(SHARE, WAN, PEER_B, "manual")
    clock.advance(0)
    run_for(clock, 400)
    times = dialer.times(WAN)
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert gaps == [2, 4, 8, 16, 32, 60, 60, 60, 60, 60]
    [status] = manager.candidates(SHARE)
    assert status.failures == 11 and status.next_attempt == times[-1] + 60


def test_retry_now_dials_a_backed_off_target_at_once() -> None:
    """A share back from its error state is dialled now, not at its next 60 s back-off."""
    clock, dialer, manager = make(refuse=True)
    manager.add_candidate(SHARE, WAN, PEER_B, "manual")
    clock.advance(0)
    run_for(clock, 200)
    dialled = len(dialer.times(WAN))
    manager.retry_now(SHARE)
    clock.advance(0)
    assert len(dialer.times(WAN)) == dialled + 1
    assert manager.candidates(SHARE)[0].failures == 1  # counting afresh


def test_lan_addresses_are_dialled_first() -> None:
    """With one dial slot, LAN addresses go before public ones, whatever the order they came in."""
    clock, dialer, manager = make(max_dials=1)
    manager.add_candidate(SHARE, WAN, PEER_B, "tracker")
    manager.add_candidate(SHARE, WAN2, PEER_C, "tracker")
    manager.add_candidate(SHARE, LAN, PEER_C, "lan")
    manager.add_candidate(CODE, Address("tcp", "fd00::7", 4000), None, "manual")
    clock.advance(0)
    assert dialer.addresses == [LAN]
    for expected in (Address("tcp", "fd00::7", 4000), WAN):
        dialer.calls[-1][3].errback(ConnectionRefusedError())
        clock.advance(0)
        assert dialer.addresses[-1] == expected
    # PEER_C's public address comes last: its LAN address was tried first.
    dialer.calls[-1][3].errback(ConnectionRefusedError())
    clock.advance(0)
    assert dialer.addresses == [LAN, Address("tcp", "fd00::7", 4000), WAN, WAN2]


def test_manual_peers_never_expire_but_tracker_candidates_do() -> None:
    """A failing manual peer is retried for hours; an unannounced tracker candidate is dropped."""
    clock, dialer, manager = make(refuse=True, expire_after=1800)
    manager.add_candidate(SHARE, WAN, None, "manual")
    manager.add_candidate(SHARE, WAN2, PEER_C, "tracker")
    run_for(clock, 10 * 3600)
    manual_times = dialer.times(WAN)
    tracker_times = dialer.times(WAN2)
    assert manual_times[-1] > 10 * 3600 - 61
    assert tracker_times[-1] <= 1800 + 30
    assert [s.address for s in manager.candidates(SHARE)] == [WAN]


def test_reannounced_candidates_stay() -> None:
    """A tracker candidate announced again before expiry is kept and keeps its back-off."""
    clock, dialer, manager = make(refuse=True, expire_after=600)
    for _ in range(10):
        manager.add_candidate(SHARE, WAN2, PEER_C, "tracker")
        run_for(clock, 300)
    [status] = manager.candidates(SHARE)
    assert status.address == WAN2 and status.sources == {"tracker"}
    # Dials at 0, 2, 6, 14, 30, then every 60 s from 62 s to 2942 s.
    assert status.failures == len(dialer.calls) == 5 + 49


def test_reconnects_after_loss() -> None:
    """A lost stable connection is redialled after a second; a flapping one backs off."""
    clock, dialer, manager = make()
    manager.add_candidate(SHARE, WAN, None, "manual")
    clock.advance(0)
    dialer.calls[0][3].callback(Connection(PEER_B))
    clock.advance(0)
    [status] = manager.candidates(SHARE)
    assert status.connected and status.peer_id == PEER_B
    run_for(clock, 300)
    assert len(dialer.calls) == 1
    manager.connection_lost(SHARE, PEER_B, WAN)
    clock.advance(0.5)
    assert len(dialer.calls) == 1
    clock.advance(0.5)
    assert len(dialer.calls) == 2 and dialer.calls[1][0] == 301

    for attempt, wait in enumerate([2, 4, 8], start=1):
        dialer.calls[-1][3].callback(Connection(PEER_B))
        clock.advance(5)
        manager.connection_lost(SHARE, PEER_B, WAN)  # dropped after 5 s
        assert manager.candidates(SHARE)[0].failures == attempt
        clock.advance(wait - 0.5)
        assert len(dialer.calls) == attempt + 1
        clock.advance(0.5)
        assert len(dialer.calls) == attempt + 2


def test_success_then_stable_resets_backoff() -> None:
    """After failures, a connection that lasts a minute resets the address's back-off."""
    clock, dialer, manager = make()
    manager.add_candidate(SHARE, WAN, PEER_B, "manual")
    clock.advance(0)
    for wait in (2, 4, 8):
        dialer.calls[-1][3].errback(ConnectionRefusedError())
        clock.advance(wait)
    assert manager.candidates(SHARE)[0].failures == 3
    dialer.calls[-1][3].callback(Connection())
    clock.advance(90)
    manager.connection_lost(SHARE, PEER_B, WAN)
    assert manager.candidates(SHARE)[0].failures == 0
    clock.advance(1)
    dialer.calls[-1][3].errback(ConnectionRefusedError())
    clock.advance(2)
    assert len(dialer.calls) == 6


def test_bounds_per_target_and_concurrent_dials() -> None:
    """At most max_per_target candidates (stalest tracker ones evicted) and max_dials dials at once."""
    clock, dialer, manager = make(max_per_target=8, max_dials=3)
    for n in range(12):
        manager.add_candidate(SHARE, Address("tcp", "203.0.113.%d" % (n + 10), 4000), None, "tracker")
        clock.advance(1)
    kept = {s.address.host for s in manager.candidates(SHARE)}
    assert len(kept) == 8
    assert len(dialer.calls) == 3 and manager.dialling == 3
    dialer.calls[0][3].errback(ConnectionRefusedError())
    clock.advance(0)
    assert len(dialer.calls) == 4 and manager.dialling == 3

    clock, dialer, manager = make(max_per_target=2)
    assert manager.add_candidate(SHARE, WAN, None, "manual")
    assert manager.add_candidate(SHARE, WAN2, None, "manual")
    assert not manager.add_candidate(SHARE, LAN, PEER_C, "lan")
    assert {s.address for s in manager.candidates(SHARE)} == {WAN, WAN2}


def test_hung_dial_times_out() -> None:
    """A dial that never finishes is cancelled after dial_timeout and counts as a failure."""
    clock, dialer, manager = make(dial_timeout=20)
    manager.add_candidate(SHARE, WAN, PEER_B, "manual")
    clock.advance(0)
    clock.advance(20)
    assert dialer.calls[0][3].called
    [status] = manager.candidates(SHARE)
    assert status.failures == 1 and not status.dialling and manager.dialling == 0
    clock.advance(2)
    assert len(dialer.calls) == 2


def test_remove_target_cancels_dials() -> None:
    """remove_target cancels the dial in flight and nothing is dialled for it again."""
    clock, dialer, manager = make()
    manager.add_candidate(SHARE, WAN, PEER_B, "manual")
    clock.advance(0)
    d = dialer.calls[0][3]
    manager.remove_target(SHARE)
    assert d.called and manager.dialling == 0
    d.addErrback(lambda f: None)
    run_for(clock, 1000)
    assert len(dialer.calls) == 1 and manager.candidates(SHARE) == []


def test_learned_own_peer_is_dropped_and_stop_cancels() -> None:
    """A candidate whose connection turns out to be us is forgotten; stopService cancels dials."""
    own_peers = [OWN_PEER]
    clock = Clock()
    dialer = Dialer(clock)
    manager = ConnectionManager(clock, dialer, lambda t, p: False, lambda: own_peers, lambda: [])
    manager.startService()
    manager.add_candidate(SHARE, WAN, None, "manual")
    manager.add_candidate(SHARE, WAN2, None, "manual")
    clock.advance(0)
    dialer.calls[0][3].callback(Connection(OWN_PEER))
    manager.connection_lost(SHARE, OWN_PEER, WAN)
    clock.advance(1)
    assert [s.address for s in manager.candidates(SHARE)] == [WAN2]
    manager.stopService()
    assert dialer.calls[1][3].called and manager.dialling == 0
    dialer.calls[1][3].addErrback(lambda f: None)
    run_for(clock, 100)
    assert len(dialer.calls) == 2


def test_fault_in_daemon_callback_does_not_stop_the_loop() -> None:
    """If is_connected raises, the pass is logged and the loop runs again at the next tick."""
    clock = Clock()
    dialer = Dialer(clock)
    broken = [True]

    def is_connected(target: str, peer: str) -> bool:
        if broken[0]:
            raise RuntimeError("table not ready")
        return False

    manager = ConnectionManager(clock, dialer, is_connected, lambda: [], lambda: [], tick_interval=30)
    manager.startService()
    manager.add_candidate(SHARE, WAN, PEER_B, "tracker")
    clock.advance(0)
    assert dialer.calls == []
    broken[0] = False
    clock.advance(29)
    assert dialer.calls == []
    clock.advance(1)
    assert dialer.addresses == [WAN]
