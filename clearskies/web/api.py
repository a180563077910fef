"""The HTTP API and UI as ``twisted.web`` resources (protocol/http-api.md).

A thin layer, like the control socket, over one set of commands (the
control dispatcher): ``POST /rest/<command>`` with the command's arguments as
a JSON object runs it; the read-only commands also answer ``GET`` with the
arguments in the query string.  ``/rest/events`` long-polls the event bus,
``/rest/events/stream`` streams it as Server-Sent Events.  ``/login`` turns a
one-time token into a session cookie; everything else under ``/`` is the
UI's static files.

Every request first passes :class:`Gate`: the ``Host`` must name us, an
``Origin`` must be ours, ``/rest`` needs the API key or a session (and for
anything but ``GET``, the session's CSRF token).  What is refused learns
nothing: the same short reply whatever was asked.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.resource import Resource

from clearskies import jsonshape
from clearskies.control.lines import MAX_REQUEST_DEPTH, MAX_REQUEST_ITEMS, ControlError
from clearskies.events import EventBus
from clearskies.web.auth import Guard, Origins, Session, same
from clearskies.web.replies import header, send_error, send_json
from clearskies.web.stream import Events
from clearskies.web.thumbs import Thumbnail

#: Largest request body (bytes); more is 413 and the connection closes.
MAX_BODY = 1024 * 1024
#: HTTP connections open at once; more are closed as they arrive.
MAX_CONNECTIONS = 256
#: Commands that change nothing: they also answer GET.
READ_ONLY = frozenset({
    "status", "list_shares", "get_config", "get_config_value", ".clearskies.share_status",
    ".clearskies.peers", ".clearskies.codes", ".clearskies.versions", ".clearskies.events",
    ".clearskies.conflicts", ".clearskies.changes", ".clearskies.browse",
})
#: Control commands HTTP does not offer (they belong to a connection).
SOCKET_ONLY = frozenset({".events.subscribe", ".events.unsubscribe"})
SECURITY_HEADERS = {
    b"X-Content-Type-Options": b"nosniff",
    b"X-Frame-Options": b"DENY",
    b"Referrer-Policy": b"no-referrer",
    b"Cache-Control": b"no-store",
    b"Content-Security-Policy": b"default-src 'self'; img-src 'self' data:; "
                                b"style-src 'self'; script-src 'self'; connect-src 'self'; "
                                b"frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
}
STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml",
                ".png": "image/png"}
STATIC_DIR = os.path.join(os.path.dirname(__file__), "static")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("a key appears twice in one object")
    return out


def parse_body(body: bytes) -> dict[str, Any]:
    """A request body: empty, or a JSON object of arguments; else ControlError."""
    if not body.strip():
        return {}
    try:
        value = jsonshape.loads(body, MAX_REQUEST_ITEMS, MAX_REQUEST_DEPTH,
                                object_pairs_hook=_unique_keys)
    except UnicodeDecodeError:
        raise ControlError("bad_request", "the body is not valid UTF-8") from None
    except jsonshape.ShapeError as e:
        raise ControlError("bad_request", "the body is refused: %s" % e) from None
    except json.JSONDecodeError as e:
        raise ControlError("bad_request", "the body is not valid JSON: %s at column %d"
                           % (e.msg, e.colno)) from None
    except (ValueError, RecursionError) as e:
        raise ControlError("bad_request", "the body is not acceptable JSON: %s" % e) from None
    if not isinstance(value, dict):
        raise ControlError("bad_request", "the body must be a JSON object of arguments")
    return value


#: The GET arguments that are counts, and flags, in the commands that take them; every
#: other argument is text as given (a folder named ``2024`` or ``true`` stays a name).
QUERY_COUNTS = frozenset({"limit", "since"})
QUERY_FLAGS = frozenset({"skipped"})


def query_value(name: str, text: str) -> Any:
    """A query-string argument: a count or a flag where the name says so, else the text.

    A count that is not one (``limit=ten``) stays text, for the command to refuse.
    """
    if name in QUERY_FLAGS and text in ("true", "false"):
        return text == "true"
    if name in QUERY_COUNTS and text.isascii() and text.isdigit() and len(text) < 19:
        return int(text)
    return text


class BoundedRequest(server.Request):
    """A request whose body may not exceed ``MAX_BODY``: a bigger one is answered 413
    and the connection closed, before the body is read."""

    _seen = 0
    too_large = False

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > MAX_BODY:
            self._refuse()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.too_large:
            return
        self._seen += len(data)
        if self._seen > MAX_BODY:
            self._refuse()
            return
        super().handleContentChunk(data)

    def _refuse(self) -> None:
        self.too_large = True
        body = json.dumps({"error": "too_large",
                           "message": "request body over %d bytes" % MAX_BODY}).encode()
        transport = self.channel.transport
        transport.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Type: application/json\r\n"
                        b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        self.channel.loseConnection()

    def process(self) -> None:
        if not self.too_large:
            super().process()


class Gate(Resource):
    """The root: checks Host, Origin and credentials, then hands on."""

    _log = Logger()

    def __init__(self, guard: Guard, origins: Origins, api: Resource, tls: bool,
                 cookie_name: str) -> None:
        super().__init__()
        self.guard = guard
        self.origins = origins
        self.api = api
        self.tls = tls
        self.cookie_name = cookie_name.encode("ascii")
        self.static = Static()

    def getChildWithDefault(self, path: bytes, request: server.Request) -> Resource:
        for name, value in SECURITY_HEADERS.items():
            request.setHeader(name, value)
        host = header(request, b"host")
        if not self.origins.host_ok(host):
            return Refusal("forbidden", "request refused")
        origin = header(request, b"origin")
        if not self.origins.origin_ok(origin):
            return Refusal("forbidden", "request refused")
        if path == b"login":
            return Login(self)
        if path != b"rest":
            request.postpath.insert(0, path)
            request.prepath.pop()
            return self.static
        if header(request, b"sec-fetch-site") in ("cross-site", "same-site"):
            return Refusal("forbidden", "request refused")
        key = header(request, b"x-api-key")
        if key is not None:
            if self.guard.key_ok(key):
                return self.api
            return Refusal("unauthorized", "credentials required")
        cookie = request.getCookie(self.cookie_name)
        session = self.guard.session(cookie.decode("ascii", "replace") if cookie else None)
        if session is None:
            return Refusal("unauthorized", "credentials required")
        request.clearskies_session = session  # type: ignore[attr-defined]
        if request.method not in (b"GET", b"HEAD"):
            csrf = header(request, b"x-csrf-token")
            if not same(csrf, session.csrf):
                return Refusal("forbidden", "this request needs the X-CSRF-Token header")
        return self.api

    def cookie(self, session: Session) -> bytes:
        attributes = [b"%s=%s" % (self.cookie_name, session.token.encode("ascii")),
                      b"Path=/", b"HttpOnly", b"SameSite=Strict"]
        if self.tls:
            attributes.append(b"Secure")
        return b"; ".join(attributes)


class Refusal(Resource):
    """Any method, any path below: the same refusal."""

    isLeaf = True

    def __init__(self, code: str, message: str) -> None:
        super().__init__()
        self.code = code
        self.message = message

    def render(self, request: server.Request) -> bytes:
        if self.code == "unauthorized":
            request.setHeader(b"WWW-Authenticate", b'ApiKey realm="clearskies"')
        return send_error(request, self.code, self.message)


class Login(Resource):
    """``GET /login?token=…``: a one-time token becomes a session cookie, then ``/``."""

    isLeaf = True

    def __init__(self, gate: Gate) -> None:
        super().__init__()
        self.gate = gate

    def render_GET(self, request: server.Request) -> bytes:
        tokens = request.args.get(b"token") or [b""]
        session = self.gate.guard.use_login(tokens[0].decode("ascii", "replace"))
        if session is None:
            request.setResponseCode(403)
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            return (b"This login link was used already or has expired. "
                    b"Run `clearskies web` for a new one.\n")
        request.setHeader(b"Set-Cookie", self.gate.cookie(session))
        request.setResponseCode(303)
        request.setHeader(b"Location", b"/")
        return b""


class Static(Resource):
    """The UI's files, read once from the package (a fixed list: nothing else is served)."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.files: dict[str, tuple[bytes, str]] = {}
        if os.path.isdir(STATIC_DIR):
            for name in os.listdir(STATIC_DIR):
                kind = STATIC_TYPES.get(os.path.splitext(name)[1])
                if kind is not None:
                    with open(os.path.join(STATIC_DIR, name), "rb") as f:
                        self.files[name] = (f.read(), kind)

    def render_GET(self, request: server.Request) -> bytes:
        name = "/".join(p.decode("utf-8", "replace") for p in request.postpath) or "index.html"
        found = self.files.get(name)
        if found is None:
            return send_error(request, "not_found", "no such page")
        request.setHeader(b"Content-Type", found[1].encode("ascii"))
        if name != "index.html":
            request.setHeader(b"Cache-Control", b"no-cache")
        return found[0]


