"""The scanner: exactly the right records for each kind of local change."""

import os
import time

import pytest
from twisted.internet.task import Clock

from clearskies.errors import ShareError
from clearskies.share import scanner as scanner_module
from clearskies.share.database import ShareInfo, ShareStore
from clearskies.share.hashing import Unstable, hash_file
from clearskies.share.ignore import IGNORE_FILE_NAME
from clearskies.share.paths import MAX_PATH_DEPTH
from clearskies.share.merge import vv_bump
from clearskies.share.records import MAX_COUNTER, MAX_TIME_SECONDS, FileRecord
from clearskies.share.scanner import (
    RESULT_RECORDS, Scanner, local_utime, normalize_scopes, read_marker, write_marker)
from clearskies.threads import SyncRunner
from tests.helpers import result_of, sha

SHARE = "5" * 64
PEER = "a" * 32
OTHER = "b" * 32


class SpyHasher:
    """Wraps the real hasher and remembers which paths it was asked to hash."""

    def __init__(self):
        self.calls = []
        self.outcome = None  # force a result, e.g. Unstable

    def __call__(self, path, progress=None):
        self.calls.append(os.path.basename(path))
        return self.outcome(path) if self.outcome else hash_file(path, progress)


class Share:
    """A share folder with its database, scanner, clock and hasher spy."""

    def __init__(self, tmp_path, batch_size=1000):
        self.root = tmp_path / "share"
        self.root.mkdir()
        write_marker(str(self.root), SHARE)
        self.store = ShareStore(tmp_path / "state.sqlite3", SyncRunner())
        result_of(self.store.add_share(ShareInfo(SHARE, str(self.root), PEER, "read_write",
                                                 created=1.0)))
        self.clock = Clock()
        self.clock.advance(time.time() + 100)  # files written now are not "racy"
        self.hasher = SpyHasher()
        self.batches = []
        self.batch_revisions = []
        self.scanner = Scanner(str(self.root), SHARE, PEER, self.store, SyncRunner(),
                               self.clock, hasher=self.hasher, batch_size=batch_size)

    def write(self, path, data=b"x", mtime=None):
        target = self.root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        if mtime is not None:
            os.utime(target, (mtime, mtime))
        return target

    def scan(self, paths=None, since=None, advance=10.0):
        self.clock.advance(advance)
        self.hasher.calls = []
        return result_of(self.scanner.scan(
            paths, since, self._batch))

    def _batch(self, records, moves, revision):
        self.batches.append((records, moves))
        # What the store says right now: each batch is reported as it commits.
        self.batch_revisions.append((revision, result_of(self.store.get_revision(SHARE))))

    def record(self, path):
        return result_of(self.store.get_record(SHARE, path))

    def by_path(self, result):
        return {r.path: r for r in result.records}


@pytest.fixture
def share(tmp_path):
    return Share(tmp_path)


def test_first_scan_records_files_and_directories(share):
    """Every file and directory gets a record with size, mtime, mode, hash and vv {us: 1}."""
    target = share.write("docs/a.txt", b"hello", mtime=1_000_000_000.25)
    os.chmod(target, 0o640)
    (share.root / "empty").mkdir()
    result = share.scan()
    records = share.by_path(result)
    assert set(records) == {"docs", "docs/a.txt", "empty"}
    a = records["docs/a.txt"]
    assert (a.size, a.sha256, a.mode, a.vv) == (5, sha(b"hello"), 0o640, {PEER: 1})
    assert a.mtime == (1_000_000_000, 250_000_000)
    assert a.utime == share.clock.seconds()  # first scan: the scan time
    assert records["empty"].is_dir and records["empty"].vv == {PEER: 1}
    assert (result.files, result.directories, result.hashed_files) == (1, 2, 1)
    assert share.record("docs/a.txt") == a
    assert read_marker(str(share.root)) == SHARE
    assert ".clearskies" not in records


