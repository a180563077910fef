"""Peer connections in memory (iosim pumps, real TLS, one Clock): handshake, TLS,
refusals, limits, keep-alive.  Nothing waits on a real reactor: bytes move when a
test flushes the network, and time passes when it advances the clock."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from clearskies import tls
from clearskies.accesscode import new_access_code
from clearskies.errors import HandshakeError, ProtocolError, ShareError
from clearskies.handshake import ConnectTarget, MemoryKeyRing
from clearskies.keys import ShareKeys, generate_share_keys
from clearskies.peer import FailureLimiter, PeerProtocol, PeerServerFactory, connect_peer
from clearskies.wire import Message, encode
from tests.fakes import MemoryEndpoint, MemoryNetwork

SERVER_PEER = "48d09b6b6a8ae0edb8fc14c64bbc604b"
CLIENT_PEER = "e358644d71f4f10c95f3707d414ff162"
KEYS = generate_share_keys(rsa_bits=1024)
NOW = 1_700_000_000.0
"""Where every test's clock starts (the identity message carries the time)."""


class RecordingSession:
    """A session that records what it is given."""

    def __init__(self, connection, fail_with: str | None = None) -> None:
        self.connection = connection
        self.established = connection.established
        self.events: list = []
        self.lost: Deferred = Deferred()
        self.fail_with = fail_with

    def event_received(self, event) -> None:
        self.events.append(event)
        if self.fail_with:
            raise ProtocolError(self.fail_with)

    def connection_lost(self, reason: str) -> None:
        self.lost.callback(reason)


class RawClient(Protocol):
    """A plain TCP client that records what the server sends."""

    def __init__(self) -> None:
        self.data = b""
        self.lost: Deferred = Deferred()
        self.got_data: Deferred = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if not self.got_data.called:
            self.got_data.callback(None)

    def connectionLost(self, reason=None) -> None:
        self.lost.callback(None)
        if not self.got_data.called:
            self.got_data.callback(None)


def wrong_keys(keys: ShareKeys) -> ShareKeys:
    """Keys with the same share ID but different PSKs."""
    other = generate_share_keys(rsa_bits=1024)
    return ShareKeys(keys.share_id, dict(other.psks), dict(other.private_keys),
                     dict(other.public_keys))


class PeerTestBase(TestCase):
    def setUp(self) -> None:
        self.events: list = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.server_sessions: list[RecordingSession] = []
        self.client_sessions: list[RecordingSession] = []
        self.clock = Clock()
        self.clock.advance(NOW)
        self.net = MemoryNetwork(self.clock)
        self.ring_s = MemoryKeyRing(self.clock.seconds)
        self.ring_s.add_share(KEYS, SERVER_PEER)
        self.ring_c = MemoryKeyRing(self.clock.seconds)
        self.ring_c.add_share(KEYS, CLIENT_PEER)

    def logged(self) -> list[str]:
        return [formatEvent(e) for e in self.events]

    def assert_logged(self, fragment: str) -> None:
        texts = self.logged()
        self.assertTrue(any(fragment in t for t in texts),
                        "{!r} not in log: {!r}".format(fragment, texts[-10:]))

    def listen(self, session_fail: str | None = None, **options) -> PeerServerFactory:
        def make_session(connection):
            session = RecordingSession(connection, session_fail)
            self.server_sessions.append(session)
            return session

        self.factory = PeerServerFactory(self.clock, self.ring_s, "server box", make_session,
                                         **options)
        self.address = self.net.listen(self.factory)
        self.addCleanup(self._stop)
        return self.factory

    def _stop(self) -> None:
        for protocol in list(self.factory.connections | self.factory.handshaking):
            if protocol.transport is not None:
                protocol.transport.abortConnection()
        self.net.flush()
        self.net.stop_listening(self.address)
        self.assertEqual((self.factory.connections, self.factory.handshaking), (set(), set()))

    def flush(self) -> None:
        """Deliver every byte and disconnection in flight."""
        self.net.flush()

    def endpoint(self) -> MemoryEndpoint:
        return self.net.endpoint(self.address.port)

    def connect(self, target: ConnectTarget, clock=None, **options) -> Deferred:
        """Start connecting (nothing moves until a flush); fires as connect_peer does."""
        def make_session(connection):
            session = RecordingSession(connection)
            self.client_sessions.append(session)
            return session

        return connect_peer(self.clock, self.endpoint(), target, self.ring_c, "client box",
                            make_session, clock or self.clock, **options)

    def connected(self, target: ConnectTarget, **options) -> PeerProtocol:
        """Connect and finish the handshake; the established client side."""
        pending = self.connect(target, **options)
        self.flush()
        return self.successResultOf(pending)

    def connect_fails(self, target: ConnectTarget, **options) -> str:
        pending = self.connect(target, **options)
        self.flush()
        return str(self.failureResultOf(pending, HandshakeError).value)

    def raw(self, data: bytes = b"") -> RawClient:
        """A plain TCP client, connected; ``data`` is written (and arrives on the next flush)."""
        client = RawClient()
        self.net.connect(self.address.port, client)
        if data:
            client.transport.write(data)
        return client

    def good_connection_works(self) -> None:
        client = self.connected(ConnectTarget.share(KEYS, CLIENT_PEER))
        self.assertEqual(client.established.share_id, KEYS.share_id)
        lost = self.client_sessions[-1].lost
        client.close("test done", quiet=True)
        self.flush()
        self.successResultOf(lost)


