"""One folder of a share from the state database, a page at a time (clearskies.share.browse)."""

from __future__ import annotations

import pytest

from clearskies.share import browse, pages
from tests.helpers import STATE_PEER, STATE_SHARE, state_database, stored_file


@pytest.fixture
def db(tmp_path):
    database = state_database(tmp_path / "state.sqlite3")
    yield database
    database.close()


def listing(db, directory: str, limit: int) -> list[list[str]]:
    """Every page of ``directory``, as the control command reads them."""
    out, after = [], None
    while True:
        held, wanted = browse.folder_page(db, STATE_SHARE, directory, after, limit)
        entries, more = browse.merge(held, wanted, limit)
        out.append([e.path for e in entries])
        if not more:
            return out
        after = entries[-1].path


def test_only_the_folder_s_own_entries_in_pages(db) -> None:
    """Entries directly inside the folder, none below it, none of a sibling whose name
    starts alike (`a` and `a-b`, `a0`), no deletions; pages follow one another."""
    records = [stored_file("a", is_dir=True)] + [stored_file("a/%03d" % n) for n in range(25)]
    records += [stored_file("a/deep", is_dir=True), stored_file("a/deep/x"),
                stored_file("a-b/c"), stored_file("a0/c"), stored_file("top.txt"),
                stored_file("a/gone", deleted=True, sha=None)]
    db.apply_changes(STATE_SHARE, records)
    pages_of_a = listing(db, "a", 10)
    assert [len(p) for p in pages_of_a] == [10, 10, 6]
    assert sum(pages_of_a, []) == ["a/%03d" % n for n in range(25)] + ["a/deep"]
    assert sum(listing(db, "", 2), []) == ["a", "top.txt"]
    assert listing(db, "a/deep", 100) == [["a/deep/x"]]
    assert listing(db, "nothing", 100) == [[]]


def test_wanted_files_are_listed_as_not_held(db) -> None:
    """Files the share wants appear in their folder, not held; one held and wanted is held
    with a newer version coming; pages count each path once."""
    db.apply_changes(STATE_SHARE, [stored_file("p", is_dir=True), stored_file("p/old.jpg"),
                                   stored_file("p/both.jpg")])
    pages.put_wanted(db, STATE_SHARE, [(stored_file("p/new%d.jpg" % n, sha="1" * 64), None,
                                        [STATE_PEER]) for n in range(3)]
                     + [(stored_file("p/both.jpg", sha="2" * 64), None, [STATE_PEER])])
    held, wanted = browse.folder_page(db, STATE_SHARE, "p", None, 100)
    entries, more = browse.merge(held, wanted, 100)
    by_path = {e.path: e for e in entries}
    assert not more and len(entries) == 5
    assert by_path["p/new0.jpg"].held is False and by_path["p/new0.jpg"].sha256 == "1" * 64
    assert by_path["p/both.jpg"].held and by_path["p/both.jpg"].wanted
    assert by_path["p/both.jpg"].sha256 == "0" * 64  # the content here
    assert sum(listing(db, "p", 2), []) == sorted(by_path)
    assert by_path["p/new1.jpg"].to_json()["name"] == "new1.jpg"


def test_is_child() -> None:
    """Only paths directly inside the folder."""
    assert browse.is_child("a/b", "a") and browse.is_child("top", "")
    assert not browse.is_child("a/b/c", "a") and not browse.is_child("a-b", "a")
    assert not browse.is_child("a/b", "") and not browse.is_child("ab/c", "a")
