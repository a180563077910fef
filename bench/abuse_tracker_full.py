"""A tracker filled to its registration cap: do daemons already registered keep their place?

    .venv/bin/python bench/abuse_tracker_full.py

A real tracker process (``tests/abuse/tracker_process.py``) on 127.0.0.1.
``DAEMONS`` legitimate daemons register 63 IDs each; attackers from
127.40.x.y fill the table to MAX_TOTAL.  Each daemon then renews with its
63 IDs plus one new one (it added a share), ``ROUNDS`` times.  Measured:

- ``legit_success``: share of renewals answered 200 with the 63 IDs kept
  (only the new one named in ``not_registered``);
- ``memory_mb``: the tracker's RSS with the table full;
- ``max_reactor_lag_ms``: the slowest of those renewals, as a stand-in for
  the tracker's reactor latency.
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clearskies.tracker.registry import MAX_TOTAL  # noqa: E402
from tests.abuse.tracker_process import get, rss_mb, start_tracker  # noqa: E402

DAEMONS = 8
ROUNDS = 5


def _track(pairs: list[tuple[str, str]], port: int) -> str:
    ids = "&".join("id=%s%%40%s" % pair for pair in pairs)
    return "/clearskies/track?%s&tcp_port=%d" % (ids, port)


def run() -> list[dict[str, Any]]:
    """One row: renewals of registered daemons that add an ID while the tracker is full."""
    rng = random.Random(3)
    with tempfile.TemporaryDirectory(prefix="cs-abuse-tracker-full-") as workdir:
        tracker = start_tracker(Path(workdir))
        try:
            daemons = []
            for d in range(DAEMONS):
                peer = "%032x" % rng.getrandbits(128)
                own = [("%064x" % rng.getrandbits(256), peer) for _ in range(63)]
                get(tracker.port, _track(own, 30001), source="127.0.0.%d" % (d + 1))
                daemons.append((d, peer, own))
            filled, n = DAEMONS * 63, 0
            began = time.monotonic()
            while filled < MAX_TOTAL:
                source = "127.40.%d.%d" % (n // 1024 // 4, 1 + n // 1024 % 4)
                pairs = [("%064x" % rng.getrandbits(256), "%032x" % rng.getrandbits(128))
                         for _ in range(min(64, MAX_TOTAL - filled))]
                get(tracker.port, _track(pairs, 40000), source=source)
                filled += len(pairs)
                n += len(pairs)
            fill_s = time.monotonic() - began
            ok = total = 0
            worst = 0.0
            for _ in range(ROUNDS):
                for d, peer, own in daemons:
                    new = ("%064x" % rng.getrandbits(256), peer)
                    asked = time.monotonic()
                    code, body = get(tracker.port, _track(own + [new], 30001),
                                     source="127.0.0.%d" % (d + 1))
                    worst = max(worst, time.monotonic() - asked)
                    total += 1
                    if code == 200:
                        refused = json.loads(body).get("not_registered", {}).get("ids")
                        ok += refused == ["%s@%s" % new]
            memory = rss_mb(tracker.pid)
            alive = tracker.alive()
        finally:
            tracker.stop()
    return [{
        "attack": "registration table filled to %d, then registered daemons add an ID"
                  % MAX_TOTAL,
        "legit_success": round(ok / total, 3),
        "memory_mb": round(memory, 1),
        "max_reactor_lag_ms": round(worst * 1000, 1),
        "notes": "filled in %.1f s; %d renewals of 64 IDs (63 registered + 1 new); %s"
                 % (fill_s, total, "tracker up" if alive else "TRACKER DIED"),
    }]


if __name__ == "__main__":
    for row in run():
        print(row)
