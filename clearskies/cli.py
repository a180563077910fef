"""The ``clearskies`` command: a thin client of the daemon's control socket.

Every command except ``start`` and ``log`` is one or a few control-socket
requests (protocol/control.md).  ``share`` and ``attach`` start the daemon
first when none is running, so a new user needs a single command.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any, TextIO

from clearskies import __version__
from clearskies.accesscode import code_url, parse_code
from clearskies.control.client import (
    ControlClient,
    ControlError,
    DaemonNotRunning,
    default_control_path,
    default_data_dir,
)
from clearskies.errors import AccessCodeError, ConfigurationError, ProtocolError

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_NO_DAEMON = 2
EXIT_TIMEOUT = 3

DAEMON_START_TIMEOUT = 30.0


class CommandFailed(Exception):
    """A CLI command failed; the message is the one line the user sees."""

    def __init__(self, message: str, exit_code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def parse_duration(text: str) -> float | None:
    """``24h``, ``30m``, ``7d``, ``90s`` or ``never`` → seconds (None = never)."""
    text = text.strip().lower()
    if text in ("never", "none", "0"):
        return None
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhdw]?)", text)
    if not match:
        raise argparse.ArgumentTypeError(
            "%r is not a duration; use e.g. 90s, 30m, 24h, 7d or never" % text)
    unit = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[match.group(2)]
    return float(match.group(1)) * unit


def _start_error(errors: Any, status: int, data_dir: str) -> str:
    """Why a daemon exited at start-up: the last line of its standard error."""
    errors.seek(0)
    lines = errors.read(64 * 1024).decode("utf-8", "replace").strip().splitlines()
    prefix = "clearskies: cannot start: "
    reasons = [line[len(prefix):] for line in lines if line.startswith(prefix)]
    if reasons:
        return reasons[-1]
    if lines:
        # twistd's own word on a bad option: "twistd --nodaemon: <why>".
        return re.sub(r"^twistd[^:]*: ", "", lines[-1])
    return "it exited with status %d; see %s" % (status, os.path.join(data_dir, "clearskies.log"))


def _printable(path: str) -> str:
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


def share_trouble(share: dict[str, Any]) -> bool:
    """True when a share's status needs the user: stopped in error, or files it cannot write."""
    return share.get("status") == "error" or bool(share.get("disk_errors"))


