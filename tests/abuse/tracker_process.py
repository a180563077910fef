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
