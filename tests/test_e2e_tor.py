"""Tor in the daemon: wiring checked with a fake TorService, and two real daemons over Tor.

The unit tests build a ``Daemon`` on a ``MemoryReactorClock`` and replace
``TorService`` with a fake, so they need neither tor nor txtorcon.  The slow
test runs a private Tor network on 127.0.0.1 (``tests/tornet.py``) and two
``--tor-only`` daemons that know each other only by their ``tor:`` addresses.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage

from clearskies import tap
from clearskies.addresses import parse_address
from clearskies.daemon import Daemon, DaemonSettings
from clearskies.daemon.listeners import is_loopback_listen
from clearskies.discovery.lan import Announcement
from clearskies.discovery.tor import TorUnavailable
from clearskies.errors import ConfigurationError
from tests.daemons import assert_trees_equal, tree_snapshot, wait_until
from tests.tornet import PrivateTorNetwork, missing_tor

ONION = "tor:" + "a" * 56 + ".onion:60106"
PEER_ONION = "tor:" + "b" * 56 + ".onion:60106"


# -- options -------------------------------------------------------------------------


def _options(*argv: str, tmp_path: Path) -> tap.Options:
    options = tap.Options()
    options.parseOptions(["--data-dir", str(tmp_path), *argv])
    return options


def test_tor_options_choose_the_mode(tmp_path):
    """No Tor option keeps the stored mode; --tor, --tor-control and --tor-only pick one."""
    assert _options(tmp_path=tmp_path)["tor-mode"] is None
    assert _options("--tor", tmp_path=tmp_path)["tor-mode"] == "on"
    assert _options("--tor-control", "unix:/run/tor/control", tmp_path=tmp_path)["tor-mode"] == "on"
    assert _options("--no-tor", tmp_path=tmp_path)["tor-mode"] == "off"
    only = _options("--tor-only", tmp_path=tmp_path)
    assert only["tor-mode"] == "only"
    assert only["listen"] == "tcp:0:interface=127.0.0.1"


def test_tor_only_refuses_a_public_listener_and_clearnet_peers(tmp_path):
    """--tor-only with a public --listen or a non-tor --peer is a usage error saying why."""
    with pytest.raises(usage.UsageError, match="no public port"):
        _options("--tor-only", "--listen", "tcp:4000", tmp_path=tmp_path)
    with pytest.raises(usage.UsageError, match="tor:NAME.onion:PORT"):
        _options("--tor-only", "--peer", "192.0.2.1:4000", tmp_path=tmp_path)
    ok = _options("--tor-only", "--listen", "tcp:4000:interface=127.0.0.1",
                  "--peer", PEER_ONION, tmp_path=tmp_path)
    assert ok["peers"] == [PEER_ONION]


def test_tor_config_file_is_read_and_checked(tmp_path):
    """--tor-config reads a JSON object of torrc options; bad files and reserved options fail."""
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"TestingTorNetwork": 1, "DirAuthority": ["a", "b"]}))
    options = _options("--tor-config", str(good), tmp_path=tmp_path)
    assert options["tor-mode"] == "on"
    assert options["tor-extra"] == {"TestingTorNetwork": "1", "DirAuthority": ["a", "b"]}
    reserved = tmp_path / "reserved.json"
    reserved.write_text(json.dumps({"ControlPort": "9051"}))
    with pytest.raises(usage.UsageError, match="managed by ClearSkies"):
        _options("--tor-config", str(reserved), tmp_path=tmp_path)
    broken = tmp_path / "broken.json"
    broken.write_text("[1, 2")
    with pytest.raises(usage.UsageError, match="JSON"):
        _options("--tor-config", str(broken), tmp_path=tmp_path)
    with pytest.raises(usage.UsageError, match="--tor-control"):
        _options("--tor-config", str(good), "--tor-control", "tcp:127.0.0.1:9051",
                 tmp_path=tmp_path)


def test_loopback_listen_detection():
    """Only TCP endpoints bound to a 127/8 interface count as loopback."""
    assert is_loopback_listen("tcp:0:interface=127.0.0.1")
    assert is_loopback_listen("tcp:port=4000:interface=127.0.0.2")
    assert not is_loopback_listen("tcp:0")
    assert not is_loopback_listen("tcp:0:interface=0.0.0.0")
    assert not is_loopback_listen("unix:/tmp/x")


# -- the daemon with a fake TorService ------------------------------------------------


class FakeTorService:
    """Stands in for clearskies.discovery.tor.TorService: records calls, fires ready on demand."""

    instances: list[FakeTorService] = []

    def __init__(self, reactor: Any, data_dir: str, local_port_getter: Any,
                 control_endpoint: str | None = None, extra_config: Any = None,
                 runner: Any = None) -> None:
        self.data_dir = data_dir
        self.local_port_getter = local_port_getter
        self.control_endpoint = control_endpoint
        self.extra_config = extra_config
        self.error: TorUnavailable | None = None
        self.address: str | None = None
        self.waiters: list[Deferred[str]] = []
        self.dialled: list[tuple[str, int]] = []
        self.agents = 0
        self.parent = None
        FakeTorService.instances.append(self)

    def setServiceParent(self, parent: Any) -> None:
        self.parent = parent

    @property
    def ready(self) -> Deferred[str]:
        if self.address is not None:
            return succeed(self.address)
        if self.error is not None:
            return fail(self.error)
        d: Deferred[str] = Deferred()
        self.waiters.append(d)
        return d

    def publish(self, address: str = ONION) -> None:
        self.address = address
        for d in self.waiters:
            d.callback(address)

    def fail_start(self, why: str) -> None:
        self.error = TorUnavailable(why)
        for d in self.waiters:
            d.errback(self.error)

    def onion_address(self) -> str | None:
        return self.address

    def client_endpoint(self, host: str, port: int) -> Any:
        self.dialled.append((host, port))
        return _RecordingEndpoint(host, port)

    def web_agent(self) -> Any:
        self.agents += 1
        return object()


class _RecordingEndpoint:
    """A client endpoint whose connect never completes (the test only looks at the route)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port

    def connect(self, factory: Any) -> Deferred[Any]:
        return Deferred()


