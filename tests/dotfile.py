"""Read the edges of a protocol/*.dot state machine drawing, to compare with its table."""

from __future__ import annotations

import re
from pathlib import Path

PROTOCOL = Path(__file__).resolve().parent.parent / "protocol"

_EDGE = re.compile(r'^\s*(\w+)\s*->\s*(\w+)\s*\[label="([^"]*)"\];', re.M)


def edges(name: str) -> set[tuple[str, str, str, tuple[str, ...]]]:
    """(state, input, next state, outputs) of every edge in ``protocol/<name>``."""
    found = set()
    for before, after, label in _EDGE.findall((PROTOCOL / name).read_text()):
        event, _, outputs = label.partition(" / ")
        found.add((before, event.strip(),
                   after, tuple(o.strip() for o in outputs.split(",") if o.strip())))
    return found
