"""Peer connections: the Twisted side of the handshake, then keep-alive.

:class:`PeerProtocol` feeds received bytes into a :class:`~clearskies.wire.WireDecoder`,
hands messages to the pure :class:`~clearskies.handshake.Handshake` machine and
carries out its actions (write, switch to TLS, wait for the share to be
created, close).  Once the handshake is done it calls
``session_factory(connection)`` and from then on forwards every wire event
except ``ping`` to ``session.event_received``.

Protection of the listening side (``protocol/handshake.md``): a handshake
must finish within ``handshake_timeout`` seconds; handshake messages may be
at most ``HANDSHAKE_MAX_LINE`` bytes and ``HANDSHAKE_MAX_ITEMS`` JSON values,
and the first byte a client sends must open a JSON message;
:class:`~clearskies.admission.Admission` decides which unauthenticated
connections hold one of ``max_unauthenticated`` slots and when they time out
(sooner under pressure); a share or access ID whose handshakes keep failing
from one address is refused at its ``start`` for an exponentially growing
time (:class:`FailureLimiter`), which never touches that address's other
IDs.  Any protocol error closes only the connection that carried it, with
the reason logged.  Outgoing connections are not subject to admission.
After the handshake each message may hold what its type needs
(:data:`~clearskies.wire.SESSION_TYPE_LIMITS`), and no line may cost more to
parse than :data:`~clearskies.wire.MAX_ITEMS` values.
"""

from __future__ import annotations

import re
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Protocol as TypingProtocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IAddress, IDelayedCall, IHandshakeListener, IReactorTime, IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from clearskies import SOFTWARE
from clearskies.admission import CAPACITY, Admission
from clearskies.errors import ConfigurationError, HandshakeError, ProtocolError
from clearskies.handshake import (
    AwaitShare,
    Close,
    ConnectTarget,
    Done,
    Established,
    Handshake,
    KeyRing,
    Send,
    StartTLS,
)
from clearskies.compressing import CompressedTransport
from clearskies.compression import FrameDecoder, FrameEncoder, SendPolicy, choose
from clearskies.tls import psk_client_creator, psk_server_creator
from clearskies.wire import SESSION_TYPE_LIMITS, Event, Message, WireDecoder, encode

__all__ = [
    "HANDSHAKE_TIMEOUT", "PING_TIMEOUT", "HANDSHAKE_MAX_LINE", "HANDSHAKE_MAX_ITEMS",
    "MAX_UNAUTHENTICATED",
    "Session", "SessionFactory", "FailureLimiter", "PeerSettings",
    "PeerProtocol", "PeerServerFactory", "PeerClientFactory", "connect_peer",
]

HANDSHAKE_TIMEOUT = 20.0
"""Seconds a connection may take from accept/connect to an established session."""

PING_TIMEOUT = 60
"""Our keep-alive period in seconds, announced in every ping."""

IDLE_FACTOR = 1.1
"""A connection silent for this many times the larger timeout is dropped."""

MAX_PING_TIMEOUT = 3600
"""A peer's announced timeout is capped at this (a dead peer must not linger for days)."""

HANDSHAKE_MAX_LINE = 256 * 1024
"""Longest line accepted before the handshake is done (the keys message is a few KiB)."""

HANDSHAKE_MAX_ITEMS = 1024
"""JSON values a handshake message may hold (``greeting`` lists at most 64 features)."""

MAX_UNAUTHENTICATED = CAPACITY
"""Unauthenticated connections allowed at once, per listening factory."""

_ID_RE = re.compile(r"[0-9a-f]{64}")

CLOSE_GRACE = 10.0
"""Seconds a closing connection may take to flush before it is aborted."""


class Session(TypingProtocol):
    """What ``session_factory`` returns: receives the established connection's traffic."""

    def event_received(self, event: Event) -> None:
        """One wire event (message, payload chunk, payload end); may raise ProtocolError."""

    def connection_lost(self, reason: str) -> None:
        """The connection is gone; ``reason`` says why."""


SessionFactory = Callable[["PeerProtocol"], Session]


# -- failed-handshake back-off ---------------------------------------------------


@dataclass
class _Record:
    failures: deque[float]
    strikes: int = 0
    blocked_until: float = 0.0


