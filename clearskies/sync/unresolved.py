"""Peers' records that could not be carried out yet, and when to try them again."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReactorTime

from clearskies.share.records import FileRecord
from clearskies.sync import limits


class UnresolvedRecords:
    """Records waiting for another merge: path -> (peer ID, its record).

    Our file could not be moved aside for a conflict copy, the disk refused,
    a symlink or unreadable folder was in the way.  Such a record is merged
    again once the scanner records the path or a folder above it anew, after
    ``clearskies scan``, when the peer sends it again, or after RETRY_AFTER;
    it is reported (and the share is not in sync) until then.
    """

    def __init__(self, clock: IReactorTime,
                 merge_again: Callable[[str, list[FileRecord]], None]) -> None:
        """``merge_again(peer_id, records)`` is called at each retry for every peer."""
        self.clock = clock
        self.waiting: dict[str, tuple[str, FileRecord]] = {}
        self._merge_again = merge_again
        self._call: Any = None

    def keep(self, path: str, peer_id: str, record: FileRecord) -> None:
        """A peer's record for ``path`` could not be carried out: keep it, retry it later."""
        self.waiting.setdefault(path, (peer_id, record))
        if self._call is None:
            self._call = self.clock.callLater(limits.RETRY_AFTER, self._retry)

    def settle(self, path: str) -> tuple[str, FileRecord] | None:
        """``path`` is being decided anew: no longer waiting.  What waited, if anything."""
        waiting = self.waiting.pop(path, None)
        if not self.waiting and self._call is not None:
            if self._call.active():
                self._call.cancel()
            self._call = None
        return waiting

    def retry(self, paths: list[str]) -> None:
        """Merge the records waiting for these paths again now (what blocked them went)."""
        by_peer: dict[str, list[FileRecord]] = {}
        for path in paths:
            if path in self.waiting:
                peer_id, record = self.waiting[path]
                by_peer.setdefault(peer_id, []).append(record)
        for peer_id, records in by_peer.items():
            self._merge_again(peer_id, records)

    def retry_now(self) -> None:
        """Merge the waiting records again now (the user rescanned the share)."""
        self._cancel()
        self._retry()

    def stop(self) -> None:
        self._cancel()
        self._call = None

    def _cancel(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()

    def _retry(self) -> None:
        self._call = None
        by_peer: dict[str, list[FileRecord]] = {}
        for peer_id, record in self.waiting.values():
            by_peer.setdefault(peer_id, []).append(record)
        for peer_id, records in by_peer.items():
            self._merge_again(peer_id, records)
        if self.waiting:
            self._call = self.clock.callLater(limits.RETRY_AFTER, self._retry)
