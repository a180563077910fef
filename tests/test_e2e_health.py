"""Share health with real daemons: stale warnings, one share paused, the watcher off."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.daemons import synced_pair, wait_same_trees, wait_until

pytestmark = pytest.mark.slow


def _status(daemon, path):
    result = daemon.cli("--json", "status", str(path), check=False)
    return result.returncode, json.loads(result.stdout)


def test_status_warns_after_the_set_time_without_sync_and_a_restart_keeps_it(daemon_factory):
    alice, bob, a, b = synced_pair(daemon_factory, {"one.txt": b"one"})
    alice.cli("config", "set", "stale_after", "3")
    code, status = _status(alice, a)
    wait_until(lambda: _status(alice, a)[1].get("in_sync"), message="alice in sync")
    code, status = _status(alice, a)
    assert code == 0 and "warnings" not in status and status["last_in_sync"]
    bob.stop()
    time.sleep(4)
    code, status = _status(alice, a)
    assert code == 1
    assert any(w.startswith("not in sync with any peer for") for w in status["warnings"])
    assert any(w.startswith("peer bob") and "not seen for" in w for w in status["warnings"])
    human = alice.cli("status", str(a), check=False)
    assert human.returncode == 1 and "warning: not in sync with any peer" in human.stdout
    assert alice.cli_json("status")["shares_with_warnings"] == [str(a.resolve())]
    assert "warning: %s needs a look" % a.resolve() in alice.cli("status").stdout
    # A restart does not reset the times: the warning is still there at once.
    alice.restart()
    code, status = _status(alice, a)
    assert code == 1 and any("not in sync" in w for w in status["warnings"])
    # The peer back and in sync: the warnings go.
    bob.start()
    wait_until(lambda: _status(alice, a)[0] == 0, timeout=30, message="warnings gone")


def test_one_share_paused_neither_sends_nor_receives_and_stays_paused_across_a_restart(
        daemon_factory):
    alice, bob, a, b = synced_pair(daemon_factory, {"one.txt": b"one"})
    out = bob.cli("pause", str(b)).stdout
    assert "paused" in out
    code, status = _status(bob, b)
    assert status["status"] == "paused" and status["share_paused"] is True
    assert "paused" in bob.cli("status", str(b), check=False).stdout
    scan = bob.cli("scan", str(b), check=False)
    assert scan.returncode == 1 and "is paused" in scan.stderr
    (a / "from-alice.txt").write_bytes(b"new")
    (b / "from-bob.txt").write_bytes(b"mine")
    time.sleep(3)
    assert not (b / "from-alice.txt").exists() and not (a / "from-bob.txt").exists()
    # The daemon's own pause and resume leave the share paused.
    bob.cli("pause")
    bob.cli("resume")
    bob.restart()
    time.sleep(3)
    assert _status(bob, b)[1]["share_paused"] is True
    assert not (b / "from-alice.txt").exists() and not (a / "from-bob.txt").exists()
    bob.cli("resume", str(b))
    wait_same_trees(alice, bob, timeout=30)
    assert (b / "from-alice.txt").read_bytes() == b"new"
    assert (a / "from-bob.txt").read_bytes() == b"mine"
    assert "share_paused" not in _status(bob, b)[1]


def test_with_the_watcher_off_local_changes_wait_for_a_scan(daemon_factory):
    alice, bob, a, b = synced_pair(daemon_factory, {"one.txt": b"one"})
    alice.cli("config", "set", "watcher", "false", "--share", str(a))
    assert json.loads(alice.cli("--json", "config", "get", "--share", str(a)).stdout)[
        "config"]["watcher"] is False
    assert _status(alice, a)[1]["watcher"] is False
    (a / "later.txt").write_bytes(b"later")
    time.sleep(4)  # the watcher would have seen it within a second or two
    assert not (b / "later.txt").exists()
    alice.cli("scan", str(a))
    wait_same_trees(alice, bob, timeout=30)
    bad = alice.cli("config", "set", "watcher", "maybe", "--share", str(a), check=False)
    assert bad.returncode == 1 and "watcher must be true or false" in bad.stderr
    unknown = alice.cli("config", "set", "nope", "1", "--share", str(a), check=False)
    assert unknown.returncode == 1 and "no share setting" in unknown.stderr
    # On again: changes arrive by themselves.
    alice.cli("config", "set", "watcher", "true", "--share", str(a))
    (a / "watched.txt").write_bytes(b"seen")
    wait_until(lambda: (b / "watched.txt").exists(), timeout=20, message="watched file arrives")


def test_pause_of_a_folder_that_is_no_share_is_refused(daemon_factory, tmp_path: Path):
    alice = daemon_factory("alice")
    result = alice.cli("pause", str(tmp_path), check=False)
    assert result.returncode == 1 and "is not a share" in result.stderr
