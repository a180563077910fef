"""Kept versions with real daemons: what a peer's change replaced or deleted comes back
with ``clearskies restore`` and syncs out again; cleaning thins them as the share says."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from clearskies.control.client import ControlError
from tests.daemons import share_and_attach, wait_same_trees, wait_until


def _pair(daemon_factory, files: dict[str, bytes]):
    alice, bob = daemon_factory("alice"), daemon_factory("bob")
    a, b = Path(alice.shares), Path(bob.shares)
    for name, data in files.items():
        (a / name).write_bytes(data)
    share_and_attach(alice, bob)
    wait_same_trees(alice, bob)
    return alice, bob, a, b


def _peer_id(daemon, share: Path) -> str:
    """The daemon's peer ID in its share, as the other side sees it."""
    return daemon.control_request({"type": ".clearskies.share_status", "path": str(share)}) \
        ["peers"][0]["peer_id"]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["trash", "simple", "staggered"])
def test_overwritten_and_deleted_files_are_restored_and_sync_back(daemon_factory, mode):
    """In each mode: Bob keeps what Alice's edit and deletion replaced; restoring both puts
    the old bytes back on Bob and then on Alice."""
    alice, bob, a, b = _pair(daemon_factory, {"report.txt": b"first draft\n",
                                              "photo.jpg": b"\xff\xd8 old pixels"})
    changed = bob.cli("config", "set", "versions", mode, "--share", str(b)).stdout
    assert changed.strip() == 'versions = "%s"' % mode
    assert bob.cli_json("config", "get", "--share", str(b))["config"]["versions"] == mode
    (a / "report.txt").write_bytes(b"second draft, by alice\n")
    (a / "photo.jpg").unlink()
    wait_same_trees(alice, bob)
    alice_id = _peer_id(bob, b)

    listed = bob.cli_json("versions", str(b / "report.txt"))["versions"]
    assert [(v["path"], v["size"], v["cause"], v["peer"]) for v in listed] == [
        ("report.txt", 12, "replaced", alice_id)]
    human = bob.cli("versions", str(b)).stdout
    assert "report.txt" in human and "photo.jpg" in human and "deleted by" in human

    bob.cli("restore", str(b / "report.txt"))
    bob.cli("restore", str(b / "photo.jpg"), "--version",
            bob.cli_json("versions", str(b / "photo.jpg"))["versions"][0]["id"])
    assert (b / "report.txt").read_bytes() == b"first draft\n"
    assert (b / "photo.jpg").read_bytes() == b"\xff\xd8 old pixels"
    wait_until(lambda: (a / "photo.jpg").exists()
               and (a / "photo.jpg").read_bytes() == b"\xff\xd8 old pixels"
               and (a / "report.txt").read_bytes() == b"first draft\n",
               timeout=30, message="the restored files on alice")
    wait_same_trees(alice, bob)
    # Alice's own edit was replaced by the restore: she keeps it in turn.
    kept = alice.cli_json("versions", str(a / "report.txt"))["versions"]
    assert [v["size"] for v in kept] == [len(b"second draft, by alice\n")]
    assert not (a / ".clearskies-versions").joinpath("report.txt").exists()


