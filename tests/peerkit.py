"""A scripted peer against a real in-process daemon, for protocol-level tests.

:class:`PeerKitCase` starts a :class:`clearskies.daemon.Daemon` (real reactor,
real share directory, listening on 127.0.0.1 only) and connects
:class:`ScriptedSession` peers to it: each completes the real handshake and
TLS with the share's keys, then records every wire event the daemon sends
and lets the test write whatever it likes — well-formed messages, payloads
with wrong content, or raw bytes that break the framing.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.task import deferLater
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from clearskies import wire
from clearskies.daemon import Daemon, DaemonSettings
from clearskies.handshake import ConnectTarget, MemoryKeyRing
from clearskies.peer import PeerProtocol, connect_peer
from clearskies.daemon.runtime import ShareRuntime

ALL_FEATURES = ("vv", "directories", "progress")
POLL = 0.02
DEFAULT_TIMEOUT = 10.0


async def sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


async def wait_until(condition: Callable[[], Any], timeout: float = DEFAULT_TIMEOUT,
                     what: str = "condition") -> Any:
    """Poll ``condition`` on the reactor until it is truthy; TimeoutError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError("timed out after %.1f s waiting for %s" % (timeout, what))
        await sleep(POLL)


class ScriptedSession:
    """The scripted side of one connection: records what arrives, sends what it is told."""

    def __init__(self, connection: PeerProtocol) -> None:
        self.connection = connection
        self.events: list[wire.Event] = []
        self.lost_reason: str | None = None

    # -- the Session interface (called by PeerProtocol) --------------------------------

    def event_received(self, event: wire.Event) -> None:
        self.events.append(event)

    def connection_lost(self, reason: str) -> None:
        self.lost_reason = reason

    # -- sending -------------------------------------------------------------------------

    def send(self, body: dict[str, Any]) -> None:
        """One JSON message, as is."""
        self.connection.send_bytes(wire.encode(body))

    def send_payload(self, body: dict[str, Any], data: bytes, chunk_size: int = 65536) -> None:
        """``!``-message, ``data`` in chunks of ``chunk_size``, then the end marker."""
        out = [wire.encode_payload_start(body)]
        for start in range(0, len(data), chunk_size):
            out.append(wire.encode_chunk(data[start:start + chunk_size]))
        out.append(wire.PAYLOAD_END)
        self.connection.send_bytes(b"".join(out))

    def send_raw(self, data: bytes) -> None:
        """Bytes straight onto the (TLS) stream, framing or not."""
        self.connection.send_bytes(data)

    def close(self) -> None:
        self.connection.close("test done", quiet=True)

    # -- what arrived ------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self.lost_reason is not None

    def messages(self, type: str | None = None) -> list[dict[str, Any]]:
        """Bodies of every message received (of ``type``), in order."""
        return [e.body for e in self.events
                if isinstance(e, wire.Message) and (type is None or e.type == type)]

    def find(self, type: str, since: int = 0,
             where: Callable[[dict[str, Any]], bool] | None = None) -> int | None:
        """Index in :attr:`events` of the first matching message at or after ``since``."""
        for index in range(since, len(self.events)):
            event = self.events[index]
            if isinstance(event, wire.Message) and event.type == type and (
                    where is None or where(event.body)):
                return index
        return None

    async def wait_for(self, type: str, since: int = 0, timeout: float = DEFAULT_TIMEOUT,
                       where: Callable[[dict[str, Any]], bool] | None = None
                       ) -> tuple[int, dict[str, Any]]:
        """Wait for a message of ``type`` (index at or after ``since``); (index, body)."""
        index = await wait_until(
            lambda: (found := self.find(type, since, where)) is not None and (found + 1),
            timeout, "a %r message" % type)
        body = self.events[index - 1].body  # type: ignore[union-attr]
        return index - 1, body

    async def wait_closed(self, timeout: float = DEFAULT_TIMEOUT) -> str:
        await wait_until(lambda: self.closed, timeout, "the connection to close")
        assert self.lost_reason is not None
        return self.lost_reason

    async def collect_payload(self, path: str, since: int = 0,
                              timeout: float = DEFAULT_TIMEOUT) -> bytes:
        """The payload of the first ``file_data`` for ``path`` at or after ``since``."""
        start, _ = await self.wait_for("file_data", since, timeout,
                                       where=lambda b: b.get("path") == path)

        def ended() -> int | None:
            for index in range(start + 1, len(self.events)):
                if isinstance(self.events[index], wire.PayloadEnd):
                    return index
            return None

        end = await wait_until(ended, timeout, "the end of %r's payload" % path)
        return b"".join(e.data for e in self.events[start + 1:end]
                        if isinstance(e, wire.PayloadChunk))


