"""What the daemon tells its event bus (protocol/http-api.md, "Events").

Three sources feed ``clearskies.events.EventBus``:

- Each share's engine reports downloads started, finished and failed, uploads
  started, deletions and conflict copies as they happen (``ISyncEvents``,
  through ``clearskies.daemon.shareevents.ShareEvents`` and the share host).
- :class:`EventFeed` looks at the running shares every ``RATE_INTERVAL`` and
  publishes what changed since the last look: share state, peers connected
  and their progress, the bytes so far of the files being downloaded, the
  share's remaining items and bytes, the rates.  (``paused`` and ``resumed``
  the daemon publishes itself, as they happen.)
- :class:`LogEvents` turns the daemon's warnings and errors into ``warning``
  and ``error`` events.

The feed and the log observer only read.  What one look may publish is bounded (``MAX_FILES_PER_LOOK`` file events per share,
``MAX_LOG_EVENTS`` log events per look), so a flood of changes cannot flood
the bus.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from twisted.application.internet import TimerService
from twisted.logger import LogLevel, globalLogPublisher

from clearskies.events import EventBus
from clearskies.logfile import redact

#: File events (started/finished/progress) per share per look.
MAX_FILES_PER_LOOK = 50
#: Events from the log between two looks.
MAX_LOG_EVENTS = 100

def _summary(runtime: Any) -> dict[str, Any]:
    """The parts of a share's state an event reports."""
    status = runtime.service.status
    sync = runtime.sync
    state = status.state
    if state == "idle" and sync.wanted:
        state = "syncing"
    return {
        "status": state,
        "in_sync": bool(sync.in_sync) and state not in ("scanning", "starting", "error"),
        "problem": status.reason or None,
    }


class EventFeed:
    """Publishes the differences between two looks at the daemon."""

    def __init__(self, bus: EventBus, runtimes: Callable[[], Iterable[Any]],
                 rates: Callable[[], tuple[float, float]]) -> None:
        self.bus = bus
        self._runtimes = runtimes
        self._rates = rates
        self._shares: dict[str, dict[str, Any]] = {}
        self._last_rates = (0, 0)

    def look(self) -> None:
        """(Every RATE_INTERVAL.)"""
        seen: set[str] = set()
        for runtime in list(self._runtimes()):
            seen.add(runtime.share_id)
            try:
                self._look_at(runtime)
            except Exception:  # a share stopping under us: the next look sees it gone
                continue
        for share_id in list(self._shares):
            if share_id not in seen:
                old = self._shares.pop(share_id)
                self.bus.publish("share_removed", path=old["path"], share_id=share_id)
        up, down = self._rates()
        rates = (int(up), int(down))
        if rates != self._last_rates:
            self._last_rates = rates
            self.bus.publish("rates", upload_rate=rates[0], download_rate=rates[1])

    def _look_at(self, runtime: Any) -> None:
        publish = self.bus.publish
        path = str(runtime.root)
        share_id = runtime.share_id
        old = self._shares.get(share_id)
        if old is None:
            old = self._shares[share_id] = {"path": path, "summary": None, "peers": {},
                                            "files": {}, "totals": None}
            publish("share_added", path=path, share_id=share_id)
        where = {"path": path, "share_id": share_id}
        summary = _summary(runtime)
        if summary != old["summary"]:
            old["summary"] = summary
            publish("share_status", **where, **summary)
        sync = runtime.sync
        wanted_bytes = int(getattr(sync.wanted, "bytes", 0))
        # Bytes already here of the files arriving now: what remains counts down
        # within a big file too.
        arriving = sum(session.receiving.received for session in list(sync.sessions.values())
                       if getattr(session, "receiving", None) is not None)
        totals = (len(sync.wanted), wanted_bytes, max(0, wanted_bytes - arriving))
        if totals != old["totals"]:
            old["totals"] = totals
            publish("share_progress", **where, items_to_download=totals[0],
                    bytes_to_download=totals[1], bytes_remaining=totals[2])
        self._look_at_peers(runtime, where, old["peers"])
        self._look_at_files(sync, where, old["files"])

    def _look_at_peers(self, runtime: Any, where: dict[str, Any],
                       old: dict[str, Any]) -> None:
        publish = self.bus.publish
        now: dict[str, Any] = {}
        for peer_id, session in list(runtime.sync.sessions.items()):
            progress = session.peer_progress or {}
            now[peer_id] = (bool(session.in_sync), progress.get("items"), progress.get("bytes"))
        for peer_id, state in now.items():
            info = runtime.peers.get(peer_id)
            name = getattr(info, "name", None)
            if peer_id not in old:
                publish("peer_connected", **where, peer_id=peer_id, name=name)
            if old.get(peer_id) != state:
                publish("peer_progress", **where, peer_id=peer_id, name=name, in_sync=state[0],
                        items_needed=state[1], bytes_needed=state[2])
        for peer_id in list(old):
            if peer_id not in now:
                publish("peer_disconnected", **where, peer_id=peer_id)
        old.clear()
        old.update(now)

    def _look_at_files(self, sync: Any, where: dict[str, Any], old: dict[str, int]) -> None:
        publish = self.bus.publish
        receiving: dict[str, tuple[int, int, str]] = {}
        for peer_id, session in list(sync.sessions.items()):
            receiver = getattr(session, "receiving", None)
            if receiver is not None:
                receiving[receiver.expected.path] = (receiver.received,
                                                     receiver.expected.size or 0, peer_id)
        budget = MAX_FILES_PER_LOOK
        for path, (received, size, peer_id) in sorted(receiving.items()):
            if budget <= 0:
                break
            if old.get(path) != received:
                budget -= 1
                old[path] = received
                publish("download_progress", **where, file=path, peer_id=peer_id,
                        received=received, size=size)
        for path in list(old):
            if path not in receiving:
                del old[path]


class LogEvents:
    """A log observer: warnings and errors become events."""

    def __init__(self, bus: EventBus) -> None:
        self.bus = bus
        self._count = 0
        # What a listener logs while an event of ours is handed out (a control client
        # dropped for falling behind) is not turned into another event: no loop.
        self._publishing = False

    def new_look(self) -> None:
        """(Every RATE_INTERVAL: the budget of log events starts again.)"""
        self._count = 0

    def __call__(self, event: dict[str, Any]) -> None:
        level = event.get("log_level")
        if level not in (LogLevel.warn, LogLevel.error, LogLevel.critical):
            return
        if self._count >= MAX_LOG_EVENTS or self._publishing:
            return
        self._count += 1
        from twisted.logger import formatEvent

        try:
            message = redact(formatEvent(event))
        except Exception:
            return
        self._publishing = True
        try:
            self.bus.publish("error" if level != LogLevel.warn else "warning",
                             message=message[:2000])
        finally:
            self._publishing = False


class EventFeedService(TimerService):
    """Looks every ``interval`` seconds; observes the log while running."""

    def __init__(self, interval: float, feed: EventFeed) -> None:
        super().__init__(interval, self._look)
        self.feed = feed
        self.log_events = LogEvents(feed.bus)

    def _look(self) -> None:
        self.log_events.new_look()
        self.feed.look()

    def startService(self) -> None:
        globalLogPublisher.addObserver(self.log_events)
        super().startService()

    def stopService(self) -> Any:
        globalLogPublisher.removeObserver(self.log_events)
        return super().stopService()
