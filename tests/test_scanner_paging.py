"""The scanner holds a page of the tree at a time: the lazy walk, moves across pages, bounded memory."""

import os
import tracemalloc

import pytest

from clearskies.errors import ShareError
from clearskies.share.ignore import IgnoreRules
from clearskies.share.scanner import Listing, TreeWalk, walk_share
from tests.test_database import result_of
from tests.test_scanner import Share


def _walk_pages(root, count):
    listing = Listing()
    walk = TreeWalk(str(root), IgnoreRules(), listing)
    entries, pages = [], 0
    while True:
        page = walk.take(count)
        assert len(page) <= count
        entries.extend(page)
        pages += 1
        if len(page) < count:
            return entries, listing, pages


@pytest.mark.parametrize("count", [1, 3, 1000])
def test_the_lazy_walk_lists_what_walk_share_lists_in_the_same_order(tmp_path, count):
    """Page by page, the walk yields walk_share's entries in path (byte) order, and the
    same skipped and protected paths."""
    root = tmp_path / "share"
    for path in ["a", "a b/x", "a/x", "a/x y/z", "a-b", "a0", "é/f", "z/y/x/w", "b/.hidden",
                 "deep/" + "/".join("d%d" % n for n in range(12)) + "/f"]:
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        if path == "a":
            continue
        target.write_bytes(path.encode())
    (root / "empty").mkdir()
    os.symlink("a0", root / "link")
    os.mkfifo(root / "a b" / "fifo")
    whole = walk_share(str(root), None, IgnoreRules())
    entries, listing, pages = _walk_pages(root, count)
    assert [e.path for e in entries] == sorted(e.path for e in entries)
    assert entries == whole.entries
    assert sorted(listing.skipped) == sorted(whole.skipped)
    assert sorted(listing.protected) == sorted(whole.protected)
    assert pages == len(entries) // count + 1


def test_an_unreadable_folder_is_left_out_of_the_lazy_walk(tmp_path):
    """A folder the daemon may not list gets no entry, is protected and listed as skipped."""
    if os.geteuid() == 0:
        pytest.skip("root reads every folder")
    root = tmp_path / "share"
    (root / "closed").mkdir(parents=True)
    (root / "closed" / "f").write_bytes(b"x")
    (root / "open").mkdir()
    os.chmod(root / "closed", 0)
    try:
        entries, listing, _ = _walk_pages(root, 2)
    finally:
        os.chmod(root / "closed", 0o755)
    assert [e.path for e in entries] == ["open"]
    assert "closed" in listing.protected and "closed" in listing.denied


def test_a_share_folder_that_cannot_be_listed_is_an_error_not_deletions(tmp_path):
    """A root whose marker can be read but whose entries cannot be listed fails the scan:
    nothing is taken for deleted."""
    if os.geteuid() == 0:
        pytest.skip("root lists every folder")
    share = Share(tmp_path)
    share.write("kept.txt", b"data")
    share.scan()
    os.chmod(share.root, 0o311)  # search (the marker opens), no listing
    try:
        with pytest.raises(ShareError):
            share.scan()
    finally:
        os.chmod(share.root, 0o755)
    assert not share.record("kept.txt").deleted


def test_the_lazy_walk_raises_when_the_root_cannot_be_listed(tmp_path, monkeypatch):
    """TreeWalk refuses a root it cannot list, like walk_share (an empty listing would
    make every record a deletion)."""
    import clearskies.share.listing as listing_module

    def refuse(path):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(listing_module.os, "scandir", refuse)
    with pytest.raises(ShareError):
        TreeWalk(str(tmp_path), IgnoreRules(), Listing()).take(10)


def test_a_rename_across_pages_is_still_a_move(tmp_path):
    """With pages of 10 rows, a folder renamed to a name sorting before the old one (the new
    files come pages before the vanished ones) is recorded as moves, and nothing is hashed."""
    share = Share(tmp_path, batch_size=10)
    for n in range(35):
        share.write("old/f%02d" % n, b"content %d" % n)
    for n in range(20):
        share.write("other/g%02d" % n, b"other %d" % n)
    share.scan()
    os.rename(share.root / "old", share.root / "new")  # "new" < "old": listed first
    result = share.scan()
    assert share.hasher.calls == []
    assert result.moved == 35
    assert sorted(m.source for m in result.moves) == ["old/f%02d" % n for n in range(35)]
    assert all(share.record("old/f%02d" % n).deleted for n in range(35))
    assert not share.record("new/f07").deleted


