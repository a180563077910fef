"""The daemon object without its reactor running: decisions that need no peers."""

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from clearskies.daemon import Daemon, DaemonSettings, PendingJoin
from clearskies.errors import ConfigurationError
from clearskies.threads import SyncRunner
from tests.helpers import async_test
from tests.peerkit import PeerKitCase


def test_keys_for_an_attach_detached_meanwhile_create_nothing(tmp_path):
    """Keys arriving for an attach no longer pending fail the handshake and write nothing."""
    daemon = Daemon(reactor, DaemonSettings(data_dir=str(tmp_path / "data")))
    join = PendingJoin(bytes(16), str(tmp_path / "copy"), "a" * 32)
    failures = []
    Deferred.fromCoroutine(daemon.access_codes.join_completed(object(), join)).addErrback(failures.append)
    assert failures and failures[0].check(ConfigurationError)
    assert "cancelled" in failures[0].getErrorMessage()
    assert not (tmp_path / "copy").exists() and daemon.share_registry.by_id == {}


def test_completed_attach_stores_the_share_before_it_forgets_the_join(tmp_path: Path):
    """While the new share is being stored, the pending attach is still on disk:
    a crash at that moment leaves the attach to retry, never nothing at all."""
    daemon = Daemon(Clock(), DaemonSettings(data_dir=str(tmp_path / "data")))
    daemon.resources.files_runner = SyncRunner()
    saved: dict[str, Any] = {}
    order: list[str] = []

    def set_config(key: str, value: Any) -> Deferred[None]:
        saved[key] = json.loads(json.dumps(value))
        order.append(key)
        return succeed(None)

    daemon.resources.store = SimpleNamespace(set_config=set_config)  # type: ignore[assignment]
    join = PendingJoin(b"\x01" * 16, str(tmp_path / "share"), "a" * 32, ["127.0.0.1:4000"])
    daemon.access_codes.joins[join.access_id] = join
    daemon.resources.config["pending_joins"] = [join.to_dict()]
    saved["pending_joins"] = [join.to_dict()]
    stored_while_adding: list[list[dict]] = []
    adding: Deferred[None] = Deferred()

    async def add_share(keys: Any, path: str, peer_id: str) -> None:
        stored_while_adding.append(list(saved["pending_joins"]))
        await adding  # the crash would come here

    daemon.share_registry.add_share = add_share  # type: ignore[method-assign]
    done = Deferred.fromCoroutine(daemon.access_codes.join_completed(SimpleNamespace(share_id="f" * 64),
                                                         join))
    assert stored_while_adding == [[join.to_dict()]]
    assert saved["pending_joins"] == [join.to_dict()]
    adding.callback(None)
    assert done.called
    assert saved["pending_joins"] == [] and join.access_id not in daemon.access_codes.joins
    # The address given with the code became the share's before the join was dropped.
    assert saved["manual_peers"] == {"f" * 64: ["127.0.0.1:4000"]}
    assert order[-2:] == ["manual_peers", "pending_joins"]


def _daemon_with_memory_store(tmp_path: Path, **settings: Any) -> tuple[Daemon, dict]:
    clock = Clock()
    clock.advance(1_800_000_000)
    daemon = Daemon(clock, DaemonSettings(data_dir=str(tmp_path / "data"), **settings))
    saved: dict[str, Any] = {}

    def set_config(key: str, value: Any) -> Deferred[None]:
        saved[key] = json.loads(json.dumps(value))
        return succeed(None)

    daemon.resources.store = SimpleNamespace(set_config=set_config)  # type: ignore[assignment]
    return daemon, saved


