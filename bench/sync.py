"""Benchmark: two real daemons syncing on loopback (issue 4).

    .venv/bin/python bench/sync.py [--only W1,W3] [--scale 0.25] [--data /work/bench-data/sync]
    .venv/bin/python bench/sync.py --vs syncthing [--rounds 2] [--scan-now] [--scale 0.05]

Workloads (at ``--scale 1``):

* W1  one 1 GiB file: the sender's initial scan, then the transfer from
      ``attach`` until both trees are identical;
* W2  10,000 files of 1-64 KiB (~330 MB) in a 3-level tree (10 x 10
      directories of 100 files): scan, then transfer;
* W3  1 MiB overwritten in the middle of the W1 file, noticed by the
      sender's watcher, until the receiver holds the new content;
* W4  a directory of 1,000 files (one top directory of W2) renamed;
      the receiver must rename, not download: its inodes are checked;
* W5  1,000 files (another top directory of W2) deleted;
* W6  about 200 MB of generated text (source-like files and logs): scan,
      then transfer; run twice, with the ``gzip`` extension and without it
      (``CLEARSKIES_NO_COMPRESSION=1``), to print the wire bytes of each.

W3 runs on the W1 pair, W4 and W5 on the W2 pair.

``--link QDISC`` runs our daemons in a network namespace of the
benchmark's own whose loopback (MTU 1500) has that tc root qdisc (a
token bucket: a slow link; needs root); ``--upload-limit`` sets the
sender's ``upload_limit``.

``--vs syncthing`` runs every selected workload on our daemons and then on
two Syncthing devices (Debian's package, installed with apt-get when
missing, configured by ``bench/syncthing.py`` for loopback only), ``--rounds``
times, and prints one table per round with each phase's wall time, CPU
seconds, wire bytes and the ratio of our time to Syncthing's.  ``--vs
plain`` does the same against our daemons without ``gzip``.  Wire bytes are
the kernel's byte counts of the TCP connections between the two (``ss``),
so they include TLS.  Each pair of daemons
(``twistd -n clearskies``, the same command line as the end-to-end tests)
lives under a fresh ``<data>/<run-id>/`` and is left there: this
machine's disk is slow to create many files right after many were deleted
(see /work/shared/notes/machine.md), so nothing is deleted and recreated
between runs.  Remove old runs by hand when the disk fills.

For each phase: wall time, CPU seconds (user + system, all threads) of
each daemon with its child processes from psutil (its disk helper
process, which writes small downloads), and each daemon's peak
memory sampled every 50 ms: its RSS plus its children's own memory (USS;
a child's RSS would count the shared interpreter and libraries twice).
A phase ends when the receiver's files have the sender's sizes and
mtimes (checked cheaply while polling); the contents are compared by
SHA-256 after the clock stops.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tests.daemons import REPO_ROOT, DaemonProcess, tree_snapshot  # noqa: E402

MiB = 1024 * 1024
GiB = 1024 * MiB
MARKER = ".clearskies"
TEMP_SUFFIX = ".!clearsky"
VERSIONS = ".clearskies-versions"
TIMEOUT = 900.0
POLL = 0.05
#: Disk a full-size run leaves behind (two copies of 1 GiB and of 330 MB, W3's
#: rewritten file, logs), and what must stay free besides.
FULL_RUN_BYTES = 3 * 1024 ** 3
SPARE_BYTES = 2 * 1024 ** 3

# Targets from issue 4 (the best existing peer, measured on this kind of machine).
TARGETS = {
    "W1 scan": "1.7 s", "W1 transfer": ">= 260 MB/s", "W2 scan": "1.2 s",
    "W2 transfer": "<= 10 s", "W3 change": "5.5 s", "W4 rename": "<= 2 s, no re-send",
    "W5 delete": "<= 2 s",
}


# -- measuring -------------------------------------------------------------------------


def _uss(proc: psutil.Process) -> int:
    """A child process's own memory: what it adds to the daemon's RSS.

    (Its RSS would count again the interpreter and libraries that the
    daemon's RSS already holds.)
    """
    try:
        return proc.memory_full_info().uss
    except psutil.Error:
        return 0  # ended meanwhile


def _cpu(proc: psutil.Process) -> float:
    try:
        times = proc.cpu_times()
    except psutil.Error:
        return 0.0  # ended meanwhile: its time is in the parent's children_* once reaped
    return times.user + times.system


class Sampler:
    """Samples the memory of some processes in a background thread: each one's RSS
    plus its child processes' own memory (USS); keeps the peak per phase."""

    def __init__(self, pids: dict[str, int], interval: float = POLL) -> None:
        self.procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.peak = {name: 0 for name in pids}
        self.overall = {name: 0 for name in pids}
        self._interval = interval
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.sample()

    def sample(self) -> None:
        for name, proc in self.procs.items():
            try:
                rss = proc.memory_info().rss + sum(_uss(child) for child in proc.children(True))
            except psutil.Error:
                continue
            with self._lock:
                self.peak[name] = max(self.peak[name], rss)
                self.overall[name] = max(self.overall[name], rss)

    def reset(self) -> None:
        with self._lock:
            self.peak = {name: 0 for name in self.procs}

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far of each daemon with its child processes (live or ended)."""
        out = {}
        for name, proc in self.procs.items():
            times = proc.cpu_times()
            out[name] = (times.user + times.system + times.children_user
                         + times.children_system
                         + sum(_cpu(child) for child in proc.children(True)))
        return out

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Row:
    name: str
    wall: float
    cpu: dict[str, float]
    rss: dict[str, int]
    size: int = 0
    note: str = ""
    extra: dict[str, float] = field(default_factory=dict)


class Phase:
    """Wall clock, CPU and peak RSS of both daemons between start() and stop()."""

    profile_dir: Path | None = None
    profile_options: list[str] = []
    profile_rate = 200

    def __init__(self, sampler: Sampler, name: str,
                 wire: Callable[[], dict[tuple[str, str], int]] | None = None) -> None:
        self.sampler = sampler
        self.name = name
        self.profilers: list[subprocess.Popen[bytes]] = []
        self.wire = wire
        self.wire_bytes: int | None = None

    def __enter__(self) -> Phase:
        if self.profile_dir is not None:
            for who, proc in self.sampler.procs.items():
                out = self.profile_dir / ("%s-%s.txt" % (self.name.replace(" ", "-"), who))
                self.profilers.append(subprocess.Popen(
                    [str(Path(sys.executable).parent / "py-spy"), "record", "--nonblocking",
                     "-r", str(self.profile_rate), "-f", "raw", *self.profile_options, "-p", str(proc.pid), "-o", str(out)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            time.sleep(0.5)
        self.sampler.sample()
        self.sampler.reset()
        self.wire0 = self.wire() if self.wire is not None else {}
        self.cpu0 = self.sampler.cpu()
        self.t0 = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.monotonic() - self.t0
        cpu1 = self.sampler.cpu()
        self.sampler.sample()
        self.cpu = {k: cpu1[k] - self.cpu0[k] for k in cpu1}
        self.rss = dict(self.sampler.peak)
        if self.wire is not None:
            after = self.wire()
            self.wire_bytes = sum(n - self.wire0.get(key, 0) for key, n in after.items())
        for profiler in self.profilers:
            profiler.send_signal(signal.SIGINT)
        for profiler in self.profilers:
            profiler.wait()

    def row(self, size: int = 0, note: str = "") -> Row:
        extra = {} if self.wire_bytes is None else {"wire_bytes": float(self.wire_bytes)}
        return Row(self.name, self.wall, self.cpu, self.rss, size, note, extra)


NETNS_PREFIX: list[str] = []
"""With ``--link``: ``ip netns exec NAME``, which runs the daemons (and ``ss``) in the
benchmark's own network namespace, whose loopback is shaped by a tc qdisc."""


def make_link(spec: str) -> str:
    """A fresh network namespace whose loopback has an Ethernet MTU and the root qdisc
    ``spec`` (e.g. ``tbf rate 100mbit burst 64kb latency 100ms``); its name.
    Needs root; removed at exit."""
    import atexit
    name = "csbench%d" % os.getpid()
    subprocess.run(["ip", "netns", "add", name], check=True)
    atexit.register(subprocess.run, ["ip", "netns", "delete", name], check=False)
    inside = ["ip", "netns", "exec", name]
    subprocess.run([*inside, "ip", "link", "set", "lo", "mtu", "1500", "up"], check=True)
    subprocess.run([*inside, "tc", "qdisc", "add", "dev", "lo", "root", *spec.split()],
                   check=True)
    NETNS_PREFIX[:] = inside
    return name


def in_netns(daemon: DaemonProcess) -> None:
    """Run ``daemon`` inside the ``--link`` namespace, if there is one (``ip netns exec``
    execs the daemon: the process id stays the daemon's)."""
    if NETNS_PREFIX:
        argv = daemon.daemon_argv
        daemon.daemon_argv = lambda: [*NETNS_PREFIX, *argv()]  # type: ignore[method-assign]


def wire_counters(ports: set[int]) -> dict[tuple[str, str], int]:
    """Bytes each established TCP connection on 127.0.0.1 carried so far, both ways
    (the kernel's counts from ``ss``: TLS records and TCP payload, no headers), for
    the connections with one of the listening ``ports`` at either end.  Both ends of
    a loopback connection are listed; each connection is counted once (Syncthing
    dials from its listening port, so both ends may be listening ports)."""
    out = subprocess.run([*NETNS_PREFIX, "ss", "-tinH", "state", "established"], capture_output=True,
                         text=True, check=True).stdout
    counters: dict[tuple[str, str], int] = {}
    key: tuple[str, str] | None = None
    for line in out.splitlines():
        if not line.startswith((" ", "\t")):
            fields = line.split()
            local, peer = fields[2], fields[3]
            ends = {int(local.rsplit(":", 1)[1]), int(peer.rsplit(":", 1)[1])}
            key = (min(local, peer), max(local, peer)) if ends & ports else None
            continue
        if key is None:
            continue
        total = 0
        for item in line.split():
            if item.startswith(("bytes_sent:", "bytes_received:")):
                total += int(item.split(":", 1)[1])
        counters[key] = max(total, counters.get(key, 0))
    return counters


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = TIMEOUT,
             interval: float = POLL) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("%s: not done after %g s" % (what, timeout))
        time.sleep(interval)


