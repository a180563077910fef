"""Share keys: generation, the ``keys`` message, storage and RSA signatures.

Every share has three pre-shared keys (one per access level, used as TLS-PSK
secrets) and two RSA key pairs (read_write and read_only, used to sign what a
peer states to less trusted peers).  A peer holds the secrets of its own level
and everything below it, and the public halves of everything.  See
``protocol/keys.md``.

Generating keys, loading private keys (OpenSSL checks them) and :meth:`save`
(fsync) are slow enough to block the reactor: callers run them in a thread.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import secrets
import stat
import tempfile
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from twisted.logger import Logger

from clearskies.atomicwrite import install_atomically
from clearskies.errors import HandshakeError, ShareError
from clearskies.levels import GRANTABLE_LEVELS, LEVELS, RSA_LEVELS

_log = Logger()


PSK_BYTES = 16
RSA_BITS = 2048
# Accepted from peers: the reference peer's keys are 512-bit; anything larger
# than 8192 bits only costs us CPU time to check.
MIN_RSA_BITS = 512
MAX_RSA_BITS = 8192
MAX_PEM_CHARS = 8_192
STORAGE_VERSION = 1

_PSK_RE = re.compile(r"[0-9a-f]{32}")
_SHARE_ID_RE = re.compile(r"[0-9a-f]{64}")
_RANKS = {level: rank for rank, level in enumerate(LEVELS)}


def level_rank(level: str) -> int:
    """The position of ``level`` in :data:`LEVELS`; ValueError for an unknown name."""
    try:
        return _RANKS[level]
    except (KeyError, TypeError):
        raise ValueError("unknown access level {!r}".format(level)) from None


def greatest_common_access(a: str, b: str) -> str:
    """The highest level both sides hold: the lower of the two."""
    return a if level_rank(a) <= level_rank(b) else b


# -- RSA ---------------------------------------------------------------------


_PROBE = b"clearskies key check"


@functools.lru_cache(maxsize=32)
def _load_private(pem: bytes) -> rsa.RSAPrivateKey:
    # OpenSSL's full key validation costs 36 ms for 2048 bits and about half a
    # second for 4096 (measured here), on the reactor thread when a peer hands
    # over keys.  A signature checked with the public half proves in about
    # 2 ms that the parts of the key agree, which is what signing needs.
    key = serialization.load_pem_private_key(pem, password=None,
                                             unsafe_skip_rsa_key_validation=True)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError("not an RSA private key")
    if key.key_size < MIN_RSA_BITS or key.key_size > MAX_RSA_BITS:
        return key  # refused by _check_size with the accepted range, before any probe
    try:
        key.public_key().verify(key.sign(_PROBE, padding.PKCS1v15(), hashes.SHA256()),
                                _PROBE, padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature:
        raise ValueError("the private key's parts do not agree (its signatures do not verify)"
                         ) from None
    return key


@functools.lru_cache(maxsize=64)
def _load_public(pem: bytes) -> rsa.RSAPublicKey:
    key = serialization.load_pem_public_key(pem)
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError("not an RSA public key")
    return key


def _private_pem(key: rsa.RSAPrivateKey) -> bytes:
    # PKCS#1 ("BEGIN RSA PRIVATE KEY"), the form the reference peer sends.
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def _public_pem(key: rsa.RSAPublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def sign(private_pem: bytes, text: bytes) -> bytes:
    """Sign ``text`` with RSA PKCS#1 v1.5 / SHA-256 (the ``$`` wire prefix)."""
    return _load_private(private_pem).sign(text, padding.PKCS1v15(), hashes.SHA256())


