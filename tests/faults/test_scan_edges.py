"""Fault injection at the edges of scanning: far-future times, what cannot be read or synced,
hostile numbers and very deep paths, on real daemons."""

from __future__ import annotations

import os
import secrets
import stat
import time
from pathlib import Path

import pytest

from clearskies.control.commands import DaemonCommands
from tests.daemons import wait_same_trees, wait_until
from tests.helpers import async_test
from tests.peerkit import PeerKitCase, file_entry, sleep
from tests.peerkit import wait_until as wait_on_reactor

YEAR_2286_NS = 10**19
DEEP = 2000


def _manifest(peer, peer_id: str, files: list[dict], revision: int = 1) -> None:
    peer.send({"type": "manifest", "peer": peer_id, "revision": revision, "files": files})


def _skipped(runtime) -> dict[str, str]:
    return {e["path"]: e["reason"] for e in runtime.service.scanner.skipped.entries()}


class HostileRecordTests(PeerKitCase):
    """A scripted peer sends records the daemon must refuse one by one, once."""

    @async_test
    async def test_a_huge_mtime_is_refused_for_that_record_only_and_once(self):
        """mtime [2**62-1, 0]: never fetched, logged once, listed; the good file still syncs."""
        runtime = await self.start_daemon()
        peer_id = secrets.token_hex(16)
        peer = await self.connect(peer_id=peer_id)
        hostile = file_entry("far.txt", b"far", vv={peer_id: 1})
        hostile["mtime"] = [2**62 - 1, 0]
        _manifest(peer, peer_id, [hostile, file_entry("good.txt", b"good", vv={peer_id: 1})])
        await peer.wait_for("get", where=lambda b: b["path"] == "good.txt")
        peer.send_payload({"type": "file_data", "path": "good.txt"}, b"good")
        await wait_on_reactor(lambda: self.share_path("good.txt").exists(), what="good.txt")
        for revision in (2, 3, 4):  # sent again and again: still one log line
            peer.send({"type": "update", "revision": revision, "file": hostile})
        await sleep(0.5)
        self.assertFalse(peer.closed)
        self.assertEqual([b["path"] for b in peer.messages("get")], ["good.txt"])
        self.assertFalse(self.share_path("far.txt").exists())
        refused = [t for t in self.logged() if "far.txt" in t and "out of range" in t]
        self.assertEqual(len(refused), 1, refused)
        self.assertFalse(any("OverflowError" in t or "Traceback" in t for t in self.logged()))
        self.assertIn("mtime is out of range", _skipped(runtime)["far.txt"])
        self.assertEqual(runtime.sync.wanted, {})
        self.assertEqual(DaemonCommands(self.daemon).share_summary(runtime)["skipped"], 1)

    @async_test
    async def test_a_2000_level_path_is_refused_once_without_recursion(self):
        """A valid path 2,000 levels deep: refused with the reason, never asked for, no RecursionError."""
        runtime = await self.start_daemon()
        peer_id = secrets.token_hex(16)
        peer = await self.connect(peer_id=peer_id)
        deep = "/".join(["d"] * (DEEP - 1) + ["f.txt"])
        entries = [file_entry(deep, b"deep", vv={peer_id: 1}),
                   {"path": "/".join(["d"] * DEEP), "utime": time.time(), "directory": True,
                    "mode": "0755", "vv": {peer_id: 1}},
                   file_entry("near.txt", b"near", vv={peer_id: 1})]
        _manifest(peer, peer_id, entries)
        await peer.wait_for("get", where=lambda b: b["path"] == "near.txt")
        peer.send_payload({"type": "file_data", "path": "near.txt"}, b"near")
        await wait_on_reactor(lambda: self.share_path("near.txt").exists(), what="near.txt")
        _manifest(peer, peer_id, entries, revision=2)  # the same again
        await sleep(0.5)
        self.assertFalse(peer.closed)
        self.assertEqual([b["path"] for b in peer.messages("get")], ["near.txt"])
        self.assertFalse(self.share_path("d").exists())
        logged = self.logged()
        self.assertFalse(any("RecursionError" in t or "Traceback" in t for t in logged))
        self.assertEqual(sum(1 for t in logged if "levels deep" in t), 2, logged)  # file, dir
        self.assertEqual(runtime.sync.wanted, {})
        self.assertIn("levels deep", _skipped(runtime)[deep])


