"""librsync's rdiff format through clearskies.rdiff: round trips, interop with the real
``rdiff`` tool both ways, and hostile signatures and deltas."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import struct
import subprocess
import threading
from pathlib import Path

import pytest

from clearskies import rdiff

pytestmark = pytest.mark.skipif(not rdiff.AVAILABLE,
                                reason="librsync is not installed (apt-get install librsync2)")

needs_rdiff = pytest.mark.skipif(shutil.which("rdiff") is None,
                                 reason="the rdiff tool is not installed (apt-get install rdiff)")


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    """An old file of 3 MiB and a new one: 64 KiB changed in the middle, bytes added at the end."""
    rng = random.Random(17)
    old = rng.randbytes(3 * 1024 * 1024)
    new = bytearray(old)
    new[1500000:1500000 + 65536] = rng.randbytes(65536)
    new += rng.randbytes(5000)
    (tmp_path / "old").write_bytes(old)
    (tmp_path / "new").write_bytes(bytes(new))
    return tmp_path / "old", tmp_path / "new"


def _drain(reader: rdiff.SignatureReader | rdiff.SplitSignatureReader | rdiff.DeltaReader,
           piece: int = 100_000) -> bytes:
    out = []
    while data := reader.read(piece):
        out.append(data)
    reader.close()
    return b"".join(out)


def signature_of(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    return _drain(rdiff.SignatureReader(fd, os.fstat(fd).st_size))


def load(signature: bytes, piece: int = 4099) -> rdiff.Signature:
    loader = rdiff.SignatureLoader()
    for at in range(0, len(signature), piece):
        loader.feed(signature[at:at + piece])
    return loader.finish()


def delta_of(signature: bytes, new: Path, segment: int = rdiff.DELTA_SEGMENT) -> bytes:
    return _drain(rdiff.DeltaReader(os.open(new, os.O_RDONLY), load(signature), segment))


def patch(old: Path, delta: bytes, out: Path, limit: int) -> tuple[str, int]:
    delta_path = out.with_name(out.name + ".delta")
    delta_path.write_bytes(delta)
    fds = [os.open(old, os.O_RDONLY), os.open(delta_path, os.O_RDONLY),
           os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)]
    try:
        hasher, size = rdiff.patch_file(fds[0], fds[1], fds[2], limit)
    finally:
        for fd in fds:
            os.close(fd)
    return hasher.hexdigest(), size


def test_round_trip(files: tuple[Path, Path], tmp_path: Path) -> None:
    """Our signature, our delta and our patch rebuild the new file; the delta is small."""
    old, new = files
    signature = signature_of(old)
    assert len(signature) == rdiff.signature_size(old.stat().st_size)
    delta = delta_of(signature, new)
    assert len(delta) < 80_000
    digest, size = patch(old, delta, tmp_path / "out", new.stat().st_size)
    assert (tmp_path / "out").read_bytes() == new.read_bytes()
    assert digest == hashlib.sha256(new.read_bytes()).hexdigest()
    assert size == new.stat().st_size


@pytest.mark.parametrize("shift", [0, 1000])
def test_a_delta_made_in_segments_is_one_valid_delta(files: tuple[Path, Path], tmp_path: Path,
                                                     shift: int) -> None:
    """Segments of 8 blocks join into one delta that we and rdiff apply, costing little."""
    old, new = files
    if shift:  # bytes inserted at the start: every block boundary moves
        new.write_bytes(b"x" * shift + new.read_bytes())
    signature = signature_of(old)
    whole = delta_of(signature, new)
    block = rdiff.block_size(old.stat().st_size)
    pieces = delta_of(signature, new, segment=8 * block)
    segments = -(-new.stat().st_size // (8 * block))
    # Aligned: one more COPY command (a few bytes) per segment; shifted: up to a block each.
    assert len(pieces) <= len(whole) + segments * (block if shift else 16)
    patch(old, pieces, tmp_path / "out", new.stat().st_size)
    assert (tmp_path / "out").read_bytes() == new.read_bytes()
    if shutil.which("rdiff"):
        (tmp_path / "d").write_bytes(pieces)
        subprocess.run(["rdiff", "patch", str(old), str(tmp_path / "d"), str(tmp_path / "r")],
                       check=True)
        assert (tmp_path / "r").read_bytes() == new.read_bytes()


def test_a_segment_s_commands_go_out_when_the_segment_ends(files: tuple[Path, Path]) -> None:
    """read(n) returns at a segment's end: an unchanged segment's few bytes of copy are not
    held back until n bytes of delta are made further on."""
    old, new = files
    signature = load(signature_of(old))
    reader = rdiff.DeltaReader(os.open(new, os.O_RDONLY), signature, segment=1024 * 1024)
    first = reader.read(10 * 1024 * 1024)
    assert 4 < len(first) < 100  # the magic and a copy of the first MiB, nothing more
    rest = _drain(reader)
    assert len(first) + len(rest) == len(delta_of(signature_of(old), new, 1024 * 1024))


@pytest.mark.parametrize("second_first", [True, False])
def test_a_signature_made_in_two_halves_is_the_same_signature(files: tuple[Path, Path],
                                                              second_first: bool) -> None:
    """Both halves joined equal the whole file's signature, whichever thread makes the second."""
    old = files[0]
    fd = os.open(old, os.O_RDONLY)
    reader = rdiff.SplitSignatureReader(fd, os.fstat(fd).st_size)
    if second_first:
        reader.make_second()
    assert _drain(reader, piece=10_000) == signature_of(old)


