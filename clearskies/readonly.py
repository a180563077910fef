"""Read-only shares (REFERENCE §10): signed metadata, verbatim relaying, the rules.

A read-only peer may pass a share on but never change it, and that is
enforced by signatures, not by trusting the peer:

* a read_write peer signs every ``manifest``, ``update`` and ``move`` it
  sends to a less trusted peer with the share's read_write RSA key;
* a read-only peer merges only metadata carrying a valid read_write
  signature, keeps those signed messages (:class:`SignedStore`) and hands
  them on to other read-only peers exactly as it received them, never its
  own records — so whatever it relays still proves itself;
* a read_write peer accepts no metadata at all from a read-only connection.

The pure rules and the store are at the top; :class:`ShareSigning` is the
per-share face the sync layer calls; :func:`count_unshared` and
:func:`revert` serve the control commands.  See ``protocol/readonly.md``.
"""

from __future__ import annotations

import base64
import binascii
import json
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from clearskies import keys as keys_module
from clearskies import wire
from clearskies.errors import ProtocolError
from clearskies.share import merge
from clearskies.share.records import FileRecord

_log = Logger()

READ_WRITE = "read_write"
FEATURE = "read_only_manifest"
RO_MANIFEST = "read_only_manifest.manifest"
SIGNED_TYPES = frozenset({"manifest", "update", "move"})
"""Messages that state file metadata: signed for peers below read_write."""

MAX_MANIFEST_ORIGINS = 64
"""Signed manifests kept per share (one per read_write peer); the oldest go first."""

MAX_SOURCES = 64
RESEND_DELAY = 0.5
"""Seconds to gather downloads before announcing a fuller bitmask again."""

MANIFEST = "manifest"
UPDATE = "update"


# -- pure rules ----------------------------------------------------------------------


def signs_for(our_access: str, peer_access: str) -> bool:
    """We sign metadata for a peer when we hold read_write and it does not."""
    return our_access == READ_WRITE and peer_access != READ_WRITE


def relays_only(our_access: str) -> bool:
    """A share without the read_write key only ever relays signed messages."""
    return our_access != READ_WRITE


def metadata_verdict(our_access: str, peer_access: str, signed: bool,
                     valid: bool) -> str | None:
    """None when received metadata may be merged, else why it is dropped.

    A read_write share takes changes only from read_write connections (their
    messages need no signature, as between draft peers).  Any other share
    takes only what the read_write key signed, whoever relays it.
    """
    if our_access == READ_WRITE:
        if peer_access == READ_WRITE:
            return None
        return "changes from a %s peer are never accepted" % peer_access
    if not signed:
        return "not signed with the read_write key"
    if not valid:
        return "bad read_write signature"
    return None


def held(record: FileRecord, local: FileRecord | None) -> bool:
    """We hold ``record``'s version: its content is what our own record says is on disk."""
    if record.deleted:
        return local is None or local.deleted
    return local is not None and record.same_content(local)


