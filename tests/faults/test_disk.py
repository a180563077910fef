"""Fault injection, the local disk: full, read-only, a share folder deleted or unmounted.

Real daemons, and real file systems the tests mount themselves (tmpfs and
bind mounts), so these need root; they skip, saying why, without it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemons import (
    MARKER_NAME, TEMP_SUFFIX, share_and_attach, share_status, tree_snapshot, wait_same_trees,
    wait_until)

pytestmark = pytest.mark.slow

SEED = 20261207
SYNC_TIMEOUT = 60.0


class Mounts:
    """Mounts made by one test; all undone at its end (lazily, if still busy)."""

    def __init__(self) -> None:
        self.points: list[Path] = []

    def run(self, *argv: str) -> None:
        result = subprocess.run(argv, capture_output=True, text=True)
        if result.returncode != 0:
            raise OSError("%s failed: %s" % (" ".join(argv), result.stderr.strip()))

    def tmpfs(self, point: Path, size: str) -> None:
        self.run("mount", "-t", "tmpfs", "-o", "size=%s,mode=0755" % size, "tmpfs", str(point))
        self.points.append(point)

    def bind(self, source: Path, point: Path) -> None:
        self.run("mount", "--bind", str(source), str(point))
        self.points.append(point)

    def remount(self, point: Path, options: str) -> None:
        self.run("mount", "-o", "remount,%s" % options, str(point))

    def unmount(self, point: Path) -> None:
        self.run("umount", "-l", str(point))
        self.points.remove(point)

    def close(self) -> None:
        for point in reversed(self.points):
            subprocess.run(["umount", "-l", str(point)], capture_output=True)
        self.points.clear()


@pytest.fixture
def mounts(tmp_path: Path) -> Iterator[Mounts]:
    """Lets a test mount file systems; skips without root or when mounting is not allowed."""
    if os.geteuid() != 0:
        pytest.skip("mounting a test file system needs root (CI runs as root)")
    probe = tmp_path / "mount-probe"
    probe.mkdir()
    made = Mounts()
    try:
        made.tmpfs(probe, "64k")
        made.unmount(probe)
    except OSError as e:
        made.close()
        pytest.skip("cannot mount a tmpfs here: %s" % e)
    yield made
    made.close()


def _fill(root: Path, count: int, size: int, rng: random.Random, prefix: str = "small") -> None:
    for index in range(count):
        path = root / ("%s/%03d.bin" % (prefix, index))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(size))


def _partials(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*" + TEMP_SUFFIX))


def _no_internal_errors(*daemons) -> None:
    for daemon in daemons:
        log = daemon.log_path.read_text(errors="replace")
        assert "#critical" not in log and "Traceback" not in log, daemon.log_tail(60)


def test_full_disk_lets_small_files_through_and_resumes_when_space_is_freed(
        daemon_factory, mounts):
    """Full disk: small files all arrive, status/wait name the big one, which arrives once it fits."""
    rng = random.Random(SEED)
    alice, bob = daemon_factory("alice"), daemon_factory("bob")
    big = alice.shares / "aaa-big.bin"  # first in path order: fetched first
    big.write_bytes(rng.randbytes(12 * 1024 * 1024))
    _fill(alice.shares, 240, 2048, rng)
    mounts.tmpfs(bob.shares, "6m")
    share_and_attach(alice, bob)

    small = {p: v for p, v in tree_snapshot(alice.shares).items() if p != big.name}
    wait_until(lambda: all(item in tree_snapshot(bob.shares).items()
                           for item in small.items()),
               timeout=SYNC_TIMEOUT, interval=0.5, message="every small file arrives")
    status = wait_until(lambda: (s := share_status(bob, bob.shares)).get("disk_errors") and s,
                        timeout=SYNC_TIMEOUT, message="the full disk shows in status")
    assert [e["path"] for e in status["disk_errors"]] == [big.name]
    assert status["disk_errors"][0]["error"] == "ENOSPC"
    assert "free space on the disk holding %s" % bob.shares in status["problem"]
    assert str(bob.shares / big.name) in status["problem"]
    assert status["items_to_download"] == 1 and not status["in_sync"]
    assert [p["connected"] for p in status["peers"]] == [True]  # never dropped, not "offline"
    assert status["status"] != "error"  # the share itself keeps syncing

    shown = bob.cli("status", str(bob.shares), check=False)
    assert shown.returncode == 1 and "free space on" in shown.stdout
    waited = bob.cli("wait", str(bob.shares), "--timeout", "30", check=False)
    assert waited.returncode == 1, waited
    assert "cannot finish" in waited.stderr and "free space on" in waited.stderr
    assert "aaa-big.bin" in waited.stderr
    # The partial that filled the disk was removed (it would starve every later file).
    assert _partials(bob.shares) == []
    assert not (bob.shares / big.name).exists()

    mounts.remount(bob.shares, "size=40m")
    wait_same_trees(alice, bob, timeout=SYNC_TIMEOUT)
    wait_until(lambda: "disk_errors" not in share_status(bob, bob.shares), timeout=10)
    assert bob.cli("wait", str(bob.shares), "--timeout", "30").returncode == 0
    assert bob.cli("status", str(bob.shares)).returncode == 0
    _no_internal_errors(alice, bob)


def test_read_only_disk_is_reported_and_syncing_resumes_when_writable(daemon_factory, mounts):
    """Read-only remount: files wait with EROFS in status and wait, then arrive after a remount rw."""
    rng = random.Random(SEED + 1)
    alice, bob = daemon_factory("alice"), daemon_factory("bob")
    _fill(alice.shares, 5, 1000, rng, prefix="before")
    mounts.tmpfs(bob.shares, "16m")
    share_and_attach(alice, bob)
    wait_same_trees(alice, bob, timeout=SYNC_TIMEOUT)
    bob.cli("wait", str(bob.shares), "--timeout", "30")

    mounts.remount(bob.shares, "ro")
    _fill(alice.shares, 5, 300 * 1024, rng, prefix="after")  # streamed, not buffered
    (alice.shares / "note.txt").write_bytes(b"small and new\n")
    status = wait_until(lambda: (s := share_status(bob, bob.shares)).get("disk_errors") and s,
                        timeout=SYNC_TIMEOUT, message="the read-only disk shows in status")
    assert status["disk_errors"][0]["error"] == "EROFS"
    assert "read-only" in status["problem"] and "remount" in status["problem"]
    waited = bob.cli("wait", str(bob.shares), "--timeout", "30", check=False)
    assert waited.returncode == 1 and "read-only" in waited.stderr
    assert bob.cli("status", str(bob.shares), check=False).returncode == 1
    assert [p["connected"] for p in share_status(bob, bob.shares)["peers"]] == [True]

    mounts.remount(bob.shares, "rw")
    wait_same_trees(alice, bob, timeout=SYNC_TIMEOUT)
    wait_until(lambda: "disk_errors" not in share_status(bob, bob.shares), timeout=10)
    assert bob.cli("wait", str(bob.shares), "--timeout", "30").returncode == 0
    _no_internal_errors(alice, bob)


def test_deleted_and_restored_root_resumes_by_itself(daemon_factory):
    """A deleted folder stops the share, deleting nothing; restored with its marker, it resumes."""
    rng = random.Random(SEED + 2)
    alice, bob = daemon_factory("alice"), daemon_factory("bob")
    _fill(alice.shares, 20, 500, rng)
    share_and_attach(alice, bob)
    wait_same_trees(alice, bob, timeout=SYNC_TIMEOUT)
    bob.cli("wait", str(bob.shares), "--timeout", "30")
    before = tree_snapshot(alice.shares)

    backup = bob.base / "backup"
    shutil.copytree(bob.shares, backup)  # copy2: times kept, like a restore would
    shutil.rmtree(bob.shares)
    status = wait_until(lambda: (s := share_status(bob, bob.shares))["status"] == "error" and s,
                        timeout=10, message="the share stops")
    # The check may land while rmtree has taken the marker but not yet the folder.
    said = ("not reachable", "lost its .clearskies")
    assert any(s in status["problem"] for s in said), status["problem"]
    shown = bob.cli("status", str(bob.shares), check=False)
    assert shown.returncode == 1 and any(s in shown.stdout for s in said)
    (alice.shares / "while-away.txt").write_bytes(b"written while bob's folder was gone\n")

    shutil.copytree(backup, bob.shares)
    wait_until(lambda: share_status(bob, bob.shares)["status"] != "error", timeout=15,
               message="the share resumes by itself")
    wait_same_trees(alice, bob, timeout=SYNC_TIMEOUT)
    assert {p: v for p, v in tree_snapshot(alice.shares).items()
            if p != "while-away.txt"} == before  # nothing was deleted on the peer
    _no_internal_errors(alice, bob)


def test_deleted_marker_stops_the_share_and_repair_recreates_it(daemon_factory):
    """A lost marker stops the share in seconds; repair refuses a folder without its files, then works."""
    rng = random.Random(SEED + 3)
    alice, bob = daemon_factory("alice"), daemon_factory("bob")
    _fill(alice.shares, 20, 500, rng)
    share_and_attach(alice, bob)
    wait_same_trees(alice, bob, timeout=SYNC_TIMEOUT)
    bob.cli("wait", str(bob.shares), "--timeout", "30")
    before = tree_snapshot(alice.shares)

    (bob.shares / MARKER_NAME).unlink()
    status = wait_until(lambda: (s := share_status(bob, bob.shares))["status"] == "error" and s,
                        timeout=5, message="the lost marker is noticed within seconds")
    assert "marker" in status["problem"] and "clearskies repair" in status["problem"]
    waited = bob.cli("wait", str(bob.shares), "--timeout", "10", check=False)
    assert waited.returncode == 1 and "marker" in waited.stderr

    aside = bob.base / "aside"
    shutil.move(bob.shares / "small", aside)  # most recorded files are not here now
    refused = bob.cli("repair", str(bob.shares), check=False)
    assert refused.returncode == 1
    assert "only 0 of the 20 files" in refused.stderr and "nothing was changed" in refused.stderr
    assert not (bob.shares / MARKER_NAME).exists()
    assert share_status(bob, bob.shares)["status"] == "error"

    shutil.move(aside, bob.shares / "small")
    repaired = bob.cli("--json", "repair", str(bob.shares))
    assert json.loads(repaired.stdout) == {"repaired": True, "checked": 20, "present": 20}
    assert (bob.shares / MARKER_NAME).exists()
    wait_until(lambda: share_status(bob, bob.shares)["status"] != "error", timeout=15,
               message="the share resumes after repair")
    (alice.shares / "after-repair.txt").write_bytes(b"new\n")
    wait_same_trees(alice, bob, timeout=SYNC_TIMEOUT)
    assert {p: v for p, v in tree_snapshot(alice.shares).items()
            if p != "after-repair.txt"} == before
    _no_internal_errors(alice, bob)


def test_root_unmounted_mid_sync_deletes_nothing_and_resumes_when_mounted(
        daemon_factory, mounts):
    """Unmounted mid-download: the share stops, deleting nothing, and finishes once mounted again."""
    rng = random.Random(SEED + 4)
    alice, bob = daemon_factory("alice"), daemon_factory("bob")
    _fill(alice.shares, 30, 4096, rng)
    (alice.shares / "zzz-big.bin").write_bytes(rng.randbytes(24 * 1024 * 1024))
    before = tree_snapshot(alice.shares)
    disk = bob.base / "disk"
    disk.mkdir()
    mounts.bind(disk, bob.shares)
    bob.cli("config", "set", "download_limit", "4000000")  # the big file takes seconds
    share_and_attach(alice, bob)
    wait_until(lambda: len(list((bob.shares / "small").glob("*.bin"))) == 30
               if (bob.shares / "small").is_dir() else False,
               timeout=SYNC_TIMEOUT, message="the small files arrive")
    wait_until(lambda: _partials(bob.shares), timeout=SYNC_TIMEOUT,
               message="the big download is under way")

    mounts.unmount(bob.shares)
    status = wait_until(lambda: (s := share_status(bob, bob.shares))["status"] == "error" and s,
                        timeout=10, message="the share stops")
    assert "marker" in status["problem"]
    assert os.listdir(bob.shares) == []  # nothing written into the bare mount point
    for _ in range(3):  # a few seconds in which a deletion would have gone out
        assert tree_snapshot(alice.shares) == before
        time.sleep(1)

    mounts.bind(disk, bob.shares)
    wait_until(lambda: share_status(bob, bob.shares)["status"] != "error", timeout=15,
               message="the share resumes when mounted again")
    bob.cli("config", "set", "download_limit", "0")
    wait_same_trees(alice, bob, timeout=SYNC_TIMEOUT)
    assert tree_snapshot(alice.shares) == before
    _no_internal_errors(alice, bob)


def _fill_up(point: Path) -> Path:
    """Write to ``point`` until its file system refuses; returns the filler file."""
    filler = point / "filler.bin"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for block in (65536, 512, 1):
            try:
                while os.write(fd, b"\0" * block):
                    pass
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


def _bob_with_a_small_database_disk(daemon_factory, mounts):
    """Alice sharing, Bob attached with his data directory (the database) on an 8 MiB
    tmpfs, his attach stored and scanned: ready for that disk to fill."""
    alice, bob = daemon_factory("alice"), daemon_factory("bob", start=False)
    bob.data_dir.mkdir(parents=True, exist_ok=True)
    mounts.tmpfs(bob.data_dir, "8m")
    bob.start()
    share_and_attach(alice, bob)
    wait_until(lambda: share_status(bob, bob.shares).get("status") == "idle", timeout=SYNC_TIMEOUT,
               message="the attach is stored and scanned before the disk fills")
    return alice, bob


def test_downloads_whose_records_a_full_database_refused_make_no_conflict_copies(
        daemon_factory, mounts):
    """Bob's database disk fills while files arrive: after space is freed and bob restarts,
    the files on disk meet alice's records without a single conflict copy anywhere."""
    rng = random.Random(SEED)
    alice, bob = _bob_with_a_small_database_disk(daemon_factory, mounts)
    filler = _fill_up(bob.data_dir)
    for index in range(40):
        (alice.shares / ("f%03d_note.txt" % index)).write_bytes(rng.randbytes(3000))
    wait_until(lambda: len(list(bob.shares.glob("f*_note.txt"))) >= 10
               or "full" in bob.log_tail(400),
               timeout=SYNC_TIMEOUT, interval=0.5, message="bob meets the full disk")
    time.sleep(3.0)  # more downloads land while the database refuses them
    filler.unlink()
    bob.restart()
    wait_same_trees(alice, bob, timeout=SYNC_TIMEOUT)
    time.sleep(3.0)  # anything made of the restart's scan has had time to spread
    for daemon in (alice, bob):
        copies = [p.name for p in daemon.shares.rglob("*.CONFLICT.*")]
        assert copies == [], (daemon.name, copies)
    wait_same_trees(alice, bob, timeout=SYNC_TIMEOUT)
    status = share_status(bob, bob.shares)
    assert status["status"] != "error", status


def test_share_stopped_by_a_full_database_resumes_by_itself_when_space_is_freed(
        daemon_factory, mounts):
    """A scan the full database refuses puts the share in error with the reason; once space
    is freed it resumes without a restart and the new file reaches the peer."""
    alice, bob = _bob_with_a_small_database_disk(daemon_factory, mounts)
    filler = _fill_up(bob.data_dir)
    (bob.shares / "made-while-full.txt").write_bytes(b"written while the disk was full\n")
    bob.cli("rescan", str(bob.shares), check=False)
    status = wait_until(lambda: (s := share_status(bob, bob.shares)).get("status") == "error" and s,
                        timeout=SYNC_TIMEOUT, message="the share stops with the reason")
    assert "full" in status["problem"], status
    filler.unlink()
    # The first retry comes 5 s after the failure (it was a minute, or never when the
    # error state itself could not be stored).
    wait_until(lambda: (alice.shares / "made-while-full.txt").exists(), timeout=20,
               message="the share resumes by itself and the file arrives")
    assert share_status(bob, bob.shares)["status"] != "error"
