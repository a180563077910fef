"""JSON parsing whose cost is bounded before the parser runs (see ``protocol/wire.md``).

``json.loads`` builds every value it reads: a 16 MiB line of ``[],`` becomes
millions of lists (hundreds of MB, seconds of CPU).  :func:`loads` first
measures the text with byte operations that run at memory speed, and refuses
it unless

* it can hold at most ``max_items`` JSON values: every value but the first
  follows a ``,``, ``:``, ``[`` or ``{``, so their count bounds the number of
  values (and so the memory) the parser can build, whatever the values are;
* it nests at most ``max_depth`` arrays/objects deep: the brackets are peeled
  one level at a time (``[]`` and ``{}`` removed by ``bytes.replace``) at most
  ``max_depth`` times.

Both counts read brackets and separators inside strings too, so they can only
overestimate.  Only when the peeling cannot show the depth (brackets in a
string that do not pair up, such as a file named ``a[.txt``) is the depth
measured exactly on the parsed value, which the item bound keeps cheap.

Pure: no I/O, stdlib only (the CLI's control client uses it too).
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["ShapeError", "item_bound", "check_items", "loads"]

_BRACKETS = b"[]{}"
_NOT_BRACKETS = bytes(b for b in range(256) if b not in _BRACKETS)


class ShapeError(ValueError):
    """JSON text with more values or deeper nesting than allowed."""


def item_bound(data: bytes | bytearray, start: int = 0, end: int | None = None) -> int:
    """An upper bound on the number of JSON values ``data[start:end]`` can decode to.

    Counts in place: a line still in a receive buffer is not copied.
    """
    if end is None:
        end = len(data)
    return (data.count(b",", start, end) + data.count(b":", start, end)
            + data.count(b"[", start, end) + data.count(b"{", start, end) + 1)


def check_items(data: bytes | bytearray, max_items: int, start: int = 0,
                end: int | None = None) -> None:
    """ShapeError when ``data[start:end]`` may hold more than ``max_items`` values."""
    items = item_bound(data, start, end)
    if items > max_items:
        raise ShapeError("it may hold %d JSON values, more than the %d allowed"
                         % (items, max_items))


def _depth_at_most(text: bytes, max_depth: int) -> bool:
    """True when the brackets of ``text`` provably nest at most ``max_depth`` deep.

    False means "not shown", not "too deep": brackets inside strings may not
    pair up.  Each pass removes every innermost pair, so balanced brackets
    nesting ``d`` deep are gone after ``d`` passes.
    """
    skeleton = text.translate(None, _NOT_BRACKETS)
    for _ in range(max_depth):
        if not skeleton:
            return True
        peeled = skeleton.replace(b"[]", b"").replace(b"{}", b"")
        if len(peeled) == len(skeleton):
            return False
        skeleton = peeled
    return not skeleton


def _depth(value: Any, limit: int) -> int:
    """Nesting depth of a decoded value, counting stops once past ``limit``."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > deepest:
            deepest = depth
            if deepest > limit:
                break
        children = node.values() if type(node) is dict else node
        for child in children:
            if type(child) is dict or type(child) is list:
                stack.append((child, depth + 1))
    return deepest if type(value) in (dict, list) else 0


def loads(text: bytes, max_items: int | None, max_depth: int, **options: Any) -> Any:
    """``json.loads`` of UTF-8 ``text`` (``options`` passed on), bounded as the module says.

    Raises :class:`ShapeError` before parsing for too many values or too deep
    nesting, ``UnicodeDecodeError`` for bad UTF-8, ``ValueError`` for bad JSON
    and ``RecursionError`` never (it becomes :class:`ShapeError`).  A caller
    that already ran :func:`check_items` on these bytes passes ``None``.
    """
    if max_items is not None:
        check_items(text, max_items)
    shown = _depth_at_most(text, max_depth)
    decoded = text.decode("utf-8")
    try:
        value = json.loads(decoded, **options)
    except RecursionError:
        raise ShapeError("it nests more than %d levels deep" % (max_depth,)) from None
    if not shown and _depth(value, max_depth) > max_depth:
        raise ShapeError("it nests more than %d levels deep" % (max_depth,))
    return value
