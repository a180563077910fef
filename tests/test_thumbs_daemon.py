"""Extension thumbnails against a real in-process daemon (protocol/thumbnails.md): a scripted
peer asks for thumbnails, honestly and as an attacker, and answers the daemon's asks for a
file it has not downloaded yet, honestly, oversize and unasked."""

from __future__ import annotations

import hashlib
import io
import os
import secrets

import pytest
from twisted.trial.unittest import SkipTest

from clearskies.keys import ShareKeys
from clearskies.sync.thumbs import FLOOD, MAX_PAYLOAD
from clearskies.thumbnails import AVAILABLE, ThumbnailError
from tests.helpers import async_test
from tests.peerkit import ALL_FEATURES, PeerKitCase, ScriptedSession, file_entry, wait_until
from tests.test_rsync_protocol import payload_of
from tests.test_thumbnails import image_bytes

THUMBS = ALL_FEATURES + ("thumbnails",)

Image = pytest.importorskip("PIL.Image", reason="needs Pillow")


def ask(peer: ScriptedSession, ask_id: int, path: str, sha256: str) -> None:
    peer.send({"type": "thumbnail.get", "id": ask_id, "path": path, "sha256": sha256})


async def answer_of(peer: ScriptedSession, ask_id: int) -> dict:
    """The daemon's thumbnail.data or thumbnail.error for ``ask_id``."""
    def found() -> dict | None:
        for body in peer.messages():
            if body["type"] in ("thumbnail.data", "thumbnail.error") and body["id"] == ask_id:
                return body
        return None
    return await wait_until(found, what="the answer to ask %d" % ask_id)


