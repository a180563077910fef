"""Benchmark: the daemons' memory against the size of the tree.

    .venv/bin/python bench/memory.py                       # N = 10,000 and 100,000
    .venv/bin/python bench/memory.py --counts 10000 --tracemalloc /tmp/tm
    .venv/bin/python bench/memory.py --counts 1000000      # only if disk and time allow
    .venv/bin/python bench/memory.py --counts 1000000 --scan-only   # Alice's scan alone

For each N: a fresh pair of daemons (``twistd -n clearskies``, the harness of
``tests/daemons.py``, on 127.0.0.1 only).  Alice holds N small files (16-200
bytes each, 1,000 per directory); once both daemons are up and quiet their
*idle* RSS is taken; then Alice shares her folder (her initial scan) and Bob
attaches an empty folder and downloads everything.  Printed per daemon:

* idle: RSS after start, before any share;
* scan peak: Alice's peak while her initial scan records the N files;
* sync peak: the peak of each daemon from ``attach`` until Bob has all N
  files and nothing left to download;
* VmHWM: the kernel's own high-water mark of the daemon process (a peak
  the 50 ms sampling cannot miss), and the disk helper's peak own memory
  (USS, sampled; it shares the daemon's interpreter pages).

``--tracemalloc DIR`` turns tracemalloc on in both daemons (from two seconds
after they start: what is allocated later; much slower)
and writes, every time a daemon's traced Python memory reaches a new high
by 4 MB, the largest allocation sites of that moment to ``DIR/<daemon>-<N>.txt``: where
the memory of the peak is held.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.daemons import REPO_ROOT, DaemonProcess  # noqa: E402

MiB = 1024 * 1024
POLL = 0.05
FILES_PER_DIRECTORY = 1000
#: Disk per file and side (a 4 KiB block, its inode, directory entries, database row).
BYTES_PER_FILE = 6 * 1024
SPARE_BYTES = 4 * 1024 ** 3
TIMEOUT_PER_FILE = 0.02  # seconds; at least 10 minutes per phase
#: Reckoned files per second for a whole run (create, scan, sync) on this machine: a
#: count whose run would take more than --max-minutes is skipped with a message.
FILES_PER_SECOND = 600
SCAN_FILES_PER_SECOND = 4000  # creating the files and scanning them, with --scan-only

#: Loaded into each daemon by ``--tracemalloc`` (a sitecustomize module): a thread that
#: writes the top allocation sites whenever the RSS reaches a new high.
_TRACE_HOOK = textwrap.dedent('''\
    import os, threading, time, tracemalloc

    def _watch(out, step=4 * 1024 * 1024):
        time.sleep(2.0)  # traced from start-up, the daemon starts too slowly
        tracemalloc.start(6)
        noise = [tracemalloc.Filter(False, "<frozen importlib._bootstrap*>"),
                 tracemalloc.Filter(False, tracemalloc.__file__),
                 tracemalloc.Filter(False, "*/linecache.py")]
        best = 0
        while True:
            time.sleep(0.5)
            traced = tracemalloc.get_traced_memory()[0]
            if traced < best + step:
                continue
            best = traced
            with open("/proc/self/statm") as f:
                rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            snapshot = tracemalloc.take_snapshot().filter_traces(noise)
            lines = ["=== traced %.1f MiB (rss %.1f MiB, tracing included) at %s" % (
                traced / 2**20, rss / 2**20, time.strftime("%X"))]
            for stat in snapshot.statistics("traceback")[:30]:
                lines.append("%8.1f MiB %8d blocks" % (stat.size / 2**20, stat.count))
                lines.extend("      " + line for line in stat.traceback.format()[-8:])
            with open(out, "w") as f:
                f.write("\\n".join(lines) + "\\n")

    # Taken out of the environment so that the disk helper process does not trace too.
    _out = os.environ.pop("CLEARSKIES_TRACEMALLOC_OUT", None)
    if _out:
        threading.Thread(target=_watch, args=(_out,), daemon=True).start()
''')


def _helpers_uss(proc: psutil.Process) -> int:
    total = 0
    for child in proc.children(True):
        try:
            total += child.memory_full_info().uss
        except psutil.Error:
            pass
    return total


def vm_hwm(pid: int) -> int:
    """The kernel's peak resident set of a process, in bytes."""
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


