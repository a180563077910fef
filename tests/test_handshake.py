"""The pure handshake machine, driven with message dicts for both roles."""

from __future__ import annotations

import copy
from collections import deque

import pytest
from twisted.internet.defer import Deferred
from twisted.logger import capturedLogs, formatEvent

from clearskies import SOFTWARE
from clearskies.accesscode import new_access_code, refusal_proof
from clearskies.errors import CannotStart, HandshakeError
from clearskies.handshake import (
    AWAIT_IDENTITY,
    CREATING_SHARE,
    AwaitShare,
    Close,
    ConnectTarget,
    Done,
    Handshake,
    MemoryKeyRing,
    Send,
    StartTLS,
    psk_identity,
)
from clearskies.keys import ShareKeys, generate_share_keys

NOW = 1_795_715_305.0
SERVER_PEER = "48d09b6b6a8ae0edb8fc14c64bbc604b"
CLIENT_PEER = "e358644d71f4f10c95f3707d414ff162"


@pytest.fixture(scope="module")
def keys() -> ShareKeys:
    return generate_share_keys(rsa_bits=1024)


def read_only_copy(keys: ShareKeys) -> ShareKeys:
    """The keys a read_only member of the same share holds."""
    return ShareKeys.from_keys_message(keys.keys_message("read_only"))


class Run:
    """Two machines joined directly: every Send is delivered to the other side."""

    def __init__(self, server: Handshake, client: Handshake, server_now=NOW, client_now=NOW):
        self.machines = {"server": server, "client": client}
        self.now = {"server": server_now, "client": client_now}
        self.sent: dict[str, list[dict]] = {"server": [], "client": []}
        self.actions: dict[str, list] = {"server": [], "client": []}
        self.held: dict[str, list[dict]] = {"server": [], "client": []}
        self.waiting: dict[str, bool] = {"server": False, "client": False}
        self.queue: deque[tuple[str, dict]] = deque()

    def start(self) -> Run:
        self._apply("client", self.machines["client"].begin(self.now["client"]))
        self._apply("server", self.machines["server"].begin(self.now["server"]))
        return self

    def _other(self, side: str) -> str:
        return "client" if side == "server" else "server"

    def _apply(self, side: str, actions: list) -> None:
        for action in actions:
            self.actions[side].append(action)
            if isinstance(action, Send):
                self.sent[side].append(action.body)
                self.queue.append((self._other(side), copy.deepcopy(action.body)))
            elif isinstance(action, AwaitShare):
                self.waiting[side] = True
        # Deliver like a network would: after the sender finished its step.
        while self.queue and not getattr(self, "_delivering", False):
            self._delivering = True
            try:
                self._deliver(*self.queue.popleft())
            finally:
                self._delivering = False

    def _deliver(self, side: str, body: dict) -> None:
        machine = self.machines[side]
        if self.waiting[side]:
            self.held[side].append(body)
            return
        if machine.state in ("closed", "established"):
            return
        self._apply(side, machine.receive(body, self.now[side]))

    def release(self, side: str) -> None:
        """The seam finished creating the share on ``side``."""
        self.waiting[side] = False
        self._apply(side, self.machines[side].share_created(self.now[side]))
        held, self.held[side] = self.held[side], []
        for body in held:
            self._deliver(side, body)

    def types(self, side: str) -> list[str]:
        return [body["type"] for body in self.sent[side]]

    def first(self, side: str, kind: type):
        return next(a for a in self.actions[side] if isinstance(a, kind))

    def done(self, side: str):
        return self.first(side, Done).established


def share_pair(keys: ShareKeys, client_keys: ShareKeys | None = None, features=((), ())):
    ring_s = MemoryKeyRing()
    ring_s.add_share(keys, SERVER_PEER)
    ring_c = MemoryKeyRing()
    client_keys = client_keys or keys
    ring_c.add_share(client_keys, CLIENT_PEER)
    server = Handshake.server(ring_s, "server box", features=features[0])
    client = Handshake.client(
        ring_c, ConnectTarget.share(client_keys, CLIENT_PEER), "client box", features=features[1]
    )
    return server, client, ring_s, ring_c


