"""What ``attach --wait`` and ``wait`` show while a share fills: a progress bar on a
terminal, a plain line now and then otherwise.

Drawn by hand (one line, redrawn in place): the share's bytes done out of the most it
has had to fetch since the wait began, the percentage, the download rate, the time
left at that rate and the files arriving now.  Bytes remaining count down within a
big file (the share status's ``bytes_remaining``).  Off a terminal, a wait shorter
than ``PLAIN_EVERY`` prints nothing, a longer one a line every ``PLAIN_EVERY`` seconds.
"""

from __future__ import annotations

import os
from typing import Any, TextIO

from clearskies.cli_output import format_bytes

#: Seconds between two plain lines when the output is not a terminal.
PLAIN_EVERY = 5.0
BAR_WIDTH = 24


def format_eta(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds > 99 * 3600:
        return "--:--"
    seconds = int(seconds + 0.5)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return "%d:%02d:%02d" % (hours, minutes, secs) if hours else "%d:%02d" % (minutes, secs)


class Progress:
    """Follows one share's status replies and draws them on ``out``."""

    def __init__(self, out: TextIO, path: str, terminal: bool, width: int | None = None) -> None:
        self.out = out
        self.name = os.path.basename(path) or path
        self.terminal = terminal
        self.width = width
        self.total = 0  # the most there was to fetch since the wait began
        self._last_plain: float | None = None
        self._last_text = ""
        self.drawn = False

    def line(self, status: dict[str, Any]) -> tuple[str, float]:
        """The progress line for a status reply (without the bar) and the percentage."""
        items = int(status.get("items_to_download") or 0)
        to_fetch = int(status.get("bytes_to_download") or 0)
        remaining = int(status.get("bytes_remaining", to_fetch) or 0)
        if items == 0:
            self.total = 0
            remaining = 0
        self.total = max(self.total, to_fetch, remaining)
        rate = int(status.get("download_rate") or 0)
        done = max(0, self.total - remaining)
        percent = 100.0 * done / self.total if self.total else 0.0
        eta = remaining / rate if rate > 0 else None
        files = [f.get("file", "") for f in status.get("downloading", [])]
        text = "%s: %3.0f%% %s of %s, %s/s, ETA %s, %d item%s left" % (
            self.name, percent, format_bytes(done), format_bytes(self.total), format_bytes(rate),
            format_eta(eta if remaining else 0), items, "" if items == 1 else "s")
        if files:
            text += ": " + ", ".join(os.path.basename(f) for f in files[:3])
            if len(files) > 3:
                text += ", …"
        return text, percent

    def show(self, status: dict[str, Any], now: float) -> None:
        if not status.get("items_to_download"):
            self.total = 0
            self.message("%s, comparing with peers" % status.get("status"))
            return
        text, percent = self.line(status)
        if self.terminal:
            filled = int(BAR_WIDTH * percent / 100 + 0.5)
            bar = "[" + "#" * filled + "-" * (BAR_WIDTH - filled) + "] "
            full = bar + text
            if self.width:
                full = full[:max(10, self.width - 1)]
            self.out.write("\r\x1b[K" + full)
            self.out.flush()
            self.drawn = True
            return
        if self._last_plain is None:
            self._last_plain = now  # a wait that ends within PLAIN_EVERY prints nothing
            return
        if text != self._last_text and now - self._last_plain >= PLAIN_EVERY:
            self.out.write(text + "\n")
            self.out.flush()
            self._last_plain = now
            self._last_text = text

    def message(self, text: str) -> None:
        """A line instead of the bar (waiting for a peer, local changes)."""
        if self.terminal:
            self.out.write("\r\x1b[K%s: %s" % (self.name, text))
            self.out.flush()
            self.drawn = True

    def clear(self) -> None:
        if self.terminal and self.drawn:
            self.out.write("\r\x1b[K")
            self.out.flush()

    def end_line(self) -> None:
        if self.terminal and self.drawn:
            self.out.write("\n")
            self.out.flush()
