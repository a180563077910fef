"""Dead access codes under load: a flood of ``start`` lines naming dead or unknown
codes, from many loopback addresses, against a sharing daemon.

Two real daemons (tests/daemons.py) on loopback.  The attack: ``--sources``
addresses 127.77.x.y each open ``--per-source`` connections to the sharer and
ask for an access ID it never made or one it cancelled.  Measured: whether
every refusal carried its reason, the sharer's RSS, the slowest control-socket
``status`` answer during the flood (reactor lag, as a user's CLI sees it), and
whether a legitimate ``attach --wait`` with a live code then succeeds.

    PYTHONPATH=. .venv/bin/python bench/abuse_operations.py

``run()`` returns the rows (attack, legit_success, memory_mb,
max_reactor_lag_ms, notes) for bench/abuse.py.
"""

from __future__ import annotations

import json
import os
import random
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clearskies.accesscode import access_id, parse_code  # noqa: E402
from tests.daemons import DaemonSet  # noqa: E402

SEED = 20261207


def _rss_mb(pid: int) -> float:
    with open("/proc/%d/status" % pid) as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _ask(source: str, port: int, start_id: str, rng: random.Random) -> str | None:
    """One plaintext handshake naming ``start_id``; the reply's reason (or what went wrong)."""
    with socket.socket() as sock:
        sock.settimeout(10)
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", port))
        reader = sock.makefile("rb")
        reader.readline()  # greeting
        sock.sendall(json.dumps({
            "type": "start", "software": "bench", "protocol": 1, "features": [],
            "id": start_id, "access": "unknown", "peer": "%032x" % rng.getrandbits(128),
        }).encode() + b"\n")
        line = reader.readline()
    if not line:
        return "closed"
    reply = json.loads(line)
    return reply.get("reason") if reply.get("type") == "cannot_start" else reply.get("type")


def _flood(port: int, ids: list[str], sources: int, per_source: int) -> dict[str, int]:
    rng = random.Random(SEED)
    counts: dict[str, int] = {}
    lock = threading.Lock()

    def worker(n: int) -> None:
        local = random.Random(SEED + n)
        source = "127.77.%d.%d" % (n // 250, n % 250 + 1)
        for _ in range(per_source):
            try:
                reason = _ask(source, port, local.choice(ids), rng)
            except OSError as e:
                reason = type(e).__name__
            with lock:
                counts[str(reason)] = counts.get(str(reason), 0) + 1

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(sources)]
    for i in range(0, len(threads), 32):  # 32 at a time: a flood, not a fork bomb
        batch = threads[i:i + 32]
        for t in batch:
            t.start()
        for t in batch:
            t.join()
    return counts


def _lag_probe(daemon: Any, stop: threading.Event, worst: list[float]) -> None:
    while not stop.is_set():
        started = time.monotonic()
        try:
            daemon.control_request({"type": "status"}, timeout=10)
        except Exception:
            pass
        worst[0] = max(worst[0], time.monotonic() - started)
        time.sleep(0.05)


def run(sources: int = 128, per_source: int = 4) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="cs-abuse-ops-") as tmp, DaemonSet(tmp) as daemons:
        alice = daemons.make("alice")
        bob = daemons.make("bob")
        (alice.shares / "a.txt").write_bytes(b"hello")
        cancelled = alice.cli_json("share", str(alice.shares))["access_code"]
        alice.cli("cancel-code", cancelled)
        rng = random.Random(SEED)
        ids = [access_id(parse_code(cancelled))] + ["%064x" % rng.getrandbits(256)
                                                    for _ in range(15)]
        before = _rss_mb(alice.pid)
        stop, worst = threading.Event(), [0.0]
        probe = threading.Thread(target=_lag_probe, args=(alice, stop, worst))
        probe.start()
        started = time.monotonic()
        counts = _flood(alice.port, ids, sources, per_source)
        flood_seconds = time.monotonic() - started
        stop.set()
        probe.join()
        after = _rss_mb(alice.pid)
        code = alice.cli_json("share", str(alice.shares))["access_code"]
        into = Path(tmp) / "bob-copy"
        started = time.monotonic()
        result = bob.cli("attach", code, str(into), "--peer", alice.address, "--wait",
                         "--timeout-wait", "60", check=False, timeout=90)
        legit_seconds = time.monotonic() - started
        ok = result.returncode == 0 and (into / "a.txt").read_bytes() == b"hello"
        rows.append({
            "attack": "dead/unknown code starts: %d sources x %d" % (sources, per_source),
            "legit_success": 1.0 if ok else 0.0,
            "memory_mb": round(after, 1),
            "max_reactor_lag_ms": round(worst[0] * 1000, 1),
            "notes": "replies %s in %.1f s; RSS %.1f -> %.1f MB; legit attach %.1f s"
                     % (json.dumps(counts, sort_keys=True), flood_seconds, before, after,
                        legit_seconds),
        })
        dead = Path(tmp) / "bob-dead"
        started = time.monotonic()
        result = bob.cli("attach", cancelled, str(dead), "--peer", alice.address, "--wait",
                         "--timeout-wait", "60", check=False, timeout=90)
        rows.append({
            "attack": "none: attach --wait with a cancelled code (must exit 1 at once)",
            "legit_success": None,
            "memory_mb": round(_rss_mb(bob.pid), 1),
            "max_reactor_lag_ms": None,
            "notes": "exit %d after %.1f s: %s" % (result.returncode,
                                                   time.monotonic() - started,
                                                   result.stderr.strip()[:120]),
        })
    return rows


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    for row in run():
        print(json.dumps(row))