@pytest.fixture
def fake_tor(monkeypatch):
    import clearskies.discovery.tor as tor_module

    FakeTorService.instances = []
    monkeypatch.setattr(tor_module, "TorService", FakeTorService)
    return FakeTorService.instances


def _daemon(tmp_path: Path, **settings: Any) -> tuple[Daemon, MemoryReactorClock]:
    """A daemon on a memory reactor, started far enough to listen and discover."""
    reactor = MemoryReactorClock()
    settings.setdefault("lan", False)
    daemon = Daemon(reactor, DaemonSettings(data_dir=str(tmp_path / "data"), **settings))
    daemon.resources.config = {}

    class Store:
        async def set_config(self, key: str, value: Any) -> None:
            daemon.stored = (key, value)  # type: ignore[attr-defined]

    daemon.resources.store = Store()  # type: ignore[assignment]
    return daemon, reactor


async def _bring_up(daemon: Daemon) -> None:
    await daemon._choose_tor_mode()
    await daemon._listen_peers()
    daemon._start_tor()
    daemon._start_discovery()


def _run(coroutine: Any) -> None:
    d = Deferred.fromCoroutine(coroutine)
    failures: list[Any] = []
    d.addErrback(failures.append)
    if failures:
        failures[0].raiseException()


def test_tor_mode_publishes_a_separate_loopback_target(tmp_path, fake_tor):
    """--tor keeps the public listener and adds a 127.0.0.1 port that the onion service targets."""
    daemon, reactor = _daemon(tmp_path, listen="tcp:4000", tor_mode="on")
    _run(_bring_up(daemon))
    ports = [(p[0], p[3]) for p in reactor.tcpServers]
    assert ports == [(4000, ""), (0, "127.0.0.1")]
    [tor] = fake_tor
    assert tor.parent is daemon and tor.control_endpoint is None
    assert daemon.listeners.onion_factory is not daemon.listeners.peer_factory
    assert daemon.stored == ("tor", {"mode": "on", "control": None})
    assert daemon.onion_address() is None
    tor.publish()
    assert daemon.onion_address() == ONION
    assert parse_address(ONION) in daemon.dialling.own_addresses()
    assert daemon.dialling.connector._protocols == frozenset({"tcp", "tor"})


