"""Faults around where shares live: the daemon's data directory, /, non-empty attach folders.

Real daemons (tests/daemons.py), driven through the CLI and the control socket.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from clearskies.accesscode import format_code
from clearskies.control.client import ControlError
from tests.daemons import TWISTD, wait_same_trees, wait_until

pytestmark = pytest.mark.slow

SYNC_TIMEOUT = 30.0
MARKER = ".clearskies"


def _refused(daemon, *args: str) -> str:
    """Run a CLI command that must fail with exit 1 and one line on stderr; returns it."""
    result = daemon.cli(*args, check=False)
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def _psks(data_dir: Path) -> list[str]:
    found = []
    for key_file in (data_dir / "keys").glob("*.json"):
        found.extend(json.loads(key_file.read_text())["psks"].values())
    return found


def _files_under(top: Path) -> set[str]:
    return {str(p.relative_to(top)) for p in top.rglob("*")} if top.exists() else set()


def test_sharing_data_dir_its_parent_or_root_is_refused(daemon_factory):
    """share of the data directory, a folder holding it, or / exits 1 saying why; nothing is written."""
    alice = daemon_factory("alice")
    assert alice.data_dir.parent == alice.base  # the harness keeps it inside the peer's folder
    (alice.base / "notes.txt").write_text("mine\n")
    for path, why in ((alice.data_dir, "is the daemon's own data directory"),
                      (alice.data_dir / "keys", "inside the daemon's data directory"),
                      (alice.base, "holds the daemon's data directory"),
                      (Path("/"), "holds the whole system"),
                      (Path("/proc"), "/proc holds the system's run-time state")):
        line = _refused(alice, "share", str(path))
        assert why in line and "share a folder" in line
        assert not (path / MARKER).exists()
    with pytest.raises(ControlError) as caught:
        alice.control_request({"type": "create_share", "path": str(alice.base)})
    assert caught.value.code == "refused"
    assert alice.control_request({"type": "list_shares"})["shares"] == []
    assert not (alice.base / MARKER).exists()

    # twistd --share is refused the same way, before the daemon starts.
    result = subprocess.run(
        [*TWISTD, "-n", "--pidfile=", "clearskies", "--data-dir", str(alice.data_dir),
         "--no-lan", "--share", str(alice.base)],
        env=alice.env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "holds the daemon's data directory" in result.stdout + result.stderr
    assert not (alice.base / MARKER).exists()


def test_share_made_by_an_older_version_around_the_data_dir_never_starts(daemon_factory):
    """A stored share that holds the data directory stays in error: its read-only peer gets
    nothing more, and its code gives out no keys."""
    alice, bob, carol = (daemon_factory(name) for name in ("alice", "bob", "carol"))
    (alice.shares / "hello.txt").write_text("hello\n")
    code = alice.cli_json("share", str(alice.shares), "--mode", "read_only",
                          "--multi-use")["access_code"]
    share_id = alice.cli_json("list")["shares"][0]["share_id"]
    bob.cli("attach", code, str(bob.shares), "--peer", alice.address)
    wait_until(lambda: (bob.shares / "hello.txt").exists(), timeout=SYNC_TIMEOUT)
    alice.stop()
    # What an older version accepted: the share's folder is the one holding the data dir.
    with sqlite3.connect(alice.data_dir / "state.sqlite3") as db:
        db.execute("UPDATE shares SET path = ? WHERE share_id = ?",
                   (str(alice.base), share_id))
    (alice.base / MARKER).write_text((alice.shares / MARKER).read_text())
    alice.start()

    result = alice.cli("--json", "status", str(alice.base), check=False)
    assert result.returncode == 1  # a share that stopped needs the user
    status = json.loads(result.stdout)
    assert status["status"] == "error"
    assert "holds the daemon's data directory" in status["problem"]

    # Bob, who holds the read-only keys, dials again and is turned away.
    wait_until(lambda: "cannot start a connection" in bob.log_tail(400), timeout=90)
    assert sorted(p.name for p in bob.shares.iterdir()) == [MARKER, "hello.txt"]

    target = carol.shares / "copy"
    carol.cli("attach", code, str(target), "--peer", alice.address)
    wait_until(lambda: "keys we do not hold" in alice.log_tail(400), timeout=SYNC_TIMEOUT)
    assert not target.exists()
    assert carol.cli_json("list")["shares"][0]["status"] == "waiting"
    assert _psks(carol.data_dir) == []  # no key of Alice's reached Carol
    read_write = json.loads((alice.data_dir / "keys" / (share_id + ".json")).read_text())
    assert read_write["psks"]["read_write"] not in json.dumps(
        [json.loads(k.read_text()) for k in (bob.data_dir / "keys").glob("*.json")])


def _pipelined(control_path: str, requests: list[dict]) -> list[dict]:
    """Write every request at once on one control connection, then read every reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(control_path)
        reader = sock.makefile("rb")
        reader.readline()  # the greeting
        sock.sendall(b"".join(json.dumps(r).encode() + b"\n" for r in requests))
        return [json.loads(reader.readline()) for _ in requests]


