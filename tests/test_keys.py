"""Tests for clearskies.keys: generation, the keys message, storage, signatures."""

import copy
import hashlib
import json
import os
import re
import secrets
import stat

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from twisted.logger import capturedLogs, formatEvent

from clearskies.errors import HandshakeError, ShareError
from clearskies.keys import (
    LEVELS,
    ShareKeys,
    generate_share_keys,
    greatest_common_access,
    level_rank,
    sign,
    verify,
)

GRANTABLE = ("untrusted", "read_only", "read_write")


@pytest.fixture(scope="module")
def keys() -> ShareKeys:
    """One full (read_write) set of keys; 1024-bit RSA keeps the suite fast."""
    return generate_share_keys(rsa_bits=1024)


def _bits(pem: bytes) -> int:
    return serialization.load_pem_public_key(pem).key_size


def _secrets_of(keys: ShareKeys) -> list[str]:
    """Every secret string in a set of keys, as it could appear in text."""
    found = list(keys.psks.values())
    for pem in keys.private_keys.values():
        found.append(pem.decode())
        # the base64 body, in case something re-wraps the PEM
        found.extend(line for line in pem.decode().splitlines()[1:3])
    return found


def _is_prime(n: int) -> bool:
    """Miller-Rabin with random bases (error below 4**-40)."""
    if n < 2:
        return False
    for p in (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37):
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for _ in range(40):
        x = pow(secrets.randbelow(n - 3) + 2, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


def _rsa_512_pem() -> bytes:
    """A 512-bit RSA private key in PKCS#1 PEM, like the reference peer's.

    cryptography refuses to *generate* keys under 1024 bits, so the primes are
    found here and the key is assembled from its numbers.
    """
    def prime() -> int:
        while True:
            c = secrets.randbits(256) | (3 << 254) | 1
            if c % 65537 != 1 and _is_prime(c):
                return c

    p, q = prime(), prime()
    while q == p:
        q = prime()
    e = 65537
    d = pow(e, -1, (p - 1) * (q - 1))
    numbers = rsa.RSAPrivateNumbers(
        p, q, d, rsa.rsa_crt_dmp1(d, p), rsa.rsa_crt_dmq1(d, q), rsa.rsa_crt_iqmp(p, q),
        rsa.RSAPublicNumbers(e, p * q),
    )
    key = numbers.private_key()
    assert key.key_size == 512
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


# -- levels ----------------------------------------------------------------------


def test_greatest_common_access_table():
    """The common level of two sides is the lower of the two, for every pair."""
    u, ut, ro, rw = LEVELS
    expected = {
        (u, u): u, (u, ut): u, (u, ro): u, (u, rw): u,
        (ut, u): u, (ut, ut): ut, (ut, ro): ut, (ut, rw): ut,
        (ro, u): u, (ro, ut): ut, (ro, ro): ro, (ro, rw): ro,
        (rw, u): u, (rw, ut): ut, (rw, ro): ro, (rw, rw): rw,
    }
    for (a, b), common in expected.items():
        assert greatest_common_access(a, b) == common, (a, b)


def test_level_rank():
    """Levels rank unknown < untrusted < read_only < read_write; others are refused."""
    assert [level_rank(x) for x in ("unknown", "untrusted", "read_only", "read_write")] == [0, 1, 2, 3]
    for bad in ("admin", "", "READ_WRITE", None):
        with pytest.raises(ValueError):
            level_rank(bad)
    with pytest.raises(ValueError):
        greatest_common_access("read_write", "owner")


# -- generation ------------------------------------------------------------------


def test_generated_keys_sizes_and_share_id():
    """Default keys: three 128-bit PSKs as lowercase hex, two 2048-bit RSA pairs, share_id rule."""
    k = generate_share_keys()
    assert set(k.psks) == set(GRANTABLE)
    for psk in k.psks.values():
        assert re.fullmatch(r"[0-9a-f]{32}", psk)
    assert len(set(k.psks.values())) == 3
    assert set(k.private_keys) == set(k.public_keys) == {"read_only", "read_write"}
    for level in ("read_only", "read_write"):
        private = serialization.load_pem_private_key(k.private_keys[level], None)
        assert private.key_size == 2048
        assert _bits(k.public_keys[level]) == 2048
        assert private.public_key().public_numbers() == (
            serialization.load_pem_public_key(k.public_keys[level]).public_numbers()
        )
    assert k.private_keys["read_only"] != k.private_keys["read_write"]
    assert k.share_id == hashlib.sha256(k.psks["read_write"].encode("ascii")).hexdigest()
    assert k.access == "read_write"


def test_two_shares_differ(keys):
    """Each generated share gets its own keys and share ID."""
    other = generate_share_keys(rsa_bits=1024)
    assert other.share_id != keys.share_id
    assert not set(other.psks.values()) & set(keys.psks.values())


def test_psk_is_ascii_of_hex(keys):
    """psk(level) is the ASCII of the 32-character hex text, as the reference peer keys TLS."""
    for level in GRANTABLE:
        assert keys.psk(level) == keys.psks[level].encode("ascii")
        assert len(keys.psk(level)) == 32


def test_psk_for_level_not_held(keys):
    """Asking for a PSK we do not hold raises ValueError."""
    ro = ShareKeys.from_keys_message(keys.keys_message("read_only"))
    with pytest.raises(ValueError, match="read_write"):
        ro.psk("read_write")
    with pytest.raises(ValueError):
        keys.psk("unknown")


def test_repr_hides_secrets(keys):
    """repr and str name the share and level but contain no PSK or PEM."""
    for text in (repr(keys), str(keys), "{}".format(keys), repr([keys])):
        assert keys.share_id in text
        assert "read_write" in text
        assert "BEGIN" not in text and "PRIVATE" not in text
        for secret in _secrets_of(keys):
            assert secret not in text


# -- signatures ------------------------------------------------------------------


def test_sign_verify_round_trip(keys):
    """A signature by the private key verifies with the matching public key."""
    text = b'{"type":"manifest","files":[]}'
    sig = sign(keys.private_keys["read_write"], text)
    assert len(sig) == 128
    assert verify(keys.public_keys["read_write"], text, sig) is True


def test_verify_rejects_tampering(keys):
    """Changed text, changed signature or the wrong key all give False."""
    text = b'{"type":"update","revision":7}'
    sig = sign(keys.private_keys["read_write"], text)
    flipped = bytes([sig[0] ^ 1]) + sig[1:]
    assert verify(keys.public_keys["read_write"], text + b" ", sig) is False
    assert verify(keys.public_keys["read_write"], text.replace(b"7", b"8"), sig) is False
    assert verify(keys.public_keys["read_write"], text, flipped) is False
    assert verify(keys.public_keys["read_write"], text, sig[:-1]) is False
    assert verify(keys.public_keys["read_only"], text, sig) is False


@pytest.mark.parametrize("pem", [b"", b"garbage", b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", "text", None])
def test_verify_garbage_is_false(keys, pem):
    """verify never raises: a broken public key gives False."""
    text = b"x"
    sig = sign(keys.private_keys["read_write"], text)
    assert verify(pem, text, sig) is False


def test_verify_garbage_signature_is_false(keys):
    """verify gives False for a signature of the wrong type or size."""
    assert verify(keys.public_keys["read_write"], b"x", b"") is False
    assert verify(keys.public_keys["read_write"], b"x", None) is False
    assert verify(keys.public_keys["read_write"], b"x", b"\x00" * 4096) is False


# -- the keys message ----------------------------------------------------------------


def test_keys_message_read_write_shape(keys):
    """Granting read_write sends every PSK and both private keys, in the reference shape."""
    m = keys.keys_message("read_write")
    assert m == {
        "type": "keys",
        "access": "read_write",
        "share_id": keys.share_id,
        "untrusted": {"psk": keys.psks["untrusted"]},
        "read_only": {"psk": keys.psks["read_only"], "rsa": keys.private_keys["read_only"].decode()},
        "read_write": {"psk": keys.psks["read_write"], "rsa": keys.private_keys["read_write"].decode()},
    }
    json.dumps(m)


def test_keys_message_read_only_withholds_read_write(keys):
    """Granting read_only carries no read_write secret, but the read_write public key."""
    m = keys.keys_message("read_only")
    text = json.dumps(m)
    assert m["access"] == "read_only"
    assert m["read_write"] == {"public_rsa": keys.public_keys["read_write"].decode()}
    assert m["read_only"] == {"psk": keys.psks["read_only"], "rsa": keys.private_keys["read_only"].decode()}
    assert m["untrusted"] == {"psk": keys.psks["untrusted"]}
    assert keys.psks["read_write"] not in text
    rw_private = keys.private_keys["read_write"].decode()
    assert json.dumps(rw_private)[1:-1] not in text
    assert rw_private.splitlines()[1] not in text
    assert "BEGIN RSA PRIVATE KEY" in text  # the read_only one, and only it
    assert text.count("PRIVATE KEY-----") == 2


def test_keys_message_untrusted_only_public(keys):
    """Granting untrusted carries only the untrusted PSK and the two public keys."""
    m = keys.keys_message("untrusted")
    text = json.dumps(m)
    assert m == {
        "type": "keys",
        "access": "untrusted",
        "share_id": keys.share_id,
        "untrusted": {"psk": keys.psks["untrusted"]},
        "read_only": {"public_rsa": keys.public_keys["read_only"].decode()},
        "read_write": {"public_rsa": keys.public_keys["read_write"].decode()},
    }
    assert keys.psks["read_only"] not in text and keys.psks["read_write"] not in text
    assert "PRIVATE" not in text


@pytest.mark.parametrize("level", ["unknown", "owner", ""])
def test_keys_message_refuses_bad_level(keys, level):
    """keys_message raises ValueError for a level that cannot be granted."""
    with pytest.raises(ValueError):
        keys.keys_message(level)


def test_keys_message_cannot_grant_above_own_level(keys):
    """A read_only holder cannot grant read_write, but can pass on read_only and untrusted."""
    ro = ShareKeys.from_keys_message(keys.keys_message("read_only"))
    with pytest.raises(ValueError, match="cannot grant read_write"):
        ro.keys_message("read_write")
    assert ro.keys_message("read_only") == keys.keys_message("read_only")
    assert ro.keys_message("untrusted") == keys.keys_message("untrusted")


@pytest.mark.parametrize("level", GRANTABLE)
def test_from_keys_message_round_trip(keys, level):
    """A keys message for each level, sent as JSON text, yields exactly that level's keys."""
    got = ShareKeys.from_keys_message(json.loads(json.dumps(keys.keys_message(level))))
    held = GRANTABLE[: GRANTABLE.index(level) + 1]
    assert got.access == level
    assert got.share_id == keys.share_id
    assert got.psks == {k: keys.psks[k] for k in held}
    assert got.private_keys == {k: keys.private_keys[k] for k in held if k != "untrusted"}
    assert got.public_keys == keys.public_keys
    for lvl in held:
        assert got.psk(lvl) == keys.psk(lvl)


def test_from_keys_message_derives_public_from_private(keys):
    """Public keys left out of a read_write grant are derived from the private keys."""
    got = ShareKeys.from_keys_message(keys.keys_message("read_write"))
    sig = sign(keys.private_keys["read_write"], b"t")
    assert verify(got.public_keys["read_write"], b"t", sig)


def _damaged(keys, change):
    m = copy.deepcopy(keys.keys_message("read_only"))
    change(m)
    return m


def _other_public(bits=1024) -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def _ec_private() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


BAD_MESSAGES = {
    "missing share_id": (lambda m: m.pop("share_id"), "share_id"),
    "short share_id": (lambda m: m.update(share_id="ab" * 31), "share_id"),
    "uppercase share_id": (lambda m: m.update(share_id=m["share_id"].upper()), "share_id"),
    "numeric share_id": (lambda m: m.update(share_id=12), "share_id"),
    "missing access": (lambda m: m.pop("access"), "access"),
    "access unknown": (lambda m: m.update(access="unknown"), "access"),
    "psk not hex": (lambda m: m["read_only"].update(psk="g" * 32), "read_only PSK"),
    "psk short": (lambda m: m["untrusted"].update(psk="a" * 31), "untrusted PSK"),
    "psk uppercase": (lambda m: m["untrusted"].update(psk="A" * 32), "untrusted PSK"),
    "psk number": (lambda m: m["untrusted"].update(psk=5), "untrusted PSK"),
    "private garbage": (lambda m: m["read_only"].update(rsa="not a key"), "read_only private key"),
    "private truncated": (lambda m: m["read_only"].update(rsa=m["read_only"]["rsa"][:200]), "read_only private key"),
    "private not rsa": (lambda m: m["read_only"].update(rsa=_ec_private()), "read_only private key"),
    "private as list": (lambda m: m["read_only"].update(rsa=["x"]), "read_only private key"),
    "public garbage": (lambda m: m["read_write"].update(public_rsa="-----BEGIN PUBLIC KEY-----\nxx\n"), "read_write public key"),
    "public missing": (lambda m: m["read_write"].pop("public_rsa"), "read_write RSA key"),
    "entry not object": (lambda m: m.update(untrusted="psk"), "untrusted"),
    "claims read_write, no rw psk": (lambda m: m.update(access="read_write"), "read_write PSK is missing"),
    "read_only psk missing": (lambda m: m["read_only"].pop("psk"), "read_only PSK is missing"),
    "read_only private missing": (lambda m: m["read_only"].pop("rsa"), "read_only private key is missing"),
    "untrusted missing": (lambda m: m.pop("untrusted"), "untrusted PSK is missing"),
    "rw psk above grant": (lambda m: m["read_write"].update(psk="0" * 32), "read_write PSK is present"),
    "mismatched public": (lambda m: m["read_only"].update(public_rsa=_other_public()), "does not match"),
    "huge pem": (lambda m: m["read_write"].update(public_rsa="A" * 100_000), "longer than"),
}


@pytest.mark.parametrize("name", sorted(BAD_MESSAGES))
def test_from_keys_message_rejects(keys, name):
    """A malformed keys message raises HandshakeError naming the problem."""
    change, expected = BAD_MESSAGES[name]
    with pytest.raises(HandshakeError, match=re.escape(expected)):
        ShareKeys.from_keys_message(_damaged(keys, change))


def test_from_keys_message_rejects_untrusted_claiming_read_write_private(keys):
    """An untrusted grant carrying a read_write private key is refused."""
    m = keys.keys_message("untrusted")
    m["read_write"] = {"rsa": keys.private_keys["read_write"].decode()}
    with pytest.raises(HandshakeError, match="read_write private key is present"):
        ShareKeys.from_keys_message(m)


@pytest.mark.parametrize("message", [None, [], "keys", 7])
def test_from_keys_message_rejects_non_object(message):
    """Something other than a JSON object is refused with HandshakeError."""
    with pytest.raises(HandshakeError):
        ShareKeys.from_keys_message(message)


def test_from_keys_message_rejects_tiny_key(keys):
    """A public key below 512 bits is refused."""
    # 384-bit modulus: two 192-bit primes assembled by hand (cryptography will not generate one).
    def prime():
        while True:
            c = secrets.randbits(192) | (3 << 190) | 1
            if _is_prime(c):
                return c
    n = prime() * prime()
    pem = rsa.RSAPublicNumbers(65537, n).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    m = keys.keys_message("read_only")
    m["read_write"] = {"public_rsa": pem}
    with pytest.raises(HandshakeError, match="384-bit"):
        ShareKeys.from_keys_message(m)


def test_from_keys_message_rejects_a_private_key_whose_parts_disagree(keys):
    """A private key whose exponents are damaged (no valid signature can come of it) is refused.

    (OpenSSL recomputes a faulty CRT result with ``d``, so both are damaged.)
    """
    good = serialization.load_pem_private_key(keys.private_keys["read_only"], None)
    n = good.private_numbers()
    damaged = rsa.RSAPrivateNumbers(
        n.p, n.q, n.d ^ 2, n.dmp1 ^ 2, n.dmq1, n.iqmp, n.public_numbers,
    ).private_key(unsafe_skip_rsa_key_validation=True)
    m = keys.keys_message("read_only")
    m["read_only"]["rsa"] = damaged.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()).decode()
    with pytest.raises(HandshakeError, match="parts do not agree"):
        ShareKeys.from_keys_message(m)


def test_from_keys_message_accepts_reference_peer_shape():
    """The reference peer's message (read_write, 512-bit keys, no public keys) is accepted."""
    psks = {level: secrets.token_hex(16) for level in GRANTABLE}
    ro_pem, rw_pem = _rsa_512_pem(), _rsa_512_pem()
    # Key order and shape as on the wire from that peer.
    text = json.dumps({
        "access": "read_write",
        "share_id": hashlib.sha256(psks["read_write"].encode()).hexdigest(),
        "untrusted": {"psk": psks["untrusted"]},
        "read_only": {"psk": psks["read_only"], "rsa": ro_pem.decode()},
        "read_write": {"psk": psks["read_write"], "rsa": rw_pem.decode()},
        "type": "keys",
    })
    got = ShareKeys.from_keys_message(json.loads(text))
    assert got.access == "read_write"
    assert got.psks == psks
    assert got.private_keys == {"read_only": ro_pem, "read_write": rw_pem}
    assert _bits(got.public_keys["read_only"]) == _bits(got.public_keys["read_write"]) == 512
    sig = sign(got.private_keys["read_write"], b"manifest")
    assert verify(got.public_keys["read_write"], b"manifest", sig)
    assert not verify(got.public_keys["read_only"], b"manifest", sig)
    # and we can pass the same keys on to a read_only peer
    assert ShareKeys.from_keys_message(got.keys_message("read_only")).access == "read_only"


# -- storage ---------------------------------------------------------------------


def test_dict_round_trip(keys):
    """to_dict survives JSON and from_dict restores equal keys, for every level."""
    for level in GRANTABLE:
        k = ShareKeys.from_keys_message(keys.keys_message(level))
        back = ShareKeys.from_dict(json.loads(json.dumps(k.to_dict())))
        assert back == k
        assert back.access == level


@pytest.mark.parametrize("damage", [
    lambda d: d.update(version=99),
    lambda d: d.pop("psks"),
    lambda d: d.update(psks={}),
    lambda d: d["psks"].pop("read_only"),
    lambda d: d["private_keys"].update(read_write="junk"),
    lambda d: d.update(share_id="x"),
    lambda d: d.update(public_keys=[]),
])
def test_from_dict_rejects_damage(keys, damage):
    """from_dict raises ShareError for a damaged stored record."""
    d = keys.to_dict()
    damage(d)
    with pytest.raises(ShareError):
        ShareKeys.from_dict(d)


def test_save_load_mode_0600(keys, tmp_path):
    """save writes a 0600 JSON file that load reads back to equal keys."""
    path = tmp_path / "keys.json"
    keys.save(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert json.loads(path.read_text())["psks"] == keys.psks
    assert ShareKeys.load(path) == keys
    assert ShareKeys.load(str(path)) == keys
    assert os.listdir(tmp_path) == ["keys.json"]


def test_save_ignores_permissive_umask_and_replaces(keys, tmp_path):
    """Even with umask 0 and an existing world-readable file, the result is 0600 and new."""
    path = tmp_path / "keys.json"
    path.write_text("old")
    os.chmod(path, 0o644)
    old_umask = os.umask(0)
    try:
        keys.save(path)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert ShareKeys.load(path) == keys
    assert os.listdir(tmp_path) == ["keys.json"]


def test_save_failure_leaves_no_temp_file(keys, tmp_path):
    """If the rename fails, the old file is untouched and no temporary file is left."""
    target = tmp_path / "keys.json"
    target.mkdir()  # os.replace of a file onto a directory fails
    with pytest.raises(OSError):
        keys.save(target)
    assert os.listdir(tmp_path) == ["keys.json"]
    assert target.is_dir()


def test_load_damaged_file(tmp_path):
    """A keys file that is not JSON raises ShareError; a missing one raises OSError."""
    path = tmp_path / "keys.json"
    path.write_text("{not json")
    with pytest.raises(ShareError, match="not JSON"):
        ShareKeys.load(path)
    with pytest.raises(OSError):
        ShareKeys.load(tmp_path / "absent.json")


def test_load_warns_about_loose_permissions(keys, tmp_path):
    """Loading a keys file others can read logs a warning naming the file, not the keys."""
    path = tmp_path / "keys.json"
    keys.save(path)
    with capturedLogs() as events:
        ShareKeys.load(path)
    assert events == []
    os.chmod(path, 0o644)
    with capturedLogs() as events:
        assert ShareKeys.load(path) == keys
    assert len(events) == 1
    text = formatEvent(events[0])
    assert str(path) in text and "chmod 600" in text
    assert keys.psks["read_write"] not in text
