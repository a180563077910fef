"""The token bucket, the read throttle, and FileSender under an upload limit."""

from __future__ import annotations

import io

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from clearskies import wire
from clearskies.ratelimit import MAX_WAIT, MIN_CHUNK, RateLimiter, ReadThrottle
from clearskies.threads import SyncRunner
from clearskies.transfer import FileSender


def _payload(data: bytes) -> bytes:
    """Only the payload bytes of a file_data message written to a transport."""
    decoder = wire.WireDecoder()
    decoder.receive_data(data)
    return b"".join(e.data for e in decoder.events() if isinstance(e, wire.PayloadChunk))


# -- RateLimiter ---------------------------------------------------------------------


def test_unlimited_never_asks_to_wait():
    """Rate 0 lets any amount through with no delay and keeps the default chunk size."""
    limiter = RateLimiter(Clock())
    assert limiter.consume(10**9) == 0.0
    assert limiter.delay() == 0.0
    assert limiter.chunk_size(1 << 20) == 1 << 20


def test_burst_then_wait_for_the_debt():
    """A full bucket passes a burst at once; going past it costs debt / rate seconds."""
    clock = Clock()
    limiter = RateLimiter(clock, 1000)
    assert limiter.burst == MIN_CHUNK  # 0.5 s at 1000 B/s is below the floor
    assert limiter.consume(MIN_CHUNK) == 0.0
    assert limiter.consume(500) == pytest.approx(0.5)
    clock.advance(0.25)
    assert limiter.delay() == pytest.approx(0.25)
    clock.advance(0.25)
    assert limiter.delay() == 0.0


def test_long_run_average_matches_the_rate():
    """A sender that waits whenever told to moves rate bytes per second on average."""
    clock = Clock()
    limiter = RateLimiter(clock, 100_000)
    moved = 0
    while clock.seconds() < 10.0:
        wait = limiter.delay()
        if wait:
            clock.advance(wait)
            continue
        moved += limiter.chunk_size(1 << 20)
        limiter.consume(limiter.chunk_size(1 << 20))
    # 10 s at 100 kB/s plus at most one burst and one chunk.
    assert 1_000_000 <= moved <= 1_000_000 + limiter.burst + 10_000


def test_idle_time_refills_only_up_to_the_burst():
    """A long idle spell does not bank more than one burst."""
    clock = Clock()
    limiter = RateLimiter(clock, 10_000)
    limiter.consume(limiter.burst)
    clock.advance(3600)
    assert limiter.consume(limiter.burst) == 0.0
    assert limiter.consume(1000) == pytest.approx(0.1)


def test_new_rate_applies_at_once():
    """set_rate forgives old debt: lifting the limit (0) or raising it unblocks now."""
    clock = Clock()
    limiter = RateLimiter(clock, 100)
    limiter.consume(100_000)
    assert limiter.delay() > 900
    limiter.set_rate(0)
    assert limiter.delay() == 0.0
    limiter.set_rate(1_000_000)
    assert limiter.delay() == 0.0 and limiter.rate == 1_000_000


def test_chunk_size_follows_the_rate():
    """A limited sender moves about a tenth of a second's worth at once, never below the floor."""
    limiter = RateLimiter(Clock(), 200_000)
    assert limiter.chunk_size(1 << 20) == 20_000
    assert limiter.chunk_size(1000) == 1000
    limiter.set_rate(10)
    assert limiter.chunk_size(1 << 20) == MIN_CHUNK


@pytest.mark.parametrize("bad", [-1, 1.5, True, "10"])
def test_bad_rates_are_refused(bad):
    """Only non-negative integers are rates."""
    with pytest.raises(ValueError):
        RateLimiter(Clock(), bad)


# -- ReadThrottle ---------------------------------------------------------------------


def test_read_throttle_pauses_and_resumes_the_transport():
    """Past the bucket, reading pauses; it resumes once the debt is paid, not before."""
    clock = Clock()
    limiter = RateLimiter(clock, 10_000)
    transport = StringTransport()
    throttle = ReadThrottle(transport, limiter, clock)
    throttle.received(int(limiter.burst))
    assert transport.producerState == "producing"
    throttle.received(10_000)  # one second of debt
    assert transport.producerState == "paused" and throttle.paused
    clock.advance(MAX_WAIT)
    assert transport.producerState == "paused"
    clock.advance(1.0 - MAX_WAIT)
    assert transport.producerState == "producing" and not throttle.paused


