"""Decide which peer addresses to dial, and when.

Every discovery source (manual peers, trackers, LAN announcements) hands its
candidate addresses for a share ID or access ID to one
:class:`ConnectionManager`.  It keeps them in a bounded table and dials the
ones that are due, with these rules (``protocol/discovery.md`` explains why):

- never our own peer IDs or listening addresses;
- one dial in flight per (target, address), and per (target, peer ID) when the
  peer ID is known; no dial to a peer that is already connected for that target;
- LAN addresses first;
- after a failed dial, wait 2 s, then 4 s, … up to 1 minute for that address;
  the wait resets once a connection through it has lasted a minute;
- manual peers are kept and retried forever; tracker and LAN candidates are
  forgotten when no source has announced them for ``expire_after`` seconds;
- when a connection is lost, its address is dialled again shortly after.

The manager never opens sockets itself: ``dial(address, target_id)`` is the
daemon's function that connects and runs the handshake.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from clearskies.addresses import Address, is_lan

SOURCES = ("manual", "tracker", "lan")
#: Candidate addresses kept per share ID or access ID.
MAX_PER_TARGET = 256
#: Targets (share IDs and access IDs) with candidates.
MAX_TARGETS = 4096
#: Dials in flight at once, over all targets.
MAX_DIALS = 8
INITIAL_BACKOFF = 2.0
#: A peer that stays unreachable is dialled once a minute (Syncthing's reconnect
#: interval): one that comes back (a restart, a laptop waking up, an onion
#: service published again) is found within a minute, never ten.
MAX_BACKOFF = 60.0
#: Tracker and LAN candidates not announced for this long are dropped.
EXPIRE_AFTER = 3600.0
#: Wait this long before redialling an address whose connection was lost.
RECONNECT_DELAY = 1.0
#: A connection that lasted this long counts as a success: back-off resets.
STABLE_AFTER = 60.0
#: A dial (connect + handshake) that takes longer than this is cancelled.
DIAL_TIMEOUT = 60.0
#: Even with nothing due, look at the table this often (expiry, connected peers).
TICK_INTERVAL = 30.0

_PEER_ID = re.compile(r"[0-9a-f]{32}")
_WILDCARDS = frozenset(["0.0.0.0", "::"])


@dataclass(eq=False)
class _Candidate:
    target: str
    address: Address
    peer_id: str | None
    lan: bool
    seen: dict[str, float] = field(default_factory=dict)  # source -> last announced
    failures: int = 0
    due: float = 0.0
    dialling: Deferred[Any] | None = None
    connected_since: float | None = None


@dataclass(frozen=True)
class CandidateStatus:
    """A read-only view of one candidate, for status output and tests."""

    target_id: str
    address: Address
    peer_id: str | None
    sources: frozenset[str]
    failures: int
    next_attempt: float
    dialling: bool
    connected: bool


def _short(target_id: str) -> str:
    return target_id[:8]


class ConnectionManager(Service):
    """Collects candidate addresses per target ID and dials them under the rules above.

    ``dial(address, target_id)`` returns a Deferred that fires with the
    established, authenticated connection (if that object has a ``peer_id``
    attribute, the candidate learns its peer ID) or fails.
    ``is_connected(target_id, peer_id)`` says whether we already have a
    connection to that peer for that target, whoever opened it.  The daemon
    calls :meth:`connection_lost` for every connection that ends.
    """

    name = "connection-manager"
    _log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        dial: Callable[[Address, str], Deferred[Any]],
        is_connected: Callable[[str, str], bool],
        own_peer_ids: Callable[[], Iterable[str]],
        own_addresses: Callable[[], Iterable[Address]],
        *,
        protocols: Iterable[str] = ("tcp",),
        max_per_target: int = MAX_PER_TARGET,
        max_targets: int = MAX_TARGETS,
        max_dials: int = MAX_DIALS,
        initial_backoff: float = INITIAL_BACKOFF,
        max_backoff: float = MAX_BACKOFF,
        expire_after: float = EXPIRE_AFTER,
        reconnect_delay: float = RECONNECT_DELAY,
        stable_after: float = STABLE_AFTER,
        dial_timeout: float = DIAL_TIMEOUT,
        tick_interval: float = TICK_INTERVAL,
    ) -> None:
        if max_dials < 1 or max_per_target < 1 or max_targets < 1:
            raise ValueError("max_dials, max_per_target and max_targets must be at least 1")
        self._clock = clock
        self._dial = dial
        self._is_connected = is_connected
        self._own_peer_ids = own_peer_ids
        self._own_addresses = own_addresses
        self._protocols = frozenset(protocols)
        self._max_per_target = max_per_target
        self._max_targets = max_targets
        self._max_dials = max_dials
        self._initial_backoff = initial_backoff
        self._max_backoff = max_backoff
        self._expire_after = expire_after
        self._reconnect_delay = reconnect_delay
        self._stable_after = stable_after
        self._dial_timeout = dial_timeout
        self._tick_interval = tick_interval

        self._targets: dict[str, dict[Address, _Candidate]] = {}
        self._dialling = 0
        self._wake: IDelayedCall | None = None

    # -- lifetime ----------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._wake_in(0)

    def stopService(self) -> None:
        """Stop dialling; cancel the dials in flight (their results are ignored)."""
        super().stopService()
        if self._wake is not None and self._wake.active():
            self._wake.cancel()
        self._wake = None
        for candidates in self._targets.values():
            for candidate in candidates.values():
                self._cancel_dial(candidate)

    # -- what the discovery sources call -----------------------------------

    def add_candidate(
        self,
        target_id: str,
        address: Address,
        peer_id: str | None = None,
        source: str = "manual",
    ) -> bool:
        """Remember (or refresh) an address where ``target_id`` may be served.

        Returns False when the candidate is ignored: our own peer ID or
        address, a transport we do not dial, or a full table.
        """
        if source not in SOURCES:
            raise ValueError("source must be one of %s, not %r" % (", ".join(SOURCES), source))
        if not isinstance(address, Address):
            raise TypeError("address must be an Address, not %s" % (type(address).__name__,))
        if peer_id is not None and not _PEER_ID.fullmatch(peer_id):
            raise ValueError("a peer ID must be 32 lowercase hex characters")
        if address.proto not in self._protocols:
            return False
        if peer_id is not None and peer_id in set(self._own_peer_ids()):
            return False
        if self._is_own_address(address, list(self._own_addresses())):
            return False
        now = self._clock.seconds()
        candidates = self._targets.get(target_id)
        if candidates is None:
            if len(self._targets) >= self._max_targets:
                self._log.warn("ignoring peers for more than {limit} IDs", limit=self._max_targets)
                return False
            candidates = self._targets[target_id] = {}
        candidate = candidates.get(address)
        if candidate is None:
            if len(candidates) >= self._max_per_target and not self._evict_one(candidates):
                self._log.debug(
                    "candidate table for {target} is full; ignoring {address}",
                    target=_short(target_id), address=str(address),
                )
                if not candidates:
                    del self._targets[target_id]
                return False
            candidate = _Candidate(target_id, address, peer_id, is_lan(address.host), due=now)
            candidates[address] = candidate
            self._wake_in(0)
        elif peer_id is not None:
            candidate.peer_id = peer_id
        candidate.seen[source] = now
        return True

    def remove_candidate(self, target_id: str, address: Address) -> None:
        """Forget one address (the user removed a manual peer, or it turned out to be us)."""
        candidates = self._targets.get(target_id)
        if candidates is None:
            return
        candidate = candidates.pop(address, None)
        if candidate is not None:
            self._cancel_dial(candidate)
        if not candidates:
            del self._targets[target_id]

    def remove_target(self, target_id: str) -> None:
        """Forget every candidate of a share or access code that is gone."""
        candidates = self._targets.pop(target_id, {})
        for candidate in candidates.values():
            self._cancel_dial(candidate)

    def connection_lost(self, target_id: str, peer_id: str | None, address: Address | None) -> None:
        """A connection for ``target_id`` ended: dial that peer's addresses again soon."""
        now = self._clock.seconds()
        candidates = self._targets.get(target_id, {})
        retry_at = now + self._reconnect_delay
        candidate = candidates.get(address) if address is not None else None
        if candidate is not None and candidate.connected_since is not None:
            lasted = now - candidate.connected_since
            candidate.connected_since = None
            if lasted >= self._stable_after:
                candidate.failures = 0
            else:
                # Connected and dropped at once: a flapping peer backs off like a failure.
                candidate.failures += 1
                retry_at = now + self._backoff(candidate.failures)
            candidate.due = max(candidate.due, retry_at)
            for source in candidate.seen:
                candidate.seen[source] = now
        if peer_id is not None:
            for other in candidates.values():
                if other.peer_id == peer_id and other.connected_since is None and other is not candidate:
                    other.due = max(other.due, now + self._reconnect_delay)
        self._wake_in(0)

    def retry_now(self, target_id: str) -> None:
        """``target_id`` can be served again (a share out of its error state): dial it now."""
        now = self._clock.seconds()
        for candidate in self._targets.get(target_id, {}).values():
            if candidate.dialling is None and candidate.connected_since is None:
                candidate.failures = 0
                candidate.due = now
        self._wake_in(0)

    def candidates(self, target_id: str) -> list[CandidateStatus]:
        """The current candidates of a target, in the order they would be dialled."""
        found = sorted(self._targets.get(target_id, {}).values(), key=self._order)
        return [
            CandidateStatus(
                c.target, c.address, c.peer_id, frozenset(c.seen), c.failures, c.due,
                c.dialling is not None, c.connected_since is not None,
            )
            for c in found
        ]

    @property
    def dialling(self) -> int:
        """How many dials are in flight."""
        return self._dialling

    # -- internals ---------------------------------------------------------

    @staticmethod
    def _order(candidate: _Candidate) -> tuple[bool, float, int]:
        """LAN addresses first, then the longest overdue."""
        return (not candidate.lan, candidate.due, candidate.failures)

    def _backoff(self, failures: int) -> float:
        if failures <= 0:
            return 0.0
        return min(self._initial_backoff * 2 ** min(failures - 1, 60), self._max_backoff)

    @staticmethod
    def _is_own_address(address: Address, own: list[Address]) -> bool:
        for mine in own:
            if mine.port != address.port or mine.proto != address.proto:
                continue
            if mine.host == address.host:
                return True
            if mine.host in _WILDCARDS and address.host in ("127.0.0.1", "::1", "localhost"):
                return True
        return False

    def _evict_one(self, candidates: dict[Address, _Candidate]) -> bool:
        """Make room by dropping the stalest idle candidate that is not manual."""
        idle = [
            c for c in candidates.values()
            if "manual" not in c.seen and c.dialling is None and c.connected_since is None
        ]
        if not idle:
            return False
        victim = min(idle, key=lambda c: max(c.seen.values(), default=float("-inf")))
        del candidates[victim.address]
        return True

    def _cancel_dial(self, candidate: _Candidate) -> None:
        d, candidate.dialling = candidate.dialling, None
        if d is not None:
            self._dialling -= 1
            d.cancel()

    def _wake_in(self, delay: float) -> None:
        """Run the dial loop after ``delay`` seconds (sooner if already planned sooner)."""
        if not self.running:
            return
        when = self._clock.seconds() + delay
        if self._wake is not None and self._wake.active():
            if self._wake.getTime() <= when:
                return
            self._wake.cancel()
        self._wake = self._clock.callLater(delay, self._run)

    def _run(self) -> None:
        """One pass of the dial loop; a fault in it is logged and retried at the next tick."""
        self._wake = None
        if not self.running:
            return
        try:
            self._run_once()
        except Exception:
            self._log.failure("the dial loop failed; trying again in {delay} s",
                              delay=self._tick_interval)
            self._wake_in(self._tick_interval)

    def _run_once(self) -> None:
        """Expire stale candidates, start due dials, and plan the next wake-up."""
        now = self._clock.seconds()
        self._expire(now)
        own_peers = set(self._own_peer_ids())
        own_addresses = list(self._own_addresses())
        busy: set[tuple[str, str]] = set()
        waiting: list[_Candidate] = []
        for candidates in list(self._targets.values()):
            for c in list(candidates.values()):
                if (c.peer_id is not None and c.peer_id in own_peers) or self._is_own_address(
                    c.address, own_addresses
                ):
                    self.remove_candidate(c.target, c.address)
                    continue
                if c.dialling is not None or c.connected_since is not None:
                    if c.peer_id is not None:
                        busy.add((c.target, c.peer_id))
                    continue
                waiting.append(c)
        waiting.sort(key=self._order)
        next_wake = now + self._tick_interval
        for c in waiting:
            if c.due > now:
                next_wake = min(next_wake, c.due)
                continue
            if c.peer_id is not None:
                key = (c.target, c.peer_id)
                if key in busy or self._is_connected(c.target, c.peer_id):
                    continue  # looked at again after connection_lost or the next tick
            if self._dialling >= self._max_dials:
                next_wake = now  # as soon as a dial finishes (which wakes us anyway)
                break
            if c.peer_id is not None:
                busy.add((c.target, c.peer_id))
            self._start_dial(c)
        if self._dialling < self._max_dials or next_wake > now:
            self._wake_in(max(0.0, next_wake - now))

    def _expire(self, now: float) -> None:
        cutoff = now - self._expire_after
        for target in list(self._targets):
            candidates = self._targets[target]
            for address in list(candidates):
                c = candidates[address]
                for source in [s for s, t in c.seen.items() if s != "manual" and t < cutoff]:
                    del c.seen[source]
                if not c.seen and c.dialling is None and c.connected_since is None:
                    del candidates[address]
            if not candidates:
                del self._targets[target]

    def _start_dial(self, candidate: _Candidate) -> None:
        self._dialling += 1
        self._log.debug(
            "dialling {address} for {target}",
            address=str(candidate.address), target=_short(candidate.target),
        )
        d = maybeDeferred(self._dial, candidate.address, candidate.target)
        d.addTimeout(self._dial_timeout, self._clock)
        candidate.dialling = d
        d.addCallbacks(
            lambda connection: self._dial_succeeded(candidate, d, connection),
            lambda reason: self._dial_failed(candidate, d, reason),
        )
        d.addErrback(lambda f: self._log.failure("dial bookkeeping failed", f))

    def _current(self, candidate: _Candidate, d: Deferred[Any]) -> bool:
        """True if this dial still matters (not cancelled, candidate not removed)."""
        if candidate.dialling is not d:
            return False
        candidate.dialling = None
        self._dialling -= 1
        return self._targets.get(candidate.target, {}).get(candidate.address) is candidate

    def _dial_succeeded(self, candidate: _Candidate, d: Deferred[Any], connection: object) -> None:
        if not self._current(candidate, d):
            return
        now = self._clock.seconds()
        candidate.connected_since = now
        learned = getattr(connection, "peer_id", None)
        if isinstance(learned, str) and _PEER_ID.fullmatch(learned):
            candidate.peer_id = learned
        if candidate.failures:
            self._log.info(
                "reached {address} for {target} after {failures} failed attempts",
                address=str(candidate.address), target=_short(candidate.target),
                failures=candidate.failures,
            )
        self._wake_in(0)

    def _dial_failed(self, candidate: _Candidate, d: Deferred[Any], reason: Failure) -> None:
        if not self._current(candidate, d):
            return  # cancelled on purpose, or the candidate is gone
        candidate.failures += 1
        delay = self._backoff(candidate.failures)
        candidate.due = self._clock.seconds() + delay
        log = self._log.info if candidate.failures == 1 else self._log.debug
        log(
            "could not reach {address} for {target} ({why}); next try in {delay:.0f} s",
            address=str(candidate.address), target=_short(candidate.target),
            why=reason.getErrorMessage() or reason.type.__name__, delay=delay,
        )
        self._wake_in(0)
