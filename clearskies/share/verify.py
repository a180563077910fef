"""Re-verification of stored files: does each still hold the SHA-256 recorded for it?

A scan trusts a file whose inode, size and modification time are as
recorded, and never reads it again.  Bit rot (a disk or memory fault that
changes bytes without touching those) is only found by reading the file
back.  :func:`verify_file` does that for one file, and tells rot apart from
an edit: a file whose inode, size or time changed is the scanner's business
(``changed``), one that looks untouched but holds other bytes is ``damaged``.

These are blocking jobs for the files pool (``clearskies.threads``).
"""

from __future__ import annotations

import hashlib
import os
import stat

from clearskies.share.records import clamp_mtime_ns

OK = "ok"
#: Inode, size or time differ from the record: an edit the scanner will record.
CHANGED = "changed"
#: As recorded by inode, size and time, yet its bytes have another SHA-256.
DAMAGED = "damaged"
GONE = "gone"
UNREADABLE = "unreadable"

_READ = 1 << 20
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def _key(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_ino, st.st_size, clamp_mtime_ns(st.st_mtime_ns)


def verify_file(path: str, sha256: str, cache: tuple[int, int, int] | None) -> str:
    """Read the file at ``path`` back and compare it with its record (blocking).

    ``cache`` is the recorded (inode, size, mtime_ns).  Without one the file
    was still changing when last scanned: nothing is promised about it yet,
    so it counts as ``changed``.
    """
    try:
        before = os.lstat(path)
    except FileNotFoundError:
        return GONE
    except OSError:
        return UNREADABLE
    if cache is None or not stat.S_ISREG(before.st_mode) or _key(before) != tuple(cache):
        return CHANGED
    digest = hashlib.sha256()
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except FileNotFoundError:
        return GONE
    except OSError:
        return UNREADABLE
    try:
        while block := os.read(fd, _READ):
            digest.update(block)
    except OSError:
        return UNREADABLE  # (an I/O error reading it back is what rot often looks like too)
    finally:
        os.close(fd)
    if digest.hexdigest() == sha256:
        return OK
    try:
        after = os.lstat(path)
    except OSError:
        return GONE
    # Written while we read (an editor that keeps the time would still change
    # the inode or size, or we would read it next pass): only an untouched file rotted.
    return DAMAGED if _key(after) == tuple(cache) else CHANGED


def verify_files(items: list[tuple[str, str, str, tuple[int, int, int] | None]]
                 ) -> list[tuple[str, str]]:
    """:func:`verify_file` for each (share path, local path, sha256, cache): (share path, verdict)."""
    return [(path, verify_file(local, sha256, cache)) for path, local, sha256, cache in items]
