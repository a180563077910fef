"""TLS with a pre-shared key, as a Twisted connection creator.

pyOpenSSL has no PSK API, so this module installs OpenSSL's PSK callbacks
through the low-level binding that ``cryptography`` ships (the same ``ffi`` /
``lib`` objects pyOpenSSL itself uses).  It is the only module in the package
that touches that binding; everything else calls :func:`psk_server_creator`,
:func:`psk_client_creator` and the two ``negotiated_*`` helpers.

Design, and why:

- **One ``Context`` per connection.**  The key is known before the TLS
  handshake starts (it was chosen from ``start.id`` in the plaintext phase),
  so each connection gets a fresh context whose callbacks close over exactly
  that key.  No lookup from an ``SSL *`` back to a Python object is needed.
- **Callbacks live on the context object.**  ``SSL.Connection`` keeps a
  reference to its ``Context``; the ffi callbacks are attributes of that
  context, so they cannot be collected while OpenSSL may still call them
  (a collected callback crashes the process).  They are installed before the
  first ``SSL.Connection`` is made from the context, because ``SSL_new``
  copies them.
- **Forward secrecy only.**  TLS 1.2: (EC)DHE-PSK suites, never plain PSK or
  RSA-PSK; RFC 7919 ffdhe2048 parameters are loaded for the DHE suites.
  TLS 1.3: external PSK with OpenSSL's default ``psk_dhe_ke`` mode only
  (``SSL_OP_ALLOW_NO_DHE_KEX`` is never set), SHA-256 suites only because the
  PSK session's hash must match the negotiated suite.
- **The identity received is ignored.**  Peers send arbitrary identities (the
  reference client sends ``Bogus``); the key was already chosen.
- **Callback errors** are logged and make the callback return 0, which fails
  the handshake instead of losing the exception.
"""

from __future__ import annotations

from typing import Any, Callable

from OpenSSL import SSL
from OpenSSL._util import ffi, lib
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
)
from twisted.logger import Logger
from zope.interface import implementer

__all__ = [
    "TLS12_CIPHERS",
    "TLS13_SUITES",
    "PSKConnectionCreator",
    "psk_server_creator",
    "psk_client_creator",
    "negotiated_cipher",
    "negotiated_version",
    "negotiated_group",
]

_log = Logger()

#: TLS 1.2 suites we offer, best first.  All are (EC)DHE-PSK: forward secret.
TLS12_CIPHERS: tuple[str, ...] = (
    "ECDHE-PSK-CHACHA20-POLY1305",
    "DHE-PSK-AES256-GCM-SHA384",
    "DHE-PSK-AES128-GCM-SHA256",
    "DHE-PSK-CHACHA20-POLY1305",
    "DHE-PSK-AES128-CBC-SHA",
)

#: TLS 1.3 suites we offer.  SHA-256 only: the PSK session below names one
#: SHA-256 suite, and OpenSSL accepts the PSK only for suites with that hash.
TLS13_SUITES: tuple[str, ...] = (
    "TLS_AES_128_GCM_SHA256",
    "TLS_CHACHA20_POLY1305_SHA256",
)

_VERSIONS = {"TLSv1.2": SSL.TLS1_2_VERSION, "TLSv1.3": SSL.TLS1_3_VERSION}

# IANA code of TLS_AES_128_GCM_SHA256, the suite recorded in the TLS 1.3 PSK
# session (only its SHA-256 hash matters to OpenSSL).
_TLS13_PSK_SESSION_SUITE = b"\x13\x01"

# RFC 7919 ffdhe2048 group, PKCS#3 PEM, for the DHE-PSK suites of TLS 1.2.
_FFDHE2048_PEM = b"""-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
"""

# Longest PSK OpenSSL accepts from a callback (PSK_MAX_PSK_LEN).
_MAX_PSK = 512


def _callback_failed(exc_type: Any, exc_value: Any, tb: Any) -> int:
    """Log an exception raised inside an OpenSSL callback; fail the handshake."""
    _log.error(
        "TLS-PSK callback raised {kind}: {error}",
        kind=getattr(exc_type, "__name__", str(exc_type)),
        error=str(exc_value),
    )
    return 0


def _check_subset(chosen: tuple[str, ...] | None, allowed: tuple[str, ...], what: str) -> tuple[str, ...]:
    """Refuse any suite outside our forward-secret lists (tests may narrow, never widen)."""
    if chosen is None:
        return allowed
    chosen = tuple(chosen)
    unknown = [c for c in chosen if c not in allowed]
    if not chosen or unknown:
        raise ValueError("{} must be a non-empty subset of {}: got {}".format(what, allowed, chosen))
    return chosen