class Api(Resource):
    """``/rest/<command>``: the control commands, over HTTP."""

    _log = Logger()

    def __init__(self, dispatcher: Any, bus: EventBus, clock: Any,
                 extra: dict[str, Callable[[dict[str, Any]], Any]] | None = None,
                 thumbnails: Callable[[str, str, str | None], Deferred[bytes]] | None = None,
                 ) -> None:
        super().__init__()
        self.dispatcher = dispatcher
        self.bus = bus
        self.clock = clock
        self.extra = extra or {}
        self.putChild(b"events", Events(bus, clock))  # (clearskies.web.stream)
        self.putChild(b"session", SessionInfo())
        self.putChild(b"thumbnail", Thumbnail(thumbnails))  # (clearskies.web.thumbs)

    def getChild(self, path: bytes, request: server.Request) -> Resource:
        if request.postpath:
            return Refusal("not_found", "no such resource")
        try:
            name = path.decode("ascii")
        except UnicodeDecodeError:
            return Refusal("not_found", "no such resource")
        if not name or name in SOCKET_ONLY:
            return Refusal("not_found", "no such resource")
        return Command(self, name)

    def render(self, request: server.Request) -> bytes:
        return send_error(request, "not_found", "name a command: /rest/<command>")

    def run(self, kind: str, arguments: dict[str, Any]) -> Deferred[Any]:
        extra = self.extra.get(kind)
        if extra is not None:
            return maybeDeferred(extra, arguments)
        arguments = dict(arguments, type=kind)

        def call() -> Any:
            result = self.dispatcher.dispatch(arguments)
            if inspect.isawaitable(result) and not isinstance(result, Deferred):
                return Deferred.fromCoroutine(_await(result))
            return result
        return maybeDeferred(call)


