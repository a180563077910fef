"""Read-only shares (protocol/readonly.md): the per-share signing face, and the comparison.

:class:`ShareSigning` signs what a read_write share sends to less trusted
peers, judges the metadata a share receives, and answers for a read-only
share from its store of signed messages (``clearskies.sync.signed``).  It
never writes to a connection: every method that has something to send
returns the wire bytes, and the session sends them.  :func:`compare_with_share`
says where a read-only share's files differ from the share's version.
"""

from __future__ import annotations

import base64
import binascii
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from twisted.logger import Logger

from clearskies import wire
from clearskies.errors import ProtocolError
from clearskies.share.records import FileRecord
from clearskies.sync.signed import (
    FEATURE, MANIFEST, READ_WRITE, RO_MANIFEST, Change, SignedMessage, SignedStore,
    bitmask_selects, held, held_bitmask, metadata_verdict, missing_paths, relays_only, sign_body,
    signs_for, split_source_text, unshared_paths, verify,
)

MAX_SOURCE_BYTES = 4 * 1024 * 1024
"""Sources put in one ``read_only_manifest.manifest`` before another message is started."""

MAX_SOURCES = 64
RESEND_DELAY = 0.5
"""Seconds to gather downloads before announcing a fuller bitmask again."""


# -- the sync layer's view ---------------------------------------------------------------


@dataclass
class _RelayState:
    """What one connection already holds of our signed messages."""

    sent: set[bytes] = field(default_factory=set)
    # The bitmask last sent for each manifest page (by signature), extension
    # read_only_manifest: a page goes out again only when we hold more of it.
    masks: dict[bytes, bytes] = field(default_factory=dict)


class Relayed(NamedTuple):
    """What :meth:`ShareSigning.relay` has for one connection."""

    messages: list[bytes]
    """Signed messages to send now, verbatim."""
    announce_held: bool
    """Files of a stored manifest arrived: announce a fuller bitmask soon
    (:meth:`ShareSigning.announce_held`, after :data:`RESEND_DELAY`)."""


