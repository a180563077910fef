"""SkippedPaths: what a share does not sync, bounded, each path reported once."""

from clearskies.share.skipped import SkippedPaths


def test_a_path_is_new_once_until_its_reason_changes():
    """Repeated full scans report nothing new; a changed reason or a new path is reported."""
    skipped = SkippedPaths()
    assert skipped.scanned([("a", "symbolic link")], None) == [("a", "symbolic link")]
    assert skipped.scanned([("a", "symbolic link")], None) == []
    assert skipped.scanned([("a", "special file"), ("b", "x")], None) == [
        ("a", "special file"), ("b", "x")]
    assert skipped.count == 2


def test_a_partial_scan_replaces_only_its_subtrees():
    """Skips outside the scanned scopes stay; inside, only what the scan found remains."""
    skipped = SkippedPaths()
    skipped.scanned([("a/1", "r"), ("b/1", "r")], None)
    assert skipped.scanned([], ["a"]) == []
    assert [e["path"] for e in skipped.entries()] == ["b/1"]


def test_the_list_is_bounded_but_every_path_is_counted():
    """Over the limit, paths are counted, not kept."""
    skipped = SkippedPaths(limit=3)
    skipped.scanned([("f%d" % n, "r") for n in range(5)], None)
    for _ in range(3):  # over the limit too, a refusal is counted (and logged) once
        assert skipped.refused("peer-path", "out of range") is (_ == 0)
    assert skipped.count == 6 and len(skipped.entries()) == 3


def test_refused_records_are_listed_until_taken():
    """A peer's refused record is listed as such, and dropped once a record of it is taken."""
    skipped = SkippedPaths()
    skipped.refused("far.txt", "mtime is out of range")
    assert skipped.entries() == [
        {"path": "far.txt", "reason": "mtime is out of range", "where": "peer"}]
    skipped.accepted("far.txt")
    assert skipped.count == 0


def test_a_path_skipped_here_and_refused_from_a_peer_counts_once():
    """The count is of paths: one met both locally and from a peer is one."""
    skipped = SkippedPaths()
    skipped.scanned([("link", "symbolic link")], None)
    skipped.refused("link", "goes through a symbolic link")
    assert skipped.count == 1 and len(skipped.entries()) == 1
