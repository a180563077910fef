"""Tests for the sans-IO wire codec (clearskies.wire, protocol/wire.md)."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from clearskies.errors import WireError
from clearskies.share.records import MAX_PATH_BYTES, MAX_VV_ENTRIES
from clearskies.wire import (
    MAX_CHUNK_SIZE, MAX_LINE_LENGTH, MAX_SIGNATURE_LINE, PAYLOAD_END, SEND_CHUNK_SIZE,
    SESSION_TYPE_LIMITS, Message,
    PayloadChunk, PayloadEnd, WireDecoder, dumps, encode, encode_chunk,
    encode_chunk_header, encode_payload_start, encode_signed,
    encode_with_payload,
)

# -- helpers --------------------------------------------------------------------


def feed(decoder: WireDecoder, *pieces: bytes) -> list:
    """Feed pieces one by one, draining events after each, and return all events."""
    out = []
    for piece in pieces:
        decoder.receive_data(piece)
        out.extend(decoder.events())
    return out


def decode_all(data: bytes, **limits: Any) -> list:
    """Every event a fresh decoder makes of ``data`` given in one piece."""
    return feed(WireDecoder(**limits), data)


def collate(events: list) -> list[tuple]:
    """Turn events into (body, text, signature, has_payload, payload) records.

    Also checks the event grammar: pieces and ends only inside a payload.
    """
    records: list[tuple] = []
    payload: bytearray | None = None
    for event in events:
        if type(event) is Message:
            assert payload is None, "message inside a payload"
            assert isinstance(event.type, str)
            if event.has_payload:
                payload = bytearray()
            else:
                records.append((event.body, event.text, event.signature, False, None))
                continue
            records.append(event)
        elif type(event) is PayloadChunk:
            assert payload is not None, "payload piece outside a payload"
            assert type(event.data) is bytes and event.data
            payload += event.data
        else:
            assert type(event) is PayloadEnd
            assert payload is not None, "payload end outside a payload"
            start = records.pop()
            records.append((start.body, start.text, start.signature, True, bytes(payload)))
            payload = None
    assert payload is None, "stream ended inside a payload"
    return records


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    """Cut ``data`` at the given offsets."""
    bounds = [0, *sorted(set(cuts)), len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


# -- strategies -----------------------------------------------------------------

json_scalars = (
    st.none() | st.booleans()
    | st.integers(min_value=-(2**200), max_value=2**200)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
bodies = st.builds(
    lambda extra, kind: {**extra, "type": kind},
    st.dictionaries(st.text(max_size=8).filter(lambda k: k != "type"), json_values,
                    max_size=4),
    st.text(max_size=12),
)
junk_lines = st.binary(max_size=24).filter(
    lambda b: b"\n" not in b and (not b or b[0] not in b"{!$"))


@st.composite
def wire_items(draw) -> tuple[bytes, tuple | None]:
    """One thing on the wire: its bytes and the record it should decode to (None: skipped)."""
    kind = draw(st.sampled_from(["plain", "payload", "signed", "signed+payload", "junk"]))
    if kind == "junk":
        return draw(junk_lines) + b"\n", None
    body = draw(bodies)
    text = dumps(body)
    chunks = draw(st.lists(st.binary(min_size=1, max_size=300), max_size=4))
    payload_bytes = b"".join(encode_chunk(c) for c in chunks) + PAYLOAD_END
    payload = b"".join(chunks)
    signature = draw(st.binary(min_size=1, max_size=64))
    if kind == "plain":
        return encode(body), (body, text, None, False, None)
    if kind == "payload":
        return encode_payload_start(body) + payload_bytes, (body, text, None, True, payload)
    if kind == "signed":
        return encode_signed(text, signature), (body, text, signature, False, None)
    return (encode_signed(text, signature, has_payload=True) + payload_bytes,
            (body, text, signature, True, payload))


# -- round trips ----------------------------------------------------------------


@given(items=st.lists(wire_items(), max_size=8), data=st.data())
def test_round_trip_split_anywhere(items, data):
    """Mixed messages, split at arbitrary points and fed piecewise, decode to the originals."""
    stream = b"".join(wire for wire, _ in items)
    expected = [record for _, record in items if record is not None]
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=12))
    decoder = WireDecoder()
    events = []
    for piece in split(stream, cuts):
        decoder.receive_data(piece)
        events.extend(decoder.events())
        assert decoder.buffered <= MAX_LINE_LENGTH
    assert collate(events) == expected
    assert decoder.at_message_boundary
    assert decoder.buffered == 0


@given(items=st.lists(wire_items(), max_size=6))
def test_round_trip_byte_by_byte(items):
    """Feeding one byte at a time decodes the same messages as feeding all at once."""
    stream = b"".join(wire for wire, _ in items)
    expected = [record for _, record in items if record is not None]
    one_by_one = feed(WireDecoder(), *(stream[i:i + 1] for i in range(len(stream))))
    assert collate(one_by_one) == expected
    assert collate(decode_all(stream)) == expected


@given(body=bodies)
def test_dumps_is_one_compact_line(body):
    """dumps() never emits a raw newline and decodes back to an equal body."""
    text = dumps(body)
    assert b"\n" not in text
    [message] = decode_all(encode(body))
    assert message.body == body and message.text == text


# -- garbage ----------------------------------------------------------------------

garbage_tokens = st.one_of(
    st.binary(max_size=40),
    st.sampled_from([
        b"{", b"}", b"!", b"$", b"$!", b"\n", b"\r", b"0\n", b"5\n", b"12\n",
        b'{"type":"x"}', b'{"type":1}', b"[1]", b"QUJD", b"====", b"[", b"\xff",
        b"\xed\xa0\x80", b"NaN", b"-Infinity", b"1e999", b"99999999999", b"-1\n",
    ]),
)


@given(tokens=st.lists(garbage_tokens, max_size=30), data=st.data())
def test_garbage_raises_only_wire_error(tokens, data):
    """Random bytes either decode to well-formed events or raise WireError, nothing else."""
    stream = b"".join(tokens)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=8))
    limits = data.draw(st.sampled_from([{}, {"max_line_length": 64, "max_chunk_size": 32}]))
    decoder = WireDecoder(**limits)
    try:
        for piece in split(stream, cuts):
            decoder.receive_data(piece)
            for event in decoder.events():
                assert type(event) in (Message, PayloadChunk, PayloadEnd)
                if type(event) is Message:
                    assert isinstance(event.body, dict) and isinstance(event.type, str)
            assert decoder.buffered <= limits.get("max_line_length", MAX_LINE_LENGTH)
    except WireError:
        with pytest.raises(WireError):
            decoder.next_event()


def test_decoder_stays_broken_after_error():
    """After one framing error every later call raises WireError."""
    decoder = WireDecoder()
    decoder.receive_data(b"!{bad json}\n")
    with pytest.raises(WireError, match="not valid JSON"):
        decoder.next_event()
    with pytest.raises(WireError, match="already failed"):
        decoder.next_event()
    with pytest.raises(WireError):
        decoder.receive_data(b'{"type":"ping"}\n')
    with pytest.raises(WireError):
        decoder.take_unprocessed()
    assert decoder.buffered == 0


# -- line limits --------------------------------------------------------------------


def test_oversize_line_raises_with_bounded_buffer():
    """20 MB without a newline raises WireError once the limit is passed, buffering no more."""
    decoder = WireDecoder()
    read = b"a" * 65536
    fed = 0
    largest = 0
    with pytest.raises(WireError, match="line longer than"):
        while fed < 20_000_000:
            decoder.receive_data(b"{" + read[1:] if fed == 0 else read)
            fed += len(read)
            largest = max(largest, decoder.buffered)
            assert decoder.next_event() is None
    assert MAX_LINE_LENGTH < fed <= MAX_LINE_LENGTH + len(read)
    assert largest <= MAX_LINE_LENGTH + len(read)


def test_oversize_line_in_one_read():
    """A single 20 MB read without a newline raises WireError."""
    decoder = WireDecoder()
    decoder.receive_data(b"{" + b" " * 20_000_000)
    with pytest.raises(WireError):
        decoder.next_event()


def test_line_of_exactly_the_limit_is_accepted():
    """A line of max_line_length bytes decodes; one byte more is refused."""
    body = {"type": "x", "pad": ""}
    body["pad"] = "p" * (64 - len(dumps(body)))
    assert len(dumps(body)) == 64
    [message] = decode_all(encode(body), max_line_length=64)
    assert message.body == body
    decoder = WireDecoder(max_line_length=64)
    decoder.receive_data(b"{" + b" " * 64)
    with pytest.raises(WireError):
        decoder.next_event()


def test_oversize_skipped_line_is_refused():
    """Lines that would be skipped are still held to the line limit."""
    decoder = WireDecoder(max_line_length=16)
    decoder.receive_data(b"#" * 17)
    with pytest.raises(WireError, match="line longer"):
        decoder.next_event()


def test_oversize_signature_line_is_refused():
    """The signature line of a `$` message obeys the same line limit."""
    decoder = WireDecoder(max_line_length=32)
    decoder.receive_data(b'${"type":"x"}\n' + b"A" * 40)
    with pytest.raises(WireError, match="line longer"):
        decoder.next_event()


def test_long_line_in_small_reads_is_not_rescanned():
    """A 4 MiB line in 1 KiB reads is found, scanning each byte once (fast)."""
    body = {"type": "blob", "data": "x" * (4 * 1024 * 1024)}
    wire = encode(body)
    decoder = WireDecoder()
    events = feed(decoder, *(wire[i:i + 1024] for i in range(0, len(wire), 1024)))
    assert [m.body for m in events] == [body]


# -- chunk headers ----------------------------------------------------------------------

PAYLOAD_START = b'!{"type":"file_data"}\n'


@pytest.mark.parametrize("header", [
    b"-1\n", b"1a\n", b" 5\n", b"5 \n", b"+5\n", b"\n", b"0x10\n",
    b"0123456789\n", b"16777217\n", b"999999999\n", b"\xd9\xa1\n", b"\r\n", b"5\r\n",
])
def test_bad_chunk_header_raises(header):
    """Chunk headers that are not 1-9 ASCII digits within the limit are refused."""
    decoder = WireDecoder()
    decoder.receive_data(PAYLOAD_START + header + b"x" * 8)
    assert decoder.next_event().type == "file_data"
    with pytest.raises(WireError, match="chunk"):
        decoder.next_event()


@pytest.mark.parametrize("partial", [b"1a", b"-", b"1234567890"])
def test_bad_chunk_header_detected_before_newline(partial):
    """A header that can no longer become valid fails without waiting for its newline."""
    decoder = WireDecoder()
    events = feed(decoder, PAYLOAD_START)
    assert len(events) == 1
    decoder.receive_data(partial)
    with pytest.raises(WireError, match="chunk header"):
        decoder.next_event()


def test_chunk_header_limits_accepted():
    """A chunk of exactly max_chunk_size and a header with leading zeros are accepted."""
    events = decode_all(PAYLOAD_START + b"0003\nabc" + b"8\n12345678" + b"00\n",
                        max_chunk_size=8)
    assert collate(events) == [({"type": "file_data"}, b'{"type":"file_data"}',
                                None, True, b"abc12345678")]
    decoder = WireDecoder(max_chunk_size=8)
    decoder.receive_data(PAYLOAD_START + b"9\n")
    decoder.next_event()
    with pytest.raises(WireError, match="exceeds"):
        decoder.next_event()


def test_max_size_chunk_is_streamed_in_pieces():
    """A 16 MiB chunk comes out piece by piece as reads arrive, never buffered whole."""
    decoder = WireDecoder()
    data = bytes(range(256)) * (MAX_CHUNK_SIZE // 256)
    wire = PAYLOAD_START + encode_chunk(data) + PAYLOAD_END
    read_size = 65536
    received = bytearray()
    pieces = 0
    ended = False
    for offset in range(0, len(wire), read_size):
        decoder.receive_data(wire[offset:offset + read_size])
        for event in decoder.events():
            if type(event) is PayloadChunk:
                assert len(event.data) <= read_size
                received += event.data
                pieces += 1
            elif type(event) is PayloadEnd:
                ended = True
        assert decoder.buffered <= 9
        if offset == read_size * 10:
            assert len(received) > 9 * read_size, "payload held back"
    assert ended and bytes(received) == data
    assert pieces >= MAX_CHUNK_SIZE // read_size


def test_payload_read_is_handed_on_without_copy():
    """A read made only of payload bytes becomes a PayloadChunk holding that same object."""
    decoder = WireDecoder()
    feed(decoder, PAYLOAD_START + b"100\n")
    read = bytes(100)
    decoder.receive_data(read)
    event = decoder.next_event()
    assert type(event) is PayloadChunk and event.data is read


def test_boundary_state_inside_payload_and_signature():
    """at_message_boundary is False mid-payload and between a `$` line and its signature."""
    decoder = WireDecoder()
    feed(decoder, PAYLOAD_START, b"3\nab")
    assert not decoder.at_message_boundary
    feed(decoder, b"c0\n")
    assert decoder.at_message_boundary
    feed(decoder, b'${"type":"x"}\n')
    assert not decoder.at_message_boundary
    [message] = feed(decoder, b"AAEC\n")
    assert message.signature == b"\x00\x01\x02" and decoder.at_message_boundary


# -- JSON content -------------------------------------------------------------------------


def test_big_integers_stay_exact():
    """64-bit and larger integers decode and encode without passing through floats."""
    wire = b'{"type":"x","a":9223372036854775808,"b":18446744073709551617,' \
           b'"c":-9223372036854775808,"d":9007199254740993}\n'
    [message] = decode_all(wire)
    assert message.body["a"] == 2**63 and type(message.body["a"]) is int
    assert message.body["b"] == 2**64 + 1
    assert message.body["c"] == -(2**63)
    assert message.body["d"] == 2**53 + 1
    assert encode(message.body) == wire


def test_floats_keep_their_exact_value():
    """Float timestamps like the reference peer's decode and re-encode to the same text."""
    wire = b'{"type":"manifest","version":1795715305.0485027,"utime":1795715305.0436401}\n'
    [message] = decode_all(wire)
    assert message.body["version"] == 1795715305.0485027
    assert encode(message.body) == wire


