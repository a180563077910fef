"""Where the HTTP API listens (protocol/http-api.md, "Where"), and its API key file.

By default on ``DEFAULT_WEB`` (127.0.0.1 only), or any free loopback port
when that one is taken.  A chosen endpoint that is not loopback MUST be TLS
(``ssl:…`` with a certificate and key); it is then served with a loud
warning in the log.  Plain ``tcp:`` on another address is refused.
"""

from __future__ import annotations

import ipaddress
import os
import re
from typing import Any

from twisted.application.service import Service
from twisted.internet import endpoints
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.web.resource import Resource

from clearskies.atomicwrite import install_atomically
from clearskies.errors import ConfigurationError
from clearskies.events import EventBus
from clearskies.web.api import Api, Gate, Site, login_url
from clearskies.web.auth import Guard, Origins, new_token
from clearskies.web.qr import qr_svg

#: The API's default endpoint (the peer port + 74: 60180).
DEFAULT_WEB = "tcp:60180:interface=127.0.0.1"
#: Where a free port is taken when the default one is busy.
FALLBACK_WEB = "tcp:0:interface=127.0.0.1"
#: The API key's file in the data directory (mode 0600).
API_KEY_NAME = "web-api-key"


def endpoint_parts(description: str) -> tuple[str, dict[str, str]]:
    """``tcp:8080:interface=\\:\\:1`` → ``("tcp", {"port": "8080", "interface": "::1"})``
    (colons inside a value are escaped with a backslash, as Twisted's endpoints want)."""
    kind, _, rest = description.partition(":")
    fields: dict[str, str] = {}
    parts = [p.replace("\\:", ":") for p in re.split(r"(?<!\\):", rest) if p]
    for i, part in enumerate(parts):
        name, equals, value = part.partition("=")
        if equals:
            fields[name] = value
        elif i == 0:
            fields["port"] = part
    return kind, fields


def check_web_endpoint(description: str) -> tuple[bool, str | None]:
    """Whether ``description`` is TLS, and its interface when not loopback (None if loopback).

    Raises ``ConfigurationError`` for anything that is neither loopback ``tcp:``
    nor ``ssl:`` with a certificate.
    """
    kind, fields = endpoint_parts(description)
    if kind not in ("tcp", "ssl"):
        raise ConfigurationError("--web wants tcp:PORT:interface=127.0.0.1, or ssl:PORT:"
                                 "privateKey=KEY.pem:certKey=CERT.pem for TLS; got %r"
                                 % description)
    port = fields.get("port", "")
    if not port.isdigit() or int(port) > 65535:
        raise ConfigurationError("--web %s: the port must be a number" % description)
    interface = fields.get("interface", "")
    try:
        loopback = bool(interface) and ipaddress.ip_address(interface).is_loopback
    except ValueError:
        raise ConfigurationError("--web %s: interface must be an IP address" % description) \
            from None
    tls = kind == "ssl"
    if tls and not fields.get("privateKey"):
        raise ConfigurationError("--web %s: TLS needs privateKey=KEY.pem (and certKey=)"
                                 % description)
    if not loopback and not tls:
        raise ConfigurationError(
            "--web %s would serve the API beyond this machine without TLS; use "
            "interface=127.0.0.1, or TLS: ssl:PORT:interface=ADDRESS:privateKey=KEY.pem:"
            "certKey=CERT.pem" % description)
    return tls, None if loopback else (interface or "0.0.0.0")


def read_or_make_key(data_dir: str) -> str:
    """The API key in ``<data_dir>/web-api-key``, made (mode 0600) when missing."""
    path = os.path.join(data_dir, API_KEY_NAME)
    try:
        with open(path, encoding="ascii") as f:
            key = f.read().strip()
        if len(key) >= 32:
            os.chmod(path, 0o600)
            return key
    except (OSError, UnicodeDecodeError):
        pass
    key = new_token()
    temporary = path + ".new"
    try:
        os.unlink(temporary)
    except FileNotFoundError:
        pass
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    install_atomically(fd, temporary, path, (key + "\n").encode("ascii"))
    return key


def _url_host(address: str) -> str:
    """An address as a URL's host: IPv6 in brackets."""
    return "[%s]" % address if ":" in address else address


class WebListener(Service):
    """The HTTP API's listening port; ``login()`` makes one-time login URLs."""

    _log = Logger()

    def __init__(self, reactor: Any, data_dir: str, dispatcher: Any, bus: EventBus,
                 description: str | None, thumbnails: Any = None) -> None:
        self.reactor = reactor
        self.data_dir = data_dir
        self.dispatcher = dispatcher
        self.bus = bus
        self.description = description
        self.thumbnails = thumbnails
        self.port: IListeningPort | None = None
        self.guard: Guard | None = None
        self.base_url: str | None = None

    async def listen(self) -> None:
        chosen = self.description is not None
        description = self.description or DEFAULT_WEB
        tls, exposed = check_web_endpoint(description)
        key = read_or_make_key(self.data_dir)
        self.guard = Guard(key, self.reactor.seconds)
        api = Api(self.dispatcher, self.bus, self.reactor, extra={"qr": qr_svg},
                  thumbnails=self.thumbnails)
        try:
            self.port = await self._listen(description, api, tls, exposed)
        except ConfigurationError:
            if chosen:
                raise
            self._log.info("port {listen} is taken; the web UI listens on a free port instead",
                           listen=description)
            self.port = await self._listen(FALLBACK_WEB, api, tls, exposed)
        port = self.port.getHost().port
        scheme = "https" if tls else "http"
        # (Bound to every address: the login URL is for this machine's browser.)
        named = _url_host(exposed) if exposed not in (None, "0.0.0.0", "::") else "127.0.0.1"
        self.base_url = "%s://%s:%d" % (scheme, named, port)
        if exposed:
            self._log.warn(
                "THE WEB UI AND HTTP API ARE REACHABLE FROM THE NETWORK at {url} (TLS). Anyone "
                "who gets the API key or a login link controls this daemon.", url=self.base_url)
        self._log.info("web UI and HTTP API at {url} (open it with `clearskies web`)",
                       url=self.base_url)

    async def _listen(self, description: str, api: Api, tls: bool,
                      exposed: str | None) -> IListeningPort:
        endpoint = endpoints.serverFromString(self.reactor, description)
        try:
            site = Site(_Placeholder())
            port = await endpoint.listen(site)
        except Exception as e:
            raise ConfigurationError("cannot listen for the web UI on %s: %s"
                                     % (description, e)) from None
        number = port.getHost().port
        hosts = [_url_host(exposed)] if exposed and exposed not in ("0.0.0.0", "::") else []
        origins = Origins(number, tls, hosts)
        gate = Gate(self.guard, origins, api, tls, "clearskies_%d" % number)
        site.resource = gate
        site.clearskies_guard = self.guard
        return port

    def login(self) -> dict[str, Any] | None:
        if self.guard is None or self.base_url is None:
            return None
        token, expires = self.guard.new_login()
        return {"url": login_url(self.base_url, token), "expires": expires,
                "base_url": self.base_url}

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self.port is None:
            return succeed(None)
        return maybeDeferred(self.port.stopListening)


class _Placeholder(Resource):
    """The root until the real one (whose Host check needs the port) is in place."""

    isLeaf = True

    def render(self, request: Any) -> bytes:
        request.setResponseCode(503)
        return b""
