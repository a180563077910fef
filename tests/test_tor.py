"""TorService wiring with a fake reactor and a fake txtorcon: no tor program runs."""

from __future__ import annotations

import base64
import os
import stat
import subprocess
import sys
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, UNIXClientEndpoint
from twisted.internet.error import ConnectError, ProcessDone, ProcessTerminated
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.python.failure import Failure

from clearskies.discovery import tor as tormod
from clearskies.discovery.socks import SocksClientEndpoint
from clearskies.discovery.tor import (
    DEFAULT_ONION_PORT,
    TorOutput,
    TorService,
    TorUnavailable,
    check_extra_config,
    check_onion_key,
    explaining_line,
    format_onion_address,
    parse_bootstrap_status,
    parse_listeners,
    tor_arguments,
)
from clearskies.errors import ConfigurationError

HOSTNAME = "a" * 52 + "bcdq.onion"
KEY = "ED25519-V3:" + base64.b64encode(bytes(range(64))).decode()
OTHER_KEY = "ED25519-V3:" + base64.b64encode(bytes(range(64, 128))).decode()
LOCAL_PORT = 4321
BOOTSTRAPPED = 'NOTICE BOOTSTRAP PROGRESS=100 TAG=done SUMMARY="Done"'
HALFWAY = 'NOTICE BOOTSTRAP PROGRESS=50 TAG=loading_descriptors SUMMARY="Loading relay descriptors"'
STUCK = ('WARN BOOTSTRAP PROGRESS=5 TAG=conn SUMMARY="Connecting to a relay" '
         'WARNING="Connection refused" REASON=CONNECTREFUSED COUNT=3 RECOMMENDATION=warn')


# -- fakes --------------------------------------------------------------------


class FakeProcessTransport:
    """What spawnProcess returns: records signals; TERM/KILL end the process."""

    def __init__(self, protocol: Any) -> None:
        self.protocol = protocol
        self.pid: int | None = 4242
        self.signals: list[str] = []
        self.exit_on_signal = True

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)
        if self.exit_on_signal and self.pid is not None:
            self.end(ProcessTerminated(signal=15 if name == "TERM" else 9))

    def end(self, reason: Exception) -> None:
        self.pid = None
        self.protocol.processEnded(Failure(reason))

    def closeStdin(self) -> None:
        pass


