"""Signatures made ahead (clearskies.transfer.sigcache): used only for exactly the file they
were made from, bounded in size, made after a delay one at a time."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from clearskies import rdiff
from clearskies.threads import SyncRunner
from clearskies.transfer.deltas import open_signature
from clearskies.transfer.sigcache import CachedSignatureReader, SignatureCache

pytestmark = pytest.mark.skipif(not rdiff.AVAILABLE, reason="librsync is not installed")

MiB = 1024 * 1024
SHA = "ab" * 32


def drain(reader) -> bytes:
    out = []
    while data := reader.read(100_000):
        out.append(data)
    reader.close()
    return b"".join(out)


def fresh_signature(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    return drain(rdiff.SignatureReader(fd, os.fstat(fd).st_size))


def key_of(path: Path) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns


class HeldRunner:
    """A runner that holds each job: (Deferred, function, arguments) go to ``held``."""

    def __init__(self, held: list) -> None:
        self.held = held

    def run(self, fn, *args):
        d: Deferred = Deferred()
        self.held.append((d, fn, args))
        return d


@pytest.fixture
def setup(tmp_path: Path):
    big = tmp_path / "share" / "big.bin"
    big.parent.mkdir()
    big.write_bytes(random.Random(3).randbytes(2 * MiB))
    cache = SignatureCache(tmp_path / "data" / "signatures", SyncRunner(), Clock())
    return cache, big


def lookup(cache: SignatureCache, big: Path, sha: str = SHA, path: str = "big.bin",
           share: str = "s1"):
    fd = os.open(big, os.O_RDONLY)
    try:
        return cache.open(share, path, fd, sha)
    finally:
        os.close(fd)


def test_a_cached_signature_is_the_file_s_signature(setup) -> None:
    """Made for the installed file, it is found and equals a signature made now."""
    cache, big = setup
    assert cache.make("s1", "big.bin", big, SHA, key_of(big))
    reader = lookup(cache, big)
    assert isinstance(reader, CachedSignatureReader)
    assert drain(reader) == fresh_signature(big)
    # open_signature hands it out instead of signing the file
    got = open_signature(big, MiB, lambda fd: cache.open("s1", "big.bin", fd, SHA))
    assert isinstance(got, CachedSignatureReader)
    assert drain(got) == fresh_signature(big)


def test_a_stale_entry_is_never_used(setup) -> None:
    """Rewritten with the same size and mtime, replaced, other content or another path:
    no entry is used."""
    cache, big = setup
    assert cache.make("s1", "big.bin", big, SHA, key_of(big))
    assert lookup(cache, big, sha="cd" * 32) is None  # our record says other content
    assert lookup(cache, big, path="other.bin") is None
    assert lookup(cache, big, share="s2") is None
    st = os.stat(big)
    with open(big, "r+b") as f:  # same size, mtime put back: only the ctime tells
        f.seek(MiB)
        f.write(b"changed!")
    os.utime(big, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(big).st_mtime_ns == st.st_mtime_ns and os.stat(big).st_size == st.st_size
    assert lookup(cache, big) is None
    # replaced by another file (new inode)
    assert cache.make("s1", "big.bin", big, SHA, key_of(big))
    assert lookup(cache, big) is not None
    other = big.with_name("new")
    other.write_bytes(big.read_bytes())
    os.replace(other, big)
    assert lookup(cache, big) is None


def test_a_file_changed_since_its_install_is_not_signed(setup) -> None:
    """The install's (inode, size, mtime) no longer match: nothing is cached."""
    cache, big = setup
    key = key_of(big)
    with open(big, "ab") as f:
        f.write(b"more")
    assert not cache.make("s1", "big.bin", big, SHA, key)
    assert lookup(cache, big) is None
    assert not cache.make("s1", "gone.bin", big.with_name("gone.bin"), SHA, key)


def test_a_torn_or_garbled_entry_is_ignored(setup) -> None:
    """An entry cut short (a crash while writing) or not ours is not used."""
    cache, big = setup
    assert cache.make("s1", "big.bin", big, SHA, key_of(big))
    [entry] = list(cache.directory.iterdir())
    data = entry.read_bytes()
    entry.write_bytes(data[:-10])
    assert lookup(cache, big) is None
    entry.write_bytes(b"garbage\n" + data)
    assert lookup(cache, big) is None
    entry.write_bytes(b"")
    assert lookup(cache, big) is None