def test_detach_twice_says_not_a_share(daemon_factory):
    """A second detach, after or while the first runs, is told "not a share", never an internal error."""
    alice = daemon_factory("alice")
    (alice.shares / "a.txt").write_text("a\n")
    alice.cli("share", str(alice.shares))
    alice.cli("detach", str(alice.shares))
    line = _refused(alice, "detach", str(alice.shares))
    assert "is not a share" in line
    assert (alice.shares / "a.txt").read_text() == "a\n"

    second_folder = alice.base / "second"
    second_folder.mkdir()
    alice.cli("share", str(second_folder))
    with open(second_folder / "big.bin", "wb") as f:
        f.truncate(256 * 1024 * 1024)  # sparse: the rescan below hashes it for a while
    detach = {"type": "remove_share", "path": str(second_folder)}
    scan = {"type": ".clearskies.scan", "path": str(second_folder)}
    scanned, first, second = _pipelined(alice.control_path, [scan, detach, detach])
    assert "changes" in scanned or (scanned.get("error") == "refused"
                                    and "stopped syncing" in scanned["message"]), scanned
    assert first == {}, first
    assert second.get("error") == "refused" and "is not a share" in second["message"], second
    assert alice.control_request({"type": "list_shares"})["shares"] == []
    assert alice.running and "#critical" not in alice.log_tail(400)


def test_a_detached_folder_can_be_shared_again(daemon_factory):
    """detach removes the marker it wrote (the files stay), so ``share`` takes the folder again."""
    alice = daemon_factory("alice")
    (alice.shares / "a.txt").write_text("a\n")
    first = alice.cli_json("share", str(alice.shares))["access_code"]
    alice.cli("detach", str(alice.shares))
    assert sorted(p.name for p in alice.shares.iterdir()) == ["a.txt"]
    second = alice.cli_json("share", str(alice.shares))["access_code"]
    assert second != first
    assert [s["path"] for s in alice.cli_json("list")["shares"]] == [str(alice.shares)]
    assert sorted(p.name for p in alice.shares.iterdir()) == [MARKER, "a.txt"]
    assert (alice.shares / "a.txt").read_text() == "a\n"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _content(path) -> bytes | None:
    """A file's bytes, or None while it is absent (moved aside for a conflict copy)."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def test_attach_into_a_folder_with_files_needs_merge_and_the_share_wins(daemon_factory):
    """Non-empty attach is refused without --merge; with it the share's hello.txt wins
    everywhere, the local one becomes a conflict copy, an identical file is not downloaded
    and a local-only file is shared."""
    alice, bob = daemon_factory("alice"), daemon_factory("bob", start=False)
    bob.env["CLEARSKIES_TRACE"] = "1"  # logs each file request
    bob.start()
    a, b = alice.shares, bob.shares
    (a / "hello.txt").write_bytes(b"the share's hello\n")
    (a / "same.txt").write_bytes(b"identical on both\n")
    code = alice.cli_json("share", str(a))["access_code"]
    time.sleep(1.5)  # Bob's copies are written later than Alice's: newer by the clock
    theirs = b"bob's own hello, written later\n"
    (b / "hello.txt").write_bytes(theirs)
    (b / "same.txt").write_bytes(b"identical on both\n")
    (b / "only_bob.txt").write_bytes(b"bob only\n")
    before = _files_under(b)

    line = _refused(bob, "attach", code, str(b), "--peer", alice.address)
    assert "is not empty" in line and "--merge" in line
    assert _files_under(b) == before  # no marker, nothing touched
    assert bob.cli_json("list")["shares"] == []

    bob.cli("attach", code, str(b), "--peer", alice.address, "--merge")
    conflict = "hello.CONFLICT.%s.txt" % _sha(theirs)[:8]
    wait_until(lambda: (a / conflict).exists() and (a / "only_bob.txt").exists(),
               timeout=SYNC_TIMEOUT)
    wait_same_trees(a, b, SYNC_TIMEOUT)
    for folder in (a, b):
        assert (folder / "hello.txt").read_bytes() == b"the share's hello\n"
        assert (folder / conflict).read_bytes() == theirs
        assert (folder / "only_bob.txt").read_bytes() == b"bob only\n"
    assert (b / "same.txt").read_bytes() == b"identical on both\n"
    requests = [line for line in bob.log_tail(2000).splitlines() if "asking " in line]
    assert any("hello.txt" in line for line in requests)
    assert not any("same.txt" in line for line in requests)  # reused, never downloaded


def test_a_code_that_does_not_work_leaves_no_folder(daemon_factory):
    """attach with a code nobody holds creates nothing; a folder whose parent is missing is refused."""
    alice, bob = daemon_factory("alice"), daemon_factory("bob")
    alice.cli("share", str(alice.shares))
    wrong = format_code(bytes(range(16)))
    target = bob.base / "new-folder"
    bob.cli("attach", wrong, str(target), "--peer", alice.address)
    wait_until(lambda: "cannot start a connection" in bob.log_tail(400), timeout=SYNC_TIMEOUT)
    assert not target.exists()
    bob.cli("detach", str(target))
    assert bob.cli_json("list")["shares"] == []

    line = _refused(bob, "attach", wrong, "/nonexistent/xyz")
    assert "does not exist" in line
    assert not os.path.exists("/nonexistent")


def _adopting(daemon) -> list[str]:
    with sqlite3.connect(daemon.data_dir / "state.sqlite3") as db:
        row = db.execute("SELECT value FROM config WHERE key = 'adopting_shares'").fetchone()
    return json.loads(row[0]) if row else []


def test_merge_attach_restarted_before_its_first_scan_still_lets_the_share_win(daemon_factory):
    """A --merge attach whose first scan had not run when the daemon stopped still dates
    the local files before the share's after the restart."""
    alice, bob = daemon_factory("alice"), daemon_factory("bob")
    a, b = alice.shares, bob.shares
    (a / "hello.txt").write_bytes(b"the share's hello\n")
    code = alice.cli_json("share", str(a))["access_code"]
    time.sleep(1.5)
    theirs = b"bob's own hello, written later\n"
    (b / "hello.txt").write_bytes(theirs)
    bob.cli("pause")  # the share is created, but its first scan waits
    bob.cli("attach", code, str(b), "--peer", alice.address, "--merge")
    wait_until(lambda: (b / MARKER).exists() and _adopting(bob), timeout=SYNC_TIMEOUT)
    bob.stop()
    bob.start()
    conflict = "hello.CONFLICT.%s.txt" % _sha(theirs)[:8]
    wait_until(lambda: (a / conflict).exists(), timeout=SYNC_TIMEOUT)
    wait_same_trees(a, b, SYNC_TIMEOUT)
    assert (b / "hello.txt").read_bytes() == b"the share's hello\n"
    assert (b / conflict).read_bytes() == theirs
    wait_until(lambda: _adopting(bob) == [], timeout=SYNC_TIMEOUT)


