"""When a sender compresses bulk writes under ``gzip``: only while that moves more bytes
per second than sending them stored (the sender's choice; the receiver accepts either).
A simulated link and a simulated zlib, on a fake clock."""

from __future__ import annotations

import zlib

from clearskies.compression import (
    EPOCH, FIRST_BYTES, FIRST_HOLD, IDLE_GAP, MAX_HOLD, SAMPLE_MIN, WARMUP, FrameDecoder,
    FrameEncoder, SendPolicy,
)

CHUNK = 1 << 20
TEXT = b"".join(b"line %d of a log file, status=ok\n" % (n % 500) for n in range(40000))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def send(policy: SendPolicy, clock: Clock, seconds: float, link: float, zlib_rate: float,
         ratio: float = 0.3) -> list[bool]:
    """Write 1 MiB chunks for ``seconds``: each takes the time the bottleneck needs.

    ``link`` is the wire's bytes/s; compressing costs ``1/zlib_rate`` s per byte and
    shrinks the chunk to ``ratio``.  Returns the mode of each write.
    """
    modes = []
    end = clock.now + seconds
    while clock.now < end:
        policy.wrote(CHUNK)
        modes.append(policy.compressing)
        if policy.compressing:
            clock.now += max(CHUNK / zlib_rate, CHUNK * ratio / link)
        else:
            clock.now += CHUNK / link
        policy.pushed_back()  # a busy link pauses the producer between chunks
    return modes


def test_first_bytes_compress_then_stored_and_compressing_are_measured():
    clock = Clock()
    policy = SendPolicy(clock)
    assert policy.compressing
    policy.wrote(FIRST_BYTES - 1)
    assert policy.compressing  # unmeasured, whatever the time
    policy.wrote(1)
    assert policy.compressing  # the write that reaches FIRST_BYTES too
    modes = send(policy, clock, EPOCH * 1.5, link=1e7, zlib_rate=180e6)
    assert modes[0] is False and modes[-1] is True
    assert policy.rates[False] is not None and policy.rates[True] is None


