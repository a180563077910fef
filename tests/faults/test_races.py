"""A file edited while its newer version downloads: both sides end with the same tree.

The scripted-peer test replays the one message order that used to lose the
conflict; the seeded suite races real edits against real downloads.
"""

from __future__ import annotations

import os
import random
import secrets
import sys
import time
from pathlib import Path

import pytest

from clearskies.control.commands import DaemonCommands
from clearskies.share import merge
from tests.daemons import TEMP_SUFFIX, DaemonSet, assert_trees_equal, wait_same_trees
from tests.helpers import async_test, sha
from tests.peerkit import PeerKitCase, file_entry, wait_until


class ConflictCopyFirstTests(PeerKitCase):
    @async_test
    async def test_a_conflict_whose_copy_already_exists_still_takes_their_edit(self):
        """The peer's conflict copy of our version arrives first; its edit then replaces ours."""
        ours = b"our newer version, which the peer kept as a conflict copy\n"
        theirs = b"the peer's concurrent edit\n"
        self.share_path("f.txt").write_bytes(ours)
        runtime = await self.start_daemon()
        local = await runtime.get_record("f.txt")
        copy = merge.conflict_record(local)
        peer_id = secrets.token_hex(16)
        peer = await self.connect(peer_id=peer_id)
        peer.send({"type": "manifest", "peer": peer_id, "revision": 1, "files": []})
        # 1. Its copy of our version: built here from our identical file, no download.
        peer.send({"type": "update", "revision": 2, "file": copy.to_wire()})
        await wait_until(lambda: self.share_path(copy.path).exists()
                         and self.share_path(copy.path).read_bytes() == ours, what="the copy")
        # 2. Its own edit of the path, concurrent with ours and newer by the clock.
        peer.send({"type": "update", "revision": 3, "file": file_entry(
            "f.txt", theirs, utime=time.time() + 100, vv={peer_id: 1})})
        await peer.wait_for("get", where=lambda b: b["path"] == "f.txt")
        peer.send_payload({"type": "file_data", "path": "f.txt"}, theirs)
        await wait_until(lambda: self.share_path("f.txt").read_bytes() == theirs,
                         what="their edit at the path")
        self.assertEqual(self.share_path(copy.path).read_bytes(), ours)
        await wait_until(lambda: runtime.sync.settled or None, what="nothing left to settle")
        stored = await runtime.get_record("f.txt")
        self.assertEqual(stored.sha256, sha(theirs))
        self.assertEqual(self.temp_files(), [])
        self.assertFalse(any("could not move" in t for t in self.logged()))

    @async_test
    async def test_a_conflict_that_cannot_be_settled_yet_is_reported_then_settled(self):
        """Our file changed since the scan: the conflict waits (not in sync), then is settled."""
        ours = b"our version, as last scanned\n"
        edited = b"our version, edited after the scan\n"
        theirs = b"the peer's concurrent edit\n"
        self.share_path("f.txt").write_bytes(ours)
        runtime = await self.start_daemon()
        runtime.service.pause()  # the scanner does not see the edit until asked
        self.share_path("f.txt").write_bytes(edited)
        peer_id = secrets.token_hex(16)
        peer = await self.connect(peer_id=peer_id)
        peer.send({"type": "manifest", "peer": peer_id, "revision": 1, "files": []})
        peer.send({"type": "update", "revision": 2, "file": file_entry(
            "f.txt", theirs, utime=time.time() + 100, vv={peer_id: 1})})
        await wait_until(lambda: "f.txt" in runtime.sync.unresolved, what="a waiting conflict")
        status = DaemonCommands(self.daemon).share_summary(runtime)
        self.assertFalse(status["in_sync"])
        self.assertEqual(status["conflicts_waiting"], ["f.txt"])
        self.assertIn("next scan", status["problem"])
        self.assertEqual(self.share_path("f.txt").read_bytes(), edited)
        runtime.service.resume()
        await runtime.service.rescan()
        await peer.wait_for("get", where=lambda b: b["path"] == "f.txt")
        peer.send_payload({"type": "file_data", "path": "f.txt"}, theirs)
        await wait_until(lambda: self.share_path("f.txt").exists()
                         and self.share_path("f.txt").read_bytes() == theirs,
                         what="their edit at the path")
        copies = [p for p in self.share_dir.iterdir() if ".CONFLICT." in p.name]
        self.assertEqual([p.read_bytes() for p in copies], [edited])
        await wait_until(lambda: runtime.sync.settled or None, what="nothing left to settle")
        self.assertEqual(runtime.sync.unresolved, {})


