"""Post-authentication amplification: what each hostile line costs a real daemon.

For every shape of ``tests/abuse/hostile_peer.py`` a fresh daemon (``alice``,
one share, a legitimate peer ``bob`` attached) receives the line from a peer
that holds the share's keys.  Measured per row:

* ``memory_mb``: growth of alice's peak resident memory (VmHWM) over the attack;
* ``max_reactor_lag_ms``: the slowest answer to a cheap control request
  (``list_shares``) sent back to back while the line is sent and handled,
  less the slowest answer before the attack: how long the reactor was busy;
* ``legit_success``: 1.0 when bob receives a file written on alice after the attack.

Run from the repository root: ``.venv/bin/python bench/abuse_amplify.py``
(about a minute; data under a temporary directory, removed afterwards).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.abuse.hostile_peer import SHAPES, WITHIN_BOUNDS  # noqa: E402
from tests.daemons import DaemonSet, wait_same_trees, wait_until  # noqa: E402

LEGIT_TIMEOUT = 30.0
WAIT_FOR_CLOSE = 5.0


def _peak_rss_mb(pid: int) -> float:
    for line in Path("/proc/%d/status" % pid).read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class _LagProbe(threading.Thread):
    """Sends ``list_shares`` back to back; keeps the slowest round trip."""

    def __init__(self, daemon) -> None:
        super().__init__(daemon=True)
        from clearskies.control.client import ControlClient
        self.client = ControlClient(daemon.control_path, timeout=30.0)
        self.client.connect()
        self.stop = threading.Event()
        self.worst = 0.0

    def run(self) -> None:
        while not self.stop.is_set():
            started = time.perf_counter()
            try:
                self.client.request({"type": "list_shares"})
            except Exception:  # no answer within the client's timeout: a stall at least as long
                self.worst = max(self.worst, time.perf_counter() - started)
                return
            self.worst = max(self.worst, time.perf_counter() - started)
            time.sleep(0.002)

    def finish(self) -> float:
        self.stop.set()
        self.join(60)
        self.client.close()
        return self.worst * 1000


def _one(base: Path, name: str, index: int) -> dict:
    with DaemonSet(base / ("run%d" % index)) as daemons:
        alice, bob = daemons.make("alice"), daemons.make("bob")
        a, b = Path(alice.shares), Path(bob.shares)
        (a / "before.txt").write_text("before\n")
        code = alice.cli_json("share", str(a))["access_code"]
        bob.cli("attach", code, str(b), "--peer", alice.address)
        wait_same_trees(alice, bob, LEGIT_TIMEOUT)
        [share] = alice.cli_json("list")["shares"]
        keys = Path(alice.data_dir) / "keys" / (share["share_id"] + ".json")

        idle = _LagProbe(alice)
        idle.start()
        time.sleep(0.5)
        idle_lag = idle.finish()

        before = _peak_rss_mb(alice.pid)
        probe = _LagProbe(alice)
        probe.start()
        out = base / ("hostile%d.json" % index)
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        subprocess.run([sys.executable, "-m", "tests.abuse.hostile_peer", alice.address,
                        str(keys), str(out), str(WAIT_FOR_CLOSE), name],
                       env=env, cwd=ROOT, check=True, timeout=300)
        time.sleep(0.2)
        lag = probe.finish()
        grown = _peak_rss_mb(alice.pid) - before
        [result] = json.loads(out.read_text())

        (a / "after.txt").write_text("after\n")
        try:
            wait_until(lambda: (b / "after.txt").exists(), timeout=LEGIT_TIMEOUT)
            legit = 1.0
        except Exception:
            legit = 0.0
        return {
            "attack": "%s (%d bytes)" % (name, result["bytes"]),
            "legit_success": legit,
            "memory_mb": round(grown, 1),
            "max_reactor_lag_ms": round(max(0.0, lag - idle_lag), 1),
            "notes": ("connection closed after %.2f s" % result["seconds"]
                      if result["closed"] else
                      "connection still open after %.0f s" % WAIT_FOR_CLOSE) + (
                      "; daemon alive" if alice.running else "; DAEMON DIED"),
        }


def run() -> list[dict]:
    """One row per hostile line (see the module docstring)."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="cs-abuse-amplify-") as tmp:
        for index, name in enumerate(sorted(SHAPES) + sorted(WITHIN_BOUNDS)):
            rows.append(_one(Path(tmp), name, index))
    return rows


if __name__ == "__main__":
    for row in run():
        print("%-40s legit %.1f  mem %+7.1f MB  lag %7.1f ms  %s" % (
            row["attack"], row["legit_success"], row["memory_mb"],
            row["max_reactor_lag_ms"], row["notes"]))
