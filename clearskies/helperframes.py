"""The frames between the daemon and its disk helper process (standard library only).

Each frame is a 4-byte big-endian length, then a pickle.  A job is
``(job_id, name, args)``; its answer is ``(job_id, ok, value)``: the
result, or the exception the job raised.  Both ends are the same program
run by the same user, so pickle is no trust boundary here; the length
limit only catches a broken stream.  The daemon's side is
:mod:`clearskies.helperprocess`, the helper's :mod:`clearskies.diskhelper`.
"""

from __future__ import annotations

import pickle
import struct
from typing import Any

#: A job or an answer larger than this is a broken stream (the largest
#: real one, a batch of small downloads, holds a few MiB).
MAX_FRAME = 64 * 1024 * 1024

_LENGTH = struct.Struct(">I")


class FrameError(Exception):
    """The byte stream between daemon and helper is broken (or a value does not pickle)."""


def encode_frame(value: Any) -> list[bytes]:
    """The frame for ``value``: its length prefix and its pickle (two pieces, not copied together).

    Raises :class:`FrameError` when ``value`` does not pickle or is too big.
    """
    try:
        body = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as e:  # PicklingError, or AttributeError/TypeError for closures
        raise FrameError("a value does not pickle: %s" % e) from e
    if len(body) > MAX_FRAME:
        raise FrameError("a frame of %d bytes is over the limit" % len(body))
    return [_LENGTH.pack(len(body)), body]


class FrameReader:
    """Splits a byte stream into frames; holds at most one frame's bytes."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Any]:
        """The values of the frames ``data`` completes, in order (FrameError: broken stream)."""
        self._buffer += data
        frames = []
        start = 0
        try:
            while len(self._buffer) - start >= _LENGTH.size:
                (length,) = _LENGTH.unpack_from(self._buffer, start)
                if length > MAX_FRAME:
                    raise FrameError("a frame of %d bytes is over the limit" % length)
                end = start + _LENGTH.size + length
                if len(self._buffer) < end:
                    break
                with memoryview(self._buffer) as view:
                    try:
                        frames.append(pickle.loads(view[start + _LENGTH.size:end]))
                    except Exception as e:
                        raise FrameError("a frame does not decode: %s" % e) from e
                start = end
        finally:
            del self._buffer[:start]
        return frames
