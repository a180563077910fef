"""librsync's rdiff format: signatures, deltas and patches (protocol/rsync.md).

A thin binding, through :mod:`ctypes`, over the system's librsync (Debian's
``librsync2``): the rolling checksums, block matching and patching run in C.
The library is optional: :data:`AVAILABLE` is False without it, and the
daemon then simply does not offer the ``rsync`` feature.

Everything streams, a bounded piece at a time, so a file of any size costs
bounded memory:

- :class:`SignatureReader` reads an old file and hands out its signature a
  piece at a time (``read(n)``, as a file would);
- :class:`SignatureLoader` takes a peer's signature as it arrives
  (``feed``), refusing one larger than :data:`MAX_SIGNATURE_BYTES` or not in
  the rdiff format; :meth:`SignatureLoader.finish` gives a
  :class:`Signature`;
- :class:`DeltaReader` reads the new file and hands out the delta against a
  :class:`Signature` a piece at a time;
- :class:`Patcher` applies a delta fed a piece at a time to an old file,
  writing (and hashing) the result, never past a stated size, and refusing
  a delta that reads outside the old file (:func:`patch_file`: the same
  from a descriptor).

All of these block and burn CPU: callers run them in worker threads.  None
touches Twisted.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import math
import os
import struct
import threading
from collections.abc import Callable
from typing import Any

RS_DONE = 0
RS_BLOCKED = 1
RS_RUNNING = 2
RS_INPUT_ENDED = 103
RS_CORRUPT = 106

DELTA_MAGIC = 0x72730236
"""The first four bytes (big-endian) of every rdiff delta."""

SIGNATURE_MAGICS = {
    0x72730136: "md4",
    0x72730137: "blake2",
    0x72730146: "rabinkarp-md4",
    0x72730147: "rabinkarp-blake2",
}
"""Signature formats librsync reads, by their first four bytes (big-endian)."""

OUR_SIGNATURE_MAGIC = 0x72730146
"""The signatures we make: Rabin-Karp rolling sums and MD4 strong sums.

Measured (bench/rdiff.py), signing and making deltas with MD4 takes about
two thirds of the time BLAKE2 (rdiff's default) takes.  MD4's weakness
(collisions can be made) does not matter here: every result is checked
against its SHA-256 before it is installed, and a sender able to craft
collisions chooses the file's content anyway."""

MIN_BLOCK = 2 * 1024
"""Smallest block we sign with: below it a signature costs more than it saves."""

MAX_BLOCK = 1024 * 1024
"""Largest block we sign with, and the largest we accept in a peer's signature."""

MIN_PEER_BLOCK = 256
"""Smallest block a peer's signature may declare (rdiff's own minimum)."""


MAX_SIGNATURE_BYTES = 16 * 1024 * 1024
"""Most bytes of signature we take from a peer (librsync holds it in memory,
indexed, while it makes the delta: about twice this at most)."""

MAX_OLD_SIZE = 256 * 1024 * 1024 * 1024
"""Largest old file we sign (its signature is about 7 MiB, well within
:data:`MAX_SIGNATURE_BYTES`); a larger file is fetched whole."""

SIGNATURE_HEADER = 12
"""Magic, block length and strong sum length: three big-endian 32-bit words."""

PIECE = 1024 * 1024
"""Bytes read from a file, or handed out, per step."""

_LIBRARY_NAMES = ("librsync.so.2", "librsync.so")


class RdiffError(Exception):
    """A signature or delta that is not valid rdiff, or one we refuse to apply."""


class _Buffers(ctypes.Structure):
    _fields_ = [
        ("next_in", ctypes.c_void_p),
        ("avail_in", ctypes.c_size_t),
        ("eof_in", ctypes.c_int),
        ("next_out", ctypes.c_void_p),
        ("avail_out", ctypes.c_size_t),
    ]


_COPY_CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_int64,
                            ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_void_p))


