"""Fakes shared by the test modules: each stands in for one seam of the daemon.

Every fake says which seam it implements.  Fakes of the zope interfaces in
``clearskies.interfaces`` declare ``@implementer(IFoo)`` and are checked with
``verifyObject`` in tests/test_fakes.py and tests/test_discovery_seams.py.

- ``MemoryShare``: the share store as syncing sees it (``ILocalShare``).
- ``FakeConnection``: the connection a sync session is given (what it uses of
  ``clearskies.peer.PeerProtocol``).
- ``PausingTransport``: a transport whose buffer fills up and pauses its producer.
- ``QuietSession``: a session (``clearskies.peer.Session``) that ignores traffic.
- ``RecordingProtocol``: an application protocol that records what reaches it.
- ``MemoryNetwork`` / ``MemoryEndpoint`` / ``TLSTransport``: TCP and STARTTLS between
  in-memory peers (``twisted.test.iosim`` pumps on a ``Clock``).
- ``FakeDiscoverySource`` / ``FakeTransport`` / ``FakeEndpoint``: a way of finding
  peers (``IDiscoverySource``) and of reaching them (``IPeerTransport``).
"""

from __future__ import annotations

import hashlib
import itertools
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import (
    IHandshakeListener, ISSLTransport, IStreamClientEndpoint, ITLSTransport)
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test import iosim
from zope.interface import alsoProvides, implementer

from clearskies import wire
from clearskies.addresses import Address
from clearskies.errors import UnsafePathError
from clearskies.interfaces import IDiscoverySource, ILocalShare, IPeerTransport, IRunner
from clearskies.share.database import ShareInfo, ShareStore
from clearskies.share.pages import PagedStore
from clearskies.share.records import FileRecord
from clearskies.sync import ShareSync, SyncSession
from clearskies.threads import SyncRunner
from tests.helpers import sha

US = "a" * 32
"""The peer ID of the share the fakes hold."""
THEM = "b" * 32
"""The peer ID at the other end of a FakeConnection."""


def file_record(path: str, data: bytes, vv: dict[str, int], utime: float = 10.0) -> FileRecord:
    """A live file record for ``data`` at ``path``."""
    return FileRecord(path=path, utime=utime, size=len(data), mtime=(1, 0), mode=0o644,
                      sha256=sha(data), vv=vv)


