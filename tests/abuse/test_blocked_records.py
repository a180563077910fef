"""A peer floods records that a symlink in the share blocks: they wait, bounded, and cost little.

Records blocked by a local obstacle are kept and merged again (every 30 s,
after a scan); a member that sends thousands of them must not stall the
daemon, write anything outside the share, or keep a legitimate peer out.
"""

from __future__ import annotations

import os
import secrets
import time

from clearskies import sync
from tests.helpers import async_test
from tests.peerkit import PeerKitCase, file_entry, sleep, snapshot, wait_until

FLOOD = 2000


class BlockedRecordFloodTests(PeerKitCase):
    @async_test
    async def test_a_flood_of_blocked_records_waits_bounded_and_a_legit_peer_gets_through(self):
        """2,000 records through a symlink wait (no more), retries keep the reactor live, a legit file still arrives."""
        (self.share_dir / "link").symlink_to(self.outside, target_is_directory=True)
        runtime = await self.start_daemon()
        before = snapshot(self.outside)
        pid = secrets.token_hex(16)
        peer = await self.connect(peer_id=pid)
        page = 500
        for start in range(0, FLOOD, page):
            peer.send({"type": "manifest", "peer": pid, "revision": 1,
                       "files": [file_entry("link/f%05d.txt" % i, b"x", vv={pid: 1})
                                 for i in range(start, start + page)]})
        await wait_until(lambda: len(runtime.sync.unresolved) == FLOOD, timeout=30,
                         what="every blocked record waiting (%d)" % len(runtime.sync.unresolved))
        # Merged again twice, as the periodic retry does; the reactor stays responsive.
        runtime.sync.retry_unresolved()
        runtime.sync.retry_unresolved()
        lag = await _max_reactor_lag(1.5)
        self.assertEqual(len(runtime.sync.unresolved), FLOOD)  # no more than it sent
        self.assertEqual(runtime.sync.items_to_download, 0)  # none stuck in the queue
        self.assertLess(lag, 0.5)
        self.assertLessEqual(runtime.service.scanner.skipped.count, FLOOD + 1)  # (+ the link)
        self.assertEqual(snapshot(self.outside), before)
        self.assertEqual(os.listdir(self.outside), [])
        self.assertFalse(peer.closed, peer.lost_reason)
        logged = [t for t in self.logged() if "not taking link/" in t]
        self.assertLessEqual(len(logged), FLOOD)  # once per path, not once per retry
        # A legitimate peer still syncs.
        data = os.urandom(10_000)
        await self.deliver("good.bin", data)
        self.assertEqual(self.share_path("good.bin").read_bytes(), data)
        self.assertEqual(sync.RETRY_AFTER, 30.0)


async def _max_reactor_lag(seconds: float, step: float = 0.01) -> float:
    """The longest the reactor was late for a timer of ``step`` over ``seconds``."""
    worst = 0.0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        started = time.monotonic()
        await sleep(step)
        worst = max(worst, time.monotonic() - started - step)
    return worst