class FakeReactor(MemoryReactorClock):
    """MemoryReactorClock that also records spawned processes."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[dict[str, Any]] = []

    def spawnProcess(self, protocol, executable, args=(), env=None, path=None, **kwargs):
        transport = FakeProcessTransport(protocol)
        self.spawned.append({"protocol": protocol, "executable": executable, "args": list(args),
                             "env": env, "path": path, "transport": transport})
        protocol.makeConnection(transport)
        return transport


class FakeOnion:
    def __init__(self, hostname: str, private_key: str) -> None:
        self.hostname = hostname
        self.private_key = private_key


class FakeControl:
    """The parts of TorControlProtocol that TorService uses."""

    def __init__(self, info: dict[str, Any]) -> None:
        self.info = info
        self.commands: list[str] = []
        self.listeners: dict[str, list] = {}
        self.disconnected: Deferred = Deferred()

    def queue_command(self, command: str) -> Deferred:
        self.commands.append(command)
        return succeed("OK")

    def add_event_listener(self, event: str, callback) -> Deferred:
        self.listeners.setdefault(event, []).append(callback)
        return succeed(None)

    def remove_event_listener(self, event: str, callback) -> Deferred:
        self.listeners[event].remove(callback)
        return succeed(None)

    def get_info_single(self, key: str) -> Deferred:
        value = self.info[key]
        return value if isinstance(value, Deferred) else succeed(value)

    def when_disconnected(self) -> Deferred:
        d: Deferred = Deferred()
        self.disconnected.addBoth(lambda r: d.callback(None) or r)
        return d

    def emit(self, event: str, text: str) -> None:
        for callback in list(self.listeners.get(event, [])):
            callback(text)


class FakeTor:
    """A txtorcon.Tor: records onion services, streams and quitting."""

    def __init__(self, control: FakeControl) -> None:
        self.protocol = control
        self.onion_requests: list[dict[str, Any]] = []
        self.publish: Deferred = Deferred()
        self.streams: list[tuple] = []
        self.quit_called = 0

    def create_onion_service(self, ports, private_key=None, version=3, progress=None, **kw):
        self.onion_requests.append({"ports": ports, "private_key": private_key, "version": version})
        return self.publish

    def stream_via(self, host, port, socks_endpoint=None):
        self.streams.append((host, port, socks_endpoint))
        return ("endpoint", host, port)

    def web_agent(self, pool=None, socks_endpoint=None):
        return ("agent", pool, socks_endpoint)

    def quit(self) -> Deferred:
        self.quit_called += 1
        if not self.protocol.disconnected.called:
            self.protocol.disconnected.callback(None)
        return succeed(None)


class FakeTxtorcon:
    """Stands in for the txtorcon module: only ``connect`` is used."""

    def __init__(self, info: dict[str, Any] | None = None, connect_error: Exception | None = None):
        default = {"status/bootstrap-phase": BOOTSTRAPPED,
                   "net/listeners/socks": '"127.0.0.1:9050"'}
        self.control = FakeControl({**default, **(info or {})})
        self.tor = FakeTor(self.control)
        self.connect_error = connect_error
        self.connected_to: list[Any] = []

    def connect(self, reactor, endpoint) -> Deferred:
        self.connected_to.append(endpoint)
        if self.connect_error is not None:
            return fail(self.connect_error)
        return succeed(self.tor)


def fake_binary(tmp_path) -> str:
    """An executable file standing in for tor (never run: spawnProcess is fake)."""
    path = tmp_path / "bin" / "tor"
    path.parent.mkdir()
    path.write_text("#!/bin/sh\nexit 1\n")
    path.chmod(0o755)
    return str(path)


def service(tmp_path, lib: FakeTxtorcon, reactor: FakeReactor | None = None, **kwargs) -> TorService:
    if "tor_binary" not in kwargs and "control_endpoint" not in kwargs:
        kwargs["tor_binary"] = fake_binary(tmp_path)
    return TorService(reactor or FakeReactor(), str(tmp_path / "data"), lambda: LOCAL_PORT,
                      txtorcon_module=lib, launch_timeout=60, publish_timeout=100, **kwargs)


def outcome(d: Deferred) -> Any:
    """The result of a fired Deferred (a Failure for errors); fails the test if pending."""
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "the Deferred has not fired"
    return box[0]


def open_control(reactor: FakeReactor, where: str | None = None) -> dict[str, Any]:
    spawned = reactor.spawned[-1]
    if where is None:
        where = os.path.join(spawned["path"], "control.socket")
    spawned["protocol"].outReceived(
        b"Nov 26 18:46:47.377 [notice] Opened Control listener connection (ready) on "
        + where.encode() + b"\n")
    return spawned


# -- pure helpers -------------------------------------------------------------


def test_address_format():
    """The advertised address is tor:<name>.onion:<port>."""
    assert format_onion_address(HOSTNAME, 60106) == "tor:%s:60106" % HOSTNAME


@pytest.mark.parametrize("hostname", ["example.onion", "A" * 56 + ".onion", "a" * 56, "a" * 56 + ".onion.com"])
def test_address_format_rejects_non_v3_names(hostname):
    """Anything but a lowercase 56-character v3 onion name is refused."""
    with pytest.raises(ValueError):
        format_onion_address(hostname, 60106)


def test_extra_config_keeps_lists_and_stringifies():
    """Repeated options stay lists, numbers become text."""
    assert check_extra_config({"DirAuthority": ["a 1", "b 2"], "TestingTorNetwork": 1}) == {
        "DirAuthority": ["a 1", "b 2"], "TestingTorNetwork": "1"}


@pytest.mark.parametrize("extra, words", [
    ({"DataDirectory": "/tmp/x"}, "managed by ClearSkies"),
    ({"controlport": "9051"}, "managed by ClearSkies"),
    ({"Log": "notice stdout\nControlPort 9051"}, "line break"),
    ({"Bad Name": "1"}, "not a tor option name"),
    ({"SocksPort": None}, "wants text or a number"),
])
def test_extra_config_refused(extra, words):
    """Options we manage, multi-line values and odd names are refused with a reason."""
    with pytest.raises(ConfigurationError, match=words):
        check_extra_config(extra)


def test_onion_key_check():
    """A stored key must be ED25519-V3 with 64 bytes of base64."""
    assert check_onion_key(KEY + "\n") == KEY
    for bad in ("RSA1024:" + KEY[11:], "ED25519-V3:!!!", "ED25519-V3:" + base64.b64encode(b"x" * 32).decode()):
        with pytest.raises(ValueError):
            check_onion_key(bad)


def test_explaining_line_prefers_the_warning_over_the_generic_error():
    """tor's final [err] only says 'see warnings above', so the warning is what we quote."""
    lines = [
        "Nov 26 [warn] You are running Tor as root. You don't need to, and you probably shouldn't.",
        "Nov 26 [warn] Failed to parse/validate config: Unknown option 'Bogus'.",
        "Nov 26 [err] Reading config failed--see warnings above.",
    ]
    assert explaining_line(lines) == lines[1]
    assert explaining_line(lines[::2]) == lines[2]
    assert explaining_line(["Nov 26 [notice] Bootstrapped 45% (requesting_descriptors): Asking"]) \
        .endswith("Asking")
    assert explaining_line(["[notice] Tor 0.4.9 running"]) is None


