"""A real ``twistd -n clearskies-tracker`` process for the abuse tests and benchmarks.

The tracker runs with a file descriptor limit of 1,024 (what most systems
give a service), so a flood of connections meets the limit it would meet in
the wild.  Everything stays on loopback.
"""

from __future__ import annotations

import http.client
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

TWISTD = Path(sys.executable).with_name("twistd")
FD_LIMIT = 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _limit_fds() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))


def get(port: int, path: str, source: str = "127.0.0.1", timeout: float = 5) -> tuple[int, bytes]:
    """One GET from the loopback address ``source``; (status, body)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout,
                                            source_address=(source, 0))
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def rss_mb(pid: int) -> float:
    """Resident memory of a process in MB, from /proc."""
    with open("/proc/%d/status" % pid) as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS for %d" % pid)


class TrackerProcess:
    """Start with :meth:`start`, end with :meth:`stop`; ``port`` and ``pid`` are set between."""

    def __init__(self, workdir: Path, ttl: int = 300) -> None:
        self.workdir = workdir
        self.ttl = ttl
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> TrackerProcess:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.log = open(self.workdir / "tracker.log", "wb")
        self.process = subprocess.Popen(
            [str(TWISTD), "-n", "--pidfile=", "clearskies-tracker",
             "--listen", "tcp:%d:interface=127.0.0.1" % self.port, "--ttl", str(self.ttl)],
            cwd=self.workdir, stdout=self.log, stderr=subprocess.STDOUT, env=env,
            preexec_fn=_limit_fds,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                if get(self.port, "/")[0] == 200:
                    return self
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("the tracker did not start:\n" + self.output())
            time.sleep(0.1)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return (self.workdir / "tracker.log").read_text(errors="replace")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


def track_path(pairs: list[tuple[str, str]], port: int, extra: str = "") -> str:
    """A ``/clearskies/track`` request path registering ``(ID, peer ID)`` pairs at ``port``."""
    ids = "&".join("id=%s%%40%s" % pair for pair in pairs)
    return "/clearskies/track?%s&tcp_port=%d%s" % (ids, port, extra)


def fake_peer(i: int) -> str:
    """The ``i``-th made-up peer ID of an attack."""
    return "%032x" % (0xFA4E0000 + i)


def crowd(port: int, count: int = 64) -> list[str]:
    """``count`` IDs with 256 listed peers each (32 addresses in 8 /24s, 8 peers each)."""
    ids = ["%064x" % (0xABC000 + i) for i in range(count)]
    for h in range(32):
        host = "127.%d.%d.1" % (50 + h // 4, h % 4)
        for chunk in range(8):
            pairs = [(share, "%032x" % (h * 1000 + chunk * 100 + j))
                     for share in ids[chunk * 8:(chunk + 1) * 8] for j in range(8)]
            code, _ = get(port, track_path(pairs, 1), source=host)
            if code != 200:
                raise AssertionError("the tracker refused a crowd registration: %d" % code)
    return ids


def stuck_readers(port: int, path: str, count: int = 400) -> list[socket.socket]:
    """``count`` connections from their own addresses that ask ``path`` three times and never
    read the answers; the caller closes them."""
    request = b"GET %s HTTP/1.1\r\nHost: t\r\n\r\n" % path.encode()
    stuck = []
    for i in range(count):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.bind(("127.77.%d.%d" % (i // 200, i % 200 + 1), 0))
        s.connect(("127.0.0.1", port))
        s.sendall(request * 3)
        stuck.append(s)
    return stuck
