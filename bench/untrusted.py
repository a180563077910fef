"""Benchmark: what encrypted backup to an untrusted peer costs the trusted sender.

    .venv/bin/python bench/untrusted.py [--mib 512] [--w1-mib 256] [--data /work/bench-data/untrusted]

Part 1, in this process: the CPU seconds per GiB of reading a file as a plain
sender does (read + SHA-256, what the share already pays when it scans),
against sealing it into its blob (protocol/untrusted.md, section 3: HKDF,
AES-256-GCM per 64 KiB chunk, padding).  A trusted sender seals each new
version twice: once to list the blob's SHA-256 in the manifest, once to send
it; the extra CPU per GiB printed counts both.

Part 2, real daemons on loopback (``--w1-mib``, 0 to skip): W1's one big
file sent to a read_write peer, and to an untrusted peer, from ``attach``
until the receiver holds it; wall time and the sender's CPU seconds
(user + system, psutil).  Everything is written under ``--data`` and
removed at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clearskies.sync.sealed.files import blob_digest, sealed_pieces  # noqa: E402
from clearskies.untrusted.sealing import ContentKeys  # noqa: E402

GIB = 1 << 30


def _cpu() -> float:
    times = os.times()
    return times.user + times.system


def _make(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            piece = os.urandom(min(left, 1 << 22))
            f.write(piece)
            digest.update(piece)
            left -= len(piece)
    return digest.hexdigest()


def part_one(data: Path, size: int) -> None:
    path = data / "plain.bin"
    sha = _make(path, size)
    keys = ContentKeys("ab" * 32, "cd" * 16)
    file_id = keys.file_id("plain.bin")
    rows = []

    def measure(what: str, run) -> float:
        best = None
        for _ in range(2):  # the better of two: the machine is shared
            start = _cpu()
            run()
            spent = _cpu() - start
            best = spent if best is None else min(best, spent)
        per_gib = best * GIB / size
        rows.append((what, per_gib))
        return per_gib

    def plain() -> None:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while piece := f.read(1 << 20):
                digest.update(piece)

    def seal_once() -> None:
        for _ in sealed_pieces(str(path), keys, file_id, sha, size):
            pass

    base = measure("read + SHA-256 (plain sender)", plain)
    once = measure("seal (read, SHA-256 check, AES-256-GCM)", seal_once)
    twice = measure("digest for the manifest + seal to send",
                    lambda: (blob_digest(str(path), keys, file_id, sha, size), seal_once()))
    print("\nCPU seconds per GiB, %d MiB file (better of two runs):" % (size >> 20))
    for what, per_gib in rows:
        print("  %-44s %6.2f s/GiB" % (what, per_gib))
    print("  extra CPU per GiB for an untrusted peer:   %6.2f s/GiB (sealing twice, over "
          "the plain read)" % (twice - base))
    print("  extra CPU per GiB, one seal only:          %6.2f s/GiB" % (once - base))
    path.unlink()


def _w1(base: Path, mode: str, size: int) -> tuple[float, float]:
    """(wall seconds, sender CPU seconds) of W1 to a peer attached with a ``mode`` code."""
    from tests.daemons import DaemonSet, wait_until

    with DaemonSet(base) as daemons:
        sender, receiver = daemons.make("sender"), daemons.make("receiver")
        _make(Path(sender.shares) / "w1.bin", size)
        code = sender.cli_json("share", str(sender.shares), "--mode", mode)["access_code"]
        sender.cli("scan", str(sender.shares))
        process = psutil.Process(sender.pid)
        cpu = process.cpu_times()
        start = time.monotonic()
        receiver.cli("attach", code, str(receiver.shares), "--peer", sender.address)
        target = Path(receiver.shares) / "w1.bin"

        def held() -> bool:
            if mode != "untrusted":
                return target.exists() and target.stat().st_size == size
            status = receiver.cli_json("status", str(receiver.shares))
            return (status.get("keeps_encrypted") or {}).get("files") == 1
        wait_until(held, timeout=600, interval=0.05 if mode != "untrusted" else 0.2)
        wall = time.monotonic() - start
        after = process.cpu_times()
        return wall, (after.user - cpu.user) + (after.system - cpu.system)


def part_two(data: Path, size: int) -> None:
    rows = []
    for mode in ("read_write", "untrusted"):
        base = data / mode
        base.mkdir()
        wall, spent = _w1(base, mode, size)
        rows.append((mode, wall, spent))
        shutil.rmtree(base)
    print("\nW1 (%d MiB, one file) from attach until the receiver holds it:" % (size >> 20))
    for mode, wall, spent in rows:
        print("  to a %-10s peer: %6.2f s wall, sender CPU %6.2f s" % (mode, wall, spent))
    (_, wall_rw, cpu_rw), (_, wall_u, cpu_u) = rows
    print("  untrusted / read_write: wall x%.2f, sender CPU x%.2f" % (wall_u / wall_rw,
                                                                    cpu_u / cpu_rw))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=512, help="file size for part 1")
    parser.add_argument("--w1-mib", type=int, default=256, help="W1 size for part 2 (0: skip)")
    parser.add_argument("--data", default="/work/bench-data/untrusted")
    args = parser.parse_args()
    data = Path(args.data)
    data.mkdir(parents=True, exist_ok=False)
    try:
        part_one(data, args.mib << 20)
        if args.w1_mib:
            part_two(data, args.w1_mib << 20)
    finally:
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
