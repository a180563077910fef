"""The end-to-end harness in tests/daemons.py.

Most of it is checked against a stand-in daemon: a few lines of Python that
serve the real control protocol on the data directory's socket.  One test
runs the real daemon and switches itself on once ``clearskies.daemon`` exists.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from pathlib import Path

import pytest

from clearskies.control.client import DaemonNotRunning
from tests.daemons import (
    MARKER_NAME,
    TEMP_SUFFIX,
    TWISTD,
    CliError,
    DaemonError,
    DaemonProcess,
    DaemonSet,
    assert_trees_equal,
    daemon_factory,  # noqa: F401
    daemon_ready,
    free_port,
    tree_snapshot,
    wait_until,
)

# -- wait_until and free_port --------------------------------------------------------


def test_wait_until_returns_first_truthy_result():
    """wait_until keeps calling until the predicate is truthy and returns that value."""
    calls = []

    def third_time() -> str:
        calls.append(1)
        return "done" if len(calls) == 3 else ""

    assert wait_until(third_time, timeout=5, interval=0.01) == "done"
    assert len(calls) == 3


def test_wait_until_times_out():
    """wait_until raises TimeoutError with the message and last result after the timeout."""
    calls = []

    def never() -> int:
        calls.append(1)
        return 0

    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"files synced: still not true after 0.2 s "
                                           r"\(last result: 0\)"):
        wait_until(never, timeout=0.2, interval=0.02, message="files synced")
    assert 0.2 <= time.monotonic() - started < 2
    assert len(calls) >= 3


def test_wait_until_names_the_predicate():
    """Without a message, the timeout error names the predicate function."""
    def peers_connected() -> bool:
        return False

    with pytest.raises(TimeoutError, match="peers_connected"):
        wait_until(peers_connected, timeout=0.05, interval=0.01)


def test_free_port_is_bindable_on_loopback():
    """free_port returns a port that can be bound on 127.0.0.1 right away."""
    port = free_port()
    assert 1024 <= port <= 65535
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", port))
        s.listen(1)


# -- tree_snapshot and assert_trees_equal --------------------------------------------


def make_tree(root: Path) -> None:
    (root / "docs" / "deep").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "a.txt").write_bytes(b"hello\n")
    (root / "docs" / "deep" / "b.bin").write_bytes(bytes(range(256)) * 10)
    (root / "run.sh").write_bytes(b"#!/bin/sh\n")
    os.chmod(root / "a.txt", 0o644)
    os.chmod(root / "run.sh", 0o755)
    os.chmod(root / "docs" / "deep" / "b.bin", 0o600)


HELLO_SHA = "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03"


def test_tree_snapshot(tmp_path):
    """tree_snapshot maps relative paths to sha256 or <dir> plus permission bits."""
    make_tree(tmp_path)
    os.symlink("a.txt", tmp_path / "link")
    snap = tree_snapshot(tmp_path)
    assert list(snap) == ["a.txt", "docs", "docs/deep", "docs/deep/b.bin", "empty", "link",
                          "run.sh"]
    assert snap["a.txt"] == (HELLO_SHA, 0o644)
    assert snap["run.sh"][1] == 0o755
    assert snap["docs/deep/b.bin"][1] == 0o600
    assert snap["docs"][0] == snap["empty"][0] == "<dir>"
    assert snap["link"][0] == "<symlink> a.txt"


def test_tree_snapshot_skips_marker_and_partial_downloads(tmp_path):
    """The root .clearskies marker and *.!clearsky files are left out; a nested .clearskies is not."""
    make_tree(tmp_path)
    before = tree_snapshot(tmp_path)
    (tmp_path / MARKER_NAME).mkdir()
    (tmp_path / MARKER_NAME / "state").write_bytes(b"x")
    (tmp_path / ("a.txt" + TEMP_SUFFIX)).write_bytes(b"partial")
    (tmp_path / "docs" / (".b.bin" + TEMP_SUFFIX)).write_bytes(b"partial")
    assert tree_snapshot(tmp_path) == before
    (tmp_path / "docs" / MARKER_NAME).write_bytes(b"user file")
    assert "docs/" + MARKER_NAME in tree_snapshot(tmp_path)


def test_tree_snapshot_extra_ignores(tmp_path):
    """Paths passed as ignore are left out together with everything under them."""
    make_tree(tmp_path)
    snap = tree_snapshot(tmp_path, ignore=["docs", "run.sh"])
    assert list(snap) == ["a.txt", "empty"]


def test_equal_trees_pass(tmp_path):
    """Two copies of a tree are equal even when only one has a marker or partial file."""
    make_tree(tmp_path / "a")
    make_tree(tmp_path / "b")
    (tmp_path / "b" / MARKER_NAME).write_bytes(b"share id")
    (tmp_path / "b" / ("x" + TEMP_SUFFIX)).write_bytes(b"partial")
    os.chmod(tmp_path / "b" / "empty", 0o700)  # directory modes do not count
    assert_trees_equal(tmp_path / "a", tmp_path / "b")
    assert_trees_equal(tree_snapshot(tmp_path / "a"), tmp_path / "b")


def test_differing_trees_list_every_difference(tmp_path):
    """The error names missing, extra, changed and re-moded paths, one per line."""
    a, b = tmp_path / "a", tmp_path / "b"
    make_tree(a)
    make_tree(b)
    (b / "a.txt").write_bytes(b"changed\n")
    os.chmod(b / "run.sh", 0o644)
    (b / "empty").rmdir()
    (b / "new.txt").write_bytes(b"")
    with pytest.raises(AssertionError) as caught:
        assert_trees_equal(a, b)
    message = str(caught.value)
    assert message.splitlines() == [
        "trees differ in 4 paths (a = %s, b = %s):" % (a, b),
        "  differs:   a.txt (a: file %s 0644, b: file %s 0644)" % (
            HELLO_SHA[:12], tree_snapshot(b)["a.txt"][0][:12]),
        "  only in a: empty (<dir> %04o)" % tree_snapshot(a)["empty"][1],
        "  only in b: new.txt (file e3b0c44298fc 0644)",
        "  mode:      run.sh (a: 0755, b: 0644)",
    ]


def test_modes_can_be_ignored(tmp_path):
    """compare_modes=False accepts files that differ only in permission bits."""
    make_tree(tmp_path / "a")
    make_tree(tmp_path / "b")
    os.chmod(tmp_path / "b" / "run.sh", 0o600)
    with pytest.raises(AssertionError, match="mode: +run.sh"):
        assert_trees_equal(tmp_path / "a", tmp_path / "b")
    assert_trees_equal(tmp_path / "a", tmp_path / "b", compare_modes=False)


def test_long_diffs_are_cut(tmp_path):
    """Beyond max_lines differences the error says how many more there are."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for n in range(12):
        (tmp_path / "a" / ("f%02d" % n)).write_bytes(b"")
    with pytest.raises(AssertionError) as caught:
        assert_trees_equal(tmp_path / "a", tmp_path / "b", max_lines=5)
    lines = str(caught.value).splitlines()
    assert lines[0].startswith("trees differ in 12 paths")
    assert len(lines) == 7
    assert lines[-1] == "  … and 7 more"


