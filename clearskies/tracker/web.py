"""The tracker over HTTP: ``GET /clearskies/track`` and a status page at ``/``.

This module only translates between HTTP and :class:`Registry`: it parses the
query, takes the caller's address from the connection, and writes JSON.  A
``fast_track=1`` request is held open by a :class:`_Stream`, which writes one
JSON object per line (keep-alives and ``others`` updates) and stops writing
while the client is not reading, so a stalled client costs one pending set of
IDs, never a growing buffer.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from clearskies import SOFTWARE
from clearskies.errors import ProtocolError
from clearskies.tracker.registry import MAX_TOR_ADDRESSES, CapacityError, Registry, Subscription

DEFAULT_STREAM_TIMEOUT = 60
#: Seconds a connection may sit without a request in progress (before its
#: first request, between requests, or while a request trickles in).
DEFAULT_IDLE_TIMEOUT = 15
#: Open connections at once; tap.py sets it from the file descriptor limit.
DEFAULT_MAX_CONNECTIONS = 900
_PORT_RE = re.compile(r"[0-9]{1,5}")


@dataclass(frozen=True)
class TrackQuery:
    """The parameters of one ``/clearskies/track`` request, syntactically checked."""

    pairs: list[tuple[str, str]]
    tcp_port: int | None  # None only for an onion-only peer (``tor`` given)
    utp_port: int | None
    fast_track: bool
    tor: tuple[str, ...] = ()  # ``<name>.onion:<port>`` values, checked by the Registry


def _text(raw: bytes) -> str:
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError("query parameters must be ASCII") from None


def _single(args: Mapping[bytes, Sequence[bytes]], name: str) -> str | None:
    values = args.get(name.encode("ascii"), [])
    if len(values) > 1:
        raise ProtocolError("%s must be given at most once" % (name,))
    return _text(values[0]) if values else None


def _port(args: Mapping[bytes, Sequence[bytes]], name: str) -> int | None:
    value = _single(args, name)
    if value is None:
        return None
    if not _PORT_RE.fullmatch(value):
        raise ProtocolError("%s must be a number from 1 to 65535" % (name,))
    return int(value)


def parse_track_query(args: Mapping[bytes, Sequence[bytes]]) -> TrackQuery:
    """Read ``id`` (repeated), ``tcp_port``, ``utp_port``, ``tor`` (repeated) and
    ``fast_track`` from ``request.args``.

    Only the shape is checked here (ASCII, ``@`` present, digits);
    :class:`Registry` checks the values.  Unknown parameters are ignored.
    """
    pairs = []
    for raw in args.get(b"id", []):
        value = _text(raw)
        share_id, at, peer = value.partition("@")
        if not at:
            shown = value if len(value) <= 100 else value[:100] + "..."
            raise ProtocolError(
                "id must look like <64-hex ID>@<32-hex peer ID>, not %r" % (shown,)
            )
        pairs.append((share_id, peer))
    if not pairs:
        raise ProtocolError("give at least one id=<ID>@<peer ID> parameter")
    raw_tor = args.get(b"tor", [])
    if len(raw_tor) > MAX_TOR_ADDRESSES:
        raise ProtocolError("at most %d tor parameters per request" % (MAX_TOR_ADDRESSES,))
    tor = tuple(_text(value) for value in raw_tor)
    tcp_port = _port(args, "tcp_port")
    if tcp_port is None and not tor:
        raise ProtocolError("tcp_port is required: the TCP port you accept peers on "
                            "(an onion-only peer gives tor=<name>.onion:<port> instead)")
    fast = _single(args, "fast_track")
    if fast not in (None, "0", "1"):
        raise ProtocolError("fast_track must be 1 or 0")
    return TrackQuery(pairs, tcp_port, _port(args, "utp_port"), fast == "1", tor)


def _client_host(request: Request) -> str:
    address = request.getClientAddress()
    if not isinstance(address, (IPv4Address, IPv6Address)):
        raise ProtocolError("the tracker only serves clients connected over IP")
    return address.host


def _json_line(value: dict) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode("ascii") + b"\n"


def _plain(request: Request, code: int, message: str) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    request.setHeader(b"cache-control", b"no-store")
    return message.encode("utf-8") + b"\n"


@implementer(IPushProducer)
class _Stream:
    """One open ``fast_track`` response.

    Writes ``{}`` every ``interval`` seconds and ``{"others": …}`` when the
    registry reports a change; keeps the caller's registrations fresh while
    open.  While the transport is paused, changes are only remembered; a
    client that stays paused longer than ``timeout`` is disconnected.
    """

    _log = Logger()

    def __init__(
        self,
        request: Request,
        registry: Registry,
        clock: IReactorTime,
        query: TrackQuery,
        host: str,
        timeout: int,
    ) -> None:
        self._request = request
        self._registry = registry
        self._clock = clock
        self._query = query
        self._host = host
        self._timeout = timeout
        self._open = False
        self._closed = False
        self._paused_since: float | None = None
        self._pending: set[str] = set()
        self._ticker = LoopingCall(self._tick)
        self._ticker.clock = clock
        # Raises CapacityError before anything is registered or written.
        self._subscription: Subscription = registry.subscribe(query.pairs, self._changed, host)

    def start(self) -> None:
        """Register, write the first line, and begin keep-alives."""
        query = self._query
        try:
            body = self._registry.register(
                query.pairs, self._host, query.tcp_port, query.utp_port, self._clock.seconds(),
                query.tor,
            )
        except BaseException:
            self._registry.unsubscribe(self._subscription)
            raise
        body["timeout"] = self._timeout
        request = self._request
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        request.write(_json_line(body))
        self._open = True
        request.registerProducer(self, True)
        request.notifyFinish().addBoth(self._finished)
        interval = min(self._timeout, self._registry.ttl) / 2
        self._ticker.start(interval, now=False).addErrback(self._tick_failed)

    def _changed(self, ids: list[str]) -> None:
        if not self._open or self._closed:
            return
        self._pending.update(ids)
        if self._paused_since is None:
            self._flush()

    def _flush(self) -> None:
        ids, self._pending = sorted(self._pending), set()
        if ids:
            others = self._registry.others_for(self._subscription, ids)
            self._request.write(_json_line({"others": others}))

    def _tick(self) -> None:
        query = self._query
        try:
            self._registry.renew(
                query.pairs, self._host, query.tcp_port, query.utp_port, self._clock.seconds(),
                query.tor,
            )
        except ProtocolError as e:
            self._log.info("could not renew a fast_track registration: {why}", why=str(e))
        if self._paused_since is None:
            self._request.write(b"{}\n")
        elif self._clock.seconds() - self._paused_since >= self._timeout:
            self._log.info("dropping a fast_track client that stopped reading")
            self._close()
            self._request.transport.abortConnection()

    def _tick_failed(self, failure: Failure) -> None:
        self._log.failure("fast_track keep-alive failed; closing the stream", failure)
        self._close()
        self._request.transport.abortConnection()

    # IPushProducer, driven by the HTTP channel's send buffer.
    def pauseProducing(self) -> None:
        if self._paused_since is None:
            self._paused_since = self._clock.seconds()

    def resumeProducing(self) -> None:
        self._paused_since = None
        if not self._closed:
            self._flush()

    def stopProducing(self) -> None:
        self._close()

    def _finished(self, _result: object) -> None:
        """The client went away (or the response ended): the usual end of a stream."""
        self._close()

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._registry.unsubscribe(self._subscription)
        if self._ticker.running:
            self._ticker.stop()


class _Message(Resource):
    """A fixed plain-text answer (404 for unknown paths) instead of Twisted's HTML pages."""

    isLeaf = True

    def __init__(self, code: int, message: str) -> None:
        super().__init__()
        self._code = code
        self._message = message

    def render(self, request: Request) -> bytes:
        return _plain(request, self._code, self._message)


