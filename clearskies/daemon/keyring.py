"""Keys: the handshake's view of what the daemon holds (``handshake.KeyRing``),
and a spare set of share keys made in the background."""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet.defer import Deferred

from clearskies.accesscode import AccessCode
from clearskies.handshake import ConnectTarget
from clearskies.daemon.resources import Resources
from clearskies.keys import ShareKeys, generate_share_keys

if TYPE_CHECKING:  # (both are in this package)
    from clearskies.daemon.codes import AccessCodes
    from clearskies.daemon.shares import Shares


class DaemonKeyRing:
    """Answers the handshake, synchronously: which shares and access codes we hold
    (the shares from :class:`Shares`, the codes and attaches from :class:`AccessCodes`)."""

    def __init__(self, shares: Shares, codes: AccessCodes) -> None:
        self._shares = shares
        self._codes = codes

    def share_keys(self, share_id: str) -> ShareKeys | None:
        runtime = self._shares.by_id.get(share_id)
        if runtime is None or runtime.error is not None:
            return None
        return runtime.keys

    def peer_id(self, share_id: str) -> str:
        return self._shares.by_id[share_id].peer_id

    def live_code(self, access_id: str) -> AccessCode | None:
        return self._codes.live_code(access_id)

    def pending_join(self, access_id: str) -> ConnectTarget | None:
        return self._codes.pending_join(access_id)

    def dead_code(self, access_id: str) -> tuple[str, bytes] | None:
        return self._codes.dead_code(access_id)

    def code_used(self, access_id: str) -> None:
        self._codes.code_used(access_id)

    def create_share_from_keys(self, keys: ShareKeys, target: ConnectTarget) -> Deferred:
        return Deferred.fromCoroutine(self._codes.join_completed(keys, target.note))


class SpareKeys:
    """Keys for new shares, one set made ahead.

    RSA generation takes 30–150 ms of a worker; keeping one set ready
    (in memory only, never on disk) lets ``share`` answer without it.
    """

    def __init__(self, resources: Resources) -> None:
        self._resources = resources
        self.stopping = False
        #: The set being made (or made), or None: taken by the next new share.
        self.spare: Deferred[ShareKeys | None] | None = None

    async def fresh(self) -> ShareKeys:
        """Keys for a new share: the spare set, if it is ready."""
        spare, self.spare = self.spare, None
        keys = await spare if spare is not None else None  # (still being made: wait for it)
        if keys is None:
            keys = await self._resources.cpu_runner.run(generate_share_keys)
        self.make()
        return keys

    def make(self) -> None:
        """Start making the spare set, unless there is one or the daemon is stopping."""
        if self.spare is None and not self.stopping:
            self.spare = self._resources.cpu_runner.run(generate_share_keys)
            # A set that failed is simply made again when it is needed.
            self.spare.addErrback(lambda failure: None)
