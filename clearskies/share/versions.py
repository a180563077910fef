"""The old content peers' changes replaced or deleted, kept in the share's folder.

A share keeps its versions in ``<root>/.clearskies-versions`` (never
scanned, watched or synced: clearskies.share.ignore).  Inside the share,
keeping a file is a rename or a hard link on the same file system, never a
copy of its bytes; the daemon's data directory may lie on another disk.
Each version's content is a file named by its ID (``20261207-104858-1a2b3c4d``);
its description says where it came from (share-relative path, when it was
replaced, size, SHA-256 when known, which peer's change replaced it, mode
and mtime).  A version kept on its own is described in ``<ID>.json``; the
versions one job keeps by the hundred (a peer deleting a folder) share one
``<first ID>.jsonl``, a line each: creating a file costs the file system
far more than a line in one.  The description is written first, so a
crash leaves at worst a description without content, which listing skips
and :meth:`VersionStore.drop_orphans` removes.

Every method blocks: call them in the files pool (:mod:`clearskies.threads`).
Plain values in and out, standard library only.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import re
import secrets
import shutil
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from clearskies.share.ignore import TEMP_SUFFIX, VERSIONS_NAME
from clearskies.share.versionpolicy import KeptVersion

#: The shape of a version ID; anything else is refused before it names a file.
VERSION_ID = re.compile(r"\A\d{8}-\d{6}-[0-9a-f]{8}\Z")
#: A description larger than this is not ours.
MAX_DESCRIPTION = 64 * 1024
#: A batch's descriptions file takes this many versions; the next one starts a new file.
BATCH_VERSIONS = 1000
#: A batch's descriptions file larger than this is not ours (a line is under 5 KiB).
MAX_BATCH_FILE = 8 * 1024 * 1024
#: The suffix of files being written inside the versions folder.
PARTIAL = ".partial"
#: Descriptions without content are removed once this old (a crash mid-keep).
ORPHAN_AGE = 3600.0

CAUSES = ("replaced", "deleted", "restore", "resolved")

_NO_LINKS = (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.EXDEV)


class VersionError(Exception):
    """A version that cannot be found, read or put back; the message says why."""


class RestoreRefused(VersionError):
    """The version exists, but cannot be put back (its content changed, the path is a folder)."""


@dataclass(frozen=True)
class Version:
    """One kept version, as its description says."""

    version_id: str
    path: str  # share-relative, "/"-separated
    time: float  # when a change replaced or deleted it
    size: int
    sha256: str | None = None
    peer: str | None = None  # the peer whose change replaced it, when known
    mode: int | None = None
    mtime_ns: int | None = None
    cause: str = "replaced"  # replaced, deleted, restore (a restore here replaced it), or
    # resolved (a conflict settled with `clearskies resolve`)

    def kept(self) -> KeptVersion:
        return KeptVersion(self.version_id, self.path, self.time, self.size)

    def to_json(self) -> dict[str, Any]:
        # (Field by field: ``dataclasses.asdict`` deep-copies, and this runs for
        # every file a deletion keeps.)
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    @classmethod
    def from_json(cls, value: Any) -> Version | None:
        """A description read from disk, or None when it is not one of ours."""
        if not isinstance(value, dict):
            return None
        try:
            version = cls(**{k: value[k] for k in cls.__dataclass_fields__ if k in value})
        except TypeError:
            return None
        if not (isinstance(version.version_id, str) and VERSION_ID.match(version.version_id)
                and isinstance(version.path, str) and version.path
                and isinstance(version.time, (int, float)) and not isinstance(version.time, bool)
                and isinstance(version.size, int) and version.size >= 0
                and (version.sha256 is None or isinstance(version.sha256, str))
                and (version.peer is None or isinstance(version.peer, str))
                and (version.mode is None or isinstance(version.mode, int))
                and (version.mtime_ns is None or isinstance(version.mtime_ns, int))
                and version.cause in CAUSES):
            return None
        return version


class DescriptionBatch:
    """Where the versions one job keeps are described: lines of one ``<ID>.jsonl`` file.

    Made where the job is planned (no I/O), used by that job alone, in turn.
    Its file stays open while it is in use; the job's owner closes it when
    the job is over (:class:`KeepJob`), and a full one closes for the next file.
    """

    def __init__(self) -> None:
        self.name: str | None = None
        self.count = 0
        self.fd = -1
        self.folder_checked = False
        self._open_in: set[str] | None = None  # the store's names of files being written

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            if self._open_in is not None:
                self._open_in.discard(self.name or "")


class KeepJob:
    """What a disk job keeps as versions: ``job(...)`` keeps one file, in the job's thread.

    Its versions are described in one :class:`DescriptionBatch`; whoever runs
    the job calls :meth:`close` once it is over (on any thread: the job is done).
    """

    def __init__(self, keep: Callable[..., None], batch: DescriptionBatch) -> None:
        self._keep = keep
        self.batch = batch

    def __call__(self, *args: Any) -> None:
        self._keep(*args)

    def close(self) -> None:
        self.batch.close()


def new_version_id(now: float) -> str:
    return "%s-%s" % (_second_of(int(now)), secrets.token_hex(4))


@functools.lru_cache(maxsize=4)
def _second_of(now: int) -> str:
    """The ID's time part (a job keeping 1,000 files asks for one second 1,000 times)."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime(now))


