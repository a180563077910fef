"""Checks of the ``untrusted.*`` messages' fields (``protocol/untrusted.md``, section 6)."""

from __future__ import annotations

import re

from clearskies.errors import ProtocolError

_HEX = {32: re.compile(r"[0-9a-f]{32}"), 64: re.compile(r"[0-9a-f]{64}")}
MAX_BLOB = 1 << 50


def check_hex(value: object, length: int, what: str) -> str:
    """``value`` if it is ``length`` lowercase hex characters; else ProtocolError."""
    if not isinstance(value, str) or not _HEX[length].fullmatch(value):
        raise ProtocolError("%s must be %d hex characters" % (what, length))
    return value


def check_get(body: dict) -> tuple[str, str]:
    """(id, sha256) of an ``untrusted.get``."""
    return check_hex(body.get("id"), 32, "id"), check_hex(body.get("sha256"), 64, "sha256")


def check_data(body: dict) -> tuple[str, str, int]:
    """(id, sha256, size) of an ``untrusted.data``."""
    file_id, sha256 = check_get(body)
    size = body.get("size")
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= MAX_BLOB:
        raise ProtocolError("size must be a byte count")
    return file_id, sha256, size
