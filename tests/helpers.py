"""Small helpers shared by the test modules (fakes live in tests/fakes.py, daemons in
tests/daemons.py).

``async_test`` is the one way to write a coroutine test: decorate an
``async def test_…(self)`` method of a ``twisted.trial.unittest.TestCase``
and both trial and pytest run it, trial waiting on the Deferred it returns::

    class Tests(TestCase):
        @async_test
        async def test_reply(self) -> None:
            \"\"\"The server answers.\"\"\"
            reply = await ask(...)
            self.assertEqual(reply, ...)
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Coroutine
from typing import Any

from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase


def async_test(method: Callable[..., Coroutine[Any, Any, Any]]) -> Callable[..., Deferred]:
    """Run an ``async def`` test method as a Deferred (what trial waits on)."""
    @functools.wraps(method)
    def run(self: TestCase, *args: Any, **kwargs: Any) -> Deferred:
        return Deferred.fromCoroutine(method(self, *args, **kwargs))
    return run


def result_of(d: Deferred):
    """The result of an already-fired Deferred (raising its failure)."""
    out = []
    d.addBoth(out.append)
    assert out, "Deferred has not fired"
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


def temporary_dir(case: TestCase) -> str:
    """A fresh directory removed after the test (trial's mktemp writes into the cwd)."""
    path = os.path.realpath(tempfile.mkdtemp(prefix="clearskies-test-"))
    case.addCleanup(shutil.rmtree, path, True)
    return path


def onion_name(seed: bytes) -> str:
    """A well-formed v3 onion name (no ``.onion``) derived from ``seed``: key, checksum, version 3."""
    key = hashlib.sha256(seed).digest()
    checksum = hashlib.sha3_256(b".onion checksum" + key + b"\x03").digest()[:2]
    return base64.b32encode(key + checksum + b"\x03").decode("ascii").lower()


def sha(data: bytes) -> str:
    """The hex SHA-256 of ``data``, as records carry it."""
    return hashlib.sha256(data).hexdigest()
