"""The ``clearskies`` command, run in-process against a scripted fake daemon.

The fake daemon is the real control-socket server (``ControlFactory`` on a
UNIX socket in a temp dir, real reactor) with a dispatcher that records every
request and answers from a script.  The CLI's client blocks, so ``main()``
runs in a worker thread.  ``Cli.start_daemon`` is patched to fail, so no test
here can ever start a real daemon.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from io import StringIO
from typing import Any

import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from clearskies import cli
from clearskies.accesscode import access_id, code_url, format_code
from clearskies.control.protocol import (
    CommandDispatcher,
    ControlError,
    ControlFactory,
    ControlProtocol,
    listen_control,
)
from tests.helpers import async_test

CODE_BYTES = bytes(range(16))
CODE = format_code(CODE_BYTES)
ACCESS_ID = access_id(CODE_BYTES)

SUBCOMMANDS = [
    "start", "stop", "status", "share", "attach", "detach", "list", "peers", "codes",
    "cancel-code", "pause", "resume", "log", "config", "scan", "wait", "export-keys",
    "import-keys",
]


@dataclass
class Run:
    """What one CLI invocation returned and printed."""

    code: int
    out: str
    err: str


def run_main(*argv: str) -> Run:
    out, err = StringIO(), StringIO()
    code = cli.main(list(argv), out=out, err=err)
    return Run(code, out.getvalue(), err.getvalue())


def no_daemon_start(self: cli.Cli, foreground: bool) -> int:
    raise AssertionError("the CLI tried to start a real daemon during a test")


# -- pure parts: no daemon needed ------------------------------------------------


@pytest.mark.parametrize("text, seconds", [
    ("90s", 90.0),
    ("90", 90.0),
    ("30m", 1800.0),
    ("24h", 86400.0),
    ("7d", 604800.0),
    ("2w", 1209600.0),
    ("1.5h", 5400.0),
    (" 7D ", 604800.0),
    ("24 h", 86400.0),
    ("never", None),
    ("NEVER", None),
    ("none", None),
])
def test_parse_duration(text, seconds):
    """parse_duration turns the documented spellings into seconds, or None for never."""
    assert cli.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "abc", "-1h", "5y", "1.2.3h", "7 days", "1h30m"])
def test_parse_duration_rejects(text):
    """Anything but a number with one unit letter is refused with an example in the message."""
    with pytest.raises(argparse.ArgumentTypeError, match="not a duration; use e.g."):
        cli.parse_duration(text)


@pytest.mark.parametrize("text", ["0", "0s", "0h", "0.0d"])
def test_parse_duration_rejects_a_lifetime_that_ends_at_once(text):
    """A zero lifetime is not "never" (that is spelled never): a code that expires at once is refused."""
    with pytest.raises(argparse.ArgumentTypeError, match="expires at once.*never"):
        cli.parse_duration(text)


def test_share_expires_0_is_a_usage_error(capsys):
    """`share --expires 0` stops at argument parsing: no code that never expires is made."""
    with pytest.raises(SystemExit) as caught:
        cli.main(["share", ".", "--expires", "0"], out=StringIO(), err=StringIO())
    assert caught.value.code == 2
    assert "expires at once" in capsys.readouterr().err


@pytest.mark.parametrize("count, text", [
    (0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"),
    (5 * 1024 ** 2, "5.0 MiB"), (3 * 1024 ** 4, "3.0 TiB"), (2048 * 1024 ** 4, "2048.0 TiB"),
])
def test_format_bytes(count, text):
    """Byte counts print in binary units with one decimal, plain bytes without."""
    assert cli.format_bytes(count) == text


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help_for_every_subcommand(command, capsys):
    """`clearskies COMMAND --help` prints that command's usage and exits 0."""
    with pytest.raises(SystemExit) as caught:
        cli.main([command, "--help"], out=StringIO(), err=StringIO())
    assert caught.value.code == 0
    assert capsys.readouterr().out.startswith("usage: clearskies " + command)


def test_top_level_help_lists_every_command(capsys):
    """`clearskies --help` exits 0 and names every subcommand this file tests."""
    with pytest.raises(SystemExit) as caught:
        cli.main(["--help"])
    assert caught.value.code == 0
    text = capsys.readouterr().out
    for command in SUBCOMMANDS:
        assert "    " + command + " " in text, command


def test_no_command_prints_help():
    """Without a command the CLI prints its help to `out` and exits 0."""
    run = run_main()
    assert run.code == cli.EXIT_OK
    assert run.out.startswith("usage: clearskies")
    assert "Quick start" in run.out


def test_version(capsys):
    """--version prints the package version."""
    with pytest.raises(SystemExit) as caught:
        cli.main(["--version"])
    assert caught.value.code == 0
    assert capsys.readouterr().out.strip() == "clearskies " + cli.__version__


def test_bad_duration_is_a_usage_error(capsys):
    """`share --expires soon` stops at argument parsing, naming the bad value."""
    with pytest.raises(SystemExit) as caught:
        cli.main(["share", ".", "--expires", "soon"], out=StringIO(), err=StringIO())
    assert caught.value.code == 2
    assert "'soon' is not a duration" in capsys.readouterr().err