def test_a_split_signature_closed_early_frees_both_halves(files: tuple[Path, Path]) -> None:
    """Closed before the second half was made: it is never made, nothing waits."""
    reader = rdiff.SplitSignatureReader(os.open(files[0], os.O_RDONLY),
                                        files[0].stat().st_size)
    reader.read(100)
    reader.close()
    reader.make_second()
    assert reader.second._fd == -1 and reader.first._fd == -1


@pytest.mark.parametrize("how", ["beside", "before", "never", "held", "thread"])
def test_a_delta_made_in_two_halves_is_the_same_delta(files: tuple[Path, Path], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      how: str) -> None:
    """Two threads taking turns make the one-piece delta, whenever the second one runs
    (before, between reads, in a thread of its own, never), and also when it stops at its
    bound (all-new content) and the reader finishes its segment."""
    old, new = files
    if how == "held":  # nothing in common: the second half's delta is the content itself
        new.write_bytes(random.Random(5).randbytes(new.stat().st_size))
        monkeypatch.setattr(rdiff, "SPLIT_DELTA_HELD", 200_000)
    signature = signature_of(old)
    segment = 8 * rdiff.block_size(old.stat().st_size)
    whole = delta_of(signature, new, segment=segment)
    fd = os.open(new, os.O_RDONLY)
    reader = rdiff.SplitDeltaReader(fd, os.fstat(fd).st_size, load(signature), load(signature),
                                    segment=segment)
    helper = None
    if how in ("before", "held"):
        reader.make_second()
        assert reader._held and all(index % 2 for index in reader._held)
    elif how == "beside":
        first = reader.read(10_000)
        reader.make_second()
    elif how == "thread":
        helper = threading.Thread(target=reader.make_second)
        helper.start()
    split = (first if how == "beside" else b"") + _drain(reader, piece=10_000)
    if helper is not None:
        helper.join()
    assert split == whole
    if how == "held":
        assert len(whole) > 1_000_000  # the bound was reached, and the rest made after
    patch(old, split, tmp_path / "out", new.stat().st_size)
    assert (tmp_path / "out").read_bytes() == new.read_bytes()


def test_a_split_delta_closed_early_frees_both_halves(files: tuple[Path, Path]) -> None:
    """Closed before or after its second half started: files and signatures are freed."""
    old, new = files
    signature = signature_of(old)
    segment = 8 * rdiff.block_size(old.stat().st_size)
    for started in (False, True):
        reader = rdiff.SplitDeltaReader(os.open(new, os.O_RDONLY), new.stat().st_size,
                                        load(signature), load(signature), segment=segment)
        if started:
            reader.make_second()
        reader.read(100)
        reader.close()
        reader.make_second()
        assert reader._fd == -1 and reader._current is None and not reader._partial
        assert reader.signature._handle is None
        assert reader.second_signature._handle is None


def test_empty_files(tmp_path: Path) -> None:
    """An empty old file and an empty new file still make a valid signature and delta."""
    (tmp_path / "old").write_bytes(b"")
    (tmp_path / "new").write_bytes(b"")
    delta = delta_of(signature_of(tmp_path / "old"), tmp_path / "new")
    assert patch(tmp_path / "old", delta, tmp_path / "out", 0)[1] == 0


def test_block_size_grows_with_the_square_root() -> None:
    """Blocks are about sqrt(size), within MIN_BLOCK..MAX_BLOCK; signatures stay bounded."""
    assert rdiff.block_size(0) == rdiff.MIN_BLOCK
    assert rdiff.block_size(1024 ** 3) == 32 * 1024
    assert rdiff.block_size(10 * 1024 ** 4) == rdiff.MAX_BLOCK
    assert rdiff.signature_size(rdiff.MAX_OLD_SIZE) <= rdiff.MAX_SIGNATURE_BYTES


@needs_rdiff
def test_rdiff_applies_our_delta_and_we_apply_its_delta(files: tuple[Path, Path],
                                                         tmp_path: Path) -> None:
    """Interop both ways: rdiff's signature -> our delta -> rdiff patch; ours -> rdiff delta -> our patch."""
    old, new = files
    # rdiff signature, our delta, rdiff patch.
    subprocess.run(["rdiff", "signature", str(old), str(tmp_path / "rsig")], check=True)
    (tmp_path / "odelta").write_bytes(delta_of((tmp_path / "rsig").read_bytes(), new))
    subprocess.run(["rdiff", "patch", str(old), str(tmp_path / "odelta"),
                    str(tmp_path / "rout")], check=True)
    assert (tmp_path / "rout").read_bytes() == new.read_bytes()
    # Our signature, rdiff delta, our patch.
    (tmp_path / "osig").write_bytes(signature_of(old))
    subprocess.run(["rdiff", "delta", str(tmp_path / "osig"), str(new),
                    str(tmp_path / "rdelta")], check=True)
    assert os.path.getsize(tmp_path / "rdelta") < 80_000
    patch(old, (tmp_path / "rdelta").read_bytes(), tmp_path / "oout", new.stat().st_size)
    assert (tmp_path / "oout").read_bytes() == new.read_bytes()


