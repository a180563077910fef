"""``clearskies web`` and ``clearskies events``: the browser's way in, and the live events.

A group of commands :class:`~clearskies.cli.Cli` combines, like those of
:mod:`clearskies.cli_commands` (protocol/http-api.md; protocol/control.md, section 9).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from clearskies.cli_commands import EXIT_OK
from clearskies.cli_output import format_bytes, printable

#: Keys an event line shows first, in this order (the rest follow as key=value).
_FIRST = ("path", "file")


def add_arguments(sub: Any) -> None:
    """The ``web`` and ``events`` subcommands."""
    web = sub.add_parser(
        "web", help="print (and open) a one-time login URL for the web UI",
        description="Print a URL that logs a browser in to the daemon's web UI once "
                    "(it expires after 5 minutes). Programs use the API key in the data "
                    "directory's web-api-key file instead.")
    web.add_argument("--no-open", action="store_true",
                     help="only print the URL, even when a browser could be opened")
    events = sub.add_parser(
        "events", help="print the daemon's events as they happen",
        description="Print what the daemon does as it happens: share states, peers, "
                    "downloads, conflicts, errors, rates. Stops with Ctrl-C.")
    events.add_argument("--since", type=int, default=None, metavar="ID",
                        help="first the kept events after this event id")
    events.add_argument("--count", type=int, default=None, metavar="N",
                        help="exit after N events")


def format_event(event: dict[str, Any]) -> str:
    """One event as a line for people."""
    moment = time.strftime("%H:%M:%S", time.localtime(event.get("time", 0)))
    parts = [moment, str(event.get("type", "?"))]
    for key in _FIRST:
        if key in event:
            parts.append(printable(str(event[key])))
    for key, value in event.items():
        if key in ("id", "time", "type", "share_id", *_FIRST) or value is None:
            continue
        if ("bytes" in key or key.endswith("_rate") or key in ("received", "size")) \
                and isinstance(value, int) and not isinstance(value, bool):
            value = format_bytes(value) + ("/s" if key.endswith("_rate") else "")
        parts.append("%s=%s" % (key, printable(str(value))))
    return " ".join(parts)


class GuiCommands:
    """``web`` and ``events``."""

    args: argparse.Namespace
    output: Any
    out: Any

    def request(self, body: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def client(self) -> Any:
        raise NotImplementedError

    def cmd_web(self) -> int:
        reply = self.request({"type": ".clearskies.web_login"})

        def human() -> None:
            self.output.line("Open this in your browser (it works once, for 5 minutes):")
            self.output.line(reply["url"])
        self.output.emit(reply, human)
        if not self.args.json and not self.args.no_open and self.out.isatty() and (
                os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
            import webbrowser
            try:
                webbrowser.open(reply["url"])
            except Exception:
                pass  # the URL is printed: that is enough
        return EXIT_OK

    def cmd_events(self) -> int:
        shown = 0
        with self.client() as client:
            body: dict[str, Any] = {"type": ".events.subscribe"}
            if self.args.since is not None:
                body["since"] = self.args.since
            client.request(body)
            client.timeout = None
            for event in client.events():
                if self.args.json:
                    self.out.write(json.dumps(event, sort_keys=True) + "\n")
                else:
                    self.out.write(format_event(event) + "\n")
                self.out.flush()
                shown += 1
                if self.args.count is not None and shown >= self.args.count:
                    break
        return EXIT_OK