def test_refusals_fail_an_attach_only_for_known_reasons(tmp_path: Path):
    """A proven expired/used/cancelled fails an attach at once; unknown (or an unproven
    reason) only from an address the user gave, after three answers; a cannot_start
    without a reason (an older peer) never; a failed attach is not dialled."""
    daemon, saved = _daemon_with_memory_store(tmp_path)
    joins = {}
    for name in ("expired", "unknown", "none", "lan"):
        join = PendingJoin(name.encode().ljust(16, b"-"), str(tmp_path / name), "a" * 32,
                           added=daemon.now())
        daemon.access_codes.joins[join.access_id] = joins[name] = join
    for _ in range(10):
        daemon.access_codes.join_refused(joins["none"].access_id, None, False, manual=True)
        # Anyone on the LAN can answer in the maker's place: no proof, not a given address.
        daemon.access_codes.join_refused(joins["lan"].access_id, "cancelled", False, manual=False)
        daemon.access_codes.join_refused(joins["lan"].access_id, "unknown", False, manual=False)
    daemon.access_codes.join_refused(joins["expired"].access_id, "expired", True, manual=False)
    daemon.access_codes.join_refused(joins["unknown"].access_id, "unknown", False, manual=True)
    daemon.access_codes.join_refused(joins["unknown"].access_id, "cancelled", False, manual=True)
    assert joins["expired"].failed == "expired" and joins["none"].failed is None
    assert joins["unknown"].failed is None and joins["lan"].failed is None
    daemon.access_codes.join_refused(joins["unknown"].access_id, "unknown", False, manual=True)
    assert joins["unknown"].failed == "unknown"
    assert daemon.keyring.pending_join(joins["expired"].access_id) is None
    assert daemon.keyring.pending_join(joins["none"].access_id) is not None
    announced = [target for target, _ in daemon.discovery.registrations()]
    assert announced == [joins["none"].access_id, joins["lan"].access_id]
    stored = {PendingJoin.from_dict(d).path: PendingJoin.from_dict(d).failed
              for d in saved["pending_joins"]}
    assert stored[str(tmp_path / "expired")] == "expired"
    assert "ask for a new one" in joins["expired"].problem


def test_an_attach_nobody_accepts_gives_up_after_a_week(tmp_path: Path):
    """A pending attach gives up JOIN_GIVE_UP after it was added, with a clear problem."""
    from clearskies.daemon.codes import JOIN_GIVE_UP

    daemon, _ = _daemon_with_memory_store(tmp_path)
    join = PendingJoin(bytes(16), str(tmp_path / "copy"), "a" * 32, added=daemon.now())
    daemon.access_codes.joins[join.access_id] = join
    daemon.reactor.advance(JOIN_GIVE_UP - 1)
    daemon.access_codes.check_joins()
    assert join.failed is None
    daemon.reactor.advance(2)
    daemon.access_codes.check_joins()
    assert join.failed == "gave_up" and "within 7 days" in join.problem


def test_dead_codes_say_why(tmp_path: Path):
    """The keyring names why a code it made is dead; a code it never made is not named."""
    from clearskies.accesscode import new_access_code

    daemon, _ = _daemon_with_memory_store(tmp_path)
    now = daemon.now()
    code = new_access_code("ab" * 32, "read_write", now - 100, lifetime=10)
    daemon.access_codes.codes[code.access_id] = code
    assert daemon.keyring.dead_code(code.access_id) == ("expired", code.code)
    other = new_access_code("ab" * 32, "read_write", now)
    daemon.access_codes.remember_dead_code(other, "cancelled")
    assert daemon.keyring.dead_code(other.access_id) == ("cancelled", other.code)
    assert daemon.keyring.dead_code("ef" * 32) is None


def test_command_line_options_are_kept_and_a_plain_start_reuses_them(tmp_path: Path):
    """Options given are stored; a start without them takes the stored ones."""
    daemon, saved = _daemon_with_memory_store(
        tmp_path, listen="tcp:40321", name="box", lan=False,
        trackers=["http://t.example:1"], peers=["192.0.2.1:4000"])
    Deferred.fromCoroutine(daemon._settle_options())
    assert saved == {"listen": "tcp:40321", "name": "box", "lan": False,
                     "trackers": ["http://t.example:1"], "peers": ["192.0.2.1:4000"]}
    again, _ = _daemon_with_memory_store(tmp_path)
    again.resources.config = dict(saved)
    Deferred.fromCoroutine(again._settle_options())
    s = again.settings
    assert (s.listen, again.name, s.lan, s.trackers, s.peers) == (
        "tcp:40321", "box", False, ["http://t.example:1"], ["192.0.2.1:4000"])
    undone, saved2 = _daemon_with_memory_store(tmp_path, lan=True, no_trackers=True)
    undone.resources.config = dict(saved)
    Deferred.fromCoroutine(undone._settle_options())
    assert undone.settings.lan is True and undone.settings.trackers == []
    assert saved2 == {"lan": True, "trackers": []}


