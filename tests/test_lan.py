"""LAN discovery: announcement codec, hint filter, service timing, one real multicast run."""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial import unittest

from clearskies.discovery.lan import (
    DEFAULT_GROUP,
    DEFAULT_PORT,
    MAX_DATAGRAM,
    Announcement,
    LanDiscovery,
    RecentHints,
    decode_announcement,
    encode_announcement,
)
from clearskies.errors import ConfigurationError
from tests.helpers import async_test

SHARE = "a" * 64
OTHER_SHARE = "b" * 64
PEER = "1" * 32
OTHER_PEER = "2" * 32
THIRD_PEER = "3" * 32


def _datagram(**fields: Any) -> bytes:
    """A valid announcement with some fields replaced (None removes a field)."""
    message: dict[str, Any] = {
        "name": "ClearSkiesBroadcast", "version": 1,
        "id": SHARE, "peer": OTHER_PEER, "myport": 4000,
    }
    for key, value in fields.items():
        if value is None:
            message.pop(key)
        else:
            message[key] = value
    return json.dumps(message).encode()


# -- codec ------------------------------------------------------------------


def test_encode_exact_bytes():
    """The datagram is compact JSON with the draft's keys in the draft's order."""
    assert encode_announcement(SHARE, PEER, 60107) == (
        b'{"name":"ClearSkiesBroadcast","version":1,"id":"' + SHARE.encode()
        + b'","peer":"' + PEER.encode() + b'","myport":60107}'
    )


ONION = "b" * 56 + ".onion:60106"


def test_onion_address_rides_along_as_key_tor():
    """With Tor on, each announcement also says where we are reachable through Tor."""
    data = encode_announcement(SHARE, PEER, 60107, ONION)
    assert data.endswith(b',"myport":60107,"tor":"' + ONION.encode() + b'"}')
    assert decode_announcement(data) == Announcement(SHARE, PEER, 60107, onion=ONION)
    assert decode_announcement(encode_announcement(SHARE, PEER, 60107)).onion is None


@pytest.mark.parametrize("value", [
    "b" * 56 + ".onion", "b" * 55 + ".onion:1", "B" * 56 + ".onion:1", "b" * 56 + ".onion:0",
    "b" * 56 + ".onion:65536", "192.0.2.7:4000", 12, ["b" * 56 + ".onion:1"],
])
def test_malformed_onion_addresses_are_dropped_not_the_announcement(value):
    """A bad ``tor`` value is neither sent nor believed; the direct hint still counts."""
    assert decode_announcement(_datagram(tor=value)) == Announcement(SHARE, OTHER_PEER, 4000)
    if isinstance(value, str):
        with pytest.raises(ValueError):
            encode_announcement(SHARE, PEER, 1, value)


def test_bursts_carry_our_onion_address_once_we_have_one():
    """The onion address comes from get_onion at each burst; a failing or bad one is left out."""
    onion: list = [None]
    h = Harness(interface="127.0.0.1", get_onion=lambda: onion[0])
    port = h.start()
    assert port.written[-1][0] == encode_announcement(SHARE, PEER, 5000)
    onion[0] = ONION
    h.reactor.advance(60)
    assert port.written[-1][0] == encode_announcement(SHARE, PEER, 5000, ONION)
    onion[0] = "not an onion"
    h.reactor.advance(60)
    assert port.written[-1][0] == encode_announcement(SHARE, PEER, 5000)


@pytest.mark.parametrize("id,peer,port", [
    ("a" * 63, PEER, 1), (SHARE, "1" * 31, 1), (SHARE, PEER, 0),
    (SHARE, PEER, 65536), (SHARE, PEER, True), ("A" * 64, PEER, 1),
])
def test_encode_refuses_malformed_fields(id, peer, port):
    """We never send an announcement we would refuse to receive."""
    with pytest.raises(ValueError):
        encode_announcement(id, peer, port)


@given(
    id=st.text("0123456789abcdef", min_size=64, max_size=64),
    peer=st.text("0123456789abcdef", min_size=32, max_size=32),
    port=st.integers(1, 65535),
)
def test_round_trip(id, peer, port):
    """Whatever we encode decodes to the same three fields."""
    assert decode_announcement(encode_announcement(id, peer, port)) == Announcement(id, peer, port)