@implementer(ILocalShare)
class MemoryShare:
    """An ILocalShare whose records live in a dict and whose files live in a temp dir.

    Seam: ``clearskies.interfaces.ILocalShare``.
    """

    error = None

    def __init__(self, root: Path) -> None:
        self.share_id = "f" * 64
        self.our_peer_id = US
        self.root = root
        self.files_runner = SyncRunner()
        # What peers announced lives in a real state database beside the folder.
        store = ShareStore(root.parent / (root.name + ".state.sqlite3"), SyncRunner())
        store.call(lambda db: db.get_share(self.share_id) or db.add_share(
            ShareInfo(self.share_id, str(root), US, "read_write", created=1.0)))
        self.lists = PagedStore(store)
        self.records: dict[str, FileRecord] = {}
        self.rev = 0
        self.ignored: set[str] = set()
        self.damaged: set[str] = set()  # files found rotted (is_damaged)
        self.commits: list[list[FileRecord]] = []
        self.batch_calls: list[tuple[str, int]] = []
        self.refused: set[tuple[str, str]] = set()
        self.pages_read = 0

    def revision(self) -> int:
        return self.rev

    def manifest(self):
        return succeed((self.rev, [self.records[p] for p in sorted(self.records)]))

    def manifest_page(self, after: str | None, limit: int):
        """The revision and the next ``limit`` records after ``after``, in path order."""
        self.pages_read += 1
        paths = sorted(p for p in self.records if after is None or p > after)[:limit]
        return succeed((self.rev, [self.records[p] for p in paths]))

    def get_record(self, path: str):
        return succeed(self.records.get(path))

    def local_path(self, path: str) -> Path:
        if ".." in path.split("/") or path.startswith("/"):
            raise UnsafePathError(path)
        return self.root / path

    def is_ignored(self, path: str) -> bool:
        return path in self.ignored

    def is_damaged(self, path: str) -> bool:
        return path in self.damaged

    def is_unchanged(self, path: str):
        record = self.records.get(path)
        local = self.root / path
        if record is None or record.deleted:
            return succeed(not local.exists())
        return succeed(local.exists() and sha(local.read_bytes()) == record.sha256)

    def commit_remote(self, records: list[FileRecord], written: Any = None):
        self.rev += 1
        for record in records:
            self.records[record.path] = record
        self.commits.append(list(records))
        return succeed(self.rev)

    def find_local_copy(self, sha256: str):
        for record in self.records.values():
            if record.sha256 == sha256 and (self.root / record.path).exists():
                return succeed(self.root / record.path)
        return succeed(None)

    def remove_local(self, path: str):
        local = self.root / path
        if local.is_dir():
            local.rmdir()
        elif local.exists():
            local.unlink()
        return succeed(True)

    def make_directory(self, path: str, mode: int | None):
        (self.root / path).mkdir(parents=True, exist_ok=True)
        return succeed(None)

    def rename_local(self, source: str, destination: str, decided_on: Any = None):
        if decided_on is not None and self.records.get(source) != decided_on:
            return succeed(False)  # as the real share: a newer local record wins
        target = self.root / destination
        target.parent.mkdir(parents=True, exist_ok=True)
        os.rename(self.root / source, target)
        return succeed(True)

    def get_records(self, paths: list[str]):
        return succeed({p: self.records[p] for p in paths if p in self.records})

    def rename_many(self, moves: list[tuple[str, str]], decided_on: Any = None):
        self.batch_calls.append(("rename", len(moves)))
        decided = decided_on or [None] * len(moves)
        return succeed([self.rename_local(src, dst, ours).result
                        for (src, dst), ours in zip(moves, decided)])

    def keeper_for(self, records: list[FileRecord], ours: Any = None):
        return succeed(None)  # keeps no versions

    def remove_many(self, paths: list[str], decided_on: Any = None, changes: Any = None):
        self.batch_calls.append(("remove", len(paths)))
        return succeed([self.remove_local(p).result for p in paths])

    def peer_manifest_seen(self, peer_id: str, revision: Any) -> None:
        self.seen = (peer_id, revision)

    def recorded_many(self, paths: list[str]):
        """As the daemon's share: what the disk should hold, with no cache key (so hashed)."""
        expected: dict[str, tuple[Any, ...]] = {}
        for path in paths:
            record = self.records.get(path)
            if record is None or record.deleted:
                expected[path] = ("absent",)
            elif record.is_dir:
                expected[path] = ("directory",)
            else:
                expected[path] = ("file", record.size, record.sha256, None)
        return succeed((expected, {p: self.records[p] for p in paths if p in self.records}))

    def hashes_present(self, hashes: list[str]):
        live = {r.sha256 for r in self.records.values() if not r.deleted}
        return succeed({h for h in hashes if h in live})

    def expect_own_renames(self, paths: list[str]) -> None:
        pass

    def own_renames_failed(self, paths: list[str]) -> None:
        pass

    def check_root(self) -> None:
        pass

    def local_files_recorded(self) -> None:
        return None

    def note_refused(self, path: str, why: str) -> bool:
        """Remember a refused record; True the first time for this path and reason."""
        new = (path, why) not in self.refused
        self.refused.add((path, why))
        return new

    def add_local(self, path: str, data: bytes, vv: dict[str, int]) -> FileRecord:
        local = self.root / path
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(data)
        record = file_record(path, data, vv)
        self.records[path] = record
        self.rev += 1
        return record