class HandshakeTests(PeerTestBase):
    def test_share_key_handshake(self):
        """With a share key both sides get Established and exchange messages over TLS."""
        self.listen()
        client = self.connected(ConnectTarget.share(KEYS, CLIENT_PEER))
        (server_session,) = self.server_sessions
        (client_session,) = self.client_sessions
        s, c = server_session.established, client_session.established
        self.assertEqual((s.share_id, s.access, s.our_peer_id, s.their_peer_id, s.their_name),
                         (KEYS.share_id, "read_write", SERVER_PEER, CLIENT_PEER, "client box"))
        self.assertEqual((c.share_id, c.access, c.our_peer_id, c.their_peer_id, c.their_name),
                         (KEYS.share_id, "read_write", CLIENT_PEER, SERVER_PEER, "server box"))
        self.assertTrue(s.we_are_server)
        self.assertFalse(c.we_are_server)
        self.assertIs(client_session.connection, client)
        self.assertEqual(tls.negotiated_version(client.transport), "TLSv1.3")
        self.assertIn(tls.negotiated_cipher(client.transport), tls.TLS13_SUITES)

        client.send_message({"type": "get_manifest"})
        client.send_bytes(b"!" + encode({"type": "file_data", "path": "a"}) + b"3\nabc0\n")
        self.flush()
        self.assertGreaterEqual(len(server_session.events), 4)
        first = server_session.events[0]
        self.assertIsInstance(first, Message)
        self.assertEqual(first.body, {"type": "get_manifest"})
        self.assertEqual(server_session.events[1].body, {"type": "file_data", "path": "a"})
        self.assertEqual(server_session.events[2].data, b"abc")

        client.close("done here")
        self.flush()
        reason = self.successResultOf(server_session.lost)
        self.assertIn("connection lost", reason)
        self.assertEqual(self.successResultOf(client_session.lost), "done here")

    def test_tls12_end_to_end(self):
        """Both sides pinned to TLS 1.2 negotiate an ECDHE-PSK suite."""
        self.listen(tls_options={"versions": ("TLSv1.2",)})
        client = self.connected(ConnectTarget.share(KEYS, CLIENT_PEER),
                                tls_options={"versions": ("TLSv1.2",)})
        self.assertEqual(tls.negotiated_version(client.transport), "TLSv1.2")
        self.assertEqual(tls.negotiated_cipher(client.transport), "ECDHE-PSK-CHACHA20-POLY1305")
        client.close("done", quiet=True)
        self.flush()
        self.successResultOf(self.client_sessions[0].lost)

    def test_access_code_exchange(self):
        """With an access code: keys arrive, the code is spent, a second use is refused."""
        self.listen()
        code = new_access_code(KEYS.share_id, "read_only", NOW)
        self.ring_s.add_code(code)
        self.ring_c = MemoryKeyRing(self.clock.seconds)
        target = ConnectTarget.join(code.code, CLIENT_PEER)
        client = self.connected(target)
        self.assertEqual(client.established.access, "read_only")
        self.assertEqual(client.established.share_id, KEYS.share_id)
        ((created, created_for),) = self.ring_c.created
        self.assertIs(created_for, target)
        self.assertEqual(created.psks, {k: KEYS.psks[k] for k in ("untrusted", "read_only")})
        self.assertNotIn("read_write", created.private_keys)
        self.assertEqual(self.ring_s.used, [code.access_id])
        self.assertEqual(self.server_sessions[0].established.access_id, code.access_id)
        client.close("done", quiet=True)
        self.flush()
        self.successResultOf(self.client_sessions[0].lost)

        reason = self.connect_fails(ConnectTarget.join(code.code, CLIENT_PEER))
        self.assertIn("cannot start", reason)
        self.assert_logged("cannot start")

    def test_slow_share_creation(self):
        """The joiner holds the handshake until the seam's Deferred fires, without a slot."""
        self.listen()
        code = new_access_code(KEYS.share_id, "read_write", NOW)
        self.ring_s.add_code(code)
        self.ring_c = MemoryKeyRing(self.clock.seconds)
        self.ring_c.delay_creation = True
        pending = self.connect(ConnectTarget.join(code.code, CLIENT_PEER))
        self.flush()
        self.assertEqual(len(self.ring_c.pending), 1)
        self.assertNoResult(pending)
        self.assertEqual(self.ring_s.used, [])
        # TLS is up, so the code was right: no handshake slot is held while the joiner works.
        self.assertEqual((len(self.factory.handshaking), len(self.factory.admission)), (1, 0))
        self.ring_c.pending[0].callback(None)
        self.flush()
        client = self.successResultOf(pending)
        self.assertEqual(client.established.access, "read_write")
        client.close("done", quiet=True)
        self.flush()
        self.successResultOf(self.client_sessions[0].lost)

    def test_share_creation_failure_closes(self):
        """If the share cannot be created, the connection closes with that reason."""
        self.listen()
        code = new_access_code(KEYS.share_id, "read_only", NOW)
        self.ring_s.add_code(code)
        self.ring_c = MemoryKeyRing(self.clock.seconds)
        self.ring_c.delay_creation = True
        pending = self.connect(ConnectTarget.join(code.code, CLIENT_PEER))
        self.flush()
        self.ring_c.pending[0].errback(ShareError("the target folder vanished"))
        self.flush()
        reason = str(self.failureResultOf(pending, HandshakeError).value)
        self.assertIn("could not create the share: ShareError: the target folder vanished", reason)
        self.assertEqual(len(self.flushLoggedErrors(ShareError)), 1)
        self.assertEqual(self.ring_s.used, [])

    def test_session_factory_may_refuse(self):
        """A session factory that closes the connection makes connect_peer fail with its reason."""
        self.listen()
        lost: Deferred = Deferred()

        class Refusing:
            def __init__(self, connection):
                connection.close("share is gone")

            def event_received(self, event):
                pass

            def connection_lost(self, reason):
                lost.callback(reason)

        pending = connect_peer(self.clock, self.endpoint(), ConnectTarget.share(KEYS, CLIENT_PEER),
                               self.ring_c, "client box", Refusing)
        self.flush()
        self.assertIn("share is gone", str(self.failureResultOf(pending, HandshakeError).value))
        self.assertEqual(self.successResultOf(lost), "share is gone")

    def test_offer_to_joining_server(self):
        """A share holder connecting to a code holder hands over the keys."""
        self.ring_s = MemoryKeyRing(self.clock.seconds)
        code = new_access_code(KEYS.share_id, "read_only", NOW)
        join = ConnectTarget.join(code.code, SERVER_PEER)
        self.ring_s.add_join(join)
        self.listen()
        self.ring_c.add_code(code)
        client = self.connected(ConnectTarget.offer(code, KEYS, CLIENT_PEER))
        self.assertEqual(client.established.access, "read_only")
        self.assertEqual(self.ring_c.used, [code.access_id])
        self.assertIs(self.ring_s.created[0][1], join)
        client.close("done", quiet=True)
        self.flush()
        self.successResultOf(self.client_sessions[0].lost)

    def test_loopback_closed_quietly(self):
        """Connecting to ourselves ends without counting as a failure."""
        self.listen()
        # The server sees its own peer ID in start and just closes.
        reason = self.connect_fails(ConnectTarget.share(KEYS, SERVER_PEER))
        self.assertIn("connection lost", reason)
        self.assert_logged("loopback: the peer is ourselves")
        self.assertFalse(self.factory.limiter.blocked_for("127.0.0.1"))
        self.assertEqual(self.factory.limiter._records, {})


