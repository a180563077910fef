""""In sync" means the trees match: status and ``clearskies wait`` after big batches.

A renamed directory of 1,000 files and 1,000 deletions reach the peer as
bursts of moves and updates; while the peer still holds some of them in its
queues, the sending side must not call it in sync.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.daemons import (
    assert_trees_equal, synced_pair, share_status, tree_snapshot, wait_until)

pytestmark = pytest.mark.slow

FILES = 1000
SETTLE_TIMEOUT = 120.0


def _start_wait(daemon, path: Path) -> subprocess.Popen:
    argv = [sys.executable, "-m", "clearskies.cli", "--data-dir", str(daemon.data_dir),
            "wait", str(path), "--timeout", str(SETTLE_TIMEOUT)]
    return subprocess.Popen(argv, env=daemon.env, cwd=daemon.base, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _same_trees(a: Path, b: Path, when: str) -> None:
    try:
        assert_trees_equal(a, b)
    except AssertionError as e:
        raise AssertionError("%s, but %s" % (when, e)) from None


def _watch_until_in_sync(alice, a: Path, b: Path) -> None:
    """Poll Alice's status every few ms and run ``wait``: neither may say "in sync" early."""
    waiter = _start_wait(alice, a)
    wait_checked = status_checked = False
    deadline = time.monotonic() + SETTLE_TIMEOUT
    try:
        while not (wait_checked and status_checked):
            assert time.monotonic() < deadline, "never in sync"
            if not wait_checked and waiter.poll() is not None:
                assert waiter.returncode == 0, waiter.stderr.read()
                # wait returned: the trees match now, or it returned too early.
                _same_trees(a, b, "clearskies wait returned")
                wait_checked = True
            if not status_checked:
                status = share_status(alice, a)
                (peer,) = [p for p in status["peers"] if p["connected"]]
                if status["in_sync"] or peer["in_sync"]:
                    _same_trees(a, b, "status said in sync (acknowledged revision %s of %s)"
                                % (peer["acknowledged_revision"], status["revision"]))
                    status_checked = True
            time.sleep(0.003)
    finally:
        if waiter.poll() is None:
            waiter.kill()
        waiter.wait()
        waiter.stderr.close()


def _pair_holding(daemon_factory, files: dict[str, bytes]):
    alice, bob, a, b = synced_pair(daemon_factory, files, SETTLE_TIMEOUT)
    wait_until(lambda: share_status(alice, a)["in_sync"], timeout=SETTLE_TIMEOUT)
    return alice, bob, a, b


def _files(seed: int) -> dict[str, bytes]:
    rng = random.Random(seed)
    return {"tree/%02d/f%04d.txt" % (i % 10, i): rng.randbytes(rng.randrange(1, 400))
            for i in range(FILES)}


def test_a_renamed_directory_is_in_sync_only_once_the_peer_renamed_it(daemon_factory):
    """After renaming 1,000 files' directory, status and wait say in sync only once trees match."""
    alice, bob, a, b = _pair_holding(daemon_factory, _files(1))
    os.rename(a / "tree", a / "renamed")
    alice.cli("scan", str(a))
    _watch_until_in_sync(alice, a, b)
    assert not (b / "tree").exists()
    assert len(tree_snapshot(b)) == len(tree_snapshot(a))


def test_deletions_are_in_sync_only_once_the_peer_deleted_them(daemon_factory):
    """After 1,000 deletions and a scan, status and wait say in sync only once trees match."""
    alice, bob, a, b = _pair_holding(daemon_factory, _files(2))
    for path in sorted((a / "tree").rglob("*.txt")):
        path.unlink()
    alice.cli("scan", str(a))
    _watch_until_in_sync(alice, a, b)
    assert not list((b / "tree").rglob("*.txt"))


def test_wait_right_after_writing_files_returns_only_once_the_peer_has_them(daemon_factory):
    """Files written just before `wait` (not scanned yet) keep it waiting until the peer has them."""
    alice, bob, a, b = _pair_holding(daemon_factory, {"start.txt": b"start"})
    rng = random.Random(3)
    for i in range(200):
        (a / ("new%03d.txt" % i)).write_bytes(rng.randbytes(rng.randrange(1, 300)))
    status = share_status(alice, a)  # (well within the watcher's 1 s of quiet)
    assert (status["in_sync"], status.get("local_changes_pending")) == (False, True), status
    result = alice.cli("wait", str(a), "--timeout", str(SETTLE_TIMEOUT))
    assert "in sync" in result.stdout
    _same_trees(a, b, "clearskies wait returned")
    assert len(tree_snapshot(b)) == 201


def test_wait_with_the_only_peer_stopped_is_not_in_sync(daemon_factory):
    """With its only peer stopped, `wait` times out naming the missing peer, and succeeds once it is back."""
    alice, bob, a, b = _pair_holding(daemon_factory, {"start.txt": b"start"})
    bob.stop()
    wait_until(lambda: not [p for p in share_status(alice, a)["peers"] if p["connected"]],
               timeout=30)
    result = alice.cli("wait", str(a), "--timeout", "1", check=False)
    assert result.returncode == 3, result
    assert "no peer connected" in result.stderr
    bob.start()
    alice.cli("wait", str(a), "--timeout", str(SETTLE_TIMEOUT))
