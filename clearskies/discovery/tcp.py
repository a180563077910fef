"""Plain TCP: the transport every daemon has (``tcp:`` addresses, protocol/discovery.md).

Tor is the other one (``clearskies.daemon.tor.TorLink``); under --tor-only it
takes ``tcp:`` addresses too, and the daemon asks it first.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet import endpoints
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IStreamClientEndpoint
from zope.interface import implementer

from clearskies.addresses import Address, make_address
from clearskies.interfaces import IPeerTransport


@implementer(IPeerTransport)
class TcpTransport:
    """Dials ``tcp:`` addresses directly; ``port()`` is the TCP port we listen on (0: none)."""

    name = "tcp"

    def __init__(self, reactor: Any, port: Callable[[], int]) -> None:
        self._reactor = reactor
        self._port = port

    def can_reach(self, address: Address) -> bool:
        return address.proto == "tcp"

    def endpoint_for(self, address: Address) -> Deferred[IStreamClientEndpoint]:
        return succeed(endpoints.clientFromString(self._reactor, address.endpoint_string()))

    def own_addresses(self) -> list[Address]:
        """Our listening port on both loopback addresses (what a peer list may hold of us)."""
        port = self._port()
        if not port:
            return []
        return [make_address("tcp", "127.0.0.1", port), make_address("tcp", "::1", port)]
