"""One connection of a trusted share with an untrusted peer (``protocol/untrusted.md``).

The untrusted peer opens with the manifest it holds.  We check it (the
read_write signature, the share, the revision against the newest we
accepted), restore from it every file we know nothing of, then send our own
manifest when it is newer and serve the blobs the peer asks for, sealing
our files as they are read.  On a schedule we challenge the peer to prove it
still holds one blob; a wrong or missing answer marks that file lost there
and gets it uploaded again.
"""

from __future__ import annotations

import os
import random
import secrets
from collections import deque
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from clearskies import keys as keymod
from clearskies import wire
from clearskies.errors import ClearSkiesError, ProtocolError
from clearskies.sync.sealed.channel import SealedSession, SerialWriter, spawn
from clearskies.sync.sealed.escrowing import EscrowSender
from clearskies.sync.sealed.files import RestoreFile, SealedReader, challenge_expected
from clearskies.sync.sealed.messages import check_data, check_get, check_hex
from clearskies.sync.sealed.owner import Owner
from clearskies.untrusted.manifest import BlobEntry, RollbackError, read_manifest
from clearskies.untrusted.sealing import FileMeta, SealError

CHECK_EVERY = 5.0
"""Seconds between looks at whether the share changed (a new manifest to send)."""
RESTORE_WINDOW = 8
"""Blobs asked for at once while restoring (one round trip per file would be slow)."""
LOOKUP_BATCH = 500
"""Paths of a manifest looked up in the database at once."""


