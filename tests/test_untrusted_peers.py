"""Untrusted peers against a real in-process daemon (protocol/untrusted.md).

A scripted peer plays the untrusted side against a read_write share: what
it receives must never open anything (no name, no content, no key above
its level), and everything it serves wrong (tampered, swapped, forged,
replayed, garbage proofs) must be refused without a byte reaching the
share and without harm to the daemon.  Then the daemon is the untrusted
side and a scripted trusted peer tries forged messages on it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import time

from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint

from clearskies import keys as keymod
from clearskies import wire
from clearskies.handshake import ConnectTarget, MemoryKeyRing
from clearskies.keys import ShareKeys
from clearskies.peer import PeerProtocol, connect_peer
from clearskies.sync.sealed.sessions import FEATURE, peer_status
from clearskies.sync.sealed.sessions import in_sync as sealed_in_sync
from clearskies.sync.sealed import owner as owner_module
from clearskies.sync.sealed import ownersession as ownersession_module
from clearskies.sync.sealed.owner import Owner
from clearskies.untrusted.manifest import (
    BlobEntry,
    RollbackError,
    make_manifest,
    read_manifest,
)
from clearskies.untrusted.sealing import ContentKeys, FileMeta, blob_size
from tests.helpers import async_test
from tests.peerkit import (
    PeerKitCase, ScriptedSession, untrusted_keeper, untrusted_keys, wait_until, wire_bytes)

SECRET_NAME = "tax-return-2026-very-private.pdf"
SECRET = b"plaintext content that must never leave unsealed " * 40


def _payload_after(peer: ScriptedSession, index: int) -> bytes:
    data = []
    for event in peer.events[index + 1:]:
        if isinstance(event, wire.PayloadEnd):
            return b"".join(data)
        if isinstance(event, wire.PayloadChunk):
            data.append(bytes(event.data))
    raise AssertionError("payload not complete")


def _lines(encoded: bytes) -> tuple[bytes, bytes]:
    """(text, signature) of an encoded ``$`` message."""
    text, signature = encoded.rstrip(b"\n").split(b"\n")
    return text[1:], base64.b64decode(signature)


def _signed(body: dict, private_pem: bytes) -> bytes:
    text = wire.dumps(body)
    return wire.encode_signed(text, keymod.sign(private_pem, text))


class _Backup:
    """What a scripted untrusted peer serves: blobs sealed with the share's real keys."""

    def __init__(self, keys: ShareKeys) -> None:
        self.keys = keys
        self.content = ContentKeys(keys.share_id, keys.psks["read_only"])
        self.blobs: dict[str, bytes] = {}
        self.entries: list[BlobEntry] = []

    def add(self, path: str, data: bytes, mode: int = 0o640) -> BlobEntry:
        meta = FileMeta(path, hashlib.sha256(data).hexdigest(), len(data), (1_700_000_000, 7),
                        mode)
        file_id, sealed = self.content.seal_meta(meta)
        blob = self.content.seal_bytes(file_id, data)
        entry = BlobEntry(file_id, len(blob), hashlib.sha256(blob).hexdigest(), sealed)
        self.blobs[file_id] = blob
        self.entries.append(entry)
        return entry

    def manifest(self, revision: int, signer: str = "read_write") -> bytes:
        made = make_manifest(self.keys.share_id, revision, 1_700_000_000, self.entries,
                             self.keys.private_keys["read_write"])
        if signer == "read_write":
            return made.encoded()
        return wire.encode_signed(made.text,
                                  keymod.sign(self.keys.private_keys[signer], made.text))


