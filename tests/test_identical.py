"""Conflict copies left holding what their file holds (clearskies.daemon.identical)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from twisted.internet.defer import Deferred

from clearskies.daemon.identical import IdenticalCopies
from clearskies.share.database import (
    CacheKey, ShareInfo, ShareStore, identical_conflict_copies)
from clearskies.share.records import FileRecord
from clearskies.threads import SyncRunner
from tests.helpers import result_of

SHARE = "e" * 64
US = "a" * 32


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Runtime:
    """What the sweep reads of a running share: a real store and real files."""

    error = None

    def __init__(self, root: Path, keeps: bool = False) -> None:
        self.root = root
        self.share_id = SHARE
        self.store = ShareStore(root.parent / "state.sqlite3", SyncRunner())
        self.store.call(lambda db: db.add_share(ShareInfo(SHARE, str(root), US, "read_write",
                                                          created=1.0)))
        self.files_runner = SyncRunner()
        self.sync = SimpleNamespace(in_sync=True)
        self.changed: list[str] = []
        self.service = SimpleNamespace(status=SimpleNamespace(state="idle"),
                                       path_changed=self.changed.append)
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.share_events = SimpleNamespace(
            dismissed=set(), local_change=lambda kind, **f: self.events.append((kind, f)))
        self.kept: list[tuple[str, str, bool]] = []
        self.versions = SimpleNamespace(keeper=self._keeper) if keeps else None

    def _keeper(self, cause: str):
        def keep(local: str, path: str, move: bool) -> None:
            self.kept.append((path, Path(local).read_bytes().decode(), move))
            os.remove(local)
        return keep

    def local_path(self, path: str) -> Path:
        return self.root / path

    def put(self, path: str, data: bytes, conflict_source: str | None = None) -> None:
        """A file recorded as the scanner leaves it (its cache key matches the disk)."""
        local = self.root / path
        local.write_bytes(data)
        st = os.lstat(local)
        record = FileRecord(path=path, utime=10.0, size=len(data), mtime=(1, 0), mode=0o644,
                            sha256=_sha(data), vv={US: 1}, conflict_source=conflict_source)
        key = CacheKey(st.st_ino, st.st_size, st.st_mtime_ns)
        result_of(self.store.apply_changes(SHARE, [record], {path: key}))


def _share(tmp_path: Path, files: list[tuple[str, bytes, str | None]],
           keeps: bool = False) -> Runtime:
    """A share holding ``files`` (path, bytes, the file a conflict copy was made for)."""
    root = tmp_path / "share"
    root.mkdir()
    runtime = Runtime(root, keeps)
    for path, data, source in files:
        runtime.put(path, data, conflict_source=source)
    return runtime


def test_a_copy_identical_to_its_file_goes_others_stay(tmp_path: Path) -> None:
    """Only a live copy with its file's bytes goes; a copy of other bytes, one the user
    kept ("keep both"), one changed since its scan and one whose file changed stay."""
    files: list[tuple[str, bytes, str | None]] = []
    for n, name in enumerate("abcde", 1):
        files.append((name + ".txt", b"theirs" if name == "b" else b"same", None))
        files.append(("%s.CONFLICT.%s.txt" % (name, str(n) * 8),
                      b"ours" if name == "b" else b"same", name + ".txt"))
    runtime = _share(tmp_path, files, keeps=True)
    root = runtime.root
    runtime.share_events.dismissed.add("c.CONFLICT.33333333.txt")
    (root / "d.CONFLICT.44444444.txt").write_bytes(b"edited, not scanned yet")
    (root / "e.txt").write_bytes(b"edited, not scanned yet")

    removed = result_of(Deferred.fromCoroutine(IdenticalCopies(lambda: [runtime]).drop(runtime)))

    assert removed == [("a.CONFLICT.11111111.txt", "a.txt")]
    assert runtime.kept == [("a.CONFLICT.11111111.txt", "same", True)]  # kept as a version
    assert not (root / "a.CONFLICT.11111111.txt").exists()
    assert (root / "a.txt").read_bytes() == b"same"
    assert runtime.changed == ["a.CONFLICT.11111111.txt"]  # the scanner records the deletion
    assert runtime.events == [("conflict_resolved", {
        "file": "a.txt", "copy": "a.CONFLICT.11111111.txt", "keep": "file"})]
    for name in ("b.CONFLICT.22222222.txt", "c.CONFLICT.33333333.txt",
                 "d.CONFLICT.44444444.txt", "e.CONFLICT.55555555.txt"):
        assert (root / name).exists(), name


def test_nothing_goes_while_the_share_is_not_in_sync(tmp_path: Path) -> None:
    """A merge still on its way may yet decide differently: no look before it is done."""
    runtime = _share(tmp_path, [("a.txt", b"same", None),
                                ("a.CONFLICT.11111111.txt", b"same", "a.txt")])
    root = runtime.root
    runtime.sync.in_sync = False
    result_of(IdenticalCopies(lambda: [runtime]).tick())
    assert (root / "a.CONFLICT.11111111.txt").exists()
    runtime.sync.in_sync = True
    runtime.service.status.state = "scanning"
    result_of(IdenticalCopies(lambda: [runtime]).tick())
    assert (root / "a.CONFLICT.11111111.txt").exists()
    runtime.service.status.state = "idle"
    result_of(IdenticalCopies(lambda: [runtime]).tick())  # without versions: unlinked
    assert not (root / "a.CONFLICT.11111111.txt").exists()
    assert runtime.changed == ["a.CONFLICT.11111111.txt"]


def test_the_query_pairs_each_live_copy_with_its_file(tmp_path: Path) -> None:
    """Deleted copies and files, and files of other content, are not paired."""
    runtime = _share(tmp_path, [
        ("x.txt", b"1", None), ("x.CONFLICT.1.txt", b"1", "x.txt"),
        ("y.CONFLICT.2.txt", b"2", "y.txt"),  # its file never recorded
        ("z.txt", b"3", None), ("z.CONFLICT.3.txt", b"3", "z.txt")])
    result_of(runtime.store.apply_changes(SHARE, [FileRecord(
        path="z.txt", utime=11.0, deleted=True, vv={US: 2})]))
    pairs = result_of(runtime.store.call(identical_conflict_copies, SHARE, 10))
    assert [(c.record.path, f.record.path) for c, f in pairs] == [("x.CONFLICT.1.txt", "x.txt")]
    assert pairs[0][0].cache is not None and pairs[0][1].record.sha256 == _sha(b"1")
