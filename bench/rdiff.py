"""Benchmark: clearskies.rdiff (librsync) alone: block sizes, speed, memory.

    .venv/bin/python bench/rdiff.py [--size 1G] [--blocks 8K,16K,32K,64K,128K] [--data DIR]
    .venv/bin/python bench/rdiff.py --size 10G --memory-only     # the bounded-memory claim

For an old file of ``--size`` random bytes and a new one with 1 MiB
overwritten in the middle (the W3 change of ``bench/sync.py``), it prints
per block size: signature bytes, delta bytes, their sum (what crosses the
wire), and the seconds each of signature, delta and patch took (the patch
both by librsync and by ``clearskies.rdiffpatch``, which the daemon uses).  The row
marked ``*`` is the block size the daemon picks (``rdiff.block_size``).

``--memory-only`` uses sparse files (no disk space, no random data) and
prints the peak RSS of a child process doing signature, delta and patch
of one such file: it stays flat whatever the size.
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clearskies import rdiff, rdiffpatch  # noqa: E402

MiB = 1024 * 1024


def parse_size(text: str) -> int:
    units = {"K": 1024, "M": MiB, "G": 1024 * MiB}
    text = text.strip().upper()
    return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)


def one_round(old: Path, new: Path, out: Path, block: int
              ) -> tuple[int, int, float, float, float, float]:
    """(signature bytes, delta bytes, seconds to sign, to delta, to patch with librsync,
    to patch with clearskies.rdiffpatch, as the daemon does)."""
    sig_path, delta_path = old.with_suffix(".sig"), old.with_suffix(".delta")
    t0 = time.perf_counter()
    fd = os.open(old, os.O_RDONLY)
    # A SignatureReader, but with the block size under test.
    strong = rdiff.strong_length(os.path.getsize(old), block)
    job = rdiff._Reader(rdiff._require().rs_sig_begin(block, strong, rdiff.OUR_SIGNATURE_MAGIC),
                        "signature", fd)
    with open(sig_path, "wb") as f:
        while data := job.read(rdiff.PIECE):
            f.write(data)
    job.close()
    t1 = time.perf_counter()
    loader = rdiff.SignatureLoader()
    with open(sig_path, "rb") as f:
        while data := f.read(rdiff.PIECE):
            loader.feed(data)
    delta = rdiff.DeltaReader(os.open(new, os.O_RDONLY), loader.finish())
    with open(delta_path, "wb") as f:
        while data := delta.read(rdiff.PIECE):
            f.write(data)
    delta.close()
    t2 = time.perf_counter()
    fds = [os.open(old, os.O_RDONLY), os.open(delta_path, os.O_RDONLY),
           os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)]
    try:
        rdiff.patch_file(*fds, limit=os.path.getsize(new))
    finally:
        for fd in fds:
            os.close(fd)
    t3 = time.perf_counter()
    # Not over librsync's result, still being written back (nor a file next to /dev/null).
    ours_out = out if str(out) == os.devnull else out.with_name(out.name + ".ours")
    with open(old, "rb") as o, open(ours_out, "wb") as w, open(delta_path, "rb") as d:
        ours = rdiffpatch.DirectPatcher(o.fileno(), w.fileno(), os.path.getsize(new))
        while data := d.read(rdiff.PIECE):
            ours.feed(data)
        ours.finish()
    t4 = time.perf_counter()
    sizes = os.path.getsize(sig_path), os.path.getsize(delta_path)
    for p in (sig_path, delta_path) + ((ours_out,) if ours_out != out else ()):
        p.unlink(missing_ok=True)
    return sizes[0], sizes[1], t1 - t0, t2 - t1, t3 - t2, t4 - t3


def memory_child(size: int, data: Path) -> None:
    """Signature, delta and patch of sparse files of ``size`` bytes; prints peak RSS."""
    old, new, out = data / "old", data / "new", Path(os.devnull)  # the result is not kept
    for p in (old, new):
        with open(p, "wb") as f:
            f.truncate(size)
    with open(new, "r+b") as f:
        f.seek(size // 2)
        f.write(os.urandom(MiB))
    start = time.perf_counter()
    signature, delta, *_ = one_round(old, new, out, rdiff.block_size(size))
    print("size %.1f GiB: signature %d B, delta %d B, %.1f s, peak RSS %d MiB"
          % (size / 1024 ** 3, signature, delta, time.perf_counter() - start,
             resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024))
    for p in (old, new):
        p.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="1G", help="old file size (K, M, G suffixes)")
    parser.add_argument("--blocks", default="8K,16K,32K,64K,128K")
    parser.add_argument("--data", default="/work/bench-data/rdiff")
    parser.add_argument("--memory-only", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not rdiff.AVAILABLE:
        sys.exit("librsync is not installed (apt-get install librsync2)")
    size = parse_size(args.size)
    Path(args.data).mkdir(parents=True, exist_ok=True)
    data = Path(tempfile.mkdtemp(dir=args.data))
    if args.child:
        memory_child(size, data)
        return
    if args.memory_only:
        subprocess.run([sys.executable, __file__, "--child", "--size", str(size),
                        "--data", str(data)], check=True)
        return
    rng = random.Random(3)
    old, new = data / "old", data / "new"
    with open(old, "wb") as f:
        for _ in range(size // MiB):
            f.write(rng.randbytes(MiB))
    with open(old, "rb") as src, open(new, "wb") as dst:
        while block := src.read(16 * MiB):
            dst.write(block)
    with open(new, "r+b") as f:
        f.seek(size // 2 - MiB // 2 + 12345)
        f.write(rng.randbytes(MiB))
    print("| block | signature B | delta B | on the wire B | sign s | delta s | patch s "
          "(librsync) | patch s (ours) |")
    print("|---|---|---|---|---|---|---|---|")
    chosen = rdiff.block_size(size)
    blocks = sorted({parse_size(b) for b in args.blocks.split(",")} | {chosen})
    for block in blocks:
        sig, delta, ts, td, tp, to = one_round(old, new, data / "out", block)
        print("| %d%s | %d | %d | %d | %.2f | %.2f | %.2f | %.2f |"
              % (block, " *" if block == chosen else "", sig, delta, sig + delta, ts, td, tp, to))
    for p in (old, new, data / "out"):
        p.unlink()
    data.rmdir()


if __name__ == "__main__":
    main()
