"""Our manifest, read from the database and sent a page at a time (protocol/sync.md, 3.1).

:func:`send_manifest` never holds the whole share: it reads our records a
database page at a time, turns them into ``manifest`` messages of
:data:`~clearskies.sync.limits.MANIFEST_PAGE` records, and sends each
through a paced send that fires once the connection has taken the page
in; only then is the next database page read.  At most two pages of wire
records (the one being filled and the one held back to learn whether it
is the last) and one page of records are in memory, whatever the size of
the share.  Peers without ``manifest_pages`` get the draft's single
message, which has to be built whole.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred

from clearskies.share.records import FileRecord
from clearskies.sync import limits


async def send_manifest(share: Any, *, paged: bool,
                        shareable: Callable[[FileRecord], bool],
                        send_paced: Callable[[dict[str, Any]], Deferred[None]],
                        alive: Callable[[], bool],
                        page_size: int | None = None) -> int | None:
    """Send ``share``'s manifest; the revision it describes, or None if the connection went.

    ``share`` is an ``ILocalShare``: its ``manifest_page(after, limit)``
    answers (revision, the next records after path ``after``) from one
    database call.  Every page carries the revision read with the first
    page, before any record: every record stored at or below it is in the
    manifest, in the version it had then or a newer one.  A record that
    changes while the pages go out may thus arrive in a newer version than
    that revision, never an older one, and the change itself is pushed
    after the last page (changes committed before the manifest is sent wait
    for it, protocol/sync.md section 4), so the peer misses nothing and at
    worst hears a change twice, which merges to nothing.  This is the
    guarantee the manifest had when it was read into one list page by
    page.  A snapshot of the whole share (one read transaction held open
    while a slow peer takes the pages) is not used: the database has one
    connection on one thread, and every write waits behind a read
    transaction on it.
    """
    page_size = page_size or limits.MANIFEST_PAGE
    revision: int | None = None
    after: str | None = None
    files: list[dict[str, Any]] = []
    page = 0
    step = page_size if paged else None
    while True:
        current, records = await share.manifest_page(after, page_size)
        if not alive():
            return None
        if revision is None:
            revision = current
        files.extend(r.to_wire() for r in records if shareable(r))
        last = len(records) < page_size
        if records:
            after = records[-1].path
        # A page goes out once a record after it is known to exist: only
        # then can it say "more".  The last page goes out at the end.
        while step is not None and (len(files) > step or (last and (files or page == 0))):
            chunk, files = files[:step], files[step:]
            await send_paced(_manifest_body(share, revision, chunk, page, more=bool(files)))
            page += 1
            if not alive():
                return None
        if last:
            break
    if step is None:
        await send_paced(_manifest_body(share, revision, files, None, more=False))
    return revision


def _manifest_body(share: Any, revision: int, files: list[dict[str, Any]], page: int | None,
                   more: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": "manifest", "peer": share.our_peer_id,
        "revision": revision, "version": revision, "files": files,
    }
    if page is not None:
        body["page"] = page  # extension manifest_pages: which page, from 0
    if more:
        body["more"] = True  # extension manifest_pages: more pages follow
    return body
