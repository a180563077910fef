"""The ``rsync`` extension against scripted peers: deltas taken and made, and every kind
of bad signature or delta refused without harm (protocol/rsync.md)."""

from __future__ import annotations

import os
import random
import secrets
import struct

from twisted.internet import reactor
from twisted.trial.unittest import SkipTest

from clearskies import rdiff, wire
from clearskies.daemon.shares import signing_idle
from tests.helpers import async_test
from tests.peerkit import ALL_FEATURES, PeerKitCase, ScriptedSession, file_entry, wait_until

RSYNC = ALL_FEATURES + ("rsync",)
SIZE = 2 * 1024 * 1024


def update(entry: dict, revision: int = 2) -> dict:
    return {"type": "update", "revision": revision, "file": entry}


async def payload_of(peer: ScriptedSession, type: str, path: str,
                     since: int = 0) -> tuple[int, bytes]:
    """(index, payload) of the first ``type`` message for ``path`` at or after ``since``."""
    start, _ = await peer.wait_for(type, since, where=lambda b: b.get("path") == path)

    def ended() -> int | None:
        for index in range(start + 1, len(peer.events)):
            if isinstance(peer.events[index], wire.PayloadEnd):
                return index
        return None

    end = await wait_until(ended, what="the end of the %s payload" % type)
    return start, b"".join(e.data for e in peer.events[start + 1:end]
                           if isinstance(e, wire.PayloadChunk))


def drain(reader: rdiff.SignatureReader | rdiff.DeltaReader) -> bytes:
    out = []
    while data := reader.read(rdiff.PIECE):
        out.append(data)
    reader.close()
    return b"".join(out)


def delta_for(signature: bytes, new: bytes, scratch: str) -> bytes:
    """What an honest peer answers: the delta from the signed old copy to ``new``."""
    with open(scratch, "wb") as f:
        f.write(new)
    loader = rdiff.SignatureLoader()
    loader.feed(signature)
    return drain(rdiff.DeltaReader(os.open(scratch, os.O_RDONLY), loader.finish()))


def copy_delta(pos: int, length: int, times: int = 1) -> bytes:
    """A hand-made delta: ``times`` COPY commands of (pos, length), then the end."""
    return (struct.pack(">I", rdiff.DELTA_MAGIC)
            + struct.pack(">BII", 0x4F, pos, length) * times + b"\0")


