"""Disk work for downloads: plain values in, plain values out, standard library only.

Writing, fsyncing and renaming many small downloads costs a handful of
system calls each, so these jobs take whole batches of files: one trip to
the ``files`` place (:mod:`clearskies.threads`) per batch, not per file.
That place runs them in the disk helper process (:mod:`clearskies.diskhelper`)
when it can, so arguments and results stay plain, picklable values
(``install_batch``'s ``keep``, a callable, keeps that job in the daemon's
threads).  Tests may call them directly.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import os
import stat
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from clearskies.errors import UnsafePathError
from clearskies.share.records import clamp_mtime_ns

if TYPE_CHECKING:
    from clearskies.share.records import FileRecord


class Content(NamedTuple):
    """What a download must hold and how it lands on disk (a record's plain values)."""

    size: int
    sha256: str
    mode: int | None
    mtime_ns: int | None

    @classmethod
    def of(cls, record: FileRecord) -> Content:
        return cls(record.size, record.sha256, record.mode, record.mtime_ns)


OPEN_FLAGS = os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)


def check_inside(root: Path, path: Path, *, resolve: bool) -> None:
    """Refuse a target outside the share (lexically, or through symlinked directories)."""
    if path.name in ("", ".", ".."):
        raise UnsafePathError("download target has no file name")
    if resolve:
        base, parent = _real_root(str(root)), _real_directory(str(path.parent))
    else:
        base, parent = os.path.abspath(root), os.path.abspath(path.parent)
    if parent != base and not parent.startswith(base.rstrip(os.sep) + os.sep):
        raise UnsafePathError("download target lies outside the share")


@functools.lru_cache(maxsize=64)
def _real_root(root: str) -> str:
    """A share root's real path: resolved once, not once per downloaded file.

    Should the root later become a symlink elsewhere, targets no longer
    resolve under the cached path and are refused.
    """
    return os.path.realpath(root)


_resolved_directories: dict[str, tuple[str, int, int]] = {}
_resolved_lock = threading.Lock()


def _real_directory(directory: str) -> str:
    """``realpath`` of a download's directory, remembered while the directory stays put.

    Many files land in one directory; resolving every component again for
    each costs more than the write.  The cached answer is used only while
    the directory is still the same inode (a swap for a symlink or another
    directory is resolved afresh).
    """
    st = os.lstat(directory)
    with _resolved_lock:
        known = _resolved_directories.get(directory)
    if known is not None and (known[1], known[2]) == (st.st_dev, st.st_ino) \
            and stat.S_ISDIR(st.st_mode):
        return known[0]
    real = os.path.realpath(directory)
    with _resolved_lock:
        if len(_resolved_directories) > 4096:
            _resolved_directories.clear()
        _resolved_directories[directory] = (real, st.st_dev, st.st_ino)
    return real


def seal_buffered_many(items: list[tuple[Path, Path, Path, bytes, bool, Content]]
                       ) -> list[str | None | BaseException]:
    """Verify small downloads held in memory, then write and fsync their temporary files.

    Each item is (share root, target, temporary file, data, overflow,
    expected content).  Each outcome is None (ready for the rename), why the
    content was refused (nothing written), or the exception that stopped it.

    The content is checked before anything is written.  The share root and
    each target directory (created if missing, resolved to make sure it lies
    inside the share) are checked once per batch, not once per file: many
    small files of a batch share a directory.
    """
    outcomes: list[str | None | BaseException] = []
    ready_directories: set[str] = set()  # (strings: a Path's hash costs more than the check)
    for root, target, temp, data, overflow, expected in items:
        try:
            problem = check_buffered(data, overflow, expected)
            if problem is None:
                directory = os.path.dirname(target)
                if directory not in ready_directories:
                    prepare_directory_of(root, target)
                    ready_directories.add(directory)
                write_temp(str(temp), data, expected)
            outcomes.append(problem)
        except Exception as e:
            outcomes.append(e)
    return outcomes


def check_buffered(data: bytes, overflow: bool, expected: Content) -> str | None:
    """Why a small download held in memory is not the expected content, or None."""
    if overflow:
        return "the peer sent more than %d bytes" % expected.size
    if len(data) != expected.size:
        return "got %d bytes, expected %d" % (len(data), expected.size)
    if hashlib.sha256(data).hexdigest() != expected.sha256:
        return "SHA-256 mismatch"
    return None


