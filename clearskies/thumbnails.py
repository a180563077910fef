"""Thumbnails of image files, made with Pillow, and the on-disk cache that keeps them.

Three parts:

- :func:`make_thumbnail` (blocking): an image file (JPEG, PNG, GIF, WebP) →
  a JPEG of at most :data:`MAX_SIDE` pixels on its longest side.  Hostile
  files are refused before Pillow decodes them: more than
  :data:`MAX_IMAGE_PIXELS` pixels (a decompression bomb), a source over
  :data:`MAX_SOURCE_BYTES`, a format not in :data:`FORMATS`, truncated or
  garbage data.  Each refusal is a :class:`ThumbnailError` with a ``code``.
- :class:`ThumbnailCache` (blocking, thread-safe): thumbnails on disk named by
  the content's SHA-256 and size, bounded in total bytes and in file count;
  the least recently used go first.
- :class:`Thumbnailer`: the reactor's side.  Jobs run in the ``files`` pool
  (an :class:`~clearskies.interfaces.IRunner`), at most :data:`MAX_RUNNING` at
  once and :data:`MAX_WAITING` more waiting; one job per content however many
  ask for it; beyond that :class:`Busy` (an HTTP 503 with ``Retry-After``).

Without Pillow, :data:`AVAILABLE` is False and every request is refused
with ``not_supported``; the rest of the daemon does not notice.
"""

from __future__ import annotations

import io
import os
import re
import threading
import warnings
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.python.failure import Failure

from clearskies.interfaces import IRunner

try:
    from PIL import Image, ImageOps
except ImportError:  # pragma: no cover - Pillow is a dependency, but the daemon runs without
    Image = None  # type: ignore[assignment]
    ImageOps = None  # type: ignore[assignment]

AVAILABLE = Image is not None
"""Whether Pillow could be imported: without it no thumbnail is made."""

MAX_SIDE = 256
"""Longest side of a thumbnail, in pixels."""

MAX_IMAGE_PIXELS = 50_000_000
"""Most pixels (width × height) a source image may have.  A decompression bomb
(a small file that decodes to gigabytes: a 50,000 × 50,000 PNG of one colour
is a few hundred KiB) is refused from its header, before any pixel is decoded.
50 megapixels holds every camera photo of today (a 45 MP full-frame sensor,
8256 × 5504) and decodes into at most 200 MB for a moment; Pillow's own
limit (its ``MAX_IMAGE_PIXELS``) is set to this too."""

MAX_SOURCE_BYTES = 200 * 1024 * 1024
"""Largest source file read for a thumbnail (bytes); bigger ones are refused."""

MAX_THUMBNAIL_BYTES = 256 * 1024
"""Largest thumbnail kept or passed on (bytes); a 256-pixel JPEG is far smaller."""

FORMATS = ("JPEG", "PNG", "GIF", "WEBP")
"""Pillow formats read; anything else is ``not_an_image``."""

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".gif", ".webp"})
"""File name endings the file browser offers a thumbnail for."""

JPEG_QUALITY = 80
CONTENT_TYPE = "image/jpeg"

CACHE_MAX_BYTES = 64 * 1024 * 1024
"""Bytes the cache may hold on disk, at most."""
CACHE_MAX_FILES = 10_000
"""Thumbnails the cache may hold, at most."""

MAX_RUNNING = 2
"""Thumbnail jobs in the files pool at once (it has other work to do)."""
MAX_WAITING = 64
"""Jobs waiting for their turn; more requests are refused (:class:`Busy`)."""
MAX_FETCHING = 8
"""Thumbnails being fetched from peers at once (they wait on the network, not the
pool, so they do not take a turn of :data:`MAX_RUNNING`); more are refused."""
RETRY_AFTER = 2
"""Seconds a refused caller is told to wait."""

_SHA256 = re.compile(r"[0-9a-f]{64}")

if Image is not None:
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    # Pillow only warns between its limit and twice it: over ours is an error.
    warnings.filterwarnings("error", category=Image.DecompressionBombWarning)
    _BOMB: tuple[type[BaseException], ...] = (Image.DecompressionBombError,
                                              Image.DecompressionBombWarning)


