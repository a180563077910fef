"""Dialling peers: the connection manager's targets and candidates, the transport
each address is dialled through, the peer addresses a user gave or a peer told us
(``clearskies.daemon.known``), and the sessions a connection starts.

protocol/discovery.md says where candidates come from and how long they live.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger
from twisted.python.failure import Failure

from zope.interface import implementer

from clearskies import rdiff
from clearskies.addresses import Address, parse_user_address
from clearskies.compression import CODECS
from clearskies.daemon.codes import AccessCodes
from clearskies.daemon.known import MAX_REMEMBERED, ManualPeers, RememberedPeers
from clearskies.daemon.resources import Resources
from clearskies.daemon.shares import Shares
from clearskies.discovery.connector import ConnectionManager
from clearskies.discovery.tcp import TcpTransport
from clearskies.errors import CannotStart, ConfigurationError
from clearskies.handshake import ESCROW_FEATURE, ConnectTarget, KeyRing
from clearskies.interfaces import IAttachDialler, IDiscoverySource, IPeerTransport
from clearskies.peer import PeerProtocol, connect_peer
from clearskies.sync import SyncSession
from clearskies.sync.rsyncs import FEATURE as RSYNC
from clearskies.sync.thumbs import FEATURE as THUMBNAILS
from clearskies.thumbnails import AVAILABLE as PILLOW
from clearskies.sync.sealed import sessions as sealed

if TYPE_CHECKING:  # (in this package)
    from clearskies.daemon.tor import TorLink

COMPRESS_CHOICES = ("gzip", "off")
"""The values of the daemon's ``--compress`` option."""

COMPRESSION_VARIABLE = "CLEARSKIES_COMPRESSION"
"""Environment variable read when ``--compress`` is not given (``gzip``: as
``--compress gzip``); it was the only switch before the option."""


def default_compress() -> str:
    """``--compress`` when it is not given: ``gzip`` if the environment asks for it, else ``off``."""
    if (os.environ.get(COMPRESSION_VARIABLE, "").lower() in ("1", "gzip", "on")
            and not os.environ.get("CLEARSKIES_NO_COMPRESSION")):
        return "gzip"
    return "off"


def offered_features(compress: str | None = None) -> tuple[str, ...]:
    """Feature strings we offer in the handshake (protocol/handshake.md).

    ``gzip`` (protocol/gzip.md) only with ``compress`` ``gzip`` (None:
    :func:`default_compress`).  Off by default: on a fast link the
    receiver's inflating (stored blocks included) cost W2 8-21 % more time
    than plain framing (bench/README.md, "Compressing only when it pays"),
    so it pays only on links slower than the sender's CPU.  ``rsync`` only
    when librsync is installed (protocol/rsync.md), ``thumbnails`` only with
    Pillow (protocol/thumbnails.md).
    """
    if compress is None:
        compress = default_compress()
    if compress not in COMPRESS_CHOICES:
        raise ConfigurationError("--compress must be one of %s, not %r"
                                 % (", ".join(COMPRESS_CHOICES), compress))
    return (("vv", "directories", "progress", "manifest_pages", "read_only_manifest",
             "addresses", "revision_batches", "code_spread", sealed.FEATURE, ESCROW_FEATURE)
            + (CODECS if compress == "gzip" else ()) + ((RSYNC,) if rdiff.AVAILABLE else ())
            + ((THUMBNAILS,) if PILLOW else ()))


FEATURES = offered_features()
"""What a daemon started without ``--compress`` offers."""

__all__ = ["COMPRESS_CHOICES", "COMPRESSION_VARIABLE", "default_compress", "offered_features",
           "FEATURES", "MAX_REMEMBERED", "Dialling"]