LIBRARY_VARIABLE = "CLEARSKIES_LIBRSYNC"
"""Environment variable naming the librsync to load (a path), or ``none`` to do without."""


def _load() -> Any:
    """The librsync shared library with its signatures declared, or None."""
    chosen = os.environ.get(LIBRARY_VARIABLE, "")
    if chosen.lower() == "none":
        return None
    names = [chosen] if chosen else list(_LIBRARY_NAMES)
    found = ctypes.util.find_library("rsync") if not chosen else None
    if found:
        names.append(found)
    for name in names:
        try:
            lib = ctypes.CDLL(name)
            lib.rs_sig_begin.restype = ctypes.c_void_p
            lib.rs_sig_begin.argtypes = [ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int]
            lib.rs_loadsig_begin.restype = ctypes.c_void_p
            lib.rs_loadsig_begin.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
            lib.rs_delta_begin.restype = ctypes.c_void_p
            lib.rs_delta_begin.argtypes = [ctypes.c_void_p]
            lib.rs_patch_begin.restype = ctypes.c_void_p
            lib.rs_patch_begin.argtypes = [_COPY_CB, ctypes.c_void_p]
            lib.rs_build_hash_table.restype = ctypes.c_int
            lib.rs_build_hash_table.argtypes = [ctypes.c_void_p]
            lib.rs_job_iter.restype = ctypes.c_int
            lib.rs_job_iter.argtypes = [ctypes.c_void_p, ctypes.POINTER(_Buffers)]
            lib.rs_job_free.restype = ctypes.c_int
            lib.rs_job_free.argtypes = [ctypes.c_void_p]
            lib.rs_free_sumset.restype = None
            lib.rs_free_sumset.argtypes = [ctypes.c_void_p]
            lib.rs_strerror.restype = ctypes.c_char_p
            lib.rs_strerror.argtypes = [ctypes.c_int]
            lib.rs_trace_set_level.restype = None
            lib.rs_trace_set_level.argtypes = [ctypes.c_int]
        except (OSError, AttributeError):
            continue
        lib.rs_trace_set_level(2)  # errors only: hostile input must not flood stderr
        return lib
    return None


_lib = _load()

AVAILABLE = _lib is not None
"""True when librsync could be loaded: only then is ``rsync`` offered."""


def _require() -> Any:
    if _lib is None:
        raise RdiffError("librsync is not installed (Debian: apt-get install librsync2)")
    return _lib


def _why(code: int) -> str:
    return _require().rs_strerror(code).decode("ascii", "replace")


