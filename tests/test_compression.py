"""The ``gzip`` extension's framing (protocol/gzip.md), without I/O: round trips cut
anywhere, incompressible data sent stored, and hostile frames (zip bombs, garbage,
truncation, over-long prefixes) refused."""

from __future__ import annotations

import os
import random
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clearskies import compression
from clearskies.compression import (
    GZIP, INFLATE_STEP, MAX_FRAME, MAX_INFLATED_FRAME, SEND_FRAME, FrameDecoder,
    FrameEncoder, choose, compressible,
)
from clearskies.errors import WireError
from clearskies.wire import (
    SESSION_TYPE_LIMITS, Message, PayloadChunk, PayloadEnd, WireDecoder, encode,
    encode_with_payload,
)

SOURCE = b"".join(
    b"def function_%d(value):\n    return value * %d  # a comment about %d\n" % (n, n, n % 7)
    for n in range(4000))


def inflate_all(decoder: FrameDecoder, data: bytes, cut: int = 0) -> bytes:
    """Feed ``data`` (in pieces of ``cut`` bytes, or whole) and collect the stream."""
    out = []
    step = cut or len(data) or 1
    for offset in range(0, len(data), step):
        decoder.receive_data(data[offset:offset + step])
        while (piece := decoder.next_piece()) is not None:
            out.append(piece)
    return b"".join(out)


def frame(body: bytes) -> bytes:
    return b"%d:%s" % (len(body), body)


def test_round_trip_of_messages_and_payloads():
    """What goes into the encoder comes out of the decoder, text and random bytes alike."""
    writes = [encode({"type": "identity", "name": "box", "time": 1}), SOURCE,
              os.urandom(200_000), b"7\n", b"abcdefg", b"0\n", SOURCE[:100]]
    encoder = FrameEncoder()
    data = b"".join(encoder.encode(w) for w in writes)
    assert inflate_all(FrameDecoder(), data, cut=1000) == b"".join(writes)


@settings(max_examples=60, deadline=None)
@given(writes=st.lists(st.binary(max_size=3000) | st.sampled_from([SOURCE[:5000], b"x" * 9000]),
                       max_size=12),
       cut=st.integers(min_value=1, max_value=4096))
def test_round_trip_cut_anywhere(writes, cut):
    """The stream survives the network cutting frames at any byte."""
    encoder = FrameEncoder()
    data = b"".join(encoder.encode(w) for w in writes)
    assert inflate_all(FrameDecoder(), data, cut) == b"".join(writes)


def test_every_write_is_whole_frames_that_end_with_a_sync_flush():
    """Each encode() call returns frames the receiver can inflate at once, in full."""
    encoder = FrameEncoder()
    decoder = FrameDecoder()
    for write in (b'{"type":"get_manifest"}\n', SOURCE, os.urandom(5000), b"tail\n"):
        assert inflate_all(decoder, encoder.encode(write)) == write
        assert decoder.at_frame_boundary


def test_compressible_text_shrinks():
    """Source-code text travels in a fraction of its size."""
    encoder = FrameEncoder()
    sent = encoder.encode(SOURCE)
    assert len(sent) < len(SOURCE) / 4
    assert encoder.bytes_stored == 0


def test_random_payload_is_sent_stored_not_compressed():
    """Random data is recognised from its first bytes and sent in stored blocks (a few
    bytes of overhead), never through the compressor."""
    data = os.urandom(SEND_FRAME)
    encoder = FrameEncoder()
    sent = encoder.encode(data)
    assert encoder.bytes_stored == len(data)
    assert len(data) < len(sent) < len(data) * 1.001
    assert not compressible(data)
    assert compressible(SOURCE)
    assert compressible(b"\x00" * 100_000)
    assert compressible(os.urandom(100))  # small writes are always compressed


def test_stored_blocks_between_compressed_frames_keep_back_references_valid():
    """After stored bytes the compressor must not refer back past them: text repeated
    around a random block still inflates exactly."""
    encoder = FrameEncoder()
    noise = os.urandom(70_000)
    writes = [SOURCE[:8000], noise, SOURCE[:8000], noise, SOURCE[:8000]]
    data = b"".join(encoder.encode(w) for w in writes)
    assert encoder.bytes_stored == 2 * len(noise)
    assert inflate_all(FrameDecoder(), data, 333) == b"".join(writes)


