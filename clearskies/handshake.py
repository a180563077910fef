"""The connection handshake as a pure state machine (``protocol/handshake.md``).

No sockets, no reactor, no ``time.time()``: the adapter in ``peer.py`` feeds
received message bodies and the current time in, and carries out the
*actions* that come back, in order:

- :class:`Send` — write one message;
- :class:`StartTLS` — switch the connection to TLS with this pre-shared key
  (the adapter knows which TLS role it plays: the side that accepted the TCP
  connection is the TLS server);
- :class:`AwaitShare` — the seam is creating a share from received keys; stop
  feeding messages until the Deferred fires, then call :meth:`Handshake.share_created`;
- :class:`Close` — close the connection (``quiet`` for a loopback);
- :class:`Done` — the handshake succeeded; later messages belong to a session.

Anything a peer sends that the handshake does not allow raises
:class:`~clearskies.errors.HandshakeError` with a reason fit for the log.

Who does what (protocol/handshake.md): the server greets; the client answers ``start``
naming a share ID or an access ID; the server answers ``cannot_start`` or
``starttls`` with the negotiated level; both switch to TLS; inside TLS both
send ``identity``.  When the level is ``unknown`` (one side holds only an
access code) the side holding the share sends ``keys`` first, the other side
creates the share and acknowledges, and only then do both send ``identity``.
"""

from __future__ import annotations

import base64
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger

from clearskies import SOFTWARE
import hmac

from clearskies.accesscode import (
    DEAD_CODE_REASONS,
    DEAD_CODE_TEXT,
    PROVEN_REASONS,
    AccessCode,
    refusal_proof,
)
from clearskies.accesscode import access_id as _access_id
from clearskies.errors import CannotStart, ClearSkiesError, HandshakeError
from clearskies.keys import GRANTABLE_LEVELS, LEVELS, ShareKeys, greatest_common_access, level_rank

__all__ = [
    "PROTOCOL_VERSION", "IDENTITY_PREFIX", "WARN_SKEW", "MAX_SKEW",
    "KeyRing", "ConnectTarget", "Established", "MemoryKeyRing",
    "Send", "StartTLS", "AwaitShare", "Close", "Done", "Action",
    "Handshake", "psk_identity",
]

_log = Logger()

PROTOCOL_VERSION = 1
IDENTITY_PREFIX = b"clearskies:1:"
WARN_SKEW = 60.0
"""Clock difference (seconds) above which we warn."""
MAX_SKEW = 600.0
"""Clock difference (seconds) above which we refuse the connection."""

_ID_RE = re.compile(r"[0-9a-f]{64}")
_PEER_RE = re.compile(r"[0-9a-f]{32}")
_MAX_TEXT = 256  # software, name, feature strings
ESCROW_FEATURE = "code_escrow"
"""The feature string of code escrow (protocol/untrusted.md, section 8)."""
_MAX_FEATURES = 64


# -- seams and results ---------------------------------------------------------


@dataclass(eq=False, repr=False)
class ConnectTarget:
    """What an outgoing connection (or a pending join) wants.

    Three shapes, made by the class methods:

    - :meth:`share`: we hold the share's keys and connect as a member;
    - :meth:`join`: we were given an access code and want the share's keys;
    - :meth:`offer`: we created an access code and connect to the peer that
      holds it, to hand over the keys of ``grant`` level.

    ``note`` is the daemon's own data (for example where to create the
    share); the handshake never looks at it.
    """

    id: str
    peer_id: str
    keys: ShareKeys | None = None
    code: bytes | None = None
    grant: str | None = None
    note: Any = None
    #: For a ``join``: the code's escrow (``escrow`` in protocol/untrusted.md, section 8),
    #: tried when the peer lists its feature; None to use only the code.
    escrow: EscrowKey | None = None

    def __repr__(self) -> str:  # the code is a secret
        return "ConnectTarget(id={!r}, peer_id={!r}, kind={!r})".format(
            self.id, self.peer_id, self.kind
        )

    @classmethod
    def share(cls, keys: ShareKeys, peer_id: str, note: Any = None) -> ConnectTarget:
        """Connect as a member of a share we hold."""
        return cls(keys.share_id, peer_id, keys=keys, note=note)

    @classmethod
    def join(cls, code: bytes, peer_id: str, note: Any = None) -> ConnectTarget:
        """Use an access code we were given; ``peer_id`` is our ID in the new share."""
        return cls(_access_id(code), peer_id, code=code, note=note)

    @classmethod
    def offer(cls, code: AccessCode, keys: ShareKeys, peer_id: str, note: Any = None) -> ConnectTarget:
        """Reach the holder of a code we created, to give them the keys."""
        if code.share_id != keys.share_id:
            raise ValueError("the access code belongs to another share")
        return cls(code.access_id, peer_id, keys=keys, code=code.code, grant=code.level, note=note)

    @property
    def kind(self) -> str:
        """'share', 'join' or 'offer'."""
        if self.code is None:
            return "share"
        return "join" if self.keys is None else "offer"


