"""Kept versions on disk (clearskies.share.versions): keeping, listing, restoring, cleaning."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from clearskies.share.ignore import IgnoreRules
from clearskies.share.versions import DescriptionBatch, Version, VersionError, VersionStore

NOW = 1_800_000_000.0


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make(root: Path, path: str, data: bytes) -> str:
    local = root / path
    local.parent.mkdir(parents=True, exist_ok=True)
    local.write_bytes(data)
    return str(local)


def test_versions_folder_is_never_synced() -> None:
    """The versions folder and all below it are ignored, even if the user's patterns re-include it."""
    rules = IgnoreRules(["!.clearskies-versions", "!.clearskies-versions/**"])
    assert rules.is_ignored(".clearskies-versions", True)
    assert rules.is_ignored(".clearskies-versions/20261207-104858-1a2b3c4d")
    assert not rules.is_ignored("docs/.clearskies-versions-notes")


def test_keep_by_rename_records_where_it_came_from(tmp_path: Path) -> None:
    """A deleted file moves into the store (same inode) with its path, time, hash and peer."""
    local = make(tmp_path, "docs/a.txt", b"old")
    inode = os.stat(local).st_ino
    store = VersionStore(tmp_path)
    version = store.keep(local, "docs/a.txt", NOW, sha256=sha(b"old"), peer="p" * 64,
                         cause="deleted")
    assert version is not None and not os.path.exists(local)
    content = tmp_path / ".clearskies-versions" / version.version_id
    assert content.read_bytes() == b"old" and content.stat().st_ino == inode
    [listed] = store.versions("docs")
    assert (listed.path, listed.time, listed.size, listed.sha256, listed.peer, listed.cause) == (
        "docs/a.txt", NOW, 3, sha(b"old"), "p" * 64, "deleted")
    assert store.versions("doc") == [] and store.versions("docs/a.txt") == [listed]


def test_keep_by_link_leaves_the_file_for_the_replace(tmp_path: Path) -> None:
    """A file about to be replaced stays in place; the version shares its bytes."""
    local = make(tmp_path, "a.txt", b"old")
    store = VersionStore(tmp_path)
    version = store.keep(local, "a.txt", NOW)
    assert version is not None
    os.replace(make(tmp_path, "new.tmp", b"new"), local)
    assert store.local_copy(sha(b"old"), 3) is None  # no hash recorded: never used as a copy
    assert (tmp_path / ".clearskies-versions" / version.version_id).read_bytes() == b"old"


def test_keep_of_a_missing_file_is_nothing(tmp_path: Path) -> None:
    """Nothing at the path: nothing kept, no folder made."""
    assert VersionStore(tmp_path).keep(str(tmp_path / "gone"), "gone", NOW) is None
    assert not (tmp_path / ".clearskies-versions").exists()


def test_unwritable_versions_folder_fails_and_loses_nothing(tmp_path: Path) -> None:
    """A versions folder that cannot take the file: OSError, and the file stays where it was."""
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    local = make(tmp_path, "a.txt", b"keep me")
    (tmp_path / ".clearskies-versions").mkdir(mode=0o500)
    try:
        with pytest.raises(OSError):
            VersionStore(tmp_path).keep(local, "a.txt", NOW)
        assert Path(local).read_bytes() == b"keep me"
    finally:
        (tmp_path / ".clearskies-versions").chmod(0o700)


def test_versions_folder_replaced_by_a_file_is_refused(tmp_path: Path) -> None:
    """Something not a folder under the versions name: OSError, the file stays."""
    local = make(tmp_path, "a.txt", b"data")
    (tmp_path / ".clearskies-versions").write_bytes(b"not a folder")
    with pytest.raises(OSError):
        VersionStore(tmp_path).keep(local, "a.txt", NOW)
    assert Path(local).read_bytes() == b"data"


def test_versions_folder_a_symlink_or_a_share_gone_is_refused(tmp_path: Path) -> None:
    """A symlink under the versions name (even to a folder) is refused, and so is a share
    folder that went away: the file stays, nothing is written elsewhere."""
    local = make(tmp_path, "a.txt", b"data")
    elsewhere = tmp_path.parent / (tmp_path.name + "-elsewhere")
    elsewhere.mkdir()
    (tmp_path / ".clearskies-versions").symlink_to(elsewhere)
    with pytest.raises(NotADirectoryError):
        VersionStore(tmp_path).keep(local, "a.txt", NOW)
    assert Path(local).read_bytes() == b"data" and list(elsewhere.iterdir()) == []
    with pytest.raises(FileNotFoundError, match="share folder is missing"):
        VersionStore(tmp_path / "gone").keep(local, "a.txt", NOW)