def test_stored_name_too_long_for_peers_is_not_used(tmp_path: Path):
    """A stored name peers would refuse (an older version took it) is ignored, not sent."""
    daemon, _ = _daemon_with_memory_store(tmp_path)
    daemon.resources.config = {"name": "n" * 300}
    Deferred.fromCoroutine(daemon._settle_options())
    assert daemon.name != "n" * 300


def test_attach_folder_that_cannot_be_made_is_said_in_the_status(tmp_path: Path):
    """Keys arrive but the folder cannot be created: the handshake fails (the code is not
    spent) and the pending attach's problem says why and what to do."""
    daemon, _ = _daemon_with_memory_store(tmp_path)
    daemon.resources.files_runner = SyncRunner()
    join = PendingJoin(bytes(16), str(tmp_path / "gone" / "copy"), "a" * 32)
    daemon.access_codes.joins[join.access_id] = join
    failures = []
    Deferred.fromCoroutine(daemon.access_codes.join_completed(SimpleNamespace(share_id="f" * 64),
                                                  join)).addErrback(failures.append)
    assert failures and failures[0].check(ConfigurationError)
    assert "cannot be created" in join.problem and "tried again" in join.problem
    assert join.failed is None and join.access_id in daemon.access_codes.joins


def test_data_directory_lock_is_one_holder_at_a_time(tmp_path: Path):
    """The lock says who holds the directory; a file in its place is a clear error."""
    import os

    import pytest

    from clearskies.daemon.startup import lock_data_dir

    fd = lock_data_dir(str(tmp_path / "data"))
    try:
        with pytest.raises(ConfigurationError, match="another daemon \\(pid %d\\)" % os.getpid()):
            lock_data_dir(str(tmp_path / "data"))
    finally:
        os.close(fd)
    os.close(lock_data_dir(str(tmp_path / "data")))  # free again once closed
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigurationError, match="cannot use the data directory"):
        lock_data_dir(str(tmp_path / "file"))


def test_a_path_no_file_name_can_hold_is_a_bad_request():
    """A lone surrogate in a control path is refused as bad_request, never an internal error."""
    import pytest

    from clearskies.control.commands import _path
    from clearskies.control.protocol import ControlError

    with pytest.raises(ControlError) as caught:
        _path({"path": "/tmp/\ud800x"})
    assert caught.value.code == "bad_request"
    assert _path({"path": "/tmp/\udc80x"}).endswith("/tmp/\udc80x")  # a raw byte: fine


def test_a_new_name_reaches_the_listening_side_at_once():
    """`config set name` changes the name the listeners' handshakes announce, not only dials'."""
    from clearskies.peer import PeerServerFactory

    daemon = Daemon(Clock(), DaemonSettings(data_dir="/nonexistent-data", name="old"))
    listeners = daemon.listeners
    listeners.peer_factory = PeerServerFactory(Clock(), daemon.keyring, daemon.name,
                                               daemon.dialling.session_factory)
    daemon.set_name("new name")
    assert daemon.name == "new name" and listeners.peer_factory.settings.name == "new name"


def test_keys_for_a_share_held_at_another_folder_fail_the_attach_and_spend_nothing(
        tmp_path: Path):
    """Keys for a share we already sync elsewhere: the handshake fails (no acknowledgment,
    the code stays unspent), nothing is created, and the attach fails saying where it is."""
    daemon, saved = _daemon_with_memory_store(tmp_path)
    daemon.resources.files_runner = SyncRunner()
    added: list[str] = []

    async def add_share(keys: Any, path: str, peer_id: str) -> None:
        added.append(path)

    daemon.share_registry.add_share = add_share  # type: ignore[method-assign]
    for held, given, reason, words in (("read_write", "read_write", "synced_elsewhere",
                                        "detach it first or use that folder"),
                                       ("read_only", "read_write", "synced_read_only",
                                        "cannot be made read-write in place yet")):
        share_id = held[:2].encode().hex() * 32
        daemon.share_registry.by_id[share_id] = SimpleNamespace(  # type: ignore[assignment]
            root=tmp_path / ("s2-" + held), keys=SimpleNamespace(access=held), error=None)
        join = PendingJoin(held.encode().ljust(16, b"-"), str(tmp_path / ("other-" + held)),
                           "a" * 32)
        daemon.access_codes.joins[join.access_id] = join
        failures: list = []
        Deferred.fromCoroutine(daemon.access_codes.join_completed(
            SimpleNamespace(share_id=share_id, access=given), join)).addErrback(failures.append)
        assert failures and failures[0].check(ConfigurationError)
        assert join.failed == reason and words in join.problem
        assert str(tmp_path / ("s2-" + held)) in join.problem
        assert "was not used" in join.problem
        assert not (tmp_path / ("other-" + held)).exists() and added == []
        assert daemon.keyring.pending_join(join.access_id) is None  # no more dials
        # The reason survives a restart.
        stored = [PendingJoin.from_dict(d) for d in saved["pending_joins"]
                  if d["path"] == join.path]
        assert stored[0].problem == join.problem


