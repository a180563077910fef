"""Sans-IO framing of the ``gzip`` extension (see ``protocol/gzip.md``).

Once both sides of a connection listed ``gzip``, everything after the switch
to TLS travels in *frames*: ASCII decimal length, ``:``, that many bytes of
one zlib stream (RFC 1950) per direction.  Each frame ends with a sync flush,
so the receiver can inflate all of it as soon as it has arrived.  What the
frames carry, once inflated, is the ordinary wire stream of
``protocol/wire.md`` (message lines, signature lines, payload chunks), cut
wherever the sender cut it.

:class:`FrameEncoder` turns bytes to send into frames; payload bytes that do
not compress (judged from a sample, :func:`compressible`) go into stored
deflate blocks, which cost a copy instead of a compression.
:class:`FrameDecoder` turns received frames back into the wire stream, at
most ``step`` inflated bytes at a time, so a small frame that inflates to a
huge one (a zip bomb) never sits in memory whole: the wire decoder downstream
refuses an over-long line or chunk, and a frame may not inflate past
:data:`MAX_INFLATED_FRAME`.  Nothing here touches sockets or the reactor.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable, Sequence

from clearskies.errors import WireError
from clearskies.wire import MAX_LINE_LENGTH

__all__ = [
    "GZIP", "CODECS", "MAX_FRAME", "MAX_INFLATED_FRAME", "MAX_FRAME_DIGITS", "SEND_FRAME",
    "INFLATE_STEP", "LEVEL", "SAMPLE_BYTES", "SAMPLE_MIN", "DISTINCT_PROBE",
    "DISTINCT_LIMIT", "MIN_SAVING", "choose", "compressible", "FrameEncoder", "FrameDecoder",
    "FIRST_BYTES", "EPOCH", "WARMUP", "IDLE_GAP", "MIN_GAIN", "FIRST_HOLD", "MAX_HOLD",
    "SendPolicy",
]

GZIP = "gzip"
"""The feature string of the draft's compression extension."""

CODECS: tuple[str, ...] = (GZIP,)
"""Compression feature strings we can speak, most preferred first."""

MAX_INFLATED_FRAME = MAX_LINE_LENGTH + 64 * 1024
"""Most wire-stream bytes one frame may inflate to.

A sender that frames a whole message line (at most 16 MiB) or a whole
payload chunk with its header (16 MiB and 10 bytes) stays below it; we send
frames of at most :data:`SEND_FRAME`.  Beyond it a frame is refused as a zip
bomb, whatever the wire decoder would say about its content."""

MAX_FRAME = MAX_INFLATED_FRAME + 64 * 1024
"""Most compressed bytes one frame may hold (stored blocks add 5 bytes per 64 KiB)."""

MAX_FRAME_DIGITS = 9
"""A frame's length prefix is 1 to 9 ASCII digits (like a payload chunk header)."""

SEND_FRAME = 1024 * 1024
"""Most wire-stream bytes we put into one frame (a bigger write becomes several)."""

INFLATE_STEP = 256 * 1024
"""Most inflated bytes :meth:`FrameDecoder.next_piece` returns at once.

The connection hands each piece to the wire decoder and drains its events
before inflating more, and stops inflating while reading is paused: memory
stays at about one line plus one step, however well a frame compresses."""

LEVEL = 1
"""zlib level we compress with: the fastest.  Level 6 costs about 3x the CPU for
about a fifth fewer bytes on source code (bench/README.md, "Compression")."""

SAMPLE_MIN = 4096
"""Writes shorter than this are always compressed (messages, chunk headers)."""

DISTINCT_PROBE = 512
"""Bytes from the start of a write whose distinct values are counted first."""

DISTINCT_LIMIT = 200
"""That many distinct values among :data:`DISTINCT_PROBE` bytes means random-looking
data (random bytes give about 221, text about 60): sent stored, without a trial."""

SAMPLE_BYTES = 4096
"""Bytes from the start of a write compressed on trial when the probe is not decisive."""

