"""The handshake of code escrow: a code opens the entry an untrusted peer keeps
(protocol/untrusted.md, section 8), and nothing else changes."""

from __future__ import annotations

import os

import pytest

from clearskies.errors import CannotStart, HandshakeError
from clearskies.handshake import ESCROW_FEATURE, ConnectTarget, Handshake, MemoryKeyRing, StartTLS
from clearskies.keys import ShareKeys, generate_share_keys
from clearskies.untrusted import escrow
from tests.test_handshake import CLIENT_PEER, SERVER_PEER, Run

FEATURES = ("untrusted_sealed", ESCROW_FEATURE)


@pytest.fixture(scope="module")
def keys() -> ShareKeys:
    return generate_share_keys(rsa_bits=1024)


class EscrowRing(MemoryKeyRing):
    def __init__(self) -> None:
        super().__init__()
        self.entries: dict[str, escrow.EscrowEntry] = {}
        self.asked: list[str] = []

    def escrow_entry(self, lookup: str):
        self.asked.append(lookup)
        return self.entries.get(lookup)


def untrusted_side(keys: ShareKeys, code: bytes, level: str = "read_write") -> EscrowRing:
    ring = EscrowRing()
    ring.add_share(ShareKeys.from_keys_message(keys.keys_message("untrusted")), SERVER_PEER)
    text, signature = escrow.make_entry(code, keys, level)
    entry = escrow.read_entry(text, signature, keys.share_id, dict(keys.public_keys))
    ring.entries[entry.lookup] = entry
    return ring


def run(ring_s, code, server_features=FEATURES, client_features=FEATURES, escrow_key=None):
    ring_c = MemoryKeyRing()
    target = ConnectTarget.join(code, CLIENT_PEER)
    target.escrow = escrow_key or escrow.CodeEscrow(code)
    ring_c.add_join(target)
    server = Handshake.server(ring_s, "untrusted box", features=server_features)
    client = Handshake.client(ring_c, target, "new box", features=client_features)
    return Run(server, client).start(), ring_c


def test_escrow_feature_strings_agree():
    assert escrow.FEATURE == ESCROW_FEATURE


@pytest.mark.parametrize("level", ["read_write", "read_only"])
def test_a_code_opens_its_escrow_and_the_connection_goes_on_untrusted(keys, level):
    code = os.urandom(16)
    ring_s = untrusted_side(keys, code, level)
    r, ring_c = run(ring_s, code)
    (created, _), = ring_c.created
    assert created.share_id == keys.share_id and created.access == level
    assert created.psks == ShareKeys.from_keys_message(keys.keys_message(level)).psks
    # Both sides keyed TLS with the escrow key, not the code.
    tls = [r.first(side, StartTLS) for side in ("server", "client")]
    assert {t.psk for t in tls} == {escrow.escrow_psk(code)}
    assert all(code not in t.psk for t in tls)
    assert r.done("client").access == r.done("server").access == "untrusted"
    assert r.done("server").share_id == keys.share_id
    assert ring_s.used == []  # the untrusted peer spends no code


def test_the_code_itself_never_reaches_the_untrusted_peer(keys):
    code = os.urandom(16)
    ring_s = untrusted_side(keys, code)
    r, _ = run(ring_s, code)
    sent = repr(r.sent["client"]).encode()
    for secret in (code.hex().encode(), escrow.escrow_psk(code).hex().encode()):
        assert secret not in sent


def test_a_wrong_code_gets_no_entry(keys):
    ring_s = untrusted_side(keys, os.urandom(16))
    with pytest.raises(CannotStart):
        run(ring_s, os.urandom(16))
    assert len(ring_s.asked) == 1


def test_without_the_feature_the_code_handshake_is_unchanged(keys):
    code = os.urandom(16)
    ring_s = untrusted_side(keys, code)
    for features in ({"server_features": ("untrusted_sealed",)},
                     {"client_features": ("untrusted_sealed",)}):
        with pytest.raises(CannotStart):
            run(ring_s, code, **features)
    assert ring_s.asked == []  # the start carried no escrow lookup


class Forged:
    """An escrow key whose entry is another share's, or garbage."""

    feature = ESCROW_FEATURE

    def __init__(self, code: bytes) -> None:
        self.inner = escrow.CodeEscrow(code)
        self.lookup, self.psk = self.inner.lookup, self.inner.psk

    def open(self, text, signature):
        return self.inner.open(text[:-3] + b"xx}", signature)


def test_an_entry_that_does_not_open_fails_the_handshake(keys):
    code = os.urandom(16)
    ring_s = untrusted_side(keys, code)
    with pytest.raises(HandshakeError, match="does not open"):
        run(ring_s, code, escrow_key=Forged(code))


def test_an_escrow_starttls_nobody_asked_for_is_refused(keys):
    ring_c = MemoryKeyRing()
    target = ConnectTarget.join(os.urandom(16), CLIENT_PEER)
    ring_c.add_join(target)
    client = Handshake.client(ring_c, target, "new box", features=FEATURES)
    client.receive({"type": "greeting", "protocol": [1], "features": list(FEATURES)}, 0)
    with pytest.raises(HandshakeError, match="did not ask"):
        client.receive({"type": "starttls", "access": "unknown", "peer": SERVER_PEER,
                        "escrow": True}, 0)


def test_a_code_connection_takes_no_escrow_entry_and_an_escrow_one_no_keys(keys):
    code = os.urandom(16)
    ring_c = MemoryKeyRing()
    target = ConnectTarget.join(code, CLIENT_PEER)
    target.escrow = escrow.CodeEscrow(code)
    ring_c.add_join(target)
    text, signature = escrow.make_entry(code, keys, "read_write")
    entry = {"type": "escrow", "entry": text.decode(),
             "signature": escrow.base64.b64encode(signature).decode()}
    greeting = {"type": "greeting", "protocol": [1], "features": list(FEATURES)}
    starttls = {"type": "starttls", "access": "unknown", "peer": SERVER_PEER}
    plain = Handshake.client(ring_c, target, "new box", features=FEATURES)
    plain.receive(greeting, 0)
    plain.receive(starttls, 0)
    with pytest.raises(HandshakeError, match="did not ask"):
        plain.receive(entry, 0)
    escrowed = Handshake.client(ring_c, target, "new box", features=FEATURES)
    escrowed.receive(greeting, 0)
    escrowed.receive(dict(starttls, escrow=True), 0)
    with pytest.raises(HandshakeError, match="not keys"):
        escrowed.receive(keys.keys_message("read_write"), 0)
    assert ring_c.created == []
