"""Keeping one share identical with its connected peers (protocol/sync.md): the engine.

:class:`ShareSync`, one per share, owns what the share still needs (the
:class:`~clearskies.sync.wanted.WantedFiles`), hands what peers announce to
the :class:`~clearskies.sync.merging.RecordMerger`, schedules downloads
across all connected peers (:meth:`ShareSync.pump`), relays changes, and
puts a read-only share's version back (:meth:`ShareSync.revert`).  It knows
its sessions only through :class:`~clearskies.interfaces.ISyncSession` and
the share only through :class:`~clearskies.interfaces.ILocalShare`; the
per-connection side is :class:`clearskies.sync.session.SyncSession`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from clearskies.interfaces import ILocalShare, ISyncEvents, ISyncSession
from clearskies.ratelimit import RateLimiter
from clearskies.share.records import FileRecord
from clearskies.sync import readonly
from clearskies.sync.announced import Known, announced_by
from clearskies.sync.copies import LocalCopies
from clearskies.sync.diskspace import DiskWatch
from clearskies.sync.downloads import Downloads
from clearskies.sync import limits
from clearskies.sync.limits import MAX_FINISHING, WINDOW
from clearskies.sync.merging import RecordMerger
from clearskies.sync.revert import ShareRevert
from clearskies.sync.unresolved import UnresolvedRecords
from clearskies.sync.wanted import MEMORY_LIMIT, Wanted, WantedFiles
from clearskies.transfer.receiver import FileReceiver


class ShareSync:
    """Converges one share with all its connected peers."""

    _log = Logger()

    def __init__(self, share: ILocalShare, clock: IReactorTime, *,
                 signing: readonly.ShareSigning | None = None,
                 upload_limiter: RateLimiter | None = None,
                 download_limiter: RateLimiter | None = None,
                 advertised_addresses: Callable[[], list[str]] | None = None,
                 addresses_received: Callable[[str, list[str]], None] | None = None,
                 unwritable_files: bool = False,
                 rng: random.Random | None = None, window: int = WINDOW,
                 wanted_window: int = MEMORY_LIMIT,
                 events: ISyncEvents | None = None) -> None:
        """``signing``: a read-only share's signing and relaying (None: a plain share).
        ``upload_limiter``/``download_limiter``: the daemon-wide rate limits.
        ``advertised_addresses``/``addresses_received``: extension ``addresses``,
        where we can be reached beyond what peers see themselves, and what to do
        with a peer's list (peer ID, addresses).  ``unwritable_files``: put
        downloads in place without write permission (``read_only_files``).
        ``wanted_window``: wanted files held in memory (the rest in the database).
        ``events``: told of each download started, finished or failed, each upload,
        deletion and conflict copy, as it happens (None: nobody listens).
        """
        self.share = share
        self.clock = clock
        self.signing = signing
        self.upload_limiter = upload_limiter
        self.download_limiter = download_limiter
        self.advertised_addresses = advertised_addresses
        self.addresses_received = addresses_received
        # Only picks which peer to ask: no secret, so no system call per pick.
        self.rng = rng or random.Random()
        self.window = window
        self.events = events
        self.sessions: dict[str, ISyncSession] = {}
        self.wanted = WantedFiles(share.lists, share.share_id, memory_limit=wanted_window,
                                  refilled=self.pump, clock=clock,
                                  busy=lambda p: p in self.in_flight or p in self.finishing)
        self.in_flight: dict[str, ISyncSession] = {}
        # Payloads received and being verified/installed (path -> session): out of
        # the request window, so the next files stream while the disk catches up.
        self.finishing: dict[str, ISyncSession] = {}
        self.paused = False
        self.bytes_received = 0
        self.bytes_sent = 0
        self._retry_call: Any = None
        lock = DeferredLock()
        self._unresolved = UnresolvedRecords(clock, self._merge_again)
        # Rows a daemon that stopped left behind: no connection of ours announced them,
        # and what the share wants is worked out anew from the peers' manifests.
        for forget in (share.lists.forget_announced, share.lists.clear_wanted):
            forget(share.share_id).addErrback(lambda f: self._log.failure("old lists", f))
        self.merger = RecordMerger(share, self.wanted, self.sessions, self._unresolved, lock,
                                   self.relay, self.pump, report=self.report)
        self.diskwatch = DiskWatch(share, clock, self.wanted, self.in_flight, self.finishing,
                                   self.pump)
        self.copies = LocalCopies(share, clock, self.wanted, self.finishing)
        self.downloads = Downloads(
            share, clock, wanted=self.wanted, in_flight=self.in_flight,
            placeholders=self.merger.placeholders, unresolved=self._unresolved, lock=lock,
            disk=self.diskwatch, copies=self.copies, relay=self.relay, pump=self.pump,
            pump_at=self._retry_at, refused=self.refused, announced=self.announced_elsewhere,
            report_progress=self.report_progress, unwritable_files=unwritable_files,
            report=self.report)
        self.reverting = ShareRevert(share, signing, self.sessions, self.wanted, self.in_flight,
                                     self.finishing, self.pump)

    @property
    def unresolved(self) -> dict[str, tuple[str, FileRecord]]:
        """Peers' records not carried out yet: path -> (peer ID, record); see UnresolvedRecords."""
        return self._unresolved.waiting

    @property
    def unwritable_files(self) -> bool:
        """Downloads are put in place without write permission (``read_only_files``)."""
        return self.downloads.unwritable_files

    @unwritable_files.setter
    def unwritable_files(self, value: bool) -> None:
        self.downloads.unwritable_files = value

    @property
    def disk(self) -> Any:
        """Downloads the local disk refused (clearskies.diskerrors.DiskTrouble)."""
        return self.diskwatch.disk

    def report(self, kind: str, **fields: Any) -> None:
        """Tell ``events`` what just happened (see ISyncEvents); never raises."""
        if self.events is None:
            return
        try:
            self.events.sync_event(kind, fields)
        except Exception:
            self._log.failure("reporting {kind} failed", kind=kind)

    # -- sessions --------------------------------------------------------------

    def attach(self, session: ISyncSession) -> bool:
        """Register a new session; False when it duplicates a live one and must close."""
        existing = self.sessions.get(session.peer_id)
        if existing is not None and existing is not session:
            if existing.keep_over(session):
                return False
            existing.connection.close("replaced by a newer connection from the same peer")
            self.detach(existing)
        self.sessions[session.peer_id] = session
        return True

    def detach(self, session: ISyncSession) -> None:
        if self.sessions.get(session.peer_id) is session:
            del self.sessions[session.peer_id]
        for path in [p for p, s in self.in_flight.items() if s is session]:
            del self.in_flight[path]
            self.report("download_failed", file=path, peer_id=session.peer_id,
                        reason="the connection ended")
        if session.peer_id not in self.sessions:
            self.wanted.drop_source(session.peer_id)
        self.pump()

    # -- state for status reports ---------------------------------------------

    @property
    def items_to_download(self) -> int:
        return len(self.wanted)

    @property
    def bytes_to_download(self) -> int:
        return self.wanted.bytes

    @property
    def settled(self) -> bool:
        """Every record merged so far is carried out: nothing to fetch, no conflict waiting."""
        return not self.wanted and not self.unresolved

    @property
    def in_sync(self) -> bool:
        """Settled, nothing from a peer left to merge, every peer has our latest revision."""
        return self.settled and all(s.in_sync and not s.merging
                                    for s in self.sessions.values())

    # -- local changes -----------------------------------------------------------

    def local_changes(self, records: Iterable[FileRecord], revision: int,
                      moves: Iterable[tuple[str, FileRecord]] = ()) -> None:
        """The scanner found changes: tell every peer that has our manifest."""
        records = list(records)
        retry: dict[str, list[FileRecord]] = {}
        for record in records:
            waiting = self._unresolved.settle(record.path)
            if waiting is not None:
                retry.setdefault(waiting[0], []).append(waiting[1])
            # A local edit supersedes what we were fetching; merge decides again later.
            self.wanted.supersede(record)
            if not record.deleted and self.merger.pending_rmdirs:
                # Something new lives here now: its directories stay.
                for directory in [d for d in self.merger.pending_rmdirs
                                  if record.path == d or record.path.startswith(d + "/")]:
                    del self.merger.pending_rmdirs[directory]
        if self.unresolved:
            # A folder above a waiting path changed (a symlink or file in the way
            # removed, permissions given back): its records may go through now.
            changed = {record.path for record in records}
            for path in [p for p in self.unresolved if _has_ancestor_in(p, changed)]:
                waiting = self._unresolved.settle(path)
                if waiting is not None:
                    retry.setdefault(waiting[0], []).append(waiting[1])
        for session in list(self.sessions.values()):
            session.push_changes(records, list(moves), revision)
        for peer_id, remote in retry.items():
            self._decide_again(peer_id, remote)

    def _decide_again(self, peer_id: str, records: list[FileRecord]) -> None:
        """Merge a peer's records again, against what the scanner has just recorded."""
        session = self.sessions.get(peer_id)
        if session is None:
            # The peer is gone; it sends the path again when it is back.
            for record in records:
                self._unresolved.keep(record.path, peer_id, record)
            return
        session.merge_again(records)

    def _merge_again(self, peer_id: str, records: list[FileRecord]) -> None:
        """A retry of waiting records: merged again if their peer is connected."""
        session = self.sessions.get(peer_id)
        if session is not None:
            session.merge_again(records)

    def retry_unresolved(self) -> None:
        """Merge the waiting records again now (the user rescanned the share)."""
        self._unresolved.retry_now()

    # -- remote records ----------------------------------------------------------

    def receive_records(self, session: ISyncSession, records: list[FileRecord]) -> Deferred[None]:
        """Merge what a peer announced; serialised so two peers cannot race on one path."""
        return self.merger.receive_records(session, records)

    def receive_moves(self, session: ISyncSession,
                      moves: list[tuple[str, FileRecord]]) -> Deferred[None]:
        """Apply a batch of moves: renames of content we hold go in one disk job."""
        return self.merger.receive_moves(session, moves)

    def refused(self, session: ISyncSession, path: object, why: str) -> None:
        """A peer's record we do not take: listed as skipped, logged once per path and reason."""
        self.merger.refused(session, path, why)

    def announced_elsewhere(self, records: list[FileRecord],
                            origin: ISyncSession | None) -> Deferred[Known]:
        """What every session but ``origin`` announced of ``records``' paths, for
        :meth:`relay`: looked up before the commit whose revision is relayed."""
        return Deferred.fromCoroutine(
            announced_by(self.sessions.values(), [r.path for r in records], origin))

    def relay(self, records: list[FileRecord], revision: int,
              origin: ISyncSession | None, known: Known) -> None:
        """Pass committed records on; ``known``: :meth:`announced_elsewhere` of them
        (a session it leaves out, one attached since, has announced none of them)."""
        records = [r for r in records if not (r.deleted and r.path in self.merger.placeholders)]
        for session in list(self.sessions.values()):
            if session is not origin:
                # Never tell a peer what it told us (it would only answer with progress).
                theirs = known.get(session, {})
                news = [r for r in records if theirs.get(r.path) != r]
                session.push_changes(news, [], revision)
            elif session.manifest_sent_revision is not None:
                # The origin already holds these records: nothing to send it.
                session.manifest_sent_revision = max(session.manifest_sent_revision, revision)

    # -- downloads ---------------------------------------------------------------

    def pump(self) -> None:
        """Hand wanted files to sessions with room in their request window."""
        if self.paused or not self.sessions or self.share.error:
            return
        if len(self.finishing) >= MAX_FINISHING:
            return  # the disk is behind: no more downloads until some are installed
        # Walk ``wanted`` in order (the manifest's path order, so one directory's
        # files come together) and stop once every window is full: called after
        # every finished file, this must not cost O(wanted).  (While files wait for the
        # disk, those skipped are walked too: a cost only while the disk refuses.)
        now = self.clock.seconds()
        disk = self.disk if self.disk else None
        if disk is not None:
            blocked = disk.blocked_until(now)
            if blocked is not None:  # the file system failed as a whole: wait, then probe
                self._retry_at(blocked, now)
                return
        open_sessions = {p: s for p, s in self.sessions.items() if s.has_room()}
        starts: list[tuple[ISyncSession, Wanted]] = []
        next_retry: float | None = None
        for path, wanted in self.wanted.items():
            if not open_sessions:
                break
            if path in self.in_flight or path in self.finishing:
                continue
            if disk is not None:
                fits, retry_at = disk.may_fetch(path, wanted.record.size or 0, now)
                if not fits:
                    if retry_at is not None:
                        next_retry = retry_at if next_retry is None else min(next_retry, retry_at)
                    continue
            candidates = []
            for peer_id in wanted.sources:
                session = open_sessions.get(peer_id)
                if session is None:
                    continue
                failed_at = wanted.failed.get(peer_id)
                if failed_at is not None and now - failed_at < limits.RETRY_AFTER:
                    retry_at = failed_at + limits.RETRY_AFTER
                    next_retry = retry_at if next_retry is None else min(next_retry, retry_at)
                    continue
                candidates.append(session)
            if not candidates:
                continue
            session = candidates[0] if len(candidates) == 1 else self.rng.choice(candidates)
            self.in_flight[path] = session
            if not session.has_room():
                del open_sessions[session.peer_id]
            starts.append((session, wanted))
            if disk is not None:
                disk.reserve(wanted.record.size or 0)
                if disk.share_wide is not None:
                    break  # one file probes the file system that failed
        if not starts and open_sessions:
            self.wanted.look_further()  # all in memory wait: later files may go
        if starts:
            self.copies.look_ahead([wanted for _, wanted in starts], now)
        for session, wanted in starts:  # may change ``wanted``: not while iterating it
            self.report("download_started", file=wanted.record.path, peer_id=session.peer_id,
                        size=wanted.record.size or 0)
            Deferred.fromCoroutine(self.downloads.start(session, wanted)).addErrback(
                self.downloads.crashed, wanted.record.path, session.peer_id)
        if next_retry is not None:
            self._retry_at(next_retry, now)

    def _retry_at(self, when: float, now: float) -> None:
        """Pump again at ``when`` (or earlier, if a retry is already planned before it)."""
        call = self._retry_call
        if call is not None and call.active() and call.getTime() <= when:
            return
        if call is not None and call.active():
            call.cancel()
        self._retry_call = self.clock.callLater(max(0.0, when - now), self._retry)

    def _retry(self) -> None:
        self._retry_call = None
        self.pump()

    def disk_status(self) -> dict[str, Any]:
        """Status fields for downloads the disk refused: ``problem``, ``disk_errors``, or none."""
        return self.diskwatch.status()

    # -- the request windows of the sessions ----------------------------------------

    def requests_of(self, session: ISyncSession) -> int:
        """Files handed to ``session`` whose payload has not arrived yet."""
        return sum(1 for s in self.in_flight.values() if s is session)

    def request_withdrawn(self, session: ISyncSession, path: str) -> None:
        """``session`` did not ask for ``path`` after all: it may be handed out again."""
        if self.in_flight.get(path) is session:
            del self.in_flight[path]

    def payload_received(self, session: ISyncSession, receiver: FileReceiver,
                         asked: str | None = None) -> Deferred[None]:
        """A payload ended: verify, put in place, record (Downloads.finish); or retry later.

        The file leaves the session's request window at once, so the next
        files stream while this one is installed; ``asked`` is the remote
        path that was requested.
        """
        path = receiver.expected.path
        if self.in_flight.get(path) is session:
            del self.in_flight[path]
            self.finishing[path] = session
            self.pump()  # the window has room again while this file is installed

        def done(result: object) -> object:
            if self.finishing.get(path) is session:
                del self.finishing[path]
            if self.in_flight.get(path) is session:
                del self.in_flight[path]
            self.pump()
            return result

        d = Deferred.fromCoroutine(
            self.downloads.finish(session, receiver, receiver.expected, asked))
        return d.addBoth(done)

    def download_failed(self, session: ISyncSession, path: str,
                        asked: tuple[FileRecord, str] | None = None) -> None:
        """The peer could not send ``path``; ``asked`` is the (record, remote path) requested.

        A refusal for what we no longer want in that form (a conflict copy
        first asked for under the original name, since announced under its
        own) does not hold the peer back for RETRY_AFTER.
        """
        wanted = self.wanted.get(path)
        if wanted is not None and (asked is None or asked == (wanted.record, wanted.remote_path)):
            self.wanted.failed(path, session.peer_id, self.clock.seconds())
        if self.in_flight.get(path) is session:
            del self.in_flight[path]
        self.report("download_failed", file=path, peer_id=session.peer_id,
                    reason="the peer could not send it")
        self.pump()

    def report_progress(self) -> None:
        for session in list(self.sessions.values()):
            session.send_progress()

    # -- pause -------------------------------------------------------------------

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        self.pump()

    def stop(self) -> None:
        """The share stops: no retry is left scheduled on the reactor."""
        self._unresolved.stop()
        self.wanted.stop()
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        self._retry_call = None

    # -- read-only shares: the share's version back --------------------------------

    def revert(self, prefix: str = "") -> Deferred[dict[str, Any]]:
        """Read-only share: its version back over local changes under ``prefix`` (ShareRevert)."""
        return Deferred.fromCoroutine(self.reverting.revert(prefix))


def _has_ancestor_in(path: str, folders: set[str]) -> bool:
    """True when a folder strictly above ``path`` is one of ``folders``."""
    cut = path.rfind("/")
    while cut > 0:
        path = path[:cut]
        if path in folders:
            return True
        cut = path.rfind("/")
    return False
