"""One folder of a share as the state database knows it, a page at a time.

A folder's entries are the records directly inside it: files and folders
held here (table ``files``) and files the share wants but has not
downloaded yet (table ``wanted``), never deletions.  A page is at most
``limit`` entries in path order after a cursor (the last path of the page
before), so a folder of any size is listed in bounded replies.  Queries run
on the database thread (``ShareStore.call``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from clearskies.share.database import StateDatabase, path_range

#: Entries one page holds by default, and at most.
PAGE = 100
MAX_PAGE = 500


@dataclass(frozen=True)
class Entry:
    """One entry of a folder listing."""

    path: str
    is_dir: bool
    size: int | None
    mtime: int | None
    sha256: str | None
    held: bool
    """False for a file the share wants and has not downloaded yet."""
    wanted: bool = False
    """True when a newer version is on its way (held or not)."""

    def to_json(self) -> dict[str, Any]:
        return {"name": self.path.rsplit("/", 1)[-1], "path": self.path,
                "type": "dir" if self.is_dir else "file", "size": self.size,
                "mtime": self.mtime, "sha256": self.sha256, "held": self.held,
                "wanted": self.wanted}


def bounds(directory: str) -> tuple[str, str | None]:
    """The path range holding everything below ``directory`` ("" for the root)."""
    if not directory:
        return "", None
    return directory + "/", directory + "0"  # "0" is the character after "/"


def _rows(db: StateDatabase, table: str, share_id: str, directory: str, after: str | None,
          limit: int) -> list[tuple[Any, ...]]:
    low, high = bounds(directory)
    where, args = path_range(low, high, after, limit)
    return list(db.connection.execute(
        "SELECT path, is_dir, size, mtime_sec, sha256 FROM %s WHERE share_id = ?"
        " AND deleted = 0 AND instr(substr(path, ?), '/') = 0%s" % (table, where),
        [share_id, len(low) + 1, *args]))


def folder_page(db: StateDatabase, share_id: str, directory: str, after: str | None,
                limit: int) -> tuple[list[Entry], list[Entry]]:
    """(Database thread.)  The first ``limit + 1`` held and wanted entries of ``directory``
    after ``after``, each list in path order (merge them with :func:`merge`)."""
    held = [Entry(r[0], bool(r[1]), r[2], r[3], r[4], True)
            for r in _rows(db, "files", share_id, directory, after, limit + 1)]
    wanted = [Entry(r[0], bool(r[1]), r[2], r[3], r[4], False, True)
              for r in _rows(db, "wanted", share_id, directory, after, limit + 1)]
    return held, wanted


def is_child(path: str, directory: str) -> bool:
    """Whether ``path`` lies directly inside ``directory`` ("" for the root)."""
    low, high = bounds(directory)
    if not path.startswith(low) or (high is not None and path >= high):
        return False
    return "/" not in path[len(low):]


def merge(held: list[Entry], wanted: list[Entry], limit: int) -> tuple[list[Entry], bool]:
    """One page of at most ``limit`` entries out of the held and wanted ones (a path in
    both is held, with a newer version wanted), and whether more follow."""
    by_path: dict[str, Entry] = {e.path: e for e in wanted}
    for entry in held:
        if entry.path in by_path:
            entry = Entry(entry.path, entry.is_dir, entry.size, entry.mtime, entry.sha256,
                          True, True)
        by_path[entry.path] = entry
    entries = sorted(by_path.values(), key=lambda e: e.path)
    return entries[:limit], len(entries) > limit


__all__ = ["Entry", "MAX_PAGE", "PAGE", "folder_page", "is_child", "merge"]