def test_the_cache_is_bounded_and_keeps_one_entry_per_path(setup, tmp_path: Path) -> None:
    """Past max_bytes the least recently used entries go; a path's older entry goes at once."""
    cache, big = setup
    one = len(fresh_signature(big)) + 300  # an entry: the signature and a short header
    cache.max_bytes = 3 * one
    for n in range(6):
        assert cache.make("s1", "f%d" % n, big, SHA, key_of(big))
        total = sum(p.stat().st_size for p in cache.directory.iterdir())
        assert total <= cache.max_bytes
    names = sorted(p.name for p in cache.directory.iterdir())
    assert len(names) == 3
    assert lookup(cache, big, path="f5") is not None
    assert lookup(cache, big, path="f0") is None
    # the same path signed again (its file rewritten): the old entry is dropped
    big.write_bytes(random.Random(4).randbytes(2 * MiB))
    assert cache.make("s1", "f5", big, SHA, key_of(big))
    assert len(list(cache.directory.iterdir())) == 3
    assert drain(lookup(cache, big, path="f5")) == fresh_signature(big)


def test_installs_are_signed_later_one_at_a_time(setup) -> None:
    """``installed`` waits SIGN_DELAY, then signs once the share is idle; small files and a
    stopped cache sign nothing."""
    cache, big = setup
    clock = cache._clock
    small = big.with_name("small")
    small.write_bytes(b"x" * 1000)
    cache.installed("s1", "small", small, SHA, key_of(small))
    cache.installed("s1", "big.bin", big, SHA, key_of(big))
    assert cache.made == 0
    clock.advance(cache.delay)
    assert cache.made == 1 and lookup(cache, big) is not None
    busy = [True]
    cache._idle = lambda: not busy[0]
    big.write_bytes(random.Random(5).randbytes(2 * MiB))
    cache.installed("s1", "big.bin", big, SHA, key_of(big))
    clock.advance(cache.delay * 5)
    assert cache.made == 1  # waits while the share is busy
    busy[0] = False
    clock.advance(cache.delay)
    assert cache.made == 2 and drain(lookup(cache, big)) == fresh_signature(big)
    cache.stop()
    cache.installed("s1", "again", big, SHA, key_of(big))
    clock.advance(cache.delay)
    assert cache.made == 2 and clock.getDelayedCalls() == []


def test_one_may_wait_for_the_signature_being_made(setup) -> None:
    """``being_made`` answers only for the path being signed, and fires once it is cached."""
    cache, big = setup
    held = []

    cache._runner = HeldRunner(held)
    cache.installed("s1", "big.bin", big, SHA, key_of(big))
    assert cache.being_made("s1", "big.bin") is None  # not started yet
    cache._clock.advance(cache.delay)
    assert cache.being_made("s1", "other") is None
    waiter = cache.being_made("s1", "big.bin")
    fired = []
    waiter.addCallback(fired.append)
    [(d, fn, args)] = held
    assert fired == []
    d.callback(fn(*args))
    assert fired == [None] and lookup(cache, big) is not None
    assert cache.being_made("s1", "big.bin") is None


def test_a_sent_file_s_entry_answers_a_delta_from_checksums(setup) -> None:
    """sent(): signature and block checksums made; previous() finds them by the signature
    a peer would send, also once our file has changed (that is when they are used)."""
    import hashlib

    from clearskies import rdiffblocks

    cache, big = setup
    cache.sent("s1", "big.bin", big, SHA, big.stat().st_size)
    cache.sent("s1", "big.bin", big, SHA, big.stat().st_size)  # queued once
    assert len(cache._queue) == 1
    job = cache._queue.popleft()
    assert cache.make(*job)
    signature = fresh_signature(big)
    block = rdiff.block_size(big.stat().st_size)
    fd = os.open(big, os.O_RDONLY)
    crcs = rdiffblocks.block_crcs(fd, big.stat().st_size, block)
    os.close(fd)
    digest = hashlib.sha256(signature).hexdigest()
    assert cache.previous("s1", "big.bin", digest) == (2 * MiB, block, crcs)
    assert drain(lookup(cache, big)) == signature  # the checksums do not disturb open()
    assert not cache.make(*job)  # an entry for the file as it is: not made again
    with open(big, "r+b") as f:  # changed in place: the old version's entry still answers
        f.seek(MiB)
        f.write(b"new content")
    assert lookup(cache, big) is None
    assert cache.previous("s1", "big.bin", digest) == (2 * MiB, block, crcs)
    assert cache.previous("s1", "big.bin", "0" * 64) is None
    assert cache.previous("s1", "other.bin", digest) is None
    cache.sent("s1", "small.bin", big, SHA, 1000)  # too small to be worth it
    assert not cache._queue


def test_a_file_written_while_signed_stops_the_signing_early(setup, monkeypatch) -> None:
    """The file is looked at every few MiB: a write stops the signing there, not at the end
    (a change soon after a sync must not wait for a useless signature of the old version)."""
    import time

    from clearskies.transfer import sigcache as module

    cache, big = setup
    big.write_bytes(random.Random(5).randbytes(64 * MiB))
    calls = []

    class Writing(rdiff.SignatureReader):
        def read(self, n: int = rdiff.PIECE) -> bytes:
            calls.append(n)
            if len(calls) == 2:
                time.sleep(0.02)  # past the clock tick of the file's last write
                with open(big, "r+b") as f:
                    f.write(b"written by someone")
            return super().read(n)

    monkeypatch.setattr(module.rdiff, "SignatureReader", Writing)
    assert not cache.make("s1", "big.bin", big, SHA, key_of(big))
    assert len(calls) == 2  # 64 MiB would take many more looks
    assert not cache.directory.exists() or not any(cache.directory.iterdir())


