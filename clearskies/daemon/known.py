"""The peers we know without asking the network: the addresses a user gave, and the
ones the peers table remembers.  Both are discovery sources (``IDiscoverySource``)
like the LAN and the trackers; protocol/discovery.md says how long each candidate lives.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from twisted.application.internet import TimerService
from twisted.application.service import Service
from twisted.logger import Logger
from zope.interface import implementer

from clearskies.addresses import Address, parse_address
from clearskies.errors import ConfigurationError
from clearskies.interfaces import IDiscoverySource

#: found(target_id, address, peer_id, source): where a source's candidates go.
Found = Callable[[str, Address, "str | None", str], None]

#: How often remembered peer addresses are handed to the connection manager again.
#: They go in as "tracker" candidates, which are forgotten after an hour without a
#: refresh, so this must stay well below that (protocol/discovery.md).
REMEMBERED_INTERVAL = 20 * 60.0

#: Remembered addresses offered per share, most recently seen peers first: enough for
#: every likely peer, and few enough to leave room for tracker and LAN candidates.
MAX_REMEMBERED = 64


@implementer(IDiscoverySource)
class ManualPeers(Service):
    """Peer addresses a user gave (``--peer``, ``clearskies peer add``, an attach's
    peers): kept and retried forever.  ``known()`` lists (target ID, address text)
    for every share and pending attach at start; ``check(text)`` parses one address
    (refusing what the Tor mode forbids)."""

    name = "manual-peers"
    source = "manual"
    _log = Logger()

    def __init__(self, found: Found, check: Callable[[str], Address],
                 known: Callable[[], Iterable[tuple[str, str]]]) -> None:
        self._found = found
        self._check = check
        self._known = known

    def startService(self) -> None:
        super().startService()
        for target_id, text in list(self._known()):
            self.add(target_id, text)

    def add(self, target_id: str, text: str) -> None:
        """Dial ``text`` for ``target_id`` from now on (a bad address is logged and dropped)."""
        try:
            address = self._check(text)
        except ConfigurationError as e:
            self._log.warn("ignoring manual peer: {why}", why=str(e))
            return
        self._found(target_id, address, None, self.source)

    def announce_changed(self) -> None:
        """(Manual peers are dialled, never told anything.)"""


@implementer(IDiscoverySource)
class RememberedPeers(TimerService):
    """The addresses of the peers table (``shares()``: share ID -> runtime), and those
    peers tell us (protocol/sync.md, "Addresses"), offered at start and every
    ``REMEMBERED_INTERVAL`` on ``clock``.

    They are hints like a tracker's, so they carry the "tracker" lifetime: retried
    with back-off, forgotten after an hour unless offered again (which the timer
    does while they stay in the peers table).  Under --tor-only (``tor_only()``)
    only ``tor:`` addresses are taken.
    """

    name = "remembered-peers"
    source = "tracker"

    def __init__(self, clock: Any, found: Found, shares: Callable[[], dict[str, Any]],
                 tor_only: Callable[[], bool]) -> None:
        super().__init__(REMEMBERED_INTERVAL, self.offer_all)
        self.clock = clock
        self._found = found
        self._shares = shares
        self._tor_only = tor_only

    def offer(self, share_id: str, peer_id: str | None, addresses: Iterable[Any]) -> None:
        """Offer a peer's addresses (protocol form, or Address) for dialling."""
        for text in addresses:
            try:
                address = parse_address(text) if isinstance(text, str) else text
            except ValueError:
                continue
            if self._tor_only() and address.proto != "tor":
                continue
            self._found(share_id, address, peer_id, self.source)

    def offer_all(self) -> None:
        """Hand the peers table's addresses on, newest peers first, capped per share."""
        for share_id, runtime in list(self._shares().items()):
            peers = sorted(runtime.peers.values(), key=lambda p: p.last_seen or 0, reverse=True)
            budget = MAX_REMEMBERED
            for peer in peers:
                if budget <= 0:
                    break
                addresses = list(peer.addresses)[:budget]
                budget -= len(addresses)
                self.offer(share_id, peer.peer_id, addresses)

    def announce_changed(self) -> None:
        """(Remembered peers are dialled, never told anything.)"""
