"""Benchmark: initial scan and unchanged rescan, next to sha256sum on the same data.

    .venv/bin/python bench/scan.py [--data /work/bench-data/scan]

Workloads: (a) one 1 GiB file; (b) 10,000 files of 1-64 KiB in 100
directories (~330 MB).  The data is created once under --data and reused by
later runs (this machine's disk slows down badly when a big tree is deleted
and another created right after, see /work/shared/notes/machine.md); every
run uses a fresh state database.  Everything is read once before timing, so
sha256sum and the scanner both read from the page cache.

Prints one table: wall time, CPU time (all threads), files/s and MB/s.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import subprocess
import sys
import tempfile
import time

from twisted.internet import task
from twisted.internet.defer import Deferred

from clearskies.share.database import ShareInfo, ShareStore
from clearskies.share.scanner import Scanner, write_marker
from clearskies.threads import SerialRunner, ThreadPoolRunner

MiB = 1024 * 1024
BIG_SIZE = 1024 * MiB
SMALL_FILES = 10_000
SMALL_DIRS = 100


def make_big(folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    block = bytearray(os.urandom(MiB))
    with open(os.path.join(folder, "big.bin"), "wb") as f:
        for n in range(BIG_SIZE // MiB):
            block[:8] = n.to_bytes(8, "little")  # every block different
            f.write(block)


def make_small(folder: str) -> None:
    rng = random.Random(42)
    pool = os.urandom(64 * 1024 + 4096)
    for d in range(SMALL_DIRS):
        sub = os.path.join(folder, "dir%03d" % d)
        os.makedirs(sub, exist_ok=True)
        for f in range(SMALL_FILES // SMALL_DIRS):
            size = rng.randint(1024, 64 * 1024)
            start = rng.randint(0, 4096)
            with open(os.path.join(sub, "file%04d.dat" % f), "wb") as out:
                out.write(pool[start:start + size])


def ensure(data: str, name: str, maker) -> str:
    folder = os.path.join(data, name)
    done = os.path.join(data, ".complete-" + name)
    if not os.path.exists(done):
        if os.path.exists(folder):  # a half-made tree: set it aside, never reuse it
            os.rename(folder, "%s.partial-%d" % (folder, time.time()))
        print("creating %s ..." % folder, file=sys.stderr)
        maker(folder)
        open(done, "w").close()
    return folder


def tree_stats(folder: str) -> tuple[int, int]:
    files = total = 0
    for base, _, names in os.walk(folder):
        for name in names:
            if name != ".clearskies":
                files += 1
                total += os.path.getsize(os.path.join(base, name))
    return files, total


def warm(folder: str) -> None:
    for base, _, names in os.walk(folder):
        for name in names:
            with open(os.path.join(base, name), "rb") as f:
                while f.read(8 * MiB):
                    pass


def run_sha256sum(folder: str) -> tuple[float, float]:
    """Wall and CPU seconds of sha256sum over every file (one process, like a user would)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run("find . -type f ! -name .clearskies -print0 | xargs -0 sha256sum "
                   "> /dev/null", shell=True, check=True, cwd=folder)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


async def timed(scanner: Scanner):
    cpu = time.process_time()
    start = time.perf_counter()
    result = await scanner.scan()
    return result, time.perf_counter() - start, time.process_time() - cpu


async def bench(reactor, data: str) -> None:
    big = ensure(data, "big", make_big)
    small = ensure(data, "small", make_small)
    for folder in (big, small):
        warm(folder)
    pool = ThreadPoolRunner(reactor)
    db_thread = SerialRunner(reactor)
    pool.startService()
    db_thread.startService()
    rows = []
    state = tempfile.mkdtemp(prefix="clearskies-bench-")
    store = ShareStore(os.path.join(state, "state.sqlite3"), db_thread)
    try:
        for label, folder, rescan in (("(a) 1 GiB file", big, False),
                                      ("(b) 10,000 small files", small, True)):
            files, total = tree_stats(folder)
            share_id = os.urandom(32).hex()
            write_marker(folder, share_id)
            await store.add_share(ShareInfo(share_id, folder, os.urandom(16).hex(),
                                            "read_write", created=time.time()))
            scanner = Scanner(folder, share_id, os.urandom(16).hex(), store, pool, reactor)
            wall, cpu = run_sha256sum(folder)
            rows.append((label, "sha256sum", wall, cpu, files, total))
            result, wall, cpu = await timed(scanner)
            assert result.hashed_files == files, (result.hashed_files, files)
            rows.append((label, "initial scan", wall, cpu, files, total))
            if rescan:
                result, wall, cpu = await timed(scanner)
                assert result.hashed_files == 0 and not result.records
                rows.append((label, "unchanged rescan", wall, cpu, files, 0))
    finally:
        await store.close()
        pool.stopService()
        db_thread.stopService()
    print("%d worker threads; data in %s" % (pool.pool_size, data))
    print("%-24s %-17s %8s %8s %10s %9s" % ("workload", "what", "wall s", "CPU s",
                                           "files/s", "MB/s"))
    for label, what, wall, cpu, files, total in rows:
        mbps = "%9.0f" % (total / wall / 1e6) if total else "%9s" % "-"
        print("%-24s %-17s %8.2f %8.2f %10.1f %s" % (label, what, wall, cpu, files / wall,
                                                     mbps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="/work/bench-data/scan",
                        help="where the test trees live (created on first use)")
    args = parser.parse_args()
    os.makedirs(args.data, exist_ok=True)
    task.react(lambda reactor: Deferred.fromCoroutine(bench(reactor, args.data)))


if __name__ == "__main__":
    main()