def test_read_throttle_resumes_early_when_the_limit_is_lifted():
    """Setting the download limit to 0 lets a paused connection read within MAX_WAIT."""
    clock = Clock()
    limiter = RateLimiter(clock, 1000)
    transport = StringTransport()
    throttle = ReadThrottle(transport, limiter, clock)
    throttle.received(1_000_000)
    assert transport.producerState == "paused"
    limiter.set_rate(0)
    clock.advance(MAX_WAIT)
    assert transport.producerState == "producing"


def test_stopped_throttle_schedules_nothing():
    """After stop (connection gone) no timer is left and the transport is left alone."""
    clock = Clock()
    limiter = RateLimiter(clock, 1000)
    transport = StringTransport()
    throttle = ReadThrottle(transport, limiter, clock)
    throttle.received(1_000_000)
    throttle.stop()
    assert clock.getDelayedCalls() == []
    throttle.received(1_000_000)
    assert clock.getDelayedCalls() == []


# -- FileSender with an upload limit -----------------------------------------------------


def _send(data: bytes, limiter: RateLimiter | None, clock: Clock,
          chunk_size: int = wire.SEND_CHUNK_SIZE,
          read_ahead: bool = False) -> tuple[StringTransport, list[int]]:
    """Send ``data``; with ``read_ahead`` its first chunk was read before the limit applied
    (as a worker opening the file does)."""
    transport = StringTransport()
    first = data[:chunk_size] if read_ahead else b""
    sender = FileSender(clock, "f.bin", io.BytesIO(data[len(first):]), 0, len(data),
                        limiter=limiter, chunk_size=chunk_size, first=first,
                        runner=SyncRunner())
    done: list[int] = []
    sender.begin(transport).addCallback(done.append)
    return transport, done


@pytest.mark.parametrize("read_ahead", [False, True])
def test_file_sender_keeps_to_the_upload_limit(read_ahead):
    """200 kB at 50 kB/s takes about (size - burst) / rate seconds and arrives intact,
    also when its first chunk was read ahead in one piece."""
    data = bytes(range(256)) * 800  # 204,800 bytes
    clock = Clock()
    limiter = RateLimiter(clock, 50_000)
    transport, done = _send(data, limiter, clock, read_ahead=read_ahead)
    while not done:
        clock.advance(0.01)
    expected = (len(data) - limiter.burst - limiter.chunk_size(1 << 20)) / 50_000
    assert clock.seconds() >= expected - 0.05
    assert clock.seconds() <= expected + MAX_WAIT
    assert _payload(transport.value()) == data
    assert done == [len(data)]


def test_file_sender_without_a_limit_sends_at_once():
    """No limiter: the whole file is out after one reactor turn per chunk, no waiting."""
    data = b"x" * 300_000
    clock = Clock()
    transport, done = _send(data, None, clock, chunk_size=100_000)
    for _ in range(5):
        clock.advance(0)
    assert done == [len(data)] and clock.seconds() == 0
    assert _payload(transport.value()) == data


def test_file_sender_speeds_up_when_the_limit_is_lifted():
    """A send crawling at a low limit finishes right after the limit is set to 0."""
    data = b"y" * 500_000
    clock = Clock()
    limiter = RateLimiter(clock, 1000)
    transport, done = _send(data, limiter, clock)
    clock.advance(1.0)
    assert not done
    limiter.set_rate(0)
    for _ in range(5):
        clock.advance(MAX_WAIT)
    assert done == [len(data)]
    assert _payload(transport.value()) == data


def test_paused_file_sender_waits_for_its_consumer_too():
    """A consumer's pauseProducing still stops a limited sender; resumeProducing restarts it."""
    data = b"z" * 100_000
    clock = Clock()
    limiter = RateLimiter(clock, 1_000_000)
    transport = StringTransport()
    sender = FileSender(clock, "f.bin", io.BytesIO(data), 0, len(data), limiter=limiter,
                        runner=SyncRunner())
    done: list[int] = []
    sender.begin(transport).addCallback(done.append)
    sender.pauseProducing()
    clock.advance(10)
    assert not done and _payload(transport.value()) == b""
    sender.resumeProducing()
    for _ in range(20):
        clock.advance(0.05)
    assert done == [len(data)]
