"""A real ``twistd -n clearskies-tracker`` process for the abuse tests and benchmarks.

The tracker runs with a file descriptor limit of 1,024 (what most systems
give a service), so a flood of connections meets the limit it would meet in
the wild.  Everything stays on loopback.
"""

from __future__ import annotations

import http.client
import socket
from pathlib import Path

from tests.daemons import TrackerProcess

FD_LIMIT = 1024
"""Open files a tracker run as a service usually gets."""


def start_tracker(workdir: Path, ttl: int = 300) -> TrackerProcess:
    """A started tracker limited to FD_LIMIT open files, entries living ``ttl`` seconds."""
    return TrackerProcess(workdir, ttl=ttl, fd_limit=FD_LIMIT).start()


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