class RefusalTests(PeerTestBase):
    def test_wrong_key(self):
        """A wrong PSK fails TLS on both sides; the listener still accepts good peers."""
        self.listen()
        reason = self.connect_fails(ConnectTarget.share(wrong_keys(KEYS), CLIENT_PEER))
        self.assertIn("Error", reason)
        self.assert_logged("handshake with 127.0.0.1")
        self.assertEqual(self.factory.handshaking, set())
        self.good_connection_works()

    def test_unknown_id(self):
        """An unknown share ID gets cannot_start and a closed connection."""
        self.listen()
        other = generate_share_keys(rsa_bits=1024)
        reason = self.connect_fails(ConnectTarget.share(other, CLIENT_PEER))
        self.assertIn("cannot start", reason)
        self.assert_logged("cannot start: no share or usable access code for ID " + other.share_id)
        self.good_connection_works()

    def test_garbage_bytes(self):
        """Invalid JSON closes the connection with a logged reason."""
        self.listen()
        client = self.raw(b"{not json at all\n")
        self.flush()
        self.successResultOf(client.lost)
        self.assertIn(b'"type":"greeting"', client.data)
        self.assert_logged("not valid JSON")
        self.good_connection_works()

    def test_first_byte_must_open_a_message(self):
        """A client whose first byte cannot start a JSON message is closed at that byte."""
        self.listen()
        client = self.raw(b"\x00")
        self.flush()
        self.successResultOf(client.lost)
        self.assert_logged("the first bytes are not a JSON message")
        self.good_connection_works()

    def test_huge_line(self):
        """A 20 MB line is refused long before it ends; the listener carries on."""
        self.listen()
        client = self.raw(b"{")
        chunk, sent = b"a" * (64 * 1024), 1
        while sent < 20 * 1024 * 1024 and not client.lost.called:
            client.transport.write(chunk)
            sent += len(chunk)
            self.flush()
        self.successResultOf(client.lost)
        self.assertLess(sent, 1024 * 1024)
        self.assert_logged("line longer than")
        self.good_connection_works()

    def test_bytes_after_start_are_refused(self):
        """Plaintext bytes after start, where TLS must begin, close the connection."""
        self.listen()
        start = encode({"type": "start", "software": "x", "protocol": 1, "features": [],
                        "id": KEYS.share_id, "access": "read_write", "peer": CLIENT_PEER})
        client = self.raw(start + b"extra")
        self.flush()
        self.successResultOf(client.lost)
        self.assert_logged("bytes arrived in plaintext after the switch to TLS")

    def test_session_protocol_error_closes(self):
        """A ProtocolError raised by the session closes the connection with its reason."""
        self.listen(session_fail="manifest makes no sense")
        client = self.connected(ConnectTarget.share(KEYS, CLIENT_PEER))
        client.send_message({"type": "manifest"})
        self.flush()
        reason = self.successResultOf(self.client_sessions[0].lost)
        self.assertIn("connection lost", reason)
        self.assertEqual(self.successResultOf(self.server_sessions[0].lost),
                         "manifest makes no sense")
        self.assert_logged("manifest makes no sense")


