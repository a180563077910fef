"""Blobs and metadata an untrusted peer stores but cannot read (``protocol/untrusted.md``).

Trusted peers derive every key here from the share's read_only PSK, which an
untrusted peer never holds (section 2).  A file version is sealed into a blob
of AES-256-GCM chunks under a key of its own (sections 3.2 to 3.4); its path,
size, SHA-256, mtime and mode into an AES-SIV ``meta`` (section 4).

Both directions stream with memory bounded by one chunk: :class:`BlobSealer`
takes plaintext as it is read, :class:`BlobOpener` ciphertext as it arrives,
and neither hands out a byte that has not been authenticated.  Opening stops
at the first problem with a :class:`SealError` saying what is wrong; the
caller throws away whatever it wrote so far.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from clearskies.errors import ProtocolError

CHUNK_SHIFT = 16
CHUNK_SIZE = 1 << CHUNK_SHIFT
"""Plaintext bytes per chunk (section 3.4)."""
TAG_SIZE = 16
HEADER = b"CSU1" + bytes([CHUNK_SHIFT]) + bytes(11)
"""The 16-byte header of a format 1 blob."""
MIN_PADDED = 4096
META_BLOCK = 256
MAX_META_CHARS = 16 * 1024
"""Most base64 characters a ``meta`` may have (a 4,096-byte path, escaped, fits)."""
MAX_MODE = 0o7777

_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX32 = re.compile(r"[0-9a-f]{32}")
_META_AAD = b"clearskies untrusted v1 meta"


class SealError(ProtocolError):
    """A blob or ``meta`` that does not open: tampered, truncated, of another file or
    version, or of an unknown format.  Nothing of it may reach the share."""


def padded_size(size: int) -> int:
    """The plaintext length after padding (section 3.3): at most 1/16 more, at least 4 KiB."""
    if size < 0:
        raise ValueError("a size cannot be negative")
    granule = max(MIN_PADDED, 1 << max(0, size.bit_length() - 5))
    return max(MIN_PADDED, -(-size // granule) * granule)


def chunk_count(size: int) -> int:
    """How many chunks the blob of a ``size``-byte file has."""
    return math.ceil(padded_size(size) / CHUNK_SIZE)


def blob_size(size: int) -> int:
    """The length of the blob of a ``size``-byte file."""
    return len(HEADER) + padded_size(size) + TAG_SIZE * chunk_count(size)


def _nonce(index: int, final: bool) -> bytes:
    return index.to_bytes(11, "big") + (b"\x01" if final else b"\x00")


def _hkdf(ikm: bytes, info: bytes, length: int = 32, salt: bytes | None = None) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def _file_id_bytes(file_id: str) -> bytes:
    if not isinstance(file_id, str) or not _HEX32.fullmatch(file_id):
        raise SealError("a file id must be 32 hex characters")
    return bytes.fromhex(file_id)


def _sha256_bytes(sha256: str) -> bytes:
    if not isinstance(sha256, str) or not _HEX64.fullmatch(sha256):
        raise SealError("a SHA-256 must be 64 hex characters")
    return bytes.fromhex(sha256)


@dataclass(frozen=True)
class FileMeta:
    """What ``meta`` states about one file (section 4)."""

    path: str
    sha256: str
    size: int
    mtime: tuple[int, int]
    """(seconds, nanoseconds), as records carry it."""
    mode: int

    def to_json(self) -> bytes:
        return json.dumps({"v": 1, "path": self.path, "sha256": self.sha256, "size": self.size,
                           "mtime": list(self.mtime), "mode": self.mode},
                          separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False).encode("utf-8")

    @classmethod
    def from_json(cls, text: bytes) -> FileMeta:
        try:
            d = json.loads(text.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise SealError("meta is not JSON") from None
        if not isinstance(d, dict) or d.get("v") != 1:
            raise SealError("meta is not a format 1 object")
        path, sha256, size, mtime, mode = (d.get(k) for k in
                                           ("path", "sha256", "size", "mtime", "mode"))
        if not isinstance(path, str) or not path:
            raise SealError("meta has no path")
        _sha256_bytes(sha256)
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise SealError("meta's size is not a non-negative integer")
        if not isinstance(mtime, list) or len(mtime) != 2 \
                or not all(type(x) is int for x in mtime) or not 0 <= mtime[1] < 10**9:
            raise SealError("meta's mtime is not [seconds, nanoseconds]")
        if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= MAX_MODE:
            raise SealError("meta's mode is not permission bits")
        return cls(path, sha256, size, (mtime[0], mtime[1]), mode)


class ContentKeys:
    """The keys a trusted peer derives for one share's backups (section 2).

    Never hand any of them, nor anything that leads to them, to an untrusted peer.
    """

    def __init__(self, share_id: str, read_only_psk: str) -> None:
        if not isinstance(share_id, str) or not _HEX64.fullmatch(share_id):
            raise ValueError("share_id must be 64 hex characters")
        if not isinstance(read_only_psk, str) or not _HEX32.fullmatch(read_only_psk):
            raise ValueError("the read_only PSK must be 32 hex characters")
        self.share_id = share_id
        self._share_id = bytes.fromhex(share_id)
        self._root = _hkdf(bytes.fromhex(read_only_psk), b"clearskies untrusted v1 content",
                           salt=self._share_id)
        self._id_key = _hkdf(self._root, b"clearskies untrusted v1 file id")
        self._meta = AESSIV(_hkdf(self._root, b"clearskies untrusted v1 metadata", 64))

    def __repr__(self) -> str:
        return "ContentKeys(share_id={!r})".format(self.share_id)  # never the keys

    def file_id(self, path: str) -> str:
        """The opaque id of ``path`` (section 3.1), 32 hex characters."""
        return hmac.new(self._id_key, path.encode("utf-8"), hashlib.sha256).hexdigest()[:32]

    def _version_key(self, file_id: str, sha256: str) -> bytes:
        return _hkdf(self._root, b"clearskies untrusted v1 file" + _file_id_bytes(file_id)
                     + _sha256_bytes(sha256))

    # -- metadata --------------------------------------------------------------------

    def seal_meta(self, meta: FileMeta) -> tuple[str, str]:
        """(file id, ``meta`` text) for one file's record."""
        file_id = self.file_id(meta.path)
        FileMeta.from_json(meta.to_json())  # the same checks a receiver makes
        plain = meta.to_json()
        plain += bytes(-len(plain) % META_BLOCK)
        sealed = self._meta.encrypt(plain, [_META_AAD, self._share_id, bytes.fromhex(file_id)])
        return file_id, base64.b64encode(sealed).decode("ascii")

    def open_meta(self, file_id: str, meta: str) -> FileMeta:
        """The record ``meta`` states for ``file_id``; SealError unless it is authentic
        and belongs to that id."""
        id_bytes = _file_id_bytes(file_id)
        if not isinstance(meta, str) or len(meta) > MAX_META_CHARS:
            raise SealError("meta must be base64 text of at most %d characters"
                            % MAX_META_CHARS)
        try:
            sealed = base64.b64decode(meta, validate=True)
        except (binascii.Error, ValueError):
            raise SealError("meta is not base64") from None
        try:
            plain = self._meta.decrypt(sealed, [_META_AAD, self._share_id, id_bytes])
        except (InvalidTag, ValueError):
            raise SealError("meta of %s does not authenticate (tampered, or of another "
                            "file or share)" % file_id) from None
        opened = FileMeta.from_json(plain.rstrip(b"\x00"))
        if not hmac.compare_digest(self.file_id(opened.path), file_id):
            raise SealError("meta of %s names a path of another id" % file_id)
        return opened

    # -- blobs -----------------------------------------------------------------------

    def sealer(self, file_id: str, sha256: str, size: int) -> BlobSealer:
        """Seal the version of ``file_id`` whose plaintext has ``sha256`` and ``size``."""
        return BlobSealer(self._version_key(file_id, sha256), file_id, sha256, size)

    def opener(self, file_id: str, meta: FileMeta) -> BlobOpener:
        """Open the blob of ``file_id`` holding the version ``meta`` states."""
        return BlobOpener(self._version_key(file_id, meta.sha256), file_id, meta.sha256,
                          meta.size)

    def seal_bytes(self, file_id: str, data: bytes) -> bytes:
        """A whole blob for content in memory (small files, tests)."""
        sealer = self.sealer(file_id, hashlib.sha256(data).hexdigest(), len(data))
        return sealer.write(data) + b"".join(sealer.finish())


