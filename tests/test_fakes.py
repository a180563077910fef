"""The shared fakes (tests/fakes.py) offer what the seams they stand in for offer.

Seams that are zope interfaces are checked with ``verifyObject``.  The
session a peer connection drives is still a ``typing.Protocol``
(``clearskies.peer.Session``); it is checked member by member here.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import (
    IHandshakeListener, IProtocol, IStreamClientEndpoint, ITLSTransport)
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from clearskies.handshake import ConnectTarget, MemoryKeyRing
from clearskies.keys import generate_share_keys
from clearskies.peer import PeerClientFactory, Session
from clearskies.interfaces import ILocalShare
from tests.fakes import (
    FakeConnection, MemoryEndpoint, MemoryNetwork, MemoryShare, QuietSession, RecordingProtocol,
    TLSTransport)


def _members(protocol_class: type) -> dict[str, Any]:
    """The attributes and methods a ``typing.Protocol`` class declares."""
    names = set(getattr(protocol_class, "__annotations__", {}))
    names |= {n for n, v in vars(protocol_class).items()
              if not n.startswith("_") and callable(v)}
    return {n: vars(protocol_class).get(n) for n in sorted(names)}


def _missing_or_different(fake: Any, protocol_class: type) -> list[str]:
    """Members of ``protocol_class`` that ``fake`` lacks, or takes other parameters for."""
    wrong = []
    for name, declared in _members(protocol_class).items():
        if not hasattr(fake, name):
            wrong.append(name)
        elif callable(declared):
            expected = list(inspect.signature(declared).parameters)[1:]  # without self
            if list(inspect.signature(getattr(fake, name)).parameters) != expected:
                wrong.append(name)
    return wrong


def test_memory_share_offers_all_of_local_share(tmp_path: Path) -> None:
    """MemoryShare provides ILocalShare, every member with the same parameters."""
    assert verifyObject(ILocalShare, MemoryShare(tmp_path))


def test_quiet_session_is_a_session() -> None:
    """QuietSession has every member of the Session seam, with the same parameters."""
    assert _missing_or_different(QuietSession(object()), Session) == []


def test_fake_connection_offers_what_sessions_use_of_a_peer_connection() -> None:
    """FakeConnection's established, transport, close and message_writer exist on PeerProtocol."""
    keys = generate_share_keys(rsa_bits=1024)
    factory = PeerClientFactory(Clock(), MemoryKeyRing(), "x", QuietSession,
                                ConnectTarget.share(keys, "1" * 32))
    real = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    fake = FakeConnection()
    for name in ("established", "transport", "close", "message_writer"):
        assert hasattr(fake, name) and hasattr(real, name), name
    assert (list(inspect.signature(fake.close).parameters)
            == list(inspect.signature(real.close).parameters))


def test_memory_transport_and_endpoint_provide_their_interfaces() -> None:
    """The in-memory transport is an ITLSTransport, its endpoint an IStreamClientEndpoint."""
    clock = Clock()
    here = IPv4Address("TCP", "127.0.0.1", 1)
    assert verifyObject(ITLSTransport, TLSTransport(Protocol(), False, here, here, clock))
    assert verifyObject(IStreamClientEndpoint, MemoryEndpoint(MemoryNetwork(clock), 1))


def test_recording_protocol_is_a_protocol_and_handshake_listener() -> None:
    """RecordingProtocol provides IProtocol and IHandshakeListener."""
    assert verifyObject(IProtocol, RecordingProtocol())
    assert verifyObject(IHandshakeListener, RecordingProtocol())


def test_memory_network_closes_what_the_listener_refuses() -> None:
    """A listener whose factory builds no protocol closes the connection at once, as a port does."""

    class Refusing:
        def doStart(self) -> None:
            pass

        def doStop(self) -> None:
            pass

        def buildProtocol(self, addr: Any) -> None:
            return None

    net = MemoryNetwork(Clock())
    address = net.listen(Refusing())
    client = RecordingProtocol()
    net.connect(address.port, client)
    net.flush()
    assert client.lost is not None and client.data == b""
