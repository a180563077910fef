"""Upload and download rate limits: a token bucket and a read throttle.

``RateLimiter`` is pure: it only reads the injected clock.  Producers ask it
how long to wait (``delay``), then report what they moved (``consume``).
The bucket may go into debt by one transfer (a chunk already read from the
disk or the socket is never held back), and whoever moved it then waits
until the debt is paid off.  Waits are re-checked at least every
``MAX_WAIT`` seconds, so a new rate (or no limit) takes effect at once.

``ReadThrottle`` applies a limiter to incoming data by pausing the
transport's reading, never by sleeping the reactor.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime

UNLIMITED = 0
"""A rate of 0 means no limit."""

BURST_SECONDS = 0.5
"""How much unused allowance the bucket keeps, in seconds at the current rate."""

CHUNK_SECONDS = 0.1
"""A limited sender moves at most this many seconds' worth of bytes at once."""

MIN_CHUNK = 4096
"""Smallest chunk a limited sender is told to use (tiny writes cost more than they save)."""

MAX_WAIT = 0.5
"""Longest single wait before the limiter is asked again (picks up rate changes)."""


class RateLimiter:
    """A token bucket of bytes per second; ``rate`` 0 lets everything through."""

    def __init__(self, clock: IReactorTime, rate: int = UNLIMITED) -> None:
        self._clock = clock
        self._rate = 0
        self._tokens = 0.0
        self._updated = clock.seconds()
        self.set_rate(rate)

    @property
    def rate(self) -> int:
        return self._rate

    @property
    def limited(self) -> bool:
        return self._rate > 0

    @property
    def burst(self) -> float:
        """The most bytes that may pass at once after an idle spell."""
        return max(self._rate * BURST_SECONDS, float(MIN_CHUNK))

    def set_rate(self, rate: int) -> None:
        """Change the limit now; a full bucket at the new rate (old debt is forgiven)."""
        if isinstance(rate, bool) or not isinstance(rate, int) or rate < 0:
            raise ValueError("a rate is a non-negative number of bytes per second")
        self._rate = rate
        self._tokens = self.burst if rate else 0.0
        self._updated = self._clock.seconds()

    def _refill(self) -> None:
        now = self._clock.seconds()
        elapsed = max(0.0, now - self._updated)
        self._updated = now
        if self._rate and self._tokens < self.burst:
            # (Above the burst only by a refund: a negative count given to consume.)
            self._tokens = min(self.burst, self._tokens + elapsed * self._rate)

    def consume(self, count: int) -> float:
        """``count`` bytes moved; returns the seconds to wait before the next (0 = go on).

        A negative ``count`` gives bytes back (charged, then found smaller on the wire)."""
        if not self._rate:
            return 0.0
        self._refill()
        self._tokens -= count
        return self.delay()

    def delay(self) -> float:
        """Seconds until the debt is paid off; 0 when more may move now."""
        if not self._rate:
            return 0.0
        self._refill()
        if self._tokens > -1.0:  # less than a byte owed (float rounding): paid
            return 0.0
        return -self._tokens / self._rate

    def chunk_size(self, default: int) -> int:
        """How many bytes a sender should move in one go (``default`` when unlimited)."""
        if not self._rate:
            return default
        return max(1, min(default, max(MIN_CHUNK, int(self._rate * CHUNK_SECONDS))))


class ReadThrottle:
    """Pauses a transport's reading while a download limiter is in debt.

    Call :meth:`received` with the payload bytes that arrived; :meth:`stop`
    when the connection is gone.  Only reading is paused: what we write
    (requests, keep-alives, uploads) is unaffected.
    """

    def __init__(self, transport: Any, limiter: RateLimiter, clock: IReactorTime) -> None:
        self._transport = transport
        self._limiter = limiter
        self._clock = clock
        self._call: IDelayedCall | None = None
        self._stopped = False

    @property
    def paused(self) -> bool:
        return self._call is not None

    def received(self, count: int) -> None:
        wait = self._limiter.consume(count)
        if wait > 0 and self._call is None and not self._stopped:
            self._transport.pauseProducing()
            self._call = self._clock.callLater(min(wait, MAX_WAIT), self._check)

    def _check(self) -> None:
        self._call = None
        if self._stopped:
            return
        wait = self._limiter.delay()
        if wait > 0:
            self._call = self._clock.callLater(min(wait, MAX_WAIT), self._check)
            return
        self._transport.resumeProducing()

    def stop(self) -> None:
        self._stopped = True
        if self._call is not None:
            self._call.cancel()
            self._call = None


__all__ = ["RateLimiter", "ReadThrottle", "UNLIMITED", "MAX_WAIT"]
