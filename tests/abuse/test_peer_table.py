"""A key holder connecting under ever new peer IDs: the share's peer table stays bounded."""

from __future__ import annotations

import os
import sqlite3
import time

import psutil
import pytest
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.trial.unittest import TestCase

from clearskies.handshake import ConnectTarget, MemoryKeyRing
from clearskies.peer import connect_peer
from clearskies.daemon.sharepeers import MAX_KNOWN_PEERS
from tests.abuse.flood import legit_connect
from tests.abuse.fresh_ids import FEATURES, fresh_id_connections
from tests.fakes import QuietSession
from tests.daemons import _kill_leftovers, start_sharing
from tests.helpers import async_test

pytestmark = pytest.mark.slow

FRESH_IDS = MAX_KNOWN_PEERS + 72
BOUND = 5.0
MAX_RSS_MB = 300
FRIEND = "f0" * 16


class PeerTableAbuseTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        base = "/tmp/cs-abuse-peers-%d-%d" % (os.getpid(), time.monotonic_ns())
        self.addCleanup(self._cleanup, base)
        self.daemon, self.keys = start_sharing(base)

    def _cleanup(self, base: str) -> None:
        import shutil

        if hasattr(self, "daemon"):  # start_sharing cleans up after itself if it fails
            self.daemon.cleanup()
        _kill_leftovers()
        shutil.rmtree(base, ignore_errors=True)

    def stored_peers(self) -> int:
        """Rows of the peers table, read straight from the daemon's database."""
        db = sqlite3.connect("file:%s?mode=ro" % (self.daemon.data_dir / "state.sqlite3"),
                             uri=True, timeout=5)
        try:
            return db.execute("SELECT count(*) FROM peers").fetchone()[0]
        finally:
            db.close()

    @async_test
    async def test_fresh_peer_ids_past_the_cap_keep_the_table_bounded_and_the_friend(self) -> None:
        """200 connections under fresh peer IDs: 128 peers kept, the connected friend among them, a new peer gets in."""
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.daemon.port, timeout=5)
        friend = await connect_peer(reactor, endpoint, ConnectTarget.share(self.keys, FRIEND),
                                    MemoryKeyRing(time.time), "friend", QuietSession,
                                    features=FEATURES)
        self.addCleanup(friend.close, "done", quiet=True)
        admitted = await fresh_id_connections(reactor, self.daemon.port, self.keys, FRESH_IDS,
                                              seed=7)
        self.assertGreater(admitted, MAX_KNOWN_PEERS, self.daemon.log_tail(30))
        elapsed, _ = await legit_connect(reactor, self.daemon.port, self.keys, BOUND, seed=99)
        self.assertIsNotNone(elapsed, self.daemon.log_tail(30))
        self.assertTrue(self.daemon.running, self.daemon.log_tail())
        self.assertLess(psutil.Process(self.daemon.pid).memory_info().rss / 2 ** 20, MAX_RSS_MB)
        status = self.daemon.cli_json("status", str(self.daemon.shares))
        peers = {p["peer_id"]: p for p in status["peers"]}
        self.assertEqual(len(peers), MAX_KNOWN_PEERS)
        self.assertTrue(peers[FRIEND]["connected"])
        self.assertEqual(self.stored_peers(), MAX_KNOWN_PEERS)
