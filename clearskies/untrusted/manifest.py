"""The signed manifest an untrusted peer holds, and the rule against rollback.

``protocol/untrusted.md``, section 5: a read_write peer lists every blob of
the share (id, blob size, blob SHA-256, sealed ``meta``) in one
``untrusted.manifest`` line signed with the read_write key.  Everyone, the
untrusted peer included, refuses one that is not so signed; a trusted peer
also refuses one older than the newest it has accepted (:class:`RevisionGuard`).
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from typing import Any

from clearskies import jsonshape, keys, wire
from clearskies.untrusted.sealing import MAX_META_CHARS, SealError

MESSAGE_TYPE = "untrusted.manifest"
MAX_FILES = 30_000
"""Most entries one manifest may list (with short paths, one line of 16 MiB holds them)."""

_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX32 = re.compile(r"[0-9a-f]{32}")


class RollbackError(SealError):
    """A validly signed manifest older than one already accepted."""


@dataclass(frozen=True)
class BlobEntry:
    """One file in the backup: its id, and its blob's size and SHA-256; ``meta`` sealed."""

    id: str
    size: int
    sha256: str
    meta: str

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "size": self.size, "sha256": self.sha256, "meta": self.meta}


@dataclass(frozen=True)
class SignedManifest:
    """A verified (or just made) manifest with the exact text and signature that prove it."""

    share_id: str
    revision: int
    time: float
    files: tuple[BlobEntry, ...]
    text: bytes
    signature: bytes

    def by_id(self) -> dict[str, BlobEntry]:
        return {entry.id: entry for entry in self.files}

    def encoded(self) -> bytes:
        """The ``$`` line and its signature line, as sent and relayed."""
        return wire.encode_signed(self.text, self.signature)

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.text).hexdigest()


def make_manifest(share_id: str, revision: int, time: float, files: list[BlobEntry],
                  read_write_private_pem: bytes) -> SignedManifest:
    """Sign a manifest of ``files`` (any order; listed by id)."""
    if isinstance(revision, bool) or not isinstance(revision, int) or revision < 1:
        raise ValueError("revision must be a positive integer")
    ordered = sorted(files, key=lambda entry: entry.id)
    if len({entry.id for entry in ordered}) != len(ordered):
        raise ValueError("a file id is listed twice")
    body = {"type": MESSAGE_TYPE, "share_id": share_id, "revision": revision, "time": time,
            "files": [entry.to_json() for entry in ordered]}
    if len(ordered) > MAX_FILES:
        raise ValueError("%d files are more than one manifest may list (%d)"
                         % (len(ordered), MAX_FILES))
    text = wire.dumps(body)
    if len(text) > wire.MAX_LINE_LENGTH - 1:
        raise ValueError("the manifest would be %d bytes, more than one line may hold"
                         % len(text))
    manifest = _parse(text)  # what a receiver checks, checked before we sign
    signature = keys.sign(read_write_private_pem, text)
    return SignedManifest(manifest.share_id, manifest.revision, manifest.time, manifest.files,
                          text, signature)


def read_manifest(text: bytes, signature: bytes, share_id: str,
                  read_write_public_pem: bytes) -> SignedManifest:
    """Check a received manifest line; SealError unless it is a well-formed manifest of
    ``share_id`` signed with its read_write key."""
    if not keys.verify(read_write_public_pem, text, signature):
        raise SealError("untrusted.manifest is not signed with the share's read_write key")
    manifest = _parse(text)
    if manifest.share_id != share_id:
        raise SealError("untrusted.manifest names another share")
    return SignedManifest(manifest.share_id, manifest.revision, manifest.time, manifest.files,
                          text, signature)


def _parse(text: bytes) -> SignedManifest:
    try:
        body = jsonshape.loads(text, max_items=8 * MAX_FILES + 64, max_depth=4)
    except ValueError as e:
        raise SealError("untrusted.manifest is not valid JSON: %s" % e) from None
    if not isinstance(body, dict) or body.get("type") != MESSAGE_TYPE:
        raise SealError("not an untrusted.manifest")
    share_id, revision, time, files = (body.get(k) for k in
                                       ("share_id", "revision", "time", "files"))
    if not isinstance(share_id, str) or not _HEX64.fullmatch(share_id):
        raise SealError("untrusted.manifest's share_id is not 64 hex characters")
    if isinstance(revision, bool) or not isinstance(revision, int) or revision < 1:
        raise SealError("untrusted.manifest's revision is not a positive integer")
    if isinstance(time, bool) or not isinstance(time, (int, float)) or not math.isfinite(time):
        raise SealError("untrusted.manifest's time is not a number")
    if not isinstance(files, list) or len(files) > MAX_FILES:
        raise SealError("untrusted.manifest's files is not a list of at most %d" % MAX_FILES)
    entries = []
    previous = ""
    for item in files:
        entry = _entry(item)
        if entry.id <= previous:
            raise SealError("untrusted.manifest's files are not ordered by id, or repeat one")
        previous = entry.id
        entries.append(entry)
    return SignedManifest(share_id, revision, time, tuple(entries), text, b"")


def _entry(item: object) -> BlobEntry:
    if not isinstance(item, dict):
        raise SealError("an untrusted.manifest entry is not an object")
    file_id, size, sha256, meta = (item.get(k) for k in ("id", "size", "sha256", "meta"))
    if not isinstance(file_id, str) or not _HEX32.fullmatch(file_id):
        raise SealError("an untrusted.manifest entry's id is not 32 hex characters")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise SealError("an untrusted.manifest entry's size is not a byte count")
    if not isinstance(sha256, str) or not _HEX64.fullmatch(sha256):
        raise SealError("an untrusted.manifest entry's sha256 is not 64 hex characters")
    if not isinstance(meta, str) or not 0 < len(meta) <= MAX_META_CHARS:
        raise SealError("an untrusted.manifest entry's meta is not text of at most %d "
                        "characters" % MAX_META_CHARS)
    return BlobEntry(file_id, size, sha256, meta)


class RevisionGuard:
    """The newest manifest revision a trusted peer accepted for one share (section 5).

    ``revision`` and ``digest`` are what to store across restarts.
    """

    def __init__(self, revision: int = 0, digest: str | None = None) -> None:
        self.revision = revision
        self.digest = digest

    def check(self, manifest: SignedManifest) -> None:
        """RollbackError if ``manifest`` is older than (or contradicts) the newest accepted."""
        if manifest.revision < self.revision:
            raise RollbackError("untrusted.manifest revision %d is older than %d, already "
                                "accepted" % (manifest.revision, self.revision))
        if manifest.revision == self.revision and self.digest is not None \
                and manifest.digest != self.digest:
            raise RollbackError("untrusted.manifest revision %d differs from the one "
                                "already accepted with that revision" % manifest.revision)

    def accept(self, manifest: SignedManifest) -> None:
        """Check, then remember ``manifest`` as the newest."""
        self.check(manifest)
        self.revision = manifest.revision
        self.digest = manifest.digest

    def next_revision(self) -> int:
        """The revision for a manifest we make now."""
        return self.revision + 1
