"""Backpressure: a download's writer pauses its connection instead of writing on the reactor."""

from __future__ import annotations

import errno
import hashlib
import os
import threading
import time

import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from clearskies import backpressure
from clearskies.backpressure import BatchWriter, SharedPause, WriterOverrun
from clearskies.interfaces import IRunner
from clearskies.ratelimit import RateLimiter, ReadThrottle
from clearskies.threads import SyncRunner, ThreadPoolRunner
from clearskies.transfer import OK, FileReceiver
from tests.fakes import HeldRunner, content, record_for
from tests.helpers import temporary_dir


@implementer(IPushProducer)
class RecordingProducer:
    """A producer that notes every call it gets."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.paused = False

    def pauseProducing(self) -> None:
        self.calls.append("pause")
        self.paused = True

    def resumeProducing(self) -> None:
        self.calls.append("resume")
        self.paused = False

    def stopProducing(self) -> None:
        self.calls.append("stop")


def open_temp(tmp_path) -> int:
    fd = os.open(tmp_path / "f.tmp", os.O_RDWR | os.O_CREAT, 0o600)
    return fd


def test_a_shared_pause_resumes_only_when_every_user_lets_go():
    """Two users pause one producer; it reads again only after both resumed, and a
    resume nobody paused for changes nothing."""
    producer = RecordingProducer()
    shared = SharedPause(producer)
    verifyObject(IPushProducer, shared)
    shared.resumeProducing()
    assert producer.calls == [] and not shared.paused
    shared.pauseProducing()
    shared.pauseProducing()
    shared.resumeProducing()
    assert producer.calls == ["pause"] and shared.paused
    shared.resumeProducing()
    assert producer.calls == ["pause", "resume"] and not shared.paused
    shared.stopProducing()
    assert producer.calls[-1] == "stop"


def test_a_rate_limit_running_out_does_not_undo_the_writers_pause(tmp_path):
    """The download limiter's wait ends while the writer still lags: the connection stays
    paused until the writer has caught up too."""
    clock, transport, runner = Clock(), StringTransport(), HeldRunner()
    verifyObject(IRunner, runner)
    shared = SharedPause(transport)
    throttle = ReadThrottle(shared, RateLimiter(clock, 1000), clock)
    fd = open_temp(tmp_path)
    writer = BatchWriter(runner, fd, 0, None, producer=shared, max_queued=1)
    throttle.received(5000)  # in debt: the limiter pauses
    writer.submit([b"a"])
    writer.submit([b"b"])  # two waiting: the writer pauses too
    assert transport.producerState == "paused" and writer.pausing
    clock.advance(10)  # the debt is paid off
    assert transport.producerState == "paused"
    runner.release_all()
    assert transport.producerState == "producing" and not writer.pausing
    os.close(fd)
    assert (tmp_path / "f.tmp").read_bytes() == b"ab"


def test_the_writer_pauses_past_its_bound_and_resumes_once_a_job_caught_up(tmp_path):
    """Past ``max_queued`` waiting batches the producer is paused (once); the job that
    writes them resumes it; nothing is written by submit() itself."""
    producer, runner = RecordingProducer(), HeldRunner()
    fd = open_temp(tmp_path)
    writer = BatchWriter(runner, fd, 0, hashlib.sha256(), producer=producer, max_queued=3)
    for piece in (b"1", b"2", b"3"):
        writer.submit([piece])
    assert producer.calls == [] and writer.waiting == 3
    writer.submit([b"4"])
    writer.submit([b"5"])
    assert producer.calls == ["pause"]  # paused once, however many more arrive
    assert os.fstat(fd).st_size == 0
    runner.release()
    assert producer.calls == ["pause", "resume"] and writer.waiting == 0
    assert os.fstat(fd).st_size == 5
    writer.close(None)  # and the descriptor with it


def test_with_wake_the_producer_resumes_while_the_taken_batches_are_written(tmp_path):
    """The job asks the reactor (``wake``) to resume the producer as soon as it has
    taken the waiting batches, so the next data arrives while they are written and
    hashed; without ``wake`` the producer waits for the job's end."""
    class Probe:
        """A hasher noting whether the producer is paused when it is fed."""

        def __init__(self, producer: RecordingProducer) -> None:
            self.producer = producer
            self.paused: list[bool] = []

        def update(self, data: bytes) -> None:
            self.paused.append(self.producer.paused)

    for wake in (None, lambda function: function()):
        producer, runner = RecordingProducer(), HeldRunner()
        probe = Probe(producer)
        fd = open_temp(tmp_path)
        writer = BatchWriter(runner, fd, 0, probe, producer=producer, max_queued=3,
                             wake=wake)
        for piece in (b"1", b"2", b"3", b"4", b"5"):
            writer.submit([piece])
        assert producer.paused
        runner.release()
        assert probe.paused == [wake is None]
        assert producer.calls == ["pause", "resume"] and os.fstat(fd).st_size == 5
        writer.close(None)