MIN_SAVING = 0.125
"""The trial must save at least this fraction, or the write is sent stored."""

_STORED_MAX = 0xFFFF  # deflate stored block limit


def choose(features: Sequence[str]) -> str | None:
    """The compression codec a connection uses, given the negotiated features."""
    for codec in CODECS:
        if codec in features:
            return codec
    return None


_SAMPLER = zlib.compressobj(LEVEL)


def compressible(data: bytes | memoryview) -> bool:
    """Whether ``data`` looks worth compressing, judged from its first bytes.

    Cheap first: a probe with nearly every byte value distinct is taken as
    already compressed or encrypted.  Otherwise a few KiB are compressed on
    trial (with a compressor kept between calls; a full flush forgets the
    previous trial), and the write is compressed if the trial saved at
    least :data:`MIN_SAVING`.
    """
    if len(data) < SAMPLE_MIN:
        return True
    probe = bytes(data[:DISTINCT_PROBE])
    if len(set(probe)) >= DISTINCT_LIMIT:
        return False
    sample = bytes(data[:SAMPLE_BYTES])
    trial = len(_SAMPLER.compress(sample)) + len(_SAMPLER.flush(zlib.Z_FULL_FLUSH))
    return trial <= len(sample) * (1 - MIN_SAVING)


def _stored_blocks(data: memoryview) -> list[bytes | memoryview]:
    """``data`` as non-final stored deflate blocks (the stream must be byte-aligned)."""
    parts: list[bytes | memoryview] = []
    for offset in range(0, len(data), _STORED_MAX):
        piece = data[offset:offset + _STORED_MAX]
        # BFINAL=0, BTYPE=00, padded to the byte; LEN and its complement, little-endian.
        parts.append(struct.pack("<BHH", 0, len(piece), len(piece) ^ 0xFFFF))
        parts.append(piece)
    return parts


class FrameEncoder:
    """One direction's zlib stream, cut into frames.

    Each :meth:`encode` call returns whole frames that, inflated, give back
    the bytes passed in.  Compressed frames end with a sync flush.  Bytes that
    :func:`compressible` refuses are written as stored blocks after a full
    flush: the compressor then never refers back past the stored bytes,
    which it does not know about, so its back-references stay valid for the
    receiver, whose history holds them.
    """

    def __init__(self, level: int = LEVEL, frame_size: int = SEND_FRAME) -> None:
        self._zlib = zlib.compressobj(level)
        self.frame_size = frame_size
        """Most wire-stream bytes put into one frame."""
        self._clean = False  # no input since the last full flush (and the header is out)
        self._dirty = False  # input given to the compressor since its last flush
        self.bytes_in = 0
        """Wire-stream bytes encoded so far."""
        self.bytes_out = 0
        """Frame bytes produced so far (prefixes included)."""
        self.bytes_stored = 0
        """Of ``bytes_in``, those sent in stored blocks."""

    def encode(self, data: bytes | memoryview, sample: bool = True, store: bool = False) -> bytes:
        """Frames carrying ``data``; with ``sample`` False it is compressed whatever it is."""
        return self.encode_many([data], sample, store)

    def encode_many(self, writes: Sequence[bytes | memoryview], sample: bool = True,
                    store: bool = False) -> bytes:
        """Frames carrying ``writes`` one after the other, as few as ``frame_size`` allows.

        Each write is judged on its own (:func:`compressible`); a frame ends
        with a sync flush, or right after stored blocks (already aligned).
        With ``store`` True, writes of :data:`SAMPLE_MIN` bytes or more go
        stored without a sample (the link is not the bottleneck: see
        :class:`SendPolicy`); shorter ones are still compressed.
        """
        out: list[bytes | memoryview] = []
        body: list[bytes | memoryview] = []
        carried = 0  # wire-stream bytes in the frame being built
        for data in writes:
            with memoryview(data) as view:
                for offset in range(0, len(view), self.frame_size):
                    piece = view[offset:offset + self.frame_size]
                    if carried and carried + len(piece) > self.frame_size:
                        self._close_frame(body, out)
                        carried = 0
                    if len(piece) >= SAMPLE_MIN and (
                            store or (sample and not compressible(piece))):
                        if not self._clean:
                            # Also writes the zlib header when nothing was sent yet.
                            body.append(self._zlib.flush(zlib.Z_FULL_FLUSH))
                            self._clean = True
                            self._dirty = False
                        body.extend(_stored_blocks(piece))
                        self.bytes_stored += len(piece)
                    else:
                        body.append(self._zlib.compress(piece))
                        self._clean = False
                        self._dirty = True
                    carried += len(piece)
            self.bytes_in += len(data)
        if body:
            self._close_frame(body, out)
        # One copy of the data, into the frames returned.
        frames = b"".join(out)
        self.bytes_out += len(frames)
        return frames

    def _close_frame(self, body: list[bytes | memoryview], out: list[bytes | memoryview]) -> None:
        """Move ``body`` into ``out`` as one frame, flushed so that all of it decodes."""
        if self._dirty:
            body.append(self._zlib.flush(zlib.Z_SYNC_FLUSH))
            self._dirty = False
        out.append(b"%d:" % sum(len(part) for part in body))
        out.extend(body)
        body.clear()


