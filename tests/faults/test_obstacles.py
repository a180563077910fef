"""Peers' files blocked here by a symlink or an unreadable folder arrive once it is gone.

Until then the share is not in sync (status says why, `wait` keeps
waiting), and nothing is written through the obstacle.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.daemons import (
    assert_trees_equal, share_status, synced_pair, wait_same_trees, wait_until)

pytestmark = pytest.mark.slow

SETTLE_TIMEOUT = 60.0
#: Well under the periodic retry (RETRY_AFTER, 30 s): the scan is what lets them in.
AFTER_SCAN = 15.0


def _refused(daemon, path: Path, wire_path: str) -> bool:
    return any(e["path"] == wire_path and e["where"] == "peer"
               for e in share_status(daemon, path, skipped=True)["skipped_paths"])


def _pair(daemon_factory, files: dict[str, bytes]):
    alice, bob, a, b = synced_pair(daemon_factory, files, SETTLE_TIMEOUT)
    bob.cli("wait", str(b), "--timeout", str(SETTLE_TIMEOUT))
    return alice, bob, a, b


def _blocked_then_freed(alice, bob, a: Path, b: Path, free) -> None:
    """Alice adds and edits files under sub/; Bob refuses them, then ``free()`` and a scan let them in."""
    (a / "sub").mkdir(exist_ok=True)
    (a / "sub" / "new.txt").write_bytes(b"new from alice\n")
    if (a / "sub" / "old.txt").exists():
        (a / "sub" / "old.txt").write_bytes(b"old, edited by alice\n")
        (a / "sub" / "gone.txt").unlink()
    alice.cli("scan", str(a))
    wait_until(lambda: _refused(bob, b, "sub/new.txt"), timeout=SETTLE_TIMEOUT,
               message="bob never refused sub/new.txt")
    status = share_status(bob, b, skipped=True)
    assert status["in_sync"] is False, status
    assert "sub/new.txt" in status.get("conflicts_waiting", []), status
    result = bob.cli("wait", str(b), "--timeout", "1", check=False)
    assert result.returncode == 3, result
    free()
    bob.cli("scan", str(b))
    wait_same_trees(alice, bob, AFTER_SCAN)
    assert (b / "sub" / "new.txt").read_bytes() == b"new from alice\n"
    bob.cli("wait", str(b), "--timeout", str(SETTLE_TIMEOUT))
    assert_trees_equal(a, b)
    status = share_status(bob, b, skipped=True)
    assert status["in_sync"] is True, status
    assert [e for e in status["skipped_paths"] if e["where"] == "peer"] == [], status
    assert "conflicts_waiting" not in status, status


def test_files_behind_a_removed_symlink_arrive_after_a_scan(daemon_factory, tmp_path):
    """A symlink in the way refuses Alice's files; once Bob removes it and scans, they arrive."""
    alice, bob, a, b = _pair(daemon_factory, {"start.txt": b"start\n"})
    outside = tmp_path / "outside"
    outside.mkdir()
    (b / "sub").symlink_to(outside, target_is_directory=True)
    bob.cli("scan", str(b))
    _blocked_then_freed(alice, bob, a, b, lambda: (b / "sub").unlink())
    assert os.listdir(outside) == []


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="POSIX permissions")
def test_files_in_a_folder_made_readable_again_arrive_after_a_scan(daemon_factory):
    """An unreadable (chmod 000) folder refuses Alice's new, edited and deleted files; after chmod 755 and a scan they arrive."""
    alice, bob, a, b = _pair(daemon_factory, {"start.txt": b"start\n",
                                              "sub/old.txt": b"old\n",
                                              "sub/gone.txt": b"gone\n"})
    os.chmod(b / "sub", 0)
    try:
        bob.cli("scan", str(b))
        _blocked_then_freed(alice, bob, a, b, lambda: os.chmod(b / "sub", 0o755))
    finally:
        if (b / "sub").exists():
            os.chmod(b / "sub", 0o755)
    assert (b / "sub" / "old.txt").read_bytes() == b"old, edited by alice\n"
    assert not (b / "sub" / "gone.txt").exists()
