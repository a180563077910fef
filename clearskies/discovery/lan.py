"""LAN discovery: announce our shares on the local network and hear others.

Every daemon sends a small JSON datagram per share ID and live access ID it
has (see ``protocol/discovery-lan.md``) to an IPv4 multicast group, and
optionally to the IPv4 broadcast address and the IPv6 all-nodes group.  What
we hear is only a *hint* that some host may have a share we also have: the
caller still connects and runs the authenticated handshake, so nothing here
is trusted beyond its syntax.

The module has the usual three layers: the codec and the hint filter are pure,
``LanDatagramProtocol`` only moves bytes, and ``LanDiscovery`` is the service
that owns the UDP ports and the announcement timer.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from clearskies.errors import ConfigurationError
from clearskies.interfaces import IDiscoverySource

DEFAULT_PORT = 60106
#: Organisation-local scope (RFC 2365, 239.192.0.0/14): routers at the edge of
#: a site drop it, and we send with TTL 1 anyway, so it never leaves the link.
DEFAULT_GROUP = "239.192.152.143"
IPV4_BROADCAST = "255.255.255.255"
IPV6_ALL_NODES = "ff02::1"

ANNOUNCEMENT_NAME = "ClearSkiesBroadcast"
ANNOUNCEMENT_VERSION = 1
#: Real announcements are about 150 bytes; anything larger is dropped unread.
MAX_DATAGRAM = 2048
#: Requests for a burst closer together than this are merged into one burst.
MIN_BURST_GAP = 2.0
#: The same hint (id, peer, host, port) is passed on at most once per window.
HINT_WINDOW = 10.0
#: How many recent hints are remembered; the oldest is forgotten beyond this.
MAX_RECENT_HINTS = 4096

_SHARE_ID = re.compile(r"[0-9a-f]{64}")
_PEER_ID = re.compile(r"[0-9a-f]{32}")
_ONION_VALUE = re.compile(r"[a-z2-7]{56}\.onion:([0-9]{1,5})")

_log = Logger()


@dataclass(frozen=True)
class Announcement:
    """One share ID (or access ID) that a peer says it serves on a TCP port.

    ``onion``: where the peer can also be reached through Tor,
    ``<name>.onion:<port>`` (the extension key ``tor``), or None.
    """

    id: str
    peer: str
    port: int
    onion: str | None = None


def _valid_onion(value: object) -> bool:
    """True for ``<56 base32 characters>.onion:<port 1-65535>``."""
    if not isinstance(value, str):
        return False
    match = _ONION_VALUE.fullmatch(value)
    return match is not None and 1 <= int(match.group(1)) <= 65535


def _valid(id: object, peer: object, port: object) -> bool:
    """True if the three fields have the syntax the protocol allows."""
    return (
        isinstance(id, str)
        and _SHARE_ID.fullmatch(id) is not None
        and isinstance(peer, str)
        and _PEER_ID.fullmatch(peer) is not None
        and type(port) is int
        and 1 <= port <= 65535
    )


def encode_announcement(id: str, peer: str, port: int, onion: str | None = None) -> bytes:
    """Return the datagram announcing share/access ``id`` of ``peer`` on TCP ``port``
    (and, with ``onion``, at ``<name>.onion:<port>`` through Tor).

    Raises ``ValueError`` for fields we would refuse from others, so a bug
    here never puts a malformed announcement on the network.
    """
    if not _valid(id, peer, port):
        raise ValueError(
            "an announcement needs a 64-hex-digit ID, a 32-hex-digit peer ID "
            "and a TCP port in 1-65535"
        )
    if onion is not None and not _valid_onion(onion):
        raise ValueError("an onion address is <56 base32 characters>.onion:<port>")
    message: dict[str, object] = {
        "name": ANNOUNCEMENT_NAME,
        "version": ANNOUNCEMENT_VERSION,
        "id": id,
        "peer": peer,
        "myport": port,
    }
    if onion is not None:
        message["tor"] = onion
    return json.dumps(message, separators=(",", ":")).encode("ascii")


def decode_announcement(data: bytes) -> Announcement | None:
    """Parse a received datagram, or return None if it is not a valid announcement.

    Anyone on the network can send us anything, so every failure is a quiet
    None: oversized, not UTF-8, not a JSON object, wrong name or version, or
    fields out of syntax.  Unknown extra keys are ignored, as everywhere in
    the protocol.
    """
    if len(data) > MAX_DATAGRAM:
        return None
    try:
        message = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(message, dict):
        return None
    if message.get("name") != ANNOUNCEMENT_NAME:
        return None
    version = message.get("version")
    if type(version) is not int or version != ANNOUNCEMENT_VERSION:
        return None
    id, peer, port = message.get("id"), message.get("peer"), message.get("myport")
    if not _valid(id, peer, port):
        return None
    # The Tor address is an extra hint: a malformed one is dropped, not the datagram.
    onion = message.get("tor")
    return Announcement(id=id, peer=peer, port=port,
                        onion=onion if _valid_onion(onion) else None)


class RecentHints:
    """Remembers recently passed hints so each is passed at most once per window.

    Bounded: beyond ``limit`` entries the oldest is forgotten, so a flood of
    distinct forged announcements costs memory proportional to ``limit`` only.
    """

    def __init__(self, window: float = HINT_WINDOW, limit: int = MAX_RECENT_HINTS) -> None:
        self._window = window
        self._limit = limit
        self._seen: dict[Hashable, float] = {}  # insertion order == time order

    def __len__(self) -> int:
        return len(self._seen)

    def admit(self, key: Hashable, now: float) -> bool:
        """Return True (and remember ``key``) unless it was admitted within the window."""
        last = self._seen.get(key)
        if last is not None and 0 <= now - last < self._window:
            return False
        self._seen.pop(key, None)
        self._forget_older_than(now - self._window)
        self._seen[key] = now
        while len(self._seen) > self._limit:
            del self._seen[next(iter(self._seen))]
        return True

    def _forget_older_than(self, cutoff: float) -> None:
        """Drop expired entries from the old end of the table."""
        while self._seen:
            oldest = next(iter(self._seen))
            if self._seen[oldest] > cutoff:
                break
            del self._seen[oldest]


class LanDatagramProtocol(DatagramProtocol):
    """Hands every received datagram and its sender's address to ``receive``."""

    def __init__(self, receive: Callable[[bytes, str], None]) -> None:
        self._receive = receive

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self._receive(datagram, addr[0])


