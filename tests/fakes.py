"""Fakes of the seams in clearskies.interfaces, shared by the tests.

Each fake says which interface it stands in for; tests check it with
``zope.interface.verify.verifyObject``.
"""

from __future__ import annotations


# --- discovery sources and transports ---------------------------------------

from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from clearskies.addresses import Address
from clearskies.interfaces import IDiscoverySource, IPeerTransport


@implementer(IDiscoverySource)
class FakeDiscoverySource(Service):
    """An ``IDiscoverySource`` a test drives: :meth:`find` reports a candidate through
    ``found``; ``announced`` counts :meth:`announce_changed` calls."""

    def __init__(self, found: Callable[[str, Address, str | None, str], None],
                 registrations: Callable[[], list[tuple[str, str]]] | None = None,
                 source: str = "tracker", name: str | None = None) -> None:
        self.found = found
        self.registrations = registrations
        self.source = source
        self.name = name
        self.announced = 0

    def find(self, target_id: str, address: Address, peer_id: str | None = None) -> None:
        self.found(target_id, address, peer_id, self.source)

    def announce_changed(self) -> None:
        self.announced += 1


class FakeEndpoint:
    """A client endpoint whose ``connect`` never completes; it records the factories."""

    def __init__(self, address: Address) -> None:
        self.address = address
        self.factories: list[Any] = []

    def connect(self, factory: Any) -> Deferred[Any]:
        self.factories.append(factory)
        return Deferred()


@implementer(IPeerTransport)
class FakeTransport:
    """An ``IPeerTransport`` that reaches what ``reaches(address)`` says; ``dialled``
    lists the addresses it made endpoints for.  With ``refuse`` set, every
    ``endpoint_for`` fails with it."""

    def __init__(self, name: str, reaches: Callable[[Address], bool],
                 own: list[Address] | None = None, refuse: Exception | None = None) -> None:
        self.name = name
        self._reaches = reaches
        self._own = list(own or [])
        self._refuse = refuse
        self.dialled: list[Address] = []

    def can_reach(self, address: Address) -> bool:
        return self._reaches(address)

    def endpoint_for(self, address: Address) -> Deferred[Any]:
        self.dialled.append(address)
        if self._refuse is not None:
            return fail(self._refuse)
        return succeed(FakeEndpoint(address))

    def own_addresses(self) -> list[Address]:
        return list(self._own)


# --- end of discovery sources and transports ---------------------------------