class PeerKitCase(TestCase):
    """A trial TestCase with one daemon holding one share, and scripted peers for it."""

    timeout = 60

    def setUp(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="cs-peerkit-"))
        self.addCleanup(shutil.rmtree, self.base, True)
        self.share_dir = self.base / "share"
        self.share_dir.mkdir()
        self.outside = self.base / "outside"
        self.outside.mkdir()
        self.log_events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.log_events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.log_events.append)
        self.daemon: Daemon | None = None
        self.sessions: list[ScriptedSession] = []

    def logged(self) -> list[str]:
        return [formatEvent(e) for e in self.log_events]

    async def start_daemon(self) -> ShareRuntime:
        """Start the daemon on the prepared share directory; returns the share."""
        settings = DaemonSettings(
            data_dir=str(self.base / "data"), listen="tcp:0:interface=127.0.0.1",
            name="daemon under test", shares=[str(self.share_dir)], lan=False)
        daemon = Daemon(reactor, settings)
        daemon.startService()
        self.addCleanup(self._stop_daemon, daemon)
        await daemon.ready
        self.daemon = daemon
        (runtime,) = daemon.share_registry.by_id.values()
        self.runtime = runtime
        await wait_until(lambda: runtime.service.status.state == "idle", what="the first scan")
        return runtime

    async def _stop_daemon(self, daemon: Daemon) -> None:
        try:
            for session in self.sessions:
                if session.connection.transport is not None and not session.closed:
                    session.connection.transport.abortConnection()
            await daemon.stopService().addTimeout(10, reactor)
            await sleep(0.01)  # let closing transports run their last callbacks
        finally:
            # Whatever went wrong, no worker thread may outlive the test: a live
            # one keeps the whole test process from exiting.
            for runner in (daemon.runners.files, daemon.runners.database):
                if runner.running:
                    runner.stopService()

    async def connect(self, features: tuple[str, ...] = ALL_FEATURES,
                      peer_id: str | None = None, keys: Any = None) -> ScriptedSession:
        """A scripted peer, authenticated with the share's keys (or ``keys``: those of
        a lower level), past the handshake."""
        assert self.daemon is not None
        made: list[ScriptedSession] = []

        def factory(connection: PeerProtocol) -> ScriptedSession:
            session = ScriptedSession(connection)
            made.append(session)
            return session

        target = ConnectTarget.share(keys or self.runtime.keys, peer_id or secrets.token_hex(16))
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.daemon.listeners.port_number)
        await connect_peer(reactor, endpoint, target, MemoryKeyRing(time.time),
                           "scripted peer", factory, features=features)
        (session,) = made
        self.sessions.append(session)
        return session

    async def deliver(self, name: str, data: bytes) -> ScriptedSession:
        """A new scripted peer announces ``name`` and sends it when asked; returns once
        the daemon holds exactly ``data`` there."""
        peer_id = secrets.token_hex(16)
        peer = await self.connect(peer_id=peer_id)
        peer.send({"type": "manifest", "peer": peer_id, "revision": 1,
                   "files": [file_entry(name, data, vv={peer_id: 1})]})
        await peer.wait_for("get", where=lambda b: b["path"] == name)
        peer.send_payload({"type": "file_data", "path": name}, data)
        await wait_until(lambda: self.share_path(name).exists()
                         and self.share_path(name).read_bytes() == data, what=name)
        return peer

    def share_path(self, path: str) -> Path:
        return self.share_dir / path

    def temp_files(self) -> list[str]:
        """Partial-download files left anywhere under the share or the base directory."""
        return sorted(str(p) for p in self.base.rglob("*") if p.name.endswith(".!clearsky"))


def file_entry(path: str, data: bytes, *, utime: float | None = None,
               mode: str = "0644", **extra: Any) -> dict[str, Any]:
    """A file record as a peer sends it."""
    entry: dict[str, Any] = {
        "path": path, "utime": utime if utime is not None else time.time(),
        "size": len(data), "mtime": [int(time.time()), 0], "mode": mode,
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    entry.update(extra)
    return entry


def snapshot(directory: Path) -> dict[str, tuple[bytes | None, int]]:
    """Every entry under ``directory``: content (None for non-files) and mtime_ns."""
    out: dict[str, tuple[bytes | None, int]] = {}
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            full = os.path.join(root, name)
            st = os.lstat(full)
            content = Path(full).read_bytes() if os.path.isfile(full) and \
                not os.path.islink(full) else None
            out[os.path.relpath(full, directory)] = (content, st.st_mtime_ns)
    return out


# -- untrusted shares: what both sides' scripted tests need ----------------------------


def untrusted_keys(keys: Any) -> Any:
    """The keys a peer at level untrusted is given of a share."""
    from clearskies.keys import ShareKeys

    return ShareKeys.from_keys_message(keys.keys_message("untrusted"))


def wire_bytes(peer: ScriptedSession) -> bytes:
    """Everything the daemon said to ``peer``: message lines, signatures and payloads."""
    out = []
    for event in peer.events:
        if isinstance(event, wire.Message):
            out.append(event.text)
            out.append(event.signature or b"")
        elif isinstance(event, wire.PayloadChunk):
            out.append(bytes(event.data))
    return b"\n".join(out)


async def untrusted_keeper(case: PeerKitCase, features: Any) -> tuple[Any, ScriptedSession]:
    """The daemon keeps a new share at level untrusted (in ``case.kept``); a scripted
    trusted peer of it connects: (the share's full keys, the peer), once the daemon
    has said what it holds."""
    from clearskies import keys as keymod

    await case.start_daemon()
    owner_keys = keymod.generate_share_keys(rsa_bits=1024)
    folder = case.base / "kept"
    folder.mkdir()
    await case.daemon.share_registry.add_share(untrusted_keys(owner_keys), str(folder),
                                               secrets.token_hex(16))
    case.kept = folder
    peer = await case.connect(features=features, keys=owner_keys)
    assert peer.connection.established.access == "untrusted"
    await peer.wait_for("untrusted.state")
    return owner_keys, peer
