"""One download's disk work in a worker thread: plain values in and out, no Twisted objects.

:class:`~clearskies.transfer.receiver.FileReceiver` runs these through its
runner: verifying and fsyncing the temporary file (:func:`seal`,
:func:`seal_buffered`), flushing it early (:func:`flush_copy`), filling it
from a local copy (:func:`copy_into`), renaming it over the target
(:func:`install`) or keeping it as a conflict copy (:func:`keep`).
:mod:`clearskies.diskjobs` has the jobs that take many downloads at once.
"""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path
from typing import Any

from clearskies import diskjobs
from clearskies.share.records import FileRecord

BLOCK_SIZE = 1024 * 1024
"""Read/write block for copying and re-hashing in worker threads."""


def hash_fd(fd: int) -> str:
    """The SHA-256 of everything the open file holds, read from its start."""
    hasher = hashlib.sha256()
    position = 0
    while block := os.pread(fd, BLOCK_SIZE, position):
        hasher.update(block)
        position += len(block)
    return hasher.hexdigest()


def seal(fd: int, temp: Path, hasher: Any, overflow: bool,
         expected: FileRecord) -> str | None:
    """Verify the temporary file; if good, set its metadata, fsync it and close it.

    Returns None when it is ready for the rename, else why it was deleted.
    """
    try:
        size = os.fstat(fd).st_size
        if overflow:
            problem = "the peer sent more than %d bytes" % expected.size
        elif size != expected.size:
            problem = "got %d bytes, expected %d" % (size, expected.size)
        else:
            digest = hasher.hexdigest() if hasher is not None else hash_fd(fd)
            problem = None if digest == expected.sha256 else "SHA-256 mismatch"
        if problem is None:
            os.fchmod(fd, (expected.mode if expected.mode is not None else 0o644) & 0o777)
            if expected.mtime_ns is not None:
                os.utime(fd, ns=(expected.mtime_ns, expected.mtime_ns))
            os.fsync(fd)
    finally:
        os.close(fd)
    if problem is not None:
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
    return problem


def seal_buffered(root: Path, target: Path, temp: Path, data: bytes, overflow: bool,
                  expected: diskjobs.Content) -> str | None:
    """Verify a small download held in memory, then write and fsync its temporary file.

    Returns None when it is ready for the rename, else why it was refused
    (then nothing was written).
    """
    [outcome] = diskjobs.seal_buffered_many([(root, target, temp, data, overflow, expected)])
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def install(temp: Path, target: Path, sync_directory: bool = True) -> tuple[int, int, int]:
    """Rename ``temp`` over ``target`` (and fsync their directory); the target's stat key."""
    os.replace(temp, target)
    if sync_directory:
        diskjobs.fsync_directory(target.parent)
    return diskjobs.stat_key(target)


def keep(temp: Path, other: Path, sha256: str) -> tuple[int, int, int]:
    """Put ``temp`` at ``other`` without overwriting anything; ``other``'s stat key.

    If ``other`` already holds the content ``sha256`` the temporary file is
    dropped; if it holds something else, FileExistsError and ``temp`` stays.
    """
    try:
        os.link(temp, other)  # fails rather than overwrite
    except FileExistsError:
        fd = os.open(other, os.O_RDONLY | diskjobs.OPEN_FLAGS)
        try:
            same = hash_fd(fd) == sha256
        finally:
            os.close(fd)
        if not same:
            raise
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        # No hard links here: check, then rename (a tiny window, but no clobbering by us).
        if os.path.lexists(other):
            raise FileExistsError(errno.EEXIST, "conflict copy path is taken") from None
        os.rename(temp, other)
        diskjobs.fsync_directory(other.parent)
        return diskjobs.stat_key(other)
    os.unlink(temp)
    diskjobs.fsync_directory(other.parent)
    return diskjobs.stat_key(other)


def flush_copy(fd: int) -> None:
    """fdatasync a duplicate descriptor, then close it: the receiver may close its own meanwhile."""
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


def copy_into(source: Path, temp: Path, limit: int) -> tuple[Any, int, int]:
    """Copy ``source`` into ``temp`` (at most ``limit + 1`` bytes), hashing on the way.

    Returns the hasher, the byte count and the still open descriptor of ``temp``.
    """
    hasher = hashlib.sha256()
    copied = 0
    src = os.open(source, os.O_RDONLY | diskjobs.OPEN_FLAGS)
    try:
        dst = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | diskjobs.OPEN_FLAGS, 0o600)
        try:
            while copied <= limit:
                block = os.read(src, min(BLOCK_SIZE, limit + 1 - copied))
                if not block:
                    break
                diskjobs.write_all(dst, block)
                hasher.update(block)
                copied += len(block)
        except BaseException:
            os.close(dst)
            raise
    finally:
        os.close(src)
    return hasher, copied, dst


__all__ = [
    "BLOCK_SIZE", "hash_fd", "seal", "seal_buffered", "install", "keep", "flush_copy",
    "copy_into",
]