class RsyncTests(PeerKitCase):
    def setUp(self) -> None:
        if not rdiff.AVAILABLE:
            raise SkipTest("librsync is not installed")
        super().setUp()
        rng = random.Random(4242)
        self.old = rng.randbytes(SIZE)
        new = bytearray(self.old)
        new[SIZE // 2:SIZE // 2 + 65536] = rng.randbytes(65536)
        self.new = bytes(new)
        self.share_path("big.bin").write_bytes(self.old)

    async def offer_new_version(self, features: tuple[str, ...] = RSYNC
                                ) -> tuple[ScriptedSession, str]:
        """A peer announces a newer big.bin; the daemon holds the old one."""
        runtime = await self.start_daemon()
        ours = await runtime.get_record("big.bin")
        peer_id = secrets.token_hex(16)
        peer = await self.connect(features, peer_id=peer_id)
        peer.send(update(file_entry("big.bin", self.new, vv={**ours.vv, peer_id: 1})))
        return peer, peer_id

    async def installed(self) -> None:
        await wait_until(lambda: self.share_path("big.bin").read_bytes() == self.new,
                         what="the new big.bin")
        await wait_until(lambda: self.temp_files() == [], what="temporary files to go")

    async def refused_then_fetched(self, peer: ScriptedSession, delta: bytes, why: str) -> None:
        """``delta`` is refused with a log line saying ``why``; a plain get follows; all ends well."""
        at, _ = await payload_of(peer, "rsync.signature", "big.bin")
        peer.send_payload({"type": "rsync.patch", "path": "big.bin"}, delta)
        await peer.wait_for("get", at, where=lambda b: b["path"] == "big.bin")
        self.assertEqual(self.share_path("big.bin").read_bytes(), self.old)  # old copy kept
        self.assertEqual(self.temp_files(), [])
        self.assertTrue(any("delta of big.bin" in t and why in t for t in self.logged()),
                        [t for t in self.logged() if "delta" in t])
        peer.send_payload({"type": "file_data", "path": "big.bin"}, self.new)
        await self.installed()
        self.assertFalse(peer.closed)

    # -- asking -------------------------------------------------------------------------

    @async_test
    async def test_a_newer_version_arrives_as_a_delta(self):
        """The daemon signs its old copy, applies the peer's delta and installs the result."""
        peer, _ = await self.offer_new_version()
        _, signature = await payload_of(peer, "rsync.signature", "big.bin")
        self.assertEqual(len(signature), rdiff.signature_size(SIZE))
        delta = delta_for(signature, self.new, str(self.outside / "new"))
        self.assertLess(len(delta), 100_000)
        peer.send_payload({"type": "rsync.patch", "path": "big.bin"}, delta, chunk_size=7000)
        await self.installed()
        self.assertEqual(peer.messages("get"), [])
        self.assertFalse(peer.closed)

    @async_test
    async def test_a_download_s_signature_is_made_ahead_and_used_for_the_next_version(self):
        """A big file fetched whole is signed once the share is idle; its next version is
        asked for with that signature, not with one made then; the delta applies."""
        self.share_path("big.bin").unlink()
        runtime = await self.start_daemon()
        cache = runtime.signatures
        self.assertIsNotNone(cache)
        cache.delay = 0.05
        # (The daemon waits SIGNING_QUIET seconds of a quiet share; a tenth here.)
        cache._idle = signing_idle(runtime, reactor.seconds, quiet_for=0.1)
        peer_id = secrets.token_hex(16)
        peer = await self.connect(RSYNC, peer_id=peer_id)
        peer.send(update(file_entry("big.bin", self.old, vv={peer_id: 1}), revision=1))
        await peer.wait_for("get", where=lambda b: b["path"] == "big.bin")
        peer.send_payload({"type": "file_data", "path": "big.bin"}, self.old)
        await wait_until(lambda: cache.made == 1, what="the signature made ahead")
        made_now = []
        original = rdiff.SignatureReader.__init__
        self.patch(rdiff.SignatureReader, "__init__",
                   lambda reader, *a, **k: (made_now.append(True), original(reader, *a, **k))[1])
        peer.send(update(file_entry("big.bin", self.new, vv={peer_id: 2}), revision=2))
        _, signature = await payload_of(peer, "rsync.signature", "big.bin")
        self.assertEqual((made_now, cache.used), ([], 1))
        scratch = self.outside / "old"
        scratch.write_bytes(self.old)
        self.assertEqual(signature, drain(rdiff.SignatureReader(os.open(scratch, os.O_RDONLY),
                                                                 SIZE)))
        peer.send_payload({"type": "rsync.patch", "path": "big.bin"},
                          delta_for(signature, self.new, str(self.outside / "new")))
        await self.installed()
        self.assertEqual(len(peer.messages("get")), 1)  # the first version's only

    @async_test
    async def test_a_peer_without_rsync_is_asked_with_get(self):
        """Without the negotiated feature the daemon sends a plain ``get``."""
        peer, _ = await self.offer_new_version(ALL_FEATURES)
        await peer.wait_for("get", where=lambda b: b["path"] == "big.bin")
        self.assertEqual(peer.messages("rsync.signature"), [])
        peer.send_payload({"type": "file_data", "path": "big.bin"}, self.new)
        await self.installed()

    @async_test
    async def test_a_delta_reading_beyond_the_old_file_is_refused(self):
        """COPY past the old file's end: refused, logged, the file fetched whole."""
        peer, _ = await self.offer_new_version()
        await self.refused_then_fetched(peer, copy_delta(SIZE - 10, 4096), "copies bytes")

    @async_test
    async def test_a_delta_bomb_is_refused(self):
        """A tiny delta repeating the old file far past the record's size: refused."""
        peer, _ = await self.offer_new_version()
        await self.refused_then_fetched(peer, copy_delta(0, SIZE, times=100), "more than")

    @async_test
    async def test_an_oversize_delta_is_refused(self):
        """More delta bytes than the file could need (one-byte copies): refused."""
        peer, _ = await self.offer_new_version()
        one_byte_copies = b"\x45\x00\x01" * ((SIZE + SIZE // 32 + 100_000) // 3)
        await self.refused_then_fetched(
            peer, struct.pack(">I", rdiff.DELTA_MAGIC) + one_byte_copies, "larger than")

    @async_test
    async def test_a_delta_to_other_content_is_refused(self):
        """A valid delta whose result does not have the announced SHA-256: refused."""
        peer, _ = await self.offer_new_version()
        at, signature = await payload_of(peer, "rsync.signature", "big.bin")
        wrong = delta_for(signature, self.new[:-1] + b"!", str(self.outside / "wrong"))
        peer.send_payload({"type": "rsync.patch", "path": "big.bin"}, wrong)
        await peer.wait_for("get", at, where=lambda b: b["path"] == "big.bin")
        self.assertTrue(any("does not match its SHA-256" in t for t in self.logged()))
        self.assertEqual(self.share_path("big.bin").read_bytes(), self.old)
        peer.send_payload({"type": "file_data", "path": "big.bin"}, self.new)
        await self.installed()

    @async_test
    async def test_get_error_answering_a_signature_falls_back_to_get(self):
        """The peer cannot make a delta: the daemon asks with ``get`` at once."""
        peer, _ = await self.offer_new_version()
        at, _ = await payload_of(peer, "rsync.signature", "big.bin")
        peer.send({"type": "get_error", "path": "big.bin", "message": "bad rsync signature"})
        await peer.wait_for("get", at, where=lambda b: b["path"] == "big.bin")
        peer.send_payload({"type": "file_data", "path": "big.bin"}, self.new)
        await self.installed()

    @async_test
    async def test_a_patch_never_asked_for_closes_the_connection(self):
        """``rsync.patch`` for a path we did not sign: protocol error, nothing written."""
        await self.start_daemon()
        peer = await self.connect(RSYNC)
        before = self.share_path("big.bin").read_bytes()
        peer.send_payload({"type": "rsync.patch", "path": "big.bin"}, copy_delta(0, 10))
        reason = await peer.wait_closed()
        self.assertTrue(reason)
        self.assertTrue(any("did not ask for" in t for t in self.logged()))
        self.assertEqual(self.share_path("big.bin").read_bytes(), before)
        self.assertEqual(self.temp_files(), [])

    # -- answering ------------------------------------------------------------------------

    @async_test
    async def test_the_daemon_answers_a_signature_with_a_delta_rdiff_applies(self):
        """A peer holding an older copy signs it; the daemon's delta rebuilds the daemon's file."""
        self.share_path("big.bin").write_bytes(self.new)
        await self.start_daemon()
        peer = await self.connect(RSYNC)
        scratch = self.outside / "old"
        scratch.write_bytes(self.old)
        signature = drain(rdiff.SignatureReader(os.open(scratch, os.O_RDONLY), SIZE))
        peer.send_payload({"type": "rsync.signature", "path": "big.bin"}, signature,
                          chunk_size=5000)
        _, delta = await payload_of(peer, "rsync.patch", "big.bin")
        self.assertLess(len(delta), 100_000)
        (self.outside / "delta").write_bytes(delta)
        fds = [os.open(scratch, os.O_RDONLY), os.open(self.outside / "delta", os.O_RDONLY),
               os.open(self.outside / "out", os.O_WRONLY | os.O_CREAT, 0o600)]
        try:
            rdiff.patch_file(*fds, limit=SIZE)
        finally:
            for fd in fds:
                os.close(fd)
        self.assertEqual((self.outside / "out").read_bytes(), self.new)

    @async_test
    async def test_a_big_file_is_delta_d_in_two_halves(self):
        """From SPLIT_DELTA bytes on, the two halves made at once join into the same delta."""
        self.patch(rdiff, "SPLIT_DELTA", SIZE)
        self.patch(rdiff, "DELTA_SEGMENT", 256 * 1024)
        made = []
        original = rdiff.SplitDeltaReader.make_second
        self.patch(rdiff.SplitDeltaReader, "make_second",
                   lambda reader: (made.append(True), original(reader))[1])
        self.share_path("big.bin").write_bytes(self.new)
        await self.start_daemon()
        peer = await self.connect(RSYNC)
        scratch = self.outside / "old"
        scratch.write_bytes(self.old)
        signature = drain(rdiff.SignatureReader(os.open(scratch, os.O_RDONLY), SIZE))
        peer.send_payload({"type": "rsync.signature", "path": "big.bin"}, signature,
                          chunk_size=5000)
        _, delta = await payload_of(peer, "rsync.patch", "big.bin")
        self.assertTrue(made)
        loader = rdiff.SignatureLoader()
        loader.feed(signature)
        expected = drain(rdiff.DeltaReader(os.open(self.share_path("big.bin"), os.O_RDONLY),
                                           loader.finish(), segment=256 * 1024))
        self.assertEqual(delta, expected)

    @async_test
    async def test_bad_signatures_are_answered_with_get_error(self):
        """Truncated, garbage and unknown-path signatures get ``get_error``; the connection stays."""
        await self.start_daemon()
        peer = await self.connect(RSYNC)
        scratch = self.outside / "old"
        scratch.write_bytes(self.old)
        signature = drain(rdiff.SignatureReader(os.open(scratch, os.O_RDONLY), SIZE))
        cases = [("big.bin", signature[:-5], "truncated"),
                 ("big.bin", b"not a signature at all", "not an rdiff signature"),
                 ("missing.bin", signature, "no such file")]
        for path, payload, why in cases:
            since = len(peer.events)
            peer.send_payload({"type": "rsync.signature", "path": path}, payload)
            _, body = await peer.wait_for("get_error", since, where=lambda b, p=path: b["path"] == p)
            self.assertIn(why, body["message"])
        self.assertEqual(peer.messages("rsync.patch"), [])
        self.assertFalse(peer.closed)
        self.assertTrue(any("refused the rsync signature" in t for t in self.logged()))
        # Nothing is counted as held for signatures answered so (the budget comes back).
        sessions = list(self.runtime.sync.sessions.values())
        self.assertEqual([s.rsync._held for s in sessions], [0] * len(sessions))
        self.assertTrue(sessions)

    @async_test
    async def test_an_oversize_signature_closes_the_connection(self):
        """A signature past MAX_SIGNATURE_BYTES is refused while it arrives: connection closed."""
        await self.start_daemon()
        peer = await self.connect(RSYNC)
        head = struct.pack(">III", rdiff.OUR_SIGNATURE_MAGIC, 4096, 16)
        peer.send_payload({"type": "rsync.signature", "path": "big.bin"},
                          head + b"\0" * rdiff.MAX_SIGNATURE_BYTES, chunk_size=1024 * 1024)
        await peer.wait_closed(timeout=30)
        self.assertTrue(any("larger than" in t for t in self.logged()))
        self.assertEqual(peer.messages("rsync.patch"), [])

    @async_test
    async def test_a_signature_without_the_feature_closes_the_connection(self):
        """``rsync.signature`` from a peer that did not negotiate ``rsync``: protocol error."""
        await self.start_daemon()
        peer = await self.connect(ALL_FEATURES)
        peer.send_payload({"type": "rsync.signature", "path": "big.bin"}, b"x")
        await peer.wait_closed()
        self.assertTrue(any("not negotiated" in t for t in self.logged()))


