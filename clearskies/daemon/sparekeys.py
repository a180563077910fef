"""A spare set of share keys, made in the background for the next new share."""

from __future__ import annotations

from twisted.internet.defer import Deferred

from clearskies.daemon.resources import Resources
from clearskies.keys import ShareKeys, generate_share_keys


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
            keys = await self._resources.files_runner.run(generate_share_keys)
        self.make()
        return keys

    def stop(self) -> None:
        """Make no more sets: the daemon is stopping."""
        self.stopping = True

    def make(self) -> None:
        """Start making the spare set, unless there is one or the daemon is stopping."""
        if self.spare is None and not self.stopping:
            self.spare = self._resources.files_runner.run(generate_share_keys)
            # A set that failed is simply made again when it is needed.
            self.spare.addErrback(lambda failure: None)
