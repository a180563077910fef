"""Deltas applied without librsync (clearskies.rdiffpatch): every command encoding, the
same result as librsync's patch, the real ``rdiff`` tool's deltas, and hostile deltas
refused before anything of them is written."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import shutil
import struct
import subprocess
import time
from pathlib import Path

import pytest

from clearskies import rdiff, rdiffpatch
from clearskies.rdiff import DELTA_MAGIC, RdiffError

MAGIC = struct.pack(">I", DELTA_MAGIC)
WIDTH_FORMATS = {1: ">B", 2: ">H", 4: ">I", 8: ">Q"}

needs_librsync = pytest.mark.skipif(not rdiff.AVAILABLE,
                                    reason="librsync is not installed (apt-get install librsync2)")
needs_rdiff = pytest.mark.skipif(shutil.which("rdiff") is None,
                                 reason="the rdiff tool is not installed (apt-get install rdiff)")


def literal(data: bytes, width: int | None = None) -> bytes:
    """A literal command: inline (1..64 bytes) unless a length ``width`` is given."""
    if width is None:
        assert 1 <= len(data) <= 64
        return bytes([len(data)]) + data
    op = 0x41 + (1, 2, 4, 8).index(width)
    return bytes([op]) + struct.pack(WIDTH_FORMATS[width], len(data)) + data


def copy(position: int, length: int, pw: int = 8, lw: int = 8) -> bytes:
    op = 0x45 + 4 * (1, 2, 4, 8).index(pw) + (1, 2, 4, 8).index(lw)
    return (bytes([op]) + struct.pack(WIDTH_FORMATS[pw], position)
            + struct.pack(WIDTH_FORMATS[lw], length))


@pytest.fixture
def old(tmp_path: Path) -> Path:
    path = tmp_path / "old"
    path.write_bytes(random.Random(5).randbytes(300_000))
    return path


def apply(old: Path, delta: bytes, out: Path, limit: int = 10 ** 9, piece: int = 100_000,
          kernel: bool = True) -> tuple[str, int]:
    with open(old, "rb") as o, open(out, "wb") as w:
        patcher = rdiffpatch.DirectPatcher(o.fileno(), w.fileno(), limit)
        patcher._kernel_copy = kernel and patcher._kernel_copy
        for at in range(0, len(delta), piece):
            patcher.feed(delta[at:at + piece])
        hasher, size = patcher.finish()
    return hasher.hexdigest(), size


def test_every_command_encoding(old: Path, tmp_path: Path) -> None:
    """Inline and counted literals of each width, copies of each position/length width."""
    base = old.read_bytes()
    delta, expected = [MAGIC], []
    for data in (b"x", b"y" * 64):
        delta.append(literal(data))
        expected.append(data)
    for width in (1, 2, 4, 8):
        data = bytes([width]) * 200
        delta.append(literal(data, width))
        expected.append(data)
    for pw in (1, 2, 4, 8):
        for lw in (1, 2, 4, 8):
            position, length = 17 * pw + lw, 100 + lw
            delta.append(copy(position, length, pw, lw))
            expected.append(base[position:position + length])
    delta.append(b"\0")
    want = b"".join(expected)
    for piece in (1, 3, 1000):  # every command split across pieces somewhere
        digest, size = apply(old, b"".join(delta), tmp_path / "out", piece=piece)
        assert (tmp_path / "out").read_bytes() == want
        assert (digest, size) == (hashlib.sha256(want).hexdigest(), len(want))


@needs_librsync
@pytest.mark.parametrize("kernel", [True, False], ids=["copy_file_range", "pread-pwrite"])
def test_same_result_as_librsyncs_patch(old: Path, tmp_path: Path, kernel: bool) -> None:
    """A librsync delta (changes, an insertion, a cut end) gives what librsync's patch gives."""
    base = old.read_bytes()
    rng = random.Random(6)
    new = base[:1000] + rng.randbytes(5000) + base[1000:150_000] + base[160_000:290_000]
    fd = os.open(old, os.O_RDONLY)
    reader = rdiff.SignatureReader(fd, len(base))
    signature = b"".join(iter(lambda: reader.read(65536), b""))
    reader.close()
    (tmp_path / "new").write_bytes(new)
    delta_reader = rdiff.DeltaReader(os.open(tmp_path / "new", os.O_RDONLY),
                                     rdiff.load_signature(signature))
    delta = b"".join(iter(lambda: delta_reader.read(65536), b""))
    delta_reader.close()
    assert len(delta) < len(new) // 2  # mostly copies
    digest, size = apply(old, delta, tmp_path / "ours", piece=777, kernel=kernel)
    assert (tmp_path / "ours").read_bytes() == new
    assert digest == hashlib.sha256(new).hexdigest() and size == len(new)