class Sampler:
    """RSS of each daemon and its helpers' USS every 50 ms; peaks since the last reset."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self._lock = threading.Lock()
        self.peak = {name: 0 for name in pids}
        self.helper_peak = {name: 0 for name in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(POLL):
            self.sample()

    def sample(self) -> dict[str, int]:
        now = {}
        for name, proc in self.procs.items():
            try:
                rss = proc.memory_info().rss
                helpers = _helpers_uss(proc)
            except psutil.Error:
                continue
            now[name] = rss
            with self._lock:
                self.peak[name] = max(self.peak[name], rss)
                self.helper_peak[name] = max(self.helper_peak[name], helpers)
        return now

    def reset(self) -> None:
        with self._lock:
            self.peak = {name: 0 for name in self.procs}

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def wait_for(predicate, what: str, timeout: float, interval: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("%s: not done after %g s" % (what, timeout))
        time.sleep(interval)


def make_files(root: Path, count: int) -> None:
    """``count`` files of 16-200 bytes, 1,000 per directory, every one different."""
    for n in range(count):
        if n % FILES_PER_DIRECTORY == 0:
            directory = root / ("d%04d" % (n // FILES_PER_DIRECTORY))
            directory.mkdir()
        data = b"%08d" % n * (2 + n % 24)
        with open(directory / ("f%06d" % n), "wb") as f:
            f.write(data)


def count_files(root: Path) -> int:
    return sum(len([n for n in files if n != ".clearskies" and not n.endswith(".!clearsky")])
               for _, _, files in os.walk(root))


def status(daemon: DaemonProcess, path: Path) -> dict:
    return daemon.control_request({"type": ".clearskies.share_status",
                                   "path": os.path.realpath(path)}, timeout=60)


def run(count: int, run_dir: Path, trace_dir: Path | None,
        scan_only: bool = False) -> dict[str, float]:
    """One pair of daemons syncing ``count`` files; the figures in MiB (and seconds)."""
    base = run_dir / ("n%d" % count)
    alice, bob = DaemonProcess(base, "alice"), DaemonProcess(base, "bob")
    a, b = Path(alice.shares), Path(bob.shares)
    if trace_dir is not None:
        hook = base / "hook"
        hook.mkdir()
        (hook / "sitecustomize.py").write_text(_TRACE_HOOK)
        for daemon in (alice, bob):
            daemon.env["PYTHONPATH"] = os.pathsep.join([str(hook), daemon.env["PYTHONPATH"]])
            daemon.env["CLEARSKIES_TRACEMALLOC_OUT"] = str(
                trace_dir / ("%s-%d.txt" % (daemon.name, count)))
    print("n=%d: creating the files ..." % count, file=sys.stderr)
    t0 = time.monotonic()
    make_files(a, count)
    print("  %.1f s" % (time.monotonic() - t0), file=sys.stderr)
    timeout = max(600.0, count * TIMEOUT_PER_FILE)
    out: dict[str, float] = {}
    sampler = None
    try:
        alice.start()
        bob.start()
        sampler = Sampler({"alice": alice.pid, "bob": bob.pid})
        time.sleep(3.0)
        idle = sampler.sample()
        out["idle_alice"], out["idle_bob"] = idle["alice"] / MiB, idle["bob"] / MiB

        sampler.reset()
        t0 = time.monotonic()
        code = alice.cli_json("share", str(a))["access_code"]
        wait_for(lambda: (lambda s: s.get("status") == "idle" and s.get("files") == count)(
            status(alice, a)), "alice's scan", timeout)
        out["scan_s"] = time.monotonic() - t0
        sampler.sample()
        out["scan_alice"] = sampler.peak["alice"] / MiB
        print("  scan %.1f s, alice peak %.0f MiB" % (out["scan_s"], out["scan_alice"]),
              file=sys.stderr)

        if scan_only:
            out["hwm_alice"] = vm_hwm(alice.pid) / MiB
            return out
        sampler.reset()
        t0 = time.monotonic()
        bob.cli("attach", code, str(b), "--peer", alice.address)

        def synced() -> bool:
            try:
                s = status(bob, b)
            except Exception:
                return False
            return s.get("files") == count and not s.get("items_to_download")
        wait_for(synced, "bob's download", timeout)
        out["sync_s"] = time.monotonic() - t0
        sampler.sample()
        out["sync_alice"] = sampler.peak["alice"] / MiB
        out["sync_bob"] = sampler.peak["bob"] / MiB
        out["hwm_alice"] = vm_hwm(alice.pid) / MiB
        out["hwm_bob"] = vm_hwm(bob.pid) / MiB
        out["helper_alice"] = sampler.helper_peak["alice"] / MiB
        out["helper_bob"] = sampler.helper_peak["bob"] / MiB
        time.sleep(3.0)
        after = sampler.sample()
        out["after_alice"], out["after_bob"] = after["alice"] / MiB, after["bob"] / MiB
        got = count_files(b)
        if got != count:
            raise AssertionError("bob holds %d files, not %d" % (got, count))
        print("  sync %.1f s, peaks alice %.0f bob %.0f MiB" % (
            out["sync_s"], out["sync_alice"], out["sync_bob"]), file=sys.stderr)
    finally:
        if sampler is not None:
            sampler.close()
        for daemon in (alice, bob):
            daemon.cleanup()
    return out


def print_table(results: dict[int, dict[str, float]], skipped: list[str]) -> None:
    print("| files | idle alice / bob | alice scan peak | sync peak alice / bob | VmHWM alice / bob"
          " | helper peak alice / bob | after sync alice / bob | scan s | sync s |")
    print("|" + "---|" * 9)
    for count, r in results.items():
        if "sync_s" not in r:
            print("| {:,} | {:.0f} / {:.0f} | {:.0f} | (scan only) | {:.0f} / – | | | {:.1f} | |".format(
                count, r["idle_alice"], r["idle_bob"], r["scan_alice"], r["hwm_alice"],
                r["scan_s"]))
            continue
        print("| {:,} | {:.0f} / {:.0f} | {:.0f} | {:.0f} / {:.0f} | {:.0f} / {:.0f} "
              "| {:.0f} / {:.0f} | {:.0f} / {:.0f} | {:.1f} | {:.1f} |".format(
                  count, r["idle_alice"], r["idle_bob"], r["scan_alice"], r["sync_alice"],
                  r["sync_bob"], r["hwm_alice"], r["hwm_bob"], r["helper_alice"],
                  r["helper_bob"], r["after_alice"], r["after_bob"], r["scan_s"], r["sync_s"]))
    print("(MiB; peaks above idle: %s)" % "; ".join(
        "{:,}: alice +{:.0f}, bob +{:.0f}".format(
            count, max(r["scan_alice"], r["sync_alice"], r["hwm_alice"]) - r["idle_alice"],
            max(r["sync_bob"], r["hwm_bob"]) - r["idle_bob"])
        for count, r in results.items() if "sync_s" in r))
    for line in skipped:
        print(line)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--counts", default="10000,100000",
                        help="comma-separated file counts (1000000 only if disk and time allow)")
    parser.add_argument("--data", default="/work/bench-data/memory",
                        help="where each run gets a fresh directory (removed afterwards)")
    parser.add_argument("--max-minutes", type=float, default=30.0,
                        help="skip a count whose run is reckoned to take longer")
    parser.add_argument("--tracemalloc", metavar="DIR",
                        help="run the daemons under tracemalloc; top allocation sites to DIR")
    parser.add_argument("--keep", action="store_true", help="keep the data afterwards")
    parser.add_argument("--scan-only", action="store_true",
                        help="stop after Alice's initial scan (no second daemon syncing)")
    args = parser.parse_args()
    counts = [int(c.replace("_", "")) for c in args.counts.split(",") if c.strip()]
    # A plain kill still stops the daemons and removes the data (the finally clauses).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit("stopped by signal %d" % signum))
    run_dir = Path(args.data) / time.strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True)
    trace_dir = Path(args.tracemalloc) if args.tracemalloc else None
    if trace_dir is not None:
        trace_dir.mkdir(parents=True, exist_ok=True)
    print("data in %s; daemon code from %s" % (run_dir, REPO_ROOT), file=sys.stderr)
    results: dict[int, dict[str, float]] = {}
    skipped: list[str] = []
    try:
        for count in counts:
            need = (1 if args.scan_only else 2) * count * BYTES_PER_FILE + SPARE_BYTES
            free = shutil.disk_usage(run_dir).free
            minutes = count / (SCAN_FILES_PER_SECOND if args.scan_only else FILES_PER_SECOND) / 60
            if free < need:
                skipped.append("{:,} files skipped: {:.1f} GB free, {:.1f} GB needed".format(
                    count, free / 1e9, need / 1e9))
            elif minutes > args.max_minutes:
                skipped.append("{:,} files skipped: reckoned {:.0f} min, more than "
                               "--max-minutes {:g}".format(count, minutes, args.max_minutes))
            else:
                results[count] = run(count, run_dir, trace_dir, args.scan_only)
                continue
            print(skipped[-1], file=sys.stderr)
    finally:
        if not args.keep:
            shutil.rmtree(run_dir, ignore_errors=True)
    print("%s, load average at the end %.1f (2 CPUs)"
          % (time.strftime("%Y-%m-%d %H:%M"), os.getloadavg()[0]))
    print_table(results, skipped)
    return 0


if __name__ == "__main__":
    sys.exit(main())