# -- DaemonProcess without starting anything ------------------------------------------


def test_daemon_process_layout(tmp_path):
    """Each daemon gets its own HOME, XDG_DATA_HOME, data dir, port and exact twistd command."""
    daemon = DaemonProcess(tmp_path, "alice", ["--tracker", "http://127.0.0.1:9/"])
    other = DaemonProcess(tmp_path, "bob")
    assert daemon.env["HOME"] == str(tmp_path / "alice" / "home")
    assert daemon.env["XDG_DATA_HOME"] == str(tmp_path / "alice" / "xdg-data")
    assert daemon.env["CLEARSKIES_DATA_DIR"] == str(daemon.data_dir)
    assert Path(daemon.env["HOME"]).is_dir() and daemon.shares.is_dir()
    assert daemon.control_path == os.path.join(daemon.data_dir, "control")
    assert len({daemon.data_dir, other.data_dir}) == 2
    assert daemon.port != other.port
    assert daemon.address == "127.0.0.1:%d" % daemon.port
    assert daemon.daemon_argv() == [
        *TWISTD, "-n", "--pidfile=", "clearskies",
        "--data-dir", str(daemon.data_dir),
        "--listen", "tcp:%d:interface=127.0.0.1" % daemon.port,
        "--no-lan", "--name", "alice", "--tracker", "http://127.0.0.1:9/",
    ]
    assert not daemon.running and daemon.stop() is None and daemon.log_tail() == ""


def test_deep_tmp_path_gets_a_short_data_dir(tmp_path):
    """When tmp_path is deep, the data dir moves so the socket path fits in 107 bytes."""
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    daemon = DaemonProcess(deep, "carol")
    assert len(os.fsencode(daemon.control_path)) <= 107
    assert daemon.data_dir.is_dir()
    daemon.cleanup()
    assert not daemon.data_dir.exists()


def test_factory_fixture_refuses_duplicate_names(daemon_factory):  # noqa: F811
    """daemon_factory makes distinct daemons and refuses a name used twice in a test."""
    alice = daemon_factory("alice", start=False)
    bob = daemon_factory("bob", "--no-such-option", start=False)
    assert alice.base != bob.base and bob.extra == ["--no-such-option"]
    with pytest.raises(ValueError, match="already a daemon called 'alice'"):
        daemon_factory("alice", start=False)


# -- DaemonProcess against a stand-in daemon ----------------------------------------

STAND_IN = '''
import signal, sys
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from clearskies.control.protocol import CommandDispatcher, ControlFactory, listen_control

control_path, name, mode = sys.argv[1:4]

class Commands(CommandDispatcher):
    def cmd_list_shares(self, request):
        return {"shares": [{"path": "/stand-in/" + name, "status": "idle"}]}

    def cmd_stop(self, request):
        reactor.callLater(0, reactor.stop)

async def main():
    if mode == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    await listen_control(reactor, control_path, ControlFactory(Commands(), "stand-in"))
    print("stand-in daemon %s listening" % name, flush=True)

reactor.callWhenRunning(lambda: Deferred.fromCoroutine(main()))
reactor.run()
'''


