"""The untrusted side: keeping blobs and the signed manifest, serving them, answering
challenges (``protocol/untrusted.md``, sections 5 and 6).

:class:`Keeper` is one untrusted share: the manifest it holds and the one it
is fetching the blobs of.  :class:`KeeperSession` is one connection of it,
with a trusted peer or another untrusted peer.  An untrusted peer can read
nothing it keeps; it checks only what it can: signatures with the public
keys, and each blob's size and SHA-256 against a verified manifest, before
keeping it.
"""

from __future__ import annotations

import secrets
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from clearskies import keys as keymod
from clearskies import wire
from clearskies.errors import ProtocolError
from clearskies.interfaces import IRunner
from clearskies.sync.sealed import vault
from clearskies.sync.sealed.channel import HeldShare, SealedSession, SerialWriter, spawn
from clearskies.sync.sealed.escrowing import EscrowBox
from clearskies.sync.sealed.messages import check_data, check_get, check_hex
from clearskies.untrusted.manifest import BlobEntry, SignedManifest, read_manifest
from clearskies.untrusted.sealing import SealError

CHALLENGES_PER_HOUR = 8
"""Challenges answered per peer per hour; more get ``verify_busy``."""


class Keeper(HeldShare):
    """One untrusted share's held manifest, and the newer one whose blobs are coming."""

    _log = Logger()

    def __init__(self, share_id: str, root: str, public_keys: dict[str, bytes],
                 runner: IRunner, clock: Any) -> None:
        super().__init__(share_id, root, public_keys, runner, clock)
        self.held: SignedManifest | None = None
        self.pending: SignedManifest | None = None
        self._pending_from: KeeperSession | None = None
        self._missing: dict[str, BlobEntry] = {}
        self.sessions: list[KeeperSession] = []
        self.busy = False  # a challenge is being answered
        self.challenges: dict[str, list[float]] = {}  # peer ID -> when it challenged (an hour)
        self._loaded: Deferred[None] | None = None
        # Code escrow (protocol/untrusted.md, section 8).
        self.escrow = EscrowBox(share_id, root, public_keys, runner, clock)

    def loaded(self) -> Deferred[None]:
        """Fires once the held manifest was read (and checked) from disk."""
        if self._loaded is None:
            self._loaded = spawn(self._load(), "reading the kept untrusted manifest")
        waiter: Deferred[None] = Deferred()

        def done(result: Any) -> Any:
            waiter.callback(None)
            return result
        self._loaded.addBoth(done)
        return waiter

    async def _load(self) -> None:
        await self.escrow.load()
        try:
            found = await self.runner.run(vault.load_manifest, self.root)
        except OSError as e:
            self._log.warn("cannot read the untrusted manifest kept in {root}: {why}",
                           root=self.root, why=e)
            return
        if found is None:
            return
        try:
            self.held = self.verify(*found)
        except SealError as e:
            self._log.warn("the untrusted manifest kept in {root} is not valid: {why}",
                           root=self.root, why=e)

    def verify(self, text: bytes, signature: bytes) -> SignedManifest:
        return read_manifest(text, signature, self.share_id, self.public_keys["read_write"])

    @property
    def revision(self) -> int:
        return self.held.revision if self.held is not None else 0

    def entry(self, file_id: str, sha256: str) -> BlobEntry | None:
        for manifest in (self.held, self.pending):
            if manifest is not None:
                found = manifest.by_id().get(file_id)
                if found is not None and found.sha256 == sha256:
                    return found
        return None

    # -- a newer manifest --------------------------------------------------------------

    async def offer(self, manifest: SignedManifest, source: KeeperSession) -> None:
        """A verified manifest from ``source``: fetch its missing blobs from there, then
        hold it (if it is newer than what we hold and than what we are fetching)."""
        if manifest.revision <= self.revision:
            return
        if self.pending is not None and manifest.revision <= self.pending.revision \
                and self._pending_from is not None and self._pending_from.alive:
            return
        self.pending, self._pending_from = manifest, source
        names = {vault.blob_name(entry.id, entry.sha256): entry for entry in manifest.files}
        gone = await self.runner.run(vault.absent, self.root,
                                     [(name, entry.size) for name, entry in names.items()])
        missing = {names[name].id: names[name] for name in gone}
        if self.pending is not manifest:
            return  # a newer one came meanwhile
        self._missing = missing
        for entry in missing.values():
            source.fetch(entry)
        await self._maybe_complete()

    async def stored(self, entry: BlobEntry) -> None:
        """A blob was put in place: one less to wait for, if it is the one awaited."""
        if self._missing.get(entry.id) == entry:
            del self._missing[entry.id]
            await self._maybe_complete()

    async def _maybe_complete(self) -> None:
        manifest = self.pending
        if manifest is None or self._missing:
            return
        await self.runner.run(vault.save_manifest, self.root, manifest.text, manifest.signature)
        self.held, self.pending, self._pending_from = manifest, None, None
        keep = {vault.blob_name(e.id, e.sha256) for e in manifest.files}
        removed = await self.runner.run(vault.prune, self.root, keep)
        self._log.info("holding untrusted manifest revision {revision} of share {share} "
                       "({files} blobs; {removed} old ones removed)", revision=manifest.revision,
                       share=self.share_id[:8], files=len(manifest.files), removed=removed)
        for session in list(self.sessions):
            session.send_held()

    def source_lost(self, session: KeeperSession) -> None:
        if self._pending_from is session:
            self.pending, self._pending_from, self._missing = None, None, {}


