"""Tests for clearskies.discovery.tracker_client.

Timing rules (back-off, re-registration, stream silence) run on a ``Clock``
with a fake ``IAgent``; registration, fast_track and tracker restarts run
against the real tracker (clearskies.tracker.web) on 127.0.0.1.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from twisted.application.internet import backoffPolicy
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionLost, ConnectionRefusedError
from twisted.internet.task import Clock, deferLater
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.client import ResponseDone
from twisted.web.resource import Resource
from twisted.web.server import Site

from clearskies.addresses import Address
from clearskies.discovery.tracker_client import (
    MIN_REQUEST_GAP,
    STREAM_RETRY_AFTER,
    TrackerClient,
)
from clearskies.errors import ConfigurationError
from clearskies.tracker.registry import Registry
from clearskies.tracker.web import make_site
from tests.helpers import async_test, onion_name

SHARE = "a" * 64
CODE = "c" * 64
PEER_A = "1" * 32
PEER_A2 = "2" * 32
PEER_B = "b" * 32
PEER_C = "e" * 32


# -- a fake IAgent driven by a Clock -------------------------------------------


class FakeTransport:
    """Stands in for the HTTP client's body transport; closing it ends the body."""

    def __init__(self, clock: Clock, protocol: object) -> None:
        self.clock = clock
        self.protocol = protocol
        self.stopped = False

    def stopProducing(self) -> None:
        if not self.stopped:
            self.stopped = True
            self.clock.callLater(0, self.protocol.connectionLost, Failure(ConnectionLost()))

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass


class FakeResponse:
    """An IResponse whose body the test writes with :meth:`send` and :meth:`finish`."""

    def __init__(self, clock: Clock, code: int = 200) -> None:
        self.clock = clock
        self.code = code
        self.protocol = None
        self.transport: FakeTransport | None = None

    def deliverBody(self, protocol) -> None:
        self.protocol = protocol
        self.transport = FakeTransport(self.clock, protocol)
        protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        if not self.transport.stopped:
            self.protocol.dataReceived(data)

    def finish(self) -> None:
        if not self.transport.stopped:
            self.transport.stopped = True
            self.protocol.connectionLost(Failure(ResponseDone()))


class FakeAgent:
    """Records requests; ``respond`` decides each answer (a Deferred)."""

    def __init__(self, clock: Clock, respond: Callable[[dict], Deferred]) -> None:
        self.clock = clock
        self.respond = respond
        self.requests: list[dict] = []

    def request(self, method, uri, headers=None, bodyProducer=None):
        parts = urlsplit(uri.decode("ascii"))
        query = parse_qs(parts.query)
        record = {"time": self.clock.seconds(), "path": parts.path, "query": query, "uri": uri}
        self.requests.append(record)
        return self.respond(record)


def answer(clock: Clock, document: dict | bytes, code: int = 200) -> Deferred:
    """A Deferred firing with a complete one-document response."""
    response = FakeResponse(clock, code)
    body = document if isinstance(document, bytes) else json.dumps(document).encode()
    original = response.deliverBody

    def deliver(protocol) -> None:
        original(protocol)
        response.send(body)
        response.finish()

    response.deliverBody = deliver
    return succeed(response)


def entry(peer: str, port: int, host: str = "10.0.0.2") -> str:
    return "%s@tcp:%s:%d" % (peer, host, port)


def make_client(clock: Clock, agent: FakeAgent, registrations=None, **kwargs):
    peers: list[tuple[str, list]] = []
    regs = [(SHARE, PEER_A)] if registrations is None else registrations
    client = TrackerClient(
        clock, "http://tracker.invalid:49200/", lambda: regs, lambda: (4000, None),
        lambda target, found: peers.append((target, found)), agent=agent,
        retry_policy=kwargs.pop("retry_policy", backoffPolicy(2.0, 600.0, 2.0, jitter=lambda: 0)),
        **kwargs,
    )
    return client, peers, regs


# -- pure, Clock-driven --------------------------------------------------------


def test_bad_urls_are_configuration_errors() -> None:
    """A tracker URL that is not http(s)://host is refused with a message naming the fix."""
    for url in ["ftp://x", "tracker.example:49200", "http://", "http://x/?a=b", "http://x:99999", "http://a b"]:
        with pytest.raises(ConfigurationError, match="tracker URL"):
            TrackerClient(Clock(), url, list, lambda: (1, None), print, agent=object())