def test_decode_ignores_extra_keys_and_whitespace():
    """Unknown keys and JSON spacing from other implementations are fine."""
    data = _datagram(features=["x"]).replace(b",", b" ,\n ")
    assert decode_announcement(data) == Announcement(SHARE, OTHER_PEER, 4000)


def test_decode_size_limit_is_inclusive():
    """A datagram of exactly MAX_DATAGRAM bytes is read; one byte more is not."""
    base = _datagram()
    padded = base[:-1] + b" " * (MAX_DATAGRAM - len(base)) + b"}"
    assert len(padded) == MAX_DATAGRAM
    assert decode_announcement(padded) == Announcement(SHARE, OTHER_PEER, 4000)
    assert decode_announcement(b" " + padded) is None


MALFORMED = {
    "empty": b"",
    "not json": b"ClearSkiesBroadcast",
    "truncated json": _datagram()[:-1],
    "not utf-8": _datagram()[:-1] + b',"x":"\xff"}',
    "utf-16": _datagram().decode().encode("utf-16"),
    "json array": b"[1,2,3]",
    "json string": b'"ClearSkiesBroadcast"',
    "deep nesting": b"[" * 2000,
    "oversized": _datagram(pad="x" * MAX_DATAGRAM),
    "name missing": _datagram(name=None),
    "wrong name": _datagram(name="ClearSkiesBroadcastX"),
    "version missing": _datagram(version=None),
    "version 2": _datagram(version=2),
    "version string": _datagram(version="1"),
    "version float": _datagram(version=1.0),
    "version bool": _datagram(version=True),
    "id missing": _datagram(id=None),
    "id short": _datagram(id="a" * 63),
    "id long": _datagram(id="a" * 65),
    "id upper case": _datagram(id="A" * 64),
    "id not hex": _datagram(id="g" * 64),
    "id number": _datagram(id=12),
    "id trailing newline": _datagram(id="a" * 64 + "\n"),
    "peer missing": _datagram(peer=None),
    "peer short": _datagram(peer="2" * 31),
    "peer long": _datagram(peer="2" * 33),
    "peer not hex": _datagram(peer="z" * 32),
    "peer list": _datagram(peer=["2" * 32]),
    "port missing": _datagram(myport=None),
    "port zero": _datagram(myport=0),
    "port negative": _datagram(myport=-1),
    "port too big": _datagram(myport=65536),
    "port string": _datagram(myport="4000"),
    "port float": _datagram(myport=4000.0),
    "port bool": _datagram(myport=True),
    "port huge float": _datagram()[:-5] + b"1e999}",
}


@pytest.mark.parametrize("data", MALFORMED.values(), ids=MALFORMED.keys())
def test_decode_malformed_is_none(data):
    """Every kind of malformed datagram decodes to None instead of raising."""
    assert decode_announcement(data) is None


@given(st.binary(max_size=3000))
def test_decode_never_raises(data):
    """Arbitrary bytes from the network never raise."""
    result = decode_announcement(data)
    assert result is None or isinstance(result, Announcement)


# -- hint filter -------------------------------------------------------------


def test_recent_hints_window():
    """A key passes once, is held back for the window, then passes again."""
    recent = RecentHints(window=10.0)
    assert recent.admit("k", 0.0)
    assert not recent.admit("k", 9.9)
    assert recent.admit("other", 9.9)
    assert recent.admit("k", 10.0)
    assert not recent.admit("k", 15.0)


def test_recent_hints_clock_going_backwards():
    """A wall clock stepped back does not silence a key for the size of the step."""
    recent = RecentHints(window=10.0)
    assert recent.admit("k", 1000.0)
    assert recent.admit("k", 5.0)


def test_recent_hints_are_bounded():
    """The table never holds more than its limit; the oldest key is forgotten first."""
    recent = RecentHints(window=10.0, limit=3)
    for i in range(5):
        assert recent.admit(i, 1.0)
    assert len(recent) == 3
    assert recent.admit(0, 1.0)  # forgotten, so admitted again
    assert not recent.admit(4, 1.0)


def test_recent_hints_drop_expired_entries():
    """Expired entries are dropped as new ones arrive."""
    recent = RecentHints(window=10.0)
    for i in range(100):
        recent.admit(i, 0.0)
    recent.admit("late", 20.0)
    assert len(recent) == 1


