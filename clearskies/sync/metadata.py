"""What a session says about the share's records: manifests, changes, progress (protocol/sync.md).

:class:`MetadataExchange` is one connection's metadata side.  Out: our
manifest (streamed from the database a page at a time for peers with
``manifest_pages``, :mod:`clearskies.sync.manifests`; from the signed store
on a read-only share), then our changes as ``update`` and ``move`` messages
once the peer has the manifest, and ``clearskies.progress`` once what the
peer sent is carried out.  In: the peer's manifest, updates and moves,
queued and merged in order by the share's engine, in batches of at most
:data:`~clearskies.sync.limits.MERGE_BATCH` records; while more than
:data:`~clearskies.sync.limits.MAX_WAITING_RECORDS` wait behind a merge,
the peer's connection is not read.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.python.failure import Failure

from clearskies import wire
from clearskies.errors import ProtocolError, UnsafePathError
from clearskies.interfaces import ISyncSession
from clearskies.share import merge
from clearskies.share.records import MAX_SIZE, FileRecord, validate_wire_path
from clearskies.sync import limits, states
from clearskies.sync.engine import ShareSync
from clearskies.sync.gate import ReadOnlyGate
from clearskies.sync.limits import MAX_REFUSED_RECORDS
from clearskies.sync.manifests import send_manifest


def _is_revision(value: object) -> bool:
    """A peer's revision: an integer, or the reference peer's float "version", in range."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and 0 <= value <= MAX_SIZE)