def test_the_daemon_provides_what_runtimes_and_commands_see(tmp_path: Path):
    """The share runtimes' host offers all of IShareHost, the daemon all of
    IDaemonControl, its dialling all an attach needs (IAttachDialler)."""
    from zope.interface.verify import verifyObject

    from clearskies.interfaces import IAttachDialler, IDaemonControl, IShareHost

    daemon = Daemon(Clock(), DaemonSettings(data_dir=str(tmp_path / "data")))
    assert daemon.share_registry.host is daemon.share_host
    assert verifyObject(IShareHost, daemon.share_host)
    assert verifyObject(IDaemonControl, daemon)
    assert daemon.access_codes.dialler is daemon.dialling
    assert verifyObject(IAttachDialler, daemon.dialling)


def test_nothing_below_the_daemon_imports_it():
    """No module outside clearskies.daemon but the entry points imports it, not even
    for type checking: the runtime and the commands see it through interfaces only."""
    import ast

    import clearskies

    package = Path(clearskies.__file__).parent
    offenders = []
    for path in sorted(package.rglob("*.py")):
        relative = path.relative_to(package).as_posix()
        if relative.startswith("daemon/") or relative in ("tap.py", "cli.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [node.module + "." + a.name for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            if any(n == "clearskies.daemon" or n.startswith("clearskies.daemon.")
                   for n in names):
                offenders.append(relative)
    assert offenders == []
    assert not (package / "share" / "runtime.py").exists()


def test_a_start_that_fails_says_why_and_exits_1(monkeypatch):
    """After a failed start the entry point prints the reason, stops the reactor and
    exits 1 once it has stopped; an unexpected error points at the log."""
    import io
    import sys

    from twisted.python.failure import Failure

    from clearskies.daemon import startup

    class Reactor:
        running = True

        def __init__(self) -> None:
            self.calls: list[tuple] = []

        def addSystemEventTrigger(self, phase: str, event: str, fn: Any, *args: Any) -> None:
            self.calls.append((phase, event, fn, args))

        def stop(self) -> None:
            self.calls.append(("stop",))

    err = io.StringIO()
    monkeypatch.setattr(sys, "__stderr__", err)
    reactor_ = Reactor()
    startup.exit_on_startup_failure(reactor_, Failure(ConfigurationError("port taken")))
    assert err.getvalue() == "clearskies: cannot start: port taken\n"
    assert reactor_.calls == [("after", "shutdown", startup.exit_now,
                               (startup.EXIT_CANNOT_START,)), ("stop",)]
    assert startup.startup_reason(Failure(KeyError("x"))) == \
        "'x' (see the log: clearskies log)"


class ShareServiceTreeTests(PeerKitCase):
    @async_test
    async def test_each_share_is_a_child_service_started_and_stopped_with_the_tree(self):
        """A share runs as a child of the registry; detaching it stops it and takes it out."""
        runtime = await self.start_daemon()
        daemon = self.daemon
        self.assertIs(runtime.parent, daemon.share_registry)
        self.assertTrue(runtime.running and daemon.share_registry.running)
        self.assertIn(daemon.share_registry, list(daemon))
        await daemon.remove_share(str(self.share_dir))
        self.assertFalse(runtime.running)
        self.assertNotIn(runtime, list(daemon.share_registry))
        self.assertEqual(daemon.share_registry.by_id, {})
