"""Handshake floods against a real daemon: does a valid peer still get in, and at what cost?

    .venv/bin/python bench/abuse_admission.py

One daemon (``tests/daemons.py``'s ``DaemonProcess``, listening on
127.0.0.1) holds a share.  For each attack, attackers from their own
loopback addresses (127.0.1.x…, ``tests/abuse/flood.py``) hold handshake
connections and reconnect at once when dropped; meanwhile a legitimate peer
with the share's keys connects from 127.0.0.1 ``ATTEMPTS`` times (real
TLS-PSK handshake, retrying within ``BOUND`` seconds).  Measured:

- ``legit_success``: share of attempts with an established session within ``BOUND``;
- ``connect_p50_s`` / ``connect_max_s``: time to that session (retries included);
- ``memory_mb``: the daemon's largest RSS seen during the attack;
- ``max_reactor_lag_ms``: the slowest control-socket round trip (``list_shares``),
  sampled every 0.1 s, as a stand-in for the daemon's reactor latency.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clearskies.keys import ShareKeys  # noqa: E402
from tests.abuse.flood import Flood, fail_handshakes, legit_connect, sleep  # noqa: E402
from bench.reactorrun import print_rows, run_on_reactor  # noqa: E402
from tests.daemons import DaemonProcess, start_sharing  # noqa: E402

BOUND = 5.0
ATTEMPTS = 20
WARMUP = 2.0

ATTACKS: list[dict[str, Any]] = [
    {"attack": "none", "addresses": 0},
    {"attack": "idle flood, 96 addresses x 1", "mode": "idle", "addresses": 96},
    {"attack": "idle flood, 200 addresses x 2", "mode": "idle", "addresses": 200,
     "per_address": 2},
    {"attack": "slowloris, 64 addresses x 1 (1 byte/s)", "mode": "slowloris", "addresses": 64},
    {"attack": "slowloris, 128 addresses x 1 (1 byte/s)", "mode": "slowloris", "addresses": 128},
    {"attack": "TLS stall naming the share, 64 addresses x 1", "mode": "tls_stall",
     "addresses": 64},
    {"attack": "12 failed handshakes from the peer's own address", "failing_neighbour": True},
]


class _Probe:
    """Samples the daemon's RSS and control-socket round trip until stopped."""

    def __init__(self, reactor: Any, daemon: DaemonProcess) -> None:
        self.reactor = reactor
        self.daemon = daemon
        self.process = psutil.Process(daemon.pid)
        self.max_rss = 0.0
        self.max_lag = 0.0
        self.running = True

    async def run(self) -> None:
        from twisted.internet.threads import deferToThread

        while self.running:
            self.max_rss = max(self.max_rss, self.process.memory_info().rss / 2 ** 20)
            began = time.monotonic()
            await deferToThread(self.daemon.control_request, {"type": "list_shares"})
            self.max_lag = max(self.max_lag, (time.monotonic() - began) * 1000)
            await sleep(self.reactor, 0.1)


async def _one(reactor: Any, daemon: DaemonProcess, keys: ShareKeys,
               attack: dict[str, Any], seed: int) -> dict[str, Any]:
    from twisted.internet.defer import Deferred

    probe = _Probe(reactor, daemon)
    probing = Deferred.fromCoroutine(probe.run())
    flood = None
    host = "127.0.0.1"
    notes = ""
    if attack.get("addresses"):
        flood = Flood(reactor, daemon.port, addresses=attack["addresses"],
                      per_address=attack.get("per_address", 1), mode=attack["mode"],
                      reconnect_delay=0.05, share_id=keys.share_id)
        flood.start()
        await sleep(reactor, WARMUP)
        notes = "attack connections open at start: %d" % flood.open
    if attack.get("failing_neighbour"):
        host = "127.0.0.%d" % (10 + seed)
        refused = await fail_handshakes(reactor, daemon.port, host, 12, "%064x" % (seed + 1))
        notes = "peer connects from %s after 12 failures there (%d cannot_start)" % (
            host, refused)
    times: list[float] = []
    for n in range(ATTEMPTS):
        elapsed, _ = await legit_connect(reactor, daemon.port, keys, BOUND, host=host,
                                         seed=seed * 1000 + n)
        if elapsed is not None:
            times.append(elapsed)
        await sleep(reactor, 0.2)
    if flood is not None:
        notes += ", attack connections dropped by the daemon: %d" % flood.dropped
        await flood.stop()
    probe.running = False
    await probing
    return {
        "attack": attack["attack"],
        "legit_success": round(len(times) / ATTEMPTS, 3),
        "connect_p50_s": round(statistics.median(times), 3) if times else None,
        "connect_max_s": round(max(times), 3) if times else None,
        "memory_mb": round(probe.max_rss, 1),
        "max_reactor_lag_ms": round(probe.max_lag, 1),
        "notes": notes + ("; daemon up" if daemon.running else "; DAEMON DIED"),
    }


def run() -> list[dict[str, Any]]:
    """Run every attack against one fresh daemon; one row of figures per attack.

    Runs in a child process, so that the caller's reactor (which can run only
    once) stays untouched.
    """
    result = subprocess.run([sys.executable, __file__, "--json"], capture_output=True,
                            text=True, check=True, cwd=Path(__file__).resolve().parent.parent)
    return json.loads(result.stdout)


def _run_here() -> list[dict[str, Any]]:
    from twisted.internet import reactor

    base = tempfile.mkdtemp(prefix="cs-abuse-bench-")
    daemon = None
    rows: list[dict[str, Any]] = []
    try:
        daemon, keys = start_sharing(base)

        async def main() -> None:
            for seed, attack in enumerate(ATTACKS):
                rows.append(await _one(reactor, daemon, keys, attack, seed))

        run_on_reactor(reactor, main)
    finally:
        if daemon is not None:
            daemon.cleanup()
        shutil.rmtree(base, ignore_errors=True)
    return rows


if __name__ == "__main__":
    print_rows(_run_here)
