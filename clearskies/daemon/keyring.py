"""The handshake's view of the keys the daemon holds (``handshake.KeyRing``)."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred

from clearskies.accesscode import AccessCode
from clearskies.handshake import ConnectTarget
from clearskies.daemon.codes import AccessCodes
from clearskies.daemon.shares import Shares
from clearskies.keys import ShareKeys


class DaemonKeyRing:
    """Answers the handshake, synchronously: which shares and access codes we hold
    (the shares from :class:`Shares`, the codes and attaches from :class:`AccessCodes`)."""

    def __init__(self, shares: Shares, codes: AccessCodes) -> None:
        self._shares = shares
        self._codes = codes

    def share_keys(self, share_id: str) -> ShareKeys | None:
        runtime = self._shares.by_id.get(share_id)
        if runtime is None or runtime.error is not None \
                or getattr(runtime, "share_paused", False):
            return None  # (a paused share syncs with nobody)
        return runtime.keys

    def peer_id(self, share_id: str) -> str:
        return self._shares.by_id[share_id].peer_id

    def live_code(self, access_id: str) -> AccessCode | None:
        code = self._codes.live_code(access_id)
        runtime = self._shares.by_id.get(code.share_id) if code is not None else None
        if runtime is not None and getattr(runtime, "share_paused", False):
            return None  # a paused share takes no new peer either
        return code

    def pending_join(self, access_id: str) -> ConnectTarget | None:
        return self._codes.pending_join(access_id)

    def dead_code(self, access_id: str) -> tuple[str, bytes] | None:
        return self._codes.dead_code(access_id)

    def escrow_entry(self, lookup: str) -> Any | None:
        """An escrow entry an untrusted share of ours keeps (protocol/untrusted.md, section 8)."""
        for runtime in self._shares.by_id.values():
            box = getattr(getattr(getattr(runtime, "sealed", None), "side", None), "escrow", None)
            if box is not None and runtime.error is None \
                    and not getattr(runtime, "share_paused", False):
                entry = box.entry(lookup)
                if entry is not None:
                    return entry
        return None

    def code_used(self, access_id: str) -> None:
        self._codes.code_used(access_id)

    def create_share_from_keys(self, keys: ShareKeys, target: ConnectTarget) -> Deferred:
        return Deferred.fromCoroutine(self._codes.join_completed(keys, target.note))
