"""SOCKS5 CONNECT by host name, for streams through tor's SOCKS port.

Onion names must reach tor unresolved, so the request carries the host name
(address type 3) and no DNS lookup ever happens here.  The exchange is the
plain RFC 1928 one without authentication: method selection, one CONNECT
request, one reply, then the stream belongs to the wrapped protocol.

Bytes that arrive in the same read as the SOCKS reply already belong to the
stream and are handed on at once.  This matters for us: in the peer protocol
the server speaks first, and its greeting often travels right behind tor's
reply; holding it back until more data comes (as txtorcon's stream endpoint
does) would leave both ends waiting for each other until the handshake times
out.

:class:`SocksHandshake` is the pure exchange; :class:`SocksClientEndpoint`
runs it over any stream endpoint (tor's UNIX or TCP SOCKS listener).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import HostnameAddress
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

VERSION = 5
NO_AUTHENTICATION = 0
CONNECT = 1
ADDRESS_IPV4, ADDRESS_NAME, ADDRESS_IPV6 = 1, 3, 4
SUCCEEDED = 0

#: Reply codes of RFC 1928, and the ones tor adds for onion services when the
#: SOCKS port has the ``ExtendedErrors`` flag.
REPLY_MEANINGS = {
    0x01: "general SOCKS server failure",
    0x02: "connection not allowed by the proxy's rules",
    0x03: "network unreachable",
    0x04: "host unreachable",
    0x05: "connection refused",
    0x06: "timed out (TTL expired)",
    0x07: "command not supported",
    0x08: "address type not supported",
    0xF0: "onion service descriptor cannot be found (the service may be offline "
          "or not yet published)",
    0xF1: "onion service descriptor is invalid",
    0xF2: "onion service introduction failed",
    0xF3: "onion service rendezvous failed",
    0xF4: "onion service wants client authorization",
    0xF5: "onion service rejected our client authorization",
    0xF6: "onion address is invalid",
    0xF7: "onion service introduction timed out",
}


class SocksError(ConnectionError):
    """The SOCKS proxy refused or garbled the connection; ``code`` is its reply code, if any."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


def describe_reply(code: int) -> str:
    return REPLY_MEANINGS.get(code, "unknown SOCKS reply code 0x%02x" % code)


class SocksHandshake:
    """The client side of a SOCKS5 CONNECT, without I/O.

    Call :meth:`start` for the first bytes to send, then feed everything the
    proxy sends to :meth:`receive_data`, sending what it returns.  Once
    :attr:`done`, :meth:`take_leftover` returns bytes that already belong to
    the stream.  Any refusal or malformed reply raises :class:`SocksError`.
    """

    def __init__(self, host: str, port: int) -> None:
        try:
            name = host.encode("ascii")
        except UnicodeEncodeError:
            raise ValueError("%r is not an ASCII host name" % (host,)) from None
        if not 1 <= len(name) <= 255:
            raise ValueError("a host name must have 1 to 255 characters, not %d" % len(name))
        if not 1 <= port <= 65535:
            raise ValueError("port %d is outside 1-65535" % port)
        self.host = host
        self.port = port
        self._name = name
        self._buffer = b""
        self._state = "unstarted"

    @property
    def done(self) -> bool:
        return self._state == "done"

    def start(self) -> bytes:
        """The method selection: SOCKS 5, one method, no authentication."""
        if self._state != "unstarted":
            raise RuntimeError("the SOCKS exchange has already started")
        self._state = "method"
        return bytes([VERSION, 1, NO_AUTHENTICATION])

    def receive_data(self, data: bytes) -> bytes:
        """Consume bytes from the proxy; return what to send next (maybe nothing)."""
        if self._state in ("unstarted", "failed"):
            raise RuntimeError("the SOCKS exchange is not running")
        self._buffer += data
        if self._state == "done":
            return b""
        try:
            return self._advance()
        except SocksError:
            self._state = "failed"
            raise

    def take_leftover(self) -> bytes:
        """Stream bytes that came after the reply (only once :attr:`done`)."""
        if self._state != "done":
            raise RuntimeError("the SOCKS exchange has not finished")
        rest, self._buffer = self._buffer, b""
        return rest

    def _advance(self) -> bytes:
        if self._state == "method":
            if len(self._buffer) < 2:
                return b""
            version, method = self._buffer[0], self._buffer[1]
            self._buffer = self._buffer[2:]
            if version != VERSION:
                raise SocksError("the proxy does not speak SOCKS 5 (it answered version %d)"
                                 % version)
            if method != NO_AUTHENTICATION:
                raise SocksError("the proxy wants authentication (method 0x%02x); "
                                 "only unauthenticated SOCKS 5 is supported" % method)
            self._state = "reply"
            request = bytes([VERSION, CONNECT, 0, ADDRESS_NAME, len(self._name)])
            return request + self._name + self.port.to_bytes(2, "big") + self._advance()
        if self._state == "reply":
            length = self._reply_length()
            if length is None or len(self._buffer) < length:
                return b""
            code = self._buffer[1]
            if code != SUCCEEDED:
                raise SocksError("cannot reach %s:%d through the proxy: %s"
                                 % (self.host, self.port, describe_reply(code)), code)
            self._buffer = self._buffer[length:]
            self._state = "done"
        return b""

    def _reply_length(self) -> int | None:
        """Length of the whole reply, once its header says; None while too short."""
        if len(self._buffer) < 2:
            return None
        if self._buffer[0] != VERSION:
            raise SocksError("malformed SOCKS reply (version %d)" % self._buffer[0])
        if self._buffer[1] != SUCCEEDED:
            # A refusal may come with a truncated address; its code is all we need.
            return 2
        if len(self._buffer) < 5:
            return None
        kind = self._buffer[3]
        if kind == ADDRESS_IPV4:
            return 4 + 4 + 2
        if kind == ADDRESS_IPV6:
            return 4 + 16 + 2
        if kind == ADDRESS_NAME:
            return 4 + 1 + self._buffer[4] + 2
        raise SocksError("malformed SOCKS reply (address type %d)" % kind)