@pytest.mark.parametrize("line", [
    b'{"type":"x","v":NaN}\n', b'{"type":"x","v":Infinity}\n',
    b'{"type":"x","v":-Infinity}\n', b'{"type":"x","v":1e999}\n',
])
def test_non_finite_numbers_refused(line):
    """NaN, Infinity and floats that overflow to infinity are refused."""
    with pytest.raises(WireError):
        decode_all(line)


@pytest.mark.parametrize("line", [
    b"![1,2]\n", b'$"text"\nAA==\n', b"!null\n", b'{"kind":"x"}\n', b'{"type":1}\n',
    b'{"type":null}\n', b'{"type":"x"} {"type":"y"}\n', b'{"type":"x"\n',
    b'{"type":"\xff"}\n', b'{"type":"\xed\xa0\x80"}\n', b'!\xef\xbb\xbf{"type":"x"}\n',
    b"!\n", b"$\nAA==\n",
])
def test_bad_message_lines_refused(line):
    """Non-objects, a missing or non-string type, bad JSON and bad UTF-8 are refused."""
    with pytest.raises(WireError):
        decode_all(line)


def test_deep_nesting_and_huge_numbers_refused():
    """JSON nested past the recursion limit or with a 5000-digit number gives WireError."""
    with pytest.raises(WireError, match="nests"):
        decode_all(b'{"type":"x","a":' + b"[" * 200_000 + b"]" * 200_000 + b"}\n")
    with pytest.raises(WireError):
        decode_all(b'{"type":"x","n":' + b"7" * 5000 + b"}\n")


