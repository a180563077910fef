"""``clearskies versions``, ``restore`` and ``config … --share``: kept versions from the shell.

A group of commands :class:`~clearskies.cli.Cli` combines, like those of
:mod:`clearskies.cli_commands` (protocol/control.md, section 6.3).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
from typing import Any

from clearskies.cli_commands import EXIT_OK, CommandFailed
from clearskies.cli_output import format_bytes, parse_setting_units
from clearskies.share.versionpolicy import SHARE_KEYS

CAUSES = {"replaced": "replaced", "deleted": "deleted", "restore": "replaced by a restore",
          "resolved": "set aside settling a conflict"}


def parse_time(text: str) -> float:
    """A time as the user writes it: seconds since 1970, or ISO 8601 (local time unless
    it says otherwise), e.g. 2026-12-07T10:30 or '2026-12-07 10:30:15'."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            "%r is not a time: write e.g. 2026-12-07T10:30 (local time) or seconds "
            "since 1970" % text) from None
    return moment.timestamp()


def show_time(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds).strftime("%Y-%m-%d %H:%M:%S")


def add_arguments(sub: Any) -> None:
    """The ``versions`` and ``restore`` subcommands, and ``config``'s ``--share``."""
    versions = sub.add_parser(
        "versions", help="list the kept versions of a file, or of everything under a folder",
        description="List what a share keeps of PATH: old content that peers' changes "
                    "replaced or deleted (time, size, and whose change it was).")
    versions.add_argument("path")
    versions.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                          help="machine-readable output")
    versions.add_argument("--clean", action="store_true",
                          help="first drop what the share's settings no longer keep")
    restore = sub.add_parser(
        "restore", help="bring a kept version of a file back (it then syncs to peers)",
        description="Put a kept version back at PATH as a local edit, which syncs to the "
                    "share's peers. Without --at or --version, the newest. What PATH holds "
                    "now is kept as a version first.")
    restore.add_argument("path")
    which = restore.add_mutually_exclusive_group()
    which.add_argument("--at", type=parse_time, metavar="TIME",
                       help="the version the file was at TIME (e.g. 2026-12-07T10:30)")
    which.add_argument("--version", dest="version_id", metavar="ID",
                       help="the version with this ID ('clearskies versions PATH' lists them)")


def config_share_option(config: Any) -> None:
    """``config … --share DIR``, unless another group of share settings added it already."""
    try:
        config.add_argument("--share", metavar="DIR",
                            help="a share's own settings: versions (off, trash, simple, "
                                 "staggered), versions_days, versions_keep, "
                                 "versions_max_bytes")
    except argparse.ArgumentError:
        pass  # the option is there: the settings below are one more group it reaches


class VersionCommands:
    """``versions``, ``restore``, and ``config get|set … --share DIR``."""

    def cmd_versions(self) -> int:
        request: dict[str, Any] = {"type": ".clearskies.versions",
                                   "path": os.path.realpath(self.args.path)}
        if self.args.clean:
            request["clean"] = True
        reply = self.request(request)

        def text() -> None:
            kept = reply.get("versions", [])
            settings = reply.get("settings", {})
            if not kept:
                self.output.line("no versions kept of %s (versions: %s)"
                                 % (self.args.path, settings.get("versions")))
                return
            for version in reversed(kept):
                peer = version.get("peer_name") or (version.get("peer") or "")[:16]
                by = str(CAUSES.get(version.get("cause"), version.get("cause")))
                if peer and version.get("cause") != "restore":
                    by += " by " + peer
                self.output.line("%s  %s  %9s  %s  (%s)" % (
                    version["id"], show_time(version["time"]),
                    format_bytes(version["size"]), version["path"], by))
            total = reply.get("total", len(kept))
            shown = "" if total == len(kept) else " (the newest %d shown)" % len(kept)
            self.output.line("%d version(s)%s in %s" % (total, shown, reply.get("folder")))

        self.output.emit(reply, text)
        return EXIT_OK

    def cmd_restore(self) -> int:
        path = os.path.realpath(self.args.path)
        request: dict[str, Any] = {"type": ".clearskies.restore", "path": path}
        if self.args.at is not None:
            request["at"] = self.args.at
        if self.args.version_id is not None:
            request["version"] = self.args.version_id
        reply = self.request(request)

        def text() -> None:
            self.output.line("restored %s from version %s (%s, %s)" % (
                path, reply["restored"], show_time(reply["time"]), format_bytes(reply["size"])))
            if reply.get("kept_current"):
                self.output.line("  what it held is kept as version %s" % reply["kept_current"])

        self.output.emit(reply, text)
        return EXIT_OK

    def cmd_config(self) -> int:
        # The versions settings; any other key goes on to the other groups of settings.
        if self.args.share is None or (self.args.key is not None
                                       and self.args.key not in SHARE_KEYS):
            return super().cmd_config()  # type: ignore[misc]
        request: dict[str, Any] = {"type": ".clearskies.share_config",
                                   "path": os.path.realpath(self.args.share)}
        if self.args.config_action == "set":
            try:
                value = json.loads(self.args.value)
            except ValueError:
                value = parse_setting_units(self.args.key, self.args.value)
            request.update(key=self.args.key, value=value)
        reply = self.request(request)
        config = reply.get("config", {})
        if self.args.config_action == "get" and not self.args.key:
            # Every setting of the share: the versions ones and the others.
            other = self.request({"type": ".clearskies.get_share_config", "path": request["path"]})
            config = {**other.get("config", {}), **config}
            reply = {**reply, "config": config}
        elif self.args.config_action == "get" and self.args.key:
            if self.args.key not in config:
                raise CommandFailed("no share setting %r; share settings: %s"
                                    % (self.args.key, ", ".join(sorted(config))))
            config = {self.args.key: config[self.args.key]}
        elif self.args.config_action == "set":
            config = {self.args.key: config.get(self.args.key)}
        self.output.emit(reply, lambda: [self.output.line("%s = %s" % (k, json.dumps(v)))
                                         for k, v in sorted(config.items())])
        return EXIT_OK


__all__ = ["VersionCommands", "add_arguments", "config_share_option", "parse_time"]
