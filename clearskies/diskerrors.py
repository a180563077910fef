"""Local disk errors while writing downloads, and when to try again (protocol/sync.md).

Pure logic: no I/O, the time comes in as ``now`` and free space as a
number someone measured (``os.statvfs`` in a worker).

A download that cannot be written (a full disk, a quota, a read-only or
failing file system, a directory we may not write to) is never a reason
to drop the peer's connection: the file waits, the share's status says
why and what to do, and the download is tried again later, with a
backoff (5 s doubling to 5 min), by itself.

* ``ENOSPC`` / ``EDQUOT``: the file waits until the free space measured
  on the share's file system holds it (and its backoff has passed); other
  files that fit keep coming, so one big file does not starve small ones.
  The partial download is removed at once: its bytes are what filled the
  disk, and keeping them would stall every other file until space is
  freed.  It is fetched again from its first byte when it fits.
* ``EROFS`` / ``EIO``: the whole file system is affected: nothing is
  fetched until the backoff passes, then one file probes it.  A partial
  download stays for a resume (there is nothing to gain by removing it).
* ``EACCES`` / ``EPERM``: only that file (its directory) waits.

Any write that succeeds clears the share-wide problem; a file that
arrives, or is no longer wanted, clears its own.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

#: Errors of the local file system (as opposed to bugs or the peer's doing).
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO,
                         errno.EACCES, errno.EPERM})
#: Out of space: wait for room.
SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
#: The whole file system: probe it with one file after the backoff.
SHARE_WIDE_ERRNOS = frozenset({errno.EROFS, errno.EIO})

FIRST_RETRY = 5.0
MAX_RETRY = 300.0
#: Free bytes left alone when choosing files that fit (metadata, other writers).
SPACE_MARGIN = 64 * 1024
#: Problems listed in a status reply (the count says how many there are).
MAX_LISTED = 20


def is_disk_error(error: BaseException) -> bool:
    """True for an error of the local file system that a user can fix (not a bug of ours)."""
    return isinstance(error, OSError) and getattr(error, "errno", None) in DISK_ERRNOS


def frees_space(error: BaseException) -> bool:
    """True when the partial download should go: its bytes are what the disk lacks."""
    return getattr(error, "errno", None) in SPACE_ERRNOS


def backoff(tries: int) -> float:
    """Seconds before the ``tries``-th failed attempt is followed by another."""
    return min(FIRST_RETRY * 2 ** max(0, min(tries - 1, 30)), MAX_RETRY)


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return ("%d %s" % (value, unit)) if unit == "B" else ("%.1f %s" % (value, unit))
        value /= 1024
    return "%.1f TiB" % value


def advice(code: int, local: str, root: str) -> str:
    """What happened at ``local`` and what the user can do, in one sentence."""
    if code in SPACE_ERRNOS:
        what = "the disk quota is used up" if code == errno.EDQUOT else "the disk is full"
        return ("cannot write %s: %s; free space on the disk holding %s and the download "
                "resumes by itself" % (local, what, root))
    if code == errno.EROFS:
        return ("cannot write %s: the file system holding %s is read-only; make it writable "
                "again (e.g. remount it read-write) and syncing resumes by itself" % (local, root))
    if code == errno.EIO:
        return ("cannot write %s: input/output error; check the disk holding %s (system log, "
                "fsck); downloads are retried by themselves" % (local, root))
    return ("cannot write %s: %s; give the daemon's user write access to %s and the "
            "download is retried by itself" % (
                local, os.strerror(code).lower(), os.path.dirname(local) or root))


@dataclass
class Problem:
    """A download that failed on the local disk, and when it may be tried again."""

    path: str  # share-relative
    local: str  # where it was written
    code: int  # errno
    size: int
    tries: int
    since: float
    retry_at: float

    def as_dict(self, root: str) -> dict[str, object]:
        return {"path": self.path, "error": errno.errorcode.get(self.code, str(self.code)),
                "message": advice(self.code, self.local, root), "since": self.since,
                "retry_at": self.retry_at}


class DiskTrouble:
    """One share's download disk problems: which files wait, for what, until when."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.files: dict[str, Problem] = {}
        #: The file system as a whole (EROFS, EIO): no downloads before ``retry_at``.
        self.share_wide: Problem | None = None
        #: Free bytes for downloads, while some file waits for space; None: not limited.
        self.free: int | None = None

    def __bool__(self) -> bool:
        return bool(self.files) or self.share_wide is not None

    @property
    def waits_for_space(self) -> bool:
        return any(p.code in SPACE_ERRNOS for p in self.files.values())

    def failed(self, path: str, local: str, size: int, code: int, now: float) -> Problem:
        """A download of ``path`` failed with ``code``; returns its (updated) problem."""
        old = self.files.get(path)
        tries = (old.tries if old is not None else 0) + 1
        problem = Problem(path, local, code, size, tries,
                          old.since if old is not None else now, now + backoff(tries))
        self.files[path] = problem
        if code in SPACE_ERRNOS:
            self.free = 0  # until measured: nothing fits
        if code in SHARE_WIDE_ERRNOS:
            wide = self.share_wide
            if wide is not None and now < wide.retry_at:
                return problem  # a download started before the last failure: no new attempt
            wide_tries = (wide.tries if wide is not None else 0) + 1
            self.share_wide = Problem(path, local, code, size, wide_tries,
                                      wide.since if wide is not None else now,
                                      now + backoff(wide_tries))
        return problem

    def succeeded(self, path: str) -> None:
        """``path`` was written: its problem is over, and the file system takes writes again."""
        self.files.pop(path, None)
        self.share_wide = None
        self._settle()

    def forget(self, path: str) -> None:
        """``path`` is no longer wanted."""
        if self.files.pop(path, None) is not None:
            self._settle()

    def _settle(self) -> None:
        if not self.waits_for_space:
            self.free = None
        if not self.files:
            self.share_wide = None  # nothing waits for the file system any more

    def measured(self, free: int) -> None:
        """Free bytes on the share's file system, minus what downloads under way will take."""
        if self.waits_for_space:
            self.free = max(0, free)

    def blocked_until(self, now: float) -> float | None:
        """While the file system as a whole fails: when one file may probe it again."""
        wide = self.share_wide
        return wide.retry_at if wide is not None and now < wide.retry_at else None

    def may_fetch(self, path: str, size: int, now: float) -> tuple[bool, float | None]:
        """(fetch it now?, if not when to ask again: None = when free space is next measured)."""
        problem = self.files.get(path)
        if problem is not None and now < problem.retry_at:
            return False, problem.retry_at
        if self.free is not None and size > 0 and size + SPACE_MARGIN > self.free:
            return False, None
        return True, None

    def reserve(self, size: int) -> None:
        """A download of ``size`` bytes starts: count its bytes as used."""
        if self.free is not None:
            self.free = max(0, self.free - size)

    def status(self, wanted: dict[str, object] | None = None) -> dict[str, object]:
        """The status fields: ``problem`` (one line), ``disk_errors`` (some of them, listed).

        ``wanted``: when given, problems of files no longer in it are dropped first.
        """
        if wanted is not None:
            for path in [p for p in self.files if p not in wanted]:
                self.forget(path)
        if not self:
            return {}
        problems = sorted(self.files.values(), key=lambda p: (p.since, p.path))
        first = self.share_wide or problems[0]
        line = advice(first.code, first.local, self.root)
        waiting = len(problems)
        if waiting > 1:
            line += " (%d files wait" % waiting
            if self.waits_for_space:
                line += ", %s needed" % _size(sum(p.size for p in problems
                                                  if p.code in SPACE_ERRNOS))
                if self.free is not None:
                    line += ", %s free" % _size(self.free)
            line += ")"
        elif self.free is not None and first.code in SPACE_ERRNOS:
            line += " (%s needed, %s free)" % (_size(first.size), _size(self.free))
        return {"problem": line, "disk_errors_count": waiting,
                "disk_errors": [p.as_dict(self.root) for p in problems[:MAX_LISTED]],
                # The whole file system refuses writes: every wanted file waits.
                "disk_blocked": self.share_wide is not None}