def test_tor_addresses_are_dialled_through_tor_once_it_is_ready(tmp_path, fake_tor):
    """A tor: peer waits for Tor, then goes through its client endpoint; tcp: peers go direct."""
    daemon, reactor = _daemon(tmp_path, tor_mode="on")
    _run(_bring_up(daemon))
    [tor] = fake_tor
    daemon.share_registry.by_id["s" * 64] = _FakeRuntime()  # type: ignore[assignment]
    daemon.dialling.dial(parse_address(PEER_ONION), "s" * 64)
    assert tor.dialled == []  # still bootstrapping
    daemon.dialling.dial(parse_address("tcp:192.0.2.7:4000"), "s" * 64)
    assert [(c[0], c[1]) for c in reactor.tcpClients] == [("192.0.2.7", 4000)]
    tor.publish()
    assert tor.dialled == [("b" * 56 + ".onion", 60106)]
    assert len(reactor.tcpClients) == 1  # nothing else went out directly


def test_lan_announcements_carry_the_onion_address_and_lan_onions_are_dialled(tmp_path, fake_tor):
    """With --tor and LAN on: our onion address joins our LAN announcements once published,
    and a LAN peer's onion address becomes a candidate next to its direct address."""
    daemon, _ = _daemon(tmp_path, tor_mode="on", lan=True, lan_interface="127.0.0.1")
    _run(_bring_up(daemon))
    [tor] = fake_tor
    assert daemon.discovery.lan is not None and daemon.discovery.lan._our_onion() is None
    tor.publish()
    assert daemon.discovery.lan._our_onion() == "a" * 56 + ".onion:60106"
    daemon.share_registry.by_id["s" * 64] = _FakeRuntime()  # type: ignore[assignment]
    peer = "c" * 32
    lan = daemon.discovery.lan
    lan._on_hint(Announcement("s" * 64, peer, 4000, onion="b" * 56 + ".onion:60106"),
                 "192.0.2.7")
    found = {str(c.address) for c in daemon.dialling.connector.candidates("s" * 64)}
    assert found == {"tcp:192.0.2.7:4000", PEER_ONION}


def test_lan_onion_addresses_are_ignored_without_tor(tmp_path, fake_tor):
    """A daemon without Tor keeps only the direct address of a LAN hint, and announces no onion."""
    daemon, _ = _daemon(tmp_path, lan=True, lan_interface="127.0.0.1")
    _run(_bring_up(daemon))
    assert fake_tor == [] and daemon.discovery.lan._our_onion() is None
    daemon.share_registry.by_id["s" * 64] = _FakeRuntime()  # type: ignore[assignment]
    lan = daemon.discovery.lan
    lan._on_hint(Announcement("s" * 64, "c" * 32, 4000, onion="b" * 56 + ".onion:60106"),
                 "192.0.2.7")
    assert [str(c.address) for c in daemon.dialling.connector.candidates("s" * 64)] == [
        "tcp:192.0.2.7:4000"]


def test_tor_only_sends_nothing_outside_tor(tmp_path, fake_tor):
    """--tor-only: one loopback listener, no LAN, tcp: peers and trackers through Tor."""
    daemon, reactor = _daemon(tmp_path, listen="tcp:0", tor_mode="only", lan=True,
                              trackers=["http://tracker.example:8080"])
    _run(_bring_up(daemon))
    [tor] = fake_tor
    assert [(p[0], p[3]) for p in reactor.tcpServers] == [(0, "127.0.0.1")]
    assert daemon.listeners.onion_listener is daemon.listeners.peer_port
    assert daemon.discovery.lan is None
    assert daemon.discovery.trackers == [] and tor.agents == 0  # trackers wait for Tor
    assert daemon.name == "ClearSkies peer"
    daemon.share_registry.by_id["s" * 64] = _FakeRuntime()  # type: ignore[assignment]
    tor.publish()
    assert len(daemon.discovery.trackers) == 1 and tor.agents == 1
    daemon.dialling.dial(parse_address("tcp:192.0.2.7:4000"), "s" * 64)
    assert tor.dialled == [("192.0.2.7", 4000)]
    assert reactor.tcpClients == []
    with pytest.raises(ConfigurationError, match="tor:NAME.onion:PORT"):
        daemon.dialling.check_peer_address("192.0.2.7:4000")
    assert daemon.dialling.check_peer_address(PEER_ONION) == parse_address(PEER_ONION)


