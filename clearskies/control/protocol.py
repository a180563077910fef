"""The daemon side of the control socket: newline-delimited JSON on a UNIX socket.

The CLI and GUIs drive the daemon through this socket (protocol/control.md).
Each request line is handed to a *dispatcher*; replies go back strictly in
request order, so clients may pipeline.  Every buffer is bounded: request
lines (``MAX_LINE_LENGTH``), requests in flight per connection
(``MAX_PENDING``, beyond which we stop reading the socket) and events queued
for a slow subscriber (``MAX_EVENT_BACKLOG``, beyond which we hang up).
"""

from __future__ import annotations

import inspect
import os
import stat
import typing
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import CannotListenError, ConnectError, ConnectionRefusedError
from twisted.internet.interfaces import IListeningPort, IPushProducer
from twisted.internet.protocol import ClientCreator, Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from clearskies.control.lines import (  # noqa: F401  (also this module's public names)
    MAX_EVENT_BACKLOG, MAX_LINE_LENGTH, MAX_PENDING, PROTOCOL_VERSION, SERVICE, SUBSCRIBE,
    UNSUBSCRIBE, ControlError, JSONDict, LineSplitter, LineTooLong, encode_line, parse_request,
)
from clearskies.errors import ConfigurationError

#: Longest filesystem path a UNIX socket address can hold on Linux.
_MAX_SOCKET_PATH = 107

_log = Logger()
Reply = JSONDict | None


class Dispatcher(typing.Protocol):
    """What ``ControlFactory`` hands requests to."""

    def dispatch(self, request: JSONDict) -> Reply | Deferred[Reply] | Awaitable[Reply]:
        ...


class _PendingReply:
    """A place in the reply order; ``line`` is filled once the handler is done."""

    __slots__ = ("line",)

    def __init__(self) -> None:
        self.line: bytes | None = None


async def _await(awaitable: Awaitable[Reply]) -> Reply:
    return await awaitable


