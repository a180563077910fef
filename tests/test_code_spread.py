"""Extension code_spread: what a connection sends and takes in, and a hostile peer."""

from __future__ import annotations

import secrets
import time
from types import SimpleNamespace

import pytest
from twisted.internet.task import Clock

from clearskies.accesscode import access_id
from clearskies.errors import ProtocolError
from clearskies.keys import ShareKeys
from clearskies.sync.codespread import (
    BURST, MAX_CODES_PER_MESSAGE, REFILL_EVERY, SEND_EVERY, CodeExchange, SpreadCode,
    parse_codes)
from tests.helpers import async_test
from tests.peerkit import ALL_FEATURES, PeerKitCase, sleep, wait_until


def _entry(level: str = "read_only", **changes) -> dict:
    entry = SpreadCode(secrets.token_bytes(16), level, False, int(time.time()) - 60, None).to_wire()
    entry.update(changes)
    return entry


def _exchange(access: str = "read_write", features=("code_spread",)):
    sent: list[dict] = []
    got: list[list[SpreadCode]] = []
    clock = Clock()
    exchange = CodeExchange("p" * 32, features, access, clock, send=sent.append)
    exchange.connect(lambda level: [SpreadCode(b"\x01" * 16, "read_write", True, 1.0, None),
                                    SpreadCode(b"\x02" * 16, "read_only", False, 1.0, None)],
                     got.append)
    return exchange, sent, got, clock


def _message(kind: str, codes: list) -> tuple[dict, SimpleNamespace]:
    body = {"type": kind, "codes": codes}
    return body, SimpleNamespace(type=kind)


def test_a_list_of_100000_codes_is_refused_whole():
    with pytest.raises(ProtocolError, match="at most %d" % MAX_CODES_PER_MESSAGE):
        parse_codes({"type": "code_spread.list", "codes": [_entry()] * 100_000}, "read_write")
    with pytest.raises(ProtocolError):
        parse_codes({"type": "code_spread.list", "codes": "everything"}, "read_write")


def test_forged_and_malformed_levels_are_refused_one_by_one():
    good = _entry("read_only")
    codes, refused = parse_codes({"codes": [
        good, _entry("read_write"), _entry("untrusted"), _entry("admin"), _entry(level=7),
        _entry(code="zz" * 16), _entry(created=float("nan")), _entry(one_time="yes"),
        _entry(expiration=1e300), "not an object"]}, "read_only")
    assert [c.to_wire() for c in codes] == [good]
    assert len(refused) == 9
    assert "a read_write code on a read_only connection" in refused


def test_a_read_only_connection_never_gets_a_read_write_code():
    exchange, sent, _, clock = _exchange("read_only")
    exchange.start()
    exchange.send_update([SpreadCode(b"\x03" * 16, "read_write", False, 1.0, None)])
    clock.advance(SEND_EVERY)
    assert len(sent) == 1 and [c["level"] for c in sent[0]["codes"]] == ["read_only"]
    both, sent_rw, _, _ = _exchange("read_write")
    both.start()
    assert [c["level"] for c in sent_rw[0]["codes"]] == ["read_write", "read_only"]


def test_nothing_is_sent_or_taken_without_the_feature():
    exchange, sent, got, _ = _exchange(features=ALL_FEATURES)
    exchange.start()
    exchange.on_message(*_message("code_spread.list", [_entry()]))
    assert sent == [] and got == []


def test_a_flood_of_messages_closes_the_connection_and_one_list_only():
    exchange, _, got, clock = _exchange()
    exchange.on_message(*_message("code_spread.list", [_entry()]))
    with pytest.raises(ProtocolError, match="second code_spread.list"):
        exchange.on_message(*_message("code_spread.list", [_entry()]))
    with pytest.raises(ProtocolError, match="too many"):
        for _ in range(BURST + 1):
            exchange.on_message(*_message("code_spread.update", [_entry()]))
    clock.advance(REFILL_EVERY * 2)
    exchange.on_message(*_message("code_spread.update", [_entry()]))  # paced: fine again
    assert len(got) >= BURST


