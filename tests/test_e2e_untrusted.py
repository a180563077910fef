"""Encrypted backup to an untrusted peer, end to end with real daemons (protocol/untrusted.md).

Alice (read_write) shares a folder with Ursula through an untrusted code.
Ursula keeps only ciphertext: no byte under her share folder or data
directory holds a file's content or name.  Blobs deleted on Ursula are
caught by a challenge and uploaded again.  Victor, a second untrusted peer,
gets his copy from Ursula.  Then Alice and Ursula are stopped and Alice's
data deleted; Bob, given the share's keys, restores the whole tree (content,
names, modes, mtimes) from Victor alone.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest

from tests.daemons import assert_trees_equal, tree_snapshot, wait_until

pytestmark = pytest.mark.slow

TIMEOUT = 60.0
MARKER = b"plaintext-marker-5e1f0c"
NAMES = ("quarterly-secret-report.txt", "holiday-beach-photos", "run-backup-script.sh",
         "empty-notes.md", "big-archive.bin", "new-ledger.csv")


def _fill(root: Path) -> None:
    (root / NAMES[0]).write_bytes(MARKER + b" the report\n" * 50)
    (root / NAMES[1] / "nested-folder").mkdir(parents=True)
    (root / NAMES[1] / "nested-folder" / "beach.jpg").write_bytes(
        os.urandom(70_000) + MARKER + os.urandom(1000))
    script = root / NAMES[2]
    script.write_bytes(b"#!/bin/sh\necho " + MARKER + b"\n")
    script.chmod(0o755)
    (root / NAMES[3]).write_bytes(b"")
    (root / NAMES[4]).write_bytes(MARKER + os.urandom(3 * 1024 * 1024 + 17) + MARKER)


def _blobs(daemon) -> list[Path]:
    """The blob files in an untrusted peer's share folder."""
    return [p for p in Path(daemon.shares).iterdir() if len(p.name) == 65]


def _keeps(daemon) -> dict:
    return daemon.cli_json("status", str(daemon.shares)).get("keeps_encrypted") or {}


def _ciphertext_only(*roots: Path) -> None:
    """No file under ``roots`` holds the marker or a name of the share, in its bytes or
    its path."""
    words = [MARKER] + [name.encode() for name in NAMES] + [b"beach.jpg", b"nested-folder"]
    looked = 0
    for root in roots:
        for directory, dirs, files in os.walk(root):
            for name in dirs + files:
                path = os.path.join(directory, name)
                assert not any(w.decode() in path for w in words), path
                if name in files and stat.S_ISREG(os.lstat(path).st_mode):
                    data = Path(path).read_bytes()
                    looked += 1
                    found = [w for w in words if w in data]
                    assert not found, (path, found)
    assert looked > 5


def test_backup_to_an_untrusted_peer_restores_from_it_alone(daemon_factory):
    alice, ursula = daemon_factory("alice"), daemon_factory("ursula")
    a = Path(alice.shares)
    _fill(a)
    alice.cli("config", "set", "untrusted_challenge_interval", "2")
    code = alice.cli_json("share", str(a), "--mode", "untrusted")["access_code"]
    ursula.cli("attach", code, str(ursula.shares), "--peer", alice.address)
    wait_until(lambda: _keeps(ursula).get("files") == 5, timeout=TIMEOUT)
    [listed] = ursula.cli_json("list")["shares"]
    assert listed["access"] == "untrusted"
    alice.cli("wait", str(a), "--timeout", "30")  # in sync once Ursula holds it all
    [listed] = alice.cli_json("list")["shares"]
    assert listed["peers_connected"] == 1 and listed["untrusted_peers_connected"] == 1
    peers = alice.cli_json("status", str(a))["peers"]
    assert [p.get("access") for p in peers if p["connected"]] == ["untrusted"]

    # Changes reach her as a new signed manifest: an edit replaces a blob, a deletion
    # drops one, a new file adds one; nothing old is left behind.
    first = _keeps(ursula)["revision"]
    (a / NAMES[0]).write_bytes(MARKER + b" the report, edited\n" * 60)
    (a / NAMES[3]).unlink()
    (a / "new-ledger.csv").write_bytes(MARKER + b",1,2,3\n")
    alice.cli("scan", str(a))
    wait_until(lambda: _keeps(ursula).get("revision", 0) > first
               and _keeps(ursula).get("files") == 5
               and len(_blobs(ursula)) == 5, timeout=TIMEOUT)

    # (a) Ursula holds ciphertext only, in her share folder and in her data directory.
    _ciphertext_only(Path(ursula.shares), Path(ursula.data_dir), Path(ursula.base))

    # (c) A blob deleted on Ursula is caught by a challenge, shown, and uploaded again.
    blobs = _blobs(ursula)
    assert len(blobs) == 5
    for blob in blobs:
        blob.unlink()

    def lost_seen() -> bool:
        status = alice.cli_json("status", str(a))
        return any(p.get("challenges_failed") for p in status["peers"])
    wait_until(lost_seen, timeout=TIMEOUT)
    wait_until(lambda: len(_blobs(ursula)) >= 1, timeout=TIMEOUT)

    # Untrusted peers serve each other: Victor gets his copy from Ursula's code and blobs.
    victor = daemon_factory("victor")
    refused = ursula.cli("share", str(ursula.shares), "--mode", "read_only", check=False)
    assert refused.returncode == 1 and "only hand out untrusted codes" in refused.stderr
    code = ursula.cli_json("share", str(ursula.shares), "--mode", "untrusted")["access_code"]
    victor.cli("attach", code, str(victor.shares), "--peer", ursula.address, "--wait",
               "--timeout", str(int(TIMEOUT)))
    assert _keeps(victor).get("files") == 5
    _ciphertext_only(Path(victor.base))

    # (b) Alice and Ursula are gone; Bob restores everything from Victor alone, with the
    # keys saved.
    keys_file = Path(alice.base).parent / "saved-share-keys.json"
    alice.cli("export-keys", str(a), str(keys_file))
    assert stat.S_IMODE(keys_file.stat().st_mode) == 0o600
    expected = tree_snapshot(a)
    modes = {p.relative_to(a): (stat.S_IMODE(p.stat().st_mode), p.stat().st_mtime_ns)
             for p in a.rglob("*") if p.is_file() and p.name != ".clearskies"}
    assert len(modes) == 5
    alice.cli("stop")
    wait_until(lambda: not alice.running, timeout=15)
    wait_until(lambda: len(_blobs(ursula)) == 5, timeout=TIMEOUT)
    wait_until(lambda: _keeps(victor).get("revision") == _keeps(ursula).get("revision"),
               timeout=TIMEOUT)
    ursula.cli("stop")
    wait_until(lambda: not ursula.running, timeout=15)
    victor.restart()  # what he keeps is read back from his disk
    wait_until(lambda: _keeps(victor).get("files") == 5, timeout=TIMEOUT)
    shutil.rmtree(a)
    shutil.rmtree(alice.data_dir)
    bob = daemon_factory("bob")
    bob.cli("import-keys", str(keys_file), str(bob.shares), "--peer", victor.address)
    b = Path(bob.shares)
    wait_until(lambda: tree_snapshot(b) == expected, timeout=TIMEOUT)
    assert_trees_equal(expected, b)
    for relative, (mode, mtime_ns) in modes.items():
        restored = (b / relative).stat()
        assert (stat.S_IMODE(restored.st_mode), restored.st_mtime_ns) == (mode, mtime_ns), \
            relative