# -- share-key path --------------------------------------------------------------


def test_share_key_handshake_messages_and_result(keys):
    """With share keys: greeting, start, starttls at the common level, identities, Done both sides."""
    ro = read_only_copy(keys)
    server, client, _, _ = share_pair(keys, ro)
    run = Run(server, client).start()

    greeting, starttls, s_identity = run.sent["server"]
    assert greeting == {"type": "greeting", "software": SOFTWARE, "protocol": [1], "features": []}
    start, c_identity = run.sent["client"]
    assert start == {
        "type": "start", "software": SOFTWARE, "protocol": 1, "features": [],
        "id": keys.share_id, "access": "read_only", "peer": CLIENT_PEER,
    }
    assert starttls == {"type": "starttls", "peer": SERVER_PEER, "access": "read_only"}
    assert s_identity == {"type": "identity", "name": "server box", "time": int(NOW)}
    assert c_identity == {"type": "identity", "name": "client box", "time": int(NOW)}

    s_tls, c_tls = run.first("server", StartTLS), run.first("client", StartTLS)
    assert s_tls.psk == c_tls.psk == keys.psks["read_only"].encode("ascii")
    assert c_tls.identity == b"clearskies:1:" + keys.share_id.encode()

    s_done, c_done = run.done("server"), run.done("client")
    assert (s_done.share_id, s_done.access, s_done.our_peer_id, s_done.their_peer_id) == (
        keys.share_id, "read_only", SERVER_PEER, CLIENT_PEER)
    assert (c_done.share_id, c_done.access, c_done.our_peer_id, c_done.their_peer_id) == (
        keys.share_id, "read_only", CLIENT_PEER, SERVER_PEER)
    assert s_done.their_name == "client box" and c_done.their_name == "server box"
    assert s_done.we_are_server and not c_done.we_are_server
    assert s_done.their_software == c_done.their_software == SOFTWARE
    assert s_done.access_id is None and s_done.clock_skew == 0.0
    assert server.state == client.state == "established"


def test_starttls_comes_before_identity_in_action_order(keys):
    """The server writes starttls, then switches to TLS, then writes identity."""
    server, client, _, _ = share_pair(keys)
    run = Run(server, client).start()
    kinds = [type(a).__name__ for a in run.actions["server"]]
    assert kinds == ["Send", "Send", "StartTLS", "Send", "Done"]
    assert [type(a).__name__ for a in run.actions["client"]] == ["Send", "StartTLS", "Send", "Done"]


def test_features_are_the_intersection(keys):
    """Both sides end up with the features both listed (sorted), nothing else."""
    server, client, _, _ = share_pair(
        keys, features=(("rsync", "gzip", "x"), ("zz", "rsync", "gzip")))
    run = Run(server, client).start()
    assert run.sent["server"][0]["features"] == ["rsync", "gzip", "x"]
    assert run.sent["client"][0]["features"] == ["gzip", "rsync"]
    assert run.done("server").features == ("gzip", "rsync")
    assert run.done("client").features == ("gzip", "rsync")


def test_ping_during_handshake_is_ignored(keys):
    """A ping before the handshake ends changes nothing."""
    server, _, _, _ = share_pair(keys)
    server.begin(NOW)
    assert server.receive({"type": "ping", "timeout": 60}, NOW) == []
    assert server.state == "awaiting start"


# -- access-code paths -------------------------------------------------------------


def code_pair(keys, level="read_only", one_time=True, delay=False):
    code = new_access_code(keys.share_id, level, NOW, one_time=one_time)
    ring_s = MemoryKeyRing(lambda: NOW)
    ring_s.add_share(keys, SERVER_PEER)
    ring_s.add_code(code)
    ring_c = MemoryKeyRing()
    ring_c.delay_creation = delay
    target = ConnectTarget.join(code.code, CLIENT_PEER, note="/tmp/where")
    server = Handshake.server(ring_s, "holder")
    client = Handshake.client(ring_c, target, "joiner")
    return server, client, ring_s, ring_c, code, target