class ShareSigning:
    """Per share: sign what we send, judge what we receive, relay the signed store.

    ``session`` arguments name the connection (what it already holds is
    remembered per connection); they are read for ``peer_id`` and
    ``connection.established`` (access, features) only, never written to.
    """

    _log = Logger()

    def __init__(self, keys: Any, our_peer_id: str,
                 persist: Callable[[list[Change]], None] | None = None) -> None:
        self.keys = keys
        self.our_peer_id = our_peer_id
        self.store = SignedStore()
        self.persist = persist
        self.forgeries = 0
        self._states: weakref.WeakKeyDictionary[Any, _RelayState] = weakref.WeakKeyDictionary()

    @property
    def access(self) -> str:
        return self.keys.access

    @property
    def read_only(self) -> bool:
        return relays_only(self.access)

    def _state(self, session: Any) -> _RelayState:
        state = self._states.get(session)
        if state is None:
            state = self._states[session] = _RelayState()
        return state

    # -- sending ---------------------------------------------------------------------------

    def signs_for(self, peer_access: str) -> bool:
        return signs_for(self.access, peer_access)

    def requests_manifest_from(self, peer_access: str) -> bool:
        """A read_write share never asks a lower peer for changes it would drop."""
        return not (self.access == READ_WRITE and peer_access != READ_WRITE)

    def encode(self, body: dict) -> bytes:
        return sign_body(self.keys.private_keys[READ_WRITE], body)

    # -- receiving -------------------------------------------------------------------------

    def _public(self) -> bytes:
        return self.keys.public_keys[READ_WRITE]

    def admit(self, session: Any, message: wire.Message, peer_access: str) -> bool:
        """Whether a received manifest/update/move may be merged; stores signed ones."""
        signed = message.signature is not None
        valid = signed and self.access != READ_WRITE and \
            verify(self._public(), message.text, message.signature)
        why = metadata_verdict(self.access, peer_access, signed, valid)
        if why is not None:
            self._dropped(session, message.type, why)
            return False
        if self.access != READ_WRITE:
            assert message.signature is not None
            self._keep(session, SignedMessage.parse(message.text, message.signature,
                                                    message.body))
        return True

    def _dropped(self, session: Any, kind: str, why: str) -> None:
        self.forgeries += 1
        self._log.warn("dropped {type} from {peer} ({access}): {why}", type=kind,
                       peer=session.peer_id, access=session.connection.established.access,
                       why=why)

    def _keep(self, session: Any, message: SignedMessage) -> None:
        self._state(session).sent.add(message.signature)  # it has it: never echo it back
        changes = self.store.add(message)
        if changes and self.persist is not None:
            self.persist(changes)

    def admit_read_only_manifest(self, session: Any, body: dict,
                                 peer_access: str) -> list[FileRecord]:
        """Verify each source of a ``read_only_manifest.manifest``; the records it holds."""
        sources = body.get("sources")
        if not isinstance(sources, list) or len(sources) > MAX_SOURCES:
            raise ProtocolError("read_only_manifest.manifest needs a list of sources")
        if self.access == READ_WRITE:
            self._dropped(session, RO_MANIFEST, metadata_verdict(
                self.access, peer_access, True, True) or "not needed")
            return []
        records: list[FileRecord] = []
        for source in sources:
            if not isinstance(source, dict):
                raise ProtocolError("read_only_manifest source must be an object")
            text, signature = split_source_text(source.get("manifest"))
            if not verify(self._public(), text, signature):
                self._dropped(session, RO_MANIFEST, "source manifest " + (
                    metadata_verdict(self.access, peer_access, True, False) or ""))
                continue
            message = SignedMessage.parse(text, signature)
            if message.type != MANIFEST:
                self._dropped(session, RO_MANIFEST, "source is a signed %s, not a manifest"
                              % (message.type,))
                continue
            try:
                bitmask = base64.b64decode(source.get("bitmask", ""), validate=True)
            except (binascii.Error, ValueError, TypeError):
                raise ProtocolError("read_only_manifest bitmask is not base64") from None
            self._keep(session, message)
            records.extend(bitmask_selects(bitmask, message.records()))
        return records

    # -- relaying (read-only shares) ----------------------------------------------------------

    def serve(self, session: Any, local: list[FileRecord], revision: int) -> list[bytes]:
        """The answer to ``get_manifest`` from the signed store: every page of every manifest."""
        state = self._state(session)
        by_path = {r.path: r for r in local}
        features = session.connection.established.features or ()
        out: list[bytes] = []
        if FEATURE in features:
            out.extend(wire.encode(body)
                       for body in self._read_only_manifests(state, by_path, revision))
        else:
            for origin in reversed(list(self.store.manifests)):
                for message, _ in self.store.manifest_pages(origin):
                    out.append(message.encode())
                    state.sent.add(message.signature)
        for message in list(self.store.updates.values()):
            if all(held(r, by_path.get(r.path)) for r in message.records()[:1]):
                out.append(message.encode())
                state.sent.add(message.signature)
        return out

    def _read_only_manifests(self, state: _RelayState, by_path: Mapping[str, FileRecord],
                             revision: int) -> list[dict]:
        """``read_only_manifest.manifest`` messages: a source per page, each with its bitmask.

        Every page of an origin we hold anything of goes out (a receiver needs
        them all to know the share's version), but a page goes to a
        connection again only when its bitmask grew.  Sources are split over
        several messages, at most :data:`MAX_SOURCES` and about
        :data:`MAX_SOURCE_BYTES` each.
        """
        bodies: list[dict] = []
        sources: list[dict] = []
        size = 0
        masks: dict[bytes, bytes] = {}  # only pages the store still keeps stay remembered

        def flush() -> None:
            nonlocal sources, size
            if sources:
                bodies.append({"type": RO_MANIFEST, "peer": self.our_peer_id,
                               "version": revision, "sources": sources})
            sources, size = [], 0

        for origin in reversed(list(self.store.manifests)):
            pages = [(message, held_bitmask(files, by_path))
                     for message, files in self.store.manifest_pages(origin)]
            if not any(any(mask) for _, mask in pages):
                continue
            for message, mask in pages:
                masks[message.signature] = mask
                if state.masks.get(message.signature) == mask:
                    continue
                source = {"manifest": message.as_source_text(),
                          "bitmask": base64.b64encode(mask).decode("ascii")}
                if len(sources) >= MAX_SOURCES or \
                        size + len(message.text) > MAX_SOURCE_BYTES:
                    flush()
                sources.append(source)
                size += len(message.text)
        flush()
        state.masks = masks
        return bodies

    def relay(self, session: Any, records: list[FileRecord]) -> Relayed:
        """We now hold ``records``: the signed messages that state them, to pass on."""
        state = self._state(session)
        out: list[bytes] = []
        announce_manifest = False
        for record in records:
            message = self.store.for_path(record.path)
            if message is not None and message.records()[0].same_content(record):
                if message.signature not in state.sent:
                    out.append(message.encode())
                    state.sent.add(message.signature)
            elif self.store.in_manifest(record):
                announce_manifest = True
        features = session.connection.established.features or ()
        return Relayed(out, announce_manifest and FEATURE in features)

    def announce_held(self, session: Any, local: list[FileRecord], revision: int) -> list[bytes]:
        """``read_only_manifest.manifest`` messages for the pages whose bitmask grew."""
        state = self._state(session)
        return [wire.encode(body) for body in
                self._read_only_manifests(state, {r.path: r for r in local}, revision)]


# -- local changes on a read-only share ------------------------------------------------------


@dataclass(frozen=True)
class Comparison:
    """A read-only share's files against the share's version."""

    unshared: list[str]
    """Local changes not shared (see :func:`unshared_paths`)."""
    missing: list[str]
    """Files of the share's version we do not hold (see :func:`missing_paths`)."""
    settled: bool
    """Every page of the manifests we keep is here (:attr:`SignedStore.settled`)."""


async def compare_with_share(share: Any, store: SignedStore) -> Comparison:
    """Where a read-only share's files differ from the share's version, and why.

    ``share`` gives ``manifest()``, ``our_peer_id`` and ``is_ignored``
    (clearskies.interfaces.ILocalShare); ``store`` is its signed store.
    """
    _, local = await share.manifest()
    version = store.share_records()
    ours = share.our_peer_id
    return Comparison(unshared_paths(local, version, ours, store.settled),
                      missing_paths({r.path: r for r in local}, version, ours,
                                    share.is_ignored),
                      store.settled)


def inside(path: str, prefix: str) -> bool:
    """``path`` is ``prefix`` or below it (every path is inside the empty prefix)."""
    return not prefix or path == prefix or path.startswith(prefix + "/")