class Cli:
    """One CLI invocation: the parsed arguments, where to print, how to reach the daemon."""

    def __init__(self, args: argparse.Namespace, out: TextIO, err: TextIO,
                 sleep: Callable[[float], None] = time.sleep,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.args = args
        self.out = out
        self.err = err
        self.sleep = sleep
        self.monotonic = monotonic
        self.data_dir = os.path.abspath(args.data_dir or default_data_dir())
        self.control_path = default_control_path(self.data_dir)

    # -- talking to the daemon ---------------------------------------------

    def client(self) -> ControlClient:
        client = ControlClient(self.control_path, timeout=self.args.timeout)
        try:
            client.connect()
        except DaemonNotRunning:
            raise CommandFailed(
                "the ClearSkies daemon is not running (no control socket at %s); "
                "start it with: clearskies start" % self.control_path, EXIT_NO_DAEMON) from None
        return client

    def request(self, body: dict[str, Any]) -> dict[str, Any]:
        with self.client() as client:
            return client.request(body)

    def daemon_running(self) -> bool:
        try:
            with ControlClient(self.control_path, timeout=2.0) as client:
                client.connect()
                return True
        except DaemonNotRunning:
            return False

    def ensure_daemon(self) -> None:
        """Start the daemon in the background when none answers."""
        if not self.daemon_running():
            self.start_daemon(foreground=False)

    def twistd_command(self, foreground: bool) -> list[str]:
        args = self.args
        # twistd itself (``python -m twisted`` is the newer ``twist`` runner).
        # (Named "twistd" in its own messages, not "-c".)
        cmd = [sys.executable, "-c",
               "import sys; sys.argv[0] = 'twistd'; "
               "from twisted.scripts.twistd import run; run()"]
        if foreground:
            cmd += ["--nodaemon", "--pidfile="]
        else:
            # The daemon writes <data dir>/clearskies.log itself (rotated).  twistd's own
            # copy would be the same lines again in a file nothing rotates away, and
            # --logfile /dev/null is unsafe: twistd's LogFile renames its file to
            # rotate it, which root can do to /dev/null.  So twistd's log is dropped.
            # It runs in the foreground of a new session (start_daemon detaches it),
            # so that a failed start's exit status and reason reach us at once;
            # the umask is the one twistd gives a daemon.
            cmd += ["--nodaemon", "--umask", "0077",
                    "--pidfile", os.path.join(self.data_dir, "clearskies.pid"),
                    "--logger", "clearskies.logfile.discard"]
        cmd += ["clearskies", "--data-dir", self.data_dir]
        for option in ("listen", "name", "tor_control", "tor_config"):
            value = getattr(args, option, None)
            if value:
                cmd += ["--" + option.replace("_", "-"), value]
        for flag in ("tor", "tor_only", "no_tor", "lan", "no_tracker", "no_peer"):
            if getattr(args, flag, False):
                cmd.append("--" + flag.replace("_", "-"))
        for tracker in getattr(args, "tracker", None) or []:
            cmd += ["--tracker", tracker]
        if args.command == "start":
            for peer in getattr(args, "peer", None) or []:
                cmd += ["--peer", peer]
        if getattr(args, "no_lan", False):
            cmd.append("--no-lan")
        return cmd

    def start_daemon(self, foreground: bool) -> int:
        os.makedirs(self.data_dir, mode=0o700, exist_ok=True)
        cmd = self.twistd_command(foreground)
        if foreground:
            return subprocess.call(cmd)
        # The daemon's output goes to an unnamed file: what a failed start says is
        # read from it (twistd prints a bad option on standard output, a start-up
        # failure on standard error), and a running daemon writing there harms nobody.
        with tempfile.TemporaryFile() as errors:
            process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                       stdout=errors, stderr=errors,
                                       cwd="/", start_new_session=True)
            deadline = self.monotonic() + DAEMON_START_TIMEOUT
            while self.monotonic() < deadline:
                status = process.poll()
                if status is not None:
                    raise CommandFailed("the daemon did not start: %s" % _start_error(
                        errors, status, self.data_dir))
                if self.daemon_running():
                    return EXIT_OK
                self.sleep(0.1)
        raise CommandFailed("the daemon did not answer within %d s; see %s" % (
            DAEMON_START_TIMEOUT, os.path.join(self.data_dir, "clearskies.log")))

    # -- output --------------------------------------------------------------

    def emit(self, data: Any, human: Callable[[], None]) -> None:
        if self.args.json:
            self.out.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
        else:
            human()

    def line(self, text: str = "") -> None:
        self.out.write(text + "\n")

    # -- commands ------------------------------------------------------------

    def cmd_start(self) -> int:
        if self.daemon_running():
            self.line("the daemon is already running (%s)" % self.data_dir)
            command = self.twistd_command(True)
            given = [option for option in command[command.index("clearskies") + 3:]
                     if option.startswith("--")]
            if given:
                # Not silently dropped: say how they take effect.
                self.err.write("clearskies: warning: %s not applied to the running daemon; "
                               "stop it and start it again with them (they are then kept), "
                               "or use 'clearskies config set'\n" % " ".join(given))
            return EXIT_OK
        code = self.start_daemon(foreground=self.args.foreground)
        if not self.args.foreground:
            self.line("daemon started (data in %s)" % self.data_dir)
        return code

    def cmd_stop(self) -> int:
        self.request({"type": "stop"})
        self.line("daemon stopping")
        return EXIT_OK

    def cmd_status(self) -> int:
        if self.args.path:
            request = {"type": ".clearskies.share_status",
                       "path": os.path.realpath(self.args.path)}
            if self.args.skipped:
                request["skipped"] = True
            reply = self.request(request)
            self.emit(reply, lambda: self.print_share_status(reply))
            # A share that stopped, or files the disk refused, need the user: not 0.
            return EXIT_ERROR if share_trouble(reply) else EXIT_OK
        if self.args.skipped:
            raise CommandFailed("--skipped lists one share's paths: give its folder, e.g. "
                                "clearskies status ~/Photos --skipped")
        reply = self.request({"type": "status"})

        def human() -> None:
            self.line("paused: %s" % ("yes" if reply.get("paused") else "no"))
            self.line("upload:   %s/s" % format_bytes(reply.get("upload_rate", 0)))
            self.line("download: %s/s" % format_bytes(reply.get("download_rate", 0)))
            if "shares" in reply:
                self.line("shares: %d" % reply["shares"])
            if reply.get("failed_attaches"):
                self.line("attaches that failed: %d (see: clearskies list)"
                          % reply["failed_attaches"])
            if reply.get("port"):
                self.line("listening for peers on port %d" % reply["port"])
            if reply.get("onion_address"):
                self.line("reachable through Tor at %s" % reply["onion_address"])
            if reply.get("tor_error"):
                self.line("Tor problem: %s" % reply["tor_error"])
        self.emit(reply, human)
        return EXIT_OK

    def print_share_status(self, share: dict[str, Any]) -> None:
        self.line("%s: %s%s" % (share.get("path"), share.get("status"),
                                (" (%s)" % share["problem"]) if share.get("problem") else ""))
        self.line("  %d files, %s, revision %s" % (
            share.get("files", 0), format_bytes(share.get("bytes", 0)), share.get("revision")))
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
            self.line("  skipped %s: %s" % (_printable(entry.get("path", "")),
                                            entry.get("reason")))
        if "skipped_paths" in share and len(share["skipped_paths"]) < share.get("skipped", 0):
            self.line("  (only the first %d are listed)" % len(share["skipped_paths"]))
        for peer in share.get("peers", []):
            self.line("  peer %s %s %s%s" % (
                peer.get("name") or peer.get("peer_id"), peer.get("access", ""),
                "connected" if peer.get("connected") else "offline",
                (", needs %d items" % peer["items_needed"]) if peer.get("items_needed") else ""))
        if share.get("items_to_download"):
            self.line("  downloading: %d items, %s left" % (
                share["items_to_download"], format_bytes(share.get("bytes_to_download", 0))))
        errors = share.get("disk_errors") or []
        for error in errors:
            self.line("  cannot write %s: %s" % (error.get("path"), error.get("error")))
        more = share.get("disk_errors_count", len(errors)) - len(errors)
        if more > 0:
            self.line("  … and %d more files" % more)

    def cmd_share(self) -> int:
        path = os.path.realpath(self.args.path)
        if not os.path.isdir(path):
            raise CommandFailed("%s is not a directory; create it first" % path)
        self.ensure_daemon()
        with self.client() as client:
            shares = client.request({"type": "list_shares"})["shares"]
            if not any(share["path"] == path for share in shares):
                created = client.request({"type": "create_share", "path": path})
                if created.get("warning"):
                    self.err.write("clearskies: warning: %s\n" % created["warning"])
            reply = client.request({
                "type": "create_access_code", "path": path, "mode": self.args.mode,
                "one_time": not self.args.multi_use, "expires": self.args.expires,
            })
        code = reply["access_code"]

        def human() -> None:
            self.line(code)
            self.line()
            self.line("On the other machine run:  clearskies attach %s DIRECTORY" % code)
            self.line("(or open %s)" % code_url(parse_code(code)))
            lifetime = self.args.expires
            self.line("This %s code %s." % (
                "multi-use" if self.args.multi_use else "one-time",
                "never expires" if lifetime is None else
                "expires in %s" % self.args.expires_text))
        self.emit({"access_code": code, "url": code_url(parse_code(code)), "path": path}, human)
        return EXIT_OK

    def cmd_attach(self) -> int:
        try:
            parse_code(self.args.code)
        except AccessCodeError as e:
            raise CommandFailed("invalid access code: %s" % e) from None
        path = os.path.realpath(self.args.path)
        self.ensure_daemon()
        request: dict[str, Any] = {"type": "add_share", "code": self.args.code, "path": path}
        if self.args.peer:
            request["peers"] = self.args.peer
        if self.args.merge:
            request["merge"] = True
        reply = self.request(request)
        if not self.args.wait:
            self.emit(reply or {"path": path}, lambda: self.line(
                "attached %s; it fills as soon as a peer is found "
                "(see: clearskies status %s)" % (path, path)))
            return EXIT_OK
        return self.wait_for_sync(path, self.args.timeout_wait, require_peer=True)

    def cmd_wait(self) -> int:
        path = os.path.realpath(self.args.path)
        return self.wait_for_sync(path, self.args.timeout_wait, require_peer=False)

    def wait_for_sync(self, path: str, timeout: float | None, require_peer: bool) -> int:
        """Poll the share until it is idle and every connected peer is in sync."""
        deadline = None if timeout is None else self.monotonic() + timeout
        progress = not self.args.json and self.err.isatty()
        while True:
            status = self.request({"type": ".clearskies.share_status", "path": path})
            if status.get("status") == "error":
                raise CommandFailed("share %s is in error: %s" % (path, status.get("problem")))
            if status.get("status") == "failed":
                raise CommandFailed("%s: %s" % (path, status.get("problem")))
            if status.get("disk_errors") and (
                    status.get("disk_blocked")
                    or status.get("items_to_download", 0) <= status.get("disk_errors_count", 0)):
                # Everything that could be written is; the rest waits for the user.
                if progress:
                    self.err.write("\n")
                raise CommandFailed("share %s cannot finish: %s" % (path, status.get("problem")))
            connected = [p for p in status.get("peers", []) if p.get("connected")]
            # In sync with nobody is not in sync: once the share knows a peer
            # (or an attach needs one), one must be connected and caught up.
            need_peer = require_peer or status.get("peers_known", 0) > 0
            in_sync = status.get("in_sync") and (connected or not need_peer)
            if in_sync:
                if progress:
                    self.err.write("\r\x1b[K")
                summary = "%s is in sync (%d files, %s)" % (
                    path, status.get("files", 0), format_bytes(status.get("bytes", 0)))
                self.emit(status, functools.partial(self.line, summary))
                return EXIT_OK
            waiting_for_peer = need_peer and not connected and status.get("status") != "waiting"
            if progress:
                if waiting_for_peer:
                    self.err.write("\r\x1b[K%s: %s, waiting for a peer to connect" % (
                        os.path.basename(path) or path, status.get("status")))
                elif status.get("local_changes_pending"):
                    self.err.write("\r\x1b[K%s: %s, local changes to scan" % (
                        os.path.basename(path) or path, status.get("status")))
                else:
                    self.err.write("\r\x1b[K%s: %s, %d items / %s to download, %s/s" % (
                        os.path.basename(path) or path, status.get("status"),
                        status.get("items_to_download", 0),
                        format_bytes(status.get("bytes_to_download", 0)),
                        format_bytes(status.get("download_rate", 0))))
                self.err.flush()
            if deadline is not None and self.monotonic() >= deadline:
                if progress:
                    self.err.write("\n")
                why = status.get("problem") or (
                    "no peer connected (waiting for a peer to connect)"
                    if waiting_for_peer and status.get("peers_known", 0) > 0 else "")
                raise CommandFailed("not in sync after %g s%s" % (
                    timeout, ": " + why if why else ""), EXIT_TIMEOUT)
            self.sleep(0.25)

    def cmd_scan(self) -> int:
        path = os.path.realpath(self.args.path)
        reply = self.request({"type": ".clearskies.scan", "path": path})
        self.emit(reply, lambda: self.line("scanned %s: %d changes" % (
            path, reply.get("changes", 0))))
        return EXIT_OK

    def cmd_repair(self) -> int:
        path = os.path.realpath(self.args.path)
        reply = self.request({"type": ".clearskies.repair", "path": path})
        self.emit(reply, lambda: self.line(
            "%s: marker recreated (%d of %d recorded files present); the share resumes"
            % (path, reply.get("present", 0), reply.get("checked", 0))
            if reply.get("repaired") else "%s: the marker is in place; nothing to repair" % path))
        return EXIT_OK

    def cmd_revert(self) -> int:
        path = os.path.realpath(self.args.path)
        reply = self.request({"type": ".clearskies.revert", "path": path})
        def text() -> None:
            self.line("%s: %d local changes reverted (%d files being restored from peers, "
                      "%d removed)" % (path, reply.get("changes", 0), reply.get("restoring", 0),
                                       reply.get("removed", 0)))
            if reply.get("complete") is False:
                self.line("  the share's full file list has not all arrived yet, so files "
                          "that may be in it were kept; run revert again once the share is "
                          "in sync")

        self.emit(reply, text)
        return EXIT_OK

    def cmd_detach(self) -> int:
        path = os.path.realpath(self.args.path)
        self.request({"type": "remove_share", "path": path})
        self.line("%s is no longer synced (its files stay where they are)" % path)
        return EXIT_OK

    def cmd_list(self) -> int:
        shares = self.request({"type": "list_shares"})["shares"]

        def human() -> None:
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
        self.emit({"shares": shares}, human)
        return EXIT_OK

    def cmd_peers(self) -> int:
        path = os.path.realpath(self.args.path)
        if self.args.peers_action == "add":
            self.request({"type": ".clearskies.add_peer", "path": path,
                          "address": self.args.address})
            self.line("added %s to %s" % (self.args.address, path))
            return EXIT_OK
        peers = self.request({"type": ".clearskies.peers", "path": path})["peers"]

        def human() -> None:
            if not peers:
                self.line("no peers known yet")
            for peer in peers:
                self.line("%s  %-10s %-9s %s" % (
                    peer.get("peer_id"), peer.get("access", ""),
                    "connected" if peer.get("connected") else "offline",
                    peer.get("name") or ", ".join(peer.get("addresses", []))))
        self.emit({"peers": peers}, human)
        return EXIT_OK

    def cmd_codes(self) -> int:
        path = os.path.realpath(self.args.path)
        codes = self.request({"type": ".clearskies.codes", "path": path})["codes"]

        def human() -> None:
            if not codes:
                self.line("no live access codes")
            for code in codes:
                self.line("%s  %-10s %s %s" % (
                    code["access_id"][:16], code["level"],
                    "one-time" if code.get("one_time") else "multi-use",
                    "never expires" if code.get("expires") is None else
                    time.strftime("expires %Y-%m-%d %H:%M", time.localtime(code["expires"]))))
        self.emit({"codes": codes}, human)
        return EXIT_OK

    def cmd_cancel_code(self) -> int:
        value = self.args.code
        request: dict[str, Any] = {"type": ".clearskies.cancel_code"}
        if re.fullmatch(r"[0-9a-fA-F]{8,64}", value):
            request["access_id"] = value.lower()
        else:
            try:
                parse_code(value)
            except AccessCodeError as e:
                raise CommandFailed("invalid access code: %s" % e) from None
            request["code"] = value
        self.request(request)
        self.line("access code cancelled")
        return EXIT_OK

    def cmd_pause(self) -> int:
        self.request({"type": "pause"})
        self.line("paused: no transfers until 'clearskies resume'")
        return EXIT_OK

    def cmd_resume(self) -> int:
        self.request({"type": "resume"})
        self.line("resumed")
        return EXIT_OK

    def cmd_log(self) -> int:
        log_path = os.path.join(self.data_dir, "clearskies.log")
        if not os.path.exists(log_path):
            raise CommandFailed("no log at %s (is the daemon started with 'clearskies start'?)"
                                % log_path)
        with open(log_path, encoding="utf-8", errors="replace") as log:
            lines = collections.deque(log, maxlen=max(0, self.args.lines))
            self.out.write("".join(lines))
            self.out.flush()
            while self.args.follow:
                line = log.readline()
                if line:
                    self.out.write(line)
                    self.out.flush()
                else:
                    self.sleep(0.5)
        return EXIT_OK

    def cmd_config(self) -> int:
        if self.args.config_action == "get":
            if self.args.key:
                reply = self.request({"type": "get_config_value", "key": self.args.key})
                self.emit(reply, lambda: self.line(json.dumps(reply.get("value"))))
            else:
                reply = self.request({"type": "get_config"})
                self.emit(reply, lambda: [self.line("%s = %s" % (k, json.dumps(v)))
                                          for k, v in sorted(reply.get("config", {}).items())])
            return EXIT_OK
        try:
            value = json.loads(self.args.value)
        except ValueError:
            value = self.args.value
        if self.args.key in ("name", "listen"):
            value = self.args.value  # text, even when it looks like a number
        reply = self.request({"type": "set_config_value", "key": self.args.key,
                              "value": value})
        value = reply.get("value", value)
        self.line("%s = %s%s" % (self.args.key, json.dumps(value),
                                 " (%s)" % reply["note"] if reply.get("note") else ""))
        return EXIT_OK


