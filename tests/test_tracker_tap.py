"""The clearskies-tracker twistd plugin: options, service tree, and a real twistd run."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.application.service import MultiService
from twisted.python import usage

from clearskies.tracker import tap

TWISTD = Path(sys.executable).with_name("twistd")


def _options(*argv: str) -> tap.Options:
    options = tap.Options()
    options.parseOptions(list(argv))
    return options


def test_defaults():
    """Without arguments the tracker listens on tcp:49200 with a 300 s TTL."""
    options = _options()
    assert options["listen"] == "tcp:49200"
    assert options["ttl"] == 300


def test_ttl_and_listen_are_parsed():
    """--ttl becomes an int and --listen is kept as given."""
    options = _options("--listen", "tcp:0:interface=127.0.0.1", "--ttl", "60")
    assert options["ttl"] == 60
    assert options["listen"] == "tcp:0:interface=127.0.0.1"


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--ttl", "soon"], "--ttl must be a whole number of seconds"),
        (["--ttl", "0"], "--ttl must be between 1 and 86400"),
        (["--ttl", "100000"], "--ttl must be between 1 and 86400"),
        (["--listen", "carrier-pigeon:12"], "not an endpoint description"),
        (["--listen", "tcp:notaport"], "not an endpoint description"),
    ],
)
def test_bad_options_raise_usage_errors(argv, words):
    """Bad --ttl or --listen values are refused with a message saying what to use."""
    with pytest.raises(usage.UsageError, match=words):
        _options(*argv)


def test_make_service_builds_listener_and_sweeper():
    """makeService returns a MultiService with an endpoint listener and an expiry timer."""
    service = tap.makeService(_options("--listen", "tcp:0:interface=127.0.0.1", "--ttl", "40"))
    assert isinstance(service, MultiService)
    children = list(service)
    assert [type(child) for child in children] == [StreamServerEndpointService, TimerService]
    assert children[1].step == 10.0
    assert not service.running


def test_connection_cap_stays_below_the_descriptor_limit():
    """Connections are capped 64 below the descriptor limit, at most 4,096, at least 16."""
    assert tap.connection_cap(1024) == 960
    assert tap.connection_cap(1_048_576) == 4096
    assert tap.connection_cap(40) == 16


def test_make_service_caps_connections_and_streams_from_the_descriptor_limit(monkeypatch):
    """With 1,024 descriptors the site holds 960 connections and streams get at most half."""
    monkeypatch.setattr(tap.resource, "getrlimit", lambda which: (1024, 4096))
    service = tap.makeService(_options("--listen", "tcp:0:interface=127.0.0.1"))
    site = list(service)[0].factory
    assert site.max_connections == 960
    assert site.resource.children[b"clearskies"].children[b"track"]._registry.max_streams == 480


def test_sweep_interval_bounds():
    """Sweeps happen every quarter TTL, but at least every 30 s and at most every second."""
    assert tap.sweep_interval(2) == 1.0
    assert tap.sweep_interval(40) == 10.0
    assert tap.sweep_interval(3600) == 30.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.mark.slow
def test_real_twistd_process_serves_and_stops_on_sigterm(tmp_path):
    """`twistd -n clearskies-tracker` answers a tracker request on 127.0.0.1 and exits on SIGTERM."""
    port = _free_port()
    process = subprocess.Popen(
        [str(TWISTD), "-n", "--pidfile=", "clearskies-tracker",
         "--listen", "tcp:%d:interface=127.0.0.1" % port, "--ttl", "120"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        base = "http://127.0.0.1:%d" % port
        deadline = time.monotonic() + 20
        while True:
            try:
                code, body = _get(base + "/")
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(process.communicate()[0].decode(errors="replace"))
                time.sleep(0.1)
        assert code == 200 and b"ClearSkies tracker" in body
        share_id, peer = "c" * 64, "d" * 32
        code, body = _get(base + "/clearskies/track?id=%s%%40%s&tcp_port=30001" % (share_id, peer))
        assert code == 200
        assert json.loads(body) == {"your_ip": "127.0.0.1", "others": {share_id: []}, "ttl": 120}
        code, body = _get(base + "/clearskies/track?tcp_port=1")
        assert code == 400 and b"at least one id" in body
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=15)[0].decode(errors="replace")
        # twistd re-raises the signal after a clean shutdown, so -SIGTERM is normal.
        assert process.returncode in (0, -signal.SIGTERM), output
        assert "Server Shut Down." in output, output
        assert "Traceback" not in output, output
        assert share_id not in output and peer not in output  # no access log of IDs
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
