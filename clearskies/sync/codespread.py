"""Extension ``code_spread`` (protocol/code_spread.md): access codes shared with peers.

A connection that negotiated the feature exchanges the share's access codes
its level may know: ``code_spread.list`` once at the start, then
``code_spread.update`` when one changes (made, used, cancelled).  This
module is the wire side, one :class:`CodeExchange` per connection: what
goes out is filtered by the connection's level, what comes in is checked
(shape, size, level, rate) before the daemon's codes see it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from clearskies import wire
from clearskies.errors import ProtocolError

FEATURE = "code_spread"
#: Codes in one message, at most: a longer list is refused (the connection closes).
MAX_CODES_PER_MESSAGE = 256
#: Messages a peer may send in a burst, and how fast the allowance refills.
BURST = 8
REFILL_EVERY = 2.0
#: Our own updates are gathered and sent at most this often (below REFILL_EVERY).
SEND_EVERY = 2.5
#: The levels a code may hand out, by rank.
_RANK = {"read_only": 1, "read_write": 2}
_HEX = re.compile(r"(?:[0-9a-f]{32}|[0-9a-f]{64})")
#: Times beyond this (unix seconds, about the year 5138) are not times.
_MAX_TIME = 1e11


def rank(level: str) -> int:
    """How much a level may do (0: it may know no access code)."""
    return _RANK.get(level, 0)


@dataclass(frozen=True)
class SpreadCode:
    """One access code as peers exchange it."""

    code: bytes
    level: str
    one_time: bool
    created: float
    expires: float | None
    revoked: bool = False
    used: bool = False
    utime: float = 0.0

    def to_wire(self) -> dict[str, Any]:
        return {"code": self.code.hex(), "level": self.level, "one_time": self.one_time,
                "created": self.created, "expiration": self.expires,
                "revoked": self.revoked, "used": self.used, "utime": self.utime}

    def __repr__(self) -> str:  # the code is a secret: never in a log
        return "SpreadCode(level=%r, one_time=%r)" % (self.level, self.one_time)


def _time(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or not 0 <= value <= _MAX_TIME:
        raise ValueError("%s must be a time" % what)
    return float(value)


def parse_code(entry: Any) -> SpreadCode:
    """One code of a list; ValueError saying what is wrong."""
    if not isinstance(entry, dict):
        raise ValueError("a code must be an object")
    text = entry.get("code")
    if not isinstance(text, str) or not _HEX.fullmatch(text):
        raise ValueError("code must be 32 or 64 lower-case hex digits")
    level = entry.get("level")
    if not isinstance(level, str) or rank(level) == 0:
        raise ValueError("level must be read_write or read_only")
    flags = {}
    for key in ("one_time", "revoked", "used"):
        value = entry.get(key, False)
        if not isinstance(value, bool):
            raise ValueError("%s must be true or false" % key)
        flags[key] = value
    expiration = entry.get("expiration")
    return SpreadCode(bytes.fromhex(text), level, flags["one_time"],
                      _time(entry.get("created"), "created"),
                      None if expiration is None else _time(expiration, "expiration"),
                      flags["revoked"], flags["used"],
                      _time(entry.get("utime", 0), "utime"))


def parse_codes(body: dict[str, Any], access: str) -> tuple[list[SpreadCode], list[str]]:
    """The codes of a ``code_spread`` message on a connection of level ``access``, and
    why each refused one was refused (malformed, or above the connection's level:
    a peer cannot hand out more than it holds).

    ProtocolError for a message that is not a list of at most MAX_CODES_PER_MESSAGE.
    """
    entries = body.get("codes")
    if not isinstance(entries, list) or len(entries) > MAX_CODES_PER_MESSAGE:
        raise ProtocolError("%s needs a list of at most %d codes"
                            % (body.get("type"), MAX_CODES_PER_MESSAGE))
    codes, refused = [], []
    for entry in entries:
        try:
            code = parse_code(entry)
        except ValueError as e:
            refused.append(str(e))
            continue
        if rank(code.level) > rank(access):
            refused.append("a %s code on a %s connection" % (code.level, access))
            continue
        codes.append(code)
    return codes, refused


class CodeExchange:
    """One connection's ``code_spread`` messages, both ways.

    Inert until :meth:`connect` gives it the daemon's side: ``outgoing(access)``,
    the codes a connection of that level may learn, and ``incoming(codes)``,
    what to do with the peer's (already checked).
    """

    _log = Logger()

    def __init__(self, peer_id: str, features: tuple[str, ...] | list[str], access: str,
                 clock: IReactorTime, *, send: Callable[[dict[str, Any]], None]) -> None:
        self.peer_id = peer_id
        self.access = access
        self.negotiated = FEATURE in (features or ()) and rank(access) > 0
        self._clock = clock
        self._send = send
        self._outgoing: Callable[[str], list[SpreadCode]] | None = None
        self._incoming: Callable[[list[SpreadCode]], None] | None = None
        self._allowance = float(BURST)
        self._counted_at = clock.seconds()
        self._list_seen = False
        self._waiting: dict[bytes, SpreadCode] = {}
        self._flush_call: Any = None
        self._stopped = False

    def connect(self, outgoing: Callable[[str], list[SpreadCode]],
                incoming: Callable[[list[SpreadCode]], None]) -> None:
        self._outgoing, self._incoming = outgoing, incoming

    def start(self) -> None:
        """Send our list (the codes this connection's level may know), once."""
        if not self.negotiated or self._outgoing is None:
            return
        codes = [c for c in self._outgoing(self.access) if rank(c.level) <= rank(self.access)]
        self._send({"type": "code_spread.list",
                    "codes": [c.to_wire() for c in codes[:MAX_CODES_PER_MESSAGE]]})

    def send_update(self, codes: list[SpreadCode]) -> None:
        """Codes that changed here; only those this connection's level may know go out,
        gathered into one message every SEND_EVERY seconds (the peer's rate limit)."""
        if not self.negotiated or self._outgoing is None or self._stopped:
            return
        for code in codes:
            if rank(code.level) <= rank(self.access):
                self._waiting[code.code] = code
        if self._waiting and self._flush_call is None:
            self._flush_call = self._clock.callLater(SEND_EVERY, self._flush)

    def _flush(self) -> None:
        self._flush_call = None
        if self._stopped or not self._waiting:
            return
        codes = list(self._waiting.values())[:MAX_CODES_PER_MESSAGE]
        for code in codes:
            del self._waiting[code.code]
        self._send({"type": "code_spread.update", "codes": [c.to_wire() for c in codes]})
        if self._waiting:
            self._flush_call = self._clock.callLater(SEND_EVERY, self._flush)

    def stop(self) -> None:
        """The connection is gone: nothing more is sent."""
        self._stopped = True
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None

    def _spend(self, kind: str) -> None:
        now = self._clock.seconds()
        self._allowance = min(float(BURST),
                              self._allowance + (now - self._counted_at) / REFILL_EVERY)
        self._counted_at = now
        if self._allowance < 1:
            raise ProtocolError("too many code_spread messages")
        self._allowance -= 1
        if kind == "code_spread.list":
            if self._list_seen:
                raise ProtocolError("a second code_spread.list on one connection")
            self._list_seen = True

    def on_message(self, body: dict, event: wire.Message) -> None:
        """``code_spread.list`` or ``code_spread.update`` from the peer."""
        if not self.negotiated:
            return  # (not negotiated: ignored, as any unknown message)
        self._spend(event.type)
        codes, refused = parse_codes(body, self.access)
        if refused:
            self._log.warn("{peer} sent {count} access code(s) we refused, e.g.: {why}",
                           peer=self.peer_id[:8], count=len(refused), why=refused[0])
        if codes and self._incoming is not None:
            self._incoming(codes)
