"""Tests for clearskies.accesscode: human form, parsing, access IDs, lifetimes."""

import hashlib
import inspect
import json
import pathlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from clearskies import accesscode
from clearskies.accesscode import (
    CODE_BYTES,
    PREFIX_BYTES,
    AccessCode,
    access_id,
    code_url,
    format_code,
    generate_code,
    luhn_mod32_check,
    new_access_code,
    parse_code,
    passphrase_code,
)
from clearskies.errors import AccessCodeError

# Known answers of the original reference implementation, kept in the test so
# the suite runs from a plain clone (same data as interop/vectors.json).
VECTORS = [
    ("00000000000000000000000000000000", "SYNC74YAAAAAAAAAAAAAAAAAAAAAAAAA4",
     "374708fff7719dd5979ec875d56cd2286f6d3cf7ec317a3b25632aab28ec37bb"),
    ("ffffffffffffffffffffffffffffffff", "SYNC7477777777777777777777777777O",
     "5ac6a5945f16500911219129984ba8b387a06f24fe383ce4e81a73294065461b"),
    ("0123456789abcdef0123456789abcdef", "SYNC74YBENCWPCNLZXXQCI2FM6E2XTPPU",
     "223e0a160af9da0a03e6dd2c4719c56f5d66a633cbe84e78aaa9f3735865522a"),
    ("d41d8cd98f00b204e9800998ecf8427e", "SYNC746UDWGNTDYAWICOTAAJTDWPQQT6V",
     "32d2ae03b8b636b73de1709b6cf0c3880ae1b548510d4807fc0ad20fa04db4a4"),
    ("9e107d9d372bb6826bd81d3542a419d6", "SYNC7446CB6Z2NZLW2BGXWA5GVBKIGOWX",
     "e4bfee99c91ad6abcb0ba25127a934c8615be1ea7ac1b2d2d6b73c678e74d643"),
    ("deadbeefcafebabe0011223344556677", "SYNC7466VW7O7SX6XK7AAEJCGNCFKZTX2",
     "5067dad8528877131881b67facf122f339a92a0d9c41140a0c0052cebd75c271"),
    ("80000000000000000000000000000000", "SYNC744AAAAAAAAAAAAAAAAAAAAAAAAAY",
     "3c79f1b5ca0a59275ca1b3236f81b5547ddc9dfca6a21236d85ef63060aaccaf"),
    ("5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a", "SYNC7422LJNFUWS2LJNFUWS2LJNFUWS2R",
     "1c712ecc21e27e374111d5a1beeaf75a4e343b3814c1847cba14013420809873"),
]
# The project's shared/ folder sits beside the checkout (in CI too).
SHARED_VECTORS = pathlib.Path(__file__).resolve().parents[2] / "shared" / "interop" / "vectors.json"
ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
SHARE_ID = "ab" * 32

codes = st.binary(min_size=CODE_BYTES, max_size=CODE_BYTES)


def _lookalikes(human: str) -> str:
    """Write every O as 0 and every L as 1, as a person might type it."""
    return human.replace("O", "0").replace("L", "1")


@pytest.mark.skipif(not SHARED_VECTORS.exists(), reason="interop folder not on this machine")
def test_embedded_vectors_match_interop_file():
    """The vectors embedded here are exactly those of interop/vectors.json."""
    data = json.loads(SHARED_VECTORS.read_text())
    shared = [(v["code_hex"], v["human"], v["access_id"]) for v in data["access_codes"]]
    assert shared == VECTORS


@pytest.mark.parametrize("code_hex,human,aid", VECTORS)
def test_format_matches_reference(code_hex, human, aid):
    """format_code gives the reference implementation's 33-character form."""
    assert format_code(bytes.fromhex(code_hex)) == human


@pytest.mark.parametrize("code_hex,human,aid", VECTORS)
@pytest.mark.parametrize(
    "variant",
    [
        lambda h: h,
        lambda h: h.lower(),
        lambda h: "clearskies:" + h,
        lambda h: "clearskies://" + h,
        lambda h: "ClearSkies:" + h.lower(),
        _lookalikes,
        lambda h: _lookalikes(h).lower(),
        lambda h: "  \t" + h + "\n",
        lambda h: " clearskies: " + h + " ",
    ],
    ids=["plain", "lower", "prefix", "url", "mixed-prefix", "lookalikes",
         "lookalikes-lower", "blanks", "prefix-blanks"],
)
def test_parse_matches_reference(code_hex, human, aid, variant):
    """parse_code reads each reference human form, however it was typed."""
    assert parse_code(variant(human)) == bytes.fromhex(code_hex)


@pytest.mark.parametrize("code_hex,human,aid", VECTORS)
def test_access_id_matches_reference(code_hex, human, aid):
    """access_id is the reference SHA-256 hex of the code bytes."""
    assert access_id(bytes.fromhex(code_hex)) == aid


