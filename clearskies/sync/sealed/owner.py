"""The trusted side of one share's untrusted peers (``protocol/untrusted.md``).

:class:`Owner` holds what a read_write or read_only share knows about its
backups: the content keys it derives, the newest manifest revision it
accepted (kept across restarts: rollback is refused), the manifest it made
last and which file each of its blobs seals, and what each untrusted peer
holds and how it did in its last challenge (``clearskies status``).  Only a
read_write share makes manifests; both kinds restore from them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from twisted.logger import Logger

from clearskies.errors import ClearSkiesError
from clearskies.interfaces import IRunner
from clearskies.sync.sealed.files import blob_digest
from clearskies.untrusted.manifest import (
    BlobEntry,
    RevisionGuard,
    SignedManifest,
    make_manifest,
)
from clearskies.untrusted.sealing import ContentKeys, FileMeta, SealError

#: Store config key prefix: the newest accepted manifest revision of a share.
SEEN_KEY = "untrusted_seen:"
DEFAULT_CHALLENGE_INTERVAL = 86400
BUILD_SLICE = 10.0
"""Seconds one manifest spends sealing new versions for their digests: a big share's
first manifest goes out with what is ready and grows at each look after."""


@dataclass(frozen=True)
class Source:
    """What one blob of our manifest seals: a file version of ours."""

    path: str
    sha256: str
    size: int
    blob_size: int
    blob_sha256: str


@dataclass
class PeerBackup:
    """What we know of one untrusted peer's copy (shown by ``status``)."""

    connected: bool = False
    revision: int = 0
    files: int = 0
    bytes: int = 0
    last_challenge: float | None = None
    last_passed: float | None = None
    challenges_failed: int = 0
    lost: dict[str, float] = field(default_factory=dict)  # path -> when it was found lost

    def to_json(self) -> dict[str, Any]:
        return {"untrusted": True, "holds_revision": self.revision, "holds_files": self.files,
                "holds_bytes": self.bytes, "last_challenge": self.last_challenge,
                "last_challenge_passed": self.last_passed,
                "challenges_failed": self.challenges_failed, "lost": sorted(self.lost)}


