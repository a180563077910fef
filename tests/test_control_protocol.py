"""The control-socket protocol, driven through StringTransport (no reactor)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs

from clearskies.control.protocol import (
    MAX_EVENT_BACKLOG,
    MAX_LINE_LENGTH,
    MAX_PENDING,
    CommandDispatcher,
    ControlError,
    ControlFactory,
    LineSplitter,
    LineTooLong,
    parse_request,
)


class Commands(CommandDispatcher):
    """A dispatcher whose commands exercise every kind of result."""

    def __init__(self) -> None:
        self.pending: dict[int, Deferred] = {}
        self.seen: list[str] = []

    def dispatch(self, request):
        self.seen.append(request["type"])
        return super().dispatch(request)

    def cmd_echo(self, request):
        return {"echo": request.get("value")}

    def cmd_nothing(self, request):
        return None

    def cmd_later(self, request):
        d: Deferred = Deferred()
        self.pending[request["id"]] = d
        return d

    async def cmd_coro(self, request):
        d: Deferred = Deferred()
        self.pending[request["id"]] = d
        value = await d
        return {"awaited": value}

    def cmd_refuse(self, request):
        raise ControlError("no_such_share", "no share at /nowhere")

    def cmd_crash(self, request):
        raise RuntimeError("boom")

    def cmd_not_a_dict(self, request):
        return [1, 2]

    def cmd_not_json(self, request):
        return {"x": object()}

    def cmd_looks_like_event(self, request):
        return {"event": "x"}

    def cmd_list_shares(self, request):
        return {"shares": []}

    def cmd__org_example_ping(self, request):
        return {"pong": True}


def connect(commands: Commands | None = None):
    commands = commands or Commands()
    factory = ControlFactory(commands, "clearskies-test 9")
    proto = factory.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    transport.clear()  # drop the greeting
    return factory, proto, transport, commands


def messages(transport: StringTransport) -> list[dict]:
    out = [json.loads(line) for line in transport.value().splitlines()]
    transport.clear()
    return out


def send(proto, *requests: dict) -> None:
    proto.dataReceived(b"".join(json.dumps(r).encode() + b"\n" for r in requests))


def test_greeting_bytes():
    """On connect the daemon writes the exact greeting line and registers as producer."""
    factory = ControlFactory(Commands(), "clearskies-test 9")
    proto = factory.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    assert transport.value() == (
        b'{"service":"ClearSkies Control","software":"clearskies-test 9","protocol":1}\n'
    )
    assert transport.producer is proto and transport.streaming


def test_simple_reply_and_empty_success():
    """A handler's dict is the reply; a handler returning None answers {}."""
    _, proto, transport, _ = connect()
    send(proto, {"type": "echo", "value": "hi"}, {"type": "nothing"})
    assert transport.value() == b'{"echo":"hi"}\n{}\n'


def test_replies_stay_in_request_order():
    """A finished second request waits for the first, still-pending one."""
    _, proto, transport, commands = connect()
    send(proto, {"type": "later", "id": 1}, {"type": "echo", "value": 2})
    assert transport.value() == b""
    commands.pending[1].callback({"first": True})
    assert messages(transport) == [{"first": True}, {"echo": 2}]


def test_coroutine_handler_in_order():
    """A coroutine handler is awaited and its reply keeps its place in the order."""
    _, proto, transport, commands = connect()
    send(proto, {"type": "coro", "id": 1}, {"type": "later", "id": 2}, {"type": "nothing"})
    commands.pending[2].callback({"second": True})
    assert transport.value() == b""
    commands.pending[1].callback(7)
    assert messages(transport) == [{"awaited": 7}, {"second": True}, {}]


def test_control_error_reply():
    """ControlError from a handler becomes an error reply with its code and message."""
    _, proto, transport, _ = connect()
    send(proto, {"type": "refuse"})
    assert messages(transport) == [{"error": "no_such_share", "message": "no share at /nowhere"}]


def test_deferred_control_error_reply():
    """A Deferred failing with ControlError also becomes an error reply."""
    _, proto, transport, commands = connect()
    send(proto, {"type": "later", "id": 1})
    commands.pending[1].errback(ControlError("busy", "try later"))
    assert messages(transport) == [{"error": "busy", "message": "try later"}]