def test_a_big_write_becomes_several_frames():
    """No frame carries more than SEND_FRAME bytes of stream."""
    encoder = FrameEncoder()
    data = encoder.encode(b"a" * (3 * SEND_FRAME + 5))
    decoder = FrameDecoder(max_inflated=SEND_FRAME)
    assert inflate_all(decoder, data) == b"a" * (3 * SEND_FRAME + 5)


def test_a_stream_per_frame_is_accepted_too():
    """A sender that compresses each frame as a whole zlib stream is understood."""
    writes = [encode({"type": "ping", "timeout": 60}), SOURCE, b"end\n"]
    data = b"".join(frame(zlib.compress(w)) for w in writes)
    assert inflate_all(FrameDecoder(), data, 100) == b"".join(writes)


def test_empty_frames_carry_nothing():
    """``0:`` is harmless."""
    encoder = FrameEncoder()
    data = b"0:" + encoder.encode(b"hi\n") + b"0:0:"
    decoder = FrameDecoder()
    assert inflate_all(decoder, data) == b"hi\n"
    assert decoder.at_frame_boundary


def test_codec_choice():
    """gzip is used only when negotiated."""
    assert choose(("vv", GZIP)) == GZIP
    assert choose(("vv", "progress")) is None
    assert choose(()) is None


# -- hostile input ------------------------------------------------------------------------


def bomb(size: int) -> bytes:
    """A zlib stream (sync-flushed, unfinished) inflating to ``size`` zero bytes."""
    z = zlib.compressobj(9)
    out = [z.compress(b"\0" * min(size, 1 << 20)) for _ in range(size >> 20)]
    out.append(z.compress(b"\0" * (size & ((1 << 20) - 1))))
    return b"".join(out) + z.flush(zlib.Z_SYNC_FLUSH)


def test_zip_bomb_frame_is_refused_while_inflating_in_steps():
    """A 100 KB frame inflating to 100 MB is refused once it passes the frame limit;
    no piece handed on is ever bigger than one step."""
    body = bomb(100 * 1024 * 1024)
    assert len(body) < 200_000
    decoder = FrameDecoder()
    decoder.receive_data(frame(body))
    seen = 0
    with pytest.raises(WireError, match="zip bomb"):
        while (piece := decoder.next_piece()) is not None:
            assert len(piece) <= INFLATE_STEP
            seen += len(piece)
    assert seen <= MAX_INFLATED_FRAME
    with pytest.raises(WireError):
        decoder.next_piece()  # stays broken


def test_zip_bomb_line_is_refused_by_the_wire_decoder():
    """A bomb inflating to one endless line stops at the line limit of its message type,
    with at most one step of it ever held."""
    z = zlib.compressobj(9)
    body = z.compress(b'{"type":"get","path":"' + b"a" * (8 * 1024 * 1024)) \
        + z.flush(zlib.Z_SYNC_FLUSH)
    frames = FrameDecoder()
    frames.receive_data(frame(body))
    wire = WireDecoder(type_limits=SESSION_TYPE_LIMITS)
    fed = 0
    with pytest.raises(WireError, match="over the"):
        while (piece := frames.next_piece()) is not None:
            fed += len(piece)
            wire.receive_data(piece)
            list(wire.events())
    assert fed <= 2 * INFLATE_STEP


def test_zip_bomb_payload_flows_in_steps_without_piling_up():
    """Zeros in payload chunks are legitimate (a sparse file); they come out one step at a
    time, so the receiver's pause can take effect between steps."""
    stream = encode_with_payload({"type": "file_data", "path": "z"}, b"\0" * (5 << 20))
    frames = FrameDecoder()
    frames.receive_data(frame(zlib.compress(stream, 9)))
    wire = WireDecoder(type_limits=SESSION_TYPE_LIMITS)
    events = []
    while (piece := frames.next_piece()) is not None:
        assert len(piece) <= INFLATE_STEP
        wire.receive_data(piece)
        events.extend(wire.events())
    assert isinstance(events[0], Message)
    assert sum(len(e.data) for e in events if isinstance(e, PayloadChunk)) == 5 << 20
    assert isinstance(events[-1], PayloadEnd)


