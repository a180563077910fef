"""Code escrow: an access code that restores from untrusted peers alone
(``protocol/untrusted.md``, section 8).

A trusted peer that holds a long-lived read_write or read_only code leaves an
*escrow entry* with each untrusted peer of the share: a lookup ID, a TLS key and
the share's keys at the code's level, sealed.  All three are derived from the
code one way and independently, so the untrusted peer, which holds the entry,
can neither find the code nor open the keys.  A new machine given the code
derives the same lookup and key, is handed the entry, opens it and becomes a
member of the share.

Entries and their removals are signed lines (``$``) signed with the share's
key of the code's level (read_write may sign either); an untrusted peer checks
them with the public keys it holds, and the restoring machine checks the entry
again with the public key inside the opened keys.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import os
import re
import time
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from clearskies import keys as keymod
from clearskies.errors import ShareError
from clearskies.keys import ShareKeys
from clearskies.untrusted.sealing import SealError

FEATURE = "code_escrow"
"""The feature string of code escrow (both sides list it in the handshake)."""
ESCROW_LEVELS = ("read_write", "read_only")
"""The levels of codes that are escrowed (an untrusted code needs no escrow)."""
MAX_ENTRIES = 64
"""Escrow entries an untrusted peer keeps per share.  A share has few long-lived
codes; the bound keeps a trusted peer (or a leaked signing key) from filling the
untrusted peer's disk, and beyond it new entries are refused, old ones kept."""
MAX_REMOVED = 1024
"""Removed lookup IDs an untrusted peer remembers per share, so that a replayed
entry of a revoked code is refused (the oldest are forgotten first)."""
MAX_SEALED_CHARS = 64 * 1024
"""Most base64 characters of a sealed entry (a read_write bundle is about 4 KiB)."""

_ID_INFO = b"clearskies untrusted v1 escrow id"
_PSK_INFO = b"clearskies untrusted v1 escrow psk"
_KEY_INFO = b"clearskies untrusted v1 escrow key"
_AAD = b"clearskies untrusted v1 escrow"
_NONCE = 12
_HEX64 = re.compile(r"[0-9a-f]{64}")
ENTRY_TYPE = "untrusted.escrow"
REMOVE_TYPE = "untrusted.escrow_remove"


def _derive(code: bytes, info: bytes) -> bytes:
    if not isinstance(code, bytes) or len(code) not in (16, 32):
        raise ValueError("an access code is 16 (or, from a passphrase, 32) bytes")
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(code)


def escrow_lookup(code: bytes) -> str:
    """The lookup ID of ``code``'s escrow entry, 64 hex characters."""
    return _derive(code, _ID_INFO).hex()


def escrow_psk(code: bytes) -> bytes:
    """The TLS pre-shared key of an escrow connection for ``code`` (32 bytes)."""
    return _derive(code, _PSK_INFO)


def _aad(share_id: str, level: str, lookup: str) -> bytes:
    return _AAD + bytes.fromhex(share_id) + level.encode("ascii") + bytes.fromhex(lookup)


def seal_keys(code: bytes, keys: ShareKeys, level: str) -> str:
    """The share's keys at ``level`` (the ``keys`` message), sealed for ``code``'s holder."""
    if level not in ESCROW_LEVELS:
        raise ValueError("only read_write and read_only codes are escrowed")
    plain = json.dumps(keys.keys_message(level), sort_keys=True).encode("utf-8")
    nonce = os.urandom(_NONCE)
    sealed = AESGCM(_derive(code, _KEY_INFO)).encrypt(
        nonce, plain, _aad(keys.share_id, level, escrow_lookup(code)))
    return base64.b64encode(nonce + sealed).decode("ascii")


def open_keys(code: bytes, share_id: str, level: str, sealed: str) -> ShareKeys:
    """The keys sealed by :func:`seal_keys`; SealError for anything else (another
    code, share or level, or tampered bytes)."""
    if level not in ESCROW_LEVELS or not isinstance(share_id, str) \
            or not _HEX64.fullmatch(share_id):
        raise SealError("an escrow entry names a bad share or level")
    try:
        raw = base64.b64decode(sealed.encode("ascii"), validate=True)
        plain = AESGCM(_derive(code, _KEY_INFO)).decrypt(
            raw[:_NONCE], raw[_NONCE:], _aad(share_id, level, escrow_lookup(code)))
    except (InvalidTag, ValueError, binascii.Error, UnicodeError):
        raise SealError("the escrow entry does not open with this code") from None
    try:
        keys = ShareKeys.from_keys_message(json.loads(plain))
    except (ShareError, ValueError) as e:
        raise SealError("the escrow entry holds no valid keys: %s" % e) from None
    if keys.share_id != share_id or keys.access != level:
        raise SealError("the escrow entry holds the keys of another share or level")
    return keys


def _signing_level(keys: ShareKeys, level: str) -> str:
    # The code's own level key when we hold it; read_write also signs for read_only.
    if level in keys.private_keys:
        return level
    raise ValueError("this share cannot sign for %s codes" % level)


def make_entry(code: bytes, keys: ShareKeys, level: str,
               expires: float | None = None) -> tuple[bytes, bytes]:
    """The signed ``untrusted.escrow`` line (text, signature) for ``code`` of ``level``,
    which dies at ``expires`` (Unix seconds; None: when revoked)."""
    body = {"type": ENTRY_TYPE, "share_id": keys.share_id, "access": level,
            "expires": None if expires is None else int(math.ceil(expires)),
            "lookup": escrow_lookup(code), "psk": escrow_psk(code).hex(),
            "sealed": seal_keys(code, keys, level)}
    text = json.dumps(body, separators=(",", ":"), sort_keys=True).encode("utf-8")
    return text, keymod.sign(keys.private_keys[_signing_level(keys, level)], text)