class KeeperSession(SealedSession):
    """One connection of an untrusted share."""

    _log = Logger()

    def __init__(self, keeper: Keeper, connection: Any, peer_id: str) -> None:
        super().__init__(connection, peer_id)
        self.keeper = keeper
        self._requested: dict[str, BlobEntry] = {}
        self._receiving: tuple[BlobEntry, SerialWriter] | None = None
        keeper.sessions.append(self)

    def start(self) -> None:
        self.keeper.loaded().addCallback(lambda _: self.send_held())

    def send_held(self) -> None:
        if not self.alive:
            return
        held = self.keeper.held
        if held is not None:
            self.channel.send_encoded(held.encoded())
        self.channel.send({"type": "untrusted.state", "revision": self.keeper.revision})

    def fetch(self, entry: BlobEntry) -> None:
        self._requested[entry.id] = entry
        self.channel.send({"type": "untrusted.get", "id": entry.id, "sha256": entry.sha256})

    # -- events -------------------------------------------------------------------------

    def event_received(self, event: Any) -> None:
        if isinstance(event, wire.PayloadChunk):
            if self._receiving is None:
                raise ProtocolError("payload data nobody asked for")
            entry, writer = self._receiving
            writer.write(event.data)
            return
        if isinstance(event, wire.PayloadEnd):
            if self._receiving is not None:
                entry, writer = self._receiving
                self._receiving = None
                spawn(self._finish(entry, writer), "storing a blob")
            return
        kind = event.type
        if event.has_payload and kind != "untrusted.data":
            raise ProtocolError("unexpected payload on a %r message" % kind)
        if kind == "untrusted.manifest":
            self._on_manifest(event)
        elif kind == "untrusted.get":
            self._on_get(event.body)
        elif kind == "untrusted.data":
            self._on_data(event)
        elif kind == "untrusted.get_error":
            entry = self._requested.pop(str(event.body.get("id")), None)
            if entry is not None:
                self._log.warn("peer {peer} does not have blob {id} it listed",
                               peer=self.peer_id[:8], id=entry.id)
                self.keeper.source_lost(self)
        elif kind == "untrusted.verify":
            self._on_verify(event)
        elif kind == "untrusted.lost":
            self._on_lost(event)
        elif kind in ("untrusted.escrow", "untrusted.escrow_remove"):
            self._on_escrow(kind, event)

    def _on_escrow(self, kind: str, event: Any) -> None:
        def refused(failure: Any) -> None:
            if failure.check(ProtocolError):
                self._log.warn("refused an escrow line from {peer}: {why}",
                               peer=self.peer_id[:8], why=failure.getErrorMessage())
                self.connection.close(failure.getErrorMessage())
            else:
                self._log.failure("keeping an escrow entry failed", failure)
        Deferred.fromCoroutine(self.keeper.escrow.received(
            kind, event.text, event.signature)).addErrback(refused)

    def _on_manifest(self, event: Any) -> None:
        if event.signature is None:
            raise ProtocolError("untrusted.manifest without a signature")
        try:
            manifest = self.keeper.verify(event.text, event.signature)
        except SealError as e:
            raise ProtocolError(str(e)) from None
        # (After the manifest kept on disk is known: an older one must not win.)
        self.keeper.loaded().addCallback(
            lambda _: spawn(self.keeper.offer(manifest, self), "taking an untrusted manifest"))

    def _on_get(self, body: dict) -> None:
        file_id, sha256 = check_get(body)
        entry = self.keeper.entry(file_id, sha256)
        name = vault.blob_name(file_id, sha256)
        if entry is None:
            self.channel.send({"type": "untrusted.get_error", "id": file_id, "error": "missing"})
            return

        async def serve() -> None:
            if not await self.keeper.runner.run(vault.blob_present, self.keeper.root, name,
                                                entry.size):
                self.channel.send({"type": "untrusted.get_error", "id": file_id,
                                   "error": "missing"})
                return
            self.channel.stream(
                {"type": "untrusted.data", "id": file_id, "sha256": sha256, "size": entry.size},
                entry.size, lambda offset, length: self.keeper.runner.run(
                    vault.read_piece, self.keeper.root, name, offset, length))
        spawn(serve(), "serving a blob")

    def _on_data(self, event: Any) -> None:
        if not event.has_payload:
            raise ProtocolError("untrusted.data without a payload")
        file_id, sha256, size = check_data(event.body)
        entry = self._requested.pop(file_id, None)
        if entry is None or entry.sha256 != sha256 or entry.size != size:
            raise ProtocolError("untrusted.data for a blob we did not ask for")
        root = self.keeper.root
        writer = SerialWriter(self.keeper.runner, self.connection, lambda: vault.TempFile(
            root, vault.blob_name(entry.id, entry.sha256), entry.sha256))
        self._receiving = (entry, writer)

    async def _finish(self, entry: BlobEntry, writer: SerialWriter) -> None:
        def install(handle: vault.TempFile) -> None:
            if handle.written != entry.size or handle.sha256.hexdigest() != entry.sha256:
                handle.discard()
                raise SealError("blob %s is not the one the manifest lists" % entry.id)
            handle.replace()
        try:
            await writer.close(install)
        except SealError as e:
            self._log.warn("refused a blob from {peer}: {why}", peer=self.peer_id[:8], why=e)
            self.connection.close(str(e))
            return
        except OSError as e:
            self._log.warn("could not store blob {id}: {why}", id=entry.id, why=e)
            self.keeper.source_lost(self)
            return
        await self.keeper.stored(entry)

    # -- proof of storage -----------------------------------------------------------------

    def _signed_by_trusted(self, event: Any) -> bool:
        if event.signature is None:
            return False
        return any(keymod.verify(self.keeper.public_keys[level], event.text, event.signature)
                   for level in ("read_write", "read_only"))

    def _within_limit(self) -> float | None:
        """Count one more challenge (or ``lost``) of this peer; None if it is within the
        hourly limit, else the seconds until it will be."""
        now = self.keeper.clock.seconds()
        recent = [t for t in self.keeper.challenges.get(self.peer_id, []) if t > now - 3600]
        if len(recent) >= CHALLENGES_PER_HOUR:
            return int(recent[0] + 3600 - now) + 1
        recent.append(now)
        self.keeper.challenges[self.peer_id] = recent
        return None

    def _on_verify(self, event: Any) -> None:
        body = event.body
        file_id = check_hex(body.get("file_id"), 32, "file_id")
        prefix = check_hex(body.get("prefix"), 64, "prefix")
        if not self._signed_by_trusted(event):
            self._log.warn("refused an unsigned challenge from {peer}", peer=self.peer_id[:8])
            return
        retry = 60 if self.keeper.busy else self._within_limit()
        if retry is not None:
            self.channel.send({"type": "untrusted.verify_busy", "file_id": file_id,
                               "retry_in": retry})
            return
        spawn(self._answer(file_id, prefix), "answering a challenge")

    async def _answer(self, file_id: str, prefix: str) -> None:
        held = self.keeper.held
        entry = held.by_id().get(file_id) if held is not None else None
        reply: dict[str, Any] = {"type": "untrusted.verify_result", "file_id": file_id,
                                 "prefix": prefix}
        hashed = None
        if entry is not None:
            self.keeper.busy = True
            try:
                hashed = await self.keeper.runner.run(
                    vault.hash_blob, self.keeper.root, vault.blob_name(file_id, entry.sha256),
                    bytes.fromhex(prefix))
            finally:
                self.keeper.busy = False
        if hashed is None:
            reply["error"] = "missing"
        else:
            reply["result"] = hashed[0]
        self.channel.send(reply)
        if entry is not None and (hashed is None or hashed[1] != entry.sha256):
            # Our copy is gone or damaged: fetch it again from whoever asked, and
            # every other blob that went missing with it.
            await self._refetch(entry)
            await self._refetch_missing()

    def _on_lost(self, event: Any) -> None:
        file_id = check_hex(event.body.get("id"), 32, "id")
        if not self._signed_by_trusted(event):
            self._log.warn("refused an unsigned untrusted.lost from {peer}",
                           peer=self.peer_id[:8])
            return
        held = self.keeper.held
        entry = held.by_id().get(file_id) if held is not None else None
        if entry is not None and self._within_limit() is None:
            spawn(self._refetch(entry), "fetching a lost blob again")

    async def _refetch(self, entry: BlobEntry) -> None:
        # The copy here stays until the new one replaces it whole: a trusted peer
        # that says "lost" wrongly (or maliciously) costs a transfer, never the blob.
        self._log.warn("blob {id} is missing or damaged here; fetching it again",
                       id=entry.id)
        if self.alive:
            self.fetch(entry)

    async def _refetch_missing(self) -> None:
        held = self.keeper.held
        names = {vault.blob_name(entry.id, entry.sha256): entry
                 for entry in (held.files if held is not None else ())
                 if entry.id not in self._requested}
        gone = await self.keeper.runner.run(vault.absent, self.keeper.root,
                                            [(name, entry.size) for name, entry in names.items()])
        for name in gone:
            if self.alive:
                self.fetch(names[name])

    def connection_lost(self, reason: Any) -> None:
        self.alive = False
        self.channel.lost()
        if self._receiving is not None:
            self._receiving[1].abort()
            self._receiving = None
        if self in self.keeper.sessions:
            self.keeper.sessions.remove(self)
        if len(self.keeper.challenges) > 256:  # (peers come and go under new IDs)
            self.keeper.challenges.pop(self.peer_id, None)
        self.keeper.source_lost(self)


def new_prefix() -> str:
    """A fresh challenge prefix (32 random bytes, hex)."""
    return secrets.token_hex(32)