# -- hostile input --------------------------------------------------------------------

def test_truncated_signature_is_refused(files: tuple[Path, Path]) -> None:
    """A signature cut short (mid-entry, or inside its header) is refused at finish()."""
    signature = signature_of(files[0])
    for cut in (len(signature) - 7, 5):
        with pytest.raises(rdiff.RdiffError, match="truncated"):
            load(signature[:cut])


def test_oversize_signature_is_refused_as_it_arrives() -> None:
    """More than the limit is refused while feeding, before it is held."""
    loader = rdiff.SignatureLoader(limit=1000)
    loader.feed(struct.pack(">III", rdiff.OUR_SIGNATURE_MAGIC, 4096, 16))
    with pytest.raises(rdiff.RdiffError, match="larger than 1000"):
        loader.feed(b"\0" * 2000)


@pytest.mark.parametrize("head, why", [
    (struct.pack(">III", 0x12345678, 4096, 16), "not an rdiff signature"),
    (struct.pack(">III", rdiff.OUR_SIGNATURE_MAGIC, 1, 16), "block length 1"),
    (struct.pack(">III", rdiff.OUR_SIGNATURE_MAGIC, 4096, 99), "strong sum length 99"),
])
def test_bad_signature_headers_are_refused(head: bytes, why: str) -> None:
    """Wrong magic, a tiny block or an oversize strong sum is refused before librsync parses on."""
    with pytest.raises(rdiff.RdiffError, match=why):
        rdiff.SignatureLoader().feed(head + b"\0" * 40)


def _copy_delta(pos: int, length: int, times: int = 1) -> bytes:
    # RS_OP_COPY_N4_N4 (0x4f): 4-byte position, 4-byte length; 0 ends the delta.
    return (struct.pack(">I", rdiff.DELTA_MAGIC)
            + struct.pack(">BII", 0x4F, pos, length) * times + b"\0")


def test_delta_copying_beyond_the_old_file_is_refused(files: tuple[Path, Path],
                                                      tmp_path: Path) -> None:
    """A delta that reads past the old file's end fails with a clear reason."""
    size = files[0].stat().st_size
    with pytest.raises(rdiff.RdiffError, match="copies bytes"):
        patch(files[0], _copy_delta(size - 10, 100), tmp_path / "out", 1000)


def test_delta_making_more_than_the_limit_is_refused(files: tuple[Path, Path],
                                                     tmp_path: Path) -> None:
    """A tiny delta that repeats the old file (a delta bomb) stops at the expected size."""
    size = files[0].stat().st_size
    bomb = _copy_delta(0, size, times=1000)
    assert len(bomb) < 10_000
    with pytest.raises(rdiff.RdiffError, match="more than"):
        patch(files[0], bomb, tmp_path / "out", size + 1)
    assert (tmp_path / "out").stat().st_size <= size + 1


@pytest.mark.parametrize("delta, why", [
    (b"garbage!", "not an rdiff delta"),
    (struct.pack(">I", rdiff.DELTA_MAGIC) + b"\x45", "truncated|failed"),
    (_copy_delta(0, 10) + b"extra", "after the end"),
])
def test_broken_deltas_are_refused(files: tuple[Path, Path], tmp_path: Path,
                                   delta: bytes, why: str) -> None:
    """Garbage, a delta cut inside a command, and bytes after its end are refused."""
    with pytest.raises(rdiff.RdiffError, match=why):
        patch(files[0], delta, tmp_path / "out", 10 ** 9)



def test_a_split_delta_closed_after_its_bound_frees_the_stopped_segment(
        files: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """The second thread stopped at its bound inside a segment (all-new content); closing
    then frees that segment's job too."""
    old, new = files
    new.write_bytes(random.Random(6).randbytes(new.stat().st_size))
    monkeypatch.setattr(rdiff, "SPLIT_DELTA_HELD", 100_000)
    signature = signature_of(old)
    segment = 64 * rdiff.block_size(old.stat().st_size)
    reader = rdiff.SplitDeltaReader(os.open(new, os.O_RDONLY), new.stat().st_size,
                                    load(signature), load(signature), segment=segment)
    reader.make_second()
    assert reader._partial
    stopped = next(iter(reader._partial.values()))[1]
    reader.close()
    assert stopped._fd == -1 and reader._fd == -1 and not reader._partial
    assert reader.signature._handle is None and reader.second_signature._handle is None
