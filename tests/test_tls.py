"""TLS-PSK connection creators, driven in memory through Twisted's TLS layer."""

from __future__ import annotations

import gc

import pytest
from OpenSSL import SSL
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
)
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test import iosim

from clearskies import tls
from tests.fakes import RecordingProtocol

# Old pyOpenSSL (< 25.1) cannot name the group; the GnuTLS interop tests
# still show the key exchange there.
CAN_NAME_GROUP = hasattr(SSL.Connection, "get_group_name")
SHARE_PSK = b"0123456789abcdef0123456789abcdef"  # ASCII of a 32-hex share key
CODE_PSK = bytes(range(16))  # raw access-code bytes
IDENTITY = b"clearskies:1:" + b"ab" * 32


class Pair:
    """A TLS server and client joined by an in-memory pump."""

    def __init__(self, server_creator, client_creator) -> None:
        clock = MemoryReactorClock()
        self.server_app = RecordingProtocol()
        self.client_app = RecordingProtocol()
        server_factory = TLSMemoryBIOFactory(
            server_creator, False, Factory.forProtocol(lambda: self.server_app), clock=clock
        )
        client_factory = TLSMemoryBIOFactory(
            client_creator, True, Factory.forProtocol(lambda: self.client_app), clock=clock
        )
        self.server = server_factory.buildProtocol(None)
        self.client = client_factory.buildProtocol(None)
        self.pump = iosim.connect(
            self.server, iosim.makeFakeServer(self.server),
            self.client, iosim.makeFakeClient(self.client),
            clock=clock,
        )

    def exchange(self) -> None:
        """Send one message each way and deliver everything."""
        self.client.write(b"from client")
        self.server.write(b"from server")
        self.pump.flush()


def make_pair(server_psk: bytes = SHARE_PSK, client_psk: bytes = SHARE_PSK, **options) -> Pair:
    return Pair(
        tls.psk_server_creator(server_psk, **options),
        tls.psk_client_creator(client_psk, IDENTITY, **options),
    )


def assert_works(pair: Pair) -> None:
    pair.exchange()
    assert pair.server_app.data == b"from client"
    assert pair.client_app.data == b"from server"
    assert pair.server_app.handshake_done and pair.client_app.handshake_done
    assert pair.server_app.lost is None and pair.client_app.lost is None


def test_creator_provides_both_twisted_interfaces():
    """One creator object can serve as server or client creator for startTLS."""
    creator = tls.psk_server_creator(SHARE_PSK)
    assert IOpenSSLServerConnectionCreator.providedBy(creator)
    assert IOpenSSLClientConnectionCreator.providedBy(creator)


@pytest.mark.parametrize("cipher", tls.TLS12_CIPHERS)
def test_each_tls12_suite_negotiates_forward_secret(cipher):
    """Every offered TLS 1.2 suite completes with a (EC)DHE-PSK key exchange."""
    pair = make_pair(versions=("TLSv1.2",), tls12_ciphers=(cipher,))
    assert_works(pair)
    for side in (pair.server, pair.client):
        assert tls.negotiated_version(side) == "TLSv1.2"
        assert tls.negotiated_cipher(side) == cipher
    assert cipher.startswith(("DHE-PSK-", "ECDHE-PSK-"))
    expected_group = "ffdhe2048" if cipher.startswith("DHE-") else "x25519"
    group = tls.negotiated_group(pair.server)
    assert group == expected_group if CAN_NAME_GROUP else group is None


def test_tls12_default_prefers_ecdhe_chacha():
    """With all TLS 1.2 suites offered, the server's first choice wins."""
    pair = make_pair(versions=("TLSv1.2",))
    assert_works(pair)
    assert tls.negotiated_cipher(pair.client) == "ECDHE-PSK-CHACHA20-POLY1305"


@pytest.mark.parametrize("suite", tls.TLS13_SUITES)
def test_each_tls13_suite_uses_psk_with_key_share(suite):
    """TLS 1.3 external PSK completes, with an (EC)DH key share (psk_dhe_ke)."""
    pair = make_pair(versions=("TLSv1.3",), tls13_suites=(suite,))
    assert_works(pair)
    for side in (pair.server, pair.client):
        assert tls.negotiated_version(side) == "TLSv1.3"
        assert tls.negotiated_cipher(side) == suite
        # A key-exchange group is only recorded when a key share was used:
        # pure psk_ke would leave it empty and lose forward secrecy.
        group = tls.negotiated_group(side)
        assert group not in ("", None) if CAN_NAME_GROUP else group is None