def test_a_sent_file_is_signed_only_after_a_while(setup) -> None:
    """Signing what we sent waits SENT_DELAY (a file still being edited would waste it);
    installs keep their short delay and are not held up behind it."""
    from clearskies.transfer.sigcache import SENT_DELAY, SIGN_DELAY

    cache, big = setup
    clock = cache._clock
    other = big.with_name("other.bin")
    other.write_bytes(random.Random(9).randbytes(2 * MiB))
    cache.sent("s1", "big.bin", big, SHA, big.stat().st_size)
    cache.installed("s1", "other.bin", other, SHA, key_of(other))
    clock.advance(SIGN_DELAY)
    assert cache.made == 1 and lookup(cache, other, path="other.bin") is not None
    clock.advance(SENT_DELAY / 2)
    assert cache.made == 1
    clock.advance(SENT_DELAY / 2)
    assert cache.made == 2 and lookup(cache, big) is not None


def test_a_newer_install_replaces_the_one_waiting(setup) -> None:
    """Two versions installed before the first was signed: the newer one is signed (the
    older's key no longer matches the file), and a sent file waiting gives way to it."""
    import time

    from clearskies.transfer.sigcache import SIGN_DELAY

    cache, big = setup
    cache.sent("s1", "big.bin", big, SHA, big.stat().st_size)
    first = key_of(big)
    cache.installed("s1", "big.bin", big, SHA, first)
    time.sleep(0.02)  # past the clock tick of the first version's mtime
    big.write_bytes(random.Random(11).randbytes(2 * MiB))
    cache.installed("s1", "big.bin", big, "cd" * 32, key_of(big))
    assert len(cache._queue) == 1 and cache._queue[0][4] == key_of(big) != first
    cache._clock.advance(SIGN_DELAY)
    assert cache.made == 1
    assert drain(lookup(cache, big, sha="cd" * 32)) == fresh_signature(big)


def test_a_share_signs_ahead_only_when_nothing_moves():
    """The daemon's idle test for signing ahead: not while the share scans, still wants
    files, or sent bytes since the last look (a peer is downloading from us)."""
    from types import SimpleNamespace

    from clearskies.daemon.shares import signing_idle

    runtime = SimpleNamespace(sync=SimpleNamespace(bytes_sent=0, wanted={}),
                              service=SimpleNamespace(status=SimpleNamespace(state="idle")))
    clock = Clock()
    idle = signing_idle(runtime, clock.seconds, quiet_for=10)

    def quiet_after() -> float:
        """Seconds of looks, one a second, until the share counts as idle."""
        start = clock.seconds()
        while not idle():
            assert clock.seconds() - start < 100
            clock.advance(1)
        return clock.seconds() - start

    assert quiet_after() == 10
    assert idle()
    runtime.sync.bytes_sent = 4096  # an upload went on meanwhile
    assert quiet_after() == 10
    runtime.sync.wanted = {"a": object()}
    for _ in range(20):
        clock.advance(1)
        assert not idle()
    runtime.sync.wanted = {}
    assert quiet_after() == 10
    runtime.service.status.state = "scanning"
    assert not idle()
    runtime.service.status.state = "idle"
    assert quiet_after() == 10


def test_a_share_that_gets_busy_stops_the_signature_being_made(setup) -> None:
    """A transfer that starts while a big file is signed stops the signing at its next
    piece; the file waits first in line and is signed once the share is quiet again."""
    cache, big = setup
    held = []

    busy = [False]
    cache._idle = lambda: not busy[0]
    cache._runner = HeldRunner(held)
    cache.installed("s1", "big.bin", big, SHA, key_of(big))
    clock = cache._clock
    clock.advance(cache.delay)
    [(d, fn, args)] = held
    clock.advance(cache.delay)  # still idle: signing goes on
    assert not cache._interrupt.is_set()
    busy[0] = True
    clock.advance(cache.delay)
    assert cache._interrupt.is_set()
    d.callback(fn(*args))  # the worker sees it at its first piece
    assert cache.made == 0 and lookup(cache, big) is None
    assert [job[1] for job in cache._queue] == ["big.bin"]
    clock.advance(cache.delay * 3)
    assert len(held) == 1  # waits while busy
    busy[0] = False
    cache._runner = SyncRunner()
    clock.advance(cache.delay)
    assert cache.made == 1 and drain(lookup(cache, big)) == fresh_signature(big)
    assert clock.getDelayedCalls() == []
