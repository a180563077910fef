"""Extension ``addresses`` (protocol/sync.md, "Addresses"): where else a peer can be reached.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.logger import Logger

from clearskies import wire
from clearskies.addresses import UnsupportedProtocolError, parse_address
from clearskies.errors import ProtocolError
from clearskies.sync.limits import MAX_ADDRESSES


class AddressExchange:
    """One connection's ``clearskies.addresses`` messages, both ways."""

    _log = Logger()

    def __init__(self, peer_id: str, features: tuple[str, ...] | list[str], *,
                 send: Callable[[dict[str, Any]], None],
                 advertised: Callable[[], list[str]] | None,
                 received: Callable[[str, list[str]], None] | None) -> None:
        """``advertised()``: where we can be reached beyond what the peer sees;
        ``received(peer_id, addresses)``: what to do with the peer's list."""
        self.peer_id = peer_id
        self.negotiated = "addresses" in (features or ())
        self._send = send
        self._advertised = advertised
        self._received = received
        self.peer_addresses: list[str] = []  # from its last clearskies.addresses
        self._addresses_sent: list[str] = []

    def send_addresses(self) -> None:
        """Tell the peer where else it can reach us.

        Sent at the start and again when the list changes (Tor became ready);
        nothing goes to peers that did not negotiate the feature, and an empty
        list is not sent.
        """
        if not self.negotiated:
            return
        source = self._advertised
        addresses = list(dict.fromkeys(source()))[:MAX_ADDRESSES] if source else []
        if not addresses or addresses == self._addresses_sent:
            return
        self._addresses_sent = addresses
        self._send({"type": "clearskies.addresses", "addresses": addresses})

    def on_clearskies_addresses(self, body: dict, event: wire.Message) -> None:
        """The peer's addresses; unknown transports and bad entries are skipped."""
        entries = body.get("addresses")
        if not isinstance(entries, list) or len(entries) > MAX_ADDRESSES:
            raise ProtocolError("clearskies.addresses needs a list of at most %d addresses"
                                % (MAX_ADDRESSES,))
        found: list[str] = []
        for entry in entries:
            try:
                address = str(parse_address(entry))
            except UnsupportedProtocolError:
                continue
            except ValueError as e:
                self._log.info("{peer} advertised a bad address: {why}",
                               peer=self.peer_id[:8], why=str(e))
                continue
            if address not in found:
                found.append(address)
        self.peer_addresses = found
        if found and self._received is not None:
            self._received(self.peer_id, found)
