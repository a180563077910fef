"""Tests for bounded JSON parsing (clearskies.jsonshape)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from clearskies.jsonshape import ShapeError, check_items, item_bound, loads

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=4), children, max_size=4),
    max_leaves=20,
)


def _count(value: object) -> int:
    """Every value in a decoded document, keys included."""
    if isinstance(value, list):
        return 1 + sum(_count(v) for v in value)
    if isinstance(value, dict):
        return 1 + sum(1 + _count(v) for v in value.values())
    return 1


@given(json_values)
def test_item_bound_never_undercounts(value):
    """The byte count bounds the values (keys included) any document decodes to."""
    text = json.dumps(value).encode()
    assert item_bound(text) >= _count(value)
    assert loads(text, item_bound(text), 64) == value


def test_item_bound_counts_in_place():
    """Counting a slice of a buffer gives the count of those bytes alone."""
    buf = bytearray(b"xx[1,2,{\"a\":3}]yy")
    assert item_bound(buf, 2, len(buf) - 2) == item_bound(bytes(buf[2:-2])) == 6
    with pytest.raises(ShapeError, match="more than the 5 allowed"):
        check_items(buf, 5, 2, len(buf) - 2)


def test_too_many_values_refused_before_parsing():
    """A document with more values than allowed is refused, whatever they are."""
    with pytest.raises(ShapeError, match="1001 JSON values, more than the 1000 allowed"):
        loads(b"[" + b"1," * 999 + b"1]", 1000, 32)
    assert len(loads(b"[" + b"1," * 998 + b"1]", 1000, 32)) == 999
    with pytest.raises(ShapeError):
        loads(b"[" + b"[]," * 500 + b"[]]", 1000, 32)


@pytest.mark.parametrize("depth, ok", [(32, True), (33, False)])
def test_depth_limit(depth, ok):
    """Nesting up to max_depth parses; one more level is refused."""
    text = b"[" * depth + b"]" * depth
    if ok:
        loads(text, 100, 32)
    else:
        with pytest.raises(ShapeError, match="more than 32 levels"):
            loads(text, 100, 32)


def test_depth_past_the_recursion_limit_is_a_shape_error():
    """Nesting deeper than the parser's own limit is a ShapeError, not a RecursionError."""
    text = b"[" * 50_000 + b"]" * 50_000
    with pytest.raises(ShapeError, match="levels deep"):
        loads(text, 10**6, 32)


def test_brackets_in_strings_do_not_fake_depth():
    """Unpaired or deeply nested brackets inside strings are measured exactly, not refused."""
    for name in ("a[.txt", "]]]]", "[" * 40 + "]" * 40, "{[}]"):
        text = json.dumps({"files": [{"path": name, "mtime": [1, 2]}]}).encode()
        assert loads(text, 100, 4)["files"][0]["path"] == name
    hidden = b'[' * 20 + b'"]"' + b']' * 20  # the string's bracket must not hide the depth
    with pytest.raises(ShapeError, match="levels deep"):
        loads(hidden, 100, 8)


def test_options_reach_the_parser():
    """Keyword options are passed on to json.loads."""
    assert loads(b'{"a":1.5}', 10, 4, parse_float=lambda s: "f" + s) == {"a": "f1.5"}
