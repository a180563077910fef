"""The discovery seams: every source and transport honours its interface, and the
daemon dials a candidate from any source through the transport that can reach it."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from zope.interface.verify import verifyObject

from clearskies.addresses import Address, make_address, parse_address
from clearskies.daemon import Daemon, DaemonSettings
from clearskies.daemon.known import ManualPeers, RememberedPeers
from clearskies.daemon.resources import Resources
from clearskies.daemon.tor import TorLink
from clearskies.discovery.lan import LanDiscovery
from clearskies.discovery.tcp import TcpTransport
from clearskies.discovery.tracker_client import TrackerClient
from clearskies.errors import ConfigurationError
from clearskies.interfaces import IDiscoverySource, IPeerTransport
from tests.fakes import FakeDiscoverySource, FakeTransport

SHARE = "s" * 64
PEER = "c" * 32
ONION = "tor:" + "b" * 56 + ".onion:60106"


def _nothing(*args: Any) -> None:
    return None


# -- every implementer honours its seam ------------------------------------------------


def test_every_discovery_source_provides_the_interface():
    """LAN, tracker, manual and remembered peers, and the fake, are IDiscoverySources."""
    clock = Clock()
    sources = [
        LanDiscovery(clock, lambda: [], _nothing),
        TrackerClient(clock, "http://tracker.example:8080", lambda: [], lambda: (1, None),
                      _nothing, agent=object()),  # type: ignore[arg-type]
        ManualPeers(_nothing, parse_address, lambda: []),
        RememberedPeers(clock, _nothing, lambda: {}, lambda: False),
        FakeDiscoverySource(_nothing),
    ]
    for source in sources:
        assert verifyObject(IDiscoverySource, source)
    assert [s.source for s in sources] == ["lan", "tracker", "manual", "tracker", "tracker"]


def test_every_transport_provides_the_interface(tmp_path):
    """TCP, Tor and the fake are IPeerTransports."""
    reactor = MemoryReactorClock()
    tor = TorLink(_resources(reactor, tmp_path), DaemonSettings(data_dir=str(tmp_path)))
    transports = [TcpTransport(reactor, lambda: 0), tor,
                  FakeTransport("relay", lambda a: True)]
    for transport in transports:
        assert verifyObject(IPeerTransport, transport)
    assert [t.name for t in transports] == ["tcp", "tor", "relay"]


# -- TCP and Tor as transports ----------------------------------------------------------


def test_tcp_reaches_tcp_addresses_and_owns_its_loopback_port():
    """TCP dials tcp: addresses directly; ourselves are both loopbacks at our port."""
    reactor = MemoryReactorClock()
    port = [0]
    tcp = TcpTransport(reactor, lambda: port[0])
    assert tcp.can_reach(parse_address("tcp:192.0.2.7:4000"))
    assert not tcp.can_reach(parse_address(ONION))
    assert tcp.own_addresses() == []
    port[0] = 4100
    assert [str(a) for a in tcp.own_addresses()] == ["tcp:127.0.0.1:4100", "tcp:[::1]:4100"]
    endpoints: list[Any] = []
    tcp.endpoint_for(parse_address("tcp:192.0.2.7:4000")).addCallback(endpoints.append)
    endpoints[0].connect(object())
    assert [(c[0], c[1]) for c in reactor.tcpClients] == [("192.0.2.7", 4000)]


def test_tor_reaches_onion_addresses_and_everything_under_tor_only(tmp_path):
    """Tor takes tor: addresses (and, under --tor-only, all); without Tor it says --tor."""
    reactor = MemoryReactorClock()
    tor = TorLink(_resources(reactor, tmp_path), DaemonSettings(data_dir=str(tmp_path)))
    tcp_address = parse_address("tcp:192.0.2.7:4000")
    assert tor.can_reach(parse_address(ONION)) and not tor.can_reach(tcp_address)
    tor.mode = "only"
    assert tor.can_reach(tcp_address)
    failures: list[Any] = []
    tor.endpoint_for(parse_address(ONION)).addErrback(failures.append)
    assert failures[0].check(ConfigurationError) and "--tor" in failures[0].getErrorMessage()
    assert tor.own_addresses() == []


def test_the_daemon_asks_tor_first_so_tor_only_sends_nothing_directly(tmp_path):
    """The default transports are Tor then TCP: tcp: goes direct unless --tor-only."""
    daemon = Daemon(MemoryReactorClock(), DaemonSettings(data_dir=str(tmp_path / "data")))
    tcp_address = parse_address("tcp:192.0.2.7:4000")
    assert [t.name for t in daemon.dialling.transports] == ["tor", "tcp"]
    assert daemon.dialling.transport_for(tcp_address).name == "tcp"
    assert daemon.dialling.transport_for(parse_address(ONION)).name == "tor"
    assert daemon.dialling.transport_for(Address("utp", "192.0.2.7", 4000)) is None
    daemon.tor_link.mode = "only"
    assert daemon.dialling.transport_for(tcp_address).name == "tor"


# -- the daemon drives sources and transports through the seams -------------------------


def test_a_candidate_from_any_source_is_dialled_through_the_transport_that_reaches_it(tmp_path):
    """A source's candidates are dialled through the first transport that reaches each."""
    daemon, reactor, relay, tcp = _running_daemon(tmp_path)
    source = FakeDiscoverySource(daemon.dialling.add_candidate, daemon.discovery.registrations)
    daemon.discovery.add_source(source)
    assert source.running and source in daemon.discovery.sources
    far = make_address("tcp", "198.51.100.9", 4000)
    near = make_address("tcp", "192.0.2.7", 4000)
    source.find(SHARE, far, PEER)
    source.find(SHARE, near, None)
    reactor.advance(0)
    assert relay.dialled == [far] and tcp.dialled == [near]
    assert reactor.tcpClients == []
    candidates = daemon.dialling.connector.candidates(SHARE)
    assert {c.sources for c in candidates} == {frozenset({"tracker"})}
    _stop(daemon)


