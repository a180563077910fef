"""Peer connections over real TCP on 127.0.0.1: handshake, TLS, refusals, limits, keep-alive."""

from __future__ import annotations

import time

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from clearskies import tls
from clearskies.accesscode import new_access_code
from clearskies.errors import HandshakeError, ProtocolError, ShareError
from clearskies.handshake import ConnectTarget, MemoryKeyRing
from clearskies.keys import ShareKeys, generate_share_keys
from clearskies.peer import FailureLimiter, PeerServerFactory, connect_peer
from clearskies.wire import Message, encode

SERVER_PEER = "48d09b6b6a8ae0edb8fc14c64bbc604b"
CLIENT_PEER = "e358644d71f4f10c95f3707d414ff162"
KEYS = generate_share_keys(rsa_bits=1024)


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
    timeout = 15

    def setUp(self) -> None:
        self.events: list = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.server_sessions: list[RecordingSession] = []
        self.client_sessions: list[RecordingSession] = []
        self.ring_s = MemoryKeyRing(time.time)
        self.ring_s.add_share(KEYS, SERVER_PEER)
        self.ring_c = MemoryKeyRing(time.time)
        self.ring_c.add_share(KEYS, CLIENT_PEER)

    def logged(self) -> list[str]:
        return [formatEvent(e) for e in self.events]

    def assert_logged(self, fragment: str) -> None:
        texts = self.logged()
        self.assertTrue(any(fragment in t for t in texts),
                        "{!r} not in log: {!r}".format(fragment, texts[-10:]))

    async def listen(self, clock=reactor, session_fail: str | None = None, **options):
        def make_session(connection):
            session = RecordingSession(connection, session_fail)
            self.server_sessions.append(session)
            return session

        self.factory = PeerServerFactory(clock, self.ring_s, "server box", make_session, **options)
        self.port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            self.factory)
        self.addCleanup(self._stop)
        return self.factory

    async def _stop(self) -> None:
        for protocol in list(self.factory.connections | self.factory.handshaking):
            if protocol.transport is not None:
                protocol.transport.abortConnection()
        await self.port.stopListening()
        await self.settle()

    async def settle(self) -> None:
        """Wait until the server factory has no open connections (bounded)."""
        for _ in range(200):
            if not (self.factory.connections or self.factory.handshaking):
                break
            await deferLater(reactor, 0.01, lambda: None)
        # Let closing transports finish their last callbacks.
        await deferLater(reactor, 0.01, lambda: None)

    def endpoint(self) -> TCP4ClientEndpoint:
        return TCP4ClientEndpoint(reactor, "127.0.0.1", self.port.getHost().port)

    async def connect(self, target: ConnectTarget, clock=reactor, **options):
        def make_session(connection):
            session = RecordingSession(connection)
            self.client_sessions.append(session)
            return session

        return await connect_peer(reactor, self.endpoint(), target, self.ring_c, "client box",
                                  make_session, clock, **options)

    async def connect_fails(self, target: ConnectTarget, **options) -> str:
        try:
            await self.connect(target, **options)
        except HandshakeError as e:
            return str(e)
        self.fail("the connection succeeded")

    async def raw(self, data: bytes = b"") -> RawClient:
        client = RawClient()
        await TCP4ClientEndpoint(reactor, "127.0.0.1", self.port.getHost().port).connect(
            Factory.forProtocol(lambda: client))
        if data:
            client.transport.write(data)
        return client

    async def good_connection_works(self) -> None:
        client = await self.connect(ConnectTarget.share(KEYS, CLIENT_PEER))
        self.assertEqual(client.established.share_id, KEYS.share_id)
        lost = self.client_sessions[-1].lost
        client.close("test done", quiet=True)
        await lost


