"""The seams between the layers, as zope.interface declarations.

Each interface says what flows between two parts of the daemon, so that one
side can be replaced (by a fake in the tests, or by a new transport or store)
without the other knowing. Implementers declare ``@implementer(IFoo)``; tests
that fake a seam check the fake with ``zope.interface.verify.verifyObject``.

This module imports nothing from the rest of the package: every layer may
depend on it, and it depends on none.
"""

from __future__ import annotations

from twisted.application.service import IService
from zope.interface import Attribute, Interface


# --- blocking work: runners and disk jobs -----------------------------------


# --- the share store, as the sync layer sees it -----------------------------


# --- sync: engine, sessions, read-only signing ------------------------------


# --- discovery sources and transports ---------------------------------------


class IDiscoverySource(IService):
    """One way of finding peers (protocol/discovery.md): the LAN announcer, a tracker
    client, the peers a user named, the peers we remember (later a DHT or a relay).

    A source is a service the daemon starts and stops.  It is made with what
    it needs from the daemon, which is at most two things: ``registrations``,
    a callable returning the (target ID, our peer ID) pairs we announce now
    (share IDs, live access IDs, pending attaches), and ``found``, the one
    callback every candidate goes through::

        found(target_id: str, address: Address, peer_id: str | None, source: str)

    where ``source`` is the source's :attr:`source`.  What it does with
    neither (the network it asks, its timers) is its own business.
    """

    source = Attribute(
        'The name its candidates carry ("lan", "tracker", "manual"; see '
        "clearskies.discovery.connector.SOURCES): it sets how long an unrefreshed "
        "candidate is kept.")

    def announce_changed() -> None:
        """What we announce (or where we can be reached) changed: tell the world now
        rather than at the next round.  A source that announces nothing ignores it."""


class IPeerTransport(Interface):
    """One way of reaching a peer's address: TCP and Tor today, a relay later.

    The daemon dials an address through the first of its transports that
    :meth:`can_reach` it; the listening side that matters to the dialler is
    :meth:`own_addresses`, the addresses that are ourselves.
    """

    name = Attribute('What the transport is called ("tcp", "tor").')

    def can_reach(address: object) -> bool:
        """Whether this transport is the one for ``address`` (a
        ``clearskies.addresses.Address``) in the daemon's current mode.  It may still
        fail to dial it, saying why (Tor not running, not yet bootstrapped)."""

    def endpoint_for(address: object) -> object:
        """(async) A Deferred firing with the ``IStreamClientEndpoint`` that connects
        to ``address``, once the transport is ready; or failing with the reason it
        cannot be reached."""

    def own_addresses() -> list[object]:
        """The addresses this transport reaches us at ourselves: never dialled, and
        (for those peers cannot see, like an onion address) told to peers."""


# --- the daemon, as a share runtime and the control commands see it ---------


class IShareHost(Interface):
    """What one share's runtime (``clearskies.daemon.runtime.ShareRuntime``) needs
    from the daemon that runs it: the daemon-wide state it follows and the
    places it reports to.  The runtime gets its reactor, store and runners as
    constructor arguments, and nothing else of the daemon."""

    paused = Attribute("True while the daemon is paused: a share started now starts paused.")

    def now() -> float:
        """The reactor's time, in seconds."""

    def own_paths() -> list[str]:
        """What the daemon keeps for itself (data directory, control socket): no share
        may hold or lie in them, and a share that holds one never syncs it."""

    def read_only_files() -> bool:
        """Whether read-only shares keep their files without write permission (a setting)."""

    def share_adopted(share_id: str) -> None:
        """The first scan of a share attached with --merge has recorded the folder's files."""

    def advertised_addresses() -> list[object]:
        """Where peers can reach us beyond what they see (protocol/sync.md, "Addresses")."""

    def add_peer_candidates(share_id: str, peer_id: str | None, addresses: object) -> None:
        """Offer addresses a peer told us (or we remembered) for dialling."""

    def retry_peers(share_id: str) -> None:
        """The share is usable again: dial its peers now rather than at their next backoff."""

    def peer_connection_lost(share_id: str, peer_id: str, address: object) -> None:
        """A session of the share ended (``address``: the one we dialled, or None)."""


class IDaemonControl(Interface):
    """The daemon as the control commands (``clearskies.control.commands``) see it."""

    name = Attribute("The name peers see.")
    paused = Attribute("True between ``pause`` and ``resume``.")
    shares = Attribute("Share ID -> the share's runtime, for every share of the daemon.")
    joins = Attribute("Access ID -> pending (or failed) attach, for codes we were given.")
    codes = Attribute("Access ID -> live access code, for codes we made.")
    tor_mode = Attribute('"off", "on" or "only".')
    listening_port = Attribute("The TCP port peers reach us on (0 before it is known).")

    def now() -> float:
        """The reactor's time, in seconds."""

    def request_stop() -> None:
        """Stop the daemon shortly (after the reply to ``stop`` has gone out)."""

    def pause() -> None:
        """No new transfers, scans or announcements until ``resume``."""

    def resume() -> None:
        """Undo ``pause``."""

    def is_tracking() -> bool:
        """Whether some tracker has our registration."""

    def rates() -> tuple[float, float]:
        """Upload and download rates, bytes per second over the last few seconds."""

    def onion_address() -> str | None:
        """``tor:<name>.onion:<port>`` while our onion service is published."""

    def tor_error() -> str | None:
        """Why Tor is not working, or None."""

    def share_by_path(path: str) -> object:
        """The runtime of the share at ``path`` (a real path), or None."""

    def create_share(path: str) -> object:
        """(async) Make a new share of an existing directory; its runtime."""

    def size_warning(path: str) -> object:
        """(async) A warning for a share that is a home directory or very large, or None."""

    def remove_share(path: str) -> object:
        """(async) Detach the share at ``path``."""

    def create_code(path: str, level: str, one_time: bool, lifetime: float | None) -> object:
        """(async) A new access code for the share at ``path``."""

    def cancel_code(access_id_prefix: str) -> object:
        """(async) Cancel the one live code whose access ID starts with the prefix."""

    def add_join(code: bytes, path: str, peers: list[str], merge: bool = False) -> object:
        """(async) Remember a code we were given and start looking for its share."""

    def remove_join(path: str) -> object:
        """(async) Forget the pending or failed attach into ``path``; whether there was one."""

    def setting(key: str) -> object:
        """The stored value of a setting, or None when it was never set."""

    def set_setting(key: str, value: object) -> object:
        """(async) Store a checked setting and apply what applies at once."""

    def remember_manual_peer(share_id: str, address: str) -> object:
        """(async) Keep a peer address for a share and dial it."""