def _load_ffdhe2048(context: SSL.Context) -> None:
    """Give the context fixed RFC 7919 DH parameters for the DHE-PSK suites."""
    bio = lib.BIO_new_mem_buf(_FFDHE2048_PEM, len(_FFDHE2048_PEM))
    if bio == ffi.NULL:
        raise MemoryError("BIO_new_mem_buf failed")
    try:
        dh = lib.PEM_read_bio_DHparams(bio, ffi.NULL, ffi.NULL, ffi.NULL)
    finally:
        lib.BIO_free(bio)
    if dh == ffi.NULL:
        raise RuntimeError("cannot parse the built-in ffdhe2048 parameters")
    try:
        # OpenSSL takes its own reference; we release ours below.
        if lib.SSL_CTX_set_tmp_dh(context._context, dh) != 1:
            raise RuntimeError("SSL_CTX_set_tmp_dh refused the ffdhe2048 parameters")
    finally:
        lib.DH_free(dh)


def _new_tls13_session(ssl: Any, psk: bytes) -> Any:
    """A fresh SSL_SESSION carrying the external PSK (OpenSSL takes ownership)."""
    cipher = lib.SSL_CIPHER_find(ssl, _TLS13_PSK_SESSION_SUITE)
    if cipher == ffi.NULL:
        raise RuntimeError("TLS_AES_128_GCM_SHA256 unknown to this OpenSSL")
    session = lib.Cryptography_SSL_SESSION_new()
    if session == ffi.NULL:
        raise MemoryError("SSL_SESSION_new failed")
    ok = (
        lib.SSL_SESSION_set1_master_key(session, psk, len(psk)) == 1
        and lib.SSL_SESSION_set_cipher(session, cipher) == 1
        and lib.SSL_SESSION_set_protocol_version(session, lib.TLS1_3_VERSION) == 1
    )
    if not ok:
        lib.SSL_SESSION_free(session)
        raise RuntimeError("cannot build the TLS 1.3 PSK session")
    return session


class _PSKContext(SSL.Context):
    """A pyOpenSSL context that owns the ffi callbacks installed on it."""

    _psk_callbacks: list[Any]


