"""Two real daemons on 127.0.0.1, driven only through the ``clearskies`` CLI."""

from __future__ import annotations

import os
from pathlib import Path

import psutil
import pytest

from tests.daemons import (
    share_and_attach, stop_with_cli, wait_same_trees, wait_until)

pytestmark = pytest.mark.slow

SYNC_TIMEOUT = 30.0


def _attach_pair(daemon_factory):
    alice = daemon_factory("alice")
    bob = daemon_factory("bob")
    return alice, bob


def _synced_pair_holding(daemon_factory, name: str, text: str):
    """Alice shares a folder holding one file, Bob attaches; returns once both hold it."""
    alice, bob = _attach_pair(daemon_factory)
    a, b = Path(alice.shares), Path(bob.shares)
    (a / name).write_text(text)
    share_and_attach(alice, bob)
    wait_same_trees(alice, bob, SYNC_TIMEOUT)
    return alice, bob, a, b


def _no_temp_files(root: Path) -> None:
    leftovers = [p for p in root.rglob("*") if p.name.endswith(".!clearsky")]
    assert leftovers == []


def test_share_attach_and_edit_both_ways(daemon_factory):
    """Files of every kind flow both ways and both trees end byte-identical."""
    alice, bob = _attach_pair(daemon_factory)
    a, b = Path(alice.shares), Path(bob.shares)
    (a / "hello.txt").write_text("hello from alice\n")
    (a / "empty").write_bytes(b"")
    (a / "empty-dir").mkdir()
    (a / "deep" / "er" / "tree").mkdir(parents=True)
    (a / "deep" / "er" / "tree" / "leaf.bin").write_bytes(os.urandom(300_000))
    script = a / "run.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o755)

    share_and_attach(alice, bob)
    wait_same_trees(alice, bob, SYNC_TIMEOUT)
    assert (b / "hello.txt").read_text() == "hello from alice\n"
    assert (b / "empty-dir").is_dir()
    assert os.stat(b / "run.sh").st_mode & 0o777 == 0o755

    # Bob edits, creates and deletes; Alice follows.
    (b / "hello.txt").write_text("bob was here\n")
    (b / "from-bob.txt").write_text("new file\n")
    (b / "empty").unlink()
    bob.cli("scan", str(b))
    wait_same_trees(alice, bob, SYNC_TIMEOUT)
    assert (a / "hello.txt").read_text() == "bob was here\n"
    assert not (a / "empty").exists()

    # Alice renames a directory tree, changes a mode and grows an empty file.
    os.rename(a / "deep", a / "moved")
    (a / "run.sh").chmod(0o700)
    (a / "grows").write_bytes(b"")
    alice.cli("scan", str(a))
    wait_same_trees(alice, bob, SYNC_TIMEOUT)
    (a / "grows").write_bytes(os.urandom(2_000_000))
    alice.cli("scan", str(a))
    wait_same_trees(alice, bob, SYNC_TIMEOUT)
    assert not (b / "deep").exists()
    assert (b / "moved" / "er" / "tree" / "leaf.bin").read_bytes() == \
        (a / "moved" / "er" / "tree" / "leaf.bin").read_bytes()
    _no_temp_files(a)
    _no_temp_files(b)

    # Bob's small downloads were sealed and installed by his disk helper: his one
    # child process, which ends with him (a stop from the CLI: twistd's SIGTERM).
    assert bob.pid is not None
    [helper] = psutil.Process(bob.pid).children(recursive=True)
    assert helper.cmdline()[-2:] == ["-m", "clearskies.diskhelper"]
    stop_with_cli(bob)
    helper.wait(timeout=15)
    assert not helper.is_running()


def test_changes_made_while_a_peer_is_down_sync_after_restart(daemon_factory):
    """Bob stops, both sides change things, Bob starts again: everything converges."""
    alice, bob, a, b = _synced_pair_holding(daemon_factory, "keep.txt", "1\n")

    stop_with_cli(bob)
    (a / "while-away.txt").write_text("alice wrote this while bob was away\n")
    (b / "offline-edit.txt").write_text("bob wrote this offline\n")
    alice.cli("scan", str(a))
    bob.start()
    wait_same_trees(alice, bob, SYNC_TIMEOUT)
    assert (b / "while-away.txt").exists() and (a / "offline-edit.txt").exists()

    listing = {s["path"]: s for s in bob.cli_json("list")["shares"]}
    assert listing[os.path.realpath(b)]["files"] == 3


def test_concurrent_edits_keep_both_versions(daemon_factory):
    """The same file edited on both sides while apart ends as the file plus a conflict copy."""
    alice, bob, a, b = _synced_pair_holding(daemon_factory, "notes.txt", "original\n")

    stop_with_cli(bob)
    (a / "notes.txt").write_text("alice's version\n")
    alice.cli("scan", str(a))
    (b / "notes.txt").write_text("bob's version, a bit longer\n")
    bob.start()
    bob.cli("scan", str(b))
    wait_same_trees(alice, bob, SYNC_TIMEOUT)

    # Both versions are kept, once each.  (When bob reconnects before his scan has
    # recorded his edit, his download sets alice's version aside while alice's merge
    # sets bob's aside: the version that then wins the path also has a copy, identical
    # to it, which the daemons remove once in sync: clearskies.daemon.identical.)
    def notes(root: Path) -> list[str]:
        return sorted(p.read_text() for p in root.iterdir() if p.name.startswith("notes"))

    wait_until(lambda: len(notes(a)) == 2 and notes(a) == notes(b), timeout=SYNC_TIMEOUT,
               message="one file and one conflict copy on both sides")
    assert notes(a) == ["alice's version\n", "bob's version, a bit longer\n"]
    assert any(".CONFLICT." in p.name for p in a.iterdir())

    # Bob settles it by hand: the copy's bytes over the file.  The copy now holds what
    # its file holds; both daemons let it go (kept as a version), and nothing else.
    (copy,) = [p for p in b.iterdir() if ".CONFLICT." in p.name]
    kept = copy.read_text()
    (b / "notes.txt").write_text(kept)
    bob.cli("scan", str(b))
    wait_until(lambda: notes(a) == notes(b) == [kept], timeout=SYNC_TIMEOUT + 15,
               message="the copy identical to its file gone on both sides")
    assert [v["path"] for v in bob.cli_json("versions", str(b))["versions"]
            if v["path"] == copy.name]
