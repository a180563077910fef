"""The blocking control client, and the daemon's control socket on a real UNIX socket."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from clearskies.control.client import (
    ControlClient,
    DaemonNotRunning,
    default_control_path,
    default_data_dir,
)
from clearskies.control.protocol import (
    CommandDispatcher,
    ControlError,
    ControlFactory,
    listen_control,
)
from clearskies.errors import ConfigurationError, ProtocolError
from tests.helpers import async_test

GREETING = b'{"service":"ClearSkies Control","software":"fake","protocol":1}\n'


@pytest.fixture
def short_tmp() -> Iterator[str]:
    """A temp dir with a short path (UNIX socket paths are limited to 107 bytes)."""
    path = tempfile.mkdtemp(prefix="cs-ctl-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@contextmanager
def fake_daemon(path: str, script: Callable[[socket.socket], None]) -> Iterator[None]:
    """Accept one connection on ``path`` and run ``script`` on it in a thread."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            script(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        thread.join(5)
        listener.close()


def read_line(conn: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(1)
        if not chunk:
            break
        data += chunk
    return data


# -- default paths ------------------------------------------------------------


def test_default_data_dir_precedence(monkeypatch):
    """CLEARSKIES_DATA_DIR wins, then an absolute XDG_DATA_HOME, then ~/.local/share."""
    monkeypatch.setenv("HOME", "/home/someone")
    monkeypatch.setenv("CLEARSKIES_DATA_DIR", "/srv/cs")
    monkeypatch.setenv("XDG_DATA_HOME", "/xdg")
    assert default_data_dir() == "/srv/cs"
    monkeypatch.delenv("CLEARSKIES_DATA_DIR")
    assert default_data_dir() == "/xdg/clearskies"
    monkeypatch.setenv("XDG_DATA_HOME", "relative/dir")
    assert default_data_dir() == "/home/someone/.local/share/clearskies"
    monkeypatch.delenv("XDG_DATA_HOME")
    assert default_data_dir() == "/home/someone/.local/share/clearskies"


def test_default_control_path(monkeypatch):
    """The control socket is <data_dir>/control, for a given or the default data dir."""
    monkeypatch.setenv("CLEARSKIES_DATA_DIR", "/srv/cs")
    assert default_control_path("/data") == "/data/control"
    assert default_control_path() == "/srv/cs/control"


# -- client against missing or fake daemons --------------------------------------


def test_missing_socket_says_daemon_not_running(short_tmp):
    """No socket file: connect raises DaemonNotRunning naming the path and what to do."""
    path = os.path.join(short_tmp, "control")
    with pytest.raises(DaemonNotRunning) as caught:
        ControlClient(path).connect()
    assert path in str(caught.value)
    assert "start it" in str(caught.value)


def test_refused_socket_says_daemon_not_running(short_tmp):
    """A socket file nobody listens on: connect raises DaemonNotRunning."""
    path = os.path.join(short_tmp, "control")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.close()
    with pytest.raises(DaemonNotRunning):
        ControlClient(path).connect()


def test_connect_is_idempotent(short_tmp):
    """connect() on a connected client returns its greeting without reconnecting."""
    path = os.path.join(short_tmp, "control")
    with fake_daemon(path, lambda conn: conn.sendall(GREETING)):
        client = ControlClient(path, timeout=5)
        greeting = client.connect()
        assert greeting == json.loads(GREETING)
        with client:
            assert client.connect() is greeting
        assert client.greeting is None


def test_wrong_service_refused(short_tmp):
    """A peer that does not greet as ClearSkies Control is refused with ProtocolError."""
    path = os.path.join(short_tmp, "control")
    with fake_daemon(path, lambda conn: conn.sendall(b'{"service":"other"}\n')):
        client = ControlClient(path, timeout=5)
        with pytest.raises(ProtocolError, match="not a ClearSkies control socket"):
            client.connect()


def test_wrong_protocol_version_refused(short_tmp):
    """A daemon speaking another control protocol version is refused."""
    path = os.path.join(short_tmp, "control")
    greeting = b'{"service":"ClearSkies Control","software":"x","protocol":2}\n'
    with fake_daemon(path, lambda conn: conn.sendall(greeting)):
        with pytest.raises(ProtocolError, match="protocol 2"):
            ControlClient(path, timeout=5).connect()


def test_overlong_reply_refused(short_tmp):
    """A reply line over the client's limit raises ProtocolError and closes the client."""
    path = os.path.join(short_tmp, "control")

    def script(conn: socket.socket) -> None:
        conn.sendall(GREETING)
        read_line(conn)
        conn.sendall(b'{"x":"' + b"a" * 5000 + b'"}\n')

    with fake_daemon(path, script):
        client = ControlClient(path, timeout=5, max_line_length=1000)
        client.connect()
        with pytest.raises(ProtocolError, match="longer than 1000"):
            client.request({"type": "status"})
        with pytest.raises(RuntimeError):
            client.request({"type": "status"})


def test_timeout_closes(short_tmp):
    """A daemon that never answers makes request raise TimeoutError."""
    path = os.path.join(short_tmp, "control")
    done = threading.Event()

    def script(conn: socket.socket) -> None:
        conn.sendall(GREETING)
        done.wait(5)

    with fake_daemon(path, script):
        client = ControlClient(path, timeout=0.2)
        client.connect()
        try:
            with pytest.raises(TimeoutError):
                client.request({"type": "status"})
        finally:
            done.set()


def test_hang_up_mid_request(short_tmp):
    """A daemon closing before replying raises DaemonNotRunning."""
    path = os.path.join(short_tmp, "control")

    def script(conn: socket.socket) -> None:
        conn.sendall(GREETING)
        read_line(conn)

    with fake_daemon(path, script):
        client = ControlClient(path, timeout=5)
        client.connect()
        with pytest.raises(DaemonNotRunning, match="closed"):
            client.request({"type": "stop"})


def test_events_between_replies_are_kept(short_tmp):
    """Events arriving before a reply are stashed for events(); the reply is returned."""
    path = os.path.join(short_tmp, "control")

    def script(conn: socket.socket) -> None:
        conn.sendall(GREETING)
        assert json.loads(read_line(conn)) == {"type": "status"}
        conn.sendall(b'{"event":{"n":1}}\n{"paused":false}\n{"event":{"n":2}}\n')

    with fake_daemon(path, script):
        with ControlClient(path, timeout=5) as client:
            assert client.request({"type": "status"}) == {"paused": False}
            assert list(client.events()) == [{"n": 1}, {"n": 2}]


def test_request_too_big_refused_locally(short_tmp):
    """A request over the daemon's line limit is refused before anything is sent."""
    path = os.path.join(short_tmp, "control")
    received: list[bytes] = []

    def script(conn: socket.socket) -> None:
        conn.sendall(GREETING)
        received.append(read_line(conn))

    with fake_daemon(path, script):
        with ControlClient(path, timeout=5) as client:
            with pytest.raises(ValueError):
                client.request({"type": "x", "blob": "b" * (1024 * 1024)})
    assert received == [b""]


# -- the real daemon side on a real socket ----------------------------------------


class Commands(CommandDispatcher):
    """Echo commands, some answered late and in reverse, to exercise ordering."""

    def __init__(self, clock) -> None:
        self.clock = clock

    def cmd_echo(self, request):
        n = request["n"]
        if n % 3 == 0:
            return {"n": n}
        # later requests finish sooner, so the daemon must reorder them
        return deferLater(self.clock, (100 - n % 100) / 20000, lambda: {"n": n})

    def cmd_refuse(self, request):
        raise ControlError("no_such_share", "no share at " + request["path"])


class ControlSocketTests(unittest.TestCase):
    """listen_control with the blocking client, over a real UNIX socket."""

    def setUp(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="cs-ctl-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.data_dir = os.path.join(self.tmp, "data")
        self.path = os.path.join(self.data_dir, "control")
        self.factory = ControlFactory(Commands(reactor), "clearskies-test 1")

    async def _listen(self):
        port = await listen_control(reactor, self.path, self.factory)
        self.addCleanup(port.stopListening)
        return port

    @async_test
    async def test_socket_and_directory_modes(self) -> None:
        """The parent directory is created 0700 and the socket is 0600."""
        await self._listen()
        self.assertEqual(stat.S_IMODE(os.stat(self.data_dir).st_mode), 0o700)
        mode = os.lstat(self.path).st_mode
        self.assertTrue(stat.S_ISSOCK(mode))
        self.assertEqual(stat.S_IMODE(mode), 0o600)

    @async_test
    async def test_pipelined_burst_of_100(self) -> None:
        """A blocking client pipelines 100 requests and gets the replies in order."""
        def burst() -> tuple[dict, list[dict]]:
            with ControlClient(self.path, timeout=5) as client:
                replies = client.requests([{"type": "echo", "n": n} for n in range(100)])
                return client.greeting, replies
        await self._listen()
        greeting, replies = await deferToThread(burst)
        self.assertEqual(greeting, {
            "service": "ClearSkies Control", "software": "clearskies-test 1", "protocol": 1,
        })
        self.assertEqual(replies, [{"n": n} for n in range(100)])

    @async_test
    async def test_error_replies_raise(self) -> None:
        """request raises ControlError with the daemon's code and message."""
        def ask() -> list[ControlError]:
            errors = []
            with ControlClient(self.path, timeout=5) as client:
                for body in ({"type": "refuse", "path": "/p"}, {"type": "nope"}):
                    try:
                        client.request(body)
                    except ControlError as e:
                        errors.append(e)
                errors.append(client.request({"type": "echo", "n": 3}))
            return errors
        await self._listen()
        refused, unknown, ok = await deferToThread(ask)
        self.assertEqual((refused.code, refused.message), ("no_such_share", "no share at /p"))
        self.assertEqual(unknown.code, "not_understood")
        self.assertEqual(ok, {"n": 3})

    @async_test
    async def test_events_reach_subscribed_client(self) -> None:
        """Events broadcast by the daemon reach a subscribed blocking client, in order."""
        def watch() -> list[dict]:
            with ControlClient(self.path, timeout=5) as client:
                client.subscribe()
                got = []
                for event in client.events():
                    got.append(event)
                    if len(got) == 3:
                        return got
            return got
        await self._listen()
        watched = deferToThread(watch)
        for _ in range(500):
            if self.factory.subscribers:
                break
            await deferLater(reactor, 0.01)
        for n in range(3):
            self.factory.broadcast({"type": "tick", "n": n})
        self.assertEqual(await watched, [{"type": "tick", "n": n} for n in range(3)])

    @async_test
    async def test_stale_socket_is_replaced(self) -> None:
        """A socket file left by a dead daemon is removed and listening succeeds."""
        def ask() -> dict:
            with ControlClient(self.path, timeout=5) as client:
                return client.request({"type": "echo", "n": 0})
        os.makedirs(self.data_dir, mode=0o700)
        dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        dead.bind(self.path)
        dead.close()
        await self._listen()
        self.assertEqual(await deferToThread(ask), {"n": 0})

    @async_test
    async def test_second_daemon_refused(self) -> None:
        """Listening where a live daemon answers raises ConfigurationError and keeps it alive."""
        def ask() -> dict:
            with ControlClient(self.path, timeout=5) as client:
                return client.request({"type": "echo", "n": 0})
        await self._listen()
        with self.assertRaises(ConfigurationError) as caught:
            await listen_control(reactor, self.path, ControlFactory(Commands(reactor), "b"))
        self.assertIn("another daemon is already running", str(caught.exception))
        self.assertEqual(await deferToThread(ask), {"n": 0})

    @async_test
    async def test_non_socket_file_left_alone(self) -> None:
        """A regular file at the socket path is refused and not deleted."""
        os.makedirs(self.data_dir, mode=0o700)
        with open(self.path, "w") as f:
            f.write("precious")
        with self.assertRaises(ConfigurationError):
            await listen_control(reactor, self.path, self.factory)
        with open(self.path) as f:
            self.assertEqual(f.read(), "precious")

    @async_test
    async def test_path_too_long(self) -> None:
        """A socket path beyond the UNIX limit gives a ConfigurationError saying so."""
        path = os.path.join(self.tmp, "d" * 120, "control")
        with self.assertRaises(ConfigurationError) as caught:
            await listen_control(reactor, path, self.factory)
        self.assertIn("shorter data directory", str(caught.exception))