# -- service with a fake reactor ----------------------------------------------


class FakeMulticastPort:
    """Records what a LanDiscovery does with its UDP port."""

    def __init__(self, port: int, protocol: Any, interface: str, max_packet: int,
                 listen_multiple: bool) -> None:
        self.port = port
        self.protocol = protocol
        self.interface = interface
        self.max_packet = max_packet
        self.listen_multiple = listen_multiple
        self.written: list[tuple[bytes, tuple[str, int]]] = []
        self.ttl: int | None = None
        self.loopback: bool | None = None
        self.outgoing: str | None = None
        self.groups: list[tuple[str, str]] = []
        self.broadcast = False
        self.listening = True
        self.fail_writes_to: set[str] = set()
        protocol.makeConnection(self)

    def write(self, data: bytes, addr: tuple[str, int]) -> None:
        if addr[0] in self.fail_writes_to:
            raise OSError(101, "Network is unreachable")
        self.written.append((data, addr))

    def setTTL(self, ttl: int) -> None:
        self.ttl = ttl

    def setLoopbackMode(self, mode: bool) -> None:
        self.loopback = bool(mode)

    def setOutgoingInterface(self, addr: str) -> defer.Deferred[int]:
        self.outgoing = addr
        return defer.succeed(1)

    def joinGroup(self, addr: str, interface: str = "") -> defer.Deferred[None]:
        self.groups.append((addr, interface))
        return defer.succeed(None)

    def setBroadcastAllowed(self, enabled: bool) -> None:
        self.broadcast = enabled

    def stopListening(self) -> defer.Deferred[None]:
        self.listening = False
        return defer.succeed(None)

    def receive(self, data: bytes, host: str, port: int = DEFAULT_PORT) -> None:
        """Deliver a datagram as if it came from ``host``."""
        self.protocol.datagramReceived(data, (host, port))

    def sent(self) -> list[Announcement | None]:
        """Decode every datagram written so far."""
        return [decode_announcement(data) for data, _ in self.written]


class FakeReactor(Clock):
    """A Clock that can also 'listen' for multicast, handing out fake ports."""

    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        self.ports: list[FakeMulticastPort] = []
        self.fail = fail

    def listenMulticast(self, port: int, protocol: Any, interface: str = "",
                        maxPacketSize: int = 8192, listenMultiple: bool = False):
        if self.fail:
            raise CannotListenError(interface, port, OSError(98, "Address in use"))
        fake = FakeMulticastPort(port, protocol, interface, maxPacketSize, listenMultiple)
        self.ports.append(fake)
        return fake


class Harness:
    """A LanDiscovery on a FakeReactor, announcing ``self.ours``, recording hints."""

    def __init__(self, **options: Any) -> None:
        self.reactor = FakeReactor(fail=options.pop("fail", False))
        self.ours: list[tuple[str, str, int]] = [(SHARE, PEER, 5000)]
        self.hints: list[tuple[Announcement, str]] = []
        options.setdefault("port", 47000)
        self.service = LanDiscovery(
            self.reactor, lambda: list(self.ours),
            lambda a, host: self.hints.append((a, host)), **options,
        )

    def start(self) -> FakeMulticastPort | None:
        self.service.startService()
        return self.reactor.ports[0] if self.reactor.ports else None


def test_start_configures_port_and_announces():
    """Start opens a shared port, sets TTL 1 and loopback, joins the group, announces."""
    h = Harness(interface="127.0.0.1", group="239.192.152.201")
    h.ours.append((OTHER_SHARE, THIRD_PEER, 5000))
    port = h.start()
    assert (port.port, port.interface, port.listen_multiple) == (47000, "", True)
    assert port.max_packet == MAX_DATAGRAM + 1
    assert (port.ttl, port.loopback, port.outgoing) == (1, True, "127.0.0.1")
    assert port.groups == [("239.192.152.201", "127.0.0.1")]
    assert not port.broadcast
    assert port.written == [
        (encode_announcement(SHARE, PEER, 5000), ("239.192.152.201", 47000)),
        (encode_announcement(OTHER_SHARE, THIRD_PEER, 5000), ("239.192.152.201", 47000)),
    ]
    assert h.service.listening