def test_bootstrap_status_parsing():
    """BOOTSTRAP status lines give their fields; other status lines give None."""
    assert parse_bootstrap_status(BOOTSTRAPPED) == {
        "SEVERITY": "NOTICE", "PROGRESS": "100", "TAG": "done", "SUMMARY": "Done"}
    assert parse_bootstrap_status(STUCK)["WARNING"] == "Connection refused"
    assert parse_bootstrap_status("NOTICE CIRCUIT_ESTABLISHED") is None
    assert parse_bootstrap_status('NOTICE BOOTSTRAP PROGRESS=lots TAG=x') is None
    assert parse_bootstrap_status('NOTICE BOOTSTRAP SUMMARY="unterminated') is None


def test_listeners_parsing():
    """GETINFO net/listeners/socks is a list of quoted addresses."""
    assert parse_listeners('"127.0.0.1:9050" "unix:/run/tor/socks"') == [
        "127.0.0.1:9050", "unix:/run/tor/socks"]
    assert parse_listeners("") == []


def test_output_keeps_only_the_last_lines():
    """The output buffer is bounded in lines and joins lines split across writes."""
    output = TorOutput(max_lines=3)
    assert output.write(b"one\ntw") == ["one"]
    assert output.write("o\nthree\nfour\nfive\n") == ["two", "three", "four", "five"]
    assert list(output.lines) == ["three", "four", "five"]
    output.write(b"x" * 10_000)
    assert len(output.text().splitlines()[-1]) == tormod.MAX_LOG_LINE