def test_access_code_exchanges_only_granted_keys(keys):
    """A read_only code: keys for read_only and below only; code spent after keys_acknowledgment."""
    server, client, ring_s, ring_c, code, target = code_pair(keys, "read_only")
    run = Run(server, client).start()

    assert run.sent["client"][0]["access"] == "unknown"
    assert run.sent["client"][0]["id"] == code.access_id
    assert run.types("server") == ["greeting", "starttls", "keys", "identity"]
    assert run.types("client") == ["start", "keys_acknowledgment", "identity"]
    assert run.sent["server"][1] == {"type": "starttls", "peer": SERVER_PEER, "access": "unknown"}

    message = run.sent["server"][2]
    assert message["access"] == "read_only" and message["share_id"] == keys.share_id
    assert "psk" not in message["read_write"] and "rsa" not in message["read_write"]
    assert message["read_write"]["public_rsa"] == keys.public_keys["read_write"].decode()
    assert message["read_only"]["psk"] == keys.psks["read_only"]
    assert "PRIVATE KEY" in message["read_only"]["rsa"]
    assert message["untrusted"]["psk"] == keys.psks["untrusted"]

    assert run.first("server", StartTLS).psk == run.first("client", StartTLS).psk == code.code
    assert run.first("client", StartTLS).identity == psk_identity(code.access_id)

    (created, created_for), = ring_c.created
    assert created.share_id == keys.share_id and created.access == "read_only"
    assert "read_write" not in created.psks and "read_write" not in created.private_keys
    assert created_for is target
    assert ring_s.used == [code.access_id] and code.used

    s_done, c_done = run.done("server"), run.done("client")
    assert s_done.access == c_done.access == "read_only"
    assert s_done.access_id == c_done.access_id == code.access_id
    assert c_done.keys.psks == created.psks
    assert c_done.our_peer_id == CLIENT_PEER and s_done.their_peer_id == CLIENT_PEER


def test_code_not_spent_before_acknowledgment(keys):
    """Until keys_acknowledgment arrives, the code is not reported used."""
    server, _, ring_s, _, code, _ = code_pair(keys)
    server.begin(NOW)
    actions = server.receive({
        "type": "start", "software": "x", "protocol": 1, "features": [],
        "id": code.access_id, "access": "unknown", "peer": CLIENT_PEER,
    }, NOW)
    assert [type(a) for a in actions] == [Send, StartTLS, Send]
    assert ring_s.used == [] and not code.used
    server.receive({"type": "keys_acknowledgment"}, NOW)
    assert ring_s.used == [code.access_id]


def test_one_time_code_cannot_be_used_twice(keys):
    """After a one-time code is spent, the next start with it gets cannot_start."""
    server, client, ring_s, _, code, _ = code_pair(keys)
    Run(server, client).start()
    again = Handshake.server(ring_s, "holder")
    again.begin(NOW)
    actions = again.receive({
        "type": "start", "software": "x", "protocol": 1, "features": [],
        "id": code.access_id, "access": "unknown", "peer": CLIENT_PEER,
    }, NOW)
    assert actions[0] == Send({"type": "cannot_start", "reason": "used",
                               "proof": refusal_proof(code.code, "used", CLIENT_PEER)})
    assert isinstance(actions[1], Close) and not actions[1].quiet


def test_multi_use_code_still_works_after_use(keys):
    """A multi-use code stays live after its first key exchange."""
    server, client, ring_s, _, code, _ = code_pair(keys, one_time=False)
    Run(server, client).start()
    again = Handshake.server(ring_s, "holder")
    actions = again.receive({
        "type": "start", "software": "x", "protocol": 1, "features": [],
        "id": code.access_id, "access": "unknown", "peer": CLIENT_PEER,
    }, NOW)
    assert actions[0].body["type"] == "starttls"


