"""The transport a peer connection's session writes to once it is compressed.

After the switch to TLS on a connection that negotiated ``gzip``
(``protocol/gzip.md``), :class:`~clearskies.peer.PeerProtocol` puts a
:class:`CompressedTransport` in front of its TLS transport: every write
becomes frames of :class:`~clearskies.compression.FrameEncoder`, and pausing
it also stops the connection from inflating what already arrived (so a
download that pauses the connection is not handed a whole compressed
megabyte's worth of inflated data).  Everything else is passed through.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet.interfaces import IConsumer, IPushProducer, ITransport
from zope.interface import implementer

from clearskies.compression import FrameEncoder

__all__ = ["CompressedTransport"]


@implementer(ITransport, IConsumer, IPushProducer)
class CompressedTransport:
    """Compresses what is written and gates inflation by the read pause."""

    def __init__(self, transport: Any, encoder: FrameEncoder,
                 resumed: Callable[[], None]) -> None:
        self.wrapped = transport
        self.encoder = encoder
        self._resumed = resumed
        self.reading_paused = False
        """True while a user of the connection paused reading."""

    # ITransport / IConsumer

    def write(self, data: bytes) -> None:
        self.wrapped.write(self.encoder.encode(data))

    def writeSequence(self, data: Iterable[bytes]) -> None:
        self.wrapped.write(self.encoder.encode_many(list(data)))

    def loseConnection(self) -> None:
        self.wrapped.loseConnection()

    def abortConnection(self) -> None:
        self.wrapped.abortConnection()

    def getPeer(self) -> Any:
        return self.wrapped.getPeer()

    def getHost(self) -> Any:
        return self.wrapped.getHost()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
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