def test_tor_arguments_use_sockets_in_the_tor_directory():
    """Control and SOCKS ports are UNIX sockets in tor's own directory; extra options follow."""
    args, control = tor_arguments("/d/tor", 77, {"DirAuthority": ["x 1", "y 2"], "TestingTorNetwork": "1"})
    assert control == "/d/tor/control.socket"
    assert args[:4] == ["-f", "/d/tor/torrc", "--defaults-torrc", "/d/tor/torrc"]
    pairs = list(zip(args[4::2], args[5::2]))
    assert ("DataDirectory", "/d/tor") in pairs
    assert ("ControlPort", 'unix:"/d/tor/control.socket"') in pairs
    assert ("SocksPort", 'unix:"/d/tor/socks.socket" ExtendedErrors') in pairs
    assert ("CookieAuthentication", "1") in pairs
    assert ("__OwningControllerProcess", "77") in pairs
    assert pairs[-3:] == [("DirAuthority", "x 1"), ("DirAuthority", "y 2"), ("TestingTorNetwork", "1")]


def test_tor_arguments_fall_back_to_loopback_tcp_for_long_paths():
    """A directory too deep for a UNIX socket address gets tor-chosen ports on 127.0.0.1."""
    args, control = tor_arguments("/" + "d" * 120 + "/tor", 1, {})
    assert control is None
    pairs = list(zip(args[4::2], args[5::2]))
    assert ("ControlPort", "127.0.0.1:auto") in pairs
    assert ("SocksPort", "127.0.0.1:auto ExtendedErrors") in pairs