# Decoder states.
_PREFIX = "prefix"  # reading the ASCII length and ':'
_BODY = "body"      # inside a frame, `_remaining` compressed bytes still to come


class FrameDecoder:
    """Received frames in, the inflated wire stream out, a bounded piece at a time.

    Call :meth:`receive_data` with what arrived, then :meth:`next_piece`
    until it returns ``None``.  Any violation (a bad prefix, a frame over
    :data:`MAX_FRAME`, data zlib refuses, a frame inflating past
    :data:`MAX_INFLATED_FRAME`) raises :class:`~clearskies.errors.WireError`;
    the decoder then stays broken.  A zlib stream that ends at a frame's end
    is followed by a new one (a sender may compress each frame on its own).
    """

    def __init__(self, max_frame: int = MAX_FRAME,
                 max_inflated: int = MAX_INFLATED_FRAME, step: int = INFLATE_STEP) -> None:
        if not 1 <= max_frame <= 10 ** MAX_FRAME_DIGITS - 1:
            raise ValueError("max_frame must fit in 1 to %d digits" % (MAX_FRAME_DIGITS,))
        self._max_frame = max_frame
        self._max_inflated = max_inflated
        self._step = step
        self._zlib = zlib.decompressobj()
        # Unprocessed input is self._buf[self._pos:] (the caller's bytes while nothing
        # was left over, so a frame's body is inflated without a copy).
        self._buf = b""
        self._pos = 0
        self._state = _PREFIX
        self._remaining = 0
        self._inflated = 0  # of the current frame
        self._full = False  # the last inflate filled its step
        self._error: WireError | None = None
        self.bytes_in = 0
        """Frame bytes received so far."""
        self.bytes_out = 0
        """Inflated bytes handed on so far."""

    @property
    def buffered(self) -> int:
        """Compressed bytes received and not yet inflated."""
        return len(self._buf) - self._pos + len(self._zlib.unconsumed_tail)

    @property
    def at_frame_boundary(self) -> bool:
        """False while a frame is only partly received (a connection cut mid-frame)."""
        return self._state is _PREFIX and self._pos >= len(self._buf)

    def receive_data(self, data: bytes) -> None:
        self._check_usable()
        self.bytes_in += len(data)
        if self._pos >= len(self._buf):
            self._buf = bytes(data)
        else:
            self._buf = self._buf[self._pos:] + data
        self._pos = 0

    def next_piece(self) -> bytes | None:
        """Up to ``step`` bytes of the wire stream, or None when more input is needed."""
        self._check_usable()
        try:
            return self._next_piece()
        except WireError as e:
            self._error = e
            self._buf = b""
            self._pos = 0
            raise

    def _check_usable(self) -> None:
        if self._error is not None:
            raise WireError("compressed stream already failed: %s" % (self._error,))

    def _next_piece(self) -> bytes | None:
        # Output of several frames is gathered into one piece (a small file's frames
        # all arrive together): one hand-over to the wire decoder instead of several.
        pieces: list[bytes] = []
        size = 0
        while size < self._step:
            out = self._inflate_some(self._step - size)
            if out is None:
                break
            if out:
                pieces.append(out)
                size += len(out)
        if not pieces:
            return None
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def _inflate_some(self, limit: int) -> bytes | None:
        """At most ``limit`` more inflated bytes (maybe none); None when input is needed."""
        tail = self._zlib.unconsumed_tail
        if tail or self._full:
            # Input zlib kept back, or output it may hold after a full step.
            return self._inflate(tail, limit)
        if self._state is _PREFIX:
            return b"" if self._prefix() else None
        if not self._remaining:
            self._end_frame()
            return b""
        available = len(self._buf) - self._pos
        if not available:
            return None
        take = min(available, self._remaining)
        with memoryview(self._buf) as view:
            data = view[self._pos:self._pos + take]
            self._pos += take
            self._remaining -= take
            return self._inflate(data, limit)

    def _prefix(self) -> bool:
        """Consume one length prefix; False if it has not fully arrived."""
        buf, pos = self._buf, self._pos
        end = buf.find(b":", pos, pos + MAX_FRAME_DIGITS + 1)
        if end < 0:
            window = buf[pos:pos + MAX_FRAME_DIGITS + 1]
            if window and not window.isdigit():
                raise WireError("compressed frame does not start with an ASCII length")
            if len(buf) - pos > MAX_FRAME_DIGITS:
                raise WireError("compressed frame length longer than %d digits"
                                % (MAX_FRAME_DIGITS,))
            return False
        digits = buf[pos:end]
        if not digits.isdigit():
            raise WireError("compressed frame length is not 1 to %d ASCII digits"
                            % (MAX_FRAME_DIGITS,))
        size = int(digits)
        if size > self._max_frame:
            raise WireError("compressed frame of %d bytes is over the limit of %d"
                            % (size, self._max_frame))
        self._pos = end + 1
        self._state = _BODY
        self._remaining = size
        self._inflated = 0
        return True

    def _inflate(self, data: bytes | memoryview, limit: int) -> bytes:
        try:
            out = self._zlib.decompress(data, limit)
        except zlib.error as e:
            raise WireError("compressed data is corrupt (%s)" % (e,)) from None
        self._full = len(out) >= limit
        self._inflated += len(out)
        if self._inflated > self._max_inflated:
            raise WireError("a compressed frame inflates past %d bytes (a zip bomb?)"
                            % (self._max_inflated,))
        if self._zlib.eof:
            rest = self._zlib.unused_data
            self._zlib = zlib.decompressobj()
            if rest:
                # Another stream right behind the one that ended, in the same frame.
                self._buf = rest + self._buf[self._pos:]
                self._pos = 0
                self._remaining += len(rest)
        self.bytes_out += len(out)
        return out

    def _end_frame(self) -> None:
        self._state = _PREFIX



