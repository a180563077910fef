"""The twistd plugins are discoverable after installation."""

import pytest
from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
from twisted.python import usage

from clearskies import tap



def test_both_service_makers_are_listed():
    """getPlugins finds the daemon and the tracker service makers by tapname."""
    names = {maker.tapname for maker in getPlugins(IServiceMaker)}
    assert {"clearskies", "clearskies-tracker"} <= names


def _options(*argv: str) -> tap.Options:
    options = tap.Options()
    options.parseOptions(list(argv))
    return options


def test_share_holding_the_data_dir_is_a_usage_error(tmp_path):
    """--share of the folder holding --data-dir, or of /, is refused before anything starts."""
    data = tmp_path / "data"
    for path, why in ((tmp_path, "holds the daemon's data directory"),
                      ("/", "holds the whole system")):
        with pytest.raises(usage.UsageError, match=why):
            _options("--data-dir", str(data), "--share", str(path))
    assert not data.exists() and not (tmp_path / ".clearskies").exists()


def test_into_with_files_needs_merge(tmp_path):
    """--into a folder with files needs --merge; --merge alone is a usage error."""
    into = tmp_path / "into"
    into.mkdir()
    (into / "mine.txt").write_text("x")
    code = _valid_code()
    with pytest.raises(usage.UsageError, match="is not empty.*--merge"):
        _options("--data-dir", str(tmp_path / "d"), "--code", code, "--into", str(into))
    assert _options("--data-dir", str(tmp_path / "d"), "--code", code, "--into", str(into),
                    "--merge")["merge"]
    with pytest.raises(usage.UsageError, match="--merge goes with"):
        _options("--data-dir", str(tmp_path / "d"), "--merge")
    with pytest.raises(usage.UsageError, match="inside the daemon's data directory"):
        _options("--data-dir", str(tmp_path), "--code", code, "--into", str(tmp_path / "x"))


def _valid_code() -> str:
    from clearskies.accesscode import format_code

    return format_code(bytes(16))


def test_options_peers_would_refuse_are_usage_errors(tmp_path):
    """--name over 256 bytes, a --listen that is no TCP endpoint, and contradictory
    keep/forget options are refused before anything starts."""
    data = str(tmp_path / "d")
    for argv, why in ((["--name", "n" * 257], "at most 256 bytes"),
                      (["--name", "a\nb"], "printable"),
                      (["--listen", "tcp:99999"], "tcp:PORT endpoint"),
                      (["--lan", "--no-lan"], "contradict"),
                      (["--no-tracker", "--tracker", "http://t:1"], "--no-tracker goes"),
                      (["--no-peer", "--peer", "127.0.0.1:4"], "--no-peer goes")):
        with pytest.raises(usage.UsageError, match=why):
            _options("--data-dir", data, *argv)
    settings = tap.makeService(_options("--data-dir", data, "--lan", "--no-tracker")).settings
    assert settings.lan is True and settings.no_trackers
    assert tap.makeService(_options("--data-dir", data)).settings.lan is None
    assert not (tmp_path / "d").exists()