class TrustedDaemonTests(PeerKitCase):
    """The daemon holds the share read_write; the scripted peer is untrusted."""

    async def _untrusted_peer(self) -> ScriptedSession:
        return await self.connect(features=(FEATURE,), keys=untrusted_keys(self.runtime.keys))

    @async_test
    async def test_an_untrusted_peer_receives_nothing_it_can_open(self) -> None:
        """The manifest verifies, its blobs open only with keys the peer lacks, and nothing
        on the wire holds a name, content, or a key above untrusted."""
        (self.share_dir / "folder").mkdir()
        (self.share_dir / "folder" / SECRET_NAME).write_bytes(SECRET)
        runtime = await self.start_daemon()
        keys = runtime.keys
        peer = await self._untrusted_peer()
        peer.send({"type": "untrusted.state", "revision": 0})
        index, _ = await peer.wait_for("untrusted.manifest")
        event = peer.events[index]
        manifest = read_manifest(event.text, event.signature, keys.share_id,
                                 keys.public_keys["read_write"])
        (entry,) = manifest.files
        assert entry.size == blob_size(len(SECRET))
        peer.send({"type": "untrusted.get", "id": entry.id, "sha256": entry.sha256})
        index, body = await peer.wait_for("untrusted.data")
        await wait_until(lambda: any(isinstance(e, wire.PayloadEnd)
                                     for e in peer.events[index:]))
        blob = _payload_after(peer, index)
        assert hashlib.sha256(blob).hexdigest() == entry.sha256 == body["sha256"]
        content = ContentKeys(keys.share_id, keys.psks["read_only"])
        meta = content.open_meta(entry.id, entry.meta)
        assert meta.path == "folder/" + SECRET_NAME
        assert content.opener(entry.id, meta).open_all(blob) == SECRET
        said = wire_bytes(peer)
        for secret in (SECRET[:30], SECRET_NAME.encode(), b"folder",
                       keys.psks["read_only"].encode(), keys.psks["read_write"].encode(),
                       b"PRIVATE KEY"):
            assert secret not in said, secret
        assert not peer.messages("manifest") and not peer.messages("keys")

    @async_test
    async def test_an_untrusted_code_hands_over_no_key_that_opens_anything(self) -> None:
        """The key exchange of an untrusted code grants the untrusted PSK and the public
        keys, and nothing else; what follows on that connection is sealed."""
        (self.share_dir / SECRET_NAME).write_bytes(SECRET)
        await self.start_daemon()
        code = await self.daemon.create_code(str(self.share_dir), "untrusted", True, 3600)
        made: list[ScriptedSession] = []

        def factory(connection: PeerProtocol) -> ScriptedSession:
            made.append(ScriptedSession(connection))
            return made[-1]

        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.daemon.listeners.port_number)
        await connect_peer(reactor, endpoint, ConnectTarget.join(code.code, secrets.token_hex(16)),
                           MemoryKeyRing(time.time), "scripted peer", factory,
                           features=(FEATURE,))
        (peer,) = made
        self.sessions.append(peer)
        info = peer.connection.established
        assert info.access == "untrusted"
        assert set(info.keys.psks) == {"untrusted"} and info.keys.private_keys == {}
        assert set(info.keys.public_keys) == {"read_only", "read_write"}
        peer.send({"type": "untrusted.state", "revision": 0})
        await peer.wait_for("untrusted.manifest")
        said = wire_bytes(peer)
        assert SECRET[:30] not in said and SECRET_NAME.encode() not in said

    @async_test
    async def test_a_big_first_manifest_goes_out_in_growing_steps(self) -> None:
        """Sealing for digests is time-sliced: each manifest lists what is ready, never
        fewer files than the one before."""
        for name in ("a.bin", "b.bin", "c.bin"):
            (self.share_dir / name).write_bytes(os.urandom(20_000))
        runtime = await self.start_daemon()
        self.patch(owner_module, "BUILD_SLICE", 0.0)
        self.patch(ownersession_module, "CHECK_EVERY", 0.05)
        peer = await self._untrusted_peer()
        peer.send({"type": "untrusted.state", "revision": 0})
        await wait_until(lambda: any(len(json.loads(e.text)["files"]) == 3
                                     for e in peer.events if isinstance(e, wire.Message)
                                     and e.type == "untrusted.manifest"),
                         what="a manifest of every file")
        counts = [len(json.loads(e.text)["files"]) for e in peer.events
                  if isinstance(e, wire.Message) and e.type == "untrusted.manifest"]
        assert counts == [1, 2, 3]
        assert not runtime.sealed.owner.incomplete

    async def _restore_from(self, backup: _Backup, revision: int = 1,
                            serve: dict[str, bytes] | None = None) -> ScriptedSession:
        peer = await self._untrusted_peer()
        peer.send_raw(backup.manifest(revision))
        peer.send({"type": "untrusted.state", "revision": revision})
        served = dict(backup.blobs, **(serve or {}))
        answered: set[int] = set()

        def serve_requests() -> bool:
            for i, event in enumerate(peer.events):
                if i in answered or not isinstance(event, wire.Message) \
                        or event.type != "untrusted.get":
                    continue
                answered.add(i)
                file_id = event.body["id"]
                blob = served[file_id]
                peer.send_payload({"type": "untrusted.data", "id": file_id,
                                   "sha256": event.body["sha256"], "size": len(blob)}, blob)
            return peer.closed
        self._serve = serve_requests
        return peer

    async def _serving_until(self, condition) -> None:
        """Answer the daemon's requests until ``condition()`` holds."""
        await wait_until(lambda: (self._serve(), condition())[1], what="the restore")

    @async_test
    async def test_a_share_restores_what_it_lacks_from_an_untrusted_peer(self) -> None:
        runtime = await self.start_daemon()
        backup = _Backup(runtime.keys)
        backup.add("docs/a.txt", b"alpha\n", mode=0o600)
        backup.add("run.sh", b"#!/bin/sh\n", mode=0o755)
        backup.add("empty", b"")
        await self._restore_from(backup)
        target = self.share_dir / "docs" / "a.txt"
        await self._serving_until(lambda: (self.share_dir / "empty").exists()
                                  and (self.share_dir / "run.sh").exists() and target.exists())
        assert target.read_bytes() == b"alpha\n"
        assert os.stat(target).st_mode & 0o7777 == 0o600
        assert os.stat(self.share_dir / "run.sh").st_mode & 0o7777 == 0o755
        assert os.stat(target).st_mtime_ns == 1_700_000_000 * 10**9 + 7
        received = [c["file"] for c in runtime.share_events.recent if c["kind"] == "received"]
        assert sorted(received) == ["docs/a.txt", "empty", "run.sh"]  # (clearskies changes)
        assert self.temp_files() == []

    @async_test
    async def test_many_small_files_are_asked_for_a_window_at_a_time(self) -> None:
        runtime = await self.start_daemon()
        backup = _Backup(runtime.keys)
        for n in range(30):
            backup.add("many/%02d.txt" % n, b"file %d\n" % n)
        peer = await self._restore_from(backup)
        await wait_until(lambda: len(peer.messages("untrusted.get")) >= 8)
        assert len(peer.messages("untrusted.get")) == 8  # nothing answered yet
        many = self.share_dir / "many"
        await self._serving_until(lambda: many.exists() and len(
            [p for p in many.iterdir() if not p.name.endswith(".!clearsky")]) == 30)
        assert (self.share_dir / "many" / "17.txt").read_bytes() == b"file 17\n"
        assert self.temp_files() == []

    @async_test
    async def test_tampered_or_swapped_blobs_never_reach_the_share(self) -> None:
        """A flipped byte, or another file's blob under this one's name: refused, logged,
        the connection closed, nothing written, the daemon still serving."""
        runtime = await self.start_daemon()
        for revision, case in enumerate(("flipped", "swapped"), 1):
            backup = _Backup(runtime.keys)
            victim = backup.add(case + "-victim.bin", os.urandom(200_000))
            other = backup.add(case + "-other.bin", os.urandom(200_000))
            blob = bytearray(backup.blobs[victim.id])
            if case == "flipped":
                blob[100_000] ^= 1
                serve = {victim.id: bytes(blob)}
            else:
                serve = {victim.id: backup.blobs[other.id], other.id: backup.blobs[victim.id]}
            peer = await self._restore_from(backup, revision, serve=serve)
            await self._serving_until(lambda peer=peer: peer.closed)
            assert not (self.share_dir / (case + "-victim.bin")).exists()
            honest = self.share_dir / (case + "-other.bin")
            if case == "swapped":
                assert not honest.exists()
            elif honest.exists():  # served right, so it may come first and stay
                assert honest.read_bytes() == backup.content.opener(
                    other.id, backup.content.open_meta(other.id, other.meta)
                ).open_all(backup.blobs[other.id])
            assert self.temp_files() == []
        assert any("served a bad blob" in line for line in self.logged())
        assert self.daemon.running
        # The daemon still takes an honest backup afterwards.
        backup = _Backup(runtime.keys)
        backup.add("honest.txt", b"fine\n")
        await self._restore_from(backup, revision=3)
        await self._serving_until(lambda: (self.share_dir / "honest.txt").exists())

    @async_test
    async def test_a_forged_or_replayed_manifest_restores_nothing(self) -> None:
        runtime = await self.start_daemon()
        backup = _Backup(runtime.keys)
        backup.add("forged.txt", b"planted\n")
        peer = await self._untrusted_peer()
        peer.send_raw(backup.manifest(5, signer="read_only"))  # not the read_write key
        await peer.wait_closed()
        assert any("not signed with the share's read_write key" in line
                   for line in self.logged())

        newer = _Backup(runtime.keys)
        newer.add("new.txt", b"the newest\n")
        await self._restore_from(newer, revision=7)
        await self._serving_until(lambda: (self.share_dir / "new.txt").exists())
        old = _Backup(runtime.keys)
        old.add("old-only.txt", b"from revision 6\n")
        peer = await self._restore_from(old, revision=6)
        await wait_until(lambda: any("older than 7" in line for line in self.logged()),
                         what="the rollback refused")
        self._serve()
        assert not (self.share_dir / "old-only.txt").exists()
        assert not (self.share_dir / "forged.txt").exists()

        # The newest revision seen outlives the daemon: a share opened again (a restart)
        # still refuses revision 6.
        again = Owner(runtime, runtime.keys, reactor, lambda: 0)
        await again.load()
        assert again.guard.revision == 7
        with self.assertRaises(RollbackError):
            await again.accept(read_manifest(
                *_lines(old.manifest(6)), runtime.share_id,
                runtime.keys.public_keys["read_write"]))

    @async_test
    async def test_a_garbage_proof_marks_the_file_lost_and_asks_again(self) -> None:
        (self.share_dir / "kept.bin").write_bytes(os.urandom(5000))
        runtime = await self.start_daemon()
        self.daemon.resources.config["untrusted_challenge_interval"] = 1
        peer = await self._untrusted_peer()
        peer.send({"type": "untrusted.state", "revision": 0})
        index, _ = await peer.wait_for("untrusted.manifest")
        revision = json.loads(peer.events[index].text)["revision"]
        assert not sealed_in_sync(runtime.sealed)  # the peer holds nothing of ours yet
        peer.send({"type": "untrusted.state", "revision": revision})
        index, challenge = await peer.wait_for("untrusted.verify", timeout=15)
        assert sealed_in_sync(runtime.sealed)  # (share health counts it as in sync)
        event = peer.events[index]
        assert keymod.verify(runtime.keys.public_keys["read_write"], event.text,
                             event.signature)
        assert len(bytes.fromhex(challenge["prefix"])) == 32
        peer.send({"type": "untrusted.verify_result", "file_id": challenge["file_id"],
                   "prefix": challenge["prefix"], "result": secrets.token_hex(32)})
        index, lost = await peer.wait_for("untrusted.lost")
        assert lost["id"] == challenge["file_id"]
        their_id = peer.connection.established.our_peer_id
        status = peer_status(runtime.sealed, their_id)
        assert status["challenges_failed"] == 1 and status["lost"] == ["kept.bin"]
        assert status["access"] == "untrusted"


