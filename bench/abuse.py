"""The load and abuse figures in one table: how a daemon and a tracker hold up under attack.

Each ``bench/abuse_<area>.py`` module measures one kind of attack on
loopback (127.0.0.0/8 only) and returns rows from ``run()``: the attack, the
share of legitimate attempts that still succeeded, memory, the longest
stall of the reactor, and notes.  This script runs them in turn and prints
one table; ``bench/README.md`` keeps a pasted copy.  Run:

    .venv/bin/python bench/abuse.py [AREA ...]      # e.g. admission tracker
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
COLUMNS = ("attack", "legit_success", "memory_mb", "max_reactor_lag_ms", "notes")


def areas() -> list[str]:
    """The measuring modules present: ``abuse_<area>.py`` beside this file."""
    return sorted(m.name[len("abuse_"):] for m in pkgutil.iter_modules([str(HERE)])
                  if m.name.startswith("abuse_"))


def _cell(value: object) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return "%.3g" % value
    return str(value)


def main(argv: list[str]) -> int:
    chosen = argv or areas()
    if not chosen:
        print("no bench/abuse_*.py module found")
        return 1
    sys.path.insert(0, str(HERE.parent))
    rows: list[dict] = []
    for area in chosen:
        module = importlib.import_module("bench.abuse_%s" % area)
        started = time.monotonic()
        for row in module.run():
            rows.append({"area": area, **row})
        print("# %s: %.1f s" % (area, time.monotonic() - started), file=sys.stderr)
    header = ("area",) + COLUMNS
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(_cell(row.get(column)) for column in header) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
