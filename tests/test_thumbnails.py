"""Thumbnails: each format, hostile images, the cache's bounds, the job limits
(clearskies.thumbnails)."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import pytest
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from clearskies import thumbnails
from clearskies.thumbnails import (
    MAX_IMAGE_PIXELS, MAX_SIDE, Busy, ThumbnailCache, ThumbnailError, Thumbnailer, cache_key,
    is_thumbnail, make_thumbnail,
)
from clearskies.threads import SyncRunner
from tests.fakes import HeldRunner

Image = pytest.importorskip("PIL.Image", reason="needs Pillow")


def image_bytes(kind: str, size: tuple[int, int] = (800, 600), mode: str = "RGB") -> bytes:
    """A picture (a gradient, so it compresses like a photo, not like a flat colour)."""
    image = Image.new(mode, size)
    image.putdata([((x * 7) % 256, (y * 5) % 256, (x + y) % 256)[:len(mode)]
                   if mode != "P" else (x + y) % 256
                   for y in range(size[1]) for x in range(size[0])])
    out = io.BytesIO()
    image.save(out, kind)
    return out.getvalue()


def png_bomb(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width × height pixels (of one colour, deflated)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xffffffff)
    row = b"\0" + b"\0" * ((width + 7) // 8)
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(row) for _ in range(min(height, 2000)))
    body += compressor.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0,
                                                               0, 0, 0))
            + chunk(b"IDAT", body) + chunk(b"IEND", b""))


@pytest.mark.parametrize("kind", ["JPEG", "PNG", "GIF", "WEBP"])
def test_each_format_gives_a_small_jpeg(tmp_path: Path, kind: str) -> None:
    """JPEG, PNG, GIF and WebP each become a JPEG of at most MAX_SIDE pixels, proportions
    kept."""
    mode = "P" if kind == "GIF" else "RGB"
    source = tmp_path / ("photo." + kind.lower())
    source.write_bytes(image_bytes(kind, (800, 600), mode))
    data = make_thumbnail(str(source))
    assert data[:3] == b"\xff\xd8\xff" and is_thumbnail(data)
    with Image.open(io.BytesIO(data)) as thumb:
        assert thumb.format == "JPEG" and thumb.size == (MAX_SIDE, 192)


def test_transparent_png_and_a_tall_image(tmp_path: Path) -> None:
    """A transparent PNG is flattened on white; a tall image keeps its height as the long
    side."""
    source = tmp_path / "tall.png"
    source.write_bytes(image_bytes("PNG", (100, 1000), "RGBA"))
    with Image.open(io.BytesIO(make_thumbnail(str(source)))) as thumb:
        assert thumb.size == (26, MAX_SIDE) and thumb.mode == "RGB"


def test_a_phone_photo_stands_as_it_was_taken(tmp_path: Path) -> None:
    """A JPEG whose EXIF says "turn 90°" (as phones store portrait photos) gives a
    portrait thumbnail."""
    image = Image.open(io.BytesIO(image_bytes("JPEG", (800, 600))))
    exif = Image.Exif()
    exif[0x0112] = 6
    out = io.BytesIO()
    image.save(out, "JPEG", exif=exif)
    source = tmp_path / "portrait.jpg"
    source.write_bytes(out.getvalue())
    with Image.open(io.BytesIO(make_thumbnail(str(source)))) as thumb:
        assert thumb.size == (192, MAX_SIDE)


@pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")  # as the daemon
def test_decompression_bomb_is_refused_from_its_header(tmp_path: Path) -> None:
    """A few KiB PNG claiming 100,000 × 100,000 pixels is refused as too large, at once."""
    source = tmp_path / "bomb.png"
    source.write_bytes(png_bomb(100_000, 100_000))
    assert source.stat().st_size < 100_000
    with pytest.raises(ThumbnailError) as caught:
        make_thumbnail(str(source))
    assert caught.value.code == "too_large"
    # Just over the limit is refused too; Pillow's own limit is ours.
    source.write_bytes(png_bomb(MAX_IMAGE_PIXELS // 1000 + 1, 1000))
    with pytest.raises(ThumbnailError) as caught:
        make_thumbnail(str(source))
    assert caught.value.code == "too_large"
    assert Image.MAX_IMAGE_PIXELS == MAX_IMAGE_PIXELS


def test_garbage_truncated_and_other_formats(tmp_path: Path) -> None:
    """Random bytes and a BMP are not images; a truncated JPEG is damaged; a missing file
    is not found; a file whose size is not the record's has changed."""
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(os.urandom(5000))
    with pytest.raises(ThumbnailError) as caught:
        make_thumbnail(str(garbage))
    assert caught.value.code == "not_an_image"
    bmp = tmp_path / "old.jpg"
    bmp.write_bytes(image_bytes("BMP", (50, 50)))
    with pytest.raises(ThumbnailError) as caught:
        make_thumbnail(str(bmp))
    assert caught.value.code == "not_an_image"
    whole = image_bytes("JPEG", (800, 600))
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(whole[:len(whole) // 3])
    with pytest.raises(ThumbnailError) as caught:
        make_thumbnail(str(truncated))
    assert caught.value.code == "bad_image"
    with pytest.raises(ThumbnailError) as caught:
        make_thumbnail(str(tmp_path / "nothing.jpg"))
    assert caught.value.code == "not_found"
    with pytest.raises(ThumbnailError) as caught:
        make_thumbnail(str(truncated), expected_size=len(whole))
    assert caught.value.code == "changed"


def test_is_thumbnail_refuses_what_a_peer_should_not_send() -> None:
    """Only a JPEG within MAX_SIDE pixels and the byte limit passes."""
    assert is_thumbnail(image_bytes("JPEG", (200, 100)))
    assert not is_thumbnail(image_bytes("JPEG", (MAX_SIDE + 1, 10)))
    assert not is_thumbnail(image_bytes("PNG", (20, 10)))
    assert not is_thumbnail(b"\xff\xd8\xff" + os.urandom(1000))
    assert not is_thumbnail(b"\xff\xd8\xff" + b"\0" * thumbnails.MAX_THUMBNAIL_BYTES)
    assert not is_thumbnail(b"")


def test_cache_keys_are_checked() -> None:
    """A cache name is a SHA-256 and a size: nothing that could name another file."""
    assert cache_key("a" * 64, 5) == "a" * 64 + "-5"
    for bad in ("../" + "a" * 61, "A" * 64, "a" * 63, ""):
        with pytest.raises(ValueError):
            cache_key(bad, 5)
    with pytest.raises(ValueError):
        cache_key("a" * 64, -1)


def test_cache_bounded_in_count_and_bytes_least_recently_used_first(tmp_path: Path) -> None:
    """Past either bound the least recently used thumbnails go, on disk too; a read counts
    as a use; a new cache over the same folder finds what is there and keeps the bounds."""
    cache = ThumbnailCache(str(tmp_path / "thumbs"), max_bytes=10_000, max_files=3)
    keys = [cache_key("%064x" % n, n) for n in range(5)]
    for key in keys[:3]:
        cache.put(key, b"x" * 1000)
    assert cache.get(keys[0]) == b"x" * 1000  # used: now the newest
    cache.put(keys[3], b"y" * 1000)
    assert cache.get(keys[1]) is None and len(cache) == 3
    assert sorted(os.listdir(tmp_path / "thumbs")) == sorted(
        k + ".jpg" for k in (keys[0], keys[2], keys[3]))
    cache.put(keys[4], b"z" * 9000)  # bytes: 11,000 > 10,000
    assert cache.total_bytes <= 10_000 and cache.get(keys[4]) == b"z" * 9000
    assert len(os.listdir(tmp_path / "thumbs")) == len(cache)
    (tmp_path / "thumbs" / "junk.tmp").write_bytes(b"half")
    again = ThumbnailCache(str(tmp_path / "thumbs"), max_bytes=5_000, max_files=3)
    assert again.total_bytes <= 5_000 and "junk.tmp" not in os.listdir(tmp_path / "thumbs")
    with pytest.raises(ValueError):
        cache.put(keys[0], b"")


class ThumbnailerTests(TestCase):
    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.dir.mkdir()
        self.photo = self.dir / "photo.jpg"
        self.photo.write_bytes(image_bytes("JPEG", (400, 300)))
        self.size = self.photo.stat().st_size
        self.cache = ThumbnailCache(str(self.dir / "cache"))

    def test_one_job_per_content_and_a_bounded_queue(self) -> None:
        """Many requests for one content share one job; beyond the running and waiting
        bounds a request is refused with Busy at once; queued jobs run as others end."""
        runner = HeldRunner()
        maker = Thumbnailer(runner, self.cache, max_running=1, max_waiting=1)
        first = [maker.local(str(self.photo), "a" * 64, self.size) for _ in range(5)]
        assert len(runner.jobs) == 1
        second = maker.local(str(self.photo), "b" * 64, self.size)  # waits
        refused = maker.local(str(self.photo), "c" * 64, self.size)
        failures: list = []
        refused.addErrback(failures.append)
        assert failures and failures[0].check(Busy) and failures[0].value.retry_after > 0
        results: list = []
        for d in first + [second]:
            d.addCallback(results.append)
        runner.release()
        assert len(results) == 5 and len(set(results)) == 1 and len(runner.jobs) == 1
        runner.release()
        assert len(results) == 6 and maker.running == 0
        # Cached now: found without decoding again.
        self.photo.write_bytes(b"not an image any more" + b"\0" * (self.size - 21))
        d = maker.local(str(self.photo), "a" * 64, self.size)
        runner.release()
        assert self.successResultOf(d) == results[0]

    def test_failures_reach_every_waiter(self) -> None:
        """A garbage file fails every request for it with not_an_image; the next job runs."""
        garbage = self.dir / "garbage.png"
        garbage.write_bytes(os.urandom(3000))
        maker = Thumbnailer(SyncRunner(), self.cache)
        d = maker.local(str(garbage), "d" * 64, 3000)
        assert self.failureResultOf(d, ThumbnailError).value.code == "not_an_image"
        assert maker.running == 0
        assert self.successResultOf(maker.local(str(self.photo), "e" * 64, self.size))

    def test_fetched_checks_and_keeps_what_a_peer_sent(self) -> None:
        """A fetched thumbnail is checked before it is kept; the next ask is a cache hit;
        bytes that are no thumbnail fail with bad_image and are not kept."""
        maker = Thumbnailer(SyncRunner(), self.cache)
        good = image_bytes("JPEG", (128, 96))
        calls: list = []

        def fetch() -> Deferred:
            calls.append(1)
            d: Deferred = Deferred()
            d.callback(good)
            return d
        assert self.successResultOf(maker.fetched("f" * 64, 10, fetch)) == good
        assert self.successResultOf(maker.fetched("f" * 64, 10, fetch)) == good
        assert len(calls) == 1

        def bad() -> Deferred:
            d: Deferred = Deferred()
            d.callback(b"<html>")
            return d
        failure = self.failureResultOf(maker.fetched("0" * 64, 10, bad), ThumbnailError)
        assert failure.value.code == "bad_image" and len(self.cache) == 1

    def test_fetches_are_bounded_apart_from_local_jobs(self) -> None:
        """Fetches waiting on peers take no turn of the local jobs; past max_fetching a
        fetch is refused with Busy; one fetch serves every request for its content."""
        maker = Thumbnailer(SyncRunner(), self.cache, max_running=1, max_fetching=2)
        pending = [Deferred() for _ in range(2)]
        waiting = [maker.fetched("%064x" % n, 10, lambda n=n: pending[n]) for n in range(2)]
        again = maker.fetched("%064x" % 0, 10, lambda: pending[0])
        refused = maker.fetched("9" * 64, 10, lambda: Deferred())
        self.failureResultOf(refused, Busy)
        assert self.successResultOf(maker.local(str(self.photo), "e" * 64, self.size))
        good = image_bytes("JPEG", (64, 48))
        pending[0].callback(good)
        assert self.successResultOf(waiting[0]) == good == self.successResultOf(again)
        assert maker.fetching == 1
        pending[1].callback(b"junk")
        self.failureResultOf(waiting[1], ThumbnailError)
        assert maker.fetching == 0


def test_without_pillow_nothing_is_made_and_nothing_breaks(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the image library a thumbnail is refused as not_supported, and a peer's
    bytes are never taken for a thumbnail."""
    monkeypatch.setattr(thumbnails, "AVAILABLE", False)
    source = tmp_path / "photo.jpg"
    source.write_bytes(image_bytes("JPEG", (50, 50)))
    with pytest.raises(ThumbnailError) as caught:
        make_thumbnail(str(source))
    assert caught.value.code == "not_supported"
    assert not is_thumbnail(image_bytes("JPEG", (50, 50)))
    maker = Thumbnailer(SyncRunner(), ThumbnailCache(str(tmp_path / "cache")))
    failures: list = []
    maker.local(str(source), "a" * 64, 10).addErrback(failures.append)
    assert failures[0].value.code == "not_supported"