class FailureLimiter:
    """Exponential back-off for failed handshakes, per key.

    The listener's key is (source address, the ID named in ``start``), so a
    dead access code blocks only its own retries, never the address's other
    shares.  ``threshold`` failures within ``window`` seconds block the key
    for ``base_delay`` seconds; every further failure while the earlier ones
    are still in the window doubles the block, up to ``max_delay``.  A whole
    window without failures forgets the key's strikes.  At most
    ``max_addresses`` keys are tracked (the least recently failing are
    forgotten first), so memory stays bounded under a spray of sources.
    """

    def __init__(
        self,
        clock: IReactorTime,
        threshold: int = 5,
        window: float = 60.0,
        base_delay: float = 10.0,
        max_delay: float = 3600.0,
        max_addresses: int = 4096,
    ) -> None:
        self._clock = clock
        self._threshold = threshold
        self._window = window
        self._base = base_delay
        self._max_delay = max_delay
        self._max_addresses = max_addresses
        self._records: OrderedDict[Hashable, _Record] = OrderedDict()

    def blocked(self, address: Hashable) -> bool:
        """Whether handshakes for ``address`` (a key) are refused right now."""
        record = self._records.get(address)
        return record is not None and self._clock.seconds() < record.blocked_until

    def blocked_for(self, address: Hashable) -> float:
        """Seconds until ``address`` is accepted again (0 if it is)."""
        record = self._records.get(address)
        if record is None:
            return 0.0
        return max(0.0, record.blocked_until - self._clock.seconds())

    def failed(self, address: Hashable) -> None:
        """Count one failed handshake from ``address``."""
        now = self._clock.seconds()
        record = self._records.get(address)
        if record is None:
            record = self._records[address] = _Record(deque(maxlen=self._threshold))
        self._records.move_to_end(address)
        while record.failures and record.failures[0] <= now - self._window:
            record.failures.popleft()
        if not record.failures and now >= record.blocked_until:
            record.strikes = 0
        record.failures.append(now)
        if len(record.failures) >= self._threshold:
            record.strikes += 1
            delay = min(self._base * 2 ** (record.strikes - 1), self._max_delay)
            record.blocked_until = now + delay
        while len(self._records) > self._max_addresses:
            self._records.popitem(last=False)


# -- settings shared by both factories --------------------------------------------------


@dataclass
class PeerSettings:
    """Everything a PeerProtocol needs that does not change per connection."""

    clock: IReactorTime
    keyring: KeyRing
    name: str
    session_factory: SessionFactory
    software: str = SOFTWARE
    features: tuple[str, ...] = ()
    handshake_timeout: float = HANDSHAKE_TIMEOUT
    ping_timeout: int = PING_TIMEOUT
    tls_options: dict[str, Any] = field(default_factory=dict)
    """Narrowing options for :mod:`clearskies.tls` creators (tests pin versions)."""


def _describe(address: IAddress | None) -> str:
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is None:
        return str(address)
    return "[{}]:{}".format(host, port) if ":" in host else "{}:{}".format(host, port)


def _host(address: IAddress | None) -> str:
    host = getattr(address, "host", None)
    return host if isinstance(host, str) else str(address)


def _failure_text(reason: Failure) -> str:
    message = reason.getErrorMessage()
    name = reason.type.__name__ if isinstance(reason.type, type) else str(reason.type)
    return "{}: {}".format(name, message) if message else name


# -- the protocol -------------------------------------------------------------------------