def test_defaults():
    """By default the service uses port 60106 and the documented group on any interface."""
    h = Harness(port=DEFAULT_PORT)
    port = h.start()
    assert port.groups == [(DEFAULT_GROUP, "0.0.0.0")]
    assert port.written[0][1] == (DEFAULT_GROUP, DEFAULT_PORT)


def test_broadcast_and_ipv6_destinations():
    """With broadcast and IPv6 on, each announcement also goes to 255.255.255.255 and ff02::1."""
    h = Harness(broadcast=True, ipv6=True)
    h.start()
    v4, v6 = h.reactor.ports
    assert v4.broadcast
    assert v6.interface == "::" and v6.listen_multiple
    assert [addr for _, addr in v4.written] == [(DEFAULT_GROUP, 47000), ("255.255.255.255", 47000)]
    assert [addr for _, addr in v6.written] == [("ff02::1", 47000)]
    assert v6.sent() == [Announcement(SHARE, PEER, 5000)]


def test_periodic_announcements():
    """A burst goes out every announce_interval seconds, and none in between."""
    h = Harness(announce_interval=60.0)
    port = h.start()
    h.reactor.advance(59.0)
    assert len(port.written) == 1
    h.reactor.advance(1.0)
    assert len(port.written) == 2
    h.reactor.advance(60.0)
    assert len(port.written) == 3


def test_announce_now_is_rate_limited_and_coalesced():
    """announce_now within 2 s of a burst is merged into one burst at the 2 s mark."""
    h = Harness()
    port = h.start()
    for _ in range(3):
        h.reactor.advance(0.5)
        h.service.announce_now()
    assert len(port.written) == 1
    h.reactor.advance(0.4)
    assert len(port.written) == 1
    h.reactor.advance(0.1)  # t = 2.0
    assert len(port.written) == 2
    h.reactor.advance(10.0)
    assert len(port.written) == 2
    h.service.announce_now()  # long after the last burst: immediate
    assert len(port.written) == 3


def test_announce_now_sends_new_share():
    """A share added before announce_now is in the next burst."""
    h = Harness()
    port = h.start()
    h.reactor.advance(5.0)
    h.ours.append((OTHER_SHARE, THIRD_PEER, 5000))
    h.service.announce_now()
    assert port.sent()[1:] == [Announcement(SHARE, PEER, 5000), Announcement(OTHER_SHARE, THIRD_PEER, 5000)]


def test_periodic_burst_respects_gap():
    """A periodic burst right after an announce_now burst waits for the gap too."""
    h = Harness(announce_interval=60.0)
    port = h.start()
    h.reactor.advance(59.0)
    h.service.announce_now()
    assert len(port.written) == 2
    h.reactor.advance(1.0)  # periodic tick at 60, gap until 61
    assert len(port.written) == 2
    h.reactor.advance(1.0)
    assert len(port.written) == 3


def test_own_announcements_ignored():
    """An announcement carrying one of our peer IDs is never passed on."""
    h = Harness()
    port = h.start()
    port.receive(encode_announcement(SHARE, PEER, 5000), "127.0.0.1")
    port.receive(encode_announcement(SHARE, PEER, 5001), "192.0.2.9")
    assert h.hints == []


def test_hint_passed_on():
    """Another daemon's announcement of one of our IDs reaches on_hint with the sender's host."""
    h = Harness()
    port = h.start()
    port.receive(encode_announcement(SHARE, OTHER_PEER, 4000), "192.0.2.7")
    assert h.hints == [(Announcement(SHARE, OTHER_PEER, 4000), "192.0.2.7")]


def test_unknown_ids_and_garbage_not_passed_on():
    """Announcements of IDs we do not announce, and malformed datagrams, are dropped."""
    h = Harness()
    port = h.start()
    port.receive(encode_announcement(OTHER_SHARE, OTHER_PEER, 4000), "192.0.2.7")
    for data in MALFORMED.values():
        port.receive(data, "192.0.2.7")
    assert h.hints == []


