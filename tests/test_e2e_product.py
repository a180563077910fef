"""The product as a user runs it: real daemons, the real CLI, the log, limits and pause."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.daemons import wait_same_trees, REPO_ROOT, TWISTD, wait_until, share_and_attach

pytestmark = pytest.mark.slow

SYNC_TIMEOUT = 30.0
CODE_RE = re.compile(r"^SYNC[A-Z2-7]{29}$", re.MULTILINE)


def _arrives(path: Path, data: bytes) -> bool:
    try:
        return path.read_bytes() == data
    except FileNotFoundError:
        return False


# -- logging ---------------------------------------------------------------------------


def _secrets_of(data_dir: Path) -> list[str]:
    """Every PSK (hex) held in a data directory's key files."""
    found = []
    for key_file in (data_dir / "keys").glob("*.json"):
        found.extend(json.loads(key_file.read_text())["psks"].values())
    return found


def _loggable_files(data_dir: Path) -> Iterator[Path]:
    """Regular files of a data directory, except the key files and the database."""
    for path in data_dir.rglob("*"):
        if not path.is_file() or path.is_symlink():
            continue
        if path.parent.name == "keys" and path.suffix == ".json":
            continue
        if path.name.startswith("state.sqlite3"):
            continue
        yield path


def test_log_shows_lines_and_never_a_secret(daemon_factory):
    """`clearskies log` shows the daemon's own log; no code or PSK is in any log or loose file."""
    alice, bob = daemon_factory("alice"), daemon_factory("bob")
    (alice.shares / "hello.txt").write_text("hello\n")
    code = share_and_attach(alice, bob)
    wait_same_trees(alice.shares, bob.shares, SYNC_TIMEOUT)

    for daemon in (alice, bob):
        shown = daemon.cli("log", "-n", "50").stdout.splitlines()
        assert 0 < len(shown) <= 50
        assert any("ClearSkies daemon ready" in line for line in shown)
        assert (daemon.data_dir / "clearskies.log").stat().st_mode & 0o077 == 0
    assert any("attached" in line for line in bob.cli("log", "-n", "50").stdout.splitlines())

    psks = _secrets_of(alice.data_dir) + _secrets_of(bob.data_dir)
    assert len(psks) >= 2
    needles = [code, code.lower()] + psks
    checked = []
    for daemon in (alice, bob):
        # The process's stdout log (twistd -n) carries the same events as clearskies.log.
        for path in [*_loggable_files(daemon.data_dir), daemon.log_path]:
            text = path.read_bytes().decode("utf-8", "replace")
            for needle in needles:
                assert needle not in text, "a secret is in %s" % path
            checked.append(path.name)
    assert checked.count("clearskies.log") == 2


# -- limits and pause -----------------------------------------------------------------------


def _send_one_mebibyte(sender: Any, source: Path, destination: Path, name: str) -> float:
    """Seconds from writing 1 MiB of new content at the sender until it arrives whole."""
    data = os.urandom(1024 * 1024)
    start = time.monotonic()  # before the write: inotify may start the transfer at once
    (source / name).write_bytes(data)
    sender.cli("scan", str(source))
    wait_until(lambda: _arrives(destination / name, data), timeout=30, interval=0.05)
    return time.monotonic() - start


def test_rate_limits_and_pause(daemon_factory):
    """upload_limit and download_limit slow a 1 MiB file to the limit; pause holds new files."""
    alice, bob = daemon_factory("alice"), daemon_factory("bob")
    a, b = alice.shares, bob.shares
    (a / "first.txt").write_text("connected\n")
    share_and_attach(alice, bob)
    wait_same_trees(a, b, SYNC_TIMEOUT)

    # Upload limit on the sender.
    alice.cli("config", "set", "upload_limit", "200000")
    assert alice.cli_json("config", "get", "upload_limit")["value"] == 200000
    took = _send_one_mebibyte(alice, a, b, "up.bin")
    assert 4.0 <= took < 20, "1 MiB at 200 kB/s took %.1f s" % took

    # Download limit on the receiver (the sender unlimited again, at once).
    alice.cli("config", "set", "upload_limit", "0")
    bob.cli("config", "set", "download_limit", "200000")
    took = _send_one_mebibyte(alice, a, b, "down.bin")
    assert 4.0 <= took < 20, "1 MiB at a 200 kB/s download limit took %.1f s" % took
    bob.cli("config", "set", "download_limit", "0")

    # Pause on the side that has the new file: not scanned, not announced, not served.
    files_before = alice.cli_json("status", str(a))["files"]
    alice.cli("pause")
    assert alice.cli_json("status")["paused"] is True
    (a / "while-paused.txt").write_text("held back\n")
    time.sleep(3)
    assert not (b / "while-paused.txt").exists()
    held = alice.cli_json("status", str(a))
    assert (held["status"], held["files"]) == ("paused", files_before)  # not even scanned
    alice.cli("resume")
    wait_until(lambda: _arrives(b / "while-paused.txt", b"held back\n"), timeout=SYNC_TIMEOUT)

    # Pause on the receiving side: it fetches nothing until resumed.
    bob.cli("pause")
    (a / "to-paused.txt").write_text("wait for it\n")
    alice.cli("scan", str(a))
    time.sleep(3)
    assert not (b / "to-paused.txt").exists()
    bob.cli("resume")
    wait_same_trees(a, b, SYNC_TIMEOUT)