def test_request_format() -> None:
    """The request carries tcp_port, utp_port, one id=ID@peer per registration, and fast_track."""
    clock = Clock()
    agent = FakeAgent(clock, lambda r: Deferred())
    regs = [(SHARE, PEER_A), (CODE, PEER_A2)]
    client = TrackerClient(
        clock, "http://tracker.invalid:49200/base/", lambda: regs, lambda: (4000, 4001),
        lambda *a: None, agent=agent,
    )
    client.startService()
    clock.advance(0)
    [request] = agent.requests
    assert request["path"] == "/base/clearskies/track"
    assert request["query"] == {
        "tcp_port": ["4000"], "utp_port": ["4001"], "fast_track": ["1"],
        "id": [SHARE + "@" + PEER_A, CODE + "@" + PEER_A2],
    }
    assert b"%40" in request["uri"]


def test_nothing_registered_means_no_request() -> None:
    """With no IDs (or no listening port) the client never contacts the tracker."""
    clock = Clock()
    agent = FakeAgent(clock, lambda r: Deferred())
    client, _peers, regs = make_client(clock, agent, registrations=[])
    client.startService()
    clock.advance(1000)
    assert agent.requests == []
    regs.append((SHARE, PEER_A))
    client.refresh()
    clock.advance(0)
    assert len(agent.requests) == 1


def test_backoff_grows_when_tracker_is_down() -> None:
    """Refused connections are retried at 2, 4, 8 … s, capped at 600 s, never faster."""
    clock = Clock()
    agent = FakeAgent(clock, lambda r: fail(ConnectionRefusedError()))
    client, _peers, _regs = make_client(clock, agent)
    client.startService()
    for _ in range(3000):
        clock.advance(1)  # a second at a time, so an early retry would show
    times = [r["time"] for r in agent.requests]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert gaps[:9] == [2, 4, 8, 16, 32, 64, 128, 256, 512]
    assert gaps[9:] == [600, 600, 600]
    assert client.failures == len(times)
    assert not client.registered


def test_poll_renews_at_fraction_of_ttl_and_resets_backoff() -> None:
    """A plain answer is re-requested at 0.8 × ttl; a success after failures resets the back-off."""
    clock = Clock()
    outcomes = [fail(ConnectionRefusedError()), fail(ConnectionRefusedError())]

    def respond(record: dict) -> Deferred:
        if outcomes:
            return outcomes.pop(0)
        return answer(clock, {"your_ip": "192.0.2.7", "others": {SHARE: []}, "ttl": 100})

    agent = FakeAgent(clock, respond)
    client, peers, _regs = make_client(clock, agent, fast_track=False)
    client.startService()
    clock.advance(0)
    clock.advance(2)
    clock.advance(4)
    assert len(agent.requests) == 3 and client.registered and client.failures == 0
    assert client.your_ip == "192.0.2.7"
    assert peers == [(SHARE, [])]
    clock.advance(79)
    assert len(agent.requests) == 3
    clock.advance(1)
    assert len(agent.requests) == 4
    assert [r["time"] for r in agent.requests] == [0, 2, 6, 86]
    assert all("fast_track" not in r["query"] for r in agent.requests)


def test_ids_a_full_tracker_did_not_register_are_logged_once() -> None:
    """A 200 naming IDs it did not register keeps the client registered, its peers delivered, one warning."""
    clock = Clock()
    refusal = {"ids": [CODE + "@" + PEER_A], "reason": "the tracker is full; try again later"}
    documents = [
        {"your_ip": "192.0.2.7", "others": {SHARE: [entry(PEER_B, 1)], CODE: []}, "ttl": 100,
         "not_registered": refusal},
    ] * 3 + [{"your_ip": "192.0.2.7", "others": {SHARE: [], CODE: []}, "ttl": 100}]

    def respond(record: dict) -> Deferred:
        return answer(clock, documents.pop(0))

    agent = FakeAgent(clock, respond)
    client, peers, _regs = make_client(
        clock, agent, registrations=[(SHARE, PEER_A), (CODE, PEER_A)], fast_track=False
    )
    with capturedLogs() as events:
        client.startService()
        clock.advance(0)
        for _ in range(3):
            clock.advance(80)
    assert len(agent.requests) == 4 and client.registered and client.failures == 0
    assert peers[0] == (SHARE, [(PEER_B, Address("tcp", "10.0.0.2", 1))])
    said = [formatEvent(e) for e in events if "did not register" in formatEvent(e)]
    assert len(said) == 1 and "1 of our IDs (the tracker is full" in said[0], said
    assert any("registers all our IDs again" in formatEvent(e) for e in events)