def test_internal_error_is_logged_and_connection_survives():
    """An unexpected exception answers "internal", is logged, and the next request works."""
    _, proto, transport, _ = connect()
    with capturedLogs() as events:
        send(proto, {"type": "crash"}, {"type": "echo", "value": 1})
    replies = messages(transport)
    assert replies[0]["error"] == "internal"
    assert "crash" in replies[0]["message"]
    assert "boom" not in replies[0]["message"]
    assert replies[1] == {"echo": 1}
    failures = [e for e in events if "log_failure" in e]
    assert len(failures) == 1
    assert failures[0]["log_failure"].check(RuntimeError)
    assert not transport.disconnecting


def test_bad_handler_results_answer_internal():
    """Non-dict, non-JSON and "event"-keyed handler results answer "internal"."""
    _, proto, transport, _ = connect()
    with capturedLogs() as events:
        send(proto, {"type": "not_a_dict"}, {"type": "not_json"},
             {"type": "looks_like_event"}, {"type": "nothing"})
    replies = messages(transport)
    assert [r.get("error") for r in replies] == ["internal", "internal", "internal", None]
    assert replies[3] == {}
    assert len([e for e in events if "log_failure" in e]) == 3


def test_unknown_type_not_understood():
    """An unknown request type answers not_understood and the connection goes on."""
    _, proto, transport, _ = connect()
    send(proto, {"type": "frobnicate"}, {"type": "echo", "value": 1})
    replies = messages(transport)
    assert replies[0]["error"] == "not_understood"
    assert "frobnicate" in replies[0]["message"]
    assert replies[1] == {"echo": 1}


def test_command_name_mapping():
    """Dots and dashes in a type map to underscores in the cmd_ method name."""
    _, proto, transport, _ = connect()
    send(proto, {"type": "list-shares"}, {"type": ".org.example.ping"},
         {"type": "list shares"}, {"type": ""})
    replies = messages(transport)
    assert replies[:2] == [{"shares": []}, {"pong": True}]
    assert [r["error"] for r in replies[2:]] == ["not_understood", "not_understood"]


def test_malformed_requests_answer_bad_request():
    """Garbage lines answer bad_request each, in order, and the connection stays usable."""
    _, proto, transport, commands = connect()
    proto.dataReceived(
        b"{not json\n"
        b"[1, 2]\n"
        b'"type"\n'
        b"{}\n"
        b'{"type": 5}\n'
        b"\xff\xfe\n"
        + b"[" * 100_000 + b"\n"
        + b'{"type": "echo", "value": "still here"}\n'
    )
    replies = messages(transport)
    assert [r.get("error") for r in replies] == ["bad_request"] * 7 + [None]
    assert all(r["message"] for r in replies[:7])
    assert replies[7] == {"echo": "still here"}
    assert commands.seen == ["echo"]
    assert not transport.disconnecting


def test_blank_lines_ignored_and_crlf_accepted():
    """Blank lines get no reply; a request ending in CRLF is accepted."""
    _, proto, transport, _ = connect()
    proto.dataReceived(b'\n  \r\n{"type":"echo","value":1}\r\n')
    assert messages(transport) == [{"echo": 1}]


def test_requests_split_into_single_bytes():
    """Requests arriving one byte at a time are answered exactly as if sent whole."""
    _, proto, transport, _ = connect()
    data = b'{"type":"echo","value":"a"}\n{"type":"nothing"}\n'
    for i in range(len(data)):
        proto.dataReceived(data[i : i + 1])
    assert transport.value() == b'{"echo":"a"}\n{}\n'


def test_oversize_line_answers_then_closes():
    """A line over MAX_LINE_LENGTH gets an error reply, then the connection closes."""
    _, proto, transport, commands = connect()
    proto.dataReceived(b'{"type":"echo","value":"' + b"x" * MAX_LINE_LENGTH + b'"}\n')
    assert messages(transport) == [{
        "error": "line_too_long",
        "message": f"request line longer than {MAX_LINE_LENGTH} bytes; closing the connection",
    }]
    assert transport.disconnecting
    proto.dataReceived(b'{"type":"echo"}\n')
    assert transport.value() == b""
    assert commands.seen == []


