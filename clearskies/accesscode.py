"""Access codes: the short secrets that let a new peer join a share.

A code is 16 random bytes.  People see it as 33 characters: base32 of a fixed
4-byte prefix plus the code (32 characters, always starting ``SYNC``) and one
Luhn mod 32 check character, so that a typo is caught before any network
traffic happens.  The *access ID* (SHA-256 of the code) is public and is what
discovery announces; the code itself is the secret and the TLS pre-shared key
of the first connection.  See ``protocol/keys.md``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Any

from clearskies.errors import AccessCodeError
from clearskies.levels import GRANTABLE_LEVELS

CODE_BYTES = 16
PREFIX_BYTES = bytes.fromhex("961a2ff3")
CODE_CHARS = 33
URL_SCHEME = "clearskies:"

_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_VALUES = {c: i for i, c in enumerate(_ALPHABET)}
# Characters people confuse with base32 letters; base32 itself has no 0 or 1.
_LOOKALIKES = {"0": "O", "1": "L"}
_BODY_CHARS = 32  # base32 of prefix + code: 20 bytes -> 32 characters


def generate_code() -> bytes:
    """Return a fresh random access code from the operating system's CSPRNG."""
    return secrets.token_bytes(CODE_BYTES)


def luhn_mod32_check(chars: str) -> str:
    """Return the Luhn mod 32 check character for a string of base32 characters.

    Walking right to left, every other character (starting with the rightmost)
    counts double, with the doubled value's base-32 digits summed; the check
    character brings the total to a multiple of 32.  This catches every
    single-character substitution and most swaps of neighbours.
    """
    total = 0
    factor = 2
    for char in reversed(chars):
        try:
            value = _VALUES[char]
        except KeyError:
            raise ValueError("{!r} is not a base32 character".format(char)) from None
        addend = factor * value
        total += addend // 32 + addend % 32
        factor = 1 if factor == 2 else 2
    return _ALPHABET[(32 - total % 32) % 32]


def format_code(code: bytes) -> str:
    """Return the 33-character human form of a 16-byte access code."""
    if len(code) != CODE_BYTES:
        raise ValueError(
            "an access code has {} bytes, not {}".format(CODE_BYTES, len(code))
        )
    body = base64.b32encode(PREFIX_BYTES + code).decode("ascii")
    return body + luhn_mod32_check(body)


def code_url(code: bytes) -> str:
    """Return the code as a ``clearskies://`` link for sharing by message or QR."""
    return URL_SCHEME + "//" + format_code(code)


def parse_code(text: str) -> bytes:
    """Return the 16 code bytes of a typed or pasted access code.

    Forgiving about what people do (case, surrounding blanks, the URL prefix,
    0 for O and 1 for L) and strict about everything else: each failed check
    raises :class:`AccessCodeError` with its own message.
    """
    text = text.strip()
    if text[: len(URL_SCHEME)].lower() == URL_SCHEME:
        text = text[len(URL_SCHEME):]
        if text.startswith("//"):
            text = text[2:]
        text = text.strip()
    if not text:
        raise AccessCodeError("The access code is empty; paste the code you were given.")
    if len(text) != CODE_CHARS:
        raise AccessCodeError(
            "The access code has {found} characters, but {expected} are expected; "
            "check that you copied all of it.".format(found=len(text), expected=CODE_CHARS)
        )
    normalized = []
    for typed in text:
        char = _LOOKALIKES.get(typed, typed)
        if "a" <= char <= "z":
            char = char.upper()
        if char not in _VALUES:
            raise AccessCodeError(
                "The access code contains {char!r}, which cannot appear in a code "
                "(only letters and the digits 2-7 can).".format(char=typed)
            )
        normalized.append(char)
    human = "".join(normalized)
    if not human.startswith("SYNC"):
        raise AccessCodeError(
            "The access code does not start with SYNC, so it is not a ClearSkies access code."
        )
    body, check = human[:_BODY_CHARS], human[_BODY_CHARS]
    if luhn_mod32_check(body) != check:
        raise AccessCodeError(
            "The access code's check character does not match; "
            "it was probably mistyped. Compare it with the original."
        )
    raw = base64.b32decode(body)
    if raw[: len(PREFIX_BYTES)] != PREFIX_BYTES:
        raise AccessCodeError(
            "The access code starts with SYNC but its prefix is wrong, "
            "so it is not a ClearSkies access code."
        )
    return raw[len(PREFIX_BYTES):]


def access_id(code: bytes) -> str:
    """Return the public access ID (SHA-256 hex) under which a code is announced."""
    return hashlib.sha256(code).hexdigest()