class HandshakeTests(PeerTestBase):
    def test_share_key_handshake(self):
        """With a share key both sides get Established and exchange messages over TLS."""
        return Deferred.fromCoroutine(self._share_key())

    async def _share_key(self):
        await self.listen()
        client = await self.connect(ConnectTarget.share(KEYS, CLIENT_PEER))
        await deferLater(reactor, 0.05, lambda: None)
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
        for _ in range(100):
            if len(server_session.events) >= 4:
                break
            await deferLater(reactor, 0.01, lambda: None)
        first = server_session.events[0]
        self.assertIsInstance(first, Message)
        self.assertEqual(first.body, {"type": "get_manifest"})
        self.assertEqual(server_session.events[1].body, {"type": "file_data", "path": "a"})
        self.assertEqual(server_session.events[2].data, b"abc")

        client.close("done here")
        reason = await server_session.lost
        self.assertIn("connection lost", reason)
        self.assertEqual(await client_session.lost, "done here")

    def test_tls12_end_to_end(self):
        """Both sides pinned to TLS 1.2 negotiate an ECDHE-PSK suite."""
        return Deferred.fromCoroutine(self._tls12())

    async def _tls12(self):
        await self.listen(tls_options={"versions": ("TLSv1.2",)})
        client = await self.connect(ConnectTarget.share(KEYS, CLIENT_PEER),
                                    tls_options={"versions": ("TLSv1.2",)})
        self.assertEqual(tls.negotiated_version(client.transport), "TLSv1.2")
        self.assertEqual(tls.negotiated_cipher(client.transport), "ECDHE-PSK-CHACHA20-POLY1305")
        client.close("done", quiet=True)
        await self.client_sessions[0].lost

    def test_access_code_exchange(self):
        """With an access code: keys arrive, the code is spent, a second use is refused."""
        return Deferred.fromCoroutine(self._access_code())

    async def _access_code(self):
        await self.listen()
        code = new_access_code(KEYS.share_id, "read_only", time.time())
        self.ring_s.add_code(code)
        self.ring_c = MemoryKeyRing(time.time)
        target = ConnectTarget.join(code.code, CLIENT_PEER)
        client = await self.connect(target)
        self.assertEqual(client.established.access, "read_only")
        self.assertEqual(client.established.share_id, KEYS.share_id)
        ((created, created_for),) = self.ring_c.created
        self.assertIs(created_for, target)
        self.assertEqual(created.psks, {k: KEYS.psks[k] for k in ("untrusted", "read_only")})
        self.assertNotIn("read_write", created.private_keys)
        await deferLater(reactor, 0.02, lambda: None)
        self.assertEqual(self.ring_s.used, [code.access_id])
        self.assertEqual(self.server_sessions[0].established.access_id, code.access_id)
        client.close("done", quiet=True)
        await self.client_sessions[0].lost

        reason = await self.connect_fails(ConnectTarget.join(code.code, CLIENT_PEER))
        self.assertIn("cannot start", reason)
        self.assert_logged("cannot start")

    def test_slow_share_creation(self):
        """The joiner holds the handshake until the seam's Deferred fires, without a slot."""
        return Deferred.fromCoroutine(self._slow_share())

    async def _slow_share(self):
        await self.listen()
        code = new_access_code(KEYS.share_id, "read_write", time.time())
        self.ring_s.add_code(code)
        self.ring_c = MemoryKeyRing(time.time)
        self.ring_c.delay_creation = True
        connecting = self.connect(ConnectTarget.join(code.code, CLIENT_PEER))
        pending = Deferred.fromCoroutine(connecting)
        for _ in range(200):
            if self.ring_c.pending:
                break
            await deferLater(reactor, 0.01, lambda: None)
        await deferLater(reactor, 0.05, lambda: None)
        self.assertFalse(pending.called)
        self.assertEqual(self.ring_s.used, [])
        # TLS is up, so the code was right: no handshake slot is held while the joiner works.
        self.assertEqual((len(self.factory.handshaking), len(self.factory.admission)), (1, 0))
        self.ring_c.pending[0].callback(None)
        client = await pending
        self.assertEqual(client.established.access, "read_write")
        client.close("done", quiet=True)
        await self.client_sessions[0].lost

    def test_share_creation_failure_closes(self):
        """If the share cannot be created, the connection closes with that reason."""
        return Deferred.fromCoroutine(self._creation_fails())

    async def _creation_fails(self):
        await self.listen()
        code = new_access_code(KEYS.share_id, "read_only", time.time())
        self.ring_s.add_code(code)
        self.ring_c = MemoryKeyRing(time.time)
        self.ring_c.delay_creation = True
        pending = Deferred.fromCoroutine(
            self.connect_fails(ConnectTarget.join(code.code, CLIENT_PEER)))
        for _ in range(200):
            if self.ring_c.pending:
                break
            await deferLater(reactor, 0.01, lambda: None)
        self.ring_c.pending[0].errback(ShareError("the target folder vanished"))
        reason = await pending
        self.assertIn("could not create the share: ShareError: the target folder vanished", reason)
        self.assertEqual(len(self.flushLoggedErrors(ShareError)), 1)
        await self.settle()
        self.assertEqual(self.ring_s.used, [])

    def test_session_factory_may_refuse(self):
        """A session factory that closes the connection makes connect_peer fail with its reason."""
        return Deferred.fromCoroutine(self._refused_by_session())

    async def _refused_by_session(self):
        await self.listen()
        lost: Deferred = Deferred()

        class Refusing:
            def __init__(self, connection):
                connection.close("share is gone")

            def event_received(self, event):
                pass

            def connection_lost(self, reason):
                lost.callback(reason)

        try:
            await connect_peer(reactor, self.endpoint(), ConnectTarget.share(KEYS, CLIENT_PEER),
                               self.ring_c, "client box", Refusing)
        except HandshakeError as e:
            self.assertIn("share is gone", str(e))
        else:
            self.fail("connect_peer succeeded on a refused connection")
        self.assertEqual(await lost, "share is gone")

    def test_offer_to_joining_server(self):
        """A share holder connecting to a code holder hands over the keys."""
        return Deferred.fromCoroutine(self._offer())

    async def _offer(self):
        self.ring_s = MemoryKeyRing(time.time)
        code = new_access_code(KEYS.share_id, "read_only", time.time())
        join = ConnectTarget.join(code.code, SERVER_PEER)
        self.ring_s.add_join(join)
        await self.listen()
        self.ring_c.add_code(code)
        client = await self.connect(ConnectTarget.offer(code, KEYS, CLIENT_PEER))
        self.assertEqual(client.established.access, "read_only")
        self.assertEqual(self.ring_c.used, [code.access_id])
        self.assertIs(self.ring_s.created[0][1], join)
        client.close("done", quiet=True)
        await self.client_sessions[0].lost

    def test_loopback_closed_quietly(self):
        """Connecting to ourselves ends without counting as a failure."""
        return Deferred.fromCoroutine(self._loopback())

    async def _loopback(self):
        await self.listen()
        # The server sees its own peer ID in start and just closes.
        reason = await self.connect_fails(ConnectTarget.share(KEYS, SERVER_PEER))
        self.assertIn("connection lost", reason)
        await self.settle()
        self.assert_logged("loopback: the peer is ourselves")
        self.assertFalse(self.factory.limiter.blocked_for("127.0.0.1"))
        self.assertEqual(self.factory.limiter._records, {})


