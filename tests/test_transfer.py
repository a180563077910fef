"""File transfer: sending with backpressure, receiving with verification (protocol/transfer.md)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tracemalloc
from pathlib import Path

import pytest
from twisted.internet import protocol, reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IConsumer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface import implementer

from clearskies import wire
from clearskies.errors import ProtocolError, UnsafePathError
from clearskies.share.records import FileRecord
from clearskies.threads import SyncRunner, ThreadPoolRunner
from clearskies.transfer import (
    CONFLICT, CORRUPT, OK, RECEIVER_STATES, RECEIVER_TRANSITIONS, BufferedSeals, FileReceiver,
    FileSender, IllegalTransition, ReceiverMachine, SendQueue, SendResult, describe_os_error,
    finish_many, get_error_message, is_temp_name, temp_name,
)
from tests.dotfile import edges
from tests.fakes import HeldRunner, PausingTransport, content, record_for
from tests.helpers import async_test

MiB = 1024 * 1024
MTIME = (1_700_000_000, 123_456_789)


def parse_payload(raw: bytes) -> tuple[dict, list[int], bytes, bytes]:
    """Split ``!header`` + chunks + ``0``: (header, chunk sizes, data, bytes after the end)."""
    assert raw.startswith(b"!")
    line_end = raw.index(b"\n")
    header = json.loads(raw[1:line_end])
    pos = line_end + 1
    sizes, data = [], []
    while True:
        nl = raw.index(b"\n", pos)
        size = int(raw[pos:nl])
        pos = nl + 1
        if size == 0:
            return header, sizes, b"".join(data), raw[pos:]
        sizes.append(size)
        data.append(raw[pos:pos + size])
        pos += size


def run_clock(clock: Clock, limit: int = 10_000) -> None:
    for _ in range(limit):
        if not clock.getDelayedCalls():
            return
        clock.advance(0)
    raise AssertionError("producer never finished")


def result_of(d: Deferred):
    """The result (or Failure) a fired Deferred holds, leaving it in place."""
    results = []

    def keep(result):
        results.append(result)
        return result

    d.addBoth(keep)
    assert results, "Deferred has not fired"
    if isinstance(results[0], Failure):
        d.addErrback(lambda f: None)
    return results[0]


def drain_all(clock: Clock, transport: PausingTransport) -> bytes:
    """Let a paused sender (and its queue) run to the end; return everything written."""
    for _ in range(10_000):
        run_clock(clock)
        if transport.producer is None:
            return transport.everything()
        transport.drain()
    raise AssertionError("sending never finished")


# -- FileSender ------------------------------------------------------------------------


def test_sender_writes_header_chunks_and_end(tmp_path):
    """A file goes out as the file_data line, 1 MiB chunks and the zero chunk, exactly."""
    data = content(2 * MiB + 123)
    (tmp_path / "f.bin").write_bytes(data)
    clock, transport = Clock(), StringTransport()
    sender = FileSender.open(clock, "dir/f.bin", tmp_path / "f.bin", expected_size=len(data),
                             runner=SyncRunner())
    done = sender.begin(transport)
    assert transport.producer is sender and transport.streaming
    assert transport.value() == b'!{"type":"file_data","path":"dir/f.bin"}\n'
    run_clock(clock)
    header, sizes, body, rest = parse_payload(transport.value())
    assert header == {"type": "file_data", "path": "dir/f.bin"}
    assert sizes == [MiB, MiB, 123] and body == data and rest == b""
    assert result_of(done) == len(data)
    assert transport.producer is None


def test_sender_answers_a_range_with_the_range(tmp_path):
    """A ranged request gets exactly those bytes, and the header repeats the range."""
    data = content(3000)
    (tmp_path / "f").write_bytes(data)
    clock, transport = Clock(), StringTransport()
    sender = FileSender.open(clock, "f", tmp_path / "f", request_range=(1000, 1500),
                             chunk_size=1024, runner=SyncRunner())
    sender.begin(transport)
    run_clock(clock)
    header, sizes, body, _ = parse_payload(transport.value())
    assert header == {"type": "file_data", "path": "f", "range": [1000, 1500]}
    assert sizes == [1024, 476] and body == data[1000:2500]


def test_sender_of_empty_file_sends_header_and_end_only(tmp_path):
    """A 0-byte file is the header line followed directly by the end marker."""
    (tmp_path / "e").write_bytes(b"")
    clock, transport = Clock(), StringTransport()
    done = FileSender.open(clock, "e", tmp_path / "e", runner=SyncRunner()).begin(transport)
    run_clock(clock)
    assert transport.value() == b'!{"type":"file_data","path":"e"}\n0\n'
    assert result_of(done) == 0


def test_pause_stops_disk_reads_and_resume_restarts_them(tmp_path):
    """While paused nothing is read or written; resuming finishes the file."""
    data = content(5 * 1000)
    (tmp_path / "f").write_bytes(data)
    clock, transport = Clock(), PausingTransport(limit=1500)
    sender = FileSender.open(clock, "f", tmp_path / "f", chunk_size=1000,
                             runner=SyncRunner())
    sender.begin(transport)
    for _ in range(10):
        clock.advance(1)
    # The second chunk pushed the buffer past its limit: the transport paused us.
    written, position = len(transport.value()), sender._file.tell()
    assert position == 2000 and not clock.getDelayedCalls()
    for _ in range(10):
        clock.advance(1)
    assert len(transport.value()) == written and sender._file.tell() == position
    transport.drain()
    run_clock(clock)
    assert sender._file.tell() == 4000 and transport.producer is sender  # paused again
    while transport.producer is not None:
        transport.drain()
        run_clock(clock)
    _, sizes, body, _ = parse_payload(transport.everything())
    assert body == data and sizes == [1000] * 5


def test_stop_producing_fails_the_transfer_and_closes_the_file(tmp_path):
    """A consumer that goes away stops the sender; its Deferred fails with ConnectionLost."""
    (tmp_path / "f").write_bytes(content(4000))
    clock, transport = Clock(), PausingTransport(limit=1500)
    sender = FileSender.open(clock, "f", tmp_path / "f", chunk_size=1000,
                             runner=SyncRunner())
    done = sender.begin(transport)
    clock.advance(0)
    sender.stopProducing()
    run_clock(clock)
    failure = result_of(done)
    assert failure.check(ConnectionLost)
    assert sender._file.closed
    assert not transport.value().endswith(b"\n0\n")


@pytest.mark.parametrize("setup, kwargs, message", [
    (lambda p: None, {}, "no such file"),
    (lambda p: p.write_bytes(b"12345"), {"expected_size": 4}, "changed since it was last scanned"),
    (lambda p: p.mkdir(), {}, "not a regular file"),
    (lambda p: p.write_bytes(b"12345"), {"request_range": (3, 3)}, "outside the file"),
    (lambda p: p.symlink_to("/etc/hostname"), {}, "not a regular file"),
])
def test_sender_refuses_what_it_cannot_serve_as_recorded(tmp_path, setup, kwargs, message):
    """Missing, changed, non-regular or symlinked files and bad ranges raise a clear OSError."""
    path = tmp_path / "x"
    setup(path)
    with pytest.raises(OSError) as info:
        FileSender.open(Clock(), "x", path, runner=SyncRunner(), **kwargs)
    assert message in describe_os_error(info.value)
    assert str(tmp_path) not in describe_os_error(info.value)


def test_get_error_message_shape():
    """The get_error answer names the path and the reason."""
    assert get_error_message("a/b", "no such file") == {
        "type": "get_error", "path": "a/b", "message": "no such file"}


@implementer(IConsumer)
class DrainingConsumer:
    """Counts bytes, pauses its producer past a small buffer, drains on the clock."""

    def __init__(self, clock: Clock, limit: int) -> None:
        self.clock, self.limit = clock, limit
        self.buffered = self.total = 0
        self.producer = None
        self.max_buffered = 0

    def registerProducer(self, producer, streaming):
        self.producer = producer

    def unregisterProducer(self):
        self.producer = None

    def write(self, data):
        self.buffered += len(data)
        self.total += len(data)
        self.max_buffered = max(self.max_buffered, self.buffered)
        if self.buffered > self.limit and self.producer is not None:
            self.producer.pauseProducing()
            self.clock.callLater(0.01, self.drain)

    def drain(self):
        self.buffered = 0
        if self.producer is not None:
            self.producer.resumeProducing()


def test_sending_a_large_file_uses_bounded_memory(tmp_path):
    """64 MiB go out through a slow consumer with only about one chunk in memory at a time."""
    size = 64 * MiB
    path = tmp_path / "big"
    with open(path, "wb") as f:
        block = content(MiB)
        for _ in range(64):
            f.write(block)
    del block
    clock = Clock()
    consumer = DrainingConsumer(clock, limit=64 * 1024)
    tracemalloc.start()
    try:
        done = FileSender.open(clock, "big", path, expected_size=size,
                               runner=SyncRunner()).begin(consumer)
        for _ in range(10_000):
            if done.called:
                break
            clock.advance(0.01)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result_of(done) == size
    assert consumer.total > size
    assert peak < 4 * MiB, "peak %d bytes" % peak


# -- SendQueue ---------------------------------------------------------------------------


def test_queue_writes_messages_at_once_when_idle():
    """With no file in flight a message goes straight to the transport."""
    transport = StringTransport()
    queue = SendQueue(transport, Clock(), runner=SyncRunner())
    queue.send_message(wire.encode({"type": "ping", "timeout": 60}))
    assert transport.value() == b'{"type":"ping","timeout":60}\n'


def test_queue_sends_files_one_at_a_time_with_messages_between(tmp_path):
    """Messages sent during a payload wait for its end, then go before the next file."""
    (tmp_path / "a").write_bytes(b"A" * 2500)
    (tmp_path / "b").write_bytes(b"B" * 10)
    clock, transport = Clock(), PausingTransport(limit=1500)
    queue = SendQueue(transport, clock, runner=SyncRunner(), chunk_size=1000)
    first = queue.send_file("a", tmp_path / "a", expected_size=2500)
    second = queue.send_file("b", tmp_path / "b", request_range=(2, 3))
    clock.advance(0)
    queue.send_message(b'{"type":"update"}\n')
    assert queue.sending == "a" and queue.waiting_files == 1
    assert b"update" not in transport.value()
    assert drain_all(clock, transport) == (
        b'!{"type":"file_data","path":"a"}\n1000\n' + b"A" * 1000 + b"1000\n" + b"A" * 1000
        + b"500\n" + b"A" * 500 + b"0\n"
        + b'{"type":"update"}\n'
        + b'!{"type":"file_data","path":"b","range":[2,3]}\n3\nBBB0\n')
    assert result_of(first).sent and result_of(first).size == 2500
    assert result_of(second).size == 3
    assert transport.producer is None and queue.sending is None


def test_queue_answers_unservable_files_with_get_error(tmp_path):
    """A file missing or changed when its turn comes gets get_error; the queue goes on."""
    (tmp_path / "ok").write_bytes(b"fine")
    (tmp_path / "grew").write_bytes(b"longer now")
    clock, transport = Clock(), StringTransport()
    queue = SendQueue(transport, clock, runner=SyncRunner())
    missing = queue.send_file("gone", tmp_path / "gone")
    changed = queue.send_file("grew", tmp_path / "grew", expected_size=4)
    fine = queue.send_file("ok", tmp_path / "ok")
    run_clock(clock)
    decoder = wire.WireDecoder()
    decoder.receive_data(transport.value())
    events = list(decoder.events())
    assert events[0].body == {"type": "get_error", "path": "gone", "message": "no such file"}
    assert events[1].body["type"] == "get_error" and events[1].body["path"] == "grew"
    assert events[2].body == {"type": "file_data", "path": "ok"}
    assert b"".join(e.data for e in events if isinstance(e, wire.PayloadChunk)) == b"fine"
    assert result_of(missing).error == "no such file" and not result_of(missing).sent
    assert not result_of(changed).sent and result_of(fine).sent


def test_queue_bounds_files_and_held_messages(tmp_path):
    """Too many waiting requests or too many held-back message bytes is a protocol error."""
    (tmp_path / "f").write_bytes(content(5000))
    clock, transport = Clock(), PausingTransport(limit=1500)
    queue = SendQueue(transport, clock, runner=SyncRunner(), max_files=2, max_message_bytes=100,
                      chunk_size=1000)
    queue.send_file("f", tmp_path / "f")  # starts at once
    queue.send_file("f", tmp_path / "f")
    queue.send_file("f", tmp_path / "f")
    with pytest.raises(ProtocolError):
        queue.send_file("f", tmp_path / "f")
    queue.send_message(b"x" * 60)
    with pytest.raises(ProtocolError):
        queue.send_message(b"y" * 60)
    assert queue.waiting_message_bytes == 60


def test_queue_stop_reports_unsent_files_and_stops_reading(tmp_path):
    """After stop() the current file stops, waiting ones report 'connection closed'."""
    (tmp_path / "f").write_bytes(content(5000))
    clock, transport = Clock(), PausingTransport(limit=1500)
    queue = SendQueue(transport, clock, runner=SyncRunner(), chunk_size=1000)
    current = queue.send_file("f", tmp_path / "f")
    waiting = queue.send_file("f", tmp_path / "f")
    clock.advance(0)
    queue.stop()
    written = len(transport.value())
    transport.drain()
    run_clock(clock)
    queue.send_message(b'{"type":"late"}\n')
    assert len(transport.everything()) == written
    assert result_of(current).error == "connection closed"
    assert result_of(waiting).error == "connection closed"
    assert result_of(queue.send_file("f", tmp_path / "f")).sent is False


def test_transport_stopping_the_producer_stops_the_queue(tmp_path):
    """A lost connection (stopProducing from the transport) ends the queue cleanly."""
    (tmp_path / "f").write_bytes(content(5000))
    clock, transport = Clock(), PausingTransport(limit=1500)
    queue = SendQueue(transport, clock, runner=SyncRunner(), chunk_size=1000)
    first = queue.send_file("f", tmp_path / "f")
    second = queue.send_file("f", tmp_path / "f")
    clock.advance(0)
    transport.producer.stopProducing()
    assert not result_of(first).sent and not result_of(second).sent
    assert queue.sending is None and queue.waiting_files == 0


def test_reads_in_a_worker_wait_out_a_pause_and_a_stop_closes_the_file_after_them(tmp_path):
    """Opening and each read run in the runner; a chunk read while paused is written on
    resume; a stop during a read closes the file only once that read is back."""
    data = content(3000)
    (tmp_path / "f").write_bytes(data)
    clock, transport, runner = Clock(), StringTransport(), HeldRunner()
    queue = SendQueue(transport, clock, runner=runner, chunk_size=1000)
    done = queue.send_file("f", tmp_path / "f")
    assert queue.sending == "f" and transport.value() == b"" and len(runner.jobs) == 1
    runner.release()  # opened, first chunk read
    clock.advance(0)
    assert transport.value() == b'!{"type":"file_data","path":"f"}\n1000\n' + data[:1000]
    sender = transport.producer
    sender.pauseProducing()
    runner.release()  # the second chunk comes back while paused: held
    clock.advance(0)
    assert transport.value().count(b"1000\n") == 1 and runner.jobs == []
    sender.resumeProducing()
    clock.advance(0)
    assert transport.value().endswith(b"1000\n" + data[1000:2000])
    assert len(runner.jobs) == 1  # the third read is running
    file = sender._file
    queue.stop()
    assert not file.closed
    runner.release()
    clock.advance(0)
    assert file.closed and not transport.value().endswith(data[2000:])
    assert result_of(done).error == "connection closed"


def test_a_queue_stopped_while_a_worker_opens_a_file_closes_that_file(tmp_path):
    (tmp_path / "f").write_bytes(b"data")
    transport, runner = StringTransport(), HeldRunner()
    queue = SendQueue(transport, Clock(), runner=runner)
    done = queue.send_file("f", tmp_path / "f")
    queue.stop()
    [opened] = runner.release()
    assert opened.file.closed and transport.value() == b""
    assert result_of(done).error == "connection closed"


def test_small_files_waiting_together_are_opened_in_one_worker_job(tmp_path):
    """Queued small files go to one open job (a missing one answered in its place); a file
    larger than a chunk ends the batch; the order of answers is the order of requests."""
    for name, size in (("a", 10), ("b", 20), ("big", 5000), ("c", 30)):
        (tmp_path / name).write_bytes(name[:1].encode() * size)
    clock, transport, runner = Clock(), StringTransport(), HeldRunner()
    queue = SendQueue(transport, clock, runner=runner, chunk_size=1000)
    requests = [("a", 10), ("gone", 5), ("b", 20), ("big", 5000), ("c", 30)]
    done = [queue.send_file(name, tmp_path / name, expected_size=size)
            for name, size in requests]
    assert [len(args[0]) for _, _, args in runner.jobs] == [1]  # "a" alone: it was first
    runner.release()
    clock.advance(0)
    assert [len(args[0]) for _, _, args in runner.jobs] == [2]  # "gone" and "b"; "big" waits
    runner.release()
    clock.advance(0)
    runner.release()  # "big" on its own
    for _ in range(10):
        clock.advance(0)
        while runner.jobs:
            runner.release()
    decoder = wire.WireDecoder()
    decoder.receive_data(transport.value())
    heads = [(e.body["type"], e.body["path"]) for e in decoder.events()
             if isinstance(e, wire.Message)]
    assert heads == [("file_data", "a"), ("get_error", "gone"), ("file_data", "b"),
                     ("file_data", "big"), ("file_data", "c")]
    assert [result_of(d).sent for d in done] == [True, False, True, True, True]


def test_an_open_job_that_crashes_answers_get_error_and_the_queue_goes_on(tmp_path, monkeypatch):
    """A bug in the worker's open job fails those requests with get_error, not the queue."""
    (tmp_path / "f").write_bytes(b"fine")
    clock, transport, runner = Clock(), StringTransport(), HeldRunner()
    queue = SendQueue(transport, clock, runner=runner)
    monkeypatch.setattr("clearskies.transfer.sendqueue._open_many_to_send",
                        lambda jobs, first: 1 / 0)
    crashed = queue.send_file("f", tmp_path / "f", expected_size=4)
    runner.release()
    reason = describe_os_error(OSError(errno.EIO, "the file could not be read"))
    assert result_of(crashed) == SendResult("f", False, error=reason)
    monkeypatch.undo()  # the real open job again
    fine = queue.send_file("f", tmp_path / "f", expected_size=4)
    runner.release()
    run_clock(clock)
    assert result_of(fine).sent
    decoder = wire.WireDecoder()
    decoder.receive_data(transport.value())
    assert [e.body["type"] for e in decoder.events() if isinstance(e, wire.Message)] == [
        "get_error", "file_data"]


