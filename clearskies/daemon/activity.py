"""Pause and rates: the daemon-wide brake and speedometer over every share's sync."""

from __future__ import annotations

from typing import Any, Callable, Iterable

from twisted.logger import Logger

from clearskies.ratelimit import RateLimiter

#: How often the transfer rates are sampled (seconds).
RATE_INTERVAL = 1.0


class RateMeter:
    """Bytes per second over the last few seconds, from a running byte total."""

    def __init__(self, smoothing: float = 0.5) -> None:
        self.smoothing = smoothing
        self.rate = 0.0
        self._last_total = 0

    def sample(self, total: int, interval: float) -> None:
        current = max(0, total - self._last_total) / interval
        self._last_total = total
        # Nothing moved in the last interval: the rate is 0 now, not a fading average.
        self.rate = 0.0 if current == 0 else (
            self.smoothing * current + (1 - self.smoothing) * self.rate)


class Quiet:
    """Whether a share sent no file data since the last look and wants no file.

    Background work that reads the disk (verification, signatures made
    ahead) waits for a quiet share, so it never competes with a sync.
    """

    def __init__(self) -> None:
        self._last_sent: int | None = None  # the share's bytes sent at the last look

    def look(self, sync: Any) -> bool:
        """``sync``: the share's ShareSync.  The first look is never quiet."""
        sent = sync.bytes_sent
        quiet = sent == self._last_sent and not sync.wanted
        self._last_sent = sent
        return quiet


class Activity:
    """Whether the daemon is paused, how fast it sends and receives, and the
    daemon-wide limits (config ``upload_limit`` / ``download_limit``, bytes/s, 0 = none).

    ``runtimes`` gives the share runtimes running now.
    """

    _log = Logger()

    def __init__(self, reactor: Any, runtimes: Callable[[], Iterable[Any]]) -> None:
        self._runtimes = runtimes
        self.paused = False
        self.upload = RateMeter()
        self.download = RateMeter()
        self.upload_limiter = RateLimiter(reactor)
        self.download_limiter = RateLimiter(reactor)

    def pause(self) -> None:
        """No new downloads or uploads (``get`` answers "paused") and no scans or
        announcements of local changes until :meth:`resume`; a file already
        streaming finishes."""
        self.paused = True
        for runtime in list(self._runtimes()):
            runtime.sync.pause()
            runtime.service.pause()

    def resume(self) -> None:
        self.paused = False
        for runtime in list(self._runtimes()):
            if getattr(runtime, "share_paused", False):
                continue  # paused on its own: stays so until `clearskies resume DIR`
            runtime.service.resume()
            runtime.sync.resume()

    def apply_limits(self, config: dict[str, Any]) -> None:
        """Set the rate limiters from the config; running transfers follow at once."""
        for key, limiter in (("upload_limit", self.upload_limiter),
                             ("download_limit", self.download_limiter)):
            value = config.get(key) or 0
            rate = value if isinstance(value, int) and not isinstance(value, bool) else 0
            if rate != limiter.rate:
                limiter.set_rate(max(0, rate))
                self._log.info("{key} is now {rate} bytes/s (0: no limit)", key=key, rate=rate)

    def sample_rates(self) -> None:
        """(Every RATE_INTERVAL.)"""
        runtimes = list(self._runtimes())
        sent = sum(r.sync.bytes_sent for r in runtimes)
        received = sum(r.sync.bytes_received for r in runtimes)
        self.upload.sample(sent, RATE_INTERVAL)
        self.download.sample(received, RATE_INTERVAL)
