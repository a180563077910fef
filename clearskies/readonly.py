"""Read-only shares (protocol/readonly.md): signed metadata, verbatim relaying, the rules.

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
per-share face the sync layer calls; :func:`compare_with_share` and
:func:`revert` serve the control commands.  See ``protocol/readonly.md``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from clearskies import jsonshape, wire
from clearskies import keys as keys_module
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
"""Origins whose signed manifests a share keeps (one per read_write peer); the oldest go first."""

MAX_PAGES_PER_ORIGIN = 1024
"""Signed manifest pages kept of one origin, all revisions together (1,000 files a page)."""

MAX_PAGES = 2048
"""Signed manifest pages kept per share; beyond it, whole origins go, the oldest first."""

MAX_SOURCE_BYTES = 4 * 1024 * 1024
"""Sources put in one ``read_only_manifest.manifest`` before another message is started."""

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
                   our_peer_id: str, settled: bool = True) -> list[str]:
    """Paths where our files differ from the share's (signed) version by our own doing.

    A path counts when it exists only here, or when our record carries a
    change of ours (our counter in its version vector is past the share's)
    and its content differs.  Files not yet downloaded do not count.  Until
    the share's version is ``settled`` (every page of its manifest here), a
    path absent from it may sit on a page still to come: it is not counted.
    """
    out = []
    for record in local:
        theirs = share.get(record.path)
        if theirs is None:
            if not record.deleted and settled:
                out.append(record.path)
            continue
        if record.same_content(theirs):
            continue
        if record.vv.get(our_peer_id, 0) > theirs.vv.get(our_peer_id, 0):
            out.append(record.path)
    return sorted(out)


def missing_paths(local: Mapping[str, FileRecord], share: Mapping[str, FileRecord],
                  our_peer_id: str, ignored: Callable[[str], bool] = lambda path: False
                  ) -> list[str]:
    """Paths whose share's version we do not hold, through no change of ours."""
    out = []
    for path, theirs in share.items():
        ours = local.get(path)
        if held(theirs, ours) or ignored(path):
            continue
        if ours is not None and (ours.vv.get(our_peer_id, 0) > theirs.vv.get(our_peer_id, 0)
                                 or newer(ours, theirs)):
            continue  # our own change (counted as unshared), or newer than the store knows
        out.append(path)
    return sorted(out)


# -- signed messages -------------------------------------------------------------------


@dataclass(frozen=True)
class SignedMessage:
    """One signed metadata message exactly as the read_write peer wrote it."""

    text: bytes
    signature: bytes
    body: dict = field(compare=False, hash=False)

    @classmethod
    def parse(cls, text: bytes, signature: bytes, body: dict | None = None) -> SignedMessage:
        """ProtocolError unless ``text`` is a JSON object of a signed type.

        ``body`` is ``text`` already decoded (by the wire decoder), if it was;
        otherwise parsing is bounded as for a wire message (``protocol/wire.md``).
        """
        if body is None:
            try:
                body = jsonshape.loads(text, wire.MAX_ITEMS, wire.MAX_DEPTH)
            except jsonshape.ShapeError as e:
                raise ProtocolError("signed text refused: %s" % (e,)) from None
            except ValueError:
                raise ProtocolError("signed text is not JSON") from None
        if not isinstance(body, dict) or body.get("type") not in SIGNED_TYPES:
            raise ProtocolError("signed text is not a manifest, update or move")
        message = cls(text, signature, body)
        if message.type == MANIFEST:
            _ = message.revision, message.page  # ProtocolError when either is malformed
        return message

    @property
    def type(self) -> str:
        return self.body["type"]

    @property
    def revision(self) -> float:
        """A manifest's revision (the draft calls it ``version``)."""
        revision = self.body.get("revision", self.body.get("version"))
        if isinstance(revision, bool) or not isinstance(revision, (int, float)):
            raise ProtocolError("signed manifest without a numeric revision")
        return revision

    @property
    def page(self) -> int | None:
        """Which page of its manifest this is (extension ``manifest_pages``), if numbered."""
        page = self.body.get("page")
        if page is None:
            return None
        if isinstance(page, bool) or not isinstance(page, int) or page < 0:
            raise ProtocolError("signed manifest page must be a whole number from 0")
        return page

    @property
    def more(self) -> bool:
        """More pages of this manifest follow."""
        return self.body.get("more") is True

    def encode(self) -> bytes:
        """The ``$`` message as it arrived (same text, same signature)."""
        return wire.encode_signed(self.text, self.signature)

    def as_source_text(self) -> str:
        """Text line, newline, base64 signature: the form §10's ``sources`` carry."""
        return self.text.decode("utf-8") + "\n" + base64.b64encode(self.signature).decode()

    @classmethod
    def from_source_text(cls, value: object) -> SignedMessage:
        """A source of ``read_only_manifest.manifest`` (verify it first: :func:`split_source_text`)."""
        return cls.parse(*split_source_text(value))

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


def split_source_text(value: object) -> tuple[bytes, bytes]:
    """The signed text and the signature of a ``read_only_manifest`` source, unparsed.

    The signature can be checked before the text is parsed, so that a peer
    without the key cannot make us parse anything.
    """
    if not isinstance(value, str) or "\n" not in value:
        raise ProtocolError("a read_only_manifest source needs text and a signature line")
    text, _, encoded = value.rstrip("\n").rpartition("\n")
    try:
        signature = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError("source signature is not base64") from None
    if not text or not signature:
        raise ProtocolError("empty source manifest or signature")
    return text.encode("utf-8", "surrogatepass"), signature


def verify(public_pem: bytes, text: bytes, signature: bytes | None) -> bool:
    """Whether ``signature`` is the read_write key's signature of ``text``."""
    return signature is not None and keys_module.verify(public_pem, text, signature)


@dataclass
class _PageSet:
    """The pages of one origin's signed manifest at one revision (protocol/sync.md, pages).

    Pages are numbered by the read_write peer (``page``, inside the signed
    text), so a set is provably complete once pages 0 to the one without
    ``more`` are all here.  Pages from peers that do not number them
    (``unnumbered``) are kept too, but never make a set complete.
    """

    revision: float
    pages: dict[int, SignedMessage] = field(default_factory=dict)
    unnumbered: dict[bytes, SignedMessage] = field(default_factory=dict)
    last: int | None = None

    @property
    def complete(self) -> bool:
        return self.last is not None and len(self.pages) == self.last + 1

    def __len__(self) -> int:
        return len(self.pages) + len(self.unnumbered)

    def messages(self) -> list[tuple[str, SignedMessage]]:
        """(part, message) of every page: numbered ones in order, then the others."""
        numbered = [(_part(self.revision, i), m) for i, m in sorted(self.pages.items())]
        return numbered + [(_part(self.revision, None, m), m) for m in self.unnumbered.values()]


def _part(revision: float, page: int | None, message: SignedMessage | None = None) -> str:
    """Which page of which revision a stored manifest row is (``signed_messages.part``)."""
    if page is not None:
        return "%s/%d" % (json.dumps(revision), page)
    assert message is not None
    return "%s/~%s" % (json.dumps(revision), hashlib.sha256(message.signature).hexdigest()[:16])


Change = tuple[str, str, str, "SignedMessage | None"]
"""(kind, key, part, message): a row to write, or to delete when message is None."""


class SignedStore:
    """Every page of each origin's newest signed manifest, and the newest signed change of each path.

    Per origin it keeps the newest *complete* page set and the pages of any
    newer revision still arriving; a newer set replaces the older ones only
    once it is complete, so a manifest cut off half way never makes files
    fall out of the share's version.  Pure and in memory; :meth:`add`
    returns the rows to write or delete (:data:`Change`) so the caller can
    persist them.
    """

    def __init__(self) -> None:
        # origin -> revision -> pages; origins in the order they last changed.
        self.manifests: dict[str, dict[float, _PageSet]] = {}
        self.updates: dict[str, SignedMessage] = {}
        self._manifest_records: dict[str, dict[str, FileRecord]] = {}
        self._page_records: dict[bytes, list[FileRecord]] = {}
        self._update_records: dict[str, FileRecord] = {}
        self.pages = 0
        self.refused = 0

    def __len__(self) -> int:
        return self.pages + len(self.updates)

    def add(self, message: SignedMessage) -> list[Change]:
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
        return [(UPDATE, record.path, "", message)]

    def complete_revision(self, origin: str) -> float | None:
        """The revision of ``origin``'s newest complete manifest we hold, if any."""
        done = [r for r, s in self.manifests.get(origin, {}).items() if s.complete]
        return max(done) if done else None

    def _add_manifest(self, message: SignedMessage) -> list[Change]:
        origin, revision, page = message.key, message.revision, message.page
        sets = self.manifests.get(origin, {})
        done = self.complete_revision(origin)
        if done is not None and revision <= done:
            return []
        page_set = sets.get(revision) or _PageSet(revision)
        if page is None and not message.more and not page_set.unnumbered:
            page = 0  # a whole manifest in one message (the draft's form)
        if page is None:
            if message.signature in page_set.unnumbered:
                return []
        elif page in page_set.pages or (page_set.last is not None and page > page_set.last) \
                or (not message.more and any(i > page for i in page_set.pages)):
            return []  # a page we have, or one that contradicts the pages we have
        records = message.records()  # ProtocolError before anything changes
        changes: list[Change] = []
        if self._full(origin):
            changes += self._make_room(origin, revision)
            if self._full(origin):
                self.refused += 1
                if self.refused == 1:
                    _log.warn("signed manifest pages of {origin} not kept: more than {limit} "
                              "pages per share, or {origin_limit} per origin", origin=origin,
                              limit=MAX_PAGES, origin_limit=MAX_PAGES_PER_ORIGIN)
                return changes
        if page is None:
            page_set.unnumbered[message.signature] = message
        else:
            page_set.pages[page] = message
            if not message.more:
                page_set.last = page
        self.pages += 1
        self._page_records[message.signature] = records
        sets = self.manifests.pop(origin, sets)
        sets[revision] = page_set
        self.manifests[origin] = sets  # the most recently changed origin goes last
        changes.append((MANIFEST, origin, _part(revision, page, message), message))
        if page_set.complete:
            for older in [r for r in sets if r < revision]:
                changes += self._drop_set(origin, older)
            self._reindex(origin)
            covers = {r.path: r for m in page_set.pages.values()
                      for r in self._page_records[m.signature]}
            for path, update in list(self._update_records.items()):
                covered = covers.get(path)
                if covered is not None and not newer(update, covered):
                    del self.updates[path]
                    del self._update_records[path]
                    changes.append((UPDATE, path, "", None))
        else:
            merged = self._manifest_records.setdefault(origin, {})
            for record in records:
                current = merged.get(record.path)
                if current is None or newer(record, current):
                    merged[record.path] = record
        while len(self.manifests) > MAX_MANIFEST_ORIGINS:
            oldest = next(iter(self.manifests))
            self.refused += 1
            for older in list(self.manifests[oldest]):
                changes += self._drop_set(oldest, older)
        return changes

    @property
    def settled(self) -> bool:
        """The share's version is known in full: every kept manifest is complete, and no
        page had to be given up for the bounds (since the store was loaded)."""
        sets = [s for sets in self.manifests.values() for s in sets.values()]
        return bool(sets) and all(s.complete for s in sets) and not self.refused

    def _full(self, origin: str) -> bool:
        return self.pages >= MAX_PAGES or \
            sum(len(s) for s in self.manifests.get(origin, {}).values()) >= MAX_PAGES_PER_ORIGIN

    def _make_room(self, origin: str, revision: float) -> list[Change]:
        """Drop ``origin``'s half-arrived sets older than ``revision`` (never a complete one)."""
        changes: list[Change] = []
        for older in sorted(self.manifests.get(origin, {})):
            if older < revision and not self.manifests[origin][older].complete:
                changes += self._drop_set(origin, older)
        if changes:
            self._reindex(origin)
        return changes

    def _drop_set(self, origin: str, revision: float) -> list[Change]:
        sets = self.manifests[origin]
        page_set = sets.pop(revision)
        if not sets:
            del self.manifests[origin]
            self._manifest_records.pop(origin, None)
        changes: list[Change] = []
        for part, message in page_set.messages():
            self._page_records.pop(message.signature, None)
            self.pages -= 1
            changes.append((MANIFEST, origin, part, None))
        return changes

    def _reindex(self, origin: str) -> None:
        """Rebuild ``origin``'s newest record per path from the pages it keeps."""
        if origin not in self.manifests:
            return
        merged: dict[str, FileRecord] = {}
        for revision in sorted(self.manifests[origin]):
            for _, message in self.manifests[origin][revision].messages():
                for record in self._page_records[message.signature]:
                    current = merged.get(record.path)
                    if current is None or newer(record, current):
                        merged[record.path] = record
        self._manifest_records[origin] = merged

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

    def manifest_pages(self, origin: str) -> list[tuple[SignedMessage, list[FileRecord]]]:
        """Every page kept of ``origin``, older revisions first, each with its files in order."""
        return [(m, self._page_records[m.signature])
                for revision in sorted(self.manifests.get(origin, {}))
                for _, m in self.manifests[origin][revision].messages()]

    def for_path(self, path: str) -> SignedMessage | None:
        return self.updates.get(path)

    def in_manifest(self, record: FileRecord) -> bool:
        """Some stored manifest page states exactly this content for the path."""
        return any((r := records.get(record.path)) is not None and r.same_content(record)
                   for records in self._manifest_records.values())

    def rows(self) -> list[tuple[str, str, str, bytes, bytes]]:
        return [(MANIFEST, origin, part, m.text, m.signature)
                for origin, sets in self.manifests.items()
                for revision in sorted(sets) for part, m in sets[revision].messages()] + \
               [(UPDATE, k, "", m.text, m.signature) for k, m in self.updates.items()]

    def load(self, rows: Iterable[tuple[str, str, str, bytes, bytes]]) -> list[Change]:
        """Restore persisted rows; the changes that bring the stored rows in line.

        Manifests go first, so updates are judged against them.  Rows stored
        under another key (an older schema) or no longer kept come back as
        changes to write or delete.
        """
        rows = sorted(rows, key=lambda row: row[0] != MANIFEST)
        for _kind, _key, _part, text, signature in rows:
            try:
                self.add(SignedMessage.parse(bytes(text), bytes(signature)))
            except ProtocolError as e:
                _log.warn("dropping a stored signed message: {why}", why=str(e))
        stored = {(kind, key, part) for kind, key, part, _, _ in rows}
        kept = {(kind, key, part) for kind, key, part, _, _ in self.rows()}
        changes: list[Change] = [(k, key, part, None) for k, key, part in stored - kept]
        return changes + [(k, key, part, self._message(k, key, part))
                          for k, key, part in kept - stored]

    def _message(self, kind: str, key: str, part: str) -> SignedMessage:
        if kind == UPDATE:
            return self.updates[key]
        for revision, page_set in self.manifests[key].items():
            for this, message in page_set.messages():
                if this == part:
                    return message
        raise KeyError(part)


# -- the sync layer's view ---------------------------------------------------------------


@dataclass
class _RelayState:
    """What one connection already holds of our signed messages."""

    sent: set[bytes] = field(default_factory=set)
    resend: Any = None
    # The bitmask last sent for each manifest page (by signature), extension
    # read_only_manifest: a page goes out again only when we hold more of it.
    masks: dict[bytes, bytes] = field(default_factory=dict)


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
            self._keep(session, SignedMessage.parse(message.text, message.signature,
                                                    message.body))
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
            text, signature = split_source_text(source.get("manifest"))
            if not verify(self._public(), text, signature):
                self._dropped(session, RO_MANIFEST, "source manifest " + (
                    metadata_verdict(self.access, peer_access, True, False) or ""))
                continue
            message = SignedMessage.parse(text, signature)
            if message.type != MANIFEST:
                self._dropped(session, RO_MANIFEST, "source is a signed %s, not a manifest"
                              % (message.type,))
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
        """Answer ``get_manifest`` from the signed store, every page of every manifest."""
        state = self._state(session)
        by_path = {r.path: r for r in local}
        features = session.connection.established.features or ()
        if FEATURE in features:
            for body in self._read_only_manifests(state, by_path, revision):
                session._send(body)
        else:
            for origin in reversed(list(self.store.manifests)):
                for message, _ in self.store.manifest_pages(origin):
                    session._write(message.encode())
                    state.sent.add(message.signature)
        for message in list(self.store.updates.values()):
            if all(held(r, by_path.get(r.path)) for r in message.records()[:1]):
                session._write(message.encode())
                state.sent.add(message.signature)

    def _read_only_manifests(self, state: _RelayState, by_path: Mapping[str, FileRecord],
                             revision: int) -> list[dict]:
        """``read_only_manifest.manifest`` messages: a source per page, each with its bitmask.

        Every page of an origin we hold anything of goes out (a receiver needs
        them all to know the share's version), but a page goes to a
        connection again only when its bitmask grew.  Sources are split over
        several messages, at most :data:`MAX_SOURCES` and about
        :data:`MAX_SOURCE_BYTES` each.
        """
        bodies: list[dict] = []
        sources: list[dict] = []
        size = 0
        masks: dict[bytes, bytes] = {}  # only pages the store still keeps stay remembered

        def flush() -> None:
            nonlocal sources, size
            if sources:
                bodies.append({"type": RO_MANIFEST, "peer": self.our_peer_id,
                               "version": revision, "sources": sources})
            sources, size = [], 0

        for origin in reversed(list(self.store.manifests)):
            pages = [(message, held_bitmask(files, by_path))
                     for message, files in self.store.manifest_pages(origin)]
            if not any(any(mask) for _, mask in pages):
                continue
            for message, mask in pages:
                masks[message.signature] = mask
                if state.masks.get(message.signature) == mask:
                    continue
                source = {"manifest": message.as_source_text(),
                          "bitmask": base64.b64encode(mask).decode("ascii")}
                if len(sources) >= MAX_SOURCES or \
                        size + len(message.text) > MAX_SOURCE_BYTES:
                    flush()
                sources.append(source)
                size += len(message.text)
        flush()
        state.masks = masks
        return bodies

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
                for body in self._read_only_manifests(state, {r.path: r for r in local},
                                                      revision):
                    session._send(body)

        share_manifest().addCallback(send).addErrback(
            lambda f: self._log.failure("announcing held files failed", f))


# -- local changes on a read-only share ------------------------------------------------------


@dataclass(frozen=True)
class Comparison:
    """A read-only share's files against the share's version."""

    unshared: list[str]
    """Local changes not shared (see :func:`unshared_paths`)."""
    missing: list[str]
    """Files of the share's version we do not hold (see :func:`missing_paths`)."""
    settled: bool
    """Every page of the manifests we keep is here (:attr:`SignedStore.settled`)."""


async def compare_with_share(runtime: Any) -> Comparison:
    """Where a read-only share's files differ from the share's version, and why."""
    _, local = await runtime.manifest()
    store = runtime.signing.store
    share = store.share_records()
    ours = runtime.our_peer_id
    return Comparison(unshared_paths(local, share, ours, store.settled),
                      missing_paths({r.path: r for r in local}, share, ours,
                                    runtime.is_ignored),
                      store.settled)


def _inside(path: str, prefix: str) -> bool:
    return not prefix or path == prefix or path.startswith(prefix + "/")


async def revert(runtime: Any, prefix: str = "") -> dict[str, int]:
    """Put the share's version back for every local change under ``prefix``.

    Files added here are deleted, edited or deleted files are fetched again
    from connected peers (replacing the edit atomically once the content is
    verified), missing directories are made again.  Files the share's version
    holds are never deleted: until every page of its manifest is here, files
    it does not list are left alone (``complete`` is false in the reply).
    """
    from clearskies.sync import Wanted

    sync = runtime.sync
    share = runtime.signing.store.share_records()
    comparison = await compare_with_share(runtime)
    paths = [p for p in comparison.unshared if _inside(p, prefix)]
    removed = fetching = 0
    committed: list[FileRecord] = []

    async def restore(path: str, theirs: FileRecord) -> None:
        nonlocal fetching
        if theirs.is_dir:
            await runtime.make_directory(path, theirs.mode)
            committed.append(theirs)
            return
        sources = {peer for peer, s in sync.sessions.items()
                   if (known := s.remote_index.get(path)) is not None
                   and known.same_content(theirs)} or set(sync.sessions)
        sync.wanted[path] = Wanted(theirs, sources=sources)
        fetching += 1

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
        await restore(path, theirs)
    # Files of the share's version we lack through no edit of ours (say, a deletion
    # recorded as the share's version by mistake): fetched again as well.
    for path in comparison.missing:
        theirs = share[path]
        if _inside(path, prefix) and not theirs.deleted and path not in sync.wanted \
                and path not in sync.in_flight and path not in sync.finishing:
            await restore(path, theirs)
    if committed:
        await runtime.commit_remote(committed)
    sync.pump()
    return {"removed": removed, "restoring": fetching, "changes": len(paths),
            "complete": comparison.settled}