# -- FileReceiver ----------------------------------------------------------------------------


def receive(root: Path, rel: str, data: bytes, *, record: FileRecord | None = None,
            pieces: int = MiB, unchanged=lambda: True, **kwargs):
    record = record or record_for(rel, data)
    receiver = FileReceiver(root, root / rel, record, runner=SyncRunner(), **kwargs)
    for start in range(receiver.offset, len(data), pieces):
        receiver.write(data[start:start + pieces])
    return receiver, result_of(receiver.finish(unchanged))


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if is_temp_name(p.name))


def test_good_payload_lands_with_metadata_and_no_temp_file(tmp_path):
    """Verified content is renamed into place with the record's mtime and mode."""
    data = content(3 * MiB + 7)
    receiver, result = receive(tmp_path, "sub/dir/f.bin", data)
    target = tmp_path / "sub/dir/f.bin"
    assert result.status == OK and result.path == target
    assert target.read_bytes() == data
    st = os.stat(target)
    assert st.st_mtime_ns == MTIME[0] * 10**9 + MTIME[1]
    assert st.st_mode & 0o7777 == 0o640
    assert (result.size, result.mtime_ns, result.inode) == (st.st_size, st.st_mtime_ns, st.st_ino)
    assert leftovers(target.parent) == []


@pytest.mark.parametrize("size, buffer_limit", [(3 * MiB, 0), (5000, 8192)])
def test_unwritable_download_lands_without_write_permission(tmp_path, size, buffer_limit):
    """unwritable: the file is put in place with no write bit; the record keeps its mode."""
    data = content(size, seed=5)
    record = record_for("tools/run.sh", data, mode=0o754)
    receiver, result = receive(tmp_path, "tools/run.sh", data, record=record,
                               unwritable=True, buffer_limit=buffer_limit)
    target = tmp_path / "tools" / "run.sh"
    assert result.status == OK and target.read_bytes() == data
    assert os.stat(target).st_mode & 0o7777 == 0o554
    assert receiver.expected.mode == 0o754
    assert os.access(target.parent, os.W_OK)


