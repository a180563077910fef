"""Attaching with only an access code: real daemons find each other by tracker or LAN.

Every test here runs real processes on 127.0.0.1: the tracker as
``twistd -n --pidfile= clearskies-tracker --listen tcp:PORT:interface=127.0.0.1``
and daemons through ``tests.daemons``.  Nobody is ever given a ``--peer``
address: B learns where A is from the tracker or from A's LAN announcements
(multicast on loopback, on a private port and group).
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from clearskies.accesscode import access_id, parse_code
from clearskies.addresses import make_address, parse_tracker_entry
from tests.daemons import (
    wait_same_trees,
    DaemonProcess,
    LanSettings,
    TrackerProcess,
    free_port,
    share_and_attach,
    wait_until,
)

pytestmark = pytest.mark.slow

#: The documented command: the twistd script next to this interpreter.
TWISTD = Path(sys.executable).with_name("twistd")
SYNC_TIMEOUT = 25.0


class KnockCounter:
    """Listens where a peer used to be and counts (then drops) every connection attempt."""

    def __init__(self, port: int) -> None:
        self.times: list[float] = []
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", port))
        self._sock.listen(8)
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.times.append(time.monotonic())
            conn.close()

    @property
    def count(self) -> int:
        return len(self.times)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()


@pytest.fixture
def tracker(tmp_path: Path) -> Iterator[TrackerProcess]:
    """A running tracker, stopped at teardown (its log printed for failing tests)."""
    process = TrackerProcess(tmp_path)
    process.start()
    try:
        yield process
    finally:
        process.stop()
        sys.stdout.write("--- tracker log:\n%s" % process.output()[-4000:])


def _share_id(daemon: DaemonProcess) -> str:
    return daemon.cli_json("status", str(daemon.shares))["share_id"]


def _connected(daemon: DaemonProcess) -> bool:
    status = daemon.cli_json("status", str(daemon.shares))
    return any(p.get("connected") for p in status.get("peers", []))


def _seed(root: Path) -> None:
    (root / "hello.txt").write_text("hello from alice\n")
    (root / "sub").mkdir()
    (root / "sub" / "data.bin").write_bytes(os.urandom(100_000))


def test_attach_with_only_a_code_and_a_tracker(daemon_factory, tracker):
    """B attaches with the code and a tracker URL, no address: the tracker's entry for A is
    127.0.0.1 and A's port, and the trees end identical."""
    alice = daemon_factory("alice", "--tracker", tracker.url)
    bob = daemon_factory("bob", "--tracker", tracker.url)
    _seed(Path(alice.shares))
    code = alice.cli_json("share", str(alice.shares))["access_code"]

    # What the tracker says about the code's access ID, before B asks.
    code_id = access_id(parse_code(code))
    probe_peer = "f" * 32

    def alice_listed() -> list:
        answer = tracker.track([(code_id, probe_peer)], free_port())
        assert answer["your_ip"] == "127.0.0.1"
        return answer["others"][code_id]
    entries = wait_until(alice_listed, timeout=10, message="A registered the code's access ID")
    assert len(entries) == 1
    _peer, address = parse_tracker_entry(entries[0])
    assert address == make_address("tcp", "127.0.0.1", alice.port)

    bob.cli("attach", code, str(bob.shares))
    wait_same_trees(alice, bob, SYNC_TIMEOUT)
    assert (Path(bob.shares) / "hello.txt").read_text() == "hello from alice\n"
    assert all(d.cli_json("status")["tracking"] for d in (alice, bob))

    (Path(bob.shares) / "from-bob.txt").write_text("back the other way\n")
    bob.cli("scan", str(bob.shares))
    wait_same_trees(alice, bob, SYNC_TIMEOUT)


def test_attach_with_only_a_code_on_the_lan(daemon_factory):
    """B attaches with only the code, no tracker and no address: LAN multicast on loopback
    brings A and B together and the trees end identical."""
    lan = LanSettings.private()
    alice = daemon_factory("alice", lan=lan)
    bob = daemon_factory("bob", lan=lan)
    _seed(Path(alice.shares))
    started = time.monotonic()
    share_and_attach(alice, bob, direct=False)
    wait_same_trees(alice, bob, SYNC_TIMEOUT)
    # Well before the 60 s periodic announcement: A answers B's announcement.
    assert time.monotonic() - started < SYNC_TIMEOUT
    assert (Path(bob.shares) / "sub" / "data.bin").read_bytes() == \
        (Path(alice.shares) / "sub" / "data.bin").read_bytes()


def test_tracker_restart_both_register_again_and_sync_goes_on(daemon_factory, tracker):
    """After the tracker restarts empty, both daemons register again, and B, restarted
    too, finds A through the new tracker and receives a new file."""
    alice = daemon_factory("alice", "--tracker", tracker.url)
    bob = daemon_factory("bob", "--tracker", tracker.url)
    _seed(Path(alice.shares))
    share_and_attach(alice, bob, direct=False)
    wait_same_trees(alice, bob, SYNC_TIMEOUT)

    tracker.restart()
    assert tracker.status()["peers"] == 0
    def registered_again() -> bool:
        counts = tracker.status()
        return counts["IDs"] == 1 and counts["peers"] == 2
    wait_until(registered_again, timeout=20, message="both daemons registered the share again")
    assert all(d.cli_json("status")["tracking"] for d in (alice, bob))

    (Path(alice.shares) / "after-restart.txt").write_text("the tracker came back\n")
    alice.cli("scan", str(alice.shares))
    wait_same_trees(alice, bob, SYNC_TIMEOUT)

    # Only the new tracker knows where A is now: B, restarted, must find A through it.
    bob.restart()
    (Path(alice.shares) / "after-bob-restart.txt").write_text("found again\n")
    alice.cli("scan", str(alice.shares))
    wait_same_trees(alice, bob, SYNC_TIMEOUT)


def test_peer_restarting_on_a_new_port_is_found_again(daemon_factory, tracker):
    """A restarts on another port: B retries the old address ever more rarely, A registers
    the new port, and the two reconnect and sync."""
    alice = daemon_factory("alice", "--tracker", tracker.url)
    bob = daemon_factory("bob", "--tracker", tracker.url)
    _seed(Path(alice.shares))
    share_and_attach(alice, bob, direct=False)
    wait_same_trees(alice, bob, SYNC_TIMEOUT)
    wait_until(lambda: _connected(bob), timeout=10, message="B is connected to A")
    old_port = alice.port

    alice.stop()
    knocks = KnockCounter(old_port)
    try:
        (Path(alice.shares) / "while-moving.txt").write_text("written while A was away\n")
        time.sleep(7)
        # Back-off after a lost connection: about 2 s, then 4 s, then 8 s, ...
        assert 1 <= knocks.count <= 4, knocks.times
        alice.restart(new_port=True)
        assert alice.port != old_port
        wait_until(lambda: _connected(bob), timeout=15, message="B is connected to A again")
        before = knocks.count
        time.sleep(3)
        assert knocks.count == before  # connected elsewhere: the old address rests
    finally:
        knocks.close()
    share_id = _share_id(alice)
    probe_peer = "e" * 32

    def new_port_listed() -> bool:
        others = tracker.track([(share_id, probe_peer)], free_port())["others"][share_id]
        return make_address("tcp", "127.0.0.1", alice.port) in {
            parse_tracker_entry(e)[1] for e in others}
    wait_until(new_port_listed, timeout=10, message="A registered its new port")
    alice.cli("scan", str(alice.shares))
    wait_same_trees(alice, bob, SYNC_TIMEOUT)
    assert (Path(bob.shares) / "while-moving.txt").exists()