def test_scan_while_paused_is_refused_at_once(daemon_factory):
    """``clearskies scan`` on a paused daemon says so at once and names ``resume``; after it, scans run."""
    alice = daemon_factory("alice")
    a = alice.shares
    (a / "one.txt").write_text("one\n")
    alice.cli_json("share", str(a))
    # Only the scan asked for may find two.txt below (the watcher could come first).
    alice.cli("config", "set", "watcher", "false", "--share", str(a))
    alice.cli("pause")
    started = time.monotonic()
    result = alice.cli("scan", str(a), check=False, timeout=20)
    assert time.monotonic() - started < 10, result
    assert result.returncode == 1, result
    assert "paused" in result.stderr and "clearskies resume" in result.stderr, result
    alice.cli("resume")
    (a / "two.txt").write_text("two\n")
    assert alice.cli_json("scan", str(a))["changes"] >= 1


# -- a new user, CLI only ---------------------------------------------------------------------


def _cli_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "HOME": str(home), "XDG_DATA_HOME": str(home / "xdg"),
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT)] + [p for p in [
            os.environ.get("PYTHONPATH")] if p]),
    })
    env.pop("CLEARSKIES_DATA_DIR", None)
    return env


def _clearskies(data_dir: Path, env: dict[str, str], *args: str,
                cwd: Path) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "clearskies.cli", "--data-dir", str(data_dir), *args]
    result = subprocess.run(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=90)
    log = data_dir / "clearskies.log"
    assert result.returncode == 0, "clearskies %s: %s%s\n--- log:\n%s" % (
        " ".join(args), result.stdout, result.stderr,
        log.read_text()[-4000:] if log.exists() else "(none)")
    return result


