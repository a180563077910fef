"""Fault injection: a sender or a receiver killed -9 at a random point.

Each trial runs two real daemons.  Alice shares a seeded tree (small files in
a few directories and two larger ones), Bob attaches; then one of them is
killed with SIGKILL, at a random moment or once a partial download reached a
random byte, and started again.  The same happens a second time while a
seeded batch of Alice's edits (overwrites, deletions, a directory rename, new
files) travels.  Every trial ends with both trees compared byte for byte,
`clearskies wait` agreeing on both sides, and no partial download left.

CI runs two seeds per victim; ``CLEARSKIES_FAULT_SEEDS=20`` runs seeds 0–19
(or give the seeds themselves: ``CLEARSKIES_FAULT_SEEDS="3 17"``).
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest

from tests.daemons import (
    TEMP_SUFFIX,
    DaemonProcess,
    assert_trees_equal,
    tree_snapshot,
    wait_until,
)

pytestmark = pytest.mark.slow


def fault_seeds(default: int = 2) -> list[int]:
    """Seeds from ``CLEARSKIES_FAULT_SEEDS``: a count (``20`` → 0–19) or a list of seeds."""
    text = os.environ.get("CLEARSKIES_FAULT_SEEDS", "").split()
    if not text:
        return list(range(default))
    if len(text) == 1:
        return list(range(int(text[0])))
    return [int(s) for s in text]


SYNC_TIMEOUT = 60.0
"""How long a tree may take to settle after a restart (normally a few seconds)."""

LARGE_SIZE = 6 * 1024 * 1024


def _names(root: Path) -> list[Path]:
    """Every path under ``root``; entries that vanish during the walk are passed over."""
    return [Path(d) / n for d, dirs, files in os.walk(root) for n in dirs + files]


def _temp_files(root: Path) -> list[Path]:
    return [p for p in _names(root) if p.name.endswith(TEMP_SUFFIX)]


def _conflicts(root: Path) -> list[Path]:
    return [p for p in _names(root) if ".CONFLICT." in p.name]


def _same_trees(a: Path, b: Path) -> bool:
    """Identical trees and no partial download; a tree changing under the walk is "not yet"."""
    try:
        return tree_snapshot(a) == tree_snapshot(b) and not _temp_files(b)
    except OSError:
        return False


def _make_tree(rng: random.Random, root: Path) -> None:
    """About 80 small files in nested directories and two larger ones."""
    for d in range(4):
        (root / ("dir%d" % d) / "inner").mkdir(parents=True)
    for index in range(80):
        parent = root / ("dir%d" % (index % 4))
        if index % 3 == 0:
            parent = parent / "inner"
        (parent / ("f%03d.bin" % index)).write_bytes(rng.randbytes(rng.randrange(0, 64_000)))
    for name in ("large-a.bin", "large-b.bin"):
        (root / name).write_bytes(rng.randbytes(LARGE_SIZE))


def _edit_tree(rng: random.Random, root: Path) -> None:
    """A batch of edits of every kind: overwrite, append, delete, rename a directory, create."""
    files = sorted(p for p in root.rglob("*.bin") if p.is_file())
    rng.shuffle(files)
    for path in files[:10]:
        path.write_bytes(rng.randbytes(rng.randrange(1, 64_000)))
    for path in files[10:14]:
        with open(path, "ab") as f:
            f.write(rng.randbytes(rng.randrange(1, 9_000)))
    for path in files[14:24]:
        if path.name.startswith("large-"):
            continue
        path.unlink()
    victim = rng.choice(["dir0", "dir1", "dir2", "dir3"])
    os.rename(root / victim, root / (victim + "-renamed"))
    (root / "new").mkdir(exist_ok=True)
    for index in range(12):
        (root / "new" / ("n%02d.txt" % index)).write_bytes(rng.randbytes(rng.randrange(0, 30_000)))
    # A large file rewritten whole, so a partial download of it is likely when the kill comes.
    (root / "large-a.bin").write_bytes(rng.randbytes(LARGE_SIZE))


def _partial_at_least(root: Path, size: int) -> bool:
    for candidate in _temp_files(root):
        try:
            if candidate.stat().st_size >= size:
                return True
        except FileNotFoundError:
            continue
    return False


def _kill_at_random_point(rng: random.Random, victim: DaemonProcess, receiver_root: Path,
                          max_delay: float) -> str:
    """SIGKILL ``victim`` after a random delay, or once a partial download reached a random byte."""
    if rng.random() < 0.5:
        delay = rng.uniform(0.0, max_delay)
        time.sleep(delay)
        how = "after %.2f s" % delay
    else:
        size = rng.randrange(1, LARGE_SIZE)
        try:
            wait_until(lambda: _partial_at_least(receiver_root, size), timeout=max_delay * 4,
                       interval=0.002, message="a partial download")
            how = "at byte %d of a partial download" % size
        except AssertionError:
            how = "after the download window (no partial of %d bytes seen)" % size
    victim.kill9()
    return how


def _settled(alice: DaemonProcess, bob: DaemonProcess, a: Path, b: Path, what: str) -> None:
    """Both trees identical byte for byte, `wait` agrees on both sides, no partial left."""
    wait_until(lambda: _same_trees(a, b), timeout=SYNC_TIMEOUT, interval=0.25, message=what)
    for daemon, root in ((alice, a), (bob, b)):
        result = daemon.cli("wait", str(root), "--timeout", "30", check=False)
        assert result.returncode == 0, "%s: `wait` on %s: %s%s\nstatus: %s" % (
            what, daemon.name, result.stdout, result.stderr,
            daemon.cli_json("status", str(root)))
    assert_trees_equal(a, b)
    assert _temp_files(a) == [] and _temp_files(b) == [], what
    assert _conflicts(a) == [] and _conflicts(b) == [], "%s: a conflict copy appeared" % what
    for daemon, root in ((alice, a), (bob, b)):
        status = daemon.cli_json("status", str(root))
        assert status.get("status") != "error", status


@pytest.mark.parametrize("seed", fault_seeds())
@pytest.mark.parametrize("victim_name", ["receiver", "sender"])
def test_kill9_at_random_points_converges(daemon_factory, seed, victim_name):
    """A sender or receiver killed -9 during the first sync and again during a batch
    of edits ends, after a restart, with identical trees, `wait` exit 0 on both
    sides and no partial download or conflict copy left."""
    rng = random.Random("%s-%d" % (victim_name, seed))
    alice, bob = daemon_factory("alice"), daemon_factory("bob")
    a, b = Path(alice.shares), Path(bob.shares)
    _make_tree(rng, a)
    code = alice.cli_json("share", str(a))["access_code"]
    bob.cli("attach", code, str(b), "--peer", alice.address)
    victim = bob if victim_name == "receiver" else alice
    trace = ["seed %d, victim %s" % (seed, victim_name)]

    trace.append("first sync: killed " + _kill_at_random_point(rng, victim, b, 2.0))
    victim.start()
    _settled(alice, bob, a, b, "; ".join(trace) + ": first sync")

    _edit_tree(rng, a)
    alice.cli("scan", str(a))
    trace.append("edits: killed " + _kill_at_random_point(rng, victim, b, 1.5))
    victim.start()
    _settled(alice, bob, a, b, "; ".join(trace) + ": after the edits")


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.1, 0.15, 0.2, 0.3])
def test_kill9_of_a_receiver_while_it_attaches(daemon_factory, delay):
    """A receiver killed -9 while its attach completes (keys arriving, the share
    being stored) and restarted still fills the share: the attach is never lost."""
    alice, bob = daemon_factory("alice"), daemon_factory("bob")
    a, b = Path(alice.shares), Path(bob.shares)
    _make_tree(random.Random(7), a)
    code = alice.cli_json("share", str(a))["access_code"]
    bob.cli("attach", code, str(b), "--peer", alice.address)
    time.sleep(delay)
    bob.kill9()
    bob.start()
    _settled(alice, bob, a, b, "receiver killed %.2f s into its attach" % delay)
