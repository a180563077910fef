"""The seams between the layers, as zope.interface declarations.

Each interface says what flows between two parts of the daemon, so that one
side can be replaced (by a fake in the tests, or by a new transport or store)
without the other knowing. Implementers declare ``@implementer(IFoo)``; tests
that fake a seam check the fake with ``zope.interface.verify.verifyObject``.

This module imports nothing from the rest of the package: every layer may
depend on it, and it depends on none.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface  # noqa: F401


# --- blocking work: runners and disk jobs -----------------------------------


# --- the share store, as the sync layer sees it -----------------------------


class IPagedLists(Interface):
    """Per-file lists kept in the state database, read back a page at a time.

    Every method returns a Deferred.  Pages are in path order and go on
    after the ``after`` path of the page before; a page shorter than
    ``limit`` is the last.  (Implemented by clearskies.share.pages.PagedStore.)
    """

    def put_announced(share_id, peer_id, records, acked=False):
        """Remember a peer's records, the latest per path; ``acked``: its live files'
        SHA-256 count as content it holds (a manifest's records)."""

    def announced_page(share_id, peer_id, after=None, limit=1000):
        """The next page of what the peer announced (FileRecords)."""

    def announced_many(share_id, peer_id, paths):
        """path -> FileRecord the peer announced, for those of ``paths`` it did."""

    def set_acked(share_id, peer_id, items):
        """The peer holds our content: (path, sha256) items."""

    def acked_many(share_id, peer_id, paths):
        """path -> SHA-256 the peer is known to hold, for those of ``paths`` it holds."""

    def forget_announced(share_id, peer_id=None):
        """Drop what one peer (None: every peer) of the share announced."""

    def put_wanted(share_id, items):
        """Want (record, fetch path or None, source peer IDs) items; sources add up."""

    def wanted_page(share_id, after=None, limit=1000, source=None):
        """The next page of wanted files (WantedRow: record, fetch_path, sources), or only
        those ``source`` has."""

    def wanted_many(share_id, paths):
        """path -> WantedRow for those of ``paths`` that are wanted."""

    def wanted_totals(share_id):
        """(how many files are wanted, their bytes)."""

    def remove_wanted(share_id, paths):
        """No longer want these paths."""

    def drop_source(share_id, peer_id):
        """The peer left: no longer a source of any wanted file."""

    def signed_page(share_id, kind, after=None, limit=1000):
        """A read-only share's kept signed messages of one kind, (key, part, text,
        signature), after (key, part) ``after``."""


# --- sync: engine, sessions, read-only signing ------------------------------


# --- discovery sources and transports ---------------------------------------


# --- the daemon, as a share runtime and the control commands see it ---------