@implementer(IOpenSSLServerConnectionCreator, IOpenSSLClientConnectionCreator)
class PSKConnectionCreator:
    """Makes one TLS-PSK ``SSL.Connection`` (with its own context) per call.

    Pass it to ``transport.startTLS``.  ``identity`` is what a client sends;
    a server ignores whatever identity it receives.  ``versions`` and
    ``tls12_ciphers`` may narrow the defaults (tests pin a version or a
    suite); they can never add anything outside the forward-secret lists.
    """

    def __init__(
        self,
        psk: bytes,
        identity: bytes = b"",
        *,
        versions: tuple[str, ...] = ("TLSv1.2", "TLSv1.3"),
        tls12_ciphers: tuple[str, ...] | None = None,
        tls13_suites: tuple[str, ...] | None = None,
    ) -> None:
        if not isinstance(psk, bytes) or not 1 <= len(psk) <= _MAX_PSK:
            raise ValueError("a PSK must be 1 to {} bytes".format(_MAX_PSK))
        if not isinstance(identity, bytes) or b"\0" in identity or len(identity) > 128:
            raise ValueError("a PSK identity must be at most 128 bytes without NUL")
        unknown_versions = [v for v in versions if v not in _VERSIONS]
        if not versions or unknown_versions:
            raise ValueError("versions must be a non-empty subset of {}".format(tuple(_VERSIONS)))
        self._psk = psk
        self._identity = identity
        self._versions = tuple(sorted(versions))
        self._tls12 = _check_subset(tls12_ciphers, TLS12_CIPHERS, "tls12_ciphers")
        self._tls13 = _check_subset(tls13_suites, TLS13_SUITES, "tls13_suites")

    def __repr__(self) -> str:  # never show the key
        return "<PSKConnectionCreator versions={}>".format(self._versions)

    # -- IOpenSSL*ConnectionCreator ------------------------------------------

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        """A server-side connection with its own context and key."""
        return SSL.Connection(self._context(server=True), None)

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        """A client-side connection with its own context and key."""
        return SSL.Connection(self._context(server=False), None)

    # -- context construction --------------------------------------------------

    def _context(self, server: bool) -> _PSKContext:
        context = _PSKContext(SSL.TLS_METHOD)
        context.set_min_proto_version(_VERSIONS[self._versions[0]])
        context.set_max_proto_version(_VERSIONS[self._versions[-1]])
        context.set_options(
            SSL.OP_NO_COMPRESSION
            | SSL.OP_NO_TICKET
            | SSL.OP_CIPHER_SERVER_PREFERENCE
            | lib.SSL_OP_NO_RENEGOTIATION
        )
        context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
        context.set_verify(SSL.VERIFY_NONE)
        context.set_cipher_list(":".join(self._tls12).encode("ascii"))
        # Through the binding: pyOpenSSL gained set_tls13_ciphersuites only in 25.1.
        suites = ":".join(self._tls13).encode("ascii")
        if lib.SSL_CTX_set_ciphersuites(context._context, suites) != 1:
            raise RuntimeError("OpenSSL refused the TLS 1.3 suites {}".format(self._tls13))
        if server:
            _load_ffdhe2048(context)
            callbacks = self._server_callbacks()
            lib.SSL_CTX_set_psk_server_callback(context._context, callbacks[0])
            lib.SSL_CTX_set_psk_find_session_callback(context._context, callbacks[1])
        else:
            callbacks = self._client_callbacks()
            lib.SSL_CTX_set_psk_client_callback(context._context, callbacks[0])
            lib.SSL_CTX_set_psk_use_session_callback(context._context, callbacks[1])
        # Keep the callbacks exactly as long as the context (and thus every
        # SSL.Connection made from it, which references the context).
        context._psk_callbacks = callbacks
        return context

    def _server_callbacks(self) -> list[Any]:
        psk = self._psk

        def tls12_server(ssl: Any, identity: Any, out: Any, max_len: int) -> int:
            # The identity received is deliberately ignored (see module doc).
            if len(psk) > max_len:
                return 0
            ffi.memmove(out, psk, len(psk))
            return len(psk)

        def tls13_find_session(ssl: Any, identity: Any, identity_len: int, session_out: Any) -> int:
            session_out[0] = _new_tls13_session(ssl, psk)
            return 1

        return [
            _ffi_callback("unsigned int(*)(SSL *, char *, unsigned char *, unsigned int)", tls12_server),
            _ffi_callback("int(*)(SSL *, unsigned char *, size_t, SSL_SESSION **)", tls13_find_session),
        ]

    def _client_callbacks(self) -> list[Any]:
        psk = self._psk
        identity = self._identity
        # OpenSSL copies the identity, but keep the buffer alive with the
        # callbacks anyway: it costs nothing and survives a changed OpenSSL.
        identity_buffer = ffi.new("unsigned char[]", identity + b"\0")

        def tls12_client(ssl: Any, hint: Any, identity_out: Any, max_identity: int, psk_out: Any, max_psk: int) -> int:
            if len(identity) > max_identity or len(psk) > max_psk:
                return 0
            ffi.memmove(identity_out, identity + b"\0", len(identity) + 1)
            ffi.memmove(psk_out, psk, len(psk))
            return len(psk)

        def tls13_use_session(ssl: Any, md: Any, id_out: Any, id_len_out: Any, session_out: Any) -> int:
            # Called again after a HelloRetryRequest: always a fresh session.
            session_out[0] = _new_tls13_session(ssl, psk)
            id_out[0] = identity_buffer
            id_len_out[0] = len(identity)
            return 1

        return [
            _ffi_callback(
                "unsigned int(*)(SSL *, char *, char *, unsigned int, unsigned char *, unsigned int)",
                tls12_client,
            ),
            _ffi_callback("int(*)(SSL *, EVP_MD *, unsigned char **, size_t *, SSL_SESSION **)", tls13_use_session),
            identity_buffer,
        ]


def _ffi_callback(signature: str, function: Callable[..., int]) -> Any:
    """Wrap ``function`` for OpenSSL; an exception logs and returns 0."""
    return ffi.callback(signature, function, onerror=_callback_failed)


def psk_server_creator(psk: bytes, **options: Any) -> PSKConnectionCreator:
    """Connection creator for the side that accepted the TCP connection."""
    return PSKConnectionCreator(psk, b"", **options)


def psk_client_creator(psk: bytes, identity: bytes, **options: Any) -> PSKConnectionCreator:
    """Connection creator for the connecting side; ``identity`` is sent as is."""
    return PSKConnectionCreator(psk, identity, **options)


def _handle(transport: Any) -> SSL.Connection | None:
    get_handle = getattr(transport, "getHandle", None)
    handle = get_handle() if get_handle is not None else None
    return handle if isinstance(handle, SSL.Connection) else None


def negotiated_cipher(transport: Any) -> str:
    """OpenSSL's name of the suite in use on ``transport`` ('' before TLS)."""
    handle = _handle(transport)
    name = handle.get_cipher_name() if handle is not None else None
    return name or ""


def negotiated_version(transport: Any) -> str:
    """'TLSv1.2' or 'TLSv1.3' once TLS is up on ``transport`` ('' before)."""
    handle = _handle(transport)
    if handle is None or handle.get_cipher_name() is None:
        return ""
    return handle.get_protocol_version_name()


def negotiated_group(transport: Any) -> str | None:
    """The (EC)DH group of the key exchange ('' if none, e.g. pure PSK).

    None when this pyOpenSSL cannot tell (``get_group_name`` arrived in 25.1).
    """
    handle = _handle(transport)
    if handle is None:
        return ""
    get_group_name = getattr(handle, "get_group_name", None)
    if get_group_name is None:
        return None
    return get_group_name() or ""