def test_others_are_parsed_filtered_and_bounded() -> None:
    """Own peer IDs, duplicates, unknown transports and garbage are dropped; entries are capped."""
    clock = Clock()
    others = {
        SHARE: [
            entry(PEER_B, 4001),
            entry(PEER_B, 4001),
            PEER_B + "@utp:10.0.0.2:4002",
            PEER_B + "@quic:10.0.0.2:4003",
            entry(PEER_A, 4000),
            entry(PEER_A2, 4000),
            "garbage",
            17,
            entry(PEER_C, 5000, "[fd00::5]"),
        ],
        "f" * 64: [entry(PEER_C, 1)],  # an ID we did not ask about
    }
    agent = FakeAgent(clock, lambda r: answer(clock, {"others": others, "ttl": 300}))
    client, peers, _regs = make_client(
        clock, agent, registrations=[(SHARE, PEER_A), (CODE, PEER_A2)], fast_track=False
    )
    client.startService()
    clock.advance(0)
    assert peers == [
        (SHARE, [
            (PEER_B, Address("tcp", "10.0.0.2", 4001)),
            (PEER_B, Address("utp", "10.0.0.2", 4002)),
            (PEER_C, Address("tcp", "fd00::5", 5000)),
        ])
    ]

    clock2 = Clock()
    many = {SHARE: [entry("%032x" % n, 1000 + n) for n in range(50)]}
    agent2 = FakeAgent(clock2, lambda r: answer(clock2, {"others": many, "ttl": 300}))
    client2, peers2, _ = make_client(clock2, agent2, fast_track=False, max_entries=10)
    client2.startService()
    clock2.advance(0)
    assert len(peers2[0][1]) == 10


def test_refresh_registers_again_at_once() -> None:
    """refresh() sends a new registration with the current IDs without waiting for the ttl."""
    clock = Clock()
    agent = FakeAgent(clock, lambda r: answer(clock, {"others": {}, "ttl": 300}))
    client, _peers, regs = make_client(clock, agent, fast_track=False)
    client.startService()
    clock.advance(0)
    clock.advance(5)
    regs.append((CODE, PEER_A2))
    client.refresh()
    client.refresh()  # two calls in a row make one request
    clock.advance(0)
    assert len(agent.requests) == 2
    assert agent.requests[1]["query"]["id"] == [SHARE + "@" + PEER_A, CODE + "@" + PEER_A2]
    client.refresh()
    clock.advance(0)
    assert len(agent.requests) == 2  # too soon after the last one
    clock.advance(MIN_REQUEST_GAP)
    assert len(agent.requests) == 3


def test_refresh_during_a_request_is_not_pushed_back_by_its_answer() -> None:
    """A code added while the first request is in flight is registered a second later, not at the ttl."""
    clock = Clock()
    pending: list[Deferred] = []
    agent = FakeAgent(clock, lambda r: pending.append(Deferred()) or pending[-1])
    client, _peers, regs = make_client(clock, agent, fast_track=False)
    client.startService()
    clock.advance(0)
    regs.append((CODE, PEER_A2))
    client.refresh()  # too soon after the first request: due in MIN_REQUEST_GAP
    response = FakeResponse(clock)
    pending[0].callback(response)
    response.send(json.dumps({"others": {}, "ttl": 300}).encode())
    response.finish()
    clock.advance(MIN_REQUEST_GAP)
    assert len(agent.requests) == 2
    assert agent.requests[1]["query"]["id"] == [SHARE + "@" + PEER_A, CODE + "@" + PEER_A2]


def test_falls_back_to_polling_when_no_stream() -> None:
    """A multi-line JSON document in answer to fast_track=1 is read whole; later requests poll."""
    clock = Clock()
    pretty = json.dumps({"others": {SHARE: [entry(PEER_B, 4001)]}, "ttl": 50}, indent=2).encode()
    agent = FakeAgent(clock, lambda r: answer(clock, pretty))
    client, peers, _regs = make_client(clock, agent)
    client.startService()
    clock.advance(0)
    assert peers == [(SHARE, [(PEER_B, Address("tcp", "10.0.0.2", 4001))])]
    assert client.registered and not client.streaming
    clock.advance(40)
    assert [("fast_track" in r["query"]) for r in agent.requests] == [True, False]
    clock.advance(STREAM_RETRY_AFTER)
    assert agent.requests[-1]["query"].get("fast_track") == ["1"]