class Owner:
    """One trusted share's backups on untrusted peers.

    ``share`` is the running share as this needs it: ``share_id``, ``store``,
    ``files_runner``, ``paths.to_local`` (blocking) and ``revision()``.
    """

    _log = Logger()

    def __init__(self, share: Any, keys: Any, clock: Any,
                 challenge_interval: Callable[[], int]) -> None:
        self.share = share
        self.share_id: str = share.share_id
        self.store = share.store
        self.runner: IRunner = share.files_runner
        self.clock = clock
        self.challenge_interval = challenge_interval
        self.content = ContentKeys(self.share_id, keys.psks["read_only"])
        self.public_keys: dict[str, bytes] = dict(keys.public_keys)
        self.keys = keys
        #: The share's codes for escrow, (code, level, expires, live) (protocol/untrusted.md,
        #: section 8); set by the daemon.
        self.escrow_codes: Callable[[], list[tuple[bytes, str, Any, bool]]] = lambda: []
        self.signing_key: bytes | None = keys.private_keys.get("read_write")
        self.challenge_key: bytes = keys.private_keys.get("read_write") \
            or keys.private_keys["read_only"]
        self.guard = RevisionGuard()
        self.accepted: SignedManifest | None = None  # the newest we accepted or made
        self.made: SignedManifest | None = None
        self.sources: dict[str, Source] = {}
        self.peers: dict[str, PeerBackup] = {}
        self._digests: dict[tuple[str, str], tuple[int, str]] = {}
        self._built_for: tuple[int, str | None] | None = None
        self._loaded = False
        self._building = False
        self.problem: str | None = None  # why no manifest can be made (too many files)
        self.incomplete = False  # the last manifest left out new versions not sealed yet

    async def load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        seen = await self.store.get_config(SEEN_KEY + self.share_id)
        if isinstance(seen, dict) and isinstance(seen.get("revision"), int):
            self.guard = RevisionGuard(seen["revision"], seen.get("digest"))

    def peer(self, peer_id: str) -> PeerBackup:
        return self.peers.setdefault(peer_id, PeerBackup())

    async def accept(self, manifest: SignedManifest) -> None:
        """Remember ``manifest`` as the newest (RollbackError if it is older)."""
        self.guard.accept(manifest)
        self.accepted = manifest
        await self.store.set_config(SEEN_KEY + self.share_id,
                                    {"revision": self.guard.revision,
                                     "digest": self.guard.digest})

    def open_meta(self, entry: BlobEntry) -> FileMeta | None:
        try:
            return self.content.open_meta(entry.id, entry.meta)
        except SealError as e:
            self._log.warn("an entry of the signed untrusted manifest does not open: {why}",
                           why=e)
            return None

    # -- our manifest ---------------------------------------------------------------------

    async def build(self, force: bool = False) -> SignedManifest | None:
        """Our manifest now, signed, if the share changed since the last (read_write).

        Files whose path we know nothing of (the accepted manifest lists them, our
        records do not: being restored, or not restorable here) are listed as
        they were, so a share that has not restored everything yet never drops
        anything from its backups.  A read_only share signs nothing: it offers
        the newest manifest it accepted, and serves the blobs of it that seal
        files it holds in the same version.
        """
        if self._building:
            return None
        revision = self.share.revision()
        state = (revision, self.accepted.digest if self.accepted is not None else None)
        if not force and self.made is not None and state == self._built_for \
                and not self.incomplete:
            return None
        self._building = True
        try:
            if self.signing_key is None:
                await self._adopt_accepted()
                result = None
            else:
                result = await self._build(revision)
            self._built_for = (revision,
                               self.accepted.digest if self.accepted is not None else None)
            return result
        finally:
            self._building = False

    async def _adopt_accepted(self) -> None:
        accepted = self.accepted
        sources: dict[str, Source] = {}
        for entry in accepted.files if accepted is not None else ():
            meta = self.open_meta(entry)
            if meta is None:
                continue
            record = await self.store.get_record(self.share_id, meta.path)
            if record is not None and not record.deleted and record.sha256 == meta.sha256:
                sources[entry.id] = Source(meta.path, meta.sha256, meta.size, entry.size,
                                           entry.sha256)
        self.sources, self.made = sources, accepted

    async def _build(self, revision: int) -> SignedManifest | None:
        entries: dict[str, BlobEntry] = {}
        sources: dict[str, Source] = {}
        known: set[str] = set()
        previous = self.accepted.by_id() if self.accepted is not None else {}
        deadline = self.clock.seconds() + BUILD_SLICE
        sealed_now = 0
        incomplete = False
        async for page in self.store.iter_records(self.share_id):
            for record in page:
                file_id = self.content.file_id(record.path)
                known.add(file_id)
                if record.deleted or record.is_dir or record.sha256 is None:
                    continue
                meta = FileMeta(record.path, record.sha256, record.size or 0,
                                record.mtime or (0, 0),
                                record.mode if record.mode is not None else 0o644)
                _, sealed = self.content.seal_meta(meta)
                listed = previous.get(file_id)
                if listed is not None and listed.meta == sealed:
                    # This very version is listed (the metadata is deterministic): its
                    # signed entry gives the blob's digest without sealing it again.
                    digest: tuple[int, str] | None = (listed.size, listed.sha256)
                elif sealed_now and self.clock.seconds() >= deadline:
                    incomplete = True  # next time: listed as it was, or not yet
                    digest = None
                else:
                    digest = await self._digest(file_id, meta)
                    sealed_now += 1
                if digest is None:  # changed since it was scanned: as it was, if listed
                    if listed is not None:
                        entries[file_id] = listed
                    continue
                entries[file_id] = BlobEntry(file_id, digest[0], digest[1], sealed)
                sources[file_id] = Source(record.path, record.sha256, meta.size, *digest)
        for file_id, entry in previous.items():
            if file_id not in known:
                entries[file_id] = entry
        self._digests = {(file_id, s.sha256): (s.blob_size, s.blob_sha256)
                         for file_id, s in sources.items()}
        self.incomplete = incomplete
        if self.accepted is not None and set(entries.values()) == set(self.accepted.files):
            self.sources = sources
            if self.made is None or self.made.digest != self.accepted.digest:
                self.made = self.accepted
            return None
        try:
            manifest = make_manifest(self.share_id, self.guard.next_revision(),
                                     round(self.clock.seconds()), list(entries.values()),
                                     self.signing_key)
        except ValueError as e:
            if self.problem is None:
                self._log.warn("share {share} cannot be backed up on untrusted peers: {why}",
                               share=self.share_id[:8], why=e)
            self.problem = "cannot be backed up on untrusted peers: %s" % e
            return None
        self.problem = None
        await self.accept(manifest)
        self.made, self.sources = manifest, sources
        self._log.info("made untrusted manifest revision {revision} of share {share} "
                       "({files} files)", revision=manifest.revision, share=self.share_id[:8],
                       files=len(manifest.files))
        return manifest

    async def _digest(self, file_id: str, meta: FileMeta) -> tuple[int, str] | None:
        key = (file_id, meta.sha256)
        known = self._digests.get(key)
        if known is not None:
            return known
        try:
            local = await self.runner.run(self.share.paths.to_local, meta.path)
            digest = await self.runner.run(blob_digest, str(local), self.content, file_id,
                                           meta.sha256, meta.size)
        except (OSError, ValueError, ClearSkiesError) as e:
            self._log.info("{path} not sealed for untrusted peers now: {why}",
                           path=meta.path, why=e)
            return None
        self._digests[key] = digest
        return digest
