"""Two TorServices on a private loopback Tor network reach each other's onion services.

Slow (about a minute): it boots the network of ``tests/tornet.py`` and two tors
launched by ``TorService``.  Skips only when the ``tor`` package is missing.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile

import psutil
import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall, deferLater
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from clearskies.discovery.socks import SocksError
from clearskies.discovery.tor import TorService
from tests.tornet import PrivateTorNetwork, missing_tor
from tests.helpers import async_test

#: The whole test, network boot included, must finish within this many seconds.
TIME_CAP = 240

#: SOCKS replies that mean "not reachable yet" on a freshly booted network: the
#: descriptor has reached one directory but not yet the one the client asked,
#: or the service's introduction points are still being set up.
NOT_YET_REACHABLE = {0x04, 0x06, 0xF0, 0xF2, 0xF3, 0xF7}

#: How long a dial keeps retrying those, and the pause between tries.
DIAL_PATIENCE, DIAL_PAUSE = 90.0, 3.0


class LineServer(Protocol):
    """Greets with its name, then answers every line with ``<name> got: <line>``."""

    def __init__(self, name: bytes) -> None:
        self.name = name
        self.buffer = b""

    def connectionMade(self) -> None:
        self.transport.write(b"hello from " + self.name + b"\n")

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            self.transport.write(self.name + b" got: " + line + b"\n")


class Collector(Protocol):
    """Collects bytes until ``expected`` of them arrived, then fires ``done``."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.data = b""
        self.done: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if len(self.data) >= self.expected and not self.done.called:
            self.done.callback(self.data)

    def connectionLost(self, reason=None) -> None:
        if not self.done.called:
            self.done.errback(reason)


async def dial_until_reachable(client: TorService, host: str, port: int,
                               protocol: Protocol) -> Protocol:
    """Connect ``protocol`` through ``client``'s tor, retrying while the service is not yet reachable.

    A service counts as published once one directory holds its descriptor, so
    on a fresh network the first dial may still ask a directory that has none;
    the daemon's own dialling retries the same way.
    """
    deadline = reactor.seconds() + DIAL_PATIENCE
    while True:
        try:
            return await connectProtocol(client.client_endpoint(host, port), protocol)
        except SocksError as e:
            if e.code not in NOT_YET_REACHABLE or reactor.seconds() + DIAL_PAUSE > deadline:
                raise
        await deferLater(reactor, DIAL_PAUSE)


def _tor_children() -> list[psutil.Process]:
    """tor processes that are (grand)children of this test process."""
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.name() == "tor" and child.status() != psutil.STATUS_ZOMBIE:
                found.append(child)
        except psutil.NoSuchProcess:
            pass
    return found


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning:txtorcon.*")
class PrivateNetworkTests(unittest.TestCase):
    timeout = TIME_CAP

    def setUp(self) -> None:
        reason = missing_tor()
        if reason:
            raise unittest.SkipTest(reason)

    @pytest.mark.timeout(TIME_CAP + 30)
    @async_test
    async def test_onion_services_exchange_bytes(self) -> None:
        """A connects to B's tor: address through Tor; both directions carry the exact bytes."""
        # Short paths: tor's control socket must fit in a UNIX socket address.
        base = tempfile.mkdtemp(prefix="tornet-")
        self.addCleanup(shutil.rmtree, base, ignore_errors=True)
        net = PrivateTorNetwork(os.path.join(base, "net"), authorities=1, relays=4)
        services: list[TorService] = []
        ports = []

        async def cleanup() -> None:
            for service in services:
                if service.running:
                    await service.stopService()
            while ports:
                await ports.pop().stopListening()
            net.stop()

        self.addCleanup(lambda: Deferred.fromCoroutine(cleanup()))
        # Watch every tor's sockets while the test runs: only 127.0.0.1 peers allowed.
        foreign: list[str] = []
        watch = LoopingCall(lambda: foreign.extend(net.foreign_connections()))
        watch.start(1.0)
        self.addCleanup(lambda: watch.running and watch.stop())
        await deferToThread(net.start, 120)

        def service(name: bytes) -> TorService:
            factory = Factory.forProtocol(lambda: LineServer(name))
            port = reactor.listenTCP(0, factory, interface="127.0.0.1")
            ports.append(port)
            tor = TorService(
                reactor, os.path.join(base, name.decode()),
                lambda: port.getHost().port,
                extra_config=net.client_torrc_options(),
                launch_timeout=120, publish_timeout=120,
            )
            services.append(tor)
            tor.startService()
            return tor

        alice, bob = service(b"alice"), service(b"bob")
        alice_address = await alice.ready
        bob_address = await bob.ready
        self.assertRegex(bob_address, r"^tor:[a-z2-7]{56}\.onion:60106$")
        self.assertNotEqual(alice_address, bob_address)
        key = os.path.join(base, "bob", "onion-service", "private_key")
        self.assertEqual(stat.S_IMODE(os.stat(key).st_mode), 0o600)

        for client, server, server_name in ((alice, bob_address, b"bob"),
                                            (bob, alice_address, b"alice")):
            _, host, port = server.split(":")
            expected = b"hello from %s\n%s got: ping\n" % (server_name, server_name)
            collector = Collector(len(expected))
            connected = await dial_until_reachable(client, host, int(port), collector)
            connected.transport.write(b"ping\n")
            self.assertEqual(await collector.done, expected)
            connected.transport.loseConnection()

        # The key persisted: a restarted service comes back on the same address.
        await bob.stopService()
        bob.startService()
        self.assertEqual(await bob.ready, bob_address)

        self.assertEqual([tor.error for tor in services], [None, None])
        outputs = [tor.output.text() for tor in services]
        watch.stop()
        await cleanup()
        self.assertEqual(foreign, [])
        self.assertEqual(_tor_children(), [])
        self.assertEqual(net.foreign_addresses(*outputs), [])