class VersionStore:
    """One share's kept versions (blocking: the files pool only)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.directory = self.root / VERSIONS_NAME
        self._directory = str(self.directory)  # (joined for every file kept: no Path there)
        # Held from a description's line to its content's rename, and while a
        # batch's file is removed: a file is never removed under a job adding to it.
        self._batches = threading.Lock()
        self._writing: set[str] = set()  # batches' files open for their job

    # -- keeping ----------------------------------------------------------------

    def keep(self, local: str, path: str, now: float, *, sha256: str | None = None,
             peer: str | None = None, move: bool = True,
             cause: str = "replaced", durable: bool = True,
             batch: DescriptionBatch | None = None) -> Version | None:
        """Keep the file at ``local`` (share path ``path``) as a version; None if it is gone.

        ``move``: the file leaves its place (a deletion), by a rename.  Else it
        stays (it is about to be replaced by a rename over it) and the version
        is a hard link to it, or, where links are refused, a copy.  Raises
        OSError when the versions folder cannot take it: the caller must then
        leave the file alone.  ``durable``: fsync the versions folder (else
        the caller calls :meth:`sync` once for a batch).  ``batch``: describe
        it there, with the job's other versions (else in a file of its own).
        """
        try:
            st = os.lstat(local)
        except FileNotFoundError:
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        if batch is None or not batch.folder_checked:
            self._ensure_directory()  # (once for a batch: it runs for every file)
            if batch is not None:
                batch.folder_checked = True
        version = Version(new_version_id(now), path, now, st.st_size, sha256, peer,
                          stat.S_IMODE(st.st_mode), st.st_mtime_ns, cause)
        while os.path.lexists(self._content(version.version_id)):
            version = replace(version, version_id=new_version_id(now))
        with self._batches:
            self._keep_content(local, version, move, batch)
        if durable:
            self.sync()
        return version

    def _keep_content(self, local: str, version: Version, move: bool,
                      batch: DescriptionBatch | None) -> None:
        if batch is None:
            self._describe(version)
        else:
            self._describe_in(batch, version)
        content = self._content(version.version_id)
        try:
            if move:
                try:
                    os.rename(local, content)
                except OSError as e:
                    if e.errno != errno.EXDEV:
                        raise
                    self._copy(local, content)
                    os.unlink(local)
            else:
                try:
                    os.link(local, content, follow_symlinks=False)
                except OSError as e:
                    if e.errno not in _NO_LINKS:
                        raise
                    self._copy(local, content)
        except BaseException:
            self._forget(version.version_id)
            raise

    def sync(self) -> None:
        """fsync the versions folder: the versions kept so far survive a crash."""
        try:
            fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _ensure_directory(self) -> None:
        # (Two system calls, not four: this runs for every file a deletion keeps.)
        try:
            os.mkdir(self.directory, 0o700)
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, "the share folder is missing",
                                    str(self.root)) from None
        except FileExistsError:
            if not stat.S_ISDIR(os.lstat(self.directory).st_mode):  # (a symlink is not)
                raise NotADirectoryError(
                    errno.ENOTDIR, "versions folder is not a folder", str(self.directory)
                ) from None

    @staticmethod
    def _copy(source: str, destination: str) -> None:
        temp = destination + PARTIAL
        shutil.copy2(source, temp, follow_symlinks=False)
        os.replace(temp, destination)

    def _describe(self, version: Version) -> None:
        path = str(self._description(version.version_id))
        temp = path + PARTIAL
        data = json.dumps(version.to_json()).encode("utf-8")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
                     | getattr(os, "O_NOFOLLOW", 0), 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.replace(temp, path)

    def _describe_in(self, batch: DescriptionBatch, version: Version) -> None:
        """Append ``version``'s description to its batch's file (a new file when full)."""
        line = json.dumps(version.to_json()).encode("utf-8") + b"\n"
        if batch.fd < 0 or batch.count >= BATCH_VERSIONS:
            batch.close()
            name = version.version_id + ".jsonl"
            batch.fd = os.open(self.directory / name,
                               os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
                               | getattr(os, "O_NOFOLLOW", 0), 0o600)
            batch.name, batch.count, batch._open_in = name, 0, self._writing
            self._writing.add(name)
        view = memoryview(line)
        while view:
            view = view[os.write(batch.fd, view):]
        batch.count += 1

    # -- reading ----------------------------------------------------------------

    def versions(self, under: str = "") -> list[Version]:
        """The versions of ``under`` and of everything below it ("" for all), oldest first."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        except OSError as e:
            raise VersionError("cannot read the versions folder %s: %s"
                               % (self.directory, e.strerror or e)) from None
        found = []
        for name in names:
            for version in self._described_in(name):
                if not os.path.lexists(self._content(version.version_id)):
                    continue
                if under and version.path != under and not version.path.startswith(under + "/"):
                    continue
                found.append(version)
        return sorted(found, key=lambda v: (v.time, v.version_id))

    def _described_in(self, name: str) -> list[Version]:
        """The versions the file ``name`` of the versions folder describes (none: not ours)."""
        if name.endswith(".json"):
            version = self._read(name[:-5])
            return [] if version is None else [version]
        if name.endswith(".jsonl") and VERSION_ID.match(name[:-6]):
            return self._read_batch(name)
        return []

    def get(self, version_id: str) -> Version:
        """The version with this ID; VersionError if there is none."""
        if not isinstance(version_id, str) or not VERSION_ID.match(version_id):
            raise VersionError("%r is not a version ID (they look like "
                               "20261207-104858-1a2b3c4d)" % (version_id,))
        version = self._read(version_id) or next(  # (one of a batch: every description read)
            (v for v in self.versions() if v.version_id == version_id), None)
        if version is None or not os.path.lexists(self._content(version_id)):
            raise VersionError("no version %s is kept (see 'clearskies versions PATH')"
                               % version_id)
        return version

    def _read_batch(self, name: str) -> list[Version]:
        """The versions of a batch's file; a torn last line (a crash) is skipped."""
        try:
            with open(self.directory / name, "rb") as f:
                data = f.read(MAX_BATCH_FILE + 1)
        except OSError:
            return []
        if len(data) > MAX_BATCH_FILE:
            return []
        found = []
        for line in data.splitlines():
            try:
                version = Version.from_json(json.loads(line))
            except ValueError:
                continue
            if version is not None:
                found.append(version)
        return found

    def _read(self, version_id: str) -> Version | None:
        if not VERSION_ID.match(version_id):
            return None
        try:
            with open(self._description(version_id), "rb") as f:
                data = f.read(MAX_DESCRIPTION + 1)
        except OSError:
            return None
        if len(data) > MAX_DESCRIPTION:
            return None
        try:
            version = Version.from_json(json.loads(data))
        except ValueError:
            return None
        if version is None or version.version_id != version_id:
            return None
        return version

    def local_copy(self, sha256: str, size: int | None = None) -> Path | None:
        """A kept version holding this content, to copy instead of downloading it."""
        for version in reversed(self.versions()):
            if version.sha256 == sha256 and size in (None, version.size):
                content = self._content(version.version_id)
                try:
                    st = os.lstat(content)
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode) and st.st_size == version.size:
                    return Path(content)
        return None

    # -- restoring ----------------------------------------------------------------

    def restore(self, version: Version, local: str, path: str, now: float) -> Version | None:
        """Put ``version``'s content back at ``local`` (share path ``path``) as a new edit.

        What the path holds now is kept first as a version of its own (peer
        None), so a restore can be undone; returns that version, or None
        when the path was empty.  The content is copied (the version stays)
        into a temporary file, checked against the recorded SHA-256, then
        renamed into place.
        """
        content = self._content(version.version_id)
        target = Path(local)
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = target.with_name(".%s.%s%s" % (target.name, version.version_id, TEMP_SUFFIX))
        try:
            digest = _copy_hashing(content, temp)
            if version.sha256 is not None and digest != version.sha256:
                raise RestoreRefused("version %s no longer holds the content it was kept with "
                                   "(its file was changed); nothing restored" % version.version_id)
            if version.mode is not None:
                os.chmod(temp, version.mode & 0o7777 | 0o600)
            if version.mtime_ns is not None:
                os.utime(temp, ns=(version.mtime_ns, version.mtime_ns))
            previous = None
            if os.path.lexists(local):
                if not os.path.isfile(local) or os.path.islink(local):
                    raise RestoreRefused("%s is not a file now; move it away to restore "
                                       "there" % local)
                previous = self.keep(local, path, now, move=False, cause="restore")
            os.replace(temp, local)
        except BaseException:
            try:
                os.unlink(temp)
            except OSError:
                pass
            raise
        _fsync_directory(target.parent)
        return previous

    # -- cleaning ---------------------------------------------------------------

    def drop(self, version_ids: list[str]) -> int:
        """Remove these versions (content first); returns how many bytes that freed.

        A batch's file goes with the last of the versions it describes.
        """
        freed = 0
        batched = False
        for version_id in version_ids:
            if not VERSION_ID.match(version_id):
                continue
            content = self._content(version_id)
            try:
                freed += os.lstat(content).st_size
                os.unlink(content)
            except FileNotFoundError:
                pass
            batched = not self._forget(version_id) or batched
        if batched:
            self._drop_empty_batches()
        return freed

    def _drop_empty_batches(self) -> None:
        with self._batches:
            try:
                names = os.listdir(self.directory)
            except OSError:
                return
            present = set(names)
            for name in names:
                if self._spent_batch(name, present):
                    try:
                        os.unlink(self.directory / name)
                    except OSError:
                        continue

    def _spent_batch(self, name: str, present: set[str]) -> bool:
        """``name`` is a batch's file no job writes to and none of whose versions is left."""
        return (name.endswith(".jsonl") and name not in self._writing
                and not any(v.version_id in present for v in self._described_in(name)))

    def drop_orphans(self, now: float) -> int:
        """Remove what a crash left, and what dropping versions left: descriptions
        without content (a batch's file once none of its versions is left), stray
        temporary files."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return 0
        removed = 0
        present = set(names)
        for name in names:
            full = self.directory / name
            stem = name[:-5] if name.endswith(".json") else None
            stray = (name.endswith(PARTIAL)
                     or (stem is not None and stem not in present)
                     or self._spent_batch(name, present))
            if not stray:
                continue
            try:
                if now - os.lstat(full).st_mtime < ORPHAN_AGE:
                    continue
                os.unlink(full)
                removed += 1
            except OSError:
                continue
        return removed

    def _forget(self, version_id: str) -> bool:
        """Remove the version's own description; False when it has none (a batch's)."""
        try:
            os.unlink(self._description(version_id))
        except FileNotFoundError:
            return False
        return True

    def _content(self, version_id: str) -> str:
        return os.path.join(self._directory, version_id)

    def _description(self, version_id: str) -> Path:
        return self.directory / (version_id + ".json")


def _copy_hashing(source: str | Path, temp: Path) -> str:
    """Copy ``source`` to a new ``temp`` (fsynced); the SHA-256 of what was copied."""
    digest = hashlib.sha256()
    flags = os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
    try:
        src = os.open(source, flags)
    except FileNotFoundError:
        raise VersionError("the content of this version is gone from %s; nothing restored"
                           % source.parent) from None
    try:
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
        dst = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            while block := os.read(src, 1 << 20):
                digest.update(block)
                view = memoryview(block)
                while view:
                    view = view[os.write(dst, view):]
            os.fsync(dst)
        finally:
            os.close(dst)
    finally:
        os.close(src)
    return digest.hexdigest()


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = ["VERSION_ID", "DescriptionBatch", "KeepJob", "RestoreRefused", "Version",
           "VersionError", "VersionStore", "new_version_id"]