def started_stream_client() -> tuple[Clock, FakeAgent, Any, list[FakeResponse], list]:
    """A started client whose every request gets an open response the test feeds;
    the last item collects what it reports (share ID, peers)."""
    clock = Clock()
    responses: list[FakeResponse] = []

    def respond(record: dict) -> Deferred:
        response = FakeResponse(clock)
        responses.append(response)
        return succeed(response)

    agent = FakeAgent(clock, respond)
    client, peers, _regs = make_client(clock, agent)
    client.startService()
    clock.advance(0)
    return clock, agent, client, responses, peers


def test_stream_updates_and_silence() -> None:
    """A fast_track stream delivers updates as they come and is reopened after `timeout` s of silence."""
    clock, agent, client, responses, peers = started_stream_client()
    stream = responses[0]
    stream.send(b'{"your_ip":"127.0.0.1","others":{"%s":[]},"ttl":300,"timeout":20}\n' % SHARE.encode())
    assert client.streaming and client.registered and peers == [(SHARE, [])]
    stream.send(b'{}\n{"others":{"%s":["%s"]}}\n' % (SHARE.encode(), entry(PEER_B, 4001).encode()))
    assert peers[-1] == (SHARE, [(PEER_B, Address("tcp", "10.0.0.2", 4001))])
    for _ in range(5):
        clock.advance(15)
        stream.send(b"{}\n")  # keep-alives keep it open
    assert len(agent.requests) == 1
    clock.advance(20)
    assert stream.transport.stopped
    clock.advance(0)
    assert len(agent.requests) == 2 and agent.requests[1]["query"]["fast_track"] == ["1"]


def test_stream_is_reopened_before_ttl() -> None:
    """An open stream is replaced by a fresh registration at 0.8 × ttl."""
    clock, agent, client, responses, _ = started_stream_client()
    responses[0].send(b'{"others":{},"ttl":100,"timeout":1000}\n')
    clock.advance(79)
    assert len(agent.requests) == 1
    clock.advance(1)
    assert len(agent.requests) == 2 and responses[0].transport.stopped


def test_timeouts_bounds_and_errors_back_off() -> None:
    """No answer in time, an oversized body, an HTTP error and a garbled stream each count as failures."""
    clock = Clock()
    plan = [
        lambda: Deferred(),  # never answers
        lambda: answer(clock, b"x" * 2000),  # over max_body
        lambda: answer(clock, b'{"others":{},"ttl":9,"timeout":9}\nnot json\n'),
        lambda: answer(clock, b"tracker full", code=503),
        lambda: answer(clock, b"[1, 2]"),
    ]
    agent = FakeAgent(clock, lambda r: plan.pop(0)())
    client, _peers, _regs = make_client(
        clock, agent, retry_policy=lambda n: 1.0, request_timeout=10.0, max_body=1000
    )
    client.startService()
    clock.advance(0)
    clock.advance(10)  # the first request times out
    assert client.failures == 1
    for _ in range(4):
        clock.advance(1)
    # The garbled stream's good first line reset the count before its bad second line.
    assert client.failures == 3 and len(agent.requests) == 5
    assert [r["time"] for r in agent.requests] == [0, 11, 12, 13, 14]
    # The 503 came in answer to fast_track=1, so the request after it polls.
    assert agent.requests[3]["query"]["fast_track"] == ["1"]
    assert "fast_track" not in agent.requests[4]["query"]


def test_stop_closes_open_stream() -> None:
    """stopService closes the open stream and sends nothing afterwards."""
    clock, agent, client, responses, _ = started_stream_client()
    responses[0].send(b'{"others":{},"ttl":100,"timeout":30}\n')
    stopped = client.stopService()
    assert responses[0].transport.stopped
    clock.advance(0)
    assert stopped.called
    clock.advance(10_000)
    assert len(agent.requests) == 1


# -- against the real tracker on 127.0.0.1 ---------------------------------------


