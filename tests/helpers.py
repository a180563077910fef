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


#: The share and peers of :func:`state_database` and :func:`stored_file`.
STATE_SHARE = "5" * 64
STATE_PEER = "a" * 32


def state_database(path: Any) -> Any:
    """A state database at ``path`` holding one read-write share (STATE_SHARE)."""
    from clearskies.share.database import ShareInfo, StateDatabase

    database = StateDatabase(path)
    database.add_share(ShareInfo(STATE_SHARE, "/srv/share", STATE_PEER, "read_write",
                                 created=1.0))
    return database


def stored_file(path: str, sha: str = "0" * 64, size: int = 1, **kw: Any) -> Any:
    """A file record as the state database tests store it (STATE_PEER's first version)."""
    from clearskies.share.records import FileRecord

    return FileRecord(path=path, utime=10.0, size=size, mtime=(5, 6), mode=0o644,
                      sha256=sha, vv={STATE_PEER: 1}, **kw)


#: The modification time the download jobs' tests give their file.
DOWNLOAD_MTIME_NS = 1_700_000_000_123_456_789


async def seal_install_and_check(test: Any, runner: Any, base: Any) -> None:
    """The download jobs of a small file through ``runner``: one sealed (another refused
    for its size), installed with its mode and mtime; one whose target changed is not."""
    import hashlib
    import os

    from clearskies import diskjobs

    root = base / "share"
    root.mkdir()
    data = b"hello helper"
    content = diskjobs.Content(len(data), hashlib.sha256(data).hexdigest(), 0o640,
                               DOWNLOAD_MTIME_NS)
    target, temp = root / "dir" / "a.txt", root / "dir" / ".a.txt.tmp"
    sealed = await runner.run(diskjobs.seal_buffered_many,
                              [(root, target, temp, data, False, content),
                               (root, root / "b", root / ".b", b"bad", False, content)])
    test.assertEqual(sealed, [None, "got 3 bytes, expected 12"])
    (root / "c").write_bytes(b"edited here")
    key, changed = await runner.run(diskjobs.install_batch,
                                    [(temp, target, ("absent",)),
                                     (root / "b.tmp", root / "c", ("absent",))], None)
    test.assertIsNone(changed)
    test.assertEqual((root / "c").read_bytes(), b"edited here")
    st = os.lstat(target)
    test.assertEqual(key, (st.st_size, st.st_mtime_ns, st.st_ino))
    test.assertEqual((target.read_bytes(), st.st_mode & 0o777, st.st_mtime_ns),
                     (data, 0o640, DOWNLOAD_MTIME_NS))
    test.assertFalse((root / ".b").exists())
