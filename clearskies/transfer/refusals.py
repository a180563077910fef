"""Refusing a ``get`` (protocol/transfer.md, section 3): the ``get_error`` message and its reason.

The reason tells the peer what went wrong without naming local paths.
"""

from __future__ import annotations

import errno
from typing import Any


def get_error_message(path: str, message: str) -> dict[str, Any]:
    """The answer to a ``get`` we cannot serve."""
    return {"type": "get_error", "path": path, "message": message}


def describe_os_error(error: OSError) -> str:
    """A reason for a peer: says what went wrong without naming local paths."""
    if isinstance(error, FileNotFoundError):
        return "no such file"
    if isinstance(error, PermissionError):
        return "permission denied"
    if error.errno == errno.ELOOP:
        return "not a regular file"
    return error.strerror or "cannot read the file"


__all__ = ["get_error_message", "describe_os_error"]
