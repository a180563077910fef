"""SHA-256 of local files, with a stat that is known to match the bytes hashed.

These functions block; run them in the worker pool.  ``hashlib`` releases
the GIL while it digests each 1 MiB block, so two pool threads hash two
files in parallel.

A file that changes while it is read would give a hash of bytes that never
existed together.  So the file is stat'ed through the open descriptor
before and after reading, and by name afterwards: if size, mtime, ctime or
inode moved, or the name now points at another file, the result is
``Unstable`` and the caller tries again later.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from typing import Callable, Sequence

from clearskies.share.records import clamp_mtime_ns

BLOCK_SIZE = 1024 * 1024


@dataclass(frozen=True, slots=True)
class HashResult:
    """The content hash and the stat it belongs to."""

    path: str  # the local path that was hashed
    sha256: str
    size: int
    mtime_ns: int
    inode: int
    mode: int  # permission bits


@dataclass(frozen=True, slots=True)
class Unstable:
    """The file could not be hashed consistently now (changed, vanished, unreadable)."""

    path: str
    reason: str
    denied: bool = False  # the daemon may not read it: not worth retrying until it changes


HashOutcome = HashResult | Unstable
HashFile = Callable[..., HashOutcome]


def _stamp(st: os.stat_result) -> tuple[int, int, int, int, int]:
    return (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def hash_file(path: str, progress: Callable[[int], None] | None = None,
              block_size: int = BLOCK_SIZE) -> HashOutcome:
    """Hash one regular file; never follows a symlink, never blocks on a FIFO.

    ``progress(n)`` is called after each block with the bytes just read; it
    runs on this (worker) thread.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return Unstable(path, "vanished")
    except PermissionError as e:
        return Unstable(path, e.strerror or str(e), denied=True)
    except OSError as e:
        return Unstable(path, e.strerror or str(e))
    try:
        before = os.fstat(fd)
        if not stat.S_ISREG(before.st_mode):
            return Unstable(path, "not a regular file")
        digest = hashlib.sha256()
        # Small files get a small buffer: zeroing 1 MiB per file would cost
        # more than hashing it.  One byte extra shows whether it grew.
        buffer = bytearray(min(block_size, before.st_size + 1))
        view = memoryview(buffer)
        total = 0
        while total <= before.st_size:  # a file that keeps growing must not keep us here
            n = os.readv(fd, [buffer])
            if not n:
                break
            digest.update(view[:n])
            total += n
            if progress is not None:
                progress(n)
        after = os.fstat(fd)
    except OSError as e:
        return Unstable(path, e.strerror or str(e))
    finally:
        os.close(fd)
    try:
        by_name = os.lstat(path)
    except OSError:
        return Unstable(path, "vanished")
    if not (_stamp(before) == _stamp(after) == _stamp(by_name)) or total != after.st_size:
        return Unstable(path, "changed while it was read")
    return HashResult(path, digest.hexdigest(), after.st_size, clamp_mtime_ns(after.st_mtime_ns),
                      after.st_ino, stat.S_IMODE(after.st_mode))


def hash_files(paths: Sequence[str], hasher: HashFile = hash_file,
               progress: Callable[[int], None] | None = None) -> list[HashOutcome]:
    """Hash several files in one worker job (fewer thread round trips for small files)."""
    return [hasher(path, progress) for path in paths]