@needs_rdiff
def test_applies_the_rdiff_tools_delta(old: Path, tmp_path: Path) -> None:
    """The real ``rdiff``: its signature and delta (BLAKE2 sums, its own encoding choices)."""
    base = old.read_bytes()
    new = base[:50_000] + b"inserted" * 1000 + base[50_000:] + b"tail"
    (tmp_path / "new").write_bytes(new)
    subprocess.run(["rdiff", "signature", str(old), str(tmp_path / "sig")], check=True)
    subprocess.run(["rdiff", "delta", str(tmp_path / "sig"), str(tmp_path / "new"),
                    str(tmp_path / "delta")], check=True)
    delta = (tmp_path / "delta").read_bytes()
    assert len(delta) < 20_000
    apply(old, delta, tmp_path / "out", piece=4096)
    assert (tmp_path / "out").read_bytes() == new


def test_falls_back_when_the_kernel_cannot_copy(old: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """copy_file_range refused (another file system, an old kernel): pread/pwrite instead."""
    calls = []

    def refuse(*args: object) -> int:
        calls.append(args)
        raise OSError(errno.EXDEV, "cross-device")
    monkeypatch.setattr(os, "copy_file_range", refuse, raising=False)
    base = old.read_bytes()
    apply(old, MAGIC + copy(10, 250_000) + copy(0, 5) + b"\0", tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == base[10:250_010] + base[:5]
    assert len(calls) == 1  # tried once, then not again


# -- hostile deltas ---------------------------------------------------------------------

@pytest.mark.parametrize("delta, why", [
    (b"", "not an rdiff delta"),
    (MAGIC[:3], "not an rdiff delta"),
    (b"garbage!", "not an rdiff delta"),
    (MAGIC, "truncated"),
    (MAGIC + b"\x41", "truncated"),  # a literal's length missing
    (MAGIC + b"\x43\x00\x00", "truncated"),  # ... cut inside it
    (MAGIC + literal(b"abc", 1)[:-1], "truncated"),  # literal bytes missing
    (MAGIC + copy(0, 10)[:9], "truncated"),  # a copy cut inside its numbers
    (MAGIC + copy(0, 10), "truncated"),  # no END
    (MAGIC + b"\x55", "unknown delta command 0x55"),
    (MAGIC + b"\xff" + b"\0" * 20, "unknown delta command 0xff"),
    (MAGIC + b"\0" + b"\0", "after the end"),
    (MAGIC + b"\0" + copy(0, 10) + b"\0", "after the end"),
    (MAGIC + copy(299_990, 11) + b"\0", r"copies bytes 299990\.\.300001"),
    (MAGIC + copy(2 ** 64 - 1, 2 ** 64 - 1) + b"\0", "copies bytes"),
    (MAGIC + copy(300_000, 1) + b"\0", "copies bytes"),
])
def test_broken_and_hostile_deltas_are_refused(old: Path, tmp_path: Path, delta: bytes,
                                               why: str) -> None:
    with pytest.raises(RdiffError, match=why):
        apply(old, delta, tmp_path / "out", piece=5)
    assert (tmp_path / "out").stat().st_size == 0 or why == "truncated"


def test_a_huge_literal_is_refused_before_any_byte_of_it(old: Path, tmp_path: Path) -> None:
    """A literal claiming 2^63 bytes is refused at its header: its bytes are never written."""
    delta = MAGIC + copy(0, 100) + b"\x44" + struct.pack(">Q", 2 ** 63) + b"z" * 1000
    with pytest.raises(RdiffError, match="more than 1000 bytes"):
        apply(old, delta, tmp_path / "out", limit=1000)
    assert (tmp_path / "out").read_bytes() == old.read_bytes()[:100]


def test_a_copy_bomb_stops_at_the_limit(old: Path, tmp_path: Path) -> None:
    """A few bytes copying the old file over and over never write past the limit."""
    limit = 700_000
    delta = MAGIC + copy(0, 300_000) * 1000 + b"\0"
    with pytest.raises(RdiffError, match="more than 700000 bytes"):
        apply(old, delta, tmp_path / "out", limit=limit)
    assert (tmp_path / "out").stat().st_size == 600_000  # the third copy was refused whole


def test_nothing_but_the_output_is_written(old: Path, tmp_path: Path) -> None:
    """After hostile deltas the old file is unchanged and no other file appeared."""
    before = old.read_bytes()
    for delta in (MAGIC + copy(2 ** 40, 10) + b"\0", MAGIC + copy(0, 2 ** 40) + b"\0",
                  MAGIC + literal(b"a" * 100, 8) + b"\0" + b"more"):
        with pytest.raises(RdiffError):
            apply(old, delta, tmp_path / "out", limit=50)
    assert old.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old", "out"]


def test_a_write_to_the_old_file_meanwhile_refuses_the_result(old: Path, tmp_path: Path) -> None:
    """The kernel copies read the old file again after hashing it: a write in between
    could make the result differ from its hash, so any write refuses it."""
    with open(old, "rb") as o, open(tmp_path / "out", "wb") as w:
        patcher = rdiffpatch.DirectPatcher(o.fileno(), w.fileno(), 10 ** 9)
        patcher.feed(MAGIC + copy(0, 1000))
        time.sleep(0.05)  # past the clock tick of the fixture's write (coarse ctime)
        with open(old, "r+b") as writer:
            writer.seek(500)
            writer.write(b"changed by someone")
        patcher.feed(b"\0")
        with pytest.raises(RdiffError, match="old copy changed"):
            patcher.finish()


def test_a_delta_of_tiny_commands_is_refused(old: Path, tmp_path: Path) -> None:
    """Millions of one-byte commands would cost minutes of Python: past one command per
    BYTES_PER_COMMAND bytes of the result (plus a spare) the delta is refused."""
    limit = 100_000
    allowed = limit // rdiffpatch.BYTES_PER_COMMAND + rdiffpatch.SPARE_COMMANDS
    delta = MAGIC + literal(b"x") * (allowed + 10) + b"\0"
    with pytest.raises(RdiffError, match="more than %d commands" % allowed):
        apply(old, delta, tmp_path / "out", limit=limit)
    assert (tmp_path / "out").stat().st_size == allowed


@needs_librsync
def test_a_delta_changing_every_other_block_is_within_the_command_bound(
        tmp_path: Path) -> None:
    """The most commands a delta against our signature needs (a copy and a literal per
    block pair) stays well inside the bound."""
    rng = random.Random(8)
    size = 8 * 1024 * 1024
    base = rng.randbytes(size)
    block = rdiff.block_size(size)
    new = bytearray(base)
    for at in range(0, size, 2 * block):
        new[at:at + 10] = rng.randbytes(10)
    (tmp_path / "old").write_bytes(base)
    (tmp_path / "new").write_bytes(bytes(new))
    fd = os.open(tmp_path / "old", os.O_RDONLY)
    reader = rdiff.SignatureReader(fd, size)
    signature = b"".join(iter(lambda: reader.read(65536), b""))
    reader.close()
    delta_reader = rdiff.DeltaReader(os.open(tmp_path / "new", os.O_RDONLY),
                                     rdiff.load_signature(signature))
    delta = b"".join(iter(lambda: delta_reader.read(65536), b""))
    delta_reader.close()
    with open(tmp_path / "old", "rb") as o, open(tmp_path / "out", "wb") as w:
        patcher = rdiffpatch.DirectPatcher(o.fileno(), w.fileno(), size)
        patcher.feed(delta)
        patcher.finish()
        assert patcher.commands * 4 < patcher.max_commands
    assert (tmp_path / "out").read_bytes() == bytes(new)