class ThumbnailError(Exception):
    """Why no thumbnail: ``code`` is ``not_an_image``, ``too_large``, ``bad_image``,
    ``not_found``, ``changed`` or ``not_supported``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Busy(Exception):
    """Too many thumbnail jobs: try again after ``retry_after`` seconds."""

    def __init__(self, retry_after: int = RETRY_AFTER) -> None:
        super().__init__("busy making thumbnails; try again in %d s" % retry_after)
        self.retry_after = retry_after


def is_image_name(path: str) -> bool:
    """Whether a file name looks like an image the browser should show a thumbnail of."""
    return os.path.splitext(path)[1].lower() in IMAGE_SUFFIXES


def thumbnail_of(image: Any) -> bytes:
    """An open Pillow image, its pixel count already checked → JPEG bytes."""
    if image.format == "JPEG":
        image.draft("RGB", (MAX_SIDE, MAX_SIDE))  # decode at 1/2, 1/4 or 1/8 size: faster
    image.seek(0)  # the first frame of an animation
    image.load()
    try:  # a phone's photo stands as it was taken
        image = ImageOps.exif_transpose(image) or image
    except Exception:
        pass  # unreadable orientation data: shown as stored
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P"
                                              and "transparency" in image.info):
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, (255, 255, 255))
        flat.paste(rgba, mask=rgba.getchannel("A"))
        image = flat
    elif image.mode != "RGB":
        image = image.convert("RGB")
    image.thumbnail((MAX_SIDE, MAX_SIDE))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=JPEG_QUALITY, optimize=True)
    data = out.getvalue()
    if len(data) > MAX_THUMBNAIL_BYTES:
        raise ThumbnailError("too_large", "the thumbnail came out over %d bytes"
                             % MAX_THUMBNAIL_BYTES)
    return data


def make_thumbnail(path: str, expected_size: int | None = None) -> bytes:
    """The thumbnail of the image file at ``path`` as JPEG bytes (blocking).

    ``expected_size``: the size the caller's record gives; a file of another
    size changed since, and is refused with ``changed``.
    """
    if not AVAILABLE:
        raise ThumbnailError("not_supported", "thumbnails need Pillow (pip install pillow)")
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise ThumbnailError("not_found", "the file is not here") from None
    except OSError as e:
        raise ThumbnailError("not_found", "the file cannot be read: %s"
                             % (e.strerror or e)) from None
    with f:
        size = os.fstat(f.fileno()).st_size
        if expected_size is not None and size != expected_size:
            raise ThumbnailError("changed", "the file changed; try again after the next scan")
        if size > MAX_SOURCE_BYTES:
            raise ThumbnailError("too_large", "the file is over %d MiB"
                                 % (MAX_SOURCE_BYTES // (1024 * 1024)))
        return thumbnail_from(f)


def thumbnail_from(source: Any) -> bytes:
    """The thumbnail of an image read from the binary file object ``source``."""
    try:
        image = Image.open(source, formats=FORMATS)
    except _BOMB:
        raise ThumbnailError("too_large", "the image has over %d pixels"
                             % MAX_IMAGE_PIXELS) from None
    except (Image.UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise ThumbnailError("not_an_image", "not a JPEG, PNG, GIF or WebP image") from None
    with image:
        width, height = image.size
        if width < 1 or height < 1:
            raise ThumbnailError("bad_image", "the image has no pixels")
        if width * height > MAX_IMAGE_PIXELS:
            raise ThumbnailError("too_large", "the image is %d × %d pixels, over %d"
                                 % (width, height, MAX_IMAGE_PIXELS))
        try:
            return thumbnail_of(image)
        except ThumbnailError:
            raise
        except _BOMB:
            raise ThumbnailError("too_large", "the image has over %d pixels"
                                 % MAX_IMAGE_PIXELS) from None
        except (OSError, ValueError, SyntaxError, EOFError, IndexError, MemoryError) as e:
            raise ThumbnailError("bad_image", "the image is damaged or truncated (%s)"
                                 % str(e)[:100]) from None


def is_thumbnail(data: bytes) -> bool:
    """Whether bytes from elsewhere (a peer) are a JPEG within our bounds."""
    if not AVAILABLE or not 0 < len(data) <= MAX_THUMBNAIL_BYTES or data[:3] != b"\xff\xd8\xff":
        return False
    try:
        with Image.open(io.BytesIO(data), formats=("JPEG",)) as image:
            width, height = image.size
            if max(width, height) > MAX_SIDE or min(width, height) < 1:
                return False
            image.load()
    except Exception:
        return False
    return True


def cache_key(sha256: str, size: int) -> str:
    """The cache's name for a content: its SHA-256 and size (ValueError when malformed)."""
    if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
        raise ValueError("sha256 must be 64 lower-case hex digits")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError("size must be a count of bytes")
    return "%s-%d" % (sha256, size)