class FakeConnection:
    """What a session sees of PeerProtocol: established info, a transport, close().

    Seam: the connection a ``clearskies.peer.SessionFactory`` is given.
    """

    def __init__(self, peer_id: str = THEM, features: tuple[str, ...] = ("vv", "progress"),
                 we_are_server: bool = True, port: int = 5000) -> None:
        self.established = SimpleNamespace(
            their_peer_id=peer_id, we_are_server=we_are_server, features=features,
            access="read_write")
        self.transport = StringTransport(
            hostAddress=SimpleNamespace(port=port), peerAddress=SimpleNamespace(port=port))
        self.closed: str | None = None
        self.message_writer = None

    def close(self, reason: str, quiet: bool = False) -> None:
        self.closed = reason

    def sent(self) -> list[Any]:
        """Every wire event written so far (and clear the transport)."""
        decoder = wire.WireDecoder()
        decoder.receive_data(self.transport.value())
        self.transport.clear()
        return list(decoder.events())

    def sent_types(self) -> list[str]:
        return [e.type for e in self.sent() if isinstance(e, wire.Message)]


class PausingTransport(StringTransport):
    """A StringTransport whose buffer "fills up": it pauses its producer past ``limit`` bytes.

    Like a real transport it pauses from inside ``write``; ``drain()`` empties
    the buffer (keeping what was written in ``sent``) and resumes the producer.
    """

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.sent = b""

    def write(self, data: bytes) -> None:
        super().write(data)
        if len(self.value()) > self.limit and self.producer is not None:
            self.producer.pauseProducing()

    def drain(self) -> None:
        self.sent += self.value()
        self.clear()
        if self.producer is not None:
            self.producer.resumeProducing()

    def everything(self) -> bytes:
        return self.sent + self.value()


def message(body: dict[str, Any]) -> wire.Message:
    """``body`` as the decoder hands it to a session."""
    return wire.Message(body=body, text=wire.dumps(body))


class QuietSession:
    """A session that ignores what the other side sends and remembers why the connection ended.

    Seam: ``clearskies.peer.Session`` (made by a ``SessionFactory`` from the connection).
    """

    def __init__(self, connection: Any) -> None:
        self.connection = connection
        self.lost: str | None = None

    def event_received(self, event: Any) -> None:
        pass

    def connection_lost(self, reason: str) -> None:
        self.lost = reason


@implementer(IHandshakeListener)
class RecordingProtocol(Protocol):
    """Records what a transport (TLS, SOCKS, …) hands to the application.

    Seam: ``twisted.internet.interfaces.IProtocol`` and ``IHandshakeListener``.
    """

    def __init__(self) -> None:
        self.data = b""
        self.lost: Failure | None = None
        self.handshake_done = False

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost = reason

    def handshakeCompleted(self) -> None:
        self.handshake_done = True


# --- two peers in memory: iosim with real TLS ---------------------------------------


class _BelowTLS:
    """The raw side of a ``TLSTransport``: what the TLS layer writes its records to."""

    def __init__(self, transport: TLSTransport) -> None:
        self._transport = transport

    def write(self, data: bytes) -> None:
        iosim.FakeTransport.write(self._transport, data)

    def writeSequence(self, data: Any) -> None:
        iosim.FakeTransport.write(self._transport, b"".join(data))

    def loseConnection(self) -> None:
        iosim.FakeTransport.loseConnection(self._transport)

    def abortConnection(self) -> None:
        iosim.FakeTransport.abortConnection(self._transport)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


