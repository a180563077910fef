"""File records: conversion to and from the wire, and the path checks."""

import json
import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clearskies.errors import ProtocolError, UnsafePathError
from clearskies.share.records import (
    MAX_NAME_BYTES, MAX_PATH_BYTES, MAX_TIME_SECONDS, FileRecord, clamp_mtime_ns, format_mode,
    parse_mode, validate_wire_path)

SHA = "03381d195f92400ba13ba98f86f12d64696623c3dc227eed00f19ffae1365584"
PEER = "48d09b6b6a8ae0edb8fc14c64bbc604b"

# Entries exactly as the reference peer sent them (shared/interop transcript).
REFERENCE_FILE = (
    '{"path":"hello.txt","utime":1795715305.042682,"size":13,"mtime":[1795715304,124652544],'
    '"mode":"100644","sha256":"03381d195f92400ba13ba98f86f12d64696623c3dc227eed00f19ffae1365584",'
    '"id":"8b3fcbf4cb0ed0aa66a2ab51c91418d8",'
    '"key":"2dede2bb72d8c5d88f9f3f93f8f0a1ffbb72af33e6e80e45f2c698106a3180e0"}'
)
REFERENCE_DELETED = (
    '{"path":"empty","utime":1795715309.8301144,"deleted":true,"id":"e7febef4a4a49d317292baaa9932fcf4"}'
)


def test_reference_file_entry_is_accepted():
    """The reference peer's entry (full st_mode, id, key) converts with permission bits only."""
    record = FileRecord.from_wire(json.loads(REFERENCE_FILE))
    assert record.path == "hello.txt"
    assert record.size == 13
    assert record.mode == 0o644
    assert record.mtime == (1795715304, 124652544)
    assert record.file_id == "8b3fcbf4cb0ed0aa66a2ab51c91418d8"
    assert record.key.startswith("2dede2bb")
    assert not record.deleted


def test_reference_deleted_entry_is_a_tombstone():
    """A deleted entry needs no size or hash and becomes a tombstone."""
    record = FileRecord.from_wire(json.loads(REFERENCE_DELETED))
    assert record.deleted and record.sha256 is None
    assert record.to_wire() == {"path": "empty", "utime": 1795715309.8301144, "deleted": True,
                                "id": "e7febef4a4a49d317292baaa9932fcf4"}


def test_draft_mode_is_written_with_four_digits():
    """Modes go out as the draft writes them and come back from both spellings."""
    assert format_mode(0o100644) == "0644"
    assert parse_mode("0664") == 0o664
    assert parse_mode("100755") == 0o755


records = st.builds(
    FileRecord,
    path=st.sampled_from(["a", "dir/b.txt", "ünï/cödé", "x y/z"]),
    utime=st.floats(min_value=0, max_value=4e9),
    size=st.integers(min_value=0, max_value=2**63 - 1),
    mtime=st.tuples(st.integers(-MAX_TIME_SECONDS, MAX_TIME_SECONDS), st.integers(0, 999_999_999)),
    mode=st.integers(0, 0o7777),
    sha256=st.text("0123456789abcdef", min_size=64, max_size=64),
    vv=st.dictionaries(st.text("0123456789abcdef", min_size=32, max_size=32),
                       st.integers(0, 2**63 - 1), max_size=4),
)


@given(records)
def test_file_record_round_trips_through_json(record):
    """to_wire → JSON text → from_wire gives back the same record, big integers exact."""
    assert FileRecord.from_wire(json.loads(json.dumps(record.to_wire()))) == record


def test_directory_record_round_trips():
    """The directory extension record keeps its mode and has no content fields."""
    record = FileRecord(path="empty-dir", utime=5.0, is_dir=True, mode=0o755, vv={PEER: 2})
    wire = record.to_wire()
    assert wire["directory"] is True and "sha256" not in wire
    assert FileRecord.from_wire(wire) == record


@pytest.mark.parametrize("bad", [
    "../x", "/etc/passwd", "a/../../b", "a/./b", "a//b", "a/", "", "nul\x00byte",
    "back\\slash", "tab\tname", "cafe\u0301", ".", "..", "a" * 300,
])
def test_unsafe_paths_are_rejected(bad):
    """Every path that could escape the share or be read two ways is refused."""
    with pytest.raises(UnsafePathError):
        validate_wire_path(bad)