def test_renames_are_matched_before_copies_take_their_source(tmp_path):
    """A folder renamed and a copy of one of its files made elsewhere (listed pages before
    the renamed file): the renamed file keeps its source, the copy is a new file."""
    share = Share(tmp_path, batch_size=4)
    for n in range(10):
        share.write("old/f%02d" % n, b"content %d" % n)
    share.scan()
    os.rename(share.root / "old", share.root / "zz")
    share.write("a/copy", b"content 3")  # "a/copy" sorts before "zz/f03"
    result = share.scan()
    assert sorted((m.source, m.destination.path) for m in result.moves) == [
        ("old/f%02d" % n, "zz/f%02d" % n) for n in range(10)]
    assert not share.record("a/copy").deleted
    assert share.hasher.calls == ["copy"]


def test_a_copy_then_delete_across_pages_is_a_move_by_content(tmp_path):
    """A vanished file listed after its copy (another page) still pairs with it by content."""
    share = Share(tmp_path, batch_size=4)
    for n in range(12):
        share.write("z/f%02d" % n, b"data %d" % n)
    share.scan()
    share.write("a/copy", b"data 5")
    os.unlink(share.root / "z" / "f05")
    result = share.scan()
    assert [(m.source, m.destination.path) for m in result.moves] == [("z/f05", "a/copy")]
    assert share.record("z/f05").deleted


def _peak_scanning(tmp_path, files, name):
    (tmp_path / name).mkdir()
    share = Share(tmp_path / name, batch_size=100)
    paths = ["d%03d/f%05d" % (n // 100, n) for n in range(files)]  # 100 files a folder
    for n, path in enumerate(paths):
        share.write(path, b"%d" % n)

    def scan():
        share.clock.advance(10)
        # (No listener keeping the batches: the sync layer sends them on.)
        return result_of(share.scanner.scan(None, None, None))

    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        first = scan()
        first_peak = tracemalloc.get_traced_memory()[1]
        for n in range(0, files, 2):  # half the files change
            share.write(paths[n], b"changed %d" % n)
        tracemalloc.reset_peak()
        second = scan()
        second_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert first.changes == files + files // 100 and second.changes == files // 2
    return first_peak, second_peak


def test_scanning_memory_does_not_grow_with_the_tree(tmp_path):
    """Scanning 4,000 files takes about as much memory as scanning 1,000 (pages of 100)."""
    small = _peak_scanning(tmp_path, 1000, "small")
    big = _peak_scanning(tmp_path, 4000, "big")
    for low, high in zip(small, big):
        # Held whole, four times the files would take about four times the memory.
        assert high < 1.5 * low + 256 * 1024, (small, big)


def test_a_new_file_stored_by_the_sync_layer_during_the_scan_keeps_that_record(tmp_path,
                                                                               monkeypatch):
    """A new file set aside by a scan, whose row the sync layer writes before the scan looks
    at it again, keeps the sync layer's record (the next scan looks at the file)."""
    from clearskies.share.pages import PagedStore
    from clearskies.share.records import FileRecord
    from tests.test_scanner import SHARE, sha

    share = Share(tmp_path)
    share.write("old.txt", b"old")  # a live file: new files are set aside
    share.scan()
    data = b"arrived"
    share.write("new.txt", data)
    landed = FileRecord(path="new.txt", utime=5.0, size=len(data), mtime=(5, 0), mode=0o644,
                        sha256=sha(data), vv={"b" * 32: 1})
    real_page = PagedStore.stage_page
    staged = []

    def store_then_read(paged, token, after=None, limit=1000):
        if not staged:  # the listing is compared; the new file waits in the stage
            result_of(share.store.apply_changes(SHARE, [landed]))
        d = real_page(paged, token, after, limit)
        return d.addCallback(lambda page: staged.extend(page) or page)

    monkeypatch.setattr(PagedStore, "stage_page", store_then_read)
    result = share.scan()
    assert {f.path for f in staged} == {"new.txt"}
    assert "new.txt" not in share.by_path(result)
    assert share.record("new.txt") == landed
