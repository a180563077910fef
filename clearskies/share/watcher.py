"""Noticing local changes quickly: inotify events, debounced into partial rescans.

``Debouncer`` (pure, clock-driven) turns a stream of "this path changed"
into batches: a path is ready once it has been quiet for ``quiet`` seconds,
or ``max_delay`` seconds after its first event if it never stops changing.
A path whose last event was a writer closing it (``IN_CLOSE_WRITE``) needs
only ``closed_quiet`` seconds: the write is most likely complete, and if it
is not, the scanner's own check holds (a file that changes while it is
hashed is recorded as still changing and looked at again), as it does for
a writer pausing longer than ``quiet``.
Too many pending paths (a bounded set) collapse into one full rescan.

``InotifyWatcher`` feeds it from Linux inotify through Twisted's ``INotify``,
one watch per directory (inotify is not recursive).  New directories are
watched as they appear; their contents are found by the rescan of the new
directory, which also reports the directories below it for watching.  When
the kernel's queue overflows, events were lost: ask for a full rescan.

Periodic full rescans back all this up (and replace it where inotify is
missing or out of watches); ``full_rescan_interval`` keeps their cost under
about a tenth of the wall time.
"""

from __future__ import annotations

import heapq
import os
import struct
from typing import Callable, Iterable

from twisted.internet.interfaces import IDelayedCall, IReactorFDSet, IReactorTime
from twisted.logger import Logger
from twisted.python.filepath import FilePath

from clearskies.share.ignore import TEMP_SUFFIX, VERSIONS_NAME

try:
    from twisted.internet import inotify
except ImportError:  # not Linux
    inotify = None  # type: ignore[assignment]

DEFAULT_QUIET = 1.0
DEFAULT_CLOSED_QUIET = 0.2
"""Quiet seconds for a path whose last event was its writer closing it: long
enough for the next event of a save made of several steps (a close and a
rename, a reopen to append) to keep it waiting, short enough not to add a
second to every change."""
DEFAULT_MAX_DELAY = 30.0
MAX_PENDING_PATHS = 10_000
#: How long an announced rename of our own may take to show up as an event.
EXPECTED_ARRIVAL_SECONDS = 60.0
MAX_EXPECTED_ARRIVALS = 100_000
MIN_FULL_RESCAN_INTERVAL = 60.0
FULL_RESCAN_FACTOR = 10.0


def full_rescan_interval(last_duration: float, minimum: float = MIN_FULL_RESCAN_INTERVAL,
                         factor: float = FULL_RESCAN_FACTOR) -> float:
    """Seconds until the next full rescan: scanning takes at most 1/factor of the time."""
    return max(minimum, factor * last_duration)