def prepare_directory_of(root: Path, target: Path) -> None:
    """Make sure ``target``'s directory exists inside the share (never the share root itself)."""
    if not root.is_dir():
        # A share folder moved away or unmounted is never recreated by a download.
        raise FileNotFoundError(errno.ENOENT, "the share folder is missing", str(root))
    parent = target.parent
    if not parent.is_dir():
        parent.mkdir(parents=True, exist_ok=True)
    check_inside(root, target, resolve=True)


def write_temp(temp: str | Path, data: bytes, expected: Content) -> None:
    """Create ``temp`` afresh with ``data``, the expected mode and mtime, and fsync it."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | OPEN_FLAGS
    try:
        fd = os.open(temp, flags, 0o600)
    except FileExistsError:
        os.unlink(temp)  # whatever sits under the temp name (even a symlink) goes
        fd = os.open(temp, flags, 0o600)
    try:
        write_all(fd, data)
        os.fchmod(fd, (expected.mode if expected.mode is not None else 0o644) & 0o777)
        if expected.mtime_ns is not None:
            os.utime(fd, ns=(expected.mtime_ns, expected.mtime_ns))
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
        raise
    os.close(fd)


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def stat_key(path: Path) -> tuple[int, int, int]:
    st = os.lstat(path)
    return st.st_size, clamp_mtime_ns(st.st_mtime_ns), st.st_ino


def sync_directories(directories: Iterable[Path]) -> None:
    """fsync each directory once: makes a batch of renames into them durable (worker thread)."""
    for directory in set(directories):
        fsync_directory(directory)


def install_batch(items: list[tuple[Path, Path, Expected | None]],
                  keep: Callable[[Path], None] | None = None
                  ) -> list[tuple[int, int, int] | OSError | None]:
    """Rename each (temp, target, expected), then fsync every directory that got a file.

    Just before its rename each target is checked against ``expected``
    (:func:`unchanged`; None: no check): one that changed since the
    database saw it is left as it is and gets None in place of its
    outcome (a local edit is never renamed over, however late it came).
    A failed rename is returned in its place; a failed directory fsync
    fails the whole job (nothing in the batch may then be recorded).
    ``keep``: called with each target just before the rename (it keeps
    the file there as a version); when it fails, that target is left as it is.
    """
    outcomes: list[tuple[int, int, int] | OSError | None] = []
    directories: set[Path] = set()
    for temp, target, expected in items:
        try:
            if expected is not None and not unchanged(str(target), expected):
                outcomes.append(None)
                continue
            if keep is not None:
                keep(target)
                # Keeping takes a while: the check again, right before the rename.
                if expected is not None and not unchanged(str(target), expected):
                    outcomes.append(None)
                    continue
            os.replace(temp, target)
            outcomes.append(stat_key(target))
        except OSError as e:
            outcomes.append(e)
            continue
        directories.add(target.parent)
    sync_directories(directories)
    return outcomes


def write_all(fd: int, data: bytes) -> None:
    with memoryview(data) as view:
        done = 0
        while done < len(view):
            done += os.write(fd, view[done:])


# -- is a path still as the database says? -------------------------------------------
#
# The database's view of one path, as plain values: ("absent",), ("directory",)
# or ("file", size, sha256, cache), cache being (inode, size, mtime_ns) or None.
Expected = tuple[Any, ...]


def matches(path: str, size: int, sha256: str, cache: tuple[int, int, int] | None) -> bool:
    """True if the file at ``path`` still holds this content.

    The cache key answers without reading; when there is none (a file that
    was still changing when it was scanned) the content is hashed.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(st.st_mode) or st.st_size != size:
        return False
    if cache is not None:
        return (st.st_ino, st.st_size, clamp_mtime_ns(st.st_mtime_ns)) == cache
    digest = hashlib.sha256()
    try:
        fd = os.open(path, os.O_RDONLY | OPEN_FLAGS)  # never through a symlink swapped in
    except OSError:
        return False  # not the regular file we recorded any more
    try:
        while block := os.read(fd, 1 << 20):
            digest.update(block)
    finally:
        os.close(fd)
    return digest.hexdigest() == sha256


def unchanged(path: str, expected: Expected) -> bool:
    """The path on disk is as expected: the same file, a directory, or absent."""
    if expected[0] == "absent":
        return not os.path.lexists(path)
    if expected[0] == "directory":
        return os.path.isdir(path) and not os.path.islink(path)
    return matches(path, *expected[1:])
