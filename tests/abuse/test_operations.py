"""Operations under abuse: dead access codes, start-up failures, remembered options.

Real daemons (tests/daemons.py) and the real CLI, on 127.0.0.1 only.
"""

from __future__ import annotations

import json
import random
import socket
import subprocess
import time
from pathlib import Path

import pytest

from clearskies.accesscode import access_id, format_code, new_access_code, parse_code
from clearskies.control.client import ControlClient, ControlError, DaemonNotRunning
from tests.daemons import TWISTD, wait_until

pytestmark = pytest.mark.slow

#: A dead code must fail the attach well within this (the "unknown" case takes
#: three refusals, 2 s and 4 s of back-off apart).
DEAD_CODE_DEADLINE = 30.0


def _attach_wait(bob, code: str, into: Path, peer: str):
    """``clearskies attach --wait`` as a user runs it; returns (result, seconds)."""
    started = time.monotonic()
    result = bob.cli("attach", code, str(into), "--peer", peer, "--wait",
                     "--timeout-wait", "120", check=False, timeout=150)
    return result, time.monotonic() - started


def _assert_failed_attach(bob, into: Path, result, seconds: float, words: str) -> None:
    """attach --wait exited 1 at once with the reason; list and status show the failed attach."""
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert words in result.stderr, result.stderr
    assert seconds < DEAD_CODE_DEADLINE
    listed = {s["path"]: s for s in bob.cli_json("list")["shares"]}
    entry = listed[str(into.resolve())]
    assert entry["status"] == "failed" and words in entry["problem"]
    assert words in bob.cli("list").stdout
    status = bob.cli("status", str(into), check=False)
    assert "failed" in status.stdout and words in status.stdout
    assert bob.control_request({"type": "status"})["failed_attaches"] == 1
    assert not into.exists()  # nothing written for a code that never worked


def test_expired_code_fails_the_attach_with_its_reason(daemon_factory, tmp_path):
    """An expired code: attach --wait exits 1 quickly saying it expired."""
    alice = daemon_factory("alice")
    bob = daemon_factory("bob")
    code = alice.cli_json("share", str(alice.shares), "--expires", "1s")["access_code"]
    time.sleep(1.5)
    into = tmp_path / "bob-copy"
    result, seconds = _attach_wait(bob, code, into, alice.address)
    _assert_failed_attach(bob, into, result, seconds, "expired")


def test_used_code_fails_the_attach_with_its_reason(daemon_factory, tmp_path):
    """A one-time code already spent: the second attach exits 1 saying it was used."""
    alice = daemon_factory("alice")
    bob = daemon_factory("bob")
    (alice.shares / "a.txt").write_bytes(b"hello")
    code = alice.cli_json("share", str(alice.shares))["access_code"]
    first = tmp_path / "bob-first"
    result, _ = _attach_wait(bob, code, first, alice.address)
    assert result.returncode == 0, result.stderr
    into = tmp_path / "bob-second"
    result, seconds = _attach_wait(bob, code, into, alice.address)
    _assert_failed_attach(bob, into, result, seconds, "already used")


def test_cancelled_code_fails_the_attach_with_its_reason(daemon_factory, tmp_path):
    """A cancelled code: attach --wait exits 1 saying it was cancelled; a restart
    keeps the attach failed and does not dial again."""
    alice = daemon_factory("alice")
    bob = daemon_factory("bob")
    code = alice.cli_json("share", str(alice.shares))["access_code"]
    alice.cli("cancel-code", code)
    into = tmp_path / "bob-copy"
    result, seconds = _attach_wait(bob, code, into, alice.address)
    _assert_failed_attach(bob, into, result, seconds, "cancelled")
    bob.restart()
    alice_log = alice.log_path.read_text(errors="replace")
    time.sleep(3.0)  # a redial would come within INITIAL_BACKOFF
    assert alice.log_path.read_text(errors="replace").count("cannot start") == \
        alice_log.count("cannot start")
    entry = {s["path"]: s for s in bob.cli_json("list")["shares"]}[str(into.resolve())]
    assert entry["status"] == "failed" and "cancelled" in entry["problem"]
    # Detach forgets it; a fresh code attaches into the same folder.
    fresh = alice.cli_json("share", str(alice.shares))["access_code"]
    result, _ = _attach_wait(bob, fresh, into, alice.address)
    assert result.returncode == 0, result.stderr