def test_restore_keeps_what_it_replaces(tmp_path: Path) -> None:
    """Restoring copies the version back (it stays) and keeps the current file as a version."""
    local = make(tmp_path, "a.txt", b"one")
    store = VersionStore(tmp_path)
    first = store.keep(local, "a.txt", NOW, sha256=sha(b"one"), move=True)
    assert first is not None
    make(tmp_path, "a.txt", b"two")
    previous = store.restore(first, local, "a.txt", NOW + 5)
    assert Path(local).read_bytes() == b"one"
    assert previous is not None and previous.cause == "restore"
    assert {v.version_id for v in store.versions()} == {first.version_id, previous.version_id}
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".!clearsky")]


def test_restore_of_tampered_content_is_refused(tmp_path: Path) -> None:
    """A version whose bytes no longer match its hash is not put back; the file is untouched."""
    local = make(tmp_path, "a.txt", b"one")
    store = VersionStore(tmp_path)
    version = store.keep(local, "a.txt", NOW, sha256=sha(b"one"))
    assert version is not None
    (tmp_path / ".clearskies-versions" / version.version_id).write_bytes(b"evil")
    make(tmp_path, "a.txt", b"current")
    with pytest.raises(VersionError):
        store.restore(version, local, "a.txt", NOW)
    assert Path(local).read_bytes() == b"current"


def test_bad_and_unknown_ids_are_refused(tmp_path: Path) -> None:
    """IDs that are not ours, or name no version, give VersionError (never a path outside)."""
    store = VersionStore(tmp_path)
    for bad in ["../../etc/passwd", "", "20261207-104858-1a2b3c4d/../x", "x" * 5000]:
        with pytest.raises(VersionError):
            store.get(bad)
    with pytest.raises(VersionError, match="no version"):
        store.get("20261207-104858-1a2b3c4d")


def test_garbage_descriptions_are_skipped(tmp_path: Path) -> None:
    """Hand-made or damaged descriptions in the folder never break a listing."""
    directory = tmp_path / ".clearskies-versions"
    directory.mkdir()
    (directory / "20261207-104858-00000000.json").write_text("{not json")
    (directory / "20261207-104858-00000001.json").write_text(json.dumps({"path": 5}))
    (directory / "20261207-104858-00000001").write_text("x")
    (directory / "random.json").write_text("{}")
    assert VersionStore(tmp_path).versions() == []
    assert Version.from_json({"version_id": "20261207-104858-00000002", "path": "a",
                              "time": 1.0, "size": 1, "cause": "stolen"}) is None


def test_drop_and_orphans(tmp_path: Path) -> None:
    """drop frees the bytes; a description left without content by a crash goes once old."""
    store = VersionStore(tmp_path)
    kept = [store.keep(make(tmp_path, "f%d" % i, b"x" * 10), "f%d" % i, NOW) for i in range(3)]
    assert store.drop([kept[0].version_id, kept[1].version_id]) == 20
    assert [v.version_id for v in store.versions()] == [kept[2].version_id]
    os.unlink(tmp_path / ".clearskies-versions" / kept[2].version_id)
    assert store.versions() == []
    assert store.drop_orphans(0.0) == 0  # (its mtime is "now": too young)
    assert store.drop_orphans(NOW * 2) == 1
    assert os.listdir(tmp_path / ".clearskies-versions") == []


def test_a_batch_is_described_in_one_file(tmp_path: Path) -> None:
    """A job's many versions share one descriptions file, a line each; listing, get,
    restore and drop treat them as any other version."""
    store = VersionStore(tmp_path)
    batch = DescriptionBatch()
    kept = [store.keep(make(tmp_path, "d/f%03d" % i, b"%d" % i), "d/f%03d" % i, NOW,
                       sha256=sha(b"%d" % i), cause="deleted", durable=False, batch=batch)
            for i in range(250)]
    store.sync()
    directory = tmp_path / ".clearskies-versions"
    [described] = [n for n in os.listdir(directory) if n.endswith(".jsonl")]
    assert described == kept[0].version_id + ".jsonl"
    assert not [n for n in os.listdir(directory) if n.endswith(".json")]
    assert len((directory / described).read_bytes().splitlines()) == 250
    assert sorted(v.version_id for v in store.versions("d")) == sorted(
        v.version_id for v in kept)
    assert store.get(kept[123].version_id) == kept[123]
    assert store.local_copy(sha(b"77"), 2) == directory / kept[77].version_id
    store.restore(kept[5], str(tmp_path / "d/f005"), "d/f005", NOW + 1)
    assert (tmp_path / "d/f005").read_bytes() == b"5"
    # Dropping some leaves the file; dropping the last of its versions removes it.
    assert store.drop([v.version_id for v in kept[:200]]) == sum(
        len(b"%d" % i) for i in range(200))
    assert len(store.versions()) == 50 and (directory / described).exists()
    batch.close()  # the job is done
    store.drop([v.version_id for v in kept[200:]])
    assert os.listdir(directory) == []