_NOT_FOUND = _Message(404, "not found: this tracker serves / and /clearskies/track")


class _Folder(Resource):
    """A path segment with fixed children; anything else is a plain 404."""

    def getChild(self, path: bytes, request: Request) -> Resource:
        return _NOT_FOUND

    def render(self, request: Request) -> bytes:
        return _NOT_FOUND.render(request)


class _GetOnly(Resource):
    """A leaf that answers methods other than GET (and HEAD) with a plain 405."""

    isLeaf = True

    def render(self, request: Request) -> bytes | int:
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"allow", b"GET, HEAD")
            return _plain(request, 405, "only GET is supported here")
        return super().render(request)


class TrackResource(_GetOnly):
    """``GET /clearskies/track?id=<ID>@<peer>&…&tcp_port=P[&utp_port=U][&tor=N.onion:P…][&fast_track=1]``."""
    _log = Logger()

    def __init__(
        self,
        registry: Registry,
        clock: IReactorTime,
        stream_timeout: int = DEFAULT_STREAM_TIMEOUT,
    ) -> None:
        super().__init__()
        self._registry = registry
        self._clock = clock
        self._stream_timeout = stream_timeout

    def render_GET(self, request: Request) -> bytes | int:
        try:
            query = parse_track_query(request.args or {})
            host = _client_host(request)
            if query.fast_track:
                _Stream(
                    request, self._registry, self._clock, query, host, self._stream_timeout
                ).start()
                return NOT_DONE_YET
            body = self._registry.register(
                query.pairs, host, query.tcp_port, query.utp_port, self._clock.seconds(),
                query.tor,
            )
        except CapacityError as e:
            return _plain(request, 503, str(e))
        except ProtocolError as e:
            return _plain(request, 400, str(e))
        except Exception:
            self._log.failure("tracker request failed")
            return _plain(request, 503, "the tracker hit an internal error; try again later")
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(body, separators=(",", ":")).encode("ascii")