class EscrowKey(Protocol):
    """What an access code derives for code escrow (protocol/untrusted.md, section 8)."""

    feature: str
    lookup: str
    psk: bytes

    def open(self, text: bytes, signature: bytes) -> ShareKeys:
        """The keys an escrow entry seals for this code; an error if it does not open."""


class KeyRing(Protocol):
    """What the handshake needs to know from the daemon (both roles).

    Lookups are synchronous: they run while the peer waits for ``starttls``.
    """

    def share_keys(self, share_id: str) -> ShareKeys | None:
        """The keys of a share we hold, or None."""

    def peer_id(self, share_id: str) -> str:
        """Our peer ID in a share we hold."""

    def live_code(self, access_id: str) -> AccessCode | None:
        """A code we created that may still be used, or None."""

    def pending_join(self, access_id: str) -> ConnectTarget | None:
        """A code we were given and have not used yet (as a ``join`` target), or None."""

    def dead_code(self, access_id: str) -> tuple[str, bytes] | None:
        """Why a code we created can no longer be used (``expired``, ``used``,
        ``cancelled``) and the code, or None if we know no such dead code.
        Optional: a keyring without it answers ``unknown`` for every ID it does not hold."""

    def code_used(self, access_id: str) -> None:
        """The peer acknowledged the keys we gave for this code (spend single-use codes)."""

    def escrow_entry(self, lookup: str) -> Any | None:
        """An escrow entry we keep for ``lookup`` (with ``share_id``, ``psk``, ``text``,
        ``signature``), or None, also when too many were asked for lately.  Optional:
        a keyring without it keeps no escrow (protocol/untrusted.md, section 8)."""

    def create_share_from_keys(self, keys: ShareKeys, target: ConnectTarget) -> Deferred | None:
        """Store keys received for ``target`` and create the share; a Deferred if slow."""


@dataclass(frozen=True, repr=False)
class Established:
    """The outcome of a successful handshake, handed to the session."""

    share_id: str
    access: str
    """Level of the connection: the negotiated level, or the level granted by the key exchange."""
    keys: ShareKeys
    """Our keys for the share (for a new member: the keys just received)."""
    our_peer_id: str
    their_peer_id: str
    their_name: str
    their_software: str
    features: tuple[str, ...]
    """Features both sides listed, sorted."""
    clock_skew: float
    """Their clock minus ours, in seconds."""
    we_are_server: bool
    access_id: str | None = None
    """The access code's ID when this connection exchanged keys for a code."""

    def __repr__(self) -> str:
        return (
            "Established(share_id={!r}, access={!r}, our_peer_id={!r}, their_peer_id={!r}, "
            "their_name={!r}, we_are_server={!r})".format(
                self.share_id, self.access, self.our_peer_id, self.their_peer_id,
                self.their_name, self.we_are_server,
            )
        )


# -- actions ---------------------------------------------------------------------


@dataclass(frozen=True)
class Send:
    """Write this message."""

    body: dict[str, Any]


@dataclass(frozen=True)
class StartTLS:
    """Switch to TLS now, keyed with ``psk``; a TLS client sends ``identity``."""

    psk: bytes = field(repr=False)
    identity: bytes
    features: tuple[str, ...] = ()
    """The features both sides listed: some (``gzip``) change the framing inside TLS."""


@dataclass(frozen=True)
class AwaitShare:
    """Hold further input until ``result`` fires, then call ``share_created``."""

    result: Deferred


@dataclass(frozen=True)
class Close:
    """Close the connection; ``quiet`` means nothing went wrong (loopback)."""

    reason: str
    quiet: bool = False


