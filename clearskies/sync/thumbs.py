"""Extension ``thumbnails`` (protocol/thumbnails.md): a thumbnail instead of the file.

One :class:`ThumbnailExchange` per connection, both roles:

- **asking**: :meth:`ThumbnailExchange.ask` sends ``thumbnail.get`` naming a
  path and the SHA-256 of the content wanted; the ``thumbnail.data`` answer's
  payload (at most :data:`MAX_PAYLOAD` bytes) fires the returned Deferred,
  a ``thumbnail.error`` fails it.  At most :data:`MAX_ASKING` asks are
  outstanding; each gives up after :data:`ASK_TIMEOUT` seconds.  An answer
  to nothing we asked, or a payload over the limit, is a protocol error.
- **answering**: a peer's ``thumbnail.get`` is checked (shape, rate) and
  handed to the daemon's ``answer(path, sha256)``, which refuses what is
  ignored, outside the share, not held here or not an image.  At most
  :data:`MAX_ANSWERING` answers are made at once and :data:`BURST` asks
  are allowed in a burst, refilled one per :data:`REFILL_EVERY` seconds;
  beyond that the ask is refused with ``busy``, and a peer that keeps
  asking past :data:`FLOOD` refusals in a row is disconnected.

Without the feature on both sides nothing here sends anything, and what
arrives is ignored (a ``thumbnail.data`` payload is a protocol error: it
answers nothing).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from clearskies import wire
from clearskies.errors import ProtocolError, UnsafePathError
from clearskies.share.records import validate_wire_path
from clearskies.thumbnails import Busy, ThumbnailError

FEATURE = "thumbnails"
"""The feature string of the extension (protocol/handshake.md, protocol/thumbnails.md)."""

MAX_PAYLOAD = 256 * 1024
"""Largest thumbnail payload accepted (bytes); a bigger one closes the connection."""
MAX_ASKING = 4
"""Asks we keep outstanding on one connection."""
ASK_TIMEOUT = 30.0
"""Seconds we wait for an answer."""
MAX_ANSWERING = 4
"""Answers being made for one connection at once; more asks are refused ``busy``."""
BURST = 32
REFILL_EVERY = 0.25
"""Asks a peer may send in a burst, and the seconds that give back one (4 a second)."""
FLOOD = 256
"""Refused asks in a row after which the connection is closed."""
MAX_ID = 2 ** 31
ERROR_CODES = frozenset({"not_found", "not_an_image", "too_large", "bad_image", "changed",
                         "busy", "refused", "not_supported"})

Answer = Callable[[str, str], Deferred[bytes]]


class ThumbnailIntake:
    """A ``thumbnail.data`` payload arriving for ask ``ask_id`` (bounded)."""

    def __init__(self, ask_id: int, path: str) -> None:
        self.ask_id = ask_id
        self.path = path
        self.chunks: list[bytes] = []
        self.received = 0

    def write(self, data: bytes) -> None:
        self.received += len(data)
        if self.received > MAX_PAYLOAD:
            raise ProtocolError("thumbnail.data for %r is larger than %d bytes"
                                % (self.path, MAX_PAYLOAD))
        self.chunks.append(bytes(data))

    def abort(self, keep_partial: bool) -> None:
        self.chunks = []


def _sha256(value: Any) -> str:
    if not isinstance(value, str) or len(value) != 64 or value.strip("0123456789abcdef"):
        raise ValueError("sha256 must be 64 lower-case hex digits")
    return value


class ThumbnailExchange:
    """One connection's ``thumbnails`` asks and answers."""

    _log = Logger()

    def __init__(self, peer_id: str, features: tuple[str, ...] | list[str], access: str,
                 clock: IReactorTime, *, write: Callable[[bytes], None]) -> None:
        self.peer_id = peer_id
        self.negotiated = FEATURE in (features or ()) and access in ("read_write", "read_only")
        self._clock = clock
        self._write = write
        self._answer: Answer | None = None
        self._asking: dict[int, tuple[Deferred[bytes], str, Any]] = {}
        self._next_id = 1
        self._answering = 0
        self._allowance = float(BURST)
        self._counted_at = clock.seconds()
        self._refused_in_a_row = 0
        self._stopped = False

    def connect(self, answer: Answer) -> None:
        """The daemon's side: ``answer(path, sha256)`` makes the thumbnail we send."""
        self._answer = answer

    # -- asking ------------------------------------------------------------------

    @property
    def can_ask(self) -> bool:
        return self.negotiated and not self._stopped and len(self._asking) < MAX_ASKING

    def ask(self, path: str, sha256: str) -> Deferred[bytes]:
        """The peer's thumbnail of ``path`` holding ``sha256``: JPEG bytes (unchecked), or
        ThumbnailError (what the peer said, a timeout, a lost connection) or Busy."""
        if not self.negotiated or self._stopped:
            return fail(ThumbnailError("not_supported", "the peer does not offer thumbnails"))
        if len(self._asking) >= MAX_ASKING:
            return fail(Busy())
        ask_id = self._next_id
        self._next_id = self._next_id % MAX_ID + 1
        d: Deferred[bytes] = Deferred()
        timer = self._clock.callLater(ASK_TIMEOUT, self._timed_out, ask_id)
        self._asking[ask_id] = (d, path, timer)
        self._write(wire.encode({"type": "thumbnail.get", "id": ask_id, "path": path,
                                 "sha256": sha256}))
        return d

    def _settle(self, ask_id: int) -> Deferred[bytes] | None:
        entry = self._asking.pop(ask_id, None)
        if entry is None:
            return None
        d, _, timer = entry
        if timer.active():
            timer.cancel()
        return d

    def _timed_out(self, ask_id: int) -> None:
        d = self._settle(ask_id)
        if d is not None:
            d.errback(ThumbnailError("not_found", "the peer did not answer within %d s"
                                     % ASK_TIMEOUT))

    def on_data(self, body: dict, event: wire.Message) -> ThumbnailIntake:
        """``thumbnail.data``: its payload is taken by the returned intake."""
        if not event.has_payload:
            raise ProtocolError("thumbnail.data without a payload")
        ask_id = body.get("id")
        entry = self._asking.get(ask_id) if isinstance(ask_id, int) and \
            not isinstance(ask_id, bool) else None
        if entry is None:
            raise ProtocolError("thumbnail.data answering nothing we asked (id %r)"
                                % (ask_id,))
        size = body.get("size")
        if isinstance(size, int) and not isinstance(size, bool) and size > MAX_PAYLOAD:
            raise ProtocolError("thumbnail.data of %d bytes, over %d" % (size, MAX_PAYLOAD))
        return ThumbnailIntake(ask_id, entry[1])

    def data_ended(self, intake: ThumbnailIntake) -> None:
        d = self._settle(intake.ask_id)
        if d is not None:
            d.callback(b"".join(intake.chunks))

    def on_error(self, body: dict, event: wire.Message) -> None:
        """``thumbnail.error``: the ask it answers fails (an unasked one is ignored)."""
        if not self.negotiated:
            return
        ask_id = body.get("id")
        d = self._settle(ask_id) if isinstance(ask_id, int) else None
        if d is None:
            return
        code = body.get("code")
        message = str(body.get("message", ""))[:200]
        if code == "busy":
            d.errback(Busy())
        else:
            d.errback(ThumbnailError(code if code in ERROR_CODES else "not_found",
                                     "the peer has no thumbnail: %s" % message))

    # -- answering ---------------------------------------------------------------

    def on_get(self, body: dict, event: wire.Message) -> None:
        """``thumbnail.get`` from the peer: answered with data or an error, never ignored
        (once negotiated)."""
        if not self.negotiated:
            return
        ask_id = body.get("id")
        if isinstance(ask_id, bool) or not isinstance(ask_id, int) or not 0 < ask_id <= MAX_ID:
            raise ProtocolError("thumbnail.get needs an id from 1 to %d" % MAX_ID)
        try:
            path = validate_wire_path(body.get("path"))
            sha256 = _sha256(body.get("sha256"))
        except (UnsafePathError, ValueError) as e:
            self._refuse(ask_id, None, "refused", str(e))
            return
        if not self._spend() or self._answering >= MAX_ANSWERING or self._answer is None:
            self._refused_in_a_row += 1
            if self._refused_in_a_row > FLOOD:
                raise ProtocolError("over %d thumbnail.get refused in a row: a flood" % FLOOD)
            if self._answer is None:
                self._refuse(ask_id, path, "not_supported", "no thumbnails here")
            else:
                self._refuse(ask_id, path, "busy", "too many thumbnail requests; ask later")
            return
        self._refused_in_a_row = 0
        self._answering += 1
        try:
            d = self._answer(path, sha256)
        except Exception:
            d = fail(Failure())
        d.addCallbacks(self._answered, self._not_answered, callbackArgs=(ask_id, path),
                       errbackArgs=(ask_id, path))

    def _spend(self) -> bool:
        now = self._clock.seconds()
        self._allowance = min(float(BURST),
                              self._allowance + (now - self._counted_at) / REFILL_EVERY)
        self._counted_at = now
        if self._allowance < 1:
            return False
        self._allowance -= 1
        return True

    def _answered(self, data: bytes, ask_id: int, path: str) -> None:
        self._answering -= 1
        if self._stopped:
            return
        if not 0 < len(data) <= MAX_PAYLOAD:
            self._refuse(ask_id, path, "too_large", "the thumbnail is over %d bytes"
                         % MAX_PAYLOAD)
            return
        self._write(wire.encode_with_payload(
            {"type": "thumbnail.data", "id": ask_id, "path": path, "size": len(data),
             "content_type": "image/jpeg"}, data))

    def _not_answered(self, failure: Failure, ask_id: int, path: str) -> None:
        self._answering -= 1
        if self._stopped:
            return
        if failure.check(ThumbnailError):
            self._refuse(ask_id, path, failure.value.code, failure.value.message)
        elif failure.check(Busy):
            self._refuse(ask_id, path, "busy", "too many thumbnails being made; ask later")
        else:
            self._log.failure("making a thumbnail of {path} for {peer}", failure, path=path,
                              peer=self.peer_id[:8])
            self._refuse(ask_id, path, "not_found", "no thumbnail could be made")

    def _refuse(self, ask_id: int, path: Any, code: str, message: str) -> None:
        if self._stopped:
            return
        self._write(wire.encode({"type": "thumbnail.error", "id": ask_id,
                                 "path": path if isinstance(path, str) else "",
                                 "code": code, "message": message[:200]}))

    def stop(self) -> None:
        """The connection is gone: outstanding asks fail, nothing more is sent."""
        self._stopped = True
        for ask_id in list(self._asking):
            d = self._settle(ask_id)
            if d is not None:
                d.errback(ThumbnailError("not_found", "the connection to the peer ended"))


__all__ = ["FEATURE", "MAX_PAYLOAD", "ThumbnailExchange", "ThumbnailIntake"]