@pytest.mark.slow
def test_restore_at_a_time_and_bad_input(daemon_factory):
    """--at picks what the file held then; bad requests fail clearly, change nothing, and
    the daemon stays up."""
    alice, bob, a, b = _pair(daemon_factory, {"notes.txt": b"v1"})
    times = []
    for text in (b"v2", b"v3"):
        time.sleep(1.1)
        times.append(time.time())
        (a / "notes.txt").write_bytes(text)
        wait_until(lambda t=text: (b / "notes.txt").read_bytes() == t, timeout=30,
                   message="bob getting %r" % text)
    assert [v["size"] for v in bob.cli_json("versions", str(b / "notes.txt"))["versions"]] \
        == [2, 2]
    bob.cli("restore", str(b / "notes.txt"), "--at", str(times[0] - 0.5))
    assert (b / "notes.txt").read_bytes() == b"v1"
    bob.cli("restore", str(b / "notes.txt"), "--at", str(times[1] - 0.5))
    assert (b / "notes.txt").read_bytes() == b"v2"

    before = (b / "notes.txt").read_bytes()
    outside = Path(bob.base) / "elsewhere.txt"
    for args, says in [
        (("restore", str(outside)), "not inside a share"),
        (("restore", str(b / "notes.txt"), "--version", "20991231-000000-00000000"),
         "no version"),
        (("restore", str(b / "notes.txt"), "--version", "../../etc/passwd"),
         "not a version ID"),
        (("restore", str(b / "never-existed.txt")), "no version of never-existed.txt"),
        (("restore", str(b / ".clearskies-versions" / "x")), "inside the versions folder"),
        (("restore", str(b / "notes.txt"), "--at", "yesterday-ish"), "not a time"),
        (("config", "set", "versions", "forever", "--share", str(b)), "must be one of"),
        (("config", "set", "versions_days", "-3", "--share", str(b)), "versions days"),
    ]:
        result = bob.cli(*args, check=False)
        assert result.returncode != 0, args
        assert says in result.stderr, (args, result.stderr)
    assert (b / "notes.txt").read_bytes() == before
    assert not outside.exists()

    # The versions folder deleted: listing is empty, the next keep makes it again.
    versions = b / ".clearskies-versions"
    for entry in versions.iterdir():
        entry.unlink()
    versions.rmdir()
    assert bob.cli_json("versions", str(b))["versions"] == []
    result = bob.cli("restore", str(b / "notes.txt"), check=False)
    assert result.returncode == 1 and "no version of notes.txt" in result.stderr
    # Alice has what Bob restored before she edits again (edited while that download is
    # on its way, her edit and his restore are concurrent: a conflict copy, no version).
    wait_same_trees(a, b)
    (a / "notes.txt").write_bytes(b"v4")
    wait_until(lambda: (b / "notes.txt").read_bytes() == b"v4", timeout=30,
               message="bob getting v4")
    assert len(bob.cli_json("versions", str(b))["versions"]) == 1

    # The versions folder unwritable (a file in its place): a peer's deletion is not carried
    # out, nothing is lost, and the daemon keeps running.
    for entry in versions.iterdir():
        entry.unlink()
    versions.rmdir()
    versions.write_bytes(b"in the way")
    (a / "notes.txt").unlink()
    wait_until(lambda: "could not be kept" in (Path(bob.base) / "daemon.log").read_text()
               or "could not be kept" in bob.cli("log", "-n", "200").stdout,
               timeout=30, message="bob's warning")
    assert (b / "notes.txt").read_bytes() == b"v4"
    assert bob.running
    listing = bob.cli("versions", str(b), check=False)
    assert listing.returncode == 1 and "cannot read the versions folder" in listing.stderr
    with pytest.raises(ControlError):
        bob.control_request({"type": ".clearskies.restore", "path": str(b / "notes.txt")})
    assert bob.cli_json("status")["shares"] == 1


@pytest.mark.slow
def test_staggered_thinning_with_a_fake_clock(daemon_factory):
    """staggered: versions made within the hour all stay; cleaned as if hours and days
    later, one remains; past versions_days, none."""
    alice, bob, a, b = _pair(daemon_factory, {"log.txt": b"0"})
    bob.cli("config", "set", "versions", "staggered", "--share", str(b))
    bob.cli("config", "set", "versions_days", "7", "--share", str(b))
    for step in range(1, 5):
        (a / "log.txt").write_bytes(b"%d" % step)
        wait_until(lambda s=step: (b / "log.txt").read_bytes() == b"%d" % s, timeout=30,
                   message="bob getting step %d" % step)
    kept = bob.cli_json("versions", str(b / "log.txt"), "--clean")["versions"]
    assert len(kept) == 4

    def clean_at(seconds_later: float) -> list[dict]:
        reply = bob.control_request({"type": ".clearskies.versions", "path": str(b),
                                     "clean": True, "now": time.time() + seconds_later})
        return reply["versions"]

    [left] = clean_at(2 * 3600)
    assert left["id"] == kept[-1]["id"]  # the newest of that hour
    assert clean_at(3 * 86400) == [left]
    assert clean_at(8 * 86400) == []
    assert json.loads(json.dumps(bob.cli_json("versions", str(b))))["versions"] == []
    assert os.listdir(b / ".clearskies-versions") == []
