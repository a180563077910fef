"""Permission bits of a read-only share's files (protocol/readonly.md).

With the ``read_only_files`` setting on, downloads into a read-only share are
put in place without write permission; their records keep the share's mode.
"""

from __future__ import annotations

#: Write permission bits, removed on disk from a read-only share's files when
#: the ``read_only_files`` setting is on.
WRITE_BITS = 0o222


def unwritable_mode(mode: int | None) -> int:
    """A record's permission bits (0o644 when it has none) without write permission."""
    return (mode if mode is not None else 0o644) & 0o777 & ~WRITE_BITS


__all__ = ["WRITE_BITS", "unwritable_mode"]