def test_target_keeps_old_content_until_the_rename(tmp_path, monkeypatch):
    """Until finish, the old file is untouched and the bytes sit in the hidden temp file."""
    monkeypatch.setattr("clearskies.transfer.receiver.WRITE_BATCH", 1)  # every write at once
    old, new = b"old content", content(5000, seed=1)
    target = tmp_path / "f.txt"
    target.write_bytes(old)
    receiver = FileReceiver(tmp_path, target, record_for("f.txt", new), runner=SyncRunner())
    receiver.write(new)
    assert target.read_bytes() == old
    assert receiver.temp_path.name == temp_name("f.txt", hashlib.sha256(new).hexdigest())
    assert receiver.temp_path.read_bytes() == new
    assert result_of(receiver.finish(lambda: True)).status == OK
    assert target.read_bytes() == new and leftovers(tmp_path) == []


def test_finish_many_installs_a_batch_and_keeps_conflicts_and_failures_apart(tmp_path):
    """One call renames the unchanged, leaves a conflict in its temp file, fails only the broken one."""
    datas = [content(3000, seed=n) for n in range(4)]
    receivers = []
    for n, data in enumerate(datas):
        receiver = FileReceiver(tmp_path, tmp_path / ("d%d" % (n % 2)) / ("f%d" % n),
                                record_for("f%d" % n, data), runner=SyncRunner(),
                                buffer_limit=64 * 1024)
        receiver.write(data)
        assert result_of(receiver.seal()) is None
        receivers.append(receiver)
    receivers[3].temp_path.unlink()  # its rename can only fail
    receivers[1].local_path.write_bytes(b"edited here")  # where our record says: nothing
    results = result_of(finish_many(SyncRunner(), [
        (receivers[0], ("absent",)), (receivers[1], ("absent",)), (receivers[2], None),
        (receivers[3], ("absent",))]))
    assert [r.status for r in results[:3]] == [OK, CONFLICT, OK]
    assert isinstance(results[3], Failure) and results[3].check(FileNotFoundError)
    for n in (0, 2):
        st = os.stat(results[n].path)
        assert results[n].path.read_bytes() == datas[n]
        assert (results[n].size, results[n].mtime_ns, results[n].inode) == (
            st.st_size, st.st_mtime_ns, st.st_ino)
    assert receivers[1].local_path.read_bytes() == b"edited here"  # never renamed over
    assert results[1].path.read_bytes() == datas[1]  # verified, waiting for keep_as/abort
    assert receivers[1].state == "verified"