def _auto_start_options(parser: argparse.ArgumentParser) -> None:
    """Options for the daemon that ``share``/``attach`` start when none is running."""
    group = parser.add_argument_group("if the daemon has to be started")
    group.add_argument("--listen", help="endpoint for peer connections (default tcp:60106, or a free port)")
    group.add_argument("--no-lan", action="store_true", help="no LAN discovery")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clearskies",
        description="Keep directories in sync with your other machines, peer to peer.",
        epilog="Quick start: 'clearskies share DIR' prints a code; on the other machine "
               "'clearskies attach CODE DIR'.",
    )
    parser.add_argument("--version", action="version", version="clearskies " + __version__)
    parser.add_argument("--data-dir", default=os.environ.get("CLEARSKIES_DATA_DIR"),
                        help="the daemon's data directory (default: $CLEARSKIES_DATA_DIR or "
                             "~/.local/share/clearskies); selects one of several daemons")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--timeout", type=float, default=30.0,
                        help="seconds to wait for each daemon reply (default 30)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    start = sub.add_parser(
        "start", help="start the daemon in the background",
        description="Start the daemon. Its options are kept: a later plain 'clearskies "
                    "start' uses them again, an option given again replaces the kept one "
                    "('clearskies config get' shows them).")
    start.add_argument("--foreground", action="store_true", help="stay in the foreground")
    start.add_argument("--listen", help="endpoint for peer connections (default tcp:60106, or a free port)")
    start.add_argument("--name", help="the name other peers see for this machine")
    start.add_argument("--tracker", action="append", help="tracker URL (repeatable)")
    start.add_argument("--no-tracker", action="store_true",
                       help="forget the trackers kept from earlier starts")
    start.add_argument("--peer", action="append", metavar="HOST:PORT",
                       help="a peer to connect to for every share (repeatable)")
    start.add_argument("--no-peer", action="store_true",
                       help="forget the peers kept from earlier starts")
    start.add_argument("--no-lan", action="store_true", help="no LAN discovery")
    start.add_argument("--lan", action="store_true",
                       help="LAN discovery again after an earlier --no-lan")
    start.add_argument("--tor", action="store_true",
                       help="also be reachable through Tor (an onion service)")
    start.add_argument("--tor-only", action="store_true",
                       help="use nothing but Tor: no public port, no LAN, all traffic through Tor")
    start.add_argument("--no-tor", action="store_true", help="turn Tor off again")
    start.add_argument("--tor-control", metavar="ENDPOINT",
                       help="use a running tor's control port instead of starting one")
    start.add_argument("--tor-config", metavar="FILE",
                       help="advanced/testing: JSON file of extra torrc options")
    sub.add_parser("stop", help="stop the daemon")

    status = sub.add_parser("status", help="daemon status, or one share's with PATH")
    status.add_argument("path", nargs="?")
    status.add_argument("--skipped", action="store_true",
                        help="list the share's paths that are not synced, and why")

    share = sub.add_parser("share", help="share a directory and print an access code")
    share.add_argument("path")
    share.add_argument("--mode", choices=["read_write", "read_only"],
                       default="read_write", help="what the code's holder may do")
    share.add_argument("--multi-use", action="store_true", help="the code can be used again")
    share.add_argument("--expires", default="24h",
                       help="code lifetime: e.g. 1h, 24h, 7d or never (default 24h)")
    _auto_start_options(share)

    attach = sub.add_parser("attach", help="sync a directory using an access code")
    attach.add_argument("code")
    attach.add_argument("path")
    attach.add_argument("--peer", action="append", metavar="HOST:PORT",
                        help="address of a peer that has the share (repeatable)")
    attach.add_argument("--merge", action="store_true",
                        help="the directory may hold files: the share's version of each name "
                             "wins, yours become conflict copies, files only you have are "
                             "shared")
    attach.add_argument("--wait", action="store_true", help="wait until in sync, show progress")
    attach.add_argument("--timeout-wait", type=float, default=None, metavar="SECONDS")
    _auto_start_options(attach)

    detach = sub.add_parser("detach", help="stop syncing a directory (files stay)")
    detach.add_argument("path")
    sub.add_parser("list", help="list shares")
    repair = sub.add_parser("repair", help="recreate a share's lost .clearskies marker "
                                           "(after checking the folder holds its files)")
    repair.add_argument("path")
    revert = sub.add_parser("revert", help="read-only share: undo local changes under PATH")
    revert.add_argument("path")

    peers = sub.add_parser("peers", help="list a share's peers, or 'peers add PATH HOST:PORT'")
    peers.add_argument("peers_action", nargs="?", choices=["list", "add"], default="list")
    peers.add_argument("path")
    peers.add_argument("address", nargs="?")

    codes = sub.add_parser("codes", help="list a share's live access codes")
    codes.add_argument("path")
    cancel = sub.add_parser("cancel-code", help="cancel an access code (code or access ID)")
    cancel.add_argument("code")

    sub.add_parser("pause", help="pause all transfers")
    sub.add_parser("resume", help="resume transfers")

    log = sub.add_parser("log", help="show the daemon's log")
    log.add_argument("-f", "--follow", action="store_true")
    log.add_argument("-n", "--lines", type=int, default=50)

    config = sub.add_parser("config", help="'config get [KEY]' or 'config set KEY VALUE'")
    config.add_argument("config_action", choices=["get", "set"])
    config.add_argument("key", nargs="?")
    config.add_argument("value", nargs="?")

    scan = sub.add_parser("scan", help="rescan a share now and wait for it")
    scan.add_argument("path")
    wait = sub.add_parser("wait", help="wait until every connected peer is in sync")
    wait.add_argument("path")
    wait.add_argument("--timeout", dest="timeout_wait", type=float, default=None,
                      metavar="SECONDS", help="give up (exit 3) after this long")
    return parser


