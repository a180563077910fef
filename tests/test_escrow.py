"""Code escrow's derivations, sealing and signed lines (protocol/untrusted.md, section 8)."""

from __future__ import annotations

import json
import os

import pytest

from clearskies.keys import generate_share_keys
from clearskies.untrusted import escrow
from clearskies.untrusted.sealing import SealError

KEYS = generate_share_keys(rsa_bits=1024)
OTHER = generate_share_keys(rsa_bits=1024)
CODE = bytes(range(16))


def _untrusted_view(keys):
    return dict(keys.public_keys)


def test_derivations_are_independent_and_fixed():
    lookup, psk = escrow.escrow_lookup(CODE), escrow.escrow_psk(CODE)
    assert len(lookup) == 64 and len(psk) == 32
    assert escrow.escrow_lookup(CODE) == lookup  # deterministic: a new machine finds it
    key = escrow._derive(CODE, escrow._KEY_INFO)
    assert len({bytes.fromhex(lookup), psk, key, CODE}) == 4
    assert escrow.escrow_lookup(bytes(16)) != lookup
    with pytest.raises(ValueError):
        escrow.escrow_lookup(b"short")


@pytest.mark.parametrize("level", ["read_write", "read_only"])
def test_an_entry_opens_with_its_code_to_the_keys_of_its_level(level):
    text, signature = escrow.make_entry(CODE, KEYS, level)
    entry = escrow.read_entry(text, signature, KEYS.share_id, _untrusted_view(KEYS))
    assert (entry.access, entry.lookup, entry.psk) == (
        level, escrow.escrow_lookup(CODE), escrow.escrow_psk(CODE))
    keys = escrow.open_entry(CODE, entry.text, entry.signature)
    assert keys.access == level and keys.share_id == KEYS.share_id
    assert keys.psks == {k: v for k, v in KEYS.psks.items()
                         if k != "read_write" or level == "read_write"}
    # Kept and read back by the untrusted peer.
    again = escrow.EscrowEntry.from_json(entry.to_json(), KEYS.share_id, _untrusted_view(KEYS))
    assert escrow.open_entry(CODE, again.text, again.signature).psks == keys.psks


def test_the_entry_holds_nothing_that_opens_anything():
    text, _ = escrow.make_entry(CODE, KEYS, "read_write")
    for secret in list(KEYS.psks.values()) + [CODE.hex()]:
        assert secret.encode() not in text
    for pem in KEYS.private_keys.values():
        assert pem.split(b"\n")[1] not in text
    assert escrow._derive(CODE, escrow._KEY_INFO).hex().encode() not in text


def test_a_wrong_code_opens_nothing():
    text, signature = escrow.make_entry(CODE, KEYS, "read_write")
    with pytest.raises(SealError):
        escrow.open_entry(os.urandom(16), text, signature)
    body = json.loads(text)
    with pytest.raises(SealError):
        escrow.open_keys(os.urandom(16), body["share_id"], "read_write", body["sealed"])


def test_tampered_sealed_keys_are_refused():
    text, _ = escrow.make_entry(CODE, KEYS, "read_write")
    body = json.loads(text)
    raw = bytearray(escrow.base64.b64decode(body["sealed"]))
    raw[40] ^= 1
    with pytest.raises(SealError):
        escrow.open_keys(CODE, body["share_id"], "read_write",
                         escrow.base64.b64encode(bytes(raw)).decode())


def test_a_swapped_share_or_level_is_refused():
    text, _ = escrow.make_entry(CODE, KEYS, "read_only")
    body = json.loads(text)
    with pytest.raises(SealError):
        escrow.open_keys(CODE, body["share_id"], "read_write", body["sealed"])
    with pytest.raises(SealError):
        escrow.open_keys(CODE, OTHER.share_id, "read_only", body["sealed"])
    with pytest.raises(SealError):
        escrow.open_keys(CODE, body["share_id"], "untrusted", body["sealed"])


def test_an_entry_re_signed_or_edited_is_refused():
    text, signature = escrow.make_entry(CODE, KEYS, "read_only")
    # The untrusted peer (or another one) edits the line: the signature no longer holds.
    body = json.loads(text)
    body["access"] = "read_write"
    edited = json.dumps(body, separators=(",", ":"), sort_keys=True).encode()
    with pytest.raises(SealError):
        escrow.read_entry(edited, signature, KEYS.share_id, _untrusted_view(KEYS))
    with pytest.raises(SealError):
        escrow.open_entry(CODE, edited, signature)
    # An entry of another share, made with the same code, signed by that share.
    other_text, other_sig = escrow.make_entry(CODE, OTHER, "read_only")
    with pytest.raises(SealError):
        escrow.read_entry(other_text, other_sig, KEYS.share_id, _untrusted_view(KEYS))
    # Sealed correctly but signed by another share's key: the restorer refuses it.
    with pytest.raises(SealError):
        escrow.open_entry(CODE, text, other_sig)


def test_a_read_only_share_signs_only_read_only_entries():
    read_only = escrow.ShareKeys.from_keys_message(KEYS.keys_message("read_only"))
    text, signature = escrow.make_entry(CODE, read_only, "read_only")
    assert escrow.read_entry(text, signature, KEYS.share_id, _untrusted_view(KEYS))
    with pytest.raises(ValueError):
        escrow.make_entry(CODE, read_only, "read_write")
    with pytest.raises(ValueError):
        escrow.make_entry(CODE, KEYS, "untrusted")


def test_removals_are_signed_too():
    text, signature = escrow.make_removal(CODE, KEYS, "read_only")
    assert escrow.read_removal(text, signature, KEYS.share_id, _untrusted_view(KEYS)) == (
        escrow.escrow_lookup(CODE), "read_only")
    _, other_sig = escrow.make_removal(CODE, OTHER, "read_only")
    with pytest.raises(SealError):
        escrow.read_removal(text, other_sig, KEYS.share_id, _untrusted_view(KEYS))
    entry_text, entry_sig = escrow.make_entry(CODE, KEYS, "read_only")
    with pytest.raises(SealError):  # an entry is not a removal
        escrow.read_removal(entry_text, entry_sig, KEYS.share_id, _untrusted_view(KEYS))


def test_an_expired_entry_does_not_open():
    text, signature = escrow.make_entry(CODE, KEYS, "read_write", expires=1000.5)
    entry = escrow.read_entry(text, signature, KEYS.share_id, _untrusted_view(KEYS))
    assert entry.expires == 1001 and entry.expired(1001) and not entry.expired(1000)
    assert escrow.open_entry(CODE, text, signature, now=1000.0).share_id == KEYS.share_id
    with pytest.raises(SealError, match="expired"):
        escrow.open_entry(CODE, text, signature, now=1001.0)
    with pytest.raises(SealError, match="expired"):
        escrow.CodeEscrow(CODE).open(text, signature)