def test_stored_tor_mode_applies_without_options(tmp_path, fake_tor):
    """A daemon started again without Tor options keeps the stored --tor-only mode."""
    daemon, reactor = _daemon(tmp_path)
    daemon.resources.config = {"tor": {"mode": "only", "control": "unix:/run/tor/control"}}
    _run(_bring_up(daemon))
    assert daemon.tor_link.mode == "only"
    assert fake_tor[0].control_endpoint == "unix:/run/tor/control"
    assert [(p[0], p[3]) for p in reactor.tcpServers] == [(0, "127.0.0.1")]


def test_onion_listener_has_its_own_failure_limit(tmp_path, fake_tor):
    """Failed handshakes through the onion port never block 127.0.0.1 on the other port."""
    daemon, _ = _daemon(tmp_path, tor_mode="on")
    _run(_bring_up(daemon))
    key = ("127.0.0.1", "ab" * 32)
    for _ in range(10):
        daemon.listeners.onion_factory.limiter.failed(key)
    assert not daemon.listeners.onion_factory.limiter.blocked(key)  # higher threshold
    assert not daemon.listeners.peer_factory.limiter.blocked(key)
    assert daemon.listeners.onion_factory.admission.handshake_timeout() == 20.0


def test_tor_failure_leaves_the_other_peers_alone(tmp_path, fake_tor):
    """When tor cannot start, tcp: peers are still dialled and tor: dials fail clearly."""
    daemon, reactor = _daemon(tmp_path, tor_mode="on")
    _run(_bring_up(daemon))
    [tor] = fake_tor
    tor.fail_start("the tor program is not installed")
    daemon.share_registry.by_id["s" * 64] = _FakeRuntime()  # type: ignore[assignment]
    failures: list[Any] = []
    daemon.dialling.dial(parse_address(PEER_ONION), "s" * 64).addErrback(failures.append)
    assert failures and failures[0].check(TorUnavailable)
    daemon.dialling.dial(parse_address("tcp:192.0.2.7:4000"), "s" * 64)
    assert len(reactor.tcpClients) == 1


def test_tor_addresses_without_tor_are_refused(tmp_path, fake_tor):
    """Without --tor, dialling a tor: address fails with a message naming --tor."""
    daemon, _ = _daemon(tmp_path)
    _run(_bring_up(daemon))
    assert fake_tor == [] and daemon.tor_link.mode == "off"
    daemon.share_registry.by_id["s" * 64] = _FakeRuntime()  # type: ignore[assignment]
    failures: list[Any] = []
    daemon.dialling.dial(parse_address(PEER_ONION), "s" * 64).addErrback(failures.append)
    assert "--tor" in failures[0].getErrorMessage()


class _FakeRuntime:
    """Just enough of a ShareRuntime for Daemon.dial to build a connect target."""

    peer_id = "p" * 32

    class keys:
        share_id = "s" * 64
        access = "read_write"

    class sync:  # no connected peers: nobody to tell our new onion address
        sessions: dict = {}


# -- two real daemons over a private Tor network ---------------------------------------

#: Network boot, two tors, publication and sync must fit in this.
E2E_CAP = 420
SYNC_TIMEOUT = 90.0
#: The first connection: in a young private network the first circuits to an onion
#: service can fail, and a dial gives up after 60 s before the next try (seen in CI).
FIRST_SYNC_TIMEOUT = 180.0


def _watch_sockets(net: PrivateTorNetwork, pids: list[int], stop: threading.Event,
                   found: list[str]) -> None:
    """Sample every tor's and daemon's sockets until ``stop``: only 127.0.0.1 may appear."""
    while not stop.is_set():
        found.extend(net.foreign_connections())
        for pid in pids:
            try:
                for conn in psutil.Process(pid).net_connections(kind="inet"):
                    for end in (conn.laddr, conn.raddr):
                        if end and end.ip not in ("127.0.0.1",):
                            found.append("daemon pid %d: %s:%d" % (pid, end.ip, end.port))
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        stop.wait(1.0)