def test_importing_the_module_does_not_import_txtorcon():
    """A daemon without --tor never loads txtorcon: the import happens when the service starts."""
    code = ("import sys, clearskies.discovery.tor; "
            "print('txtorcon' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "False", result.stderr


# -- launching our own tor ----------------------------------------------------


def test_launch_wiring_and_first_publication(tmp_path):
    """tor starts in <data>/tor with our options; the new key is stored 0600 and the address formed."""
    reactor, lib = FakeReactor(), FakeTxtorcon(info={"status/bootstrap-phase": HALFWAY})
    tor = service(tmp_path, lib, reactor, extra_config={"DirAuthority": ["a 1", "b 2"]})
    tor.startService()
    ready = tor.ready
    data = tmp_path / "data"
    spawned = reactor.spawned[0]
    assert spawned["executable"] == tor.tor_binary
    assert spawned["path"] == str(data / "tor")
    assert spawned["env"] == {"HOME": str(data / "tor")}
    pairs = list(zip(spawned["args"][5::2], spawned["args"][6::2]))
    assert ("DataDirectory", str(data / "tor")) in pairs
    assert ("__OwningControllerProcess", str(os.getpid())) in pairs
    assert pairs[-2:] == [("DirAuthority", "a 1"), ("DirAuthority", "b 2")]
    for name in ("tor", "onion-service"):
        assert stat.S_IMODE(os.stat(data / name).st_mode) == 0o700
    assert lib.connected_to == []  # not before tor says the socket is open

    open_control(reactor)
    assert isinstance(lib.connected_to[0], UNIXClientEndpoint)
    assert lib.connected_to[0]._path == str(data / "tor" / "control.socket")
    assert lib.control.commands == ["TAKEOWNERSHIP"]
    assert lib.tor.onion_requests == []  # still bootstrapping

    lib.control.emit("STATUS_CLIENT", BOOTSTRAPPED)
    assert lib.tor.onion_requests == [{
        "ports": ["%d 127.0.0.1:%d" % (DEFAULT_ONION_PORT, LOCAL_PORT)],
        "private_key": None, "version": 3}]
    assert not ready.called
    lib.tor.publish.callback(FakeOnion(HOSTNAME, KEY))

    assert outcome(ready) == "tor:%s:%d" % (HOSTNAME, DEFAULT_ONION_PORT)
    assert tor.onion_address() == "tor:%s:%d" % (HOSTNAME, DEFAULT_ONION_PORT)
    key_file = data / "onion-service" / "private_key"
    assert key_file.read_text() == KEY + "\n"
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    assert (data / "onion-service" / "hostname").read_text() == HOSTNAME + "\n"


def test_stored_key_is_reused(tmp_path):
    """A key already on disk is handed to tor, so the .onion name stays the same."""
    onion_dir = tmp_path / "data" / "onion-service"
    onion_dir.mkdir(parents=True)
    (onion_dir / "private_key").write_text(KEY + "\n")
    reactor, lib = FakeReactor(), FakeTxtorcon()
    tor = service(tmp_path, lib, reactor)
    tor.startService()
    open_control(reactor)
    assert lib.tor.onion_requests[0]["private_key"] == KEY
    lib.tor.publish.callback(FakeOnion(HOSTNAME, KEY))
    assert outcome(tor.ready).startswith("tor:" + HOSTNAME)
    assert (onion_dir / "private_key").read_text() == KEY + "\n"


def test_damaged_key_is_not_replaced(tmp_path):
    """A damaged key file stops the onion service instead of silently changing the address."""
    onion_dir = tmp_path / "data" / "onion-service"
    onion_dir.mkdir(parents=True)
    (onion_dir / "private_key").write_text("ED25519-V3:garbage\n")
    reactor, lib = FakeReactor(), FakeTxtorcon()
    tor = service(tmp_path, lib, reactor)
    tor.startService()
    open_control(reactor)
    failure = outcome(tor.ready)
    assert failure.check(TorUnavailable)
    assert str(failure.value).startswith("the onion service key %s is damaged" % (onion_dir / "private_key"))
    assert lib.tor.onion_requests == []
    assert (onion_dir / "private_key").read_text() == "ED25519-V3:garbage\n"


def test_missing_tor_program_says_to_install_the_package(tmp_path, monkeypatch):
    """Without a tor program the error says to install the tor package; nothing is spawned."""
    monkeypatch.setattr(tormod, "find_tor_binary", lambda: None)
    reactor = FakeReactor()
    tor = TorService(reactor, str(tmp_path / "data"), lambda: LOCAL_PORT, txtorcon_module=FakeTxtorcon())
    tor.startService()
    failure = outcome(tor.ready)
    assert failure.check(TorUnavailable)
    assert "install the tor package" in str(failure.value)
    assert tor.error is failure.value
    assert reactor.spawned == []


def test_wrong_tor_path_is_reported(tmp_path):
    """A tor_binary that does not exist is named in the error."""
    reactor = FakeReactor()
    tor = service(tmp_path, FakeTxtorcon(), reactor, tor_binary=str(tmp_path / "nowhere" / "tor"))
    tor.startService()
    failure = outcome(tor.ready)
    assert "nowhere/tor is not an executable tor program" in str(failure.value)
    assert reactor.spawned == []


def test_tor_dying_at_start_is_explained_with_its_warning(tmp_path):
    """When tor exits before opening its control port, the error quotes tor's warning."""
    reactor, lib = FakeReactor(), FakeTxtorcon()
    tor = service(tmp_path, lib, reactor)
    tor.startService()
    spawned = reactor.spawned[0]
    spawned["protocol"].outReceived(
        b"Nov 26 [warn] Failed to parse/validate config: Unknown option 'Bogus'.  Failing.\n"
        b"Nov 26 [err] Reading config failed--see warnings above.\n")
    spawned["transport"].end(ProcessTerminated(exitCode=1))
    failure = outcome(tor.ready)
    message = str(failure.value)
    assert "tor exited with status 1" in message
    assert "Unknown option 'Bogus'" in message
    assert lib.connected_to == []


def test_bootstrap_timeout_quotes_tor_and_ends_the_process(tmp_path):
    """Stuck bootstrapping: after the timeout the error quotes tor, and tor is terminated."""
    reactor, lib = FakeReactor(), FakeTxtorcon(info={"status/bootstrap-phase": STUCK})
    tor = service(tmp_path, lib, reactor)
    tor.startService()
    spawned = open_control(reactor)
    spawned["protocol"].outReceived(
        b"Nov 26 [warn] Problem bootstrapping. Stuck at 5% (conn): Connecting to a relay. "
        b"(Connection refused; CONNECTREFUSED; count 3; recommendation warn)\n")
    ready = tor.ready
    reactor.advance(59)
    assert not ready.called
    reactor.advance(2)
    message = str(outcome(ready).value)
    assert "did not finish bootstrapping within 60 s" in message
    assert "Problem bootstrapping. Stuck at 5%" in message
    assert spawned["transport"].signals == ["TERM"]
    assert lib.tor.quit_called == 1
    assert lib.control.listeners["STATUS_CLIENT"] == []


def test_tor_exiting_while_bootstrapping_fails_at_once(tmp_path):
    """If tor exits after opening its control port, ready fails without waiting for the timeout."""
    reactor, lib = FakeReactor(), FakeTxtorcon(info={"status/bootstrap-phase": HALFWAY})
    tor = service(tmp_path, lib, reactor)
    tor.startService()
    spawned = open_control(reactor)
    spawned["transport"].end(ProcessDone(0))
    message = str(outcome(tor.ready).value)
    assert "tor stopped while bootstrapping (tor exited with status 0)" in message


def test_publish_failure_is_reported_and_tor_ended(tmp_path):
    """A failed descriptor upload gives TorUnavailable with the reason; the tor process goes away."""
    reactor, lib = FakeReactor(), FakeTxtorcon()
    tor = service(tmp_path, lib, reactor)
    tor.startService()
    spawned = open_control(reactor)
    lib.tor.publish.errback(RuntimeError("Failed to upload 'abc' to: $AAAA"))
    message = str(outcome(tor.ready).value)
    assert "could not publish the onion service (RuntimeError: Failed to upload" in message
    assert spawned["transport"].signals == ["TERM"]
    assert not (tmp_path / "data" / "onion-service" / "private_key").exists()


def test_publish_timeout(tmp_path):
    """An onion service that never gets its descriptor out fails after publish_timeout."""
    reactor, lib = FakeReactor(), FakeTxtorcon()
    tor = service(tmp_path, lib, reactor)
    tor.startService()
    open_control(reactor)
    ready = tor.ready
    reactor.advance(101)
    assert "not published within 100 s" in str(outcome(ready).value)


def test_stop_before_control_port_opens_ends_tor(tmp_path):
    """Stopping while tor starts terminates the process and fails ready."""
    reactor, lib = FakeReactor(), FakeTxtorcon()
    tor = service(tmp_path, lib, reactor)
    tor.startService()
    ready = tor.ready
    stopped = tor.stopService()
    assert outcome(stopped) is None
    assert reactor.spawned[0]["transport"].signals == ["TERM"]
    assert "stopped before tor was ready" in str(outcome(ready).value)
    assert tor.onion_address() is None


def test_stop_kills_a_tor_that_ignores_term(tmp_path):
    """A tor that does not exit within the grace period after TERM gets KILL."""
    reactor, lib = FakeReactor(), FakeTxtorcon()
    tor = service(tmp_path, lib, reactor)
    tor.startService()
    open_control(reactor)
    lib.tor.publish.callback(FakeOnion(HOSTNAME, KEY))
    transport = reactor.spawned[0]["transport"]
    transport.exit_on_signal = False
    stopped = tor.stopService()
    assert transport.signals == ["TERM"]
    reactor.advance(tormod.STOP_GRACE + 1)
    assert transport.signals == ["TERM", "KILL"]
    assert not stopped.called
    transport.end(ProcessTerminated(signal=9))
    assert outcome(stopped) is None
    assert lib.tor.quit_called == 1


def test_long_data_dir_uses_loopback_tcp_control_port(tmp_path):
    """With tor-chosen TCP ports, we dial the control port tor reports, on 127.0.0.1 only."""
    deep = tmp_path / ("d" * 100)
    reactor, lib = FakeReactor(), FakeTxtorcon()
    tor = service(deep, lib, reactor, tor_binary=fake_binary(tmp_path))
    tor.startService()
    open_control(reactor, "127.0.0.1:45678")
    endpoint = lib.connected_to[0]
    assert isinstance(endpoint, TCP4ClientEndpoint)
    assert (endpoint._host, endpoint._port) == ("127.0.0.1", 45678)


def test_client_endpoint_goes_through_tors_socks_port(tmp_path):
    """Outgoing connections and web requests use the SOCKS listener tor reported."""
    reactor, lib = FakeReactor(), FakeTxtorcon(info={"net/listeners/socks": '"unix:/d/tor/socks.socket"'})
    tor = service(tmp_path, lib, reactor)
    with pytest.raises(TorUnavailable):
        tor.client_endpoint(HOSTNAME, 60106)
    with pytest.raises(TorUnavailable):
        tor.web_agent()
    tor.startService()
    open_control(reactor)
    endpoint = tor.client_endpoint(HOSTNAME, 60106)
    assert isinstance(endpoint, SocksClientEndpoint)
    assert (endpoint.host, endpoint.port) == (HOSTNAME, 60106)
    socks = endpoint.proxy
    assert isinstance(socks, UNIXClientEndpoint) and socks._path == "/d/tor/socks.socket"
    assert tor.web_agent(pool="pool") == ("agent", "pool", socks)


def test_client_endpoint_without_a_usable_socks_listener_says_so(tmp_path):
    """A tor whose only SOCKS listener is elsewhere than loopback cannot carry our dials."""
    reactor, lib = FakeReactor(), FakeTxtorcon(info={"net/listeners/socks": '"10.1.2.3:9050"'})
    tor = service(tmp_path, lib, reactor)
    tor.startService()
    open_control(reactor)
    with pytest.raises(TorUnavailable, match="add a SocksPort"):
        tor.client_endpoint(HOSTNAME, 60106)


# -- attaching to a running tor -----------------------------------------------


def test_control_endpoint_attaches_without_spawning(tmp_path):
    """With a control endpoint, nothing is spawned: we attach, publish and dial via its SOCKS port."""
    reactor, lib = FakeReactor(), FakeTxtorcon()
    tor = service(tmp_path, lib, reactor, control_endpoint="unix:/run/tor/control")
    tor.startService()
    assert reactor.spawned == []
    endpoint = lib.connected_to[0]
    assert isinstance(endpoint, UNIXClientEndpoint) and endpoint._path == "/run/tor/control"
    assert lib.control.commands == []  # a tor we did not start is not ours to own
    lib.tor.publish.callback(FakeOnion(HOSTNAME, KEY))
    assert outcome(tor.ready) == "tor:%s:%d" % (HOSTNAME, DEFAULT_ONION_PORT)
    socks = tor.client_endpoint(HOSTNAME, 1).proxy
    assert isinstance(socks, TCP4ClientEndpoint) and (socks._host, socks._port) == ("127.0.0.1", 9050)
    assert outcome(tor.stopService()) is None
    assert lib.tor.quit_called == 1


def test_unreachable_control_port_is_explained(tmp_path):
    """A control port that refuses us gives an error naming it and what to check."""
    lib = FakeTxtorcon(connect_error=ConnectError("No such file or directory"))
    tor = service(tmp_path, lib, control_endpoint="unix:/run/tor/control")
    tor.startService()
    message = str(outcome(tor.ready).value)
    assert "cannot use tor's control port at unix:/run/tor/control" in message
    assert "is tor running" in message


def test_bad_control_endpoint_string(tmp_path):
    """A control endpoint that is not an endpoint description is refused with an example."""
    tor = service(tmp_path, FakeTxtorcon(), control_endpoint="nonsense:/x")
    tor.startService()
    assert "unix:/run/tor/control" in str(outcome(tor.ready).value)


def test_extra_config_with_a_running_tor_is_refused(tmp_path):
    """Options for a tor we start make no sense with someone else's tor."""
    with pytest.raises(ConfigurationError, match="only apply to a tor ClearSkies starts"):
        TorService(FakeReactor(), str(tmp_path), lambda: 1, control_endpoint="unix:/x",
                   extra_config={"TestingTorNetwork": "1"})


def test_missing_txtorcon_is_explained(tmp_path, monkeypatch):
    """Without the txtorcon library the error says to install it."""
    monkeypatch.setitem(sys.modules, "txtorcon", None)  # makes `import txtorcon` fail
    tor = TorService(FakeReactor(), str(tmp_path), lambda: 1, control_endpoint="unix:/x")
    tor.startService()
    assert "pip install txtorcon" in str(outcome(tor.ready).value)


def test_unusable_data_dir_is_reported(tmp_path):
    """A data directory that cannot hold tor's files gives TorUnavailable, not a crash."""
    blocker = tmp_path / "data"
    blocker.write_text("a file where the data directory should be")
    reactor = FakeReactor()
    tor = TorService(reactor, str(blocker), lambda: 1, tor_binary=fake_binary(tmp_path),
                     txtorcon_module=FakeTxtorcon())
    tor.startService()
    failure = outcome(tor.ready)
    assert failure.check(TorUnavailable)
    assert str(blocker) in str(failure.value)
    assert reactor.spawned == []


def test_tor_warnings_reach_our_log_without_the_noise(tmp_path):
    """tor's warnings are logged (so later trouble is visible); its start-up boilerplate is not."""
    reactor = FakeReactor()
    tor = service(tmp_path, FakeTxtorcon(), reactor)
    tor.startService()
    with capturedLogs() as events:
        reactor.spawned[0]["protocol"].outReceived(
            b"Nov 26 [warn] You are running Tor as root. You don't need to.\n"
            b"Nov 26 [notice] Bootstrapped 5% (conn): Connecting to a relay\n"
            b"Nov 26 [warn] Your system clock just jumped 3600 seconds forward.\n")
    logged = [formatEvent(event) for event in events]
    assert logged == ["tor: Nov 26 [warn] Your system clock just jumped 3600 seconds forward."]
    assert events[0]["log_level"] == LogLevel.warn


def test_tor_dying_later_is_noticed(tmp_path):
    """If our tor exits after publishing, the address is withdrawn and the error says why."""
    reactor, lib = FakeReactor(), FakeTxtorcon()
    tor = service(tmp_path, lib, reactor)
    tor.startService()
    spawned = open_control(reactor)
    lib.tor.publish.callback(FakeOnion(HOSTNAME, KEY))
    assert tor.onion_address() is not None
    with capturedLogs() as events:
        spawned["protocol"].outReceived(b"Nov 26 [err] Out of memory. Dying.\n")
        spawned["transport"].end(ProcessTerminated(exitCode=1))
        lib.control.disconnected.callback(None)
    assert tor.onion_address() is None
    assert "lost tor's control connection (tor exited with status 1)" in str(tor.error)
    assert "Out of memory" in str(tor.error)
    assert outcome(tor.ready).check(TorUnavailable)
    assert any("lost tor's control connection" in formatEvent(e) for e in events)
    with pytest.raises(TorUnavailable):
        tor.client_endpoint(HOSTNAME, 1)


def test_stopping_is_not_reported_as_a_loss(tmp_path):
    """Our own stop closes the control connection without an error."""
    reactor, lib = FakeReactor(), FakeTxtorcon()
    tor = service(tmp_path, lib, reactor)
    tor.startService()
    open_control(reactor)
    lib.tor.publish.callback(FakeOnion(HOSTNAME, KEY))
    with capturedLogs() as events:
        assert outcome(tor.stopService()) is None
    assert tor.error is None
    assert [e for e in events if e["log_level"] >= LogLevel.warn] == []