class StatusResource(_GetOnly):
    """``GET /``: a plain-text page with the tracker's counts."""

    def __init__(self, registry: Registry) -> None:
        super().__init__()
        self._registry = registry

    def render_GET(self, request: Request) -> bytes:
        stats = self._registry.stats()
        text = (
            "ClearSkies tracker (%s)\n"
            "IDs: %d\n"
            "peers: %d\n"
            "source addresses: %d\n"
            "fast_track streams: %d\n"
        ) % (SOFTWARE, stats["ids"], stats["registrations"], stats["sources"], stats["streams"])
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        return text.encode("utf-8")


def _raw_response(code: int, reason: bytes, message: str, *headers: bytes) -> bytes:
    """A whole HTTP/1.1 response that closes the connection, for answers given
    before (or instead of) twisted.web's request handling."""
    body = message.encode("utf-8") + b"\n"
    return b"HTTP/1.1 %d %s\r\n%sContent-Type: text/plain; charset=utf-8\r\n" \
        b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (
            code, reason, b"".join(h + b"\r\n" for h in headers), len(body), body)


class _Channel(HTTPChannel):
    """HTTP/1.1 with the tracker's limits.

    An over-long request line gets a 400 instead of silence.  A method other
    than GET/HEAD, or any request body, is refused as soon as the headers are
    in, before twisted.web would read the body into memory or a temporary
    file.  The channel tells its :class:`TrackerSite` when it is busy with a
    request and when it is idle, so the site can drop the oldest idle
    connection when it is full.
    """

    factory: TrackerSite
    _admitted = False

    def connectionMade(self) -> None:
        super().connectionMade()
        if not self.factory.admit(self):
            self._refuse(_raw_response(
                503, b"Service Unavailable",
                "the tracker has too many open connections; try again in a minute"))
            return
        self._admitted = True

    def allHeadersReceived(self) -> None:
        if self._command not in (b"GET", b"HEAD"):
            self._refuse(_raw_response(
                405, b"Method Not Allowed", "only GET is supported here", b"Allow: GET, HEAD"))
            return
        if self.length != 0:  # a Content-Length above 0, or chunked (None)
            self._refuse(_raw_response(
                413, b"Content Too Large",
                "a tracker request has no body; send the parameters in the query"))
            return
        super().allHeadersReceived()

    def _refuse(self, response: bytes) -> None:
        """Answer and close without reading another byte of the request."""
        self.transport.write(response)
        # Nothing more is parsed: lineReceived must not go on to run the request.
        self.length = None
        self.dataReceived = lambda data: None  # type: ignore[method-assign]
        self.transport.loseConnection()

    def allContentReceived(self) -> None:
        self.factory.busy(self)
        super().allContentReceived()

    def requestDone(self, request: Request) -> None:
        # Before the super call: it may start on a pipelined next request at once.
        if self.persistent:
            self.factory.idle(self)
        super().requestDone(request)

    def connectionLost(self, reason: Failure) -> None:
        if self._admitted:
            self.factory.gone(self)
        super().connectionLost(reason)

    def lineLengthExceeded(self, line: bytes) -> None:
        if self.transport.disconnecting:
            return
        self._refuse(_raw_response(
            400, b"Bad Request", "request line or header longer than %d bytes" % (self.MAX_LENGTH,)))