class BlobSealer:
    """Plaintext in, blob out (section 3.4); the output is whole chunks as they fill."""

    def __init__(self, key: bytes, file_id: str, sha256: str, size: int) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError("size must be a non-negative integer")
        self._aead = AESGCM(key)
        self._aad = HEADER + bytes.fromhex(file_id)
        self._sha256 = sha256
        self._size = size
        self._chunks = chunk_count(size)
        self._padded = padded_size(size)
        self._index = 0
        self._taken = 0
        self._hash = hashlib.sha256()
        self._buffer = bytearray()
        self._header_sent = False

    @property
    def taken(self) -> int:
        """Plaintext bytes written so far."""
        return self._taken

    def _seal(self, plain: bytes) -> bytes:
        final = self._index == self._chunks - 1
        out = self._aead.encrypt(_nonce(self._index, final), plain, self._aad)
        self._index += 1
        return out

    def write(self, data: bytes) -> bytes:
        """Take plaintext; return the blob bytes now ready (possibly none)."""
        self._taken += len(data)
        if self._taken > self._size:
            raise ValueError("more plaintext than the %d bytes declared" % self._size)
        self._hash.update(data)
        self._buffer += data
        out = []
        if not self._header_sent:
            out.append(HEADER)
            self._header_sent = True
        while len(self._buffer) >= CHUNK_SIZE and self._index < self._chunks - 1:
            out.append(self._seal(bytes(self._buffer[:CHUNK_SIZE])))
            del self._buffer[:CHUNK_SIZE]
        return b"".join(out)

    def finish(self) -> Iterator[bytes]:
        """The rest of the blob, padding included, a chunk at a time.

        ValueError (before anything more is returned) if the plaintext was not
        the declared size or SHA-256: the file changed while it was read.
        """
        if self._taken != self._size or self._hash.hexdigest() != self._sha256:
            raise ValueError("the plaintext is not the declared version (it changed "
                             "while it was read)")
        if not self._header_sent:
            self._header_sent = True
            yield HEADER
        position = self._taken - len(self._buffer)
        while self._index < self._chunks:
            end = min(position + CHUNK_SIZE, self._padded)
            want = end - position
            plain = bytes(self._buffer[:want])
            del self._buffer[:want]
            plain += bytes(want - len(plain))
            position = end
            yield self._seal(plain)