def test_new_share_hints_pass_before_postponed_burst():
    """After announce_now, hints for the new ID pass even while the burst is postponed."""
    h = Harness()
    port = h.start()
    h.ours.append((OTHER_SHARE, THIRD_PEER, 5000))
    h.service.announce_now()
    assert len(port.written) == 1  # postponed
    port.receive(encode_announcement(OTHER_SHARE, OTHER_PEER, 4000), "192.0.2.7")
    assert h.hints == [(Announcement(OTHER_SHARE, OTHER_PEER, 4000), "192.0.2.7")]


def test_hints_deduplicated_for_ten_seconds():
    """The same (id, peer, host, port) passes at most once per 10 s; other hosts or ports pass."""
    h = Harness()
    port = h.start()
    data = encode_announcement(SHARE, OTHER_PEER, 4000)
    port.receive(data, "192.0.2.7")
    port.receive(data, "192.0.2.7")
    port.receive(data, "192.0.2.8")
    port.receive(encode_announcement(SHARE, OTHER_PEER, 4001), "192.0.2.7")
    h.reactor.advance(9.9)
    port.receive(data, "192.0.2.7")
    assert [(a.port, host) for a, host in h.hints] == [
        (4000, "192.0.2.7"), (4000, "192.0.2.8"), (4001, "192.0.2.7")]
    h.reactor.advance(0.1)
    port.receive(data, "192.0.2.7")
    assert len(h.hints) == 4


def test_ipv4_mapped_host_is_plain_ipv4():
    """A copy heard on a dual-stack IPv6 socket counts as the same IPv4 host."""
    h = Harness(ipv6=True)
    v4, v6 = (h.start(), h.reactor.ports[1])
    data = encode_announcement(SHARE, OTHER_PEER, 4000)
    v4.receive(data, "192.0.2.7")
    v6.receive(data, "::ffff:192.0.2.7")
    assert h.hints == [(Announcement(SHARE, OTHER_PEER, 4000), "192.0.2.7")]


def test_send_error_is_logged_and_other_destinations_still_served():
    """A failing destination is logged once per burst and does not stop the others or the timer."""
    h = Harness(broadcast=True)
    h.ours.append((OTHER_SHARE, THIRD_PEER, 5000))
    with capturedLogs() as events:
        h.service.startService()
        port = h.reactor.ports[0]
        assert port.written  # the group got the first burst
        port.fail_writes_to.add(DEFAULT_GROUP)
        port.written.clear()
        h.reactor.advance(60.0)
    assert [addr for _, addr in port.written] == [("255.255.255.255", 47000)] * 2
    warnings = [e for e in events if "cannot send LAN announcements" in e.get("log_format", "")]
    assert len(warnings) == 1


def test_failing_hint_handler_does_not_break_receiving():
    """An exception in on_hint is logged and later hints still arrive."""
    calls: list[str] = []

    def on_hint(a: Announcement, host: str) -> None:
        calls.append(host)
        raise RuntimeError("boom")

    reactor = FakeReactor()
    service = LanDiscovery(reactor, lambda: [(SHARE, PEER, 5000)], on_hint, port=47000)
    with capturedLogs() as events:
        service.startService()
        port = reactor.ports[0]
        port.receive(encode_announcement(SHARE, OTHER_PEER, 4000), "192.0.2.7")
        port.receive(encode_announcement(SHARE, OTHER_PEER, 4000), "192.0.2.8")
    assert calls == ["192.0.2.7", "192.0.2.8"]
    assert sum(1 for e in events if "log_failure" in e) == 2


def test_failing_get_announcements_keeps_timer_running():
    """If listing our IDs fails, that burst is skipped and the next one still happens."""
    h = Harness()
    broken = [True]

    def get() -> list[tuple[str, str, int]]:
        if broken[0]:
            raise RuntimeError("database gone")
        return [(SHARE, PEER, 5000)]

    h.service._get_announcements = get
    with capturedLogs():
        port = h.start()
    assert port.written == []
    broken[0] = False
    h.reactor.advance(60.0)
    assert port.sent() == [Announcement(SHARE, PEER, 5000)]


def test_malformed_own_entries_skipped():
    """A malformed entry from get_announcements is skipped; the valid ones still go out."""
    h = Harness()
    h.ours[:0] = [(SHARE, "SYNC" * 8, 5000), (SHARE, PEER)]  # type: ignore[list-item]
    with capturedLogs() as events:
        port = h.start()
    assert port.sent() == [Announcement(SHARE, PEER, 5000)]
    assert not any("SYNC" in repr(e) for e in events)