class OwnerSession(SealedSession):
    """A trusted share's connection with one untrusted peer."""

    _log = Logger()

    def __init__(self, owner: Owner, connection: Any, peer_id: str) -> None:
        super().__init__(connection, peer_id)
        self.owner = owner
        self.backup = owner.peer(peer_id)
        self.backup.connected = True
        self._restores: deque[tuple[BlobEntry, FileMeta, str]] = deque()
        self._asked: dict[str, tuple[BlobEntry, FileMeta, str]] = {}  # id -> asked for
        self._writing: set[str] = set()  # ids received, being checked and put in place
        self._receiving: tuple[BlobEntry, FileMeta, SerialWriter] | None = None
        self._restoring = False
        self._sent_revision = 0
        self._challenge: tuple[str, str, str, str] | None = None  # id, prefix, expected, path
        self._timer: Any = None
        self._challenge_timer: Any = None
        # Nothing is made or sent before the peer said what it holds (its manifest,
        # then its state) and we took that in: a share that has not restored yet
        # must not offer an empty manifest as the newest.
        self._ready = False
        self._taking: Deferred[None] | None = None
        self._becoming = False
        self.restored = 0
        self.escrow: EscrowSender | None = None
        if "code_escrow" in getattr(connection.established, "features", ()):
            self.escrow = EscrowSender(owner.keys, owner.escrow_codes)

    def start(self) -> None:
        spawn(self.owner.load(), "reading what untrusted peers were shown")

    async def _become_ready(self) -> None:
        if self._taking is not None:
            await self._taking
        self._ready = True
        self._tick()

    # -- events ---------------------------------------------------------------------------

    def event_received(self, event: Any) -> None:
        if isinstance(event, wire.PayloadChunk):
            if self._receiving is None:
                raise ProtocolError("payload data nobody asked for")
            self._receiving[2].write(event.data)
            return
        if isinstance(event, wire.PayloadEnd):
            if self._receiving is not None:
                receiving, self._receiving = self._receiving, None
                spawn(self._restored(*receiving), "restoring a file")
            return
        kind = event.type
        if event.has_payload and kind != "untrusted.data":
            raise ProtocolError("unexpected payload on a %r message" % kind)
        if kind == "untrusted.manifest":
            self._on_manifest(event)
        elif kind == "untrusted.state":
            revision = event.body.get("revision")
            if isinstance(revision, int) and not isinstance(revision, bool) and revision >= 0:
                self.backup.revision = revision
                if self._ready:
                    self._maybe_send()
                elif not self._becoming:
                    self._becoming = True
                    spawn(self._become_ready(), "taking an untrusted peer's state")
        elif kind == "untrusted.get":
            self._on_get(event.body)
        elif kind == "untrusted.data":
            self._on_data(event)
        elif kind == "untrusted.get_error":
            self._on_get_error(event.body)
        elif kind == "untrusted.verify_result":
            self._on_verify_result(event.body)
        elif kind == "untrusted.verify_busy":
            retry = event.body.get("retry_in")
            if isinstance(retry, int) and 0 < retry <= 86400 and self._challenge is not None:
                self._challenge = None
                self._schedule_challenge(retry)

    def _on_manifest(self, event: Any) -> None:
        if event.signature is None:
            raise ProtocolError("untrusted.manifest without a signature")
        try:
            manifest = read_manifest(event.text, event.signature, self.owner.share_id,
                                     self.owner.public_keys["read_write"])
        except SealError as e:
            raise ProtocolError("refused the manifest of untrusted peer: %s" % e) from None
        self.backup.revision = manifest.revision
        self.backup.files = len(manifest.files)
        self.backup.bytes = sum(entry.size for entry in manifest.files)
        self._taking = Deferred.fromCoroutine(self._take(manifest))
        self._taking.addErrback(
            lambda f: self._log.failure("taking an untrusted manifest failed", f))

    async def _take(self, manifest: Any) -> None:
        await self.owner.load()
        try:
            await self.owner.accept(manifest)
        except RollbackError as e:
            # An untrusted peer behind us (it missed our last manifest) or replaying
            # an old one: nothing is restored from it either way.
            self._log.warn("untrusted peer {peer}: {why}; not restoring from it",
                           peer=self.peer_id[:8], why=e)
            self._maybe_send()
            return
        await self._plan_restore(manifest)

    # -- restoring ------------------------------------------------------------------------

    async def _plan_restore(self, manifest: Any) -> None:
        owner = self.owner
        queued = {entry.id for entry, _, _ in self._restores} | set(self._asked) \
            | self._writing
        opened = [(entry, owner.open_meta(entry)) for entry in manifest.files
                   if entry.id not in queued]
        candidates = [(entry, meta) for entry, meta in opened if meta is not None]
        unknown = []
        for start in range(0, len(candidates), LOOKUP_BATCH):
            batch = candidates[start:start + LOOKUP_BATCH]
            known = await owner.store.get_stored_many(owner.share_id,
                                                      [meta.path for _, meta in batch])
            # A path we know (a file or a deletion): our own version rules.
            unknown.extend((entry, meta) for entry, meta in batch if meta.path not in known)
        for entry, meta in unknown:
            try:
                target = await owner.runner.run(owner.share.paths.to_local, meta.path)
            except ClearSkiesError as e:
                self._log.warn("not restoring {path}: {why}", path=meta.path, why=e)
                continue
            if await owner.runner.run(os.path.lexists, str(target)):
                continue
            self._restores.append((entry, meta, str(target)))
        if self._restores:
            self._log.info("restoring {count} files from untrusted peer {peer}",
                           count=len(self._restores), peer=self.peer_id[:8])
        self._restoring = True
        self._next_restore()

    def _next_restore(self) -> None:
        """Keep up to RESTORE_WINDOW blobs asked for; once none is left to ask for or
        under way, the restore is over and our own manifest may be made."""
        if not self.alive:
            return
        while self._restores and len(self._asked) + len(self._writing) < RESTORE_WINDOW:
            entry, meta, target = self._restores.popleft()
            self._asked[entry.id] = (entry, meta, target)
            self.channel.send({"type": "untrusted.get", "id": entry.id,
                               "sha256": entry.sha256})
        if self._restoring and not (self._restores or self._asked or self._writing):
            self._restoring = False
            self._build_now()

    def _on_data(self, event: Any) -> None:
        if not event.has_payload:
            raise ProtocolError("untrusted.data without a payload")
        file_id, sha256, size = check_data(event.body)
        asked = self._asked.pop(file_id, None)
        if asked is None or asked[0].sha256 != sha256 or asked[0].size != size:
            raise ProtocolError("untrusted.data for a blob we did not ask for")
        entry, meta, target = asked
        content = self.owner.content
        writer = SerialWriter(self.owner.runner, self.connection, lambda: RestoreFile(
            target, content, entry.id, meta, entry.sha256, entry.size))
        self._writing.add(entry.id)
        self._receiving = (entry, meta, writer)

    async def _restored(self, entry: BlobEntry, meta: FileMeta, writer: SerialWriter) -> None:
        try:
            installed = await writer.close(lambda handle: handle.install())
        except SealError as e:
            self._log.error("untrusted peer {peer} served a bad blob for {path}: {why}; "
                            "nothing of it was written to the share",
                            peer=self.peer_id[:8], path=meta.path, why=e)
            self.connection.close("served a tampered blob")
            return
        except OSError as e:
            self._log.warn("could not restore {path}: {why}", path=meta.path, why=e)
        else:
            if installed:
                self.restored += 1
                self._log.info("restored {path} from untrusted peer {peer}", path=meta.path,
                               peer=self.peer_id[:8])
                events = getattr(self.owner.share, "share_events", None)
                if events is not None:  # (recent changes, the event feed)
                    events.sync_event("download_finished", {
                        "file": meta.path, "peer_id": self.peer_id, "size": meta.size})
        finally:
            self._writing.discard(entry.id)
        self._next_restore()

    def _on_get_error(self, body: dict) -> None:
        file_id = check_hex(body.get("id"), 32, "id")
        asked = self._asked.pop(file_id, None)
        if asked is not None:
            meta = asked[1]
            self.backup.lost[meta.path] = self.owner.clock.seconds()
            self._log.warn("untrusted peer {peer} does not have {path}", peer=self.peer_id[:8],
                           path=meta.path)
            self._next_restore()

    # -- uploading ------------------------------------------------------------------------

    def _tick(self) -> None:
        if not self.alive:
            return
        self._timer = self.owner.clock.callLater(CHECK_EVERY, self._tick)
        if self.escrow is not None:
            for line in self.escrow.lines():
                self.channel.send_encoded(line)
        self._build_now()

    def _build_now(self) -> None:
        if not self.alive or not self._ready or self._restoring:
            return
        Deferred.fromCoroutine(self.owner.build()).addCallbacks(
            lambda _: self._maybe_send(),
            lambda f: self._log.failure("making the untrusted manifest failed", f))

    def _maybe_send(self) -> None:
        made = self.owner.made
        if not self.alive or made is None or self._restoring:
            return
        if self.backup.revision < made.revision and self._sent_revision < made.revision:
            self._sent_revision = made.revision
            self.channel.send_encoded(made.encoded())
        if self.backup.revision >= made.revision and self._challenge_timer is None \
                and self._challenge is None:
            self._schedule_challenge(None)

    def _on_get(self, body: dict) -> None:
        file_id, sha256 = check_get(body)
        source = self.owner.sources.get(file_id)
        if source is None or source.blob_sha256 != sha256:
            self.channel.send({"type": "untrusted.get_error", "id": file_id, "error": "missing"})
            return
        if self.backup.lost.pop(source.path, None) is not None:
            self._log.info("uploading {path} again to untrusted peer {peer}",
                           path=source.path, peer=self.peer_id[:8])

        async def serve() -> None:
            owner = self.owner
            try:
                local = await owner.runner.run(owner.share.paths.to_local, source.path)
                reader = await owner.runner.run(SealedReader, str(local), owner.content,
                                                file_id, source.sha256, source.size)
            except (OSError, ClearSkiesError) as e:
                self._log.warn("cannot seal {path}: {why}", path=source.path, why=e)
                self.channel.send({"type": "untrusted.get_error", "id": file_id,
                                   "error": "missing"})
                return
            self.channel.stream(
                {"type": "untrusted.data", "id": file_id, "sha256": sha256,
                 "size": source.blob_size}, source.blob_size,
                lambda offset, length: owner.runner.run(reader.read, offset, length))
        spawn(serve(), "sealing a blob")

    # -- proof of storage -------------------------------------------------------------------

    def _schedule_challenge(self, delay: float | None) -> None:
        interval = self.owner.challenge_interval()
        if not self.alive or interval <= 0:
            return
        if delay is None:
            delay = interval * random.uniform(0.5, 1.0)
        self._challenge_timer = self.owner.clock.callLater(delay, self._challenge_now)

    def _challenge_now(self) -> None:
        self._challenge_timer = None
        if not self.alive:
            return
        made = self.owner.made
        candidates = [s for s in self.owner.sources.items()]
        if made is None or self.backup.revision != made.revision or not candidates:
            self._schedule_challenge(None)
            return
        file_id, source = random.choice(candidates)
        prefix = secrets.token_bytes(32)

        async def send() -> None:
            owner = self.owner
            try:
                local = await owner.runner.run(owner.share.paths.to_local, source.path)
                expected = await owner.runner.run(challenge_expected, str(local), owner.content,
                                                  file_id, source.sha256, source.size, prefix)
            except (OSError, ValueError, ClearSkiesError):
                self._schedule_challenge(None)  # our copy changed: another time
                return
            self._challenge = (file_id, prefix.hex(), expected, source.path)
            self.backup.last_challenge = owner.clock.seconds()
            body = {"type": "untrusted.verify", "file_id": file_id, "prefix": prefix.hex()}
            text = wire.dumps(body)
            self.channel.send_encoded(wire.encode_signed(
                text, keymod.sign(owner.challenge_key, text)))
        spawn(send(), "challenging an untrusted peer")

    def _on_verify_result(self, body: dict) -> None:
        pending = self._challenge
        if pending is None or body.get("file_id") != pending[0] \
                or body.get("prefix") != pending[1]:
            return  # not the challenge we sent: ignored
        self._challenge = None
        file_id, _, expected, path = pending
        now = self.owner.clock.seconds()
        if body.get("result") == expected:
            self.backup.last_passed = now
            self.backup.lost.pop(path, None)
        else:
            self.backup.challenges_failed += 1
            self.backup.lost[path] = now
            why = "does not have" if body.get("error") == "missing" else "gave a wrong proof for"
            self._log.warn("untrusted peer {peer} {why} {path}: marked lost there, uploading "
                           "it again", peer=self.peer_id[:8], why=why, path=path)
            if body.get("error") != "missing":
                text = wire.dumps({"type": "untrusted.lost", "id": file_id})
                self.channel.send_encoded(wire.encode_signed(
                    text, keymod.sign(self.owner.challenge_key, text)))
        self._schedule_challenge(None)

    def connection_lost(self, reason: Any) -> None:
        self.alive = False
        self.backup.connected = False
        self.channel.lost()
        for timer in (self._timer, self._challenge_timer):
            if timer is not None and timer.active():
                timer.cancel()
        if self._receiving is not None:
            self._receiving[2].abort()
            self._receiving = None
