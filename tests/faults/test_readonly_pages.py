"""Read-only replicas of shares bigger than one manifest page, on real daemons.

A manifest of more than 1,000 files goes out in pages; a read-only peer must
keep every page (signed), count no genuine file as a local change, never
delete one on ``revert``, and relay every page to the next read-only peer.
"""

from __future__ import annotations

import random
import sqlite3
import time
from pathlib import Path

import pytest

from tests.daemons import tree_snapshot, wait_same_trees, wait_until

pytestmark = pytest.mark.slow

FILES = 2_150  # three manifest pages of at most 1,000 records
SYNC_TIMEOUT = 90.0


def _fill(root: Path, seed: int) -> None:
    """FILES small files in 43 directories, contents from a seeded generator."""
    rng = random.Random(seed)
    for i in range(FILES):
        directory = root / ("d%02d" % (i % 43))
        directory.mkdir(exist_ok=True)
        (directory / ("f%04d.txt" % i)).write_bytes(b"%d %d\n" % (i, rng.getrandbits(64)))


def _read_only_code(owner) -> str:
    """A read-only code, once the owner has recorded every file (so its manifest has them all)."""
    code = owner.cli_json("share", str(owner.shares), "--mode", "read_only")["access_code"]
    owner.cli("scan", str(owner.shares))
    return code


def _status(daemon) -> dict:
    return daemon.cli_json("status", str(daemon.shares))


def _settled(daemon) -> dict:
    """Rescan, then wait for a status that counts no local change and reports in_sync."""
    daemon.cli("scan", str(daemon.shares))
    try:
        return wait_until(lambda: (s := _status(daemon)).get("in_sync")
                          and s.get("local_changes_not_shared") == 0 and s, timeout=30)
    except TimeoutError:
        raise AssertionError("never in sync without local changes: %r" % _status(daemon)) \
            from None


def _manifest_pages(daemon) -> list[str]:
    db = sqlite3.connect(Path(daemon.data_dir) / "state.sqlite3")
    try:
        return [part for (part,) in db.execute(
            "SELECT part FROM signed_messages WHERE kind = 'manifest' ORDER BY part")]
    finally:
        db.close()


def test_read_only_replica_of_a_multi_page_share_keeps_every_file(daemon_factory):
    """A 3-page read-only replica: no local change after a rescan or restart, revert deletes nothing."""
    alice, bob = daemon_factory("alice"), daemon_factory("bob")
    _fill(Path(alice.shares), seed=1)
    bob.cli("attach", _read_only_code(alice), str(bob.shares), "--peer", alice.address)
    wait_same_trees(alice, bob, SYNC_TIMEOUT)
    before = tree_snapshot(alice.shares)

    assert _settled(bob)["files"] == FILES
    assert len(_manifest_pages(bob)) == 3
    reply = bob.cli_json("revert", str(bob.shares))
    assert (reply["changes"], reply["removed"], reply["complete"]) == (0, 0, True)
    wait_same_trees(alice, bob, 15)
    assert tree_snapshot(bob.shares) == before

    # Stopped, Bob loses a file and records its deletion as the share's version (what
    # revert did before): after a restart the writer has nothing new to send, yet Bob is
    # not in sync, and revert fetches the file again.
    bob.stop()
    db = sqlite3.connect(Path(bob.data_dir) / "state.sqlite3")
    db.execute("UPDATE files SET deleted = 1 WHERE path = 'd42/f2149.txt'")
    db.commit()
    db.close()
    (Path(bob.shares) / "d42" / "f2149.txt").unlink()
    bob.start()
    wait_until(lambda: _status(bob)["peers_connected"] == 1, timeout=30)
    bob.cli("scan", str(bob.shares))
    time.sleep(1.0)  # a recount runs 0.2 s after a change
    status = _status(bob)
    assert (status["in_sync"], status["local_changes_not_shared"]) == (False, 0)
    reply = bob.cli_json("revert", str(bob.shares))
    assert (reply["changes"], reply["removed"], reply["restoring"]) == (0, 0, 1)
    wait_same_trees(alice, bob, 30)
    assert _settled(bob)["local_changes_not_shared"] == 0
    assert bob.cli_json("revert", str(bob.shares))["removed"] == 0
    assert tree_snapshot(bob.shares) == before
    assert "dropped" not in bob.log_path.read_text()


def test_read_only_peer_relays_every_page_while_the_writer_is_stopped(daemon_factory):
    """With the writer stopped, a read-only peer fills a new one with all 3 pages, byte for byte."""
    alice, bob = daemon_factory("alice"), daemon_factory("bob")
    _fill(Path(alice.shares), seed=2)
    bob.cli("attach", _read_only_code(alice), str(bob.shares), "--peer", alice.address)
    wait_same_trees(alice, bob, SYNC_TIMEOUT)
    before = tree_snapshot(alice.shares)
    code = _read_only_code(bob)
    alice.cli("stop")
    wait_until(lambda: not alice.running, timeout=15)

    carol = daemon_factory("carol")
    carol.cli("attach", code, str(carol.shares), "--peer", bob.address)
    wait_same_trees(bob, carol, SYNC_TIMEOUT)
    assert tree_snapshot(carol.shares) == before
    assert _settled(carol)["files"] == FILES
    assert _manifest_pages(carol) == _manifest_pages(bob) and len(_manifest_pages(carol)) == 3
    reply = carol.cli_json("revert", str(carol.shares))
    assert (reply["changes"], reply["removed"]) == (0, 0)
    assert tree_snapshot(carol.shares) == before


def test_replica_missing_pages_asks_for_the_whole_manifest_again(daemon_factory):
    """A replica left with only a first page deletes nothing and asks for the whole manifest."""
    alice, bob = daemon_factory("alice"), daemon_factory("bob")
    _fill(Path(alice.shares), seed=3)
    bob.cli("attach", _read_only_code(alice), str(bob.shares), "--peer", alice.address)
    wait_same_trees(alice, bob, SYNC_TIMEOUT)
    before = tree_snapshot(alice.shares)
    _settled(bob)
    alice.stop()
    bob.stop()
    db = sqlite3.connect(Path(bob.data_dir) / "state.sqlite3")
    db.execute("DELETE FROM signed_messages WHERE kind = 'manifest' AND part NOT LIKE '%/0'")
    db.commit()
    db.close()

    bob.start()
    reply = bob.cli_json("revert", str(bob.shares))
    assert (reply["removed"], reply["complete"]) == (0, False)
    assert not _status(bob)["in_sync"]
    alice.start()
    wait_until(lambda: len(_manifest_pages(bob)) == 3, timeout=SYNC_TIMEOUT)
    _settled(bob)
    assert bob.cli_json("revert", str(bob.shares))["removed"] == 0
    assert tree_snapshot(bob.shares) == before
