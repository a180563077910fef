"""Sans-IO codec for the ClearSkies wire framing (see ``protocol/wire.md``).

Bytes from the network go into :meth:`WireDecoder.receive_data`; whole
messages and pieces of binary payload come out of
:meth:`WireDecoder.next_event`.  The encoders are plain functions returning
bytes.  Nothing here touches sockets or the reactor, so the peer protocol,
the tests and the benchmarks all drive exactly the same code.

Every buffer is bounded: a line may hold at most ``max_line_length`` bytes,
and payload bytes are handed on as soon as they arrive instead of being
collected, so the decoder never holds more than about one line plus one
``receive_data()`` argument.  What a line may cost once parsed is bounded
too: at most ``max_items`` JSON values nested at most ``max_depth`` deep,
checked before the JSON parser runs (:mod:`clearskies.jsonshape`), and, with
``type_limits``, at most as many bytes as its message type needs.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from clearskies import jsonshape
from clearskies.errors import WireError

__all__ = [
    "MAX_LINE_LENGTH", "MAX_SIGNATURE_LINE", "MAX_ITEMS", "MAX_DEPTH", "TypeLimits",
    "SESSION_TYPE_LIMITS", "MAX_CHUNK_SIZE", "SEND_CHUNK_SIZE", "PAYLOAD_END",
    "Message", "PayloadChunk", "PayloadEnd", "Event", "WireDecoder",
    "dumps", "encode", "encode_payload_start", "encode_chunk_header",
    "encode_chunk", "encode_with_payload", "encode_signed",
]

MAX_LINE_LENGTH = 16 * 1024 * 1024
"""Most bytes one line (message or signature, prefix included, newline not) may hold."""

MAX_SIGNATURE_LINE = 4096
"""Most bytes a signature line may hold (base64 of a 16,384-bit RSA signature fits)."""

MAX_ITEMS = 1 << 21
"""Most JSON values one message may hold, as counted before parsing (``jsonshape``).

A legacy peer's whole manifest in one 16 MiB line holds up to about 1.5
million: 55,000 full records of 19 values, or 160,000 deletions of 9 (a
record per 100 bytes).  Every value costs the parser at most about 80 bytes."""

MAX_DEPTH = 32
"""Deepest nesting of arrays and objects in a message (ours nest at most 4 deep)."""

MAX_CHUNK_SIZE = 16 * 1024 * 1024
"""Largest payload chunk we accept."""


@dataclass(frozen=True)
class TypeLimits:
    """Most bytes a message's JSON text may hold, by its ``type``."""

    limits: Mapping[str, int] = field(default_factory=dict)
    default: int = MAX_LINE_LENGTH
    """For types not listed (unknown ones are passed on, and ignored above)."""

    def for_type(self, kind: str) -> int:
        return self.limits.get(kind, self.default)


_PATH_MESSAGE = 16 * 1024
_RECORD_MESSAGE = 128 * 1024

SESSION_TYPE_LIMITS = TypeLimits({
    # A whole manifest in one message (legacy peers; signed pages kept and
    # relayed verbatim) and a read-only peer's sources may need the whole line.
    "manifest": MAX_LINE_LENGTH,
    "read_only_manifest.manifest": MAX_LINE_LENGTH,
    # Every blob of a share in one signed line (protocol/untrusted.md, section 5).
    "untrusted.manifest": MAX_LINE_LENGTH,
    # One record: a 4,096-byte path (twice that when escaped), hashes, and a
    # version vector of up to 1,024 entries (about 57 KB); a move adds its source.
    "update": _RECORD_MESSAGE,
    "move": _RECORD_MESSAGE,
    # A path and a few numbers or a short reason.
    "get": _PATH_MESSAGE,
    "get_error": _PATH_MESSAGE,
    "file_data": _PATH_MESSAGE,
    "thumbnail.get": _PATH_MESSAGE,
    "thumbnail.data": _PATH_MESSAGE,
    "thumbnail.error": _PATH_MESSAGE,
    # At most 8 addresses.
    "clearskies.addresses": 4096,
    # A few numbers.
    "ping": 1024,
    "get_manifest": 1024,
    "manifest_current": 1024,
    "clearskies.progress": 1024,
}, default=64 * 1024)
"""What each message type after the handshake may hold (``protocol/wire.md``)."""

