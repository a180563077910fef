"""The tracker's HTTP face, over a real port on 127.0.0.1 (and one fake-request stream test)."""

from __future__ import annotations

import json

import pytest
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from twisted.web.test.requesthelper import DummyRequest

from clearskies.tracker.registry import Registry
from clearskies.tracker.web import TrackQuery, TrackResource, _Stream, make_site
from tests.helpers import async_test, onion_name

# Agent's own body transport lacks abortConnection; readBody warns about it.
pytestmark = pytest.mark.filterwarnings("ignore:Using readBody:DeprecationWarning")

A = "a" * 64
B = "b" * 64
P1 = "1" * 32
P2 = "2" * 32
P3 = "3" * 32


class _Lines(Protocol):
    """Collects a streamed response body line by line."""

    def __init__(self) -> None:
        self.lines: list[bytes] = []
        self._buffer = b""
        self._waiting: list[Deferred[bytes]] = []
        self.closed: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            if self._waiting:
                self._waiting.pop(0).callback(line)
            else:
                self.lines.append(line)

    def connectionLost(self, reason: object) -> None:
        self.closed.callback(None)

    def next_line(self) -> Deferred[bytes]:
        if self.lines:
            d: Deferred[bytes] = Deferred()
            d.callback(self.lines.pop(0))
            return d
        d = Deferred()
        self._waiting.append(d)
        return d


