"""Conflict copies left holding what their file holds: removed once the share is in sync.

Two peers can settle one conflict in opposite ways at once.  A peer that
comes back with an edit its scanner has not recorded yet sets the other's
version aside as it downloads it, while the other's merge sets the first
version aside: whichever version then wins the path also has a copy of
itself, byte for byte the same.  Such a copy holds nothing its file does
not.  Once the share is in sync, and both files are on disk as recorded,
the copy goes as a conflict settled with "keep the file" would: kept as a
version (when the share keeps versions), its deletion scanned and synced.
A copy the user chose to keep ("keep both") stays.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from clearskies.daemon.localshare import expected_on_disk
from clearskies.diskjobs import unchanged
from clearskies.errors import UnsafePathError
from clearskies.share.database import identical_conflict_copies

#: Seconds between two looks at the running shares.
IDENTICAL_INTERVAL = 10.0
#: Copies one look removes from a share, at most (the next look takes the rest).
MAX_PER_LOOK = 100

#: A versions job: (local path, share path, move).
Keeper = Callable[[str, str, bool], None]


def drop_identical(jobs: list[tuple[str, Any, str, Any]], keep: Keeper | None
                   ) -> list[tuple[str, str]]:
    """Remove each copy whose file and copy are both still as recorded (worker thread).

    ``jobs``: (copy's local path, its stored record, file's local path, its
    stored record).  Returns (copy, file) share paths of the copies removed.
    """
    removed = []
    for copy_local, copy, file_local, file in jobs:
        if not (unchanged(file_local, expected_on_disk(file))
                and unchanged(copy_local, expected_on_disk(copy))):
            continue  # changed since it was recorded: the scanner decides first
        try:
            if keep is not None:
                keep(copy_local, copy.path, True)
            else:
                os.remove(copy_local)
        except OSError:
            continue
        removed.append((copy.path, file.path))
    return removed


def ready(runtime: Any) -> bool:
    """The share is in sync and at rest: nothing to fetch, merge or scan."""
    return (runtime.error is None and runtime.sync.in_sync
            and runtime.service.status.state == "idle")


class IdenticalCopies:
    """Looks at the running shares every IDENTICAL_INTERVAL; one look at a time."""

    _log = Logger()

    def __init__(self, runtimes: Callable[[], Iterable[Any]]) -> None:
        self._runtimes = runtimes
        self._looking = False

    def tick(self) -> Deferred[None] | None:
        if self._looking:
            return None
        self._looking = True
        d = Deferred.fromCoroutine(self._look())
        d.addErrback(lambda f: self._log.failure("looking for identical conflict copies failed",
                                                 f))
        return d

    async def _look(self) -> None:
        try:
            for runtime in list(self._runtimes()):
                if ready(runtime):
                    await self.drop(runtime)
        finally:
            self._looking = False

    async def drop(self, runtime: Any) -> list[tuple[str, str]]:
        """Remove the share's copies identical to their file; (copy, file) share paths."""
        found = await runtime.store.call(identical_conflict_copies, runtime.share_id,
                                         MAX_PER_LOOK)
        dismissed = runtime.share_events.dismissed
        jobs = []
        for copy, file in found:
            if copy.path in dismissed:
                continue
            try:
                jobs.append((str(runtime.local_path(copy.path)), copy,
                             str(runtime.local_path(file.path)), file))
            except UnsafePathError:
                continue
        if not jobs or not ready(runtime):
            return []
        versions = getattr(runtime, "versions", None)
        keep = versions.keeper("resolved") if versions is not None else None
        removed = await runtime.files_runner.run(drop_identical, jobs, keep)
        for copy_path, file_path in removed:
            runtime.service.path_changed(copy_path)  # a local deletion: scanned, then synced
            runtime.share_events.local_change("conflict_resolved", file=file_path,
                                              copy=copy_path, keep="file")
        if removed:
            self._log.info("removed {count} conflict cop(ies) identical to their file in "
                           "{root} (kept as versions where the share keeps them)",
                           count=len(removed), root=str(runtime.root))
        return removed


__all__ = ["IDENTICAL_INTERVAL", "IdenticalCopies", "drop_identical"]