def test_default_negotiates_tls13():
    """Both versions offered: the peers settle on TLS 1.3."""
    pair = make_pair()
    assert_works(pair)
    assert tls.negotiated_version(pair.server) == "TLSv1.3"
    assert tls.negotiated_cipher(pair.server) in tls.TLS13_SUITES


def test_access_code_bytes_work_as_psk():
    """The 16 raw bytes of an access code (not text) serve as the key."""
    assert_works(make_pair(CODE_PSK, CODE_PSK))


def test_server_ignores_client_identity():
    """Any identity (the reference client sends 'Bogus') is accepted with the right key."""
    pair = Pair(tls.psk_server_creator(SHARE_PSK), tls.psk_client_creator(SHARE_PSK, b"Bogus"))
    assert_works(pair)


@pytest.mark.parametrize("versions", [("TLSv1.2",), ("TLSv1.3",), ("TLSv1.2", "TLSv1.3")])
def test_wrong_key_fails_on_both_sides(versions):
    """A key mismatch ends both sides with an SSL error; no application data passes."""
    pair = make_pair(SHARE_PSK, b"f" * 32, versions=versions)
    pair.exchange()
    assert pair.server_app.data == b"" and pair.client_app.data == b""
    assert pair.server_app.lost is not None and pair.client_app.lost is not None
    assert pair.server_app.lost.check(SSL.Error)
    assert pair.client_app.lost.check(SSL.Error)
    assert not pair.server_app.handshake_done


def test_version_mismatch_fails():
    """A client limited to TLS 1.2 cannot talk to a server limited to TLS 1.3."""
    pair = Pair(
        tls.psk_server_creator(SHARE_PSK, versions=("TLSv1.3",)),
        tls.psk_client_creator(SHARE_PSK, IDENTITY, versions=("TLSv1.2",)),
    )
    pair.exchange()
    assert pair.server_app.lost is not None and pair.client_app.lost is not None
    assert pair.server_app.data == b""


@pytest.mark.parametrize(
    "options",
    [
        {"tls12_ciphers": ("PSK-AES128-CBC-SHA",)},
        {"tls12_ciphers": ("RSA-PSK-AES128-GCM-SHA256",)},
        {"tls12_ciphers": ()},
        {"tls13_suites": ("TLS_AES_256_GCM_SHA384",)},
        {"versions": ("TLSv1.1",)},
        {"versions": ()},
    ],
)
def test_options_cannot_widen_the_suite_lists(options):
    """Narrowing is allowed; anything outside the forward-secret lists is refused."""
    with pytest.raises(ValueError):
        tls.psk_server_creator(SHARE_PSK, **options)


@pytest.mark.parametrize("psk", [b"", b"x" * 513, "text"])
def test_bad_psk_refused(psk):
    """Empty, oversized or non-bytes keys are refused at construction."""
    with pytest.raises(ValueError):
        tls.psk_client_creator(psk, IDENTITY)


def test_identity_with_nul_refused():
    """A NUL in the identity would be cut short by OpenSSL, so it is refused."""
    with pytest.raises(ValueError):
        tls.psk_client_creator(SHARE_PSK, b"a\0b")


def test_repr_hides_key():
    """The creator's repr never shows the key."""
    assert "0123456789abcdef" not in repr(tls.psk_server_creator(SHARE_PSK))


def test_callback_exception_is_logged_and_fails_handshake(monkeypatch):
    """An exception inside an OpenSSL callback is logged and aborts the handshake."""

    def broken(ssl, psk):
        raise RuntimeError("session factory broke")

    monkeypatch.setattr(tls, "_new_tls13_session", broken)
    with capturedLogs() as events:
        pair = make_pair(versions=("TLSv1.3",))
        pair.exchange()
    texts = [formatEvent(e) for e in events]
    assert any("session factory broke" in t for t in texts)
    assert pair.client_app.lost is not None and pair.server_app.lost is not None
    assert pair.server_app.data == b""


def test_many_connections_survive_garbage_collection():
    """Callbacks stay alive with their contexts across many connections and GC runs."""
    for n in range(30):
        pair = make_pair(versions=("TLSv1.2", "TLSv1.3") if n % 2 else ("TLSv1.2",))
        gc.collect()
        assert_works(pair)
        del pair


def test_negotiated_helpers_before_tls():
    """The helpers answer '' for a transport that has no TLS yet."""
    plain = StringTransport()
    assert tls.negotiated_cipher(plain) == ""
    assert tls.negotiated_version(plain) == ""
    assert tls.negotiated_group(plain) == ""
