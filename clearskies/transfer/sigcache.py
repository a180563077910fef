"""Signatures of big files made ahead, so a delta can be asked for at once (protocol/rsync.md),
and, for files we sent, answered from block checksums (clearskies.rdiffblocks).

Signing the old copy is most of the asking side's work for a big file
(about 1.5 s per GiB).  A :class:`SignatureCache` makes that signature
when a big download has just been installed, one file at a time, once the
share is idle (the daemon's test: nothing scanned, downloaded or sent for
ten seconds; looked at every :data:`SIGN_DELAY` seconds, and a share that gets
busy stops a signature being made), in the files pool; when a newer
version of the file then comes, the signature is read from the cache
instead of signing the whole file again.

An entry is used only for exactly the file it was made from: its name
comes from the share and path, and it records the SHA-256 of the content
and the file's device, inode, size, mtime and ctime.  Any write, truncate
or replacement changes the ctime (which no user can set) or the inode, so
an entry never stands for a file that changed; and a wrong signature
could cost bandwidth only: the patched result is always checked against
the announced SHA-256 before it is installed.

A file we sent a peer (whole or by delta) is signed too, :data:`SENT_DELAY`
seconds later, with a CRC-32 of each block: when it changes, that peer asks
with the very signature we made, and :meth:`SignatureCache.previous` then
gives the old version's checksums, even though our file has changed since,
for a delta from checksums.  Entries live in one
directory under the daemon's data directory, at most
:data:`MAX_CACHE_BYTES` in all (least recently used go first); a torn
entry (a crash while writing one) is ignored and replaced.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from clearskies import diskjobs, rdiff, rdiffblocks
from clearskies.interfaces import IRunner

MAX_CACHE_BYTES = 64 * 1024 * 1024
"""Most bytes of cached signatures kept in all (a 1 GiB file's is 0.4 MB)."""

SIGN_DELAY = 1.0
"""Seconds after an install before its signature is made, and between looks
at whether the share is idle: signatures wait while it scans, downloads or sends."""

MAX_QUEUED = 1000
"""Most files waiting to be signed; more are simply not cached."""

STALE_TEMP_SECONDS = 3600
"""A temporary entry this old was left by a crash, and is removed."""

SENT_DELAY = 10.0
"""Seconds after we sent a file before it is signed (with block checksums) for a
delta from checksums: a file edited again within seconds would waste the work,
and signing it would compete with sending those edits."""

CHECK_EVERY = 4096
"""Signature bytes made between two looks at whether the file was written meanwhile."""

SUFFIX = ".sig"
_HEADER_LIMIT = 4096


def _prefix(share_id: str, path: str) -> str:
    return hashlib.sha256(("%s\0%s" % (share_id, path)).encode("utf-8",
                                                              "surrogateescape")).hexdigest()[:32]


def _identity(st: os.stat_result) -> list[int]:
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _name(share_id: str, path: str, st: os.stat_result) -> str:
    ident = hashlib.sha256(repr(_identity(st)).encode()).hexdigest()[:32]
    return "%s-%s%s" % (_prefix(share_id, path), ident, SUFFIX)


class CachedSignatureReader:
    """A cached signature handed out as ``read(n)`` (as :class:`clearskies.rdiff.SignatureReader`)."""

    def __init__(self, fd: int, start: int, length: int) -> None:
        self._fd = fd
        self._position = start
        self._end = start + length

    def read(self, n: int = rdiff.PIECE) -> bytes:
        room = min(n, self._end - self._position)
        if room <= 0:
            return b""
        data = os.pread(self._fd, room, self._position)
        if not data:
            raise rdiff.RdiffError("the cached signature is shorter than it said")
        self._position += len(data)
        return data

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


class SignatureCache:
    """Signatures of big installed files, under ``directory`` (made on first use)."""

    _log = Logger()

    def __init__(self, directory: str | Path, runner: IRunner, clock: Any, *,
                 max_bytes: int = MAX_CACHE_BYTES, delay: float = SIGN_DELAY,
                 min_size: int = 1024 * 1024, idle: Callable[[], bool] | None = None,
                 sent_delay: float = SENT_DELAY) -> None:
        """``idle()``: whether the share has nothing else to do now."""
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.delay = delay
        self.sent_delay = sent_delay
        self._due: dict[tuple[str, str], float] = {}  # sent files: not signed before
        self.min_size = min_size
        self._idle = idle
        self._runner = runner
        self._clock = clock
        self._queue: deque[tuple[str, str, Path, str, tuple[int, int, int]]] = deque()
        self._call: Any = None
        self._running = False
        self._current: tuple[str, str] | None = None  # (share, path) being signed
        self._waiters: list[Deferred[None]] = []
        self._stopped = False
        # Set while a signature is being made and the share stopped being idle: the
        # worker stops at its next piece and the file waits in the queue again.
        self._interrupt = threading.Event()
        self._watch: Any = None
        #: Signatures made, and made ones taken from the cache (for tests and logs).
        self.made = 0
        self.used = 0

    # -- making (reactor thread queues, a worker makes) ----------------------------

    def wants(self, size: int) -> bool:
        """Whether a file of ``size`` bytes is worth a signature made ahead (cheap: ask
        before working out its local path)."""
        return self.min_size <= size <= rdiff.MAX_OLD_SIZE and rdiff.AVAILABLE

    def installed(self, share_id: str, path: str, local_path: Path, sha256: str,
                  key: tuple[int, int, int] | None) -> None:
        """A file was put in place with content ``sha256`` and (inode, size, mtime_ns) ``key``."""
        if key is not None and (key[1] < self.min_size or key[1] > rdiff.MAX_OLD_SIZE):
            return
        if not rdiff.AVAILABLE:
            return
        job = (share_id, path, local_path, sha256, key)
        for index, queued in enumerate(self._queue):
            if queued[0] == share_id and queued[1] == path:
                if key is not None:  # a newer install replaces what waited, in its place
                    self._queue[index] = job
                    self._due.pop((share_id, path), None)
                return
        if len(self._queue) >= MAX_QUEUED:
            return
        self._queue.append(job)
        self._wake(self.delay)

    def sent(self, share_id: str, path: str, local_path: Path, sha256: str, size: int) -> None:
        """We sent a peer this whole file, recorded with content ``sha256``: when it
        changes, that peer will likely ask for a delta from this version, and the
        signature and block checksums made now let us answer from checksums
        (:meth:`previous`).  Nothing if an entry for the file as it is exists."""
        if not self.min_size <= size <= rdiff.MAX_OLD_SIZE:
            return
        if any(job[0] == share_id and job[1] == path for job in self._queue):
            return  # waiting already (sent to another peer, or installed)
        self._due[(share_id, path)] = self._clock.seconds() + self.sent_delay
        self.installed(share_id, path, local_path, sha256, None)
        if not any(job[0] == share_id and job[1] == path for job in self._queue):
            self._due.pop((share_id, path), None)  # not queued after all

    def _wake(self, delay: float) -> None:
        if self._call is None and not self._running and self._queue and not self._stopped:
            self._call = self._clock.callLater(delay, self._next)

    def _next(self) -> None:
        self._call = None
        if not self._queue:
            return
        now = self._clock.seconds()
        job = next((j for j in self._queue if self._due.get((j[0], j[1]), now) <= now), None)
        if job is None:  # only sent files, not due yet
            self._wake(min(self._due.get((j[0], j[1]), now) for j in self._queue) - now)
            return
        if self._idle is not None and not self._idle():
            self._wake(self.delay)  # busy: look again later
            return
        self._queue.remove(job)
        self._due.pop((job[0], job[1]), None)
        self._running = True
        self._current = (job[0], job[1])
        self._interrupt.clear()
        self._watch = self._clock.callLater(self.delay, self._still_idle)
        self._runner.run(self.make, *job).addBoth(self._made, job)

    def _still_idle(self) -> None:
        """While a signature is made: a share that got busy (a transfer began) stops it."""
        self._watch = None
        if not self._running:
            return
        if self._idle is not None and not self._idle():
            self._interrupt.set()
        else:
            self._watch = self._clock.callLater(self.delay, self._still_idle)

    def being_made(self, share_id: str, path: str) -> Deferred[None] | None:
        """If this path's signature is being made right now: fires once it is done."""
        if self._current != (share_id, path):
            return None
        waiter: Deferred[None] = Deferred()
        self._waiters.append(waiter)
        return waiter

    def _made(self, result: object, job: tuple[str, str, Path, str, Any]) -> None:
        self._running = False
        self._current = None
        if self._watch is not None and self._watch.active():
            self._watch.cancel()
        self._watch = None
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)
        if result is True:
            self.made += 1
        elif result is None:  # interrupted: the file waits, first in line, for a quiet share
            if not self._stopped and not any(q[:2] == job[:2] for q in self._queue):
                self._queue.appendleft(job)
            self._wake(self.delay)
            return
        elif not isinstance(result, bool):
            self._log.info("could not cache a signature: {error}", error=result)
        self._wake(0.0)

    def stop(self) -> None:
        """Make no more signatures (one being made stops at its next piece)."""
        self._stopped = True
        self._interrupt.set()
        if self._watch is not None and self._watch.active():
            self._watch.cancel()
        self._watch = None
        self._queue.clear()
        self._due.clear()
        if self._call is not None:
            self._call.cancel()
            self._call = None

    def make(self, share_id: str, path: str, local_path: Path, sha256: str,
             key: tuple[int, int, int]) -> bool | None:
        """(Worker thread.)  Sign the file if it still is as installed; True if cached,
        None if interrupted (the share got busy, or the cache stops)."""
        try:
            fd = os.open(local_path, os.O_RDONLY | diskjobs.OPEN_FLAGS)
        except OSError:
            return False
        try:
            before = os.fstat(fd)
            if not stat.S_ISREG(before.st_mode) or (
                    key is not None
                    and (before.st_ino, before.st_size, before.st_mtime_ns) != tuple(key)):
                return False  # changed since it was installed: the scanner will see to it
            if key is None and _has_checksums(self.directory / _name(share_id, path, before)):
                return False  # already made for the file as it is
            reader = rdiff.SignatureReader(os.dup(fd), before.st_size)
            pieces = []
            try:
                # A little signature at a time (4 KiB: a few MiB of the file), so that a
                # file written meanwhile stops the signing at once, not at its end.
                while data := reader.read(CHECK_EVERY):
                    pieces.append(data)
                    if _identity(os.fstat(fd)) != _identity(before):
                        return False
                    if self._interrupt.is_set():
                        return None
            finally:
                reader.close()
            # Block checksums for a file we sent (a delta from checksums, :meth:`previous`);
            # an installed file is signed for asking only, the sooner.
            crcs = (rdiffblocks.block_crcs(fd, before.st_size, reader.block)
                    if key is None else b"")
            if _identity(os.fstat(fd)) != _identity(before):
                return False  # written while we read it
        finally:
            os.close(fd)
        signature = b"".join(pieces)
        header = json.dumps({"sha256": sha256, "file": _identity(before),
                             "length": len(signature), "block": reader.block,
                             "signature_sha256": hashlib.sha256(signature).hexdigest(),
                             "crcs": len(crcs)}).encode() + b"\n"
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        name = _name(share_id, path, before)
        temp = self.directory / (".%s.tmp" % name)
        out = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | diskjobs.OPEN_FLAGS, 0o600)
        try:
            diskjobs.write_all(out, header + signature + crcs)
        finally:
            os.close(out)
        os.replace(temp, self.directory / name)
        self._prune(keep=name, prefix=name.split("-", 1)[0])
        return True

    def _prune(self, keep: str, prefix: str) -> None:
        """Drop older entries for the same path, then the least recently used past the bound."""
        entries = []
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return
        for name in names:
            path = self.directory / name
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if name.startswith("."):  # a temporary file: another maker's, or a crash's
                if time.time() - st.st_mtime > STALE_TEMP_SECONDS:
                    _unlink(path)
                continue
            if name != keep and name.startswith(prefix + "-"):
                _unlink(path)
                continue
            entries.append((st.st_mtime_ns, st.st_size, name))
        total = sum(size for _, size, _ in entries)
        for _, size, name in sorted(entries):
            if total <= self.max_bytes:
                break
            _unlink(self.directory / name)
            total -= size

    # -- using (worker thread) -------------------------------------------------------

    def open(self, share_id: str, path: str, fd: int, sha256: str | None
             ) -> CachedSignatureReader | None:
        """The cached signature of the open file ``fd`` (our copy of ``path``, recorded
        with content ``sha256``), or None when there is none for exactly this file."""
        if not sha256:
            return None
        st = os.fstat(fd)
        entry = self.directory / _name(share_id, path, st)
        try:
            cached = os.open(entry, os.O_RDONLY | diskjobs.OPEN_FLAGS)
        except OSError:
            return None
        try:
            head = os.pread(cached, _HEADER_LIMIT, 0)
            line, newline, _ = head.partition(b"\n")
            meta = json.loads(line) if newline else None
            if (not isinstance(meta, dict) or meta.get("sha256") != sha256
                    or meta.get("file") != _identity(st)
                    or not isinstance(meta.get("length"), int)
                    or os.fstat(cached).st_size
                    != len(line) + 1 + meta["length"] + _int(meta.get("crcs"))):
                os.close(cached)
                return None
        except (OSError, ValueError):
            os.close(cached)
            return None
        try:
            os.utime(cached)  # recently used: pruned last
        except OSError:
            pass
        self.used += 1
        return CachedSignatureReader(cached, len(line) + 1, meta["length"])

    def previous(self, share_id: str, path: str, signature_sha256: str
                 ) -> tuple[int, int, bytes] | None:
        """(Worker thread.)  For a peer's signature of ``path`` whose SHA-256 is
        ``signature_sha256``: if it is the very signature we made of a version of our
        file (the peer holds that version), (that version's size, block length,
        block checksums: see clearskies.rdiffblocks); else None.  Our file may have
        changed since: this is what a delta from checksums needs."""
        prefix = _prefix(share_id, path) + "-"
        try:
            names = [n for n in os.listdir(self.directory) if n.startswith(prefix)]
        except OSError:
            return None
        for name in names:
            try:
                fd = os.open(self.directory / name, os.O_RDONLY | diskjobs.OPEN_FLAGS)
            except OSError:
                continue
            try:
                head = os.pread(fd, _HEADER_LIMIT, 0)
                line, newline, _ = head.partition(b"\n")
                meta = json.loads(line) if newline else None
                if (not isinstance(meta, dict)
                        or meta.get("signature_sha256") != signature_sha256):
                    continue
                length, count, block = (_int(meta.get("length")), _int(meta.get("crcs")),
                                        _int(meta.get("block")))
                identity = meta.get("file")
                if (not count or not block or not isinstance(identity, list)
                        or len(identity) != 5 or not isinstance(identity[2], int)):
                    continue
                crcs = os.pread(fd, count, len(line) + 1 + length)
                if len(crcs) != count or count != -(-identity[2] // block) * 4:
                    continue
                self.used += 1
                return identity[2], block, crcs
            except (OSError, ValueError):
                continue
            finally:
                os.close(fd)
        return None


def _has_checksums(entry: Path) -> bool:
    """Whether the cache entry ``entry`` exists and holds block checksums."""
    try:
        with open(entry, "rb") as f:
            meta = json.loads(f.readline(_HEADER_LIMIT))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and _int(meta.get("crcs")) > 0


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError as e:
        if e.errno != errno.ENOENT:
            raise


__all__ = ["MAX_CACHE_BYTES", "SIGN_DELAY", "MAX_QUEUED", "CachedSignatureReader",
           "SignatureCache"]