def test_each_batch_is_reported_with_the_revision_its_commit_made(tmp_path):
    """The sync layer orders local changes among its own commits by this revision."""
    share = Share(tmp_path, batch_size=2)
    for n in range(5):
        share.write("f%d" % n, b"%d" % n)
    share.scan()
    assert len(share.batch_revisions) == 3
    assert all(reported == stored for reported, stored in share.batch_revisions)
    assert [r for r, _ in share.batch_revisions] == sorted({r for r, _ in share.batch_revisions})


def test_modify_bumps_our_counter_once(share):
    """Changing a file yields one record, new hash, vv counter + 1, later utime."""
    share.write("a.txt", b"one")
    first = share.by_path(share.scan())["a.txt"]
    share.write("a.txt", b"two!")
    result = share.scan()
    assert [r.path for r in result.records] == ["a.txt"]
    second = result.records[0]
    assert second.sha256 == sha(b"two!") and second.size == 4
    assert second.vv == {PEER: 2}
    assert second.utime > first.utime
    assert share.hasher.calls == ["a.txt"]


def test_modify_keeps_other_peers_counters(share):
    """A local edit of a file received from a peer keeps their counter and bumps ours."""
    share.write("a.txt", b"theirs", mtime=1000)
    st = os.stat(share.root / "a.txt")
    remote = FileRecord(path="a.txt", utime=5000.0, size=6, mtime=(1000, 0), mode=0o644,
                        sha256=sha(b"theirs"), vv={OTHER: 3}, file_id="ab" * 16, key="cd" * 32)
    result_of(share.store.apply_changes(SHARE, [remote]))
    share.scan()  # no cache key stored: hashed once, same content, nothing announced
    assert share.record("a.txt") == remote
    share.write("a.txt", b"mine")
    mine = share.scan().records[0]
    assert mine.vv == {OTHER: 3, PEER: 1}
    assert (mine.file_id, mine.key) == (remote.file_id, remote.key)
    assert st.st_ino == os.stat(share.root / "a.txt").st_ino


def test_delete_leaves_tombstone_with_bumped_vv(share):
    """A deleted file becomes deleted=True keeping the previous vv, plus our bump."""
    share.write("a.txt", b"data")
    share.write("b.txt", b"keep")
    share.scan()
    os.remove(share.root / "a.txt")
    result = share.scan()
    assert [(r.path, r.deleted, r.vv) for r in result.records] == [("a.txt", True, {PEER: 2})]
    assert result.moves == [] and share.hasher.calls == []
    assert share.record("a.txt").deleted
    assert share.scan().records == []  # a tombstone stays a tombstone


def test_rename_is_a_move_without_hashing(share):
    """A renamed file gives a move pair (tombstone + new record) and is not re-read."""
    share.write("dir/photo.jpg", b"pixels" * 100)
    share.scan()
    os.rename(share.root / "dir" / "photo.jpg", share.root / "dir" / "renamed.jpg")
    result = share.scan()
    assert share.hasher.calls == []
    assert len(result.moves) == 1
    move = result.moves[0]
    assert move.source == "dir/photo.jpg"
    assert move.destination.path == "dir/renamed.jpg"
    assert move.destination.sha256 == sha(b"pixels" * 100)
    assert move.destination.vv == {PEER: 2}
    gone = share.by_path(result)["dir/photo.jpg"]
    assert gone.deleted and gone.vv == {PEER: 2}
    assert sorted(r.path for r in result.records) == ["dir/photo.jpg", "dir/renamed.jpg"]
    assert share.batches[-1] == (result.records, result.moves)


def test_copy_then_delete_is_a_move_by_content(share):
    """A new file with a vanished file's content (different inode) is paired by sha256."""
    share.write("a/report.pdf", b"content")
    share.write("b/x", b"other")
    share.scan()
    share.write("b/report.pdf", b"content")
    os.remove(share.root / "a" / "report.pdf")
    result = share.scan()
    assert share.hasher.calls == ["report.pdf"]
    assert [(m.source, m.destination.path) for m in result.moves] == [
        ("a/report.pdf", "b/report.pdf")]


