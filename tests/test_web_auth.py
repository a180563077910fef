"""Who may use the HTTP API (clearskies.web.auth), where it may listen
(clearskies.web.service), and the CLI's pieces for it (units, event lines)."""

from __future__ import annotations

import os
import stat

import pytest

from clearskies.cli import build_parser
from clearskies.cli_gui import format_event
from clearskies.cli_output import parse_setting_units, parse_size
from clearskies.errors import ConfigurationError
from clearskies.web.auth import LOGIN_LIFETIME, MAX_LOGIN_TOKENS, MAX_SESSIONS, Guard, Origins
from clearskies.web.service import check_web_endpoint, read_or_make_key


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_login_token_works_once_and_expires() -> None:
    clock = Clock()
    guard = Guard("k" * 43, clock)
    token, expires = guard.new_login()
    assert expires == clock.now + LOGIN_LIFETIME
    session = guard.use_login(token)
    assert session is not None and session.csrf != session.token
    assert guard.use_login(token) is None
    assert guard.session(session.token) is session
    late, _ = guard.new_login()
    clock.now += LOGIN_LIFETIME + 1
    assert guard.use_login(late) is None
    assert guard.use_login(None) is None and guard.use_login("") is None
    guard.end_session(session)
    assert guard.session(session.token) is None


def test_tokens_and_sessions_are_bounded() -> None:
    guard = Guard("k" * 43, Clock())
    tokens = [guard.new_login()[0] for _ in range(MAX_LOGIN_TOKENS + 5)]
    assert guard.use_login(tokens[0]) is None  # pushed out
    sessions = [guard.use_login(guard.new_login()[0]) for _ in range(MAX_SESSIONS + 3)]
    assert guard.session(sessions[0].token) is None
    assert guard.session(sessions[-1].token) is sessions[-1]


def test_the_api_key_is_compared_whole() -> None:
    guard = Guard("secret-key-" * 4, Clock())
    assert guard.key_ok("secret-key-" * 4)
    for wrong in (None, "", "secret-key-", "secret-key-" * 4 + "x", "SECRET-KEY-" * 4):
        assert not guard.key_ok(wrong)


def test_hosts_and_origins() -> None:
    origins = Origins(60180, tls=False)
    for host in ("127.0.0.1:60180", "localhost:60180", "LOCALHOST:60180", "[::1]:60180"):
        assert origins.host_ok(host)
    for host in (None, "", "127.0.0.1", "127.0.0.1:60181", "evil.example:60180",
                 "127.0.0.1:60180.evil.example", "localhost.:60180"):
        assert not origins.host_ok(host)
    assert origins.origin_ok(None)
    assert origins.origin_ok("http://127.0.0.1:60180")
    for origin in ("null", "https://127.0.0.1:60180", "http://evil.example",
                   "http://127.0.0.1:60180.evil.example", ""):
        assert not origins.origin_ok(origin)
    exposed = Origins(8443, tls=True, extra_hosts=["192.0.2.7"])
    assert exposed.host_ok("192.0.2.7:8443") and exposed.origin_ok("https://192.0.2.7:8443")
    assert not exposed.origin_ok("http://192.0.2.7:8443")


def test_only_loopback_without_tls() -> None:
    assert check_web_endpoint("tcp:60180:interface=127.0.0.1") == (False, None)
    assert check_web_endpoint("tcp:0:interface=\\:\\:1") == (False, None)
    assert check_web_endpoint("ssl:8443:interface=192.0.2.7:privateKey=k.pem:certKey=c.pem") \
        == (True, "192.0.2.7")
    assert check_web_endpoint("ssl:8443:privateKey=k.pem") == (True, "0.0.0.0")
    for refused in ("tcp:8080", "tcp:8080:interface=0.0.0.0", "tcp:8080:interface=192.0.2.7",
                    "ssl:8443:interface=0.0.0.0", "unix:/tmp/s", "tcp:http",
                    "tcp:8080:interface=localhost", "tcp:99999:interface=127.0.0.1"):
        with pytest.raises(ConfigurationError):
            check_web_endpoint(refused)


def test_the_api_key_file_is_private_and_kept(tmp_path: object) -> None:
    directory = str(tmp_path)
    key = read_or_make_key(directory)
    path = os.path.join(directory, "web-api-key")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and len(key) >= 32
    os.chmod(path, 0o644)
    assert read_or_make_key(directory) == key
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_sizes_with_units() -> None:
    assert parse_size("20M") == 20 * 1024 ** 2
    assert parse_size("1.5MiB/s") == int(1.5 * 1024 ** 2)
    assert parse_size("500kB") == 500_000
    assert parse_size("0") == 0 and parse_size("100") == 100
    for bad in ("", "fast", "-1M", "1.5.5M", "20 parsecs"):
        with pytest.raises(ValueError):
            parse_size(bad)
    assert parse_setting_units("upload_limit", "2G/s") == 2 * 1024 ** 3
    assert parse_setting_units("versions_max_bytes", "1GB") == 10 ** 9
    assert parse_setting_units("name", "20M") == "20M"
    assert parse_setting_units("upload_limit", "lots") == "lots"  # the daemon says why


def test_json_after_the_command_for_every_command() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, command in sub.choices.items():
        assert any("--json" in action.option_strings for action in command._actions), name
    assert parser.parse_args(["list", "--json"]).json is True
    assert parser.parse_args(["--json", "list"]).json is True
    assert parser.parse_args(["list"]).json is False
    assert parser.parse_args(["pause", "--json"]).json is True


def test_event_lines_for_people() -> None:
    line = format_event({"id": 3, "time": 0, "type": "share_progress", "path": "/p\nx",
                         "share_id": "ab", "items_to_download": 2,
                         "bytes_to_download": 3 * 1024 * 1024, "problem": None})
    assert "share_progress /p\\nx items_to_download=2 bytes_to_download=3.0 MiB" in line
    assert "share_id" not in line and "problem" not in line


def test_start_passes_the_web_options_to_the_daemon(tmp_path: object) -> None:
    import io

    from clearskies.cli import Cli

    parser = build_parser()
    for argv, expected in ((["start", "--web", "tcp:8000:interface=127.0.0.1"],
                            ["--web", "tcp:8000:interface=127.0.0.1"]),
                           (["start", "--no-web"], ["--no-web"])):
        args = parser.parse_args(["--data-dir", str(tmp_path), *argv])
        command = Cli(args, io.StringIO(), io.StringIO()).twistd_command(foreground=False)
        joined = " ".join(command)
        assert " ".join(expected) in joined, joined


def test_twistd_options_check_the_web_endpoint() -> None:
    from twisted.python import usage

    from clearskies.tap import Options

    options = Options()
    options.parseOptions(["--web", "tcp:0:interface=127.0.0.1"])
    assert options["web"] == "tcp:0:interface=127.0.0.1"
    for argv in (["--web", "tcp:8080"], ["--web", "tcp:0:interface=127.0.0.1", "--no-web"]):
        with pytest.raises(usage.UsageError):
            Options().parseOptions(argv)