@pytest.mark.parametrize("code_hex,human,aid", VECTORS)
def test_check_character_of_vectors(code_hex, human, aid):
    """luhn_mod32_check over the first 32 characters yields the 33rd."""
    assert luhn_mod32_check(human[:32]) == human[32]


def test_luhn_by_hand():
    """Luhn mod 32 doubles the rightmost character and folds the addends."""
    # 'B'=1 doubled -> 2; 'A'=0 -> 0; sum 2, check = 30 -> '6'.
    assert luhn_mod32_check("AB") == "6"
    # '7'=31 doubled -> 62 -> 1 + 30 = 31; check = 1 -> 'B'.
    assert luhn_mod32_check("7") == "B"
    assert luhn_mod32_check("") == "A"


def test_luhn_rejects_non_base32():
    """luhn_mod32_check refuses characters outside the base32 alphabet."""
    with pytest.raises(ValueError, match="'1'"):
        luhn_mod32_check("AB1")


def test_code_url():
    """code_url is the human form behind 'clearskies://', and parses back."""
    code = bytes.fromhex(VECTORS[2][0])
    assert code_url(code) == "clearskies://" + VECTORS[2][1]
    assert parse_code(code_url(code)) == code


def test_format_rejects_wrong_length():
    """format_code refuses anything but 16 bytes (passphrase codes have no human form)."""
    with pytest.raises(ValueError):
        format_code(bytes(32))
    with pytest.raises(ValueError):
        format_code(bytes(15))


def test_generate_code():
    """generate_code returns 16 fresh random bytes each time."""
    a, b = generate_code(), generate_code()
    assert len(a) == len(b) == CODE_BYTES
    assert a != b


# -- parse errors: one message per failed check --------------------------------


@pytest.mark.parametrize("text", ["", "   ", "\n", "clearskies:", "clearskies://  "])
def test_parse_empty(text):
    """Empty input (after blanks and prefix) is reported as empty."""
    with pytest.raises(AccessCodeError, match="empty"):
        parse_code(text)


@pytest.mark.parametrize("text,found", [
    (VECTORS[0][1][:-1], 32),
    (VECTORS[0][1] + "A", 34),
    ("SYNC", 4),
    ("SYNC74YA AAAAAAAAAAAAAAAAAAAAAAAA4", 34),
])
def test_parse_wrong_length(text, found):
    """A code of the wrong length says how many characters it found and that 33 are expected."""
    with pytest.raises(AccessCodeError, match=r"has {} characters.*33 are expected".format(found)):
        parse_code(text)


@pytest.mark.parametrize("bad", ["8", "9", "-", "!", "é", "="])
def test_parse_bad_character(bad):
    """A character outside base32 is named in the error."""
    text = VECTORS[0][1][:10] + bad + VECTORS[0][1][11:]
    with pytest.raises(AccessCodeError, match="contains {!r}".format(bad)) as info:
        parse_code(text)
    assert "33" not in str(info.value)


def test_parse_reports_first_bad_character():
    """Of several bad characters, the first is the one named."""
    text = "SYNC9" + "8" * 28
    with pytest.raises(AccessCodeError, match="contains '9'"):
        parse_code(text)


def test_parse_not_sync():
    """A base32 string of the right length not starting with SYNC is not an access code."""
    with pytest.raises(AccessCodeError, match="does not start with SYNC"):
        parse_code("ABCD" + VECTORS[0][1][4:])


def test_parse_bad_check_character():
    """A wrong check character is reported as a probable typo."""
    human = VECTORS[0][1]
    wrong = "B" if human[-1] != "B" else "C"
    with pytest.raises(AccessCodeError, match="probably mistyped"):
        parse_code(human[:-1] + wrong)


def test_parse_wrong_prefix_bits():
    """SYNC followed by the wrong prefix bits is refused even with a valid check character."""
    # 'SYNC74' fixes 30 prefix bits; the 7th character carries the last two.
    body = "SYNC75" + "A" * 26
    text = body + luhn_mod32_check(body)
    with pytest.raises(AccessCodeError, match="prefix is wrong"):
        parse_code(text)


# -- properties ------------------------------------------------------------------


@given(codes)
def test_round_trip(code):
    """Any 16 bytes survive format_code then parse_code, in either case."""
    human = format_code(code)
    assert len(human) == 33 and human.startswith("SYNC")
    assert parse_code(human) == code
    assert parse_code(human.lower()) == code


@given(codes, st.integers(min_value=0, max_value=32), st.sampled_from(ALPHABET))
def test_single_substitution_detected(code, position, replacement):
    """Changing any one character of a code to another base32 character is always rejected."""
    human = format_code(code)
    if human[position] == replacement:
        replacement = ALPHABET[(ALPHABET.index(replacement) + 1) % 32]
    typo = human[:position] + replacement + human[position + 1:]
    with pytest.raises(AccessCodeError) as info:
        parse_code(typo)
    if position >= 4:
        assert "probably mistyped" in str(info.value)


# -- passphrases -----------------------------------------------------------------


