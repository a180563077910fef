"""What a share still needs to fetch: the one place that keeps it.

:class:`WantedFiles` maps each path whose content we must fetch to a
:class:`Wanted` entry (the record, the peers that have it, the peers that
failed to give it), and keeps a running total of the bytes.  Everything the
sync layer does to that bookkeeping goes through its methods, so that the
list can later be kept elsewhere (the database) behind the same face.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from clearskies.share.records import FileRecord


@dataclass
class Wanted:
    """Content the share needs: the record, who has it, and who failed to give it."""

    record: FileRecord
    sources: set[str] = field(default_factory=set)
    failed: dict[str, float] = field(default_factory=dict)
    fetch_path: str | None = None  # what to ask peers for, when not record.path

    @property
    def remote_path(self) -> str:
        return self.fetch_path or self.record.path


class WantedFiles(dict[str, Wanted]):
    """The files a share needs, by path, with a running total of their bytes.

    Status requests ask for that total often; walking 100,000 entries for
    each would stall the reactor.  Entries are only added, replaced and
    removed through ``[]``, ``del`` and ``pop`` (a ``Wanted`` never gets
    another record), which keep the total.
    """

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __setitem__(self, path: str, wanted: Wanted) -> None:
        old = self.get(path)
        if old is not None:
            self.bytes -= old.record.size or 0
        super().__setitem__(path, wanted)
        self.bytes += wanted.record.size or 0

    def __delitem__(self, path: str) -> None:
        self.bytes -= self[path].record.size or 0
        super().__delitem__(path)

    def pop(self, path: str, *default: Any) -> Any:  # type: ignore[override]
        if path in self:
            self.bytes -= self[path].record.size or 0
        return super().pop(path, *default)

    def _unsupported(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("WantedFiles keeps a byte total: use [], del and pop")

    clear = popitem = setdefault = update = __ior__ = _unsupported  # type: ignore[assignment]

    # -- the bookkeeping the sync layer does -------------------------------------

    def want(self, record: FileRecord, peer_id: str, fetch_path: str | None = None) -> Wanted:
        """``record``'s content is to be fetched; ``peer_id`` announced it."""
        wanted = self.get(record.path)
        if wanted is None or wanted.record != record:
            wanted = Wanted(record, fetch_path=fetch_path)
            self[record.path] = wanted
        elif fetch_path is None and wanted.fetch_path is not None:
            # The content is now announced under its own path: ask for that instead.
            wanted.fetch_path = None
            wanted.failed.clear()
        wanted.sources.add(peer_id)
        return wanted

    def drop_source(self, peer_id: str) -> None:
        """The peer is gone: it is no source of anything any more."""
        for wanted in self.values():
            wanted.sources.discard(peer_id)

    def failed(self, path: str, peer_id: str, now: float) -> None:
        """Fetching ``path`` from ``peer_id`` failed at ``now``: ask others first."""
        wanted = self.get(path)
        if wanted is not None:
            wanted.failed[peer_id] = now

    def bytes_of(self, paths: Iterable[str]) -> int:
        """Bytes of those ``paths`` that are wanted."""
        return sum(self[p].record.size or 0 for p in paths if p in self)
