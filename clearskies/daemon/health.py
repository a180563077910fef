"""Share health: how long a share and its peers have gone without syncing.

Each share remembers when it was last in sync with a connected peer (kept
in the stored settings, so a restart does not make an old share look fresh)
and each peer when it was last seen (its ``last_seen`` in the peers table,
refreshed while it stays connected).  ``clearskies status DIR`` warns once
either is older than the ``stale_after`` setting, and exits 1.

:func:`stale_warnings` is the pure rule; :class:`ShareHealth` follows the
running shares on a timer and keeps the times.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from clearskies.sync.sealed import sessions as sealed

#: Config key: share ID → {"last_in_sync": time or null, "since": time}.
HEALTH_KEY = "share_health"
#: How often the running shares are looked at (seconds).
HEALTH_INTERVAL = 60.0
#: A time moves on in memory at once, but is written to disk at most this
#: often (and when the daemon stops): a crash loses at most this much.
SAVE_SPACING = 600.0


@dataclass
class HealthTimes:
    """What is kept per share: when it was last in sync with a peer (None:
    never, as far as this daemon knows) and since when it is followed."""

    last_in_sync: float | None
    since: float

    def to_dict(self) -> dict[str, Any]:
        return {"last_in_sync": self.last_in_sync, "since": self.since}

    @classmethod
    def from_dict(cls, value: Any, now: float) -> HealthTimes:
        if not isinstance(value, dict):
            return cls(None, now)
        last = value.get("last_in_sync")
        since = value.get("since")
        return cls(float(last) if isinstance(last, (int, float)) else None,
                   float(since) if isinstance(since, (int, float)) else now)


@dataclass(frozen=True)
class PeerSighting:
    """A peer as the health rule sees it."""

    peer_id: str
    name: str | None
    last_seen: float | None
    connected: bool


def _ago(seconds: float) -> str:
    days, hours = int(seconds // 86400), int(seconds % 86400 // 3600)
    if days:
        return "%d day%s" % (days, "" if days == 1 else "s")
    if hours:
        return "%d hour%s" % (hours, "" if hours == 1 else "s")
    return "%d s" % int(seconds)


def stale_warnings(now: float, stale_after: float, times: HealthTimes, in_sync_now: bool,
                   peers: Iterable[PeerSighting]) -> list[str]:
    """The warnings for one share (empty when all is well; ``stale_after`` 0: none).

    The share: not in sync with any peer for longer than ``stale_after``
    (counted from when it was followed, if it never was).  Each peer: not
    seen for longer than that (a connected peer is seen now).
    """
    if stale_after <= 0:
        return []
    warnings = []
    if not in_sync_now:
        reference = times.last_in_sync if times.last_in_sync is not None else times.since
        if now - reference > stale_after:
            if times.last_in_sync is None:
                warnings.append("not in sync with any peer since it was set up here, %s ago"
                                % _ago(now - reference))
            else:
                warnings.append("not in sync with any peer for %s" % _ago(now - reference))
    for peer in sorted(peers, key=lambda p: p.peer_id):
        if peer.connected:
            continue
        seen = peer.last_seen if peer.last_seen is not None else times.since
        if now - seen > stale_after:
            warnings.append("peer %s not seen for %s" % (peer.name or peer.peer_id[:16],
                                                        _ago(now - seen)))
    return warnings


class ShareHealth:
    """The health times of every share the daemon runs.

    ``runtimes`` gives the running share runtimes; ``resources`` the clock,
    the stored settings and their saving (``daemon.resources.Resources``).
    """

    _log = Logger()

    def __init__(self, resources: Any, runtimes: Callable[[], Iterable[Any]]) -> None:
        self._resources = resources
        self._runtimes = runtimes
        self._times: dict[str, HealthTimes] = {}
        self._saved_at: float | None = None
        self._dirty = False
        self._peer_refreshed: dict[tuple[str, str], float] = {}

    def now(self) -> float:
        return float(self._resources.now())

    def stale_after(self) -> float:
        value = self._resources.config.get("stale_after")
        return float(value) if isinstance(value, (int, float)) and \
            not isinstance(value, bool) else 7 * 86400.0

    def times(self, share_id: str) -> HealthTimes:
        """A share's times (read from the stored settings the first time)."""
        times = self._times.get(share_id)
        if times is None:
            stored = self._resources.config.get(HEALTH_KEY) or {}
            times = HealthTimes.from_dict(stored.get(share_id) if isinstance(stored, dict)
                                          else None, self.now())
            self._times[share_id] = times
            self._dirty = True
        return times

    @staticmethod
    def in_sync_now(runtime: Any) -> bool:
        """In sync with at least one connected peer, and the share itself settled."""
        sync = runtime.sync
        peers_in_sync = (bool(sync.sessions) and any(s.in_sync for s in sync.sessions.values())
                         or sealed.in_sync(getattr(runtime, "sealed", None)))
        return peers_in_sync and runtime.service.status.state not in ("scanning", "starting",
                                                                      "error")

    def check(self) -> None:
        """(Every HEALTH_INTERVAL.)  Note what is in sync and who is connected; save now and then."""
        now = self.now()
        for runtime in list(self._runtimes()):
            times = self.times(runtime.share_id)
            if self.in_sync_now(runtime):
                times.last_in_sync = now
                self._dirty = True
            for peer_id in list(runtime.sync.sessions) + sealed.connected(
                    getattr(runtime, "sealed", None)):
                key = (runtime.share_id, peer_id)
                if now - self._peer_refreshed.get(key, float("-inf")) >= SAVE_SPACING:
                    self._peer_refreshed[key] = now
                    runtime.peer_seen(peer_id)
        if self._dirty and (self._saved_at is None or now - self._saved_at >= SAVE_SPACING):
            self.save().addErrback(lambda f: self._log.failure("could not keep share health", f))

    def save(self) -> Deferred[None]:
        """Write every share's times to the stored settings."""
        self._saved_at = self.now()
        self._dirty = False
        live = {runtime.share_id for runtime in self._runtimes()}
        value = {share_id: times.to_dict() for share_id, times in self._times.items()
                 if share_id in live}
        return Deferred.fromCoroutine(self._resources.save_config(HEALTH_KEY, value))

    def forget(self, share_id: str) -> None:
        """A share was removed: its times go with the next save."""
        self._times.pop(share_id, None)
        self._dirty = True

    def warnings(self, runtime: Any) -> list[str]:
        """What ``status`` warns about for ``runtime``'s share."""
        sessions = set(runtime.sync.sessions) | set(
            sealed.connected(getattr(runtime, "sealed", None)))
        peers = [PeerSighting(p.peer_id, p.name, p.last_seen, p.peer_id in sessions)
                 for p in runtime.peers.values()]
        in_sync = self.in_sync_now(runtime)
        times = self.times(runtime.share_id)
        if in_sync:
            times.last_in_sync = self.now()
        return stale_warnings(self.now(), self.stale_after(), times, in_sync, peers)

    def summary(self, runtime: Any) -> dict[str, Any]:
        """The health fields of ``runtime``'s status."""
        times = self.times(runtime.share_id)
        out: dict[str, Any] = {"last_in_sync": times.last_in_sync}
        warnings = self.warnings(runtime)
        if warnings:
            out["warnings"] = warnings
        return out