@implementer(IPushProducer)
class ControlProtocol(Protocol):
    """One control connection: greeting, in-order replies, optional events.

    Flow control works both ways.  Towards us: with ``MAX_PENDING`` requests
    unanswered, after an over-long line, or while the client is not reading
    our output, we pause the transport and keep any already-received lines
    in the splitter.  Towards the client: we are registered as the
    transport's streaming producer, so a full write buffer pauses us; events
    then queue here (at most ``MAX_EVENT_BACKLOG``) instead of in the
    transport.
    """

    _log = Logger()
    factory: ControlFactory
    MAX_LENGTH = MAX_LINE_LENGTH

    def __init__(self) -> None:
        self._lines = LineSplitter(self.MAX_LENGTH)
        self._replies: deque[_PendingReply] = deque()
        self._events: deque[bytes] = deque()
        self._processing = False
        self._reading_paused = False  # we paused the transport's reading
        self._write_paused = False    # the transport paused us (client not reading)
        self._closing = False         # hang up once queued replies are written
        self._hung_up = False
        self._lost = False

    # -- connection ----------------------------------------------------------

    def connectionMade(self) -> None:
        self.transport.registerProducer(self, True)
        self.transport.write(encode_line({
            "service": SERVICE,
            "software": self.factory.software,
            "protocol": PROTOCOL_VERSION,
        }))

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._lost = True
        self.factory.unsubscribe(self)
        self._lines.clear()
        self._replies.clear()
        self._events.clear()

    def dataReceived(self, data: bytes) -> None:
        if self._closing or self._lost:
            return
        self._lines.feed(data)
        self._process()

    # -- IPushProducer: the transport tells us whether the client keeps up ----

    def pauseProducing(self) -> None:
        self._write_paused = True
        self._update_reading()

    def resumeProducing(self) -> None:
        self._write_paused = False
        while self._events and not self._write_paused and not self._lost:
            self.transport.write(self._events.popleft())
        self._process()

    def stopProducing(self) -> None:
        self._events.clear()

    # -- events ----------------------------------------------------------------

    def send_event(self, event: JSONDict) -> None:
        """Push ``{"event": event}`` to this client, whether or not it subscribed."""
        self.send_event_line(encode_line({"event": event}))

    def send_event_line(self, line: bytes) -> None:
        """Push an already-encoded event line (``ControlFactory.broadcast`` encodes once)."""
        if self._lost or self._closing:
            return
        if not self._write_paused and not self._events:
            self.transport.write(line)
            return
        self._events.append(line)
        if len(self._events) > MAX_EVENT_BACKLOG:
            self._log.warn(
                "control client fell more than {limit} events behind; dropping it",
                limit=MAX_EVENT_BACKLOG,
            )
            self._events.clear()
            self.factory.unsubscribe(self)
            self._closing = self._hung_up = True
            self.transport.abortConnection()

    # -- requests --------------------------------------------------------------

    def _must_wait(self) -> bool:
        return self._closing or self._write_paused or len(self._replies) >= MAX_PENDING

    def _process(self) -> None:
        """Run buffered request lines while there is room, then fix up reading."""
        if self._processing or self._lost:
            return
        self._processing = True
        try:
            while not self._must_wait():
                try:
                    line = self._lines.next_line()
                except LineTooLong:
                    self._line_too_long()
                    break
                if line is None:
                    break
                if line.strip():
                    self._handle_line(line)
        finally:
            self._processing = False
        self._update_reading()

    def _update_reading(self) -> None:
        if self._lost or self._hung_up:
            return
        wait = self._must_wait()
        if wait and not self._reading_paused:
            self._reading_paused = True
            self.transport.pauseProducing()
        elif not wait and self._reading_paused:
            self._reading_paused = False
            self.transport.resumeProducing()

    def _line_too_long(self) -> None:
        self._log.info(
            "control client sent a line over {limit} bytes; closing", limit=self.MAX_LENGTH
        )
        self._closing = True
        self._lines.clear()
        self._update_reading()
        slot = _PendingReply()
        slot.line = encode_line(ControlError(
            "line_too_long",
            f"request line longer than {self.MAX_LENGTH} bytes; closing the connection",
        ).to_reply())
        self._replies.append(slot)
        self._flush()

    def _handle_line(self, line: bytes) -> None:
        slot = _PendingReply()
        self._replies.append(slot)
        self._run(line).addCallback(self._reply_ready, slot)

    def _run(self, line: bytes) -> Deferred[JSONDict]:
        """Parse and dispatch one line; the result always fires with a reply dict."""
        try:
            request = parse_request(line)
        except ControlError as e:
            return succeed(e.to_reply())
        kind = request["type"]
        if kind == SUBSCRIBE:
            since = request.get("since")
            if since is not None and (isinstance(since, bool) or not isinstance(since, int)):
                return succeed(ControlError("bad_request", "since must be an event id "
                                            "(an integer)").to_reply())
            self.factory.subscribe(self, since)
            return succeed({})
        if kind == UNSUBSCRIBE:
            self.factory.unsubscribe(self)
            return succeed({})
        try:
            result = self.factory.dispatcher.dispatch(request)
            if isinstance(result, Deferred):
                d = result
            elif inspect.isawaitable(result):
                d = Deferred.fromCoroutine(_await(result))
            else:
                d = succeed(result)
        except Exception:
            d = fail()
        d.addCallback(self._check_reply)
        d.addErrback(self._error_reply, kind)
        return d

    def _check_reply(self, reply: Reply) -> JSONDict:
        if reply is None:
            return {}
        if not isinstance(reply, dict):
            raise TypeError(f"handler returned {type(reply).__name__}, not a dict")
        if "event" in reply:
            raise ValueError('replies must not carry a top-level "event" key')
        return reply

    def _error_reply(self, failure: Failure, kind: str) -> JSONDict:
        if failure.check(ControlError):
            return failure.value.to_reply()
        self._log.failure("control command {kind} failed", failure, kind=kind)
        return {
            "error": "internal",
            "message": f"internal error while handling {kind!r}; the daemon log has details",
        }

    def _reply_ready(self, reply: JSONDict, slot: _PendingReply) -> None:
        try:
            slot.line = encode_line(reply)
        except (TypeError, ValueError):
            self._log.failure("control reply is not JSON: {reply!r}", reply=reply)
            slot.line = encode_line({
                "error": "internal",
                "message": "internal error: the reply could not be encoded; "
                           "the daemon log has details",
            })
        self._flush()

    def _flush(self) -> None:
        """Write every finished reply at the head of the order; resume reading if room."""
        if self._lost:
            return
        while self._replies and self._replies[0].line is not None:
            self.transport.write(self._replies.popleft().line)
        if self._closing:
            if not self._replies and not self._hung_up:
                self._hung_up = True
                self.transport.loseConnection()
        else:
            self._process()