async def _await(awaitable: Any) -> Any:
    return await awaitable


class Command(Resource):
    """One command: POST with a JSON body; GET with a query string for READ_ONLY ones."""

    isLeaf = True
    _log = Logger()

    def __init__(self, api: Api, kind: str) -> None:
        super().__init__()
        self.api = api
        self.kind = kind

    def render_GET(self, request: server.Request) -> Any:
        if self.kind not in READ_ONLY or b"clean" in request.args:
            request.setHeader(b"Allow", b"POST")
            return send_error(request, "method_not_allowed",
                              "%s changes things: use POST" % self.kind)
        arguments = {}
        for key, values in request.args.items():
            name = key.decode("utf-8", "replace")
            arguments[name] = query_value(name, values[-1].decode("utf-8", "replace"))
        return self._run(request, arguments)

    def render_POST(self, request: server.Request) -> Any:
        kind = (header(request, b"content-type") or "").split(";")[0].strip().lower()
        request.content.seek(0)
        body = request.content.read(MAX_BODY + 1)
        if body.strip() and kind != "application/json":
            return send_error(request, "unsupported_media_type",
                              "send the arguments as application/json")
        try:
            arguments = parse_body(body)
        except ControlError as e:
            return send_error(request, e.code, e.message)
        if "type" in arguments:
            return send_error(request, "bad_request", "the command is named by the URL, "
                              "not by a \"type\" argument")
        return self._run(request, arguments)

    def _run(self, request: server.Request, arguments: dict[str, Any]) -> Any:
        d = self.api.run(self.kind, arguments)
        d.addCallbacks(self._done, self._failed, callbackArgs=(request,),
                       errbackArgs=(request,))
        d.addErrback(self._log.failure, "HTTP reply to {kind} failed", kind=self.kind)
        return server.NOT_DONE_YET

    def _done(self, reply: Any, request: server.Request) -> None:
        if request._disconnected:
            return
        if reply is None:
            reply = {}
        try:
            body = send_json(request, 200, reply)
        except (TypeError, ValueError):
            self._log.failure("HTTP reply to {kind} is not JSON", kind=self.kind)
            body = send_error(request, "internal", "the reply could not be encoded")
        request.write(body)
        request.finish()

    def _failed(self, failure: Failure, request: server.Request) -> None:
        if failure.check(ControlError):
            body = send_error(request, failure.value.code, failure.value.message)
        else:
            self._log.failure("HTTP command {kind} failed", failure, kind=self.kind)
            body = send_error(request, "internal", "internal error while handling %r; the "
                              "daemon log has details" % self.kind)
        if not request._disconnected:
            request.write(body)
            request.finish()


class SessionInfo(Resource):
    """``GET /rest/session``: the CSRF token of this browser session; ``POST`` logs out."""

    isLeaf = True

    def render_GET(self, request: server.Request) -> bytes:
        session = getattr(request, "clearskies_session", None)
        return send_json(request, 200, {"csrf_token": session.csrf if session else None,
                                        "kind": "session" if session else "api_key"})

    def render_POST(self, request: server.Request) -> bytes:
        session = getattr(request, "clearskies_session", None)
        if session is not None:
            request.site.clearskies_guard.end_session(session)  # type: ignore[attr-defined]
        return send_json(request, 200, {})


class Channel(http.HTTPChannel):
    """One HTTP connection, counted by its site."""

    def connectionMade(self) -> None:
        self.site.open_connections += 1  # type: ignore[attr-defined]
        super().connectionMade()

    def connectionLost(self, reason: Failure) -> None:
        self.site.open_connections -= 1  # type: ignore[attr-defined]
        super().connectionLost(reason)


class Site(server.Site):
    """The API's site: bounded requests and connections, no tracebacks, quiet access log."""

    requestFactory = BoundedRequest
    protocol = Channel
    displayTracebacks = False

    def __init__(self, root: Resource, guard: Guard | None = None, **kwargs: Any) -> None:
        super().__init__(root, **kwargs)
        self.clearskies_guard = guard
        self.open_connections = 0

    def buildProtocol(self, addr: Any) -> Any:
        if self.open_connections >= MAX_CONNECTIONS:
            return None  # closed at once; the daemon carries on
        return super().buildProtocol(addr)

    def log(self, request: server.Request) -> None:
        pass  # the daemon log is not an access log (and URLs may hold login tokens)


def login_url(base: str, token: str) -> str:
    return "%s/login?token=%s" % (base, quote(token))


__all__ = ["Api", "Gate", "Site", "login_url"]