class _Tracker:
    """The real tracker site on 127.0.0.1, with a way to drop every open connection."""

    def __init__(self, port: int = 0, ttl: int = 300) -> None:
        self.registry = Registry(ttl=ttl)
        self.site = make_site(self.registry, reactor, stream_timeout=30)
        self.protocols: list = []
        build = self.site.buildProtocol

        def remember(addr):
            protocol = build(addr)
            self.protocols.append(protocol)
            return protocol

        self.site.buildProtocol = remember
        self.port = reactor.listenTCP(port, self.site, interface="127.0.0.1")
        self.url = "http://127.0.0.1:%d" % (self.port.getHost().port,)

    async def stop(self) -> None:
        await self.port.stopListening()
        for protocol in self.protocols:
            if protocol.transport is not None:
                protocol.transport.abortConnection()
        await deferLater(reactor, 0.05, lambda: None)


class TrackerIntegrationTests(TestCase):
    """TrackerClient against clearskies.tracker.web over real loopback HTTP."""

    timeout = 15

    def _client(self, url: str, peer: str, tcp_port: int, **kwargs) -> tuple[TrackerClient, list]:
        found: list[tuple[str, list]] = []
        client = TrackerClient(
            reactor, url, lambda: [(SHARE, peer)], lambda: (tcp_port, None),
            lambda target, peers: found.append((target, peers)), **kwargs,
        )
        client.startService()
        self.addCleanup(client.stopService)
        return client, found

    async def _until(self, condition: Callable[[], bool]) -> None:
        for _ in range(200):
            if condition():
                return
            await deferLater(reactor, 0.02, lambda: None)
        raise AssertionError("condition not reached in 4 s")

    @async_test
    async def test_plain_registration_returns_others(self) -> None:
        """A polling registration stores us at the tracker and returns the peers already there."""
        tracker = _Tracker()
        self.addCleanup(lambda: Deferred.fromCoroutine(tracker.stop()))
        tracker.registry.register([(SHARE, PEER_B)], "127.0.0.1", 4001, None, reactor.seconds())
        client, found = self._client(tracker.url, PEER_A, 4000, fast_track=False)
        await self._until(lambda: found)
        assert found == [(SHARE, [(PEER_B, Address("tcp", "127.0.0.1", 4001))])]
        assert client.registered and not client.streaming
        assert client.your_ip == "127.0.0.1"
        assert tracker.registry.others(SHARE, [PEER_B]) == [PEER_A + "@tcp:127.0.0.1:4000"]

    @async_test
    async def test_fast_track_delivers_arrival(self) -> None:
        """With fast_track, a peer that registers later reaches us over the open stream."""
        tracker = _Tracker()
        self.addCleanup(lambda: Deferred.fromCoroutine(tracker.stop()))
        client_a, found_a = self._client(tracker.url, PEER_A, 4000)
        await self._until(lambda: client_a.streaming)
        assert found_a == [(SHARE, [])]
        client_b, found_b = self._client(tracker.url, PEER_B, 4001)
        await self._until(lambda: len(found_a) >= 2)
        assert found_a[-1] == (SHARE, [(PEER_B, Address("tcp", "127.0.0.1", 4001))])
        assert found_b[0] == (SHARE, [(PEER_A, Address("tcp", "127.0.0.1", 4000))])
        assert tracker.registry.stats()["streams"] == 2

    @async_test
    async def test_tracker_restart_reregisters(self) -> None:
        """When the tracker restarts with an empty table, the client registers there again."""
        tracker = _Tracker()
        client, found = self._client(
            tracker.url, PEER_A, 4000, retry_policy=lambda attempt: 0.1
        )
        await self._until(lambda: client.streaming)
        port = tracker.port.getHost().port
        await tracker.stop()
        await self._until(lambda: client.failures >= 2)
        assert not client.registered
        restarted = _Tracker(port)
        self.addCleanup(lambda: Deferred.fromCoroutine(restarted.stop()))
        await self._until(lambda: client.streaming)
        assert restarted.registry.others(SHARE) == [PEER_A + "@tcp:127.0.0.1:4000"]
        assert client.failures == 0

    @async_test
    async def test_polling_tracker_resource(self) -> None:
        """A tracker that ignores fast_track and answers one indented document is polled."""

        class OldTracker(Resource):
            isLeaf = True
            seen: list = []

            def render_GET(self, request):
                self.seen.append(dict(request.args))
                body = {"your_ip": "127.0.0.1", "others": {SHARE: [entry(PEER_B, 4001, "127.0.0.1")]}, "ttl": 30}
                return json.dumps(body, indent=1).encode()
        root = Resource()
        clearskies = Resource()
        old = OldTracker()
        clearskies.putChild(b"track", old)
        root.putChild(b"clearskies", clearskies)
        port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client, found = self._client("http://127.0.0.1:%d" % port.getHost().port, PEER_A, 4000)
        await self._until(lambda: found)
        assert found == [(SHARE, [(PEER_B, Address("tcp", "127.0.0.1", 4001))])]
        assert old.seen[0][b"fast_track"] == [b"1"]
        assert old.seen[0][b"id"] == [(SHARE + "@" + PEER_A).encode()]
        assert client.registered and not client.streaming

    @async_test
    async def test_onion_only_peer_is_found_at_its_onion_address(self) -> None:
        """A client with no TCP port registers its onion address; another client is told it."""

        name = onion_name(b"integration")
        tracker = _Tracker()
        self.addCleanup(lambda: Deferred.fromCoroutine(tracker.stop()))
        onion_only = TrackerClient(
            reactor, tracker.url, lambda: [(SHARE, PEER_A)], lambda: (None, None),
            lambda *a: None, extra_addresses=lambda: [Address("tor", name + ".onion", 60106)])
        onion_only.startService()
        self.addCleanup(onion_only.stopService)
        await self._until(lambda: onion_only.registered)
        _client, found = self._client(tracker.url, PEER_B, 4001, fast_track=False)
        await self._until(lambda: found)
        assert found == [(SHARE, [(PEER_A, Address("tor", name + ".onion", 60106))])]


