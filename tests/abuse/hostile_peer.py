"""A peer holding the share's keys that sends one hostile line per connection.

Run as ``python -m tests.abuse.hostile_peer HOST:PORT KEYS_JSON OUT_JSON WAIT SHAPE...``
(a child process, so the daemon under test is the only one parsing).  For
each shape it completes the real handshake and TLS, sends the line, and
records whether the daemon closed the connection (within WAIT seconds) and
how long that took.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

SIXTEEN_MIB = 16 * 1024 * 1024


def _fill(prefix: bytes, unit: bytes, suffix: bytes, size: int = SIXTEEN_MIB) -> bytes:
    return prefix + unit * ((size - len(prefix) - len(suffix)) // len(unit)) + suffix


SHAPES: dict[str, Callable[[], bytes]] = {
    # Refused before parsing: more values than any message may hold.
    "empty arrays": lambda: _fill(b'{"type":"manifest","files":[', b"[],", b"[]]}"),
    "small numbers": lambda: _fill(b'{"files":[', b"1,", b'1],"type":"manifest"}'),
    # Refused before parsing: nested deeper than any message.
    "deep nesting": lambda: b'{"type":"manifest","files":' + b"[ " * 100 + b"]" * 100 + b"}",
    # Refused before it is buffered whole: outgrows its type.
    "long get": lambda: _fill(b'{"type":"get","path":"', b"a", b'"}'),
    # Parsed (its type comes last), then refused for its type.
    "long get, type last": lambda: _fill(b'{"path":"', b"\\u0041", b'","type":"get"}'),
    "huge integer": lambda: b'{"type":"ping","timeout":1' + b"0" * 100_000 + b"}",
    "huge exponent": lambda: b'{"type":"ping","timeout":1e999999}',
    "long signature line": lambda: b'${"type":"update"}\n' + b"A" * (SIXTEEN_MIB - 1),
}
"""Lines the daemon must refuse, closing the connection."""

WITHIN_BOUNDS: dict[str, Callable[[], bytes]] = {
    # Within every bound of a manifest: parsed like a legitimate one of its size;
    # the sync layer then skips its records (they are not objects).
    "short strings": lambda: _fill(b'{"type":"manifest","files":[', b'"ab",' + b" " * 4,
                                   b'"ab"]}'),
}
"""Lines no bound refuses: what the worst legitimate-looking message costs."""

COMPRESSED: dict[str, Callable[[], tuple[str, bytes]]] = {
    # In one frame of the connection's own zlib stream: 100 MB of zeros (about 0.5 MB).
    "zip bomb": lambda: ("frame", b"\0" * (100 * 1024 * 1024)),
    # One endless line, compressed: refused at its type's limit, not after 100 MB.
    "zip bomb line": lambda: ("frame", b'{"type":"ping","x":"' + b"a" * (100 * 1024 * 1024)),
    # Written under TLS as they are, past the encoder.
    "garbage frame": lambda: ("raw", b"12:garbage-data"),
    "frame length over the limit": lambda: ("raw", b"999999999:"),
    "plain line": lambda: ("raw", b'{"type":"get_manifest"}\n'),
}
"""With ``gzip`` negotiated: frames the daemon must refuse (protocol/gzip.md)."""


def run(address: str, keys_path: str, out_path: str, shapes: list[str],
        timeout: float = 30.0) -> None:
    """Send each shape on its own connection; write one result dict per shape to ``out_path``.

    Ends the process (``task.react`` does).
    """
    from twisted.internet import endpoints, task
    from twisted.internet.defer import Deferred

    from clearskies.daemon.dialling import FEATURES
    from clearskies.daemon.resources import new_peer_id
    from clearskies.handshake import ConnectTarget, MemoryKeyRing
    from clearskies.keys import ShareKeys
    from clearskies.peer import connect_peer
    from tests.fakes import QuietSession

    keys = ShareKeys.load(Path(keys_path))
    results: list[dict] = []

    async def main(reactor) -> None:
        ring = MemoryKeyRing(time.time)
        host, port = address.rsplit(":", 1)
        for name in shapes:
            compressed = COMPRESSED.get(name)
            line = b"" if compressed else {**SHAPES, **WITHIN_BOUNDS}[name]() + b"\n"
            endpoint = endpoints.TCP4ClientEndpoint(reactor, host, int(port))
            sessions: list[QuietSession] = []

            def factory(connection, sessions=sessions) -> QuietSession:
                sessions.append(QuietSession(connection))
                return sessions[-1]

            protocol = await connect_peer(reactor, endpoint,
                                          ConnectTarget.share(keys, new_peer_id()), ring,
                                          "hostile", factory, features=FEATURES)
            started = time.monotonic()
            if compressed is not None:
                how, line = compressed()
                if protocol.compression is None:
                    raise SystemExit("the daemon did not negotiate compression")
                if how == "raw":
                    protocol.transport.wrapped.write(line)
                else:
                    protocol.transport.encoder.frame_size = len(line)
                    protocol.transport.write(line)
            else:
                protocol.send_bytes(line)
            while not sessions[0].lost and time.monotonic() - started < timeout:
                await task.deferLater(reactor, 0.02, lambda: None)
            closed = sessions[0].lost is not None
            if not closed:
                protocol.transport.abortConnection()
            results.append({"shape": name, "bytes": len(line), "closed": closed,
                            "seconds": round(time.monotonic() - started, 3)})
        Path(out_path).write_text(json.dumps(results))

    task.react(lambda reactor: Deferred.fromCoroutine(main(reactor)))


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[5:], float(sys.argv[4]))
