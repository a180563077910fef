"""``clearskies export-keys`` and ``import-keys``: a share's keys saved for a restore.

An access code only lets its holder fetch the keys from a peer that holds
them, and an untrusted peer must never hold them; so a share backed up on
untrusted peers alone is restored from its keys saved ahead of time
(protocol/untrusted.md, section 2.1).  A group of commands
:class:`~clearskies.cli.Cli` combines, like those of :mod:`clearskies.cli_versions`.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from clearskies.cli_commands import EXIT_OK, CommandFailed


def add_arguments(sub: Any) -> None:
    export = sub.add_parser(
        "export-keys", help="save a share's keys to a file (keep it secret: it opens the share)",
        description="Write the keys of the share holding DIR to FILE (created readable by "
                    "you only). With them, import-keys restores the share from its "
                    "untrusted (encrypted backup) peers even when no other peer is left.")
    export.add_argument("path", metavar="DIR")
    export.add_argument("file", metavar="FILE")
    restore = sub.add_parser(
        "import-keys", help="sync an empty directory as the share whose keys FILE holds",
        description="Make the empty directory DIR the share whose keys export-keys saved "
                    "in FILE; it fills from the share's peers, untrusted ones included.")
    restore.add_argument("file", metavar="FILE")
    restore.add_argument("path", metavar="DIR")
    restore.add_argument("--peer", action="append", metavar="HOST:PORT",
                         help="address of a peer that has the share (repeatable)")
    for parser in (export, restore):
        parser.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                            help="machine-readable output")


class KeyCommands:
    """``export-keys``, ``import-keys``."""

    def cmd_export_keys(self) -> int:
        reply = self.request({"type": ".clearskies.export_keys",
                              "path": os.path.realpath(self.args.path)})
        text = json.dumps(reply["keys"], indent=1, sort_keys=True) + "\n"
        try:
            fd = os.open(self.args.file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as e:
            raise CommandFailed("cannot create %s: %s" % (self.args.file, e.strerror)) from None
        with os.fdopen(fd, "w") as f:
            f.write(text)
        self.output.emit({"file": self.args.file, "share_id": reply["share_id"]},
                         lambda: self.output.line(
                             "keys of %s saved in %s; anyone with this file can read and "
                             "change the share" % (self.args.path, self.args.file)))
        return EXIT_OK

    def cmd_import_keys(self) -> int:
        try:
            with open(self.args.file, encoding="ascii") as f:
                keys = json.loads(f.read(1_000_000))
        except (OSError, ValueError) as e:
            raise CommandFailed("cannot read keys from %s: %s" % (self.args.file, e)) from None
        path = os.path.realpath(self.args.path)
        self.ensure_daemon()
        request: dict[str, Any] = {"type": ".clearskies.import_keys", "path": path,
                                   "keys": keys}
        if self.args.peer:
            request["peers"] = self.args.peer
        reply = self.request(request)
        self.output.emit(reply, lambda: self.output.line(
            "%s is the share again; it fills as soon as a peer is found "
            "(see: clearskies status %s)" % (path, path)))
        return EXIT_OK
