"""twistd without -n: the parent process exits with what the daemon's start came to."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from clearskies.daemon.startup import DaemonizedStartReport
from clearskies.errors import ConfigurationError
from tests.daemons import REPO_ROOT, TWISTD


def _report(config: dict) -> tuple[DaemonizedStartReport, Deferred[None], int]:
    read, write = os.pipe()
    config["statusPipe"] = write
    ready: Deferred[None] = Deferred()
    report = DaemonizedStartReport(config, ready)
    report.startService()
    return report, ready, read


def test_success_is_written_once_the_start_is_done() -> None:
    config: dict = {}
    report, ready, read = _report(config)
    assert config["statusPipe"] is None  # twistd writes nothing itself now
    os.set_blocking(read, False)
    with pytest.raises(BlockingIOError):
        os.read(read, 100)  # nothing yet: the parent keeps waiting
    ready.callback(None)
    assert os.read(read, 100) == b"0"
    assert os.read(read, 100) == b""  # closed
    os.close(read)


def test_failure_reason_reaches_the_parent_even_if_a_later_errback_consumes_it() -> None:
    config: dict = {}
    read, write = os.pipe()
    config["statusPipe"] = write
    ready: Deferred[None] = Deferred()
    report = DaemonizedStartReport(config, ready)
    ready.addErrback(lambda failure: None)  # what tap does after building the report
    report.startService()
    ready.errback(Failure(ConfigurationError("cannot listen on port 1: " + "x" * 200)))
    answer = os.read(read, 1000)
    assert answer.startswith(b"1 cannot listen on port 1: ")
    assert len(answer) == DaemonizedStartReport.MAX_ANSWER
    os.close(read)


def test_stopped_before_the_start_ended_still_answers() -> None:
    report, ready, read = _report({})
    report.stopService()
    assert os.read(read, 100).startswith(b"1 ")
    ready.callback(None)  # later outcome: the pipe is closed already, nothing breaks
    os.close(read)


def test_run_in_the_foreground_does_nothing() -> None:
    ready: Deferred[None] = Deferred()
    report = DaemonizedStartReport({}, ready)
    report.startService()
    ready.callback(None)
    assert report.pipe is None and ready.result is None


def _daemonized(tmp_path: Path, port: int) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), HOME=str(tmp_path))
    return subprocess.run(
        [*TWISTD, "--pidfile", str(tmp_path / "twistd.pid"), "--logfile",
         str(tmp_path / "twistd.log"), "clearskies", "--data-dir", str(tmp_path / "data"),
         "--listen", "tcp:%d:interface=127.0.0.1" % port, "--no-lan", "--no-web"],
        env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)


@pytest.mark.slow
def test_daemonized_twistd_exits_1_when_its_port_is_taken(tmp_path: Path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        done = _daemonized(tmp_path, taken.getsockname()[1])
    finally:
        taken.close()
    assert done.returncode == 1, done
    assert "cannot listen for peers" in done.stderr


@pytest.mark.slow
def test_daemonized_twistd_exits_0_once_it_runs(tmp_path: Path) -> None:
    done = _daemonized(tmp_path, 0)
    assert done.returncode == 0, done
    pid = int((tmp_path / "twistd.pid").read_text())
    try:
        assert (tmp_path / "data" / "control").exists()  # answered only once it was up
    finally:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
