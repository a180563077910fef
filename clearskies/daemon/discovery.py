"""Discovery sources: what we announce (shares, live codes, pending attaches) on
the LAN and to trackers, and the peers they find (protocol/discovery.md).

Every way of finding peers is an ``IDiscoverySource``: the peers we know
(manual and remembered, from :class:`~clearskies.daemon.dialling.Dialling`), the
LAN announcer and one tracker client per tracker.  They are kept in one list,
started as children of the daemon, told together when what we announce changes,
and report their candidates through one callback to the dialler.
"""

from __future__ import annotations

from typing import Any, Callable

from clearskies.addresses import Address, make_address
from clearskies.daemon.codes import AccessCodes
from clearskies.daemon.dialling import Dialling
from clearskies.daemon.options import DaemonSettings
from clearskies.daemon.shares import Shares
from clearskies.daemon.known import REMEMBERED_INTERVAL
from clearskies.daemon.tor import TorLink
from clearskies.interfaces import IDiscoverySource

__all__ = ["REMEMBERED_INTERVAL", "Discovery"]


class Discovery:
    """The discovery sources (``sources``), children of the daemon once :meth:`start`
    ran; ``port`` gives our listening TCP port.  ``lan`` (or None) and ``trackers``
    name the LAN announcer and the tracker clients among them."""

    def __init__(self, reactor: Any, settings: DaemonSettings, shares: Shares,
                 codes: AccessCodes, dialling: Dialling, tor: TorLink,
                 port: Callable[[], int]) -> None:
        self.reactor = reactor
        self._settings = settings
        self._shares = shares
        self._codes = codes
        self._dialling = dialling
        self._tor = tor
        self._port = port
        self._parent: Any = None
        self.sources: list[IDiscoverySource] = []
        self.lan: Any = None
        self.trackers: list[Any] = []

    def registrations(self) -> list[tuple[str, str]]:
        """(ID, our peer ID) for every share, live code and pending join: what we announce."""
        shares = self._shares.by_id
        out = [(share_id, runtime.peer_id) for share_id, runtime in shares.items()]
        for code in list(self._codes.codes.values()):
            if self._codes.live_code(code.access_id) is not None:
                out.append((code.access_id, shares[code.share_id].peer_id))
        out.extend((join.access_id, join.peer_id) for join in self._codes.joins.values()
                   if join.failed is None)
        return out

    def advertised_addresses(self) -> list[Address]:
        """Addresses we tell trackers and peers about beyond what they see themselves:
        our onion address once it is published (protocol/sync.md, "Addresses")."""
        return self._tor.own_addresses()

    def start(self, parent: Any) -> None:
        """Start the sources, children of ``parent``: the peers we know (the remembered
        ones at once too: a restarted daemon finds them without any other source),
        the LAN and the trackers."""
        self._parent = parent
        for source in self._dialling.known_sources():
            self.add_source(source)
        if self._settings.lan and not self._tor.tor_only:
            self.lan = self._lan_source()
            self.add_source(self.lan)
        if not self._tor.tor_only:  # under --tor-only: once Tor is ready (tor_ready)
            self.start_trackers()

    def add_source(self, source: IDiscoverySource) -> None:
        """One more way of finding peers; it starts at once if the daemon runs."""
        self.sources.append(source)
        if self._parent is not None:
            source.setServiceParent(self._parent)

    def _lan_source(self) -> IDiscoverySource:
        from clearskies.discovery.lan import DEFAULT_GROUP, LanDiscovery

        found = self._dialling.add_candidate

        def announcements() -> list[tuple[str, str, int]]:
            return [(i, p, self._port()) for i, p in self.registrations()]

        def hint(announcement: Any, host: str) -> None:
            if self._codes.live_code(announcement.id) is not None and self.lan is not None:
                # Someone holding our code is looking: answer now, so it need not wait
                # for our next periodic burst (it dials us; bursts are >= 2 s apart).
                self.lan.announce_now()
                return
            try:
                address = make_address("tcp", host, announcement.port)
            except ValueError:
                return
            found(announcement.id, address, announcement.peer, "lan")
            if announcement.onion is not None and self._tor.tor is not None:
                # Also through Tor, should the direct way be blocked.
                name, _, port = announcement.onion.rpartition(":")
                try:
                    onion = make_address("tor", name, int(port))
                except ValueError:
                    return
                found(announcement.id, onion, announcement.peer, "lan")

        def our_onion() -> str | None:
            # (Announced only with --tor: under --tor-only there are no LAN announcements.)
            address = self._tor.onion_address()
            return address[len("tor:"):] if address is not None else None

        # On a real network also IPv4 broadcast and IPv6 ff02::1 (protocol/discovery-lan.md); a
        # daemon told to use one interface (tests: 127.0.0.1) sticks to multicast there.
        settings = self._settings
        everywhere = settings.lan_interface == "0.0.0.0"
        return LanDiscovery(
            self.reactor, announcements, hint, port=settings.lan_port,
            group=settings.lan_group or DEFAULT_GROUP,
            interface=settings.lan_interface, broadcast=everywhere, ipv6=everywhere,
            get_onion=our_onion)

    def start_trackers(self) -> None:
        """A tracker client for each tracker, started now."""
        for client in self._tracker_sources():
            self.trackers.append(client)
            self.add_source(client)

    def _tracker_sources(self) -> list[IDiscoverySource]:
        from clearskies.discovery.tracker_client import TrackerClient

        found = self._dialling.add_candidate

        def on_peers(target_id: str, peers: list[tuple[str, Address]]) -> None:
            for peer_id, address in peers:
                found(target_id, address, peer_id, "tracker")

        tor_only = self._tor.tor_only
        # Under --tor-only every tracker request goes through Tor (protocol/tor.md).
        agent = self._tor.tor.web_agent() if tor_only and self._settings.trackers else None

        def ports() -> tuple[int | None, int | None]:
            # Under --tor-only our TCP port is loopback only: register the onion address alone.
            return (None if tor_only else self._port()), None

        return [TrackerClient(self.reactor, url, self.registrations, ports, on_peers,
                              agent=agent, extra_addresses=self.advertised_addresses)
                for url in self._settings.trackers]

    def announce_changed(self) -> None:
        """A share, code or join appeared: tell every source now."""
        for source in self.sources:
            source.announce_changed()

    def tor_ready(self, address: str) -> None:
        """Our onion service is published at ``address``: say so to everyone."""
        if self._tor.tor_only:
            self.start_trackers()
        # Tell every source and every connected peer where we can now be reached.
        self.announce_changed()
        for runtime in self._shares.by_id.values():
            for session in list(runtime.sync.sessions.values()):
                session.send_addresses()