def stat_tree(root: Path) -> dict[str, tuple[int, int]]:
    """path -> (size, mtime_ns) of every regular file, leaving out our own files."""
    out = {}
    for base, dirs, files in os.walk(root):
        if base == str(root):
            dirs[:] = [d for d in dirs if d != VERSIONS]
        for name in files:
            if name == MARKER or name.endswith(TEMP_SUFFIX):
                continue
            full = os.path.join(base, name)
            try:
                st = os.lstat(full)
            except FileNotFoundError:
                continue  # deleted (by the sync) between the listing and now
            out[os.path.relpath(full, root)] = (st.st_size, st.st_mtime_ns)
    return out


def same_trees(a: Path, b: Path) -> bool:
    """Both trees hold the same content; False while one is still changing under the walk."""
    try:
        return tree_snapshot(a) == tree_snapshot(b)
    except FileNotFoundError:
        return False  # a folder removed by the sync while it was being listed


def inodes(root: Path) -> dict[str, int]:
    return {os.path.relpath(os.path.join(b, n), root): os.lstat(os.path.join(b, n)).st_ino
            for b, _, files in os.walk(root) for n in files}


# -- data ------------------------------------------------------------------------------


def make_big(path: Path, size: int) -> None:
    block = bytearray(os.urandom(MiB))
    with open(path, "wb") as f:
        for n in range(size // MiB):
            block[:8] = n.to_bytes(8, "little")  # every block different
            f.write(block)


def make_small(root: Path, count: int) -> int:
    """``count`` files of 1-64 KiB in 10 x 10 directories; returns the total size."""
    rng = random.Random(42)
    pool = os.urandom(64 * 1024 + 4096)
    per_leaf = max(1, count // 100)
    total = 0
    for top in range(10):
        for mid in range(10):
            leaf = root / ("d%02d" % top) / ("e%02d" % mid)
            leaf.mkdir(parents=True)
            for n in range(per_leaf):
                size = rng.randint(1024, 64 * 1024)
                start = rng.randint(0, 4096)
                data = bytearray(pool[start:start + size])
                data[:16] = b"%02d%02d%06d......" % (top, mid, n)  # every file different
                (leaf / ("f%05d.dat" % n)).write_bytes(data)
                total += size
    return total


# -- driving daemons ------------------------------------------------------------------------


class Pair:
    """Alice (the sender, holding the data) and Bob (attaching an empty directory).

    With ``compress`` both daemons run with ``--compress gzip`` and offer the ``gzip``
    extension; without, they offer none (the daemon's default).
    """

    kind = "clearskies"
    ignore: tuple[str, ...] = ()

    def __init__(self, run_dir: Path, label: str, compress: bool = False) -> None:
        self.alice = DaemonProcess(run_dir / label, "alice")
        self.bob = DaemonProcess(run_dir / label, "bob")
        if compress:
            self.kind = "clearskies with gzip"
            for daemon in (self.alice, self.bob):
                daemon.extra += ["--compress", "gzip"]
        in_netns(self.alice)
        in_netns(self.bob)
        self.a = Path(self.alice.shares)
        self.b = Path(self.bob.shares)
        self.sampler: Sampler | None = None

    def start(self) -> None:
        self.alice.start()
        self.bob.start()
        if self.upload_limit:
            self.alice.cli("config", "set", "upload_limit", str(self.upload_limit))
        self.sampler = Sampler({"alice": self.alice.pid, "bob": self.bob.pid})

    def phase(self, name: str) -> Phase:
        assert self.sampler is not None
        return Phase(self.sampler, name, self.wire)

    def wire(self) -> dict[tuple[str, str], int]:
        return wire_counters({self.alice.port, self.bob.port})

    scan_now = False
    """Set by ``--scan-now``: after a change, ask for a scan over the control socket
    (``.clearskies.scan``, as Syncthing is asked over REST) instead of waiting for
    the watcher's quiet period."""
    upload_limit = 0
    """Set by ``--upload-limit``: the sender's ``upload_limit`` in bytes/s (0: none)."""
    versions = ""
    """Set by ``--versions``: the receiver's ``versions`` mode, set once a transfer is
    measured (W3-W5 then keep, or do not keep, what they replace and delete)."""

    def changed(self, *paths: str) -> None:
        """Files under these share-relative paths changed (our watcher notices by itself)."""
        if self.scan_now:
            self.alice.control_request({"type": ".clearskies.scan",
                                        "path": os.path.realpath(self.a)}, timeout=120)

    def stop(self) -> None:
        if self.sampler is not None:
            self.sampler.close()
        for d in (self.alice, self.bob):
            d.cleanup()

    def status(self, daemon: DaemonProcess, path: Path) -> dict:
        return daemon.control_request({"type": ".clearskies.share_status",
                                       "path": os.path.realpath(path)})

    def scan(self, name: str, files: int, size: int) -> tuple[Row, str]:
        """Share Alice's tree; measure until her initial scan has recorded every file."""
        assert self.sampler is not None
        with self.phase(name) as phase:
            code = self.alice.cli_json("share", str(self.a))["access_code"]

            def scanned() -> bool:
                s = self.status(self.alice, self.a)
                return s.get("status") == "idle" and s.get("files") == files
            wait_for(scanned, name)
        return phase.row(size), code

    def transfer(self, name: str, code: str, files: int, size: int) -> Row:
        """Attach Bob; measure until his tree has Alice's files (sizes and mtimes)."""
        assert self.sampler is not None
        expected = stat_tree(self.a)
        with self.phase(name) as phase:
            self.bob.cli("attach", code, str(self.b), "--peer", self.alice.address)

            def done() -> bool:
                try:
                    s = self.status(self.bob, self.b)
                except Exception:
                    return False
                if s.get("files") != files or s.get("items_to_download"):
                    return False
                return stat_tree(self.b) == expected
            wait_for(done, name)
        self.verify()
        if self.versions:
            self.bob.cli("config", "set", "versions", self.versions, "--share", str(self.b))
        return phase.row(size)

    def verify(self) -> None:
        """Both trees hold the same content (SHA-256 of every file), after the clock stopped."""
        wait_for(lambda: same_trees(self.a, self.b), "trees identical", timeout=60, interval=0.5)

    def settle(self) -> None:
        """Let both daemons go idle (and the watcher quiet) before a change is timed."""
        def idle() -> bool:
            sa, sb = self.status(self.alice, self.a), self.status(self.bob, self.b)
            return all(s.get("status") == "idle" and not s.get("items_to_download")
                       for s in (sa, sb))
        try:
            wait_for(idle, "idle", timeout=120, interval=0.2)
        except TimeoutError:
            for d, root in ((self.alice, self.a), (self.bob, self.b)):
                print(json.dumps(self.status(d, root)), file=sys.stderr)
            raise
        time.sleep(2.0 + QUIET)


class SyncthingPair:
    """The same roles played by two Syncthing devices (``bench/syncthing.py``).

    Both start with the folder paused and already connected to each other.
    Alice's scan phase runs from unpausing her folder until her index holds
    every file; Bob's transfer from unpausing his folder until his tree has
    Alice's files.  After a change the benchmark asks Alice for a scan of the
    changed paths over the REST API (inside the timed phase), since her
    watcher and periodic scans are off.
    """

    kind = "syncthing"

    def __init__(self, run_dir: Path, label: str) -> None:
        from syncthing import SyncthingProcess  # (bench/syncthing.py)
        base = run_dir / label
        self.a = base / "alice" / "shares"
        self.b = base / "bob" / "shares"
        self.a.mkdir(parents=True)
        self.b.mkdir(parents=True)
        self.alice = SyncthingProcess(base, "alice", self.a)
        self.bob = SyncthingProcess(base, "bob", self.b)
        self.sampler: Sampler | None = None

    def start(self) -> None:
        self.alice.configure(self.bob, paused=True)
        self.bob.configure(self.alice, paused=True)
        self.alice.start()
        self.bob.start()
        wait_for(lambda: self.alice.connected(self.bob), "syncthing devices connected", 60)
        self.sampler = Sampler({"alice": self.alice.pid, "bob": self.bob.pid})

    def stop(self) -> None:
        if self.sampler is not None:
            self.sampler.close()
        for d in (self.alice, self.bob):
            d.stop()

    def phase(self, name: str) -> Phase:
        assert self.sampler is not None
        return Phase(self.sampler, name, self.wire)

    def wire(self) -> dict[tuple[str, str], int]:
        return wire_counters({self.alice.port, self.bob.port})

    def changed(self, *paths: str) -> None:
        self.alice.scan(*paths)

    def scan(self, name: str, files: int, size: int) -> tuple[Row, str]:
        with self.phase(name) as phase:
            self.alice.set_paused(False)

            def scanned() -> bool:
                s = self.alice.status()
                return s.get("state") == "idle" and s.get("localFiles") == files
            wait_for(scanned, name)
        return phase.row(size), ""

    def transfer(self, name: str, code: str, files: int, size: int) -> Row:
        expected = stat_tree(self.a)
        with self.phase(name) as phase:
            self.bob.set_paused(False)
            wait_for(lambda: stat_tree(self.b) == expected, name)
        self.verify()
        return phase.row(size)

    def verify(self) -> None:
        wait_for(lambda: same_trees(self.a, self.b), "trees identical", timeout=60, interval=0.5)

    def settle(self) -> None:
        def idle() -> bool:
            return all(d.status().get("state") == "idle" and not d.status().get("needTotalItems")
                       for d in (self.alice, self.bob))
        wait_for(idle, "idle", timeout=120, interval=0.2)
        time.sleep(2.0 + QUIET)


QUIET = 0.0
"""Set by ``--quiet``: seconds more that both arms wait, idle, before a change (W3-W5)."""


# -- workloads -------------------------------------------------------------------------------


def run_big(run_dir: Path, scale: float, only: set[str], make_pair: Callable[..., Any] = Pair,
            label: str = "big") -> list[Row]:
    size = max(MiB, int(GiB * scale) // MiB * MiB)
    pair = make_pair(run_dir, label)
    print("creating %d MiB file ..." % (size // MiB), file=sys.stderr)
    make_big(pair.a / "big.bin", size)
    rows: list[Row] = Rows()
    try:
        pair.start()
        scan, code = pair.scan("W1 scan", 1, size)
        rows.append(scan)
        rows.append(pair.transfer("W1 transfer", code, 1, size))
        if "W3" in only:
            pair.settle()
            assert pair.sampler is not None
            change = os.urandom(MiB)
            before = pair.status(pair.bob, pair.b) if pair.kind.startswith("clearskies") else {}
            with pair.phase("W3 change") as phase:
                with open(pair.a / "big.bin", "r+b") as f:
                    f.seek(size // 2 - MiB // 2)
                    f.write(change)
                mtime = os.stat(pair.a / "big.bin").st_mtime_ns
                pair.changed("big.bin")

                def arrived() -> bool:
                    try:
                        return os.stat(pair.b / "big.bin").st_mtime_ns == mtime
                    except FileNotFoundError:
                        return False
                wait_for(arrived, "W3")
            pair.verify()
            if pair.kind.startswith("clearskies"):
                after = pair.status(pair.bob, pair.b)
                # Payload bytes both ways (content or delta in, rsync signature out).
                moved = {k: after.get(k, 0) - before.get(k, 0)
                         for k in ("bytes_received", "bytes_sent")}
                note = "payload %.2f MB in + %.2f MB out (file %.0f MB)" % (
                    moved["bytes_received"] / 1e6, moved["bytes_sent"] / 1e6, size / 1e6)
            else:
                note = ""
            rows.append(phase.row(MiB, note))
    finally:
        pair.stop()
    return rows


def run_small(run_dir: Path, scale: float, only: set[str], make_pair: Callable[..., Any] = Pair,
              label: str = "small") -> list[Row]:
    count = max(100, int(10_000 * scale) // 100 * 100)
    pair = make_pair(run_dir, label)
    print("creating %d small files ..." % count, file=sys.stderr)
    size = make_small(pair.a, count)
    rows: list[Row] = Rows()
    try:
        pair.start()
        assert pair.sampler is not None
        scan, code = pair.scan("W2 scan", count, size)
        rows.append(scan)
        rows.append(pair.transfer("W2 transfer", code, count, size))
        if "W4" in only:
            pair.settle()
            before = inodes(pair.b / "d00")
            moved = len(before)
            with pair.phase("W4 rename") as phase:
                os.rename(pair.a / "d00", pair.a / "d00-renamed")
                pair.changed("d00", "d00-renamed")
                expected = stat_tree(pair.a / "d00-renamed")

                def renamed() -> bool:
                    return stat_tree(pair.b / "d00-renamed") == expected and \
                        not stat_tree(pair.b / "d00")
                wait_for(renamed, "W4")
            pair.verify()
            after = inodes(pair.b / "d00-renamed")
            kept = sum(1 for p, ino in before.items() if after.get(p) == ino)
            rows.append(phase.row(0, "%d files, %d renamed in place, %d re-sent"
                                  % (moved, kept, moved - kept)))
        if "W5" in only:
            pair.settle()
            victims = sorted((pair.a / "d01").rglob("*.dat"))
            with pair.phase("W5 delete") as phase:
                for path in victims:
                    os.unlink(path)
                pair.changed("d01")
                wait_for(lambda: not stat_tree(pair.b / "d01"), "W5")
            pair.verify()
            rows.append(phase.row(0, "%d files" % len(victims)))
    finally:
        pair.stop()
    return rows


_WORDS = ("self", "value", "result", "count", "index", "buffer", "path", "share", "peer",
          "record", "revision", "manifest", "payload", "chunk", "limit", "offset", "request",
          "reply", "session", "connection", "reactor", "deferred", "failure", "message")
_LEVELS = ("INFO", "INFO", "INFO", "DEBUG", "WARN", "ERROR")


def _source_line(rng: random.Random) -> str:
    indent = "    " * rng.randrange(4)
    a, b, c = rng.choice(_WORDS), rng.choice(_WORDS), rng.choice(_WORDS)
    form = rng.randrange(6)
    if form == 0:
        return "%sdef %s_%s(self, %s: int = %d) -> None:" % (indent, a, b, c, rng.randrange(100))
    if form == 1:
        return "%s%s = self._%s.get(%r, %d)" % (indent, a, b, c, rng.randrange(4096))
    if form == 2:
        return "%sif %s is None or len(%s) > %d:" % (indent, a, b, rng.randrange(65536))
    if form == 3:
        return "%s# the %s of the %s, kept until %s arrives" % (indent, a, b, c)
    if form == 4:
        return '%sraise ValueError("%s %%d over the %s limit" %% (%s,))' % (indent, a, b, c)
    return "%sreturn %s.%s(%s)" % (indent, a, b, c)


def _log_line(rng: random.Random, n: int) -> str:
    return "2026-12-07T%02d:%02d:%02d.%03dZ %s %s: %s %s from 10.%d.%d.%d in %d ms (%s=%d)" % (
        n // 3600000 % 24, n // 60000 % 60, n // 1000 % 60, n % 1000, rng.choice(_LEVELS),
        rng.choice(_WORDS), rng.choice(_WORDS), rng.choice(("served", "refused", "queued")),
        rng.randrange(256), rng.randrange(256), rng.randrange(256), rng.randrange(2000),
        rng.choice(_WORDS), rng.randrange(10 ** 6))


def make_text(root: Path, total: int) -> tuple[int, int]:
    """About ``total`` bytes of generated text: three quarters source-like files of
    8-200 KB in 20 directories, a quarter log files of up to 8 MB; (files, bytes)."""
    rng = random.Random(7)
    files = size = 0
    n = 0
    while size < total * 3 // 4:
        folder = root / "src" / ("pkg%02d" % (files % 20))
        folder.mkdir(parents=True, exist_ok=True)
        text = "\n".join(_source_line(rng) for _ in range(rng.randrange(200, 5000))) + "\n"
        (folder / ("module_%05d.py" % files)).write_text(text)
        files += 1
        size += len(text)
    (root / "logs").mkdir()
    while size < total:
        lines = []
        part = 0
        while part < min(8 * MiB, total - size) and len(lines) < 200_000:
            line = _log_line(rng, n)
            n += 137
            lines.append(line)
            part += len(line) + 1
        text = "\n".join(lines) + "\n"
        (root / "logs" / ("server-%03d.log" % files)).write_text(text)
        files += 1
        size += len(text)
    return files, size


def run_text(run_dir: Path, scale: float, make_pair: Callable[..., Any] = Pair,
             label: str = "text") -> list[Row]:
    """W6: a text-heavy tree (source code and logs), scan and transfer, wire bytes counted."""
    total = max(MiB, int(200 * 1000 * 1000 * scale))
    pair = make_pair(run_dir, label)
    print("creating %d MB of text ..." % (total // 1000 ** 2), file=sys.stderr)
    files, size = make_text(pair.a, total)
    rows: list[Row] = Rows()
    try:
        pair.start()
        scan, code = pair.scan("W6 text scan", files, size)
        rows.append(scan)
        rows.append(pair.transfer("W6 text transfer", code, files, size))
    finally:
        pair.stop()
    return rows


class Rows(list):
    """The table so far, also printed to stderr as each phase ends."""

    def append(self, row: Row) -> None:
        super().append(row)
        print("  %s: %.2f s  cpu %s  rss %s %s" % (
            row.name, row.wall, {k: round(v, 2) for k, v in row.cpu.items()},
            {k: v // MiB for k, v in row.rss.items()}, row.note), file=sys.stderr)


# -- report --------------------------------------------------------------------------------


def print_table(rows: list[Row], out=sys.stdout) -> None:
    header = ("| phase | wall s | MB/s | CPU s alice | CPU s bob | peak RSS MiB alice | "
              "peak RSS MiB bob | target | note |")
    print(header, file=out)
    print("|" + "---|" * 9, file=out)
    for r in rows:
        rate = "%.0f" % (r.size / r.wall / 1e6) if r.size and r.wall else ""
        print("| %s | %.2f | %s | %.2f | %.2f | %.0f | %.0f | %s | %s |" % (
            r.name, r.wall, rate, r.cpu.get("alice", 0), r.cpu.get("bob", 0),
            r.rss.get("alice", 0) / MiB, r.rss.get("bob", 0) / MiB,
            TARGETS.get(r.name, ""), r.note), file=out)


def run_workloads(run_dir: Path, scale: float, only: set[str], make_pair: Callable[..., Any],
                  label: str) -> list[Row]:
    """Every selected workload on pairs made by ``make_pair``."""
    rows: list[Row] = []
    if only & {"W1", "W3"}:
        rows.extend(run_big(run_dir, scale, only, make_pair, "big-" + label))
    if only & {"W2", "W4", "W5"}:
        rows.extend(run_small(run_dir, scale, only, make_pair, "small-" + label))
    if "W6" in only:
        rows.extend(run_text(run_dir, scale, make_pair, "text-" + label))
    return rows


def _mb(value: float | None) -> str:
    return "" if value is None else "%.3f" % (value / 1e6)


def print_comparison(arms: list[tuple[str, list[Row]]], out=sys.stdout) -> None:
    """One row per phase: each arm's wall time, CPU (both daemons) and wire bytes, and
    the first arm's time as a ratio of each other arm's (below 1: the first is faster)."""
    names = [name for name, _ in arms]
    header = ["phase"]
    for name in names:
        header += ["%s wall s" % name, "%s CPU s" % name, "%s wire MB" % name]
    header += ["wall %s / %s" % (names[0], other) for other in names[1:]]
    print("| " + " | ".join(header) + " |", file=out)
    print("|" + "---|" * len(header), file=out)
    by_arm = [{r.name: r for r in rows} for _, rows in arms]
    for phase in [r.name for r in arms[0][1]]:
        cells = [phase]
        found = [rows.get(phase) for rows in by_arm]
        for r in found:
            if r is None:
                cells += ["", "", ""]
            else:
                cells += ["%.2f" % r.wall, "%.2f" % sum(r.cpu.values()),
                          _mb(r.extra.get("wire_bytes"))]
        first = found[0]
        for other in found[1:]:
            ratio = "%.2f" % (first.wall / other.wall) if first and other and other.wall else ""
            cells.append(ratio)
        print("| " + " | ".join(cells) + " |", file=out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="W1,W2,W3,W4,W5,W6",
                        help="comma-separated workloads (W3 implies W1, W4/W5 imply W2)")
    parser.add_argument("--vs", choices=["syncthing", "plain"],
                        help="also run every workload on Debian's syncthing (installed with "
                             "apt-get when missing), or ('plain') our daemons with gzip against "
                             "without it (the default), alternating, and print ratios")
    parser.add_argument("--scan-now", action="store_true",
                        help="after a change (W3-W5), ask our sender for a scan over the control "
                             "socket instead of waiting for its watcher (as Syncthing is asked)")
    parser.add_argument("--quiet", type=float, default=0.0, metavar="SECONDS",
                        help="before a change (W3-W5), let both arms stay idle this much longer "
                             "than the usual 2 s, as when a file is edited a while after it "
                             "synced (our daemons sign what they sent after 10 s of it)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="with --vs: how many times to alternate ours and theirs")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="fraction of the full sizes and file counts (e.g. 0.1)")
    parser.add_argument("--data", default="/work/bench-data/sync",
                        help="where each run gets a fresh directory")
    parser.add_argument("--profile", metavar="DIR",
                        help="record every phase of both daemons with py-spy (raw stacks)")
    parser.add_argument("--profile-options", default="", metavar="OPTIONS",
                        help='more py-spy options, e.g. "--gil" (only threads holding the GIL) '
                             'or "--idle" (waiting threads too)')
    parser.add_argument("--profile-rate", type=int, default=200, metavar="HZ",
                        help="py-spy samples per second (more for short phases)")
    parser.add_argument("--versions", default="", metavar="MODE",
                        help="the receiver's versions mode for W3-W5 (e.g. off: deletions "
                             "and replaced files are not kept; our daemons only)")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--upload-limit", type=int, default=0, metavar="BYTES_PER_S",
                        help="the sender's upload_limit (our daemons only)")
    parser.add_argument("--link", metavar="QDISC",
                        help="run the daemons in a network namespace of their own whose "
                             "loopback (MTU 1500) has this tc root qdisc, e.g. 'tbf rate "
                             "100mbit burst 64kb latency 100ms' (needs root; not with "
                             "--vs syncthing)")
    args = parser.parse_args()
    only = {w.strip().upper() for w in args.only.split(",") if w.strip()}
    run_dir = Path(args.data) / time.strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True)
    # Every run is kept (see the module doc): stop before a full disk stops the machine.
    arms = 2 * args.rounds if args.vs else 1
    needed = int(args.scale * FULL_RUN_BYTES) * arms + SPARE_BYTES
    free = shutil.disk_usage(run_dir).free
    if free < needed:
        run_dir.rmdir()
        sys.exit("only %.1f GB free under %s, a run needs %.1f GB: remove old runs first"
                 % (free / 1e9, args.data, needed / 1e9))
    if args.profile:
        Phase.profile_dir = Path(args.profile)
        Phase.profile_dir.mkdir(parents=True, exist_ok=True)
        Phase.profile_options = args.profile_options.split()
        Phase.profile_rate = args.profile_rate
    print("data in %s, scale %g" % (run_dir, args.scale), file=sys.stderr)
    if args.link:
        print("link: %s in namespace %s" % (args.link, make_link(args.link)),
              file=sys.stderr)
    # The daemons run the code of the checkout this script belongs to
    # (tests.daemons puts it first on their PYTHONPATH), whatever PYTHONPATH says.
    print("daemon code from %s" % REPO_ROOT, file=sys.stderr)
    Pair.scan_now = args.scan_now
    global QUIET
    QUIET = args.quiet
    Pair.upload_limit = args.upload_limit
    Pair.versions = args.versions
    if args.vs:
        return compare(run_dir, args.scale, only, args.rounds, args.json, args.vs)
    rows = run_workloads(run_dir, args.scale, only - {"W6"}, Pair, "pair")
    text_arms: list[tuple[str, list[Row]]] = []
    if "W6" in only:
        # Text with and without compression, one after the other.
        text_arms = [
            ("gzip", run_text(run_dir, args.scale,
                              lambda d, label: Pair(d, label, compress=True), "text-gzip")),
            ("plain", run_text(run_dir, args.scale,
                               lambda d, label: Pair(d, label, compress=False), "text-plain")),
        ]
        rows.extend(text_arms[0][1])
    print("scale %g, %s, load average at the end %.1f (2 CPUs)"
          % (args.scale, time.strftime("%Y-%m-%d %H:%M"), os.getloadavg()[0]))
    print_table(rows)
    if text_arms:
        print()
        print("W6 (text): with gzip against without (plain framing)")
        print()
        print_comparison(text_arms)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.__dict__ for r in rows], f, indent=1)
    return 0


def compare(run_dir: Path, scale: float, only: set[str], rounds: int,
            json_path: str | None, other: str) -> int:
    """Each workload on our daemons, then on the other arm (Syncthing, or our daemons
    without gzip), ``rounds`` times; ratios per phase from the same run."""
    if other == "syncthing":
        from syncthing import ensure_installed
        ensure_installed()
        version = subprocess.run(["syncthing", "--version"], capture_output=True,
                                 text=True).stdout.split(" (")[0]
        theirs_factory: Callable[..., Any] = SyncthingPair
        ours_factory: Callable[..., Any] = Pair
        name = "syncthing"
    else:
        version = "clearskies without gzip (the default)"
        theirs_factory = Pair
        ours_factory = lambda d, label: Pair(d, label, compress=True)  # noqa: E731
        name = "plain"
    ours: list[list[Row]] = []
    theirs: list[list[Row]] = []
    for n in range(rounds):
        print("round %d: clearskies" % (n + 1), file=sys.stderr)
        ours.append(run_workloads(run_dir, scale, only, ours_factory, "ours%d" % n))
        print("round %d: %s" % (n + 1, name), file=sys.stderr)
        theirs.append(run_workloads(run_dir, scale, only, theirs_factory, "%s%d" % (name, n)))
    print("scale %g, %s, load average at the end %.1f (2 CPUs)"
          % (scale, time.strftime("%Y-%m-%d %H:%M"), os.getloadavg()[0]))
    for n in range(rounds):
        print()
        print("Round %d: clearskies (%s) against %s"
              % (n + 1, "gzip offered" if other == "plain" else "default options", version))
        print()
        print_comparison([("clearskies", ours[n]), (name, theirs[n])])
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"clearskies": [[r.__dict__ for r in rows] for rows in ours],
                       name: [[r.__dict__ for r in rows] for rows in theirs]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
