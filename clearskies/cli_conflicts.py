"""``clearskies conflicts``, ``resolve`` and ``changes``: conflicts and recent changes from the
shell (protocol/control.md, sections 6.6 and 6.7).  A group of commands :class:`~clearskies.cli.Cli`
combines, like those of :mod:`clearskies.cli_versions`.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from clearskies.cli_commands import EXIT_OK
from clearskies.cli_output import format_bytes, printable
from clearskies.cli_versions import show_time

KINDS = {"received": "from", "sent": "to", "deleted": "deleted by", "conflict": "conflict with",
         "conflict_resolved": "resolved here"}


def add_arguments(sub: Any) -> None:
    conflicts = sub.add_parser(
        "conflicts", help="a share's conflicts: both versions of each",
        description="List the conflict copies of the share holding DIR, next to the files "
                    "they were made for.")
    conflicts.add_argument("path", metavar="DIR")
    conflicts.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                           help="machine-readable output")
    resolve = sub.add_parser(
        "resolve", help="settle a conflict: keep the file, its copy, or both",
        description="Settle the conflict of COPY (a conflict copy's path, as `clearskies "
                    "conflicts` lists it): --keep file removes the copy; --keep copy puts "
                    "the copy's content at the file's path (a local edit) and removes the "
                    "copy; --keep both leaves both and stops listing the conflict.")
    resolve.add_argument("path", metavar="COPY")
    resolve.add_argument("--keep", choices=("file", "copy", "both"), required=True)
    resolve.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                         help="machine-readable output")
    changes = sub.add_parser(
        "changes", help="what a share changed lately: received, sent, deleted, conflicts",
        description="The share's recent changes, newest first (kept in memory while the "
                    "daemon runs).")
    changes.add_argument("path", metavar="DIR")
    changes.add_argument("-n", type=int, default=50, dest="count", metavar="N",
                         help="at most N changes (default 50)")
    changes.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                         help="machine-readable output")


def _version(side: dict[str, Any] | None) -> str:
    if not side:
        return "not on disk"
    return "%s, %s" % (format_bytes(side["size"]), show_time(side["mtime"]))


class ConflictCommands:
    """``conflicts``, ``resolve``, ``changes``."""

    def cmd_conflicts(self) -> int:
        reply = self.request({"type": ".clearskies.conflicts",
                              "path": os.path.realpath(self.args.path)})

        def text() -> None:
            found = reply.get("conflicts", [])
            if not found:
                self.output.line("no conflicts in %s" % reply.get("share"))
            for c in found:
                peer = c.get("peer_name") or c.get("peer_id")
                self.output.line("%s%s" % (printable(c["file"]),
                                           " (conflict with %s)" % peer if peer else ""))
                self.output.line("  file: %s" % _version(c.get("file_version")))
                self.output.line("  copy: %s  %s" % (printable(c["copy"]),
                                                     _version(c.get("copy_version"))))
            if found:
                self.output.line("settle one: clearskies resolve %s/COPY --keep file|copy|both"
                                 % reply.get("share"))

        self.output.emit(reply, text)
        return EXIT_OK

    def cmd_resolve(self) -> int:
        reply = self.request({"type": ".clearskies.resolve_conflict",
                              "path": os.path.abspath(self.args.path), "keep": self.args.keep})

        def text() -> None:
            what = {"file": "kept %s; its copy %s removed",
                    "copy": "the copy's content is now %s; %s removed",
                    "both": "kept both %s and %s"}[reply["kept"]]
            self.output.line(what % (printable(reply["file"]), printable(reply["copy"])))

        self.output.emit(reply, text)
        return EXIT_OK

    def cmd_changes(self) -> int:
        reply = self.request({"type": ".clearskies.changes",
                              "path": os.path.realpath(self.args.path),
                              "limit": max(1, min(10_000, self.args.count))})

        def text() -> None:
            changes = reply.get("changes", [])
            if not changes:
                self.output.line("no changes yet in %s" % reply.get("share"))
            for c in changes:
                peer = c.get("peer_name") or (c.get("peer_id") or "")[:16]
                kind = c.get("kind", "")
                self.output.line("%s  %-9s %s%s%s" % (
                    show_time(c["time"]), kind, printable(str(c.get("file", ""))),
                    (" (%s)" % format_bytes(c["size"])) if c.get("size") else "",
                    ("  %s %s" % (KINDS.get(kind, ""), peer)) if peer else ""))

        self.output.emit(reply, text)
        return EXIT_OK
