"""A download's states as an explicit machine (drawn in protocol/receiver.dot).

Pure: no files, no reactor.  :data:`RECEIVER_TRANSITIONS` says which input
each state takes and where it leads; :class:`ReceiverMachine` holds one
download's state and takes its inputs.  An input the current state does not
take is the caller's bug and raises :class:`IllegalTransition`.
:class:`~clearskies.transfer.receiver.FileReceiver` fires the inputs as its
file work starts and ends.
"""

from __future__ import annotations

from collections.abc import Callable

NEW = "new"
"""Made: nothing written yet (a resumed download knows its partial file's size)."""
WRITING = "writing"
"""Filling the temporary file, or the memory buffer of a small file."""
BUSY = "busy"
"""File work runs in a worker (a local copy, the seal, the rename): no abort now."""
VERIFIED = "verified"
"""Size and SHA-256 checked, metadata set, fsynced: waiting to be put in place."""
DONE = "done"
"""Put in place, rejected or given up."""
FAILED = "failed"
"""The local disk refused a write: the rest of the payload is dropped and seal()
raises that error (clearskies.diskerrors)."""

RECEIVER_STATES = (NEW, WRITING, BUSY, VERIFIED, DONE, FAILED)

RECEIVER_TRANSITIONS: dict[tuple[str, str], str] = {
    # Filling the temporary file (or the memory buffer of a small file).
    (NEW, "open"): WRITING,
    (WRITING, "write"): WRITING,
    (FAILED, "write"): FAILED,  # the rest of the payload is dropped
    (NEW, "copy"): BUSY,
    (WRITING, "copy"): BUSY,
    (BUSY, "copied"): WRITING,
    (BUSY, "copy_failed"): NEW,
    # Verifying and fsyncing (seal).
    (WRITING, "seal"): BUSY,
    (BUSY, "sealed"): VERIFIED,
    (BUSY, "rejected"): DONE,
    (NEW, "disk_failed"): FAILED,
    (WRITING, "disk_failed"): FAILED,
    (BUSY, "disk_failed"): FAILED,
    (FAILED, "seal_failed"): DONE,
    # Putting the verified content in place (finish, finish_many, keep_as).
    (VERIFIED, "install"): BUSY,
    (BUSY, "installed"): DONE,
    (BUSY, "install_failed"): VERIFIED,
    # Giving up (not while file work runs).
    (NEW, "abort"): DONE,
    (WRITING, "abort"): DONE,
    (VERIFIED, "abort"): DONE,
    (FAILED, "abort"): DONE,
    (DONE, "abort"): DONE,
}
"""(state, input) -> next state.  Any other pair raises IllegalTransition."""


class IllegalTransition(RuntimeError):
    """An input the machine's current state does not take: the caller's bug, not the peer's."""


class ReceiverMachine:
    """Where one download is: a transition table, an observer for tests and logs."""

    def __init__(self, observer: Callable[[str, str, str], None] | None = None) -> None:
        self.state = NEW
        #: Called with (state, input, next state) after every transition.
        self.observer = observer

    def fire(self, event: str) -> str:
        """Take ``event``; the new state.  IllegalTransition if this state does not take it."""
        after = RECEIVER_TRANSITIONS.get((self.state, event))
        if after is None:
            raise IllegalTransition("%s of a download that is %s" % (event, self.state))
        before, self.state = self.state, after
        if self.observer is not None:
            self.observer(before, event, after)
        return after


__all__ = [
    "NEW", "WRITING", "BUSY", "VERIFIED", "DONE", "FAILED", "RECEIVER_STATES",
    "RECEIVER_TRANSITIONS", "IllegalTransition", "ReceiverMachine",
]
