"""Which kept versions of a share's files to drop: pure rules, no I/O.

When a peer's change replaces or deletes a local file, the old content is
kept (:mod:`clearskies.share.versions`); these rules say how long.  A share
has one :class:`VersionPolicy`:

- ``off``: nothing new is kept;
- ``trash``: every replaced or deleted file is kept;
- ``simple``: the newest ``keep`` versions of each path are kept;
- ``staggered``: versions thin out with age.  Every version under an hour
  old stays; going back from the newest, between two versions of a path
  kept lies at least an hour while they are under a day old, a day while
  under 30 days, a week after that.

In every mode a version older than ``days`` days goes (0: no age limit), and
when the share's kept versions together pass ``max_bytes`` (0: no cap) the
oldest go first until they fit.  The clock comes in as ``now``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

MODES = ("off", "trash", "simple", "staggered")

HOUR = 3600.0
DAY = 24 * HOUR
WEEK = 7 * DAY
#: ``staggered``: (age below which, the spacing kept); older versions keep one per week.
STAGGER = ((HOUR, 0.0), (DAY, HOUR), (30 * DAY, DAY))

MAX_DAYS = 100 * 365
MAX_KEEP = 10_000
MAX_BYTES = 1 << 60

#: A share's settings of how it keeps versions (``share_config``, the CLI's
#: ``config set … --share``) -> the policy's own names.
SHARE_KEYS = {"versions": "mode", "versions_days": "days", "versions_keep": "keep",
              "versions_max_bytes": "max_bytes"}


class PolicyError(ValueError):
    """A value a versions setting may not hold; the message says what it may."""


@dataclass(frozen=True)
class VersionPolicy:
    """How one share keeps the old content peers' changes replace.

    The default, for a share never configured, is ``trash`` for 30 days.
    """

    mode: str = "trash"
    days: float = 30.0
    keep: int = 10
    max_bytes: int = 0

    @property
    def keeping(self) -> bool:
        """True when replaced and deleted files are kept at all."""
        return self.mode != "off"

    def to_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "days": self.days, "keep": self.keep,
                "max_bytes": self.max_bytes}

    @classmethod
    def from_json(cls, value: Any) -> VersionPolicy:
        """A stored policy; anything unreadable gives the default (never an error)."""
        if not isinstance(value, dict):
            return cls()
        policy = cls()
        for key in ("mode", "days", "keep", "max_bytes"):
            if key in value:
                try:
                    policy = policy.with_setting(key, value[key])
                except PolicyError:
                    continue
        return policy

    def with_setting(self, key: str, value: Any) -> VersionPolicy:
        """This policy with one setting changed; PolicyError says what the value may be."""
        if key == "mode":
            if value not in MODES:
                raise PolicyError("versions mode must be one of %s, got %r"
                                  % (", ".join(MODES), value))
            return VersionPolicy(value, self.days, self.keep, self.max_bytes)
        if key == "days":
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not 0 <= value <= MAX_DAYS or value != value:
                raise PolicyError("versions days must be a number of days from 0 (no age "
                                  "limit) to %d" % MAX_DAYS)
            return VersionPolicy(self.mode, float(value), self.keep, self.max_bytes)
        if key == "keep":
            if isinstance(value, bool) or not isinstance(value, int) \
                    or not 1 <= value <= MAX_KEEP:
                raise PolicyError("versions keep must be a whole number of versions per "
                                  "file from 1 to %d" % MAX_KEEP)
            return VersionPolicy(self.mode, self.days, value, self.max_bytes)
        if key == "max_bytes":
            if isinstance(value, bool) or not isinstance(value, int) \
                    or not 0 <= value <= MAX_BYTES:
                raise PolicyError("versions max_bytes must be a whole number of bytes "
                                  "(0: no cap)")
            return VersionPolicy(self.mode, self.days, self.keep, value)
        raise PolicyError("no versions setting %r; settings: mode, days, keep, max_bytes"
                          % (key,))


@dataclass(frozen=True)
class KeptVersion:
    """What the rules need of one kept version."""

    version_id: str
    path: str
    time: float  # when it was replaced or deleted
    size: int


def stagger_spacing(age: float) -> float:
    """``staggered``: the least time between two kept versions of this age."""
    for below, spacing in STAGGER:
        if age < below:
            return spacing
    return WEEK


def to_drop(policy: VersionPolicy, kept: Iterable[KeptVersion], now: float) -> list[str]:
    """The IDs of the versions ``policy`` no longer keeps at ``now``, oldest first."""
    versions = sorted(kept, key=lambda v: (v.time, v.version_id))
    drop: set[str] = set()
    if policy.days > 0:
        limit = now - policy.days * DAY
        drop.update(v.version_id for v in versions if v.time < limit)
    by_path: dict[str, list[KeptVersion]] = {}
    for version in versions:
        if version.version_id not in drop:
            by_path.setdefault(version.path, []).append(version)
    for of_path in by_path.values():
        newest_first = of_path[::-1]
        if policy.mode == "simple":
            drop.update(v.version_id for v in newest_first[policy.keep:])
        elif policy.mode == "staggered":
            drop.update(_thinned(newest_first, now))
    if policy.max_bytes > 0:
        left = [v for v in versions if v.version_id not in drop]
        total = sum(v.size for v in left)
        for version in left:  # oldest first
            if total <= policy.max_bytes:
                break
            drop.add(version.version_id)
            total -= version.size
    return [v.version_id for v in versions if v.version_id in drop]


def _thinned(newest_first: list[KeptVersion], now: float) -> list[str]:
    """``staggered``: walking back from the newest, each version kept is at least
    its age's spacing older than the last one kept; the others go."""
    out: list[str] = []
    last_kept: float | None = None
    for version in newest_first:
        age = max(0.0, now - version.time)
        if last_kept is None or last_kept - version.time >= stagger_spacing(age):
            last_kept = version.time
        else:
            out.append(version.version_id)
    return out


__all__ = ["MODES", "SHARE_KEYS", "KeptVersion", "PolicyError", "VersionPolicy", "stagger_spacing",
           "to_drop"]
