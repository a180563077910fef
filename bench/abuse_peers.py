"""A key holder connecting under ever new peer IDs: what the share remembers, what it costs.

    .venv/bin/python bench/abuse_peers.py

One daemon (``tests/daemons.py``'s ``DaemonProcess``, on 127.0.0.1) holds a
share; a friend with the share's keys stays connected.  For each attack, a
key holder connects ``count`` times, each from its own loopback address and
under a fresh (seeded) peer ID, and advertises 8 addresses with
``clearskies.addresses`` (``tests/abuse/fresh_ids.py``).  Then a new
legitimate peer connects ``ATTEMPTS`` times.  Measured:

- ``legit_success``: share of those attempts with a session within ``BOUND`` s;
- ``peers_known`` / ``peers_stored``: the share's peers in status and in the
  database afterwards (bounded by MAX_KNOWN_PEERS), and whether the friend is
  still among them;
- ``memory_mb``: the daemon's RSS afterwards;
- ``max_reactor_lag_ms``: the slowest control-socket round trip (``list_shares``),
  sampled every 0.1 s during the attack.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clearskies.handshake import ConnectTarget, MemoryKeyRing  # noqa: E402
from clearskies.keys import ShareKeys  # noqa: E402
from clearskies.peer import connect_peer  # noqa: E402
from tests.abuse.flood import legit_connect, sleep  # noqa: E402
from tests.abuse.fresh_ids import FEATURES, fresh_id_connections  # noqa: E402
from tests.fakes import QuietSession  # noqa: E402
from bench.reactorrun import print_rows, run_on_reactor  # noqa: E402
from tests.daemons import DaemonProcess, start_sharing  # noqa: E402

BOUND = 5.0
ATTEMPTS = 10
FRIEND = "f0" * 16
ATTACKS = [0, 150, 400]


async def _lag_probe(reactor: Any, daemon: DaemonProcess, state: dict[str, Any]) -> None:
    from twisted.internet.threads import deferToThread

    while state["running"]:
        began = time.monotonic()
        await deferToThread(daemon.control_request, {"type": "list_shares"})
        state["max_lag"] = max(state["max_lag"], (time.monotonic() - began) * 1000)
        await sleep(reactor, 0.1)


async def _one(reactor: Any, daemon: DaemonProcess, keys: ShareKeys, count: int,
               seed: int) -> dict[str, Any]:
    from twisted.internet.defer import Deferred

    state = {"running": True, "max_lag": 0.0}
    probing = Deferred.fromCoroutine(_lag_probe(reactor, daemon, state))
    began = time.monotonic()
    admitted = await fresh_id_connections(reactor, daemon.port, keys, count, seed=seed)
    took = time.monotonic() - began
    state["running"] = False
    await probing
    successes = 0
    for n in range(ATTEMPTS):
        elapsed, _ = await legit_connect(reactor, daemon.port, keys, BOUND, seed=seed * 100 + n)
        successes += elapsed is not None
    status = daemon.cli_json("status", str(daemon.shares))
    peers = {p["peer_id"]: p for p in status["peers"]}
    db = sqlite3.connect("file:%s?mode=ro" % (daemon.data_dir / "state.sqlite3"), uri=True)
    stored = db.execute("SELECT count(*) FROM peers").fetchone()[0]
    db.close()
    return {
        "attack": "%d connections under fresh peer IDs, 8 addresses each" % count,
        "legit_success": round(successes / ATTEMPTS, 3),
        "memory_mb": round(psutil.Process(daemon.pid).memory_info().rss / 2 ** 20, 1),
        "max_reactor_lag_ms": round(state["max_lag"], 1),
        "peers_known": len(peers),
        "peers_stored": stored,
        "notes": "%d admitted in %.1f s; friend %s; %s" % (
            admitted, took,
            "kept, connected" if peers.get(FRIEND, {}).get("connected") else "LOST",
            "daemon up" if daemon.running else "DAEMON DIED"),
    }


def run() -> list[dict[str, Any]]:
    """Every attack against one fresh daemon, in a child process (the reactor runs once)."""
    result = subprocess.run([sys.executable, __file__, "--json"], capture_output=True,
                            text=True, check=True, cwd=Path(__file__).resolve().parent.parent)
    return json.loads(result.stdout)


def _run_here() -> list[dict[str, Any]]:
    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP4ClientEndpoint

    base = tempfile.mkdtemp(prefix="cs-abuse-peers-")
    daemon = None
    rows: list[dict[str, Any]] = []
    try:
        daemon, keys = start_sharing(base)

        async def main() -> None:
            endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", daemon.port, timeout=5)
            friend = await connect_peer(reactor, endpoint, ConnectTarget.share(keys, FRIEND),
                                        MemoryKeyRing(time.time), "friend", QuietSession,
                                        features=FEATURES)
            seed = 0
            for count in ATTACKS:
                seed += 1
                rows.append(await _one(reactor, daemon, keys, count, seed))
            friend.close("done", quiet=True)

        run_on_reactor(reactor, main)
    finally:
        if daemon is not None:
            daemon.cleanup()
        shutil.rmtree(base, ignore_errors=True)
    return rows


if __name__ == "__main__":
    print_rows(_run_here)