class MetadataExchange:
    """One connection's manifests, updates, moves and progress, both ways."""

    def __init__(self, sync: ShareSync, session: ISyncSession, connection: Any, *,
                 send: Callable[[dict[str, Any]], None],
                 send_paced: Callable[[dict[str, Any]], Deferred[None]],
                 reading: IPushProducer, gate: ReadOnlyGate | None,
                 fail: Callable[[Failure, str], None]) -> None:
        """``send_paced`` sends one of a run of large messages and fires when the
        next may go; ``reading`` pauses reading the peer's connection."""
        self.sync = sync
        self.session = session
        self.connection = connection
        self._send = send
        self._send_paced = send_paced
        self._reading = reading
        self._reading_paused = False
        self.gate = gate
        self._fail = fail
        self.supports_dirs = "directories" in (connection.established.features or ())
        # path -> SHA-256 the peer holds, kept only for a peer without version vectors
        # (the merge needs it only then): a whole share's worth for such a peer.
        self.acked: dict[str, str] = {}
        self.manifest_sent_revision: int | None = None
        self.peer_revision: Any = None
        self.peer_progress: dict[str, Any] | None = None
        self.last_sent_revision = 0  # the newest revision we sent this peer anything of
        # The peer's newest revision whose changes are all merged here (what progress
        # acknowledges); a revision that has only arrived, still queued, does not count.
        self.peer_revision_merged: Any = None
        self.asked_revision: Any = None  # the revision our get_manifest named
        self._manifest_to_remember: Any = None
        self._queued_changes: list[tuple[list[FileRecord], list[tuple[str, FileRecord]], int]] = []
        self._building_manifest = False
        # Batches waiting to be merged: [kind, items, revision they complete, manifest
        # revision to remember once merged]; a revision counts only after its merge.
        self._inbox: list[list[Any]] = []
        self._waiting = 0  # items in the batches of the inbox
        self.inbox = states.InboxMachine()

    @property
    def _relaying(self) -> bool:
        """A read-only share passes on only the signed messages it holds."""
        return self.gate is not None and self.gate.relaying

    @property
    def in_sync(self) -> bool:
        """The peer has our latest revision (and, if it reports progress, all its content)."""
        if self._relaying:
            # We change nothing; the peer's revisions are the read_write peer's own.
            return self.peer_progress is None or self.peer_progress["items"] == 0
        revision = self.sync.share.revision()
        if (self.manifest_sent_revision is None or self.manifest_sent_revision < revision
                or self._queued_changes):
            return False
        if "progress" not in (self.connection.established.features or ()):
            return True
        # Revisions made of what this peer sent us were never sent back: only what
        # we did send needs acknowledging.
        progress = self.peer_progress
        return progress is not None and progress["revision"] >= self.last_sent_revision \
            and progress["items"] == 0

    def on_get_manifest(self, body: dict, event: wire.Message) -> None:
        seen = body.get("revision", body.get("version"))
        if seen is not None and (isinstance(seen, bool) or not isinstance(seen, (int, float))):
            raise ProtocolError("get_manifest revision must be a number")
        if self._relaying:
            if not self._building_manifest:
                self._building_manifest = True
                self.sync.share.manifest().addCallback(self._send_signed).addErrback(
                    self._fail, "relaying signed manifests")
            return
        current = self.sync.share.revision()
        if seen == current and self.manifest_sent_revision is None:
            self.manifest_sent_revision = current
            self.last_sent_revision = max(self.last_sent_revision, current)
            self._send({"type": "manifest_current"})
            self._flush_queued()
            return
        if self._building_manifest:
            return
        self._building_manifest = True
        paged = "manifest_pages" in (self.connection.established.features or ())
        Deferred.fromCoroutine(send_manifest(
            self.sync.share, paged=paged, shareable=self._shareable,
            send_paced=self._send_paced, alive=lambda: self.session.alive,
        )).addCallback(self._manifest_sent).addErrback(self._manifest_failed)

    def _manifest_failed(self, failure: Failure) -> None:
        self._building_manifest = False
        self._fail(failure, "sending the manifest")

    def _manifest_sent(self, revision: int | None) -> None:
        self._building_manifest = False
        if revision is None or not self.session.alive:
            return
        self.manifest_sent_revision = revision
        self.last_sent_revision = max(self.last_sent_revision, revision)
        self._flush_queued()

    def _send_signed(self, result: tuple[int, list[FileRecord]]) -> None:
        self._building_manifest = False
        if self.session.alive and self.gate is not None:
            revision, records = result
            self.gate.serve(records, revision)
            self.manifest_sent_revision = revision

    def on_manifest_current(self, body: dict, event: wire.Message) -> None:
        # We hold that revision completely (it was remembered only once its content
        # was all here), and this connection must hear so: the peer's view of us
        # starts afresh with each connection.
        revision = self.asked_revision
        if isinstance(revision, int) and not isinstance(revision, bool) and (
                not isinstance(self.peer_revision_merged, int)
                or revision > self.peer_revision_merged):
            self.peer_revision_merged = revision
        self.send_progress()

    def on_read_only_manifest_manifest(self, body: dict, event: wire.Message) -> None:
        """Extension: a read-only peer's signed manifests and which of their files it holds."""
        if self.gate is None:
            return
        records = self.gate.read_only_manifest(body)
        if records:
            self._receive(sorted(records, key=lambda r: r.path))

    def on_manifest(self, body: dict, event: wire.Message) -> None:
        files = body.get("files")
        if not isinstance(files, list):
            raise ProtocolError("manifest without a files list")
        revision = body.get("revision", body.get("version"))
        if revision is not None and not _is_revision(revision):
            raise ProtocolError("manifest revision must be a number from 0 to 2**63-1")
        records: dict[str, FileRecord] = {}
        refused = 0
        for entry in files:
            if not isinstance(entry, dict):
                raise ProtocolError("a manifest entry is not a record object")
            record = self._record(entry)
            if record is None:
                refused += 1
                if refused > MAX_REFUSED_RECORDS:
                    # A peer that sends this much junk is broken or hostile; taking
                    # the rest one by one would only spend the reactor on it.
                    raise ProtocolError("more than %d invalid records in one manifest"
                                        % MAX_REFUSED_RECORDS)
                continue
            previous = records.get(record.path)
            records[record.path] = record if previous is None else merge.winner(previous, record)
        self.peer_revision = revision
        last_page = body.get("more") is not True
        if self._reference_peer():  # (a peer with version vectors needs no acknowledgements)
            for record in records.values():
                if not record.deleted and record.sha256:
                    self.acked[record.path] = record.sha256
        # A paged manifest's revision is complete only with its last page; it is
        # remembered (send_progress) only once its content is all here: a restart
        # before then must ask for the whole manifest again, not "anything new?".
        self._enqueue("records", sorted(records.values(), key=lambda r: r.path),
                      revision if last_page else None, revision if last_page else None)

    def on_update(self, body: dict, event: wire.Message) -> None:
        record = self._record(body.get("file"))
        self._enqueue("records", [record] if record is not None else [],
                      self._completes(body))

    def _record(self, entry: object) -> FileRecord | None:
        """A peer's file record, or None if a value in it is malformed or out of range.

        Only that record is refused (listed and logged once); the rest of the
        message, and the connection, go on.  A path that tries to leave the
        share is an attack, not a slip: it still closes the connection.
        """
        try:
            return FileRecord.from_wire(entry)
        except UnsafePathError:
            raise
        except ProtocolError as e:
            self.sync.refused(self.session, entry.get("path") if isinstance(entry, dict) else None,
                              str(e))
            return None

    def on_move(self, body: dict, event: wire.Message) -> None:
        source = validate_wire_path(body.get("source"))
        destination = self._record(body.get("destination"))
        self._enqueue("moves", [(source, destination)] if destination is not None else [],
                      self._completes(body))

    def _completes(self, body: dict) -> Any:
        """The peer's revision whose changes have all arrived with this update or move.

        With ``revision_batches`` every message of a revision but its last says
        ``"more": true``: until the last, only the revisions before it are whole.
        """
        revision = body.get("revision")
        if not isinstance(revision, int) or isinstance(revision, bool):
            return None
        if body.get("more") is True and self._batches_marked:
            return revision - 1
        return revision

    @property
    def _batches_marked(self) -> bool:
        return "revision_batches" in (self.connection.established.features or ())

    def _receive(self, records: list[FileRecord]) -> None:
        self._enqueue("records", records)

    def merge_again(self, records: list[FileRecord]) -> None:
        """Records of this peer whose merge could not be carried out: merge them again."""
        self._receive(records)

    def _enqueue(self, kind: str, items: list[Any], revision: Any = None,
                 manifest_revision: Any = None) -> None:
        """Merge what arrives in order; what arrives during a merge waits and goes in one batch.

        A burst of 1,000 updates (a deleted directory) or moves (a renamed one)
        is thus applied in a few large batches: one database round trip and one
        disk job each, instead of a thousand.  A batch takes at most
        ``MERGE_BATCH`` items (a manifest page), so what waits is merged a page
        at a time, never read back in one call; past ``MAX_WAITING_RECORDS``
        waiting behind a merge, the peer's connection is not read until the
        merges catch up.  ``revision`` is the peer's revision the items
        complete: it is acknowledged only once they are merged.
        """
        if not (isinstance(revision, int) and not isinstance(revision, bool)):
            revision = None
        if (self._inbox and self._inbox[-1][0] == kind
                and len(self._inbox[-1][1]) + len(items) <= limits.MERGE_BATCH):
            batch = self._inbox[-1]
            batch[1].extend(items)
        else:
            batch = [kind, list(items), None, None]
            self._inbox.append(batch)
        self._waiting += len(items)
        if revision is not None and (batch[2] is None or revision > batch[2]):
            batch[2] = revision
        if manifest_revision is not None:
            batch[3] = manifest_revision
        if self.inbox.state == states.IDLE:
            self._merge_inbox()
        self._pace_reading()

    def _pace_reading(self) -> None:
        """Read the peer's connection only while the records waiting behind a merge are few.

        Not while the share's first scan is awaited (it may take longer than
        the peer's keep-alive allows): those batches wait in full.
        """
        full = (self.inbox.state == states.MERGING and self._waiting > limits.MAX_WAITING_RECORDS
                and self.session.alive)
        if full and not self._reading_paused:
            self._reading_paused = True
            self._reading.pauseProducing()
        elif not full and self._reading_paused:
            self._reading_paused = False
            self._reading.resumeProducing()

    @property
    def merging(self) -> bool:
        """Records from this peer are still waiting to be merged, or being merged."""
        return self.inbox.state != states.IDLE or bool(self._inbox)

    def _carry_out(self, outputs: list[str]) -> None:
        for output in outputs:
            if output == "send_progress":
                self.send_progress()
            elif output == "merge_next":
                self._merge_inbox()
        self._pace_reading()

    def _merge_inbox(self) -> None:
        if not self._inbox or not self.session.alive:
            return
        waiting = self.sync.share.local_files_recorded()
        if waiting is not None:
            # A share just attached with --merge: its folder's files are recorded
            # (dated before the share) first, so the share's records meet them.
            self.inbox.fire("scan_pending")
            waiting.addBoth(lambda _: self._carry_out(self.inbox.fire("scan_done")))
            return
        kind, items, revision, manifest_revision = self._inbox.pop(0)
        self._waiting -= len(items)
        self.inbox.fire("merge")
        if kind == "moves":
            d = self.sync.receive_moves(self.session, items)
        else:
            d = self.sync.receive_records(self.session, items)

        def merged(_: object) -> None:
            # Changes go out in revision order, so all up to ``revision`` are merged now.
            if revision is not None and (not isinstance(self.peer_revision_merged, int)
                                         or revision > self.peer_revision_merged):
                self.peer_revision_merged = revision
            if manifest_revision is not None:
                self._manifest_to_remember = manifest_revision
            self._carry_out(self.inbox.fire("merged"))

        def failed(failure: Failure) -> None:
            self._fail(failure, "merging records")
            if self.inbox.state == states.MERGING:  # the merge itself failed
                self._carry_out(self.inbox.fire("merge_failed"))
            elif self.inbox.state == states.IDLE:  # what followed it failed: go on
                self._merge_inbox()
                self._pace_reading()

        d.addCallback(merged)
        d.addErrback(failed)

    def on_clearskies_progress(self, body: dict, event: wire.Message) -> None:
        """Extension: how far the peer has got with our changes (for status and wait)."""
        revision = body.get("revision")
        items = body.get("items")
        if (isinstance(revision, bool) or not isinstance(revision, int)
                or isinstance(items, bool) or not isinstance(items, int)):
            raise ProtocolError("clearskies.progress needs integer revision and items")
        size = body.get("bytes", 0)
        self.peer_progress = {"revision": revision, "items": items,
                              "bytes": size if isinstance(size, int) else 0}

    def send_progress(self) -> None:
        """Tell the peer which of its revisions we hold completely (extension message).

        Only once every change up to that revision is carried out: merged,
        renamed or deleted on disk, downloaded, and no conflict left to settle.
        Until then nothing is sent; the acknowledgement that was last sent stands.
        """
        if not self.sync.settled:
            return
        if self._manifest_to_remember is not None:
            self.sync.share.peer_manifest_seen(self.session.peer_id, self._manifest_to_remember)
            self._manifest_to_remember = None
        if "progress" not in (self.connection.established.features or ()):
            return
        if not isinstance(self.peer_revision_merged, int):
            return
        self._send({"type": "clearskies.progress", "revision": self.peer_revision_merged,
                    "items": self.sync.items_to_download,
                    "bytes": self.sync.bytes_to_download})


    # -- pushing our changes ---------------------------------------------------------

    def push_changes(self, records: list[FileRecord], moves: list[tuple[str, FileRecord]],
                     revision: int, force: bool = False) -> None:
        """Send changes at ``revision`` unless the peer has them (``force``: send anyway)."""
        if not self.session.alive:
            return
        if self._relaying:
            if self.manifest_sent_revision is not None and self.gate is not None:
                self.gate.relay(records)
                self.manifest_sent_revision = max(self.manifest_sent_revision, revision)
            return
        if self.manifest_sent_revision is None:
            self._queued_changes.append((records, moves, revision))
            return
        if revision <= self.manifest_sent_revision and not force:
            return
        moved_to = {dest.path: source for source, dest in moves}
        moved_from = set(moved_to.values())
        out: list[dict[str, Any]] = []
        for record in records:
            if not self._shareable(record):
                continue
            if record.deleted and record.path in moved_from:
                continue  # carried by the move message
            if record.path in moved_to:
                out.append({
                    "type": "move", "revision": revision, "source": moved_to[record.path],
                    "destination": record.to_wire()})
                if self._reference_peer():
                    # Peers without move support still need the deletion.
                    out.append({
                        "type": "update", "revision": revision,
                        "file": FileRecord(path=moved_to[record.path], utime=record.utime,
                                           deleted=True, vv=dict(record.vv)).to_wire()})
                continue
            out.append({"type": "update", "revision": revision, "file": record.to_wire()})
        if self._batches_marked:
            # Extension revision_batches: the peer knows when it holds all of a revision.
            for body in out[:-1]:
                body["more"] = True
        for body in out:
            self._send(body)
        self.manifest_sent_revision = max(self.manifest_sent_revision, revision)
        if out:
            self.last_sent_revision = max(self.last_sent_revision, revision)

    def _flush_queued(self) -> None:
        queued, self._queued_changes = self._queued_changes, []
        for records, moves, revision in queued:
            self.push_changes(records, moves, revision)

    def _reference_peer(self) -> bool:
        return "vv" not in (self.connection.established.features or ())

    def _shareable(self, record: FileRecord) -> bool:
        return self.supports_dirs or not record.is_dir

    # -- acknowledgement (for peers without version vectors) ---------------------------

    def acknowledge(self, record: FileRecord) -> None:
        if record.sha256 and self._reference_peer():
            self.acked[record.path] = record.sha256

    def local_unacked(self, local: FileRecord | None) -> bool:
        """Our version of a path has changes this peer has not confirmed holding."""
        if local is None or local.deleted or local.is_dir:
            return False
        if local.vv.get(self.sync.share.our_peer_id, 0) == 0:
            return False
        return self.acked.get(local.path) != local.sha256
