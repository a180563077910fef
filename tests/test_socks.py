"""The SOCKS5 client used for streams through tor: the pure exchange and the endpoint."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from clearskies.discovery.socks import SocksClientEndpoint, SocksError, SocksHandshake
from tests.fakes import RecordingProtocol

ONION = "a" * 56 + ".onion"
METHOD_OK = b"\x05\x00"
REPLY_IPV4 = b"\x05\x00\x00\x01" + bytes(4) + b"\x00\x00"
REPLY_IPV6 = b"\x05\x00\x00\x04" + bytes(16) + b"\x00\x00"
REPLY_NAME = b"\x05\x00\x00\x03\x09localhost\x00\x50"


def connect_request(host: str, port: int) -> bytes:
    name = host.encode()
    return b"\x05\x01\x00\x03" + bytes([len(name)]) + name + port.to_bytes(2, "big")


# -- the pure exchange --------------------------------------------------------------


def test_exchange_asks_for_no_authentication_then_connects_by_name():
    """No DNS on our side: the onion name itself goes in the request."""
    shake = SocksHandshake(ONION, 60106)
    assert shake.start() == b"\x05\x01\x00"
    assert shake.receive_data(METHOD_OK) == connect_request(ONION, 60106)
    assert not shake.done
    assert shake.receive_data(REPLY_IPV4) == b""
    assert shake.done
    assert shake.take_leftover() == b""


@pytest.mark.parametrize("reply", [REPLY_IPV4, REPLY_IPV6, REPLY_NAME])
def test_every_reply_address_form_is_consumed_exactly(reply):
    shake = SocksHandshake(ONION, 1)
    shake.start()
    shake.receive_data(METHOD_OK)
    shake.receive_data(reply + b"greeting")
    assert shake.done
    assert shake.take_leftover() == b"greeting"


@given(st.lists(st.integers(min_value=0, max_value=40), max_size=8), st.binary(max_size=64))
def test_any_split_of_the_proxys_bytes_gives_the_same_result(cuts, stream):
    """However the proxy's bytes are cut into reads, the request and the stream come out whole."""
    incoming = METHOD_OK + REPLY_NAME + stream
    points = sorted({min(c, len(incoming)) for c in cuts} | {0, len(incoming)})
    shake = SocksHandshake(ONION, 60106)
    shake.start()
    sent = b""
    for start, end in zip(points, points[1:]):
        sent += shake.receive_data(incoming[start:end])
    assert sent == connect_request(ONION, 60106)
    assert shake.done
    assert shake.take_leftover() == stream


@pytest.mark.parametrize("code, words", [
    (0x01, "general SOCKS server failure"),
    (0x04, "host unreachable"),
    (0xF0, "descriptor cannot be found"),
    (0xF2, "introduction failed"),
    (0xF6, "onion address is invalid"),
    (0x99, "unknown SOCKS reply code 0x99"),
])
def test_refusals_say_what_the_proxy_said(code, words):
    shake = SocksHandshake(ONION, 60106)
    shake.start()
    shake.receive_data(METHOD_OK)
    with pytest.raises(SocksError, match=words) as caught:
        shake.receive_data(bytes([5, code]))
    assert caught.value.code == code
    assert ONION in str(caught.value)
    with pytest.raises(RuntimeError):
        shake.receive_data(b"more")


@pytest.mark.parametrize("method_reply, reply, words", [
    (b"\x04\x00", b"", "does not speak SOCKS 5"),
    (b"\x05\x02", b"", "wants authentication"),
    (b"\x05\xff", b"", "wants authentication"),
    (METHOD_OK, b"\x04\x00\x00\x01", "malformed SOCKS reply"),
    (METHOD_OK, b"\x05\x00\x00\x07\x00", "address type 7"),
])
def test_malformed_answers_are_errors(method_reply, reply, words):
    shake = SocksHandshake(ONION, 60106)
    shake.start()
    with pytest.raises(SocksError, match=words):
        shake.receive_data(method_reply)
        shake.receive_data(reply)


@pytest.mark.parametrize("host, port, words", [
    ("", 1, "1 to 255"),
    ("x" * 256, 1, "1 to 255"),
    ("bücher.example", 1, "ASCII"),
    (ONION, 0, "outside"),
    (ONION, 65536, "outside"),
])
def test_impossible_destinations_are_refused_before_connecting(host, port, words):
    with pytest.raises(ValueError, match=words):
        SocksHandshake(host, port)
    with pytest.raises(ValueError, match=words):
        SocksClientEndpoint(FakeProxy(), host, port)


def test_leftover_only_once_done():
    shake = SocksHandshake(ONION, 1)
    shake.start()
    with pytest.raises(RuntimeError):
        shake.take_leftover()
    with pytest.raises(RuntimeError):
        shake.start()