# -- extension: onion addresses (Clock-driven) ------------------------------------------


def test_request_carries_onion_addresses_as_tor_parameters() -> None:
    """extra_addresses' tor ones (deduplicated, at most 4) go out as tor=; others are not sent."""

    names = [onion_name(b"%d" % i) for i in range(6)]
    extra = [Address("tor", names[0] + ".onion", 60106), Address("tcp", "10.0.0.9", 5000),
             Address("tor", names[0] + ".onion", 60106)]
    extra += [Address("tor", n + ".onion", 1) for n in names[1:]]
    clock = Clock()
    agent = FakeAgent(clock, lambda r: Deferred())
    client, _peers, _regs = make_client(clock, agent, extra_addresses=lambda: extra)
    client.startService()
    clock.advance(0)
    [request] = agent.requests
    assert request["query"]["tcp_port"] == ["4000"]
    assert request["query"]["tor"] == [names[0] + ".onion:60106"] + [
        n + ".onion:1" for n in names[1:4]]


def test_onion_only_request_has_no_tcp_port_and_waits_for_the_onion() -> None:
    """With no TCP port, nothing is sent until an onion address exists; then no tcp_port."""

    name = onion_name(b"later")
    onions: list[Address] = []
    clock = Clock()
    agent = FakeAgent(clock, lambda r: Deferred())
    client = TrackerClient(clock, "http://tracker.invalid/", lambda: [(SHARE, PEER_A)],
                           lambda: (None, None), lambda *a: None, agent=agent,
                           extra_addresses=lambda: onions)
    client.startService()
    clock.advance(1000)
    assert agent.requests == []
    onions.append(Address("tor", name + ".onion", 60106))
    client.refresh()
    clock.advance(0)
    [request] = agent.requests
    assert "tcp_port" not in request["query"]
    assert request["query"]["tor"] == [name + ".onion:60106"]


def test_answer_built_to_amplify_is_a_failure_parsed_cheaply() -> None:
    """An answer of half a megabyte of [] is refused before parsing, as a failed request."""
    import time
    clock = Clock()
    hostile = b'{"ttl":30,"others":{},"x":[' + b"[]," * 170_000 + b"[]]}"
    agent = FakeAgent(clock, lambda r: answer(clock, hostile))
    client, peers, _regs = make_client(clock, agent, retry_policy=lambda n: 1.0)
    started = time.perf_counter()
    client.startService()
    clock.advance(0)
    elapsed = time.perf_counter() - started
    assert client.failures == 1 and peers == []
    # Parsing it whole: 170,000 lists, about 12 MB and tens of milliseconds.
    assert elapsed < 0.05, elapsed
