"""A sync session's states as explicit machines (drawn in protocol/session.dot).

Pure: no connection, no reactor.  Two tables: the session's life
(:data:`TRANSITIONS`: started, receiving a payload, closed) and its inbox
(:data:`INBOX_TRANSITIONS`: idle, waiting for the share's first scan,
merging a batch).  The session feeds a machine one input per thing that
happens and carries out the outputs it returns, in order.  A peer's input
that the current state does not take (a payload chunk outside a
``file_data`` message) raises :class:`~clearskies.errors.ProtocolError`,
which closes the connection; any other input the state does not take is our
own bug and raises :class:`IllegalTransition`.
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


# The inbox: what the peer sent, merged one batch at a time.
IDLE = "idle"
"""No batch being merged: the next one that arrives is merged at once."""
AWAITING_SCAN = "awaiting_scan"
"""A share attached with --merge records its folder's files first; batches wait."""
MERGING = "merging"
"""A batch is being merged; what arrives meanwhile joins the next batch."""

INBOX_STATES = (IDLE, AWAITING_SCAN, MERGING)

INBOX_TRANSITIONS: dict[tuple[str, str], tuple[str, list[str]]] = {
    (IDLE, "scan_pending"): (AWAITING_SCAN, []),
    (AWAITING_SCAN, "scan_done"): (IDLE, ["merge_next"]),
    (IDLE, "merge"): (MERGING, []),
    (MERGING, "merged"): (IDLE, ["send_progress", "merge_next"]),
    (MERGING, "merge_failed"): (IDLE, ["merge_next"]),
}
"""(state, input) -> (next state, outputs) of the inbox.  Any other pair raises."""


class IllegalTransition(RuntimeError):
    """An input a machine's current state does not take, caused by our own code."""


class Machine:
    """A state and a transition table; :meth:`fire` takes an input and returns the outputs."""

    def __init__(self, table: dict[tuple[str, str], tuple[str, list[str]]], initial: str,
                 peer_errors: dict[str, str] | None = None,
                 observer: Callable[[str, str, str, list[str]], None] | None = None) -> None:
        self.table = table
        self.state = initial
        self._peer_errors = peer_errors or {}
        #: Called with (state, input, next state, outputs) after every transition.
        self.observer = observer

    def fire(self, event: str) -> list[str]:
        step = self.table.get((self.state, event))
        if step is None:
            if event in self._peer_errors:
                raise ProtocolError(self._peer_errors[event])
            raise IllegalTransition("%s while %s" % (event, self.state))
        before = self.state
        self.state, outputs = step
        if self.observer is not None:
            self.observer(before, event, self.state, list(outputs))
        return list(outputs)


class SessionMachine(Machine):
    """The life of one sync session (:data:`TRANSITIONS`)."""

    def __init__(self, observer: Callable[[str, str, str, list[str]], None] | None = None
                 ) -> None:
        super().__init__(TRANSITIONS, NEW, _PEER_ERRORS, observer)


class InboxMachine(Machine):
    """Whether a session's received records are being merged (:data:`INBOX_TRANSITIONS`)."""

    def __init__(self, observer: Callable[[str, str, str, list[str]], None] | None = None
                 ) -> None:
        super().__init__(INBOX_TRANSITIONS, IDLE, None, observer)
