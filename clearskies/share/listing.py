"""Listing a share's folder: its marker, the walk, what cannot be synced and why.

``walk_share`` lists the share (or some subtrees) at once, sorted by path;
``TreeWalk`` lists the whole tree in the same order a page at a time, so a
full scan never holds more than a page (and one directory listing per
level).  Symlinks are never followed; what is found and not synced is
listed with the reason (see clearskies.share.scanner for the rules).
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, NamedTuple, Sequence

from clearskies.atomicwrite import install_atomically
from clearskies.errors import RootMissing, ShareError, UnsafePathError
from clearskies.share.database import CacheKey
from clearskies.share.ignore import MARKER_NAME, TEMP_SUFFIX, IgnoreRules
from clearskies.share.paths import LOCAL_PATH_MAX, MAX_PATH_DEPTH, depth_problem, unreadable
from clearskies.share.records import MAX_PATH_BYTES, clamp_mtime_ns, validate_wire_path

_PLAIN_NAME = re.compile(r"[^\x00-\x1f\x7f\\]+")


# -- the share marker ---------------------------------------------------------

def write_marker(root: str, share_id: str) -> None:
    """Create ``<root>/.clearskies`` naming the share, atomically (blocking).

    Written to a temporary name and renamed into place, so a crash leaves the
    whole marker or none, never an empty file that would name no share.
    """
    path = os.path.join(root, MARKER_NAME)
    # A partial-download name: never scanned or synced, should a crash leave it.
    temporary = os.path.join(root, "%s.%d%s" % (MARKER_NAME, os.getpid(), TEMP_SUFFIX))
    data = (json.dumps({"share_id": share_id}) + "\n").encode("ascii")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                 | os.O_CLOEXEC, 0o644)
    install_atomically(fd, temporary, path, data)
    _remove_dead_writers_markers(root)


def _remove_dead_writers_markers(root: str) -> None:
    """Remove the temporary markers of writers killed before their rename (blocking).

    Only names of ours (``.clearskies.<pid>.!clearsky``) whose process is gone:
    another daemon writing its marker right now keeps its file.
    """
    pattern = re.compile(r"%s\.(\d+)%s\Z" % (re.escape(MARKER_NAME), re.escape(TEMP_SUFFIX)))
    for name in os.listdir(root):
        found = pattern.match(name)
        if found is None or int(found.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(found.group(1)), 0)
            continue  # its writer still runs
        except ProcessLookupError:
            pass
        except (PermissionError, OverflowError):
            continue
        try:
            os.unlink(os.path.join(root, name))
        except OSError:
            pass


def read_marker(root: str, name: str = MARKER_NAME) -> str | None:
    """The share ID in ``<root>/.clearskies`` (or ``name``), or None if absent or unreadable."""
    try:
        fd = os.open(os.path.join(root, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            data = json.loads(f.read(4096))
    except (OSError, ValueError):
        return None
    share_id = data.get("share_id") if isinstance(data, dict) else None
    return share_id if isinstance(share_id, str) else None


def check_share_root(root: str, share_id: str) -> None:
    """Raise ShareError unless the root is a directory holding our marker (blocking).

    A missing marker usually means the disk holding the share is not
    mounted and we are looking at the empty mount point: scanning it would
    turn every file into a deletion.
    """
    try:
        st = os.stat(root)
    except OSError as e:
        raise RootMissing("the share folder %s is not reachable (%s); reconnect the disk or "
                          "move it back, then the share resumes" % (root, e.strerror)) from e
    if not stat.S_ISDIR(st.st_mode):
        raise RootMissing("the share folder %s is not a directory any more" % root)
    found = read_marker(root)
    if found != share_id:
        raise RootMissing(
            "the share folder %s has lost its %s marker file (is the disk mounted?); "
            "nothing is synced until it is back, or until 'clearskies repair %s' recreates "
            "it" % (root, MARKER_NAME, root))


# -- listing ------------------------------------------------------------------

class LocalEntry(NamedTuple):
    """One directory or regular file found on disk."""

    path: str  # wire form
    is_dir: bool
    size: int
    mtime_ns: int
    inode: int
    mode: int  # permission bits

    @property
    def cache_key(self) -> CacheKey:
        return CacheKey(self.inode, self.size, self.mtime_ns)


#: Why a path found on disk is not synced (``Listing.skipped``, ``status --skipped``).
UNREADABLE = "unreadable (permission denied)"
SYMLINK = "symbolic link"
SPECIAL = "special file (FIFO, socket or device)"
NOT_UTF8 = "name is not valid UTF-8"
BAD_NAME = "name cannot be synced"
TOO_DEEP = "path too deep or too long"


@dataclass
class Listing:
    """What a walk found, sorted by path, plus what it had to leave out."""

    entries: list[LocalEntry] = field(default_factory=list)
    protected: list[str] = field(default_factory=list)  # unknown state: no tombstones there
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why) not synced
    denied: set[str] = field(default_factory=set)  # directories we may not list


def name_problem(name: str, parent: str, root: str = "") -> str | None:
    """Why ``parent/name`` cannot be a synced path, or None (cheap for plain ASCII names)."""
    if not (name.isascii() and _PLAIN_NAME.fullmatch(name)):
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            return NOT_UTF8
        try:
            validate_wire_path(name)
        except UnsafePathError as e:
            return "%s: %s" % (BAD_NAME, str(e).replace("path ", "the name ", 1))
    # A path too deep or too long has at least this many characters: most are
    # shorter and cost nothing more.
    if len(parent) + len(name) + 1 >= min(2 * MAX_PATH_DEPTH - 1, MAX_PATH_BYTES // 4,
                                          (LOCAL_PATH_MAX - len(root)) // 4):
        path = parent + "/" + name if parent else name
        if len(path.encode("utf-8")) > MAX_PATH_BYTES:
            return "%s: longer than %d bytes" % (TOO_DEEP, MAX_PATH_BYTES)
        problem = depth_problem(root, path)
        if problem is not None:
            return "%s: %s" % (TOO_DEEP, problem)
    return None


def walk_share(root: str, scopes: Sequence[str] | None, rules: IgnoreRules,
               stopping: Callable[[], bool] | None = None) -> Listing:
    """List the share (``scopes=None``) or the given subtrees (blocking).

    Never follows symlinks.  A listing error at the root raises ShareError;
    below it, the unreadable directory is marked protected and skipped.  Once
    ``stopping()`` is true the walk ends early, with a listing the caller
    must not use.
    """
    listing = Listing()
    if scopes is None:
        try:
            os.scandir(root).close()
        except OSError as e:
            raise ShareError("cannot list the share folder %s: %s" % (root, e.strerror)) from e
        _walk_tree(root, "", rules, listing, stopping)
    else:
        for scope in scopes:
            _list_scope(root, scope, rules, listing, stopping)
    if listing.denied:  # a folder we may not list gets no record (its old one stays)
        listing.entries = [e for e in listing.entries if e.path not in listing.denied]
    listing.entries.sort(key=lambda e: e.path)
    return listing


def list_directories(root: str, private: tuple[str, ...] = ()) -> list[str]:
    """Every directory a full scan would list (blocking).

    The watcher watches these before the scan's own listing begins.  An
    error listing the root raises OSError; below it, an unreadable
    directory is simply left out (the scan marks it protected).
    """
    rules = IgnoreRules.load(root, private)
    found: list[str] = []
    stack = [""]
    while stack:
        directory = stack.pop()
        prefix = directory + "/" if directory else ""
        try:
            with os.scandir(os.path.join(root, directory) if directory else root) as entries:
                for entry in entries:
                    try:
                        if not entry.is_dir(follow_symlinks=False):
                            continue
                        st = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    path = prefix + entry.name
                    if not unreadable(st) and name_problem(entry.name, directory, root) is None \
                            and not rules.matches(path, True):
                        found.append(path)
                        stack.append(path)
        except OSError:
            if not directory:
                raise
    return found


def _list_scope(root: str, scope: str, rules: IgnoreRules, listing: Listing,
                stopping: Callable[[], bool] | None = None) -> None:
    parts = scope.split("/")
    current = root
    for part in parts[:-1]:  # every parent must still be a real, readable directory
        current = os.path.join(current, part)
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            return
        except OSError:
            listing.protected.append(scope)
            return
        if not stat.S_ISDIR(st.st_mode):
            return
        if unreadable(st):
            listing.protected.append(scope)  # its own skip is listed by a full scan
            return
    try:
        st = os.lstat(os.path.join(root, scope))
    except FileNotFoundError:
        return
    except OSError:
        listing.protected.append(scope)
        return
    parent, _, name = scope.rpartition("/")
    problem = name_problem(name, parent, root)
    if problem is not None:
        listing.skipped.append((scope, problem))
        listing.protected.append(scope)
        return
    is_dir = stat.S_ISDIR(st.st_mode)
    if rules.is_ignored(scope, is_dir):
        return
    if _add(listing, scope, st) and is_dir:
        _walk_tree(root, scope, rules, listing, stopping)


def _entry(path: str, st: os.stat_result) -> LocalEntry:
    is_dir = stat.S_ISDIR(st.st_mode)
    return LocalEntry(path, is_dir, 0 if is_dir else st.st_size,
                      clamp_mtime_ns(st.st_mtime_ns), st.st_ino, stat.S_IMODE(st.st_mode))


def _listable(listing: Listing, path: str, st: os.stat_result) -> LocalEntry | None:
    """The entry for a directory or readable regular file; anything else is noted
    in ``listing`` as skipped, with the reason, and None is returned."""
    mode = st.st_mode
    if stat.S_ISLNK(mode):
        listing.skipped.append((path, SYMLINK))
    elif not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
        listing.skipped.append((path, SPECIAL))
    elif unreadable(st):
        listing.skipped.append((path, UNREADABLE))
        listing.protected.append(path)  # its record (if any) stays as it was
    else:
        return _entry(path, st)
    return None


def _add(listing: Listing, path: str, st: os.stat_result) -> bool:
    """List one entry, or skip it with the reason; True for a directory to descend into."""
    entry = _listable(listing, path, st)
    if entry is None:
        return False
    listing.entries.append(entry)
    return entry.is_dir


def _kept_entries(entries: Iterable[os.DirEntry], root: str, directory: str,
                  listing: Listing) -> Iterator[tuple[str, str, os.stat_result]]:
    """(name, share path, lstat) of each entry of ``directory`` a share can hold;
    the others are noted in ``listing`` (skipped with a reason, or protected)."""
    prefix = directory + "/" if directory else ""
    for entry in entries:
        name = entry.name
        path = prefix + name
        problem = name_problem(name, directory, root)
        if problem is not None:
            listing.skipped.append((path, problem))
            listing.protected.append(path)
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            listing.protected.append(path)  # vanished or unreadable just now
            continue
        yield name, path, st


def _walk_tree(root: str, top: str, rules: IgnoreRules, listing: Listing,
               stopping: Callable[[], bool] | None = None) -> None:
    stack = [top]
    while stack:
        if stopping is not None and stopping():
            return
        directory = stack.pop()
        try:
            with os.scandir(os.path.join(root, directory) if directory else root) as entries:
                for name, path, st in _kept_entries(entries, root, directory, listing):
                    if rules.matches(path, stat.S_ISDIR(st.st_mode)):
                        continue
                    if _add(listing, path, st):
                        stack.append(path)
        except PermissionError:
            listing.protected.append(directory)
            if directory:
                listing.skipped.append((directory, UNREADABLE))
                listing.denied.add(directory)
        except OSError:
            listing.protected.append(directory)


class TreeWalk:
    """Lists a share's whole tree in path order, a page at a time (blocking).

    What ``walk_share(root, None, …)`` finds, in the same order, but held
    one directory listing per level of the current path instead of whole:
    a directory's subtree is one block of the sorted order (every path from
    ``d/`` up to ``d0`` starts with ``d/``), so each listing is sorted with
    a key ``name/`` standing for the subtree, which is listed when its turn
    comes.  Skipped, protected and denied paths go to ``listing`` as they
    are met, always before any path below them.  A root that cannot be
    listed raises ShareError, as in ``walk_share``.  Call :meth:`take` from
    one thread at a time.
    """

    def __init__(self, root: str, rules: IgnoreRules, listing: Listing,
                 stopping: Callable[[], bool] | None = None) -> None:
        self._root = root
        self._rules = rules
        self._listing = listing
        self._stopping = stopping
        #: Per level, the rest of one directory's sorted (key, entry or subtree) items.
        self._stack: list[list[tuple[str, LocalEntry | str]]] = []
        #: Listings of directories already returned whose subtree's turn has not come.
        self._pending: dict[str, list[tuple[str, LocalEntry | str]]] = {}
        self._started = False

    def take(self, count: int) -> list[LocalEntry]:
        """The next ``count`` entries (fewer only at the end, or once stopping)."""
        if not self._started:
            self._started = True
            try:
                os.scandir(self._root).close()
            except OSError as e:  # (an empty listing would make every record a deletion)
                raise ShareError("cannot list the share folder %s: %s"
                                 % (self._root, e.strerror)) from e
            top = self._read("")
            if top is not None:
                self._stack.append(top)
        found: list[LocalEntry] = []
        stack = self._stack
        while stack and len(found) < count:
            if self._stopping is not None and self._stopping():
                stack.clear()
                break
            level = stack[-1]
            if not level:
                stack.pop()
                continue
            _, item = level.pop()
            if isinstance(item, str):  # a subtree's turn
                below = self._pending.pop(item, None)
                if below:
                    stack.append(below)
            elif item.is_dir:
                below = self._read(item.path)
                if below is not None:  # (None: may not be listed, gets no record)
                    self._pending[item.path] = below
                    found.append(item)
            else:
                found.append(item)
        return found

    def _read(self, directory: str) -> list[tuple[str, LocalEntry | str]] | None:
        """One directory's items, sorted last first (for ``pop``); None if denied."""
        listing = self._listing
        root = self._root
        items: list[tuple[str, LocalEntry | str]] = []
        try:
            with os.scandir(os.path.join(root, directory) if directory else root) as entries:
                for name, path, st in _kept_entries(entries, root, directory, listing):
                    if self._rules.matches(path, stat.S_ISDIR(st.st_mode)):
                        continue
                    entry = _listable(listing, path, st)
                    if entry is not None:
                        items.append((name, entry))
                        if entry.is_dir:
                            items.append((name + "/", path))
        except PermissionError:
            listing.protected.append(directory)
            if directory:
                listing.skipped.append((directory, UNREADABLE))
                listing.denied.add(directory)
                return None
        except OSError:
            listing.protected.append(directory)
        items.sort(key=lambda item: item[0], reverse=True)
        return items


def normalize_scopes(paths: Iterable[str]) -> list[str]:
    """Sorted, valid, non-overlapping subtrees (a path below another is dropped)."""
    kept: list[str] = []
    kept_set: set[str] = set()
    for path in sorted(set(paths)):
        try:
            validate_wire_path(path)
        except UnsafePathError:
            continue
        if kept and (path == kept[-1] or path.startswith(kept[-1] + "/")):
            continue
        # Sorting puts "a b" between "a" and "a/x": look further back for an ancestor.
        parts = path.split("/")
        if any("/".join(parts[:n]) in kept_set for n in range(1, len(parts))):
            continue
        kept.append(path)
        kept_set.add(path)
    return kept


def scope_ranges(scope: str) -> list[tuple[str, str]]:
    """Key ranges [low, high) covering ``scope`` and everything below it."""
    return [(scope, scope + "\x00"), (scope + "/", scope + "0")]