FIRST_BYTES = 4 * 1024 * 1024
"""A connection's first bulk bytes (manifests, a few files) are compressed unmeasured:
cheap, and what a small sync over a slow link needs."""

EPOCH = 0.5
"""Seconds of sending in one mode per measurement, warm-up included."""

WARMUP = 0.25
"""The start of each epoch is not counted: the socket buffers still drain what the
other mode wrote (compressed data in them makes a switch to stored look slow, and
stored data in them makes a switch to compressing look fast)."""

IDLE_GAP = 0.05
"""A pause between writes longer than this, with no push-back from the connection,
means the sender had nothing to send: the measurement starts over."""

MIN_GAIN = 1.5
"""Compressing must move this many times the bytes per second of sending stored
to be chosen.  Where the link is the bottleneck, text gains 3 to 5 times; where
the receiver is, compressing gains nothing but looks a little faster for a while
(its smaller bytes fill the buffers with more data), and costs CPU on both sides."""

FIRST_HOLD = 16
"""Epochs the better mode is kept before the other is tried again."""

MAX_HOLD = 120
"""Most epochs between two tries; the hold doubles each time the try loses."""


class SendPolicy:
    """Whether bulk writes should be compressed now: only while that is faster.

    Compressing pays only while the connection is the bottleneck: on a link
    that drains faster than zlib compresses (loopback, a fast LAN), or when
    the receiver is slower than the link, it only makes sending slower.  So
    the sender measures.  After the first :data:`FIRST_BYTES`, compressed,
    time is cut into epochs of :data:`EPOCH` seconds of sending; in each,
    one mode is used (compressing bulk writes, or sending them stored) and,
    after :data:`WARMUP`, the bytes written per second are counted (before
    framing: the wire stream, which is what a user waits for; a write is
    accepted only as fast as the connection drains, since the producer is
    paused meanwhile).  Stored is measured first, then compressing; the
    faster mode (compressing must be :data:`MIN_GAIN` times faster) is kept
    for :data:`FIRST_HOLD` epochs, after which the other is tried for one
    epoch; a try that loses doubles the hold (up to :data:`MAX_HOLD`), a
    try that wins switches.

    Call :meth:`wrote` before each write with its size, :meth:`pushed_back`
    whenever the connection pauses its producer, and read
    :attr:`compressing`.  Pure: ``clock`` returns seconds.
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self.compressing = True
        """Whether bulk writes are compressed now."""
        self.rates: dict[bool, float | None] = {True: None, False: None}
        """Bytes per second last measured with compression (True) and without (False)."""
        self.switches = 0
        """How often the decision changed (tries not counted)."""
        self._first: int | None = FIRST_BYTES
        self._hold = FIRST_HOLD
        self._left = 0  # epochs the current mode is still kept; 0 while trying
        self._start: float | None = None  # of the epoch
        self._counted: float | None = None  # when counting began (after the warm-up)
        self._last = 0.0
        self._bytes = 0
        self._pushed = False
        self._decided: bool | None = None

    def pushed_back(self) -> None:
        """The connection paused its producer: its buffer is full, the link is busy."""
        self._pushed = True

    def wrote(self, count: int) -> None:
        """``count`` bytes are about to be written in the current mode."""
        if self._first is not None:
            if self._first > 0:
                self._first -= count  # this write is still compressed
                return
            self._first = None
            self.compressing = False  # measure stored first
        now = self._clock()
        if self._start is None or (now - self._last > IDLE_GAP and not self._pushed):
            # Nothing was waiting to be sent: the gap says nothing about the link.
            self._start = now
            self._counted = None
        elif self._counted is None:
            if now - self._start >= WARMUP:
                self._counted = now
                self._bytes = 0
        else:
            self._bytes += count
        self._last = now
        self._pushed = False
        if self._counted is not None and now - self._start >= EPOCH and now > self._counted:
            self._end_epoch(self._bytes / (now - self._counted))
            self._start = now
            self._counted = None

    def _end_epoch(self, rate: float) -> None:
        mode = self.compressing
        known = self.rates[mode]
        if self._left and known is not None:
            self.rates[mode] = (known + rate) / 2  # the kept mode: a running mean
        else:
            self.rates[mode] = rate
        other = self.rates[not mode]
        if other is None:
            self.compressing = not mode  # the first measurement: try the other mode
            return
        if self._left:
            self._left -= 1
            if not self._left:
                self.compressing = not mode
            return
        # A try just ended: decide.
        compressed, stored = self.rates[True], self.rates[False]
        assert compressed is not None and stored is not None
        best = compressed >= stored * MIN_GAIN
        if best == mode:
            self._hold = FIRST_HOLD
        else:
            self._hold = min(self._hold * 2, MAX_HOLD)
        if self._decided is not None and best != self._decided:
            self.switches += 1
        self._decided = best
        self.compressing = best
        self._left = self._hold