@pytest.fixture
def stand_in(tmp_path: Path) -> type[DaemonProcess]:
    """A DaemonProcess class whose process is the stand-in daemon above."""
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)

    class StandIn(DaemonProcess):
        mode = "normal"

        def daemon_argv(self) -> list[str]:
            return [sys.executable, str(script), self.control_path, self.name, self.mode]

    return StandIn


def test_start_cli_and_stop(tmp_path, stand_in):
    """start waits for the socket; cli and control_request reach it; stop ends it with SIGTERM."""
    with DaemonSet(tmp_path, stand_in) as daemons:
        daemon = daemons.make("alice")
        assert daemon.running
        expected = {"shares": [{"path": "/stand-in/alice", "status": "idle"}]}
        assert daemon.control_request({"type": "list_shares"}) == expected
        assert daemon.cli_json("list") == expected
        assert "stand-in daemon alice listening" in daemon.log_tail()
        assert daemon.stop() == 0
        assert not daemon.running
        with pytest.raises(DaemonNotRunning):
            daemon.control_request({"type": "list_shares"})


def test_cli_failure_is_reported(tmp_path, stand_in):
    """A failing command raises CliError with its output, or returns it with check=False."""
    daemon = stand_in(tmp_path, "bob")
    with pytest.raises(CliError) as caught:
        daemon.cli("list")
    assert caught.value.result.returncode == 2
    assert "exited with 2" in str(caught.value)
    assert "clearskies start" in str(caught.value)
    result = daemon.cli("list", check=False)
    assert result.returncode == 2 and result.stdout == ""


def test_kill9_then_restart(tmp_path, stand_in):
    """kill9 leaves a stale socket; restart starts a new process on the same port and log."""
    with DaemonSet(tmp_path, stand_in) as daemons:
        daemon = daemons.make("alice")
        first_pid, port = daemon.pid, daemon.port
        assert daemon.kill9() == -signal.SIGKILL
        assert os.path.exists(daemon.control_path)
        daemon.restart()
        assert daemon.running and daemon.pid != first_pid and daemon.port == port
        assert daemon.control_request({"type": "list_shares"})["shares"]
        assert daemon.log_tail(100).count("=== ") == 2


def test_stop_escalates_to_sigkill(tmp_path, stand_in):
    """A daemon that ignores SIGTERM is killed after the stop timeout."""
    stand_in.mode = "stubborn"
    with DaemonSet(tmp_path, stand_in) as daemons:
        daemon = daemons.make("alice")
        started = time.monotonic()
        assert daemon.stop(timeout=0.5) == -signal.SIGKILL
        assert time.monotonic() - started < 5


def test_set_close_kills_everything(tmp_path, stand_in):
    """Closing a DaemonSet ends every process it started, even one that ignores SIGTERM."""
    daemons = DaemonSet(tmp_path, stand_in, stop_timeout=0.5)
    alice = daemons.make("alice")
    stand_in.mode = "stubborn"
    bob = daemons.make("bob")
    daemons.close()
    assert alice.proc.returncode == 0
    assert bob.proc.returncode == -signal.SIGKILL


def test_start_failure_quotes_the_log(tmp_path):
    """A process that exits before answering raises DaemonError with the last 40 log lines."""
    class Broken(DaemonProcess):
        def daemon_argv(self) -> list[str]:
            return [sys.executable, "-c",
                    "import sys\nfor n in range(50): print('line %d' % n)\nsys.exit(3)"]

    daemon = Broken(tmp_path, "broken")
    with pytest.raises(DaemonError) as caught:
        daemon.start()
    message = str(caught.value)
    assert "daemon broken exited with code 3" in message
    assert "line 10\n" in message and "line 49\n" in message
    assert "line 9\n" not in message
    assert not daemon.running


def test_start_timeout_kills_the_process(tmp_path):
    """A process that never answers is killed after the start timeout and reported."""
    class Silent(DaemonProcess):
        def daemon_argv(self) -> list[str]:
            return [sys.executable, "-c", "import time; print('thinking', flush=True); "
                                          "time.sleep(60)"]

    daemon = Silent(tmp_path, "silent")
    with pytest.raises(DaemonError, match=r"did not answer on .* within 0.5 s(.|\n)*thinking"):
        daemon.start(timeout=0.5)
    assert daemon.proc.returncode == -signal.SIGKILL


# -- the real daemon ---------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not daemon_ready(), reason="clearskies.daemon does not exist yet")
def test_real_daemon_answers_list_shares(daemon_factory):  # noqa: F811
    """A real daemon started by the harness answers list_shares and stops on SIGTERM."""
    daemon = daemon_factory("alice")
    reply = daemon.control_request({"type": "list_shares"})
    assert isinstance(reply["shares"], list)
    assert daemon.cli_json("list") == {"shares": reply["shares"]}
    # twistd re-raises SIGTERM after a clean shutdown, hence -15.
    assert daemon.stop() in (0, -15)
    assert "Server Shut Down." in daemon.log_tail()
    assert not os.path.exists(daemon.control_path)