@pytest.mark.slow
@pytest.mark.timeout(E2E_CAP)
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_two_daemons_sync_knowing_only_their_onion_addresses(daemon_factory):
    """Over a private Tor network, a file flows A→B byte-identical and a change flows back."""
    reason = missing_tor()
    if reason:
        pytest.skip(reason)
    base = tempfile.mkdtemp(prefix="cs-tor-")
    net = PrivateTorNetwork(os.path.join(base, "net"), authorities=1, relays=4)
    stop = threading.Event()
    foreign: list[str] = []
    try:
        net.start(timeout=120)
        config = Path(base) / "tor-config.json"
        config.write_text(json.dumps(net.client_torrc_options()))
        options = ("--tor-only", "--tor-config", str(config))
        alice = daemon_factory("alice", *options)
        bob = daemon_factory("bob", *options)
        watcher = threading.Thread(target=_watch_sockets,
                                   args=(net, [alice.pid, bob.pid], stop, foreign), daemon=True)
        watcher.start()

        def onion(daemon: Any) -> str | None:
            status = daemon.control_request({"type": "status"})
            assert status["tor_error"] is None, status["tor_error"]
            return status["onion_address"]

        alice_onion = wait_until(lambda: onion(alice), timeout=150, interval=0.5,
                                 message="alice's onion service published")
        bob_onion = wait_until(lambda: onion(bob), timeout=150, interval=0.5,
                               message="bob's onion service published")
        assert alice_onion != bob_onion
        assert alice_onion.endswith(".onion:60106")

        a, b = Path(alice.shares), Path(bob.shares)
        payload = os.urandom(200_000)
        (a / "from-alice.bin").write_bytes(payload)
        code = alice.cli_json("share", str(a))["access_code"]
        # Bob knows Alice only by her tor: address.
        bob.cli("attach", code, str(b), "--peer", alice_onion)
        started = time.monotonic()
        wait_until(lambda: (b / "from-alice.bin").exists()
                   and (b / "from-alice.bin").read_bytes() == payload,
                   timeout=FIRST_SYNC_TIMEOUT, interval=0.5, message="alice's file on bob")
        first_sync = time.monotonic() - started

        (b / "from-alice.bin").write_bytes(b"bob changed this\n")
        (b / "from-bob.txt").write_text("hello back through tor\n")
        bob.cli("scan", str(b))
        try:
            wait_until(lambda: tree_snapshot(a) == tree_snapshot(b),
                       timeout=SYNC_TIMEOUT, interval=0.5, message="bob's change on alice")
        except TimeoutError:
            assert_trees_equal(a, b)
            raise
        assert (a / "from-alice.bin").read_bytes() == b"bob changed this\n"
        assert (a / "from-bob.txt").read_text() == "hello back through tor\n"

        # Bob learnt no other address: no LAN, no tracker, and Alice listens on 127.0.0.1
        # only; so the session ran through her onion service.
        reply = bob.cli_json("peers", str(b))
        peers = reply["peers"] if isinstance(reply, dict) else reply
        assert [p["connected"] for p in peers] == [True], peers
        print("first sync through Tor took %.1f s" % first_sync)

        # Alice restarts: same onion address (the key is kept), and Bob reaches her again.
        alice.restart()
        assert wait_until(lambda: onion(alice), timeout=150, interval=0.5,
                          message="alice's onion service published again") == alice_onion
        (b / "after-restart.txt").write_text("still reachable\n")
        bob.cli("scan", str(b))
        wait_until(lambda: (a / "after-restart.txt").exists()
                   and (a / "after-restart.txt").read_text() == "still reachable\n",
                   timeout=SYNC_TIMEOUT, interval=0.5, message="bob's file after alice's restart")
        daemon_logs = [alice.log_path.read_text(errors="replace"),
                       bob.log_path.read_text(errors="replace")]
    finally:
        stop.set()
        net.stop()
    try:
        assert foreign == [], foreign
        assert net.foreign_addresses(*daemon_logs) == []
    finally:
        shutil.rmtree(base, ignore_errors=True)