@pytest.mark.parametrize("signature_line", [
    b"not base64!", b"QUJD RA==", b"QUJ", b"QUJDRA=", b"", b"QUJDRA==\r", b"\xff\xfe",
])
def test_bad_signature_line_refused(signature_line):
    """A signature line that is not strict base64 of a non-empty signature is refused."""
    with pytest.raises(WireError, match="signature"):
        decode_all(b'${"type":"x"}\n' + signature_line + b"\n")


def test_lines_not_starting_a_message_are_skipped():
    """Blank lines, `\\r` lines and lines not starting with `{`, `!` or `$` are ignored."""
    wire = (b"\n\r\n# comment\n" b' {"type":"indented"}\n' b"hello\n"
            b'{"type":"real"}\n' b"\n")
    assert [m.body for m in decode_all(wire)] == [{"type": "real"}]


def test_trailing_carriage_return_is_part_of_the_text():
    """`\\r\\n` endings decode; the `\\r` stays in the signed text."""
    [message] = decode_all(b'{"type":"x"}\r\n')
    assert message.body == {"type": "x"} and message.text == b'{"type":"x"}\r'


def test_unknown_keys_and_types_are_kept():
    """The codec passes unknown types and keys through; ignoring them is the caller's job."""
    [message] = decode_all(b'{"type":"future_thing","extra":{"a":[1,2]}}\n')
    assert message.type == "future_thing" and message.body["extra"] == {"a": [1, 2]}


