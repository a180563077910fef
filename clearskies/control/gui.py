"""The control commands GUIs use (protocol/control.md, section 9; protocol/http-api.md).

``.clearskies.events`` answers the kept events after an id (for clients that
poll instead of subscribing), ``.clearskies.web_login`` makes a one-time login
URL for the browser.  A mixin of :class:`clearskies.control.commands.DaemonCommands`,
which gives it ``daemon``.
"""

from __future__ import annotations

from typing import Any

from clearskies.control.protocol import ControlError

#: Events one ``.clearskies.events`` reply holds, at most.
MAX_EVENTS_PER_REPLY = 1000


def event_window(request: dict[str, Any]) -> tuple[int, int]:
    """``since`` (default 0) and ``limit`` (default and at most MAX_EVENTS_PER_REPLY)."""
    since = request.get("since", 0)
    if isinstance(since, bool) or not isinstance(since, int) or since < 0:
        raise ControlError("bad_request", "since must be an event id (an integer, 0 or more)")
    limit = request.get("limit", MAX_EVENTS_PER_REPLY)
    if isinstance(limit, bool) or not isinstance(limit, int) or not 0 < limit <= \
            MAX_EVENTS_PER_REPLY:
        raise ControlError("bad_request", "limit must be 1 to %d" % MAX_EVENTS_PER_REPLY)
    return since, limit


class GuiCommands:
    """``.clearskies.events`` and ``.clearskies.web_login``."""

    daemon: Any

    def cmd__clearskies_events(self, request: dict[str, Any]) -> dict[str, Any]:
        since, limit = event_window(request)
        bus = self.daemon.events
        events, gap = bus.since(since, limit)
        return {"events": events, "gap": gap, "last_id": bus.last_id}

    def cmd__clearskies_web_login(self, request: dict[str, Any]) -> dict[str, Any]:
        login = self.daemon.web_login()
        if login is None:
            raise ControlError("not_supported", "the daemon serves no web UI (it was started "
                                                "with --no-web, or its port could not be opened)")
        return login
