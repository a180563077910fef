"""Bit rot with real daemons: a byte flipped on disk is reported and repaired from a peer."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.daemons import synced_pair, wait_until

pytestmark = pytest.mark.slow


def _flip_keeping_time(path: Path, offset: int) -> None:
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x20]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _status(daemon, path):
    result = daemon.cli("--json", "status", str(path), check=False)
    return result.returncode, json.loads(result.stdout)


def test_a_flipped_byte_is_reported_never_synced_and_repaired_from_the_peer(daemon_factory):
    content = bytes(range(256)) * 400  # 100 KiB
    alice, bob, a, b = synced_pair(daemon_factory, {"photos/cat.jpg": content,
                                                    "notes.txt": b"fine"})
    wait_until(lambda: _status(bob, b)[1].get("in_sync"), message="bob in sync")
    _flip_keeping_time(b / "photos" / "cat.jpg", 5000)
    # A scan does not take the rotted bytes for an edit: nothing changes, nothing goes out.
    assert json.loads(bob.cli("--json", "scan", str(b)).stdout)["changes"] == 0
    result = bob.cli("--json", "verify", str(b), check=False)
    reply = json.loads(result.stdout)
    assert result.returncode == 1, result
    assert reply["checked"] == 2
    assert [d["path"] for d in reply["damaged"]] == ["photos/cat.jpg"]
    # Repaired from alice with the recorded bytes; alice's copy never took the damage.
    wait_until(lambda: (b / "photos" / "cat.jpg").read_bytes() == content, timeout=30,
               message="clean copy fetched")
    assert (a / "photos" / "cat.jpg").read_bytes() == content
    wait_until(lambda: _status(bob, b)[1].get("repaired"), timeout=20, message="repair noted")
    code, status = _status(bob, b)
    assert code == 0 and "damaged" not in status
    assert [d["path"] for d in status["repaired"]] == ["photos/cat.jpg"]
    assert status["last_verified"]
    assert not list(b.glob("photos/*CONFLICT*")) and not list(a.glob("photos/*CONFLICT*"))
    again = bob.cli("--json", "verify", str(b))
    assert json.loads(again.stdout)["damaged"] == []


def test_damage_without_a_peer_stays_reported_across_a_restart_until_repaired(daemon_factory):
    content = b"precious " * 5000
    alice, bob, a, b = synced_pair(daemon_factory, {"keep.txt": content})
    alice.stop()
    _flip_keeping_time(b / "keep.txt", 100)
    result = bob.cli("--json", "verify", str(b), check=False)
    assert result.returncode == 1
    assert json.loads(result.stdout)["damaged"][0]["state"] == "damaged"
    human = bob.cli("status", str(b), check=False)
    assert human.returncode == 1 and "damaged on disk (bit rot): keep.txt" in human.stdout
    bob.restart()
    code, status = _status(bob, b)
    assert code == 1 and [d["path"] for d in status["damaged"]] == ["keep.txt"]
    alice.start()
    wait_until(lambda: (b / "keep.txt").read_bytes() == content, timeout=40,
               message="repaired once the peer is back")
    assert (a / "keep.txt").read_bytes() == content
    wait_until(lambda: _status(bob, b)[0] == 0, timeout=20, message="status clear")
