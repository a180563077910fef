"""Error types, split by whose fault the error is.

``ProtocolError`` and its subclasses mean a *peer* (or a control-socket
client, or a tracker) sent something we refuse; the connection that carried it
is closed and the daemon carries on.  ``ConfigurationError`` means the *local
user* asked for something impossible; it is reported to them with a message
saying what to do.
"""


class ClearSkiesError(Exception):
    """Base of every error this package raises on purpose."""


class ProtocolError(ClearSkiesError):
    """The remote side broke the protocol; close the connection that carried it."""


class WireError(ProtocolError):
    """Bytes on the wire that the framing of protocol/wire.md does not allow."""


class HandshakeError(ProtocolError):
    """The connection handshake cannot go on (wrong ID, clock skew, bad keys, …)."""


class CannotStart(HandshakeError):
    """The peer answered ``cannot_start``; ``reason`` is its reason when it gave a known one
    (protocol/handshake.md), else None; ``proven`` whether it proved it made the code."""

    def __init__(self, message: str, reason: str | None = None, proven: bool = False) -> None:
        super().__init__(message)
        self.reason = reason
        self.proven = proven


class UnsafePathError(ProtocolError):
    """A path from outside (peer, control socket) that could escape the share."""


class PathObstacle(UnsafePathError):
    """A valid path that something on our disk blocks for now (a symbolic link,
    an unreadable folder, a file where a folder should be): tried again once
    the obstacle may be gone."""


class AccessCodeError(ClearSkiesError, ValueError):
    """An access code that cannot be parsed; the message says which check failed."""


class ConfigurationError(ClearSkiesError):
    """The local user asked for something impossible; the message says what to do."""


class ShareError(ClearSkiesError):
    """A share is in an error state (root vanished, marker missing, database trouble)."""


class RootMissing(ShareError):
    """A share's folder or its marker is not there (an unmounted disk, a deleted folder)."""