def test_a_full_batch_starts_another_file_and_a_torn_line_is_skipped(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """BATCH_VERSIONS lines a file; a crash mid-line loses only that line's version
    (its content never moved: the line is written first)."""
    monkeypatch.setattr("clearskies.share.versions.BATCH_VERSIONS", 3)
    store = VersionStore(tmp_path)
    batch = DescriptionBatch()
    kept = [store.keep(make(tmp_path, "f%d" % i, b"x"), "f%d" % i, NOW, batch=batch)
            for i in range(7)]
    directory = tmp_path / ".clearskies-versions"
    files = sorted(n for n in os.listdir(directory) if n.endswith(".jsonl"))
    assert files == sorted(kept[i].version_id + ".jsonl" for i in (0, 3, 6))
    last = directory / (kept[6].version_id + ".jsonl")  # it holds only the seventh
    with open(directory / (kept[3].version_id + ".jsonl"), "ab") as f:
        f.write(b'{"version_id": "2026')  # a crash while a line was written
    assert len(store.versions()) == 7
    last.write_bytes(last.read_bytes()[:-20])  # the last line torn: its version unlisted
    assert len(store.versions()) == 6
    with pytest.raises(VersionError, match="no version"):
        store.get(kept[6].version_id)


def test_a_batch_file_stays_while_its_job_holds_it(tmp_path: Path) -> None:
    """Every version of a job's file so far dropped (a clean between two of its keeps):
    the file stays for the job's next version; it goes once the job is done and the
    last of its versions is dropped."""
    store = VersionStore(tmp_path)
    batch = DescriptionBatch()
    first = store.keep(make(tmp_path, "a", b"a"), "a", NOW, batch=batch)
    store.drop([first.version_id])
    assert store.drop_orphans(NOW * 2) == 0
    second = store.keep(make(tmp_path, "b", b"b"), "b", NOW, batch=batch)
    assert [v.version_id for v in store.versions()] == [second.version_id]
    batch.close()  # the job is done
    store.drop([second.version_id])
    assert os.listdir(tmp_path / ".clearskies-versions") == []


def test_a_foreign_jsonl_file_is_not_a_batch(tmp_path: Path) -> None:
    directory = tmp_path / ".clearskies-versions"
    directory.mkdir()
    (directory / "notes.jsonl").write_text(json.dumps({
        "version_id": "20261207-104858-00000003", "path": "a", "time": 1.0, "size": 1}))
    (directory / "20261207-104858-00000003").write_text("x")
    (directory / "20261207-104858-00000004.jsonl").write_bytes(b"\x00" * 100)
    assert VersionStore(tmp_path).versions() == []


def test_local_copy_by_hash(tmp_path: Path) -> None:
    """A kept version with the wanted SHA-256 and size is offered as a local copy."""
    store = VersionStore(tmp_path)
    store.keep(make(tmp_path, "a", b"content"), "a", NOW, sha256=sha(b"content"))
    copy = store.local_copy(sha(b"content"), 7)
    assert copy is not None and copy.read_bytes() == b"content"
    assert store.local_copy(sha(b"content"), 8) is None


def test_author_is_the_peer_whose_counter_grew() -> None:
    """The peer credited with a change is the one whose version-vector counter grew most."""
    from clearskies.daemon.versions import author
    from clearskies.share.records import FileRecord
    ours = FileRecord("a", 1.0, vv={"us": 3, "bob": 1})
    assert author(FileRecord("a", 2.0, vv={"us": 3, "bob": 2}), ours) == "bob"
    assert author(FileRecord("a", 2.0, vv={"us": 3, "bob": 1, "carol": 4}), ours) == "carol"
    assert author(FileRecord("a", 2.0, vv={"us": 3, "bob": 1}), ours) is None
    assert author(None, ours) is None


def test_clean_job_applies_the_policy_at_a_given_time(tmp_path: Path) -> None:
    """Cleaning drops what the policy no longer keeps at ``now`` and reports the hashes left."""
    from clearskies.daemon.versions import clean_job
    from clearskies.share.versionpolicy import DAY, VersionPolicy
    store = VersionStore(tmp_path)
    old = store.keep(make(tmp_path, "a", b"old"), "a", NOW - 40 * DAY, sha256=sha(b"old"))
    new = store.keep(make(tmp_path, "a", b"new"), "a", NOW, sha256=sha(b"new"))
    assert old is not None and new is not None
    dropped, freed, hashes = clean_job(store, VersionPolicy(), NOW)
    assert (dropped, freed, hashes) == (1, 3, {sha(b"new"): 1})
    assert [v.version_id for v in store.versions()] == [new.version_id]
    assert clean_job(store, VersionPolicy("trash", days=0), NOW + 1000 * DAY)[0] == 0
    assert clean_job(store, VersionPolicy(max_bytes=2), NOW)[:2] == (1, 3)
