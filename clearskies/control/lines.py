"""The control socket's lines: constants, errors, and the sans-IO pieces both ends share.

Kept apart from ``protocol`` (the daemon's Twisted side) so that the CLI's
blocking client loads neither Twisted nor anything else it does not use:
every CLI command starts faster.
"""

from __future__ import annotations

import json
from typing import Any

from clearskies import jsonshape
from clearskies.errors import ClearSkiesError, ProtocolError

SERVICE = "ClearSkies Control"
PROTOCOL_VERSION = 1

#: Longest request line (without its newline) the daemon accepts.
MAX_LINE_LENGTH = 1024 * 1024
#: JSON values one request may hold, and how deep it may nest (requests hold a few).
MAX_REQUEST_ITEMS = 4096
MAX_REQUEST_DEPTH = 32
#: Requests read but not yet answered, per connection, before we stop reading.
MAX_PENDING = 64
#: Events queued for a subscriber that does not read, before we drop it.
MAX_EVENT_BACKLOG = 1000

#: Request types the connection itself answers (subscription is per connection).
SUBSCRIBE = ".events.subscribe"
UNSUBSCRIBE = ".events.unsubscribe"

JSONDict = dict[str, Any]


class ControlError(ClearSkiesError):
    """A request that cannot be carried out; sent back as ``{"error", "message"}``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.message} ({self.code})"

    def to_reply(self) -> JSONDict:
        return {"error": self.code, "message": self.message}


class LineTooLong(ProtocolError):
    """A line longer than the limit the reader was built with."""


def encode_line(message: JSONDict) -> bytes:
    """One compact, ASCII-only JSON line; raises TypeError/ValueError if not JSON-able."""
    return json.dumps(message, separators=(",", ":"), allow_nan=False).encode("ascii") + b"\n"


def _unique_keys(pairs: list[tuple[str, Any]]) -> JSONDict:
    """An object whose keys are all different: with a repeated key, which one counts
    would be a guess (``{"type":"status","type":"stop"}`` must not stop the daemon)."""
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("a key appears twice in one object")
    return out


def parse_request(line: bytes) -> JSONDict:
    """Decode one request line, or raise ``ControlError("bad_request", …)`` saying why.

    What parsing may cost is bounded before the parser runs (``jsonshape``).
    """
    try:
        request = jsonshape.loads(line, MAX_REQUEST_ITEMS, MAX_REQUEST_DEPTH,
                                  object_pairs_hook=_unique_keys)
    except UnicodeDecodeError:
        raise ControlError("bad_request", "request is not valid UTF-8") from None
    except jsonshape.ShapeError as e:
        raise ControlError("bad_request", f"request refused: {e}") from None
    except json.JSONDecodeError as e:
        raise ControlError(
            "bad_request", f"request is not valid JSON: {e.msg} at column {e.colno}"
        ) from None
    except (ValueError, RecursionError) as e:
        raise ControlError("bad_request", "request is not acceptable JSON: %s" % (e,)) from None
    if not isinstance(request, dict):
        raise ControlError("bad_request", "request must be a JSON object")
    if not isinstance(request.get("type"), str):
        raise ControlError("bad_request", 'request needs a string "type"')
    return request


class LineSplitter:
    """Cuts a byte stream into newline-terminated lines, refusing overlong ones.

    Sans-IO and shared by the daemon and the blocking client.  Memory stays
    within ``max_length`` plus whatever was fed since the last complete line.
    """

    def __init__(self, max_length: int) -> None:
        self.max_length = max_length
        self._buffer = bytearray()
        self._start = 0    # where the next line begins
        self._scanned = 0  # bytes before this hold no newline (avoids rescans)

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def next_line(self) -> bytes | None:
        """The next complete line without its newline, or None until more is fed."""
        end = self._buffer.find(b"\n", max(self._start, self._scanned))
        if end == -1:
            del self._buffer[: self._start]
            self._start = 0
            self._scanned = len(self._buffer)
            if len(self._buffer) > self.max_length:
                raise LineTooLong(f"line longer than {self.max_length} bytes")
            return None
        if end - self._start > self.max_length:
            raise LineTooLong(f"line longer than {self.max_length} bytes")
        line = bytes(self._buffer[self._start : end])
        self._start = end + 1
        return line

    def clear(self) -> None:
        self._buffer.clear()
        self._start = self._scanned = 0