def test_a_producer_that_does_not_pause_meets_a_hard_bound(tmp_path):
    """Without a producer to pause, past OVERRUN_FACTOR * max_queued batches the download
    fails (ENOBUFS) rather than holding more in memory."""
    runner = HeldRunner()
    fd = open_temp(tmp_path)
    writer = BatchWriter(runner, fd, 0, None, max_queued=2)
    for _ in range(backpressure.OVERRUN_FACTOR * 2):
        writer.submit([b"x"])
    with pytest.raises(WriterOverrun) as raised:
        writer.submit([b"x"])
    assert raised.value.errno == errno.ENOBUFS and writer.waiting == 0
    with pytest.raises(WriterOverrun):
        writer.submit([b"x"])  # the writer stays failed
    runner.release_all()
    os.close(fd)


def test_a_failed_write_or_a_close_resumes_the_producer(tmp_path, monkeypatch):
    """A write error lets the connection read again (the rest of the payload is dropped);
    so does closing a writer that held a pause."""
    producer, runner = RecordingProducer(), HeldRunner()
    fd = open_temp(tmp_path)
    writer = BatchWriter(runner, fd, 0, None, producer=producer, max_queued=1)
    writer.submit([b"a"])
    writer.submit([b"b"])

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(backpressure.os, "pwrite", full)
    runner.release()
    assert producer.calls == ["pause", "resume"]
    assert isinstance(writer.error, OSError) and writer.error.errno == errno.ENOSPC
    monkeypatch.undo()

    closing = BatchWriter(runner, fd, 0, None, producer=producer, max_queued=1)
    closing.submit([b"a"])
    closing.submit([b"b"])
    closing.close(None)
    assert producer.calls == ["pause", "resume", "pause", "resume"]
    runner.release_all()


class FloodTests(TestCase):
    """A flood of batches on the real reactor, a real worker pool and a slow disk."""

    def setUp(self) -> None:
        self.base = temporary_dir(self)
        self.runner = ThreadPoolRunner(reactor, 2)
        self.runner.startService()
        self.addCleanup(lambda: self.runner.running and self.runner.stopService())

    def test_the_reactor_never_writes_and_the_source_is_paused_and_resumed(self) -> Deferred:
        """300 batches offered as fast as the reactor turns, to a disk that takes 2 ms a
        write: every write runs in a worker, the source is paused and resumed, the
        queue stays within its bound and the file is whole."""
        reactor_thread = threading.get_ident()
        writers_threads: list[int] = []
        real_pwrite = os.pwrite

        def slow_pwrite(fd: int, data, offset: int) -> int:
            writers_threads.append(threading.get_ident())
            time.sleep(0.002)
            return real_pwrite(fd, data, offset)

        self.patch(backpressure.os, "pwrite", slow_pwrite)
        batches = [os.urandom(1000) for _ in range(300)]
        fd = os.open(os.path.join(self.base, "f"), os.O_RDWR | os.O_CREAT, 0o600)
        self.addCleanup(os.close, fd)
        hasher = hashlib.sha256()
        source = _Flood(batches)
        writer = BatchWriter(self.runner, fd, 0, hasher, producer=source, max_queued=4)
        source.writer = writer
        done: Deferred[None] = Deferred()
        source.done = done
        source.resumeProducing()

        def check(_: object) -> Deferred[None]:
            return writer.flush().addCallback(verify)

        def verify(_: object) -> None:
            self.assertNotIn(reactor_thread, writers_threads)
            self.assertTrue(writers_threads)
            self.assertGreater(source.calls.count("pause"), 0)
            self.assertEqual(source.calls.count("pause"), source.calls.count("resume") - 1)
            self.assertLessEqual(source.most_waiting, 5)
            self.assertFalse(writer.pausing)
            whole = b"".join(batches)
            self.assertEqual(os.pread(fd, len(whole) + 1, 0), whole)
            self.assertEqual(hasher.hexdigest(), hashlib.sha256(whole).hexdigest())

        return done.addCallback(check)


