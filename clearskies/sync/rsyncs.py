"""The ``rsync`` extension on one connection (protocol/rsync.md): deltas instead of whole files.

Both roles of one session:

- **asking**: instead of ``get``, a download of a file we hold an older
  copy of (same path, at least :data:`MIN_RSYNC_SIZE` bytes) sends
  ``!{"type":"rsync.signature","path":…}`` with the old copy's signature;
  the ``rsync.patch`` answer's delta is applied to the old copy as it
  arrives, into the download's temporary file, and the result checked
  against the record's SHA-256 (:mod:`clearskies.transfer.deltas`); the
  download then ends like any other.  Whatever goes wrong (``get_error``, a bad or oversize delta,
  a mismatch) falls back to a plain ``get``; the old copy is only read.
- **answering**: a peer's signature is taken as it arrives (at most
  :data:`clearskies.rdiff.MAX_SIGNATURE_BYTES`), and the delta of our file
  against it is made a piece at a time while the connection takes it.

The CPU work (signatures, deltas, patches) runs in the share's files
runner, never on the reactor thread.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from clearskies import diskjobs, rdiff, wire
from clearskies.errors import ProtocolError
from clearskies.interfaces import ISyncSession
from clearskies.share.records import validate_wire_path
from clearskies.sync.engine import ShareSync
from clearskies.rdiffblocks import BlockDeltaReader
from clearskies.transfer.deltas import DeltaApplier, open_block_delta, open_delta, open_signature
from clearskies.transfer.receiver import FileReceiver
from clearskies.transfer.refusals import describe_os_error, get_error_message
from clearskies.transfer.sendqueue import SendQueue, SendResult
from clearskies.transfer.states import NEW, WRITING

FEATURE = "rsync"
"""The feature string of the extension (protocol/handshake.md, protocol/rsync.md)."""

MIN_RSYNC_SIZE = 1024 * 1024
"""Smallest file asked for by delta.  Measured: for 1 MiB, signing, making the
delta and patching take about 20 ms of CPU, what sending the whole file takes
on a gigabit network; below that a delta rarely pays."""

MAX_HELD_SIGNATURE_BYTES = 64 * 1024 * 1024
"""Most signature bytes one connection may have us hold (received, their delta
not yet sent); a peer sending more is breaking the protocol."""

BAD_SIGNATURE = "bad rsync signature"
"""The start of the ``get_error`` message answering a signature we cannot use."""


class SignatureIntake:
    """A peer's signature arriving for ``path`` (we answer with a delta)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.loader: rdiff.SignatureLoader | None = rdiff.SignatureLoader()
        self.received = 0
        self.error: str | None = None
        #: The bytes as they came (a second copy is loaded for a delta made in two halves).
        self.chunks: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.received += len(data)
        if self.received > rdiff.MAX_SIGNATURE_BYTES:
            raise ProtocolError("rsync.signature for %r is larger than %d bytes"
                                % (self.path, rdiff.MAX_SIGNATURE_BYTES))
        if self.loader is None:
            return
        self.chunks.append(bytes(data))
        try:
            self.loader.feed(data)
        except rdiff.RdiffError as e:
            self.error = str(e)
            self.loader.close()
            self.loader = None

    def abort(self, keep_partial: bool) -> None:
        self.chunks = []
        if self.loader is not None:
            self.loader.close()
            self.loader = None


class DeltaIntake:
    """The delta arriving for one of our downloads (``remote_path`` as asked)."""

    def __init__(self, receiver: FileReceiver, remote_path: str,
                 applier: DeltaApplier) -> None:
        self.receiver = receiver
        self.remote_path = remote_path
        self.applier = applier

    def write(self, data: bytes) -> None:
        self.applier.write(data)

    def abort(self, keep_partial: bool) -> None:
        self.applier.discard()
        self.receiver.abort(keep_partial=False)


PayloadIntake = SignatureIntake | DeltaIntake


