"""twistd entry point for the tracker: ``twistd -n clearskies-tracker``.

    twistd -n clearskies-tracker [--listen ENDPOINT] [--ttl SECONDS]

The service tree is a listening HTTP endpoint plus a timer that sweeps
expired registrations (so fast_track clients hear about peers that left
even when nobody else registers).
"""

from __future__ import annotations

import resource

from twisted.application import strports
from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet import endpoints
from twisted.python import usage

from clearskies.tracker.registry import DEFAULT_TTL, MAX_STREAMS, Registry
from clearskies.tracker.web import make_site

MAX_TTL = 86400
#: File descriptors kept free of HTTP connections (listening socket, logs,
#: the ones a refused or dropped connection holds until it is closed).
FD_RESERVE = 64
#: Connections at most, however high the descriptor limit (each costs memory).
MAX_CONNECTIONS = 4096


def connection_cap(fd_limit: int) -> int:
    """How many HTTP connections to hold open at once with ``fd_limit`` descriptors."""
    return max(16, min(MAX_CONNECTIONS, fd_limit - FD_RESERVE))


def sweep_interval(ttl: int) -> float:
    """How often to look for expired registrations: often enough that a peer
    disappears at most a quarter of a TTL late, at most every 30 s."""
    return max(1.0, min(30.0, ttl / 4))


class Options(usage.Options):
    synopsis = "[--listen ENDPOINT] [--ttl SECONDS]"
    longdesc = (
        "Run a ClearSkies tracker: peers register (ID, peer ID, port) with "
        "GET /clearskies/track and learn the addresses of the other peers "
        "of the same IDs."
    )
    optParameters = [
        ["listen", "l", "tcp:49200",
         "Endpoint to serve HTTP on, e.g. tcp:49200 or tcp:49200:interface=127.0.0.1."],
        ["ttl", None, str(DEFAULT_TTL),
         "Seconds a registration lives unless the peer registers again (1-%d)." % MAX_TTL],
    ]

    def postOptions(self) -> None:
        ttl = self["ttl"]
        try:
            ttl = int(ttl)
        except (TypeError, ValueError):
            raise usage.UsageError(
                "--ttl must be a whole number of seconds, not %r" % (ttl,)
            ) from None
        if not 1 <= ttl <= MAX_TTL:
            raise usage.UsageError("--ttl must be between 1 and %d seconds, not %d" % (MAX_TTL, ttl))
        self["ttl"] = ttl

        from twisted.internet import reactor

        try:
            endpoints.serverFromString(reactor, self["listen"])
        except Exception as e:
            raise usage.UsageError(
                "--listen %r is not an endpoint description this Twisted understands "
                "(%s); try tcp:49200 or tcp:49200:interface=127.0.0.1" % (self["listen"], e)
            ) from None


def makeService(options: Options) -> MultiService:
    """The tracker's service tree; nothing listens until twistd starts it."""
    from twisted.internet import reactor

    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = MAX_CONNECTIONS + FD_RESERVE
    connections = connection_cap(soft)
    # Streams may take at most half the connections: the rest stay free for
    # plain requests (a client refused a stream falls back to polling).
    registry = Registry(ttl=options["ttl"], max_streams=min(MAX_STREAMS, connections // 2))
    site = make_site(registry, reactor, max_connections=connections)
    top = MultiService()
    strports.service(options["listen"], site, reactor=reactor).setServiceParent(top)
    TimerService(sweep_interval(registry.ttl), lambda: registry.expire(reactor.seconds())).setServiceParent(top)
    return top