def test_read_write_code_grants_everything(keys):
    """A read_write code hands over all PSKs and both private keys."""
    server, client, _, ring_c, _, _ = code_pair(keys, "read_write")
    run = Run(server, client).start()
    message = run.sent["server"][2]
    assert message["read_write"]["psk"] == keys.psks["read_write"]
    assert "PRIVATE KEY" in message["read_write"]["rsa"]
    assert run.done("client").access == "read_write"
    assert ring_c.created[0][0].psks == keys.psks


def test_slow_share_creation_holds_the_handshake(keys):
    """While the seam creates the share nothing is acknowledged; afterwards the handshake ends."""
    server, client, ring_s, ring_c, code, _ = code_pair(keys, delay=True)
    run = Run(server, client).start()
    assert isinstance(run.actions["client"][-1], AwaitShare)
    assert client.state == CREATING_SHARE
    assert run.types("client") == ["start"]
    assert ring_s.used == []
    run.release("client")
    assert run.types("client") == ["start", "keys_acknowledgment", "identity"]
    assert ring_s.used == [code.access_id]
    assert run.done("client").access == run.done("server").access == "read_only"


def test_identity_may_arrive_before_keys(keys):
    """The joiner accepts the holder's identity before the keys and still finishes."""
    _, client, _, _, code, _ = code_pair(keys)
    client.receive({"type": "greeting", "software": "x", "protocol": [1], "features": []}, NOW)
    client.receive({"type": "starttls", "peer": SERVER_PEER, "access": "unknown"}, NOW)
    assert client.receive({"type": "identity", "name": "holder", "time": int(NOW)}, NOW) == []
    actions = client.receive(keys.keys_message("read_only"), NOW)
    assert [a.body["type"] for a in actions if isinstance(a, Send)] == [
        "keys_acknowledgment", "identity"]
    assert isinstance(actions[-1], Done) and actions[-1].established.their_name == "holder"


def test_offer_from_client_to_joining_server(keys):
    """The share holder may be the TCP client: it sends keys to a server that holds the code."""
    code = new_access_code(keys.share_id, "untrusted", NOW)
    ring_s = MemoryKeyRing()
    join = ConnectTarget.join(code.code, SERVER_PEER)
    ring_s.add_join(join)
    ring_c = MemoryKeyRing()
    ring_c.add_share(keys, CLIENT_PEER)
    ring_c.add_code(code)
    server = Handshake.server(ring_s, "joiner")
    client = Handshake.client(ring_c, ConnectTarget.offer(code, keys, CLIENT_PEER), "holder")
    run = Run(server, client).start()
    assert run.sent["client"][0]["access"] == "read_write"
    assert run.types("client") == ["start", "keys", "identity"]
    assert run.types("server") == ["greeting", "starttls", "keys_acknowledgment", "identity"]
    assert run.sent["client"][1]["access"] == "untrusted"
    assert "psk" not in run.sent["client"][1]["read_only"]
    assert ring_c.used == [code.access_id]
    assert ring_s.created[0][1] is join
    assert run.done("server").access == run.done("client").access == "untrusted"
    assert run.done("server").our_peer_id == SERVER_PEER


def test_reference_peer_transcript_as_joiner(keys):
    """As joiner we answer the reference holder's exact messages as its transcript shows."""
    ring = MemoryKeyRing()
    code = bytes(range(16))
    client = Handshake.client(ring, ConnectTarget.join(code, CLIENT_PEER), "ClearSkies Client")
    start = client.receive(
        {"software": "clearskies 0.1pre", "protocol": [1], "features": [], "type": "greeting"}, NOW)
    assert start[0].body["access"] == "unknown"
    actions = client.receive(
        {"peer": SERVER_PEER, "access": "unknown", "type": "starttls"}, NOW)
    assert actions == [StartTLS(code, psk_identity(ConnectTarget.join(code, CLIENT_PEER).id))]
    # The reference grants read_write and sends no public keys.
    reference_keys = keys.keys_message("read_write")
    for level in ("read_only", "read_write"):
        reference_keys[level].pop("public_rsa", None)
    actions = client.receive(reference_keys, NOW)
    assert [a.body for a in actions if isinstance(a, Send)] == [
        {"type": "keys_acknowledgment"},
        {"type": "identity", "name": "ClearSkies Client", "time": int(NOW)},
    ]
    assert client.state == AWAIT_IDENTITY
    done = client.receive({"name": "ClearSkies Client", "time": 1795715305, "type": "identity"}, NOW)
    assert done[0].established.their_software == "clearskies 0.1pre"
    assert done[0].established.access == "read_write"