SEND_CHUNK_SIZE = 1024 * 1024
"""Size of the payload chunks we send."""

PAYLOAD_END = b"0\n"
"""The zero-length chunk that ends every payload."""

_MAX_HEADER_DIGITS = 9
_OPEN_BRACE = ord("{")
_BANG = ord("!")
_DOLLAR = ord("$")

# Decoder states.
_LINE = "line"                  # waiting for a message line
_SIGNATURE = "signature"        # a `$` / `$!` line was read; its signature line comes next
_CHUNK_HEADER = "chunk header"  # inside a payload, waiting for `<digits>\n`
_CHUNK_DATA = "chunk data"      # inside a payload chunk, `_remaining` bytes still to come


@dataclass(frozen=True)
class Message:
    """One JSON message, with the exact bytes it arrived as (a signature covers those)."""

    body: dict
    text: bytes
    signature: bytes | None = None
    has_payload: bool = False

    @property
    def type(self) -> str:
        """The message's ``type`` (always a str: the decoder refuses anything else)."""
        return self.body["type"]


@dataclass(frozen=True)
class PayloadChunk:
    """A piece of payload; wire chunks are split wherever the network split them."""

    data: bytes


@dataclass(frozen=True)
class PayloadEnd:
    """The end of the payload that followed the last ``has_payload`` message."""


Event = Message | PayloadChunk | PayloadEnd


def _reject_constant(name: str) -> None:
    raise ValueError("%s is not allowed in a message" % (name,))


def _parse_float(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):
        # 1e999 would become inf, which no peer (nor our own encoder) may send.
        raise ValueError("number out of range for a float")
    return value