def test_unknown_code_fails_the_attach(daemon_factory, tmp_path):
    """A code the peer never made: after a few refusals attach --wait exits 1, and the
    sharer still answers a legitimate attach."""
    alice = daemon_factory("alice")
    bob = daemon_factory("bob")
    made_elsewhere = new_access_code("ab" * 32, "read_write", time.time())
    into = tmp_path / "bob-copy"
    result, seconds = _attach_wait(bob, format_code(made_elsewhere.code), into, alice.address)
    _assert_failed_attach(bob, into, result, seconds, "no peer knows this access code")
    code = alice.cli_json("share", str(alice.shares))["access_code"]
    good = tmp_path / "bob-good"
    result, _ = _attach_wait(bob, code, good, alice.address)
    assert result.returncode == 0, result.stderr
    wait_until(lambda: good.is_dir())


# -- start-up failures -----------------------------------------------------------------


def _twistd(daemon, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """twistd -n clearskies with this daemon's data directory and environment, to the end."""
    return subprocess.run(
        [*TWISTD, "-n", "--pidfile=", "clearskies", "--data-dir", str(daemon.data_dir),
         *args], env=daemon.env, cwd=daemon.base, stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=timeout)


def _listener() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.settimeout(0.2)
    return sock


def test_port_taken_exits_1_with_the_reason(daemon_factory):
    """twistd with its --listen port taken exits 1 saying so, its database closed;
    clearskies start says so at once."""
    alice = daemon_factory("alice", start=False)
    with _listener() as taken:
        port = taken.getsockname()[1]
        result = _twistd(alice, "--no-lan", "--listen", "tcp:%d:interface=127.0.0.1" % port)
        assert result.returncode == 1
        assert "cannot start: cannot listen for peers" in result.stderr
        assert "Address already in use" in result.stderr
        # It stopped in order: the database was closed (SQLite removes its log then).
        assert (alice.data_dir / "state.sqlite3").exists()
        assert not (alice.data_dir / "state.sqlite3-wal").exists()
        started = time.monotonic()
        start = alice.cli("start", "--no-lan", "--listen", "tcp:%d:interface=127.0.0.1" % port,
                          check=False)
        assert time.monotonic() - started < 10  # not the 30 s start timeout
        assert start.returncode == 1
        assert "the daemon did not start: cannot listen for peers" in start.stderr
        assert "Address already in use" in start.stderr


def test_held_data_directory_refused_before_any_dial(daemon_factory):
    """A second daemon on a data directory in use exits 1 at once and dials nobody."""
    alice = daemon_factory("alice")
    alice.cli("share", str(alice.shares))
    with _listener() as peer:
        result = _twistd(alice, "--no-lan", "--peer", "127.0.0.1:%d" % peer.getsockname()[1],
                         "--listen", "tcp:0:interface=127.0.0.1")
        assert result.returncode == 1
        assert "another daemon (pid %d) is using the data directory" % alice.pid \
            in result.stderr
        with pytest.raises(TimeoutError):
            peer.accept()  # the second daemon never dialled
    # twistd without -n (it forks and waits for its child) says so too, and does not hang.
    result = subprocess.run(
        [*TWISTD, "--pidfile", str(alice.base / "second.pid"), "--logfile",
         str(alice.base / "second.log"), "clearskies", "--data-dir", str(alice.data_dir),
         "--no-lan"], env=alice.env, cwd=alice.base, stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "is using the data directory" in result.stderr
    assert alice.running and alice.cli_json("list")["shares"]  # the first one is untouched


def test_unusable_data_directory_and_bad_options_exit_1(daemon_factory, tmp_path):
    """A data directory that is a file, and a name peers would refuse, exit 1 with the reason."""
    alice = daemon_factory("alice", start=False)
    not_a_dir = tmp_path / "a-file"
    not_a_dir.write_text("x")
    result = subprocess.run(
        [*TWISTD, "-n", "--pidfile=", "clearskies", "--data-dir", str(not_a_dir), "--no-lan"],
        env=alice.env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "cannot use the data directory %s" % not_a_dir in result.stderr
    result = _twistd(alice, "--no-lan", "--name", "n" * 300)
    assert result.returncode != 0 and "at most 256 bytes" in result.stdout + result.stderr


def test_same_code_into_command_line_restarts(daemon_factory, tmp_path):
    """twistd --code … --into DIR started again the same way (after the attach) runs on."""
    alice = daemon_factory("alice")
    (alice.shares / "a.txt").write_bytes(b"hello")
    code = alice.cli_json("share", str(alice.shares), "--multi-use")["access_code"]
    into = tmp_path / "bob-copy"
    bob = daemon_factory("bob", "--code", code, "--into", str(into), "--peer", alice.address)
    wait_until(lambda: (into / "a.txt").exists(), timeout=30)
    bob.restart()  # the same command line
    assert bob.running
    assert [s["path"] for s in bob.cli_json("list")["shares"]] == [str(into.resolve())]


# -- options kept --------------------------------------------------------------------


def test_plain_restart_keeps_listen_tracker_and_no_lan(daemon_factory):
    """Started once with --listen, --tracker, --no-lan and --name, a plain twistd restart
    comes back the same; config get shows them; an explicit option replaces one."""
    alice = daemon_factory("alice", "--tracker", "http://127.0.0.1:9/")
    config = alice.cli_json("config", "get")["config"]
    assert config["listen"] == "tcp:%d:interface=127.0.0.1" % alice.port
    assert config["trackers"] == ["http://127.0.0.1:9"]
    assert config["lan"] is False and config["name"] == "alice"
    alice.stop()
    plain = subprocess.Popen([*TWISTD, "-n", "--pidfile=", "clearskies", "--data-dir",
                              str(alice.data_dir)], env=alice.env, cwd=alice.base,
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        status = wait_until(lambda: _status(alice), timeout=30)
        assert status["port"] == alice.port and status["name"] == "alice"
        assert alice.cli_json("config", "get")["config"] == config
        log = alice.data_dir / "clearskies.log"
        assert "LanDiscovery" not in log.read_text(errors="replace").split(
            "starting (pid %d)" % plain.pid)[-1]
        # Forget the tracker from the CLI; it applies at the next start.
        alice.cli("config", "set", "trackers", "")
        assert alice.cli_json("config", "get", "trackers")["value"] == []
    finally:
        plain.terminate()
        plain.wait(30)
    alice.extra = []  # no --tracker this time (the harness passes --listen, --no-lan, --name)
    alice.start()
    assert alice.cli_json("config", "get")["config"]["trackers"] == []
    alice.stop()
    # The kept port taken meanwhile: the start fails, saying how to choose another.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", alice.port))
        taken.listen(1)
        result = _twistd(alice)
    assert result.returncode == 1
    assert "kept from an earlier start" in result.stderr and "--listen" in result.stderr


def _status(daemon):
    try:
        return daemon.control_request({"type": "status"}, timeout=2)
    except (DaemonNotRunning, OSError):
        return None


# -- bad input at the control socket --------------------------------------------------


def test_odd_share_paths_get_clear_errors(daemon_factory, tmp_path):
    """create_share/add_share of /proc/self, a file, a 300-byte name, relative and NUL paths
    answer bad_request or refused, never internal; the daemon carries on."""
    alice = daemon_factory("alice")
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    long_name = str(tmp_path / ("n" * 300))
    code = format_code(new_access_code("ab" * 32, "read_write", time.time()).code)
    for path in ("/proc/self", str(a_file), long_name, long_name + "/below", "relative/dir",
                 "/tmp/a\x00b", "", "/" + "x" * 5000):
        for request in ({"type": "create_share", "path": path},
                        {"type": "add_share", "code": code, "path": path}):
            with pytest.raises(ControlError) as caught:
                alice.control_request(request)
            assert caught.value.code in ("bad_request", "refused"), (path, caught.value)
            assert caught.value.message and "internal" not in caught.value.message
    assert alice.cli_json("list")["shares"] == []


def test_config_set_refuses_what_the_daemon_cannot_use(daemon_factory):
    """config set: a name over 256 bytes, negative or huge rates, a bad listen or tracker
    are refused with a message; the stored values stay."""
    alice = daemon_factory("alice")
    for key, value in (("name", "n" * 300), ("name", "é" * 129), ("name", ""),
                       ("name", "a\nb"), ("upload_limit", -1), ("upload_limit", 10 ** 15),
                       ("download_limit", "fast"), ("listen", "tcp:99999"),
                       ("listen", "unix:/tmp/x"), ("trackers", "ftp://x"),
                       ("peers", ["nowhere"]), ("lan", "yes"), ("read_only_files", 1)):
        result = alice.cli("config", "set", key, json.dumps(value) if not isinstance(
            value, str) else value, check=False)
        assert result.returncode == 1, (key, value, result.stdout)
        assert result.stderr.startswith("clearskies: ") and "internal" not in result.stderr
    assert alice.cli_json("config", "get", "name")["value"] == "alice"
    assert alice.cli_json("config", "get", "upload_limit")["value"] == 0
    alice.cli("config", "set", "name", "é" * 128)  # 256 bytes: the most a peer takes
    assert alice.cli_json("config", "get", "name")["value"] == "é" * 128


JUNK = [None, True, 0, -1, 2 ** 70, 1.5, 1e308, "", "x" * 70000, "\x00", "rel",
        "/proc/self", "/tmp/\ud800x", [], ["x"] * 100, {}, {"a": 1}]
ARGUMENTS = ["path", "code", "peers", "merge", "mode", "one_time", "expires", "key",
             "value", "config", "address", "access_id", "skipped"]


def test_every_command_with_junk_arguments_never_answers_internal(daemon_factory):
    """Each control command with wrong types and over-long values gets a clear error
    (never internal); the daemon stays up and answers a legitimate request after."""
    from clearskies.control.commands import DaemonCommands

    alice = daemon_factory("alice")
    rng = random.Random(20261207)
    commands = sorted(name[len("cmd_"):] for name in dir(DaemonCommands)
                      if name.startswith("cmd_") and name != "cmd_stop")
    kinds = [c if not c.startswith("_clearskies_") else ".clearskies." + c[len("_clearskies_"):]
             for c in commands]
    with ControlClient(alice.control_path, timeout=20) as client:
        for kind in kinds:
            for _ in range(12):
                request: dict = {"type": kind}
                for argument in rng.sample(ARGUMENTS, rng.randint(1, 4)):
                    request[argument] = rng.choice(JUNK)
                try:
                    client.request(request)
                except ControlError as e:
                    assert e.code != "internal", (request, e.message)
    assert alice.control_request({"type": "status"})["shares"] == 0
    assert "internal error" not in alice.log_path.read_text(errors="replace")


def test_flood_of_dead_code_starts_leaves_the_sharer_serving(daemon_factory, tmp_path):
    """64 loopback addresses asking for dead or unknown codes each get a reason; the
    sharer's memory stays bounded and a legitimate attach still gets through."""
    from bench.abuse_operations import _flood, _rss_mb

    alice = daemon_factory("alice")
    bob = daemon_factory("bob")
    (alice.shares / "a.txt").write_bytes(b"hello")
    cancelled = alice.cli_json("share", str(alice.shares))["access_code"]
    alice.cli("cancel-code", cancelled)
    rng = random.Random(7)
    ids = [access_id(parse_code(cancelled))] + ["%064x" % rng.getrandbits(256)
                                                for _ in range(7)]
    before = _rss_mb(alice.pid)
    counts = _flood(alice.port, ids, sources=64, per_source=2)
    assert set(counts) <= {"cancelled", "unknown"} and sum(counts.values()) == 128
    assert counts.get("cancelled") and counts.get("unknown")
    assert alice.running and _rss_mb(alice.pid) - before < 32
    code = alice.cli_json("share", str(alice.shares))["access_code"]
    into = tmp_path / "bob-copy"
    result, _ = _attach_wait(bob, code, into, alice.address)
    assert result.returncode == 0, result.stderr
    assert (into / "a.txt").read_bytes() == b"hello"


def test_start_with_options_while_running_says_they_are_not_applied(daemon_factory):
    """clearskies start --listen … on a running daemon does not drop the options silently."""
    alice = daemon_factory("alice")
    result = alice.cli("start", "--listen", "tcp:1", "--no-lan")
    assert "already running" in result.stdout
    assert "--listen --no-lan not applied to the running daemon" in result.stderr
    assert alice.cli_json("config", "get", "listen")["value"] != "tcp:1"


def test_unproven_cancelled_is_not_believed(daemon_factory, tmp_path):
    """A peer that answers "cancelled" without the code's proof cannot end an attach at
    once: it counts as "no peer knows this code", three times over."""
    import threading

    bob = daemon_factory("bob")
    server = _listener()
    server.settimeout(30)
    answered = []

    def impostor() -> None:
        while len(answered) < 3:
            try:
                connection, _ = server.accept()
            except OSError:
                return
            with connection:
                connection.sendall(b'{"type":"greeting","protocol":[1],"features":[]}\n')
                connection.makefile("rb").readline()
                connection.sendall(b'{"type":"cannot_start","reason":"cancelled",'
                                   b'"proof":"' + b"0" * 64 + b'"}\n')
                answered.append(1)

    thread = threading.Thread(target=impostor, daemon=True)
    thread.start()
    try:
        code = format_code(new_access_code("ab" * 32, "read_write", time.time()).code)
        into = tmp_path / "bob-copy"
        result, seconds = _attach_wait(bob, code, into,
                                       "127.0.0.1:%d" % server.getsockname()[1])
        assert len(answered) == 3
        _assert_failed_attach(bob, into, result, seconds, "no peer knows this access code")
        assert "was cancelled" not in result.stderr
    finally:
        server.close()
        thread.join(5)


def test_clearskies_start_with_a_bad_option_says_why(daemon_factory):
    """`clearskies start --listen bogus` exits 1 with twistd's reason (it prints it on
    standard output, which start used to throw away)."""
    alice = daemon_factory("alice", start=False)
    result = alice.cli("start", "--listen", "bogus", check=False)
    assert result.returncode == 1
    assert "--listen must be a tcp:PORT endpoint" in result.stderr, result.stderr
    assert "twistd" not in result.stderr and not alice._answers()


def test_code_for_a_share_already_synced_fails_the_attach_and_stays_unspent(
        daemon_factory, tmp_path):
    """A new code for a share bob already syncs: attach --wait exits 1 naming bob's folder,
    nothing is created, and the one-time code still works for someone else."""
    alice = daemon_factory("alice")
    bob = daemon_factory("bob")
    (alice.shares / "a.txt").write_bytes(b"hello")
    first = tmp_path / "bob-first"
    code = alice.cli_json("share", str(alice.shares))["access_code"]
    result, _ = _attach_wait(bob, code, first, alice.address)
    assert result.returncode == 0, result.stderr
    again = alice.cli_json("share", str(alice.shares))["access_code"]
    into = tmp_path / "bob-second"
    result, seconds = _attach_wait(bob, again, into, alice.address)
    _assert_failed_attach(bob, into, result, seconds, "already synced at %s" % first.resolve())
    assert "detach it first or use that folder" in result.stderr
    assert (first / "a.txt").read_bytes() == b"hello"
    assert "Traceback" not in bob.log_path.read_text(errors="replace")
    carol = daemon_factory("carol")
    theirs = tmp_path / "carol-copy"
    result, _ = _attach_wait(carol, again, theirs, alice.address)
    assert result.returncode == 0, result.stderr
    wait_until(lambda: (theirs / "a.txt").exists(), timeout=30)
    assert (theirs / "a.txt").read_bytes() == b"hello"
