"""The tracker under attack: what a legitimate peer still gets, and what it costs.

Starts a real ``twistd -n clearskies-tracker`` with 1,024 file descriptors
on 127.0.0.1 and runs one attack after another against it (all from
127.x.y.z loopback addresses), each followed by legitimate requests:

- ``idle_flood``: 1,100 idle connections, more than the tracker's descriptors;
- ``big_post``: a 300 MB POST; how much of it the tracker let in;
- ``fast_track_hoard``: one address opens 100 fast_track streams;
- ``hijack``: another address re-registers a real peer's (ID, peer ID);
- ``eclipse``: 300 fake peers of one ID from one address;
- ``slow_readers``: 400 connections that ask for 64 crowded IDs and never read;
- ``fill``: registrations from many /24s until the tracker is full;

plus, in this process, ``registry_bytes``: tracemalloc bytes per
registration at 100,000 (from distinct addresses, with one and with two
peers per ID, the worst cases), and ``fast_track_fanout``: the time one
change to a crowded ID takes when 2,000 streams watch it.

``max_reactor_lag_ms`` is the slowest legitimate request's round trip, an
upper bound on how long the tracker's reactor was busy.  Run:

    .venv/bin/python bench/abuse_tracker.py
"""

from __future__ import annotations

import gc
import http.client
import json
import random
import socket
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clearskies.tracker.registry import MAX_TOTAL, Registry  # noqa: E402
from tests.abuse.tracker_process import (  # noqa: E402
    TrackerProcess, crowd, fake_peer, get, rss_mb, start_tracker, stuck_readers, track_path)

SHARE = "a" * 64
REAL = "1" * 32
ASKER = "2" * 32




def _legit(tracker: TrackerProcess, count: int = 20, share: str = SHARE,
           check=lambda body: True) -> tuple[float, float]:
    """(success rate, slowest round trip in ms) of ``count`` legitimate requests."""
    ok, slowest = 0, 0.0
    for i in range(count):
        started = time.monotonic()
        try:
            code, body = get(tracker.port, track_path([(share, ASKER)], 30002), source="127.0.0.1")
            ok += code == 200 and check(json.loads(body)["others"][share])
        except OSError:
            pass
        slowest = max(slowest, time.monotonic() - started)
    return ok / count, slowest * 1000


def _row(attack: str, tracker: TrackerProcess, success: float, lag: float, notes: str) -> dict:
    return {"attack": attack, "legit_success": round(success, 3),
            "memory_mb": round(rss_mb(tracker.pid), 1),
            "max_reactor_lag_ms": round(lag, 1), "notes": notes}