# -- real daemons: an edit racing a download ----------------------------------------

SEEDS = int(os.environ.get("CLEARSKIES_FAULT_SEEDS", "6"))  # 3, 4 and 5 hit the old fault
RACE_TIMEOUT = 90.0
DOWNLOAD_LIMIT = 2_000_000  # bytes/s at Bob (after a burst): a 2-5 MB download takes a while


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Alice and Bob sharing one folder, Bob's downloads slowed to DOWNLOAD_LIMIT."""
    with DaemonSet(tmp_path_factory.mktemp("races")) as daemons:
        alice, bob = daemons.make("alice"), daemons.make("bob")
        code = alice.cli_json("share", str(alice.shares))["access_code"]
        bob.cli("attach", code, str(bob.shares), "--peer", alice.address)
        bob.control_request({"type": "set_config_value", "key": "download_limit",
                             "value": DOWNLOAD_LIMIT})
        try:
            yield alice, bob
        except BaseException:
            sys.stdout.write(daemons.log_report())
            raise


def _wait(daemon) -> int:
    return daemon.cli("wait", str(daemon.shares), "--timeout", str(RACE_TIMEOUT),
                      check=False, timeout=RACE_TIMEOUT + 30).returncode


def _contents(root: Path, name: str) -> set[str]:
    """Hashes at ``name`` and at its conflict copies."""
    stem, ext = name.rsplit(".", 1)
    return {sha(p.read_bytes()) for p in root.iterdir()
            if p.name == name or (p.name.startswith(stem + ".CONFLICT.")
                                  and p.name.endswith("." + ext))}


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(SEEDS))
def test_an_edit_racing_a_download_ends_with_the_same_trees(pair, seed):
    """Bob edits a file while Alice's newer version downloads: same bytes at every path after."""
    alice, bob = pair
    # Each trial in its own directory, compared on its own: one failure stays one.
    a, b = Path(alice.shares) / ("seed%02d" % seed), Path(bob.shares) / ("seed%02d" % seed)
    rng = random.Random(seed)
    name = "race.bin"
    a.mkdir()
    (a / name).write_bytes(rng.randbytes(rng.randrange(1000, 200_000)))
    alice.cli("scan", str(alice.shares))
    wait_same_trees(a, b, RACE_TIMEOUT)
    newer = rng.randbytes(rng.randrange(2_000_000, 5_000_000))
    edit = b"bob's edit, seed %d\n" % seed + rng.randbytes(rng.randrange(0, 50_000))
    # Roughly when Bob's download ends (one burst of half a second, then the limit).
    download = (len(newer) - DOWNLOAD_LIMIT / 2) / DOWNLOAD_LIMIT
    (a / name).write_bytes(newer)
    alice.cli("scan", str(alice.shares))
    time.sleep(rng.uniform(0.0, download + 0.3))  # before, during or just after it
    concurrent = (b / name).read_bytes() != newer  # Bob edits a version before Alice's
    (b / name).write_bytes(edit)
    # Bob's scanner records the edit before the download is installed, or after.
    time.sleep(rng.uniform(0.0, 1.2))
    bob.cli("scan", str(bob.shares))
    assert _wait(bob) == 0 and _wait(alice) == 0
    # Both said in sync: the trees must match now, not eventually.
    assert_trees_equal(a, b)
    assert sha(edit) in _contents(a, name)  # the last edit survives, at the path or as a copy
    if concurrent:
        assert sha(newer) in _contents(a, name)  # and so does Alice's, which Bob never saw
    assert not [p for root in (a, b) for p in root.rglob("*" + TEMP_SUFFIX)]
