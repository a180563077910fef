"""Code escrow against a real in-process daemon (protocol/untrusted.md, section 8).

A scripted untrusted peer is left escrow entries by a read_write daemon: what
it receives never opens the code or a key (only the code does), one-time codes
are not escrowed, and a cancelled code's entry is removed.  Then the daemon is
the untrusted side: it keeps only entries the share signed, drops removed ones
for good, and answers escrow handshakes at a limited rate.
"""

from __future__ import annotations

import json
import secrets

from clearskies import keys as keymod
from clearskies import wire
from clearskies.keys import ShareKeys
from clearskies.sync.sealed import escrowing
from clearskies.sync.sealed import ownersession as ownersession_module
from clearskies.sync.sealed.sessions import FEATURE
from clearskies.untrusted import escrow
from tests.helpers import async_test
from tests.peerkit import (
    PeerKitCase, ScriptedSession, sleep, untrusted_keeper, untrusted_keys, wait_until,
    wire_bytes)

FEATURES = (FEATURE, escrow.FEATURE)


def _escrow_lines(peer: ScriptedSession, kind: str) -> list[wire.Message]:
    return [e for e in peer.events if isinstance(e, wire.Message) and e.type == kind]


class TrustedSideTests(PeerKitCase):

    @async_test
    async def test_an_untrusted_peer_gets_entries_it_cannot_open(self) -> None:
        (self.share_dir / "a.txt").write_bytes(b"a\n")
        runtime = await self.start_daemon()
        self.patch(ownersession_module, "CHECK_EVERY", 0.05)
        keys = runtime.keys
        path = str(self.share_dir)
        long_lived = await self.daemon.create_code(path, "read_write", False, None)
        read_only = await self.daemon.create_code(path, "read_only", False, 3600)
        one_time = await self.daemon.create_code(path, "read_write", True, 3600)
        peer = await self.connect(features=FEATURES, keys=untrusted_keys(keys))
        peer.send({"type": "untrusted.state", "revision": 0})
        await wait_until(lambda: len(_escrow_lines(peer, escrow.ENTRY_TYPE)) == 2,
                         what="two escrow entries")
        entries = {}
        for line in _escrow_lines(peer, escrow.ENTRY_TYPE):
            entry = escrow.read_entry(line.text, line.signature, keys.share_id,
                                      dict(keys.public_keys))
            entries[entry.lookup] = entry
        assert set(entries) == {escrow.escrow_lookup(c.code) for c in (long_lived, read_only)}
        opened = escrow.open_entry(long_lived.code, *self._pair(entries, long_lived))
        assert opened.psks == keys.psks
        opened = escrow.open_entry(read_only.code, *self._pair(entries, read_only))
        assert opened.access == "read_only" and "read_write" not in opened.private_keys
        assert entries[escrow.escrow_lookup(read_only.code)].expires == \
            int(read_only.expires) + (read_only.expires % 1 > 0)
        # Nothing on the wire opens a code or a key: only the code opens an entry.
        said = wire_bytes(peer)
        for secret in [c.code.hex().encode() for c in (long_lived, read_only, one_time)] + [
                escrow._derive(long_lived.code, escrow._KEY_INFO).hex().encode(),
                keys.psks["read_only"].encode(), keys.psks["read_write"].encode(),
                b"PRIVATE KEY", b"a.txt"]:
            assert secret not in said, secret
        assert not peer.messages("keys")

        # A cancelled code's entry is removed, signed.
        await self.daemon.cancel_code(long_lived.access_id)
        await wait_until(lambda: _escrow_lines(peer, escrow.REMOVE_TYPE), what="a removal")
        (line,) = _escrow_lines(peer, escrow.REMOVE_TYPE)
        assert escrow.read_removal(line.text, line.signature, keys.share_id,
                                   dict(keys.public_keys))[0] == escrow.escrow_lookup(
                                       long_lived.code)

    @staticmethod
    def _pair(entries: dict, code) -> tuple[bytes, bytes]:
        entry = entries[escrow.escrow_lookup(code.code)]
        return entry.text, entry.signature

    @async_test
    async def test_a_peer_without_the_feature_gets_no_entry(self) -> None:
        runtime = await self.start_daemon()
        self.patch(ownersession_module, "CHECK_EVERY", 0.05)
        await self.daemon.create_code(str(self.share_dir), "read_write", False, None)
        peer = await self.connect(features=(FEATURE,), keys=untrusted_keys(runtime.keys))
        peer.send({"type": "untrusted.state", "revision": 0})
        await peer.wait_for("untrusted.manifest")
        await sleep(0.3)
        assert not _escrow_lines(peer, escrow.ENTRY_TYPE)


class UntrustedSideTests(PeerKitCase):

    async def _keeper(self) -> tuple[ShareKeys, ScriptedSession]:
        return await untrusted_keeper(self, FEATURES)

    @async_test
    async def test_entries_kept_removed_and_handed_out_at_a_limited_rate(self) -> None:
        keys, peer = await self._keeper()
        code = secrets.token_bytes(16)
        lookup = escrow.escrow_lookup(code)
        peer.send_raw(wire.encode_signed(*escrow.make_entry(code, keys, "read_write")))
        stored = self.kept / escrowing.ESCROW_NAME
        await wait_until(stored.exists, what="the entry stored")
        kept = json.loads(stored.read_bytes())
        assert len(kept["entries"]) == 1
        assert code.hex() not in stored.read_text()
        found = self.daemon.keyring.escrow_entry(lookup)
        assert found is not None and found.psk == escrow.escrow_psk(code)
        assert escrow.open_entry(code, found.text, found.signature).psks == keys.psks
        for _ in range(escrowing.TRIES_PER_LOOKUP - 1):
            assert self.daemon.keyring.escrow_entry(lookup) is not None
        assert self.daemon.keyring.escrow_entry(lookup) is None  # rate-limited
        assert self.daemon.keyring.escrow_entry("0" * 64) is None

        # Removed: gone, and a replay of the entry is not taken back.
        peer.send_raw(wire.encode_signed(*escrow.make_removal(code, keys, "read_write")))
        await wait_until(lambda: not json.loads(stored.read_bytes())["entries"],
                         what="the entry removed")
        peer.send_raw(wire.encode_signed(*escrow.make_entry(code, keys, "read_write")))
        peer.send({"type": "untrusted.state", "revision": 0})
        box = self.daemon.share_registry.share_by_path(str(self.kept)).sealed.side.escrow
        await wait_until(lambda: lookup in box.removed, what="the removal kept")
        assert lookup not in box.entries

    @async_test
    async def test_a_forged_entry_is_refused(self) -> None:
        keys, peer = await self._keeper()
        other = keymod.generate_share_keys(rsa_bits=1024)
        forged = ShareKeys(keys.share_id, dict(other.psks), dict(other.private_keys),
                           dict(other.public_keys))
        code = secrets.token_bytes(16)
        peer.send_raw(wire.encode_signed(*escrow.make_entry(code, forged, "read_write")))
        await peer.wait_closed()
        assert not (self.kept / escrowing.ESCROW_NAME).exists()
        assert self.daemon.keyring.escrow_entry(escrow.escrow_lookup(code)) is None