def passphrase_code(passphrase: str, iterations: int = 10_000_000) -> bytes:
    """Derive a 32-byte code from a passphrase by iterating SHA-256.

    The iteration count makes guessing expensive; the default takes seconds,
    so callers run this in a thread.  A passphrase is still weaker than a
    generated code, and has no human form of its own.
    """
    if not passphrase:
        raise ValueError("a passphrase must not be empty")
    if iterations < 1:
        raise ValueError("iterations must be at least 1")
    digest = passphrase.encode("utf-8")
    sha256 = hashlib.sha256
    for _ in range(iterations):
        digest = sha256(digest).digest()
    return digest


#: ``cannot_start`` reasons (protocol/handshake.md): the code will never work again.
DEAD_CODE_REASONS = ("expired", "used", "cancelled", "unknown")
#: What the user reads for each, with what to do.
DEAD_CODE_TEXT = {
    "expired": "the access code has expired; ask for a new one",
    "used": "the one-time access code was already used; ask for a new one",
    "cancelled": "the access code was cancelled on the machine that made it; ask for a new one",
    "unknown": "no peer knows this access code (mistyped, or its share was removed "
               "where it was made); check it or ask for a new one",
}

#: The reasons only the code's maker can give; they come with a proof.
PROVEN_REASONS = ("expired", "used", "cancelled")


def refusal_proof(code: bytes, reason: str, peer_id: str) -> str:
    """What shows a ``cannot_start`` reason comes from whoever made the code: an
    HMAC-SHA256, keyed by the code, of the reason and the asking peer's ID (hex)."""
    message = ("clearskies cannot_start %s %s" % (reason, peer_id)).encode("ascii", "replace")
    return hmac.new(code, message, hashlib.sha256).hexdigest()


@dataclass
class AccessCode:
    """A code this daemon created for one share, with its lifetime rules.

    The creator stores these; a code is *spent* when the peer that used it
    acknowledges the keys.  ``code`` is 16 bytes for generated codes and 32
    for passphrase codes.
    """

    code: bytes
    share_id: str
    level: str
    created: float
    expires: float | None
    one_time: bool = True
    used: bool = False
    revoked: bool = False

    def __repr__(self) -> str:
        # The code is the secret; show only its public ID.
        return (
            "AccessCode(access_id={!r}, share_id={!r}, level={!r}, created={!r}, "
            "expires={!r}, one_time={!r}, used={!r}, revoked={!r})".format(
                self.access_id, self.share_id, self.level, self.created,
                self.expires, self.one_time, self.used, self.revoked,
            )
        )

    @property
    def access_id(self) -> str:
        """The public ID peers announce and ask for."""
        return access_id(self.code)

    def is_live(self, now: float) -> bool:
        """Whether a peer may still use this code at unix time ``now``."""
        if self.revoked:
            return False
        if self.expires is not None and now >= self.expires:
            return False
        return not (self.one_time and self.used)

    def dead_reason(self, now: float) -> str | None:
        """Why no peer may use this code any more (a ``cannot_start`` reason), or None."""
        if self.revoked:
            return "cancelled"
        if self.one_time and self.used:
            return "used"
        if self.expires is not None and now >= self.expires:
            return "expired"
        return None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (code as hex) for the daemon's state file."""
        return {
            "code": self.code.hex(),
            "share_id": self.share_id,
            "level": self.level,
            "created": self.created,
            "expires": self.expires,
            "one_time": self.one_time,
            "used": self.used,
            "revoked": self.revoked,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AccessCode:
        """Rebuild a code from :meth:`to_dict` output; ValueError if it is malformed."""
        try:
            code = bytes.fromhex(d["code"])
            level = d["level"]
            expires = d["expires"]
            result = cls(
                code=code,
                share_id=d["share_id"],
                level=level,
                created=float(d["created"]),
                expires=None if expires is None else float(expires),
                one_time=bool(d.get("one_time", True)),
                used=bool(d.get("used", False)),
                revoked=bool(d.get("revoked", False)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError("malformed stored access code: {}".format(e)) from None
        if not isinstance(d["share_id"], str):
            raise ValueError("malformed stored access code: share_id is not text")
        if len(code) not in (CODE_BYTES, 32):
            raise ValueError("malformed stored access code: wrong code length")
        if level not in GRANTABLE_LEVELS:
            raise ValueError("malformed stored access code: level {!r}".format(level))
        return result


def new_access_code(
    share_id: str,
    level: str,
    now: float,
    *,
    lifetime: float | None = 86400.0,
    one_time: bool = True,
) -> AccessCode:
    """Create a fresh random code for ``share_id`` granting ``level``.

    By default a code works once and for one day; ``lifetime=None`` makes it
    never expire.
    """
    if level not in GRANTABLE_LEVELS:
        raise ValueError(
            "an access code grants one of {}, not {!r}".format(", ".join(GRANTABLE_LEVELS), level)
        )
    if lifetime is not None and lifetime <= 0:
        raise ValueError("an access code's lifetime must be positive")
    return AccessCode(
        code=generate_code(),
        share_id=share_id,
        level=level,
        created=now,
        expires=None if lifetime is None else now + lifetime,
        one_time=one_time,
    )
