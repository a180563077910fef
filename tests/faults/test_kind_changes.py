"""A file replaced by a folder of the same name, or the reverse, syncs.

The receiver's older entry goes (protocol/merge.md 4.1: theirs is newer and
is accepted), the new one takes its path, and both sides end in sync.
"""

from __future__ import annotations

import pytest

from tests.daemons import assert_trees_equal, share_status, synced_pair, wait_same_trees

pytestmark = pytest.mark.slow

SETTLE_TIMEOUT = 60.0
#: Well under the periodic retry (RETRY_AFTER, 30 s): a kind change needs no retry.
ARRIVES = 20.0


#: When both sides made a conflict copy of the same edit, one side may have the copy's
#: bytes on disk before its record: that side decides again at the periodic retry.
AFTER_A_RETRY = 50.0


def _in_sync(alice, bob, a, b, within: float = ARRIVES) -> None:
    wait_same_trees(alice, bob, within)
    for daemon, path in ((alice, a), (bob, b)):
        daemon.cli("wait", str(path), "--timeout", str(within))
        status = share_status(daemon, path)
        assert status["in_sync"] is True, status
        assert "conflicts_waiting" not in status, status
    assert_trees_equal(a, b)


def test_a_file_replaced_by_a_folder_and_back_syncs(daemon_factory):
    """``rm victim; mkdir victim; echo x > victim/in`` on Alice reaches Bob; then the reverse."""
    alice, bob, a, b = synced_pair(daemon_factory, {"victim": b"a file\n",
                                                    "other.txt": b"other\n"}, SETTLE_TIMEOUT)
    bob.cli("wait", str(b), "--timeout", str(SETTLE_TIMEOUT))

    (a / "victim").unlink()
    (a / "victim").mkdir()
    (a / "victim" / "in").write_bytes(b"x\n")
    alice.cli("scan", str(a))
    _in_sync(alice, bob, a, b)
    assert (b / "victim").is_dir()
    assert (b / "victim" / "in").read_bytes() == b"x\n"

    (a / "victim" / "in").unlink()
    (a / "victim").rmdir()
    (a / "victim").write_bytes(b"a file again\n")
    alice.cli("scan", str(a))
    _in_sync(alice, bob, a, b)
    assert (b / "victim").read_bytes() == b"a file again\n"


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
    _in_sync(alice, bob, a, b, AFTER_A_RETRY)
    assert (b / "victim" / "in").read_bytes() == b"x\n"
    copies = [p for p in b.iterdir() if p.name.startswith("victim.CONFLICT.")]
    assert [p.read_bytes() for p in copies] == [b"edited by bob\n"], copies