@pytest.mark.parametrize("argv, complaint", [
    (["peers", "add", "/p"], "peers add needs PATH and HOST:PORT"),
    (["config", "set", "key"], "config set needs KEY and VALUE"),
])
def test_incomplete_commands_are_usage_errors(argv, complaint, capsys):
    """Commands missing a required second argument stop at parsing with a hint."""
    with pytest.raises(SystemExit):
        cli.main(argv, out=StringIO(), err=StringIO())
    assert complaint in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["status"], ["status", "/some/share"], ["list"], ["stop"], ["pause"], ["resume"],
    ["detach", "/p"], ["scan", "/p"], ["wait", "/p"], ["codes", "/p"], ["peers", "/p"],
    ["config", "get"], ["cancel-code", CODE],
])
def test_daemon_not_running(argv, tmp_path, monkeypatch):
    """With no daemon, commands exit 2 with one stderr line saying how to start it."""
    monkeypatch.setattr(cli.Cli, "start_daemon", no_daemon_start)
    data_dir = str(tmp_path / "data")
    run = run_main("--data-dir", data_dir, *argv)
    assert run.code == cli.EXIT_NO_DAEMON == 2
    assert run.out == ""
    assert run.err.count("\n") == 1
    assert "not running" in run.err
    assert "clearskies start" in run.err
    assert os.path.join(data_dir, "control") in run.err


def test_log_prints_last_lines(tmp_path):
    """`log -n 3` prints the last three lines of <data-dir>/clearskies.log."""
    (tmp_path / "clearskies.log").write_text("".join("line %d\n" % n for n in range(10)))
    run = run_main("--data-dir", str(tmp_path), "log", "-n", "3")
    assert run.code == 0
    assert run.out == "line 7\nline 8\nline 9\n"


def test_log_missing(tmp_path):
    """`log` without a log file exits 1 and names the path it looked at."""
    run = run_main("--data-dir", str(tmp_path), "log")
    assert run.code == 1
    assert str(tmp_path / "clearskies.log") in run.err


def test_log_zero_lines(tmp_path):
    """`log -n 0` prints nothing (today it prints the whole log)."""
    (tmp_path / "clearskies.log").write_text("a\nb\n")
    assert run_main("--data-dir", str(tmp_path), "log", "-n", "0").out == ""


def test_share_of_missing_directory_starts_no_daemon(tmp_path, monkeypatch):
    """`share` of a path that is not a directory fails before starting any daemon."""
    started = []
    monkeypatch.setattr(cli.Cli, "start_daemon", lambda self, foreground: started.append(1))
    run = run_main("--data-dir", str(tmp_path / "data"), "share", str(tmp_path / "nope"))
    assert (run.code, started) == (1, [])


@pytest.mark.parametrize("foreground", [True, False])
def test_start_command_line_is_accepted(foreground, tmp_path):
    """The twistd command `start` builds parses (checked with the plugin's --help, which starts nothing)."""
    args = cli.build_parser().parse_args(
        ["--data-dir", str(tmp_path), "start", "--no-lan", "--name", "n"])
    cmd = cli.Cli(args, StringIO(), StringIO()).twistd_command(foreground) + ["--help"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                            stdin=subprocess.DEVNULL, cwd=tmp_path)
    assert result.returncode == 0, result.stderr or result.stdout
    assert "clearskies" in result.stdout


# -- the fake daemon -------------------------------------------------------------


