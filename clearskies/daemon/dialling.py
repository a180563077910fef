"""Dialling peers: the connection manager's targets and candidates, the peer
addresses a user gave or a peer told us, and the sessions a connection starts.

protocol/discovery.md says where candidates come from and how long they live.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger
from twisted.python.failure import Failure

from clearskies.addresses import (
    Address,
    make_address,
    parse_address,
    parse_user_address,
)
from clearskies.daemon.codes import AccessCodes
from clearskies.daemon.resources import Resources
from clearskies.daemon.shares import Shares
from clearskies.discovery.connector import ConnectionManager
from clearskies.errors import CannotStart, ConfigurationError
from clearskies.handshake import ConnectTarget, KeyRing
from clearskies.peer import PeerProtocol, connect_peer
from clearskies.sync import SyncSession

if TYPE_CHECKING:  # (in this package)
    from clearskies.daemon.tor import TorLink

FEATURES = ("vv", "directories", "progress", "manifest_pages", "read_only_manifest", "addresses",
            "revision_batches")
"""Feature strings we offer in the handshake (protocol/handshake.md)."""

#: Remembered addresses offered per share, most recently seen peers first: enough for
#: every likely peer, and few enough to leave room for tracker and LAN candidates.
MAX_REMEMBERED = 64


class Dialling:
    """Who we dial, and the sessions our connections (dialled or accepted) start.

    ``connector`` is the ``ConnectionManager`` once :meth:`start` made it (None
    before); ``port`` gives our listening TCP port and ``name`` the name peers see.
    """

    _log = Logger()

    def __init__(self, resources: Resources, shares: Shares, codes: AccessCodes,
                 tor: TorLink, keyring: KeyRing, port: Callable[[], int],
                 name: Callable[[], str]) -> None:
        self.reactor = resources.reactor
        self._resources = resources
        self._shares = shares
        self._codes = codes
        self._tor = tor
        self._keyring = keyring
        self._port = port
        self._name = name
        self.connector: ConnectionManager | None = None

    def start(self, parent: Any, peers: list[str]) -> None:
        """Make the connection manager (a child of ``parent``) and give it the peers
        the user named: ``peers`` (for every share) and each share's and attach's own."""
        self.connector = ConnectionManager(
            self.reactor, self.dial, self.is_connected, self.own_peer_ids, self.own_addresses,
            protocols=("tcp", "tor") if self._tor.mode != "off" else ("tcp",))
        self.connector.setServiceParent(parent)
        for target_id in list(self._shares.by_id):
            for address in peers + self.manual_peers(target_id):
                self.add_manual_peer(target_id, address)
        for join in self._codes.joins.values():
            if join.failed is not None:
                continue
            for address in join.peers:
                self.add_manual_peer(join.access_id, address)

    # -- dialling ----------------------------------------------------------------------

    def dial(self, address: Address, target_id: str) -> Deferred:
        """Open a connection to ``address`` for a share or a pending join."""
        target = self._target_for(target_id)
        if target is None:
            return fail(ConfigurationError("nothing to connect for"))
        try:
            d = self._tor.endpoint(address)
        except Exception as e:  # e.g. Tor went away: this dial fails, others go on
            d = fail(e)

        def session_factory(connection: PeerProtocol) -> Any:
            # Known before the session starts, so the peers table records the address
            # we dialled (a tor: one through Tor), not the proxy's socket address.
            connection.dialled_address = address  # type: ignore[attr-defined]
            return self.session_factory(connection)

        d.addCallback(lambda endpoint: connect_peer(self.reactor, endpoint, target,
                                                    self._keyring, self._name(),
                                                    session_factory, features=FEATURES))

        def dialled(protocol: PeerProtocol) -> _Dialled:
            protocol.dialled_address = address  # type: ignore[attr-defined]
            return _Dialled(protocol)

        def refused(failure: Failure) -> Failure:
            join = self._codes.joins.get(target_id)
            if failure.check(CannotStart) and join is not None:
                self._codes.join_refused(target_id, failure.value.reason,
                                         failure.value.proven,
                                         manual=address in _addresses(join.peers))
            return failure  # still a failed dial: the connector backs off as usual

        return d.addCallbacks(dialled, refused)

    def _target_for(self, target_id: str) -> ConnectTarget | None:
        runtime = self._shares.by_id.get(target_id)
        if runtime is not None:
            if getattr(runtime, "error", None) is not None:
                return None  # a share in error syncs with nobody; the dial backs off
            return ConnectTarget.share(runtime.keys, runtime.peer_id)
        return self._codes.pending_join(target_id)

    def is_connected(self, target_id: str, peer_id: str) -> bool:
        runtime = self._shares.by_id.get(target_id)
        return runtime is not None and peer_id in runtime.sync.sessions

    def own_peer_ids(self) -> set[str]:
        ids = {r.peer_id for r in self._shares.by_id.values()}
        ids.update(j.peer_id for j in self._codes.joins.values())
        return ids

    def own_addresses(self) -> list[Address]:
        port = self._port()
        own = []
        if port:
            own = [make_address("tcp", "127.0.0.1", port), make_address("tcp", "::1", port)]
        onion = self._tor.onion_address()
        if onion is not None:
            _, host, onion_port = onion.split(":")
            own.append(make_address("tor", host, int(onion_port)))
        return own

    def forget_target(self, target_id: str) -> None:
        if self.connector is not None:
            self.connector.remove_target(target_id)

    def forget_target_soon(self, target_id: str) -> None:
        """(Later: the dial that brought the news is still finishing.)"""
        if self.connector is not None:
            self.reactor.callLater(0, self.connector.remove_target, target_id)

    def retry_peers(self, share_id: str) -> None:
        if self.connector is not None:
            self.connector.retry_now(share_id)

    def connection_lost(self, share_id: str, peer_id: str, address: Any) -> None:
        if self.connector is not None:
            self.connector.connection_lost(share_id, peer_id, address)

    # -- candidates --------------------------------------------------------------------

    def check_peer_address(self, text: str) -> Address:
        """Parse a manual peer address; under --tor-only only ``tor:`` addresses are taken."""
        address = parse_user_address(text)
        if self._tor.tor_only and address.proto != "tor":
            raise ConfigurationError(
                "%s is not a tor: address; with --tor-only the daemon only connects to "
                "peers by their tor:NAME.onion:PORT address" % (text,))
        return address

    def add_manual_peer(self, target_id: str, address: str) -> None:
        if self.connector is None:
            return
        try:
            parsed = self.check_peer_address(address)
        except ConfigurationError as e:
            self._log.warn("ignoring manual peer: {why}", why=str(e))
            return
        self.connector.add_candidate(target_id, parsed, source="manual")

    def add_candidate(self, target_id: str, address: Address, peer_id: str | None,
                      source: str) -> None:
        """A discovery source found ``address`` for ``target_id`` (LAN, tracker)."""
        if self.connector is None:
            return
        if target_id in self._codes.codes:
            return  # the code's holder connects to us, not the other way round
        join = self._codes.joins.get(target_id)
        if target_id in self._shares.by_id or (join is not None and join.failed is None):
            self.connector.add_candidate(target_id, address, peer_id=peer_id, source=source)

    def add_peer_candidates(self, share_id: str, peer_id: str | None,
                            addresses: Any) -> None:
        """Offer a peer's remembered or advertised addresses (protocol form) for dialling.

        They are hints like a tracker's, so they use the "tracker" lifetime: retried
        with back-off, forgotten after an hour unless offered again (which
        :meth:`offer_remembered_peers` does while they stay in the peers table).
        Under --tor-only only ``tor:`` addresses are taken.
        """
        if self.connector is None:
            return
        for text in addresses:
            try:
                address = parse_address(text) if isinstance(text, str) else text
            except ValueError:
                continue
            if self._tor.tor_only and address.proto != "tor":
                continue
            self.connector.add_candidate(share_id, address, peer_id=peer_id, source="tracker")

    def offer_remembered_peers(self) -> None:
        """Hand the peers table's addresses to the connection manager (start-up and timer)."""
        for share_id, runtime in list(self._shares.by_id.items()):
            peers = sorted(runtime.peers.values(), key=lambda p: p.last_seen or 0, reverse=True)
            budget = MAX_REMEMBERED
            for peer in peers:
                if budget <= 0:
                    break
                addresses = list(peer.addresses)[:budget]
                budget -= len(addresses)
                self.add_peer_candidates(share_id, peer.peer_id, addresses)

    def manual_peers(self, target_id: str) -> list[str]:
        return list(self._resources.config.get("manual_peers", {}).get(target_id, []))

    async def remember_manual_peer(self, share_id: str, address: str) -> None:
        self.check_peer_address(address)
        peers = self._resources.config.setdefault("manual_peers", {})
        listed = peers.setdefault(share_id, [])
        if address not in listed:
            listed.append(address)
            await self._resources.store.set_config("manual_peers", peers)
        self.add_manual_peer(share_id, address)

    # -- sessions ----------------------------------------------------------------------

    def session_factory(self, connection: PeerProtocol) -> Any:
        """The session for an authenticated connection, dialled or accepted."""
        info = connection.established
        runtime = self._shares.by_id.get(info.share_id)
        if runtime is None:
            connection.close("share is gone")
            return _ClosedSession()
        if info.access not in ("read_write", "read_only"):
            # An untrusted peer may only ever hold encrypted files (not supported yet).
            connection.close("access level %s is not supported" % info.access)
            return _ClosedSession()
        finished_join = self._codes.take_finished_join(info.share_id)
        if finished_join is not None and self.connector is not None:
            self.reactor.callLater(0, self.connector.remove_target, finished_join.access_id)
            # We know who is at the address we attached through: no second connection.
            known = info.their_peer_id if len(finished_join.peers) == 1 else None
            for address in finished_join.peers:
                self.connector.add_candidate(info.share_id, parse_user_address(address),
                                             peer_id=known, source="manual")
        session = SyncSession(runtime.sync, connection)
        runtime.peer_connected(info, connection)
        session.start(runtime.last_manifest_revision(info.their_peer_id))
        return _TrackedSession(session, runtime, info.their_peer_id)


