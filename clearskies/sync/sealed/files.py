"""A trusted peer's files sealed into blobs, and blobs opened back into files (blocking).

:class:`SealedReader` reads one file of the share as its blob, a piece at a
time; :func:`blob_digest` gives the blob's size and SHA-256 without keeping
it.  :class:`RestoreFile` takes a blob as it arrives, writes only
authenticated plaintext to a hidden temporary file, and puts the file in
place (with its mode and mtime) only once the whole blob proved to be the
version the manifest states, and only where nothing is yet
(``protocol/untrusted.md``, section 3.4).  Run every method in the files
runner, one after the other.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator

from clearskies.sync.sealed.vault import TempFile
from clearskies.untrusted.sealing import ContentKeys, FileMeta, SealError

READ = 1 << 20


def sealed_pieces(path: str, keys: ContentKeys, file_id: str, sha256: str,
                  size: int) -> Iterator[bytes]:
    """The blob of the file at ``path``, which must hold version ``sha256``; ValueError
    (before the blob's last piece) if it does not any more."""
    sealer = keys.sealer(file_id, sha256, size)
    with open(path, "rb") as f:
        while True:
            data = f.read(min(READ, size - sealer.taken + 1))
            if not data:
                break
            piece = sealer.write(data)  # ValueError if the file grew
            if piece:
                yield piece
    yield from sealer.finish()


def blob_digest(path: str, keys: ContentKeys, file_id: str, sha256: str,
                size: int) -> tuple[int, str]:
    """(size, SHA-256) of the blob the file at ``path`` seals to."""
    digest = hashlib.sha256()
    length = 0
    for piece in sealed_pieces(path, keys, file_id, sha256, size):
        digest.update(piece)
        length += len(piece)
    return length, digest.hexdigest()


def challenge_expected(path: str, keys: ContentKeys, file_id: str, sha256: str, size: int,
                       prefix: bytes) -> str:
    """SHA-256(prefix ‖ blob) for our own copy: what a keeper of the blob must answer."""
    digest = hashlib.sha256(prefix)
    for piece in sealed_pieces(path, keys, file_id, sha256, size):
        digest.update(piece)
    return digest.hexdigest()


class SealedReader:
    """One file read as its blob: ``read(offset, length)`` with offsets in order."""

    def __init__(self, path: str, keys: ContentKeys, file_id: str, sha256: str,
                 size: int) -> None:
        self._pieces = sealed_pieces(path, keys, file_id, sha256, size)
        self._buffer = bytearray()
        self._offset = 0

    def read(self, offset: int, length: int) -> bytes:
        if offset != self._offset:
            raise ValueError("a sealed file is read in order")
        while len(self._buffer) < length:
            piece = next(self._pieces, None)
            if piece is None:
                break
            self._buffer += piece
        out = bytes(self._buffer[:length])
        del self._buffer[:length]
        self._offset += len(out)
        return out


class RestoreFile:
    """A blob arriving for ``meta`` (its file id ``file_id``), becoming the file at ``target``."""

    def __init__(self, target: str, keys: ContentKeys, file_id: str, meta: FileMeta,
                 blob_sha256: str, blob_size: int) -> None:
        self._opener = keys.opener(file_id, meta)
        if self._opener.expected != blob_size:
            raise SealError("the manifest's blob size does not fit the file's size")
        self._meta = meta
        self._blob_sha256 = blob_sha256
        self._blob = hashlib.sha256()
        self._file = TempFile(os.path.dirname(target), os.path.basename(target), meta.sha256)

    def write(self, data: bytes) -> None:
        self._blob.update(data)
        plain = self._opener.feed(data)  # SealError at the first bad chunk
        if plain:
            self._file.write(plain)

    def install(self) -> bool:
        """Check the whole blob, then put the file in place; False if something is there
        now (nothing is replaced).  SealError if the blob is not the version stated."""
        if self._blob.hexdigest() != self._blob_sha256:
            raise SealError("the blob is not the one the manifest lists")
        self._opener.finish()
        seconds, nanoseconds = self._meta.mtime
        return self._file.install_new(self._meta.mode, seconds * 1_000_000_000 + nanoseconds)

    def discard(self) -> None:
        self._file.discard()
