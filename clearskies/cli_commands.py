"""The commands of ``clearskies``, in three groups a :class:`~clearskies.cli.Cli` combines.

- :class:`DaemonCommands`: the daemon itself (start, stop, status, pause, resume,
  log, config);
- :class:`ShareCommands`: one folder's share (share, attach, wait, scan, repair,
  revert, detach, list);
- :class:`AccessCommands`: who may sync a share (peers, codes, cancel-code).

Each ``cmd_<name>`` method asks the daemon through the control socket
(``self.request``, ``self.client``, protocol/control.md) and prints through
``self.output`` (:mod:`clearskies.cli_output`); a failure the user sees is a
:class:`CommandFailed`.  The groups hold no state of their own: they use the
attributes :class:`~clearskies.cli.Cli` sets up.
"""

from __future__ import annotations

import collections
import functools
import json
import os
import shutil
import re
from typing import Any

from clearskies.accesscode import code_url, parse_code
from clearskies.cli_progress import Progress
from clearskies.cli_output import format_bytes, parse_setting_units
from clearskies.errors import AccessCodeError

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_NO_DAEMON = 2
EXIT_TIMEOUT = 3


class CommandFailed(Exception):
    """A CLI command failed; the message is the one line the user sees."""

    def __init__(self, message: str, exit_code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def share_trouble(share: dict[str, Any]) -> bool:
    """True when a share's status needs the user: stopped in error, files it cannot
    write, files damaged on disk, or not synced for too long (``warnings``)."""
    return share.get("status") == "error" or bool(share.get("disk_errors")) \
        or bool(share.get("warnings")) or bool(share.get("damaged"))


class DaemonCommands:
    """``start``, ``stop``, ``status``, ``pause``, ``resume``, ``log`` and ``config``."""

    def cmd_start(self) -> int:
        if self.daemon_running():
            self.output.line("the daemon is already running (%s)" % self.data_dir)
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
            self.output.line("daemon started (data in %s)" % self.data_dir)
        return code

    def cmd_stop(self) -> int:
        reply = self.request({"type": "stop"})
        self.output.emit(reply, lambda: self.output.line("daemon stopping"))
        return EXIT_OK

    def cmd_status(self) -> int:
        if self.args.path:
            request = {"type": ".clearskies.share_status",
                       "path": os.path.realpath(self.args.path)}
            if self.args.skipped:
                request["skipped"] = True
            reply = self.request(request)
            self.output.emit(reply, lambda: self.output.share_status(reply))
            # A share that stopped, or files the disk refused, need the user: not 0.
            return EXIT_ERROR if share_trouble(reply) else EXIT_OK
        if self.args.skipped:
            raise CommandFailed("--skipped lists one share's paths: give its folder, e.g. "
                                "clearskies status ~/Photos --skipped")
        reply = self.request({"type": "status"})

        self.output.emit(reply, lambda: self.output.daemon_status(reply))
        return EXIT_OK

    def cmd_pause(self) -> int:
        if getattr(self.args, "path", None):
            path = os.path.realpath(self.args.path)
            reply = self.request({"type": "pause", "path": path})
            self.output.emit(reply, lambda: self.output.line(
                "%s paused: it neither sends nor receives until 'clearskies resume %s'"
                % (path, path)))
            return EXIT_OK
        reply = self.request({"type": "pause"})
        self.output.emit(reply, lambda: self.output.line(
            "paused: no transfers until 'clearskies resume'"))
        return EXIT_OK

    def cmd_resume(self) -> int:
        if getattr(self.args, "path", None):
            path = os.path.realpath(self.args.path)
            reply = self.request({"type": "resume", "path": path})
            self.output.emit(reply, lambda: self.output.line("%s resumed" % path))
            return EXIT_OK
        reply = self.request({"type": "resume"})
        self.output.emit(reply, lambda: self.output.line("resumed"))
        return EXIT_OK

    def cmd_log(self) -> int:
        log_path = os.path.join(self.data_dir, "clearskies.log")
        if not os.path.exists(log_path):
            raise CommandFailed("no log at %s (is the daemon started with 'clearskies start'?)"
                                % log_path)
        with open(log_path, encoding="utf-8", errors="replace") as log:
            lines = collections.deque(log, maxlen=max(0, self.args.lines))
            self.out.write("".join(self.output.log_line(line) for line in lines))
            self.out.flush()
            while self.args.follow:
                line = log.readline()
                if line:
                    self.out.write(self.output.log_line(line))
                    self.out.flush()
                else:
                    self.sleep(0.5)
        return EXIT_OK

    def cmd_config(self) -> int:
        if getattr(self.args, "share", None):
            return self.share_config(os.path.realpath(self.args.share))
        if self.args.config_action == "get":
            if self.args.key:
                reply = self.request({"type": "get_config_value", "key": self.args.key})
                self.output.emit(reply, lambda: self.output.line(json.dumps(reply.get("value"))))
            else:
                reply = self.request({"type": "get_config"})
                self.output.emit(reply, lambda: [
                    self.output.line("%s = %s" % (k, json.dumps(v)))
                    for k, v in sorted(reply.get("config", {}).items())])
            return EXIT_OK
        try:
            value = json.loads(self.args.value)
        except ValueError:
            value = parse_setting_units(self.args.key, self.args.value)
        if self.args.key in ("name", "listen"):
            value = self.args.value  # text, even when it looks like a number
        reply = self.request({"type": "set_config_value", "key": self.args.key,
                              "value": value})
        value = reply.get("value", value)
        self.output.emit(reply, lambda: self.output.line("%s = %s%s" % (
            self.args.key, json.dumps(value),
            " (%s)" % reply["note"] if reply.get("note") else "")))
        return EXIT_OK


    def share_config(self, path: str) -> int:
        """``config get|set … --share DIR``: one share's own settings."""
        if self.args.config_action == "get":
            reply = self.request({"type": ".clearskies.get_share_config", "path": path})
            config = reply.get("config", {})
            if self.args.key:
                if self.args.key not in config:
                    raise CommandFailed("no share setting %r; share settings: %s"
                                        % (self.args.key, ", ".join(sorted(config))))
                value = config[self.args.key]
                self.output.emit({"key": self.args.key, "value": value},
                                 lambda: self.output.line(json.dumps(value)))
            else:
                self.output.emit(reply, lambda: [
                    self.output.line("%s = %s" % (k, json.dumps(v)))
                    for k, v in sorted(config.items())])
            return EXIT_OK
        try:
            value = json.loads(self.args.value)
        except ValueError:
            value = self.args.value
        reply = self.request({"type": ".clearskies.set_share_config", "path": path,
                              "key": self.args.key, "value": value})
        self.output.line("%s: %s = %s" % (path, self.args.key,
                                          json.dumps(reply.get("value", value))))
        return EXIT_OK


class ShareCommands:
    """``share``, ``attach``, ``wait``, ``scan``, ``repair``, ``revert``, ``detach``, ``list``."""

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
            self.output.line(code)
            self.output.line()
            self.output.line("On the other machine run:  clearskies attach %s DIRECTORY" % code)
            self.output.line("(or open %s)" % code_url(parse_code(code)))
            lifetime = self.args.expires
            self.output.line("This %s code %s." % (
                "multi-use" if self.args.multi_use else "one-time",
                "never expires" if lifetime is None else
                "expires in %s" % self.args.expires_text))
            if self.args.mode == "untrusted":
                self.output.line("That machine keeps an encrypted backup it cannot read. To "
                                 "restore without your machines, save the keys now: "
                                 "clearskies export-keys %s FILE" % path)
        self.output.emit({"access_code": code, "url": code_url(parse_code(code)), "path": path},
                         human)
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
            self.output.emit(reply or {"path": path}, lambda: self.output.line(
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
        # A bar on a terminal, a plain line every few seconds otherwise; nothing with --json.
        meter = None if self.args.json else Progress(
            self.err, path, terminal=progress, width=shutil.get_terminal_size().columns)
        while True:
            status = self.request({"type": ".clearskies.share_status", "path": path,
                                   "conflicts": False})
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
                self.output.emit(status, functools.partial(self.output.line, summary))
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
                    assert meter is not None
                    meter.show(status, self.monotonic())
                self.err.flush()
            elif meter is not None and status.get("items_to_download"):
                meter.show(status, self.monotonic())
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
        self.output.emit(reply, lambda: self.output.line("scanned %s: %d changes" % (
            path, reply.get("changes", 0))))
        return EXIT_OK

    def cmd_verify(self) -> int:
        path = os.path.realpath(self.args.path)
        reply = self.request({"type": ".clearskies.verify", "path": path})
        damaged = reply.get("damaged", [])

        def text() -> None:
            self.output.line("verified %s: %d files read back, %d damaged" % (
                path, reply.get("checked", 0), len(damaged)))
            for entry in damaged:
                self.output.line("  damaged on disk (bit rot): %s (%s)" % (
                    entry.get("path"), "a clean copy is being fetched from a peer"
                    if entry.get("state") == "fetching" else "no peer connected to fetch "
                    "a clean copy from yet"))
        self.output.emit(reply, text)
        return EXIT_ERROR if damaged else EXIT_OK

    def cmd_repair(self) -> int:
        path = os.path.realpath(self.args.path)
        reply = self.request({"type": ".clearskies.repair", "path": path})
        self.output.emit(reply, lambda: self.output.line(
            "%s: marker recreated (%d of %d recorded files present); the share resumes"
            % (path, reply.get("present", 0), reply.get("checked", 0))
            if reply.get("repaired") else "%s: the marker is in place; nothing to repair" % path))
        return EXIT_OK

    def cmd_revert(self) -> int:
        path = os.path.realpath(self.args.path)
        reply = self.request({"type": ".clearskies.revert", "path": path})
        def text() -> None:
            self.output.line("%s: %d local changes reverted (%d files being restored from "
                             "peers, %d removed)" % (path, reply.get("changes", 0),
                                                     reply.get("restoring", 0),
                                                     reply.get("removed", 0)))
            if reply.get("complete") is False:
                self.output.line("  the share's full file list has not all arrived yet, so "
                                 "files that may be in it were kept; run revert again once "
                                 "the share is in sync")

        self.output.emit(reply, text)
        return EXIT_OK

    def cmd_detach(self) -> int:
        path = os.path.realpath(self.args.path)
        reply = self.request({"type": "remove_share", "path": path})
        self.output.emit(dict(reply, path=path), lambda: self.output.line(
            "%s is no longer synced (its files stay where they are)" % path))
        return EXIT_OK

    def cmd_list(self) -> int:
        shares = self.request({"type": "list_shares"})["shares"]
        self.output.emit({"shares": shares}, lambda: self.output.share_list(shares))
        return EXIT_OK


class AccessCommands:
    """``peers``, ``codes`` and ``cancel-code``: who may sync a share."""

    def cmd_peers(self) -> int:
        path = os.path.realpath(self.args.path)
        if self.args.peers_action == "add":
            self.request({"type": ".clearskies.add_peer", "path": path,
                          "address": self.args.address})
            self.output.line("added %s to %s" % (self.args.address, path))
            return EXIT_OK
        peers = self.request({"type": ".clearskies.peers", "path": path})["peers"]
        self.output.emit({"peers": peers}, lambda: self.output.peers(peers))
        return EXIT_OK

    def cmd_codes(self) -> int:
        path = os.path.realpath(self.args.path)
        codes = self.request({"type": ".clearskies.codes", "path": path})["codes"]
        self.output.emit({"codes": codes}, lambda: self.output.codes(codes))
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
        self.output.line("access code cancelled")
        return EXIT_OK
