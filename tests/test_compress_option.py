"""The daemon's --compress option: from the command line (twistd and ``clearskies start``)
to the features a peer reads in our handshake's greeting."""

from __future__ import annotations

import json
from io import StringIO

import pytest
from twisted.internet import protocol, reactor
from twisted.internet.defer import Deferred
from twisted.python import usage
from twisted.trial.unittest import TestCase

from clearskies import tap
from clearskies.cli import Cli, build_parser
from clearskies.daemon.dialling import COMPRESSION_VARIABLE, default_compress, offered_features
from tests.helpers import async_test, temporary_dir


def _options(*argv: str) -> tap.Options:
    options = tap.Options()
    options.parseOptions(list(argv))
    return options


def test_the_option_is_checked_and_reaches_the_settings(tmp_path) -> None:
    data = str(tmp_path / "d")
    assert tap.makeService(_options("--data-dir", data, "--compress", "gzip")).settings.compress == "gzip"
    assert tap.makeService(_options("--data-dir", data, "--compress", "off")).settings.compress == "off"
    assert tap.makeService(_options("--data-dir", data)).settings.compress is None
    with pytest.raises(usage.UsageError, match="--compress must be gzip or off"):
        _options("--data-dir", data, "--compress", "zstd")


def test_gzip_is_offered_only_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    """Off by default; the environment variable still switches the default; the option wins."""
    monkeypatch.delenv(COMPRESSION_VARIABLE, raising=False)
    assert default_compress() == "off" and "gzip" not in offered_features()
    assert "gzip" in offered_features("gzip") and "gzip" not in offered_features("off")
    monkeypatch.setenv(COMPRESSION_VARIABLE, "gzip")
    assert "gzip" in offered_features() and "gzip" not in offered_features("off")


def test_clearskies_start_passes_it_to_the_daemon(tmp_path) -> None:
    parser = build_parser()
    args = parser.parse_args(["--data-dir", str(tmp_path), "start", "--compress", "gzip"])
    cmd = Cli(args, StringIO(), StringIO()).twistd_command(foreground=True)
    assert cmd[cmd.index("--compress") + 1] == "gzip"
    plain = Cli(parser.parse_args(["--data-dir", str(tmp_path), "start"]), StringIO(),
                StringIO()).twistd_command(True)
    assert "--compress" not in plain
    with pytest.raises(SystemExit):
        parser.parse_args(["start", "--compress", "zstd"])


class _Greeting(protocol.Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.line: Deferred[dict] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if b"\n" in self.data and not self.line.called:
            self.line.callback(json.loads(self.data.split(b"\n")[0]))


class GreetingTests(TestCase):
    """A real listener of a daemon made by the twistd plugin: what a connecting peer reads."""

    async def greeting_features(self, *argv: str) -> list[str]:
        daemon = tap.makeService(_options("--data-dir", temporary_dir(self), "--no-web", *argv))
        await daemon.listeners.listen("tcp:0:interface=127.0.0.1", "off", "alice",
                                      chosen=True, kept=False)
        self.addCleanup(daemon.listeners.stopService)
        client = await protocol.ClientCreator(reactor, _Greeting).connectTCP(
            "127.0.0.1", daemon.listeners.port_number)
        greeting = await client.line
        client.transport.loseConnection()
        assert greeting["type"] == "greeting"
        return greeting["features"]

    @async_test
    async def test_compress_gzip_is_in_the_greeting(self) -> None:
        features = await self.greeting_features("--compress", "gzip")
        self.assertIn("gzip", features)
        self.assertIn("vv", features)

    @async_test
    async def test_compress_off_is_not(self) -> None:
        self.assertNotIn("gzip", await self.greeting_features("--compress", "off"))