class AnsweringTests(PeerKitCase):
    """The daemon answers a peer's asks from the files it holds, and nothing else."""

    def setUp(self) -> None:
        super().setUp()
        if not AVAILABLE:
            raise SkipTest("needs Pillow")
        self.photo = image_bytes("JPEG", (800, 600))
        (self.share_dir / "photos").mkdir()
        (self.share_dir / "photos" / "beach.jpg").write_bytes(self.photo)
        (self.share_dir / "photos" / "private.jpg").write_bytes(image_bytes("PNG", (50, 50)))
        (self.share_dir / ".clearskiesignore").write_text("private.jpg\n")
        (self.outside / "secret.jpg").write_bytes(self.photo)
        os.symlink(self.outside / "secret.jpg", self.share_dir / "photos" / "link.jpg")
        self.sha = hashlib.sha256(self.photo).hexdigest()

    @async_test
    async def test_a_held_photo_is_answered_with_a_small_jpeg(self):
        """An ask naming a held photo and its SHA-256 gets its thumbnail as a payload."""
        await self.start_daemon()
        peer = await self.connect(THUMBS)
        ask(peer, 1, "photos/beach.jpg", self.sha)
        body = await answer_of(peer, 1)
        self.assertEqual(body["type"], "thumbnail.data")
        _, data = await payload_of(peer, "thumbnail.data", "photos/beach.jpg")
        self.assertEqual(body["size"], len(data))
        self.assertLessEqual(len(data), MAX_PAYLOAD)
        with Image.open(io.BytesIO(data)) as thumb:
            self.assertEqual((thumb.format, thumb.size), ("JPEG", (256, 192)))

    @async_test
    async def test_a_read_only_peer_is_answered_too(self):
        """A connection with the read-only keys may ask as well."""
        runtime = await self.start_daemon()
        keys = ShareKeys.from_keys_message(runtime.keys.keys_message("read_only"))
        peer = await self.connect(THUMBS, keys=keys)
        ask(peer, 1, "photos/beach.jpg", self.sha)
        self.assertEqual((await answer_of(peer, 1))["type"], "thumbnail.data")

    @async_test
    async def test_nothing_beyond_the_share_is_answered(self):
        """Other content, an ignored file, a symbolic link to a file outside, `..` and
        absolute paths: thumbnail.error, never a thumbnail; the connection stays."""
        await self.start_daemon()
        peer = await self.connect(THUMBS)
        cases = [("photos/beach.jpg", "0" * 64, ("not_found", "changed")),
                 ("photos/private.jpg", self.sha, ("not_found",)),
                 ("photos/link.jpg", self.sha, ("not_found",)),
                 ("../outside/secret.jpg", self.sha, ("refused",)),
                 ("/etc/passwd", self.sha, ("refused",)),
                 ("photos/beach.jpg", "../" * 20, ("refused",)),
                 (".clearskiesignore", self.sha, ("not_found",))]
        for n, (path, sha, codes) in enumerate(cases, start=1):
            ask(peer, n, path, sha)
            body = await answer_of(peer, n)
            self.assertEqual(body["type"], "thumbnail.error", path)
            self.assertIn(body["code"], codes, path)
        self.assertEqual(peer.messages("thumbnail.data"), [])
        self.assertFalse(peer.closed)

    @async_test
    async def test_a_peer_without_the_feature_is_not_answered(self):
        """Without the negotiated feature an ask is ignored like any unknown message."""
        await self.start_daemon()
        peer = await self.connect(ALL_FEATURES)
        ask(peer, 1, "photos/beach.jpg", self.sha)
        peer.send({"type": "get_manifest"})  # answered after the ask was dealt with
        await peer.wait_for("manifest")
        self.assertEqual([m for m in peer.messages() if m["type"].startswith("thumbnail")], [])
        self.assertFalse(peer.closed)

    @async_test
    async def test_a_flood_of_asks_is_refused_then_disconnected(self):
        """Hundreds of asks at once: the first few answered, the rest busy at once; past
        FLOOD refusals in a row the daemon closes that connection and serves the next."""
        await self.start_daemon()
        peer = await self.connect(THUMBS)
        for n in range(1, FLOOD + 100):
            ask(peer, n, "photos/beach.jpg", self.sha)
        reason = await peer.wait_closed()
        self.assertIn("flood", reason + " ".join(self.logged()))
        busy = [m for m in peer.messages("thumbnail.error") if m["code"] == "busy"]
        self.assertGreater(len(busy), FLOOD // 2)
        other = await self.connect(THUMBS)
        ask(other, 1, "photos/beach.jpg", self.sha)
        self.assertEqual((await answer_of(other, 1))["type"], "thumbnail.data")


class AskingTests(PeerKitCase):
    """The daemon asks a peer for the thumbnail of a file it wants and has not downloaded."""

    def setUp(self) -> None:
        super().setUp()
        if not AVAILABLE:
            raise SkipTest("needs Pillow")
        self.photo = image_bytes("JPEG", (1200, 900))
        self.sha = hashlib.sha256(self.photo).hexdigest()

    async def offered(self) -> ScriptedSession:
        """A peer that announces photo.jpg and never sends it (the daemon wants it)."""
        peer_id = secrets.token_hex(16)
        peer = await self.connect(THUMBS, peer_id=peer_id)
        peer.send({"type": "manifest", "peer": peer_id, "revision": 1,
                   "files": [file_entry("photo.jpg", self.photo, vv={peer_id: 1})]})
        await peer.wait_for("get", where=lambda b: b["path"] == "photo.jpg")
        return peer

    def thumbnail(self):
        return self.daemon.thumbnails.for_browser(str(self.share_dir), "photo.jpg")

    @async_test
    async def test_the_peer_s_thumbnail_is_shown_checked_and_kept(self):
        """The daemon asks with the path and SHA-256; the peer's JPEG is returned and
        kept, so the next request asks nobody."""
        await self.start_daemon()
        peer = await self.offered()
        d = self.thumbnail()
        _, body = await peer.wait_for("thumbnail.get")
        self.assertEqual((body["path"], body["sha256"]), ("photo.jpg", self.sha))
        small = image_bytes("JPEG", (256, 192))
        peer.send_payload({"type": "thumbnail.data", "id": body["id"], "path": "photo.jpg",
                           "size": len(small)}, small)
        self.assertEqual(await d, small)
        self.assertEqual(await self.thumbnail(), small)
        self.assertEqual(len(peer.messages("thumbnail.get")), 1)
        self.assertFalse(self.share_path("photo.jpg").exists())

    @async_test
    async def test_an_oversize_reply_closes_the_connection(self):
        """A payload over 256 KiB: the daemon stops reading it, closes the connection, and
        the browser is told no thumbnail."""
        await self.start_daemon()
        peer = await self.offered()
        d = self.thumbnail()
        _, body = await peer.wait_for("thumbnail.get")
        peer.send_payload({"type": "thumbnail.data", "id": body["id"], "path": "photo.jpg"},
                          b"\xff\xd8\xff" + os.urandom(MAX_PAYLOAD))
        await peer.wait_closed()
        self.assertTrue(any("larger than" in line for line in self.logged()))
        with self.assertRaises(ThumbnailError):
            await d

    @async_test
    async def test_an_unasked_reply_closes_the_connection(self):
        """A thumbnail.data the daemon never asked for is a protocol error."""
        await self.start_daemon()
        peer = await self.offered()
        peer.send_payload({"type": "thumbnail.data", "id": 99, "path": "photo.jpg"},
                          image_bytes("JPEG", (10, 10)))
        await peer.wait_closed()
        self.assertTrue(any("nothing we asked" in line for line in self.logged()))

    @async_test
    async def test_a_reply_that_is_no_thumbnail_is_not_kept(self):
        """Bytes within the size limit that are no JPEG thumbnail: refused, not cached;
        the connection stays (it broke no framing rule)."""
        await self.start_daemon()
        peer = await self.offered()
        d = self.thumbnail()
        _, body = await peer.wait_for("thumbnail.get")
        peer.send_payload({"type": "thumbnail.data", "id": body["id"], "path": "photo.jpg"},
                          b"<script>alert(1)</script>")
        with self.assertRaises(ThumbnailError) as caught:
            await d
        self.assertEqual(caught.exception.code, "bad_image")
        self.assertEqual(len(self.daemon.thumbnails.maker.cache), 0)
        self.assertFalse(peer.closed)
