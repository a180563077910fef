"""The numbers that bound syncing: request windows, retries, batch sizes (protocol/sync.md)."""

from __future__ import annotations

import os

WINDOW = 16
"""Outstanding ``get`` requests per connection."""

RETRY_AFTER = 30.0
"""Seconds before a file that failed from one peer is asked from it again."""

MAX_RANGE = 2**63
"""Bound of each number in a ``range`` ([start, length])."""

MAX_ADDRESSES = 8
"""Entries in one ``clearskies.addresses`` message (extension ``addresses``)."""

TRACE = bool(os.environ.get("CLEARSKIES_TRACE"))
"""Log every message and merge decision (debug level): for hunting protocol problems."""

MAX_REFUSED_RECORDS = 64
"""Invalid records one manifest message may hold: each is refused alone (listed,
logged once), but past this many the connection is closed instead."""

MAX_WAITING_GETS = 64
"""File requests a peer may have waiting on one connection before it is cut off."""

MANIFEST_PAGE = 1000
"""Records per manifest message for peers that negotiated ``manifest_pages``: a big
share's manifest would not fit the 16 MiB line limit, and pages merge as they arrive."""

MERGE_BATCH = MANIFEST_PAGE
"""Records (or moves) of one peer merged in one batch: what arrives during a merge
waits in batches of at most this many."""

MAX_WAITING_RECORDS = 2 * MERGE_BATCH
"""Records of one peer waiting behind a merge before its connection is no longer read
(until the merges catch up)."""

MAX_FINISHING = 64
"""Received files waiting for verification and installation before no more are requested."""

SUPERSEDED = "superseded"
"""An install given up because a local edit came after the decision to download."""

COPY_LOOKAHEAD = 512
"""Wanted hashes asked about at once: is there a local file to copy instead of fetching?"""

COPY_ANSWER_TTL = 10.0
"""Seconds an answer "no local copy" is trusted; after that the file is looked up alone."""

SPACE_CHECK = 2.0
"""Seconds between measurements of free space while files wait for room (clearskies.diskerrors)."""
