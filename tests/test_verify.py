"""Reading stored files back against their SHA-256 (clearskies.share.verify) and the pace."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from clearskies.daemon.verify import FILE_COST, MIN_RATE, SharePass, pace
from clearskies.share import verify
from clearskies.share.records import clamp_mtime_ns


def _recorded(path: Path) -> tuple[str, tuple[int, int, int]]:
    st = os.lstat(path)
    return (hashlib.sha256(path.read_bytes()).hexdigest(),
            (st.st_ino, st.st_size, clamp_mtime_ns(st.st_mtime_ns)))


def _flip_keeping_time(path: Path, offset: int = 3) -> None:
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_sound_file_is_ok(tmp_path: Path):
    path = tmp_path / "a"
    path.write_bytes(b"hello world")
    sha, cache = _recorded(path)
    assert verify.verify_file(str(path), sha, cache) == verify.OK


def test_a_byte_flipped_with_the_time_kept_is_damage(tmp_path: Path):
    path = tmp_path / "a"
    path.write_bytes(b"hello world" * 1000)
    sha, cache = _recorded(path)
    _flip_keeping_time(path)
    assert verify.verify_file(str(path), sha, cache) == verify.DAMAGED


def test_an_edit_is_no_damage_but_the_scanners_business(tmp_path: Path):
    path = tmp_path / "a"
    path.write_bytes(b"hello world")
    sha, cache = _recorded(path)
    path.write_bytes(b"hello there, a longer text")
    assert verify.verify_file(str(path), sha, cache) == verify.CHANGED
    # Without a cache key (the file was still changing when scanned) nothing is promised.
    assert verify.verify_file(str(path), sha, None) == verify.CHANGED


def test_gone_unreadable_and_a_symlink(tmp_path: Path):
    path = tmp_path / "a"
    path.write_bytes(b"x")
    sha, cache = _recorded(path)
    os.unlink(path)
    assert verify.verify_file(str(path), sha, cache) == verify.GONE
    os.symlink("/etc/hostname", path)
    assert verify.verify_file(str(path), sha, cache) == verify.CHANGED
    assert verify.verify_files([("a", str(path), sha, cache)]) == [("a", verify.CHANGED)]


def test_the_pace_spreads_a_pass_over_the_interval_but_never_crawls():
    week = 7 * 86400
    big = pace(10 ** 12, 1000, week)
    assert big * 0.8 * week == 10 ** 12 + 1000 * FILE_COST
    assert pace(1000, 1, week) == MIN_RATE
    assert pace(1000, 1, 0) == float("inf")


def test_kept_pass_state_reads_back_and_garbage_is_nothing():
    state = SharePass(after="m/n", started=5.0, finished=None)
    again = SharePass.from_dict(state.to_dict())
    assert (again.after, again.started, again.finished) == ("m/n", 5.0, None)
    assert SharePass.from_dict("junk").after is None
    assert SharePass.from_dict({"damaged": [{"path": 1}, "x"]}).damaged == {}


# -- the paced passes, on a fake clock ------------------------------------------------------


class _Store:
    """The two reads the verification makes, over a list of StoredRecords."""

    def __init__(self, rows: list) -> None:
        self.rows = sorted(rows, key=lambda r: r.path)
        self.pages = 0

    def records_between(self, share_id, low, high, after, limit):
        from twisted.internet.defer import succeed
        self.pages += 1
        return succeed([r for r in self.rows if after is None or r.path > after][:limit])

    def get_stored_many(self, share_id, paths):
        from twisted.internet.defer import succeed
        return succeed({r.path: r for r in self.rows if r.path in paths})


class _Wanted(dict):
    def __init__(self) -> None:
        super().__init__()
        self.asked: list = []

    def want(self, record, peer_id):
        self.asked.append((record.path, peer_id))


def _share_of(tmp_path: Path, count: int):
    from types import SimpleNamespace

    from clearskies.share.database import CacheKey, ShareCounts, StoredRecord
    from clearskies.share.records import FileRecord
    from clearskies.threads import SyncRunner

    rows = []
    for index in range(count):
        path = tmp_path / ("f%03d" % index)
        path.write_bytes(b"content %d" % index * 100)
        sha, (inode, size, mtime) = _recorded(path)
        record = FileRecord(path=path.name, utime=1.0, size=size, sha256=sha)
        rows.append(StoredRecord(record, 1, CacheKey(inode, size, mtime)))
    wanted = _Wanted()
    pumps: list = []
    runtime = SimpleNamespace(
        share_id="s" * 64, root=tmp_path, error=None, share_paused=False, running=True,
        store=_Store(rows), files_runner=SyncRunner(), damaged_paths={},
        counts=ShareCounts(count, 0, sum(r.record.size for r in rows), 0),
        service=SimpleNamespace(status=SimpleNamespace(state="idle")),
        local_path=lambda p: tmp_path / p,
        sync=SimpleNamespace(wanted=wanted, in_flight={}, finishing={}, paused=False,
                             bytes_sent=0,
                             sessions={"peer": object()}, pump=lambda: pumps.append(1)))
    return runtime, wanted


def test_a_pass_is_spread_over_the_interval_and_finds_a_flipped_byte(tmp_path: Path):
    from twisted.internet.task import Clock

    from clearskies.daemon.verify import BATCH_FILES, STATE_KEY, VERIFY_TICK, Verification
    from tests.test_health import Resources

    clock = Clock()
    runtime, wanted = _share_of(tmp_path, BATCH_FILES * 3)
    _flip_keeping_time(tmp_path / "f100")
    resources = Resources(clock, {"verify_interval": 3600})
    resources.reactor = clock
    verification = Verification(resources, lambda: [runtime])
    verification.tick()  # a share seen for the first time: its first pass waits an interval
    assert runtime.store.pages == 0
    clock.advance(3600)
    verification.tick()
    state = verification.share_pass(runtime)
    assert state.checked == BATCH_FILES and state.after == "f%03d" % (BATCH_FILES - 1)
    # Tiny files: the slowest pace, MIN_RATE, decides when the next batch goes.
    resume_at = state.resume_at
    assert resume_at - clock.seconds() > VERIFY_TICK

    def until_next_batch() -> None:
        checked = state.checked
        while state.checked == checked:
            assert clock.seconds() < 3600 + 1000, "no progress"
            clock.advance(VERIFY_TICK)
            verification.tick()

    until_next_batch()
    assert state.checked == BATCH_FILES * 2 and clock.seconds() >= resume_at
    assert "f100" in runtime.damaged_paths and wanted.asked == [("f100", "peer")]
    assert verification.summary(runtime)["damaged"][0]["state"] == "fetching"
    # Damage is written down at once (a restart still reports it).
    assert resources.config[STATE_KEY]["s" * 64]["damaged"][0]["path"] == "f100"
    until_next_batch()
    assert state.checked == BATCH_FILES * 3
    while state.after is not None:  # the next page is empty: the end of the share
        clock.advance(VERIFY_TICK)
        verification.tick()
    assert state.finished is not None and state.finished < 3600 + 1000
    # The next pass waits for the interval since this one started.
    pages = runtime.store.pages
    for _ in range(10):
        clock.advance(VERIFY_TICK)
        verification.tick()
    assert runtime.store.pages == pages
    assert state.resume_at >= state.started + 3600


def test_no_passes_with_the_interval_zero_nor_while_paused(tmp_path: Path):
    from twisted.internet.task import Clock

    from clearskies.daemon.verify import Verification
    from tests.test_health import Resources

    clock = Clock()
    runtime, _ = _share_of(tmp_path, 3)
    resources = Resources(clock, {"verify_interval": 0})
    verification = Verification(resources, lambda: [runtime])
    verification.tick()
    assert runtime.store.pages == 0
    resources.config["verify_interval"] = 60
    runtime.share_paused = True
    verification.tick()
    assert runtime.store.pages == 0
    runtime.share_paused = False
    runtime.service.status.state = "scanning"
    verification.tick()
    assert runtime.store.pages == 0
    runtime.service.status.state = "idle"
    verification.tick()
    assert runtime.store.pages == 1 and verification.share_pass(runtime).checked == 3


def test_a_restart_between_passes_waits_for_the_interval_and_one_mid_pass_goes_on(tmp_path):
    from twisted.internet.task import Clock

    from clearskies.daemon.verify import STATE_KEY, Verification
    from tests.test_health import Resources

    clock = Clock()
    clock.advance(10_000)
    runtime, _ = _share_of(tmp_path, 3)
    resources = Resources(clock, {"verify_interval": 3600, STATE_KEY: {
        "s" * 64: {"after": None, "started": 9_000.0, "finished": 9_001.0}}})
    verification = Verification(resources, lambda: [runtime])
    verification.tick()
    assert runtime.store.pages == 0
    clock.advance(2_600)
    verification.tick()
    assert runtime.store.pages == 1
    # Stopped in the middle of a pass: it goes on from there.
    other = tmp_path / "other"
    other.mkdir()
    runtime2, _ = _share_of(other, 3)
    resources2 = Resources(clock, {"verify_interval": 3600, STATE_KEY: {
        "s" * 64: {"after": "f000", "started": 9_000.0}}})
    again = Verification(resources2, lambda: [runtime2])
    again.tick()  # (the first tick only learns what the share has sent so far)
    again.tick()
    assert again.share_pass(runtime2).checked == 2


def test_a_new_share_waits_an_interval_and_a_busy_one_waits_until_it_is_quiet(tmp_path):
    """A share seen for the first time counts its first scan as a pass (saved at once:
    a restart does not put the next off); no step while files are fetched or sent."""
    from twisted.internet.task import Clock

    from clearskies.daemon.verify import STATE_KEY, VERIFY_TICK, Verification
    from tests.test_health import Resources

    clock = Clock()
    clock.advance(50_000)
    runtime, wanted = _share_of(tmp_path, 3)
    resources = Resources(clock, {"verify_interval": 600})
    resources.reactor = clock
    verification = Verification(resources, lambda: [runtime])
    for _ in range(100):  # 500 s
        clock.advance(VERIFY_TICK)
        verification.tick()
    assert runtime.store.pages == 0
    assert resources.config[STATE_KEY]["s" * 64]["started"] == 50_005.0
    restarted = Verification(Resources(clock, dict(resources.config)), lambda: [runtime])
    assert restarted.share_pass(runtime).resume_at == 50_605.0
    clock.advance(200)
    runtime.sync.bytes_sent += 1  # a peer is downloading from us
    verification.tick()
    assert runtime.store.pages == 0
    wanted["x"] = object()  # and we fetch a file
    runtime.sync.bytes_sent += 1
    verification.tick()
    verification.tick()
    assert runtime.store.pages == 0
    del wanted["x"]
    verification.tick()
    assert runtime.store.pages == 1 and verification.share_pass(runtime).checked == 3