@implementer(IAttachDialler)
class Dialling:
    """Who we dial, and the sessions our connections (dialled or accepted) start.

    ``connector`` is the ``ConnectionManager`` once :meth:`start` made it (None
    before); ``port`` gives our listening TCP port and ``name`` the name peers see.
    An address is dialled through the first of ``transports`` (``IPeerTransport``)
    that can reach it: by default Tor (which, under --tor-only, takes every
    address), then plain TCP.  ``manual`` and ``remembered`` are the discovery
    sources of the peers we know without asking the network.
    """

    _log = Logger()

    def __init__(self, resources: Resources, shares: Shares, codes: AccessCodes,
                 tor: TorLink, keyring: KeyRing, port: Callable[[], int],
                 name: Callable[[], str],
                 transports: Sequence[IPeerTransport] | None = None,
                 features: Sequence[str] = FEATURES) -> None:
        self.reactor = resources.reactor
        #: The feature strings our connections offer (:func:`offered_features`).
        self.features = tuple(features)
        self._resources = resources
        self._shares = shares
        self._codes = codes
        self._tor = tor
        self._keyring = keyring
        self._port = port
        self._name = name
        self.transports: list[IPeerTransport] = list(
            transports if transports is not None else (tor, TcpTransport(self.reactor, port)))
        self.connector: ConnectionManager | None = None
        #: Our access codes as peers see them (a CodeSpreading; set by the daemon).
        self.code_spreading: Any = None
        #: Thumbnails peers may ask for (a ShareThumbnails; set by the daemon).
        self.thumbnails: Any = None
        self._peers_everywhere: list[str] = []
        self.manual = ManualPeers(self.offer_candidate, self.check_peer_address,
                                  self._manual_addresses)
        self.remembered = RememberedPeers(self.reactor, self.offer_candidate,
                                          lambda: self._shares.by_id,
                                          lambda: self._tor.tor_only)

    def start(self, parent: Any, peers: list[str]) -> None:
        """Make the connection manager (a child of ``parent``); ``peers`` are the peers
        the user named for every share (dialled once :attr:`manual` starts)."""
        self._peers_everywhere = list(peers)
        self.connector = ConnectionManager(
            self.reactor, self.dial, self.is_connected, self.own_peer_ids, self.own_addresses,
            protocols=("tcp", "tor") if self._tor.mode != "off" else ("tcp",))
        self.connector.setServiceParent(parent)

    def known_sources(self) -> list[IDiscoverySource]:
        """The discovery sources of the peers we know: manual, then remembered."""
        return [self.manual, self.remembered]

    def _manual_addresses(self) -> Iterator[tuple[str, str]]:
        """(target ID, address) the user gave: for every share and live attach."""
        for target_id in list(self._shares.by_id):
            for address in self._peers_everywhere + self.manual_peers(target_id):
                yield target_id, address
        for join in list(self._codes.joins.values()):
            if join.failed is not None:
                continue
            for address in join.peers:
                yield join.access_id, address

    # -- dialling ----------------------------------------------------------------------

    def dial(self, address: Address, target_id: str) -> Deferred:
        """Open a connection to ``address`` for a share or a pending join."""
        target = self._target_for(target_id)
        if target is None:
            return fail(ConfigurationError("nothing to connect for"))
        transport = self.transport_for(address)
        if transport is None:
            return fail(ConfigurationError("no transport reaches %s" % (address,)))
        try:
            d = transport.endpoint_for(address)
        except Exception as e:  # e.g. Tor went away: this dial fails, others go on
            d = fail(e)

        def session_factory(connection: PeerProtocol) -> Any:
            # Known before the session starts, so the peers table records the address
            # we dialled (a tor: one through Tor), not the proxy's socket address.
            connection.dialled_address = address  # type: ignore[attr-defined]
            return self.session_factory(connection)

        d.addCallback(lambda endpoint: connect_peer(self.reactor, endpoint, target,
                                                    self._keyring, self._name(),
                                                    session_factory, features=self.features))

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

    def transport_for(self, address: Address) -> IPeerTransport | None:
        """The first transport that can reach ``address``, or None."""
        for transport in self.transports:
            if transport.can_reach(address):
                return transport
        return None

    def _target_for(self, target_id: str) -> ConnectTarget | None:
        runtime = self._shares.by_id.get(target_id)
        if runtime is not None:
            if getattr(runtime, "error", None) is not None:
                return None  # a share in error syncs with nobody; the dial backs off
            if getattr(runtime, "share_paused", False):
                return None  # paused on its own: dialled again on resume
            return ConnectTarget.share(runtime.keys, runtime.peer_id)
        return self._codes.pending_join(target_id)

    def is_connected(self, target_id: str, peer_id: str) -> bool:
        runtime = self._shares.by_id.get(target_id)
        sealed_peers = getattr(runtime, "sealed", None)
        if sealed_peers is not None and peer_id in sealed_peers.sessions:
            return True
        return runtime is not None and peer_id in runtime.sync.sessions

    def own_peer_ids(self) -> set[str]:
        ids = {r.peer_id for r in self._shares.by_id.values()}
        ids.update(j.peer_id for j in self._codes.joins.values())
        return ids

    def own_addresses(self) -> list[Address]:
        """What every transport says is ourselves: never dialled."""
        return [address for transport in self.transports
                for address in transport.own_addresses()]

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
        """Dial an address the user gave for a share or attach (see :attr:`manual`)."""
        self.manual.add(target_id, address)

    def offer_candidate(self, target_id: str, address: Address, peer_id: str | None,
                        source: str) -> None:
        """Hand a candidate to the connection manager (the known peers' ``found``)."""
        if self.connector is not None:
            self.connector.add_candidate(target_id, address, peer_id=peer_id, source=source)

    def add_candidate(self, target_id: str, address: Address, peer_id: str | None,
                      source: str) -> None:
        """A discovery source found ``address`` for ``target_id`` (LAN, tracker): the
        ``found`` of sources that hear the network, which may name IDs we no longer want."""
        if target_id in self._codes.codes:
            return  # the code's holder connects to us, not the other way round
        join = self._codes.joins.get(target_id)
        if target_id in self._shares.by_id or (join is not None and join.failed is None):
            self.offer_candidate(target_id, address, peer_id, source)

    def add_peer_candidates(self, share_id: str, peer_id: str | None,
                            addresses: Any) -> None:
        """Offer a peer's remembered or advertised addresses (protocol form) for dialling
        (see :attr:`remembered`: "tracker" lifetime; under --tor-only only ``tor:``)."""
        self.remembered.offer(share_id, peer_id, addresses)

    def offer_remembered_peers(self) -> None:
        """Hand the peers table's addresses to the connection manager (start-up and timer)."""
        self.remembered.offer_all()

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
        if getattr(runtime, "share_paused", False):
            connection.close("share paused")
            return _ClosedSession()
        if info.access not in ("read_write", "read_only", "untrusted"):
            connection.close("access level %s is not supported" % info.access)
            return _ClosedSession()
        finished_join = self._codes.take_finished_join(info.share_id)
        if finished_join is not None and self.connector is not None:
            self.reactor.callLater(0, self.connector.remove_target, finished_join.access_id)
            # We know who is at the address we attached through: no second connection.
            known = info.their_peer_id if len(finished_join.peers) == 1 else None
            for address in finished_join.peers:
                self.offer_candidate(info.share_id, parse_user_address(address), known,
                                     self.manual.source)
        if info.access == "untrusted":
            # Only encrypted blobs and sealed metadata (protocol/untrusted.md).
            return self._untrusted_session(runtime, connection)
        session = SyncSession(runtime.sync, connection)
        spreading = self.code_spreading
        if spreading is not None:  # extension code_spread (protocol/code_spread.md)
            session.codes.connect(
                lambda access: spreading.outgoing(info.share_id, access),
                lambda codes: spreading.incoming(info.share_id, info.access, codes))
        if self.thumbnails is not None:  # extension thumbnails (protocol/thumbnails.md)
            self.thumbnails.connect(session, runtime)
        runtime.peer_connected(info, connection)
        session.start(runtime.last_manifest_revision(info.their_peer_id))
        return _TrackedSession(session, runtime, info.their_peer_id)

    def _untrusted_session(self, runtime: Any, connection: PeerProtocol) -> Any:
        config = self._resources.config
        peers = sealed.sealed_peers(runtime, self.reactor, lambda: config.get(
            "untrusted_challenge_interval", sealed.DEFAULT_CHALLENGE_INTERVAL))
        if peers.owner is not None:  # code escrow (protocol/untrusted.md, section 8)
            peers.owner.escrow_codes = lambda: self._codes.escrow_codes(runtime.share_id)
        session = sealed.start_session(peers, connection)
        if session is None:
            return _ClosedSession()
        runtime.peer_connected(connection.established, connection)
        return _UntrustedSession(session, runtime, peers)


class _TrackedSession:
    """Wraps a SyncSession so the share runtime hears when the connection ends."""

    def __init__(self, session: Any, runtime: Any, peer_id: str) -> None:
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


class _UntrustedSession(_TrackedSession):
    """Wraps an untrusted connection's session; its end is told to the share's
    untrusted peers (``peers``) too."""

    def __init__(self, session: Any, runtime: Any, peers: Any) -> None:
        super().__init__(session, runtime, session.peer_id)
        self.peers = peers

    def connection_lost(self, reason: Any) -> None:
        self.session.connection_lost(reason)
        sealed.session_ended(self.peers, self.session)
        self.runtime.peer_disconnected(self.session)