class UntrustedDaemonTests(PeerKitCase):
    """The daemon keeps a share at level untrusted; the scripted peer is trusted."""

    async def _keeper(self) -> tuple[ShareKeys, ScriptedSession]:
        return await untrusted_keeper(self, (FEATURE,))

    @async_test
    async def test_forged_messages_to_an_untrusted_peer_are_refused(self) -> None:
        keys, peer = await self._keeper()
        backup = _Backup(keys)
        entry = backup.add("x.txt", b"x\n")
        # A challenge nobody trusted signed is ignored.
        peer.send({"type": "untrusted.verify", "file_id": entry.id, "prefix": "ab" * 32})
        # A manifest signed with the read_only key is refused: the connection closes.
        peer.send_raw(backup.manifest(1, signer="read_only"))
        await peer.wait_closed()
        assert not peer.messages("untrusted.verify_result")
        assert sorted(os.listdir(self.kept)) == [".clearskies"]

    @async_test
    async def test_blobs_are_kept_only_as_the_manifest_lists_them(self) -> None:
        keys, peer = await self._keeper()
        backup = _Backup(keys)
        entry = backup.add("y.txt", b"y\n")
        peer.send_raw(backup.manifest(1))
        _, asked = await peer.wait_for("untrusted.get")
        assert asked == {"type": "untrusted.get", "id": entry.id, "sha256": entry.sha256}
        wrong = bytearray(backup.blobs[entry.id])
        wrong[-1] ^= 1
        peer.send_payload({"type": "untrusted.data", "id": entry.id, "sha256": entry.sha256,
                           "size": len(wrong)}, bytes(wrong))
        await peer.wait_closed()
        assert sorted(os.listdir(self.kept)) == [".clearskies"]

        peer = await self.connect(features=(FEATURE,), keys=keys)
        peer.send_raw(backup.manifest(1))
        await peer.wait_for("untrusted.get")
        blob = backup.blobs[entry.id]
        peer.send_payload({"type": "untrusted.data", "id": entry.id, "sha256": entry.sha256,
                           "size": len(blob)}, blob)
        await peer.wait_for("untrusted.state", where=lambda b: b["revision"] == 1)
        names = sorted(os.listdir(self.kept))
        assert names == [".clearskies", entry.id + "." + entry.sha256[:32],
                         "untrusted-manifest"]
        kept = self.daemon.share_registry.share_by_path(str(self.kept))
        assert sealed_in_sync(kept.sealed)

        # Challenges: answered with SHA-256(prefix ‖ blob), then busy past the hourly limit.
        prefix = secrets.token_hex(32)
        for n in range(9):
            peer.send_raw(_signed({"type": "untrusted.verify", "file_id": entry.id,
                                   "prefix": prefix}, keys.private_keys["read_only"]))
        await wait_until(lambda: len(peer.messages("untrusted.verify_result"))
                         + len(peer.messages("untrusted.verify_busy")) == 9)
        results = peer.messages("untrusted.verify_result")
        assert results[0]["result"] == hashlib.sha256(bytes.fromhex(prefix) + blob).hexdigest()
        assert peer.messages("untrusted.verify_busy")

        # A copy damaged on its disk: the answer cannot be right, and the untrusted
        # peer, finding its copy is not the listed blob, fetches it again.
        stored = self.kept / (entry.id + "." + entry.sha256[:32])
        damaged = bytearray(stored.read_bytes())
        damaged[20] ^= 0xFF
        stored.write_bytes(bytes(damaged))
        other = await self.connect(features=(FEATURE,), keys=keys)
        await other.wait_for("untrusted.state")
        other.send_raw(_signed({"type": "untrusted.verify", "file_id": entry.id,
                                "prefix": prefix}, keys.private_keys["read_write"]))
        _, answer = await other.wait_for("untrusted.verify_result")
        assert answer["result"] != results[0]["result"]
        _, asked = await other.wait_for("untrusted.get")
        assert asked["id"] == entry.id
        other.send_payload({"type": "untrusted.data", "id": entry.id, "sha256": entry.sha256,
                            "size": len(blob)}, blob)
        await wait_until(lambda: stored.exists() and stored.read_bytes() == blob,
                         what="the blob fetched again")