def held_bitmask(files: list[FileRecord], local: Mapping[str, FileRecord]) -> bytes:
    """Bit i (most significant bit first) set when we hold ``files[i]``."""
    out = bytearray((len(files) + 7) // 8)
    for i, record in enumerate(files):
        if held(record, local.get(record.path)):
            out[i // 8] |= 0x80 >> (i % 8)
    return bytes(out)


def bitmask_selects(bitmask: bytes, files: list[Any]) -> list[Any]:
    """The entries of ``files`` whose bit is set."""
    return [f for i, f in enumerate(files)
            if i // 8 < len(bitmask) and bitmask[i // 8] & (0x80 >> (i % 8))]


def newer(candidate: FileRecord, current: FileRecord) -> bool:
    """Whether ``candidate`` supersedes ``current`` for the same path."""
    if candidate.vv and current.vv:
        order = merge.vv_compare(candidate.vv, current.vv)
        if order == merge.AFTER:
            return True
        if order in (merge.BEFORE, merge.EQUAL):
            return False
    return merge.winner(candidate, current) is candidate and candidate != current


def unshared_paths(local: Iterable[FileRecord], share: Mapping[str, FileRecord],
                   our_peer_id: str) -> list[str]:
    """Paths where our files differ from the share's (signed) version by our own doing.

    A path counts when it exists only here, or when our record carries a
    change of ours (our counter in its version vector is past the share's)
    and its content differs.  Files not yet downloaded do not count.
    """
    out = []
    for record in local:
        theirs = share.get(record.path)
        if theirs is None:
            if not record.deleted:
                out.append(record.path)
            continue
        if record.same_content(theirs):
            continue
        if record.vv.get(our_peer_id, 0) > theirs.vv.get(our_peer_id, 0):
            out.append(record.path)
    return sorted(out)


# -- signed messages -------------------------------------------------------------------


@dataclass(frozen=True)
class SignedMessage:
    """One signed metadata message exactly as the read_write peer wrote it."""

    text: bytes
    signature: bytes
    body: dict = field(compare=False, hash=False)

    @classmethod
    def parse(cls, text: bytes, signature: bytes) -> SignedMessage:
        """ProtocolError unless ``text`` is a JSON object of a signed type."""
        try:
            body = json.loads(text)
        except ValueError:
            raise ProtocolError("signed text is not JSON") from None
        if not isinstance(body, dict) or body.get("type") not in SIGNED_TYPES:
            raise ProtocolError("signed text is not a manifest, update or move")
        return cls(text, signature, body)

    @property
    def type(self) -> str:
        return self.body["type"]

    def encode(self) -> bytes:
        """The ``$`` message as it arrived (same text, same signature)."""
        return wire.encode_signed(self.text, self.signature)

    def as_source_text(self) -> str:
        """Text line, newline, base64 signature: the form §10's ``sources`` carry."""
        return self.text.decode("utf-8") + "\n" + base64.b64encode(self.signature).decode()

    @classmethod
    def from_source_text(cls, value: object) -> SignedMessage:
        if not isinstance(value, str) or "\n" not in value:
            raise ProtocolError("a read_only_manifest source needs text and a signature line")
        text, _, encoded = value.rstrip("\n").rpartition("\n")
        try:
            signature = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise ProtocolError("source signature is not base64") from None
        if not text or not signature:
            raise ProtocolError("empty source manifest or signature")
        return cls.parse(text.encode("utf-8"), signature)

    def records(self) -> list[FileRecord]:
        """The records the message states (a move: destination then source tombstone)."""
        if self.type == MANIFEST:
            files = self.body.get("files")
            if not isinstance(files, list):
                raise ProtocolError("manifest without a files list")
            return [FileRecord.from_wire(f) for f in files]
        if self.type == UPDATE:
            return [FileRecord.from_wire(self.body.get("file"))]
        destination = FileRecord.from_wire(self.body.get("destination"))
        source = FileRecord(path=_source_path(self.body), utime=destination.utime,
                            deleted=True, vv=dict(destination.vv))
        return [destination, source]

    @property
    def key(self) -> str:
        """Where the store keeps it: the origin peer for a manifest, else the path."""
        if self.type == MANIFEST:
            return str(self.body.get("peer", ""))
        return self.records()[0].path


def _source_path(body: dict) -> str:
    from clearskies.share.records import validate_wire_path
    return validate_wire_path(body.get("source"))


def sign_body(private_pem: bytes, body: dict) -> bytes:
    """The ``$`` wire bytes of ``body`` signed with ``private_pem``."""
    text = wire.dumps(body)
    return wire.encode_signed(text, keys_module.sign(private_pem, text))


def verify(public_pem: bytes, text: bytes, signature: bytes | None) -> bool:
    """Whether ``signature`` is the read_write key's signature of ``text``."""
    return signature is not None and keys_module.verify(public_pem, text, signature)


class SignedStore:
    """The newest signed manifest of each origin and the newest signed change of each path.

    Pure and in memory; :meth:`add` returns the rows to write or delete so the
    caller can persist them (``(kind, key, message or None)``).
    """

    def __init__(self) -> None:
        self.manifests: dict[str, SignedMessage] = {}
        self.updates: dict[str, SignedMessage] = {}
        self._manifest_records: dict[str, dict[str, FileRecord]] = {}
        self._update_records: dict[str, FileRecord] = {}

    def __len__(self) -> int:
        return len(self.manifests) + len(self.updates)

    def add(self, message: SignedMessage) -> list[tuple[str, str, SignedMessage | None]]:
        """Keep ``message`` if it is news; the persistence changes it causes."""
        if message.type == MANIFEST:
            return self._add_manifest(message)
        record = message.records()[0]
        current = self._update_records.get(record.path)
        if current is not None and not newer(record, current):
            return []
        shared = self.share_record(record.path)
        if current is None and shared is not None and not newer(record, shared):
            return []
        self.updates.pop(record.path, None)
        self.updates[record.path] = message
        self._update_records[record.path] = record
        return [(UPDATE, record.path, message)]

    def _add_manifest(self, message: SignedMessage) -> list[tuple[str, str, SignedMessage | None]]:
        origin = message.key
        current = self.manifests.get(origin)
        revision = message.body.get("revision", message.body.get("version"))
        if current is not None:
            old = current.body.get("revision", current.body.get("version"))
            if isinstance(old, (int, float)) and isinstance(revision, (int, float)) \
                    and revision <= old:
                return []
        records = {r.path: r for r in message.records()}
        changes: list[tuple[str, str, SignedMessage | None]] = []
        self.manifests.pop(origin, None)
        self.manifests[origin] = message
        self._manifest_records[origin] = records
        changes.append((MANIFEST, origin, message))
        while len(self.manifests) > MAX_MANIFEST_ORIGINS:
            oldest = next(iter(self.manifests))
            del self.manifests[oldest]
            del self._manifest_records[oldest]
            changes.append((MANIFEST, oldest, None))
        for path, update in list(self._update_records.items()):
            covered = records.get(path)
            if covered is not None and not newer(update, covered):
                del self.updates[path]
                del self._update_records[path]
                changes.append((UPDATE, path, None))
        return changes

    def share_record(self, path: str) -> FileRecord | None:
        """The share's version of ``path`` as the signed messages state it."""
        best = self._update_records.get(path)
        for records in self._manifest_records.values():
            candidate = records.get(path)
            if candidate is not None and (best is None or newer(candidate, best)):
                best = candidate
        return best

    def share_records(self) -> dict[str, FileRecord]:
        """Every path's signed version (moves also state their source's deletion)."""
        out: dict[str, FileRecord] = {}

        def offer(record: FileRecord) -> None:
            current = out.get(record.path)
            if current is None or newer(record, current):
                out[record.path] = record

        for records in self._manifest_records.values():
            for record in records.values():
                offer(record)
        for message in self.updates.values():
            for record in message.records():
                offer(record)
        return out

    def manifest_files(self, origin: str) -> list[FileRecord]:
        return list(self._manifest_records.get(origin, {}).values())

    def for_path(self, path: str) -> SignedMessage | None:
        return self.updates.get(path)

    def in_manifest(self, record: FileRecord) -> bool:
        """Some stored manifest states exactly this content for the path."""
        return any((r := records.get(record.path)) is not None and r.same_content(record)
                   for records in self._manifest_records.values())

    def rows(self) -> list[tuple[str, str, bytes, bytes]]:
        return [(MANIFEST, k, m.text, m.signature) for k, m in self.manifests.items()] + \
               [(UPDATE, k, m.text, m.signature) for k, m in self.updates.items()]

    def load(self, rows: Iterable[tuple[str, str, bytes, bytes]]) -> None:
        """Restore persisted rows (manifests first, so updates are judged against them)."""
        rows = sorted(rows, key=lambda row: row[0] != MANIFEST)
        for _kind, _key, text, signature in rows:
            try:
                self.add(SignedMessage.parse(bytes(text), bytes(signature)))
            except ProtocolError as e:
                _log.warn("dropping a stored signed message: {why}", why=str(e))


# -- the sync layer's view ---------------------------------------------------------------


@dataclass
class _RelayState:
    """What one connection already holds of our signed messages."""

    sent: set[bytes] = field(default_factory=set)
    resend: Any = None


class ShareSigning:
    """Per share: sign what we send, judge what we receive, relay the signed store."""

    _log = Logger()

    def __init__(self, keys: Any, clock: Any, our_peer_id: str,
                 persist: Callable[[list[tuple[str, str, SignedMessage | None]]], None]
                 | None = None) -> None:
        self.keys = keys
        self.our_peer_id = our_peer_id
        self.clock = clock
        self.store = SignedStore()
        self.persist = persist
        self.forgeries = 0
        self._states: weakref.WeakKeyDictionary[Any, _RelayState] = weakref.WeakKeyDictionary()

    @property
    def access(self) -> str:
        return self.keys.access

    @property
    def read_only(self) -> bool:
        return relays_only(self.access)

    def _state(self, session: Any) -> _RelayState:
        state = self._states.get(session)
        if state is None:
            state = self._states[session] = _RelayState()
        return state

    # -- sending ---------------------------------------------------------------------------

    def signs_for(self, peer_access: str) -> bool:
        return signs_for(self.access, peer_access)

    def requests_manifest_from(self, peer_access: str) -> bool:
        """A read_write share never asks a lower peer for changes it would drop."""
        return not (self.access == READ_WRITE and peer_access != READ_WRITE)

    def encode(self, body: dict) -> bytes:
        return sign_body(self.keys.private_keys[READ_WRITE], body)

    # -- receiving -------------------------------------------------------------------------

    def _public(self) -> bytes:
        return self.keys.public_keys[READ_WRITE]

    def admit(self, session: Any, message: wire.Message, peer_access: str) -> bool:
        """Whether a received manifest/update/move may be merged; stores signed ones."""
        signed = message.signature is not None
        valid = signed and self.access != READ_WRITE and \
            verify(self._public(), message.text, message.signature)
        why = metadata_verdict(self.access, peer_access, signed, valid)
        if why is not None:
            self._dropped(session, message.type, why)
            return False
        if self.access != READ_WRITE:
            assert message.signature is not None
            self._keep(session, SignedMessage.parse(message.text, message.signature))
        return True

    def _dropped(self, session: Any, kind: str, why: str) -> None:
        self.forgeries += 1
        self._log.warn("dropped {type} from {peer} ({access}): {why}", type=kind,
                       peer=session.peer_id, access=session.connection.established.access,
                       why=why)

    def _keep(self, session: Any, message: SignedMessage) -> None:
        self._state(session).sent.add(message.signature)  # it has it: never echo it back
        changes = self.store.add(message)
        if changes and self.persist is not None:
            self.persist(changes)

    def admit_read_only_manifest(self, session: Any, body: dict,
                                 peer_access: str) -> list[FileRecord]:
        """Verify each source of a ``read_only_manifest.manifest``; the records it holds."""
        sources = body.get("sources")
        if not isinstance(sources, list) or len(sources) > MAX_SOURCES:
            raise ProtocolError("read_only_manifest.manifest needs a list of sources")
        if self.access == READ_WRITE:
            self._dropped(session, RO_MANIFEST, metadata_verdict(
                self.access, peer_access, True, True) or "not needed")
            return []
        records: list[FileRecord] = []
        for source in sources:
            if not isinstance(source, dict):
                raise ProtocolError("read_only_manifest source must be an object")
            message = SignedMessage.from_source_text(source.get("manifest"))
            if message.type != MANIFEST or not verify(self._public(), message.text,
                                                      message.signature):
                self._dropped(session, RO_MANIFEST, "source manifest " + (
                    metadata_verdict(self.access, peer_access, True, False) or ""))
                continue
            try:
                bitmask = base64.b64decode(source.get("bitmask", ""), validate=True)
            except (binascii.Error, ValueError, TypeError):
                raise ProtocolError("read_only_manifest bitmask is not base64") from None
            self._keep(session, message)
            records.extend(bitmask_selects(bitmask, message.records()))
        return records

    # -- relaying (read-only shares) ----------------------------------------------------------

    def serve(self, session: Any, local: list[FileRecord], revision: int) -> None:
        """Answer ``get_manifest`` from the signed store; only what we hold is offered."""
        state = self._state(session)
        by_path = {r.path: r for r in local}
        features = session.connection.established.features or ()
        if FEATURE in features:
            session._send(self._read_only_manifest(by_path, revision))
        else:
            for message in reversed(list(self.store.manifests.values())):
                session._write(message.encode())
                state.sent.add(message.signature)
        for message in list(self.store.updates.values()):
            if all(held(r, by_path.get(r.path)) for r in message.records()[:1]):
                session._write(message.encode())
                state.sent.add(message.signature)

    def _read_only_manifest(self, by_path: Mapping[str, FileRecord], revision: int) -> dict:
        sources = []
        for origin, message in reversed(list(self.store.manifests.items())):
            mask = held_bitmask(self.store.manifest_files(origin), by_path)
            if any(mask):
                sources.append({"manifest": message.as_source_text(),
                                "bitmask": base64.b64encode(mask).decode("ascii")})
        return {"type": RO_MANIFEST, "peer": self.our_peer_id, "version": revision,
                "sources": sources}

    def relay(self, session: Any, records: list[FileRecord],
              share_manifest: Callable[[], Deferred]) -> None:
        """We now hold ``records``: pass on the signed messages that state them."""
        state = self._state(session)
        announce_manifest = False
        for record in records:
            message = self.store.for_path(record.path)
            if message is not None and message.records()[0].same_content(record):
                if message.signature not in state.sent:
                    session._write(message.encode())
                    state.sent.add(message.signature)
            elif self.store.in_manifest(record):
                announce_manifest = True
        features = session.connection.established.features or ()
        if announce_manifest and FEATURE in features and state.resend is None:
            state.resend = self.clock.callLater(
                RESEND_DELAY, self._resend, session, state, share_manifest)

    def _resend(self, session: Any, state: _RelayState,
                share_manifest: Callable[[], Deferred]) -> None:
        state.resend = None
        if not session.alive:
            return

        def send(result: tuple[int, list[FileRecord]]) -> None:
            if session.alive:
                revision, local = result
                session._send(self._read_only_manifest({r.path: r for r in local}, revision))

        share_manifest().addCallback(send).addErrback(
            lambda f: self._log.failure("announcing held files failed", f))


# -- local changes on a read-only share ------------------------------------------------------


async def count_unshared(runtime: Any) -> list[str]:
    """The paths of a read-only share that differ from the share's version by local edits."""
    _, local = await runtime.manifest()
    return unshared_paths(local, runtime.signing.store.share_records(), runtime.our_peer_id)


def _inside(path: str, prefix: str) -> bool:
    return not prefix or path == prefix or path.startswith(prefix + "/")


async def revert(runtime: Any, prefix: str = "") -> dict[str, int]:
    """Put the share's version back for every local change under ``prefix``.

    Files added here are deleted, edited or deleted files are fetched again
    from connected peers (replacing the edit atomically once the content is
    verified), missing directories are made again.
    """
    from clearskies.sync import Wanted

    sync = runtime.sync
    share = runtime.signing.store.share_records()
    paths = [p for p in await count_unshared(runtime) if _inside(p, prefix)]
    removed = fetching = 0
    committed: list[FileRecord] = []
    for path in sorted(paths, reverse=True):  # contents before their directories
        theirs = share.get(path)
        ours = await runtime.get_record(path)
        if theirs is None or theirs.deleted:
            if await runtime.remove_local(path):
                removed += 1
                committed.append(theirs or FileRecord(
                    path=path, utime=ours.utime if ours else 0.0, deleted=True,
                    vv=dict(ours.vv) if ours else {}))
            continue
        if theirs.is_dir:
            await runtime.make_directory(path, theirs.mode)
            committed.append(theirs)
            continue
        sources = {peer for peer, s in sync.sessions.items()
                   if (known := s.remote_index.get(path)) is not None
                   and known.same_content(theirs)} or set(sync.sessions)
        sync.wanted[path] = Wanted(theirs, sources=sources)
        fetching += 1
    if committed:
        await runtime.commit_remote(committed)
    sync.pump()
    return {"removed": removed, "restoring": fetching, "changes": len(paths)}
