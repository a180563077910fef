"""One connection at level ``untrusted``, as both of its sides use it.

:class:`Channel` owns what the connection writes: messages wait while a
blob's payload is being written (so a keep-alive never lands inside it), and
a blob is streamed a piece at a time as the transport asks for more (a push
producer).  :class:`SerialWriter` runs one file's blocking writes in order
and pauses the connection while they fall behind.  :class:`SealedSession`
and :class:`HeldShare` are what both sides' sessions, and the untrusted
side's per-share keepers, start from.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Awaitable, Callable, Coroutine

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from zope.interface import implementer
from twisted.internet.interfaces import IPushProducer

from clearskies import wire
from clearskies.interfaces import IRunner

PIECE = 1 << 20
"""Bytes of blob read and sent at a time."""
MAX_PENDING_WRITES = 8
"""Received pieces waiting for the disk before the connection is paused."""

_log = Logger()


def spawn(work: Coroutine[Any, Any, Any], what: str) -> Deferred[Any]:
    """Run ``work`` from the reactor; a failure is logged as ``what`` failing."""
    d = Deferred.fromCoroutine(work)
    d.addErrback(lambda f: _log.failure("{what} failed", f, what=what))
    return d


@implementer(IPushProducer)
class Channel:
    """What one connection writes: messages, signed lines and streamed blobs."""

    _log = Logger()

    def __init__(self, connection: Any) -> None:
        self.connection = connection
        self._waiting: deque[bytes] = deque()
        self._streaming = False
        self._paused = False
        self._resumed: Deferred[None] | None = None
        self._streams: deque[Callable[[], Awaitable[None]]] = deque()
        self.closed = False
        connection.message_writer = self._write_message

    # -- messages ---------------------------------------------------------------------

    def _write_message(self, data: bytes) -> None:
        if self._streaming:
            self._waiting.append(data)
        else:
            self.connection.send_bytes(data)

    def send(self, body: dict[str, Any]) -> None:
        self.connection.send_message(body)

    def send_encoded(self, data: bytes) -> None:
        """Pre-encoded lines (a signed message) with the same ordering as messages."""
        self._write_message(data)

    # -- blobs ------------------------------------------------------------------------

    def stream(self, body: dict[str, Any], size: int,
               read: Callable[[int, int], Deferred[bytes]]) -> None:
        """Send ``body`` with a payload of ``size`` bytes got by ``read(offset, length)``,
        after any stream already under way."""
        self._streams.append(lambda: self._stream(body, size, read))
        if len(self._streams) == 1 and not self._streaming:
            spawn(self._run_streams(), "sending blobs")

    async def _run_streams(self) -> None:
        while self._streams and not self.closed:
            start = self._streams[0]
            try:
                await start()
            except Exception as e:  # a file that vanished or changed: the stream is cut
                self._log.warn("sending a blob failed: {why}", why=e)
                self.connection.close("could not send a blob: %s" % (e,))
                self.closed = True
            self._streams.popleft()
        self._streams.clear()

    async def _stream(self, body: dict[str, Any], size: int,
                      read: Callable[[int, int], Deferred[bytes]]) -> None:
        self._streaming = True
        transport = self.connection.transport
        transport.registerProducer(self, True)
        # The next piece is read (and sealed) while this one is written: the reads
        # stay in order, one at a time, and the disk or cipher overlaps the network.
        ahead: Deferred[bytes] | None = read(0, min(PIECE, size)) if size else None
        try:
            self.connection.send_bytes(wire.encode_payload_start(body))
            offset = 0
            while ahead is not None and not self.closed:
                want = min(PIECE, size - offset)
                piece = await ahead
                ahead = None
                if len(piece) != want:
                    raise ValueError("the blob is shorter than announced")
                offset += len(piece)
                if offset < size:
                    ahead = read(offset, min(PIECE, size - offset))
                self.connection.send_bytes(wire.encode_chunk(piece))
                while self._paused and not self.closed:
                    self._resumed = Deferred()
                    await self._resumed
            if not self.closed:
                self.connection.send_bytes(wire.PAYLOAD_END)
        finally:
            if ahead is not None:
                ahead.addErrback(lambda _: None)  # abandoned: its outcome no longer matters
            self._streaming = False
            try:
                transport.unregisterProducer()
            except Exception:  # the transport already went away
                pass
            while self._waiting and not self.closed:
                self.connection.send_bytes(self._waiting.popleft())

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        resumed, self._resumed = self._resumed, None
        if resumed is not None:
            resumed.callback(None)

    def stopProducing(self) -> None:
        self.lost()

    def lost(self) -> None:
        self.closed = True
        self.resumeProducing()


class SerialWriter:
    """Blocking writes of one received file, one after the other off the reactor.

    ``first`` opens the file (in the runner); ``write(data)`` queues a piece;
    ``close(then)`` runs ``then(handle)`` after the last write.  Any failure
    is kept in ``error`` and makes later steps no-ops.
    """

    def __init__(self, runner: IRunner, connection: Any, first: Callable[[], Any]) -> None:
        self._runner = runner
        self._connection = connection
        self._pending = 0
        self._paused = False
        self.handle: Any = None
        self.error: BaseException | None = None
        self._buffer = bytearray()
        self._tail: Deferred[Any] = self._step(lambda: self._open(first))

    def _open(self, first: Callable[[], Any]) -> Deferred[Any]:
        def opened(handle: Any) -> None:
            self.handle = handle
        return self._runner.run(first).addCallback(opened)

    def _step(self, action: Callable[[], Deferred[Any]]) -> Deferred[Any]:
        def run(_: Any) -> Any:
            if self.error is not None:
                return None
            return action()

        def failed(failure: Any) -> None:
            if self.error is None:
                self.error = failure.value

        tail = getattr(self, "_tail", succeed(None))
        self._tail = tail.addCallback(run).addErrback(failed)
        return self._tail

    def write(self, data: bytes) -> None:
        """Queue ``data``; written in pieces of about :data:`PIECE` (a payload arrives in
        TLS-record-sized chunks: a thread hop for each would cost more than the write)."""
        self._buffer += data
        if len(self._buffer) >= PIECE:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        data, self._buffer = bytes(self._buffer), bytearray()
        self._pending += 1
        if self._pending > MAX_PENDING_WRITES and not self._paused:
            self._paused = True
            self._connection.transport.pauseProducing()

        def wrote(_: Any) -> None:
            self._pending -= 1
            if self._paused and self._pending <= MAX_PENDING_WRITES // 2:
                self._paused = False
                self._connection.transport.resumeProducing()

        self._step(lambda: self._runner.run(self.handle.write, data)).addBoth(wrote)

    def close(self, then: Callable[[Any], Any]) -> Deferred[Any]:
        """Run ``then(handle)`` in the runner after every write; its result, or the error."""
        result: Deferred[Any] = Deferred()
        self._flush()

        def finish(_: Any) -> Any:
            if self.error is not None:
                self._discard()
                result.errback(self.error)
                return None
            d = self._runner.run(then, self.handle)
            d.chainDeferred(result)
            return None

        self._tail.addCallback(finish)
        if self._paused:
            self._paused = False
            self._connection.transport.resumeProducing()
        return result

    def abort(self) -> None:
        self.error = self.error or RuntimeError("aborted")
        self._tail.addCallback(lambda _: self._discard())
        if self._paused:
            self._paused = False
            self._connection.transport.resumeProducing()

    def _discard(self) -> None:
        if self.handle is not None:
            self._runner.run(self.handle.discard)


class SealedSession:
    """What a session of either side holds: its connection, its peer, its channel."""

    def __init__(self, connection: Any, peer_id: str) -> None:
        self.connection = connection
        self.peer_id = peer_id
        self.channel = Channel(connection)
        self.alive = True


class HeldShare:
    """What the untrusted side keeps per share starts from: the share, its folder,
    the public keys that sign for it, where its blocking work runs, and a clock."""

    def __init__(self, share_id: str, root: str, public_keys: dict[str, bytes],
                 runner: IRunner, clock: Any) -> None:
        self.share_id = share_id
        self.root = root
        self.public_keys = public_keys
        self.runner = runner
        self.clock = clock