@pytest.mark.parametrize("good", ["a", ".hidden", "dir/sub/file.txt", "café", "a..b", "..a"])
def test_safe_paths_pass(good):
    """Ordinary relative paths, dotfiles and NFC names are accepted unchanged."""
    assert validate_wire_path(good) == good


@pytest.mark.parametrize("change", [
    {"size": -1}, {"size": "13"}, {"size": True}, {"sha256": "xyz"}, {"sha256": None},
    {"mtime": [1]}, {"mtime": [1, 2_000_000_000]}, {"mode": "rw-r--r--"}, {"utime": "now"},
    {"utime": float("nan")}, {"vv": {"not-a-peer": 1}}, {"vv": {PEER: -1}}, {"id": "XYZ"},
    {"path": "../escape"},
])
def test_malformed_records_raise_protocol_error(change):
    """Each malformed field is a ProtocolError, never another exception."""
    obj = json.loads(REFERENCE_FILE)
    obj.update(change)
    with pytest.raises(ProtocolError):
        FileRecord.from_wire(obj)


@pytest.mark.parametrize("change", [
    {"mtime": [2**62 - 1, 0]}, {"mtime": [MAX_TIME_SECONDS + 1, 0]},
    {"mtime": [-MAX_TIME_SECONDS - 1, 0]}, {"utime": 1e300}, {"utime": MAX_TIME_SECONDS + 1},
    {"size": 2**63}, {"vv": {PEER: 2**63}},
])
def test_out_of_range_numbers_are_refused(change):
    """Timestamps, sizes and counters beyond what 64-bit storage holds are protocol errors."""
    obj = json.loads(REFERENCE_FILE)
    obj.update(change)
    with pytest.raises(ProtocolError, match="range|size|vv"):
        FileRecord.from_wire(obj)


def test_the_limits_themselves_are_accepted():
    """The documented maxima are in range, and their nanoseconds fit a signed 64-bit int."""
    obj = json.loads(REFERENCE_FILE)
    obj.update(mtime=[MAX_TIME_SECONDS, 999_999_999], utime=MAX_TIME_SECONDS, size=2**63 - 1)
    record = FileRecord.from_wire(obj)
    assert record.mtime_ns < 2**63
    obj["mtime"] = [-MAX_TIME_SECONDS, 0]
    assert FileRecord.from_wire(obj).mtime_ns >= -(2**63)


def test_a_far_future_local_mtime_is_clamped():
    """A file dated 2286 is recorded at the last time in range; ordinary times are kept."""
    year_2286 = 9_999_999_999 * 10**9
    assert clamp_mtime_ns(year_2286) == MAX_TIME_SECONDS * 10**9 + 999_999_999
    assert clamp_mtime_ns(-year_2286) == -MAX_TIME_SECONDS * 10**9
    assert clamp_mtime_ns(1_700_000_000_123_456_789) == 1_700_000_000_123_456_789


def test_non_object_record_is_refused():
    """A record that is not a JSON object is a protocol error."""
    with pytest.raises(ProtocolError):
        FileRecord.from_wire(["path", "x"])


def _reference_validation(path: str) -> bool:
    """The path rules written out plainly, character by character (slow, obvious)."""
    if not path or len(path.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
        return False
    if any(c == "\\" or ord(c) < 0x20 or ord(c) == 0x7F for c in path) or path[0] == "/":
        return False
    try:
        if unicodedata.normalize("NFC", path) != path or path.encode("utf-8") is None:
            return False
    except UnicodeEncodeError:
        return False
    return all(part not in ("", ".", "..") and len(part.encode("utf-8")) <= MAX_NAME_BYTES
               for part in path.split("/"))


@settings(max_examples=500)
@given(st.one_of(
    st.text(),
    st.text(alphabet="ab./\\\\\x00\x01\x7f", max_size=12),
    st.lists(st.sampled_from(["a", "/", "e\u0301", "\u00e9", "\ud800", "x" * 255, "y" * 256]),
             max_size=20).map("".join),
))
def test_validation_agrees_with_the_plain_rules(path):
    """The fast checks (ASCII shortcut, one regex) accept exactly what the plain rules do."""
    try:
        validate_wire_path(path)
        accepted = True
    except UnsafePathError:
        accepted = False
    assert accepted == _reference_validation(path)
