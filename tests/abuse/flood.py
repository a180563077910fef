"""Handshake floods against a real daemon, and a legitimate peer that tries to get through.

Used by ``tests/abuse/test_admission.py`` and ``bench/abuse_admission.py``.
Everything runs on the caller's reactor and talks to 127.0.0.1 only; each
attacker has its own loopback source address (127.0.1.x, 127.0.2.x, …,
which Linux routes to ``lo`` without setup) and holds ``per_address``
connections, reconnecting as soon as one is closed:

- ``idle``: connects and never sends a byte;
- ``slowloris``: sends a well-formed ``start`` line one byte per second;
- ``tls_stall``: sends ``start`` naming the share (so the daemon starts TLS)
  and then nothing, as an attacker who learned the share ID would.

The legitimate peer runs the real handshake (``connect_peer``, TLS with the
share's PSK) from 127.0.0.1, retrying a refused or dropped attempt until its
bound runs out.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

from clearskies.handshake import ConnectTarget, MemoryKeyRing
from clearskies.keys import ShareKeys
from clearskies.peer import connect_peer
from clearskies.wire import encode
from tests.fakes import QuietSession

LEGIT_HOST = "127.0.0.1"


def attacker_host(n: int) -> str:
    """The source address of attacker ``n`` (never 127.0.0.1)."""
    return "127.0.%d.%d" % (1 + n // 250, 1 + n % 250)


class _Attacker(Protocol):
    def __init__(self, flood: Flood, mode: str, host: str) -> None:
        self.flood = flood
        self.mode = mode
        self.host = host
        self.line = encode({"type": "start", "software": "slow", "protocol": 1, "features": [],
                            "id": flood.share_id, "access": "read_write", "peer": "cd" * 16})
        self.sent = 0
        self.call: Any = None

    def connectionMade(self) -> None:
        self.flood.open += 1
        self.flood.transports.add(self.transport)
        if self.mode == "slowloris":
            self.call = self.flood.reactor.callLater(0.0, self._drip)
        elif self.mode == "tls_stall":
            self.transport.write(self.line)

    def _drip(self) -> None:
        if self.sent < len(self.line):
            self.transport.write(self.line[self.sent:self.sent + 1])
            self.sent += 1
            self.call = self.flood.reactor.callLater(1.0, self._drip)

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Any = None) -> None:
        self.flood.open -= 1
        self.flood.dropped += 1
        self.flood.transports.discard(self.transport)
        if self.call is not None and self.call.active():
            self.call.cancel()
        self.flood.reconnect(self.host, self.flood.reconnect_delay)


@dataclass
class Flood:
    """``addresses`` × ``per_address`` attacking connections, kept up until ``stop``."""

    reactor: Any
    port: int
    addresses: int = 64
    per_address: int = 1
    mode: str = "idle"
    reconnect_delay: float = 0.05
    share_id: str = "ab" * 32
    open: int = 0
    dropped: int = 0
    connects: int = 0
    transports: set[Any] = field(default_factory=set)
    _running: bool = False
    _pending: set[Any] = field(default_factory=set)

    def start(self) -> None:
        self._running = True
        for n in range(self.addresses):
            for _ in range(self.per_address):
                self._connect(attacker_host(n))

    def _connect(self, host: str) -> None:
        if not self._running:
            return
        self.connects += 1
        endpoint = TCP4ClientEndpoint(self.reactor, "127.0.0.1", self.port, timeout=5,
                                      bindAddress=(host, 0))
        done = endpoint.connect(Factory.forProtocol(lambda: _Attacker(self, self.mode, host)))
        self._pending.add(done)

        def settled(result: Any) -> None:
            self._pending.discard(done)
            if isinstance(result, Failure):
                self.reconnect(host, max(self.reconnect_delay, 0.2))
        done.addBoth(settled)

    def reconnect(self, host: str, delay: float) -> None:
        if self._running:
            call = self.reactor.callLater(delay, self._run_later, host)
            self._pending.add(call)

    def _run_later(self, host: str) -> None:
        self._pending = {p for p in self._pending if not (hasattr(p, "active") and not p.active())}
        self._connect(host)

    async def stop(self) -> None:
        """Stop reconnecting, close every attacking connection and wait until they are gone."""
        self._running = False
        for pending in list(self._pending):
            if isinstance(pending, Deferred):
                pending.cancel()
            elif pending.active():
                pending.cancel()
        self._pending.clear()
        for transport in list(self.transports):
            transport.abortConnection()
        for _ in range(200):
            if not self.transports and self.open <= 0:
                break
            await sleep(self.reactor, 0.01)


async def sleep(reactor: Any, seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


async def legit_connect(reactor: Any, port: int, keys: ShareKeys, bound: float,
                        host: str = LEGIT_HOST, seed: int = 0) -> tuple[float | None, int]:
    """Connect with the share's keys from ``host``, retrying until ``bound`` seconds.

    Returns (seconds to an established session or None, attempts made).
    """
    peer_id = "%032x" % random.Random(seed).getrandbits(128)
    ring = MemoryKeyRing(time.time)
    ring.add_share(keys, peer_id)
    began = time.monotonic()
    attempts = 0
    while time.monotonic() - began < bound:
        attempts += 1
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=bound,
                                      bindAddress=(host, 0))
        attempt: Deferred = connect_peer(reactor, endpoint, ConnectTarget.share(keys, peer_id),
                                         ring, "legit", QuietSession)
        timer = reactor.callLater(max(0.01, bound - (time.monotonic() - began)), attempt.cancel)
        try:
            connection = await attempt
        except Exception:
            await sleep(reactor, 0.1)
            continue
        finally:
            if timer.active():
                timer.cancel()
        elapsed = time.monotonic() - began
        connection.close("done", quiet=True)
        return elapsed, attempts
    return None, attempts


class _Failing(Protocol):
    """Sends one line the daemon refuses and records the answer."""

    def __init__(self, line: bytes) -> None:
        self.line = line
        self.received = bytearray()
        self.lost: Deferred = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.line)

    def dataReceived(self, data: bytes) -> None:
        self.received.extend(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.callback(None)


async def fail_handshakes(reactor: Any, port: int, host: str, count: int,
                          bogus_id: str) -> int:
    """Make ``count`` handshakes from ``host`` fail: ``start`` for an ID the daemon does not
    hold, alternating with garbage; returns how many were answered with cannot_start."""
    start = encode({"type": "start", "software": "x", "protocol": 1, "features": [],
                    "id": bogus_id, "access": "unknown", "peer": "ef" * 16})
    refusals = 0
    for n in range(count):
        protocol = _Failing(b"GET / HTTP/1.0\r\n\r\n" if n % 2 else start)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5,
                                      bindAddress=(host, 0))
        await endpoint.connect(Factory.forProtocol(lambda p=protocol: p))
        await protocol.lost
        if b"cannot_start" in protocol.received:
            refusals += 1
    return refusals
