"""Handshake floods and failing neighbours against a real daemon: a valid peer still gets in."""

from __future__ import annotations

import os
import time

import psutil
import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from tests.abuse.flood import Flood, fail_handshakes, legit_connect, sleep
from tests.daemons import _kill_leftovers, start_sharing
from tests.helpers import async_test

pytestmark = pytest.mark.slow

BOUND = 5.0
"""Seconds a legitimate peer may take to connect under attack (retries included)."""
ATTEMPTS = 5
MAX_RSS_MB = 300


class AdmissionAbuseTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        base = "/tmp/cs-abuse-%d-%d" % (os.getpid(), time.monotonic_ns())
        self.addCleanup(self._cleanup, base)
        self.daemon, self.keys = start_sharing(base)
        self.process = psutil.Process(self.daemon.pid)

    def _cleanup(self, base: str) -> None:
        import shutil

        if hasattr(self, "daemon"):  # start_sharing cleans up after itself if it fails
            self.daemon.cleanup()
        _kill_leftovers()
        shutil.rmtree(base, ignore_errors=True)

    def rss_mb(self) -> float:
        return self.process.memory_info().rss / 2 ** 20

    async def _flood(self, mode: str, addresses: int) -> None:
        flood = Flood(reactor, self.daemon.port, addresses=addresses, mode=mode,
                      reconnect_delay=0.5, share_id=self.keys.share_id)
        flood.start()
        self.addCleanup(lambda: Deferred.fromCoroutine(flood.stop()))
        await sleep(reactor, 2.0)
        self.assertGreaterEqual(flood.open, 64, "the flood did not take the slots")
        times = []
        for n in range(ATTEMPTS):
            elapsed, attempts = await legit_connect(reactor, self.daemon.port, self.keys,
                                                    BOUND, seed=n)
            times.append(elapsed)
            await sleep(reactor, 0.3)
        dropped = flood.dropped
        await flood.stop()
        self.assertTrue(self.daemon.running, self.daemon.log_tail())
        self.assertLess(self.rss_mb(), MAX_RSS_MB)
        self.assertNotIn(None, times, "connection times under a %s flood: %r\n%s" % (
            mode, times, self.daemon.log_tail(20)))
        self.assertLessEqual(max(times), BOUND)
        self.assertGreater(dropped, 0)  # the attackers were there all along, and cut short
        # After the flood, the daemon still answers its owner.
        self.assertIn("shares", self.daemon.control_request({"type": "list_shares"}))

    @async_test
    async def test_idle_flood_from_96_addresses(self) -> None:
        """96 addresses holding silent connections: a valid peer connects within 5 s, 5 times out of 5."""
        await self._flood("idle", 96)

    @async_test
    async def test_slowloris_flood_from_64_addresses(self) -> None:
        """64 addresses sending start at 1 byte/s: a valid peer connects within 5 s, 5 times out of 5."""
        await self._flood("slowloris", 64)

    @async_test
    async def test_tls_stall_flood_from_64_addresses(self) -> None:
        """64 addresses that name the share and stall in TLS: a valid peer connects within 5 s, 5 of 5."""
        await self._flood("tls_stall", 64)

    @async_test
    async def test_valid_peer_behind_an_address_with_many_failures(self) -> None:
        """After 12 failed handshakes from 127.0.0.9, a valid key from 127.0.0.9 still connects."""
        dead_id = "0d" * 32
        refusals = await fail_handshakes(reactor, self.daemon.port, "127.0.0.9", 12, dead_id)
        self.assertEqual(refusals, 6)
        elapsed, attempts = await legit_connect(reactor, self.daemon.port, self.keys, BOUND,
                                                host="127.0.0.9")
        self.assertIsNotNone(elapsed, self.daemon.log_tail())
        self.assertEqual(attempts, 1)
        self.assertIn("too many failed handshakes from 127.0.0.9 for ID " + dead_id,
                      self.daemon.log_tail(200))
