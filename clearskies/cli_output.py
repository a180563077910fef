"""What the ``clearskies`` command prints: JSON with ``--json``, else lines for people.

:class:`Output` writes every reply the CLI shows; the commands
(:mod:`clearskies.cli_commands`) decide what to ask the daemon, this module how
the answer looks.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from typing import Any, TextIO


def printable(path: str) -> str:
    """A path for one terminal line: newlines and other control characters escaped."""
    if path.isprintable():
        return path
    return path.encode("unicode_escape", "backslashreplace").decode("ascii")


def format_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return ("%d %s" % (count, unit)) if unit == "B" else ("%.1f %s" % (count, unit))
        count /= 1024
    raise AssertionError("unreachable")


#: Settings whose values are sizes or rates: ``config set`` takes units for them.
SIZE_SETTINGS = ("upload_limit", "download_limit", "versions_max_bytes")
_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3, "t": 1024 ** 4,
          "kib": 1024, "mib": 1024 ** 2, "gib": 1024 ** 3, "tib": 1024 ** 4,
          "kb": 1000, "mb": 1000 ** 2, "gb": 1000 ** 3, "tb": 1000 ** 4}
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*(?:/s)?\s*")


def parse_size(text: str) -> int:
    """``20M``, ``1.5MiB/s``, ``500kB``, ``0`` → bytes (K, M, G and KiB… are powers of
    1024, kB, MB, GB powers of 1000; a trailing ``/s`` is allowed).  ValueError otherwise."""
    match = _SIZE_RE.fullmatch(text.lower())
    if not match or match.group(2) not in _UNITS:
        raise ValueError("%r is not a size: write e.g. 20M, 1.5MiB/s, 500kB or 0" % text)
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def parse_setting_units(key: str | None, text: str) -> object:
    """A ``config set`` value that is not JSON: a size with units for the size
    settings (``20M``), else the text itself."""
    if key in SIZE_SETTINGS or (key or "").endswith("_bytes"):
        try:
            return parse_size(text)
        except ValueError:
            return text  # the daemon says what it wants
    return text


class Output:
    """Where one invocation prints, and how: ``emit`` a reply, or ``line`` by line."""

    def __init__(self, out: TextIO, as_json: bool) -> None:
        self.out = out
        self.as_json = as_json

    def emit(self, data: Any, human: Callable[[], None]) -> None:
        if self.as_json:
            self.out.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
        else:
            human()

    def line(self, text: str = "") -> None:
        self.out.write(text + "\n")

    def log_line(self, line: str) -> str:
        """A line of the daemon's log as ``log`` prints it (with --json: one JSON object)."""
        if self.as_json:
            return json.dumps({"line": line.rstrip("\n")}) + "\n"
        return line

    def daemon_status(self, reply: dict[str, Any]) -> None:
        """The daemon's status, as ``clearskies status`` prints it."""
        self.line("paused: %s" % ("yes" if reply.get("paused") else "no"))
        self.line("upload:   %s/s" % format_bytes(reply.get("upload_rate", 0)))
        self.line("download: %s/s" % format_bytes(reply.get("download_rate", 0)))
        if "shares" in reply:
            self.line("shares: %d" % reply["shares"])
        for path in reply.get("shares_with_warnings", []):
            self.line("warning: %s needs a look (see: clearskies status %s)" % (path, path))
        if reply.get("failed_attaches"):
            self.line("attaches that failed: %d (see: clearskies list)"
                      % reply["failed_attaches"])
        if reply.get("port"):
            self.line("listening for peers on port %d" % reply["port"])
        if reply.get("onion_address"):
            self.line("reachable through Tor at %s" % reply["onion_address"])
        if reply.get("tor_error"):
            self.line("Tor problem: %s" % reply["tor_error"])

    def share_status(self, share: dict[str, Any]) -> None:
        """One share's status, as ``clearskies status PATH`` prints it."""
        self.line("%s: %s%s" % (share.get("path"), share.get("status"),
                                (" (%s)" % share["problem"]) if share.get("problem") else ""))
        self.line("  %d files, %s, revision %s" % (
            share.get("files", 0), format_bytes(share.get("bytes", 0)), share.get("revision")))
        if share.get("share_paused"):
            self.line("  paused (neither sends nor receives): clearskies resume %s"
                      % share.get("path"))
        if share.get("watcher") is False:
            self.line("  file watcher off: local changes are found by periodic scans")
        for warning in share.get("warnings", []):
            self.line("  warning: %s" % warning)
        for entry in share.get("damaged", []):
            self.line("  damaged on disk (bit rot): %s: %s" % (
                printable(entry.get("path", "")), entry.get("state", "")))
        if share.get("local_changes_not_shared"):
            self.line("  %d local changes not shared" % share["local_changes_not_shared"])
        if share.get("share_files_missing"):
            self.line("  %d files of the share not here (clearskies revert fetches them)"
                      % share["share_files_missing"])
        if share.get("share_version_complete") is False:
            self.line("  the share's full file list has not all arrived yet")
        if share.get("skipped"):
            self.line("  %d paths not synced%s" % (
                share["skipped"], "" if "skipped_paths" in share else " (see: --skipped)"))
        for entry in share.get("skipped_paths", []):
            self.line("  skipped %s: %s" % (printable(entry.get("path", "")),
                                            entry.get("reason")))
        if "skipped_paths" in share and len(share["skipped_paths"]) < share.get("skipped", 0):
            self.line("  (only the first %d are listed)" % len(share["skipped_paths"]))
        keeps = share.get("keeps_encrypted")
        if keeps:
            self.line("  keeps an encrypted backup it cannot read: %d files, %s, revision %s"
                      % (keeps.get("files", 0), format_bytes(keeps.get("bytes", 0)),
                         keeps.get("revision")))
        for peer in share.get("peers", []):
            self.line("  peer %s %s %s%s%s" % (
                peer.get("name") or peer.get("peer_id"), peer.get("access", ""),
                "connected" if peer.get("connected") else "offline",
                (", needs %d items" % peer["items_needed"]) if peer.get("items_needed") else "",
                _backup_of(peer)))
        if share.get("untrusted_problem"):
            self.line("  untrusted peers: %s" % share["untrusted_problem"])
        for path in share.get("lost_on_untrusted_peers", []):
            self.line("  lost on an untrusted peer (uploaded again): %s" % printable(path))
        if share.get("items_to_download"):
            self.line("  downloading: %d items, %s left" % (
                share["items_to_download"], format_bytes(share.get("bytes_to_download", 0))))
        for conflict in share.get("conflicts", []):
            self.line("  conflict: %s and %s%s" % (
                printable(conflict.get("file", "")), printable(conflict.get("copy", "")),
                (" (from %s)" % (conflict.get("peer_name") or conflict["peer_id"]))
                if conflict.get("peer_id") else ""))
        if share.get("conflicts"):
            self.line("  (clearskies conflicts %s: both versions; keep one or both)"
                      % share.get("path"))
        errors = share.get("disk_errors") or []
        for error in errors:
            self.line("  cannot write %s: %s" % (error.get("path"), error.get("error")))
        more = share.get("disk_errors_count", len(errors)) - len(errors)
        if more > 0:
            self.line("  … and %d more files" % more)

    def share_list(self, shares: list[dict[str, Any]]) -> None:
        """The shares, one line each, as ``clearskies list`` prints them."""
        if not shares:
            self.line("no shares; share a directory with: clearskies share DIRECTORY")
        for share in shares:
            self.line("%-8s %-10s %6d files %10s  %d/%d peers  %s%s" % (
                share.get("status", "?"), share.get("access", ""), share.get("files", 0),
                format_bytes(share.get("bytes", 0)), share.get("peers_connected", 0),
                share.get("peers_known", 0), share["path"],
                "  (%d local changes not shared)" % share["local_changes_not_shared"]
                if share.get("local_changes_not_shared") else ""))
            if share.get("status") in ("failed", "waiting") and share.get("problem"):
                self.line("         %s" % share["problem"])

    def peers(self, peers: list[dict[str, Any]]) -> None:
        """A share's peers, one line each."""
        if not peers:
            self.line("no peers known yet")
        for peer in peers:
            self.line("%s  %-10s %-9s %s" % (
                peer.get("peer_id"), peer.get("access", ""),
                "connected" if peer.get("connected") else "offline",
                peer.get("name") or ", ".join(peer.get("addresses", []))))

    def codes(self, codes: list[dict[str, Any]]) -> None:
        """A share's live access codes, one line each."""
        if not codes:
            self.line("no live access codes")
        for code in codes:
            self.line("%s  %-10s %s %s" % (
                code["access_id"][:16], code["level"],
                "one-time" if code.get("one_time") else "multi-use",
                "never expires" if code.get("expires") is None else
                time.strftime("expires %Y-%m-%d %H:%M", time.localtime(code["expires"]))))


def _backup_of(peer: dict[str, Any]) -> str:
    """What an untrusted peer's ``status`` line adds: what it holds, its last proof."""
    if not peer.get("untrusted"):
        return ""
    passed = peer.get("last_challenge_passed")
    return ", untrusted: holds %d files (%s), last proof of storage %s%s" % (
        peer.get("holds_files", 0), format_bytes(peer.get("holds_bytes", 0)),
        time.strftime("%Y-%m-%d %H:%M", time.localtime(passed)) if passed else "never",
        (", %d challenges failed" % peer["challenges_failed"])
        if peer.get("challenges_failed") else "")
