"""Which incoming connections may hold a handshake slot (``protocol/handshake.md``, "Admission").

Pure: no sockets, no reactor.  The listening factory tells it when a
connection arrives, sends a well-formed ``start``, proves its key (its TLS
handshake completes) or goes away, always with ``now``; it answers with
verdicts and the connections whose time is up.

Until its key is proven a connection is *unauthenticated* and holds one of
``capacity`` slots.  The rules keep a legitimate peer's chance of a slot high
however many addresses flood the port:

- **Stages.**  A connection is ``arrived`` until its ``start`` line is
  complete, then ``started`` until its TLS handshake completes; then it
  leaves this table (a valid key is never evicted or timed out here).
- **Deadlines shrink under pressure.**  Below half the slots in use, an
  ``arrived`` connection has ``start_timeout`` seconds to send ``start`` and a
  ``started`` one ``handshake_timeout`` seconds from its arrival to prove its
  key.  From half to all slots in use both fall linearly to their minimums.
  Deadlines follow the current pressure, so a flood also shortens the time
  of the connections already waiting.
- **Fair slots when full.**  Connections are grouped by source: a /24 for
  IPv4, a /64 for IPv6, each loopback address alone.  A newcomer to a full
  table evicts the oldest ``arrived`` connection of the most represented
  group (then address): a stalled or slow connection makes way, and a peer
  that answers at once is ``started`` long before it could be chosen.
  Among ``arrived`` connections, groups that recently had connections
  evicted go first (a flood reconnects at once and keeps its connections
  young, so age alone would pick the one peer that waits its turn).  If
  every slot is ``started``, a newcomer evicts the oldest connection of a
  group (or, within its own group, an address) holding at least two more
  slots than its own, or one more if that connection is older than the
  minimum start deadline; otherwise it is refused.

Memory is bounded by ``capacity`` entries.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Callable, Hashable

__all__ = [
    "CAPACITY", "START_TIMEOUT", "MIN_START_TIMEOUT", "HANDSHAKE_TIMEOUT", "MIN_HANDSHAKE_TIMEOUT",
    "PRESSURE", "ARRIVED", "STARTED", "Verdict", "Admission", "source_group",
]

CAPACITY = 64
"""Unauthenticated connections a listener holds at once."""

START_TIMEOUT = 10.0
"""Seconds a connection has to send a complete ``start`` line, without pressure."""

MIN_START_TIMEOUT = 3.0
"""The same with every slot in use."""

HANDSHAKE_TIMEOUT = 20.0
"""Seconds from arrival to a proven key, without pressure."""

MIN_HANDSHAKE_TIMEOUT = 6.0
"""The same with every slot in use."""

PRESSURE = 0.5
"""Share of slots in use above which deadlines start to shrink."""

CHURN_HALF_LIFE = 10.0
"""Seconds over which a group's count of recent evictions halves."""

ARRIVED = "arrived"
STARTED = "started"