class ControlFactory(Factory):
    """Builds control connections sharing one dispatcher; fans events out."""

    protocol = ControlProtocol

    def __init__(self, dispatcher: Dispatcher, software: str, events: Any = None) -> None:
        self.dispatcher = dispatcher
        self.software = software
        self._subscribers: set[ControlProtocol] = set()
        #: The daemon's event bus (clearskies.events), if any: its events are broadcast.
        self.events = events
        if events is not None:
            events.add_listener(self.broadcast)

    def subscribe(self, connection: ControlProtocol, since: int | None = None) -> None:
        """From now on ``connection`` gets every event; with ``since``, first the kept
        events after that id (and ``{"type":"gap"}`` when some are no longer kept)."""
        if since is not None and self.events is not None:
            events, gap = self.events.since(since)
            if gap:
                connection.send_event({"type": "gap", "since": since})
            for event in events:
                connection.send_event(event)
        self._subscribers.add(connection)

    def unsubscribe(self, connection: ControlProtocol) -> None:
        self._subscribers.discard(connection)

    @property
    def subscribers(self) -> frozenset[ControlProtocol]:
        return frozenset(self._subscribers)

    def broadcast(self, event: JSONDict) -> None:
        """Send ``{"event": event}`` to every subscribed connection."""
        if not self._subscribers:
            return
        line = encode_line({"event": event})
        for connection in list(self._subscribers):
            connection.send_event_line(line)


class CommandDispatcher:
    """Dispatcher base: request type ``list_shares`` runs ``cmd_list_shares(request)``.

    ``.`` and ``-`` in the type become ``_`` (``.org.example.ping`` runs
    ``cmd__org_example_ping``).  A method may return a dict, None (sent as
    ``{}``), a Deferred or a coroutine, and raise ``ControlError`` to refuse.
    """

    def dispatch(self, request: JSONDict) -> Reply | Deferred[Reply] | Awaitable[Reply]:
        kind = request["type"]
        method = self.command_method(kind)
        if method is None:
            raise ControlError("not_understood", f"unknown command {kind!r}")
        return method(request)

    def command_method(self, kind: str) -> Callable[[JSONDict], Any] | None:
        name = "cmd_" + kind.replace(".", "_").replace("-", "_")
        if not name.isidentifier():
            return None
        method = getattr(self, name, None)
        return method if callable(method) else None


def listen_control(reactor: Any, path: str, factory: ControlFactory) -> Deferred[IListeningPort]:
    """Listen for control clients on the UNIX socket ``path`` (mode 0600).

    Creates the parent directory (0700) if needed.  A socket file left by a
    dead daemon is removed; if a live daemon answers on it, fails with
    ``ConfigurationError``, as it does for a path that is not a socket.
    """
    return Deferred.fromCoroutine(_listen_control(reactor, path, factory))


async def _listen_control(reactor: Any, path: str, factory: ControlFactory) -> IListeningPort:
    if len(os.fsencode(path)) > _MAX_SOCKET_PATH:
        raise ConfigurationError(
            f"control socket path {path!r} is longer than the {_MAX_SOCKET_PATH} bytes a "
            "UNIX socket allows; choose a shorter data directory"
        )
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, mode=0o700, exist_ok=True)
    if os.path.lexists(path):
        await _remove_stale_socket(reactor, path)
    try:
        return reactor.listenUNIX(path, factory, mode=0o600)
    except CannotListenError as e:
        raise ConfigurationError(
            f"cannot listen on control socket {path}: {e.socketError}; "
            "is another daemon starting with this data directory?"
        ) from e


async def _remove_stale_socket(reactor: Any, path: str) -> None:
    if not stat.S_ISSOCK(os.lstat(path).st_mode):
        raise ConfigurationError(
            f"{path} exists and is not a socket; move it away so the daemon can listen there"
        )
    try:
        connection = await ClientCreator(reactor, Protocol).connectUNIX(path, timeout=5)
    except ConnectionRefusedError:
        _log.info("removing stale control socket {path}", path=path)
        os.unlink(path)
        return
    except ConnectError as e:
        if not os.path.lexists(path):
            return
        raise ConfigurationError(f"cannot tell whether a daemon owns {path}: {e}") from e
    connection.transport.loseConnection()
    raise ConfigurationError(
        f"another daemon is already running with this data directory ({path} answers); "
        "stop it first or choose another data directory"
    )