def test_twistd_attach_options_kept_for_later_runs(daemon_factory):
    """twistd --code --into --merge attaches into a folder with files; a restart with the
    same options keeps the share instead of failing."""
    alice = daemon_factory("alice")
    (alice.shares / "hello.txt").write_bytes(b"the share's hello\n")
    code = alice.cli_json("share", str(alice.shares), "--multi-use")["access_code"]
    bob = daemon_factory("bob", "--code", code, "--into", "", "--peer", alice.address,
                         "--merge", start=False)
    bob.extra[bob.extra.index("--into") + 1] = str(bob.shares)
    (bob.shares / "only_bob.txt").write_bytes(b"bob only\n")
    bob.start()
    wait_until(lambda: (alice.shares / "only_bob.txt").exists(), timeout=SYNC_TIMEOUT)
    wait_same_trees(alice.shares, bob.shares, SYNC_TIMEOUT)
    bob.restart()
    assert [s["path"] for s in bob.cli_json("list")["shares"]] == [str(bob.shares)]


def test_sharing_a_home_directory_warns_but_works(daemon_factory):
    """share of the user's home (data directory elsewhere) succeeds with one warning line."""
    alice = daemon_factory("alice")
    (alice.home / "notes.txt").write_text("mine\n")
    result = alice.cli("share", str(alice.home))
    assert result.returncode == 0 and result.stdout.startswith("SYNC")
    assert result.stderr.startswith("clearskies: warning: %s is a home directory" % alice.home)
    assert (alice.home / MARKER).exists()


def test_read_only_merge_keeps_local_files_to_itself(daemon_factory):
    """With a read-only code, --merge takes the share's hello.txt, keeps the local one as a
    conflict copy, and sends none of the local files to the share."""
    alice, bob = daemon_factory("alice"), daemon_factory("bob")
    a, b = alice.shares, bob.shares
    (a / "hello.txt").write_bytes(b"the share's hello\n")
    code = alice.cli_json("share", str(a), "--mode", "read_only")["access_code"]
    time.sleep(1.5)
    theirs = b"bob's own hello, written later\n"
    (b / "hello.txt").write_bytes(theirs)
    (b / "only_bob.txt").write_bytes(b"bob only\n")
    bob.cli("attach", code, str(b), "--peer", alice.address, "--merge")
    conflict = "hello.CONFLICT.%s.txt" % _sha(theirs)[:8]
    wait_until(lambda: _content(b / "hello.txt") == b"the share's hello\n",
               timeout=SYNC_TIMEOUT)
    assert (b / conflict).read_bytes() == theirs
    wait_until(lambda: bob.cli_json("status", str(b)).get("in_sync"), timeout=SYNC_TIMEOUT)
    time.sleep(1)
    assert sorted(p.name for p in a.iterdir()) == [MARKER, "hello.txt"]