@implementer(IHandshakeListener)
class PeerProtocol(Protocol):
    """One connection with another peer, from TCP connect to close.

    After the handshake, a session uses: :attr:`established`,
    :meth:`send_message`, :meth:`send_bytes`, :attr:`transport` (to register a
    producer for file data) and :meth:`close`.
    """

    _log = Logger()

    def __init__(
        self,
        settings: PeerSettings,
        target: ConnectTarget | None = None,
        owner: Any = None,
    ) -> None:
        self._settings = settings
        self._clock = settings.clock
        self._target = target
        self._owner = owner  # the factory, told when the handshake ends
        self._server = target is None
        if self._server:
            self._machine = Handshake.server(
                settings.keyring, settings.name,
                software=settings.software, features=settings.features)
        else:
            assert target is not None
            self._machine = Handshake.client(
                settings.keyring, target, settings.name,
                software=settings.software, features=settings.features)
        self._decoder = WireDecoder(
            max_line_length=HANDSHAKE_MAX_LINE, max_items=HANDSHAKE_MAX_ITEMS)
        self.established: Established | None = None
        self.session: Session | None = None
        self.peer_address = "?"
        self.source_host = ""  # set by the server factory: the key for back-off
        self.presented_id: str | None = None
        """The share or access ID a client named in ``start`` (server side)."""
        self.counts_as_failure = True
        """False when the listener itself ended the handshake (eviction, a blocked ID)."""
        self._tls_started = False
        self._proven = False
        self._paused = False
        self._closing = False
        self._quiet = False
        self._close_reason: str | None = None
        # The handshake error that closed us (its type and reason reach the dialler).
        self._handshake_error: HandshakeError | None = None
        self._handshake_reported = False
        self._deadline: IDelayedCall | None = None
        self._ping_call: IDelayedCall | None = None
        self._idle_call: IDelayedCall | None = None
        self._abort_call: IDelayedCall | None = None
        self._their_ping_timeout = 0
        self._last_received = 0.0
        self.when_established: Deferred[PeerProtocol] = Deferred()
        self.message_writer: Callable[[bytes], None] | None = None
        # With a negotiated compression (protocol/gzip.md), from the switch to TLS on.
        self.compression: str | None = None
        self._frames: FrameDecoder | None = None
        self._compressed: CompressedTransport | None = None
        self._inflate_call: IDelayedCall | None = None

    # -- Twisted entry points --------------------------------------------------------

    def connectionMade(self) -> None:
        self.peer_address = _describe(self.transport.getPeer())
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            # Requests and replies are small and pipelined: Nagle's algorithm
            # (with delayed ACKs) would hold each for tens of milliseconds.
            set_no_delay(True)
        self._last_received = self._clock.seconds()
        self._deadline = self._clock.callLater(
            self._settings.handshake_timeout, self._handshake_timed_out)
        self._guarded(lambda: self._run(self._machine.begin(self._clock.seconds())))

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        self._last_received = self._clock.seconds()
        self._guarded(lambda: self._feed(data))

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        for call in (self._deadline, self._ping_call, self._idle_call, self._abort_call,
                     self._inflate_call):
            if call is not None and call.active():
                call.cancel()
        why = self._close_reason or "connection lost: {}".format(_failure_text(reason))
        self._closing = True
        if self.established is not None:
            if self._close_reason is None:
                self._log.info("connection with {peer} ended: {reason}",
                               peer=self.peer_address, reason=why)
            if self._compressed is not None and self._frames is not None:
                sent = self._compressed.encoder
                self._log.info(
                    "{codec} on the connection with {peer}: sent {sent_in} bytes as {sent_out} "
                    "({how}), received {received_in} bytes as {received_out}",
                    codec=self.compression, how=self._compressed.describe(),
                    peer=self.peer_address, sent_in=sent.bytes_in, sent_out=sent.bytes_out,
                    received_in=self._frames.bytes_out, received_out=self._frames.bytes_in)
            session, self.session = self.session, None
            if session is not None:
                try:
                    session.connection_lost(why)
                except Exception:
                    self._log.failure("session for {peer} failed in connection_lost",
                                      peer=self.peer_address)
        else:
            if self._close_reason is None:
                self._log.warn("handshake with {peer} failed: {reason}",
                               peer=self.peer_address, reason=why)
            self._report_handshake(success=False)
        if not self.when_established.called:
            self.when_established.errback(self._handshake_error or HandshakeError(why))
        closed = getattr(self._owner, "connection_closed", None)
        if closed is not None:
            closed(self)

    # -- sending ------------------------------------------------------------------------

    def send_message(self, body: dict[str, Any]) -> None:
        """Write one JSON message (no payload, unsigned).

        Once a session sets ``message_writer`` (its send queue), messages go
        through it, so a keep-alive never lands inside a file's payload.
        """
        if not self._closing:
            data = encode(body)
            if self.message_writer is not None:
                self.message_writer(data)
            else:
                self.transport.write(data)

    def send_bytes(self, data: bytes) -> None:
        """Write pre-encoded wire bytes (payload chunks, signed messages)."""
        if not self._closing:
            # The TLS layer refuses memoryview; hand it bytes.
            self.transport.write(data if type(data) is bytes else bytes(data))

    def close(self, reason: str, quiet: bool = False) -> None:
        """Close the connection after flushing, and log why (quietly if nothing is wrong)."""
        if self._closing:
            return
        self._closing = True
        self._quiet = quiet
        self._close_reason = reason
        if quiet:
            self._log.info("closing connection with {peer}: {reason}",
                           peer=self.peer_address, reason=reason)
        else:
            self._log.warn("closing connection with {peer}: {reason}",
                           peer=self.peer_address, reason=reason)
        # Scheduled first: connectionLost (which cancels it) may run inside loseConnection.
        self._abort_call = self._clock.callLater(CLOSE_GRACE, self._abort)
        if self._paused:
            # A TLS close waits for the peer's close_notify: keep reading.
            self._paused = False
            self.transport.resumeProducing()
        self.transport.loseConnection()

    def _abort(self) -> None:
        self._abort_call = None
        self.transport.abortConnection()

    # -- receiving ----------------------------------------------------------------------

    def _guarded(self, step: Callable[[], None]) -> None:
        """Run ``step``; a protocol error (or a bug) closes this connection only."""
        try:
            step()
        except ProtocolError as e:
            if isinstance(e, HandshakeError) and not self._closing:
                self._handshake_error = e
            self.close(str(e))
        except Exception as e:
            self._log.failure("internal error on connection with {peer}", peer=self.peer_address)
            self.close("internal error: {}".format(type(e).__name__))
            # The connection's state is unknown after a bug: do not wait for a clean close.
            self.transport.abortConnection()

    def _feed(self, data: bytes) -> None:
        if self._server and not self._tls_started and self._decoder.buffered == 0 \
                and self.presented_id is None and data and data[:1] != b"{":
            # Only a JSON object (start) may come first: fail garbage or a
            # probe at its first byte instead of holding a slot for it.
            raise HandshakeError("the first bytes are not a JSON message (start expected)")
        if self._frames is not None:
            self._frames.receive_data(data)
            held = self._frames.buffered + self._decoder.buffered
        else:
            self._decoder.receive_data(data)
            held = self._decoder.buffered
        if self._paused and held > HANDSHAKE_MAX_LINE:
            raise HandshakeError("peer sent too much while we were creating the share")
        self._process()

    def _process(self) -> None:
        while not self._paused and not self._closing:
            event = self._decoder.next_event()
            if event is None:
                if self._inflate():
                    continue
                return
            if self.established is None:
                self._handshake_event(event)
            else:
                self._session_event(event)

    def _inflate(self) -> bool:
        """Hand the decoder the next piece of the inflated stream; False if there is none.

        Nothing is inflated while reading is paused: what arrived waits
        compressed, so a pause holds however well the data compresses.
        """
        if self._frames is None or (self._compressed is not None
                                    and self._compressed.reading_paused):
            return False
        piece = self._frames.next_piece()
        if piece is None:
            return False
        self._decoder.receive_data(piece)
        return True

    def _reading_resumed(self) -> None:
        """Reading goes on: inflate what waits, on the next reactor turn."""
        if self._inflate_call is None and not self._closing:
            self._inflate_call = self._clock.callLater(0, self._inflate_waiting)

    def _inflate_waiting(self) -> None:
        self._inflate_call = None
        if not self._closing:
            self._guarded(self._process)

    def _handshake_event(self, event: Event) -> None:
        if not isinstance(event, Message) or event.has_payload or event.signature is not None:
            raise HandshakeError("payload or signed message during the handshake")
        if self._tls_started:
            self._prove()  # a message decrypted inside TLS
        is_start = self._server and self.presented_id is None and event.type == "start"
        if is_start:
            named = event.body.get("id")
            # Only a well-formed ID is kept (it keys the back-off): bounded memory.
            self.presented_id = named if isinstance(named, str) and _ID_RE.fullmatch(named) else ""
            refusal = self._tell_owner("start_received")
            if refusal:
                self.counts_as_failure = False
                self.send_message({"type": "cannot_start"})
                self.close(refusal)
                return
        self._run(self._machine.receive(event.body, self._clock.seconds()))
        if is_start and self._tls_started:
            self._tell_owner("handshake_started")

    def handshakeCompleted(self) -> None:
        """IHandshakeListener: TLS is up, so the peer holds the key we chose."""
        self._prove()

    @property
    def proven(self) -> bool:
        """Whether TLS came up, proving that the peer holds the key we chose."""
        return self._proven

    def _prove(self) -> None:
        if not self._proven:
            self._proven = True
            self._tell_owner("handshake_proven")

    def _tell_owner(self, what: str) -> Any:
        report = getattr(self._owner, what, None)
        return report(self) if report is not None else None

    def evict(self, reason: str, failure: bool = False) -> None:
        """The listener ends this handshake: to make room, or (``failure``) for lateness."""
        self.counts_as_failure = self.counts_as_failure and failure
        if not self._closing:
            self.close(reason)
            self.transport.abortConnection()

    def _session_event(self, event: Event) -> None:
        if isinstance(event, Message) and event.type == "ping" and not event.has_payload:
            self._got_ping(event.body)
            return
        assert self.session is not None
        self.session.event_received(event)

    # -- handshake actions ----------------------------------------------------------------

    def _run(self, actions: list[Any]) -> None:
        for action in actions:
            if self._closing:
                return
            if isinstance(action, Send):
                self.send_message(action.body)
            elif isinstance(action, StartTLS):
                self._start_tls(action)
            elif isinstance(action, AwaitShare):
                self._await_share(action.result)
            elif isinstance(action, Close):
                self.close(action.reason, quiet=action.quiet)
            elif isinstance(action, Done):
                self._established(action.established)
            else:
                raise AssertionError("unknown handshake action {!r}".format(action))

    def _start_tls(self, action: StartTLS) -> None:
        # Nothing may follow the line that switches to TLS: the TLS client
        # speaks first, and only after it has seen starttls.
        leftover = self._decoder.take_unprocessed()
        if leftover:
            raise HandshakeError(
                "{} bytes arrived in plaintext after the switch to TLS".format(len(leftover)))
        options = self._settings.tls_options
        self._tls_started = True
        if self._server:
            creator = psk_server_creator(action.psk, **options)
        else:
            creator = psk_client_creator(action.psk, action.identity, **options)
        self.transport.startTLS(creator)
        codec = choose(action.features)
        if codec is not None:
            # Everything after the switch travels in frames (protocol/gzip.md).
            self.compression = codec
            self._frames = FrameDecoder()
            self._compressed = CompressedTransport(
                self.transport, FrameEncoder(), self._reading_resumed,
                SendPolicy(self._clock.seconds))
            self.transport = self._compressed

    def _await_share(self, result: Deferred) -> None:
        self._paused = True
        self.transport.pauseProducing()
        result.addCallbacks(self._share_ready, self._share_failed)

    def _share_ready(self, _: object) -> None:
        if self._closing:
            return
        self._paused = False
        self.transport.resumeProducing()
        self._guarded(lambda: (
            self._run(self._machine.share_created(self._clock.seconds())), self._process()))

    def _share_failed(self, failure: Failure) -> None:
        if failure.check(ConfigurationError):  # a reason for the user, not a fault
            self._log.warn("not creating the share offered by {peer}: {why}",
                           peer=self.peer_address, why=failure.getErrorMessage())
        else:
            self._log.failure("creating the share for {peer} failed", failure,
                              peer=self.peer_address)
        if not self._closing:
            self.close("could not create the share: {}".format(_failure_text(failure)))

    def _handshake_timed_out(self) -> None:
        self._deadline = None
        if self.established is None and not self._closing:
            self.close("handshake did not finish within {:.0f} s".format(
                self._settings.handshake_timeout))
            # A half-done TLS handshake or a stalled peer must not keep the socket.
            self.transport.abortConnection()

    def _established(self, established: Established) -> None:
        self.established = established
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        rest = self._decoder.take_unprocessed()
        self._decoder = WireDecoder(type_limits=SESSION_TYPE_LIMITS)
        self._decoder.receive_data(rest)
        self._report_handshake(success=True)
        self._log.info(
            "connected with {name} ({peer}) in share {share} as {role}, access {access}"
            "{compressed}",
            name=established.their_name, peer=self.peer_address,
            share=established.share_id, access=established.access,
            compressed=", compressed ({})".format(self.compression) if self.compression else "",
            role="server" if established.we_are_server else "client")
        self._start_keepalive()
        self.session = self._settings.session_factory(self)
        # A session factory may refuse the connection by closing it; then the
        # connection counts as failed for whoever waits on it.
        if not self._closing and not self.when_established.called:
            self.when_established.callback(self)

    def _report_handshake(self, success: bool) -> None:
        if self._handshake_reported:
            return
        self._handshake_reported = True
        report = getattr(self._owner, "handshake_ended", None)
        if report is not None:
            report(self, success or self._quiet)

    # -- keep-alive ---------------------------------------------------------------------------

    def _start_keepalive(self) -> None:
        self._ping_call = self._clock.callLater(self._settings.ping_timeout, self._send_ping)
        self._idle_call = self._clock.callLater(self._idle_limit(), self._check_idle)

    def _idle_limit(self) -> float:
        return IDLE_FACTOR * max(self._settings.ping_timeout, self._their_ping_timeout)

    def _send_ping(self) -> None:
        self.send_message({"type": "ping", "timeout": self._settings.ping_timeout})
        self._ping_call = self._clock.callLater(self._settings.ping_timeout, self._send_ping)

    def _got_ping(self, body: dict[str, Any]) -> None:
        timeout = body.get("timeout")
        if isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and timeout > 0:
            self._their_ping_timeout = min(timeout, MAX_PING_TIMEOUT)

    def _check_idle(self) -> None:
        silent = self._clock.seconds() - self._last_received
        limit = self._idle_limit()
        if silent >= limit:
            self._idle_call = None
            self.close("no data from the peer for {:.0f} s".format(silent))
        else:
            self._idle_call = self._clock.callLater(limit - silent, self._check_idle)