def test_install_batch_checks_each_target_again_after_keeping_it(tmp_path):
    """An editor that saves (write, then rename) while the old file is being kept as
    a version: the check right before the rename finds it, the save stays."""
    from clearskies import diskjobs

    target, temp = tmp_path / "f.txt", tmp_path / ".f.txt.tmp"
    target.write_bytes(b"ours")
    temp.write_bytes(b"theirs")
    st = os.lstat(target)
    expected = ("file", 4, hashlib.sha256(b"ours").hexdigest(),
                (st.st_ino, st.st_size, st.st_mtime_ns))
    kept = []

    def keep_while_the_editor_saves(path):
        kept.append(path.read_bytes())
        saved = tmp_path / ".f.txt.editor"
        saved.write_bytes(b"ours, saved again")
        os.replace(saved, path)

    outcomes = diskjobs.install_batch([(temp, target, expected)], keep_while_the_editor_saves)
    assert outcomes == [None] and kept == [b"ours"]
    assert target.read_bytes() == b"ours, saved again" and temp.read_bytes() == b"theirs"
    # Unchanged, the same target is kept and replaced.
    target.write_bytes(b"ours")
    st = os.lstat(target)
    expected = expected[:3] + ((st.st_ino, st.st_size, st.st_mtime_ns),)
    [key] = diskjobs.install_batch([(temp, target, expected)], lambda path: None)
    assert target.read_bytes() == b"theirs" and key[0] == 6


def test_wrong_bytes_are_corrupt_and_leave_nothing(tmp_path):
    """Bytes that do not match the hash give CORRUPT; no target, no temp file."""
    data = content(4000)
    record = record_for("f", data)
    _, result = receive(tmp_path, "f", content(4000, seed=9), record=record)
    assert result.status == CORRUPT and "SHA-256" in result.reason
    assert not (tmp_path / "f").exists() and leftovers(tmp_path) == []


def test_truncated_payload_is_corrupt(tmp_path):
    """A payload that ends early gives CORRUPT and keeps the old target."""
    data = content(4000)
    (tmp_path / "f").write_bytes(b"previous")
    _, result = receive(tmp_path, "f", data[:3000], record=record_for("f", data))
    assert result.status == CORRUPT and "3000" in result.reason
    assert (tmp_path / "f").read_bytes() == b"previous" and leftovers(tmp_path) == []