class LockedFolderTests(PeerKitCase):
    """The user's ``chmod 000`` on a folder holds against a peer's version of it."""

    def _lock(self) -> Path:
        locked = self.share_path("locked")
        locked.mkdir()
        (locked / "mine.txt").write_bytes(b"the user's own\n")
        locked.chmod(0o000)
        self.addCleanup(locked.chmod, 0o755)
        return locked

    @async_test
    async def test_a_peer_never_changes_or_fills_a_folder_the_daemon_may_not_read(self):
        """Mode 000 stays 000; the peer's files for it are not fetched; both are listed as skipped.

        The daemon treats a folder whose owner lacks r-x as unreadable even as
        root (which the kernel would let in), so this holds for every user."""
        locked = self._lock()
        runtime = await self.start_daemon()
        self.assertEqual(_skipped(runtime), {"locked": "unreadable (permission denied)"})
        peer_id = secrets.token_hex(16)
        peer = await self.connect(peer_id=peer_id)
        _manifest(peer, peer_id, [
            {"path": "locked", "utime": time.time() + 100, "directory": True, "mode": "0755",
             "vv": {peer_id: 9}},
            file_entry("locked/theirs.txt", b"theirs", vv={peer_id: 1}),
            file_entry("open.txt", b"open", vv={peer_id: 1})])
        await peer.wait_for("get", where=lambda b: b["path"] == "open.txt")
        peer.send_payload({"type": "file_data", "path": "open.txt"}, b"open")
        await wait_on_reactor(lambda: self.share_path("open.txt").exists(), what="open.txt")
        await sleep(0.5)
        self.assertEqual(stat.S_IMODE(os.lstat(locked).st_mode), 0o000)
        self.assertEqual([b["path"] for b in peer.messages("get")], ["open.txt"])
        locked.chmod(0o755)
        self.assertEqual(sorted(os.listdir(locked)), ["mine.txt"])
        reasons = _skipped(runtime)
        self.assertIn("permission denied", reasons["locked/theirs.txt"])
        self.assertFalse(any("max_user_watches" in t for t in self.logged()))
        # Nothing of it went out either: our records hold no mode-000 folder.
        self.assertIsNone(await runtime.get_record("locked/mine.txt"))


# -- two daemon processes ------------------------------------------------------------


@pytest.mark.slow
def test_a_file_dated_2286_syncs_once_without_a_conflict_copy(daemon_factory):
    """A 2286 mtime: one sync, no conflict copy, both shares settle and stay settled."""
    alice, bob = daemon_factory("alice"), daemon_factory("bob")
    a, b = Path(alice.shares), Path(bob.shares)
    future = a / "future.txt"
    future.write_text("dated 2286\n")
    os.utime(future, ns=(YEAR_2286_NS, YEAR_2286_NS))
    code = alice.cli_json("share", str(a))["access_code"]
    bob.cli("attach", code, str(b), "--peer", alice.address)
    wait_same_trees(a, b, 30)

    def settled(daemon, path):
        status = daemon.cli_json("status", str(path))
        return status["in_sync"] and status["status"] not in ("syncing", "scanning") and status

    first = wait_until(lambda: settled(alice, a), timeout=30)
    wait_until(lambda: settled(bob, b), timeout=30)
    time.sleep(2)
    again = wait_until(lambda: settled(alice, a), timeout=10)
    assert again["revision"] == first["revision"]  # nothing re-recorded in a loop
    for side in (a, b):
        assert sorted(p.name for p in side.iterdir() if p.name != ".clearskies") == [
            "future.txt"]
    assert os.stat(future).st_mtime_ns == YEAR_2286_NS  # the user's file keeps its date
    for daemon in (alice, bob):
        log = daemon.log_tail(400)
        assert "OverflowError" not in log and "Traceback" not in log


@pytest.mark.slow
def test_status_skipped_lists_an_unreadable_file_and_a_fifo(daemon_factory):
    """`clearskies status DIR --skipped` lists each path with its reason, and status counts them."""
    alice = daemon_factory("alice")
    a = Path(alice.shares)
    (a / "fine.txt").write_text("fine\n")
    locked = a / "locked.txt"
    locked.write_text("secret\n")
    locked.chmod(0o000)
    os.mkfifo(a / "pipe")
    alice.cli_json("share", str(a))

    def listed():
        status = alice.cli_json("status", str(a), "--skipped")
        return status.get("skipped") == 2 and status

    status = wait_until(listed, timeout=30)
    assert {e["path"]: e["reason"] for e in status["skipped_paths"]} == {
        "locked.txt": "unreadable (permission denied)",
        "pipe": "special file (FIFO, socket or device)"}
    assert "skipped_paths" not in alice.cli_json("status", str(a))
    human = alice.cli("status", str(a), "--skipped").stdout
    assert "2 paths not synced" in human
    assert "skipped locked.txt: unreadable (permission denied)" in human
    assert alice.cli_json("status", str(a))["files"] == 1