def _daemon_pid(data_dir: Path) -> int | None:
    try:
        return int((data_dir / "clearskies.pid").read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _stop_background_daemon(data_dir: Path, env: dict[str, str], cwd: Path,
                            pid: int | None) -> None:
    """`clearskies stop`, then SIGKILL that daemon's own PID if it is still there."""
    subprocess.run([sys.executable, "-m", "clearskies.cli", "--data-dir", str(data_dir),
                    "stop"], env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                   capture_output=True, timeout=30)
    if pid is None:
        return
    try:
        wait_until(lambda: not _alive(pid), timeout=15)
    except TimeoutError:
        os.kill(pid, signal.SIGKILL)


def test_new_user_share_and_attach_start_the_daemons(tmp_path):
    """With no daemon running, `share` and `attach` start one each; the files sync;
    `list` and `status` count what is on disk."""
    # Short data directories: the control socket path must fit in 107 bytes.
    data1 = Path(tempfile.mkdtemp(prefix="cs-u1-"))
    data2 = Path(tempfile.mkdtemp(prefix="cs-u2-"))
    env = _cli_env(tmp_path / "home")
    mine, theirs = tmp_path / "Documents", tmp_path / "Laptop-Documents"
    mine.mkdir()
    (mine / "todo.txt").write_text("buy milk\n")
    (mine / "photos").mkdir()
    (mine / "photos" / "cat.jpg").write_bytes(os.urandom(150_000))
    local_only = ["--listen", "tcp:0:interface=127.0.0.1", "--no-lan"]
    pids: dict[Path, int | None] = {}
    try:
        shared = _clearskies(data1, env, "share", str(mine), *local_only, cwd=tmp_path)
        pids[data1] = _daemon_pid(data1)
        assert pids[data1] is not None and _alive(pids[data1])
        codes = CODE_RE.findall(shared.stdout)
        assert len(codes) == 1, shared.stdout
        assert "clearskies attach %s" % codes[0] in shared.stdout
        port = json.loads(_clearskies(data1, env, "--json", "status", cwd=tmp_path).stdout)["port"]

        attached = _clearskies(data2, env, "attach", codes[0], str(theirs),
                               "--peer", "127.0.0.1:%d" % port, *local_only, cwd=tmp_path)
        pids[data2] = _daemon_pid(data2)
        assert pids[data2] is not None and pids[data2] != pids[data1]
        assert "attached" in attached.stdout
        wait_same_trees(mine, theirs, SYNC_TIMEOUT)
        assert (theirs / "photos" / "cat.jpg").read_bytes() == \
            (mine / "photos" / "cat.jpg").read_bytes()

        for data_dir, root in ((data1, mine), (data2, theirs)):
            def counted(data_dir: Path = data_dir, root: Path = root) -> Any:
                listing = json.loads(_clearskies(data_dir, env, "--json", "list",
                                                 cwd=tmp_path).stdout)["shares"]
                status = json.loads(_clearskies(data_dir, env, "--json", "status", str(root),
                                                cwd=tmp_path).stdout)
                return (len(listing) == 1 and listing[0]["files"] == 2
                        and listing[0]["path"] == os.path.realpath(root)
                        and status["files"] == 2 and status["directories"] == 1
                        and status["bytes"] == 150_000 + len("buy milk\n"))
            wait_until(counted, timeout=15, interval=0.2)
            human = _clearskies(data_dir, env, "list", cwd=tmp_path).stdout
            assert "2 files" in human and os.path.realpath(root) in human
            # The background daemon writes its own log; twistd keeps no second copy.
            assert "ClearSkies daemon ready" in (data_dir / "clearskies.log").read_text()
            assert not (data_dir / "twistd.log").exists()
    finally:
        for data_dir in (data1, data2):
            _stop_background_daemon(data_dir, env, tmp_path, pids.get(data_dir))
    for data_dir in (data1, data2):
        pid = pids.get(data_dir)
        assert pid is None or not _alive(pid)
        shutil.rmtree(data_dir, ignore_errors=True)


# -- the control socket of a real daemon ------------------------------------------------------


class _LineSocket:
    """A raw control-socket connection: write bytes, read reply lines."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(20)
        self.sock.connect(path)
        self.buffer = b""
        self.greeting = self.line()

    def line(self) -> dict[str, Any] | None:
        """The next line as JSON, or None at end of stream."""
        while b"\n" not in self.buffer:
            data = self.sock.recv(65536)
            if not data:
                return None
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def close(self) -> None:
        self.sock.close()


def test_control_socket_pipelining_and_bad_input(daemon_factory):
    """50 pipelined requests come back in order; garbage, unknown and 2 MB lines leave it serving."""
    daemon = daemon_factory("ctl")
    (daemon.shares / "f.txt").write_text("x\n")
    daemon.control_request({"type": "create_share", "path": str(daemon.shares)})

    conn = _LineSocket(daemon.control_path)
    assert conn.greeting["service"] == "ClearSkies Control"
    keys = ["name", "upload_limit", "download_limit"]
    burst = [{"type": ".clearskies.scan", "path": str(daemon.shares)}]  # slow reply first
    burst += [{"type": "get_config_value", "key": keys[n % 3]} for n in range(49)]
    conn.sock.sendall(b"".join(json.dumps(r).encode() + b"\n" for r in burst))
    replies = [conn.line() for _ in burst]
    assert "changes" in replies[0]
    assert [r["key"] for r in replies[1:]] == [keys[n % 3] for n in range(49)]
    assert replies[1]["value"] == "ctl"

    garbage = [b"\xff\xfe\x00 not text\n", b"{not json\n", b"[1, 2, 3]\n",
               b'{"no_type": true}\n', b'{"type": "no_such_command"}\n',
               b'{"type": "create_share", "path": 42}\n']
    conn.sock.sendall(b"".join(garbage))
    errors = [conn.line() for _ in garbage]
    assert all("error" in reply for reply in errors), errors
    conn.sock.sendall(b'{"type": "list_shares"}\n')
    assert len(conn.line()["shares"]) == 1

    # 2 MB in one line: refused with an error, and that connection is closed.
    try:
        conn.sock.sendall(b'{"type": "status", "pad": "' + b"a" * (2 * 1024 * 1024) + b'"}\n')
    except (BrokenPipeError, ConnectionResetError):
        pass
    try:
        last = conn.line()
    except ConnectionResetError:
        last = None
    assert last is None or last.get("error") == "line_too_long"
    conn.close()

    assert daemon.running
    after = daemon.control_request({"type": "list_shares"})
    assert [s["path"] for s in after["shares"]] == [os.path.realpath(daemon.shares)]


# -- plugins -------------------------------------------------------------------------------------


def test_twistd_lists_both_plugins():
    """After installation `twistd --help` offers both the daemon and the tracker."""
    result = subprocess.run([*TWISTD, "--help"], capture_output=True, text=True, timeout=60,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    commands = {line.split()[0] for line in result.stdout.splitlines()
                if line.startswith("    ") and line.split()}
    assert {"clearskies", "clearskies-tracker"} <= commands, result.stdout
