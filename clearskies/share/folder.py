"""A share's folder: claiming it, watching that it is there, writing a lost marker again.

``create_share`` registers a folder as a new share and writes its
``.clearskies`` marker.  ``RootWatch`` checks, in a worker, that the folder
still holds the marker, every ``interval`` seconds and whenever asked (the
watcher saw the marker change, a write failed with ENOENT): the share's
service hears of a lost folder within seconds and of one that came back.
``RootWatch.repair`` writes a lost marker again once the folder is shown
to hold the share's files.
"""

from __future__ import annotations

import os
import stat
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from clearskies.errors import ConfigurationError, ShareError
from clearskies.share.database import ShareInfo, ShareStore
from clearskies.share.ignore import MARKER_NAME, TEMP_SUFFIX
from clearskies.share.paths import LocalPaths
from clearskies.share.listing import check_share_root, read_marker, write_marker
from clearskies.interfaces import IRunner

ROOT_CHECK = 2.0
#: ``repair`` needs this share of the recorded files in the folder, as recorded.
REPAIR_FRACTION = 0.9
#: A file counts as present when its size matches and its time is this close (FAT: 2 s).
REPAIR_MTIME_SLACK_NS = 2_000_000_000

_log = Logger()


def create_share(store: ShareStore, runner: IRunner, root: str, share_id: str, peer_id: str,
                 access: str, now: float) -> Deferred[ShareInfo]:
    """Register a new share at ``root`` and write its marker file.

    ConfigurationError if the folder is missing, belongs to another share,
    or lies inside (or around) an existing share.
    """
    return Deferred.fromCoroutine(
        _create_share(store, runner, root, share_id, peer_id, access, now))


async def _create_share(store: ShareStore, runner: IRunner, root: str, share_id: str,
                        peer_id: str, access: str, now: float) -> ShareInfo:
    root = os.path.realpath(root)
    for other in await store.list_shares():
        inside = os.path.commonpath([root, other.path]) in (root, other.path)
        if inside:
            raise ConfigurationError(
                "%s overlaps the share at %s; choose a folder outside it" % (root, other.path))
    await runner.run(_claim_root, root, share_id)
    return await store.add_share(ShareInfo(share_id, root, peer_id, access, created=now))


def _claim_root(root: str, share_id: str) -> None:
    if not os.path.isdir(root):
        raise ConfigurationError("%s is not a folder; create it first" % root)
    found = read_marker(root)
    marker = os.path.join(root, MARKER_NAME)
    if os.path.lexists(marker) and found != share_id and not _empty_file(marker):
        raise ConfigurationError(
            "%s already holds the %s file of another share; remove that file if the old "
            "share is gone" % (root, MARKER_NAME))
    try:
        write_marker(root, share_id)
    except OSError as e:
        raise ConfigurationError(
            "cannot write the %s marker file in %s: %s; make the folder writable (and free "
            "some space if the disk is full), then try again"
            % (MARKER_NAME, root, e.strerror or e)) from None


def remove_marker(root: str, share_id: str) -> bool:
    """Remove ``<root>/.clearskies`` if it names ``share_id``; True if it did (blocking).

    The marker is first renamed aside (atomic) and read there, so what is
    removed is exactly what was checked; anything else (another share's
    marker, a symlink, a user's file) is put back where it was, never over
    something that appeared meanwhile.  Nothing else in the folder is touched.
    """
    marker = os.path.join(root, MARKER_NAME)
    aside = os.path.join(root, "%s.%d.detach%s" % (MARKER_NAME, os.getpid(), TEMP_SUFFIX))
    try:
        os.rename(marker, aside)
    except (FileNotFoundError, NotADirectoryError):
        return False  # no marker, or no folder
    if read_marker(root, os.path.basename(aside)) == share_id:
        os.unlink(aside)
        return True
    try:
        os.link(aside, marker, follow_symlinks=False)  # fails if the name is taken again
    except FileExistsError:
        _log.warn("left {aside}: {marker} was created again meanwhile", aside=aside,
                  marker=marker)
        return False
    except OSError:
        if os.path.lexists(marker):
            raise
        os.rename(aside, marker)  # no hard links here: put back by renaming
        return False
    os.unlink(aside)
    return False


def _empty_file(path: str) -> bool:
    """An empty regular file (a marker whose writing a crash cut short names no share)."""
    try:
        info = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(info.st_mode) and info.st_size == 0


def repair_refusal(root: str, recorded: int, present: int) -> str | None:
    """Why a marker must not be written again into ``root``, or None when it may (pure)."""
    if recorded == 0 or present >= REPAIR_FRACTION * recorded:
        return None
    return ("only %d of the %d files recorded for this share are in %s with their recorded "
            "size and time (%d%% needed); this does not look like the share's folder (is the "
            "right disk mounted?); nothing was changed" % (
                present, recorded, root, round(REPAIR_FRACTION * 100)))