def make_removal(code: bytes, keys: ShareKeys, level: str) -> tuple[bytes, bytes]:
    """The signed ``untrusted.escrow_remove`` line for a code that died."""
    body = {"type": REMOVE_TYPE, "share_id": keys.share_id, "access": level,
            "lookup": escrow_lookup(code)}
    text = json.dumps(body, separators=(",", ":"), sort_keys=True).encode("utf-8")
    return text, keymod.sign(keys.private_keys[_signing_level(keys, level)], text)


@dataclass(frozen=True, repr=False)
class EscrowEntry:
    """An escrow entry as an untrusted peer keeps it: checked, not openable."""

    share_id: str
    access: str
    lookup: str
    psk: bytes
    text: bytes
    signature: bytes
    expires: int | None = None

    def expired(self, now: float) -> bool:
        return self.expires is not None and now >= self.expires

    def __repr__(self) -> str:
        return "EscrowEntry(share_id={!r}, access={!r})".format(self.share_id[:16], self.access)

    def to_json(self) -> dict[str, str]:
        return {"text": self.text.decode("utf-8"),
                "signature": base64.b64encode(self.signature).decode("ascii")}

    @classmethod
    def from_json(cls, item: Any, share_id: str, public_keys: dict[str, bytes]) -> EscrowEntry:
        if not isinstance(item, dict) or not isinstance(item.get("text"), str) \
                or not isinstance(item.get("signature"), str):
            raise SealError("not an escrow entry")
        try:
            signature = base64.b64decode(item["signature"], validate=True)
        except (binascii.Error, ValueError):
            raise SealError("an escrow entry's signature is not base64") from None
        return read_entry(item["text"].encode("utf-8"), signature, share_id, public_keys)


def _signed_body(text: bytes, signature: bytes, kind: str, share_id: str,
                 public_keys: dict[str, bytes]) -> dict[str, Any]:
    try:
        body = json.loads(text)
    except ValueError:
        raise SealError("an escrow line is not JSON") from None
    if not isinstance(body, dict) or body.get("type") != kind:
        raise SealError("not an %s line" % kind)
    level = body.get("access")
    if level not in ESCROW_LEVELS:
        raise SealError("an escrow line names a bad level")
    if body.get("share_id") != share_id:
        raise SealError("an escrow line of another share")
    lookup = body.get("lookup")
    if not isinstance(lookup, str) or not _HEX64.fullmatch(lookup):
        raise SealError("an escrow line's lookup must be 64 hex characters")
    # Signed by the code's level key, or by read_write (which holds every level).
    signers = ("read_write",) if level == "read_write" else ("read_only", "read_write")
    if not any(level_ in public_keys and keymod.verify(public_keys[level_], text, signature)
               for level_ in signers):
        raise SealError("an escrow line with a bad signature")
    return body


def read_entry(text: bytes, signature: bytes, share_id: str,
               public_keys: dict[str, bytes]) -> EscrowEntry:
    """A received ``untrusted.escrow`` line, checked (fields and signature)."""
    body = _signed_body(text, signature, ENTRY_TYPE, share_id, public_keys)
    psk, sealed = body.get("psk"), body.get("sealed")
    if not isinstance(psk, str) or not _HEX64.fullmatch(psk):
        raise SealError("an escrow entry's psk must be 64 hex characters")
    if not isinstance(sealed, str) or not 0 < len(sealed) <= MAX_SEALED_CHARS:
        raise SealError("an escrow entry's sealed keys are missing or too long")
    expires = body.get("expires")
    if expires is not None and (isinstance(expires, bool) or not isinstance(expires, int)):
        raise SealError("an escrow entry's expiry must be Unix seconds or null")
    return EscrowEntry(share_id, body["access"], body["lookup"], bytes.fromhex(psk),
                       text, signature, expires)


def read_removal(text: bytes, signature: bytes, share_id: str,
                 public_keys: dict[str, bytes]) -> tuple[str, str]:
    """(lookup, level) of a received ``untrusted.escrow_remove`` line, checked."""
    body = _signed_body(text, signature, REMOVE_TYPE, share_id, public_keys)
    return body["lookup"], body["access"]


def open_entry(code: bytes, text: bytes, signature: bytes, now: float | None = None) -> ShareKeys:
    """The keys an escrow entry handed to a restoring machine opens to.

    The entry must be for ``code`` (its lookup), open with the code's key (which
    authenticates share and level too), and be signed by the share's key of its
    level as found inside the opened keys, and not expired at ``now``.  SealError otherwise.
    """
    try:
        body = json.loads(text)
    except ValueError:
        raise SealError("the escrow entry is not JSON") from None
    if not isinstance(body, dict) or body.get("type") != ENTRY_TYPE \
            or body.get("lookup") != escrow_lookup(code) or not isinstance(body.get("sealed"), str):
        raise SealError("the escrow entry is not the one of this code")
    keys = open_keys(code, body.get("share_id"), body.get("access"), body["sealed"])
    entry = read_entry(text, signature, keys.share_id, keys.public_keys)
    if now is not None and entry.expired(now):
        raise SealError("the escrow entry is of a code that expired")
    return keys


class CodeEscrow:
    """What a code we were given derives for escrow (``handshake.EscrowKey``)."""

    feature = FEATURE

    def __init__(self, code: bytes) -> None:
        self._code = code
        self.lookup = escrow_lookup(code)
        self.psk = escrow_psk(code)

    def __repr__(self) -> str:  # the key is a secret
        return "CodeEscrow(lookup=%r)" % self.lookup[:16]

    def open(self, text: bytes, signature: bytes) -> ShareKeys:
        return open_entry(self._code, text, signature, time.time())