class ThumbnailCache:
    """Thumbnails in one directory, named ``<sha256>-<size>.jpg``; blocking, thread-safe.

    At most ``max_bytes`` and ``max_files``: each :meth:`put` removes the
    least recently used (read or written) until both hold.  What is on disk
    at the first use is taken in, oldest first.
    """

    SUFFIX = ".jpg"

    def __init__(self, directory: str, max_bytes: int = CACHE_MAX_BYTES,
                 max_files: int = CACHE_MAX_FILES) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.max_files = max_files
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, int] | None = None  # key -> bytes, oldest first
        self._bytes = 0

    @property
    def total_bytes(self) -> int:
        with self._lock:
            self._load()
            return self._bytes

    def __len__(self) -> int:
        with self._lock:
            self._load()
            return len(self._entries or ())

    def _path(self, key: str) -> str:
        return os.path.join(self.directory, key + self.SUFFIX)

    def _load(self) -> None:
        if self._entries is not None:
            return
        found = []
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        with os.scandir(self.directory) as entries:
            for entry in entries:
                name = entry.name
                if name.endswith(".tmp"):
                    _unlink(entry.path)
                    continue
                if not name.endswith(self.SUFFIX):
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                    cache_key(*_split(name[:-len(self.SUFFIX)]))
                except (OSError, ValueError):
                    continue
                found.append((st.st_mtime, name[:-len(self.SUFFIX)], st.st_size))
        found.sort()
        self._entries = OrderedDict((key, size) for _, key, size in found)
        self._bytes = sum(size for _, _, size in found)
        self._evict()

    def get(self, key: str) -> bytes | None:
        with self._lock:
            self._load()
            assert self._entries is not None
            if key not in self._entries:
                return None
            self._entries.move_to_end(key)
        try:
            with open(self._path(key), "rb") as f:
                data = f.read(MAX_THUMBNAIL_BYTES + 1)
        except OSError:
            data = b""
        if not data or len(data) > MAX_THUMBNAIL_BYTES:
            self.remove(key)
            return None
        try:
            os.utime(self._path(key))  # least recently used survives a restart too
        except OSError:
            pass
        return data

    def put(self, key: str, data: bytes) -> None:
        if not 0 < len(data) <= MAX_THUMBNAIL_BYTES:
            raise ValueError("a thumbnail must be 1 to %d bytes" % MAX_THUMBNAIL_BYTES)
        with self._lock:
            self._load()
        temporary = self._path(key) + ".%d.tmp" % threading.get_ident()
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(temporary, self._path(key))
        except BaseException:
            _unlink(temporary)
            raise
        with self._lock:
            assert self._entries is not None
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old
            self._entries[key] = len(data)
            self._bytes += len(data)
            self._evict()

    def remove(self, key: str) -> None:
        with self._lock:
            if self._entries is not None and key in self._entries:
                self._bytes -= self._entries.pop(key)
        _unlink(self._path(key))

    def _evict(self) -> None:
        """(Lock held.)  Oldest first until within both bounds."""
        assert self._entries is not None
        while self._entries and (len(self._entries) > self.max_files
                                 or self._bytes > self.max_bytes):
            key, size = self._entries.popitem(last=False)
            self._bytes -= size
            _unlink(self._path(key))


def _split(key: str) -> tuple[str, int]:
    sha256, _, size = key.partition("-")
    if not size.isdigit():
        raise ValueError("not a cache name")
    return sha256, int(size)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _cached_or_made(cache: ThumbnailCache, key: str,
                    make: Callable[[], bytes]) -> bytes:
    """(Worker thread.)  The cached thumbnail, else ``make()``'s, then cached."""
    data = cache.get(key)
    if data is not None:
        return data
    data = make()
    try:
        cache.put(key, data)
    except OSError:
        pass  # a full disk: the thumbnail is still shown, only not kept
    return data