class _SocksProtocol(Protocol):
    """Runs the SOCKS exchange, then passes the transport and all data to the wrapped protocol."""

    def __init__(self, handshake: SocksHandshake, wrapped_factory: IProtocolFactory,
                 connected: Deferred[Any]) -> None:
        self._handshake = handshake
        self._wrapped_factory = wrapped_factory
        self._connected = connected
        self.wrapped: Protocol | None = None

    def connectionMade(self) -> None:
        if self._connected.called:  # cancelled while connecting to the proxy
            self.transport.abortConnection()
            return
        self.transport.write(self._handshake.start())

    def dataReceived(self, data: bytes) -> None:
        if self.wrapped is not None:
            self.wrapped.dataReceived(data)
            return
        if self._connected.called:
            return
        try:
            reply = self._handshake.receive_data(data)
        except SocksError as e:
            self._fail(Failure(e))
            return
        if reply:
            self.transport.write(reply)
        if self._handshake.done:
            self._hand_over()

    def _hand_over(self) -> None:
        address = HostnameAddress(self._handshake.host.encode("ascii"), self._handshake.port)
        wrapped = self._wrapped_factory.buildProtocol(address)
        if wrapped is None:
            self._fail(Failure(SocksError("the connection to %s:%d was refused locally"
                                          % (self._handshake.host, self._handshake.port))))
            return
        self.wrapped = wrapped
        wrapped.makeConnection(self.transport)
        self._connected.callback(wrapped)
        leftover = self._handshake.take_leftover()
        if leftover:
            wrapped.dataReceived(leftover)

    def _fail(self, failure: Failure) -> None:
        if not self._connected.called:
            self._connected.errback(failure)
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self.wrapped is not None:
            self.wrapped.connectionLost(reason)
        elif not self._connected.called:
            self._connected.errback(Failure(SocksError(
                "the SOCKS proxy closed the connection to %s:%d before answering (%s)"
                % (self._handshake.host, self._handshake.port, reason.getErrorMessage()))))


class _SocksFactory(Factory):
    def __init__(self, handshake: SocksHandshake, wrapped_factory: IProtocolFactory,
                 connected: Deferred[Any]) -> None:
        self._handshake = handshake
        self._wrapped_factory = wrapped_factory
        self._connected = connected
        self.protocol_instance: _SocksProtocol | None = None

    def buildProtocol(self, addr: IAddress) -> _SocksProtocol:
        self.protocol_instance = _SocksProtocol(self._handshake, self._wrapped_factory,
                                                self._connected)
        return self.protocol_instance


@implementer(IStreamClientEndpoint)
class SocksClientEndpoint:
    """Connects to ``host:port`` through the SOCKS 5 proxy at ``proxy``.

    ``connect`` fires with the wrapped protocol once the proxy reports the
    stream open, fails with :class:`SocksError` when it refuses, and aborts
    the attempt when cancelled.
    """

    def __init__(self, proxy: IStreamClientEndpoint, host: str, port: int) -> None:
        SocksHandshake(host, port)  # validate now, not at connect time
        self.proxy = proxy
        self.host = host
        self.port = port

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[Any]:
        factory: _SocksFactory

        def cancel(_: Deferred[Any]) -> None:
            socks = factory.protocol_instance
            if socks is not None and socks.transport is not None:
                socks.transport.abortConnection()
            else:
                to_proxy.cancel()

        connected: Deferred[Any] = Deferred(cancel)
        factory = _SocksFactory(SocksHandshake(self.host, self.port), protocolFactory, connected)
        to_proxy = self.proxy.connect(factory)

        def proxy_failed(failure: Failure) -> None:
            if not connected.called:
                connected.errback(failure)

        to_proxy.addErrback(proxy_failed)
        return connected

    def __repr__(self) -> str:
        return "<SocksClientEndpoint %s:%d via %r>" % (self.host, self.port, self.proxy)
