"""The rules saying which kept versions go (clearskies.share.versionpolicy), with a fake clock."""

from __future__ import annotations

import pytest

from clearskies.share.versionpolicy import (
    DAY, HOUR, WEEK, KeptVersion, PolicyError, VersionPolicy, to_drop,
)

NOW = 1_800_000_000.0


def versions(path: str, ages: list[float], size: int = 10) -> list[KeptVersion]:
    return [KeptVersion("%s@%d" % (path, i), path, NOW - age, size) for i, age in enumerate(ages)]


def test_default_is_trash_for_thirty_days() -> None:
    """A share never configured keeps replaced and deleted files 30 days."""
    policy = VersionPolicy()
    assert (policy.mode, policy.days, policy.keeping) == ("trash", 30.0, True)
    kept = versions("a", [0, 29 * DAY, 31 * DAY])
    assert to_drop(policy, kept, NOW) == ["a@2"]


def test_trash_keeps_every_version_within_its_days() -> None:
    """trash: many versions of one path, all younger than the limit, all stay."""
    kept = versions("a", [i * 60.0 for i in range(50)])
    assert to_drop(VersionPolicy("trash", 1), kept, NOW) == []
    assert to_drop(VersionPolicy("trash", 0), versions("a", [1000 * DAY]), NOW) == []


def test_simple_keeps_the_newest_n_of_each_path() -> None:
    """simple: the newest ``keep`` of each path stay, per path, whatever their age."""
    policy = VersionPolicy("simple", days=0, keep=2)
    kept = versions("a", [5, 1, 3, 400 * DAY]) + versions("b", [2])
    assert sorted(to_drop(policy, kept, NOW)) == ["a@0", "a@3"]


def test_age_limit_applies_in_every_mode() -> None:
    """days: older versions go in simple and staggered too."""
    kept = versions("a", [HOUR, 3 * DAY])
    for mode in ("simple", "staggered", "off"):
        assert to_drop(VersionPolicy(mode, days=2), kept, NOW) == ["a@1"]


def test_staggered_one_per_hour_for_a_day() -> None:
    """staggered: versions under a day old are spaced at least an hour apart, newest kept."""
    ages = [m * 60.0 for m in range(0, 24 * 60, 10)]  # one every 10 minutes for a day
    kept = versions("a", ages)
    dropped = set(to_drop(VersionPolicy("staggered", days=0), kept, NOW))
    left = sorted((v for v in kept if v.version_id not in dropped), key=lambda v: -v.time)
    recent = [v for v in left if NOW - v.time < HOUR]
    assert len(recent) == 6  # every version of the last hour stays
    older = left[len(recent) - 1:]
    assert len(older) == 1 + 23  # the last recent one, then one an hour
    gaps = [a.time - b.time for a, b in zip(older, older[1:])]
    assert all(gap >= HOUR for gap in gaps)


def test_staggered_one_per_day_for_a_month_then_one_per_week() -> None:
    """staggered: one an hour for versions made over 90 days thins to the day, then the week."""
    ages = [h * HOUR for h in range(0, 90 * 24)]
    kept = versions("a", ages, size=1)
    dropped = set(to_drop(VersionPolicy("staggered", days=0), kept, NOW))
    left = [NOW - v.time for v in kept if v.version_id not in dropped]
    under_day = [a for a in left if a < DAY]
    month = [a for a in left if DAY <= a < 30 * DAY]
    older = [a for a in left if a >= 30 * DAY]
    assert len(under_day) == 24  # (one an hour: the last hour holds one version anyway)
    assert 28 <= len(month) <= 30
    assert 8 <= len(older) <= 9  # 60 days at one a week
    older.sort()
    assert all(b - a >= WEEK for a, b in zip(older, older[1:]))


def test_staggered_thins_as_the_clock_moves_on() -> None:
    """staggered: the hourly versions of one day keep one a day once they are days old."""
    kept = versions("a", [h * HOUR for h in range(24)])
    policy = VersionPolicy("staggered", days=0)
    assert to_drop(policy, kept, NOW) == []
    later = NOW + 3 * DAY
    dropped = to_drop(policy, kept, later)
    assert len(kept) - len(dropped) == 1
    survivors = [v for v in kept if v.version_id not in dropped]
    assert survivors[0].version_id == "a@0"  # the newest of the day


def test_size_cap_drops_the_oldest_across_the_share() -> None:
    """max_bytes: the share's versions are cut, oldest first, until they fit."""
    kept = versions("a", [1, 10], size=40) + versions("b", [5, 20], size=40)
    assert to_drop(VersionPolicy("trash", max_bytes=100), kept, NOW) == ["b@1", "a@1"]
    assert to_drop(VersionPolicy("trash", max_bytes=10), kept, NOW) == [
        "b@1", "a@1", "b@0", "a@0"]


def test_settings_are_checked() -> None:
    """Bad values are refused with what they may be; a stored mess gives the default."""
    policy = VersionPolicy()
    assert policy.with_setting("mode", "simple").mode == "simple"
    assert policy.with_setting("days", 7).days == 7.0
    for key, value in [("mode", "forever"), ("days", -1), ("days", True), ("keep", 0),
                       ("keep", 1.5), ("max_bytes", -5), ("colour", 1)]:
        with pytest.raises(PolicyError):
            policy.with_setting(key, value)
    assert VersionPolicy.from_json("garbage") == VersionPolicy()
    assert VersionPolicy.from_json({"mode": "nope", "keep": 3}) == VersionPolicy(keep=3)
    stored = VersionPolicy("staggered", 365, 4, 1 << 30)
    assert VersionPolicy.from_json(stored.to_json()) == stored
