"""One authenticated connection of a share: messages in, messages and files out (protocol/sync.md).

:class:`SyncSession` is thin: its life is the :class:`~clearskies.sync.states.SessionMachine`
(drawn in ``protocol/session.dot``), it dispatches each message to the part
that handles it (:class:`~clearskies.sync.metadata.MetadataExchange` for
records, :class:`~clearskies.sync.uploads.Uploads` for file requests,
:class:`~clearskies.sync.addresses.AddressExchange`, a
:class:`~clearskies.sync.gate.ReadOnlyGate` on a share with signing), and
owns the request window: at most ``window`` outstanding ``get`` requests,
one incoming payload at a time.  Everything it writes goes through one
:class:`~clearskies.transfer.sendqueue.SendQueue`, so no message lands inside a payload.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from clearskies import wire
from clearskies.errors import ProtocolError
from clearskies.interfaces import ISyncSession
from clearskies.backpressure import SharedPause
from clearskies.ratelimit import ReadThrottle
from clearskies.share.records import FileRecord, validate_wire_path
from clearskies.sync import states
from clearskies.sync.addresses import AddressExchange
from clearskies.sync.announced import AnnouncedRecords
from clearskies.sync.codespread import CodeExchange
from clearskies.sync.engine import ShareSync
from clearskies.sync.gate import ReadOnlyGate
from clearskies.sync.limits import TRACE
from clearskies.sync.metadata import MetadataExchange
from clearskies.sync.rsyncs import DeltaIntake, PayloadIntake, RsyncExchange
from clearskies.sync.thumbs import ThumbnailExchange, ThumbnailIntake
from clearskies.sync.uploads import Uploads, parse_range
from clearskies.transfer.receiver import FileReceiver
from clearskies.transfer.sendqueue import SendQueue


def _opener_key(connection: Any, our_peer_id: str, their_peer_id: str,
                we_opened: bool) -> tuple[str, int]:
    """(peer ID of the side that opened the TCP connection, its source port)."""
    transport = connection.transport
    try:
        address = transport.getHost() if we_opened else transport.getPeer()
        port = int(getattr(address, "port", 0) or 0)
    except Exception:
        port = 0
    return (our_peer_id if we_opened else their_peer_id, port)


_PAYLOAD_TYPES = frozenset({"file_data", "rsync.signature", "rsync.patch", "thumbnail.data"})
"""Message types that carry a payload (protocol/transfer.md, protocol/rsync.md,
protocol/thumbnails.md)."""


@implementer(ISyncSession)
class SyncSession:
    """One authenticated connection of a share: messages in, messages and files out."""

    _log = Logger()

    def __init__(self, sync: ShareSync, connection: Any, *, window: int | None = None) -> None:
        self.sync = sync
        self.connection = connection
        info = connection.established
        self.peer_id: str = info.their_peer_id
        self.we_initiated: bool = not info.we_are_server
        self.opener_key = _opener_key(connection, sync.share.our_peer_id, self.peer_id,
                                      self.we_initiated)
        self.window = window or sync.window
        self.machine = states.SessionMachine()
        self.remote_index = AnnouncedRecords(sync.share.lists, sync.share.share_id, self.peer_id)
        self.pending: dict[str, FileReceiver] = {}
        self.receiving: FileReceiver | PayloadIntake | ThumbnailIntake | None = None
        self.receiving_path: str | None = None  # the remote path its payload was asked for
        self.messages_sent = 0
        self.sends = SendQueue(connection.transport, sync.clock, limiter=sync.upload_limiter,
                               runner=sync.share.files_runner)
        # A rate limit, slow writes and a full merge inbox pause it.
        self.reading = SharedPause(connection.transport)
        self._read_throttle = (ReadThrottle(self.reading, sync.download_limiter, sync.clock)
                               if sync.download_limiter is not None else None)
        connection.message_writer = self._write  # keep-alives queue behind payloads too
        self.gate = (ReadOnlyGate(sync.signing, sync.clock, self, self._write, sync.share.manifest)
                     if sync.signing is not None else None)
        self.metadata = MetadataExchange(sync, self, connection, send=self._send,
                                         send_paced=self._send_paced, reading=self.reading,
                                         gate=self.gate, fail=self._fail)
        self.uploads = Uploads(sync, self, self.sends, send=self._send, fail=self._fail,
                               log_failure=self._log_failure)
        self.addresses = AddressExchange(
            self.peer_id, info.features or (), send=self._send,
            advertised=sync.advertised_addresses, received=sync.addresses_received)
        # Extension code_spread: inert until the daemon connects it to its codes.
        self.codes = CodeExchange(self.peer_id, info.features or (), info.access, sync.clock,
                                  send=self._send)
        self.rsync = RsyncExchange(sync, self, self.sends, info.features or (), send=self._send,
                                   get=self._get, fail=self._fail)
        # Extension thumbnails: answers only once the daemon connects its thumbnails.
        self.thumbs = ThumbnailExchange(self.peer_id, info.features or (), info.access,
                                        sync.clock, write=self._write)
        metadata = self.metadata
        self._handlers: dict[str, Callable[[dict, wire.Message], None]] = {
            "get_manifest": metadata.on_get_manifest,
            "manifest": metadata.on_manifest,
            "manifest_current": metadata.on_manifest_current,
            "update": metadata.on_update,
            "move": metadata.on_move,
            "read_only_manifest.manifest": metadata.on_read_only_manifest_manifest,
            "clearskies.progress": metadata.on_clearskies_progress,
            "get": self.uploads.on_get,
            "get_error": self._on_get_error,
            "file_data": self._on_file_data,
            "clearskies.addresses": self.addresses.on_clearskies_addresses,
            "code_spread.list": self.codes.on_message,
            "code_spread.update": self.codes.on_message,
            "rsync.signature": self._on_rsync_payload,
            "rsync.patch": self._on_rsync_payload,
            "thumbnail.get": self.thumbs.on_get,
            "thumbnail.data": self._on_thumbnail_data,
            "thumbnail.error": self.thumbs.on_error,
        }

    # -- what the engine and the daemon see (ISyncSession) -------------------------

    @property
    def alive(self) -> bool:
        return self.machine.state != states.CLOSED

    @property
    def access(self) -> str:
        return self.connection.established.access

    @property
    def manifest_sent_revision(self) -> int | None:
        return self.metadata.manifest_sent_revision

    @manifest_sent_revision.setter
    def manifest_sent_revision(self, revision: int | None) -> None:
        self.metadata.manifest_sent_revision = revision

    @property
    def in_sync(self) -> bool:
        return self.metadata.in_sync

    @property
    def merging(self) -> bool:
        return self.metadata.merging

    @property
    def peer_progress(self) -> dict[str, Any] | None:
        return self.metadata.peer_progress

    @property
    def peer_addresses(self) -> list[str]:
        return self.addresses.peer_addresses

    def push_changes(self, records: list[FileRecord], moves: list[tuple[str, FileRecord]],
                     revision: int, force: bool = False) -> None:
        self.metadata.push_changes(records, moves, revision, force)

    def merge_again(self, records: list[FileRecord]) -> None:
        self.metadata.merge_again(records)

    def acknowledge(self, record: FileRecord) -> None:
        self.metadata.acknowledge(record)

    def local_unacked(self, local: FileRecord | None) -> bool:
        return self.metadata.local_unacked(local)

    def send_progress(self) -> None:
        self.metadata.send_progress()

    def send_addresses(self) -> None:
        self.addresses.send_addresses()

    # -- lifecycle ---------------------------------------------------------------

    def _send(self, body: dict[str, Any]) -> None:
        self.messages_sent += 1
        if TRACE:
            self._log.debug("sending {type} to {peer}", peer=self.peer_id[:8], type=body["type"])
        self._write(self.gate.encode(body) if self.gate is not None else wire.encode(body))

    def _send_paced(self, body: dict[str, Any]) -> Deferred[None]:
        """Send one of a run of large messages (a manifest's pages); fires when the next may go."""
        self.messages_sent += 1
        if TRACE:
            self._log.debug("sending {type} to {peer}", peer=self.peer_id[:8], type=body["type"])
        try:
            return self.sends.send_paced(
                self.gate.encode(body) if self.gate is not None else wire.encode(body))
        except ProtocolError as e:
            self.connection.close(str(e))
            return succeed(None)

    def _write(self, data: bytes) -> None:
        """Every message goes through the send queue, so none lands inside a payload."""
        try:
            self.sends.send_message(data)
        except ProtocolError as e:
            self.connection.close(str(e))

    def start(self, last_revision: Any = None) -> None:
        outputs = self.machine.fire("attached" if self.sync.attach(self) else "duplicate")
        for output in outputs:
            if output == states.CLOSE_DUPLICATE:
                self.connection.close("duplicate connection with the same peer")
            elif output == states.ASK_MANIFEST:
                if self.gate is None or self.gate.requests_manifest():
                    request: dict[str, Any] = {"type": "get_manifest"}
                    if last_revision is not None:
                        request["revision"] = last_revision
                        self.metadata.asked_revision = last_revision
                    self._send(request)
            elif output == states.SEND_ADDRESSES:
                self.send_addresses()
                self.codes.start()

    def keep_over(self, newcomer: ISyncSession) -> bool:
        """Of two connections with one peer, both sides keep the same one.

        The one opened by the smaller peer ID wins; between two opened by the
        same peer, the one from the lower source port.  Both ends see the same
        (opener, port) pair, so they never each close a different connection.
        """
        return self.opener_key <= newcomer.opener_key

    def connection_lost(self, reason: Any) -> None:
        for output in self.machine.fire("connection_lost"):
            if output == states.ABORT_DOWNLOADS:
                for receiver in self.pending.values():
                    receiver.abort(keep_partial=True)
                if self.receiving is not None:
                    self.receiving.abort(keep_partial=True)
                self.pending.clear()
                self.receiving = None
                self.rsync.stop()
                self.thumbs.stop()
            elif output == states.STOP_SENDING:
                self.sends.stop()
                self.codes.stop()
                if self._read_throttle is not None:
                    self._read_throttle.stop()
                if self.gate is not None:
                    self.gate.stop()
            elif output == states.DETACH:
                self.sync.detach(self)
                self.remote_index.forget().addErrback(
                    self._log_failure, "forgetting what the peer announced")

    # -- wire events ---------------------------------------------------------------

    def event_received(self, event: wire.Event) -> None:
        problem = self.sync.share.error
        if problem:
            # An unmounted disk must not be refilled (or emptied) from the network.
            self.connection.close("share is in error: %s" % problem)
            return
        if isinstance(event, wire.PayloadChunk):
            if self.machine.fire("chunk") and self.receiving is not None:  # WRITE_CHUNK
                self.receiving.write(event.data)
                self.sync.bytes_received += len(event.data)
                if self._read_throttle is not None:
                    self._read_throttle.received(len(event.data))
            return
        if isinstance(event, wire.PayloadEnd):
            if self.machine.fire("payload_end") and self.receiving is not None:  # FINISH_FILE
                receiver, self.receiving = self.receiving, None
                self._finish(receiver)
            return
        if TRACE:
            self._log.debug("{peer} sent {type}", peer=self.peer_id[:8], type=event.type)
        if not self.machine.fire("message"):
            return  # closed: what still arrives is dropped
        handler = self._handlers.get(event.type)
        if event.has_payload and event.type not in _PAYLOAD_TYPES:
            raise ProtocolError("unexpected payload on a %r message" % event.type)
        if handler is None or (self.gate is not None and not self.gate.admits(event)):
            return
        handler(event.body, event)

    def _on_file_data(self, body: dict, event: wire.Message) -> None:
        if not event.has_payload:
            raise ProtocolError("file_data without a payload")
        path = validate_wire_path(body.get("path"))
        receiver = self.pending.pop(path, None)
        if receiver is None:
            raise ProtocolError("file_data for %r, which we did not ask for" % path)
        data_range = parse_range(body.get("range"))
        start = data_range[0] if data_range else 0
        if start != receiver.offset:
            receiver.abort(keep_partial=False)
            raise ProtocolError("file_data for %r starts at %d, we asked for %d"
                                % (path, start, receiver.offset))
        self.machine.fire("file_data")  # BEGIN_PAYLOAD
        receiver.producer = self.reading
        self.receiving = receiver
        self.receiving_path = path

    def _on_rsync_payload(self, body: dict, event: wire.Message) -> None:
        """``rsync.signature`` or ``rsync.patch`` (protocol/rsync.md): take in its payload."""
        if event.type == "rsync.signature":
            intake: PayloadIntake = self.rsync.on_signature(body, event)
        else:
            intake = self.rsync.on_patch(body, event)
        self.machine.fire("file_data")  # BEGIN_PAYLOAD
        self.receiving = intake
        self.receiving_path = None

    def _on_thumbnail_data(self, body: dict, event: wire.Message) -> None:
        """``thumbnail.data`` (protocol/thumbnails.md): take in its payload (bounded)."""
        intake = self.thumbs.on_data(body, event)
        self.machine.fire("file_data")  # BEGIN_PAYLOAD
        self.receiving = intake
        self.receiving_path = None

    def _on_get_error(self, body: dict, event: wire.Message) -> None:
        path = validate_wire_path(body.get("path"))
        receiver = self.pending.pop(path, None)
        if receiver is None:
            self.rsync.on_get_error(path, str(body.get("message", "")))
            return
        receiver.abort(keep_partial=True)
        self._log.info("{peer} cannot send {path}: {message}", peer=self.peer_id, path=path,
                       message=str(body.get("message", ""))[:200])
        self.sync.download_failed(self, receiver.expected.path, (receiver.expected, path))

    # -- requests ------------------------------------------------------------------

    def has_room(self) -> bool:
        return self.alive and self.sync.requests_of(self) < self.window

    def request(self, receiver: FileReceiver, remote_path: str) -> None:
        if remote_path in self.pending or remote_path in self.rsync.waiting:
            # Already asking this peer for that path (for another target): later.
            receiver.abort(keep_partial=True)
            self.sync.request_withdrawn(self, receiver.expected.path)
            return
        if self.rsync.wants(receiver):
            self.rsync.ask(receiver, remote_path)  # falls back to _get without an old copy
            return
        self._get(receiver, remote_path)

    def _get(self, receiver: FileReceiver, remote_path: str) -> None:
        record = receiver.expected
        self.pending[remote_path] = receiver
        message: dict[str, Any] = {"type": "get", "path": remote_path}
        if receiver.offset:
            message["range"] = [receiver.offset, (record.size or 0) - receiver.offset]
        if TRACE:
            self._log.debug("asking {peer} for {path} from byte {offset}",
                            peer=self.peer_id[:8], path=remote_path, offset=receiver.offset)
        self._send(message)

    def _finish(self, receiver: FileReceiver | PayloadIntake | ThumbnailIntake) -> None:
        if isinstance(receiver, ThumbnailIntake):
            self.thumbs.data_ended(receiver)
            return
        if not isinstance(receiver, FileReceiver):
            if isinstance(receiver, DeltaIntake):
                self.rsync.delta_ended(receiver)
            else:
                self.rsync.signature_ended(receiver)
            return
        d = self.sync.payload_received(self, receiver, asked=self.receiving_path)
        d.addErrback(self._log_failure, "finishing " + receiver.expected.path)

    # -- errors -------------------------------------------------------------------------

    def _fail(self, failure: Failure, doing: str) -> None:
        if failure.check(ProtocolError):
            self._log.warn("closing connection to {peer}: {why}", peer=self.peer_id,
                           why=failure.getErrorMessage())
            self.connection.close(failure.getErrorMessage())
            return
        self._log_failure(failure, doing)

    def _log_failure(self, failure: Failure, doing: str) -> None:
        self._log.failure("error while {doing} with {peer}", failure, doing=doing,
                          peer=self.peer_id)