class LimitTests(PeerTestBase):
    def test_handshake_deadline(self):
        """A peer that stays silent is closed when the 10 s start deadline passes."""
        self.listen()
        client = self.raw()
        self.flush()
        self.assertIn(b"greeting", client.data)
        self.net.advance(9)
        self.assertFalse(client.lost.called)
        self.net.advance(1)
        self.successResultOf(client.lost)
        self.assert_logged("no start message within 10 s")

    def test_started_handshake_deadline(self):
        """A peer that sent start but never finishes TLS is closed after 20 s."""
        self.listen()
        client = self.raw(encode({
            "type": "start", "software": "x", "protocol": 1, "features": [],
            "id": KEYS.share_id, "access": "read_write", "peer": CLIENT_PEER}))
        self.flush()
        self.assertIn(b"starttls", client.data)
        self.net.advance(19)
        self.assertFalse(client.lost.called)
        self.net.advance(1)
        self.successResultOf(client.lost)
        self.assert_logged("handshake did not finish within 20 s")

    def test_failures_rate_limited_per_address_and_id(self):
        """After 5 failed handshakes for one ID, that ID is refused from that address
        until the back-off ends; the address's valid share still connects meanwhile."""
        self.listen()
        bad = encode({"type": "start", "software": "x", "protocol": 1, "features": [],
                      "id": "cd" * 32, "access": "read_write", "peer": CLIENT_PEER})
        for _ in range(5):
            client = self.raw(bad)
            self.flush()
            self.successResultOf(client.lost)
            self.assertIn(b"cannot_start", client.data)
        refused = self.raw(bad)
        self.flush()
        self.successResultOf(refused.lost)
        self.assertIn(b"greeting", refused.data)
        self.assertIn(b"cannot_start", refused.data)
        self.assert_logged("too many failed handshakes from 127.0.0.1 for ID " + "cd" * 32)
        self.good_connection_works()  # the same address, a valid share key
        self.assertTrue(self.factory.limiter.blocked(("127.0.0.1", "cd" * 32)))
        self.clock.advance(10)
        self.assertFalse(self.factory.limiter.blocked(("127.0.0.1", "cd" * 32)))

    def test_failures_after_tls_are_not_counted(self):
        """A peer whose key works but whose handshake fails later (a wrong clock) is never blocked."""
        self.listen()
        for _ in range(6):
            reason = self.connect_fails(ConnectTarget.share(KEYS, CLIENT_PEER), clock=Clock())
            self.assertIn("clocks differ", reason)
        self.assertEqual(dict(self.factory.limiter._records), {})
        self.good_connection_works()

    def test_malformed_ids_share_one_back_off_entry(self):
        """A start naming a huge or malformed ID is counted under one small key, not the ID."""
        self.listen()
        for n in range(3):
            client = self.raw(encode({
                "type": "start", "software": "x", "protocol": 1, "features": [],
                "id": "x" * (50_000 + n), "access": "read_write", "peer": CLIENT_PEER}))
            self.flush()
            self.successResultOf(client.lost)
        self.assertEqual(list(self.factory.limiter._records), [("127.0.0.1", "")])

    def test_unauthenticated_connections_capped(self):
        """When every slot is taken a newcomer displaces the oldest connection that has
        not sent start; with every slot past start, the newcomer is refused."""
        self.listen(max_unauthenticated=2)
        first, second = self.raw(), self.raw()
        self.flush()
        self.assertTrue(first.got_data.called and second.got_data.called)
        third = self.raw()
        self.flush()
        self.successResultOf(first.lost)
        self.assertIn(b"greeting", third.data)
        self.assertFalse(second.lost.called)
        self.assert_logged("no start message yet while every handshake slot was taken")
        start = encode({"type": "start", "software": "x", "protocol": 1, "features": [],
                        "id": KEYS.share_id, "access": "read_write", "peer": CLIENT_PEER})
        second.transport.write(start)
        third.transport.write(start)
        self.flush()
        self.assertIn(b"starttls", second.data)
        self.assertIn(b"starttls", third.data)
        fourth = self.raw()
        self.flush()
        self.successResultOf(fourth.lost)
        self.assertEqual(fourth.data, b"")
        self.assert_logged("all 2 handshake slots are taken")
        self.assertFalse(second.lost.called or third.lost.called)
        second.transport.loseConnection()
        third.transport.loseConnection()
        self.flush()
        self.successResultOf(second.lost)
        self.successResultOf(third.lost)

    def test_keepalive(self):
        """Pings flow every timeout and stay out of the session; silence past 1.1x drops."""
        self.listen()
        client = self.connected(ConnectTarget.share(KEYS, CLIENT_PEER))
        (server_proto,) = self.factory.connections
        self.net.advance(60)  # both sides ping
        self.assertEqual(server_proto._their_ping_timeout, 60)
        self.assertEqual(client._their_ping_timeout, 60)
        self.assertEqual(self.server_sessions[0].events, [])
        self.assertEqual(self.client_sessions[0].events, [])

        client.send_message({"type": "ping", "timeout": 300})
        self.flush()
        self.assertEqual(server_proto._their_ping_timeout, 300)
        self.assertAlmostEqual(server_proto._idle_limit(), 330.0)

        # The client falls silent (and stops watching the server).
        for call in (client._ping_call, client._idle_call):
            call.cancel()
        client._ping_call = client._idle_call = None
        self.net.advance(329)
        self.assertFalse(self.server_sessions[0].lost.called)
        self.assertFalse(self.client_sessions[0].lost.called)
        self.net.advance(2)
        reason = self.successResultOf(self.server_sessions[0].lost)
        self.assertIn("no data from the peer", reason)
        self.successResultOf(self.client_sessions[0].lost)


def test_failure_limiter_backoff_doubles_and_forgets():
    """5 failures in a minute block 10 s, the next 20 s; a quiet minute forgets."""
    clock = Clock()
    limiter = FailureLimiter(clock)
    for _ in range(4):
        limiter.failed("10.0.0.1")
    assert not limiter.blocked("10.0.0.1")
    limiter.failed("10.0.0.1")
    assert limiter.blocked("10.0.0.1") and limiter.blocked_for("10.0.0.1") == 10
    assert not limiter.blocked("10.0.0.2")
    clock.advance(10)
    assert not limiter.blocked("10.0.0.1")
    limiter.failed("10.0.0.1")
    assert limiter.blocked_for("10.0.0.1") == 20
    clock.advance(200)
    limiter.failed("10.0.0.1")
    assert not limiter.blocked("10.0.0.1")


def test_failure_limiter_memory_is_bounded():
    """Only max_addresses addresses are remembered."""
    limiter = FailureLimiter(Clock(), max_addresses=100)
    for n in range(1000):
        limiter.failed("10.0.{}.{}".format(n // 256, n % 256))
    assert len(limiter._records) == 100