# -- take_unprocessed -----------------------------------------------------------------------


def test_take_unprocessed_hands_over_bytes_after_starttls():
    """Bytes following the starttls line are returned untouched for the TLS layer."""
    starttls = b'{"peer":"48d09b6b6a8ae0edb8fc14c64bbc604b","access":"unknown","type":"starttls"}\n'
    hello = b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\n\n{garbage!"
    decoder = WireDecoder()
    decoder.receive_data(starttls[:30])
    decoder.receive_data(starttls[30:] + hello[:5])
    assert decoder.next_event().type == "starttls"
    decoder.receive_data(hello[5:])
    assert decoder.take_unprocessed() == hello
    assert decoder.buffered == 0
    assert decoder.take_unprocessed() == b""
    assert [m.type for m in feed(decoder, b'{"type":"ping"}\n')] == ["ping"]


# -- encoders and golden bytes ----------------------------------------------------------


def test_golden_encodings():
    """Each message kind encodes to exactly the documented bytes."""
    assert encode({"type": "get_manifest"}) == b'{"type":"get_manifest"}\n'
    assert encode({"a": "é\n", "type": "t"}) == b'{"a":"\xc3\xa9\\n","type":"t"}\n'
    assert encode_payload_start({"path": "a", "type": "file_data"}) == \
        b'!{"path":"a","type":"file_data"}\n'
    assert encode_chunk_header(1048576) == b"1048576\n"
    assert encode_chunk(b"abc") == b"3\nabc"
    assert PAYLOAD_END == b"0\n"
    assert encode_with_payload({"type": "d"}, b"") == b'!{"type":"d"}\n0\n'
    assert encode_signed(b'{"type":"s"}', b"\x00\x01\x02") == b'${"type":"s"}\nAAEC\n'
    assert encode_signed(b'{"type":"s"}', b"\xff" * 4, has_payload=True) == \
        b'$!{"type":"s"}\n/////w==\n'


def test_encode_with_payload_uses_send_chunk_size():
    """A payload one byte over SEND_CHUNK_SIZE goes as a full chunk, a 1-byte chunk, and 0."""
    payload = b"z" * (SEND_CHUNK_SIZE + 1)
    wire = encode_with_payload({"type": "d"}, payload)
    head = b'!{"type":"d"}\n1048576\n'
    assert wire.startswith(head)
    assert wire[len(head) + SEND_CHUNK_SIZE:] == b"1\nz0\n"
    assert collate(decode_all(wire)) == [({"type": "d"}, b'{"type":"d"}', None, True, payload)]


# Exact lines from the reference peer's wire transcript, with their sizes on the wire.
TRANSCRIPT_LINES = [
    (b'{"software":"clearskies 0.1pre","protocol":[1],"features":[],"type":"greeting"}', 80),
    (b'{"software":"clearskies 0.1pre","protocol":1,"features":[],"id":"d7f2e387fe78bb73e1a14'
     b'cd06ee908fff052e13f7a82d4bbcbd34c8a81f49e1b","access":"unknown","peer":"e358644d71f4f1'
     b'0c95f3707d414ff162","type":"start"}', 208),
    (b'{"peer":"48d09b6b6a8ae0edb8fc14c64bbc604b","access":"unknown","type":"starttls"}', 81),
    (b'{"key":"H9RDKLW2jvNvsJjj+HX2zg==\\n","type":"fake_tls_handshake"}', 65),
    (b'{"type":"keys_acknowledgment"}', 31),
    (b'{"name":"ClearSkies Client","time":1795715305,"type":"identity"}', 65),
    (b'{"type":"manifest","peer":"e358644d71f4f10c95f3707d414ff162",'
     b'"version":1795715305.221347,"files":[]}', 101),
    (b'{"path":"hello.txt","type":"get"}', 34),
    (b'{"file":{"path":"empty","utime":1795715309.8301144,"deleted":true,'
     b'"id":"e7febef4a4a49d317292baaa9932fcf4"},"type":"update"}', 124),
    (b'{"timeout":60,"type":"ping"}', 29),
]


@pytest.mark.parametrize("line,wire_size", TRANSCRIPT_LINES)
def test_reference_transcript_lines(line, wire_size):
    """Lines the reference peer sent decode, and re-encode to the very same bytes."""
    assert len(line) + 1 == wire_size
    [message] = decode_all(line + b"\n")
    assert message.text == line and message.signature is None and not message.has_payload
    assert encode(message.body) == line + b"\n"


def test_reference_file_data_framing():
    """The reference peer's `!` file_data with one 13-byte chunk decodes and re-encodes exactly."""
    content = b"Hello, world\n"
    wire = b'!{"path":"hello.txt","type":"file_data"}\n' + b"13\n" + content + b"0\n"
    assert len(b'!{"path":"hello.txt","type":"file_data"}\n') == 41
    events = decode_all(wire)
    assert events[0] == Message({"path": "hello.txt", "type": "file_data"},
                                b'{"path":"hello.txt","type":"file_data"}', None, True)
    assert events[1:] == [PayloadChunk(content), PayloadEnd()]
    assert encode_with_payload({"path": "hello.txt", "type": "file_data"}, content) == wire


def test_reference_conversation_split_everywhere():
    """A server-side stream from the transcript decodes identically at every split point."""
    stream = b"".join(line + b"\n" for line, _ in TRANSCRIPT_LINES[:4]) + \
        b'!{"path":"sub/dir/nested.txt","type":"file_data"}\n12\nnested file\n0\n' + \
        TRANSCRIPT_LINES[-1][0] + b"\n"
    whole = decode_all(stream)
    assert [e.type for e in whole if type(e) is Message] == [
        "greeting", "start", "starttls", "fake_tls_handshake", "file_data", "ping"]
    for cut in range(1, len(stream)):
        assert collate(feed(WireDecoder(), stream[:cut], stream[cut:])) == collate(whole)


def test_signed_round_trip_keeps_exact_text():
    """A `$` message keeps the exact text (odd spacing included) that its signature covers."""
    text = b'{ "type" : "update",  "n": 1 }'
    signature = bytes(range(256))
    [message] = decode_all(encode_signed(text, signature))
    assert message.text == text and message.signature == signature
    assert message.body == {"type": "update", "n": 1}
    assert base64.b64encode(signature) in encode_signed(text, signature)


def test_encoder_refusals():
    """Encoders refuse what no peer may receive instead of sending it."""
    with pytest.raises(TypeError):
        dumps(["type", "x"])
    with pytest.raises(ValueError):
        dumps({"kind": "x"})
    with pytest.raises(ValueError):
        dumps({"type": "x", "v": float("nan")})
    with pytest.raises(ValueError):
        encode_chunk(b"")
    with pytest.raises(ValueError):
        encode_chunk_header(MAX_CHUNK_SIZE + 1)
    with pytest.raises(ValueError):
        encode_signed(b'{"type":"x"}\n', b"sig")
    with pytest.raises(ValueError):
        encode_signed(b'{"type":"x"}', b"")
    with pytest.raises(ValueError):
        encode({"type": "x", "pad": "p" * MAX_LINE_LENGTH})


def test_lone_surrogate_survives_as_escape():
    """A string holding a lone surrogate is sent as a \\u escape and decodes back equal."""
    body = {"type": "x", "path": "bad\udc80name"}
    wire = encode(body)
    assert b"\\udc80" in wire and b"\n" not in wire[:-1]
    [message] = decode_all(wire)
    assert message.body == body


# -- bounded parsing cost (protocol/wire.md, "What a line may cost") -------------------------

_SIXTEEN_MIB = 16 * 1024 * 1024


def _fill(prefix: bytes, unit: bytes, suffix: bytes, size: int = _SIXTEEN_MIB) -> bytes:
    """``prefix``, ``unit`` repeated, ``suffix``: a line of at most ``size`` bytes."""
    return prefix + unit * ((size - len(prefix) - len(suffix)) // len(unit)) + suffix


HOSTILE_LINES = {
    "empty arrays": _fill(b'{"type":"manifest","files":[', b"[],", b"[]]}"),
    "empty objects": _fill(b'{"files":[', b"{},", b'{}],"type":"manifest"}'),
    "small numbers": _fill(b'{"type":"manifest","files":[', b"1,", b"1]}"),
    "short strings": _fill(b'{"type":"manifest","files":[', b'"ab",', b'"ab"]}'),
    "padded nesting": b'{"type":"manifest","files":' + b"[ " * 40 + b" " * 1000
    + b"]" * 40 + b"}",
    "nesting": _fill(b'{"type":"manifest","files":', b"[", b"", _SIXTEEN_MIB // 2)
    + b"]" * (_SIXTEEN_MIB // 2 - 28) + b"}",
    "long get": _fill(b'{"type":"get","path":"', b"a", b'"}'),
    "long get, type last": _fill(b'{"path":"', b"\\u0041", b'","type":"get"}'),
    "huge integer": b'{"type":"ping","timeout":1' + b"0" * 100_000 + b"}",
    "huge exponent": b'{"type":"ping","timeout":1e999999}',
    "ping outgrowing its type": b'{"type":"ping","pad":"' + b"a" * 2000 + b'"}',
}


@pytest.mark.parametrize("name", sorted(HOSTILE_LINES))
def test_hostile_lines_refused_at_small_cost(name):
    """Each hostile shape is a WireError, with little memory and CPU spent on it."""
    import time
    import tracemalloc
    line = HOSTILE_LINES[name]
    assert len(line) <= _SIXTEEN_MIB
    pieces = [line[i:i + 65536] for i in range(0, len(line), 65536)] + [b"\n"]
    decoder = WireDecoder(type_limits=SESSION_TYPE_LIMITS)
    tracemalloc.start()
    try:
        with pytest.raises(WireError):
            for piece in pieces[:-1]:
                feed(decoder, piece)
            # The turn that completes the line: what one message may cost the reactor.
            started = time.perf_counter()
            feed(decoder, pieces[-1])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    elapsed = time.perf_counter() - started if "started" in locals() else 0.0
    # The line, its text and (for a key-last type, checked once parsed) its decoded
    # string are up to 16 MiB each; parsing 16 MiB of "[]," whole cost 400 MB and 2 s.
    assert peak < 64 * 1024 * 1024, "%s: peak %.1f MB" % (name, peak / 1e6)
    assert elapsed < 0.5, "%s: %.3f s" % (name, elapsed)


@pytest.mark.parametrize("prefix", [b"", b"!", b"$", b"$!"])
def test_hostile_line_refused_before_it_is_buffered_whole(prefix):
    """A line that starts as a small type fails as soon as it outgrows that type."""
    decoder = WireDecoder(type_limits=SESSION_TYPE_LIMITS)
    decoder.receive_data(prefix + b'{"type":"get","path":"' + b"a" * 16_000)
    assert decoder.next_event() is None
    decoder.receive_data(b"a" * 1000)
    with pytest.raises(WireError, match="'get' message is over the 16384 bytes"):
        decoder.next_event()
    assert decoder.buffered == 0


def test_sniffed_type_must_be_the_parsed_type():
    """A line held to the limit of the type it starts with may not end as another type."""
    decoder = WireDecoder(type_limits=SESSION_TYPE_LIMITS)
    decoder.receive_data(b'{"type":"ping","pad":"' + b"a" * 200 + b'","type":"manifest"}')
    assert decoder.next_event() is None
    decoder.receive_data(b"\n")
    with pytest.raises(WireError, match="states its type twice"):
        decoder.next_event()
    [ok] = decode_all(b'{"type":"ping","pad":"' + b"a" * 200 + b'","type":"ping"}\n',
                      type_limits=SESSION_TYPE_LIMITS)
    assert ok.type == "ping"


def test_type_limits_after_parsing():
    """A message of a type written key-last is checked against its type once parsed."""
    big = b'{"path":"' + b"a" * 17_000 + b'","type":"get"}\n'
    with pytest.raises(WireError, match="'get' message of 17024 bytes is over the 16384"):
        decode_all(big, type_limits=SESSION_TYPE_LIMITS)
    assert decode_all(big)[0].type == "get"  # no type limits: only the line limit


def test_signature_line_limit():
    """A signature line longer than MAX_SIGNATURE_LINE is refused before it ends."""
    decoder = WireDecoder()
    decoder.receive_data(b'${"type":"x"}\n' + b"A" * (MAX_SIGNATURE_LINE + 1))
    with pytest.raises(WireError, match="signature line longer than 4096"):
        decoder.next_event()
    ok = b"A" * MAX_SIGNATURE_LINE
    [message] = decode_all(b'${"type":"x"}\n' + ok + b"\n")
    assert len(message.signature) == MAX_SIGNATURE_LINE // 4 * 3


def _largest_record(path_bytes: int = MAX_PATH_BYTES) -> dict:
    """A file record as large as our own code can make one (path, hashes, full vv)."""
    from clearskies.share.records import FileRecord
    # Quotes are escaped, so this is the longest a path's JSON gets as we write it.
    path = ('"' * 255 + "/") * (path_bytes // 256 - 1) + '"' * 255
    record = FileRecord(
        path=path, utime=1795715305.0485027, size=2**63 - 1,
        mtime=(9_223_372_035, 999_999_999), mode=0o100755, sha256="f" * 64,
        file_id="e" * 32, key="c" * 64,
        vv={"%032x" % i: 2**63 - 1 for i in range(MAX_VV_ENTRIES)},
        conflict_source=path)
    return record.to_wire()


def test_largest_messages_we_send_fit_their_types():
    """The largest update, move, get and file_data our code can send pass the type limits."""
    record = _largest_record()
    path = record["path"]
    messages = [
        {"type": "update", "revision": 2**63 - 1, "file": record},
        {"type": "move", "revision": 2**63 - 1, "source": path, "destination": record},
        {"type": "get", "path": path, "range": [2**63 - 1, 2**63 - 1]},
        {"type": "get_error", "path": path, "message": "x" * 200},
        {"type": "file_data", "path": path, "range": [2**63 - 1, 2**63 - 1]},
        {"type": "clearskies.progress", "revision": 2**63 - 1, "items": 2**63 - 1,
         "bytes": 2**63 - 1},
        {"type": "clearskies.addresses",
         "addresses": ["tcp:[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535"] * 8},
        {"type": "ping", "timeout": 3600},
        {"type": "get_manifest", "revision": 2**63 - 1},
        {"type": "manifest_current"},
    ]
    for body in messages:
        [message] = decode_all(encode(body), type_limits=SESSION_TYPE_LIMITS)
        assert message.body == body


@pytest.mark.parametrize("entry", [
    '{"path":"photos/2014/IMG_%06d.JPG","utime":1795715305.0485027,"size":2048576,'
    '"mtime":[1795715305,48502700],"mode":"100644","sha256":"' + "a" * 64 + '",'
    '"id":"' + "b" * 32 + '","key":"' + "c" * 64 + '"}',
    '{"path":"d/%06d","utime":1795715305.0485027,"deleted":true,"id":"' + "b" * 32 + '"}',
], ids=["files", "deletions"])
def test_legacy_whole_manifest_of_sixteen_mib_passes(entry):
    """A reference peer's whole manifest in one line of almost 16 MiB is still accepted."""
    head = '{"files":['
    tail = '],"peer":"' + "d" * 32 + '","type":"manifest","version":1795715305.0485027}'
    count = (_SIXTEEN_MIB - len(head) - len(tail)) // (len(entry % 0) + 1)
    text = (head + ",".join(entry % i for i in range(count)) + tail).encode()
    assert _SIXTEEN_MIB - 1000 < len(text) <= _SIXTEEN_MIB
    [message] = decode_all(text + b"\n", type_limits=SESSION_TYPE_LIMITS)
    assert len(message.body["files"]) == count
