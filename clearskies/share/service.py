"""One share's local side as a service: scans, watching, error state, change feed.

``ShareService`` owns the scanner, the inotify watcher and the timers of
one share, and runs at most one scan at a time.  On start it watches the
whole folder, then scans it; watcher events are debounced into partial
rescans, and full rescans repeat at an interval that keeps their cost near
a tenth of the wall time.

The sync layer subscribes with ``add_change_listener`` and is told about
every committed batch of local changes.  When it writes a file it received
it calls ``note_remote_write`` so the next scan sees the file as known.

If the folder or its ``.clearskies`` marker disappears (a disk that is not
mounted), the share goes to the error state and records nothing.  A cheap
check of the root and its marker (``clearskies.share.folder.RootWatch``: a
stat and a small read, in a worker) runs every ``root_check`` seconds and
whenever the watcher sees the marker change: it notices a lost marker
within seconds, and a folder that comes back (remounted, restored)
resumes by itself.  Other errors (a full disk,
a database that refuses writes) are retried with a full scan, after
``error_retry`` seconds and twice as long after each failure up to
``MAX_ERROR_RETRY``; the first scan that succeeds clears the error.  ``repair_marker`` writes
a lost marker again once the folder is shown to hold the share's files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from clearskies.errors import RootMissing, ShareError
from clearskies.share.database import CacheKey, ShareCounts, ShareInfo, ShareStore
from clearskies.share.folder import ROOT_CHECK, RootWatch
from clearskies.share.folder import create_share as create_share  # where callers found it
from clearskies.share.hashing import HashFile, hash_file
from clearskies.share.ignore import MARKER_NAME, TEMP_SUFFIX
from clearskies.share.paths import LocalPaths
from clearskies.share.records import FileRecord
from clearskies.share.listing import list_directories
from clearskies.share.scanner import Move, Scanner, ScanResult
from clearskies.share.watcher import (
    DEFAULT_MAX_DELAY, DEFAULT_QUIET, Debouncer, ExpectedArrivals, InotifyWatcher,
    full_rescan_interval)
from clearskies.interfaces import IRunner

#: Called with each committed batch of local changes: records, moves, the revision it made.
ChangeListener = Callable[[list[FileRecord], list[Move], int], Any]
ERROR_RETRY = 5.0
MAX_ERROR_RETRY = 300.0
MAX_UNSTABLE_WAIT = 600.0


@dataclass(frozen=True, slots=True)
class ShareStatus:
    """What the CLI shows about one share."""

    state: str  # "starting", "idle", "scanning", "paused", "error" or "stopped"
    reason: str | None  # why, in the error state
    files: int
    directories: int
    bytes: int
    deleted: int
    revision: int
    watching: bool  # inotify covers the whole tree
    progress: dict[str, object] | None  # counters of the scan in progress


class UnstableFiles:
    """Files that were changing while hashed: looked at again, backing off
    (3 s, 6 s, 12 s … 10 min) while they keep changing."""

    def __init__(self, debouncer: Debouncer) -> None:
        self._debouncer = debouncer
        self._tries: dict[str, int] = {}  # path -> unstable results in a row

    def scanned(self, unstable: list[str], scanned: list[str] | None) -> None:
        """A scan of ``scanned`` (None: everything) found ``unstable`` still changing."""
        if scanned is None:  # a full scan: whatever is not unstable now is settled
            self._tries = {path: self._tries.get(path, 0) for path in unstable}
        else:
            for path in set(scanned).difference(unstable):
                self._tries.pop(path, None)
        for path in unstable:
            tries = self._tries.get(path, 0) + 1
            self._tries[path] = tries
            self._debouncer.touch(path, min(self._debouncer.quiet * 2 ** tries,
                                            MAX_UNSTABLE_WAIT))


class ShareService(Service):
    """Keeps one share's database records in step with its folder."""

    _log = Logger()

    def __init__(self, reactor: IReactorTime, store: ShareStore, share: ShareInfo,
                 runner: IRunner, *, hasher: HashFile = hash_file, use_inotify: bool = True,
                 quiet: float = DEFAULT_QUIET, max_delay: float = DEFAULT_MAX_DELAY,
                 error_retry: float = ERROR_RETRY, root_check: float = ROOT_CHECK,
                 concurrency: int | None = None) -> None:
        """``reactor`` gives time and timers (and file descriptors when
        ``use_inotify``); ``runner`` runs the blocking work (a thread pool)."""
        self._reactor = reactor
        self._store = store
        self._runner = runner
        self.share = share
        self.share_id = share.share_id
        self.paths = LocalPaths(share.path)
        self.scanner = Scanner(share.path, share.share_id, share.peer_id, store, runner,
                               reactor, hasher=hasher, concurrency=concurrency)
        self._debouncer = Debouncer(reactor, self._paths_settled, self._too_many_changes,
                                    quiet=quiet, max_delay=max_delay)
        self.expected_arrivals = ExpectedArrivals(reactor)
        self._watcher = (InotifyWatcher(reactor, share.path, self.path_changed,
                                        self._events_lost, self._root_changed,
                                        self.expected_arrivals, self.is_ignored,
                                        on_closed=lambda p: self.path_changed(p, closed=True))
                         if use_inotify and InotifyWatcher.available() else None)
        self._error_retry = error_retry
        self._error_tries = 0  # failed scans in a row: the retry backs off
        self._root = RootWatch(reactor, runner, store, share, self.paths, interval=root_check,
                               on_missing=self._root_missing, on_present=self._root_present)
        self._root_lost = False  # the error state is a missing folder or marker
        #: Called when the share leaves the error state (the daemon redials its peers).
        self.on_recovered: Callable[[], Any] | None = None
        self._listeners: list[ChangeListener] = []
        self._state = "stopped"
        self._reason: str | None = share.error if share.state == "error" else None
        self._paused = False
        self._counts = ShareCounts(0, 0, 0, 0)
        self._revision = share.revision
        self._full_waiters: list[Deferred[ScanResult]] | None = None
        self._dirty: set[str] = set()
        self._dirty_since: float | None = None
        self._busy = False  # a _drain is running
        self._draining: Deferred[None] | None = None
        self._watcher_failed = False
        self._watch_off = False  # the share's ``watcher`` setting: False, periodic scans only
        self._timer: IDelayedCall | None = None  # the next full rescan or error re-check
        self._unstable = UnstableFiles(self._debouncer)
        self._adopt_waiters: list[Deferred[None]] = []

    # -- lifetime -------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._state = "starting"
        self._request_full()
        self._root.start()

    def stopService(self) -> Deferred[None]:
        """Stop timers and the watcher; the Deferred fires when any scan has ended."""
        super().stopService()
        self._state = "stopped"
        self._cancel_timer()
        self._root.stop()
        self._debouncer.clear()
        if self._watcher is not None:
            self._watcher.stop()
        self.scanner.stop()
        waiters, self._full_waiters = self._full_waiters or [], None
        for waiter in waiters:
            waiter.errback(self._stopped())
        self._adopted()
        done: Deferred[None] = Deferred()
        if self._draining is None:
            done.callback(None)
        else:
            self._draining.addBoth(lambda _: done.callback(None))
        return done

    def local_files_recorded(self) -> Deferred[None] | None:
        """While an adopting first scan is due (see Scanner.adopting): a Deferred
        that fires once it has run (or failed, or the share stopped); else None."""
        if not self.scanner.adopting or not self.running:
            return None
        d: Deferred[None] = Deferred()
        self._adopt_waiters.append(d)
        return d

    def _adopted(self) -> None:
        waiters, self._adopt_waiters = self._adopt_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def refuse(self, reason: str) -> None:
        """Never start: the share stays in the error state with ``reason``.

        For a share that must not run at all (its folder holds the daemon's
        own data, say); unlike a missing folder, nothing is retried.
        """
        self._state = "error"
        self._reason = reason

    # -- what the sync layer and the CLI use ----------------------------------

    def add_change_listener(self, listener: ChangeListener) -> None:
        """Call ``listener(records, moves, revision)`` after each batch of local changes is stored.

        It is called as soon as the batch is committed, before anything
        committed later is reported: ``revision`` orders it among the sync
        layer's own commits.
        """
        self._listeners.append(listener)

    def remove_change_listener(self, listener: ChangeListener) -> None:
        self._listeners.remove(listener)

    def _stopped(self) -> ShareError:
        return ShareError("%s stopped syncing (detached, or the daemon is stopping) before "
                          "the scan finished" % self.share.path)

    def rescan(self) -> Deferred[ScanResult]:
        """Scan the whole folder now (after any scan in progress); fires with its result,
        or ShareError if the share stops first."""
        d: Deferred[ScanResult] = Deferred()
        if not self.running:
            d.errback(ShareError("the share %s is not running" % self.share.path))
            return d
        self._request_full(d)
        return d

    def path_changed(self, path: str, closed: bool = False) -> None:
        """Something changed at this share-relative path: rescan it once it settles.

        Ignored in the error state, whose periodic re-check scans everything.
        """
        if path.endswith(TEMP_SUFFIX):
            return  # our own partial downloads (ignored anyway): the cheap test first
        if path == MARKER_NAME:
            self.check_root()  # removed or replaced: find out now, not at the next scan
            return
        if not self.running or self._state == "error" or self.scanner.rules.is_ignored(path):
            return
        (self._debouncer.touch_closed if closed else self._debouncer.touch)(path)

    def pause(self) -> None:
        """Hold local change detection, and so every announcement, until ``resume``.

        Changes noticed meanwhile are remembered (a bounded set, else one
        full rescan) and scanned and announced on resume.
        """
        self._paused = True

    def resume(self) -> None:
        self._paused = False
        self._kick()

    @property
    def paused(self) -> bool:
        return self._paused

    def set_watching(self, enabled: bool) -> None:
        """Watch the folder (inotify), or only scan it periodically (and on ``rescan``)."""
        self._watch_off, was_off = not enabled, self._watch_off
        if not enabled and self._watcher is not None:
            self._watcher.stop()
        elif enabled and was_off and self.running:
            self._request_full()  # starts the watcher, then finds what it missed

    def note_remote_write(self, record: FileRecord, inode: int, size: int,
                          mtime_ns: int) -> Deferred[int]:
        """Store a record whose content the sync layer has just put on disk.

        The cache key (the written file's inode, size and mtime) tells the
        next scan that this file is known, so it is not mistaken for a local
        change.  Listeners are not called: the sync layer announces what it
        receives itself.  Fires with the new share revision.
        """
        key = CacheKey(inode, size, mtime_ns)
        d = self._store.apply_changes(self.share_id, [record], {record.path: key})
        return d.addCallback(self._note_revision)

    def is_ignored(self, path: str, is_dir: bool = False) -> bool:
        """True if the sync layer must neither announce nor overwrite this path."""
        return self.scanner.rules.is_ignored(path, is_dir)

    @property
    def error(self) -> str | None:
        """Why the share is in error, or None: checked on every peer message, so cheap."""
        return self._reason if self._state == "error" else None

    @property
    def status(self) -> ShareStatus:
        state = self._state
        if state in ("idle", "scanning") and self._paused:
            state = "paused"
        counts = self._counts
        return ShareStatus(
            state=state, reason=self._reason if state == "error" else None,
            files=counts.files, directories=counts.directories, bytes=counts.bytes,
            deleted=counts.deleted, revision=self._revision,
            watching=self._watcher is not None and self._watcher.complete,
            progress=self.scanner.progress.as_dict() if state == "scanning" else None)

    def local_changes_pending(self) -> bool:
        """Whether changes on disk may not be recorded yet: the watcher holds
        paths not scanned yet (settling), or a scan is queued or running."""
        if self._watcher is not None and self.running:
            self._watcher.read_events()
        return bool(self._debouncer.pending or self._dirty or self._full_waiters is not None
                    or self._busy)

    # -- scheduling -------------------------------------------------------------

    def _note_revision(self, revision: int) -> int:
        self._revision = max(self._revision, revision)
        return revision

    def _request_full(self, waiter: Deferred[ScanResult] | None = None) -> None:
        if self._full_waiters is None:
            self._full_waiters = []
        if waiter is not None:
            self._full_waiters.append(waiter)
        self._kick()

    def _paths_settled(self, paths: set[str], first_seen: float) -> None:
        self._dirty |= paths
        if self._dirty_since is None or first_seen < self._dirty_since:
            self._dirty_since = first_seen
        self._kick()

    def _too_many_changes(self, first_seen: float) -> None:
        self._request_full()

    def _events_lost(self) -> None:
        self._debouncer.clear()
        self._request_full()

    def _root_changed(self) -> None:
        self._request_full()

    def _kick(self) -> None:
        if self._busy or not self.running or self._paused:
            return
        self._busy = True
        drain = Deferred.fromCoroutine(self._drain())
        self._draining = None if drain.called else drain

    async def _drain(self) -> None:
        """Run queued scans one after the other until nothing is queued."""
        try:
            while self.running and not self._paused:
                if self._full_waiters is not None:
                    waiters, self._full_waiters = self._full_waiters, None
                    self._dirty, self._dirty_since = set(), None  # covered by this scan
                    await self._scan(None, None, waiters)
                elif self._dirty:
                    paths, since = self._dirty, self._dirty_since
                    self._dirty, self._dirty_since = set(), None
                    await self._scan(sorted(paths), since, [])
                else:
                    break
        finally:
            self._busy = False
            self._draining = None

    async def _scan(self, paths: list[str] | None, since: float | None,
                    waiters: list[Deferred[ScanResult]]) -> None:
        self._state = "scanning"
        try:
            if paths is None:
                await self._watch_before_listing()
            result = await self.scanner.scan(paths, since, self._announce)
            self._counts = await self._store.share_counts(self.share_id)
        except CancelledError:
            for waiter in waiters:
                waiter.errback(self._stopped())
            return
        except Exception as e:
            self._root_lost = isinstance(e, RootMissing)
            if isinstance(e, ShareError):
                reason = str(e)
            else:
                self._log.failure("scanning {root} failed", root=self.share.path)
                reason = "scanning failed: %s" % (e,)
            await self._enter_error(reason)
            for waiter in waiters:
                waiter.errback(e)
            return
        self._note_revision(result.revision)
        if self._state == "error":
            # The root check found the folder or marker gone while this scan ran
            # (it began as "scanning"): the error stands until the next check.
            for waiter in waiters:
                waiter.errback(ShareError(self._reason or "the share folder is unavailable"))
            return
        if result.full:
            self.scanner.adopting = False  # the folder's own files are all recorded now
            self._adopted()
        if self._state != "stopped":
            self._state = "idle"
        try:
            await self._after_scan(result, paths)
        except Exception:
            self._log.failure("after scanning {root}", root=self.share.path)
        for waiter in waiters:
            waiter.callback(result)

    async def _watch_before_listing(self) -> None:
        """Start watching every directory before a full scan lists the folder.

        A change after the listing then raises an event, and a change before
        it is in the listing: nothing slips between the two, so no second
        full scan is needed to catch up.
        """
        watcher = self._watcher
        if watcher is None or watcher.running or self._watcher_failed or self._watch_off:
            return
        try:
            directories = await self._runner.run(list_directories, self.share.path,
                                                 self.scanner.private_paths)
        except OSError:
            return  # the scan reports what is wrong; the next full scan tries again
        if self.running and not watcher.running:
            # (If it cannot start: periodic rescans only.)
            self._watcher_failed = not watcher.start()
            if not self._watcher_failed:
                watcher.watch_directories(directories)

    async def _after_scan(self, result: ScanResult, scanned: list[str] | None) -> None:
        self._error_tries = 0
        if self._reason is not None:
            self._log.info("share {root} is reachable again", root=self.share.path)
            self._reason = None
            await self._store.set_share_state(self.share_id, "ok", None)
            if self.on_recovered is not None:
                self.on_recovered()
        self._unstable.scanned(result.unstable, scanned)
        # (A watcher that is not running here could not start before this full
        # scan; the next periodic one, which finds what it missed, tries again.)
        watcher = self._watcher
        if watcher is not None and watcher.running and self.running:
            # Directories that appeared after the listing began are watched
            # only now: what changed in them meanwhile is found by a rescan.
            for path in watcher.watch_directories(result.directory_paths):
                self.path_changed(path)
        if result.full:
            self._schedule(full_rescan_interval(result.duration), self._request_full)

    async def _enter_error(self, reason: str) -> None:
        self._state = "error"
        self._adopted()  # (peers' messages are refused in the error state)
        if self._watcher is not None:
            self._watcher.stop()
        self._debouncer.clear()
        self._dirty, self._dirty_since = set(), None
        if self.running:
            # Scheduled before the state is stored: the store may be what fails
            # (a full disk), and the retry is what brings the share back.
            wait = min(self._error_retry * 2 ** self._error_tries, MAX_ERROR_RETRY)
            self._error_tries += 1
            self._schedule(wait, self._request_full)
        if reason != self._reason:
            self._log.error("share {root} stopped: {reason}", root=self.share.path,
                            reason=reason)
            self._reason = reason
            try:
                await self._store.set_share_state(self.share_id, "error", reason)
            except Exception as e:
                self._log.warn("could not store the error of share {root} ({why}); "
                               "it is retried all the same", root=self.share.path, why=e)

    # -- the root and its marker (clearskies.share.folder) ------------------------

    def check_root(self) -> None:
        """Check the folder and its marker now, in a worker: error if lost, resume if back."""
        if self.running:
            self._root.check()

    def _root_present(self) -> None:
        if (self._state == "error" and self._root_lost and self._full_waiters is None
                and self.running):
            self._request_full()  # back (remounted, restored): a full scan resumes the share

    def _root_missing(self, failure: Any) -> Deferred[None] | None:
        failure.trap(RootMissing)
        if self._state in ("error", "stopped"):
            return None
        self._root_lost = True
        # Lost while running (unmounted, marker deleted): stop before any scan
        # could take the missing files for deletions.
        self.scanner.stop()
        return Deferred.fromCoroutine(self._enter_error(failure.getErrorMessage()))

    def repair_marker(self) -> Deferred[dict[str, Any]]:
        """Write a lost ``.clearskies`` marker again, if the folder holds the share's files
        (see RootWatch.repair); ShareError saying why not otherwise."""
        return self._root.repair()

    def _announce(self, records: list[FileRecord], moves: list[Move], revision: int) -> None:
        self._note_revision(revision)
        for listener in list(self._listeners):
            try:
                listener(records, moves, revision)
            except Exception:
                self._log.failure("a change listener of {root} failed", root=self.share.path)

    def _schedule(self, delay: float, action: Callable[[], None]) -> None:
        self._cancel_timer()
        self._timer = self._reactor.callLater(delay, self._timer_fired, action)

    def _timer_fired(self, action: Callable[[], None]) -> None:
        self._timer = None
        action()

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
