"""Records a local obstacle blocks, in bulk: a symlink where a peer's busy folder goes.

Two real daemons (tests/daemons.py) on loopback.  Alice shares ``files``
files under ``sub/``; on Bob, ``sub`` is a symbolic link to a folder outside
the share, so every one of them is refused and waits (merged again every
30 s and after a scan).  Measured: Bob's RSS with the records waiting, the
slowest control-socket ``status`` answer meanwhile (reactor lag, as a
user's CLI sees it), whether a legitimate file outside ``sub/`` still
arrives, and how long all of them take to arrive once the link is removed
and Bob runs ``clearskies scan``.

    PYTHONPATH=. .venv/bin/python bench/abuse_obstacles.py

``run()`` returns the rows (attack, legit_success, memory_mb,
max_reactor_lag_ms, notes) for bench/abuse.py.
"""

from __future__ import annotations

import json
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.abuse_operations import _lag_probe, _rss_mb  # noqa: E402
from tests.daemons import DaemonSet, tree_snapshot, wait_until  # noqa: E402

SEED = 20261207


def _waiting(daemon: Any) -> int:
    status = daemon.control_request({"type": ".clearskies.share_status",
                                     "path": str(daemon.shares)})
    return status.get("skipped", 0)


def run(files: int = 5000) -> list[dict[str, Any]]:
    rng = random.Random(SEED)
    with tempfile.TemporaryDirectory(prefix="cs-abuse-obst-") as tmp, DaemonSet(tmp) as daemons:
        alice = daemons.make("alice")
        bob = daemons.make("bob")
        a, b = Path(alice.shares), Path(bob.shares)
        (a / "start.txt").write_bytes(b"start")
        code = alice.cli_json("share", str(a))["access_code"]
        bob.cli("attach", code, str(b), "--peer", alice.address, "--wait",
                "--timeout-wait", "60", timeout=90)
        outside = Path(tmp) / "outside"
        outside.mkdir()
        (b / "sub").symlink_to(outside, target_is_directory=True)
        bob.cli("scan", str(b))
        before = _rss_mb(bob.pid)
        stop, worst = threading.Event(), [0.0]
        probe = threading.Thread(target=_lag_probe, args=(bob, stop, worst))
        probe.start()
        (a / "sub").mkdir()
        for i in range(files):
            (a / "sub" / ("f%05d" % i)).write_bytes(rng.randbytes(64))
        alice.cli("scan", str(a))
        started = time.monotonic()
        wait_until(lambda: _waiting(bob) >= files + 1, timeout=300, interval=0.5)  # (+ the link)
        refused_seconds = time.monotonic() - started
        (a / "legit.txt").write_bytes(b"legit")
        alice.cli("scan", str(a))
        try:
            wait_until(lambda: (b / "legit.txt").exists(), timeout=60)
            legit = (b / "legit.txt").read_bytes() == b"legit"
        except TimeoutError:
            legit = False
        stop.set()
        probe.join()
        during = _rss_mb(bob.pid)
        outside_empty = os.listdir(outside) == []
        (b / "sub").unlink()
        started = time.monotonic()
        bob.cli("scan", str(b))
        try:
            wait_until(lambda: len(tree_snapshot(b)) == len(tree_snapshot(a)), timeout=300,
                       interval=0.5)
            arrived = "all %d arrived %.1f s after the link was removed and a scan" % (
                files, time.monotonic() - started)
        except TimeoutError:
            arrived = "NOT all arrived within 300 s of removing the link"
    return [{
        "attack": "%d records blocked by a symlink on the receiver" % files,
        "legit_success": 1.0 if legit else 0.0,
        "memory_mb": round(during, 1),
        "max_reactor_lag_ms": round(worst[0] * 1000, 1),
        "notes": "all refused in %.1f s; RSS %.1f -> %.1f MB; outside untouched: %s; %s"
                 % (refused_seconds, before, during, outside_empty, arrived),
    }]


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    for row in run():
        print(json.dumps(row))
