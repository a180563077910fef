"""One connection's side of a read-only share's rules (protocol/readonly.md).

:class:`ReadOnlyGate` stands between a session and the share's
:class:`~clearskies.sync.readonly.ShareSigning`: it signs what the session
sends when the peer is less trusted, admits or drops what arrives, and
sends what the signing face returns for relaying, including the delayed
announcement of a fuller bitmask.  The signing face itself never writes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from clearskies import wire
from clearskies.share.records import FileRecord
from clearskies.sync.readonly import RESEND_DELAY, ShareSigning
from clearskies.sync.signed import SIGNED_TYPES


class ReadOnlyGate:
    """Signing, admitting and relaying for one connection of a share that has signing."""

    _log = Logger()

    def __init__(self, signing: ShareSigning, clock: IReactorTime, session: Any,
                 write: Callable[[bytes], None],
                 manifest: Callable[[], Deferred[tuple[int, list[FileRecord]]]]) -> None:
        """``session`` names the connection (``peer_id``, ``alive``, ``connection``);
        ``write`` sends wire bytes on it; ``manifest`` reads our records."""
        self.signing = signing
        self.clock = clock
        self.session = session
        self._write = write
        self._manifest = manifest
        self._announce_call: Any = None

    @property
    def access(self) -> str:
        """The peer's access level on this connection."""
        return self.session.connection.established.access

    @property
    def relaying(self) -> bool:
        """A read-only share passes on only the signed messages it holds."""
        return self.signing.read_only

    def requests_manifest(self) -> bool:
        """Whether to ask this peer for its manifest at all."""
        return self.signing.requests_manifest_from(self.access)

    def encode(self, body: dict[str, Any]) -> bytes:
        """The wire bytes of a message we send: signed when the peer needs the proof."""
        if body["type"] in SIGNED_TYPES and self.signing.signs_for(self.access):
            return self.signing.encode(body)
        return wire.encode(body)

    def admits(self, event: wire.Message) -> bool:
        """Whether received metadata may be merged (signed messages are kept for relaying)."""
        if event.type not in SIGNED_TYPES:
            return True
        return self.signing.admit(self.session, event, self.access)

    def read_only_manifest(self, body: dict) -> list[FileRecord]:
        """The records a ``read_only_manifest.manifest`` proves the peer holds."""
        return self.signing.admit_read_only_manifest(self.session, body, self.access)

    def serve(self, local: list[FileRecord], revision: int) -> None:
        """Answer ``get_manifest`` from the signed store."""
        for data in self.signing.serve(self.session, local, revision):
            self._write(data)

    def relay(self, records: list[FileRecord]) -> None:
        """We now hold ``records``: pass on what states them; announce held files soon."""
        relayed = self.signing.relay(self.session, records)
        for data in relayed.messages:
            self._write(data)
        if relayed.announce_held and self._announce_call is None:
            self._announce_call = self.clock.callLater(RESEND_DELAY, self._announce)

    def stop(self) -> None:
        if self._announce_call is not None and self._announce_call.active():
            self._announce_call.cancel()
        self._announce_call = None

    def _announce(self) -> None:
        self._announce_call = None
        if not self.session.alive:
            return

        def send(result: tuple[int, list[FileRecord]]) -> None:
            if self.session.alive:
                revision, local = result
                for data in self.signing.announce_held(self.session, local, revision):
                    self._write(data)

        self._manifest().addCallback(send).addErrback(
            lambda f: self._log.failure("announcing held files failed", f))