@implementer(ITLSTransport)
class TLSTransport(iosim.FakeTransport):
    """An ``iosim`` transport whose ``startTLS`` runs real TLS (OpenSSL, in memory).

    ``iosim.FakeTransport.startTLS`` only pretends; this one inserts a
    ``TLSMemoryBIOProtocol`` between the bytes and the protocol the way a TCP
    transport does, so PSK suites, wrong keys and version pins behave as on a
    socket.  The TLS layer's small-write buffer runs on ``clock``, which the
    pump advances.

    Seam: ``twisted.internet.interfaces.ITCPTransport`` and ``ITLSTransport``.
    """

    def __init__(self, protocol: Any, isServer: bool, hostAddress: Any, peerAddress: Any,
                 clock: Any) -> None:
        super().__init__(protocol, isServer, hostAddress, peerAddress)
        self._clock = clock
        self._tls: Any = None

    def startTLS(self, contextFactory: Any, beNormal: bool = True) -> None:
        client = (not self.isServer) if beNormal else self.isServer
        factory = TLSMemoryBIOFactory(contextFactory, client, None, clock=self._clock)
        tls_protocol = factory.protocol(factory, self.protocol, False)
        self.protocol = self._tls = tls_protocol
        self.getHandle = tls_protocol.getHandle
        self.getPeerCertificate = tls_protocol.getPeerCertificate
        alsoProvides(self, ISSLTransport)
        tls_protocol.makeConnection(_BelowTLS(self))

    def write(self, data: bytes) -> None:
        if self._tls is not None:
            self._tls.write(data)
        else:
            super().write(data)

    def writeSequence(self, data: Any) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        if self._tls is not None:
            self._tls.loseConnection()
        else:
            super().loseConnection()

    def abortConnection(self) -> None:
        if self._tls is not None:
            self._tls.abortConnection()
        else:
            super().abortConnection()


class MemoryNetwork:
    """TCP between in-memory peers on 127.0.0.1, moved by ``iosim`` pumps on one clock.

    ``listen(factory)`` gives an address; ``endpoint(port)`` connects to it
    (``IStreamClientEndpoint``); ``flush()`` moves every byte and
    disconnection until all connections are quiet.  Nothing happens between
    flushes, so a test decides exactly when bytes arrive.  A server factory
    whose ``buildProtocol`` returns None gets the connection closed at once,
    as a listening port does.
    """

    def __init__(self, clock: Any, host: str = "127.0.0.1") -> None:
        self.clock = clock
        self.host = host
        self.pumps: list[iosim.IOPump] = []
        self._listeners: dict[int, Any] = {}
        self._ports = itertools.count(40000)

    def listen(self, factory: Any) -> IPv4Address:
        """Accept connections to a new port with ``factory``; returns its address."""
        port = next(self._ports)
        self._listeners[port] = factory
        factory.doStart()
        return IPv4Address("TCP", self.host, port)

    def stop_listening(self, address: IPv4Address) -> None:
        self._listeners.pop(address.port).doStop()

    def connect(self, port: int, client: Any) -> iosim.IOPump:
        """Connect protocol ``client`` to the listener on ``port`` (bytes move on flush)."""
        server_address = IPv4Address("TCP", self.host, port)
        client_address = IPv4Address("TCP", self.host, next(self._ports))
        server = self._listeners[port].buildProtocol(client_address)
        refused = server is None
        if refused:
            server = Protocol()
        pump = iosim.connect(
            server, TLSTransport(server, True, server_address, client_address, self.clock),
            client, TLSTransport(client, False, client_address, server_address, self.clock),
            greet=False, clock=self.clock)
        if refused:
            server.transport.loseConnection()
        self.pumps.append(pump)
        return pump

    def endpoint(self, port: int) -> MemoryEndpoint:
        return MemoryEndpoint(self, port)

    def flush(self) -> None:
        """Pump every connection until nothing moves (pending ``callLater(0)`` calls run)."""
        for _ in range(10_000):
            moved = False
            for pump in list(self.pumps):
                moved = pump.pump() or moved
            self.pumps = [p for p in self.pumps
                          if not (p.clientIO.disconnected and p.serverIO.disconnected)]
            if not moved:
                return
        raise AssertionError("the connections never went quiet")

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass on the clock, then flush what that set off."""
        self.clock.advance(seconds)
        self.flush()


@implementer(IStreamClientEndpoint)
class MemoryEndpoint:
    """Connects to one port of a ``MemoryNetwork``.

    Seam: ``twisted.internet.interfaces.IStreamClientEndpoint``.
    """

    def __init__(self, network: MemoryNetwork, port: int) -> None:
        self.network = network
        self.port = port

    def connect(self, factory: Any) -> Deferred:
        protocol = factory.buildProtocol(IPv4Address("TCP", self.network.host, self.port))
        self.network.connect(self.port, protocol)
        return succeed(protocol)


@implementer(IRunner)
class HeldRunner:
    """A runner whose jobs wait until the test releases them, in order: a busy
    worker pool, or a worker's timing chosen by the test."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Deferred, object, tuple]] = []

    def run(self, fn, *args) -> Deferred:
        d: Deferred = Deferred()
        self.jobs.append((d, fn, args))
        return d

    def release(self):
        """Run the oldest job; returns its result (None if it raised: its Deferred failed)."""
        d, fn, args = self.jobs.pop(0)
        try:
            result = fn(*args)
        except Exception:
            d.errback(Failure())
            return None
        d.callback(result)
        return result

    def release_all(self) -> None:
        while self.jobs:
            self.release()