# -- refusals ----------------------------------------------------------------------


def start_message(**changes):
    body = {"type": "start", "software": "x", "protocol": 1, "features": [],
            "id": "ab" * 32, "access": "read_write", "peer": CLIENT_PEER}
    body.update(changes)
    return {k: v for k, v in body.items() if v is not None}


def test_unknown_id_gets_cannot_start(keys):
    """A start naming an ID we do not know is answered cannot_start, then close."""
    server, _, _, _ = share_pair(keys)
    actions = server.receive(start_message(id="cd" * 32), NOW)
    assert actions[0] == Send({"type": "cannot_start", "reason": "unknown"})
    assert isinstance(actions[1], Close) and "cannot start" in actions[1].reason
    assert len(actions) == 2


def test_cancelled_code_gets_cannot_start_cancelled(keys):
    """A revoked code is refused with reason cancelled."""
    server, _, ring_s, _, code, _ = code_pair(keys)
    code.revoked = True
    actions = server.receive(start_message(id=code.access_id, access="unknown"), NOW)
    body = actions[0].body
    assert body["type"] == "cannot_start" and body["reason"] == "cancelled"
    assert body["proof"] == refusal_proof(code.code, "cancelled", start_message()["peer"])


def test_keyring_without_dead_code_answers_unknown(keys):
    """A keyring that cannot tell dead codes apart still refuses with reason unknown."""
    class OldRing(MemoryKeyRing):
        dead_code = None

    server = Handshake.server(OldRing(), "holder")
    actions = server.receive(start_message(id="ab" * 32, access="unknown"), NOW)
    assert actions[0] == Send({"type": "cannot_start", "reason": "unknown"})


def _joiner(keys):
    code = new_access_code(keys.share_id, "read_write", NOW)
    target = ConnectTarget.join(code.code, CLIENT_PEER)
    client = Handshake.client(MemoryKeyRing(), target, "joiner")
    client.receive({"type": "greeting", "protocol": [1]}, NOW)
    return client, code


@pytest.mark.parametrize("reason", ["expired", "used", "cancelled"])
def test_code_holder_trusts_a_reason_only_with_the_makers_proof(keys, reason):
    """A dead-code reason with the HMAC of the code is proven; a missing or wrong proof
    (anyone could send the reason) is not."""
    client, code = _joiner(keys)
    with pytest.raises(CannotStart, match="new one") as caught:
        client.receive({"type": "cannot_start", "reason": reason,
                        "proof": refusal_proof(code.code, reason, CLIENT_PEER)}, NOW)
    assert caught.value.reason == reason and caught.value.proven
    for proof in (None, "00" * 32, refusal_proof(code.code, reason, SERVER_PEER),
                  refusal_proof(bytes(16), reason, CLIENT_PEER), 7, "é"):
        client, _ = _joiner(keys)
        body = {"type": "cannot_start", "reason": reason}
        if proof is not None:
            body["proof"] = proof
        with pytest.raises(CannotStart) as caught:
            client.receive(body, NOW)
        assert caught.value.reason == reason and not caught.value.proven


def test_client_receiving_cannot_start_unknown(keys):
    """unknown needs no proof (the peer cannot have one) and is never proven."""
    client, _ = _joiner(keys)
    with pytest.raises(CannotStart, match="check it") as caught:
        client.receive({"type": "cannot_start", "reason": "unknown"}, NOW)
    assert caught.value.reason == "unknown" and not caught.value.proven


