"""The names of partial downloads (protocol/transfer.md, section 4).

A download is written under a hidden temporary name beside its target.  The
name depends only on the target's name and the expected hash, so a download
cut off by a lost connection or a restart finds its bytes again and resumes
with ``range``.  The suffix is the share's (:mod:`clearskies.share.ignore`),
which never counts such files as content.
"""

from __future__ import annotations

from clearskies.share.ignore import TEMP_SUFFIX


def temp_name(name: str, sha256: str) -> str:
    """``.<name>.<first 16 hex of sha256>.!clearsky``, shortened to fit in 255 bytes."""
    room = 255 - (1 + 1 + 16 + len(TEMP_SUFFIX))
    encoded = name.encode("utf-8")
    if len(encoded) > room:
        name = encoded[:room].decode("utf-8", "ignore")
    return ".%s.%s%s" % (name, sha256[:16], TEMP_SUFFIX)


def is_temp_name(name: str) -> bool:
    """True for names of our partial downloads (never part of a share's content)."""
    return name.startswith(".") and name.endswith(TEMP_SUFFIX)


__all__ = ["TEMP_SUFFIX", "temp_name", "is_temp_name"]
