"""Local changes as records (pure): comparing a listing with the stored rows,
building the records of changed, moved and deleted paths.

The rules are those of clearskies.share.scanner's module documentation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

from clearskies.share.database import CacheKey, StoredRecord
from clearskies.share.listing import LocalEntry
from clearskies.share.records import MAX_COUNTER, MAX_TIME_SECONDS, FileRecord

UTIME_STEP = 0.001  # how far after the replaced record a local change is dated


# -- comparing with the database ---------------------------------------------

def _is_live_file(record: FileRecord) -> bool:
    return not record.deleted and not record.is_dir


def same_mode(recorded: int | None, on_disk: int | None, ignored_bits: int = 0) -> bool:
    """Whether the disk's permission bits match the record's, apart from ``ignored_bits``."""
    if recorded is None or on_disk is None:
        return recorded == on_disk
    return (recorded ^ on_disk) & ~ignored_bits == 0


@dataclass
class Comparison:
    """The outcome of merging a sorted listing with the stored rows (pure)."""

    unchanged: int = 0
    #: Permission bits the daemon itself manages on disk (see Scanner.ignored_mode_bits).
    ignored_mode_bits: int = 0
    files: list[tuple[LocalEntry, StoredRecord | None]] = field(default_factory=list)
    directories: list[tuple[LocalEntry, StoredRecord | None]] = field(default_factory=list)
    gone: list[StoredRecord] = field(default_factory=list)

    def add_page(self, entries: Sequence[LocalEntry], stored: Sequence[StoredRecord],
                 protected: Callable[[StoredRecord], bool],
                 newer: Callable[[StoredRecord], bool] = lambda row: False) -> None:
        """Merge entries and rows covering the same key interval, both sorted by path.

        ``newer(row)``: the row was written after the listing was taken, so the
        listing says nothing about it; such paths are left for the next scan.
        """
        i = j = 0
        while i < len(entries) or j < len(stored):
            entry = entries[i] if i < len(entries) else None
            row = stored[j] if j < len(stored) else None
            if row is None or (entry is not None and entry.path < row.path):
                self._found(entry, None)
                i += 1
            elif entry is None or row.path < entry.path:
                if not row.record.deleted and not protected(row):
                    self.gone.append(row)
                j += 1
            else:
                if not newer(row):
                    self._found(entry, row)
                i += 1
                j += 1

    def _found(self, entry: LocalEntry, row: StoredRecord | None) -> None:
        record = row.record if row else None
        if entry.is_dir:
            if record is not None and record.is_dir and not record.deleted \
                    and record.mode == entry.mode:
                self.unchanged += 1
            else:
                self.directories.append((entry, row))
        elif (record is not None and _is_live_file(record) and row.cache == entry.cache_key
              and same_mode(record.mode, entry.mode, self.ignored_mode_bits)):
            self.unchanged += 1
        else:
            self.files.append((entry, row))


# -- building records (pure) ------------------------------------------------

def bump(vv: dict[str, int], peer_id: str, *others: dict[str, int]) -> dict[str, int]:
    """Element-wise max of the vectors, then our own counter plus one."""
    merged = dict(vv)
    for other in others:
        for peer, counter in other.items():
            if counter > merged.get(peer, 0):
                merged[peer] = counter
    # A counter at the top of the range (only a hostile peer gets it there) stays
    # there: one past it, every peer would refuse our records.
    merged[peer_id] = min(merged.get(peer_id, 0) + 1, MAX_COUNTER)
    return merged


def local_utime(mtime: float | None, since: float | None, now: float,
                previous: FileRecord | None) -> float:
    """When a local change is said to have happened (protocol/records.md, see module doc).

    ``mtime`` is None for a deletion, which is dated ``since``.
    """
    if since is None:
        utime = now
    else:
        utime = since if mtime is None else min(mtime, since)
    if previous is not None:
        utime = max(utime, previous.utime + UTIME_STEP)
    # Never past the range records allow (a peer may have dated the record it
    # replaces at the very end of it): peers would refuse the record.
    return min(max(utime, 0.0), float(MAX_TIME_SECONDS))


def _split_ns(ns: int) -> tuple[int, int]:
    seconds, nanos = divmod(ns, 1_000_000_000)
    return (seconds, nanos)


def file_record(path: str, sha256: str, size: int, mtime_ns: int, mode: int,
                previous: FileRecord | None, peer_id: str, utime: float,
                source: FileRecord | None = None) -> FileRecord:
    """The record of a file we changed (or moved here from ``source``)."""
    base = previous.vv if previous is not None else {}
    vv = bump(base, peer_id, source.vv) if source is not None else bump(base, peer_id)
    keep = previous if previous is not None and previous.file_id is not None else source
    live = previous is not None and not previous.deleted
    return FileRecord(
        path=path, utime=utime, size=size, mtime=_split_ns(mtime_ns), mode=mode,
        sha256=sha256, vv=vv, file_id=keep.file_id if keep else None,
        key=keep.key if keep else None,
        conflict_source=previous.conflict_source if live else None)


def dir_record(entry: LocalEntry, previous: FileRecord | None, peer_id: str,
               utime: float) -> FileRecord:
    return FileRecord(path=entry.path, utime=utime, is_dir=True, mode=entry.mode,
                      vv=bump(previous.vv if previous else {}, peer_id),
                      file_id=previous.file_id if previous else None)


def tombstone(previous: FileRecord, peer_id: str, utime: float) -> FileRecord:
    return FileRecord(path=previous.path, utime=utime, deleted=True,
                      vv=bump(previous.vv, peer_id), file_id=previous.file_id)


class MovePairer:
    """Matches vanished files with new files of the same content."""

    def __init__(self, gone: Iterable[StoredRecord]) -> None:
        self._by_sha: dict[str, list[StoredRecord]] = {}
        self._by_key: dict[CacheKey, StoredRecord] = {}
        self.claimed: set[str] = set()
        for row in gone:
            record = row.record
            if _is_live_file(record) and record.sha256 and record.size:
                self._by_sha.setdefault(record.sha256, []).append(row)
                if row.cache is not None:
                    self._by_key[row.cache] = row

    def by_cache_key(self, key: CacheKey) -> StoredRecord | None:
        """A vanished file with this exact inode, size and mtime: a plain rename."""
        row = self._by_key.get(key)
        if row is None or row.path in self.claimed:
            return None
        self.claimed.add(row.path)
        return row

    def by_content(self, sha256: str, size: int, path: str) -> StoredRecord | None:
        """A vanished file with this content, preferring one with the same name."""
        if not size:
            return None  # every empty file looks alike: never a move
        candidates = [row for row in self._by_sha.get(sha256, ())
                      if row.path not in self.claimed]
        if not candidates:
            return None
        name = path.rsplit("/", 1)[-1]
        row = next((c for c in candidates if c.path.rsplit("/", 1)[-1] == name), candidates[0])
        self.claimed.add(row.path)
        return row