@pytest.mark.parametrize("reason", [None, "tired", 7, ["used"], "x" * 5000])
def test_client_ignores_missing_or_unknown_reasons(keys, reason):
    """cannot_start without a reason we know (older peers) gives no reason: no conclusion."""
    _, client, _, _ = share_pair(keys)
    client.receive({"type": "greeting", "protocol": [1]}, NOW)
    body = {"type": "cannot_start"} if reason is None else {"type": "cannot_start",
                                                             "reason": reason}
    with pytest.raises(CannotStart) as caught:
        client.receive(body, NOW)
    assert caught.value.reason is None


def test_client_receiving_cannot_start_fails(keys):
    """The client turns cannot_start into a HandshakeError naming the ID."""
    _, client, _, _ = share_pair(keys)
    client.receive({"type": "greeting", "protocol": [1]}, NOW)
    with pytest.raises(HandshakeError, match=keys.share_id):
        client.receive({"type": "cannot_start"}, NOW)


def test_share_id_without_keys_gets_cannot_start(keys):
    """A peer claiming level unknown for a share ID cannot hold its key: cannot_start."""
    server, _, _, _ = share_pair(keys)
    actions = server.receive(start_message(id=keys.share_id, access="unknown"), NOW)
    assert actions[0] == Send({"type": "cannot_start"})


def test_expired_code_gets_cannot_start(keys):
    """A code past its lifetime is refused."""
    server, _, ring_s, _, code, _ = code_pair(keys)
    ring_s._now = lambda: NOW + 2 * 86400
    actions = server.receive(start_message(id=code.access_id, access="unknown"), NOW + 2 * 86400)
    assert actions[0].body["reason"] == "expired" and actions[0].body["proof"]


def test_code_holder_meeting_code_holder_gets_cannot_start(keys):
    """Two peers that both hold only the code have nothing to exchange."""
    code = new_access_code(keys.share_id, "read_only", NOW)
    ring = MemoryKeyRing()
    ring.add_join(ConnectTarget.join(code.code, SERVER_PEER))
    server = Handshake.server(ring, "joiner")
    actions = server.receive(start_message(id=code.access_id, access="unknown"), NOW)
    assert actions[0] == Send({"type": "cannot_start"})


def test_loopback_detected_by_server(keys):
    """A start carrying our own peer ID is closed quietly, without starttls."""
    server, _, _, _ = share_pair(keys)
    actions = server.receive(start_message(id=keys.share_id, peer=SERVER_PEER), NOW)
    assert actions == [Close("loopback: the peer is ourselves", quiet=True)]


def test_loopback_detected_by_client(keys):
    """A starttls carrying our own peer ID is closed quietly, without TLS."""
    _, client, _, _ = share_pair(keys)
    client.receive({"type": "greeting", "protocol": [1]}, NOW)
    actions = client.receive({"type": "starttls", "peer": CLIENT_PEER, "access": "read_write"}, NOW)
    assert actions == [Close("loopback: the peer is ourselves", quiet=True)]


def test_clock_skew_of_two_minutes_warns(keys):
    """Clocks 2 minutes apart: a warning is logged and the handshake completes."""
    server, client, _, _ = share_pair(keys)
    with capturedLogs() as events:
        run = Run(server, client, server_now=NOW, client_now=NOW + 120).start()
    assert run.done("server").clock_skew == 120.0
    assert run.done("client").clock_skew == -120.0
    warnings = [formatEvent(e) for e in events if "differs from ours" in formatEvent(e)]
    assert len(warnings) == 2 and "120 s" in warnings[0]


def test_clock_skew_of_eleven_minutes_refused(keys):
    """Clocks 11 minutes apart: HandshakeError."""
    server, client, _, _ = share_pair(keys)
    with pytest.raises(HandshakeError, match="clocks differ"):
        Run(server, client, server_now=NOW, client_now=NOW - 660).start()


GOOD_GREETING = {"type": "greeting", "software": "x", "protocol": [1], "features": []}