def source_group(host: str) -> str:
    """The group an address is counted in: its /24 (IPv4), /64 (IPv6), or itself (loopback)."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.is_loopback:
        return str(address)
    prefix = 24 if address.version == 4 else 64
    return str(ipaddress.ip_network((address, prefix), strict=False))


@dataclass(frozen=True)
class Verdict:
    """Whether a newcomer gets a slot, and whom it displaces."""

    admit: bool
    evict: Hashable | None = None
    reason: str = ""


@dataclass
class _Entry:
    host: str
    group: str
    opened: float
    stage: str = ARRIVED


class Admission:
    """The slot table of one listener; keys are whatever identifies a connection."""

    def __init__(
        self,
        capacity: int = CAPACITY,
        *,
        start_timeout: float = START_TIMEOUT,
        min_start_timeout: float = MIN_START_TIMEOUT,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        min_handshake_timeout: float = MIN_HANDSHAKE_TIMEOUT,
        group: Callable[[str], str] = source_group,
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._start = (min(min_start_timeout, start_timeout), start_timeout)
        self._handshake = (min(min_handshake_timeout, handshake_timeout), handshake_timeout)
        self._group = group
        self._entries: dict[Hashable, _Entry] = {}
        self._per_group: dict[str, int] = {}
        self._per_host: dict[str, int] = {}
        self._churn: dict[str, tuple[float, float]] = {}  # group → (evictions, as of when)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    # -- deadlines -----------------------------------------------------------------

    def pressure(self) -> float:
        """0 while at most ``PRESSURE`` of the slots are used, rising to 1 when all are."""
        used = len(self._entries) / self.capacity
        return min(1.0, max(0.0, (used - PRESSURE) / (1.0 - PRESSURE)))

    def _scaled(self, bounds: tuple[float, float]) -> float:
        low, high = bounds
        return high - (high - low) * self.pressure()

    def start_timeout(self) -> float:
        """Seconds an ``arrived`` connection has now to send ``start``."""
        return self._scaled(self._start)

    def handshake_timeout(self) -> float:
        """Seconds a connection has now, from arrival, to prove its key."""
        return self._scaled(self._handshake)

    def _deadline(self, entry: _Entry) -> float:
        if entry.stage == ARRIVED:
            return entry.opened + min(self.start_timeout(), self.handshake_timeout())
        return entry.opened + self.handshake_timeout()

    def overdue(self, now: float) -> list[tuple[Hashable, str]]:
        """Connections whose deadline has passed, with a reason; they stay until ``leave``."""
        late = []
        for key, entry in self._entries.items():
            if now >= self._deadline(entry):
                if entry.stage == ARRIVED:
                    reason = "no start message within {:.0f} s".format(self.start_timeout())
                else:
                    reason = "handshake did not finish within {:.0f} s".format(
                        self.handshake_timeout())
                late.append((key, reason))
        return late

    def next_deadline(self) -> float | None:
        """The earliest deadline at the current pressure (None with no connections)."""
        return min((self._deadline(e) for e in self._entries.values()), default=None)

    # -- events ----------------------------------------------------------------------

    def arrive(self, key: Hashable, host: str, now: float) -> Verdict:
        """A connection from ``host`` was accepted; admitted ones are in the table."""
        group = self._group(host)
        verdict = Verdict(True)
        if len(self._entries) >= self.capacity:
            verdict = self._make_room(host, group, now)
            if not verdict.admit:
                return verdict
            assert verdict.evict is not None
            self._evicted(self._entries[verdict.evict].group, now)
            self.leave(verdict.evict)
        self._entries[key] = _Entry(host, group, now)
        self._per_group[group] = self._per_group.get(group, 0) + 1
        self._per_host[host] = self._per_host.get(host, 0) + 1
        return verdict

    def started(self, key: Hashable) -> None:
        """The connection sent a well-formed ``start`` and its key was chosen."""
        entry = self._entries.get(key)
        if entry is not None:
            entry.stage = STARTED

    def leave(self, key: Hashable) -> None:
        """The connection proved its key, failed or closed; its slot is free."""
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        for counts, name in ((self._per_group, entry.group), (self._per_host, entry.host)):
            counts[name] -= 1
            if not counts[name]:
                del counts[name]

    # -- choosing a victim -----------------------------------------------------------------

    def churn(self, group: str, now: float) -> float:
        """Recent evictions from ``group``, decayed with ``CHURN_HALF_LIFE``."""
        count, when = self._churn.get(group, (0.0, now))
        return count * 0.5 ** (max(0.0, now - when) / CHURN_HALF_LIFE)

    def _evicted(self, group: str, now: float) -> None:
        self._churn[group] = (self.churn(group, now) + 1.0, now)
        if len(self._churn) > 4 * self.capacity:  # bounded: forget the calmest group
            calmest = min(self._churn, key=lambda g: self.churn(g, now))
            del self._churn[calmest]

    def _make_room(self, host: str, group: str, now: float) -> Verdict:
        def weight(item: tuple[Hashable, _Entry]) -> tuple[bool, float, int, int, float]:
            entry = item[1]
            arrived = entry.stage == ARRIVED
            # Churn only orders arrived connections: a started one has shown its key.
            churn = round(self.churn(entry.group, now), 1) if arrived else 0.0
            return (arrived, churn, self._per_group[entry.group],
                    self._per_host[entry.host], -entry.opened)

        victim, entry = max(self._entries.items(), key=weight)
        if entry.stage == ARRIVED:
            return Verdict(True, victim, "made room for a newcomer: no start message yet "
                           "while every handshake slot was taken")
        if entry.group != group:
            theirs, ours = self._per_group[entry.group], self._per_group.get(group, 0)
        else:
            theirs, ours = self._per_host[entry.host], self._per_host.get(host, 0)
        if ours + 1 < theirs:
            return Verdict(True, victim, "made room for a newcomer from a source "
                           "holding fewer handshake slots")
        if ours + 1 == theirs and now - entry.opened >= self._start[0]:
            # As many slots as the newcomer would hold, but slow: let the newcomer try.
            return Verdict(True, victim, "made room for a newcomer: the handshake took "
                           "{:.0f} s while every handshake slot was taken".format(
                               now - entry.opened))
        return Verdict(False, None, "all {} handshake slots are taken".format(self.capacity))