def _marker_state(root: str, share_id: str) -> str:
    """"ours", "other" (another share's marker), "none" (no marker) or "missing" (no folder)."""
    if not os.path.isdir(root):
        return "missing"
    found = read_marker(root)
    if found == share_id:
        return "ours"
    return "other" if os.path.lexists(os.path.join(root, MARKER_NAME)) else "none"


def _count_present(files: list[tuple[Any, int | None, int | None]]) -> int:
    """How many (path, size, mtime_ns) are regular files of that size and time (blocking)."""
    present = 0
    for path, size, mtime_ns in files:
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode) or st.st_size != size:
            continue
        if mtime_ns is None or abs(st.st_mtime_ns - mtime_ns) <= REPAIR_MTIME_SLACK_NS:
            present += 1
    return present


class RootWatch:
    """Checks that one share's folder holds its marker; writes a lost marker again.

    ``on_missing(failure)`` is called with a RootMissing failure when a
    check finds the folder or marker gone (it may return a Deferred the
    check waits for), ``on_present()`` when a check finds them there.
    """

    _log = Logger()

    def __init__(self, reactor: IReactorTime, runner: IRunner, store: ShareStore,
                 share: ShareInfo, paths: LocalPaths, *, interval: float = ROOT_CHECK,
                 on_missing: Callable[[Failure], Deferred[None] | None],
                 on_present: Callable[[], None]) -> None:
        self._reactor = reactor
        self._runner = runner
        self._store = store
        self._share = share
        self._paths = paths
        self._interval = interval
        self._on_missing = on_missing
        self._on_present = on_present
        self._timer: IDelayedCall | None = None
        self._checking = False
        self.running = False

    def start(self) -> None:
        self.running = True
        self._schedule()

    def stop(self) -> None:
        self.running = False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def check(self) -> None:
        """Check the folder and its marker now, in a worker."""
        if not self.running or self._checking:
            return
        self._checking = True
        d = self._runner.run(check_share_root, self._share.path, self._share.share_id)
        d.addCallbacks(lambda _: self._on_present(), self._on_missing)
        d.addErrback(lambda f: self._log.failure("checking {root} failed", f,
                                                 root=self._share.path))
        d.addBoth(self._checked)

    def _checked(self, _: object) -> None:
        self._checking = False
        self._schedule()

    def _schedule(self) -> None:
        if self.running and (self._timer is None or not self._timer.active()):
            self._timer = self._reactor.callLater(self._interval, self._fired)

    def _fired(self) -> None:
        self._timer = None
        self.check()

    def repair(self) -> Deferred[dict[str, Any]]:
        """Write a lost ``.clearskies`` marker again, if the folder holds the share's files.

        At least REPAIR_FRACTION of the files the database records must be
        in the folder with their recorded size and modification time (a
        share that records no file needs none).  Raises ShareError saying
        why otherwise; then nothing is written.  The records are read a
        page at a time.
        """
        return Deferred.fromCoroutine(self._repair())

    async def _repair(self) -> dict[str, Any]:
        root = self._share.path
        share_id = self._share.share_id
        found = await self._runner.run(_marker_state, root, share_id)
        if found == "ours":
            self.check()
            return {"repaired": False, "checked": 0, "present": 0}
        if found == "other":
            raise ShareError("%s holds the %s marker of another share; refusing to replace it"
                             % (root, MARKER_NAME))
        if found == "missing":
            raise ShareError("the share folder %s does not exist; mount the disk or restore "
                             "the folder first" % root)
        checked = present = 0
        after: str | None = None
        while True:
            page = await self._store.records_between(share_id, "", None, after)
            if not page:
                break
            after = page[-1].path
            files = [(self._paths.to_local(row.path), row.record.size, row.record.mtime_ns)
                     for row in page if not row.record.deleted and not row.record.is_dir]
            checked += len(files)
            present += await self._runner.run(_count_present, files)
        problem = repair_refusal(root, checked, present)
        if problem is not None:
            raise ShareError(problem)
        try:
            await self._runner.run(write_marker, root, share_id)
        except OSError as e:
            raise ShareError("cannot write the %s marker file in %s: %s; make the folder "
                             "writable (free some space if the disk is full) and repair again"
                             % (MARKER_NAME, root, e.strerror or e)) from None
        self._log.info("share {root}: marker recreated ({present} of {checked} recorded files "
                       "present)", root=root, present=present, checked=checked)
        self.check()
        return {"repaired": True, "checked": checked, "present": present}