def test_oversized_payload_is_corrupt_and_not_written_past_the_size(tmp_path, monkeypatch):
    """Extra bytes beyond the record's size are dropped, then reported as CORRUPT."""
    monkeypatch.setattr("clearskies.transfer.receiver.WRITE_BATCH", 1)  # every write at once
    data = content(1000)
    receiver = FileReceiver(tmp_path, tmp_path / "f", record_for("f", data), runner=SyncRunner())
    receiver.write(data)
    receiver.write(b"x" * 5000)
    assert receiver.temp_path.stat().st_size == 1000
    result = result_of(receiver.finish(lambda: True))
    assert result.status == CORRUPT and not (tmp_path / "f").exists()


def test_resume_from_a_previous_partial_download(tmp_path):
    """A partial temp file from an earlier attempt is continued from its offset and verified."""
    data = content(3 * MiB + 5)
    record = record_for("f", data)
    first = FileReceiver(tmp_path, tmp_path / "f", record, runner=SyncRunner())
    first.write(data[:MiB + 11])
    first.abort(keep_partial=True)
    second = FileReceiver(tmp_path, tmp_path / "f", record, runner=SyncRunner())
    assert second.offset == MiB + 11
    second.write(data[MiB + 11:])
    result = result_of(second.finish(lambda: True))
    assert result.status == OK and (tmp_path / "f").read_bytes() == data


def test_resume_of_a_bad_prefix_is_caught(tmp_path):
    """A leftover temp file with wrong bytes fails verification after the resume."""
    data = content(2000)
    record = record_for("f", data)
    receiver = FileReceiver(tmp_path, tmp_path / "f", record, runner=SyncRunner())
    receiver.temp_path.write_bytes(b"\0" * 500)
    resumed = FileReceiver(tmp_path, tmp_path / "f", record, runner=SyncRunner())
    assert resumed.offset == 500
    resumed.write(data[500:])
    assert result_of(resumed.finish(lambda: True)).status == CORRUPT
    assert leftovers(tmp_path) == []


def test_resume_disabled_or_oversized_temp_starts_over(tmp_path):
    """resume=False, or a temp file larger than the record, means offset 0."""
    data = content(2000)
    record = record_for("f", data)
    temp = FileReceiver(tmp_path, tmp_path / "f", record, runner=SyncRunner()).temp_path
    temp.write_bytes(data[:700])
    assert FileReceiver(tmp_path, tmp_path / "f", record, runner=SyncRunner(),
                        resume=False).offset == 0
    temp.write_bytes(data + b"junk")
    _, result = receive(tmp_path, "f", data, record=record)
    assert result.status == OK and (tmp_path / "f").read_bytes() == data