def test_our_updates_are_gathered_below_the_peers_rate_limit_and_stop_with_the_connection():
    exchange, sent, _, clock = _exchange("read_write")
    codes = [SpreadCode(n.to_bytes(16, "big"), "read_only", False, 1.0, None) for n in range(300)]
    for code in codes:
        exchange.send_update([code])
    assert sent == []
    clock.advance(SEND_EVERY)
    assert len(sent) == 1 and len(sent[0]["codes"]) == MAX_CODES_PER_MESSAGE
    clock.advance(SEND_EVERY)
    assert len(sent) == 2 and len(sent[1]["codes"]) == 300 - MAX_CODES_PER_MESSAGE
    # What the peer accepts at that pace, it accepts for ever.
    peer, _, got, peer_clock = _exchange()
    for _ in range(3 * BURST):
        peer_clock.advance(SEND_EVERY)
        peer.on_message(*_message("code_spread.update", [_entry()]))
    exchange.send_update(codes[:1])
    exchange.stop()
    clock.advance(SEND_EVERY)
    assert len(sent) == 2 and clock.getDelayedCalls() == []


def test_the_code_never_shows_in_a_repr():
    code = SpreadCode(b"\xab" * 16, "read_only", True, 1.0, None)
    assert "ab" * 4 not in repr(code)


class HostileCodeSpreadTests(PeerKitCase):
    """A peer holding the share's keys tries to flood or forge codes: refused, daemon up."""

    @async_test
    async def test_a_huge_list_closes_the_connection_and_the_daemon_stays_up(self):
        await self.start_daemon()
        peer = await self.connect(features=ALL_FEATURES + ("code_spread",))
        await peer.wait_for("code_spread.list")  # the daemon's own (no codes yet)
        peer.send({"type": "code_spread.list", "codes": [_entry()] * 100_000})
        await peer.wait_closed()
        self.assertEqual(self.daemon.codes, {})
        # Still serving: a new connection gets its list.
        again = await self.connect(features=ALL_FEATURES + ("code_spread",))
        await again.wait_for("code_spread.list")

    @async_test
    async def test_forged_levels_are_dropped_and_good_codes_learned(self):
        runtime = await self.start_daemon()
        # The scripted peer holds the read-only keys only: its connection is read_only.
        keys = ShareKeys.from_keys_message(runtime.keys.keys_message("read_only"))
        peer = await self.connect(features=ALL_FEATURES + ("code_spread",), keys=keys)
        forged, good = _entry("read_write"), _entry("read_only")
        future = _entry("read_only", created=int(time.time()) + 30 * 86400)
        peer.send({"type": "code_spread.list", "codes": [forged, future, good]})
        await wait_until(lambda: access_id(bytes.fromhex(good["code"])) in self.daemon.codes)
        await sleep(0.2)
        self.assertNotIn(access_id(bytes.fromhex(forged["code"])), self.daemon.codes)
        self.assertNotIn(access_id(bytes.fromhex(future["code"])), self.daemon.codes)
        self.assertEqual(len(self.daemon.codes), 1)
        self.assertFalse(peer.closed)

    @async_test
    async def test_a_read_write_peer_cannot_spread_more_than_the_share_may_hold(self):
        from clearskies.daemon.spreading import MAX_LEARNED_CODES
        await self.start_daemon()
        peer = await self.connect(features=ALL_FEATURES + ("code_spread",))
        await peer.wait_for("code_spread.list")
        batches = [[_entry("read_write") for _ in range(MAX_CODES_PER_MESSAGE)]
                   for _ in range(MAX_LEARNED_CODES // MAX_CODES_PER_MESSAGE + 1)]
        peer.send({"type": "code_spread.list", "codes": batches[0]})
        for batch in batches[1:]:
            peer.send({"type": "code_spread.update", "codes": batch})
        await wait_until(lambda: any("refused" in line and "access code" in line
                                     for line in self.logged()), what="the refusal logged")
        self.assertEqual(len(self.daemon.codes), MAX_LEARNED_CODES)
        self.assertFalse(peer.closed)
