"""The control commands of a share's saved keys (protocol/control.md).

``.clearskies.export_keys`` hands out a share's keys, secrets included, so
the user can keep them for a restore; ``.clearskies.import_keys`` makes an
empty folder that share again.  An access code does this from untrusted
peers alone only when it was escrowed (long-lived, read_write or read_only):
they never hold the keys a code fetches (protocol/untrusted.md, sections 2.1
and 8).  A mixin of
:class:`clearskies.control.commands.DaemonCommands`, which gives it ``daemon``
and ``_share``.
"""

from __future__ import annotations

import os
from typing import Any

from clearskies.control.protocol import ControlError
from clearskies.errors import ShareError
from clearskies.keys import ShareKeys

MAX_PEERS = 64


class KeyCommands:
    """``.clearskies.export_keys``, ``.clearskies.import_keys``."""

    daemon: Any

    def cmd__clearskies_export_keys(self, request: dict[str, Any]) -> dict[str, Any]:
        runtime = self._share(request)  # type: ignore[attr-defined]
        return {"share_id": runtime.share_id, "keys": runtime.keys.to_dict()}

    async def cmd__clearskies_import_keys(self, request: dict[str, Any]) -> dict[str, Any]:
        try:
            keys = ShareKeys.from_dict(request.get("keys"))
        except ShareError as e:
            raise ControlError("bad_request", "not a share's keys: %s" % e) from None
        path = request.get("path")
        if not isinstance(path, str) or not os.path.isabs(path) or "\x00" in path:
            raise ControlError("bad_request", "'path' must be an absolute path")
        peers = request.get("peers", [])
        if not isinstance(peers, list) or not all(isinstance(p, str) for p in peers) \
                or len(peers) > MAX_PEERS:
            raise ControlError("bad_request", "peers must be a list of HOST:PORT strings")
        runtime = await self.daemon.share_with_keys(keys, os.path.realpath(path))
        for address in peers:
            await self.daemon.remember_manual_peer(runtime.share_id, address)
        return {"path": str(runtime.root), "share_id": runtime.share_id,
                "access": keys.access}
