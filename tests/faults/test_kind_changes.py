"""A path that is a file on one side and became a folder on the other.

An edit made here to the file is never lost to the peer's folder: the folder
takes the path and the edit is kept as a conflict copy (protocol/merge.md 4.2).
"""

from __future__ import annotations

import pytest

from tests.daemons import assert_trees_equal, share_status, synced_pair, wait_same_trees

pytestmark = pytest.mark.slow

SETTLE_TIMEOUT = 60.0
#: Well under the periodic retry (RETRY_AFTER, 30 s).
ARRIVES = 20.0


def _in_sync(alice, bob, a, b) -> None:
    wait_same_trees(alice, bob, ARRIVES)
    for daemon, path in ((alice, a), (bob, b)):
        daemon.cli("wait", str(path), "--timeout", str(ARRIVES))
        status = share_status(daemon, path)
        assert status["in_sync"] is True, status
        assert "conflicts_waiting" not in status, status
    assert_trees_equal(a, b)


def test_a_file_edited_here_while_a_peer_made_it_a_folder_becomes_a_conflict_copy(
        daemon_factory):
    """Bob edits ``victim`` while stopped; Alice makes it a folder: the folder keeps the path, Bob's edit a conflict copy."""
    alice, bob, a, b = synced_pair(daemon_factory, {"victim": b"a file\n"}, SETTLE_TIMEOUT)
    bob.cli("wait", str(b), "--timeout", str(SETTLE_TIMEOUT))
    bob.stop()
    (a / "victim").unlink()
    (a / "victim").mkdir()
    (a / "victim" / "in").write_bytes(b"x\n")
    alice.cli("scan", str(a))
    (b / "victim").write_bytes(b"edited by bob\n")
    bob.start()
    _in_sync(alice, bob, a, b)
    assert (b / "victim" / "in").read_bytes() == b"x\n"
    copies = [p for p in b.iterdir() if p.name.startswith("victim.CONFLICT.")]
    assert [p.read_bytes() for p in copies] == [b"edited by bob\n"], copies