class RefusalTests(PeerTestBase):
    def test_wrong_key(self):
        """A wrong PSK fails TLS on both sides; the listener still accepts good peers."""
        return Deferred.fromCoroutine(self._wrong_key())

    async def _wrong_key(self):
        await self.listen()
        reason = await self.connect_fails(ConnectTarget.share(wrong_keys(KEYS), CLIENT_PEER))
        self.assertIn("Error", reason)
        await self.settle()
        self.assert_logged("handshake with 127.0.0.1")
        await self.good_connection_works()

    def test_unknown_id(self):
        """An unknown share ID gets cannot_start and a closed connection."""
        return Deferred.fromCoroutine(self._unknown())

    async def _unknown(self):
        await self.listen()
        other = generate_share_keys(rsa_bits=1024)
        reason = await self.connect_fails(ConnectTarget.share(other, CLIENT_PEER))
        self.assertIn("cannot start", reason)
        self.assert_logged("cannot start: no share or usable access code for ID " + other.share_id)
        await self.good_connection_works()

    def test_garbage_bytes(self):
        """Invalid JSON closes the connection with a logged reason."""
        return Deferred.fromCoroutine(self._garbage())

    async def _garbage(self):
        await self.listen()
        client = await self.raw(b"{not json at all\n")
        await client.lost
        self.assertIn(b'"type":"greeting"', client.data)
        self.assert_logged("not valid JSON")
        await self.good_connection_works()

    def test_first_byte_must_open_a_message(self):
        """A client whose first byte cannot start a JSON message is closed at that byte."""
        return Deferred.fromCoroutine(self._first_byte())

    async def _first_byte(self):
        await self.listen()
        client = await self.raw(b"\x00")
        await client.lost
        self.assert_logged("the first bytes are not a JSON message")
        await self.good_connection_works()

    def test_huge_line(self):
        """A 20 MB line is refused long before it ends; the listener carries on."""
        return Deferred.fromCoroutine(self._huge())

    async def _huge(self):
        await self.listen()
        client = await self.raw(b"{" + b"a" * (20 * 1024 * 1024))
        await client.lost
        self.assert_logged("line longer than")
        await self.good_connection_works()

    def test_bytes_after_start_are_refused(self):
        """Plaintext bytes after start, where TLS must begin, close the connection."""
        return Deferred.fromCoroutine(self._after_start())

    async def _after_start(self):
        await self.listen()
        start = encode({"type": "start", "software": "x", "protocol": 1, "features": [],
                        "id": KEYS.share_id, "access": "read_write", "peer": CLIENT_PEER})
        client = await self.raw(start + b"extra")
        await client.lost
        self.assert_logged("bytes arrived in plaintext after the switch to TLS")

    def test_session_protocol_error_closes(self):
        """A ProtocolError raised by the session closes the connection with its reason."""
        return Deferred.fromCoroutine(self._session_error())

    async def _session_error(self):
        await self.listen(session_fail="manifest makes no sense")
        client = await self.connect(ConnectTarget.share(KEYS, CLIENT_PEER))
        client.send_message({"type": "manifest"})
        reason = await self.client_sessions[0].lost
        self.assertIn("connection lost", reason)
        self.assertEqual(await self.server_sessions[0].lost, "manifest makes no sense")
        self.assert_logged("manifest makes no sense")