class TrackerSite(Site):
    """A Site without an access log (a tracker should not record who asked for
    which ID) that bounds its connections.

    At most ``max_connections`` are open; when one more arrives, the
    connection that has been idle longest (no request in progress: never sent
    one, between requests, or still trickling one in) is dropped for it, and
    only when every connection is busy is the newcomer refused with a 503.
    Idle connections are also closed after ``idle_timeout`` seconds.
    """

    protocol = _Channel
    _log = Logger()
    #: Seconds between two log lines about a full tracker.
    REPORT_INTERVAL = 60

    def __init__(
        self,
        resource: Resource,
        *,
        reactor: IReactorTime,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    ) -> None:
        super().__init__(resource, reactor=reactor, timeout=idle_timeout)
        self.max_connections = max_connections
        self._open = 0
        # Admitted connections without a request in progress, idle longest first.
        self._idle: OrderedDict[_Channel, None] = OrderedDict()
        self._quiet_until = float("-inf")

    def log(self, request: Request) -> None:
        pass

    def connections(self) -> tuple[int, int]:
        """(open, idle) connection counts, for the status page."""
        return self._open, len(self._idle)

    def admit(self, channel: _Channel) -> bool:
        if self._open >= self.max_connections:
            if not self._idle:
                self._report("every connection is busy, refusing new ones with 503")
                return False
            self._report("closing the longest-idle connections to make room")
            oldest, _ = self._idle.popitem(last=False)
            # Its connectionLost (next reactor turn) frees its place and descriptor.
            oldest.transport.abortConnection()
        self._open += 1
        self._idle[channel] = None
        return True

    def _report(self, what: str) -> None:
        """Log that the connection limit is reached, at most once a minute."""
        now = self.reactor.seconds()
        if now >= self._quiet_until:
            self._quiet_until = now + self.REPORT_INTERVAL
            self._log.warn(
                "the tracker has reached its limit of {limit} connections: {what} "
                "(not logged again for a minute; an attack, or raise the file descriptor limit)",
                limit=self.max_connections, what=what,
            )

    def busy(self, channel: _Channel) -> None:
        self._idle.pop(channel, None)

    def idle(self, channel: _Channel) -> None:
        if not channel.transport.disconnecting:
            self._idle[channel] = None
            self._idle.move_to_end(channel)

    def gone(self, channel: _Channel) -> None:
        self._idle.pop(channel, None)
        self._open -= 1


def make_site(
    registry: Registry,
    clock: IReactorTime,
    stream_timeout: int = DEFAULT_STREAM_TIMEOUT,
    *,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
) -> TrackerSite:
    """The tracker's whole HTTP tree: ``/`` (status) and ``/clearskies/track``."""
    root = _Folder()
    root.putChild(b"", StatusResource(registry))
    clearskies = _Folder()
    clearskies.putChild(b"track", TrackResource(registry, clock, stream_timeout))
    root.putChild(b"clearskies", clearskies)
    return TrackerSite(
        root, reactor=clock, max_connections=max_connections, idle_timeout=idle_timeout
    )
