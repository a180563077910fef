"""Which paths a share does not sync, and why (pure; ``clearskies status DIR --skipped``).

Two sources feed it: the scanner, with what it found on disk and left out
(unreadable entries, symlinks, special files, unusable names, paths too
deep), and the sync layer, with peers' records it refused.  At most
``limit`` paths are kept with their reason; every one is counted.
"""

from __future__ import annotations

from typing import Iterable, Sequence

MAX_LISTED = 1000
#: Refused paths over the limit are remembered by hash (to count and log each
#: once) up to this many.
MAX_REMEMBERED = 100_000


class SkippedPaths:
    """The paths of one share that are not synced, with the reason for each."""

    def __init__(self, limit: int = MAX_LISTED) -> None:
        self._limit = limit
        self._local: dict[str, str] = {}  # found on disk
        self._remote: dict[str, str] = {}  # refused from peers
        self._unlisted_local = 0  # counted, not kept: over the limit
        self._unlisted_remote: set[int] = set()  # hashes of (path, reason)

    @property
    def count(self) -> int:
        # A path skipped here and refused from a peer too is one path not synced.
        both = sum(1 for path in self._remote if path in self._local)
        return (len(self._local) + len(self._remote) - both
                + self._unlisted_local + len(self._unlisted_remote))

    def entries(self) -> list[dict[str, str]]:
        """The listed paths in path order, each with its reason and where it was met."""
        found = [{"path": path, "reason": why, "where": "local"}
                 for path, why in self._local.items()]
        found += [{"path": path, "reason": why, "where": "peer"}
                  for path, why in self._remote.items() if path not in self._local]
        return sorted(found, key=lambda entry: entry["path"])

    def scanned(self, found: Iterable[tuple[str, str]],
                scopes: Sequence[str] | None) -> list[tuple[str, str]]:
        """Take a scan's skips: of the whole share (``scopes=None``) or of those subtrees.

        Returns the paths that are new or skipped for another reason than
        before, so each is logged once, not once per scan.
        """
        before = dict(self._local)
        if scopes is None:
            self._local = {}
            self._unlisted_local = 0
        else:
            covered = set(scopes)
            for path in list(self._local):
                parts = path.split("/")
                if any("/".join(parts[:n]) in covered for n in range(1, len(parts) + 1)):
                    del self._local[path]
        new = []
        for path, why in found:
            if before.get(path) != why:
                new.append((path, why))
            if path in self._local or len(self._local) + len(self._remote) < self._limit:
                self._local[path] = why
            else:
                self._unlisted_local += 1
        return new

    def refused(self, path: str, why: str) -> bool:
        """Note a peer's record that was refused; True the first time (log it then)."""
        if self._remote.get(path) == why:
            return False
        if path in self._remote or len(self._local) + len(self._remote) < self._limit:
            self._remote[path] = why
            return True
        key = hash((path, why))
        if key in self._unlisted_remote or len(self._unlisted_remote) >= MAX_REMEMBERED:
            return False
        self._unlisted_remote.add(key)
        return True

    def accepted(self, path: str) -> None:
        """A peer's record of ``path`` was taken after all: it is no longer refused."""
        self._remote.pop(path, None)