def _parse_body(text: bytes, max_items: int | None = MAX_ITEMS, max_depth: int = MAX_DEPTH,
                type_limits: TypeLimits | None = None, sniffed: str | None = None) -> dict:
    """Decode one message's JSON text, refusing anything the framing forbids.

    The cost is bounded before the parser runs (:func:`jsonshape.loads`;
    ``max_items`` None when the caller counted already); the per-type size
    is checked once the type is known.  ``sniffed`` is the type the line's
    start stated (:func:`_sniff_type`), which the body must keep.
    """
    try:
        body = jsonshape.loads(
            text, max_items, max_depth, parse_float=_parse_float,
            parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise WireError("message line is not valid UTF-8") from None
    except jsonshape.ShapeError as e:
        raise WireError("message line refused: %s" % (e,)) from None
    except ValueError as e:
        # The JSON error text names a position, never the content (which may hold keys).
        raise WireError("message line is not valid JSON: %s" % (e,)) from None
    if not isinstance(body, dict):
        raise WireError("message line is JSON but not an object")
    kind = body.get("type")
    if not isinstance(kind, str):
        raise WireError("message has no string 'type'")
    if sniffed is not None and kind != sniffed:
        raise WireError("message states its type twice")
    if type_limits is not None and len(text) > type_limits.for_type(kind):
        raise WireError("a %.64r message of %d bytes is over the %d bytes that type may hold"
                        % (kind, len(text), type_limits.for_type(kind)))
    return body


_SNIFF_BYTES = 96
_TYPE_FIRST = re.compile(rb'(?:\$!?|!)?\{"type":"([A-Za-z0-9_.]{1,64})"')


def _sniff_type(buf: bytes | bytearray, pos: int) -> str | None:
    """The type a line states first thing, as we write messages (``{"type":"get",…``).

    Lets a line of a small type be refused when it outgrows its type, before
    the rest of it is buffered.  Other key orders (the reference peer's) are
    checked once the line is complete.
    """
    match = _TYPE_FIRST.match(buf, pos, pos + _SNIFF_BYTES)
    return match.group(1).decode("ascii") if match else None


def _copy(buf: bytes | bytearray, start: int, end: int) -> bytes:
    """``bytes(buf[start:end])`` with a single copy, whatever the buffer type."""
    if type(buf) is bytes:
        if start == 0 and end == len(buf):
            return buf
        return buf[start:end]
    with memoryview(buf) as view:
        return bytes(view[start:end])


class WireDecoder:
    """Turn a byte stream into :data:`Event` objects; see ``protocol/wire.md``.

    Call :meth:`receive_data` with whatever arrived, then :meth:`next_event`
    until it returns ``None`` (or iterate :meth:`events`).  Any framing
    violation raises :class:`~clearskies.errors.WireError`; the decoder then
    stays broken and every later call raises again, because the stream can
    no longer be trusted to be in step.

    The memory bound (about one line plus one ``receive_data()`` argument)
    holds when events are drained after every ``receive_data()`` call.
    """

    def __init__(
        self,
        max_line_length: int = MAX_LINE_LENGTH,
        max_chunk_size: int = MAX_CHUNK_SIZE,
        max_items: int = MAX_ITEMS,
        max_depth: int = MAX_DEPTH,
        type_limits: TypeLimits | None = None,
    ) -> None:
        if max_line_length < 1:
            raise ValueError("max_line_length must be at least 1")
        if max_items < 1 or max_depth < 1:
            raise ValueError("max_items and max_depth must be at least 1")
        if not 1 <= max_chunk_size <= 10**_MAX_HEADER_DIGITS - 1:
            raise ValueError("max_chunk_size must fit in 1 to 9 decimal digits")
        self._max_line = max_line_length
        self._max_chunk = max_chunk_size
        self._max_items = max_items
        self._max_depth = max_depth
        self._type_limits = type_limits
        self._line_limit = max_line_length  # the current line's, once its type is sniffed
        self._sniffed: str | None = None
        # Unprocessed bytes are self._buf[self._pos:].  While nothing is left
        # over from earlier calls, _buf is the caller's own bytes object, so
        # payload can be handed on without copying; otherwise it is a bytearray.
        self._buf: bytes | bytearray = b""
        self._pos = 0
        self._scanned = 0  # bytes after _pos already known to hold no newline
        self._state = _LINE
        self._remaining = 0
        self._signed: tuple[dict, bytes, bool] | None = None
        self._error: WireError | None = None

    # -- public API ---------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Add bytes from the network; call :meth:`next_event` afterwards."""
        self._check_usable()
        if not data:
            return
        if self._pos >= len(self._buf):
            self._buf = data if type(data) is bytes else bytes(data)
            self._pos = 0
        elif type(self._buf) is bytes:
            with memoryview(self._buf) as view:
                buf = bytearray(view[self._pos:])
            buf += data
            self._buf = buf
            self._pos = 0
        else:
            if self._pos:
                del self._buf[:self._pos]
                self._pos = 0
            self._buf += data

    def next_event(self) -> Event | None:
        """Return the next event, or ``None`` when more bytes are needed."""
        self._check_usable()
        try:
            return self._next_event()
        except WireError as e:
            self._error = e
            self._buf = b""
            self._pos = 0
            raise

    def events(self) -> Iterator[Event]:
        """Yield every event the bytes received so far make up."""
        while (event := self.next_event()) is not None:
            yield event

    def take_unprocessed(self) -> bytes:
        """Remove and return the bytes not yet turned into events.

        Used when the connection switches to TLS: bytes after the ``starttls``
        line belong to the TLS layer, not to this decoder.
        """
        self._check_usable()
        rest = _copy(self._buf, self._pos, len(self._buf))
        self._buf = b""
        self._advance(0)
        return rest

    @property
    def at_message_boundary(self) -> bool:
        """True unless the decoder is inside a signed message or a payload.

        A connection that ends while this is False was cut mid-message.
        """
        return self._state is _LINE

    @property
    def buffered(self) -> int:
        """How many received bytes are held, not yet turned into events."""
        return len(self._buf) - self._pos

    # -- internals ----------------------------------------------------------

    def _check_usable(self) -> None:
        if self._error is not None:
            raise WireError("decoder already failed: %s" % (self._error,))

    def _advance(self, count: int) -> None:
        self._pos += count
        self._scanned = 0
        self._line_limit = self._max_line
        self._sniffed = None
        if self._pos >= len(self._buf):
            self._buf = b""
            self._pos = 0

    def _next_event(self) -> Event | None:
        while True:
            state = self._state
            if state is _CHUNK_DATA:
                return self._chunk_data()
            if state is _CHUNK_HEADER:
                if not self._chunk_header():
                    return None
                if self._state is _LINE:
                    return PayloadEnd()
                continue
            end = self._find_line_end()
            if end is None:
                return None
            if state is _SIGNATURE:
                return self._signature_line(end)
            message = self._message_line(end)
            if message is not None:
                return message

    def _find_line_end(self) -> int | None:
        """Index of the newline ending the current line, or None if it has not arrived."""
        buf, pos = self._buf, self._pos
        available = len(buf) - pos
        limit = self._line_limit
        if self._state is _SIGNATURE:
            limit = min(limit, MAX_SIGNATURE_LINE)
        stop = pos + min(available, limit + 1)
        end = buf.find(b"\n", pos + self._scanned, stop)
        if end >= 0:
            return end
        if (self._type_limits is not None and self._state is _LINE
                and self._sniffed is None and available >= _SNIFF_BYTES):
            self._sniffed = _sniff_type(buf, pos)
            if self._sniffed is not None:
                # The prefix (`!`, `$`, `$!`) counts towards the line, not the text.
                limit = self._line_limit = min(
                    self._max_line, self._type_limits.for_type(self._sniffed) + 2)
        if available > limit:
            if self._sniffed is not None and self._state is _LINE:
                raise WireError("a %r message is over the %d bytes that type may hold"
                                % (self._sniffed, limit - 2))
            raise WireError(
                "%s longer than %d bytes" % (
                    "signature line" if self._state is _SIGNATURE else "line", limit))
        self._scanned = available
        return None

    def _message_line(self, end: int) -> Message | None:
        """Parse the line ending at ``end``; None for lines the framing says to skip."""
        buf, pos = self._buf, self._pos
        if end == pos:
            self._advance(1)
            return None
        first = buf[pos]
        signed = has_payload = False
        if first == _OPEN_BRACE:
            start = pos
        elif first == _BANG:
            start = pos + 1
            has_payload = True
        elif first == _DOLLAR:
            signed = True
            start = pos + 1
            if end > start and buf[start] == _BANG:
                start += 1
                has_payload = True
        else:
            self._advance(end + 1 - pos)
            return None
        try:
            # Counted in the receive buffer: a line refused here is never copied.
            jsonshape.check_items(buf, self._max_items, start, end)
        except jsonshape.ShapeError as e:
            raise WireError("message line refused: %s" % (e,)) from None
        sniffed = self._sniffed
        text = _copy(buf, start, end)
        self._advance(end + 1 - pos)
        body = _parse_body(text, None, self._max_depth, self._type_limits, sniffed)
        if signed:
            self._signed = (body, text, has_payload)
            self._state = _SIGNATURE
            return None
        if has_payload:
            self._state = _CHUNK_HEADER
        return Message(body, text, None, has_payload)

    def _signature_line(self, end: int) -> Message:
        line = _copy(self._buf, self._pos, end)
        self._advance(end + 1 - self._pos)
        try:
            signature = base64.b64decode(line, validate=True)
        except (binascii.Error, ValueError):
            raise WireError("signature line is not valid base64") from None
        if not signature:
            raise WireError("signature line is empty")
        assert self._signed is not None
        body, text, has_payload = self._signed
        self._signed = None
        self._state = _CHUNK_HEADER if has_payload else _LINE
        return Message(body, text, signature, has_payload)

    def _chunk_header(self) -> bool:
        """Consume one chunk header; False if it has not fully arrived."""
        buf, pos = self._buf, self._pos
        available = len(buf) - pos
        window = min(available, _MAX_HEADER_DIGITS + 1)
        end = buf.find(b"\n", pos, pos + window)
        if end < 0:
            # Fail as soon as the bytes so far cannot start a valid header.
            if window and not _copy(buf, pos, pos + window).isdigit():
                raise WireError("chunk header is not ASCII decimal digits")
            if available > _MAX_HEADER_DIGITS:
                raise WireError(
                    "chunk header longer than %d digits" % (_MAX_HEADER_DIGITS,))
            return False
        digits = _copy(buf, pos, end)
        # bytes.isdigit() accepts ASCII 0-9 only: no sign, space or other digits.
        if not digits.isdigit():
            raise WireError("chunk header is not 1 to %d ASCII decimal digits"
                            % (_MAX_HEADER_DIGITS,))
        size = int(digits)
        if size > self._max_chunk:
            raise WireError("payload chunk of %d bytes exceeds the limit of %d"
                            % (size, self._max_chunk))
        self._advance(end + 1 - pos)
        if size == 0:
            self._state = _LINE
        else:
            self._remaining = size
            self._state = _CHUNK_DATA
        return True

    def _chunk_data(self) -> PayloadChunk | None:
        pos = self._pos
        available = len(self._buf) - pos
        if not available:
            return None
        count = min(available, self._remaining)
        data = _copy(self._buf, pos, pos + count)
        self._remaining -= count
        self._advance(count)
        if not self._remaining:
            self._state = _CHUNK_HEADER
        return PayloadChunk(data)


# -- encoding -----------------------------------------------------------------


def dumps(body: dict) -> bytes:
    """Compact UTF-8 JSON text of a message; JSON escapes keep it on one line.

    Raises TypeError/ValueError for a body that is not a dict with a string
    ``type``, or that holds NaN/Infinity (peers must refuse those).
    """
    if not isinstance(body, dict):
        raise TypeError("a wire message must be a dict, not %s" % (type(body).__name__,))
    if not isinstance(body.get("type"), str):
        raise ValueError("a wire message needs a string 'type'")
    text = json.dumps(body, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        # Lone surrogates have no UTF-8 form; \u escapes still carry them.
        return json.dumps(body, separators=(",", ":"), allow_nan=False).encode("ascii")


def _line(prefix: bytes, text: bytes) -> bytes:
    if len(prefix) + len(text) > MAX_LINE_LENGTH:
        raise ValueError("message line would exceed %d bytes" % (MAX_LINE_LENGTH,))
    return prefix + text + b"\n"


def encode(body: dict) -> bytes:
    """A plain message line."""
    return _line(b"", dumps(body))


def encode_payload_start(body: dict) -> bytes:
    """The ``!`` line announcing a payload; send chunks and :data:`PAYLOAD_END` after it."""
    return _line(b"!", dumps(body))


def encode_chunk_header(length: int) -> bytes:
    """The header of a payload chunk, for writing its data separately without a copy."""
    if not 1 <= length <= MAX_CHUNK_SIZE:
        raise ValueError("payload chunk length must be 1 to %d, not %d"
                         % (MAX_CHUNK_SIZE, length))
    return b"%d\n" % (length,)


def encode_chunk(data: bytes) -> bytes:
    """One payload chunk: header plus data (empty data is not a chunk; use PAYLOAD_END)."""
    return encode_chunk_header(len(data)) + data


def encode_with_payload(body: dict, payload: bytes) -> bytes:
    """A whole ``!`` message for a payload already in memory."""
    parts = [encode_payload_start(body)]
    with memoryview(payload) as view:
        for offset in range(0, len(view), SEND_CHUNK_SIZE):
            piece = view[offset:offset + SEND_CHUNK_SIZE]
            parts.append(encode_chunk_header(len(piece)))
            parts.append(piece)
        parts.append(PAYLOAD_END)
        return b"".join(parts)


def encode_signed(text: bytes, signature: bytes, has_payload: bool = False) -> bytes:
    """A ``$`` (or ``$!``) line plus its signature line.

    ``text`` is the exact JSON the signature covers (normally ``dumps(body)``).
    With ``has_payload`` the caller sends chunks and :data:`PAYLOAD_END` next.
    """
    if not text or b"\n" in text:
        raise ValueError("signed text must be one non-empty line")
    if not signature:
        raise ValueError("signature must not be empty")
    encoded = base64.b64encode(signature)
    if len(encoded) > MAX_SIGNATURE_LINE:
        raise ValueError("signature line would exceed %d bytes" % (MAX_SIGNATURE_LINE,))
    return _line(b"$!" if has_payload else b"$", text) + encoded + b"\n"
