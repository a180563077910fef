"""What a share's engine reports, on its way to the daemon's event feed, and the
share's recent changes and dismissed conflicts."""

from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import Any

from zope.interface import implementer

from clearskies.interfaces import IShareHost, ISyncEvents

#: Recent changes a share remembers (``changes``), and conflicts dismissed.
RECENT_CHANGES = 500
MAX_DISMISSED = 10_000
#: Engine reports -> the kind of change the recent-changes list shows.
_CHANGE_KINDS = {"download_finished": "received", "upload_started": "sent",
                 "deleted": "deleted", "conflict": "conflict"}


@implementer(ISyncEvents)
class ShareEvents:
    """What a share's engine reports, handed to the host with the share's ID and folder;
    the last ``RECENT_CHANGES`` changes it made are kept (in memory) for ``changes``."""

    def __init__(self, host: IShareHost, share_id: str, root: Path,
                 clock: Any = None, config: Any = None) -> None:
        """``config``: where the dismissed conflicts are kept across restarts
        (``get_config``/``set_config`` Deferreds; None: in memory only)."""
        self._host = host
        self._share_id = share_id
        self._root = str(root)
        self._clock = clock or host.now
        self._config = config
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT_CHANGES)
        #: Conflict copies the user chose to keep both of ("keep both").
        self.dismissed: set[str] = set()

    @property
    def dismissed_key(self) -> str:
        return "dismissed_conflicts:" + self._share_id

    async def load(self) -> None:
        """Read back the conflicts dismissed before a restart."""
        if self._config is None:
            return
        kept = await self._config.get_config(self.dismissed_key, [])
        if isinstance(kept, list):
            self.dismissed = {p for p in kept[:MAX_DISMISSED] if isinstance(p, str)}

    def sync_event(self, kind: str, fields: dict) -> None:
        change = _CHANGE_KINDS.get(kind)
        if change is not None:
            entry = {"time": round(self._clock(), 3), "kind": change}
            entry.update(fields)
            self.recent.append(entry)
        self._host.share_event(self._share_id, self._root, kind, fields)

    def local_change(self, kind: str, **fields: Any) -> None:
        """A change made here through a command (a conflict resolved)."""
        entry = {"time": round(self._clock(), 3), "kind": kind}
        entry.update(fields)
        self.recent.append(entry)
        self._host.share_event(self._share_id, self._root, kind, fields)

    async def dismiss(self, copy: str) -> None:
        """The user kept both sides of the conflict whose copy is ``copy``: it is no longer
        listed, after a restart neither."""
        if len(self.dismissed) >= MAX_DISMISSED or copy in self.dismissed:
            return
        self.dismissed.add(copy)
        if self._config is not None:
            await self._config.set_config(self.dismissed_key, sorted(self.dismissed))
