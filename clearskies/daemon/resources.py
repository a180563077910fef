"""What every room of the daemon shares: the reactor, the data directory and its
paths, the state database, the stored settings and the two places for blocking
work (``clearskies.threads``)."""

from __future__ import annotations

import os
import secrets
from typing import Any

from clearskies.interfaces import IRunner
from clearskies.share.database import ShareStore


def new_peer_id() -> str:
    return secrets.token_hex(16)


class Resources:
    """The daemon's shared resources, owned by the root service (``service.Daemon``).

    ``store`` is None until the daemon has started (it opens the database);
    ``config`` holds the stored settings, read at start.  ``database_runner`` is
    the database thread (the state database's every SQLite call) and
    ``files_runner`` the files pool (hashing, directory walks, file I/O, key
    generation), both :class:`~clearskies.interfaces.IRunner`.
    """

    def __init__(self, reactor: Any, data_dir: str, database_runner: IRunner,
                 files_runner: IRunner) -> None:
        self.reactor = reactor
        self.data_dir = data_dir
        self.database_runner = database_runner
        self.files_runner = files_runner
        self.store: ShareStore | None = None
        self.config: dict[str, Any] = {}

    def now(self) -> float:
        return self.reactor.seconds()

    async def save_config(self, key: str, value: Any) -> None:
        """Keep ``value`` as the stored setting ``key`` (in memory and on disk)."""
        self.config[key] = value
        await self.store.set_config(key, value)

    # -- paths --------------------------------------------------------------------

    @property
    def keys_dir(self) -> str:
        return os.path.join(self.data_dir, "keys")

    @property
    def control_path(self) -> str:
        return os.path.join(self.data_dir, "control")

    def keys_path(self, share_id: str) -> str:
        return os.path.join(self.keys_dir, share_id + ".json")

    def own_paths(self) -> list[str]:
        """What the daemon keeps for itself and no share may hold or lie in: the data
        directory (keys, database, log) and the control socket."""
        return [self.data_dir, self.control_path]