def test_passphrase_few_iterations():
    """passphrase_code iterates SHA-256 over the UTF-8 passphrase, the given number of times."""
    expected = "grüne Wiese".encode("utf-8")
    for _ in range(5):
        expected = hashlib.sha256(expected).digest()
    assert passphrase_code("grüne Wiese", iterations=5) == expected
    assert passphrase_code("x", iterations=1) == hashlib.sha256(b"x").digest()
    assert len(expected) == 32


def test_passphrase_default_iterations():
    """The default work factor is ten million SHA-256 rounds."""
    default = inspect.signature(passphrase_code).parameters["iterations"].default
    assert default == 10_000_000


def test_passphrase_rejects_empty_and_zero_rounds():
    """An empty passphrase or a non-positive round count is refused."""
    with pytest.raises(ValueError):
        passphrase_code("", iterations=3)
    with pytest.raises(ValueError):
        passphrase_code("secret", iterations=0)


# -- AccessCode records ------------------------------------------------------------


def test_new_access_code_defaults():
    """A new code is random, single use, and expires a day after creation."""
    ac = new_access_code(SHARE_ID, "read_only", 1000.0)
    assert len(ac.code) == CODE_BYTES
    assert (ac.share_id, ac.level, ac.created, ac.expires) == (SHARE_ID, "read_only", 1000.0, 87400.0)
    assert ac.one_time and not ac.used and not ac.revoked
    assert ac.access_id == hashlib.sha256(ac.code).hexdigest()


def test_new_access_code_options():
    """lifetime=None never expires; one_time=False allows reuse."""
    ac = new_access_code(SHARE_ID, "untrusted", 5.0, lifetime=None, one_time=False)
    assert ac.expires is None and not ac.one_time
    ac.used = True
    assert ac.is_live(10.0**12)


@pytest.mark.parametrize("level", ["unknown", "admin", ""])
def test_new_access_code_rejects_level(level):
    """Only untrusted, read_only and read_write can be granted by a code."""
    with pytest.raises(ValueError):
        new_access_code(SHARE_ID, level, 0.0)


def test_new_access_code_rejects_nonpositive_lifetime():
    """A lifetime of zero or less is refused."""
    with pytest.raises(ValueError):
        new_access_code(SHARE_ID, "read_write", 0.0, lifetime=0)


@pytest.mark.parametrize("changes,now,live", [
    ({}, 50.0, True),
    ({}, 99.999, True),
    ({}, 100.0, False),
    ({"revoked": True}, 50.0, False),
    ({"used": True}, 50.0, False),
    ({"used": True, "one_time": False}, 50.0, True),
    ({"used": True, "one_time": False}, 100.0, False),
    ({"expires": None}, 10.0**10, True),
    ({"expires": None, "revoked": True}, 50.0, False),
])
def test_is_live(changes, now, live):
    """A code is live unless revoked, expired, or a spent single-use code."""
    ac = AccessCode(b"\x01" * 16, SHARE_ID, "read_write", created=0.0, expires=100.0)
    for name, value in changes.items():
        setattr(ac, name, value)
    assert ac.is_live(now) is live


def test_dict_round_trip_through_json():
    """to_dict is JSON-safe (code as hex) and from_dict restores the same record."""
    ac = new_access_code(SHARE_ID, "read_write", 12.5, lifetime=None)
    ac.used = True
    d = json.loads(json.dumps(ac.to_dict()))
    assert d["code"] == ac.code.hex()
    assert AccessCode.from_dict(d) == ac
    phrase = AccessCode(passphrase_code("pw", iterations=2), SHARE_ID, "read_only", 1.0, 2.0)
    assert AccessCode.from_dict(json.loads(json.dumps(phrase.to_dict()))) == phrase


@pytest.mark.parametrize("damage", [
    {"code": "zz"},
    {"code": "00" * 5},
    {"level": "unknown"},
    {"created": "yesterday"},
    {"share_id": None},
    {"code": None},
])
def test_from_dict_rejects_damage(damage):
    """from_dict raises ValueError for a malformed stored record."""
    d = new_access_code(SHARE_ID, "read_only", 1.0).to_dict()
    d.update(damage)
    with pytest.raises(ValueError):
        AccessCode.from_dict(d)


def test_from_dict_missing_field():
    """from_dict raises ValueError when a field is missing."""
    d = new_access_code(SHARE_ID, "read_only", 1.0).to_dict()
    del d["expires"]
    with pytest.raises(ValueError):
        AccessCode.from_dict(d)


def test_repr_hides_code():
    """repr of an AccessCode shows its access ID but never the code."""
    ac = new_access_code(SHARE_ID, "read_only", 1.0)
    text = repr(ac) + str(ac)
    assert ac.code.hex() not in text
    assert format_code(ac.code) not in text
    assert ac.access_id in text


def test_module_constants():
    """The prefix is the reference 96 1A 2F F3 and codes are 16 bytes."""
    assert PREFIX_BYTES == b"\x96\x1a\x2f\xf3"
    assert accesscode.CODE_BYTES == 16