def test_oversize_partial_line_closes():
    """Over MAX_LINE_LENGTH bytes with no newline yet is refused without waiting for more."""
    _, proto, transport, _ = connect()
    proto.dataReceived(b"y" * (MAX_LINE_LENGTH // 2))
    assert transport.value() == b""
    proto.dataReceived(b"y" * (MAX_LINE_LENGTH // 2 + 1))
    assert messages(transport)[0]["error"] == "line_too_long"
    assert transport.disconnecting


def test_line_of_exactly_max_length_is_accepted():
    """A request line of exactly MAX_LINE_LENGTH bytes is still answered."""
    _, proto, transport, _ = connect()
    prefix, suffix = b'{"type":"echo","value":"', b'"}'
    filler = b"z" * (MAX_LINE_LENGTH - len(prefix) - len(suffix))
    proto.dataReceived(prefix + filler + suffix + b"\n")
    assert messages(transport) == [{"echo": filler.decode()}]
    assert not transport.disconnecting


def test_oversize_after_pending_keeps_order_then_closes():
    """The too-long error waits behind an earlier pending reply; the close comes after both."""
    _, proto, transport, commands = connect()
    send(proto, {"type": "later", "id": 1})
    proto.dataReceived(b"q" * (MAX_LINE_LENGTH + 1))
    assert transport.value() == b""
    assert not transport.disconnecting
    assert transport.producerState == "paused"
    commands.pending[1].callback({"done": 1})
    replies = messages(transport)
    assert replies[0] == {"done": 1}
    assert replies[1]["error"] == "line_too_long"
    assert transport.disconnecting


def test_pending_bound_pauses_reading():
    """With MAX_PENDING replies outstanding, reading pauses and later lines wait."""
    _, proto, transport, commands = connect()
    send(proto, *[{"type": "later", "id": i} for i in range(MAX_PENDING)],
         {"type": "echo", "value": "last"})
    assert transport.producerState == "paused"
    assert commands.seen.count("echo") == 0
    commands.pending[0].callback({"n": 0})
    assert commands.seen.count("echo") == 1
    assert transport.producerState == "paused"  # echo's reply now waits in the order
    commands.pending[1].callback({"n": 1})
    assert transport.producerState == "producing"
    for i in range(2, MAX_PENDING):
        commands.pending[i].callback({"n": i})
    replies = messages(transport)
    assert replies == [{"n": i} for i in range(MAX_PENDING)] + [{"echo": "last"}]


def test_client_not_reading_pauses_requests():
    """While the transport pauses us (client not reading), requests are not dispatched."""
    _, proto, transport, commands = connect()
    proto.pauseProducing()
    assert transport.producerState == "paused"
    send(proto, {"type": "echo", "value": 1})
    assert commands.seen == []
    proto.resumeProducing()
    assert transport.producerState == "producing"
    assert messages(transport) == [{"echo": 1}]


def test_reply_after_disconnect_is_dropped():
    """A handler finishing after the client left writes nothing and raises nothing."""
    factory, proto, transport, commands = connect()
    send(proto, {"type": "later", "id": 1})
    proto.connectionLost(None)
    commands.pending[1].callback({"late": True})
    assert transport.value() == b""


def test_subscribe_and_broadcast():
    """Only subscribed connections get broadcast events, as {"event": …} lines."""
    factory, proto, transport, _ = connect()
    other = factory.buildProtocol(None)
    other_transport = StringTransport()
    other.makeConnection(other_transport)
    other_transport.clear()
    send(proto, {"type": ".events.subscribe"})
    assert messages(transport) == [{}]
    assert factory.subscribers == {proto}
    factory.broadcast({"type": "share_status", "path": "/a", "status": "synced"})
    assert transport.value() == (
        b'{"event":{"type":"share_status","path":"/a","status":"synced"}}\n'
    )
    assert other_transport.value() == b""
    transport.clear()
    send(proto, {"type": ".events.unsubscribe"})
    factory.broadcast({"type": "x"})
    assert messages(transport) == [{}]


def test_subscriber_removed_on_disconnect():
    """A connection that goes away is no longer subscribed."""
    factory, proto, transport, _ = connect()
    send(proto, {"type": ".events.subscribe"})
    proto.connectionLost(None)
    assert factory.subscribers == frozenset()


def test_events_wait_while_client_not_reading():
    """Events queue while the transport has paused us and flow, in order, on resume."""
    factory, proto, transport, _ = connect()
    send(proto, {"type": ".events.subscribe"})
    transport.clear()
    proto.pauseProducing()
    for i in range(3):
        factory.broadcast({"n": i})
    assert transport.value() == b""
    proto.resumeProducing()
    assert messages(transport) == [{"event": {"n": i}} for i in range(3)]


def test_slow_subscriber_dropped():
    """A subscriber more than MAX_EVENT_BACKLOG events behind is disconnected."""
    factory, proto, transport, _ = connect()
    send(proto, {"type": ".events.subscribe"})
    transport.clear()
    proto.pauseProducing()
    for i in range(MAX_EVENT_BACKLOG):
        factory.broadcast({"n": i})
    assert not transport.disconnecting
    factory.broadcast({"n": "one too many"})
    assert transport.disconnecting
    assert factory.subscribers == frozenset()
    assert transport.value() == b""


def test_parse_request_rejects_non_string_type():
    """parse_request refuses a missing or non-string type with bad_request."""
    for line in (b"{}", b'{"type": null}', b'{"type": ["a"]}'):
        with pytest.raises(ControlError) as caught:
            parse_request(line)
        assert caught.value.code == "bad_request"
    assert parse_request(b'{"type": "status", "x": 1}') == {"type": "status", "x": 1}


def test_parse_request_rejects_a_repeated_key():
    """A key given twice is refused, never decided by which came last (a status that stops)."""
    for line in (b'{"type":"status","type":"stop"}', b'{"type":"scan","a":{"p":1,"p":2}}'):
        with pytest.raises(ControlError, match="twice") as caught:
            parse_request(line)
        assert caught.value.code == "bad_request"


@given(
    lines=st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")), max_size=20),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=20),
)
def test_line_splitter_any_split(lines, cuts):
    """LineSplitter yields the same lines however the stream is cut."""
    stream = b"".join(line + b"\n" for line in lines)
    splitter = LineSplitter(64)
    out: list[bytes] = []
    last = 0
    for cut in sorted(c % (len(stream) + 1) for c in cuts) + [len(stream)]:
        splitter.feed(stream[last:cut])
        last = cut
        while (line := splitter.next_line()) is not None:
            out.append(line)
    assert out == lines


def test_line_splitter_limit():
    """LineSplitter refuses a line one byte over its limit, complete or not."""
    splitter = LineSplitter(4)
    splitter.feed(b"abcd\nabcde\n")
    assert splitter.next_line() == b"abcd"
    with pytest.raises(LineTooLong):
        splitter.next_line()
    partial = LineSplitter(4)
    partial.feed(b"abcd")
    assert partial.next_line() is None
    partial.feed(b"e")
    with pytest.raises(LineTooLong):
        partial.next_line()


@pytest.mark.parametrize("line", [
    b'{"type":"echo","value":[' + b"[]," * 349_000 + b"[]]}",
    b'{"type":"echo","value":' + b"[ " * 40 + b"]" * 40 + b"}",
])
def test_amplifying_requests_answer_bad_request_cheaply(line):
    """Requests of a million values or deep nesting are refused unparsed; the connection lives."""
    import time
    import tracemalloc
    _, proto, transport, commands = connect()
    tracemalloc.start()
    started = time.perf_counter()
    try:
        proto.dataReceived(line + b"\n" + b'{"type": "echo", "value": "still here"}\n')
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    elapsed = time.perf_counter() - started
    replies = messages(transport)
    assert replies[0]["error"] == "bad_request"
    assert "request refused" in replies[0]["message"]
    assert replies[1] == {"echo": "still here"}
    assert commands.seen == ["echo"]
    # Parsing the 349,000 empty lists whole cost about 25 MB and a quarter of a second.
    assert peak < 8 * 1024 * 1024 and elapsed < 0.2, (peak, elapsed)