def test_move_prefers_same_name(share):
    """With two vanished copies of the content, the one with the same name is the source."""
    share.write("x/a.txt", b"same")
    share.write("x/b.txt", b"same")
    share.scan()
    share.write("y/b.txt", b"same")
    os.remove(share.root / "x" / "a.txt")
    os.remove(share.root / "x" / "b.txt")
    result = share.scan()
    assert [(m.source, m.destination.path) for m in result.moves] == [("x/b.txt", "y/b.txt")]
    assert share.by_path(result)["x/a.txt"].deleted


def test_empty_files_are_never_moves(share):
    """All empty files share one hash; a new one is never paired with a vanished one."""
    share.write("a", b"")
    share.scan()
    os.remove(share.root / "a")
    share.write("b", b"")
    result = share.scan()
    assert result.moves == []
    assert share.by_path(result)["a"].deleted and share.by_path(result)["b"].size == 0


def test_directory_rename_moves_every_file(share):
    """Renaming a directory moves each file (no hashing) and replaces the dir records."""
    for n in range(5):
        share.write("old/sub/f%d" % n, b"data%d" % n)
    share.scan()
    os.rename(share.root / "old", share.root / "new")
    result = share.scan()
    assert share.hasher.calls == []
    assert sorted((m.source, m.destination.path) for m in result.moves) == [
        ("old/sub/f%d" % n, "new/sub/f%d" % n) for n in range(5)]
    records = share.by_path(result)
    assert records["new"].is_dir and records["new/sub"].is_dir
    assert records["old"].deleted and records["old/sub"].deleted


def test_mkdir_and_rmdir(share):
    """An empty directory gets an is_dir record; removing it leaves a tombstone."""
    share.scan()
    (share.root / "empty").mkdir(mode=0o750)
    os.chmod(share.root / "empty", 0o750)
    made = share.scan().records
    assert [(r.path, r.is_dir, r.mode, r.vv) for r in made] == [
        ("empty", True, 0o750, {PEER: 1})]
    os.rmdir(share.root / "empty")
    removed = share.scan().records
    assert [(r.path, r.deleted, r.vv) for r in removed] == [("empty", True, {PEER: 2})]


def test_removing_a_tree_tombstones_everything_in_it(share):
    """Deleting a directory tree gives a tombstone for each file and directory in it."""
    share.write("t/a", b"1")
    share.write("t/u/b", b"2")
    share.scan()
    for path in ("t/u/b", "t/a"):
        os.remove(share.root / path)
    os.rmdir(share.root / "t" / "u")
    os.rmdir(share.root / "t")
    result = share.scan()
    assert sorted(r.path for r in result.records if r.deleted) == ["t", "t/a", "t/u", "t/u/b"]


def test_chmod_is_a_change_without_hashing(share):
    """A permission change gives a new record with the new mode, content not re-read."""
    target = share.write("run.sh", b"#!/bin/sh\n")
    share.scan()
    os.chmod(target, 0o755)
    result = share.scan()
    assert share.hasher.calls == []
    assert [(r.path, r.mode, r.vv) for r in result.records] == [("run.sh", 0o755, {PEER: 2})]


def test_write_bits_the_daemon_manages_are_no_change(share):
    """With ignored_mode_bits, losing write permission is no change; other bits still are,
    recorded with the write bits of before, and so is a content edit."""
    target = share.write("run.sh", b"#!/bin/sh\n")
    os.chmod(target, 0o644)
    share.scan()
    share.scanner.ignored_mode_bits = 0o222
    os.chmod(target, 0o444)
    assert share.scan().records == []
    os.utime(target, (1_500_000_000, 1_500_000_000))  # hashed again: still the same file
    assert share.scan().records == [] and share.hasher.calls == ["run.sh"]
    os.chmod(target, 0o555)
    assert [(r.mode, r.vv) for r in share.scan().records] == [(0o755, {PEER: 2})]
    os.chmod(target, 0o755)
    target.write_bytes(b"#!/bin/sh\nedited\n")
    os.chmod(target, 0o555)
    [edited] = share.scan().records
    assert (edited.mode, edited.vv) == (0o755, {PEER: 3})
    share.scanner.ignored_mode_bits = 0
    assert [r.mode for r in share.scan().records] == [0o555]


