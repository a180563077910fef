"""Access levels of a share, in ascending trust (``protocol/keys.md``).

Apart from ``keys`` so that light users (access codes, the CLI) need not
load the cryptography library to know the level names.
"""

LEVELS = ("unknown", "untrusted", "read_only", "read_write")  # ascending trust
GRANTABLE_LEVELS = LEVELS[1:]  # levels that come with keys (and access codes)
RSA_LEVELS = ("read_only", "read_write")  # levels that have an RSA key pair
