"""Read-only shares' signed metadata (protocol/readonly.md): the rules and the store.

A read-only peer may pass a share on but never change it, and that is
enforced by signatures, not by trusting the peer:

* a read_write peer signs every ``manifest``, ``update`` and ``move`` it
  sends to a less trusted peer with the share's read_write RSA key;
* a read-only peer merges only metadata carrying a valid read_write
  signature, keeps those signed messages (:class:`SignedStore`) and hands
  them on to other read-only peers exactly as it received them, never its
  own records — so whatever it relays still proves itself;
* a read_write peer accepts no metadata at all from a read-only connection.

This module holds the pure rules, one signed message
(:class:`SignedMessage`) and the store of them; no I/O, no clock.  The
per-share face the sync layer calls is ``clearskies.sync.readonly``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

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