class _Raw(Protocol):
    """Sends fixed bytes and gathers everything until the server closes."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.received = b""
        self.done: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.payload)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: object) -> None:
        self.done.callback(self.received)


def _track(*pairs: tuple[str, str], tcp_port: int = 30001, extra: str = "") -> str:
    query = "&".join("id=%s%%40%s" % (share_id, peer) for share_id, peer in pairs)
    return "/clearskies/track?%s&tcp_port=%d%s" % (query, tcp_port, extra)


class TrackerWebTests(unittest.TestCase):
    timeout = 15

    def setUp(self) -> None:
        self.registry = Registry(ttl=300, max_ids_per_request=4, max_streams=1)
        self.site = make_site(self.registry, reactor, stream_timeout=1)
        self.port = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(self.pool.closeCachedConnections)
        self.agent = Agent(reactor, pool=self.pool)
        self.base = "http://127.0.0.1:%d" % (self.port.getHost().port,)

    async def _get(self, path: str, method: bytes = b"GET") -> tuple[int, Headers, bytes]:
        response = await self.agent.request(method, (self.base + path).encode("ascii"))
        body = await readBody(response)
        return response.code, response.headers, body

    async def _raw(self, payload: bytes) -> bytes:
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port.getHost().port)
        raw = _Raw(payload)
        await connectProtocol(endpoint, raw)
        return await raw.done

    async def _open_stream(self, path: str) -> _Lines:
        response = await self.agent.request(b"GET", (self.base + path).encode("ascii"))
        self.assertEqual(response.code, 200)
        lines = _Lines()
        response.deliverBody(lines)
        return lines

    async def _until_no_streams(self) -> None:
        for _ in range(100):
            if self.registry.stats()["streams"] == 0:
                return
            await deferLater(reactor, 0.02, lambda: None)
        self.fail("the stream was not cleaned up")

    async def _close_stream(self, lines: _Lines) -> None:
        lines.transport.stopProducing()
        await lines.closed
        await self._until_no_streams()

    @async_test
    async def test_reference_shaped_request(self) -> None:
        """The reference peer's exact request gets the reference JSON shape, then sees the next peer."""
        code, headers, body = await self._get(
            "/clearskies/track?id=%s%%40%s&tcp_port=30001" % (A, P1)
        )
        self.assertEqual(code, 200)
        self.assertEqual(headers.getRawHeaders(b"content-type"), [b"application/json"])
        self.assertEqual(
            body,
            b'{"your_ip":"127.0.0.1","others":{"%s":[]},"ttl":300}' % A.encode(),
        )
        code, _, body = await self._get(
            "/clearskies/track?id=%s%%40%s&tcp_port=30002" % (A, P2)
        )
        self.assertEqual(
            json.loads(body),
            {"your_ip": "127.0.0.1", "others": {A: [P1 + "@tcp:127.0.0.1:30001"]}, "ttl": 300},
        )

    @async_test
    async def test_literal_at_multiple_ids_and_utp_port(self) -> None:
        """A raw '@', several id parameters and utp_port are understood."""
        await self._get("/clearskies/track?id=%s@%s&id=%s@%s&tcp_port=7&utp_port=8" % (A, P1, B, P1))
        code, _, body = await self._get(_track((A, P2), (B, P2), tcp_port=9))
        self.assertEqual(code, 200)
        self.assertEqual(json.loads(body)["others"], {
            A: [P1 + "@tcp:127.0.0.1:7", P1 + "@utp:127.0.0.1:8"],
            B: [P1 + "@tcp:127.0.0.1:7", P1 + "@utp:127.0.0.1:8"],
        })

    @async_test
    async def test_status_page_counts(self) -> None:
        """GET / shows how many IDs and peers are registered."""
        await self._get(_track((A, P1), (B, P1)))
        await self._get(_track((A, P2)))
        code, headers, body = await self._get("/")
        self.assertEqual(code, 200)
        self.assertTrue(headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain"))
        self.assertIn(b"IDs: 2\n", body)
        self.assertIn(b"peers: 3\n", body)

    @async_test
    async def test_bad_parameters_get_400_with_a_message(self) -> None:
        """Each malformed query is answered 400 text/plain naming the problem; nothing is stored."""
        cases = [
            ("/clearskies/track", b"at least one id"),
            ("/clearskies/track?tcp_port=30001", b"at least one id"),
            ("/clearskies/track?id=%s" % (A,), b"id must look like"),
            ("/clearskies/track?id=%s%%40%s" % (A, P1), b"tcp_port is required"),
            (_track((A, P1), tcp_port=0), b"tcp_port must be a number from 1 to 65535"),
            (_track((A, P1), tcp_port=70000), b"tcp_port must be a number from 1 to 65535"),
            ("/clearskies/track?id=%s%%40%s&tcp_port=-5" % (A, P1), b"tcp_port must be"),
            ("/clearskies/track?id=%s%%40%s&tcp_port=1e3" % (A, P1), b"tcp_port must be"),
            (_track((A, P1)) + "&tcp_port=5", b"at most once"),
            (_track((A, P1), extra="&utp_port=x"), b"utp_port must be"),
            (_track((A, P1), extra="&fast_track=yes"), b"fast_track must be 1 or 0"),
            (_track((A.upper(), P1)), b"64 lowercase hex"),
            (_track((A, "zz")), b"32 lowercase hex"),
            ("/clearskies/track?id=%s%%40%s%%ff&tcp_port=1" % (A, P1), b"ASCII"),
            (_track(*[("%064x" % i, P1) for i in range(5)]), b"at most 4"),
        ]
        for path, words in cases:
            code, headers, body = await self._get(path)
            self.assertEqual((path, code), (path, 400))
            self.assertTrue(headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain"))
            self.assertIn(words, body)
        self.assertEqual(self.registry.stats()["registrations"], 0)
        code, _, _ = await self._get(_track((A, P1)))
        self.assertEqual(code, 200)

    @async_test
    async def test_oversized_and_garbage_requests_leave_the_tracker_serving(self) -> None:
        """A 40 KB request line and a non-HTTP line get 400; the next request is served."""
        huge = b"GET /clearskies/track?id=" + b"a" * 40_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
        answer = await self._raw(huge)
        self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), answer[:100])
        self.assertIn(b"longer than", answer)
        answer = await self._raw(b"\x00\xffGARBAGE\r\n\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), answer[:100])
        code, _, body = await self._get(_track((A, P1)))
        self.assertEqual(code, 200)
        self.assertEqual(json.loads(body)["your_ip"], "127.0.0.1")

    @async_test
    async def test_other_methods_and_paths_are_not_server_errors(self) -> None:
        """POST to the track URL is 405 and an unknown path is 404, never 500."""
        code, headers, body = await self._get(_track((A, P1)), method=b"POST")
        self.assertEqual((code, body), (405, b"only GET is supported here\n"))
        self.assertEqual(headers.getRawHeaders(b"allow"), [b"GET, HEAD"])
        for path in ("/nothing/here", "/clearskies", "/clearskies/other"):
            code, _, body = await self._get(path)
            self.assertEqual(code, 404)
            self.assertIn(b"/clearskies/track", body)
        code, _, body = await self._get("/", method=b"HEAD")
        self.assertEqual((code, body), (200, b""))
        self.assertEqual(self.registry.stats()["registrations"], 0)

    @async_test
    async def test_fast_track_streams_updates_and_keepalives(self) -> None:
        """fast_track=1: first line with timeout, an others line when a peer arrives, then {} pings."""
        await self._get(_track((A, P3), tcp_port=30003))
        lines = await self._open_stream(_track((A, P1), extra="&fast_track=1"))
        first = json.loads(await lines.next_line())
        self.assertEqual(first, {
            "your_ip": "127.0.0.1",
            "others": {A: [P3 + "@tcp:127.0.0.1:30003"]},
            "ttl": 300,
            "timeout": 1,
        })
        code, _, body = await self._get(_track((A, P2), tcp_port=30002))
        self.assertEqual(json.loads(body)["others"][A], [P3 + "@tcp:127.0.0.1:30003", P1 + "@tcp:127.0.0.1:30001"])
        line = await lines.next_line()
        while line == b"{}":  # a ping may come first on a slow machine
            line = await lines.next_line()
        update = json.loads(line)
        self.assertEqual(update, {"others": {A: [P3 + "@tcp:127.0.0.1:30003", P2 + "@tcp:127.0.0.1:30002"]}})
        self.assertEqual(await lines.next_line(), b"{}")
        await self._close_stream(lines)
        self.assertIn(b"fast_track streams: 0", (await self._get("/"))[2])

    @async_test
    async def test_fast_track_keeps_its_registration_alive(self) -> None:
        """While a stream is open its peer stays registered past the TTL."""
        self.registry.ttl = 1
        lines = await self._open_stream(_track((A, P1), extra="&fast_track=1"))
        await lines.next_line()
        await deferLater(reactor, 1.6, lambda: None)
        self.registry.expire(reactor.seconds())
        self.assertEqual(self.registry.others(A), [P1 + "@tcp:127.0.0.1:30001"])
        await self._close_stream(lines)

    @async_test
    async def test_full_tracker_refreshes_existing_ids_and_names_the_new_one(self) -> None:
        """On a full tracker an existing ID plus a new one gets 200, the peers and the new ID named."""
        self.registry.max_total = 2
        code, _, _ = await self._get(_track((A, P1), (B, P1)))
        self.assertEqual(code, 200)
        new_id = "c" * 64
        code, _, body = await self._get(_track((new_id, P1)))
        self.assertEqual((code, body), (503, b"the tracker is full; try again later\n"))
        code, _, body = await self._get(_track((A, P1), (new_id, P1), (B, P1)))
        self.assertEqual(code, 200)
        answer = json.loads(body)
        self.assertEqual(answer["others"], {A: [], new_id: [], B: []})
        self.assertEqual(answer["not_registered"], {
            "ids": [new_id + "@" + P1], "reason": "the tracker is full; try again later",
        })
        self.assertEqual(self.registry.stats()["registrations"], 2)

    @async_test
    async def test_too_many_streams_is_503(self) -> None:
        """Past max_streams a fast_track request gets 503 with a message and registers nothing."""
        lines = await self._open_stream(_track((A, P1), extra="&fast_track=1"))
        await lines.next_line()
        code, headers, body = await self._get(_track((A, P2), extra="&fast_track=1"))
        self.assertEqual(code, 503)
        self.assertIn(b"fast_track streams", body)
        self.assertEqual(self.registry.others(A), [P1 + "@tcp:127.0.0.1:30001"])
        await self._close_stream(lines)
        code, _, _ = await self._get(_track((A, P2)))
        self.assertEqual(code, 200)


class TrackerWebIPv6Tests(unittest.TestCase):
    timeout = 15

    @async_test
    async def test_ipv6_client_is_listed_in_brackets(self) -> None:
        """Over ::1, your_ip is '::1' and the peer's address is tcp:[::1]:PORT."""
        registry = Registry()
        try:
            port = reactor.listenTCP(0, make_site(registry, reactor), interface="::1")
        except Exception as e:
            raise unittest.SkipTest("no IPv6 loopback here: %s" % (e,))
        self.addCleanup(port.stopListening)
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        agent = Agent(reactor, pool=pool)
        base = "http://[::1]:%d" % (port.getHost().port,)
        for peer in (P1, P2):
            response = await agent.request(b"GET", (base + _track((A, peer))).encode())
            body = json.loads(await readBody(response))
        self.assertEqual(body, {"your_ip": "::1", "others": {A: [P1 + "@tcp:[::1]:30001"]}, "ttl": 300})


class _PushRequest(DummyRequest):
    """A DummyRequest that records a push producer instead of looping on it."""

    def registerProducer(self, producer: object, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None


def _stream(registry: Registry, clock: Clock) -> tuple[_PushRequest, _Stream, StringTransport]:
    request = _PushRequest([])
    transport = StringTransport()
    request.transport = transport
    query = TrackQuery([(A, P1)], 30001, None, True)
    stream = _Stream(request, registry, clock, query, "127.0.0.1", timeout=10)
    stream.start()
    return request, stream, transport


def test_paused_stream_coalesces_updates_and_sends_them_on_resume():
    """While the client is not reading, changes are only noted; resume sends one current line."""
    clock = Clock()
    registry = Registry(ttl=300)
    request, stream, _ = _stream(registry, clock)
    assert request.producer is stream
    assert len(request.written) == 1
    stream.pauseProducing()
    registry.register([(A, P2)], "127.0.0.2", 2, None, now=0)
    registry.register([(A, P3)], "127.0.0.3", 3, None, now=0)
    clock.advance(5)  # keep-alive time, but paused: nothing written
    assert len(request.written) == 1
    stream.resumeProducing()
    assert [json.loads(line) for line in request.written[1:]] == [
        {"others": {A: [P2 + "@tcp:127.0.0.2:2", P3 + "@tcp:127.0.0.3:3"]}}
    ]
    clock.advance(5)
    assert request.written[-1] == b"{}\n"


def test_stream_paused_too_long_is_aborted_and_unsubscribed():
    """A client that stops reading for longer than timeout is disconnected and forgotten."""
    clock = Clock()
    registry = Registry(ttl=300)
    request, stream, transport = _stream(registry, clock)
    stream.pauseProducing()
    clock.advance(5)
    assert not transport.disconnecting
    clock.advance(5)
    assert transport.disconnecting
    assert registry.stats()["streams"] == 0
    assert clock.getDelayedCalls() == []


def test_client_disconnect_cleans_up():
    """When the request ends (client gone) the subscription and the timer are released."""
    clock = Clock()
    registry = Registry(ttl=300)
    request, stream, _ = _stream(registry, clock)
    assert registry.stats()["streams"] == 1
    request.finish()
    assert registry.stats()["streams"] == 0
    assert clock.getDelayedCalls() == []
    registry.register([(A, P2)], "127.0.0.2", 2, None, now=0)
    assert len(request.written) == 1


def test_failing_keepalive_closes_the_stream():
    """If writing a keep-alive fails, the stream is closed and the connection aborted."""

    class _BrokenAfterFirst(_PushRequest):
        def write(self, data: bytes) -> None:
            if self.written:
                raise RuntimeError("socket gone")
            super().write(data)

    clock = Clock()
    registry = Registry(ttl=300)
    request = _BrokenAfterFirst([])
    request.transport = StringTransport()
    stream = _Stream(request, registry, clock, TrackQuery([(A, P1)], 1, None, True), "127.0.0.1", 10)
    stream.start()
    clock.advance(5)
    assert request.transport.disconnecting
    assert registry.stats()["streams"] == 0
    assert clock.getDelayedCalls() == []


def test_unexpected_fault_is_503_not_500():
    """An internal error while registering is logged and answered 503 with a message."""

    class _Broken(Registry):
        def register(self, *args: object, **kwargs: object) -> dict:
            raise RuntimeError("bug")

    resource = TrackResource(_Broken(), Clock())
    request = DummyRequest([])
    request.client = IPv4Address("TCP", "127.0.0.1", 5555)
    request.args = {b"id": [("%s@%s" % (A, P1)).encode()], b"tcp_port": [b"1"]}
    body = resource.render(request)
    assert request.responseCode == 503
    assert body == b"the tracker hit an internal error; try again later\n"


# -- extension: onion addresses (tor=<name>.onion:<port>) ------------------------------


def _onion(seed: str) -> str:
    return onion_name(seed.encode())


class TrackerOnionTests(unittest.TestCase):
    timeout = 15

    def setUp(self) -> None:
        self.registry = Registry(ttl=300)
        self.port = reactor.listenTCP(0, make_site(self.registry, reactor, stream_timeout=1),
                                      interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(self.pool.closeCachedConnections)
        self.agent = Agent(reactor, pool=self.pool)
        self.base = "http://127.0.0.1:%d" % (self.port.getHost().port,)

    async def _get(self, path: str) -> tuple[int, bytes]:
        response = await self.agent.request(b"GET", (self.base + path).encode("ascii"))
        return response.code, await readBody(response)

    @async_test
    async def test_tor_addresses_are_listed_beside_tcp(self) -> None:
        """tor= values (name and %3A-encoded colon) are listed as tor: entries after the tcp one."""
        one, two = _onion("one"), _onion("two")
        code, _ = await self._get(
            _track((A, P1), extra="&tor=%s.onion%%3A60106&tor=%s.onion:80" % (one, two)))
        self.assertEqual(code, 200)
        code, body = await self._get(_track((A, P2), tcp_port=30002))
        self.assertEqual(json.loads(body)["others"][A], [
            P1 + "@tcp:127.0.0.1:30001",
            "%s@tor:%s.onion:60106" % (P1, one),
            "%s@tor:%s.onion:80" % (P1, two),
        ])
        # The reference peer's own request is answered exactly as before.
        code, body = await self._get("/clearskies/track?id=%s%%40%s&tcp_port=30003" % (B, P3))
        self.assertEqual(body, b'{"your_ip":"127.0.0.1","others":{"%s":[]},"ttl":300}'
                         % B.encode())

    @async_test
    async def test_onion_only_peer_has_no_tcp_entry(self) -> None:
        """Without tcp_port, a peer giving tor= is listed only at its onion address."""
        name = _onion("only")
        code, body = await self._get("/clearskies/track?id=%s%%40%s&tor=%s.onion:60106"
                                     % (A, P1, name))
        self.assertEqual((code, json.loads(body)["others"]), (200, {A: []}))
        code, body = await self._get(_track((A, P2)))
        self.assertEqual(json.loads(body)["others"][A],
                         ["%s@tor:%s.onion:60106" % (P1, name)])

    @async_test
    async def test_bad_tor_values_get_400_and_store_nothing(self) -> None:
        """Malformed, mistyped (bad checksum) or too many tor= values are refused with 400."""
        good = _onion("good")
        typo = good[:10] + ("a" if good[10] != "a" else "b") + good[11:]
        cases = [
            ("tor=%s.onion:60106" % (good[:-1],), b"tor must be"),
            ("tor=%s.onion:60106" % (typo,), b"tor must be"),
            ("tor=%s.onion:60106" % (good.upper(),), b"tor must be"),
            ("tor=%s.onion:0" % (good,), b"tor must be"),
            ("tor=%s.onion:70000" % (good,), b"tor must be"),
            ("tor=%s.onion" % (good,), b"tor must be"),
            ("tor=tcp:127.0.0.1:4000", b"tor must be"),
            ("tor=%s.onion:1" % ("a" * 56,), b"tor must be"),
            ("&".join("tor=%s.onion:%d" % (good, p) for p in range(1, 6)), b"at most 4 tor"),
        ]
        for query, words in cases:
            path = "/clearskies/track?id=%s%%40%s&%s" % (A, P1, query)
            code, body = await self._get(path)
            self.assertEqual((query, code), (query, 400))
            self.assertIn(words, body)
            code, body = await self._get(_track((A, P1), extra="&" + query))
            self.assertEqual((query, code), (query, 400))
        code, body = await self._get("/clearskies/track?id=%s%%40%s" % (A, P1))
        self.assertEqual(code, 400)
        self.assertIn(b"tcp_port is required", body)
        self.assertEqual(self.registry.stats()["registrations"], 0)


def test_fast_track_stream_renews_and_announces_onion_addresses():
    """A streaming onion-only peer's keep-alives keep its tor: entry; others see it appear."""
    clock = Clock()
    registry = Registry(ttl=300)
    name = _onion("stream")
    query = TrackQuery([(A, P1)], None, None, True, ("%s.onion:60106" % name,))
    request = _PushRequest([])
    request.transport = StringTransport()
    stream = _Stream(request, registry, clock, query, "127.0.0.1", 60)
    stream.start()
    assert registry.register([(A, P2)], "127.0.0.2", 4000, None, clock.seconds()) == {
        "your_ip": "127.0.0.2", "others": {A: ["%s@tor:%s.onion:60106" % (P1, name)]},
        "ttl": 300}
    for _ in range(20):  # 600 s: twice the ttl, kept alive by the stream
        clock.advance(30)
    assert registry.others(A, [P2]) == ["%s@tor:%s.onion:60106" % (P1, name)]
    lines = [json.loads(line) for line in b"".join(request.written).splitlines()]
    assert lines[1] == {"others": {A: [P2 + "@tcp:127.0.0.2:4000"]}}
    stream.stopProducing()


class TrackerConnectionLimitTests(unittest.TestCase):
    timeout = 15

    def setUp(self) -> None:
        self.registry = Registry(ttl=300)
        self.site = make_site(self.registry, reactor, max_connections=2, idle_timeout=0.5)
        self.port = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)

    async def _connect(self, payload: bytes) -> _Raw:
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port.getHost().port)
        raw = _Raw(payload)
        await connectProtocol(endpoint, raw)
        self.addCleanup(lambda: raw.transport.abortConnection() or raw.done)
        return raw

    async def _until(self, opened: int, idle: int) -> None:
        for _ in range(200):
            if self.site.connections() == (opened, idle):
                return
            await deferLater(reactor, 0.01, lambda: None)
        self.fail("connections are %r, not %r" % (self.site.connections(), (opened, idle)))

    @async_test
    async def test_newcomer_displaces_the_longest_idle_connection(self) -> None:
        """At max_connections a new client gets in and the connection idle longest is dropped."""
        first = await self._connect(b"")
        await self._until(1, 1)
        second = await self._connect(b"")
        await self._until(2, 2)
        third = await self._connect(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        self.assertTrue((await third.done).startswith(b"HTTP/1.1 200 "))
        self.assertEqual(await first.done, b"")
        self.assertFalse(second.done.called)

    @async_test
    async def test_when_every_connection_is_busy_a_newcomer_gets_503(self) -> None:
        """Two open fast_track streams fill a 2-connection tracker; a third client hears a plain 503."""
        for peer in (P1, P2):
            await self._connect(
                b"GET %s HTTP/1.1\r\nHost: t\r\n\r\n" % _track((A, peer), extra="&fast_track=1").encode())
        await self._until(2, 0)
        refused = await (await self._connect(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")).done
        self.assertTrue(refused.startswith(b"HTTP/1.1 503 "), refused)
        self.assertIn(b"too many open connections; try again in a minute", refused)
        self.assertEqual(self.registry.stats()["streams"], 2)

    @async_test
    async def test_idle_connection_is_closed_after_the_idle_timeout(self) -> None:
        """A connection that sends nothing is closed after idle_timeout and its place freed."""
        idle = await self._connect(b"GET / HTTP/1.1\r\n")  # a request that never finishes
        self.assertEqual(await idle.done, b"")
        await self._until(0, 0)

    @async_test
    async def test_body_is_refused_before_it_is_read(self) -> None:
        """A POST with a large Content-Length is answered 405 at once and closed; nothing is buffered."""
        answer = await (await self._connect(
            b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 999999999\r\n\r\nxxxx")).done
        self.assertTrue(answer.startswith(b"HTTP/1.1 405 "), answer)
        self.assertIn(b"only GET is supported here", answer)
        self.assertEqual(self.registry.stats()["registrations"], 0)
