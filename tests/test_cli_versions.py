"""``clearskies versions``, ``restore`` and ``config … --share`` against a scripted daemon."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import tempfile
from io import StringIO

import pytest
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from clearskies import cli
from clearskies.cli_versions import parse_time
from clearskies.control.protocol import ControlError, listen_control
from tests.helpers import async_test
from tests.test_cli import Run, ScriptedDaemon, _CountingFactory, no_daemon_start


def test_parse_time() -> None:
    """Seconds or ISO 8601 (local time unless it says otherwise); anything else is refused."""
    assert parse_time("1800000000") == 1_800_000_000.0
    assert parse_time("2026-12-07T10:30:00+00:00") == datetime.datetime(
        2026, 12, 7, 10, 30, tzinfo=datetime.timezone.utc).timestamp()
    assert parse_time("2026-12-07 10:30") == datetime.datetime(2026, 12, 7, 10, 30).timestamp()
    with pytest.raises(argparse.ArgumentTypeError):
        parse_time("last tuesday")


def test_restore_takes_at_or_version_not_both(capsys) -> None:
    """--at and --version together are a usage error."""
    with pytest.raises(SystemExit) as caught:
        cli.main(["restore", "/x", "--at", "1", "--version", "y"], out=StringIO(),
                 err=StringIO())
    assert caught.value.code == 2


VERSION = {"id": "20261207-104858-1a2b3c4d", "path": "a.txt", "time": 1_800_000_000.0,
           "size": 2048, "sha256": "ab" * 32, "peer": "c" * 64, "peer_name": "laptop",
           "cause": "replaced"}


class VersionCommandsTests(unittest.TestCase):
    def setUp(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="cs-cli-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.data_dir = os.path.join(self.tmp, "data")
        self.share_dir = os.path.join(self.tmp, "docs")
        os.mkdir(self.share_dir)
        self.daemon = ScriptedDaemon()
        self.factory = _CountingFactory(self.daemon)
        self.patch(cli.Cli, "start_daemon", no_daemon_start)

    async def cli(self, *argv: str) -> Run:
        port = await listen_control(reactor, os.path.join(self.data_dir, "control"),
                                    self.factory)
        out, err = StringIO(), StringIO()
        try:
            code = await deferToThread(cli.main, ["--data-dir", self.data_dir, *argv], out, err)
            for _ in range(500):
                if not self.factory.open:
                    break
                await deferLater(reactor, 0.01)
        finally:
            await port.stopListening()
        return Run(code, out.getvalue(), err.getvalue())

    @async_test
    async def test_versions_lists_newest_first_and_json(self) -> None:
        """versions PATH: one line per version with time, size and whose change; --json raw."""
        older = dict(VERSION, id="20261206-000000-00000000", time=1_799_900_000.0,
                     cause="deleted", peer_name=None)
        self.daemon.script[".clearskies.versions"] = {
            "versions": [older, VERSION], "settings": {"versions": "trash"},
            "folder": self.share_dir + "/.clearskies-versions"}
        path = os.path.join(self.share_dir, "a.txt")
        run = await self.cli("versions", path)
        self.assertEqual(run.code, 0, run.err)
        lines = run.out.splitlines()
        self.assertTrue(lines[0].startswith(VERSION["id"]))
        self.assertIn("replaced by laptop", lines[0])
        self.assertIn("deleted by " + "c" * 16, lines[1])
        self.assertIn("2 version(s)", lines[2])
        self.assertEqual(self.daemon.received[-1],
                         {"type": ".clearskies.versions", "path": path})
        run = await self.cli("versions", path, "--json", "--clean")
        self.assertEqual(json.loads(run.out)["versions"][1]["id"], VERSION["id"])
        self.assertIs(self.daemon.received[-1]["clean"], True)

    @async_test
    async def test_restore_sends_what_was_asked_and_errors_exit_1(self) -> None:
        """restore --version ID asks for that version; a refusal prints why and exits 1."""
        self.daemon.script[".clearskies.restore"] = {
            "path": "a.txt", "restored": VERSION["id"], "time": VERSION["time"], "size": 2048,
            "kept_current": "20261207-110000-00000001"}
        path = os.path.join(self.share_dir, "a.txt")
        run = await self.cli("restore", path, "--version", VERSION["id"])
        self.assertEqual(run.code, 0, run.err)
        self.assertIn("restored %s from version %s" % (path, VERSION["id"]), run.out)
        self.assertIn("20261207-110000-00000001", run.out)
        self.assertEqual(self.daemon.received[-1], {"type": ".clearskies.restore",
                                                    "path": path, "version": VERSION["id"]})
        self.daemon.script[".clearskies.restore"] = ControlError(
            "no_such_version", "no version 20991231-000000-00000000 is kept")
        run = await self.cli("restore", path, "--at", "1800000000")
        self.assertEqual((run.code, run.err.strip()),
                         (1, "clearskies: no version 20991231-000000-00000000 is kept"))
        self.assertEqual(self.daemon.received[-1]["at"], 1_800_000_000.0)

    @async_test
    async def test_config_with_share_goes_to_the_share(self) -> None:
        """config set KEY VALUE --share DIR sets the share's setting; without --share, the daemon's."""
        self.daemon.script[".clearskies.share_config"] = lambda request: {
            "path": self.share_dir, "config": {"versions": request.get("value", "trash"),
                                               "versions_days": 30}}
        run = await self.cli("config", "set", "versions", "staggered", "--share", self.share_dir)
        self.assertEqual((run.code, run.out), (0, 'versions = "staggered"\n'))
        self.assertEqual(self.daemon.received[-1], {
            "type": ".clearskies.share_config", "path": self.share_dir, "key": "versions",
            "value": "staggered"})
        run = await self.cli("config", "get", "versions_days", "--share", self.share_dir)
        self.assertEqual(run.out, "versions_days = 30\n")
        # Without a key: every setting of the share, the versions ones and the others.
        self.daemon.script[".clearskies.get_share_config"] = lambda request: {
            "path": self.share_dir, "config": {"watcher": True}}
        run = await self.cli("config", "get", "--share", self.share_dir)
        self.assertEqual(run.out, 'versions = "trash"\nversions_days = 30\nwatcher = true\n')
        await self.cli("config", "set", "upload_limit", "5")
        self.assertEqual(self.daemon.received[-1]["type"], "set_config_value")
        # Other keys are not the versions group's: they go on to the other settings.
        await self.cli("config", "get", "watcher", "--share", self.share_dir)
        self.assertNotEqual(self.daemon.received[-1]["type"], ".clearskies.share_config")


def test_share_option_added_once() -> None:
    """Another group of share settings may have given config its --share already."""
    from clearskies.cli_versions import config_share_option
    parser = argparse.ArgumentParser()
    parser.add_argument("--share")
    config_share_option(parser)
    assert parser.parse_args(["--share", "/x"]).share == "/x"