def test_stop_closes_ports_and_stops_announcing():
    """After stopService the ports are closed and no burst, pending or periodic, is sent."""
    h = Harness()
    port = h.start()
    h.service.announce_now()  # postponed to t = 2
    d = h.service.stopService()
    assert d.called and not port.listening
    h.reactor.advance(120.0)
    assert len(port.written) == 1
    assert h.reactor.getDelayedCalls() == []
    assert not h.service.listening
    h.service.announce_now()
    assert len(port.written) == 1


def test_listen_failure_leaves_service_quiet():
    """If the UDP port cannot be opened, the error is logged and nothing is scheduled."""
    h = Harness(fail=True)
    with capturedLogs() as events:
        h.start()
    assert not h.service.listening
    assert h.reactor.getDelayedCalls() == []
    assert any("LAN discovery is off" in e.get("log_format", "") for e in events)
    h.service.announce_now()
    assert h.reactor.getDelayedCalls() == []


def test_ipv6_failure_keeps_ipv4():
    """If the IPv6 port cannot be opened, IPv4 announcing still works."""
    h = Harness(ipv6=True)
    listen = h.reactor.listenMulticast

    def no_ipv6(port: int, protocol: Any, interface: str = "", **kw: Any):
        if interface == "::":
            raise CannotListenError("::", port, OSError(97, "Address family not supported"))
        return listen(port, protocol, interface, **kw)

    h.reactor.listenMulticast = no_ipv6
    with capturedLogs() as events:
        port = h.start()
    assert h.service.listening and len(h.reactor.ports) == 1
    assert [addr for _, addr in port.written] == [(DEFAULT_GROUP, 47000)]
    assert any("IPv6 LAN discovery is off" in e.get("log_format", "") for e in events)


@pytest.mark.parametrize("options", [
    {"port": 0}, {"port": 70000}, {"group": "192.0.2.1"}, {"group": "not-an-address"},
    {"group": "ff02::1"}, {"interface": "eth0"}, {"announce_interval": 0},
])
def test_bad_configuration_rejected(options):
    """Impossible settings raise ConfigurationError with a message naming the setting."""
    with pytest.raises(ConfigurationError, match="LAN"):
        LanDiscovery(Clock(), list, lambda a, h: None, **options)


# -- one real multicast exchange on loopback ----------------------------------


def _free_udp_port() -> int:
    """A UDP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RealMulticastTests(unittest.TestCase):
    """Two services on one host and one UDP port hear each other through loopback multicast."""

    timeout = 10

    @async_test
    async def test_two_daemons_hear_each_other(self):
        """Each of two services on the same port receives the other's announcement."""
        from twisted.internet import reactor

        port = _free_udp_port()
        heard: dict[str, list[tuple[Announcement, str]]] = {PEER: [], OTHER_PEER: []}
        both_heard: defer.Deferred[None] = defer.Deferred()

        def make(peer: str, tcp_port: int) -> LanDiscovery:
            def on_hint(a: Announcement, host: str) -> None:
                heard[peer].append((a, host))
                if all(heard.values()) and not both_heard.called:
                    both_heard.callback(None)
            service = LanDiscovery(
                reactor, lambda: [(SHARE, peer, tcp_port)], on_hint,
                port=port, group="239.192.152.200", interface="127.0.0.1",
            )
            service.startService()
            self.addCleanup(service.stopService)
            self.assertTrue(service.listening, "could not open a multicast port on loopback")
            return service

        first = make(PEER, 5001)
        make(OTHER_PEER, 5002)
        # The first start burst went out before the second service listened;
        # its next burst (held back by the 2 s gap) is the one the second hears.
        first.announce_now()
        try:
            await both_heard.addTimeout(5, reactor)
        except defer.TimeoutError:
            self.fail("no loopback multicast exchange within 5 s; heard: %r" % (heard,))
        self.assertEqual(heard[PEER], [(Announcement(SHARE, OTHER_PEER, 5002), "127.0.0.1")])
        self.assertEqual(heard[OTHER_PEER], [(Announcement(SHARE, PEER, 5001), "127.0.0.1")])