def test_symlink_under_the_temp_name_is_replaced_not_followed(tmp_path):
    """A symlink where the temp file should be is removed; its target is never written."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    share = tmp_path / "share"
    share.mkdir()
    data = content(100)
    record = record_for("f", data)
    probe = FileReceiver(share, share / "f", record, runner=SyncRunner())
    probe.temp_path.symlink_to(victim)
    _, result = receive(share, "f", data, record=record)
    assert result.status == OK and (share / "f").read_bytes() == data
    assert victim.read_bytes() == b"precious"


def test_local_change_during_download_is_a_conflict_kept_aside(tmp_path):
    """If the target changed meanwhile it is not touched; keep_as saves the download."""
    data = content(3000)
    (tmp_path / "f.txt").write_bytes(b"edited here")
    receiver, result = receive(tmp_path, "f.txt", data, unchanged=lambda: succeed(False))
    assert result.status == CONFLICT and result.path == receiver.temp_path
    assert (tmp_path / "f.txt").read_bytes() == b"edited here"
    copy = tmp_path / "f.CONFLICT.abcd1234.txt"
    kept = result_of(receiver.keep_as(copy))
    assert kept.status == OK and kept.path == copy and copy.read_bytes() == data
    assert os.stat(copy).st_mtime_ns == MTIME[0] * 10**9 + MTIME[1]
    assert kept.inode == os.stat(copy).st_ino
    assert leftovers(tmp_path) == []


def test_keep_as_never_overwrites_other_content(tmp_path):
    """keep_as onto the same content just drops the temp; onto other content it refuses."""
    data = content(3000)
    same, other = tmp_path / "same", tmp_path / "other"
    same.write_bytes(data)
    other.write_bytes(b"something else")
    receiver, result = receive(tmp_path, "f", data, unchanged=lambda: False)
    failure = result_of(receiver.keep_as(other))
    assert failure.check(FileExistsError) and other.read_bytes() == b"something else"
    assert receiver.temp_path.exists()
    assert result_of(receiver.keep_as(same)).status == OK
    assert same.read_bytes() == data and leftovers(tmp_path) == []


def test_empty_file(tmp_path):
    """A 0-byte record needs no payload: finish creates the empty file."""
    _, result = receive(tmp_path, "empty", b"")
    assert result.status == OK and (tmp_path / "empty").read_bytes() == b""
    assert leftovers(tmp_path) == []


def test_copy_local_dedups_through_the_same_checks(tmp_path):
    """Content already in the share is copied, verified and renamed like a download."""
    data = content(2 * MiB + 3)
    source = tmp_path / "existing"
    source.write_bytes(data)
    receiver = FileReceiver(tmp_path, tmp_path / "new/copy", record_for("new/copy", data),
                            runner=SyncRunner())
    assert result_of(receiver.copy_local(source)) is None
    result = result_of(receiver.finish(lambda: True))
    assert result.status == OK and (tmp_path / "new/copy").read_bytes() == data
    assert source.read_bytes() == data


def test_copy_local_from_a_changed_source_is_corrupt(tmp_path):
    """A dedup source whose bytes no longer match gives CORRUPT, nothing installed."""
    source = tmp_path / "existing"
    source.write_bytes(content(500, seed=3))
    receiver = FileReceiver(tmp_path, tmp_path / "t", record_for("t", content(500)),
                            runner=SyncRunner())
    result_of(receiver.copy_local(source))
    assert result_of(receiver.finish(lambda: True)).status == CORRUPT
    assert not (tmp_path / "t").exists() and leftovers(tmp_path) == []


def test_small_file_is_buffered_until_sealed(tmp_path):
    """With buffer_limit a small download touches the disk only in seal, then verifies as usual."""
    data = content(5000, seed=3)
    receiver = FileReceiver(tmp_path, tmp_path / "sub" / "f", record_for("sub/f", data),
                            runner=SyncRunner(), buffer_limit=8192)
    receiver.write(data[:1000])
    receiver.write(data[1000:])
    assert not (tmp_path / "sub").exists()
    result = result_of(receiver.finish(lambda: True))
    assert result.status == OK and (tmp_path / "sub" / "f").read_bytes() == data
    assert os.stat(tmp_path / "sub" / "f").st_mode & 0o777 == 0o640
    assert leftovers(tmp_path / "sub") == []


def test_buffered_small_file_with_wrong_bytes_is_corrupt(tmp_path):
    """A buffered download is verified too: wrong or extra bytes give CORRUPT, nothing left."""
    data = content(3000)
    _, result = receive(tmp_path, "f", content(3000, seed=9), record=record_for("f", data),
                        buffer_limit=8192)
    assert result.status == CORRUPT and "SHA-256" in result.reason
    _, result = receive(tmp_path, "g", data + b"x", record=record_for("g", data),
                        buffer_limit=8192)
    assert result.status == CORRUPT
    assert not (tmp_path / "f").exists() and not (tmp_path / "g").exists()
    assert leftovers(tmp_path) == []
    # Checked before anything is written: not even its folder is made.
    _, result = receive(tmp_path, "new/h", content(3000, seed=9),
                        record=record_for("new/h", data), buffer_limit=8192)
    assert result.status == CORRUPT and not (tmp_path / "new").exists()


def test_buffered_seals_run_in_few_jobs_of_many_files(tmp_path):
    """At most max_jobs seal jobs at once; what waits goes in batches of max_batch; every
    download still gets its own outcome (a wrong one is CORRUPT, the others are OK)."""
    runner = HeldRunner()
    seals = BufferedSeals(runner, max_batch=4, max_jobs=2)
    receivers, outcomes = [], []
    for n in range(12):
        data = content(1000 + n, seed=n)
        sent = data if n != 5 else content(1000 + n, seed=99)
        receiver = FileReceiver(tmp_path, tmp_path / ("f%d" % n), record_for("f%d" % n, data),
                                runner=runner, buffer_limit=8192, sealer=seals)
        receiver.write(sent)
        receivers.append(receiver)
        sealing = receiver.seal()
        sealing.addBoth(outcomes.append)
    # Two jobs of one file each started at once; the other ten wait for a free job.
    assert [len(args[0]) for _, _, args in runner.jobs] == [1, 1]
    runner.release()
    assert [len(args[0]) for _, _, args in runner.jobs] == [1, 4]
    while runner.jobs:
        runner.release()
    assert len(outcomes) == 12
    assert [o is None for o in outcomes] == [n != 5 for n in range(12)]
    assert "SHA-256" in outcomes[5]
    installed = result_of(finish_many(SyncRunner(), [(r, ("absent",)) for i, r in enumerate(receivers)
                                                     if i != 5]))
    assert [r.status for r in installed] == [OK] * 11
    assert sorted(os.listdir(tmp_path)) == sorted("f%d" % n for n in range(12) if n != 5)


def test_buffered_seal_failures_reach_only_their_download(tmp_path):
    """A seal that raises (its folder is a file) fails that download; the batch goes on."""
    (tmp_path / "blocked").write_bytes(b"a file where a folder should be")
    runner = HeldRunner()
    seals = BufferedSeals(runner, max_batch=8, max_jobs=1)
    results = []
    for name in ("first", "blocked/inner", "last"):
        data = content(500, seed=len(name))
        receiver = FileReceiver(tmp_path, tmp_path / name, record_for(name, data),
                                runner=runner, buffer_limit=8192, sealer=seals)
        receiver.write(data)
        receiver.seal().addBoth(results.append)
    while runner.jobs:
        runner.release()
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], Failure) and results[1].check(OSError)


def test_abort_keeps_or_removes_the_partial_file(tmp_path):
    """abort(keep_partial=True) leaves the bytes for a resume; False deletes them."""
    data = content(2000)
    record = record_for("f", data)
    keep = FileReceiver(tmp_path, tmp_path / "f", record, runner=SyncRunner())
    keep.write(data[:100])
    keep.abort(keep_partial=True)
    assert keep.temp_path.stat().st_size == 100
    drop = FileReceiver(tmp_path, tmp_path / "f", record, runner=SyncRunner())
    drop.write(data[100:200])
    drop.abort(keep_partial=False)
    assert leftovers(tmp_path) == []
    with pytest.raises(RuntimeError):
        drop.write(b"more")


def test_receiving_a_large_stream_keeps_memory_bounded(tmp_path):
    """64 MiB fed in 1 MiB pieces never accumulate: memory peak stays near one piece."""
    piece = content(MiB, seed=5)
    data_hash = hashlib.sha256()
    for _ in range(64):
        data_hash.update(piece)
    record = FileRecord(path="big", utime=1.0, size=64 * MiB, mtime=MTIME, mode=0o644,
                        sha256=data_hash.hexdigest())
    receiver = FileReceiver(tmp_path, tmp_path / "big", record, runner=SyncRunner())
    tracemalloc.start()
    try:
        for _ in range(64):
            receiver.write(piece)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 512 * 1024, "peak %d bytes" % peak
    assert result_of(receiver.finish(lambda: True)).status == OK
    assert (tmp_path / "big").stat().st_size == 64 * MiB


def test_targets_outside_the_share_are_refused(tmp_path):
    """A target outside the root, or behind a symlink leading out, is an UnsafePathError."""
    root = tmp_path / "share"
    root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    record = record_for("x", b"data")
    with pytest.raises(UnsafePathError):
        FileReceiver(root, tmp_path / "x", record, runner=SyncRunner())
    (root / "link").symlink_to(outside)
    receiver = FileReceiver(root, root / "link" / "x", record, runner=SyncRunner())
    with pytest.raises(UnsafePathError):
        receiver.write(b"data")
    assert list(outside.iterdir()) == []


def test_temp_names_are_hidden_deterministic_and_short_enough():
    """The temp name is .<name>.<16 hex>.!clearsky and never longer than 255 bytes."""
    sha = "0123456789abcdef" * 4
    assert temp_name("report.txt", sha) == ".report.txt.0123456789abcdef.!clearsky"
    long_name = temp_name("é" * 127, sha)
    assert len(long_name.encode()) <= 255 and is_temp_name(long_name)
    assert not is_temp_name("report.txt")


def test_receiver_rejects_records_without_content():
    """Tombstones and directories have nothing to download."""
    with pytest.raises(ValueError):
        FileReceiver(Path("/tmp"), Path("/tmp/x"), FileRecord(path="x", utime=1.0, deleted=True),
                     runner=SyncRunner())


def test_describe_os_error_does_not_leak_paths():
    """Reasons sent to peers are generic texts."""
    assert describe_os_error(PermissionError(errno.EACCES, "Permission denied", "/home/u/x")) == (
        "permission denied")


# -- both ends over real loopback TCP -------------------------------------------------------


class _Serve(protocol.Protocol):
    def connectionMade(self):
        factory = self.factory
        self.queue = SendQueue(self.transport, reactor, runner=factory.runner)
        for path, local, size in factory.files:
            self.queue.send_file(path, local, expected_size=size)

    def connectionLost(self, reason=None):
        self.queue.stop()


class _Fetch(protocol.Protocol):
    def __init__(self, receivers: dict, finished: Deferred):
        self.decoder = wire.WireDecoder()
        self.receivers, self.finished = receivers, finished
        self.current = None
        self.results = []

    def dataReceived(self, data):
        self.decoder.receive_data(data)
        for event in self.decoder.events():
            if isinstance(event, wire.PayloadChunk):
                self.current.write(event.data)
            elif isinstance(event, wire.PayloadEnd):
                self.results.append(self.current.finish(lambda: True))
                if len(self.results) == len(self.receivers):
                    self.transport.loseConnection()
            elif event.type == "file_data":
                self.current = self.receivers[event.body["path"]]

    def connectionLost(self, reason=None):
        self.finished.callback(self.results)


class LoopbackTransferTests(unittest.TestCase):
    """Sender and receiver on the real reactor, through TCP on 127.0.0.1."""

    def setUp(self):
        self.runner = ThreadPoolRunner(reactor, 2)
        self.runner.startService()
        self.addCleanup(self.runner.stopService)

    @async_test
    async def test_files_cross_loopback_and_verify(self):
        """Two files stream back to back over TCP and land verified, using worker threads."""
        base = Path(self.mktemp())
        source, target = base / "src", base / "dst"
        source.mkdir(parents=True)
        target.mkdir()
        files = {"big.bin": content(9 * MiB + 17, seed=2), "small.txt": b"hello\n"}
        for name, data in files.items():
            (source / name).write_bytes(data)
        server = protocol.ServerFactory.forProtocol(_Serve)
        server.files = [(n, source / n, len(d)) for n, d in files.items()]
        server.runner = self.runner
        port = reactor.listenTCP(0, server, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        receivers = {n: FileReceiver(target, target / n, record_for(n, d), runner=self.runner)
                     for n, d in files.items()}
        finished: Deferred = Deferred()
        client = protocol.ClientCreator(reactor, _Fetch, receivers, finished)
        await client.connectTCP("127.0.0.1", port.getHost().port)
        results = await finished
        statuses = [(await d).status for d in results]
        self.assertEqual(statuses, [OK, OK])
        for name, data in files.items():
            self.assertEqual((target / name).read_bytes(), data)
        self.assertEqual(leftovers(target), [])


def test_seal_verifies_first_and_finish_installs_later(tmp_path):
    """seal() verifies and keeps the temp file; finish() then renames it without re-verifying."""
    data = content(70_000, seed=3)
    target = tmp_path / "d" / "f.bin"
    receiver = FileReceiver(tmp_path, target, record_for("d/f.bin", data), runner=SyncRunner())
    receiver.write(data)
    assert result_of(receiver.seal()) is None
    assert not target.exists() and receiver.temp_path.read_bytes() == data
    result = result_of(receiver.finish(lambda: True, sync_directory=False))
    assert result.status == OK and target.read_bytes() == data
    assert leftovers(target.parent) == []


def test_seal_reports_corruption_and_removes_the_temp_file(tmp_path):
    """seal() of wrong bytes says why and leaves neither target nor temp file."""
    target = tmp_path / "f.bin"
    receiver = FileReceiver(tmp_path, target, record_for("f.bin", b"a" * 100),
                            runner=SyncRunner())
    receiver.write(b"b" * 100)
    assert result_of(receiver.seal()) == "SHA-256 mismatch"
    assert not target.exists() and leftovers(tmp_path) == []


def test_large_download_flushes_ahead_and_still_lands_intact(tmp_path, monkeypatch):
    """Past FLUSH_AHEAD bytes a write-behind flush runs on a duplicate fd; content is unharmed."""
    flushed: list[int] = []
    monkeypatch.setattr("clearskies.transfer.receiver.FLUSH_AHEAD", 64 * 1024)
    monkeypatch.setattr("clearskies.transfer.receiver.WRITE_BATCH", 50_000)  # one batch per write
    monkeypatch.setattr("clearskies.transfer.jobs.flush_copy",
                        lambda fd: (flushed.append(fd), os.close(fd)))
    data = content(300_000, seed=4)
    receiver, result = receive(tmp_path, "big.bin", data, pieces=50_000)
    assert result.status == OK and (tmp_path / "big.bin").read_bytes() == data
    assert len(flushed) == 3  # after writes 2, 4 and 6: each time 64 KiB had piled up


def test_received_pieces_are_written_and_hashed_in_worker_batches(tmp_path, monkeypatch):
    """Writes only queue batches; the worker job writes them in order and the hash verifies."""
    monkeypatch.setattr("clearskies.transfer.receiver.WRITE_BATCH", 64 * 1024)
    monkeypatch.setattr("clearskies.transfer.receiver.MAX_QUEUED_BATCHES", 32)
    data = content(MiB + 3, seed=7)
    runner = HeldRunner()
    receiver = FileReceiver(tmp_path, tmp_path / "f", record_for("f", data), runner=runner)
    for start in range(0, len(data), 7000):
        receiver.write(data[start:start + 7000])
    assert receiver.temp_path.stat().st_size == 0  # nothing written on the calling thread
    sealed = receiver.seal()
    runner.release_all()
    assert result_of(sealed) is None
    assert receiver.temp_path.read_bytes() == data


def test_a_stalled_worker_does_not_let_batches_pile_up(tmp_path, monkeypatch):
    """Past MAX_QUEUED_BATCHES waiting, the connection is paused (nothing is written on
    the calling thread) until a worker job has caught up; then it reads again."""
    monkeypatch.setattr("clearskies.transfer.receiver.WRITE_BATCH", 1000)
    monkeypatch.setattr("clearskies.transfer.receiver.MAX_QUEUED_BATCHES", 4)
    data = content(20_000, seed=8)
    runner, connection = HeldRunner(), StringTransport()
    receiver = FileReceiver(tmp_path, tmp_path / "f", record_for("f", data), runner=runner)
    receiver.producer = connection
    for start in range(0, 4000, 1000):
        receiver.write(data[start:start + 1000])
    assert connection.producerState == "producing"  # four waiting: within the bound
    receiver.write(data[4000:5000])
    assert connection.producerState == "paused"
    assert receiver.temp_path.stat().st_size == 0  # the reactor wrote nothing itself
    runner.release()  # the worker job writes all five
    assert receiver.temp_path.stat().st_size == 5000
    assert connection.producerState == "producing"
    for start in range(5000, len(data), 1000):
        receiver.write(data[start:start + 1000])
    sealed = receiver.seal()
    runner.release_all()
    assert result_of(sealed) is None
    assert receiver.temp_path.read_bytes() == data
    assert connection.producerState == "producing"


def test_abort_keeping_the_partial_writes_pending_pieces_for_a_resume(tmp_path):
    """abort(keep_partial=True) writes what is still queued, so the resume starts after it."""
    data = content(3 * MiB, seed=9)
    record = record_for("f", data)
    runner = HeldRunner()
    first = FileReceiver(tmp_path, tmp_path / "f", record, runner=runner)
    first.write(data[:MiB + 500])
    first.abort(keep_partial=True)
    runner.release_all()
    second = FileReceiver(tmp_path, tmp_path / "f", record, runner=SyncRunner())
    assert second.offset == MiB + 500
    second.write(data[MiB + 500:])
    assert result_of(second.finish(lambda: True)).status == OK
    assert (tmp_path / "f").read_bytes() == data


def test_a_failed_batch_write_fails_the_seal(tmp_path, monkeypatch):
    """ENOSPC in a batch write: later chunks are dropped, seal fails with it, the partial is gone."""
    data = content(2 * MiB, seed=10)
    receiver = FileReceiver(tmp_path, tmp_path / "f", record_for("f", data), runner=SyncRunner())

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    receiver.write(data[:MiB])  # the batch fails in the worker
    receiver.write(data[MiB:])
    receiver.write(data[MiB:])  # later chunks of the payload are dropped
    assert not receiver.temp_path.exists()
    failure = result_of(receiver.seal())
    assert isinstance(failure, Failure) and failure.check(OSError)
    assert failure.value.errno == errno.ENOSPC
    receiver.abort(keep_partial=True)  # after the failure: nothing left to do, no error
    assert sorted(os.listdir(tmp_path)) == []


def test_a_read_only_disk_keeps_the_partial_for_a_resume(tmp_path, monkeypatch):
    """EROFS while writing: seal fails with it, and the bytes already written stay."""
    data = content(2 * MiB, seed=11)
    receiver = FileReceiver(tmp_path, tmp_path / "f", record_for("f", data), runner=SyncRunner())
    receiver.write(data[:MiB])

    def read_only(fd, data, offset):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(os, "pwrite", read_only)
    receiver.write(data[MiB:])
    failure = result_of(receiver.seal())
    assert isinstance(failure, Failure) and failure.value.errno == errno.EROFS
    assert receiver.temp_path.stat().st_size == MiB


# -- the receiver's state machine ----------------------------------------------------


def test_receiver_drawing_and_table_agree():
    """protocol/receiver.dot draws exactly the transitions of RECEIVER_TRANSITIONS."""
    table = {(before, event, after, ()) for (before, event), after in RECEIVER_TRANSITIONS.items()}
    assert edges("receiver.dot") == table
    assert {s for pair in RECEIVER_TRANSITIONS for s in (pair[0], RECEIVER_TRANSITIONS[pair])} \
        == set(RECEIVER_STATES)


def test_receiver_machine_records_its_transitions_and_refuses_the_rest():
    """Driven by hand, the machine reports each step; an input its state lacks raises."""
    steps: list[tuple[str, str, str]] = []
    machine = ReceiverMachine(lambda *step: steps.append(step))
    for event in ("open", "write", "seal", "sealed", "install", "install_failed", "abort"):
        machine.fire(event)
    assert steps == [("new", "open", "writing"), ("writing", "write", "writing"),
                     ("writing", "seal", "busy"), ("busy", "sealed", "verified"),
                     ("verified", "install", "busy"), ("busy", "install_failed", "verified"),
                     ("verified", "abort", "done")]
    with pytest.raises(IllegalTransition, match="write of a download that is done"):
        machine.fire("write")
    assert machine.state == "done" and len(steps) == 7


def _watched(receiver: FileReceiver) -> list[tuple[str, str, str]]:
    steps: list[tuple[str, str, str]] = []
    receiver.machine.observer = lambda *step: steps.append(step)
    return steps


def test_a_download_goes_from_new_to_done_through_each_named_state(tmp_path):
    """Writing, sealing and installing a download walks the drawn states in order."""
    data = content(300 * 1024, seed=3)
    receiver = FileReceiver(tmp_path, tmp_path / "f", record_for("f", data), runner=SyncRunner())
    steps = _watched(receiver)
    receiver.write(data[:1000])
    receiver.write(data[1000:])
    assert result_of(receiver.finish(lambda: True)).status == OK
    assert [event for _, event, _ in steps] == [
        "open", "write", "write", "seal", "sealed", "install", "installed"]
    assert receiver.state == "done"


def test_misuse_of_a_receiver_raises_and_changes_nothing(tmp_path):
    """Writing after the end, sealing twice or keep_as before verification raise IllegalTransition."""
    data = content(1000, seed=4)
    receiver = FileReceiver(tmp_path, tmp_path / "f", record_for("f", data), runner=SyncRunner())
    with pytest.raises(IllegalTransition):
        receiver.keep_as(tmp_path / "copy")
    receiver.write(data)
    assert result_of(receiver.seal()) is None
    sealed_again = result_of(receiver.seal())
    assert isinstance(sealed_again, Failure) and sealed_again.check(IllegalTransition)
    assert receiver.state == "verified"
    receiver.abort(keep_partial=False)
    with pytest.raises(IllegalTransition):
        receiver.write(b"more")
    assert receiver.state == "done" and not (tmp_path / "f").exists()


def test_a_disk_failure_takes_the_failed_state_then_ends(tmp_path, monkeypatch):
    """A refused write moves to failed, drops the rest, and the seal ends the download."""
    data = content(2 * MiB, seed=5)
    receiver = FileReceiver(tmp_path, tmp_path / "f", record_for("f", data), runner=SyncRunner())
    steps = _watched(receiver)

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    receiver.write(data[:MiB])
    receiver.write(data[MiB:])
    failure = result_of(receiver.seal())
    assert isinstance(failure, Failure) and failure.check(OSError)
    events = [event for _, event, _ in steps]
    assert events[:2] == ["open", "write"] and events[-1] == "seal_failed"
    assert events.count("disk_failed") == 1 and steps[-2][2] == "failed"
    assert receiver.state == "done"