def test_the_built_in_sources_report_through_the_same_path(tmp_path):
    """Manual and remembered peers are sources in the list, dialled like any other's."""
    peers = {PEER: SimpleNamespace(peer_id=PEER, last_seen=1.0,
                                   addresses=("tcp:198.51.100.20:4000",))}
    daemon, reactor, relay, tcp = _running_daemon(tmp_path, peers=["192.0.2.30:4000"],
                                                  remembered=peers)
    names = [s.name for s in daemon.discovery.sources]
    assert names == ["manual-peers", "remembered-peers"]
    reactor.advance(0)
    assert [str(a) for a in tcp.dialled] == ["tcp:192.0.2.30:4000"]
    assert [str(a) for a in relay.dialled] == ["tcp:198.51.100.20:4000"]
    sources = {str(c.address): c.sources for c in daemon.dialling.connector.candidates(SHARE)}
    assert sources == {"tcp:192.0.2.30:4000": frozenset({"manual"}),
                       "tcp:198.51.100.20:4000": frozenset({"tracker"})}
    _stop(daemon)


def test_a_change_in_what_we_announce_reaches_every_source(tmp_path):
    """A change in what we announce (a share, a code, our onion address) reaches every source."""
    daemon, _reactor, _relay, _tcp = _running_daemon(tmp_path)
    sources = [FakeDiscoverySource(daemon.dialling.add_candidate, name="fake-%d" % i)
               for i in range(2)]
    for source in sources:
        daemon.discovery.add_source(source)
    daemon.discovery.announce_changed()
    assert [s.announced for s in sources] == [1, 1]
    daemon.discovery.tor_ready(ONION)  # and so is news of our onion address
    assert [s.announced for s in sources] == [2, 2]
    _stop(daemon)


def test_an_address_no_transport_reaches_fails_its_dial(tmp_path):
    """An address none of the transports can reach fails the dial and is not dialled."""
    daemon, _reactor, relay, tcp = _running_daemon(tmp_path)
    failures: list[Any] = []
    daemon.dialling.dial(parse_address(ONION), SHARE).addErrback(failures.append)
    assert "no transport reaches" in failures[0].getErrorMessage()
    assert relay.dialled == tcp.dialled == []
    _stop(daemon)


def test_a_transport_that_fails_fails_only_that_dial(tmp_path):
    """A transport's refusal is the dial's failure; the connection manager backs off."""
    daemon, reactor, _relay, _tcp = _running_daemon(tmp_path)
    broken = FakeTransport("broken", lambda a: a.host == "203.0.113.5",
                           refuse=ConfigurationError("not today"))
    daemon.dialling.transports.insert(0, broken)
    source = FakeDiscoverySource(daemon.dialling.add_candidate, source="lan")
    daemon.discovery.add_source(source)
    source.find(SHARE, make_address("tcp", "203.0.113.5", 4000), PEER)
    reactor.advance(0)
    assert [str(a) for a in broken.dialled] == ["tcp:203.0.113.5:4000"]
    [candidate] = daemon.dialling.connector.candidates(SHARE)
    assert candidate.failures == 1 and not candidate.dialling
    _stop(daemon)


# -- helpers ---------------------------------------------------------------------------


def _resources(reactor: Any, tmp_path: Path) -> Resources:
    return Resources(reactor, str(tmp_path), None, None)


class _Runtime:
    """Just enough of a ShareRuntime to dial for it and remember its peers."""

    error = None
    peer_id = "p" * 32

    def __init__(self, peers: dict[str, Any]) -> None:
        self.keys = SimpleNamespace(share_id=SHARE, access="read_write")
        self.sync = SimpleNamespace(sessions={})
        self.peers = peers


def _running_daemon(tmp_path: Path, peers: list[str] | None = None,
                    remembered: dict[str, Any] | None = None) -> tuple[Any, ...]:
    """A daemon on a memory reactor with one share, whose transports are two fakes
    (``relay`` for 198.51.100.0/24, ``tcp`` for the rest of tcp:), started far
    enough to dial: the connection manager and the sources run."""
    reactor = MemoryReactorClock()
    daemon = Daemon(reactor, DaemonSettings(data_dir=str(tmp_path / "data"), lan=False,
                                            peers=list(peers or [])))
    daemon.resources.config = {}
    relay = FakeTransport("relay", lambda a: a.host.startswith("198.51.100."))
    tcp = FakeTransport("tcp", lambda a: a.proto == "tcp")
    daemon.dialling.transports = [relay, tcp]
    daemon.share_registry.by_id[SHARE] = _Runtime(remembered or {})
    Service.startService(daemon)  # (only what starts from here on runs)
    daemon._start_discovery()
    return daemon, reactor, relay, tcp


def _stop(daemon: Daemon) -> None:
    for child in list(daemon):
        if child.running:
            result = child.stopService()
            if isinstance(result, Deferred):
                result.addErrback(lambda f: None)
    Service.stopService(daemon)