def idle_flood(tracker: TrackerProcess) -> dict:
    idle = []
    try:
        for i in range(1100):
            s = socket.socket()
            s.bind(("127.10.%d.%d" % (i // 250, i % 250 + 1), 0))
            s.settimeout(5)
            s.connect(("127.0.0.1", tracker.port))
            idle.append(s)
        time.sleep(0.5)
        success, lag = _legit(tracker)
        return _row("idle_flood", tracker, success, lag, "1,100 idle connections, fd limit 1,024")
    finally:
        for s in idle:
            s.close()


def big_post(tracker: TrackerProcess) -> dict:
    with socket.create_connection(("127.0.0.1", tracker.port), timeout=5) as s:
        s.sendall(b"POST /clearskies/track HTTP/1.1\r\nHost: t\r\nContent-Length: 314572800\r\n\r\n")
        started = time.monotonic()
        status = s.recv(4096).split(b"\r\n", 1)[0].decode(errors="replace")
        answered = (time.monotonic() - started) * 1000
        sent, chunk = 0, b"x" * (1 << 20)
        s.settimeout(2)
        try:
            while sent < 300 << 20:
                sent += s.send(chunk)
        except OSError:
            pass
    success, lag = _legit(tracker)
    return _row("big_post", tracker, success, lag,
                "%s after %.0f ms; %.1f MB of 300 MB left the client before the close"
                % (status, answered, sent / 2**20))


def fast_track_hoard(tracker: TrackerProcess) -> dict:
    streams, accepted = [], 0
    try:
        for i in range(101):
            s = socket.socket()
            s.bind(("127.20.0.1" if i < 100 else "127.21.0.1", 0))
            s.settimeout(5)
            s.connect(("127.0.0.1", tracker.port))
            peer = fake_peer(i) if i < 100 else REAL
            s.sendall(b"GET %s HTTP/1.1\r\nHost: t\r\n\r\n"
                      % track_path([(SHARE, peer)], 30001, "&fast_track=1").encode())
            head = s.recv(4096)
            streams.append(s)
            if i < 100:
                accepted += head.startswith(b"HTTP/1.1 200 ")
            else:
                legit_stream = head.startswith(b"HTTP/1.1 200 ")
        success, lag = _legit(tracker)
        return _row("fast_track_hoard", tracker, success * legit_stream, lag,
                    "one address got %d of 100 streams; a second address got its stream: %s"
                    % (accepted, legit_stream))
    finally:
        for s in streams:
            s.close()


def hijack(tracker: TrackerProcess) -> dict:
    share = "b" * 64
    get(tracker.port, track_path([(share, REAL)], 30001), source="127.30.0.1")
    get(tracker.port, track_path([(share, REAL)], 666), source="127.66.0.1")
    success, lag = _legit(tracker, share=share,
                          check=lambda listed: listed[0] == REAL + "@tcp:127.30.0.1:30001")
    return _row("hijack", tracker, success, lag,
                "(ID, peer ID) re-registered from another address; real address listed first")


def eclipse(tracker: TrackerProcess) -> dict:
    share = "c" * 64
    for start in range(0, 300, 60):
        get(tracker.port, track_path([(share, fake_peer(i)) for i in range(start, start + 60)], 666),
            source="127.40.0.1")
    get(tracker.port, track_path([(share, REAL)], 30001), source="127.41.0.1")
    success, lag = _legit(tracker, share=share,
                          check=lambda listed: REAL + "@tcp:127.41.0.1:30001" in listed)
    return _row("eclipse", tracker, success, lag, "300 fakes from one address; real peer listed")


def slow_readers(tracker: TrackerProcess) -> dict:
    ids = crowd(tracker.port)
    path = track_path([(i, ASKER) for i in ids], 1)
    answer = len(get(tracker.port, path)[1])
    before = rss_mb(tracker.pid)
    stuck = stuck_readers(tracker.port, path)
    try:
        time.sleep(2)
        grown = rss_mb(tracker.pid) - before
        success, lag = _legit(tracker, share=ids[0])
        return _row("slow_readers", tracker, success, lag,
                    "400 connections ask for 64 crowded IDs (%d-byte answer) and never read: "
                    "+%.0f MB" % (answer, grown))
    finally:
        for s in stuck:
            s.close()


def fill(tracker: TrackerProcess) -> dict:
    rng = random.Random(7)
    get(tracker.port, track_path([(SHARE, ASKER)], 30002), source="127.0.0.1")
    stored, refused, started = 0, 0, time.monotonic()
    why: tuple[int, str] = (0, "")
    source = 0
    while refused == 0 and time.monotonic() - started < 120:
        host = "127.%d.%d.1" % (100 + source // 250, source % 250)
        source += 1
        connection = http.client.HTTPConnection("127.0.0.1", tracker.port, timeout=10,
                                                source_address=(host, 0))
        for _ in range(16):
            pairs = [("%064x" % rng.getrandbits(256), "%032x" % rng.getrandbits(128))
                     for _ in range(64)]
            connection.request("GET", track_path(pairs, 1))
            response = connection.getresponse()
            body = response.read()
            if response.status == 200:
                stored += 64
            else:
                refused += 1
                why = response.status, body.decode(errors="replace").strip()
                break
        connection.close()
    for i in range(64):  # the last few places, one at a time
        pair = ("%064x" % rng.getrandbits(256), "%032x" % rng.getrandbits(128))
        if get(tracker.port, track_path([pair], 1), source="127.99.0.%d" % (i + 1))[0] != 200:
            break
        stored += 1
    seconds = time.monotonic() - started
    refresh, lag = _legit(tracker)
    code, _ = get(tracker.port, track_path([(SHARE, "9" * 32)], 30009), source="127.0.0.9")
    row = _row("fill", tracker, refresh, lag,
               "%d registrations from %d addresses in %.0f s, then %s; a live peer refreshes, "
               "a new one gets %d" % (stored, source, seconds, why, code))
    return row


def _bytes_per_registration(count: int, per_id: int) -> float:
    rng = random.Random(3)
    registry = Registry(max_total=count, max_per_source=count, max_per_prefix=count)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    share_id = ""
    for i in range(count):
        if i % per_id == 0:
            share_id = "%064x" % rng.getrandbits(256)
        registry.renew([(share_id, "%032x" % rng.getrandbits(128))],
                       "10.%d.%d.%d" % (i >> 16 & 255, i >> 8 & 255, i & 255), 1000, None, now=0)
    gc.collect()
    per = (tracemalloc.get_traced_memory()[0] - before) / count
    tracemalloc.stop()
    return per


def registry_bytes(count: int = 100_000) -> dict:
    per = {n: _bytes_per_registration(count, n) for n in (1, 2)}
    worst = max(per.values())
    return {"attack": "registry_bytes", "legit_success": None,
            "memory_mb": round(worst * MAX_TOTAL / 2**20, 1), "max_reactor_lag_ms": None,
            "notes": "bytes per registration at %d, each from its own address: %.0f with one "
                     "peer per ID, %.0f with two; memory_mb is the worse times MAX_TOTAL=%d"
                     % (count, per[1], per[2], MAX_TOTAL)}


def fast_track_fanout() -> dict:
    """Reactor time for one change to a crowded ID that 2,000 streams watch (in process)."""
    registry = Registry()
    share_id, n = SHARE, 0
    for host in range(122):
        for _ in range(16):
            registry.renew([(share_id, "%032x" % (n + k)) for k in range(64)],
                           "10.%d.0.1" % host, 1000, None, now=0)
            n += 64
    subscriptions: list = []
    for i in range(2000):
        subscriptions.append(registry.subscribe(
            [(share_id, "%032x" % (10**9 + i))],
            lambda ids, i=i: registry.others_for(subscriptions[i], ids),
            "10.200.%d.%d" % (i // 64, i // 16 % 4 + 1)))  # 16 per address, 64 per /24
    started = time.perf_counter()
    registry.renew([(share_id, "f" * 32)], "10.250.0.1", 1, None, now=1)
    lag = (time.perf_counter() - started) * 1000
    return {"attack": "fast_track_fanout", "legit_success": None, "memory_mb": None,
            "max_reactor_lag_ms": round(lag, 1),
            "notes": "one change to an ID with %d registrations heard by 2,000 streams "
                     "(registry only, no sockets)" % (registry.stats()["registrations"],)}


def run() -> list[dict]:
    """One row per attack (see the module docstring)."""
    rows = [registry_bytes(), fast_track_fanout()]
    with tempfile.TemporaryDirectory() as workdir:
        tracker = start_tracker(Path(workdir))
        try:
            baseline, lag = _legit(tracker)
            rows.append(_row("none", tracker, baseline, lag, "no attack"))
            for attack in (idle_flood, big_post, fast_track_hoard, hijack, eclipse,
                           slow_readers, fill):
                rows.append(attack(tracker))
            assert tracker.alive(), tracker.output()
        finally:
            tracker.stop()
    return rows


if __name__ == "__main__":
    for row in run():
        print(row)
