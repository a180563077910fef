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


class _Channel(HTTPChannel):
    """HTTP/1.1 that answers an over-long request line with a 400 instead of silence."""

    def lineLengthExceeded(self, line: bytes) -> None:
        if self.transport.disconnecting:
            return
        message = b"request line or header longer than %d bytes\n" % (self.MAX_LENGTH,)
        self.transport.write(
            b"HTTP/1.1 400 Bad Request\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: %d\r\n"
            b"Connection: close\r\n\r\n%s" % (len(message), message)
        )
        self.transport.loseConnection()


class TrackerSite(Site):
    """A Site without an access log: a tracker should not record who asked for which ID."""

    protocol = _Channel

    def log(self, request: Request) -> None:
        pass


def make_site(
    registry: Registry,
    clock: IReactorTime,
    stream_timeout: int = DEFAULT_STREAM_TIMEOUT,
) -> Site:
    """The tracker's whole HTTP tree: ``/`` (status) and ``/clearskies/track``."""
    root = _Folder()
    root.putChild(b"", StatusResource(registry))
    clearskies = _Folder()
    clearskies.putChild(b"track", TrackResource(registry, clock, stream_timeout))
    root.putChild(b"clearskies", clearskies)
    return TrackerSite(root, reactor=clock)