def block_size(size: int) -> int:
    """The block length to sign an old file of ``size`` bytes with.

    About the square root of the size (librsync's recommendation: the
    signature and the delta's overhead then grow alike), rounded up to a
    multiple of 1 KiB, at least :data:`MIN_BLOCK` and at most
    :data:`MAX_BLOCK`.  Up to :data:`MAX_OLD_SIZE` the signature stays
    within :data:`MAX_SIGNATURE_BYTES`.
    """
    root = math.isqrt(max(size, 0))
    return min(MAX_BLOCK, max(MIN_BLOCK, -(-root // 1024) * 1024))


def strong_length(size: int, block: int) -> int:
    """Bytes of each block's strong sum in our signature of a ``size``-byte file.

    librsync's own minimum: enough bits that, with the 32-bit rolling sum,
    a false block match in a whole file stays below about 2^-40 (8 bytes
    for 1 GiB, 10 for 256 GiB).  A false match would only cost a normal
    download: the result's SHA-256 is checked before it is installed.
    """
    def log2(n: int) -> int:
        return max(n, 1).bit_length() - 1

    return min(32, 2 + (log2(size + (1 << 24)) + log2(size // block + 1) + 7) // 8)


def signature_size(size: int, block: int | None = None) -> int:
    """Bytes of our signature of a file of ``size`` bytes."""
    block = block or block_size(size)
    return SIGNATURE_HEADER + -(-size // block) * (4 + strong_length(size, block))


class _Job:
    """One librsync job driven a buffer at a time; subclasses say where input comes from."""

    def __init__(self, job: int | None, what: str) -> None:
        if not job:
            raise RdiffError("librsync could not start a %s job" % what)
        self._job: int | None = job
        self._what = what
        self._out = ctypes.create_string_buffer(PIECE)
        self._view = memoryview(self._out).cast("B")
        self._buffers = _Buffers()
        self._in: Any = None  # keeps the input bytes alive while librsync reads them
        self.done = False

    def _iterate(self, data: bytes, eof: bool, out_room: int,
                 copy_out: bool = True) -> tuple[Any, int]:
        """One rs_job_iter call: input ``data``; returns (output, input bytes consumed).

        Without ``copy_out`` the output is a view of the job's buffer, valid
        until the next call.
        """
        if self._job is None:
            raise RdiffError("the %s job is closed" % self._what)
        self._in = data  # librsync reads it in place: keep it alive during the call
        b = self._buffers
        b.next_in = ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value if data else None
        b.avail_in = len(data)
        b.eof_in = 1 if eof else 0
        room = min(out_room, PIECE)
        out_at = ctypes.addressof(self._out)
        b.next_out = out_at
        b.avail_out = room
        result = _require().rs_job_iter(self._job, ctypes.byref(b))
        produced = room - b.avail_out
        consumed = len(data) - b.avail_in
        self._in = None
        if result == RS_DONE:
            self.done = True
        elif result != RS_BLOCKED:
            raise RdiffError("%s failed: %s" % (self._what, _why(result)))
        if not produced:
            return b"", consumed
        if not copy_out:
            return self._view[:produced], consumed
        return ctypes.string_at(out_at, produced), consumed

    def close(self) -> None:
        """Free the job (idempotent)."""
        job, self._job = self._job, None
        if job:
            _require().rs_job_free(job)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


class _Reader(_Job):
    """A job reading a file descriptor and handing out its output as ``read(n)``."""

    def __init__(self, job: int | None, what: str, fd: int, start: int = 0,
                 end: int | None = None) -> None:
        super().__init__(job, what)
        self._fd = fd
        self._position = start
        self._end = end  # None: to the end of the file
        self._pending = b""  # read from the file, not yet taken by librsync
        self._eof = False

    def read(self, n: int = PIECE) -> bytes:
        """Up to ``n`` bytes of output (fewer only at the end); b"" once it is all out."""
        pieces: list[bytes] = []
        wanted = n
        while wanted > 0 and not self.done:
            if not self._pending and not self._eof:
                room = PIECE if self._end is None else min(PIECE, self._end - self._position)
                self._pending = os.pread(self._fd, room, self._position) if room > 0 else b""
                self._position += len(self._pending)
                self._eof = not self._pending
            out, used = self._iterate(self._pending, self._eof, wanted)
            self._pending = self._pending[used:]
            if self._eof and not out and not used and not self.done:
                raise RdiffError("%s stopped before its end" % self._what)
            if out:
                pieces.append(out)
                wanted -= len(out)
        return b"".join(pieces)

    def close(self) -> None:
        super().close()
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


class SignatureReader(_Reader):
    """The signature of an open file (descriptor ``fd``, owned from now on).

    With ``start``/``end`` (multiples of the block length), the signature
    entries of those bytes only, without the header when ``start`` > 0:
    pieces made so can be joined, in order, into the whole file's signature.
    """

    def __init__(self, fd: int, size: int, start: int = 0, end: int | None = None) -> None:
        self.block = block_size(size)
        self.strong = strong_length(size, self.block)
        super().__init__(_require().rs_sig_begin(self.block, self.strong, OUR_SIGNATURE_MAGIC),
                         "signature", fd, start, end)
        self._skip = SIGNATURE_HEADER if start else 0

    def read(self, n: int = PIECE) -> bytes:
        out = super().read(n + self._skip)
        if self._skip:
            out, self._skip = out[self._skip:], 0
        return out


SPLIT_SIGNATURE = 64 * 1024 * 1024
"""Files from this size are signed in two halves at once (two worker threads)."""


class SplitSignatureReader:
    """The signature of a big file made in two halves at once.

    :meth:`read` hands out the first half's signature as it is made; the
    second half's is made meanwhile by :meth:`make_second`, called from a
    second worker thread, and held (half a signature, at most a few MiB)
    until the first is out.  If no other thread has started it by then,
    :meth:`read` makes it itself: nothing ever waits on a job not running.
    """

    def __init__(self, fd: int, size: int) -> None:
        block = block_size(size)
        middle = (-(-size // block) // 2) * block
        self.block = block
        self.first = SignatureReader(fd, size, 0, middle)
        self.second = SignatureReader(os.dup(fd), size, middle, size)
        self._lock = threading.Lock()
        self._started = False
        self._made = threading.Event()
        self._second: bytes = b""
        self._error: BaseException | None = None
        self._position = 0

    def make_second(self) -> None:
        """Make the second half's signature (worker thread); at most once."""
        with self._lock:
            if self._started:
                return
            self._started = True
        try:
            pieces = []
            while data := self.second.read(PIECE):
                pieces.append(data)
            self._second = b"".join(pieces)
        except BaseException as e:
            self._error = e
        finally:
            self.second.close()
            self._made.set()

    def read(self, n: int = PIECE) -> bytes:
        if not self.first.done:
            out = self.first.read(n)
            if out:
                return out
        self.make_second()
        self._made.wait()
        if self._error is not None:
            raise RdiffError("signing the second half failed: %s" % self._error)
        out = self._second[self._position:self._position + n]
        self._position += len(out)
        return out

    def close(self) -> None:
        self.first.close()
        with self._lock:
            if not self._started:  # nobody will make it now
                self._started = True
                self.second.close()
                self._made.set()


class Signature:
    """A peer's signature, loaded and indexed, ready to make deltas against."""

    def __init__(self, handle: int, block: int) -> None:
        self._handle: int | None = handle
        self.block = block

    @property
    def handle(self) -> int:
        if self._handle is None:
            raise RdiffError("the signature was freed")
        return self._handle

    def close(self) -> None:
        handle, self._handle = self._handle, None
        if handle:
            _require().rs_free_sumset(handle)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


class SignatureLoader(_Job):
    """Takes a peer's signature piece by piece (:meth:`feed`), then :meth:`finish`.

    Refuses (RdiffError) a signature over ``limit`` bytes, one whose header
    is not an rdiff signature with sane block and strong sum lengths, and a
    truncated one.  The header is checked here before librsync sees it.
    """

    def __init__(self, limit: int = MAX_SIGNATURE_BYTES) -> None:
        self._sumset = ctypes.c_void_p()
        super().__init__(_require().rs_loadsig_begin(ctypes.byref(self._sumset)), "signature")
        self.limit = limit
        self.received = 0
        self.block = 0
        self._head = b""

    def feed(self, data: bytes) -> None:
        """Take the next bytes of the signature."""
        self.received += len(data)
        if self.received > self.limit:
            raise RdiffError("signature larger than %d bytes" % self.limit)
        data = bytes(data)
        if len(self._head) < SIGNATURE_HEADER:
            self._head += data[:SIGNATURE_HEADER - len(self._head)]
            if len(self._head) == SIGNATURE_HEADER:
                self._check_header(self._head)
        while data:
            if self.done:
                raise RdiffError("bytes after the end of the signature")
            _, used = self._iterate(data, False, PIECE)
            if not used:
                raise RdiffError("librsync stopped taking the signature")
            data = data[used:]

    def _check_header(self, head: bytes) -> None:
        magic, block, strong = struct.unpack(">III", head)
        if magic not in SIGNATURE_MAGICS:
            raise RdiffError("not an rdiff signature (magic %#x)" % magic)
        if not MIN_PEER_BLOCK <= block <= MAX_BLOCK:
            raise RdiffError("signature block length %d is outside %d..%d"
                             % (block, MIN_PEER_BLOCK, MAX_BLOCK))
        if not 1 <= strong <= 32:
            raise RdiffError("signature strong sum length %d is outside 1..32" % strong)
        self.block = block

    def finish(self) -> Signature:
        """The complete signature, indexed (RdiffError if truncated)."""
        if len(self._head) < SIGNATURE_HEADER:
            raise RdiffError("truncated signature (%d bytes)" % self.received)
        try:
            if not self.done:
                self._iterate(b"", True, PIECE)
        except RdiffError:
            raise RdiffError("truncated signature (%d bytes)" % self.received) from None
        if not self.done:
            raise RdiffError("truncated signature (%d bytes)" % self.received)
        self.close()
        handle = self._sumset.value
        if not handle:
            raise RdiffError("empty signature")
        signature = Signature(handle, self.block)
        result = _require().rs_build_hash_table(handle)
        if result != RS_DONE:
            signature.close()
            raise RdiffError("signature could not be indexed: %s" % _why(result))
        return signature


DELTA_SEGMENT = 128 * 1024 * 1024
"""The new file is delta'd in segments of about this size (a whole number of
blocks), each by its own librsync job, their commands joined into one delta.
librsync holds back a run of matching blocks until the run ends, so without
segments the receiver of a file changed in one place could patch only once
the sender had read to the end; with them it patches one segment while the
next is being made.  A block-aligned segment loses nothing; content shifted
by an insertion costs at most one block of literal bytes per segment."""


class DeltaReader:
    """The delta turning a peer's old file (its ``signature``) into ours (``fd``, owned).

    ``read(n)`` as a file's: the delta a piece at a time, b"" at its end;
    a piece ends early where a segment ends, so that a segment's commands
    (for an unchanged segment, a few bytes copying all of it) reach the
    receiver as soon as they are made, not once ``n`` bytes are.
    """

    def __init__(self, fd: int, signature: Signature, segment: int = DELTA_SEGMENT,
                 start: int = 0, end: int | None = None, last: bool = True,
                 own: bool = True) -> None:
        """With ``start``/``end``, the delta of those bytes only: without the
        magic when ``start`` > 0, without the final END unless ``last``, so the
        pieces made so join, in order, into the whole file's delta.  Without
        ``own`` the signature stays the caller's to free."""
        self.signature = signature  # freed with the reader (if ``own``), not before
        self._own = own
        self._fd = fd
        self._segment = max(1, segment // signature.block) * signature.block
        self._position = start
        self._end = end
        self._last = last
        self._first = start == 0
        self._tail = b""  # the last byte out so far: the END command if the segment ended
        self._file_eof = False
        self.done = False
        self._job: _Job | None = None
        self._start_segment()

    def _start_segment(self) -> None:
        self._job = _Job(_require().rs_delta_begin(self.signature.handle), "delta")
        self._left = self._segment
        self._skip = 0 if self._first else 4  # a later segment's magic goes
        self._pending = b""
        self._segment_eof = False

    def read(self, n: int = PIECE) -> bytes:
        """Up to ``n`` bytes of the delta (fewer at a segment's end); b"" once it is all out."""
        pieces: list[bytes] = []
        wanted = n
        while wanted > 0 and not self.done:
            job = self._job
            assert job is not None
            if not self._pending and not self._segment_eof:
                room = min(PIECE, self._left)
                if self._end is not None:
                    room = min(room, self._end - self._position)
                self._pending = os.pread(self._fd, room, self._position) if room > 0 else b""
                self._position += len(self._pending)
                self._left -= len(self._pending)
                self._file_eof = not self._pending
                self._segment_eof = self._file_eof or not self._left
            out, used = job._iterate(self._pending, self._segment_eof, min(wanted, PIECE))
            self._pending = self._pending[used:]
            if self._skip and out:
                cut = min(self._skip, len(out))
                out, self._skip = out[cut:], self._skip - cut
            if out:
                out = self._tail + out
                self._tail = out[-1:]
                pieces.append(out[:-1])
                wanted -= len(out) - 1
            if job.done:
                job.close()
                if self._file_eof:
                    if self._last:
                        pieces.append(self._tail)  # the END of the last segment ends the delta
                    elif self._tail != b"\0":
                        raise RdiffError("a delta segment did not end with END")
                    self.done = True
                else:
                    if self._tail != b"\0":
                        raise RdiffError("a delta segment did not end with END")
                    self._tail = b""
                    self._first = False
                    self._start_segment()
                    if pieces:  # what the segment decided goes out now, not with the next
                        break
            elif self._segment_eof and not out and not used:
                raise RdiffError("delta stopped before its end")
        return b"".join(pieces)

    def close(self) -> None:
        """Free the job, the file and the signature (idempotent)."""
        if self._job is not None:
            self._job.close()
            self._job = None
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)
        if self._own:
            self.signature.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


SPLIT_DELTA = 2 * DELTA_SEGMENT
"""Files from this size are delta'd by two worker threads at once, taking turns."""

SPLIT_DELTA_HELD = 16 * 1024 * 1024
"""Most bytes of delta the second thread makes ahead and holds until they are
sent; past it the reading thread makes the rest."""


def load_signature(data: bytes, limit: int = MAX_SIGNATURE_BYTES) -> Signature:
    """A whole signature at once (see :class:`SignatureLoader`)."""
    loader = SignatureLoader(limit)
    try:
        loader.feed(data)
        return loader.finish()
    finally:
        loader.close()


class SplitDeltaReader:
    """The delta of a big file made by two threads at once, segment by segment.

    The file is cut into segments (:data:`DELTA_SEGMENT`, a whole number
    of blocks), where the delta is cut into independent jobs anyway, so
    the result is byte for byte the one :class:`DeltaReader` makes.
    :meth:`read` makes the even segments' delta and hands out every
    segment's in order; :meth:`make_second`, called from a second worker
    thread, makes the odd segments' meanwhile and holds them (at most
    :data:`SPLIT_DELTA_HELD` bytes; past it, it stops, and :meth:`read`
    makes the rest itself).  Taking turns, rather than halves, hands the
    receiver the commands of the whole file at the pace of both threads,
    so its patching follows the sender closely instead of starting on the
    second half only once the first is out.  Each thread has its own copy
    of the peer's signature (``first``, ``second``: librsync jobs sharing
    one would share its counters).  Nothing ever waits on a job that is not
    running.
    """

    def __init__(self, fd: int, size: int, first: Signature, second: Signature,
                 segment: int | None = None) -> None:
        segment = segment or DELTA_SEGMENT
        step = max(1, segment // first.block) * first.block
        self._bounds = [(at, min(at + step, size)) for at in range(0, max(size, 1), step)]
        self._step = step
        self.signature = first
        self.second_signature = second
        self._fd = fd
        self._cond = threading.Condition()
        self._started = False
        self._closed = False
        self._helper_at: int | None = None  # the segment the second thread is making
        self._reader_at = -1  # the segment read() is at (the second thread skips those)
        self._held: dict[int, list[bytes]] = {}  # segment -> its whole delta
        self._partial: dict[int, tuple[list[bytes], DeltaReader]] = {}  # stopped at the bound
        self._held_bytes = 0
        self._error: BaseException | None = None
        self._current: DeltaReader | None = None
        self._pending: list[bytes] = []  # held pieces of the current segment not yet out
        self._index = 0  # the segment being handed out
        self._opened = False  # whether _index is set up (_current or _pending)
        self.done = False

    def _segment_reader(self, index: int, signature: Signature) -> DeltaReader:
        start, end = self._bounds[index]
        return DeltaReader(os.dup(self._fd), signature, self._step, start, end,
                           last=index == len(self._bounds) - 1, own=False)

    def make_second(self) -> None:
        """Make the odd segments' delta (worker thread); at most once."""
        with self._cond:
            if self._started:
                return
            self._started = True
        try:
            for index in range(1, len(self._bounds), 2):
                with self._cond:
                    if self._closed or self._held_bytes >= SPLIT_DELTA_HELD:
                        break
                    if index <= self._reader_at:
                        continue  # read() got there first and makes it itself
                    self._helper_at = index
                reader = self._segment_reader(index, self.second_signature)
                pieces: list[bytes] = []
                while not self._closed:
                    data = reader.read(PIECE)
                    if not data:
                        break
                    pieces.append(data)
                    with self._cond:
                        self._held_bytes += len(data)
                        full = self._held_bytes >= SPLIT_DELTA_HELD
                    if full and not reader.done:
                        break
                with self._cond:
                    if reader.done:
                        reader.close()
                        self._held[index] = pieces
                    else:  # stopped at the bound (or closed): read() goes on from here
                        self._partial[index] = (pieces, reader)
                    self._helper_at = None
                    self._cond.notify_all()
                if not reader.done:
                    break
        except BaseException as e:
            with self._cond:
                self._error = e
        finally:
            with self._cond:
                self._helper_at = None
                self._started = True
                self._cond.notify_all()

    def _open_next(self) -> None:
        """Set up the segment at ``_index``: ours to make, or the second thread's output."""
        index = self._index
        with self._cond:
            self._reader_at = index
            while self._helper_at == index:  # being made right now: wait for it
                self._cond.wait()
            if self._error is not None:
                raise RdiffError("the second thread's delta failed: %s" % self._error)
            if index in self._held:
                self._pending = self._held.pop(index)
                self._held_bytes -= sum(map(len, self._pending))
                return
            if index in self._partial:
                self._pending, self._current = self._partial.pop(index)
                self._held_bytes -= sum(map(len, self._pending))
                return
        # Ours (even), or an odd one the second thread never reached and now skips:
        # made here, with the signature only this thread uses.
        self._current = self._segment_reader(index, self.signature)

    def read(self, n: int = PIECE) -> bytes:
        """Up to ``n`` bytes of the delta, in order (fewer at a segment's end); b"" at its end."""
        while not self.done:
            if not self._opened:
                self._open_next()
                self._opened = True
            if self._pending:
                first = self._pending[0]
                if len(first) > n:
                    self._pending[0] = first[n:]
                    return first[:n]
                self._pending.pop(0)
                return first
            if self._current is not None:
                out = self._current.read(n)
                if out:
                    return out
                self._current.close()
                self._current = None
            self._opened = False
            self._index += 1
            self.done = self._index >= len(self._bounds)
        return b""

    def close(self) -> None:
        """Free everything (idempotent); waits for the second thread's segment to stop."""
        with self._cond:
            self._closed = True
            started, self._started = self._started, True
            while started and self._helper_at is not None:  # it stops within a piece
                self._cond.wait()
            partial, self._partial = self._partial, {}
            self._held = {}
        for _, reader in partial.values():
            reader.close()
        if self._current is not None:
            self._current.close()
            self._current = None
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)
        self.signature.close()
        self.second_signature.close()


class Patcher(_Job):
    """Applies a delta, fed a piece at a time (:meth:`feed`), to an old file.

    ``old_fd`` is read (never past its end), the result written to
    ``out_fd`` and hashed (:attr:`hasher`, :attr:`written`).  RdiffError for
    a delta that is not rdiff, copies from beyond the end of the old file,
    would write more than ``limit`` bytes (nothing past ``limit`` is ever
    written), ends inside a command (:meth:`finish`) or goes on after its
    end.  Descriptors stay the caller's.
    """

    def __init__(self, old_fd: int, out_fd: int, limit: int,
                 wrote: Callable[[int], None] | None = None) -> None:
        """``wrote(total)`` is called after each write with the bytes written so far."""
        self._wrote = wrote
        self._old_fd = old_fd
        self._out_fd = out_fd
        self.limit = limit
        self.old_size = os.fstat(old_fd).st_size
        self.hasher: Any = hashlib.sha256()
        self.written = 0
        self._head = b""
        self._trouble: list[str] = []
        self._callback = _COPY_CB(self._copy)  # kept alive as long as the job
        super().__init__(_require().rs_patch_begin(self._callback, None), "patch")

    def _copy(self, _opaque: int, pos: int, length_p: Any, buf_p: Any) -> int:
        length = length_p[0]
        if pos < 0 or pos + length > self.old_size:
            self._trouble.append("the delta copies bytes %d..%d of an old file of %d bytes"
                                 % (pos, pos + length, self.old_size))
            return RS_CORRUPT
        # Read straight into librsync's output buffer: no copy in between.
        target = memoryview((ctypes.c_char * length).from_address(buf_p[0])).cast("B")
        done = 0
        while done < length:
            got = os.preadv(self._old_fd, [target[done:]], pos + done)
            if not got:
                self._trouble.append("the old file shrank while patching")
                return RS_CORRUPT
            done += got
        return RS_DONE

    def feed(self, data: bytes, eof: bool = False) -> None:
        """Apply the next bytes of the delta (``eof``: there are no more)."""
        data = bytes(data)
        if len(self._head) < 4:
            self._head += data[:4 - len(self._head)]
            if len(self._head) == 4 and struct.unpack(">I", self._head)[0] != DELTA_MAGIC:
                raise RdiffError("not an rdiff delta")
            if eof and len(self._head) < 4:
                raise RdiffError("not an rdiff delta")
        while not self.done:
            try:
                out, used = self._iterate(data, eof, PIECE, copy_out=False)
            except RdiffError as e:
                raise RdiffError(self._trouble[0] if self._trouble else
                                 "truncated delta" if eof else str(e)) from None
            data = data[used:]
            if out:
                self.written += len(out)
                if self.written > self.limit:
                    raise RdiffError("the delta makes more than %d bytes" % self.limit)
                self.hasher.update(out)
                view = out
                while view:
                    view = view[os.write(self._out_fd, view):]
                if self._wrote is not None:
                    self._wrote(self.written)
            elif not used:
                if eof:
                    raise RdiffError("truncated delta")
                if data:
                    raise RdiffError("librsync stopped taking the delta")
                break
        if data:
            raise RdiffError("bytes after the end of the delta")

    def finish(self) -> tuple[Any, int]:
        """The delta is all fed: (SHA-256 hasher of the result, its byte count)."""
        self.feed(b"", eof=True)
        self.close()
        return self.hasher, self.written


def patch_file(old_fd: int, delta_fd: int, out_fd: int, limit: int) -> tuple[Any, int]:
    """Apply the whole delta read from ``delta_fd`` (see :class:`Patcher`).

    Returns (SHA-256 hasher of what was written, its byte count).
    """
    patcher = Patcher(old_fd, out_fd, limit)
    try:
        while data := os.read(delta_fd, PIECE):
            patcher.feed(data)
        return patcher.finish()
    finally:
        patcher.close()


__all__ = [
    "LIBRARY_VARIABLE", "AVAILABLE", "DELTA_MAGIC", "SIGNATURE_MAGICS", "OUR_SIGNATURE_MAGIC", "MIN_BLOCK",
    "MAX_BLOCK", "MIN_PEER_BLOCK", "MAX_SIGNATURE_BYTES", "MAX_OLD_SIZE", "PIECE",
    "RdiffError", "block_size", "strong_length", "signature_size", "SignatureReader",
    "SPLIT_SIGNATURE", "SplitSignatureReader", "SignatureLoader",
    "Signature", "DELTA_SEGMENT", "DeltaReader", "SPLIT_DELTA", "SPLIT_DELTA_HELD",
    "load_signature", "SplitDeltaReader", "Patcher", "patch_file",
]