class Thumbnailer:
    """Thumbnails for the reactor: made in ``runner`` (the files pool), cached, bounded.

    :meth:`local` makes (or finds) the thumbnail of a file on disk;
    :meth:`fetched` finds one in the cache or gets it with a callable (a
    peer, protocol/thumbnails.md) and keeps it.  :meth:`local` fails with
    :class:`Busy` when :data:`MAX_RUNNING` jobs run and :data:`MAX_WAITING`
    wait, :meth:`fetched` when :data:`MAX_FETCHING` fetches are under way;
    either with :class:`ThumbnailError` when the content has none.
    """

    def __init__(self, runner: IRunner, cache: ThumbnailCache,
                 max_running: int = MAX_RUNNING, max_waiting: int = MAX_WAITING,
                 max_fetching: int = MAX_FETCHING) -> None:
        self.runner = runner
        self.cache = cache
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.max_fetching = max_fetching
        self.running = 0
        self.fetching = 0
        self._jobs: dict[str, list[Deferred[bytes]]] = {}
        self._queue: deque[tuple[str, Callable[[], Deferred[bytes]]]] = deque()

    def local(self, path: str, sha256: str, size: int) -> Deferred[bytes]:
        """The thumbnail of the file at ``path`` whose record says ``sha256``, ``size``."""
        try:
            key = cache_key(sha256, size)
        except ValueError as e:
            return fail(ThumbnailError("not_found", str(e)))
        if not AVAILABLE:
            return fail(ThumbnailError("not_supported", "thumbnails need Pillow"))
        cache = self.cache
        return self._job(key, lambda: self.runner.run(
            _cached_or_made, cache, key, lambda: make_thumbnail(path, size)))

    def fetched(self, sha256: str, size: int,
                fetch: Callable[[], Deferred[bytes]]) -> Deferred[bytes]:
        """The cached thumbnail of this content, else ``fetch()``'s (checked, then kept)."""
        try:
            key = cache_key(sha256, size)
        except ValueError as e:
            return fail(ThumbnailError("not_found", str(e)))
        waiters = self._jobs.get(key)
        d: Deferred[bytes] = Deferred()
        if waiters is not None:
            waiters.append(d)
            return d
        if self.fetching >= self.max_fetching:
            return fail(Busy())
        self._jobs[key] = [d]
        self.fetching += 1
        Deferred.fromCoroutine(self._fetch_async(key, fetch)).addBoth(self._fetched, key)
        return d

    def _fetched(self, result: Any, key: str) -> None:
        self.fetching -= 1
        self._settle(result, key)

    async def _fetch_async(self, key: str, fetch: Callable[[], Deferred[bytes]]) -> bytes:
        cached = await self.runner.run(self.cache.get, key)
        if cached is not None:
            return cached
        data = await fetch()
        if not await self.runner.run(is_thumbnail, data):
            raise ThumbnailError("bad_image", "the peer's thumbnail is not a JPEG within "
                                 "%d pixels and %d bytes" % (MAX_SIDE, MAX_THUMBNAIL_BYTES))
        try:
            await self.runner.run(self.cache.put, key, data)
        except OSError:
            pass
        return data

    def _job(self, key: str, start: Callable[[], Deferred[bytes]]) -> Deferred[bytes]:
        waiters = self._jobs.get(key)
        d: Deferred[bytes] = Deferred()
        if waiters is not None:  # the same content is on its way: one job for all
            waiters.append(d)
            return d
        if self.running >= self.max_running and len(self._queue) >= self.max_waiting:
            return fail(Busy())
        self._jobs[key] = [d]
        self._queue.append((key, start))
        self._pump()
        return d

    def _pump(self) -> None:
        while self._queue and self.running < self.max_running:
            key, start = self._queue.popleft()
            self.running += 1
            try:
                job = start()
            except Exception as e:
                job = fail(e)
            job.addBoth(self._done, key)

    def _done(self, result: Any, key: str) -> None:
        self.running -= 1
        self._settle(result, key)
        self._pump()

    def _settle(self, result: Any, key: str) -> None:
        for waiter in self._jobs.pop(key, []):
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)


__all__ = ["AVAILABLE", "Busy", "MAX_IMAGE_PIXELS", "MAX_SIDE", "MAX_THUMBNAIL_BYTES",
           "ThumbnailCache", "ThumbnailError", "Thumbnailer", "cache_key", "is_image_name",
           "is_thumbnail", "make_thumbnail"]