class BlobOpener:
    """Blob in, authenticated plaintext out (section 3.4), one chunk at a time."""

    def __init__(self, key: bytes, file_id: str, sha256: str, size: int) -> None:
        self._aead = AESGCM(key)
        self._file_id = file_id
        self._aad = HEADER + bytes.fromhex(file_id)
        self._sha256 = sha256
        self._size = size
        self._chunks = chunk_count(size)
        self._padded = padded_size(size)
        self.expected = blob_size(size)
        """The blob's length; anything longer or shorter is refused."""
        self._received = 0
        self._index = 0
        self._plain_out = 0
        self._hash = hashlib.sha256()
        self._buffer = bytearray()
        self._header_seen = False
        self._failed: str | None = None

    def _fail(self, why: str) -> SealError:
        self._failed = why
        return SealError("blob of %s: %s" % (self._file_id, why))

    def _open(self, sealed: bytes) -> bytes:
        final = self._index == self._chunks - 1
        try:
            plain = self._aead.decrypt(_nonce(self._index, final), sealed, self._aad)
        except InvalidTag:
            raise self._fail("chunk %d does not authenticate (tampered, reordered, or of "
                             "another file or version)" % self._index) from None
        self._index += 1
        keep = max(0, min(len(plain), self._size - self._plain_out))
        if any(plain[keep:]):
            raise self._fail("padding is not zero")
        self._plain_out += keep
        data = plain[:keep]
        self._hash.update(data)
        return data

    def feed(self, data: bytes) -> bytes:
        """Take blob bytes; return the plaintext of every chunk they completed."""
        if self._failed is not None:
            raise SealError("blob of %s already refused: %s" % (self._file_id, self._failed))
        self._received += len(data)
        if self._received > self.expected:
            raise self._fail("longer than the %d bytes of its version" % self.expected)
        self._buffer += data
        if not self._header_seen:
            if len(self._buffer) < len(HEADER):
                return b""
            if bytes(self._buffer[:len(HEADER)]) != HEADER:
                raise self._fail("not a format 1 blob (unknown header)")
            del self._buffer[:len(HEADER)]
            self._header_seen = True
        out = []
        while self._index < self._chunks:
            remaining = self._padded - self._index * CHUNK_SIZE
            want = min(CHUNK_SIZE, remaining) + TAG_SIZE
            if len(self._buffer) < want:
                break
            out.append(self._open(bytes(self._buffer[:want])))
            del self._buffer[:want]
        return b"".join(out)

    def finish(self) -> None:
        """Check the blob ended where it must and held the stated version; SealError if not."""
        if self._failed is not None:
            raise SealError("blob of %s already refused: %s" % (self._file_id, self._failed))
        if self._index < self._chunks or self._buffer:
            raise self._fail("truncated: %d of %d bytes" % (self._received, self.expected))
        if self._hash.hexdigest() != self._sha256:
            raise self._fail("its content is not the version stated")

    def open_all(self, blob: bytes) -> bytes:
        """A whole blob in memory: its plaintext, or SealError."""
        data = self.feed(blob)
        self.finish()
        return data


def challenge_answer(prefix: bytes, blob_pieces: Iterator[bytes] | list[bytes]) -> str:
    """SHA-256(prefix ‖ blob) in hex: the answer to ``untrusted.verify`` (section 6.3)."""
    if len(prefix) != 32:
        raise ValueError("a challenge prefix is 32 bytes")
    digest = hashlib.sha256(prefix)
    for piece in blob_pieces:
        digest.update(piece)
    return digest.hexdigest()