def test_touch_without_change_announces_nothing(share):
    """A new mtime with the same bytes is hashed once, announced never, cached after."""
    target = share.write("a.txt", b"same")
    share.scan()
    os.utime(target, (1_500_000_000, 1_500_000_000))
    assert share.scan().records == []
    assert share.hasher.calls == ["a.txt"]
    assert share.scan().records == [] and share.hasher.calls == []


def test_file_replaced_by_directory(share):
    """A file turned into a directory gives a directory record that supersedes the file."""
    share.write("thing", b"file")
    share.scan()
    os.remove(share.root / "thing")
    share.write("thing/inside", b"now a dir")
    records = share.by_path(share.scan())
    assert records["thing"].is_dir and records["thing"].vv == {PEER: 2}
    assert records["thing/inside"].vv == {PEER: 1}


def test_unchanged_tree_of_10000_files_is_not_rehashed(share):
    """A rescan of 10,000 unchanged files hashes nothing and writes nothing."""
    for d in range(100):
        folder = share.root / ("d%02d" % d)
        folder.mkdir()
        for f in range(100):
            (folder / ("f%02d" % f)).write_bytes(b"%d" % f)
    first = share.scan()
    assert first.hashed_files == 10_000 and first.changes == 10_100
    assert len(first.records) == RESULT_RECORDS  # the first ones only: memory stays bounded
    revision = first.revision
    second = share.scan()
    assert share.hasher.calls == []
    assert second.records == [] and second.changes == 0 and second.unchanged == 10_100
    assert result_of(share.store.get_revision(SHARE)) == revision


def test_batches_commit_separately(tmp_path):
    """Changes are committed (and reported) in batches of batch_size records."""
    share = Share(tmp_path, batch_size=10)
    for n in range(25):
        share.write("f%02d" % n, b"%d" % n)
    result = share.scan()
    assert [len(records) for records, _ in share.batches] == [10, 10, 5]
    assert result.revision == 3
    assert [r for records, _ in share.batches for r in records] == result.records


def test_racy_file_is_hashed_again(share):
    """A file modified within the racy window is recorded but re-read on the next scan."""
    share.clock.advance(-100)  # the clock now reads about the files' mtime
    share.write("hot.txt", b"fresh")
    share.scan(advance=0)
    share.scan(advance=0)
    assert share.hasher.calls == ["hot.txt"]
    share.scan(advance=5)  # older than the window now: hashed and cached
    assert share.scan(advance=1).records == [] and share.hasher.calls == []


def test_unstable_file_is_reported_not_recorded(share):
    """A file that changes while hashed produces no record and is listed as unstable."""
    share.write("busy.log", b"growing")
    share.hasher.outcome = lambda path: Unstable(path, "changed while it was read")
    result = share.scan()
    assert result.unstable == ["busy.log"] and share.record("busy.log") is None
    share.hasher.outcome = None
    assert [r.path for r in share.scan().records] == ["busy.log"]


