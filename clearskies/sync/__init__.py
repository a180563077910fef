"""Keeping a share identical with its connected peers (protocol/sync.md).

The package, from the bottom up:

* ``limits`` — the numbers that bound syncing (windows, retries, batches);
* ``wanted`` — what the share still needs to fetch (:class:`WantedFiles`);
* ``signed``, ``readonly`` — read-only shares: signed metadata, the signed
  store, the per-share signing face (returns bytes; never writes);
* ``unresolved``, ``merging``, ``copies``, ``diskspace``, ``downloads`` —
  the engine's parts: records waiting for another try, merge decisions
  carried out, local copies instead of downloads, disk trouble, fetching
  and installing files;
* ``engine`` — :class:`ShareSync`, one per share: sessions, scheduling
  across peers, relaying, revert;
* ``states``, ``gate``, ``metadata``, ``uploads``, ``addresses``,
  ``session`` — :class:`SyncSession`, one per connection, and its parts.

What the layer needs from the share is ``clearskies.interfaces.ILocalShare``;
what the engine needs from a session is ``clearskies.interfaces.ISyncSession``.
"""

from clearskies.sync.engine import ShareSync
from clearskies.sync.limits import (
    MANIFEST_PAGE, MAX_REFUSED_RECORDS, MAX_WAITING_GETS, RETRY_AFTER, WINDOW,
)
from clearskies.sync.session import SyncSession
from clearskies.sync.wanted import Wanted, WantedFiles
from clearskies.transfer.refusals import get_error_message

__all__ = [
    "ShareSync", "SyncSession", "Wanted", "WantedFiles", "get_error_message",
    "MANIFEST_PAGE", "MAX_REFUSED_RECORDS", "MAX_WAITING_GETS", "RETRY_AFTER", "WINDOW",
]