class _Flood(RecordingProducer):
    """Offers one batch per reactor turn while not paused (like a socket's reads)."""

    def __init__(self, batches: list[bytes]) -> None:
        super().__init__()
        self.batches = list(batches)
        self.paused = True
        self.writer: BatchWriter | None = None
        self.done: Deferred[None] | None = None
        self.most_waiting = 0
        self._scheduled = False

    def resumeProducing(self) -> None:
        super().resumeProducing()
        self._schedule()

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            reactor.callLater(0, self._offer)

    def _offer(self) -> None:
        self._scheduled = False
        if self.paused:
            return
        assert self.writer is not None and self.done is not None
        if not self.batches:
            self.done.callback(None)
            return
        self.writer.submit([self.batches.pop(0)])
        self.most_waiting = max(self.most_waiting, self.writer.waiting)
        self._schedule()


def test_a_sync_runner_never_pauses(tmp_path):
    """With a runner that writes at once (tests), nothing waits and nothing pauses."""
    producer = RecordingProducer()
    fd = open_temp(tmp_path)
    writer = BatchWriter(SyncRunner(), fd, 0, None, producer=producer, max_queued=1)
    for piece in (b"a", b"b", b"c"):
        writer.submit([piece])
    assert producer.calls == [] and writer.waiting == 0
    os.close(fd)
    assert (tmp_path / "f.tmp").read_bytes() == b"abc"


def test_closing_with_the_last_pieces_leaves_writing_and_closing_to_a_worker(tmp_path):
    """close(last) writes nothing on the calling thread: a worker job writes what is
    queued plus the last pieces, then the descriptor is closed."""
    runner = HeldRunner()
    fd = open_temp(tmp_path)
    writer = BatchWriter(runner, fd, 0, None, max_queued=4)
    writer.submit([b"ab"])
    closed = writer.close([b"c", b"d"])
    assert os.fstat(fd).st_size == 0 and not closed.called
    runner.release_all()
    assert closed.called
    assert (tmp_path / "f.tmp").read_bytes() == b"abcd"
    with pytest.raises(OSError) as closed:
        os.fstat(fd)
    assert closed.value.errno == errno.EBADF


def test_closing_without_keeping_drops_the_queue_and_closes_after_the_job_in_flight(tmp_path):
    """close(None) drops what waits; the descriptor is closed once the job already handed
    to the pool is back (it then writes nothing), never under it and never by waiting."""
    runner = HeldRunner()
    fd = open_temp(tmp_path)
    writer = BatchWriter(runner, fd, 0, None, max_queued=4)
    writer.submit([b"ab"])
    closed = writer.close(None)
    assert not closed.called
    os.fstat(fd)  # still open: the job may be using it
    runner.release_all()
    assert closed.called
    with pytest.raises(OSError):
        os.fstat(fd)
    assert (tmp_path / "f.tmp").read_bytes() == b""
    idle = BatchWriter(runner, open_temp(tmp_path), 0, None)
    assert idle.close(None).called  # no job: closed at once


def test_a_local_copy_starts_only_after_the_received_bytes_writer_is_done(tmp_path):
    """copy_local after some payload: the copy job is handed to the pool only once the
    writer's job in flight is back, so the two never write the same file at once."""
    data = content(3 * 1024 * 1024, seed=12)
    source = tmp_path / "source.bin"
    source.write_bytes(data)
    runner = HeldRunner()
    receiver = FileReceiver(tmp_path, tmp_path / "f", record_for("f", data), runner=runner)
    receiver.write(data[:1024 * 1024])  # two batches: a drain job waits in the pool
    assert [fn.__name__ for _, fn, _ in runner.jobs] == ["_drain"]
    copied = receiver.copy_local(source)
    assert [fn.__name__ for _, fn, _ in runner.jobs] == ["_drain"]
    runner.release()
    assert [fn.__name__ for _, fn, _ in runner.jobs] == ["copy_into"]
    runner.release_all()
    assert copied.called
    finished = receiver.finish(lambda: True)
    while runner.jobs:
        runner.release_all()
    assert finished.result.status == OK
    assert (tmp_path / "f").read_bytes() == data
