"""The session of a connection at level ``untrusted``, on whichever side we are.

A share that holds only the untrusted key keeps blobs (:class:`Keeper`); a
read_write or read_only share owns them (:class:`Owner`).  Each share has one
of the two, made at its first such connection, and at most one session per
peer: of two connections with one peer, the one opened by the smaller peer
ID stays, as both sides work out alike (protocol/sync.md, section 10).
"""

from __future__ import annotations

from typing import Any, Callable

from clearskies.sync.sealed.keeper import Keeper, KeeperSession
from clearskies.sync.sealed.owner import DEFAULT_CHALLENGE_INTERVAL, Owner
from clearskies.sync.sealed.ownersession import OwnerSession

__all__ = ["DEFAULT_CHALLENGE_INTERVAL", "FEATURE", "SealedPeers", "sealed_peers",
           "session_ended", "start_session"]

FEATURE = "untrusted_sealed"
"""The feature string both sides list to speak protocol/untrusted.md."""


class SealedPeers:
    """One share's side of its connections at level untrusted."""

    def __init__(self, side: Owner | Keeper) -> None:
        self.side = side
        self.sessions: dict[str, Any] = {}

    @property
    def owner(self) -> Owner | None:
        return self.side if isinstance(self.side, Owner) else None


def _opener(info: Any) -> str:
    return info.their_peer_id if info.we_are_server else info.our_peer_id


def sealed_peers(runtime: Any, clock: Any, challenge_interval: Callable[[], int]) -> SealedPeers:
    """The share's :class:`SealedPeers`, made at the first call."""
    peers = getattr(runtime, "sealed", None)
    if peers is None:
        keys = runtime.keys
        if keys.access == "untrusted":
            side: Owner | Keeper = Keeper(runtime.share_id, str(runtime.root),
                                          dict(keys.public_keys), runtime.files_runner, clock)
        else:
            side = Owner(runtime, keys, clock, challenge_interval)
        peers = runtime.sealed = SealedPeers(side)
    return peers


def start_session(peers: SealedPeers, connection: Any) -> Any | None:
    """The session for ``connection`` (started), or None when it must close: a
    peer without the feature, or a second connection with the same peer that loses."""
    info = connection.established
    if FEATURE not in info.features:
        connection.close("the peer does not speak %s (encrypted backup)" % FEATURE)
        return None
    existing = peers.sessions.get(info.their_peer_id)
    if existing is not None and existing.alive:
        if _opener(info) >= _opener(existing.connection.established):
            connection.close("already connected with this peer", quiet=True)
            return None
        existing.connection.close("replaced by another connection", quiet=True)
    side = peers.side
    if isinstance(side, Keeper):
        session: Any = KeeperSession(side, connection, info.their_peer_id)
    else:
        session = OwnerSession(side, connection, info.their_peer_id)
    peers.sessions[info.their_peer_id] = session
    session.start()
    return session


def session_ended(peers: SealedPeers, session: Any) -> None:
    if peers.sessions.get(session.peer_id) is session:
        del peers.sessions[session.peer_id]


def peer_status(peers: SealedPeers | None, peer_id: str) -> dict[str, Any]:
    """What ``status`` shows of one peer at level untrusted (empty for other peers)."""
    if peers is None:
        return {}
    out: dict[str, Any] = {}
    if peer_id in peers.sessions:
        out.update(connected=True, access="untrusted")
    owner = peers.owner
    if owner is not None and peer_id in owner.peers:
        out.update(owner.peers[peer_id].to_json())
    return out


def share_status(peers: SealedPeers | None, in_sync_now: bool) -> dict[str, Any]:
    """What ``status`` and ``list`` show of a share's untrusted side (empty without one);
    ``in_sync_now`` is the share's own, which untrusted peers still behind make false."""
    if peers is None:
        return {}
    out: dict[str, Any] = {"untrusted_peers_connected": len(peers.sessions)}
    side = peers.side
    if isinstance(side, Keeper):
        held = side.held
        out["keeps_encrypted"] = {
            "revision": side.revision, "files": len(held.files) if held else 0,
            "bytes": sum(e.size for e in held.files) if held else 0,
            "fetching_revision": side.pending.revision if side.pending else None}
        # In sync: holding a manifest, and fetching no newer one.
        out["in_sync"] = held is not None and side.pending is None
    else:
        made = side.made
        behind = made is not None and any(
            side.peers[peer_id].revision < made.revision
            for peer_id in peers.sessions if peer_id in side.peers)
        out["in_sync"] = in_sync_now and not behind
        if side.problem is not None:
            out["untrusted_problem"] = side.problem
        lost = sorted({path for backup in side.peers.values() for path in backup.lost})
        if lost:
            out["lost_on_untrusted_peers"] = lost[:20]
    return out


def connected(peers: SealedPeers | None) -> list[str]:
    """The peer IDs of the share's connections at level untrusted."""
    return list(peers.sessions) if peers is not None else []


def in_sync(peers: SealedPeers | None) -> bool:
    """Whether a connection at level untrusted is in step: an untrusted share holds
    the newest manifest it was shown; a trusted one's untrusted peer holds ours."""
    if peers is None or not peers.sessions:
        return False
    side = peers.side
    if isinstance(side, Keeper):
        return side.held is not None and side.pending is None
    made = side.made
    return made is not None and any(
        peer_id in side.peers and side.peers[peer_id].revision >= made.revision
        for peer_id in peers.sessions)
