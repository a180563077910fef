"""File records: what the protocol says about one path (protocol/records.md).

A record is immutable.  ``from_wire`` is the single place where a record
received from a peer is checked, so everything downstream may trust its
types and its path syntax (where the path lands on disk is still checked by
``clearskies.share.paths`` before any file is touched).
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass, field, replace
from typing import Any

from clearskies.errors import ProtocolError, UnsafePathError

MAX_PATH_BYTES = 4096
MAX_NAME_BYTES = 255
MAX_VV_ENTRIES = 1024
#: Timestamps (an ``mtime``'s seconds, a ``utime``) lie within this many seconds of
#: 1970 (years 1677 to 2262): the nanosecond form of any such mtime fits a signed
#: 64-bit integer, which is what file systems and the database hold.
MAX_TIME_SECONDS = 9_223_372_035
#: Sizes and version-vector counters fit a signed 64-bit integer.
MAX_SIZE = MAX_COUNTER = 2**63 - 1
MAX_MTIME_NS = MAX_TIME_SECONDS * 1_000_000_000 + 999_999_999
MIN_MTIME_NS = -MAX_TIME_SECONDS * 1_000_000_000
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX = re.compile(r"[0-9a-f]{1,128}")
_OCTAL_MODE = re.compile(r"[0-7]{1,7}")
_PEER_ID = re.compile(r"[0-9a-f]{32}")
_CONTROL_CHARACTER = re.compile("[\x00-\x1f\x7f]")


def validate_wire_path(path: object) -> str:
    """Return ``path`` if it is a safe share-relative path, else raise.

    Rejects anything that could name a place outside the share or that two
    systems could read differently: absolute paths, ``.``/``..`` parts, empty
    parts, NUL, backslashes, control characters, and names that are not in
    Unicode NFC form.
    """
    if not isinstance(path, str) or not path:
        raise UnsafePathError("path must be a non-empty string")
    # Most paths are ASCII: one byte per character, NFC already, valid UTF-8.
    ascii_only = path.isascii()
    size = len(path) if ascii_only else len(path.encode("utf-8", "surrogatepass"))
    if size > MAX_PATH_BYTES:
        raise UnsafePathError("path is longer than %d bytes" % MAX_PATH_BYTES)
    if "\x00" in path:
        raise UnsafePathError("path contains a NUL character")
    if "\\" in path:
        raise UnsafePathError("path contains a backslash")
    if _CONTROL_CHARACTER.search(path):
        raise UnsafePathError("path contains a control character")
    if path.startswith("/"):
        raise UnsafePathError("path is absolute")
    if not ascii_only:
        if unicodedata.normalize("NFC", path) != path:
            raise UnsafePathError("path is not in Unicode NFC form")
        try:
            path.encode("utf-8")
        except UnicodeEncodeError:
            raise UnsafePathError("path is not valid Unicode") from None
    for part in path.split("/"):
        if part in ("", ".", ".."):
            raise UnsafePathError("path has an empty, '.' or '..' component")
        if (len(part) if ascii_only else len(part.encode("utf-8"))) > MAX_NAME_BYTES:
            raise UnsafePathError("a path component is longer than %d bytes" % MAX_NAME_BYTES)
    return path


@dataclass(frozen=True, slots=True)
class FileRecord:
    """One path's state: a file, a directory (extension) or a deletion tombstone."""

    path: str
    utime: float
    deleted: bool = False
    size: int | None = None
    mtime: tuple[int, int] | None = None  # (seconds, nanoseconds)
    mode: int | None = None  # permission bits only (0o7777 mask)
    sha256: str | None = None
    is_dir: bool = False
    vv: dict[str, int] = field(default_factory=dict)  # version vector: peer ID -> counter
    file_id: str | None = None  # the reference peer's per-file "id"
    key: str | None = None  # the reference peer's per-file "key"
    conflict_source: str | None = None

    @property
    def mtime_ns(self) -> int | None:
        if self.mtime is None:
            return None
        return self.mtime[0] * 1_000_000_000 + self.mtime[1]

    def with_changes(self, **changes: Any) -> FileRecord:
        return replace(self, **changes)

    def same_content(self, other: FileRecord) -> bool:
        """True when both describe the same bytes (or are both deletions/directories)."""
        if self.deleted or other.deleted:
            return self.deleted and other.deleted
        if self.is_dir or other.is_dir:
            return self.is_dir and other.is_dir
        return self.sha256 == other.sha256 and self.size == other.size

    def to_wire(self) -> dict[str, Any]:
        """The JSON object of protocol/records.md (plus our extra keys)."""
        out: dict[str, Any] = {"path": self.path, "utime": self.utime}
        if self.deleted:
            out["deleted"] = True
        elif self.is_dir:
            out["directory"] = True
            if self.mode is not None:
                out["mode"] = format_mode(self.mode)
            if self.mtime is not None:
                out["mtime"] = [self.mtime[0], self.mtime[1]]
        else:
            out["size"] = self.size
            out["mtime"] = [self.mtime[0], self.mtime[1]] if self.mtime else [0, 0]
            out["mode"] = format_mode(self.mode if self.mode is not None else 0o644)
            out["sha256"] = self.sha256
        if self.file_id is not None:
            out["id"] = self.file_id
        if self.key is not None and not self.deleted:
            out["key"] = self.key
        if self.vv:
            out["vv"] = dict(self.vv)
        if self.conflict_source is not None:
            out["conflict_source"] = self.conflict_source
        return out

    @classmethod
    def from_wire(cls, obj: object) -> FileRecord:
        """Check and convert a record received from a peer; ProtocolError if malformed."""
        if not isinstance(obj, dict):
            raise ProtocolError("file record is not an object")
        path = validate_wire_path(obj.get("path"))
        utime = _number(obj.get("utime"), "utime")
        vv = _version_vector(obj.get("vv"))
        file_id = _optional_hex(obj.get("id"), "id")
        key = _optional_hex(obj.get("key"), "key")
        conflict_source = obj.get("conflict_source")
        if conflict_source is not None:
            conflict_source = validate_wire_path(conflict_source)
        common = dict(path=path, utime=utime, vv=vv, file_id=file_id, key=key,
                      conflict_source=conflict_source)
        if obj.get("deleted") is True:
            return cls(deleted=True, **common)
        if obj.get("directory") is True:
            mode = parse_mode(obj["mode"]) if "mode" in obj else None
            mtime = _mtime(obj["mtime"]) if "mtime" in obj else None
            return cls(is_dir=True, mode=mode, mtime=mtime, **common)
        size = obj.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_SIZE:
            raise ProtocolError("file record %r has no valid size" % path)
        sha256 = obj.get("sha256")
        if not isinstance(sha256, str) or not _HEX64.fullmatch(sha256):
            raise ProtocolError("file record %r has no valid sha256" % path)
        return cls(size=size, sha256=sha256, mtime=_mtime(obj.get("mtime")),
                   mode=parse_mode(obj.get("mode", "0644")), **common)