def _plain_host(host: str) -> str:
    """Write an IPv4-mapped IPv6 address (from a dual-stack socket) as IPv4."""
    if host.startswith("::ffff:") and "." in host:
        return host[len("::ffff:"):]
    return host


@implementer(IDiscoverySource)
class LanDiscovery(Service):
    """Announces our IDs on the LAN and passes on what other daemons announce.

    ``get_announcements()`` returns what we serve right now, as
    ``(id, peer, tcp_port)`` tuples: every share ID and every live access ID,
    each with our peer ID for it.  ``on_hint(announcement, host)`` is called
    for announcements from other daemons about IDs we also announce.

    Announcements go out at start, every ``announce_interval`` seconds and
    after ``announce_now()``; bursts are at least ``MIN_BURST_GAP`` apart and
    requests in between are merged into one.  The UDP port is opened with
    address/port reuse so several daemons on one host all hear the group.
    """

    name = "lan-discovery"
    source = "lan"

    def __init__(
        self,
        reactor: Any,
        get_announcements: Callable[[], Iterable[tuple[str, str, int]]],
        on_hint: Callable[[Announcement, str], object],
        *,
        port: int = DEFAULT_PORT,
        group: str = DEFAULT_GROUP,
        interface: str = "0.0.0.0",
        broadcast: bool = False,
        ipv6: bool = False,
        announce_interval: float = 60.0,
        get_onion: Callable[[], str | None] | None = None,
    ) -> None:
        if type(port) is not int or not 1 <= port <= 65535:
            raise ConfigurationError(
                "LAN discovery port %r is not a UDP port; use 1-65535 (default %d)"
                % (port, DEFAULT_PORT)
            )
        try:
            group_address = ipaddress.IPv4Address(group)
        except ValueError:
            group_address = None
        if group_address is None or not group_address.is_multicast:
            raise ConfigurationError(
                "LAN discovery group %r is not an IPv4 multicast address; "
                "use one in 239.192.0.0/14 (default %s)" % (group, DEFAULT_GROUP)
            )
        try:
            ipaddress.IPv4Address(interface)
        except ValueError:
            raise ConfigurationError(
                "LAN discovery interface %r is not an IPv4 address; give the "
                "address of the network card to use, or 0.0.0.0 for the default"
                % (interface,)
            ) from None
        if not announce_interval > 0:
            raise ConfigurationError(
                "LAN announce interval must be a positive number of seconds"
            )
        self._reactor = reactor
        self._get_announcements = get_announcements
        self._get_onion = get_onion
        self._on_hint = on_hint
        self._port = port
        self._group = group
        self._interface = interface
        self._broadcast = broadcast
        self._ipv6 = ipv6
        self._interval = announce_interval

        self._recent = RecentHints()
        self._own_peers: frozenset[str] = frozenset()
        self._own_ids: frozenset[str] = frozenset()
        self._ports: list[IListeningPort] = []
        self._targets: list[tuple[Any, tuple[str, int]]] = []
        self._loop: LoopingCall | None = None
        self._pending: Any = None  # IDelayedCall of a postponed burst
        self._last_burst = float("-inf")

    @property
    def listening(self) -> bool:
        """True while the UDP port(s) are open (False if opening them failed)."""
        return bool(self._targets)

    # -- lifetime ----------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        try:
            self._listen()
        except Exception:
            _log.failure(
                "LAN discovery is off: cannot open UDP port {port} for group "
                "{group} on interface {interface}; choose another port or "
                "interface, or turn LAN discovery off",
                port=self._port, group=self._group, interface=self._interface,
            )
            self._close_ports()
            return
        self._loop = LoopingCall(self._request_burst)
        self._loop.clock = self._reactor
        self._loop.start(self._interval, now=True)

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._pending = None
        return self._close_ports()

    def _listen(self) -> None:
        """Open the IPv4 (and optionally IPv6) ports and configure multicast."""
        v4 = self._reactor.listenMulticast(
            self._port, LanDatagramProtocol(self._receive),
            maxPacketSize=MAX_DATAGRAM + 1, listenMultiple=True,
        )
        self._ports.append(v4)
        v4.setTTL(1)
        v4.setLoopbackMode(True)
        # Both calls take IP literals (checked in __init__), so their Deferreds
        # have already fired; a failure here is a failure to start.
        _raise_if_failed(v4.setOutgoingInterface(self._interface))
        _raise_if_failed(v4.joinGroup(self._group, self._interface))
        self._targets.append((v4, (self._group, self._port)))
        if self._broadcast:
            v4.setBroadcastAllowed(True)
            self._targets.append((v4, (IPV4_BROADCAST, self._port)))
        if self._ipv6:
            self._listen_ipv6()

    def _listen_ipv6(self) -> None:
        """Add the IPv6 port; without IPv6 on this host, carry on with IPv4 alone."""
        try:
            v6 = self._reactor.listenMulticast(
                self._port, LanDatagramProtocol(self._receive), interface="::",
                maxPacketSize=MAX_DATAGRAM + 1, listenMultiple=True,
            )
        except Exception:
            _log.failure(
                "IPv6 LAN discovery is off: cannot open UDP port {port} on ::; "
                "IPv4 announcements go on",
                port=self._port,
            )
            return
        # Every IPv6 interface is already in ff02::1, so no join is needed;
        # the kernel picks the outgoing interface.
        self._ports.append(v6)
        v6.setLoopbackMode(True)
        self._targets.append((v6, (IPV6_ALL_NODES, self._port)))

    def _close_ports(self) -> Deferred[Any]:
        ports, self._ports, self._targets = self._ports, [], []
        return gatherResults([maybeDeferred(p.stopListening) for p in ports])

    # -- sending -----------------------------------------------------------

    def announce_now(self) -> None:
        """Announce soon because a share or access code was added (or the network changed)."""
        if not self._targets:
            return  # not listening; startService announces anyway
        self._request_burst()
        if self._pending is not None:
            # The burst is postponed: learn new IDs now so their hints pass.
            self._refresh_own()

    def announce_changed(self) -> None:
        """What we announce changed (``IDiscoverySource``): :meth:`announce_now`."""
        self.announce_now()

    def _request_burst(self) -> None:
        """Send a burst now, or once ``MIN_BURST_GAP`` has passed since the last one."""
        if self._pending is not None:
            return  # one burst is already due; it will carry this request too
        wait = self._last_burst + MIN_BURST_GAP - self._reactor.seconds()
        if wait <= 0:
            self._burst()
        else:
            self._pending = self._reactor.callLater(wait, self._postponed_burst)

    def _postponed_burst(self) -> None:
        self._pending = None
        self._burst()

    def _burst(self) -> None:
        """Send every current announcement to every destination."""
        self._last_burst = self._reactor.seconds()
        announcements = self._refresh_own()
        onion = self._our_onion()
        failed: set[tuple[str, int]] = set()
        for a in announcements:
            datagram = encode_announcement(a.id, a.peer, a.port, onion)
            for transport, destination in self._targets:
                if destination in failed:
                    continue
                try:
                    transport.write(datagram, destination)
                except OSError as e:
                    failed.add(destination)
                    _log.warn(
                        "cannot send LAN announcements to {host} port {port}: {error}",
                        host=destination[0], port=destination[1], error=e,
                    )
        _log.debug("announced {count} IDs on the LAN", count=len(announcements))

    def _our_onion(self) -> str | None:
        """Our ``<name>.onion:<port>`` to add to each announcement, if we have one."""
        if self._get_onion is None:
            return None
        try:
            onion = self._get_onion()
        except Exception:
            _log.failure("cannot get our onion address for LAN announcements")
            return None
        if onion is not None and not _valid_onion(onion):
            _log.error("not announcing a malformed onion address on the LAN")
            return None
        return onion

    def _refresh_own(self) -> list[Announcement]:
        """Ask what we announce now; remember our peer IDs and IDs for filtering."""
        try:
            entries = [tuple(entry) for entry in self._get_announcements()]
        except Exception:
            _log.failure("cannot list the IDs to announce on the LAN")
            return []
        announcements = []
        for entry in entries:
            if len(entry) == 3 and _valid(*entry):
                announcements.append(Announcement(*entry))
            else:
                # Not logged: a mistaken entry might hold a key or a code.
                _log.error("not announcing a malformed (id, peer, port) entry")
        self._own_peers = frozenset(a.peer for a in announcements)
        self._own_ids = frozenset(a.id for a in announcements)
        return announcements

    # -- receiving ---------------------------------------------------------

    def _receive(self, datagram: bytes, host: str) -> None:
        """Pass on a valid, new announcement from another daemon about an ID of ours."""
        announcement = decode_announcement(datagram)
        if announcement is None:
            return
        if announcement.peer in self._own_peers:
            return  # our own, looped back (or a copy of it)
        if announcement.id not in self._own_ids:
            return  # a share we neither have nor hold a code for
        host = _plain_host(host)
        key = (announcement.id, announcement.peer, host, announcement.port)
        if not self._recent.admit(key, self._reactor.seconds()):
            return
        try:
            self._on_hint(announcement, host)
        except Exception:
            _log.failure("LAN hint handler failed for {host}", host=host)


def _raise_if_failed(d: Deferred[Any]) -> None:
    """Re-raise the failure of an already-fired Deferred (and consume it)."""
    result: list[Any] = []
    d.addBoth(result.append)
    if result and isinstance(result[0], Failure):
        result[0].raiseException()


__all__ = [
    "Announcement",
    "DEFAULT_GROUP",
    "DEFAULT_PORT",
    "LanDatagramProtocol",
    "LanDiscovery",
    "RecentHints",
    "decode_announcement",
    "encode_announcement",
]