def verify(public_pem: bytes, text: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is a valid signature of ``text``; never raises."""
    try:
        _load_public(public_pem).verify(signature, text, padding.PKCS1v15(), hashes.SHA256())
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
        return False
    return True


# -- validation ----------------------------------------------------------------


def _pem_bytes(value: object, what: str) -> bytes:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if not isinstance(value, str):
        raise ValueError("{} must be a PEM string".format(what))
    if len(value) > MAX_PEM_CHARS:
        raise ValueError("{} is longer than {} characters".format(what, MAX_PEM_CHARS))
    try:
        return value.encode("ascii")
    except UnicodeEncodeError:
        raise ValueError("{} is not ASCII PEM text".format(what)) from None


def _check_size(key: rsa.RSAPrivateKey | rsa.RSAPublicKey, what: str) -> None:
    if not MIN_RSA_BITS <= key.key_size <= MAX_RSA_BITS:
        raise ValueError(
            "{} is a {}-bit RSA key; {} to {} bits are accepted".format(
                what, key.key_size, MIN_RSA_BITS, MAX_RSA_BITS
            )
        )


def _rsa_pair(level: str, private: object, public: object) -> tuple[bytes | None, bytes]:
    """Parse one level's RSA entries; return normalized (private PEM or None, public PEM)."""
    private_pem = None
    public_key = None
    if private is not None:
        what = "the {} private key".format(level)
        try:
            private_key = _load_private(_pem_bytes(private, what))
        except (ValueError, TypeError, UnsupportedAlgorithm) as e:
            raise ValueError("{} is not a usable RSA private key PEM ({})".format(what, e)) from None
        _check_size(private_key, what)
        private_pem = _private_pem(private_key)
        public_key = private_key.public_key()
    if public is not None:
        what = "the {} public key".format(level)
        try:
            given = _load_public(_pem_bytes(public, what))
        except (ValueError, TypeError, UnsupportedAlgorithm) as e:
            raise ValueError("{} is not a usable RSA public key PEM ({})".format(what, e)) from None
        _check_size(given, what)
        if public_key is not None and given.public_numbers() != public_key.public_numbers():
            raise ValueError("the {} public key does not match its private key".format(level))
        public_key = given
    if public_key is None:
        raise ValueError("no {} RSA key (private or public) is present".format(level))
    return private_pem, _public_pem(public_key)


def _validated(
    share_id: object,
    access: object,
    psks: dict[str, object],
    private_keys: dict[str, object],
    public_keys: dict[str, object],
) -> ShareKeys:
    """Check a complete set of keys for a claimed level; ValueError says what is wrong.

    The level decides exactly what must be present: the PSKs and private keys
    of that level and below, and no secret above it (an inconsistent grant is
    refused rather than guessed at).
    """
    if access not in GRANTABLE_LEVELS:
        raise ValueError(
            "access must be one of {}, not {!r}".format(", ".join(GRANTABLE_LEVELS), access)
        )
    if not isinstance(share_id, str) or not _SHARE_ID_RE.fullmatch(share_id):
        raise ValueError("share_id must be 64 lowercase hex characters")
    rank = level_rank(access)
    out_psks: dict[str, str] = {}
    out_private: dict[str, bytes] = {}
    out_public: dict[str, bytes] = {}
    for level in GRANTABLE_LEVELS:
        held = level_rank(level) <= rank
        psk = psks.get(level)
        if held and psk is None:
            raise ValueError("access is {} but the {} PSK is missing".format(access, level))
        if not held and psk is not None:
            raise ValueError("access is {} but the {} PSK is present".format(access, level))
        if psk is not None:
            if not isinstance(psk, str) or not _PSK_RE.fullmatch(psk):
                raise ValueError("the {} PSK must be 32 lowercase hex characters".format(level))
            out_psks[level] = psk
        if level not in RSA_LEVELS:
            continue
        private = private_keys.get(level)
        if held and private is None:
            raise ValueError(
                "access is {} but the {} private key is missing".format(access, level)
            )
        if not held and private is not None:
            raise ValueError(
                "access is {} but the {} private key is present".format(access, level)
            )
        private_pem, public_pem = _rsa_pair(level, private, public_keys.get(level))
        if private_pem is not None:
            out_private[level] = private_pem
        out_public[level] = public_pem
    return ShareKeys(share_id, out_psks, out_private, out_public)


# -- the keys of one share -------------------------------------------------------


@dataclass(repr=False)
class ShareKeys:
    """The keys of one share that this daemon holds."""

    share_id: str
    psks: dict[str, str] = field(default_factory=dict)
    private_keys: dict[str, bytes] = field(default_factory=dict)
    public_keys: dict[str, bytes] = field(default_factory=dict)

    def __repr__(self) -> str:
        # Never show PSKs or private keys, not even in tracebacks.
        return "ShareKeys(share_id={!r}, access={!r})".format(self.share_id, self.access)

    __str__ = __repr__

    @property
    def access(self) -> str:
        """The highest level we hold a PSK for."""
        return max(self.psks, key=level_rank, default="unknown")

    def psk(self, level: str) -> bytes:
        """The TLS pre-shared key for ``level``: the ASCII of its hex text.

        The reference peer keys TLS with the hex string, not the 16 bytes it
        encodes, so we do too.
        """
        try:
            return self.psks[level].encode("ascii")
        except KeyError:
            raise ValueError("this share holds no {} key".format(level)) from None

    def keys_message(self, level: str) -> dict[str, Any]:
        """The ``keys`` message that hands a new peer the keys of ``level``.

        Secrets only for ``level`` and below; public keys for the levels above.
        ValueError if ``level`` is not grantable or above what we hold.
        """
        if level not in GRANTABLE_LEVELS:
            raise ValueError(
                "can grant only {}, not {!r}".format(", ".join(GRANTABLE_LEVELS), level)
            )
        rank = level_rank(level)
        if rank > level_rank(self.access):
            raise ValueError(
                "cannot grant {}: this share holds only {} keys".format(level, self.access)
            )
        message: dict[str, Any] = {"type": "keys", "access": level, "share_id": self.share_id}
        for each in GRANTABLE_LEVELS:
            granted = level_rank(each) <= rank
            entry: dict[str, str] = {}
            if granted:
                entry["psk"] = self.psks[each]
            if each in RSA_LEVELS:
                if granted:
                    entry["rsa"] = self.private_keys[each].decode("ascii")
                else:
                    entry["public_rsa"] = self.public_keys[each].decode("ascii")
            message[each] = entry
        return message

    @classmethod
    def from_keys_message(cls, message: dict[str, Any]) -> ShareKeys:
        """Validate a received ``keys`` message and return the keys it grants.

        Public keys missing from the message (the reference peer sends none
        when it grants read_write) are derived from the private keys.
        Raises :class:`HandshakeError` naming the first problem found.
        Pure, but OpenSSL's check of the private keys costs tens of ms.
        """
        try:
            if not isinstance(message, dict):
                raise ValueError("the message is not a JSON object")
            psks: dict[str, object] = {}
            private_keys: dict[str, object] = {}
            public_keys: dict[str, object] = {}
            for level in GRANTABLE_LEVELS:
                entry = message.get(level)
                if entry is None:
                    continue
                if not isinstance(entry, dict):
                    raise ValueError("{!r} must be a JSON object".format(level))
                psks[level] = entry.get("psk")
                if level in RSA_LEVELS:
                    private_keys[level] = entry.get("rsa")
                    public_keys[level] = entry.get("public_rsa")
            psks = {k: v for k, v in psks.items() if v is not None}
            private_keys = {k: v for k, v in private_keys.items() if v is not None}
            return _validated(
                message.get("share_id"), message.get("access"), psks, private_keys, public_keys
            )
        except ValueError as e:
            raise HandshakeError("refusing the keys message: {}".format(e)) from None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict of everything we hold (secrets included: store it 0600)."""
        return {
            "version": STORAGE_VERSION,
            "share_id": self.share_id,
            "psks": dict(self.psks),
            "private_keys": {k: v.decode("ascii") for k, v in self.private_keys.items()},
            "public_keys": {k: v.decode("ascii") for k, v in self.public_keys.items()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ShareKeys:
        """Rebuild from :meth:`to_dict` output, checking it; ShareError if it is damaged."""
        try:
            if not isinstance(d, dict):
                raise ValueError("not a JSON object")
            if d.get("version") != STORAGE_VERSION:
                raise ValueError("unknown storage version {!r}".format(d.get("version")))
            parts = [d.get("psks"), d.get("private_keys"), d.get("public_keys")]
            if not all(isinstance(part, dict) for part in parts):
                raise ValueError("psks, private_keys and public_keys must be objects")
            psks, private_keys, public_keys = parts
            access = max(
                (k for k in psks if k in GRANTABLE_LEVELS), key=level_rank, default=None
            )
            return _validated(d.get("share_id"), access, psks, private_keys, public_keys)
        except ValueError as e:
            raise ShareError("stored share keys are damaged: {}".format(e)) from None

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the keys to ``path`` atomically, readable by the owner only.

        Blocking (fsync): run it in a thread.
        """
        path = os.fspath(path)
        directory = os.path.dirname(path) or "."
        data = json.dumps(self.to_dict(), indent=1, sort_keys=True).encode("ascii")
        # mkstemp creates the file with mode 0600, so the secrets are never
        # readable by anyone else, not even between creation and rename.
        fd, temporary = tempfile.mkstemp(prefix=".keys.", suffix=".tmp", dir=directory)
        install_atomically(fd, temporary, path, data)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ShareKeys:
        """Read keys written by :meth:`save`; OSError if unreadable, ShareError if damaged."""
        path = os.fspath(path)
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            raw = f.read(1_000_000)
        if stat.S_IMODE(mode) & 0o077:
            _log.warn(
                "share keys file {path} is readable by other users; run chmod 600 on it",
                path=path,
            )
        try:
            d = json.loads(raw)
        except ValueError as e:
            raise ShareError("stored share keys in {} are not JSON: {}".format(path, e)) from None
        return cls.from_dict(d)


def generate_share_keys(rsa_bits: int = RSA_BITS) -> ShareKeys:
    """Make all keys of a brand-new share (we hold read_write).

    The share ID is SHA-256 of the read_write PSK's hex text, as the
    reference peer does.  Slow (RSA generation): run it in a thread.
    """
    psks = {level: secrets.token_hex(PSK_BYTES) for level in GRANTABLE_LEVELS}
    private_keys: dict[str, bytes] = {}
    public_keys: dict[str, bytes] = {}
    for level in RSA_LEVELS:
        key = rsa.generate_private_key(public_exponent=65537, key_size=rsa_bits)
        private_keys[level] = _private_pem(key)
        public_keys[level] = _public_pem(key.public_key())
    share_id = hashlib.sha256(psks["read_write"].encode("ascii")).hexdigest()
    return ShareKeys(share_id, psks, private_keys, public_keys)
