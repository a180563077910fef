"""Which folders may be shared (protocol/control.md, "Where a share may be").

A share is refused when it is ``/``, when it contains or lies inside one of
the daemon's own paths (its data directory with the keys, the database and
the log, or the control socket), and when it is on, or holds, a kernel
pseudo-filesystem: anything under ``/proc``, ``/sys`` or ``/dev``, anything
under ``/run`` but a disk mounted there, or a mount whose type is in
``PSEUDO_FILESYSTEMS`` according to ``/proc/self/mountinfo``.  A large folder (a home directory, or one with
more than ``LARGE_ENTRIES`` entries) is accepted with a warning.

``check_location`` and ``parse_mountinfo`` are pure; ``refusal`` and
``size_warning`` read the file system (call them from a worker thread).
"""

from __future__ import annotations

import os
import pwd
from typing import Iterable, NamedTuple

from clearskies.errors import ConfigurationError

#: Directories that only ever hold the kernel's and the system's run-time state.
PSEUDO_TREES = ("/proc", "/sys", "/dev")
#: Run-time state too, except on a disk mounted below it (/run/media/USER/… is
#: where removable disks appear on many systems).
RUN_TREE = "/run"
#: Mount types whose files are the kernel's state, not a user's data.
PSEUDO_FILESYSTEMS = frozenset({
    "proc", "sysfs", "devtmpfs", "devpts", "cgroup", "cgroup2", "securityfs", "debugfs",
    "tracefs", "pstore", "bpf", "configfs", "fusectl", "mqueue", "hugetlbfs",
    "binfmt_misc", "efivarfs", "selinuxfs", "rpc_pipefs", "nsfs",
})
# (Not autofs: it is what mounts many NFS home directories.)
#: A bounded walk that finds more entries than this warns that the share is large.
LARGE_ENTRIES = 100_000
MOUNTINFO = "/proc/self/mountinfo"


class Mount(NamedTuple):
    point: str
    fstype: str


def _unescape(field: str) -> str:
    """Mount points in mountinfo escape space, tab, newline and backslash as octal."""
    out, i = [], 0
    while i < len(field):
        digits = field[i + 1:i + 4]
        if field[i] == "\\" and len(digits) == 3 and all(c in "01234567" for c in digits):
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[Mount]:
    """The mount points and filesystem types listed in ``/proc/self/mountinfo`` text."""
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if "-" not in fields[6:]:
            continue
        dash = fields.index("-", 6)
        if len(fields) <= dash + 1:
            continue
        mounts.append(Mount(_unescape(fields[4]), fields[dash + 1]))
    return mounts


def _inside(path: str, top: str) -> bool:
    """``path`` is ``top`` or below it (both real, absolute paths)."""
    return path == top or path.startswith(top.rstrip("/") + "/")


def check_location(path: str, daemon_paths: Iterable[str], mounts: Iterable[Mount]) -> None:
    """Raise ConfigurationError if ``path`` (a real path) may not be a share.

    ``daemon_paths``: the daemon's own paths (real paths); ``mounts``: the
    system's mounts (empty when unknown).
    """
    if path == "/":
        raise ConfigurationError(
            "/ cannot be shared: it holds the whole system, the daemon's own data "
            "included; share a folder of your files instead")
    for own in daemon_paths:
        if path == own:
            raise ConfigurationError(
                "%s cannot be shared: it is the daemon's own data directory (keys, "
                "database, log); share a folder of your files instead" % path)
        if _inside(own, path):
            raise ConfigurationError(
                "%s cannot be shared: it holds the daemon's data directory %s (its keys "
                "and database would be sent to peers); share a folder that does not "
                "contain it, or start the daemon with --data-dir elsewhere" % (path, own))
        if _inside(path, own):
            raise ConfigurationError(
                "%s cannot be shared: it is inside the daemon's data directory %s; "
                "share a folder of your files instead" % (path, own))
    mounts = list(mounts)
    for top in PSEUDO_TREES + (RUN_TREE,):
        if _inside(path, top):
            holder = _innermost(path, mounts) if top == RUN_TREE else None
            if (holder is not None and holder.point != RUN_TREE
                    and _inside(holder.point, RUN_TREE)
                    and holder.fstype != "tmpfs" and holder.fstype not in PSEUDO_FILESYSTEMS):
                continue  # a real disk mounted below /run (not /run itself, nor /)
            raise ConfigurationError(
                "%s cannot be shared: %s holds the system's run-time state, not files to "
                "sync; share a folder of your files instead" % (path, top))
    for mount in mounts:
        if mount.fstype not in PSEUDO_FILESYSTEMS:
            continue
        if _inside(path, mount.point) or _inside(mount.point, path):
            raise ConfigurationError(
                "%s cannot be shared: %s is a %s filesystem (the kernel's state, not "
                "files to sync); share a folder of your files instead"
                % (path, mount.point, mount.fstype))


