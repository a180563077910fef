"""Turning wire paths into local ones (and back) without leaving the share.

Every piece of code that writes, renames or deletes a file named by a peer
goes through ``LocalPaths.to_local``.  Besides the syntax checks of
``validate_wire_path`` it refuses:

- any existing component that is a symlink (a peer, or a previous sync,
  could plant ``docs -> /etc`` and then write ``docs/passwd``);
- an existing component that is not a directory where one is needed;
- a name that is missing but whose NFC form equals the NFC form of a
  different name already in that directory (e.g. a decomposed ``é`` written
  by a Mac): writing it would create a second file that looks the same;
- a path at or below an entry the daemon may not read (see ``unreadable``):
  the user's ``chmod 000`` stays as it is, and nothing is created inside;
- a path deeper than ``MAX_PATH_DEPTH`` levels, or whose absolute local
  form would be longer than the system allows (``LOCAL_PATH_MAX``).

Names reserved on Windows (``CON``, ``aux.txt``, trailing dots…) are allowed:
this daemon runs on POSIX systems, where they are ordinary names.

The checks see the disk at one instant; a local process racing to swap a
directory for a symlink afterwards is outside this threat model (it could
write there itself).  So is one that moves a checked directory away and
puts a symlink to it in its place: directories already checked are
re-checked only by their own identity (device and inode), so that each
file of a big download costs one ``lstat`` of its directory, not one per level.
"""

from __future__ import annotations

import os
import time
import stat
import unicodedata
from pathlib import Path

from clearskies.errors import PathObstacle, UnsafePathError
from clearskies.share.records import validate_wire_path

_NFC_CACHE_SIZE = 256
_CHECKED_CACHE_SIZE = 1024
#: The deepest path (in parts, ``a/b`` is 2) the daemon lists, writes or fetches.
#: It also keeps the recursive ``makedirs`` of the paths it hands out far from
#: Python's recursion limit.
MAX_PATH_DEPTH = 256
#: Linux's PATH_MAX less its final NUL: the longest absolute path a system call takes.
LOCAL_PATH_MAX = 4095
_EUID = os.geteuid()


def unreadable(st: os.stat_result) -> bool:
    """Whether the daemon treats this entry as one it may not read (and so leaves alone).

    For an entry the daemon's user owns, or for any entry when the daemon
    runs as root (which the kernel lets read everything), the owner's
    permission bits decide: a directory needs read and search (``r-x``), a
    file needs read.  So a ``chmod 000`` is respected the same way whoever
    runs the daemon.  For other users' entries the kernel's own answer
    decides, when the entry is opened.
    """
    if _EUID != 0 and st.st_uid != _EUID:
        return False
    needed = stat.S_IRUSR | stat.S_IXUSR if stat.S_ISDIR(st.st_mode) else stat.S_IRUSR
    return st.st_mode & needed != needed


def depth_problem(root: str, wire_path: str) -> str | None:
    """Why a valid wire path is too deep or too long to live under ``root``, or None."""
    depth = wire_path.count("/") + 1
    if depth > MAX_PATH_DEPTH:
        return "path is %d levels deep; at most %d are supported" % (depth, MAX_PATH_DEPTH)
    size = len(root) + 1 + (len(wire_path) if wire_path.isascii()
                            else len(wire_path.encode("utf-8", "surrogateescape")))
    if size > LOCAL_PATH_MAX:
        return "path would be %d bytes long here; the system allows %d" % (size, LOCAL_PATH_MAX)
    return None


