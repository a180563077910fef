"""Post-authentication amplification against a real daemon (protocol/wire.md, bounds).

A peer holding the share's keys sends lines built to cost far more to parse
than they weigh.  The daemon must close each such connection with a reason,
keep its memory bounded, and go on syncing with a legitimate peer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.abuse.hostile_peer import COMPRESSED, SHAPES
from tests.daemons import REPO_ROOT, wait_same_trees, wait_until

pytestmark = pytest.mark.slow


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory (VmHWM), in MB."""
    for line in Path("/proc/%d/status" % pid).read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM for pid %d" % pid)


def share_keys_path(daemon) -> Path:
    [share] = daemon.cli_json("list")["shares"]
    return Path(daemon.data_dir) / "keys" / (share["share_id"] + ".json")


def send_hostile(daemon, shapes: list[str], out: Path, wait: float = 30.0) -> list[dict]:
    """Run the hostile peer in a child process against ``daemon``; its results."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), CLEARSKIES_COMPRESSION="gzip")
    subprocess.run([sys.executable, "-m", "tests.abuse.hostile_peer", daemon.address,
                    str(share_keys_path(daemon)), str(out), str(wait), *shapes],
                   env=env, cwd=REPO_ROOT, check=True, timeout=240)
    return json.loads(out.read_text())


def test_hostile_lines_after_the_handshake(daemon_factory, tmp_path):
    """Each hostile line closes its connection; memory stays bounded; a real peer still syncs."""
    alice, bob = daemon_factory("alice"), daemon_factory("bob")
    a, b = Path(alice.shares), Path(bob.shares)
    (a / "before.txt").write_text("synced before the attack\n")
    code = alice.cli_json("share", str(a))["access_code"]
    bob.cli("attach", code, str(b), "--peer", alice.address)
    wait_same_trees(alice, bob, 40.0)
    before = peak_rss_mb(alice.pid)

    shapes = sorted(SHAPES)
    results = send_hostile(alice, shapes, tmp_path / "hostile.json")

    assert [r["shape"] for r in results] == shapes
    assert all(r["closed"] for r in results), results
    assert alice.running
    log = alice.log_path.read_text()
    for reason in ("JSON values, more than the 2097152 allowed", "levels deep",
                   "'get' message is over the 16384 bytes",
                   "'get' message of 16777212 bytes is over the 16384 bytes",
                   "number out of range", "signature line longer than 4096 bytes"):
        assert reason in log, reason
    # The 100,000-digit ping: refused for its type while it streams in, or, when it
    # arrives whole (inflated from a few hundred bytes under gzip), for its digits.
    assert ("'ping' message is over the 1024 bytes" in log
            or "Exceeds the limit (4300 digits)" in log)
    assert "Traceback" not in log
    # Parsing 16 MiB of "[]," whole took some 400 MB; holding a 16 MiB line (plus
    # TLS and socket buffers) is what remains.
    grown = peak_rss_mb(alice.pid) - before
    assert grown < 120, "peak RSS grew by %.0f MB" % grown

    # The legitimate peer's session lived through it and still syncs.
    (a / "after.txt").write_text("synced after the attack\n")
    wait_until(lambda: (b / "after.txt").exists(), timeout=40.0)
    wait_same_trees(alice, bob, 40.0)


def test_hostile_compressed_frames(daemon_factory, tmp_path):
    """Under gzip, a zip bomb, an endless compressed line, garbage, an oversize frame length
    and a plain line each close their connection with a clear reason; the daemon's memory
    stays bounded and a real peer still syncs."""
    alice, bob = daemon_factory("alice", start=False), daemon_factory("bob", start=False)
    for daemon in (alice, bob):
        daemon.env["CLEARSKIES_COMPRESSION"] = "gzip"
        daemon.start()
    a, b = Path(alice.shares), Path(bob.shares)
    (a / "before.txt").write_text("synced before the attack\n")
    code = alice.cli_json("share", str(a))["access_code"]
    bob.cli("attach", code, str(b), "--peer", alice.address)
    wait_same_trees(alice, bob, 40.0)
    before = peak_rss_mb(alice.pid)

    shapes = sorted(COMPRESSED)
    results = send_hostile(alice, shapes, tmp_path / "hostile.json")

    assert [r["shape"] for r in results] == shapes
    assert all(r["closed"] for r in results), results
    assert alice.running
    log = alice.log_path.read_text()
    for reason in ("inflates past 16842752 bytes (a zip bomb?)",
                   "'ping' message is over the 1024 bytes",
                   "compressed data is corrupt",
                   "compressed frame of 999999999 bytes is over the limit",
                   "compressed frame length is not 1 to 9 ASCII digits"):
        assert reason in log, reason
    assert "Traceback" not in log
    grown = peak_rss_mb(alice.pid) - before
    assert grown < 60, "peak RSS grew by %.0f MB" % grown

    (a / "after.txt").write_text("synced after the attack\n")
    wait_until(lambda: (b / "after.txt").exists(), timeout=40.0)
    wait_same_trees(alice, bob, 40.0)