class _TrackedSession:
    """Wraps a SyncSession so the share runtime hears when the connection ends."""

    def __init__(self, session: SyncSession, runtime: Any, peer_id: str) -> None:
        self.session = session
        self.runtime = runtime
        self.peer_id = peer_id

    def event_received(self, event: Any) -> None:
        if self.runtime.error is not None:
            # The folder is gone or lost its marker: apply nothing from peers (it would
            # write into an empty mount point) until a scan finds it again.
            self.session.connection.close("the share is unavailable on this peer", quiet=True)
            return
        self.session.event_received(event)

    def connection_lost(self, reason: Any) -> None:
        self.session.connection_lost(reason)
        self.runtime.peer_disconnected(self.session)


class _Dialled:
    """What a successful dial hands the connection manager: the peer ID it reached."""

    def __init__(self, protocol: PeerProtocol) -> None:
        self.protocol = protocol
        self.peer_id = protocol.established.their_peer_id


class _ClosedSession:
    def event_received(self, event: Any) -> None:
        pass

    def connection_lost(self, reason: Any) -> None:
        pass


def _addresses(texts: list[str]) -> set[Address]:
    """The addresses a user typed that parse."""
    out = set()
    for text in texts:
        try:
            out.add(parse_user_address(text))
        except ValueError:
            continue
    return out