def test_symlinks_are_skipped(share, tmp_path):
    """Symlinks (to files or directories, inside or outside) are neither recorded nor followed."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    share.write("real.txt", b"real")
    os.symlink(outside, share.root / "outlink")
    os.symlink(share.root / "real.txt", share.root / "inlink")
    result = share.scan()
    assert set(share.by_path(result)) == {"real.txt"}
    assert result.skipped == 2


def test_file_replaced_by_symlink_is_deleted(share):
    """A file replaced by a symlink is no longer ours: it becomes a tombstone."""
    share.write("a.txt", b"a")
    share.scan()
    os.remove(share.root / "a.txt")
    os.symlink("/etc/passwd", share.root / "a.txt")
    assert [(r.path, r.deleted) for r in share.scan().records] == [("a.txt", True)]


def test_unusable_names_are_skipped(share):
    """Names that cannot travel (backslash, control char, invalid UTF-8) are left out."""
    share.write("ok.txt", b"1")
    share.write("back\\slash", b"2")
    share.write("tab\there", b"3")
    with open(os.path.join(os.fsencode(share.root), b"bad\xff"), "wb") as f:
        f.write(b"4")
    result = share.scan()
    assert set(share.by_path(result)) == {"ok.txt"} and result.skipped == 3


def test_ignore_patterns(share):
    """Ignored and temporary files are not recorded; a newly ignored file is not deleted."""
    share.write("keep.txt", b"k")
    share.write("later.log", b"l")
    share.scan()
    share.write(IGNORE_FILE_NAME, b"*.log\nbuild/\n")
    share.write("build/out.o", b"o")
    share.write("new.log", b"n")
    share.write(".keep.txt.!clearsky", b"partial")
    share.write("sub/.x.!clearsky", b"partial")
    result = share.scan()
    assert set(share.by_path(result)) == {"sub"}
    assert not share.record("later.log").deleted
    assert share.scanner.rules.is_ignored("build/out.o")


def test_root_gone_is_an_error_without_tombstones(share, tmp_path):
    """Renaming the share root away raises ShareError and records zero deletions."""
    share.write("a.txt", b"a")
    share.scan()
    revision = result_of(share.store.get_revision(SHARE))
    os.rename(share.root, tmp_path / "elsewhere")
    with pytest.raises(ShareError, match="not reachable"):
        share.scan()
    assert result_of(share.store.get_revision(SHARE)) == revision
    assert not share.record("a.txt").deleted


def test_marker_gone_is_an_error_without_tombstones(share):
    """An emptied root without its marker (unmounted disk) raises ShareError, no tombstones."""
    share.write("a.txt", b"a")
    share.scan()
    os.remove(share.root / "a.txt")
    os.remove(share.root / ".clearskies")
    with pytest.raises(ShareError, match="marker"):
        share.scan()
    assert not share.record("a.txt").deleted
    write_marker(str(share.root), SHARE)
    assert share.scan().records[0].deleted


def test_marker_of_another_share_is_an_error(share):
    """A marker naming a different share is treated like a missing one."""
    write_marker(str(share.root), "6" * 64)
    with pytest.raises(ShareError):
        share.scan()


def test_unreadable_directory_protects_its_records(share, monkeypatch):
    """Records below a directory that cannot be listed are not tombstoned."""
    share.write("locked/secret", b"s")
    share.write("open/file", b"f")
    share.scan()
    real_scandir = os.scandir
    locked = str(share.root / "locked")

    def scandir(path):
        if str(path) == locked:
            raise PermissionError(13, "Permission denied", path)
        return real_scandir(path)

    monkeypatch.setattr(scanner_module.os, "scandir", scandir)
    os.remove(share.root / "open" / "file")
    result = share.scan()
    assert [(r.path, r.deleted) for r in result.records] == [("open/file", True)]
    assert not share.record("locked/secret").deleted


def test_partial_scan_only_looks_at_its_paths(share):
    """A scan of given paths sees changes there and nowhere else."""
    share.write("a/1", b"1")
    share.write("b/2", b"2")
    share.scan()
    share.write("a/1", b"changed")
    share.write("b/2", b"changed too")
    share.write("a/new", b"new")
    result = share.scan(["a"])
    assert sorted(r.path for r in result.records) == ["a/1", "a/new"]
    assert share.scan(["b/2"]).records[0].path == "b/2"


def test_partial_scan_of_many_paths_and_a_big_directory(share):
    """Hundreds of single-file scopes (asked for together) and a directory with more rows
    than one first page: every change is found, nothing unchanged is reported."""
    for n in range(100):
        share.write("big/f%03d" % n, b"%d" % n)
    for n in range(300):
        share.write("single/s%03d" % n, b"s%d" % n)
    share.scan()
    share.write("big/f050", b"changed")
    os.remove(share.root / "big" / "f099")
    share.write("big/new", b"new")
    share.write("single/s150", b"changed")
    os.remove(share.root / "single" / "s299")
    scopes = ["big"] + ["single/s%03d" % n for n in range(300)]
    result = share.scan(scopes)
    changed = {r.path: r.deleted for r in result.records}
    assert changed == {"big/f050": False, "big/f099": True, "big/new": False,
                       "single/s150": False, "single/s299": True}
    # big: 98 files and the directory itself; single: 298 files.
    assert result.unchanged == 98 + 1 + 298


def test_partial_scan_of_vanished_directory(share):
    """A partial scan of a removed directory tombstones it and everything below."""
    share.write("gone/x/y", b"1")
    share.write("gone b", b"2")  # sorts between "gone" and "gone/": must survive
    share.scan()
    for path in ("gone/x/y",):
        os.remove(share.root / path)
    os.rmdir(share.root / "gone" / "x")
    os.rmdir(share.root / "gone")
    result = share.scan(["gone"])
    assert sorted(r.path for r in result.records) == ["gone", "gone/x", "gone/x/y"]
    assert not share.record("gone b").deleted


def test_utime_rules():
    """utime: scan time first, then min(mtime, since), always after the replaced record."""
    assert local_utime(50.0, None, 100.0, None) == 100.0
    assert local_utime(50.0, 80.0, 100.0, None) == 50.0
    assert local_utime(90.0, 80.0, 100.0, None) == 80.0
    assert local_utime(None, 80.0, 100.0, None) == 80.0
    previous = FileRecord(path="a", utime=85.0, deleted=True)
    assert local_utime(50.0, 80.0, 100.0, previous) == pytest.approx(85.001)


def test_rescan_dates_changes_by_previous_scan(share):
    """On a rescan, a change with an old mtime is dated by its mtime, a newer one by `since`."""
    share.scan()
    since = share.clock.seconds()
    share.write("old.txt", b"o", mtime=1_000_000_000)
    share.write("new.txt", b"n", mtime=since + 5)
    records = share.by_path(share.scan())
    assert records["old.txt"].utime == 1_000_000_000
    assert records["new.txt"].utime == since


def test_progress_is_reported_while_hashing(share):
    """Progress counts bytes and files while hashing and resets to idle after."""
    share.write("a", b"x" * 1000)
    share.write("b", b"y" * 24)
    seen = []
    share.hasher.outcome = lambda path: (seen.append(share.scanner.progress.as_dict()),
                                         hash_file(path))[1]
    share.scan()
    assert seen[0]["phase"] == "hashing" and seen[0]["bytes_total"] == 1024
    assert seen[0]["files_total"] == 2
    assert share.scanner.progress.phase == "idle"


def test_normalize_scopes():
    """Scopes are deduplicated, invalid ones dropped, and nested ones folded into parents."""
    assert normalize_scopes(["a/b", "a", "a b", "a b/c", "../x", "c/d", "c/d"]) == [
        "a", "a b", "c/d"]


# -- hashing -------------------------------------------------------------------------

def test_hash_file_reports_hash_and_matching_stat(tmp_path):
    """hash_file returns the SHA-256 with the size, mtime, inode and mode it belongs to."""
    target = tmp_path / "f"
    target.write_bytes(b"abc" * 1000)
    os.chmod(target, 0o604)
    done = []
    outcome = hash_file(str(target), done.append, block_size=1024)
    st = os.stat(target)
    assert outcome.sha256 == sha(b"abc" * 1000)
    assert (outcome.size, outcome.mtime_ns, outcome.inode, outcome.mode) == (
        3000, st.st_mtime_ns, st.st_ino, 0o604)
    assert done == [1024, 1024, 952]


def test_hash_file_detects_change_while_reading(tmp_path):
    """A file written to during hashing is reported unstable, not given a wrong hash."""
    target = tmp_path / "f"
    target.write_bytes(b"a" * 4096)

    def meddle(n):
        with open(target, "ab") as f:
            f.write(b"more")

    outcome = hash_file(str(target), meddle, block_size=1024)
    assert isinstance(outcome, Unstable) and "changed" in outcome.reason


def test_hash_file_refuses_symlinks_fifos_and_missing(tmp_path):
    """Symlinks are not followed, FIFOs do not block, missing files are reported."""
    (tmp_path / "real").write_bytes(b"r")
    os.symlink(tmp_path / "real", tmp_path / "link")
    os.mkfifo(tmp_path / "fifo")
    for name in ("link", "fifo", "missing"):
        assert isinstance(hash_file(str(tmp_path / name)), Unstable)


def test_file_written_by_sync_after_the_listing_is_not_a_deletion(share, monkeypatch):
    """A row stored after the scan listed the folder (a download landing) gets no tombstone."""
    share.scan()
    real_take = scanner_module.TreeWalk.take
    data = b"downloaded meanwhile"
    landed = FileRecord(path="landed.txt", utime=5.0, size=len(data), mtime=(5, 0),
                        mode=0o644, sha256=sha(data), vv={"b" * 32: 1})

    def walk_then_download(walk, count):
        listing = real_take(walk, count)  # the listing does not contain landed.txt yet
        if len(listing) < count:  # the walk is over
            share.write("landed.txt", data)
            result_of(share.store.apply_changes(SHARE, [landed]))
        return listing

    monkeypatch.setattr(scanner_module.TreeWalk, "take", walk_then_download)
    result = share.scan()
    assert "landed.txt" not in share.by_path(result)
    assert share.record("landed.txt") == landed
    monkeypatch.setattr(scanner_module.TreeWalk, "take", real_take)
    assert not share.record("landed.txt").deleted


# -- edges: far-future times, what cannot be synced, deep trees -------------------

def test_far_future_mtime_is_recorded_in_range_once(share):
    """A file dated 2286 gets one record with the clamped mtime; the next scan finds no change."""
    target = share.write("future.txt", b"from the future")
    os.utime(target, ns=(10**19, 10**19))  # 2286-11-20
    result = share.scan()
    record = share.by_path(result)["future.txt"]
    assert record.mtime == (MAX_TIME_SECONDS, 999_999_999)
    assert share.scan().records == [] and share.hasher.calls == []


def _reasons(share):
    return {e["path"]: e["reason"] for e in share.scanner.skipped.entries()}


def test_every_skipped_path_is_listed_with_its_reason(share, tmp_path):
    """Symlinks, FIFOs, bad names, unreadable files and folders are listed, counted, not recorded."""
    share.write("ok.txt", b"1")
    os.symlink("ok.txt", share.root / "link")
    os.mkfifo(share.root / "pipe")
    share.write("new\nline", b"2")
    with open(os.path.join(os.fsencode(share.root), b"bad\xff"), "wb") as f:
        f.write(b"3")
    share.write("locked.txt", b"secret").chmod(0o000)
    share.write("closed/inside.txt", b"4")
    (share.root / "closed").chmod(0o000)
    try:
        result = share.scan()
    finally:
        (share.root / "closed").chmod(0o755)
    assert set(share.by_path(result)) == {"ok.txt"}
    reasons = _reasons(share)
    assert reasons == {
        "link": scanner_module.SYMLINK, "pipe": scanner_module.SPECIAL,
        "new\nline": reasons["new\nline"], "bad\udcff": scanner_module.NOT_UTF8,
        "locked.txt": scanner_module.UNREADABLE, "closed": scanner_module.UNREADABLE}
    assert "control character" in reasons["new\nline"]
    assert result.skipped == 6 and share.scanner.skipped.count == 6


def test_a_folder_made_unreadable_keeps_its_records(share):
    """chmod 000 on a synced folder and file: no tombstone, no mode-000 record goes out."""
    share.write("dir/a.txt", b"a")
    share.write("b.txt", b"b")
    share.scan()
    (share.root / "dir").chmod(0o000)
    (share.root / "b.txt").chmod(0o000)
    try:
        result = share.scan()
    finally:
        (share.root / "dir").chmod(0o755)
    assert result.records == []
    assert share.record("dir").mode == 0o755 and not share.record("dir/a.txt").deleted
    assert share.record("b.txt").mode == 0o644
    # Readable again: nothing changed, nothing to announce.
    (share.root / "b.txt").chmod(0o644)
    assert share.scan().records == [] and share.scanner.skipped.count == 0


def test_a_tree_deeper_than_supported_is_skipped_not_recursed(share):
    """300 nested folders: the first 256 levels sync, the rest is listed as too deep."""
    fd = os.open(share.root, os.O_RDONLY)
    try:
        for _ in range(300):
            os.mkdir("d", dir_fd=fd)
            inner = os.open("d", os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = inner
    finally:
        os.close(fd)
    result = share.scan()
    assert result.directories == MAX_PATH_DEPTH
    reasons = _reasons(share)
    assert list(reasons) == ["/".join(["d"] * (MAX_PATH_DEPTH + 1))]
    assert reasons[list(reasons)[0]].startswith(scanner_module.TOO_DEEP)
    assert share.scan().records == []


def test_a_partial_scan_updates_the_skip_list_of_its_paths_only(share):
    """A file made unreadable is listed by the partial scan that sees it, and dropped once readable."""
    os.symlink("elsewhere", share.root / "link")
    share.scan()
    target = share.write("late.txt", b"late")
    target.chmod(0o000)
    result = share.scan(["late.txt"])
    assert result.records == [] and share.record("late.txt") is None
    assert _reasons(share) == {"link": scanner_module.SYMLINK,
                               "late.txt": scanner_module.UNREADABLE}
    target.chmod(0o644)
    assert [r.path for r in share.scan(["late.txt"]).records] == ["late.txt"]
    assert _reasons(share) == {"link": scanner_module.SYMLINK}


def test_a_local_change_is_never_dated_past_the_range_peers_accept():
    """After a record dated at the very end of the range, ours stays in range (not refused)."""
    previous = FileRecord(path="a", utime=float(MAX_TIME_SECONDS), size=1, mtime=(0, 0),
                          sha256="0" * 64)
    assert local_utime(1.0, 2.0, 3.0, previous) == MAX_TIME_SECONDS
    assert FileRecord.from_wire(previous.with_changes(utime=local_utime(
        1.0, 2.0, 3.0, previous)).to_wire()).utime == MAX_TIME_SECONDS


def test_our_counter_never_passes_the_range_peers_accept():
    """A counter forged to the top of the range stays there instead of going one past it."""
    assert scanner_module.bump({PEER: MAX_COUNTER}, PEER) == {PEER: MAX_COUNTER}
    assert vv_bump({PEER: MAX_COUNTER}, PEER) == {PEER: MAX_COUNTER}
    assert scanner_module.bump({PEER: 4}, PEER) == {PEER: 5}

def test_private_paths_are_never_listed_nor_recorded(share):
    """The daemon's data directory inside a share is neither recorded nor watched."""
    share.write("data/state.sqlite3", b"db")
    share.write("data/keys/k.json", b"secret")
    share.write("data.txt", b"mine")
    share.scanner.private_paths = ("data",)
    assert share.scanner.rules.is_ignored("data/keys/k.json")  # before any scan
    result = share.scan()
    assert sorted(share.by_path(result)) == ["data.txt"]
    assert scanner_module.list_directories(str(share.root), ("data",)) == []


def test_adopting_scan_dates_new_files_before_the_share(share):
    """An adopting first scan dates new records 0, so any record of the share beats them."""
    share.write("hello.txt", b"mine")
    share.scanner.adopting = True
    first = share.by_path(share.scan())["hello.txt"]
    assert first.utime == 0.0
    assert first.vv == {PEER: 1}
    share.scanner.adopting = False
    share.write("hello.txt", b"edited later")
    assert share.by_path(share.scan())["hello.txt"].utime > 0


def test_the_marker_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """A crash while the marker is written leaves no empty marker (it is renamed into
    place); an empty one left by an older version does not block claiming the folder."""
    from clearskies.share import scanner as scanner_module
    from clearskies.share.folder import _claim_root

    def crash(*args):
        raise OSError(5, "power cut")

    monkeypatch.setattr("clearskies.atomicwrite.os.replace", crash)
    with pytest.raises(OSError):
        scanner_module.write_marker(str(tmp_path), "f" * 64)
    assert sorted(os.listdir(tmp_path)) == []
    monkeypatch.undo()
    (tmp_path / ".clearskies").write_bytes(b"")
    _claim_root(str(tmp_path), "f" * 64)
    assert scanner_module.read_marker(str(tmp_path)) == "f" * 64