class RsyncExchange:
    """One connection's ``rsync`` requests and answers."""

    _log = Logger()

    def __init__(self, sync: ShareSync, session: ISyncSession, sends: SendQueue,
                 features: tuple[str, ...] | list[str], *,
                 send: Callable[[dict[str, Any]], None],
                 get: Callable[[FileReceiver, str], None],
                 fail: Callable[[Failure, str], None]) -> None:
        self.sync = sync
        self.share = sync.share
        self.session = session
        self.sends = sends
        self._send = send
        self._get = get
        self._fail = fail
        #: Negotiated, and librsync is here.
        self.enabled = rdiff.AVAILABLE and FEATURE in features
        #: Downloads asked for by signature whose ``rsync.patch`` has not come yet.
        self.waiting: dict[str, FileReceiver] = {}
        self._asked_at: dict[str, float] = {}  # when each delta was asked for (for the log)
        self._held = 0
        #: Downloads that arrived as deltas, and those that fell back to ``get``.
        self.patched = 0
        self.fell_back = 0

    # -- asking ---------------------------------------------------------------------

    def wants(self, receiver: FileReceiver) -> bool:
        """Whether to ask for this download by delta (an old copy is looked for next)."""
        size = receiver.expected.size or 0
        return (self.enabled and receiver.offset == 0 and size >= MIN_RSYNC_SIZE
                and receiver.state == NEW)

    def ask(self, receiver: FileReceiver, remote_path: str) -> None:
        """Sign our old copy in a worker and send the signature; else a plain ``get``."""
        self.waiting[remote_path] = receiver
        self._asked_at[remote_path] = self.sync.clock.seconds()
        d = Deferred.fromCoroutine(self._open_signature(receiver))

        def opened(reader: rdiff.SignatureReader | rdiff.SplitSignatureReader) -> None:
            if not self.session.alive or self.waiting.get(remote_path) is not receiver:
                self.share.files_runner.run(reader.close)
                return
            if isinstance(reader, rdiff.SplitSignatureReader):
                self.share.files_runner.run(reader.make_second)  # beside the first half
            try:
                self.sends.send_stream(remote_path,
                                       {"type": "rsync.signature", "path": remote_path},
                                       lambda: reader, on_sent=self._sent_bytes
                                       ).addCallback(self._signature_sent, remote_path)
            except ProtocolError:
                self.share.files_runner.run(reader.close)
                self._fall_back(remote_path, receiver, "", quiet=True)

        def no_old_copy(failure: Failure) -> None:
            if not failure.check(OSError, rdiff.RdiffError):
                self._log.failure("signing the old copy of {path} failed", failure,
                                  path=receiver.expected.path)
            self._fall_back(remote_path, receiver, "", quiet=True)

        d.addCallbacks(opened, no_old_copy)

    async def _open_signature(self, receiver: FileReceiver) -> Any:
        """Our old copy's signature: made ahead if the cache has it for exactly this file."""
        cache = getattr(self.share, "signatures", None)
        cached = None
        if cache is not None:
            path = receiver.expected.path
            ours = (await self.share.get_records([path])).get(path)
            sha256 = ours.sha256 if ours is not None and not ours.deleted else None
            if sha256:
                share_id = self.share.share_id
                running = cache.being_made(share_id, path)
                if running is not None:  # sooner than signing it a second time
                    await running
                cached = lambda fd: cache.open(share_id, path, fd, sha256)  # noqa: E731
        return await self.share.files_runner.run(open_signature, receiver.local_path,
                                                 MIN_RSYNC_SIZE, cached)

    def _signature_sent(self, result: SendResult, remote_path: str) -> None:
        if result.sent:
            self._log.info("sent the signature of {path} to {peer}: {size} bytes in {seconds} s",
                           path=remote_path, peer=self.session.peer_id[:8], size=result.size,
                           seconds=self._since(remote_path))

    def _since(self, remote_path: str) -> str:
        started = self._asked_at.get(remote_path)
        return "%.2f" % (self.sync.clock.seconds() - started) if started is not None else "?"

    def _fall_back(self, remote_path: str, receiver: FileReceiver, why: str,
                   quiet: bool = False) -> None:
        """Ask for the whole file after all (if it is still ours to ask for)."""
        if self.waiting.get(remote_path) is receiver:
            del self.waiting[remote_path]
        self._asked_at.pop(remote_path, None)
        if not quiet:
            self.fell_back += 1
            self._log.warn("delta of {path} from {peer} refused: {why}; fetching it whole",
                           path=receiver.expected.path, peer=self.session.peer_id, why=why)
        if not self.session.alive:
            if receiver.state in (NEW, WRITING):
                receiver.abort(keep_partial=False)
            return
        self._get(receiver, remote_path)

    def on_get_error(self, path: str, message: str) -> bool:
        """A ``get_error`` answering one of our signatures: fetch whole.  False if not ours."""
        receiver = self.waiting.get(path)
        if receiver is None:
            return False
        self._fall_back(path, receiver, "the peer answered: %s" % message[:200])
        return True

    def on_patch(self, body: dict, event: wire.Message) -> DeltaIntake:
        """``rsync.patch``: where its payload goes."""
        if not event.has_payload:
            raise ProtocolError("rsync.patch without a payload")
        path = validate_wire_path(body.get("path"))
        receiver = self.waiting.pop(path, None)
        if receiver is None:
            raise ProtocolError("rsync.patch for %r, which we did not ask for" % path)
        applier = DeltaApplier(receiver.local_path, receiver.temp_path,
                               receiver.expected.size or 0, receiver.expected.sha256 or "",
                               runner=self.share.files_runner, producer=self.session.reading)
        try:
            diskjobs.check_inside(self.share.root, receiver.temp_path, resolve=True)
        except OSError as e:
            applier.error = e  # the payload is read and dropped, then the file fetched whole
        return DeltaIntake(receiver, path, applier)

    def delta_ended(self, intake: DeltaIntake) -> None:
        """The delta is all here: apply it in a worker, then finish the download."""
        Deferred.fromCoroutine(self._apply(intake)).addErrback(
            self._fail, "applying the delta of " + intake.receiver.expected.path)

    async def _apply(self, intake: DeltaIntake) -> None:
        receiver, applier = intake.receiver, intake.applier
        try:
            await applier.drained()
            if applier.error is not None:
                raise applier.error
            await receiver.fill_with(applier.complete)
        except (OSError, rdiff.RdiffError) as e:
            # Both files closed and the partial result gone before a get may write there.
            await applier.discard()
            self._fall_back(intake.remote_path, receiver, str(e) or type(e).__name__)
            return
        self.patched += 1
        self._log.info("{path} from {peer} came as a delta: {delta} bytes for {size} in {seconds} s",
                       path=receiver.expected.path, peer=self.session.peer_id[:8],
                       delta=applier.received, size=receiver.expected.size,
                       seconds=self._since(intake.remote_path))
        self._asked_at.pop(intake.remote_path, None)
        await self.sync.payload_received(self.session, receiver, asked=intake.remote_path)

    # -- answering ------------------------------------------------------------------

    def on_signature(self, body: dict, event: wire.Message) -> SignatureIntake:
        """``rsync.signature``: where its payload goes."""
        if not self.enabled:
            raise ProtocolError("rsync.signature, but rsync was not negotiated")
        if not event.has_payload:
            raise ProtocolError("rsync.signature without a payload")
        path = validate_wire_path(body.get("path"))
        if self._held >= MAX_HELD_SIGNATURE_BYTES:
            raise ProtocolError("more than %d bytes of rsync signatures waiting"
                                % MAX_HELD_SIGNATURE_BYTES)
        return SignatureIntake(path)

    def signature_ended(self, intake: SignatureIntake) -> None:
        Deferred.fromCoroutine(self._answer(intake)).addErrback(
            self._fail, "answering the signature of " + intake.path)

    async def _answer(self, intake: SignatureIntake) -> None:
        path, loader, chunks = intake.path, intake.loader, intake.chunks
        intake.loader, intake.chunks = None, []
        if loader is None:
            self._refuse_signature(path, intake.error or "unreadable")
            return
        self._held += intake.received
        done = None
        try:
            try:
                signature = await self.share.files_runner.run(loader.finish)
            except rdiff.RdiffError as e:
                self._refuse_signature(path, str(e))
                return
            records = await self.share.get_records([path])
            record = records.get(path)
            if not self.session.alive:
                signature.close()
                return
            if (record is None or record.deleted or record.is_dir or record.size is None
                    or self.share.is_ignored(path) or self.sync.paused):
                signature.close()
                self._send(get_error_message(
                    path, "paused" if self.sync.paused else "no such file in this share"))
                return
            local = self.share.local_path(path)
            size = record.size
            runner = self.share.files_runner
            reader: Any = await self._block_delta(path, local, size, chunks)
            if reader is not None:  # from block checksums: librsync is not needed
                signature.close()
            else:
                second = None
                if size >= rdiff.SPLIT_DELTA:  # two threads at once, each with its own copy
                    try:
                        second = await runner.run(rdiff.load_signature, b"".join(chunks))
                    except rdiff.RdiffError:
                        second = None  # then by one
                try:
                    reader = await runner.run(open_delta, local, size, signature, second)
                except OSError as e:
                    self._send(get_error_message(path, describe_os_error(e)))
                    return
            del chunks
            if not self.session.alive:
                runner.run(reader.close)
                return
            if isinstance(reader, rdiff.SplitDeltaReader):
                runner.run(reader.make_second)  # beside the first half
            try:
                done = self.sends.send_stream(path, {"type": "rsync.patch", "path": path},
                                              lambda: reader, on_sent=self._sent_bytes)
            except BaseException:
                runner.run(reader.close)
                raise
        finally:
            if done is None:  # answered otherwise, or failed: nothing held for it now
                self._held -= intake.received
        done.addBoth(self._delta_sent, intake.received, path, self.sync.clock.seconds(),
                     record, isinstance(reader, BlockDeltaReader))

    async def _block_delta(self, path: str, local: Any, size: int,
                           chunks: list[bytes]) -> BlockDeltaReader | None:
        """The delta from block checksums, if the peer's signature is one we made of a
        version of this file (clearskies.rdiffblocks) and few blocks changed; else None."""
        cache = getattr(self.share, "signatures", None)
        if cache is None or not chunks:
            return None
        share_id = self.share.share_id

        def find() -> BlockDeltaReader | None:
            digest = hashlib.sha256(b"".join(chunks)).hexdigest()
            return open_block_delta(local, size, cache.previous(share_id, path, digest))
        try:
            return await self.share.files_runner.run(find)
        except (OSError, rdiff.RdiffError):
            return None  # librsync's delta then (an OSError again is answered there)

    def _delta_sent(self, result: SendResult | Failure, held: int, path: str,
                    started: float, record: Any = None, from_blocks: bool = False) -> None:
        self._held -= held
        if isinstance(result, SendResult) and result.sent:
            cache = getattr(self.share, "signatures", None)
            if cache is not None and record is not None and record.sha256:
                # The peer now holds this version: sign it ahead for its next change.
                cache.sent(self.share.share_id, path, self.share.local_path(path),
                           record.sha256, record.size or 0)
            self._log.info("sent a delta of {path} to {peer}: {size} bytes in {seconds} s{how}",
                           path=path, peer=self.session.peer_id[:8], size=result.size,
                           seconds="%.2f" % (self.sync.clock.seconds() - started),
                           how=" (from block checksums)" if from_blocks else "")

    def _refuse_signature(self, path: str, why: str) -> None:
        self._log.warn("refused the rsync signature {peer} sent for {path}: {why}",
                       peer=self.session.peer_id, path=path, why=why)
        self._send(get_error_message(path, "%s: %s" % (BAD_SIGNATURE, why[:200])))

    def _sent_bytes(self, count: int) -> None:
        self.sync.bytes_sent += count

    # -- the connection is gone -----------------------------------------------------

    def stop(self) -> None:
        waiting, self.waiting = self.waiting, {}
        for receiver in waiting.values():
            if receiver.state in (NEW, WRITING):
                receiver.abort(keep_partial=False)


__all__ = ["FEATURE", "MIN_RSYNC_SIZE", "MAX_HELD_SIGNATURE_BYTES", "BAD_SIGNATURE", "SignatureIntake", "DeltaIntake",
           "PayloadIntake", "RsyncExchange"]