def main(argv: list[str] | None = None, out: TextIO = sys.stdout,
         err: TextIO = sys.stderr) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(out)
        return EXIT_OK
    if args.command == "share":
        args.expires_text = args.expires
        try:
            args.expires = parse_duration(args.expires)
        except argparse.ArgumentTypeError as e:
            parser.error(str(e))
    if args.command == "peers" and args.peers_action == "add" and not args.address:
        parser.error("peers add needs PATH and HOST:PORT")
    if args.command == "config" and args.config_action == "set" and (
            args.key is None or args.value is None):
        parser.error("config set needs KEY and VALUE")
    cli = Cli(args, out, err)
    handler = getattr(cli, "cmd_" + args.command.replace("-", "_"))
    try:
        return handler()
    except CommandFailed as e:
        err.write("clearskies: %s\n" % e)
        return e.exit_code
    except ControlError as e:
        err.write("clearskies: %s\n" % " ".join(str(e.message or e.code).split()))
        return EXIT_ERROR
    except DaemonNotRunning as e:
        err.write("clearskies: %s\n" % e)
        return EXIT_NO_DAEMON
    except TimeoutError:
        err.write("clearskies: the daemon did not answer within %g s\n" % args.timeout)
        return EXIT_TIMEOUT
    except (ProtocolError, ConfigurationError) as e:
        err.write("clearskies: %s\n" % e)
        return EXIT_ERROR
    except OSError as e:
        err.write("clearskies: %s\n" % (e.strerror or e))
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
