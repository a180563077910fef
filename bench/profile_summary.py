"""Summarise a py-spy raw profile (``bench/sync.py --profile DIR``): where the samples went.

    .venv/bin/python bench/profile_summary.py /tmp/prof/W2-transfer-bob.txt
    .venv/bin/python bench/profile_summary.py FILE --top 40 --thread "<module>"   # reactor thread

Prints the sample count per thread, then the functions with the most samples
of their own ("self") and the most samples anywhere on the stack
("inclusive").  With ``--thread``, only stacks whose first frame contains that
text count (the reactor thread's is ``<module> (<string>:1)``; worker threads
start in ``Thread._bootstrap``).
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path


def summarise(path: Path, top: int, thread_filter: str | None) -> str:
    own: collections.Counter[str] = collections.Counter()
    anywhere: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        samples = int(count)
        frames = stack.split(";")
        if thread_filter and thread_filter not in frames[0]:
            continue
        threads[frames[0]] += samples
        total += samples
        if len(frames) > 1:
            own[frames[-1]] += samples
        for frame in set(frames[1:]):
            anywhere[frame] += samples
    out = ["%d samples" % total]

    def table(title: str, counter: collections.Counter[str], rows: int) -> None:
        out.append("-- " + title)
        for name, samples in counter.most_common(rows):
            out.append("%7d %5.1f%%  %s" % (samples, 100.0 * samples / max(total, 1), name[:160]))

    table("threads (first frame)", threads, 10)
    table("self", own, top)
    table("inclusive", anywhere, top)
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile", type=Path, help="a raw profile written by py-spy -f raw")
    parser.add_argument("--top", type=int, default=30, help="rows per table")
    parser.add_argument("--thread", help="only threads whose first frame contains this")
    args = parser.parse_args()
    print(summarise(args.profile, args.top, args.thread))


if __name__ == "__main__":
    main()
