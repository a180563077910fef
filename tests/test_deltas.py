"""Delta transfer's file work (clearskies.transfer.deltas): streamed signatures and deltas
through the send queue, and deltas applied as they arrive."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from clearskies import rdiff
from clearskies.threads import SyncRunner
from clearskies.transfer.deltas import (
    MAX_QUEUED_DELTA, DeltaApplier, StreamSender, open_delta, open_signature,
)
from clearskies.transfer.sendqueue import SendQueue
from tests.helpers import result_of
from tests.test_transfer import parse_payload, run_clock

pytestmark = pytest.mark.skipif(not rdiff.AVAILABLE, reason="librsync is not installed")

MiB = 1024 * 1024


@pytest.fixture
def versions(tmp_path: Path) -> tuple[Path, bytes]:
    """An old copy on disk (3 MiB) and the new content: 100 KiB changed in the middle."""
    rng = random.Random(99)
    old = rng.randbytes(3 * MiB)
    new = bytearray(old)
    new[MiB:MiB + 100_000] = rng.randbytes(100_000)
    (tmp_path / "old").write_bytes(old)
    return tmp_path / "old", bytes(new)


def streamed(reader: object, header: dict) -> tuple[dict, list[int], bytes]:
    clock, transport = Clock(), StringTransport()
    done = StreamSender(clock, header, reader, runner=SyncRunner()).begin(transport)
    run_clock(clock)
    head, sizes, body, rest = parse_payload(transport.value())
    assert rest == b"" and result_of(done) == len(body)
    return head, sizes, body


def test_a_signature_streams_in_chunks_of_at_most_one_mib(versions) -> None:
    """The signature goes out as its header line, chunks and the zero chunk."""
    old, _ = versions
    reader = open_signature(old, 1)
    head, sizes, body = streamed(reader, {"type": "rsync.signature", "path": "f"})
    assert head == {"type": "rsync.signature", "path": "f"}
    assert len(body) == rdiff.signature_size(3 * MiB) and max(sizes) <= MiB


def test_no_old_copy_worth_a_delta_raises(tmp_path: Path) -> None:
    """Missing, a folder, or smaller than the threshold: OSError (the caller sends get)."""
    (tmp_path / "small").write_bytes(b"x" * 10)
    (tmp_path / "dir").mkdir()
    for name in ("missing", "small", "dir"):
        with pytest.raises(OSError):
            open_signature(tmp_path / name, 1000)


def _signature(old: Path) -> rdiff.Signature:
    body = streamed(open_signature(old, 1), {"type": "rsync.signature", "path": "f"})[2]
    loader = rdiff.SignatureLoader()
    loader.feed(body)
    return loader.finish()


def test_send_queue_streams_a_delta_or_refuses_with_get_error(versions, tmp_path) -> None:
    """send_stream writes the rsync.patch payload; a file that changed size gets get_error."""
    old, new = versions
    (tmp_path / "new").write_bytes(new)
    clock, transport = Clock(), StringTransport()
    queue = SendQueue(transport, clock, runner=SyncRunner())
    signature = _signature(old)
    first = queue.send_stream("f", {"type": "rsync.patch", "path": "f"},
                              lambda: open_delta(tmp_path / "new", len(new), signature))
    run_clock(clock)
    head, _, delta, _ = parse_payload(transport.value())
    assert head == {"type": "rsync.patch", "path": "f"} and result_of(first).sent
    assert len(delta) < 200_000
    transport.clear()
    refused = queue.send_stream("f", {"type": "rsync.patch", "path": "f"},
                                lambda: open_delta(tmp_path / "new", len(new) + 1, _signature(old)))
    run_clock(clock)
    assert b'"type":"get_error"' in transport.value() and not result_of(refused).sent


def _delta(old: Path, new: bytes, tmp_path: Path) -> bytes:
    (tmp_path / "new").write_bytes(new)
    return streamed(open_delta(tmp_path / "new", len(new), _signature(old)),
                    {"type": "rsync.patch", "path": "f"})[2]


class Pauses:
    def __init__(self) -> None:
        self.paused = 0
        self.resumed = 0

    def pauseProducing(self) -> None:
        self.paused += 1

    def resumeProducing(self) -> None:
        self.resumed += 1

    def stopProducing(self) -> None:
        pass


class HeldRunner:
    """Runs jobs only when told (a worker that falls behind)."""

    def __init__(self) -> None:
        self.jobs: list = []

    def run(self, fn, *args):
        from twisted.internet.defer import Deferred
        d: Deferred = Deferred()
        self.jobs.append((fn, args, d))
        return d

    def run_all(self) -> None:
        while self.jobs:
            fn, args, d = self.jobs.pop(0)
            try:
                d.callback(fn(*args))
            except Exception as e:  # noqa: BLE001 - handed to the Deferred
                d.errback(e)


def test_a_delta_is_applied_as_it_arrives_and_verified(versions, tmp_path) -> None:
    """Pieces are patched by worker jobs; complete() checks the SHA-256 and hands over the file."""
    old, new = versions
    delta = _delta(old, new, tmp_path)
    temp = tmp_path / ".f.tmp"
    applier = DeltaApplier(old, temp, len(new), hashlib.sha256(new).hexdigest(),
                           runner=SyncRunner())
    for at in range(0, len(delta), 3000):
        applier.write(delta[at:at + 3000])
    assert result_of(applier.drained()) is None and applier.error is None
    hasher, size, fd = applier.complete()
    os.close(fd)
    assert temp.read_bytes() == new and size == len(new)
    assert hasher.hexdigest() == hashlib.sha256(new).hexdigest()
    assert (tmp_path / "old").stat().st_size == 3 * MiB


def test_a_slow_worker_pauses_the_connection(versions, tmp_path) -> None:
    """More than MAX_QUEUED_DELTA waiting pauses the producer; caught up, it resumes."""
    old, new = versions
    runner, producer = HeldRunner(), Pauses()
    applier = DeltaApplier(old, tmp_path / ".t", 64 * MiB, "0" * 64, runner=runner,
                           producer=producer)
    literal = b"\x44" + (MAX_QUEUED_DELTA * 2).to_bytes(8, "big")  # nothing is checked yet
    applier.write(literal)
    for _ in range(MAX_QUEUED_DELTA // 65536 + 2):
        applier.write(b"\0" * 65536)
    assert producer.paused == 1 and producer.resumed == 0
    runner.run_all()
    assert producer.resumed == 1


def test_a_wrong_result_is_refused_and_removed(versions, tmp_path) -> None:
    """A valid delta to other content fails complete(); discard() leaves no temporary file."""
    old, new = versions
    delta = _delta(old, new[:-1] + b"?", tmp_path)
    temp = tmp_path / ".f.tmp"
    applier = DeltaApplier(old, temp, len(new), hashlib.sha256(new).hexdigest(),
                           runner=SyncRunner())
    applier.write(delta)
    with pytest.raises(rdiff.RdiffError, match="SHA-256"):
        applier.complete()
    result_of(applier.discard())
    assert not temp.exists()


def test_discard_spares_a_file_someone_else_put_there(versions, tmp_path) -> None:
    """discard() removes only the file it made: a new download at the same name stays."""
    old, new = versions
    temp = tmp_path / ".f.tmp"
    applier = DeltaApplier(old, temp, len(new), "0" * 64, runner=SyncRunner())
    applier.write(_delta(old, new, tmp_path)[:5000])
    os.unlink(temp)
    temp.write_bytes(b"a plain download started meanwhile")
    result_of(applier.discard())
    assert temp.read_bytes() == b"a plain download started meanwhile"


def test_a_hostile_delta_leaves_only_the_old_copy(versions, tmp_path) -> None:
    """A delta copying beyond the old copy fails as it is applied; discard() leaves the
    directory as it was (the old copy, unchanged) and no temporary file."""
    old, new = versions
    before = sorted(p.name for p in tmp_path.iterdir())
    temp = tmp_path / ".f.tmp"
    applier = DeltaApplier(old, temp, len(new), hashlib.sha256(new).hexdigest(),
                           runner=SyncRunner())
    # RS_OP_COPY_N8_N8 from 1 MiB before the end of the old copy, 2 MiB long.
    applier.write(rdiff.DELTA_MAGIC.to_bytes(4, "big") + b"\x54"
                  + (2 * MiB).to_bytes(8, "big") + (2 * MiB).to_bytes(8, "big") + b"\0")
    assert result_of(applier.drained()) is None
    assert isinstance(applier.error, rdiff.RdiffError)
    assert "copies bytes" in str(applier.error)
    with pytest.raises(rdiff.RdiffError, match="copies bytes"):
        applier.complete()
    result_of(applier.discard())
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert old.stat().st_size == 3 * MiB