def test_fast_link_sends_stored_nearly_all_the_time():
    """Loopback: the wire drains 2 GB/s, zlib level 1 does 180 MB/s: compressing would
    make sending ten times slower, so after the first try it is tried rarely."""
    clock = Clock()
    policy = SendPolicy(clock)
    modes = send(policy, clock, 60, link=2e9, zlib_rate=180e6)
    assert policy.rates[False] > 5 * policy.rates[True]
    # After the first two epochs: tries of compression at 2, 4, 8, 16, 32 s: few writes.
    late = modes[len(modes) // 10:]
    assert late.count(True) < len(late) * 0.02
    assert policy.switches == 0


def test_slow_link_compresses():
    """10 MB/s: compressed text goes three times as fast; stored is tried rarely."""
    clock = Clock()
    policy = SendPolicy(clock)
    modes = send(policy, clock, 60, link=10e6, zlib_rate=180e6)
    assert policy.rates[True] > 2.5 * policy.rates[False]
    late = modes[len(modes) // 10:]
    assert late.count(False) < len(late) * 0.1


def test_incompressible_data_is_not_compressed_even_on_a_slow_link():
    """Data that does not shrink gains nothing from zlib but its cost: stored wins."""
    clock = Clock()
    policy = SendPolicy(clock)
    send(policy, clock, 30, link=10e6, zlib_rate=180e6, ratio=1.0)
    assert not policy.compressing


def test_small_gain_is_not_enough():
    """Compressing must win by MIN_GAIN: a few percent is noise, and costs CPU."""
    clock = Clock()
    policy = SendPolicy(clock)
    # The link is 105 MB/s; compressed the wire would allow 350 MB/s but zlib does 110.
    send(policy, clock, 20, link=105e6, zlib_rate=110e6)
    assert not policy.compressing


def test_link_that_slows_down_is_noticed_and_one_that_speeds_up_too():
    clock = Clock()
    policy = SendPolicy(clock)
    send(policy, clock, 10, link=2e9, zlib_rate=180e6)
    assert not policy.compressing
    # The link drops to 5 MB/s: within the longest hold the next try shows it.
    modes = send(policy, clock, MAX_HOLD * EPOCH * 1.5, link=5e6, zlib_rate=180e6)
    assert policy.compressing and modes[-1]
    assert policy.switches == 1
    modes = send(policy, clock, MAX_HOLD * EPOCH * 1.5, link=2e9, zlib_rate=180e6)
    assert not policy.compressing
    assert policy.switches == 2


def test_tries_back_off_while_they_lose():
    clock = Clock()
    policy = SendPolicy(clock)
    modes = send(policy, clock, EPOCH * (2 + FIRST_HOLD + 1 + 2 * FIRST_HOLD + 1) + 0.01,
                 link=1e9, zlib_rate=180e6)
    runs = []  # lengths of runs of stored writes
    for mode in modes:
        if not mode:
            runs.append(runs.pop() + 1 if runs and runs[-1] else 1)
        elif not runs or runs[-1]:
            runs.append(0)
    stored = [r for r in runs if r]
    assert len(stored) >= 2 and stored[1] > 1.5 * stored[0]


def test_idle_gaps_are_not_counted_as_a_slow_link():
    """A sender with nothing to send (no push-back) writes seldom; that is not a rate."""
    clock = Clock()
    policy = SendPolicy(clock)
    policy.wrote(FIRST_BYTES)
    for _ in range(100):
        policy.wrote(CHUNK)
        clock.now += IDLE_GAP * 4  # no pushed_back(): the link was idle
    assert policy.rates == {True: None, False: None}


def test_warm_up_is_not_counted_and_push_back_keeps_long_gaps():
    clock = Clock()
    policy = SendPolicy(clock)
    policy.wrote(FIRST_BYTES)
    policy.wrote(CHUNK)  # the epoch starts
    policy.pushed_back()
    clock.now += WARMUP
    policy.wrote(10 * CHUNK)  # counting starts: what went before was the warm-up
    policy.pushed_back()
    clock.now += EPOCH - WARMUP
    policy.wrote(CHUNK)
    assert policy.rates[False] == CHUNK / (EPOCH - WARMUP)
    assert policy.compressing  # the next epoch tries compressing


def test_store_sends_bulk_writes_stored_and_small_ones_compressed():
    """What the policy chooses is only a sender's choice: any mix inflates back."""
    encoder = FrameEncoder()
    decoder = FrameDecoder()
    small = b'{"type":"ping","timeout":60}\n' * 10
    writes = [(small, True), (TEXT, True), (small, False), (TEXT, False), (TEXT, True)]
    out = []
    sizes = []
    for data, store in writes:
        frames = encoder.encode(data, store=store)
        sizes.append(len(frames))
        decoder.receive_data(frames)
        while (piece := decoder.next_piece()) is not None:
            out.append(piece)
    assert b"".join(out) == b"".join(data for data, _ in writes)
    assert len(small) < SAMPLE_MIN
    assert sizes[0] < len(small) / 2  # small writes compress whatever the policy says
    assert sizes[1] >= len(TEXT) and sizes[3] < len(TEXT) / 5
    assert encoder.bytes_stored == 2 * len(TEXT)
    # Stored blocks are valid deflate for any inflater, not only ours.
    assert len(zlib.compress(TEXT, 1)) < len(TEXT) / 5


class FakeTransport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.producer = None

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def registerProducer(self, producer, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None


class Producer:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def pauseProducing(self) -> None:
        self.calls.append("pause")

    def resumeProducing(self) -> None:
        self.calls.append("resume")

    def stopProducing(self) -> None:
        self.calls.append("stop")


def test_transport_follows_the_policy_and_reports_push_back():
    from clearskies.compressing import CompressedTransport
    clock = Clock()
    policy = SendPolicy(clock)
    wrapped = FakeTransport()
    transport = CompressedTransport(wrapped, FrameEncoder(), lambda: None, policy)
    producer = Producer()
    transport.registerProducer(producer, True)
    transport.write(TEXT)
    assert len(wrapped.written[-1]) < len(TEXT) / 5  # compressing at first
    policy.wrote(FIRST_BYTES)  # as if more had been sent
    transport.writeSequence([TEXT[:100], TEXT])
    assert len(wrapped.written[-1]) > len(TEXT)  # now stored, to be measured
    for wait in (WARMUP, EPOCH - WARMUP):
        wrapped.producer.pauseProducing()  # the connection's buffer is full
        clock.now += wait  # a long wait, but pushed back: part of the measurement
        transport.write(TEXT)
    assert policy.rates[False] == len(TEXT) / (EPOCH - WARMUP)
    assert policy.compressing
    wrapped.producer.resumeProducing()
    wrapped.producer.stopProducing()
    assert producer.calls == ["pause", "pause", "resume", "stop"]
    assert "stored" in transport.describe()
    decoder = FrameDecoder()
    decoder.receive_data(b"".join(wrapped.written))
    out = []
    while (piece := decoder.next_piece()) is not None:
        out.append(piece)
    assert b"".join(out) == TEXT + TEXT[:100] + TEXT + TEXT + TEXT


class LimiterClock:
    def __init__(self) -> None:
        self.now = 0.0

    def seconds(self) -> float:
        return self.now


def test_an_upload_limit_counts_wire_bytes_and_compresses():
    """Under a limit the sender compresses whatever was measured, and a payload
    chunk costs the limiter what it took on the wire, not its size."""
    from clearskies.compressing import CompressedTransport
    from clearskies.ratelimit import RateLimiter
    from clearskies.wire import encode_chunk_header
    clock = Clock()
    policy = SendPolicy(clock)
    policy.wrote(FIRST_BYTES)
    policy.wrote(CHUNK)
    assert not policy.compressing  # measuring stored
    limiter = RateLimiter(LimiterClock(), rate=1_000_000)
    wrapped = FakeTransport()
    transport = CompressedTransport(wrapped, FrameEncoder(), lambda: None, policy)
    transport.count_wire_bytes(limiter)
    full = limiter.delay()
    transport.write(encode_chunk_header(len(TEXT)))
    transport.write(TEXT)
    wire = len(wrapped.written[-1])
    assert wire < len(TEXT) / 5  # compressed although the policy measures stored
    wait = limiter.consume(len(TEXT))  # what the file sender charges after the write
    assert full == 0
    # Only the wire bytes are owed: 0.5 s of burst covers them, the payload would not.
    assert wire < limiter.burst < len(TEXT)
    assert wait == 0
    # A message that merely looks big is not a chunk: nothing is refunded for it.
    transport.write(b'{"type":"ping"}\n')
    transport.write(TEXT)
    assert limiter.consume(0) == 0
    # Without a limit the policy decides again.
    limiter.set_rate(0)
    transport.write(TEXT)
    assert len(wrapped.written[-1]) > len(TEXT)
