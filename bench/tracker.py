"""Tracker load on loopback: requests/s, memory per peer, open fast_track streams.

Three measurements, printed as one table:

1. the pure registry, in this process: time per registration and memory per
   registered peer (tracemalloc);
2. a tracker in a child process (127.0.0.1, an ephemeral port) preloaded with
   ``--ids`` IDs: plain ``/clearskies/track`` requests per second over
   ``--connections`` keep-alive connections, at most ``--requests`` requests
   or ``--time-cap`` seconds;
3. ``--streams`` fast_track streams held open at once: time to open them,
   the tracker's RSS per stream, and how long until every stream has seen the
   update caused by a new peer on its ID.

Everything stays on 127.0.0.1 and the run stops by itself.  Run:

    .venv/bin/python bench/tracker.py [--ids 10000] [--requests 20000]
        [--connections 8] [--streams 1000] [--time-cap 30]
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import resource
import select
import statistics
import subprocess
import sys
import time
import tracemalloc

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater, react

from clearskies.tracker.registry import Registry

_LENGTH_RE = re.compile(rb"(?i)\r\ncontent-length: *([0-9]+)")


def share_id(i: int) -> str:
    return "%064x" % (i + 1)


def peer_id(i: int, kind: int) -> str:
    return "%01x%031x" % (kind, i)


def fake_host(i: int) -> str:
    """Documentation-range addresses: only strings in the registry, never dialled."""
    return "198.18.%d.%d" % (i // 250 % 250, i % 250 + 1)


def preload(registry: Registry, ids: int, now: float) -> None:
    for i in range(ids):
        registry.register([(share_id(i), peer_id(i, 1))], fake_host(i), 30000 + i % 1000, None, now)


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# -- 1. the pure registry ------------------------------------------------------

def registry_figures(ids: int) -> tuple[float, float]:
    """(µs per registration, bytes per registered peer) for ``ids`` IDs with 2 peers each."""

    def fill() -> Registry:
        registry = Registry(ttl=300, max_per_source=10**9, max_total=10**9)
        preload(registry, ids, now=0)
        for i in range(ids):
            registry.register([(share_id(i), peer_id(i, 2))], "192.0.2.1", 40000, None, now=1)
        assert registry.stats()["registrations"] == 2 * ids
        return registry

    start = time.perf_counter()
    fill()
    per_registration = (time.perf_counter() - start) / (2 * ids)
    gc.collect()
    tracemalloc.start()  # slows allocation a lot, so timed separately above
    before = tracemalloc.get_traced_memory()[0]
    registry = fill()
    gc.collect()
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    del registry
    return per_registration * 1e6, used / (2 * ids)


# -- the tracker child process -------------------------------------------------

def serve(ids: int, streams: int, lifetime: float) -> None:
    """Child: a preloaded tracker on 127.0.0.1:0; prints ``ready PORT``; stops after ``lifetime``."""
    raise_fd_limit()
    from twisted.internet import reactor

    from clearskies.tracker.web import make_site

    registry = Registry(ttl=3600, max_per_source=10**7, max_total=10**7, max_streams=streams + 16)
    preload(registry, ids, reactor.seconds())
    port = reactor.listenTCP(0, make_site(registry, reactor), interface="127.0.0.1", backlog=1024)
    reactor.callWhenRunning(lambda: print("ready %d" % port.getHost().port, flush=True))
    reactor.callLater(lifetime, reactor.stop)
    reactor.run()


def start_server(ids: int, streams: int, lifetime: float) -> tuple[subprocess.Popen, int]:
    child = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--serve", "--ids", str(ids),
         "--streams", str(streams), "--lifetime", str(lifetime)],
        stdout=subprocess.PIPE,
    )
    ready, _, _ = select.select([child.stdout], [], [], 60)
    line = child.stdout.readline() if ready else b""
    if not line.startswith(b"ready "):
        child.kill()
        raise SystemExit("the tracker child did not start")
    return child, int(line.split()[1])


# -- clients -------------------------------------------------------------------

class KeepAliveClient(Protocol):
    """One GET at a time on a persistent HTTP/1.1 connection (Content-Length bodies)."""

    def __init__(self) -> None:
        self._buffer = b""
        self._waiting: Deferred[tuple[int, bytes]] | None = None

    def get(self, path: bytes) -> Deferred[tuple[int, bytes]]:
        self._waiting = Deferred()
        self.transport.write(b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % path)
        return self._waiting

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        match = _LENGTH_RE.search(self._buffer, 0, end + 2)
        size = int(match.group(1)) if match else 0
        if len(self._buffer) < end + 4 + size:
            return
        status = int(self._buffer[9:12])
        body = self._buffer[end + 4:end + 4 + size]
        self._buffer = self._buffer[end + 4 + size:]
        waiting, self._waiting = self._waiting, None
        waiting.callback((status, body))


class StreamClient(Protocol):
    """A fast_track request (HTTP/1.0, so the body is plain lines); notes when lines arrive."""

    def __init__(self, path: bytes) -> None:
        self.path = path
        self.first: Deferred[float] = Deferred()
        self.update: Deferred[float] = Deferred()
        self._buffer = b""
        self._in_body = False

    def connectionMade(self) -> None:
        self.transport.write(b"GET %s HTTP/1.0\r\n\r\n" % self.path)

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        if not self._in_body:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            assert self._buffer.startswith(b"HTTP/1.0 200"), self._buffer[:60]
            self._buffer = self._buffer[end + 4:]
            self._in_body = True
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            if b'"timeout"' in line and not self.first.called:
                self.first.callback(time.perf_counter())
            elif line.startswith(b'{"others"') and not self.update.called:
                self.update.callback(time.perf_counter())


async def connect(reactor, port: int, protocol: Protocol) -> Protocol:
    return await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), protocol)


async def request_rate(reactor, port: int, ids: int, total: int, connections: int, cap: float):
    """Plain registrations spread over ``ids`` IDs; returns (requests, seconds, latencies)."""
    clients = [await connect(reactor, port, KeepAliveClient()) for _ in range(connections)]
    latencies: list[float] = []
    counter = iter(range(total))
    deadline = time.perf_counter() + cap

    async def run(client: KeepAliveClient) -> None:
        for i in counter:
            if time.perf_counter() > deadline:
                return
            path = b"/clearskies/track?id=%s%%40%s&tcp_port=%d" % (
                share_id(i % ids).encode(), peer_id(i % ids, 3).encode(), 30000 + i % 1000)
            sent = time.perf_counter()
            status, _ = await client.get(path)
            latencies.append(time.perf_counter() - sent)
            assert status == 200, status

    start = time.perf_counter()
    await gatherResults([Deferred.fromCoroutine(run(c)) for c in clients])
    elapsed = time.perf_counter() - start
    for client in clients:
        client.transport.loseConnection()
    return len(latencies), elapsed, latencies


async def stream_figures(reactor, port: int, pid: int, streams: int, connections: int):
    """Open ``streams`` fast_track streams, then cause one update on each; return the figures."""
    import psutil

    server = psutil.Process(pid)
    rss_before = server.memory_info().rss
    readers = [
        StreamClient(b"/clearskies/track?id=%s%%40%s&tcp_port=31000&fast_track=1"
                     % (share_id(j).encode(), peer_id(j, 4).encode()))
        for j in range(streams)
    ]
    start = time.perf_counter()
    for reader in readers:
        await connect(reactor, port, reader)
    await gatherResults([r.first for r in readers])
    opened = time.perf_counter() - start
    await deferLater(reactor, 0.5, lambda: None)
    rss_per_stream = (server.memory_info().rss - rss_before) / streams

    clients = [await connect(reactor, port, KeepAliveClient()) for _ in range(connections)]
    sent_at: dict[int, float] = {}
    work = iter(range(streams))

    async def run(client: KeepAliveClient) -> None:
        for j in work:
            sent_at[j] = time.perf_counter()
            status, _ = await client.get(b"/clearskies/track?id=%s%%40%s&tcp_port=32000"
                                         % (share_id(j).encode(), peer_id(j, 5).encode()))
            assert status == 200, status

    start = time.perf_counter()
    await gatherResults([Deferred.fromCoroutine(run(c)) for c in clients])
    arrived = await gatherResults([r.update for r in readers])
    fan_out = max(arrived) - start
    delays = [arrived[j] - sent_at[j] for j in range(streams)]
    for transport in [r.transport for r in readers] + [c.transport for c in clients]:
        transport.loseConnection()
    return opened, rss_per_stream, fan_out, delays, server.memory_info().rss


async def measure(reactor, args: argparse.Namespace, port: int, pid: int,
                  rows: list[tuple[str, str]]) -> None:
    done, elapsed, latencies = await request_rate(
        reactor, port, args.ids, args.requests, args.connections, args.time_cap)
    latencies.sort()
    rows.append(("plain requests/s, %d IDs, %d connections (%d requests)"
                 % (args.ids, args.connections, done), "%.0f" % (done / elapsed)))
    rows.append(("plain request latency, median / p99", "%.2f / %.2f ms" % (
        statistics.median(latencies) * 1e3, latencies[int(len(latencies) * 0.99)] * 1e3)))
    opened, rss_per_stream, fan_out, delays, rss = await stream_figures(
        reactor, port, pid, args.streams, args.connections)
    rows.append(("%d fast_track streams: time to open all" % args.streams, "%.2f s" % opened))
    rows.append(("tracker RSS per open stream", "%.1f KiB" % (rss_per_stream / 1024)))
    rows.append(("new peer on each stream's ID: all %d updates delivered" % args.streams,
                 "%.2f s" % fan_out))
    rows.append(("registration to update line, median / max",
                 "%.1f / %.1f ms" % (statistics.median(delays) * 1e3, max(delays) * 1e3)))
    rows.append(("tracker RSS at the end", "%.1f MiB" % (rss / 2**20)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ids", type=int, default=10_000, help="IDs preloaded in the tracker")
    parser.add_argument("--requests", type=int, default=20_000, help="plain requests to time")
    parser.add_argument("--connections", type=int, default=8, help="keep-alive client connections")
    parser.add_argument("--streams", type=int, default=1000, help="fast_track streams held open")
    parser.add_argument("--time-cap", type=float, default=30.0, help="seconds per timed phase")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--lifetime", type=float, default=300.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.ids, args.streams, args.lifetime)
        return
    if args.streams > args.ids:
        parser.error("--streams must not exceed --ids (one stream per ID)")

    raise_fd_limit()
    per_registration_us, bytes_per_peer = registry_figures(args.ids)
    child, port = start_server(args.ids, args.streams, lifetime=4 * args.time_cap + 60)
    rows: list[tuple[str, str]] = [
        ("registry: one registration (pure, in process)", "%.1f µs" % per_registration_us),
        ("registry: memory per registered peer (tracemalloc)", "%.0f bytes" % bytes_per_peer),
    ]
    try:
        react(lambda reactor: Deferred.fromCoroutine(measure(reactor, args, port, child.pid, rows))
              .addTimeout(3 * args.time_cap + 60, reactor))
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    finally:
        child.terminate()
        child.wait(timeout=30)
    width = max(len(what) for what, _ in rows)
    print("| %s | value |" % "what".ljust(width))
    print("|%s|-------|" % ("-" * (width + 2)))
    for what, value in rows:
        print("| %s | %s |" % (what.ljust(width), value))


if __name__ == "__main__":
    main()