class ScriptedDaemon(CommandDispatcher):
    """Records every request; answers from ``script`` (type → reply, callable or error)."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.script: dict[str, Any] = {}

    def types(self) -> list[str]:
        return [request["type"] for request in self.received]

    def dispatch(self, request: dict[str, Any]) -> Any:
        self.received.append(request)
        if request["type"] not in self.script:
            return super().dispatch(request)
        answer = self.script[request["type"]]
        if isinstance(answer, ControlError):
            raise answer
        if callable(answer):
            return answer(request)
        return answer

    # Commands whose documented success reply carries no data.
    def cmd_stop(self, request: dict[str, Any]) -> None:
        return None

    cmd_pause = cmd_resume = cmd_create_share = cmd_add_share = cmd_remove_share = cmd_stop
    cmd_set_config_value = cmd__clearskies_add_peer = cmd__clearskies_cancel_code = cmd_stop

    def cmd_list_shares(self, request: dict[str, Any]) -> dict[str, Any]:
        return {"shares": []}

    def cmd_create_access_code(self, request: dict[str, Any]) -> dict[str, Any]:
        return {"access_code": CODE}


class _CountedProtocol(ControlProtocol):
    factory: _CountingFactory

    def connectionMade(self) -> None:
        self.factory.connections += 1
        self.factory.open += 1
        super().connectionMade()

    def connectionLost(self, reason: Any = None) -> None:
        self.factory.open -= 1
        super().connectionLost(reason)


class _CountingFactory(ControlFactory):
    """Counts connections, so tests can tell whether the CLI contacted the daemon."""

    protocol = _CountedProtocol

    def __init__(self, dispatcher: ScriptedDaemon) -> None:
        super().__init__(dispatcher, "clearskies-fake 0")
        self.connections = 0
        self.open = 0


def share_status(**fields: Any) -> dict[str, Any]:
    status = {"path": "/p", "status": "idle", "files": 3, "bytes": 1024, "revision": 7,
              "peers": [], "in_sync": False}
    status.update(fields)
    return status


CONNECTED_PEER = {"peer_id": "ab" * 16, "name": "laptop", "access": "read_write",
                  "connected": True}


class CliAgainstFakeDaemon(unittest.TestCase):
    """Each command's requests and output, over a real control socket."""

    def setUp(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="cs-cli-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.data_dir = os.path.join(self.tmp, "data")
        self.share_dir = os.path.join(self.tmp, "photos")
        os.mkdir(self.share_dir)
        self.daemon = ScriptedDaemon()
        self.factory = _CountingFactory(self.daemon)
        self.patch(cli.Cli, "start_daemon", no_daemon_start)

    async def listen(self) -> None:
        port = await listen_control(reactor, os.path.join(self.data_dir, "control"),
                                    self.factory)
        self.addCleanup(port.stopListening)

    async def cli(self, *argv: str) -> Run:
        """Run ``clearskies --data-dir DATA *argv`` in a thread, then let connections close."""
        out, err = StringIO(), StringIO()
        code = await deferToThread(cli.main, ["--data-dir", self.data_dir, *argv], out, err)
        for _ in range(500):
            if not self.factory.open:
                break
            await deferLater(reactor, 0.01)
        return Run(code, out.getvalue(), err.getvalue())

    # -- share -----------------------------------------------------------------

    @async_test
    async def test_share_new_directory(self) -> None:
        """share --mode read_only --multi-use --expires 7d: creates the share, then the code."""
        await self.listen()
        run = await self.cli("share", self.share_dir, "--mode", "read_only",
                             "--multi-use", "--expires", "7d")
        self.assertEqual((run.code, run.err), (0, ""))
        self.assertEqual(self.daemon.received, [
            {"type": "list_shares"},
            {"type": "create_share", "path": self.share_dir},
            {"type": "create_access_code", "path": self.share_dir, "mode": "read_only",
             "one_time": False, "expires": 604800},
        ])
        lines = run.out.splitlines()
        self.assertEqual(lines[0], CODE)
        self.assertIn("clearskies attach %s DIRECTORY" % CODE, run.out)
        self.assertIn(code_url(CODE_BYTES), run.out)
        self.assertEqual(lines[-1], "This multi-use code expires in 7d.")

    @async_test
    async def test_share_already_shared(self) -> None:
        """A directory the daemon already lists is not created again; defaults are one-time, 24h."""
        await self.listen()
        self.daemon.script["list_shares"] = {"shares": [
            {"path": "/elsewhere", "status": "idle"},
            {"path": self.share_dir, "status": "idle"},
        ]}
        run = await self.cli("share", self.share_dir)
        self.assertEqual(run.code, 0)
        self.assertEqual(self.daemon.types(), ["list_shares", "create_access_code"])
        self.assertEqual(self.daemon.received[1], {
            "type": "create_access_code", "path": self.share_dir, "mode": "read_write",
            "one_time": True, "expires": 86400})
        self.assertEqual(run.out.splitlines()[-1], "This one-time code expires in 24h.")

    @async_test
    async def test_share_never_expires_json(self) -> None:
        """share --expires never --json: expires is null; stdout is the code, URL and path."""
        await self.listen()
        run = await self.cli("--json", "share", self.share_dir, "--expires", "never")
        self.assertEqual(run.code, 0)
        self.assertIsNone(self.daemon.received[-1]["expires"])
        self.assertEqual(json.loads(run.out), {
            "access_code": CODE, "url": code_url(CODE_BYTES), "path": self.share_dir})

    @async_test
    async def test_share_relative_path_is_made_absolute(self) -> None:
        """A relative PATH is sent to the daemon as an absolute path."""
        await self.listen()
        here = os.getcwd()
        os.chdir(self.tmp)
        self.addCleanup(os.chdir, here)
        run = await self.cli("share", "photos")
        self.assertEqual(run.code, 0)
        self.assertEqual(self.daemon.received[1]["path"], self.share_dir)

    @async_test
    async def test_share_not_a_directory(self) -> None:
        """share of a missing directory exits 1 and sends no request."""
        await self.listen()
        missing = os.path.join(self.tmp, "missing")
        run = await self.cli("share", missing)
        self.assertEqual(run.code, 1)
        self.assertEqual(run.err, "clearskies: %s is not a directory; create it first\n" % missing)
        self.assertEqual(self.daemon.received, [])

    @async_test
    async def test_share_refused(self) -> None:
        """A refused create_access_code exits 1 with the daemon's message as one stderr line."""
        await self.listen()
        self.daemon.script["create_access_code"] = ControlError(
            "share_error", "share root vanished")
        run = await self.cli("share", self.share_dir)
        self.assertEqual((run.code, run.out), (1, ""))
        self.assertEqual(run.err, "clearskies: share root vanished\n")

    # -- attach ------------------------------------------------------------------

    @async_test
    async def test_attach(self) -> None:
        """attach sends add_share with the code, absolute path and --peer addresses."""
        await self.listen()
        target = os.path.join(self.tmp, "copy")
        run = await self.cli("attach", CODE, target, "--peer", "127.0.0.1:4000",
                             "--peer", "[::1]:4001")
        self.assertEqual(run.code, 0)
        self.assertEqual(self.daemon.received, [{
            "type": "add_share", "code": CODE, "path": target,
            "peers": ["127.0.0.1:4000", "[::1]:4001"]}])
        self.assertEqual(run.out, "attached %s; it fills as soon as a peer is found "
                                  "(see: clearskies status %s)\n" % (target, target))

    @async_test
    async def test_attach_merge(self) -> None:
        """attach --merge asks the daemon to merge into a folder that holds files."""
        await self.listen()
        run = await self.cli("attach", CODE, self.share_dir, "--merge")
        self.assertEqual(run.code, 0)
        self.assertEqual(self.daemon.received, [
            {"type": "add_share", "code": CODE, "path": self.share_dir, "merge": True}])

    @async_test
    async def test_share_warning_goes_to_stderr(self) -> None:
        """A warning in the create_share reply is one stderr line; the code still prints."""
        await self.listen()
        self.daemon.script["create_share"] = {
            "path": self.share_dir, "share_id": "5" * 64,
            "warning": "%s is a home directory" % self.share_dir}
        run = await self.cli("share", self.share_dir)
        self.assertEqual(run.code, 0)
        self.assertEqual(run.err, "clearskies: warning: %s is a home directory\n"
                         % self.share_dir)
        self.assertEqual(run.out.splitlines()[0], CODE)

    @async_test
    async def test_attach_url_form_json(self) -> None:
        """attach accepts the clearskies:// link as typed; --json prints the reply or the path."""
        await self.listen()
        target = os.path.join(self.tmp, "copy")
        link = code_url(CODE_BYTES)
        run = await self.cli("--json", "attach", link, target)
        self.assertEqual(run.code, 0)
        self.assertEqual(self.daemon.received, [
            {"type": "add_share", "code": link, "path": target}])
        self.assertEqual(json.loads(run.out), {"path": target})

    @async_test
    async def test_attach_malformed_codes(self) -> None:
        """A malformed code exits 1 naming the failed check, without contacting the daemon."""
        wrong_check = CODE[:-1] + ("A" if CODE[-1] != "A" else "B")
        cases = [
            (CODE[:-1], "has 32 characters, but 33"),
            (CODE[:-2] + "!" + CODE[-1], "contains '!'"),
            ("ABCD" + CODE[4:], "does not start with SYNC"),
            (wrong_check, "check character does not match"),
            ("", "is empty"),
        ]
        await self.listen()
        for code, check in cases:
            run = await self.cli("attach", code, os.path.join(self.tmp, "copy"))
            self.assertEqual(run.code, 1, code)
            self.assertTrue(run.err.startswith("clearskies: invalid access code: "), run.err)
            self.assertIn(check, run.err)
            self.assertEqual(run.err.count("\n"), 1)
        self.assertEqual(self.factory.connections, 0)

    @async_test
    async def test_attach_wait_needs_a_connected_peer(self) -> None:
        """attach --wait keeps polling while in_sync has no connected peer; exit 3 at timeout."""
        await self.listen()
        self.daemon.script[".clearskies.share_status"] = share_status(in_sync=True)
        run = await self.cli("attach", CODE, self.share_dir, "--wait",
                             "--timeout-wait", "0.3")
        self.assertEqual(run.code, cli.EXIT_TIMEOUT)
        self.assertEqual(run.err, "clearskies: not in sync after 0.3 s\n")
        self.assertEqual(self.daemon.types()[0], "add_share")
        self.assertGreaterEqual(self.daemon.types().count(".clearskies.share_status"), 2)

    @async_test
    async def test_attach_wait_in_sync(self) -> None:
        """attach --wait exits 0 once the share is in sync with a connected peer."""
        await self.listen()
        self.daemon.script[".clearskies.share_status"] = share_status(
            in_sync=True, peers=[CONNECTED_PEER])
        run = await self.cli("attach", CODE, self.share_dir, "--wait")
        self.assertEqual(run.code, 0)
        self.assertEqual(run.out, "%s is in sync (3 files, 1.0 KiB)\n" % self.share_dir)
        self.assertEqual(self.daemon.received[1], {
            "type": ".clearskies.share_status", "path": self.share_dir, "conflicts": False})

    @async_test
    async def test_attach_wait_failed_attach_exits_1_with_the_reason(self) -> None:
        """attach --wait stops at once with exit 1 and the daemon's reason when the attach failed."""
        await self.listen()
        self.daemon.script[".clearskies.share_status"] = {
            "path": self.share_dir, "status": "failed", "in_sync": False, "peers": [],
            "problem": "attach failed: the access code has expired; ask for a new one"}
        run = await self.cli("attach", CODE, self.share_dir, "--wait",
                             "--timeout-wait", "30")
        self.assertEqual(run.code, 1)
        self.assertEqual(run.err, "clearskies: %s: attach failed: the access code has "
                                  "expired; ask for a new one\n" % self.share_dir)

    @async_test
    async def test_attach_wait_timeout_says_what_it_waits_for(self) -> None:
        """attach --wait that times out on a waiting attach says what it was waiting for."""
        await self.listen()
        self.daemon.script[".clearskies.share_status"] = {
            "path": self.share_dir, "status": "waiting", "in_sync": False, "peers": [],
            "problem": "waiting for a peer that holds the access code"}
        run = await self.cli("attach", CODE, self.share_dir, "--wait",
                             "--timeout-wait", "0.3")
        self.assertEqual(run.code, cli.EXIT_TIMEOUT)
        self.assertEqual(run.err, "clearskies: not in sync after 0.3 s: waiting for a "
                                  "peer that holds the access code\n")

    # -- wait ----------------------------------------------------------------------

    @async_test
    async def test_wait_until_in_sync(self) -> None:
        """wait polls share_status and exits 0 on the first reply that says in_sync."""
        polls = []

        def status(request: dict[str, Any]) -> dict[str, Any]:
            polls.append(request)
            return share_status(in_sync=len(polls) >= 3)
        await self.listen()
        self.daemon.script[".clearskies.share_status"] = status
        run = await self.cli("wait", self.share_dir, "--timeout", "10")
        self.assertEqual(run.code, 0)
        self.assertEqual(len(polls), 3)
        self.assertEqual(polls[0], {"type": ".clearskies.share_status",
                                    "path": self.share_dir, "conflicts": False})
        self.assertEqual(run.out, "%s is in sync (3 files, 1.0 KiB)\n" % self.share_dir)

    @async_test
    async def test_wait_needs_a_connected_peer_once_the_share_knows_one(self) -> None:
        """wait on a share that knows a peer keeps waiting while none is connected, and says so."""
        await self.listen()
        self.daemon.script[".clearskies.share_status"] = share_status(
            in_sync=True, peers_known=1,
            peers=[dict(CONNECTED_PEER, connected=False)])
        run = await self.cli("wait", self.share_dir, "--timeout", "0.3")
        self.assertEqual(run.code, cli.EXIT_TIMEOUT)
        self.assertEqual(run.err, "clearskies: not in sync after 0.3 s: no peer connected "
                                  "(waiting for a peer to connect)\n")
        self.assertEqual(run.out, "")

    @async_test
    async def test_wait_ends_once_a_known_peer_is_connected_and_in_sync(self) -> None:
        """wait exits 0 once a known peer is connected again and the share is in sync."""
        polls = []

        def status(request: dict[str, Any]) -> dict[str, Any]:
            polls.append(request)
            peer = dict(CONNECTED_PEER, connected=len(polls) >= 3)
            return share_status(in_sync=True, peers_known=1, peers=[peer])
        await self.listen()
        self.daemon.script[".clearskies.share_status"] = status
        run = await self.cli("wait", self.share_dir, "--timeout", "10")
        self.assertEqual(run.code, 0)
        self.assertEqual(len(polls), 3)
        self.assertEqual(run.out, "%s is in sync (3 files, 1.0 KiB)\n" % self.share_dir)

    @async_test
    async def test_wait_timeout(self) -> None:
        """wait --timeout exits 3 when the share never gets in sync."""
        await self.listen()
        self.daemon.script[".clearskies.share_status"] = share_status(
            status="syncing", items_to_download=4, peers=[CONNECTED_PEER])
        started = time.monotonic()
        run = await self.cli("wait", self.share_dir, "--timeout", "0.4")
        self.assertEqual(run.code, 3)
        self.assertEqual(run.err, "clearskies: not in sync after 0.4 s\n")
        self.assertGreaterEqual(time.monotonic() - started, 0.4)

    @async_test
    async def test_wait_json(self) -> None:
        """wait --json prints the final share status as JSON."""
        await self.listen()
        status = share_status(in_sync=True)
        self.daemon.script[".clearskies.share_status"] = status
        run = await self.cli("--json", "wait", self.share_dir)
        self.assertEqual((run.code, json.loads(run.out)), (0, status))

    @async_test
    async def test_wait_share_in_error(self) -> None:
        """wait on a share whose status is "error" exits 1 at once, naming the share."""
        await self.listen()
        self.daemon.script[".clearskies.share_status"] = share_status(status="error")
        run = await self.cli("wait", self.share_dir, "--timeout", "5")
        self.assertEqual(run.code, 1)
        self.assertTrue(run.err.startswith(
            "clearskies: share %s is in error" % self.share_dir), run.err)
        self.assertEqual(self.daemon.types(), [".clearskies.share_status"])

    @async_test
    async def test_wait_stops_when_only_files_the_disk_refuses_are_left(self) -> None:
        """wait polls while files still come, then exits 1 with the reason once only refused ones are left."""
        polls = []
        error = {"path": "big.iso", "error": "ENOSPC", "message": "cannot write big.iso"}

        def status(request: dict[str, Any]) -> dict[str, Any]:
            polls.append(request)
            return share_status(
                status="syncing", items_to_download=3 if len(polls) < 3 else 1,
                peers=[CONNECTED_PEER], disk_errors=[error], disk_errors_count=1,
                problem="cannot write big.iso: the disk is full; free space on the disk")
        await self.listen()
        self.daemon.script[".clearskies.share_status"] = status
        run = await self.cli("wait", self.share_dir, "--timeout", "10")
        self.assertEqual(run.code, 1)
        self.assertEqual(len(polls), 3)
        self.assertEqual(run.err, "clearskies: share %s cannot finish: cannot write "
                                  "big.iso: the disk is full; free space on the disk\n"
                         % self.share_dir)

    @async_test
    async def test_wait_stops_at_once_when_the_whole_disk_refuses_writes(self) -> None:
        """A read-only file system blocks every file, tried or not: wait exits 1 with the reason."""
        error = {"path": "a.bin", "error": "EROFS", "message": "cannot write a.bin"}
        await self.listen()
        self.daemon.script[".clearskies.share_status"] = share_status(
            status="syncing", items_to_download=6, peers=[CONNECTED_PEER],
            disk_errors=[error], disk_errors_count=1, disk_blocked=True,
            problem="cannot write a.bin: the disk is read-only")
        run = await self.cli("wait", self.share_dir, "--timeout", "10")
        self.assertEqual(run.code, 1)
        self.assertIn("the disk is read-only", run.err)
        self.assertEqual(self.daemon.types(), [".clearskies.share_status"])

    @async_test
    async def test_share_status_with_disk_errors_exits_1(self) -> None:
        """status PATH lists files the disk refused and exits 1; a stopped share too."""
        await self.listen()
        self.daemon.script[".clearskies.share_status"] = share_status(
            path=self.share_dir, status="syncing", problem="free space on /x",
            disk_errors=[{"path": "big.iso", "error": "ENOSPC"}], disk_errors_count=3)
        run = await self.cli("status", self.share_dir)
        self.assertEqual(run.code, 1)
        self.assertEqual(run.out.splitlines()[0],
                         "%s: syncing (free space on /x)" % self.share_dir)
        self.assertIn("  cannot write big.iso: ENOSPC", run.out.splitlines())
        self.assertIn("  … and 2 more files", run.out.splitlines())
        self.daemon.script[".clearskies.share_status"] = share_status(
            path=self.share_dir, status="error", problem="marker lost")
        self.assertEqual((await self.cli("status", self.share_dir)).code, 1)

    @async_test
    async def test_share_status_shows_untrusted_peers_and_what_they_keep(self) -> None:
        """An untrusted peer's line says what it holds and its last proof; files it
        lost are listed; an untrusted share says it keeps a backup it cannot read."""
        await self.listen()
        peer = {"peer_id": "cd" * 16, "name": "nas", "access": "untrusted", "connected": True,
                "untrusted": True, "holds_files": 4, "holds_bytes": 2048,
                "last_challenge_passed": None, "challenges_failed": 2}
        self.daemon.script[".clearskies.share_status"] = share_status(
            path=self.share_dir, peers=[peer], lost_on_untrusted_peers=["a/b.txt"],
            untrusted_problem="cannot be backed up on untrusted peers: too many files")
        lines = (await self.cli("status", self.share_dir)).out.splitlines()
        self.assertIn("  untrusted peers: cannot be backed up on untrusted peers: too many "
                      "files", lines)
        self.assertIn("  peer nas untrusted connected, untrusted: holds 4 files (2.0 KiB), "
                      "last proof of storage never, 2 challenges failed", lines)
        self.assertIn("  lost on an untrusted peer (uploaded again): a/b.txt", lines)
        self.daemon.script[".clearskies.share_status"] = share_status(
            path=self.share_dir, keeps_encrypted={"files": 4, "bytes": 2048, "revision": 9})
        lines = (await self.cli("status", self.share_dir)).out.splitlines()
        self.assertIn("  keeps an encrypted backup it cannot read: 4 files, 2.0 KiB, "
                      "revision 9", lines)

    @async_test
    async def test_repair(self) -> None:
        """repair sends .clearskies.repair with the absolute path and reports the check."""
        await self.listen()
        self.daemon.script[".clearskies.repair"] = {
            "repaired": True, "checked": 10, "present": 9}
        run = await self.cli("repair", self.share_dir)
        self.assertEqual(run.code, 0)
        self.assertEqual(self.daemon.received, [
            {"type": ".clearskies.repair", "path": self.share_dir}])
        self.assertEqual(run.out, "%s: marker recreated (9 of 10 recorded files present); "
                                  "the share resumes\n" % self.share_dir)

    # -- status, list, peers, codes -------------------------------------------------

    @async_test
    async def test_status(self) -> None:
        """status sends {"type": "status"} and prints paused state and rates."""
        await self.listen()
        self.daemon.script["status"] = {"paused": True, "tracking": False,
                                        "upload_rate": 2048, "download_rate": 10,
                                        "shares": 2}
        run = await self.cli("status")
        self.assertEqual(run.code, 0)
        self.assertEqual(self.daemon.received, [{"type": "status"}])
        self.assertEqual(run.out, "paused: yes\nupload:   2.0 KiB/s\n"
                                  "download: 10 B/s\nshares: 2\n")

    @async_test
    async def test_status_skipped_lists_each_path_on_one_line(self) -> None:
        """status DIR --skipped asks for the list; odd names stay on one line; no DIR is an error."""
        await self.listen()
        self.daemon.script[".clearskies.share_status"] = share_status(
            skipped=3, skipped_paths=[
                {"path": "new\nline", "reason": "name cannot be synced", "where": "local"},
                {"path": "pipe", "reason": "special file (FIFO, socket or device)",
                 "where": "local"}])
        run = await self.cli("status", self.share_dir, "--skipped")
        self.assertEqual(run.code, 0)
        self.assertEqual(self.daemon.received, [{
            "type": ".clearskies.share_status", "path": self.share_dir, "skipped": True}])
        self.assertIn("  3 paths not synced\n", run.out)
        self.assertIn("  skipped new\\nline: name cannot be synced\n", run.out)
        self.assertIn("  skipped pipe: special file (FIFO, socket or device)\n", run.out)
        self.assertIn("(only the first 2 are listed)", run.out)
        run = await self.cli("status", "--skipped")
        self.assertEqual(run.code, 1)
        self.assertIn("give its folder", run.err)

    @async_test
    async def test_status_without_skipped_lists_only_the_count(self) -> None:
        """status DIR of a share with skipped paths prints the count and a hint, exit 0."""
        await self.listen()
        self.daemon.script[".clearskies.share_status"] = share_status(skipped=2)
        run = await self.cli("status", self.share_dir)
        self.assertEqual(run.code, 0, run.err)
        self.assertIn("  2 paths not synced (see: --skipped)\n", run.out)
        self.assertNotIn("only the first", run.out)

    @async_test
    async def test_revert_says_when_added_files_were_kept(self) -> None:
        """revert prints its counts, and why files were kept while the share's list is partial."""
        await self.listen()
        self.daemon.script[".clearskies.revert"] = {
            "changes": 2, "restoring": 1, "removed": 0, "complete": False}
        run = await self.cli("revert", self.share_dir)
        self.assertEqual(run.code, 0)
        self.assertEqual(self.daemon.received, [
            {"type": ".clearskies.revert", "path": os.path.realpath(self.share_dir)}])
        self.assertIn("2 local changes reverted (1 files being restored from peers, "
                      "0 removed)", run.out)
        self.assertIn("full file list has not all arrived yet", run.out)

    @async_test
    async def test_status_json(self) -> None:
        """status --json prints the daemon's reply unchanged."""
        await self.listen()
        reply = {"paused": False, "tracking": True, "nat_punctured": False,
                 "upload_rate": 0, "download_rate": 0}
        self.daemon.script["status"] = reply
        run = await self.cli("--json", "status")
        self.assertEqual(json.loads(run.out), reply)

    @async_test
    async def test_share_status(self) -> None:
        """status PATH asks .clearskies.share_status and prints peers, progress, missing files."""
        await self.listen()
        self.daemon.script[".clearskies.share_status"] = share_status(
            path=self.share_dir, status="syncing",
            local_changes_not_shared=2, share_files_missing=1,
            share_version_complete=False, items_to_download=5,
            bytes_to_download=3 * 1024 ** 2,
            peers=[dict(CONNECTED_PEER, items_needed=4),
                   {"peer_id": "cd" * 16, "access": "read_only", "connected": False}])
        run = await self.cli("status", self.share_dir)
        self.assertEqual(run.code, 0)
        self.assertEqual(self.daemon.received, [
            {"type": ".clearskies.share_status", "path": self.share_dir}])
        self.assertEqual(run.out.splitlines(), [
            "%s: syncing" % self.share_dir,
            "  3 files, 1.0 KiB, revision 7",
            "  2 local changes not shared",
            "  1 files of the share not here (clearskies revert fetches them)",
            "  the share's full file list has not all arrived yet",
            "  peer laptop read_write connected, needs 4 items",
            "  peer %s read_only offline" % ("cd" * 16),
            "  downloading: 5 items, 3.0 MiB left",
        ])

    @async_test
    async def test_list(self) -> None:
        """list prints one line per share with status, access, counts and path."""
        await self.listen()
        self.daemon.script["list_shares"] = {"shares": [
            {"path": self.share_dir, "status": "synced", "access": "read_write",
             "files": 3, "bytes": 4096, "peers_connected": 1, "peers_known": 2},
            {"path": "/other", "status": "error"},
        ]}
        run = await self.cli("list")
        self.assertEqual(run.code, 0)
        self.assertEqual(self.daemon.received, [{"type": "list_shares"}])
        first, second = run.out.splitlines()
        self.assertEqual(first.split(), ["synced", "read_write", "3", "files", "4.0",
                                         "KiB", "1/2", "peers", self.share_dir])
        self.assertEqual(second.split(), ["error", "0", "files", "0", "B", "0/0",
                                          "peers", "/other"])

    @async_test
    async def test_list_empty_and_json(self) -> None:
        """list with no shares suggests `share`; --json prints {"shares": [...]}."""
        await self.listen()
        run = await self.cli("list")
        self.assertIn("clearskies share DIRECTORY", run.out)
        run = await self.cli("--json", "list")
        self.assertEqual(json.loads(run.out), {"shares": []})

    @async_test
    async def test_peers(self) -> None:
        """peers PATH (and peers list PATH) ask .clearskies.peers and print each peer."""
        await self.listen()
        self.daemon.script[".clearskies.peers"] = {"peers": [
            CONNECTED_PEER,
            {"peer_id": "cd" * 16, "access": "untrusted", "connected": False,
             "addresses": ["127.0.0.1:4000", "[::1]:4000"]},
        ]}
        run = await self.cli("peers", self.share_dir)
        again = await self.cli("peers", "list", self.share_dir)
        self.assertEqual((run.code, again.out), (0, run.out))
        self.assertEqual(self.daemon.received, [
            {"type": ".clearskies.peers", "path": self.share_dir}] * 2)
        first, second = run.out.splitlines()
        self.assertEqual(first.split(), ["ab" * 16, "read_write", "connected", "laptop"])
        self.assertEqual(second.split(), ["cd" * 16, "untrusted", "offline",
                                          "127.0.0.1:4000,", "[::1]:4000"])

    @async_test
    async def test_peers_add(self) -> None:
        """peers add PATH HOST:PORT sends .clearskies.add_peer with the address."""
        await self.listen()
        run = await self.cli("peers", "add", self.share_dir, "127.0.0.1:4000")
        self.assertEqual(run.code, 0)
        self.assertEqual(self.daemon.received, [{
            "type": ".clearskies.add_peer", "path": self.share_dir,
            "address": "127.0.0.1:4000"}])
        self.assertEqual(run.out, "added 127.0.0.1:4000 to %s\n" % self.share_dir)

    @async_test
    async def test_codes(self) -> None:
        """codes PATH lists live codes by short access ID, level, use and expiry."""
        await self.listen()
        expires = time.mktime((2031, 5, 6, 7, 8, 0, 0, 0, -1))
        self.daemon.script[".clearskies.codes"] = {"codes": [
            {"access_id": ACCESS_ID, "level": "read_only", "one_time": True,
             "expires": expires},
            {"access_id": "f" * 64, "level": "read_write", "one_time": False,
             "expires": None},
        ]}
        run = await self.cli("codes", self.share_dir)
        self.assertEqual(self.daemon.received, [
            {"type": ".clearskies.codes", "path": self.share_dir}])
        first, second = run.out.splitlines()
        self.assertEqual(first.split(), [ACCESS_ID[:16], "read_only", "one-time",
                                         "expires", "2031-05-06", "07:08"])
        self.assertEqual(second.split(), ["f" * 16, "read_write", "multi-use",
                                          "never", "expires"])
        self.daemon.script[".clearskies.codes"] = {"codes": []}
        self.assertEqual((await self.cli("codes", self.share_dir)).out,
                         "no live access codes\n")

    # -- cancel-code --------------------------------------------------------------

    @async_test
    async def test_cancel_code_by_code(self) -> None:
        """cancel-code CODE sends the code itself."""
        await self.listen()
        run = await self.cli("cancel-code", CODE)
        self.assertEqual((run.code, run.out), (0, "access code cancelled\n"))
        self.assertEqual(self.daemon.received, [
            {"type": ".clearskies.cancel_code", "code": CODE}])

    @async_test
    async def test_cancel_code_by_access_id(self) -> None:
        """cancel-code with a full or 16-digit access ID sends access_id, not code."""
        await self.listen()
        await self.cli("cancel-code", ACCESS_ID)
        await self.cli("cancel-code", ACCESS_ID[:16])
        self.assertEqual(self.daemon.received, [
            {"type": ".clearskies.cancel_code", "access_id": ACCESS_ID},
            {"type": ".clearskies.cancel_code", "access_id": ACCESS_ID[:16]}])

    @async_test
    async def test_cancel_code_malformed(self) -> None:
        """cancel-code with neither a code nor an access ID exits 1 without contacting the daemon."""
        await self.listen()
        run = await self.cli("cancel-code", "SYNC-not-a-code")
        self.assertEqual(run.code, 1)
        self.assertTrue(run.err.startswith("clearskies: invalid access code: "))
        self.assertEqual(self.factory.connections, 0)

    @async_test
    async def test_cancel_code_unknown(self) -> None:
        """A cancel-code the daemon refuses exits 1 with its message."""
        await self.listen()
        self.daemon.script[".clearskies.cancel_code"] = ControlError(
            "no_such_code", "no live code with that access ID")
        run = await self.cli("cancel-code", ACCESS_ID)
        self.assertEqual((run.code, run.out), (1, ""))
        self.assertEqual(run.err, "clearskies: no live code with that access ID\n")

    # -- simple commands -----------------------------------------------------------

    @async_test
    async def test_one_request_commands(self) -> None:
        """stop, pause, resume, detach and scan each send their one request and confirm."""
        cases = [
            (["stop"], {"type": "stop"}, "daemon stopping\n"),
            (["pause"], {"type": "pause"}, "paused: no transfers until 'clearskies resume'\n"),
            (["resume"], {"type": "resume"}, "resumed\n"),
            (["detach", "photos"], {"type": "remove_share", "path": "SHARE"},
             "SHARE is no longer synced (its files stay where they are)\n"),
            (["scan", "photos"], {"type": ".clearskies.scan", "path": "SHARE"},
             "scanned SHARE: 2 changes\n"),
        ]
        await self.listen()
        self.daemon.script[".clearskies.scan"] = {"changes": 2}
        here = os.getcwd()
        os.chdir(self.tmp)
        self.addCleanup(os.chdir, here)
        for argv, request, output in cases:
            self.daemon.received.clear()
            run = await self.cli(*argv)
            request = {k: v.replace("SHARE", self.share_dir) for k, v in request.items()}
            self.assertEqual((run.code, run.err), (0, ""), argv)
            self.assertEqual(self.daemon.received, [request])
            self.assertEqual(run.out, output.replace("SHARE", self.share_dir))

    @async_test
    async def test_start_when_running(self) -> None:
        """start with a daemon already answering says so, exits 0 and sends nothing."""
        await self.listen()
        run = await self.cli("start")
        self.assertEqual(run.code, 0)
        self.assertEqual(run.out, "the daemon is already running (%s)\n" % self.data_dir)
        self.assertEqual(self.daemon.received, [])
        self.assertEqual(self.factory.connections, 1)

    @async_test
    async def test_config(self) -> None:
        """config get / get KEY / set KEY VALUE send the documented requests."""
        await self.listen()
        self.daemon.script["get_config"] = {"config": {"b": [1], "a": "x"}}
        self.daemon.script["get_config_value"] = {"value": {"k": 1}}
        run = await self.cli("config", "get")
        self.assertEqual(run.out, 'a = "x"\nb = [1]\n')
        run = await self.cli("config", "get", "upload_limit")
        self.assertEqual(run.out, '{"k": 1}\n')
        run = await self.cli("config", "set", "upload_limit", "1024")
        self.assertEqual(run.out, "upload_limit = 1024\n")
        run = await self.cli("config", "set", "name", "my laptop")
        self.assertEqual(run.out, 'name = "my laptop"\n')
        self.assertEqual(self.daemon.received, [
            {"type": "get_config"},
            {"type": "get_config_value", "key": "upload_limit"},
            {"type": "set_config_value", "key": "upload_limit", "value": 1024},
            {"type": "set_config_value", "key": "name", "value": "my laptop"},
        ])

    # -- failures --------------------------------------------------------------------

    @async_test
    async def test_error_replies(self) -> None:
        """Error replies exit 1 with the daemon's message (or its code) as one stderr line."""
        await self.listen()
        self.daemon.script["remove_share"] = ControlError("no_such_share", "no share at /x")
        self.daemon.script["list_shares"] = ControlError("internal", "")
        run = await self.cli("detach", "/x")
        self.assertEqual((run.code, run.out, run.err),
                         (1, "", "clearskies: no share at /x\n"))
        run = await self.cli("list")
        self.assertEqual((run.code, run.err), (1, "clearskies: internal\n"))
        run = await self.cli("codes", "/x")  # the fake has no handler: not_understood
        self.assertEqual(run.code, 1)
        self.assertEqual(run.err, "clearskies: unknown command '.clearskies.codes'\n")

    @async_test
    async def test_daemon_too_slow(self) -> None:
        """A reply slower than --timeout exits 3 saying the daemon did not answer."""
        await self.listen()
        self.daemon.script["status"] = lambda request: Deferred()
        run = await self.cli("--timeout", "0.3", "status")
        self.assertEqual(run.code, 3)
        self.assertEqual(run.err, "clearskies: the daemon did not answer within 0.3 s\n")


def test_the_cli_starts_without_twisted():
    """Every ``clearskies`` command is a process of its own: importing the daemon's
    libraries (Twisted alone costs ~0.1 s) would slow each one.  The CLI talks to
    the daemon with a blocking client and needs none of them."""
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, clearskies.cli; "
         "print(sorted(m for m in sys.modules if m.split('.')[0] in "
         "('twisted', 'zope', 'pathspec', 'cryptography')))"],
        capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"