@dataclass(frozen=True)
class Done:
    """The handshake is complete."""

    established: Established


Action = Send | StartTLS | AwaitShare | Close | Done


def psk_identity(start_id: str) -> bytes:
    """The PSK identity we send for a connection whose ``start.id`` is ``start_id``."""
    return IDENTITY_PREFIX + start_id.encode("ascii")


# -- a reference KeyRing -----------------------------------------------------------


class MemoryKeyRing:
    """A KeyRing kept in dictionaries: for tests, and as the reference behaviour.

    ``create_share_from_keys`` records the keys and makes the share known
    at once (with the target's peer ID); ``delay_creation`` makes it return
    an unfired Deferred instead, which the caller fires.
    """

    def __init__(self, now: Callable[[], float] | None = None) -> None:
        self.shares: dict[str, ShareKeys] = {}
        self.peer_ids: dict[str, str] = {}
        self.codes: dict[str, AccessCode] = {}
        self.joins: dict[str, ConnectTarget] = {}
        self.created: list[tuple[ShareKeys, ConnectTarget]] = []
        self.used: list[str] = []
        self.delay_creation = False
        self.pending: list[Deferred] = []
        self._now = now if now is not None else (lambda: 0.0)

    def add_share(self, keys: ShareKeys, peer_id: str) -> None:
        self.shares[keys.share_id] = keys
        self.peer_ids[keys.share_id] = peer_id

    def add_code(self, code: AccessCode) -> None:
        self.codes[code.access_id] = code

    def add_join(self, target: ConnectTarget) -> None:
        self.joins[target.id] = target

    def share_keys(self, share_id: str) -> ShareKeys | None:
        return self.shares.get(share_id)

    def peer_id(self, share_id: str) -> str:
        return self.peer_ids[share_id]

    def live_code(self, access_id: str) -> AccessCode | None:
        code = self.codes.get(access_id)
        return code if code is not None and code.is_live(self._now()) else None

    def pending_join(self, access_id: str) -> ConnectTarget | None:
        return self.joins.get(access_id)

    def dead_code(self, access_id: str) -> tuple[str, bytes] | None:
        code = self.codes.get(access_id)
        reason = code.dead_reason(self._now()) if code is not None else None
        return (reason, code.code) if reason is not None else None

    def code_used(self, access_id: str) -> None:
        self.used.append(access_id)
        code = self.codes.get(access_id)
        if code is not None:
            code.used = True

    def create_share_from_keys(self, keys: ShareKeys, target: ConnectTarget) -> Deferred | None:
        self.created.append((keys, target))
        self.joins.pop(target.id, None)
        self.add_share(keys, target.peer_id)
        if self.delay_creation:
            d: Deferred = Deferred()
            self.pending.append(d)
            return d
        return None


# -- message checks -----------------------------------------------------------------


def _text(body: dict[str, Any], key: str, what: str, default: str | None = None) -> str:
    value = body.get(key, default)
    if not isinstance(value, str) or len(value) > _MAX_TEXT:
        raise HandshakeError("{}: '{}' must be a string of at most {} characters".format(
            what, key, _MAX_TEXT))
    return value


def _features(body: dict[str, Any], what: str) -> list[str]:
    value = body.get("features", [])
    if (
        not isinstance(value, list)
        or len(value) > _MAX_FEATURES
        or not all(isinstance(f, str) and len(f) <= _MAX_TEXT for f in value)
    ):
        raise HandshakeError("{}: 'features' must be a list of short strings".format(what))
    return value


def _peer(body: dict[str, Any], what: str) -> str:
    value = body.get("peer")
    if not isinstance(value, str) or not _PEER_RE.fullmatch(value):
        raise HandshakeError("{}: 'peer' must be a peer ID of 32 lowercase hex digits".format(what))
    return value


def _level(body: dict[str, Any], what: str) -> str:
    value = body.get("access")
    if value not in LEVELS:
        raise HandshakeError("{}: 'access' must be one of {}, not {!r}".format(
            what, ", ".join(LEVELS), value))
    return value


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# -- the machine -----------------------------------------------------------------------