def content(size: int, seed: int = 0) -> bytes:
    """Deterministic, non-repeating-looking bytes of the given size."""
    block = hashlib.sha256(b"%d" % seed).digest() * 2048  # 64 KiB
    return (block * (size // len(block) + 1))[:size]


MTIME = (1_700_000_000, 123_456_789)
"""The mtime record_for gives a file."""


def record_for(path: str, data: bytes, mode: int = 0o640) -> FileRecord:
    return FileRecord(path=path, utime=1.0, size=len(data), mtime=MTIME, mode=mode,
                      sha256=hashlib.sha256(data).hexdigest(), vv={"a" * 32: 1})


def open_session(share: MemoryShare, clock: Clock, **options: Any):
    sync = ShareSync(share, clock)
    connection = FakeConnection(**options)
    session = SyncSession(sync, connection)
    session.start(None)
    return sync, session, connection


def deliver_file(session: SyncSession, path: str, data: bytes) -> None:
    session.event_received(wire.Message(body={"type": "file_data", "path": path},
                                        text=b"", has_payload=True))
    if data:
        session.event_received(wire.PayloadChunk(data))
    session.event_received(wire.PayloadEnd())


# --- discovery sources and transports ---------------------------------------


@implementer(IDiscoverySource)
class FakeDiscoverySource(Service):
    """An ``IDiscoverySource`` a test drives: :meth:`find` reports a candidate through
    ``found``; ``announced`` counts :meth:`announce_changed` calls."""

    def __init__(self, found: Callable[[str, Address, str | None, str], None],
                 registrations: Callable[[], list[tuple[str, str]]] | None = None,
                 source: str = "tracker", name: str | None = None) -> None:
        self.found = found
        self.registrations = registrations
        self.source = source
        self.name = name
        self.announced = 0

    def find(self, target_id: str, address: Address, peer_id: str | None = None) -> None:
        self.found(target_id, address, peer_id, self.source)

    def announce_changed(self) -> None:
        self.announced += 1


class FakeEndpoint:
    """A client endpoint whose ``connect`` never completes; it records the factories."""

    def __init__(self, address: Address) -> None:
        self.address = address
        self.factories: list[Any] = []

    def connect(self, factory: Any) -> Deferred[Any]:
        self.factories.append(factory)
        return Deferred()


@implementer(IPeerTransport)
class FakeTransport:
    """An ``IPeerTransport`` that reaches what ``reaches(address)`` says; ``dialled``
    lists the addresses it made endpoints for.  With ``refuse`` set, every
    ``endpoint_for`` fails with it."""

    def __init__(self, name: str, reaches: Callable[[Address], bool],
                 own: list[Address] | None = None, refuse: Exception | None = None) -> None:
        self.name = name
        self._reaches = reaches
        self._own = list(own or [])
        self._refuse = refuse
        self.dialled: list[Address] = []

    def can_reach(self, address: Address) -> bool:
        return self._reaches(address)

    def endpoint_for(self, address: Address) -> Deferred[Any]:
        self.dialled.append(address)
        if self._refuse is not None:
            return fail(self._refuse)
        return succeed(FakeEndpoint(address))

    def own_addresses(self) -> list[Address]:
        return list(self._own)

