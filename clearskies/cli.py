"""The ``clearskies`` command: a thin client of the daemon's control socket.

Every command except ``start`` and ``log`` is one or a few control-socket
requests (protocol/control.md).  ``share`` and ``attach`` start the daemon
first when none is running, so a new user needs a single command.

What the command is made of:

- this module: the argument parser, :func:`main`, and :class:`Cli`, one
  invocation: how it reaches the daemon and starts one when none runs;
- :mod:`clearskies.cli_commands`: the commands, in groups (the daemon, a share,
  who may sync it), each a ``cmd_<name>`` method that :class:`Cli` combines;
- :mod:`clearskies.cli_output`: how a reply is printed (``--json`` or lines).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any, TextIO

from clearskies import __version__
from clearskies.cli_commands import (
    EXIT_ERROR,
    EXIT_NO_DAEMON,
    EXIT_OK,
    EXIT_TIMEOUT,
    AccessCommands,
    CommandFailed,
    DaemonCommands,
    ShareCommands,
    share_trouble,
)
from clearskies.cli_gui import GuiCommands
from clearskies.cli_gui import add_arguments as add_gui_arguments
from clearskies.cli_output import Output, format_bytes
from clearskies.cli_versions import VersionCommands, add_arguments, config_share_option
from clearskies.cli_conflicts import ConflictCommands
from clearskies.cli_keys import KeyCommands
from clearskies.cli_keys import add_arguments as add_key_arguments
from clearskies.cli_conflicts import add_arguments as add_conflict_arguments
from clearskies.control.client import (
    ControlClient,
    ControlError,
    DaemonNotRunning,
    default_control_path,
    default_data_dir,
)
from clearskies.errors import ConfigurationError, ProtocolError

__all__ = [
    "EXIT_ERROR", "EXIT_NO_DAEMON", "EXIT_OK", "EXIT_TIMEOUT", "Cli", "CommandFailed",
    "build_parser", "format_bytes", "main", "parse_duration", "share_trouble",
]

DAEMON_START_TIMEOUT = 30.0


def parse_duration(text: str) -> float | None:
    """``24h``, ``30m``, ``7d``, ``90s`` or ``never`` → seconds (None = never).

    A zero lifetime is refused: a code that expires at once is of no use, and
    "never" is spelled ``never``.
    """
    text = text.strip().lower()
    if text in ("never", "none"):
        return None
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhdw]?)", text)
    if not match:
        raise argparse.ArgumentTypeError(
            "%r is not a duration; use e.g. 90s, 30m, 24h, 7d or never" % text)
    unit = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[match.group(2)]
    seconds = float(match.group(1)) * unit
    if seconds == 0:
        raise argparse.ArgumentTypeError(
            "%r: a code that expires at once is of no use; give a lifetime such as 24h or 7d, "
            "or never for a code that does not expire" % text)
    return seconds


def parse_timeout(text: str) -> float:
    """A ``--timeout``: seconds, or with a unit (``90s``, ``5m``, ``1.5h``, ``1d``)."""
    match = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)\s*(s|sec|m|min|h|d)?", text.strip().lower())
    if not match:
        raise argparse.ArgumentTypeError(
            "%r is not a timeout; give seconds or a duration such as 30s, 5m or 1h" % text)
    unit = {None: 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}
    seconds = float(match.group(1)) * unit[match.group(2)]
    if seconds > 10 ** 9:
        raise argparse.ArgumentTypeError("%r is too long a timeout" % text)
    return seconds


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


class Cli(GuiCommands, VersionCommands, ConflictCommands, KeyCommands, DaemonCommands,
          ShareCommands, AccessCommands):
    """One CLI invocation: the parsed arguments, where to print, how to reach the daemon.

    The commands come from the groups of :mod:`clearskies.cli_commands`; what
    they print goes through ``self.output``.
    """

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
        self.output = Output(out, args.json)

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
        for option in ("listen", "name", "tor_control", "tor_config", "web", "compress"):
            value = getattr(args, option, None)
            if value:
                cmd += ["--" + option.replace("_", "-"), value]
        for flag in ("tor", "tor_only", "no_tor", "lan", "no_tracker", "no_peer", "no_web"):
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
    parser.add_argument("--timeout", type=parse_timeout, default=30.0, metavar="SECONDS",
                        help="how long to wait for each daemon reply (default 30; units: "
                             "30s, 5m)")
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
    start.add_argument("--web", metavar="ENDPOINT",
                       help="the web UI's endpoint (default tcp:60180:interface=127.0.0.1)")
    start.add_argument("--no-web", action="store_true", help="no web UI or HTTP API")
    start.add_argument("--compress", choices=("gzip", "off"),
                       help="gzip: offer compressed connections (pays on links slower than "
                            "the CPU); default off (not kept: give it at every start)")
    sub.add_parser("stop", help="stop the daemon")

    status = sub.add_parser("status", help="daemon status, or one share's with PATH")
    status.add_argument("path", nargs="?")
    status.add_argument("--skipped", action="store_true",
                        help="list the share's paths that are not synced, and why")

    share = sub.add_parser("share", help="share a directory and print an access code")
    share.add_argument("path")
    share.add_argument("--mode", choices=["read_write", "read_only", "untrusted"],
                       default="read_write",
                       help="what the code's holder may do (untrusted: keep an encrypted "
                            "backup it cannot read)")
    share.add_argument("--multi-use", action="store_true", help="the code can be used again")
    share.add_argument("--expires", default="24h",
                       help="code lifetime: e.g. 1h, 24h, 7d or never (default 24h; 0 is refused)")
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
    attach.add_argument("--timeout", dest="timeout_wait", type=parse_timeout, default=None,
                        metavar="SECONDS", help="with --wait: give up (exit 3) after this "
                                                "long (seconds, or 30s, 5m, 1h)")
    attach.add_argument("--timeout-wait", dest="timeout_wait", type=parse_timeout,
                        help=argparse.SUPPRESS)  # the old spelling
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

    pause = sub.add_parser("pause", help="pause all transfers, or one share's with PATH")
    pause.add_argument("path", nargs="?")
    resume = sub.add_parser("resume", help="resume transfers, or one share's with PATH")
    resume.add_argument("path", nargs="?")

    log = sub.add_parser("log", help="show the daemon's log")
    log.add_argument("-f", "--follow", action="store_true")
    log.add_argument("-n", "--lines", type=int, default=50)

    config = sub.add_parser("config", help="'config get [KEY]' or 'config set KEY VALUE'")
    config.add_argument("config_action", choices=["get", "set"])
    config.add_argument("key", nargs="?")
    config.add_argument("value", nargs="?")
    config.add_argument("--share", metavar="DIR",
                        help="a share's own settings instead of the daemon's: watcher, "
                             "versions (off, trash, simple, staggered), versions_days, "
                             "versions_keep, versions_max_bytes")
    config_share_option(config)
    add_arguments(sub)
    add_conflict_arguments(sub)
    add_gui_arguments(sub)
    add_key_arguments(sub)

    scan = sub.add_parser("scan", help="rescan a share now and wait for it")
    scan.add_argument("path")
    verify = sub.add_parser("verify", help="read a share's files back against their "
                                           "SHA-256 now (bit rot)")
    verify.add_argument("path")
    wait = sub.add_parser("wait", help="wait until every connected peer is in sync")
    wait.add_argument("path")
    wait.add_argument("--timeout", dest="timeout_wait", type=parse_timeout, default=None,
                      metavar="SECONDS", help="give up (exit 3) after this long (seconds, "
                                              "or 30s, 5m, 1h)")
    _json_after_command(sub)
    return parser


def _json_after_command(sub: Any) -> None:
    """``--json`` after the command too (``clearskies list --json``), for every command."""
    for command in sub.choices.values():
        if any("--json" in action.option_strings for action in command._actions):
            continue
        command.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                             help="machine-readable output")


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
