"""Which paths of a share are never announced and never overwritten.

Always ignored: our partial downloads (``*.!clearsky``, hidden ``.name.!clearsky``
included), the reference peer's leftovers (``*.!sync``), and the two files of
ours at the share root: the share marker ``.clearskies`` and the user's
``.clearskiesignore``.  The user's patterns come from ``<root>/.clearskiesignore``
with gitignore syntax (``#`` comments, ``!`` negation, trailing ``/`` for
directories only, leading ``/`` anchors at the root).  Only the root's file is
read, and it is not synced: each peer chooses what it leaves alone.

Also always ignored, whatever the patterns say: the folder of kept versions
at the share root (``.clearskies-versions``), and the daemon's own paths (its
data directory) should one lie inside the share (``private``).  Sharing such
a folder is refused (clearskies.share.location); this is the second line.
"""

from __future__ import annotations

import os
from pathlib import Path

import pathspec
from twisted.logger import Logger

MARKER_NAME = ".clearskies"
IGNORE_FILE_NAME = ".clearskiesignore"
TEMP_SUFFIX = ".!clearsky"
#: Where a share keeps the old content peers' changes replaced (clearskies.share.versions).
VERSIONS_NAME = ".clearskies-versions"
MAX_IGNORE_FILE_BYTES = 256 * 1024

BUILTIN_PATTERNS = (
    "*" + TEMP_SUFFIX,
    "*.!sync",
    "/" + MARKER_NAME,
    "/" + IGNORE_FILE_NAME,
)


class IgnoreRules:
    """A compiled set of gitignore-style patterns plus the built-in ones."""

    _log = Logger()

    def __init__(self, user_patterns: list[str] | tuple[str, ...] = (),
                 private: tuple[str, ...] = ()) -> None:
        """``private``: share-relative paths never synced, nor anything below them."""
        self.user_patterns = tuple(user_patterns)
        self.private = frozenset(private)
        self._spec = pathspec.GitIgnoreSpec.from_lines(
            list(BUILTIN_PATTERNS) + list(self.user_patterns))

    @classmethod
    def load(cls, root: str | os.PathLike[str], private: tuple[str, ...] = ()) -> IgnoreRules:
        """Read ``<root>/.clearskiesignore`` (blocking: call from a worker thread).

        A missing file means no user patterns; an unreadable or oversized one
        is reported and skipped rather than stopping the share.
        """
        path = Path(root, IGNORE_FILE_NAME)
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_IGNORE_FILE_BYTES + 1)
        except FileNotFoundError:
            return cls(private=private)
        except OSError as e:
            cls._log.warn("cannot read {path}: {error}; using the built-in rules only",
                          path=str(path), error=str(e))
            return cls(private=private)
        if len(data) > MAX_IGNORE_FILE_BYTES:
            cls._log.warn("{path} is larger than {limit} bytes; using the built-in rules only",
                          path=str(path), limit=MAX_IGNORE_FILE_BYTES)
            return cls(private=private)
        return cls(data.decode("utf-8", "replace").splitlines(), private)

    def matches(self, path: str, is_dir: bool = False) -> bool:
        """True if a pattern matches ``path`` itself (its parents are not checked).

        For a walk that never enters ignored directories, this is enough.
        """
        if path in self.private or path == VERSIONS_NAME:
            return True
        return self._spec.match_file(path + "/" if is_dir else path)

    def is_ignored(self, path: str, is_dir: bool = False) -> bool:
        """True if the share-relative ``path`` or a directory above it is ignored."""
        if self.matches(path, is_dir):
            return True
        # Below an ignored directory everything is ignored, as in git.
        parts = path.split("/")
        return any(self.matches("/".join(parts[:end]), True) for end in range(1, len(parts)))
