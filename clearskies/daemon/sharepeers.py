"""What one share remembers of its peers: the bounded peers table, kept up to date
as peers connect, send their manifests and tell us their addresses.

``SharePeers`` is a base of ``ShareRuntime`` (as ``LocalShareFiles`` is): the
methods the sync layer and the listeners call when something happens to a peer.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from twisted.logger import Logger

from clearskies.interfaces import IShareHost
from clearskies.share.database import PeerInfo

#: Peers remembered per share (the peers table and ``peers``): any holder of a
#: key can connect under ever new peer IDs, so past this the peer not seen for
#: longest is forgotten, never a connected one (protocol/sync.md).
MAX_KNOWN_PEERS = 128


def peers_to_forget(peers: dict[str, PeerInfo], keep: frozenset[str] | set[str],
                    limit: int = MAX_KNOWN_PEERS) -> list[str]:
    """The peer IDs to forget so ``peers`` holds at most ``limit``: those not
    seen for longest (never seen first), never one in ``keep`` (connected ones,
    the one just recorded).  Fewer when ``keep`` alone passes the limit."""
    excess = len(peers) - limit
    if excess <= 0:
        return []
    candidates = [p for p in peers.values() if p.peer_id not in keep]
    candidates.sort(key=lambda p: (p.last_seen if p.last_seen is not None else float("-inf"),
                                   p.peer_id))
    return [p.peer_id for p in candidates[:excess]]


class SharePeers:
    """The share's peers (``peers``, and the peers table through ``store``)."""

    _log: Logger
    share_id: str
    host: IShareHost
    store: Any
    sync: Any
    signing: Any
    peers: dict[str, PeerInfo]

    def last_manifest_revision(self, peer_id: str) -> Any:
        """The revision of ``peer_id``'s manifest we have all of, to ask only for news.

        A read-only share must also keep every page of that manifest to relay
        it and to know the share's version: if it does not, the whole
        manifest is asked for again.
        """
        known = self.peers.get(peer_id)
        revision = known.manifest_revision if known is not None else None
        if revision is not None and self.signing.read_only:
            kept = self.signing.store.complete_revision(peer_id)
            if kept is None or kept < revision:
                return None
        return revision

    def peer_manifest_seen(self, peer_id: str, revision: Any) -> None:
        known = self.peers.get(peer_id)
        if known is None or revision is None:
            return
        self._remember(replace(known, last_seen=self.host.now(), manifest_revision=revision),
                       "could not store a peer's revision")

    def peer_seen(self, peer_id: str) -> None:
        """A peer is still connected: its ``last_seen`` moves to now (share health)."""
        known = self.peers.get(peer_id)
        if known is None:
            return
        self._remember(replace(known, last_seen=self.host.now()),
                       "could not store when a peer was seen")

    def peer_connected(self, info: Any, connection: Any) -> None:
        peer = connection.transport.getPeer() if connection.transport else None
        address = None
        host = getattr(peer, "host", None)
        dialled = getattr(connection, "dialled_address", None)
        if dialled is not None:
            address = str(dialled)  # what we dialled: a tor: address stays one
        elif host and not info.we_are_server:
            port = getattr(peer, "port", None)
            address = ("tcp:[%s]:%d" % (host, port)) if ":" in host else (
                "tcp:%s:%d" % (host, port))
        known = self.peers.get(info.their_peer_id)
        addresses = list(known.addresses) if known else []
        if address and address not in addresses:
            addresses = ([address] + addresses)[:8]
        record = PeerInfo(
            share_id=self.share_id, peer_id=info.their_peer_id, name=info.their_name,
            last_seen=self.host.now(), addresses=tuple(addresses),
            manifest_revision=known.manifest_revision if known else None,
            acked_revision=known.acked_revision if known else None)
        self._remember(record, "could not store a peer")

    def peer_addresses_received(self, peer_id: str, addresses: list[str]) -> None:
        """A peer told us where it can be reached: remember it and offer it for dialling."""
        known = self.peers.get(peer_id)
        if known is not None:
            merged = list(dict.fromkeys(list(addresses) + list(known.addresses)))[:8]
            if tuple(merged) != known.addresses:
                self._remember(replace(known, last_seen=self.host.now(), addresses=tuple(merged)),
                               "could not store a peer's addresses")
        self.host.add_peer_candidates(self.share_id, peer_id, addresses)

    def _remember(self, record: PeerInfo, failed: str) -> None:
        """Keep ``record`` in ``peers`` and the peers table, both bounded by MAX_KNOWN_PEERS."""
        self.peers[record.peer_id] = record
        forget = peers_to_forget(self.peers, set(self.sync.sessions) | {record.peer_id})
        for peer_id in forget:
            del self.peers[peer_id]
        self.store.upsert_peer(record, forget).addErrback(
            lambda f: self._log.failure(failed, f))

    def peer_disconnected(self, session: Any) -> None:
        address = getattr(session.connection, "dialled_address", None)
        self.host.peer_connection_lost(self.share_id, session.peer_id, address)