@pytest.mark.parametrize(
    "body, match",
    [
        ({"type": "get_manifest"}, "unexpected 'get_manifest'"),
        ({"type": "identity", "name": "x", "time": NOW}, "unexpected 'identity'"),
        (start_message(protocol=2), "'protocol' must be 1"),
        (start_message(protocol="1"), "'protocol' must be 1"),
        (start_message(protocol=True), "'protocol' must be 1"),
        (start_message(id="AB" * 32), "'id'"),
        (start_message(id="ab" * 31), "'id'"),
        (start_message(id=None), "'id'"),
        (start_message(access="admin"), "'access'"),
        (start_message(peer="xyz"), "'peer'"),
        (start_message(peer=None), "'peer'"),
        (start_message(features="gzip"), "'features'"),
        (start_message(features=[1]), "'features'"),
        (start_message(software=["x"]), "'software'"),
        (start_message(software="x" * 1000), "'software'"),
    ],
)
def test_server_refuses_malformed_start(keys, body, match):
    """Malformed or out-of-order messages to the server raise HandshakeError."""
    server, _, _, _ = share_pair(keys)
    server.begin(NOW)
    with pytest.raises(HandshakeError, match=match):
        server.receive(body, NOW)


@pytest.mark.parametrize(
    "body, match",
    [
        ({"type": "greeting", "protocol": [2]}, "not 1"),
        ({"type": "greeting", "protocol": 1}, "list of integers"),
        ({"type": "greeting", "protocol": ["1"]}, "list of integers"),
        ({"type": "starttls", "peer": SERVER_PEER, "access": "read_write"}, "unexpected 'starttls'"),
        ({"type": "keys"}, "unexpected 'keys'"),
    ],
)
def test_client_refuses_bad_greeting(keys, body, match):
    """A bad greeting, or anything else first, raises HandshakeError."""
    _, client, _, _ = share_pair(keys)
    with pytest.raises(HandshakeError, match=match):
        client.receive(body, NOW)


@pytest.mark.parametrize(
    "body, match",
    [
        ({"type": "starttls", "peer": SERVER_PEER, "access": "root"}, "'access'"),
        ({"type": "starttls", "peer": 5, "access": "read_only"}, "'peer'"),
        ({"type": "starttls", "peer": SERVER_PEER, "access": "unknown"}, "not one we hold"),
        ({"type": "identity", "name": "x", "time": NOW}, "unexpected 'identity'"),
    ],
)
def test_client_refuses_bad_starttls(keys, body, match):
    """A starttls with a level we cannot key, or malformed, raises HandshakeError."""
    _, client, _, _ = share_pair(keys, read_only_copy(keys))
    client.receive(GOOD_GREETING, NOW)
    with pytest.raises(HandshakeError, match=match):
        client.receive(body, NOW)


def test_client_refuses_higher_level_than_held(keys):
    """The server cannot raise us above the level we hold."""
    _, client, _, _ = share_pair(keys, read_only_copy(keys))
    client.receive(GOOD_GREETING, NOW)
    with pytest.raises(HandshakeError, match="not one we hold"):
        client.receive({"type": "starttls", "peer": SERVER_PEER, "access": "read_write"}, NOW)


def test_joiner_refuses_level_other_than_unknown(keys):
    """With an access code, starttls must say 'unknown'."""
    _, client, _, _, _, _ = code_pair(keys)
    client.receive(GOOD_GREETING, NOW)
    with pytest.raises(HandshakeError, match="expected 'unknown'"):
        client.receive({"type": "starttls", "peer": SERVER_PEER, "access": "read_write"}, NOW)