class Debouncer:
    """Collects changed paths and releases each once it has settled.

    A path's deadline only moves later while it keeps changing, so each
    pending path has one entry in a heap of deadlines, pushed when it first
    appears; when that entry comes due, the path is either released or
    pushed again at its current deadline.  A touch costs O(log n) and a
    release O(log n) per path, however many paths are pending.
    """

    def __init__(self, clock: IReactorTime, on_ready: Callable[[set[str], float], None],
                 on_overflow: Callable[[float], None], quiet: float = DEFAULT_QUIET,
                 max_delay: float = DEFAULT_MAX_DELAY,
                 max_paths: int = MAX_PENDING_PATHS,
                 closed_quiet: float = DEFAULT_CLOSED_QUIET) -> None:
        """``on_ready(paths, first_seen)`` gets each settled batch and when its
        first event came; ``on_overflow(first_seen)`` replaces it when more
        than ``max_paths`` paths were pending."""
        self._clock = clock
        self._on_ready = on_ready
        self._on_overflow = on_overflow
        self.quiet = quiet
        self.max_delay = max_delay
        self.max_paths = max_paths
        self.closed_quiet = min(closed_quiet, quiet)
        self._first: dict[str, float] = {}
        self._last: dict[str, float] = {}
        self._not_before: dict[str, float] = {}
        self._closed: set[str] = set()  # pending paths whose last event was a close after writing
        self._due: list[tuple[float, str]] = []  # heap: (deadline, path); stale entries skipped
        self._scheduled: dict[str, float] = {}  # each pending path's live entry in the heap
        self._timer: IDelayedCall | None = None

    @property
    def pending(self) -> int:
        return len(self._first)

    def touch(self, path: str, wait: float | None = None) -> None:
        """Note that ``path`` changed now; with ``wait``, release it no earlier
        than ``wait`` seconds from now (a back-off for files that keep changing)."""
        self._touch(path, wait, False)

    def touch_closed(self, path: str) -> None:
        """Note that ``path``'s writer closed it now: ``closed_quiet`` then
        suffices, until another change comes."""
        self._touch(path, None, True)

    def _touch(self, path: str, wait: float | None, closed: bool) -> None:
        now = self._clock.seconds()
        new = path not in self._first
        if new:
            self._first[path] = now
        self._last[path] = now
        if closed:
            self._closed.add(path)
        else:
            self._closed.discard(path)
        if wait is not None:
            self._not_before[path] = max(self._not_before.get(path, 0.0), now + wait)
        if len(self._first) > self.max_paths:
            earliest = min(self._first.values())
            self.clear()
            self._on_overflow(earliest)
            return
        deadline = self._deadline(path)
        if new or deadline < self._scheduled[path]:  # else its entry comes first anyway
            self._scheduled[path] = deadline
            heapq.heappush(self._due, (deadline, path))
            if self._timer is None or deadline < self._timer.getTime():
                self._schedule(deadline)

    def clear(self) -> None:
        """Forget every pending path (e.g. a full rescan is coming anyway)."""
        self._first.clear()
        self._last.clear()
        self._not_before.clear()
        self._closed.clear()
        self._due.clear()
        self._scheduled.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _deadline(self, path: str) -> float:
        quiet = self.closed_quiet if path in self._closed else self.quiet
        settled = min(self._last[path] + quiet, self._first[path] + self.max_delay)
        return max(settled, self._not_before.get(path, 0.0))

    def _schedule(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._clock.callLater(max(0.0, when - self._clock.seconds()), self._fire)

    def _fire(self) -> None:
        self._timer = None
        now = self._clock.seconds()
        ready: set[str] = set()
        while self._due and self._due[0][0] <= now:
            due, path = heapq.heappop(self._due)
            if self._scheduled.get(path) != due:
                continue  # replaced by an earlier entry (a close), or released already
            deadline = self._deadline(path)
            if deadline <= now:
                ready.add(path)
                del self._scheduled[path]
            else:  # touched again since: wait for its new deadline
                self._scheduled[path] = deadline
                heapq.heappush(self._due, (deadline, path))
        first_seen = min((self._first[path] for path in ready), default=now)
        for path in ready:
            del self._first[path], self._last[path]
            self._not_before.pop(path, None)
            self._closed.discard(path)
        while self._due and self._scheduled.get(self._due[0][1]) != self._due[0][0]:
            heapq.heappop(self._due)  # stale: no timer for it
        if self._due:
            self._schedule(self._due[0][0])
        if ready:
            self._on_ready(ready, first_seen)


if inotify is not None:
    _EVENTS = (inotify.IN_MODIFY | inotify.IN_ATTRIB | inotify.IN_CLOSE_WRITE
               | inotify.IN_CREATE | inotify.IN_DELETE | inotify.IN_MOVED_FROM
               | inotify.IN_MOVED_TO | inotify.IN_DELETE_SELF | inotify.IN_MOVE_SELF
               | inotify.IN_UNMOUNT | inotify.IN_ONLYDIR | inotify.IN_DONT_FOLLOW)
    _ROOT_GONE = (inotify.IN_DELETE_SELF | inotify.IN_MOVE_SELF | inotify.IN_UNMOUNT
                  | inotify.IN_IGNORED)
    _NEW_DIR = inotify.IN_CREATE | inotify.IN_MOVED_TO
    _OVERFLOW_WD = 0xFFFFFFFF  # -1 as the unsigned 32-bit number Twisted unpacks
    _HEADER = struct.Struct("=LLLL")  # struct inotify_event: wd, mask, cookie, len
    _TEMP_SUFFIX = os.fsencode(TEMP_SUFFIX)

    class _ShareINotify(inotify.INotify):
        """Twisted's INotify, adjusted for watching a whole tree.

        - Twisted closes the inotify descriptor (dropping every watch) when
          any watched directory is deleted, which suits a watcher of one
          path; here a deleted subdirectory must only lose its own watch.
          So the descriptor closes only through ``close``.
        - The kernel reports a queue overflow with watch descriptor -1
          (read as unsigned by Twisted), which Twisted drops as unknown; a
          watch entry under that number routes it to our callback.
        - Events are parsed here: callbacks get the path as bytes, not a
          ``FilePath`` (building one cost more than the rest of the event), and
          events for our own partial downloads (``*.!clearsky``, six per
          downloaded file) are dropped before anything is built for them.
        """

        def __init__(self, reactor: IReactorFDSet, root: FilePath[bytes],
                     callback: Callable[[object, bytes, int], None]) -> None:
            super().__init__(reactor)
            self._closing = False
            self._watchpoints[_OVERFLOW_WD] = inotify._Watch(root, callbacks=[callback])

        def close(self) -> None:
            self._closing = True
            self.loseConnection()

        def _doRead(self, data: bytes) -> None:
            # The kernel hands out whole events; a buffer only guards against a short read.
            buffer = self._buffer + data if self._buffer else data
            offset, end = 0, len(buffer)
            while end - offset >= _HEADER.size:
                wd, mask, _cookie, size = _HEADER.unpack_from(buffer, offset)
                start = offset + _HEADER.size
                if end - start < size:
                    break
                name = buffer[start:start + size].rstrip(b"\0")
                offset = start + size
                if name.endswith(_TEMP_SUFFIX):
                    continue
                watch = self._watchpoints.get(wd)
                if watch is None:
                    continue
                path = watch.path.path + b"/" + name if name else watch.path.path
                for callback in watch.callbacks:
                    callback(watch, path, mask)
                if mask & inotify.IN_DELETE_SELF:
                    self._rmWatch(wd)
            self._buffer = buffer[offset:]

        def loseConnection(self) -> None:
            if self._closing:
                super().loseConnection()


class ExpectedArrivals:
    """Renames into the share that we are about to make ourselves (installed downloads).

    Each expected rename swallows one "moved in" event for its path, so the
    sync engine's own writes do not come back as local changes to rescan.
    Any other event for the path (a user editing the file afterwards) still
    counts.  Entries older than ``keep_for`` seconds are dropped, and at most
    ``max_paths`` are kept: a forgotten entry only costs a rescan.
    """

    def __init__(self, clock: IReactorTime, keep_for: float = EXPECTED_ARRIVAL_SECONDS,
                 max_paths: int = MAX_EXPECTED_ARRIVALS) -> None:
        self._clock = clock
        self.keep_for = keep_for
        self.max_paths = max_paths
        self._expected: dict[str, tuple[int, float]] = {}  # path -> (count, when), oldest first

    def __len__(self) -> int:
        return len(self._expected)

    def expect(self, paths: Iterable[str]) -> None:
        now = self._clock.seconds()
        self._expire(now)
        for path in paths:
            count, _ = self._expected.pop(path, (0, now))
            self._expected[path] = (count + 1, now)
        while len(self._expected) > self.max_paths:
            del self._expected[next(iter(self._expected))]

    def cancel(self, paths: Iterable[str]) -> None:
        """These renames did not happen after all."""
        for path in paths:
            entry = self._expected.get(path)
            if entry is None:
                continue
            if entry[0] > 1:
                self._expected[path] = (entry[0] - 1, entry[1])
            else:
                del self._expected[path]

    def arrived(self, path: str) -> bool:
        """A "moved in" event for ``path``: True if it was one of ours (and is now used up)."""
        entry = self._expected.get(path)
        if entry is None:
            return False
        self._expire(self._clock.seconds())
        if path not in self._expected:
            return False
        self.cancel([path])
        return True

    def _expire(self, now: float) -> None:
        while self._expected:
            path = next(iter(self._expected))
            if now - self._expected[path][1] < self.keep_for:
                break
            del self._expected[path]


class InotifyWatcher:
    """Watches every directory of a share and reports changed share-relative paths."""

    _log = Logger()

    def __init__(self, reactor: IReactorFDSet, root: str, on_change: Callable[[str], None],
                 on_overflow: Callable[[], None], on_root_changed: Callable[[], None],
                 expected: ExpectedArrivals | None = None,
                 ignored: Callable[[str, bool], bool] | None = None,
                 on_closed: Callable[[str], None] | None = None) -> None:
        """``on_closed(path)``, if given, replaces ``on_change(path)`` for a file
        whose writer just closed it.  ``ignored(path, is_dir)``: True for a path
        the share ignores; such a new directory gets no watch (a ``node_modules``
        of 10,000 folders would use as many of the user's inotify watches)."""
        self._reactor = reactor
        self.root = os.path.realpath(root)
        self._on_change = on_change
        self._on_closed = on_closed
        self._on_overflow = on_overflow
        self._on_root_changed = on_root_changed
        self.expected = expected
        self._ignored = ignored or (lambda path, is_dir: False)
        self._notifier: _ShareINotify | None = None
        self._watched: set[str] = set()
        self.complete = False  # every directory handed to us is watched

    @staticmethod
    def available() -> bool:
        return inotify is not None

    def start(self) -> bool:
        """Watch the root; False (and nothing watched) if inotify is unusable."""
        if inotify is None:
            return False
        root = FilePath(os.fsencode(self.root))
        try:
            self._notifier = _ShareINotify(self._reactor, root, self._event)
            self._notifier.startReading()
            self._notifier.watch(root, mask=_EVENTS, callbacks=[self._event])
        except (OSError, inotify.INotifyError) as e:
            self._log.warn("cannot watch {root} for changes ({error}); relying on periodic "
                           "rescans", root=self.root, error=str(e))
            self.stop()
            return False
        self._watched = {""}
        self.complete = True
        return True

    def stop(self) -> None:
        if self._notifier is not None:
            self._notifier.close()
            self._notifier = None
        self._watched = set()
        self.complete = False

    @property
    def running(self) -> bool:
        return self._notifier is not None

    def read_events(self) -> None:
        """Take now the events the kernel holds, not at the reactor's next turn
        (a non-blocking read: nothing happens when there are none)."""
        if self._notifier is not None:
            self._notifier.doRead()

    def watch_directories(self, paths: Iterable[str]) -> list[str]:
        """Add a watch for each share-relative directory not watched yet; returns those."""
        added = []
        for path in paths:
            if path not in self._watched and self._notifier is not None and self._watch(path):
                added.append(path)
        return added

    def _watch(self, path: str) -> bool:
        filepath = FilePath(os.fsencode(os.path.join(self.root, path)))
        try:
            self._notifier.watch(filepath, mask=_EVENTS, callbacks=[self._event])
        except inotify.INotifyError:
            # Gone already or not a directory (we never follow symlinks): the
            # rescan of its parent tells the truth.  Or not readable by us: the
            # scanner skips and lists it.  Or out of watches.
            if not os.path.isdir(filepath.path):
                return False
            if not os.access(filepath.path, os.R_OK | os.X_OK):
                self._log.info("cannot watch {path} in {root}: permission denied; it is not "
                               "synced while this daemon may not read it", path=path,
                               root=self.root)
            elif self.complete:
                self.complete = False
                self._log.warn(
                    "cannot watch every directory of {root} (raise the sysctl "
                    "fs.inotify.max_user_watches); changes there are found by periodic "
                    "rescans", root=self.root)
            return False
        self._watched.add(path)
        return True

    def _unwatch_tree(self, path: str) -> None:
        """Drop the watches of a directory that moved away, and of those below it."""
        below = path + "/"
        for watched in [w for w in self._watched if w == path or w.startswith(below)]:
            self._watched.discard(watched)
            try:
                self._notifier.ignore(FilePath(os.fsencode(os.path.join(self.root, watched))))
            except (KeyError, inotify.INotifyError):
                pass

    def _relative(self, raw: bytes) -> str | None:
        path = os.fsdecode(raw)
        if path == self.root:
            return ""
        if not path.startswith(self.root + os.sep):
            return None
        return path[len(self.root) + 1:].replace(os.sep, "/")

    def _event(self, _watch: object, raw_path: bytes, mask: int) -> None:
        if self._notifier is None:
            return
        if mask & inotify.IN_Q_OVERFLOW:
            self._log.info("inotify queue overflowed for {root}; rescanning everything",
                           root=self.root)
            self._on_overflow()
            return
        path = self._relative(raw_path)
        if path is None:
            return
        if path == "":
            if mask & _ROOT_GONE:
                self._on_root_changed()
            return
        if path == VERSIONS_NAME or path.startswith(VERSIONS_NAME + "/"):
            # The daemon's own kept versions: never synced, so neither watched nor
            # rescanned (a deletion of 1,000 files would be 1,000 events more).
            return
        if mask & (inotify.IN_DELETE_SELF | inotify.IN_IGNORED):
            self._watched.discard(path)  # its parent reports the deletion itself
            return
        if mask & inotify.IN_MOVE_SELF:
            return  # the parent's IN_MOVED_FROM / IN_MOVED_TO say where
        if mask & inotify.IN_ISDIR:
            if mask & inotify.IN_MOVED_FROM:
                self._unwatch_tree(path)
            elif mask & _NEW_DIR and not self._ignored(path, True):
                self._watch(path)
        elif mask & inotify.IN_MOVED_TO and self.expected is not None \
                and self.expected.arrived(path):
            return  # a download we installed ourselves: nothing to rescan
        if mask & inotify.IN_CLOSE_WRITE and self._on_closed is not None:
            self._on_closed(path)
            return
        self._on_change(path)