class LocalPaths:
    """Maps between wire paths and absolute local paths under one share root."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        # The root itself may be reached through a symlink the user chose.
        self.root = Path(os.path.realpath(root))
        self._root_prefix = os.path.join(str(self.root), "")  # with the trailing separator
        # directory -> ((st_ino, st_mtime_ns), {nfc form: local name} for non-NFC names)
        self._nfc_cache: dict[str, tuple[tuple[int, int], dict[str, str], float]] = {}
        # directory -> (st_dev, st_ino) of a directory whose every component from the
        # root down was checked: its files then cost one lstat of it, not one per level.
        # A directory replaced since (by a symlink, a file, another directory) has
        # another identity and is checked in full again.
        self._checked: dict[str, tuple[int, int]] = {}

    def to_local(self, wire_path: str) -> Path:
        """The local path for ``wire_path``; UnsafePathError if it is not safe to use."""
        validate_wire_path(wire_path)
        current = str(self.root)
        problem = depth_problem(current, wire_path)
        if problem is not None:
            raise UnsafePathError(problem)
        parts = wire_path.split("/")
        start = 0
        if len(parts) > 1:
            directory = os.path.join(current, *parts[:-1])
            known = self._checked.get(directory)
            if known is not None:
                if self._same_directory(directory, known):
                    current, start = directory, len(parts) - 1
                else:
                    del self._checked[directory]
        for index in range(start, len(parts)):
            name = parts[index]
            parent, current = current, os.path.join(current, name)
            try:
                st = os.lstat(current)
            except FileNotFoundError:
                self._check_nfc_collision(parent, name, wire_path)
                # Nothing below a missing component exists either.
                current = os.path.join(current, *parts[index + 1:])
                break
            except PermissionError:
                raise PathObstacle("%r lies in a folder this daemon may not read "
                                   "(permission denied); it is left as it is" % wire_path
                                   ) from None
            if stat.S_ISLNK(st.st_mode):
                raise PathObstacle("%r goes through a symbolic link" % wire_path)
            if unreadable(st):
                raise PathObstacle(
                    "%r %s not readable here (permission denied); it is left as it is"
                    % (wire_path, "is" if index == len(parts) - 1 else "lies in a folder that is"))
            if index < len(parts) - 1:
                if not stat.S_ISDIR(st.st_mode):
                    raise PathObstacle(
                        "%r goes through something that is not a directory" % wire_path)
                if len(self._checked) >= _CHECKED_CACHE_SIZE:
                    self._checked.pop(next(iter(self._checked)))
                self._checked[current] = (st.st_dev, st.st_ino)
        # (validate_wire_path already excludes "..", so this is a second fence.)
        if not current.startswith(self._root_prefix):
            raise UnsafePathError("%r is not inside the share" % wire_path)
        return Path(current)

    @staticmethod
    def _same_directory(directory: str, known: tuple[int, int]) -> bool:
        try:
            st = os.lstat(directory)
        except OSError:
            return False
        return stat.S_ISDIR(st.st_mode) and (st.st_dev, st.st_ino) == known \
            and not unreadable(st)

    def to_wire(self, local_path: str | os.PathLike[str]) -> str:
        """The wire form (relative, '/'-separated, NFC) of a path inside the share."""
        absolute = os.path.abspath(local_path)
        # Resolve the parents (the root may be reached through a symlink) but
        # not the last component, which names the entry itself.
        absolute = os.path.join(os.path.realpath(os.path.dirname(absolute)),
                                os.path.basename(absolute))
        root = str(self.root)
        if os.path.commonpath([root, absolute]) != root or absolute == root:
            raise UnsafePathError("%s is not inside the share %s" % (local_path, root))
        relative = os.path.relpath(absolute, root).replace(os.sep, "/")
        return validate_wire_path(unicodedata.normalize("NFC", relative))

    def _check_nfc_collision(self, directory: str, name: str, wire_path: str) -> None:
        """Refuse ``name`` if another spelling of it already lives in ``directory``."""
        other = self._non_nfc_names(directory).get(name)
        if other is not None:
            raise PathObstacle(
                "%r would sit next to %r, which is the same name in another Unicode form"
                % (wire_path, other))

    def _non_nfc_names(self, directory: str) -> dict[str, str]:
        """Names in ``directory`` that change under NFC, keyed by their NFC form.

        Cached per directory and refreshed when its mtime or inode changes, but
        at most once a second: each download into a directory changes its
        mtime, and re-listing a big directory for every file made filling it
        quadratic.  (A clash is about names other systems would merge; our own
        disk keeps both, so a name appearing within that second is no danger.)
        """
        now = time.monotonic()
        cached = self._nfc_cache.get(directory)
        if cached is not None and now - cached[2] < 1.0:
            return cached[1]
        try:
            st = os.stat(directory)
            stamp = (st.st_ino, st.st_mtime_ns)
            if cached is not None and cached[0] == stamp:
                self._nfc_cache[directory] = (stamp, cached[1], now)
                return cached[1]
            found = {}
            with os.scandir(directory) as entries:
                for entry in entries:
                    if not entry.name.isascii():
                        normal = unicodedata.normalize("NFC", entry.name)
                        if normal != entry.name:
                            found[normal] = entry.name
        except OSError:
            return {}  # the directory is missing or unreadable: nothing to collide with
        if len(self._nfc_cache) >= _NFC_CACHE_SIZE:
            self._nfc_cache.pop(next(iter(self._nfc_cache)))
        self._nfc_cache[directory] = (stamp, found, now)
        return found