# -- factories --------------------------------------------------------------------------------


class PeerServerFactory(Factory):
    """Accepts peer connections: fair handshake slots, back-off for failing IDs."""

    _log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        keyring: KeyRing,
        name: str,
        session_factory: SessionFactory,
        *,
        max_unauthenticated: int = MAX_UNAUTHENTICATED,
        limiter: FailureLimiter | None = None,
        admission: Admission | None = None,
        **options: Any,
    ) -> None:
        self.settings = PeerSettings(clock, keyring, name, session_factory, **options)
        self.limiter = limiter if limiter is not None else FailureLimiter(clock)
        self.admission = admission if admission is not None else Admission(max_unauthenticated)
        self.handshaking: set[PeerProtocol] = set()
        self.connections: set[PeerProtocol] = set()
        self._check: IDelayedCall | None = None

    @property
    def max_unauthenticated(self) -> int:
        return self.admission.capacity

    def buildProtocol(self, addr: IAddress) -> PeerProtocol | None:
        host = _host(addr)
        protocol = PeerProtocol(self.settings, None, owner=self)
        verdict = self.admission.arrive(protocol, host, self.settings.clock.seconds())
        if not verdict.admit:
            self._log.warn("refusing connection from {host}: {reason}; try again later",
                           host=host, reason=verdict.reason)
            return None
        if isinstance(verdict.evict, PeerProtocol):
            verdict.evict.evict(verdict.reason)  # logged by its close
        protocol.factory = self
        # Nobody waits on an accepted connection's outcome; it is logged.
        protocol.when_established.addErrback(lambda _: None)
        protocol.source_host = host
        self.handshaking.add(protocol)
        self._schedule()
        return protocol

    def start_received(self, protocol: PeerProtocol) -> str | None:
        """The client named an ID in ``start``: a reason to refuse it, or None."""
        key = (protocol.source_host, protocol.presented_id)
        if self.limiter.blocked(key):
            return ("too many failed handshakes from {} for ID {} (refused {:.0f} s more); "
                    "check the access code or share".format(
                        protocol.source_host, protocol.presented_id or "(malformed)",
                        self.limiter.blocked_for(key)))
        return None

    def handshake_started(self, protocol: PeerProtocol) -> None:
        """The client's ``start`` chose a key; TLS is under way."""
        self.admission.started(protocol)
        self._schedule()

    def handshake_proven(self, protocol: PeerProtocol) -> None:
        """TLS is up: the peer holds a valid key; its slot is free."""
        self.admission.leave(protocol)
        self._schedule()

    def handshake_ended(self, protocol: PeerProtocol, success: bool) -> None:
        """Called once per connection; a failure counts against (address, ID named)."""
        self.handshaking.discard(protocol)
        self.admission.leave(protocol)
        if success:
            self.connections.add(protocol)
        elif (protocol.counts_as_failure and not protocol.proven
              and protocol.presented_id is not None):
            # Bad credentials only: a peer whose key worked is never punished.
            self.limiter.failed((protocol.source_host, protocol.presented_id))
        self._schedule()

    def connection_closed(self, protocol: PeerProtocol) -> None:
        """Called when any connection built here is gone."""
        self.handshaking.discard(protocol)
        self.connections.discard(protocol)
        self.admission.leave(protocol)
        self._schedule()

    def stop(self) -> None:
        """Cancel the deadline timer (the listener has stopped)."""
        if self._check is not None and self._check.active():
            self._check.cancel()
        self._check = None

    def doStop(self) -> None:
        self.stop()
        super().doStop()

    def _schedule(self) -> None:
        """Keep one timer set to the earliest admission deadline."""
        due = self.admission.next_deadline()
        clock = self.settings.clock
        if self._check is not None and self._check.active():
            if due is not None and self._check.getTime() <= due:
                return
            self._check.cancel()
        self._check = None
        if due is not None:
            self._check = clock.callLater(max(0.0, due - clock.seconds()), self._expire)

    def _expire(self) -> None:
        self._check = None
        for protocol, reason in self.admission.overdue(self.settings.clock.seconds()):
            self.admission.leave(protocol)
            if isinstance(protocol, PeerProtocol):
                protocol.evict(reason, failure=True)
        self._schedule()