@pytest.mark.parametrize("data, message", [
    (b"x:abc", "not 1 to 9 ASCII digits"),
    (b"xyz", "does not start with an ASCII length"),
    (b":abc", "not 1 to 9 ASCII digits"),
    (b"-5:abc", "not 1 to 9 ASCII digits"),
    (b"1234567890:", "longer than 9 digits"),
    (b"12 :ab", "not 1 to 9 ASCII digits"),
    (b"%d:" % (MAX_FRAME + 1), "over the limit"),
    (b"999999999:", "over the limit"),
    (frame(b"\x78\x9cgarbage that is not deflate"), "corrupt"),
    (frame(b"\x00\x01\x02\x03"), "corrupt"),
])
def test_bad_frames_are_refused(data, message):
    """Bad prefixes, oversize lengths and garbage compressed data are framing errors."""
    decoder = FrameDecoder()
    decoder.receive_data(data)
    with pytest.raises(WireError, match=message):
        while decoder.next_piece() is not None:
            pass


def test_oversize_prefix_fails_before_the_frame_arrives():
    """A length over the limit is refused as soon as its ':' is in, not after 16 MiB."""
    decoder = FrameDecoder()
    decoder.receive_data(b"%d:" % (MAX_FRAME + 1))
    with pytest.raises(WireError):
        decoder.next_piece()


def test_truncated_frame_is_not_a_boundary():
    """A connection cut mid-frame is visible: the decoder is not at a frame boundary."""
    data = FrameEncoder().encode(SOURCE)
    decoder = FrameDecoder()
    inflate_all(decoder, data[:len(data) // 2])
    assert not decoder.at_frame_boundary


def test_random_garbage_never_crashes_the_decoder():
    """Any bytes give a WireError or nothing, never another exception."""
    rng = random.Random(17)
    for _ in range(300):
        junk = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
        if rng.random() < 0.5:
            junk = b"%d:" % len(junk) + junk
        decoder = FrameDecoder()
        decoder.receive_data(junk)
        try:
            while decoder.next_piece() is not None:
                pass
        except WireError:
            pass


def test_limits_are_documented_constants():
    """Every limit is a named module constant with a docstring in the source."""
    source = open(compression.__file__).read()
    for name in ("MAX_FRAME", "MAX_INFLATED_FRAME", "INFLATE_STEP", "SEND_FRAME",
                 "MAX_FRAME_DIGITS"):
        assert '%s = ' % name in source
        after = source.split("\n%s = " % name, 1)[1].split("\n", 2)[1]
        assert after.startswith('"""'), name


def test_several_writes_in_one_frame():
    """encode_many puts writes judged each on its own (text compressed, noise stored) into
    as few frames as the frame size allows, and they inflate in order."""
    noise = os.urandom(50_000)
    writes = [b'!{"type":"file_data","path":"a"}\n', b"50000\n", noise, b"0\n", SOURCE[:20_000]]
    encoder = FrameEncoder()
    data = encoder.encode_many(writes)
    assert data.count(b":") >= 1 and int(data.split(b":", 1)[0]) == len(data) - len(
        data.split(b":", 1)[0]) - 1  # exactly one frame
    assert encoder.bytes_stored == len(noise)
    assert inflate_all(FrameDecoder(), data, 1000) == b"".join(writes)
    big = FrameEncoder(frame_size=30_000).encode_many([SOURCE[:50_000], noise])
    assert inflate_all(FrameDecoder(max_inflated=30_000), big) == SOURCE[:50_000] + noise


@settings(max_examples=40, deadline=None)
@given(batches=st.lists(st.lists(st.sampled_from(["text", "noise", "tiny", "zeros"]), max_size=6),
                        max_size=6),
       frame_size=st.sampled_from([5000, 20_000, SEND_FRAME]),
       cut=st.integers(min_value=1, max_value=9000))
def test_mixed_batches_round_trip(batches, frame_size, cut):
    """Batches mixing text, random and tiny writes, in frames of any size, cut anywhere,
    inflate to exactly what was written."""
    rng = random.Random(len(batches) * 31 + cut)
    make = {"text": lambda: SOURCE[:rng.randrange(1, 12_000)],
            "noise": lambda: rng.randbytes(rng.randrange(1, 30_000)),
            "tiny": lambda: b"%d\n" % rng.randrange(10 ** 6),
            "zeros": lambda: b"\0" * rng.randrange(1, 40_000)}
    encoder = FrameEncoder(frame_size=frame_size)
    written = []
    data = []
    for batch in batches:
        writes = [make[kind]() for kind in batch]
        written.extend(writes)
        data.append(encoder.encode_many(writes))
    assert inflate_all(FrameDecoder(), b"".join(data), cut) == b"".join(written)