# -- the endpoint -------------------------------------------------------------------


class FakeProxy:
    """A proxy endpoint: ``connect`` builds the protocol on a StringTransport."""

    def __init__(self, result: Deferred | None = None) -> None:
        self.result = result
        self.transport = StringTransport()
        self.protocol: Protocol | None = None

    def connect(self, factory: Factory) -> Deferred:
        if self.result is not None:
            return self.result
        self.protocol = factory.buildProtocol(None)
        self.protocol.makeConnection(self.transport)
        return succeed(self.protocol)


def results(d: Deferred) -> list[Any]:
    out: list[Any] = []
    d.addBoth(out.append)
    return out


def test_bytes_riding_with_the_reply_reach_the_protocol_at_once():
    """The peer's greeting often shares a read with tor's reply: it must not wait for more data."""
    proxy = FakeProxy()
    outcome = results(SocksClientEndpoint(proxy, ONION, 60106).connect(Factory.forProtocol(RecordingProtocol)))
    assert proxy.transport.value() == b"\x05\x01\x00"
    proxy.transport.clear()
    proxy.protocol.dataReceived(METHOD_OK)
    assert proxy.transport.value() == connect_request(ONION, 60106)
    assert outcome == []
    proxy.protocol.dataReceived(REPLY_IPV4 + b'{"type": "greeting"}\n')
    [recorder] = outcome
    assert isinstance(recorder, RecordingProtocol)
    assert recorder.data == b'{"type": "greeting"}\n'
    assert recorder.transport is proxy.transport
    proxy.protocol.dataReceived(b"more")
    assert recorder.data.endswith(b"more")
    proxy.protocol.connectionLost(Failure(ConnectionDone()))
    assert recorder.lost.check(ConnectionDone)


def test_a_refusal_fails_the_connect_and_drops_the_socket():
    proxy = FakeProxy()
    outcome = results(SocksClientEndpoint(proxy, ONION, 60106).connect(Factory.forProtocol(RecordingProtocol)))
    proxy.protocol.dataReceived(METHOD_OK + b"\x05\xf0\x00\x01" + bytes(6))
    [failure] = outcome
    assert failure.check(SocksError) and failure.value.code == 0xF0
    assert proxy.transport.disconnected
    proxy.protocol.connectionLost(Failure(ConnectionDone()))  # no second result
    assert len(outcome) == 1


def test_a_proxy_closing_before_answering_is_an_error():
    proxy = FakeProxy()
    outcome = results(SocksClientEndpoint(proxy, ONION, 60106).connect(Factory.forProtocol(RecordingProtocol)))
    proxy.protocol.dataReceived(METHOD_OK)
    proxy.protocol.connectionLost(Failure(ConnectionDone()))
    [failure] = outcome
    assert failure.check(SocksError)
    assert "closed the connection" in failure.getErrorMessage()


def test_a_proxy_that_cannot_be_reached_fails_the_connect():
    proxy = FakeProxy(fail(ConnectionRefusedError("no tor")))
    outcome = results(SocksClientEndpoint(proxy, ONION, 1).connect(Factory.forProtocol(RecordingProtocol)))
    assert outcome[0].check(ConnectionRefusedError)


def test_a_factory_that_refuses_fails_the_connect():
    proxy = FakeProxy()
    refusing = Factory()
    refusing.buildProtocol = lambda addr: None  # type: ignore[method-assign]
    outcome = results(SocksClientEndpoint(proxy, ONION, 1).connect(refusing))
    proxy.protocol.dataReceived(METHOD_OK + REPLY_IPV4)
    assert outcome[0].check(SocksError)
    assert proxy.transport.disconnected


def test_cancelling_while_the_proxy_answers_aborts_the_socket():
    proxy = FakeProxy()
    connecting = SocksClientEndpoint(proxy, ONION, 1).connect(Factory.forProtocol(RecordingProtocol))
    outcome = results(connecting)
    connecting.cancel()
    assert outcome[0].check(CancelledError)
    assert proxy.transport.disconnected
    proxy.protocol.dataReceived(METHOD_OK + REPLY_IPV4)  # too late: nothing happens
    assert len(outcome) == 1


def test_cancelling_before_the_proxy_accepts_cancels_that_connect():
    pending: Deferred = Deferred()
    proxy = FakeProxy(pending)
    connecting = SocksClientEndpoint(proxy, ONION, 1).connect(Factory.forProtocol(RecordingProtocol))
    outcome = results(connecting)
    connecting.cancel()
    assert outcome[0].check(CancelledError)
    assert pending.called  # the proxy connect was cancelled too