class PeerClientFactory(Factory):
    """Builds the protocol for one outgoing connection to ``target``."""

    def __init__(
        self,
        clock: IReactorTime,
        keyring: KeyRing,
        name: str,
        session_factory: SessionFactory,
        target: ConnectTarget,
        **options: Any,
    ) -> None:
        self.settings = PeerSettings(clock, keyring, name, session_factory, **options)
        self.target = target

    def buildProtocol(self, addr: IAddress) -> PeerProtocol:
        protocol = PeerProtocol(self.settings, self.target, owner=self)
        protocol.factory = self
        return protocol


def connect_peer(
    reactor: IReactorTime,
    endpoint: IStreamClientEndpoint,
    target: ConnectTarget,
    keyring: KeyRing,
    name: str,
    session_factory: SessionFactory,
    clock: IReactorTime | None = None,
    **options: Any,
) -> Deferred[PeerProtocol]:
    """Connect to a peer and complete the handshake for ``target``.

    Fires with the established :class:`PeerProtocol` (its session already
    made); fails with the connection error, or :class:`HandshakeError` for
    ``cannot_start``, a TLS failure, a timeout or any refusal.  Cancelling it
    aborts the attempt.
    """
    factory = PeerClientFactory(clock or reactor, keyring, name, session_factory, target, **options)
    state: dict[str, Any] = {}

    def cancel(_: Deferred) -> None:
        protocol = state.get("protocol")
        if protocol is not None and protocol.transport is not None:
            protocol.transport.abortConnection()
        else:
            connecting.cancel()

    result: Deferred[PeerProtocol] = Deferred(cancel)
    connecting = endpoint.connect(factory)

    def connected(protocol: PeerProtocol) -> None:
        state["protocol"] = protocol
        protocol.when_established.addCallbacks(
            lambda p: None if result.called else result.callback(p),
            lambda f: None if result.called else result.errback(f),
        )

    def failed(failure: Failure) -> None:
        if not result.called:
            result.errback(failure)

    connecting.addCallbacks(connected, failed)
    return result
