"""The daemon's event bus: what happened, numbered, for the GUIs (protocol/http-api.md, "Events").

Pure: no reactor, no sockets; the clock comes in as a callable.  Every event
gets the next sequential ``id`` (starting at 1) and a ``time``; the last
``history`` events are kept so that a client that lost its connection can
ask for everything after the last ``id`` it saw (``since``), and learns when
some of those are gone already (``gap``).

Listeners are called for each event as it is published.  A listener that
must queue (a network client) does so in a :class:`Subscription`, whose
queue is bounded: a subscriber that falls ``limit`` events behind is
dropped, never buffered without end.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

JSONDict = dict[str, Any]
Listener = Callable[[JSONDict], None]

#: Events kept for ``since`` queries.
HISTORY = 1000
#: Events one subscriber may have waiting before it is dropped.
SUBSCRIBER_LIMIT = 1000
#: Subscribers at once (every network client holding one counts).
MAX_SUBSCRIBERS = 64


class TooManySubscribers(Exception):
    """``MAX_SUBSCRIBERS`` subscriptions are open already."""


class EventBus:
    """Numbers events, keeps the recent ones and hands each to every listener."""

    def __init__(self, clock: Callable[[], float], history: int = HISTORY,
                 max_subscribers: int = MAX_SUBSCRIBERS) -> None:
        self._clock = clock
        self._recent: deque[JSONDict] = deque(maxlen=history)
        self._listeners: list[Listener] = []
        self._subscriptions: set[Subscription] = set()
        self.max_subscribers = max_subscribers
        self.last_id = 0

    def publish(self, kind: str, **fields: Any) -> JSONDict:
        """Number ``{"type": kind, **fields}``, keep it and hand it to every listener."""
        self.last_id += 1
        event: JSONDict = {"id": self.last_id, "time": round(self._clock(), 3), "type": kind}
        event.update(fields)
        self._recent.append(event)
        for listener in list(self._listeners):
            listener(event)
        for subscription in list(self._subscriptions):
            subscription._offer(event)
        return event

    def since(self, since: int, limit: int = HISTORY) -> tuple[list[JSONDict], bool]:
        """The kept events with an id above ``since`` (at most ``limit``, oldest first),
        and whether some after ``since`` are no longer kept (a gap)."""
        since = max(0, since)
        if since > self.last_id:
            # A daemon restarted since the client's last id: it starts over.
            since = 0
        first = self._recent[0]["id"] if self._recent else self.last_id + 1
        gap = since + 1 < first and since < self.last_id
        events = [e for e in self._recent if e["id"] > since]
        return events[:limit], gap

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def subscribe(self, since: int | None = None, limit: int = SUBSCRIBER_LIMIT,
                  ready: Callable[[], None] | None = None,
                  dropped: Callable[[], None] | None = None) -> Subscription:
        """A bounded queue of the events to come (and those after ``since``, when given).

        Raises ``TooManySubscribers`` when ``max_subscribers`` are open.
        """
        if len(self._subscriptions) >= self.max_subscribers:
            raise TooManySubscribers(
                "%d event subscribers already; close one first" % self.max_subscribers)
        subscription = Subscription(self, limit, ready, dropped)
        if since is not None:
            events, gap = self.since(since, limit)
            subscription.gap = gap
            subscription.queue.extend(events)
        self._subscriptions.add(subscription)
        return subscription

    @property
    def subscriber_count(self) -> int:
        return len(self._subscriptions)

    def _forget(self, subscription: Subscription) -> None:
        self._subscriptions.discard(subscription)


class Subscription:
    """One subscriber's queue; ``take()`` empties it.  Dropped once it holds ``limit``."""

    def __init__(self, bus: EventBus, limit: int, ready: Callable[[], None] | None,
                 dropped: Callable[[], None] | None) -> None:
        self._bus = bus
        self.limit = limit
        self.queue: deque[JSONDict] = deque()
        self.gap = False
        self.dropped = False
        self.closed = False
        self._ready = ready
        self._on_dropped = dropped

    def _offer(self, event: JSONDict) -> None:
        if self.closed:
            return
        if len(self.queue) >= self.limit:
            self.dropped = True
            self.queue.clear()
            self.close()
            if self._on_dropped is not None:
                self._on_dropped()
            return
        self.queue.append(event)
        if self._ready is not None:
            self._ready()

    def take(self) -> list[JSONDict]:
        events = list(self.queue)
        self.queue.clear()
        return events

    def close(self) -> None:
        self.closed = True
        self._bus._forget(self)