class ReadOnlyDaemonTests(PeerKitCase):
    """The daemon holds the share read_only: it restores, serves and relays, signs nothing."""

    @async_test
    async def test_a_read_only_share_restores_serves_and_relays(self) -> None:
        await self.start_daemon()
        owner = keymod.generate_share_keys(rsa_bits=1024)
        folder = self.base / "read-only"
        folder.mkdir()
        held_data = b"a file the read-only peer holds\n"
        (folder / "held.txt").write_bytes(held_data)
        runtime = await self.daemon.share_registry.add_share(
            ShareKeys.from_keys_message(owner.keys_message("read_only")), str(folder),
            secrets.token_hex(16))
        await wait_until(lambda: runtime.service.status.state == "idle", what="the scan")
        backup = _Backup(owner)
        held = backup.add("held.txt", held_data)
        gone = backup.add("gone.txt", b"restored onto the read-only peer\n")

        first = await self.connect(features=(FEATURE,), keys=untrusted_keys(owner))
        first.send_raw(backup.manifest(3))
        first.send({"type": "untrusted.state", "revision": 3})
        index, asked = await first.wait_for("untrusted.get")
        assert asked["id"] == gone.id  # it holds held.txt already
        blob = backup.blobs[gone.id]
        first.send_payload({"type": "untrusted.data", "id": gone.id, "sha256": gone.sha256,
                            "size": len(blob)}, blob)
        await wait_until(lambda: (folder / "gone.txt").exists(), what="the restore")

        # A second untrusted peer, empty, is handed the read_write-signed manifest and
        # served the blob of the file the read-only peer holds, sealed as it reads it.
        second = await self.connect(features=(FEATURE,), keys=untrusted_keys(owner))
        second.send({"type": "untrusted.state", "revision": 0})
        index, _ = await second.wait_for("untrusted.manifest", timeout=15)
        event = second.events[index]
        relayed = read_manifest(event.text, event.signature, owner.share_id,
                                owner.public_keys["read_write"])
        assert relayed.revision == 3
        second.send({"type": "untrusted.get", "id": held.id, "sha256": held.sha256})
        index, _ = await second.wait_for("untrusted.data")
        await wait_until(lambda: any(isinstance(e, wire.PayloadEnd)
                                     for e in second.events[index:]))
        assert _payload_after(second, index) == backup.blobs[held.id]
