"""A sync session's life as an explicit state machine (drawn in protocol/session.dot).

Pure: no connection, no reactor.  :class:`SyncSession` feeds it one input
per thing that happens to the connection and carries out the outputs it
returns, in order.  A peer's input that the current state does not take (a
payload chunk outside a ``file_data`` message) raises
:class:`~clearskies.errors.ProtocolError`, which closes the connection; any
other input the state does not take is our own bug and raises
:class:`IllegalTransition`.
"""

from __future__ import annotations

from collections.abc import Callable

from clearskies.errors import ProtocolError

NEW = "new"
"""Made, not started: messages are taken (a test may feed them), nothing is asked yet."""
OPEN = "open"
"""Attached to its share: messages in, messages and files out."""
RECEIVING = "receiving"
"""A ``file_data`` payload is arriving: only its chunks and its end may come."""
CLOSED = "closed"
"""Refused as a duplicate, or the connection is gone: what still arrives is dropped."""

STATES = (NEW, OPEN, RECEIVING, CLOSED)

# Outputs (the session carries them out).
ASK_MANIFEST = "ask_manifest"
SEND_ADDRESSES = "send_addresses"
CLOSE_DUPLICATE = "close_duplicate"
DISPATCH = "dispatch"
BEGIN_PAYLOAD = "begin_payload"
WRITE_CHUNK = "write_chunk"
FINISH_FILE = "finish_file"
ABORT_DOWNLOADS = "abort_downloads"
STOP_SENDING = "stop_sending"
DETACH = "detach"

_GONE = [ABORT_DOWNLOADS, STOP_SENDING, DETACH]

TRANSITIONS: dict[tuple[str, str], tuple[str, list[str]]] = {
    (NEW, "attached"): (OPEN, [ASK_MANIFEST, SEND_ADDRESSES]),
    (NEW, "duplicate"): (CLOSED, [CLOSE_DUPLICATE]),
    (NEW, "message"): (NEW, [DISPATCH]),
    (OPEN, "message"): (OPEN, [DISPATCH]),
    (OPEN, "file_data"): (RECEIVING, [BEGIN_PAYLOAD]),
    (RECEIVING, "chunk"): (RECEIVING, [WRITE_CHUNK]),
    (RECEIVING, "payload_end"): (OPEN, [FINISH_FILE]),
    (CLOSED, "message"): (CLOSED, []),
    (CLOSED, "chunk"): (CLOSED, []),
    (CLOSED, "payload_end"): (CLOSED, []),
    (NEW, "connection_lost"): (CLOSED, list(_GONE)),
    (OPEN, "connection_lost"): (CLOSED, list(_GONE)),
    (RECEIVING, "connection_lost"): (CLOSED, list(_GONE)),
    (CLOSED, "connection_lost"): (CLOSED, list(_GONE)),
}
"""(state, input) -> (next state, outputs).  Any other pair raises."""

_PEER_ERRORS = {
    "chunk": "payload data outside a file_data message",
    "payload_end": "payload end outside a file_data message",
    "message": "a message inside a file_data payload",
    "file_data": "file_data inside another file_data payload",
}
"""Inputs a peer causes, and why they are refused where the table has no room for them."""


class IllegalTransition(RuntimeError):
    """An input the session's current state does not take, caused by our own code."""


class SessionMachine:
    """The state of one sync session; :meth:`fire` takes an input and returns the outputs."""

    def __init__(self, observer: Callable[[str, str, str, list[str]], None] | None = None
                 ) -> None:
        self.state = NEW
        #: Called with (state, input, next state, outputs) after every transition.
        self.observer = observer

    def fire(self, event: str) -> list[str]:
        step = TRANSITIONS.get((self.state, event))
        if step is None:
            if event in _PEER_ERRORS:
                raise ProtocolError(_PEER_ERRORS[event])
            raise IllegalTransition("%s while the session is %s" % (event, self.state))
        before = self.state
        self.state, outputs = step
        if self.observer is not None:
            self.observer(before, event, self.state, list(outputs))
        return list(outputs)
