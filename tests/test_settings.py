"""clearskies.settings: what each setting may hold."""

import pytest

from clearskies.settings import SettingError, check_setting


@pytest.mark.parametrize("key, value, stored", [
    ("name", "é" * 128, "é" * 128),
    ("upload_limit", 0, 0),
    ("download_limit", 10 ** 12, 10 ** 12),
    ("listen", "tcp:40321:interface=127.0.0.1", "tcp:40321:interface=127.0.0.1"),
    ("listen", "", None),
    ("trackers", "http://a:1/, https://b", ["http://a:1", "https://b"]),
    ("trackers", "", []),
    ("peers", ["127.0.0.1:5", "127.0.0.1:5"], ["127.0.0.1:5"]),
    ("lan", False, False),
])
def test_good_values_are_stored_as_checked(key, value, stored):
    """Values a setting may hold come back normalised."""
    assert check_setting(key, value) == stored


@pytest.mark.parametrize("key, value", [
    ("name", "n" * 257), ("name", "é" * 129), ("name", ""), ("name", " "), ("name", "a\nb"),
    ("name", 5), ("upload_limit", -1), ("upload_limit", 10 ** 12 + 1),
    ("upload_limit", True), ("download_limit", 1.5), ("read_only_files", 1),
    ("listen", "tcp:65536"), ("listen", "tcp:x"), ("listen", "unix:/tmp/s"), ("listen", 5),
    ("trackers", "ftp://x"), ("trackers", ["http://x"] * 17), ("trackers", {"a": 1}),
    ("peers", ["nowhere"]), ("peers", [5]), ("lan", "yes"),
])
def test_bad_values_are_refused_with_a_message(key, value):
    """Values the daemon could not live with are refused, saying what is allowed."""
    with pytest.raises(SettingError) as caught:
        check_setting(key, value)
    assert key.split("_")[0] in str(caught.value) or "peer" in str(caught.value) \
        or "tracker" in str(caught.value)


def test_unknown_keys_are_key_errors():
    """An unknown key (or one that is not text) is a KeyError."""
    for key in ("colour", 5, None):
        with pytest.raises(KeyError):
            check_setting(key, 1)
