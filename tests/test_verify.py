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
