"""The transport a peer connection's session writes to once it is compressed.

After the switch to TLS on a connection that negotiated ``gzip``
(``protocol/gzip.md``), :class:`~clearskies.peer.PeerProtocol` puts a
:class:`CompressedTransport` in front of its TLS transport: every write
becomes frames of :class:`~clearskies.compression.FrameEncoder`, and pausing
it also stops the connection from inflating what already arrived (so a
download that pauses the connection is not handed a whole compressed
megabyte's worth of inflated data).  Whether bulk writes are compressed at
all is up to a :class:`~clearskies.compression.SendPolicy`, which sees every
write and every time the connection pushes back on its producer.  Everything
else is passed through.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet.interfaces import IConsumer, IPushProducer, ITransport
from zope.interface import implementer

from clearskies.compression import FrameEncoder, SendPolicy
from clearskies.ratelimit import RateLimiter

__all__ = ["CompressedTransport"]


def _chunk_length(data: bytes) -> int | None:
    """The length ``data`` announces if it is a payload chunk's header (protocol/wire.md)."""
    if 2 <= len(data) <= 10 and data[-1:] == b"\n" and data[:-1].isdigit():
        return int(data[:-1])
    return None


@implementer(IPushProducer)
class _Watched:
    """A producer registered through the compressed transport: its pauses tell the policy."""

    def __init__(self, producer: Any, policy: SendPolicy) -> None:
        self.producer = producer
        self._policy = policy

    def pauseProducing(self) -> None:
        self._policy.pushed_back()
        self.producer.pauseProducing()

    def resumeProducing(self) -> None:
        self.producer.resumeProducing()

    def stopProducing(self) -> None:
        self.producer.stopProducing()


@implementer(ITransport, IConsumer, IPushProducer)
class CompressedTransport:
    """Compresses what is written and gates inflation by the read pause."""

    def __init__(self, transport: Any, encoder: FrameEncoder,
                 resumed: Callable[[], None], policy: SendPolicy | None = None) -> None:
        self.wrapped = transport
        self.encoder = encoder
        self.policy = policy
        """Decides whether bulk writes are compressed; None: always (after a sample)."""
        self.limiter: RateLimiter | None = None
        self._chunk: int | None = None  # the length the last write announced as a chunk header
        self._resumed = resumed
        self.reading_paused = False
        """True while a user of the connection paused reading."""

    def describe(self) -> str:
        """How much went stored, and the rates the policy measured (for the log)."""
        rates = self.policy.rates if self.policy is not None else {}
        return "%d stored; bytes/s measured compressing %s, stored %s" % (
            self.encoder.bytes_stored, *("-" if rates.get(mode) is None else "%.0f" % rates[mode]
                                         for mode in (True, False)))

    def count_wire_bytes(self, limiter: RateLimiter) -> None:
        """Make ``limiter`` (the upload limit, charged with payload bytes by the file
        senders) count what their payload chunks take on the wire instead.

        While the limit is in force, bulk writes are compressed (after a sample)
        whatever the policy measured: the limiter, not the link, paces the
        sender, and every byte compression saves lets more payload through."""
        self.limiter = limiter

    # ITransport / IConsumer

    def write(self, data: bytes) -> None:
        limited = self.limiter is not None and self.limiter.limited
        frames = self.encoder.encode(data, store=self._store(len(data), limited))
        if limited and self._chunk == len(data):
            # The chunk's sender charges len(data): make that what went on the wire.
            assert self.limiter is not None
            self.limiter.consume(len(frames) - len(data))
        self._chunk = _chunk_length(data)
        self.wrapped.write(frames)

    def writeSequence(self, data: Iterable[bytes]) -> None:
        writes = list(data)
        limited = self.limiter is not None and self.limiter.limited
        store = self._store(sum(len(w) for w in writes), limited)
        self._chunk = None
        self.wrapped.write(self.encoder.encode_many(writes, store=store))

    def _store(self, count: int, limited: bool) -> bool:
        if self.policy is None or limited:
            return False
        self.policy.wrote(count)
        return not self.policy.compressing

    def loseConnection(self) -> None:
        self.wrapped.loseConnection()

    def abortConnection(self) -> None:
        self.wrapped.abortConnection()

    def getPeer(self) -> Any:
        return self.wrapped.getPeer()

    def getHost(self) -> Any:
        return self.wrapped.getHost()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        if self.policy is not None and streaming:
            producer = _Watched(producer, self.policy)
        self.wrapped.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self.wrapped.unregisterProducer()

    # IPushProducer: reading from the peer

    def pauseProducing(self) -> None:
        self.reading_paused = True
        self.wrapped.pauseProducing()

    def resumeProducing(self) -> None:
        self.reading_paused = False
        self.wrapped.resumeProducing()
        self._resumed()

    def stopProducing(self) -> None:
        self.wrapped.stopProducing()