def format_mode(mode: int) -> str:
    """Permission bits as the draft writes them: four octal digits, e.g. ``"0644"``."""
    return "%04o" % (mode & 0o7777)


def parse_mode(value: object) -> int:
    """Accept the draft's ``"0664"`` and the reference peer's full st_mode ``"100644"``."""
    if not isinstance(value, str) or not _OCTAL_MODE.fullmatch(value):
        raise ProtocolError("mode must be an octal string, got %r" % (value,))
    return int(value, 8) & 0o7777


def _number(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProtocolError("%s must be a number" % name)
    if not math.isfinite(value) or not 0 <= value <= MAX_TIME_SECONDS:
        raise ProtocolError("%s is out of range (seconds from 0 to %d)"
                            % (name, MAX_TIME_SECONDS))
    return float(value)


def _mtime(value: object) -> tuple[int, int]:
    if (not isinstance(value, list) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise ProtocolError("mtime must be [seconds, nanoseconds]")
    seconds, nanos = value
    if not -MAX_TIME_SECONDS <= seconds <= MAX_TIME_SECONDS or not 0 <= nanos < 1_000_000_000:
        raise ProtocolError("mtime is out of range (seconds must lie within ±%d)"
                            % MAX_TIME_SECONDS)
    return (seconds, nanos)


def clamp_mtime_ns(mtime_ns: int) -> int:
    """A local file's mtime as records and cache keys hold it: within the range above.

    A file dated after 2262 (or before 1677) is recorded with the nearest
    time in range; the file on disk keeps its own.
    """
    return min(max(mtime_ns, MIN_MTIME_NS), MAX_MTIME_NS)


def _optional_hex(value: object, name: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _HEX.fullmatch(value):
        raise ProtocolError("%s must be lowercase hex" % name)
    return value


def _version_vector(value: object) -> dict[str, int]:
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > MAX_VV_ENTRIES:
        raise ProtocolError("vv must be an object of at most %d entries" % MAX_VV_ENTRIES)
    out: dict[str, int] = {}
    for peer, counter in value.items():
        if not _PEER_ID.fullmatch(peer):
            raise ProtocolError("vv keys must be 32-hex peer IDs")
        if not isinstance(counter, int) or isinstance(counter, bool) \
                or not 0 <= counter <= MAX_COUNTER:
            raise ProtocolError("vv counters must be non-negative integers")
        out[peer] = counter
    return out