class LimitTests(PeerTestBase):
    def test_handshake_deadline(self):
        """A peer that stays silent is closed when the 10 s start deadline passes."""
        return Deferred.fromCoroutine(self._deadline())

    async def _deadline(self):
        clock = Clock()
        await self.listen(clock=clock)
        client = await self.raw()
        await client.got_data
        self.assertIn(b"greeting", client.data)
        clock.advance(9)
        await deferLater(reactor, 0.02, lambda: None)
        self.assertFalse(client.lost.called)
        clock.advance(1)
        await client.lost
        self.assert_logged("no start message within 10 s")

    def test_started_handshake_deadline(self):
        """A peer that sent start but never finishes TLS is closed after 20 s."""
        return Deferred.fromCoroutine(self._started_deadline())

    async def _started_deadline(self):
        clock = Clock()
        await self.listen(clock=clock)
        client = await self.raw(encode({
            "type": "start", "software": "x", "protocol": 1, "features": [],
            "id": KEYS.share_id, "access": "read_write", "peer": CLIENT_PEER}))
        for _ in range(100):
            if b"starttls" in client.data:
                break
            await deferLater(reactor, 0.01, lambda: None)
        clock.advance(19)
        await deferLater(reactor, 0.02, lambda: None)
        self.assertFalse(client.lost.called)
        clock.advance(1)
        await client.lost
        self.assert_logged("handshake did not finish within 20 s")

    def test_failures_rate_limited_per_address_and_id(self):
        """After 5 failed handshakes for one ID, that ID is refused from that address
        until the back-off ends; the address's valid share still connects meanwhile."""
        return Deferred.fromCoroutine(self._rate_limit())

    async def _rate_limit(self):
        clock = Clock()
        clock.advance(time.time())  # the identity message carries this clock's time
        await self.listen(clock=clock)
        bad = encode({"type": "start", "software": "x", "protocol": 1, "features": [],
                      "id": "cd" * 32, "access": "read_write", "peer": CLIENT_PEER})
        for _ in range(5):
            client = await self.raw(bad)
            await client.lost
            self.assertIn(b"cannot_start", client.data)
        await self.settle()
        refused = await self.raw(bad)
        await refused.lost
        self.assertIn(b"greeting", refused.data)
        self.assertIn(b"cannot_start", refused.data)
        self.assert_logged("too many failed handshakes from 127.0.0.1 for ID " + "cd" * 32)
        await self.good_connection_works()  # the same address, a valid share key
        await self.settle()
        self.assertTrue(self.factory.limiter.blocked(("127.0.0.1", "cd" * 32)))
        clock.advance(10)
        self.assertFalse(self.factory.limiter.blocked(("127.0.0.1", "cd" * 32)))

    def test_failures_after_tls_are_not_counted(self):
        """A peer whose key works but whose handshake fails later (a wrong clock) is never blocked."""
        return Deferred.fromCoroutine(self._after_tls())

    async def _after_tls(self):
        await self.listen()
        for _ in range(6):
            reason = await self.connect_fails(ConnectTarget.share(KEYS, CLIENT_PEER),
                                              clock=Clock())
            self.assertIn("clocks differ", reason)
        await self.settle()
        self.assertEqual(dict(self.factory.limiter._records), {})
        await self.good_connection_works()

    def test_malformed_ids_share_one_back_off_entry(self):
        """A start naming a huge or malformed ID is counted under one small key, not the ID."""
        return Deferred.fromCoroutine(self._malformed())

    async def _malformed(self):
        await self.listen()
        for n in range(3):
            client = await self.raw(encode({
                "type": "start", "software": "x", "protocol": 1, "features": [],
                "id": "x" * (50_000 + n), "access": "read_write", "peer": CLIENT_PEER}))
            await client.lost
        await self.settle()
        self.assertEqual(list(self.factory.limiter._records), [("127.0.0.1", "")])

    def test_unauthenticated_connections_capped(self):
        """When every slot is taken a newcomer displaces the oldest connection that has
        not sent start; with every slot past start, the newcomer is refused."""
        return Deferred.fromCoroutine(self._cap())

    async def _cap(self):
        await self.listen(max_unauthenticated=2)
        first, second = await self.raw(), await self.raw()
        await first.got_data
        await second.got_data
        third = await self.raw()
        await third.got_data
        await first.lost
        self.assertIn(b"greeting", third.data)
        self.assertFalse(second.lost.called)
        self.assert_logged("no start message yet while every handshake slot was taken")
        start = encode({"type": "start", "software": "x", "protocol": 1, "features": [],
                        "id": KEYS.share_id, "access": "read_write", "peer": CLIENT_PEER})
        second.transport.write(start)
        third.transport.write(start)
        for _ in range(100):
            if b"starttls" in second.data and b"starttls" in third.data:
                break
            await deferLater(reactor, 0.01, lambda: None)
        fourth = await self.raw()
        await fourth.lost
        self.assertEqual(fourth.data, b"")
        self.assert_logged("all 2 handshake slots are taken")
        self.assertFalse(second.lost.called or third.lost.called)
        second.transport.loseConnection()
        third.transport.loseConnection()
        await second.lost
        await third.lost

    def test_keepalive(self):
        """Pings flow every timeout and stay out of the session; silence past 1.1x drops."""
        return Deferred.fromCoroutine(self._keepalive())

    async def _keepalive(self):
        clock = Clock()
        clock.advance(time.time())
        await self.listen(clock=clock)
        client = await self.connect(ConnectTarget.share(KEYS, CLIENT_PEER), clock=clock)
        await deferLater(reactor, 0.05, lambda: None)
        (server_proto,) = self.factory.connections
        clock.advance(60)  # both sides ping
        for _ in range(100):
            if server_proto._their_ping_timeout and client._their_ping_timeout:
                break
            await deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(server_proto._their_ping_timeout, 60)
        self.assertEqual(client._their_ping_timeout, 60)
        self.assertEqual(self.server_sessions[0].events, [])
        self.assertEqual(self.client_sessions[0].events, [])

        client.send_message({"type": "ping", "timeout": 300})
        for _ in range(100):
            if server_proto._their_ping_timeout == 300:
                break
            await deferLater(reactor, 0.01, lambda: None)
        self.assertAlmostEqual(server_proto._idle_limit(), 330.0)

        # The client falls silent (and stops watching the server).
        for call in (client._ping_call, client._idle_call):
            call.cancel()
        client._ping_call = client._idle_call = None
        clock.advance(329)
        await deferLater(reactor, 0.02, lambda: None)
        self.assertFalse(self.server_sessions[0].lost.called)
        self.assertFalse(self.client_sessions[0].lost.called)
        clock.advance(2)
        reason = await self.server_sessions[0].lost
        self.assertIn("no data from the peer", reason)
        await self.client_sessions[0].lost


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