# States.  Inside TLS, ``identity`` from the peer is accepted in every state
# before ESTABLISHED; the others say what we are waiting for besides it.
AWAIT_GREETING = "awaiting greeting"      # client
AWAIT_START = "awaiting start"            # server
AWAIT_STARTTLS = "awaiting starttls"      # client
AWAIT_KEYS = "awaiting keys"              # code holder, inside TLS
CREATING_SHARE = "creating share"         # code holder, the seam is working
AWAIT_ACK = "awaiting keys_acknowledgment"  # share holder that sent keys
AWAIT_IDENTITY = "awaiting identity"      # only the peer's identity is missing
ESTABLISHED = "established"
CLOSED = "closed"


class Handshake:
    """One side of one connection's handshake.  Make it with :meth:`server` or :meth:`client`."""

    def __init__(
        self,
        we_are_server: bool,
        keyring: KeyRing,
        name: str,
        target: ConnectTarget | None,
        software: str,
        features: Sequence[str],
    ) -> None:
        self._server = we_are_server
        self._keyring = keyring
        self._name = name
        self._target = target
        self._software = software
        self._our_features = list(dict.fromkeys(features))
        self.state = AWAIT_START if we_are_server else AWAIT_GREETING
        self.established: Established | None = None
        # Filled in as the handshake goes on.
        self._features: tuple[str, ...] = ()
        self._start_id = ""
        self._their_software = ""
        self._their_peer = ""
        self._our_peer = ""
        self._level = ""
        self._keys: ShareKeys | None = None
        self._grant: str | None = None        # we give keys of this level
        self._join: ConnectTarget | None = None  # we receive keys for this target
        self._access_id: str | None = None
        self._their_name: str | None = None
        self._skew = 0.0
        self._refusal: dict[str, str] = {}  # what our cannot_start adds (reason, proof)
        self._escrow: Any = None  # the escrow entry we hand over (server)
        self._escrow_join = False  # we asked for an escrow entry and the peer has it

    @classmethod
    def server(
        cls, keyring: KeyRing, name: str, *, software: str = SOFTWARE, features: Sequence[str] = ()
    ) -> Handshake:
        """The side that accepted the connection."""
        return cls(True, keyring, name, None, software, features)

    @classmethod
    def client(
        cls,
        keyring: KeyRing,
        target: ConnectTarget,
        name: str,
        *,
        software: str = SOFTWARE,
        features: Sequence[str] = (),
    ) -> Handshake:
        """The side that connected, wanting ``target``."""
        if target.kind == "offer" and target.grant not in GRANTABLE_LEVELS:
            raise ValueError("an offer target needs the code's level in 'grant'")
        return cls(False, keyring, name, target, software, features)

    # -- inputs ----------------------------------------------------------------------

    def begin(self, now: float) -> list[Action]:
        """The connection is up: the server greets, the client waits."""
        if not self._server:
            return []
        return [Send({
            "type": "greeting",
            "software": self._software,
            "protocol": [PROTOCOL_VERSION],
            "features": list(self._our_features),
        })]

    def receive(self, body: dict[str, Any], now: float) -> list[Action]:
        """One message from the peer; HandshakeError if it is not allowed now."""
        kind = body.get("type")
        if kind == "ping":
            return []  # harmless keep-alive at any point
        handler = {
            AWAIT_GREETING: {"greeting": self._got_greeting},
            AWAIT_START: {"start": self._got_start},
            AWAIT_STARTTLS: {"starttls": self._got_starttls, "cannot_start": self._got_cannot_start},
            AWAIT_KEYS: {"keys": self._got_keys, "escrow": self._got_escrow,
                         "identity": self._got_identity},
            CREATING_SHARE: {"identity": self._got_identity},
            AWAIT_ACK: {"keys_acknowledgment": self._got_ack, "identity": self._got_identity},
            AWAIT_IDENTITY: {"identity": self._got_identity},
        }.get(self.state, {}).get(kind)
        if handler is None:
            raise HandshakeError("unexpected {!r} message while {}".format(kind, self.state))
        return handler(body, now)

    def share_created(self, now: float) -> list[Action]:
        """The seam finished creating the share from the keys we received."""
        if self.state != CREATING_SHARE:
            raise RuntimeError("share_created() while {}".format(self.state))
        return self._after_exchange(
            [Send({"type": "keys_acknowledgment"})] + self._send_identity(now), now
        )

    # -- plaintext phase ----------------------------------------------------------------

    def _got_greeting(self, body: dict[str, Any], now: float) -> list[Action]:
        versions = body.get("protocol")
        if not isinstance(versions, list) or not all(_is_int(v) for v in versions):
            raise HandshakeError("greeting: 'protocol' must be a list of integers")
        if PROTOCOL_VERSION not in versions:
            raise HandshakeError("greeting: the peer speaks protocol {} but not {}".format(
                versions, PROTOCOL_VERSION))
        self._their_software = _text(body, "software", "greeting", "")
        theirs = set(_features(body, "greeting"))
        self._features = tuple(sorted(set(self._our_features) & theirs))
        target = self._target
        assert target is not None
        self._start_id = target.id
        self._our_peer = target.peer_id
        access = "unknown" if target.keys is None else target.keys.access
        self.state = AWAIT_STARTTLS
        start = {
            "type": "start",
            "software": self._software,
            "protocol": PROTOCOL_VERSION,
            "features": list(self._features),
            "id": target.id,
            "access": access,
            "peer": target.peer_id,
        }
        if target.kind == "join" and target.escrow is not None \
                and target.escrow.feature in self._features:
            start["escrow"] = target.escrow.lookup  # (protocol/untrusted.md, section 8)
        return [Send(start)]

    def _got_start(self, body: dict[str, Any], now: float) -> list[Action]:
        version = body.get("protocol")
        if not _is_int(version) or version != PROTOCOL_VERSION:
            raise HandshakeError("start: 'protocol' must be {}, not {!r}".format(
                PROTOCOL_VERSION, version))
        self._their_software = _text(body, "software", "start", "")
        wanted = set(_features(body, "start"))
        self._features = tuple(sorted(set(self._our_features) & wanted))
        start_id = body.get("id")
        if not isinstance(start_id, str) or not _ID_RE.fullmatch(start_id):
            raise HandshakeError("start: 'id' must be 64 lowercase hex digits")
        their_access = _level(body, "start")
        their_peer = _peer(body, "start")
        self._start_id = start_id
        self._their_peer = their_peer

        psk = self._choose_server_key(start_id, their_access, now)
        if psk is None and their_access == "unknown":
            psk = self._choose_escrow(body.get("escrow"))
        if psk is None:
            self.state = CLOSED
            reason = self._refusal.get("reason")
            return [
                Send(dict({"type": "cannot_start"}, **self._refusal)),
                Close("cannot start: no share or usable access code for ID {}{}".format(
                    start_id, "" if reason is None else " (%s)" % reason)),
            ]
        if their_peer == self._our_peer:
            self.state = CLOSED
            return [Close("loopback: the peer is ourselves", quiet=True)]
        starttls = {"type": "starttls", "peer": self._our_peer, "access": self._level}
        if self._escrow is not None:
            starttls["escrow"] = True
        actions: list[Action] = [
            Send(starttls),
            StartTLS(psk, psk_identity(self._escrow.lookup if self._escrow is not None
                                       else start_id), self._features),
        ]
        return actions + self._enter_tls(now)

    def _choose_server_key(self, start_id: str, their_access: str, now: float) -> bytes | None:
        """Decide level, roles and key from ``start``; None means cannot_start."""
        keyring = self._keyring
        keys = keyring.share_keys(start_id)
        if keys is not None:
            if their_access == "unknown":
                _log.info("cannot_start: a peer without keys asked for share {share}", share=start_id)
                return None
            self._keys = keys
            self._level = greatest_common_access(keys.access, their_access)
            self._our_peer = keyring.peer_id(start_id)
            return keys.psk(self._level)
        code = keyring.live_code(start_id)
        if code is not None and code.is_live(now):
            if their_access != "unknown":
                _log.info("cannot_start: peer already holds keys but used access code {id}",
                          id=start_id)
                return None
            keys = keyring.share_keys(code.share_id)
            if keys is None or level_rank(code.level) > level_rank(keys.access):
                _log.warn("access code {id} refers to keys we do not hold", id=start_id)
                return None
            self._keys = keys
            self._level = "unknown"
            self._grant = code.level
            self._access_id = start_id
            self._our_peer = keyring.peer_id(code.share_id)
            return code.code
        join = keyring.pending_join(start_id)
        if join is not None and join.code is not None:
            if their_access == "unknown":
                _log.info("cannot_start: neither side holds the share for access code {id}",
                          id=start_id)
                return None
            self._join = join
            self._level = "unknown"
            self._access_id = start_id
            self._our_peer = join.peer_id
            return join.code
        # Nothing here for this ID.  Only a code we made and that is dead gets a
        # more precise reason: naming it takes its access ID, which only its holder
        # (or whoever saw it announced while it was live) can know.
        # Those reasons carry a proof that we made the code, so that nobody else can
        # end an attach by answering in our place (protocol/handshake.md).
        dead = getattr(keyring, "dead_code", None)
        found = dead(start_id) if dead is not None else None
        if found is not None and found[0] in PROVEN_REASONS:
            reason, code = found
            self._refusal = {"reason": reason,
                             "proof": refusal_proof(code, reason, self._their_peer)}
        else:
            self._refusal = {"reason": "unknown"}
        return None

    def _choose_escrow(self, lookup: object) -> bytes | None:
        """The escrow key for ``start.escrow``, if we keep that entry (protocol/untrusted.md,
        section 8); None leaves the refusal as it was."""
        find = getattr(self._keyring, "escrow_entry", None)
        if find is None or not isinstance(lookup, str) or not _ID_RE.fullmatch(lookup) \
                or ESCROW_FEATURE not in self._features:
            return None
        entry = find(lookup)
        if entry is None:
            return None
        keys = self._keyring.share_keys(entry.share_id)
        if keys is None:
            return None
        self._escrow = entry
        self._keys = keys
        self._level = "unknown"
        self._our_peer = self._keyring.peer_id(entry.share_id)
        self._refusal = {}
        return bytes(entry.psk)

    def _got_cannot_start(self, body: dict[str, Any], now: float) -> list[Action]:
        self.state = CLOSED
        reason = body.get("reason")
        if reason not in DEAD_CODE_REASONS:
            reason = None  # none given (older peers), or one we do not know: no conclusion
        proven = False
        target = self._target
        proof = body.get("proof")
        if reason in PROVEN_REASONS and target is not None and target.code is not None \
                and isinstance(proof, str):
            proven = hmac.compare_digest(
                proof.encode("ascii", "replace"),
                refusal_proof(target.code, reason, target.peer_id).encode("ascii"))
        raise CannotStart("the peer cannot start a connection for ID {}{}{}".format(
            self._start_id, "" if reason is None else ": " + DEAD_CODE_TEXT[reason],
            "" if proven or reason not in PROVEN_REASONS else " (unproven)"), reason, proven)

    def _got_starttls(self, body: dict[str, Any], now: float) -> list[Action]:
        level = _level(body, "starttls")
        their_peer = _peer(body, "starttls")
        target = self._target
        assert target is not None
        if their_peer == target.peer_id:
            self.state = CLOSED
            return [Close("loopback: the peer is ourselves", quiet=True)]
        self._their_peer = their_peer
        self._level = level
        if target.kind == "share":
            assert target.keys is not None
            if level not in target.keys.psks:
                raise HandshakeError("starttls: level {!r} is not one we hold".format(level))
            self._keys = target.keys
            psk = target.keys.psk(level)
        else:
            if level != "unknown":
                raise HandshakeError(
                    "starttls: level {!r} for an access code (expected 'unknown')".format(level))
            assert target.code is not None
            psk = target.code
            identity = psk_identity(target.id)
            self._access_id = target.id
            if body.get("escrow") is True:
                # The peer keeps the code's escrow entry, not the code.
                if target.kind != "join" or target.escrow is None \
                        or target.escrow.feature not in self._features:
                    raise HandshakeError("starttls: an escrow we did not ask for")
                psk, identity = target.escrow.psk, psk_identity(target.escrow.lookup)
                self._escrow_join = True
            if target.kind == "offer":
                self._keys = target.keys
                self._grant = target.grant
            else:
                self._join = target
            return [StartTLS(psk, identity, self._features)] + self._enter_tls(now)
        return [StartTLS(psk, psk_identity(target.id), self._features)] + self._enter_tls(now)

    # -- inside TLS ---------------------------------------------------------------------

    def _enter_tls(self, now: float) -> list[Action]:
        """First messages after the switch to TLS, by role."""
        if self._escrow is not None:
            self.state = AWAIT_ACK
            return [Send({"type": "escrow", "entry": self._escrow.text.decode("utf-8"),
                          "signature": base64.b64encode(self._escrow.signature).decode("ascii")})]
        if self._grant is not None:
            assert self._keys is not None
            self.state = AWAIT_ACK
            return [Send(self._keys.keys_message(self._grant))]
        if self._join is not None:
            self.state = AWAIT_KEYS
            return []
        self.state = AWAIT_IDENTITY
        return self._send_identity(now)

    def _send_identity(self, now: float) -> list[Action]:
        return [Send({"type": "identity", "name": self._name, "time": int(now)})]

    def _got_identity(self, body: dict[str, Any], now: float) -> list[Action]:
        if self._their_name is not None:
            raise HandshakeError("identity: sent twice")
        name = _text(body, "name", "identity")
        their_time = body.get("time")
        if (
            isinstance(their_time, bool)
            or not isinstance(their_time, (int, float))
            or not math.isfinite(their_time)
        ):
            raise HandshakeError("identity: 'time' must be a number of unix seconds")
        skew = float(their_time) - now
        if abs(skew) > MAX_SKEW:
            raise HandshakeError(
                "clocks differ by {:.0f} s (more than {:.0f} s); fix the clock of one machine"
                .format(skew, MAX_SKEW))
        if abs(skew) > WARN_SKEW:
            _log.warn("clock of peer {name} differs from ours by {skew:.0f} s",
                      name=name, skew=skew)
        self._their_name = name
        self._skew = skew
        if self.state == AWAIT_IDENTITY:
            return self._finish()
        return []

    def _got_escrow(self, body: dict[str, Any], now: float) -> list[Action]:
        target = self._join
        if not self._escrow_join or target is None or target.escrow is None:
            raise HandshakeError("escrow: an entry we did not ask for")
        entry, signature = body.get("entry"), body.get("signature")
        try:
            if not isinstance(entry, str) or not isinstance(signature, str):
                raise ValueError("the entry and its signature must be strings")
            keys = target.escrow.open(entry.encode("utf-8"),
                                      base64.b64decode(signature.encode("ascii"), validate=True))
        except (ValueError, ClearSkiesError) as e:
            raise HandshakeError("escrow: the entry does not open: %s" % e) from None
        return self._got_keys(keys, now)

    def _got_keys(self, body: dict[str, Any] | ShareKeys, now: float) -> list[Action]:
        if self._escrow_join and not isinstance(body, ShareKeys):
            raise HandshakeError("keys: an escrow connection hands over an entry, not keys")
        keys = body if isinstance(body, ShareKeys) else ShareKeys.from_keys_message(body)
        target = self._join
        assert target is not None
        self._keys = keys
        # Over an escrow the peer is untrusted: the connection goes on at that level.
        self._level = "untrusted" if self._escrow_join else keys.access
        self._our_peer = target.peer_id
        self.state = CREATING_SHARE
        try:
            result = self._keyring.create_share_from_keys(keys, target)
        except Exception:
            # The daemon could not create the share (path taken, disk full, ...):
            # report it through the same path as a slow creation that failed.
            return [AwaitShare(fail())]
        if isinstance(result, Deferred):
            return [AwaitShare(result)]
        return self.share_created(now)

    def _got_ack(self, body: dict[str, Any], now: float) -> list[Action]:
        if self._escrow is not None:
            self._level = "untrusted"
            return self._after_exchange(self._send_identity(now), now)
        assert self._access_id is not None and self._grant is not None
        self._keyring.code_used(self._access_id)
        self._level = self._grant
        return self._after_exchange(self._send_identity(now), now)

    def _after_exchange(self, actions: list[Action], now: float) -> list[Action]:
        if self._their_name is not None:
            return actions + self._finish()
        self.state = AWAIT_IDENTITY
        return actions

    def _finish(self) -> list[Action]:
        assert self._keys is not None and self._their_name is not None
        self.state = ESTABLISHED
        self.established = Established(
            share_id=self._keys.share_id,
            access=self._level,
            keys=self._keys,
            our_peer_id=self._our_peer,
            their_peer_id=self._their_peer,
            their_name=self._their_name,
            their_software=self._their_software,
            features=self._features,
            clock_skew=self._skew,
            we_are_server=self._server,
            access_id=self._access_id,
        )
        return [Done(self.established)]
