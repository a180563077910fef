"""A key holder that connects again and again under fresh peer IDs.

Each connection completes the real handshake and TLS with the share's keys
from its own loopback address (127.30.x.y), tells the daemon where it can
be reached (``clearskies.addresses``: closed ports on 127.66.x.y), waits a
moment for the daemon to record it, and leaves.  Peer IDs are drawn from a
seeded generator.
"""

from __future__ import annotations

import random
import time
from typing import Any

from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.task import deferLater

from clearskies.handshake import ConnectTarget, MemoryKeyRing
from clearskies.keys import ShareKeys
from clearskies.peer import connect_peer
from clearskies.wire import encode
from tests.fakes import QuietSession

FEATURES = ("vv", "directories", "progress", "addresses")


def host_for(n: int) -> str:
    """The n-th attacker's source address."""
    return "127.30.%d.%d" % (n // 250, 1 + n % 250)


async def fresh_id_connections(reactor: Any, port: int, keys: ShareKeys, count: int,
                               seed: int = 0, linger: float = 0.05) -> int:
    """Connect ``count`` times, each under a new peer ID; returns how many got in."""
    rng = random.Random(seed)
    ring = MemoryKeyRing(time.time)
    admitted = 0
    for n in range(count):
        peer_id = "%032x" % rng.getrandbits(128)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5,
                                      bindAddress=(host_for(n), 0))
        try:
            connection = await connect_peer(reactor, endpoint, ConnectTarget.share(keys, peer_id),
                                            ring, "fresh id %d" % n, QuietSession, features=FEATURES)
        except Exception:
            continue
        admitted += 1
        addresses = ["tcp:127.66.%d.%d:9" % (n % 250, k + 1) for k in range(8)]
        connection.send_bytes(encode({"type": "clearskies.addresses", "addresses": addresses}))
        await deferLater(reactor, linger, lambda: None)
        connection.close("done", quiet=True)
    return admitted
