"""What an untrusted peer keeps on disk, and the files a restore writes (blocking).

An untrusted share's folder holds one blob file per listed file version,
named ``<file id>.<first 32 hex of the blob's SHA-256>`` (opaque: nothing of
a name or content), and ``untrusted-manifest``: the signed manifest it
holds, its line and its signature line (``protocol/untrusted.md``, section 5).
Everything here blocks: run it through the files runner.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import tempfile

from clearskies.atomicwrite import install_atomically
from clearskies.transfer.names import temp_name

MANIFEST_NAME = "untrusted-manifest"
MAX_MANIFEST_BYTES = 17 * 1024 * 1024
_BLOB_NAME = re.compile(r"[0-9a-f]{32}\.[0-9a-f]{32}")


def blob_name(file_id: str, sha256: str) -> str:
    """The name of the blob of ``file_id`` whose SHA-256 is ``sha256``."""
    return "%s.%s" % (file_id, sha256[:32])


def load_manifest(root: str) -> tuple[bytes, bytes] | None:
    """(text, signature) of the manifest held, or None (none yet, or unreadable)."""
    try:
        with open(os.path.join(root, MANIFEST_NAME), "rb") as f:
            raw = f.read(MAX_MANIFEST_BYTES)
    except FileNotFoundError:
        return None
    lines = raw.split(b"\n")
    if len(lines) < 2 or not lines[0] or not lines[1]:
        return None
    try:
        return lines[0], base64.b64decode(lines[1], validate=True)
    except (binascii.Error, ValueError):
        return None


def save_manifest(root: str, text: bytes, signature: bytes) -> None:
    """Keep ``text`` and its signature as the manifest held (atomically, fsynced)."""
    fd, temporary = tempfile.mkstemp(prefix=".%s." % MANIFEST_NAME, suffix=".!clearsky",
                                     dir=root)
    install_atomically(fd, temporary, os.path.join(root, MANIFEST_NAME),
                       text + b"\n" + base64.b64encode(signature) + b"\n")


def blob_present(root: str, name: str, size: int) -> bool:
    """Whether the blob file ``name`` is there with ``size`` bytes."""
    try:
        return os.stat(os.path.join(root, name)).st_size == size
    except OSError:
        return False


def absent(root: str, blobs: list[tuple[str, int]]) -> list[str]:
    """The names among ``blobs`` (name, size) that are not there with that size."""
    return [name for name, size in blobs if not blob_present(root, name, size)]


def prune(root: str, keep: set[str]) -> int:
    """Remove blob files not in ``keep`` (nothing else); how many were removed."""
    removed = 0
    with os.scandir(root) as entries:
        for entry in entries:
            if _BLOB_NAME.fullmatch(entry.name) and entry.name not in keep:
                try:
                    os.unlink(entry.path)
                    removed += 1
                except FileNotFoundError:
                    pass
    return removed


def read_piece(root: str, name: str, offset: int, length: int) -> bytes:
    """``length`` bytes of a blob from ``offset`` (fewer at its end)."""
    with open(os.path.join(root, name), "rb") as f:
        f.seek(offset)
        return f.read(length)


def hash_blob(root: str, name: str, prefix: bytes) -> tuple[str, str] | None:
    """(SHA-256 of prefix ‖ blob, SHA-256 of the blob), or None if it is not there."""
    answer = hashlib.sha256(prefix)
    own = hashlib.sha256()
    try:
        with open(os.path.join(root, name), "rb") as f:
            while True:
                piece = f.read(1 << 20)
                if not piece:
                    break
                answer.update(piece)
                own.update(piece)
    except FileNotFoundError:
        return None
    return answer.hexdigest(), own.hexdigest()


class TempFile:
    """A file written beside its target under a hidden temporary name, then put in place.

    Every method blocks; call them one after the other (each after the last finished).
    """

    def __init__(self, directory: str, target_name: str, tag: str) -> None:
        os.makedirs(directory, exist_ok=True)
        self.directory = directory
        self.target = os.path.join(directory, target_name)
        self.path = os.path.join(directory, temp_name(target_name, tag))
        self._f = open(self.path, "wb")
        self.written = 0
        self.sha256 = hashlib.sha256()

    def write(self, data: bytes) -> None:
        self._f.write(data)
        self.written += len(data)
        self.sha256.update(data)

    def replace(self) -> None:
        """Put it in place, replacing what is there."""
        self._close()
        os.replace(self.path, self.target)

    def install_new(self, mode: int, mtime_ns: int) -> bool:
        """Put it in place with ``mode`` and ``mtime_ns`` only if nothing is at the
        target yet; False (and removed) if something is."""
        self._close()
        os.chmod(self.path, mode)
        os.utime(self.path, ns=(mtime_ns, mtime_ns))
        try:
            os.link(self.path, self.target)
        except FileExistsError:
            os.unlink(self.path)
            return False
        os.unlink(self.path)
        return True

    def _close(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()

    def discard(self) -> None:
        try:
            self._f.close()
        finally:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
