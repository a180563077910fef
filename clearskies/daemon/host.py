"""What each share's runtime sees of the daemon (``IShareHost``), and nothing more."""

from __future__ import annotations

from typing import Any

from zope.interface import implementer

from clearskies.daemon.activity import Activity
from clearskies.daemon.dialling import Dialling
from clearskies.daemon.discovery import Discovery
from clearskies.daemon.resources import Resources
from clearskies.daemon.shares import Shares
from clearskies.events import EventBus
from clearskies.interfaces import IShareHost


@implementer(IShareHost)
class ShareHost:
    """The daemon-wide state a share follows and the rooms it reports to."""

    def __init__(self, resources: Resources, activity: Activity, shares: Shares,
                 dialling: Dialling, discovery: Discovery,
                 events: EventBus | None = None) -> None:
        self._resources = resources
        self._activity = activity
        self._shares = shares
        self._dialling = dialling
        self._discovery = discovery
        self._events = events

    @property
    def paused(self) -> bool:
        return self._activity.paused

    def now(self) -> float:
        return self._resources.now()

    def own_paths(self) -> list[str]:
        return self._resources.own_paths()

    def read_only_files(self) -> bool:
        return bool(self._resources.config.get("read_only_files"))

    def share_adopted(self, share_id: str) -> None:
        self._shares.share_adopted(share_id)

    def advertised_addresses(self) -> list[Any]:
        return self._discovery.advertised_addresses()

    def add_peer_candidates(self, share_id: str, peer_id: str | None, addresses: Any) -> None:
        self._dialling.add_peer_candidates(share_id, peer_id, addresses)

    def retry_peers(self, share_id: str) -> None:
        self._dialling.retry_peers(share_id)

    def peer_connection_lost(self, share_id: str, peer_id: str, address: Any) -> None:
        self._dialling.connection_lost(share_id, peer_id, address)

    def share_event(self, share_id: str, path: str, kind: str, fields: dict) -> None:
        if self._events is not None:
            self._events.publish(kind, **{"path": path, "share_id": share_id, **fields})
