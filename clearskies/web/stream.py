"""The event bus over HTTP (protocol/http-api.md, section 5): long poll and Server-Sent Events.

``GET /rest/events?since=N&timeout=S`` answers the events after ``N``, waiting
up to ``S`` seconds for one; ``GET /rest/events/stream`` streams them.  Both
hold a bounded :class:`clearskies.events.Subscription` while they wait, so a
flood of them is refused (``busy``) and a stream nobody reads is ended.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.interfaces import IPushProducer
from twisted.web import server
from twisted.web.resource import Resource
from zope.interface import implementer

from clearskies.control.lines import ControlError
from clearskies.events import EventBus, TooManySubscribers
from clearskies.web.replies import header, send_error, send_json

#: Longest a long poll waits (seconds), and its default.
MAX_POLL = 60.0
DEFAULT_POLL = 30.0


def _int_arg(request: server.Request, name: bytes, default: float, top: float) -> float:
    values = request.args.get(name)
    if not values:
        return default
    text = values[-1].decode("ascii", "replace")
    try:
        value = float(text)
    except ValueError:
        raise ControlError("bad_request", "%s must be a number" % name.decode()) from None
    if not 0 <= value <= top:
        raise ControlError("bad_request", "%s must be 0 to %d" % (name.decode(), top))
    return value


class Events(Resource):
    """``GET /rest/events?since=N&timeout=S``: the events after ``N``, waiting up to ``S``
    seconds for one; ``GET /rest/events/stream``: Server-Sent Events."""

    isLeaf = True

    def __init__(self, bus: EventBus, clock: Any) -> None:
        super().__init__()
        self.bus = bus
        self.clock = clock

    def render_GET(self, request: server.Request) -> Any:
        try:
            since = int(_int_arg(request, b"since", 0, 2 ** 62))
            timeout = _int_arg(request, b"timeout", DEFAULT_POLL, MAX_POLL)
            limit = int(_int_arg(request, b"limit", 1000, 1000)) or 1000
        except ControlError as e:
            return send_error(request, e.code, e.message)
        if request.postpath == [b"stream"]:
            last = header(request, b"last-event-id")
            if last is not None and last.isdigit():
                since = int(last)
            return self._stream(request, since if (request.args.get(b"since") or last) else None)
        if request.postpath:
            return send_error(request, "not_found", "no such resource")
        events, gap = self.bus.since(since, limit)
        if events or timeout == 0:
            return send_json(request, 200, {"events": events, "gap": gap,
                                            "last_id": self.bus.last_id})
        return self._wait(request, since, timeout, limit)

    def _wait(self, request: server.Request, since: int, timeout: float, limit: int) -> Any:
        answered = []

        def answer() -> None:
            if answered:
                return
            answered.append(True)
            subscription.close()
            if call.active():
                call.cancel()
            if request._disconnected:
                return
            events, gap = self.bus.since(since, limit)
            request.write(send_json(request, 200, {"events": events, "gap": gap,
                                                   "last_id": self.bus.last_id}))
            request.finish()

        try:
            subscription = self.bus.subscribe(ready=lambda: self.clock.callLater(0, answer),
                                              dropped=lambda: self.clock.callLater(0, answer),
                                              limit=1)
        except TooManySubscribers as e:
            return send_error(request, "busy", str(e))
        call = self.clock.callLater(timeout, answer)

        def gone(_: object) -> None:
            subscription.close()
            if call.active():
                call.cancel()
        request.notifyFinish().addBoth(gone)
        return server.NOT_DONE_YET

    def _stream(self, request: server.Request, since: int | None) -> Any:
        stream = EventStream(request)
        try:
            stream.subscription = self.bus.subscribe(since=since, ready=stream.flush,
                                                     dropped=stream.dropped)
        except TooManySubscribers as e:
            return send_error(request, "busy", str(e))
        request.setHeader(b"Content-Type", b"text/event-stream")
        request.registerProducer(stream, True)
        request.write(b"retry: 2000\n\n")
        if stream.subscription.gap:
            request.write(b"event: gap\ndata: {}\n\n")
        stream.flush()
        request.notifyFinish().addBoth(stream.closed)
        return server.NOT_DONE_YET


@implementer(IPushProducer)
class EventStream:
    """One Server-Sent Events client: writes while it reads; when its transport is
    full, events wait in the (bounded) subscription, and a client that falls too
    far behind is dropped."""

    def __init__(self, request: server.Request) -> None:
        self.request = request
        self.subscription: Any = None
        self.paused = False
        self.done = False

    def flush(self) -> None:
        if self.paused or self.done or self.subscription is None:
            return
        for event in self.subscription.take():
            data = json.dumps(event, ensure_ascii=True, separators=(",", ":"))
            self.request.write(("id: %d\ndata: %s\n\n" % (event["id"], data)).encode("ascii"))

    def dropped(self) -> None:
        if not self.done:
            self.done = True
            self.request.unregisterProducer()
            self.request.finish()

    def closed(self, _: object = None) -> None:
        self.done = True
        if self.subscription is not None:
            self.subscription.close()

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self.flush()

    def stopProducing(self) -> None:
        self.closed()