def _innermost(path: str, mounts: list[Mount]) -> Mount | None:
    """The mount ``path`` is on (the last, deepest mount holding it)."""
    found: Mount | None = None
    for mount in mounts:
        if _inside(path, mount.point) and (
                found is None or len(mount.point) >= len(found.point)):
            found = mount
    return found


def read_mounts() -> list[Mount]:
    """The system's mounts, or none when ``/proc/self/mountinfo`` cannot be read."""
    try:
        with open(MOUNTINFO, encoding="utf-8", errors="surrogateescape") as f:
            return parse_mountinfo(f.read())
    except OSError:
        return []


def refusal(path: str, daemon_paths: Iterable[str]) -> str | None:
    """Why ``path`` may not be a share, or None (blocking: reads the mount table)."""
    real = os.path.realpath(path)
    try:
        check_location(real, [os.path.realpath(p) for p in daemon_paths], read_mounts())
    except ConfigurationError as e:
        return str(e)
    return None


def home_directories() -> set[str]:
    """Every user's home directory (real paths), this process's own included."""
    homes = {os.path.realpath(os.path.expanduser("~"))}
    try:
        homes.update(os.path.realpath(entry.pw_dir) for entry in pwd.getpwall()
                     if entry.pw_dir not in ("", "/"))
    except OSError:
        pass
    return homes


def count_entries(root: str, limit: int) -> int:
    """Entries below ``root``, counting stops past ``limit`` (never follows symlinks)."""
    count, stack = 0, [root]
    while stack and count <= limit:
        try:
            with os.scandir(stack.pop()) as entries:
                for entry in entries:
                    count += 1
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(entry.path)
                    except OSError:
                        continue
                    if count > limit:
                        break
        except OSError:
            continue
    return count


def size_warning(path: str, limit: int = LARGE_ENTRIES) -> str | None:
    """A warning for a share that is a home directory or very large, else None (blocking)."""
    real = os.path.realpath(path)
    if real in home_directories():
        return ("%s is a home directory: everything in it is synced, settings and caches "
                "included; consider sharing a folder inside it instead" % real)
    if count_entries(real, limit) > limit:
        return ("%s holds more than %d files and folders: the first scan takes a while "
                "and everything in it is synced" % (real, limit))
    return None


def attach_problem(path: str, merge: bool) -> str | None:
    """Why a share cannot be attached into ``path`` now, or None (blocking).

    The folder need not exist (it is created once the code has worked), but
    the one holding it must; one that holds anything needs ``merge``.
    """
    if not os.path.lexists(path):
        parent = os.path.dirname(path)
        if not os.path.isdir(parent):
            return ("%s does not exist; create it (or at least the folder that will "
                    "hold it) first" % parent)
        # It is created only once a peer has accepted the code: whatever would stop
        # that must be said now, not after the code is used.
        name = os.fsencode(os.path.basename(path))
        try:
            most = os.pathconf(parent, "PC_NAME_MAX")
        except (OSError, ValueError):
            most = 255
        if len(name) > most:
            return ("the name %s… is %d bytes long; the file system of %s allows at most "
                    "%d; choose a shorter name" % (os.fsdecode(name[:40]), len(name),
                                                    parent, most))
        if not os.access(parent, os.W_OK | os.X_OK):
            return ("cannot create %s: %s is not writable for this user; choose another "
                    "folder" % (path, parent))
        return None
    if not os.path.isdir(path):
        return "%s exists and is not a folder; choose a folder to attach into" % path
    try:
        with os.scandir(path) as entries:
            holds_files = any(True for _ in entries)
    except OSError as e:
        return "cannot read %s: %s" % (path, e.strerror)
    if holds_files and not merge:
        return ("%s is not empty; attach into a new or empty folder, or add --merge to "
                "merge its files into the share (the share's version of each name wins, "
                "yours are kept as conflict copies, and files only you have are shared)"
                % path)
    return None