@pytest.mark.parametrize(
    "body, match",
    [
        ({"type": "identity", "name": "x", "time": "now"}, "'time'"),
        ({"type": "identity", "name": "x", "time": True}, "'time'"),
        ({"type": "identity", "name": "x"}, "'time'"),
        ({"type": "identity", "time": NOW}, "'name'"),
        ({"type": "keys", "access": "read_write"}, "unexpected 'keys'"),
        ({"type": "keys_acknowledgment"}, "unexpected 'keys_acknowledgment'"),
        ({"type": "start"}, "unexpected 'start'"),
    ],
)
def test_inside_tls_refuses_bad_messages(keys, body, match):
    """Inside TLS on a share connection only a well-formed identity is accepted."""
    server, _, _, _ = share_pair(keys)
    server.receive(start_message(id=keys.share_id), NOW)
    with pytest.raises(HandshakeError, match=match):
        server.receive(body, NOW)


def test_identity_twice_refused(keys):
    """A second identity is a protocol error."""
    _, client, _, _, _, _ = code_pair(keys)
    client.receive(GOOD_GREETING, NOW)
    client.receive({"type": "starttls", "peer": SERVER_PEER, "access": "unknown"}, NOW)
    client.receive({"type": "identity", "name": "x", "time": NOW}, NOW)
    with pytest.raises(HandshakeError, match="twice"):
        client.receive({"type": "identity", "name": "x", "time": NOW}, NOW)


def test_joiner_refuses_malformed_keys(keys):
    """A keys message that does not validate raises HandshakeError and creates nothing."""
    _, client, _, ring_c, _, _ = code_pair(keys)
    client.receive(GOOD_GREETING, NOW)
    client.receive({"type": "starttls", "peer": SERVER_PEER, "access": "unknown"}, NOW)
    bad = keys.keys_message("read_only")
    bad["read_only"]["psk"] = "not hex"
    with pytest.raises(HandshakeError, match="keys"):
        client.receive(bad, NOW)
    assert ring_c.created == []


def test_holder_refuses_keys_from_joiner(keys):
    """The share holder never accepts keys, only the acknowledgment."""
    server, _, _, _, code, _ = code_pair(keys)
    server.receive(start_message(id=code.access_id, access="unknown"), NOW)
    with pytest.raises(HandshakeError, match="unexpected 'keys'"):
        server.receive(keys.keys_message("read_only"), NOW)


def test_established_machine_accepts_nothing_more(keys):
    """After Done, handshake messages are errors (the session handles the rest)."""
    server, client, _, _ = share_pair(keys)
    Run(server, client).start()
    with pytest.raises(HandshakeError):
        server.receive({"type": "identity", "name": "x", "time": NOW}, NOW)


def test_reprs_hide_secrets(keys):
    """Targets, actions and results never show keys or code bytes."""
    code = bytes.fromhex("deadbeefcafebabe0011223344556677")
    target = ConnectTarget.join(code, CLIENT_PEER)
    assert "deadbeef" not in repr(target)
    assert "dead" not in repr(StartTLS(code, b"id"))
    server, client, _, _ = share_pair(keys)
    run = Run(server, client).start()
    assert keys.psks["read_write"] not in repr(run.done("server"))


def test_await_share_carries_the_seam_deferred(keys):
    """AwaitShare holds exactly the Deferred the seam returned."""
    _, client, _, ring_c, _, _ = code_pair(keys, delay=True)
    client.receive(GOOD_GREETING, NOW)
    client.receive({"type": "starttls", "peer": SERVER_PEER, "access": "unknown"}, NOW)
    (action,) = client.receive(keys.keys_message("read_only"), NOW)
    assert isinstance(action.result, Deferred) and action.result is ring_c.pending[0]


def test_seam_exception_becomes_failed_await(keys):
    """If the seam raises while creating the share, the adapter gets a failed Deferred."""
    _, client, _, ring_c, _, _ = code_pair(keys)

    def broken(keys, target):
        raise OSError("disk full")

    ring_c.create_share_from_keys = broken
    client.receive(GOOD_GREETING, NOW)
    client.receive({"type": "starttls", "peer": SERVER_PEER, "access": "unknown"}, NOW)
    (action,) = client.receive(keys.keys_message("read_only"), NOW)
    assert isinstance(action, AwaitShare)
    failures = []
    action.result.addErrback(failures.append)
    assert failures[0].check(OSError)
    assert client.state == CREATING_SHARE
