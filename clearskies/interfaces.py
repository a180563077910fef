"""The seams between the layers, as zope.interface declarations.

Each interface says what flows between two parts of the daemon, so that one
side can be replaced (by a fake in the tests, or by a new transport or store)
without the other knowing. Implementers declare ``@implementer(IFoo)``; tests
that fake a seam check the fake with ``zope.interface.verify.verifyObject``.

This module imports nothing from the rest of the package: every layer may
depend on it, and it depends on none.
"""

from __future__ import annotations

from twisted.application.service import IService
from zope.interface import Attribute, Interface


# --- what the sync layer reports as it happens -----------------------------


class ISyncEvents(Interface):
    """Where a share's sync engine reports what happens, as it happens: each
    download started, finished or failed and each conflict copy made
    (protocol/http-api.md, "Events").  The daemon turns them into events for
    the GUIs; the sync layer knows nothing of who listens.  ``fields`` hold
    plain JSON values (``file``, ``peer_id``, ``size``, ``copy``, ``reason``).
    Implementations must not raise and must not block."""

    def sync_event(kind: str, fields: dict) -> None:
        """``kind``: ``download_started``, ``download_finished``, ``download_failed``,
        ``conflict``, ``deleted`` (a peer's deletion carried out here)."""


# --- blocking work: runners and disk jobs -----------------------------------


class IRunner(Interface):
    """Runs a blocking callable off the reactor thread and answers on it.

    The contract every runner honours, for any callable: ``run(fn, *args)``
    returns a Deferred that fires on the reactor thread with ``fn(*args)``'s
    result, or fails with the exception it raised (never raised by ``run``
    itself). ``fn`` gets plain values, returns plain values and never
    touches Twisted objects. A runner that runs its work in order says so;
    the one for tests runs it at once on the calling thread.
    """

    def run(fn, *args):  # type: ignore[no-untyped-def]
        """Run ``fn(*args)``; a Deferred with its result or its exception."""


# --- the share store, as the sync layer sees it -----------------------------


class ILocalShare(Interface):
    """Everything syncing needs from one share's store and folder.

    Implemented by the share runtime; faked by the sync tests.  Every path
    argument is a share path (``/``-separated, relative to the share root),
    already checked by ``clearskies.share.records.validate_wire_path``.
    """

    share_id = Attribute("The share's ID (hex).")
    our_peer_id = Attribute("Our peer ID in this share.")
    root = Attribute("The share folder (pathlib.Path).")
    files_runner = Attribute(
        "The daemon's files pool (an IRunner, clearskies.threads): blocking file work, "
        "the small jobs of downloads among it (clearskies.diskjobs).")
    lists = Attribute("The share's per-file lists in the state database (IPagedLists).")
    error = Attribute("Why the share is in error (an unmounted folder, say), or None: "
                      "nothing is then taken from or given to peers.")

    def revision():
        """Our current manifest revision (an int)."""

    def manifest():
        """Deferred (revision, every record sorted by path) they make up.

        The whole share in one list: only for read-only shares' signed
        manifests, which are compared with it whole; a manifest we send
        reads :meth:`manifest_page` instead.
        """

    def manifest_page(after, limit):
        """Deferred (revision, the next ``limit`` records after path ``after``).

        Records in path order, tombstones included, from the start when
        ``after`` is None; a page shorter than ``limit`` is the last.  The
        revision is read in the same database call as the page.
        """

    def get_record(path):
        """Deferred: our record for ``path``, or None."""

    def get_records(paths):
        """Deferred {path: record} of those ``paths`` we have a record of (one round trip)."""

    def local_path(path):
        """The checked local Path of a share path (UnsafePathError, PathObstacle)."""

    def is_ignored(path):
        """True for paths the user excluded: never announced, never overwritten."""

    def is_damaged(path):
        """True for a file found rotted on disk (its bytes are not its record's): never served."""

    def recorded_many(paths):
        """Deferred ({path: what the disk should hold there, as our last scan recorded it
        (:data:`clearskies.diskjobs.Expected`)}, {path: our record of it}, paths we hold
        no record of left out of the second): one database query."""

    def commit_remote(records, written=None):
        """Store records whose on-disk state is now in place; Deferred new revision.

        ``written`` maps paths of files just written to (size, mtime_ns,
        inode), so that the next scan knows them.
        """

    def find_local_copy(sha256):
        """Deferred: a local Path holding this content (to copy, not download), or None."""

    def hashes_present(hashes):
        """Deferred set of those ``hashes`` some live file of the share has (one query)."""

    def remove_local(path):
        """Deferred bool: the file or empty folder was deleted (False: changed since the scan)."""

    def remove_many(paths, decided_on=None, changes=None):
        """``remove_local`` for many paths; ``decided_on``: our records the caller judged;
        ``changes``: the peers' records deleting them (who deleted what, for kept versions)."""

    def keeper_for(records, ours=None):
        """Deferred: a worker-thread job ``keep(target)`` that keeps what the downloads of
        ``records`` are about to replace as versions, or None when the share keeps none.
        The caller calls its ``close()`` once the job is over.

        ``ours``: our records of those paths as :meth:`recorded_many` gave them (the
        state the disk is checked against); without it they are read again."""

    def make_directory(path, mode):
        """Deferred: a folder (and its parents) exists inside the share."""

    def rename_local(source, destination, decided_on=None):
        """Deferred bool: moved within the share, if the source is unchanged since the scan.

        ``decided_on``: our record of the source that the caller decided
        against; if the database holds a newer one, the move is refused.
        """

    def rename_many(moves, decided_on=None):
        """``rename_local`` for many (source, destination) pairs; a list of bools."""

    def expect_own_renames(paths):
        """Downloads are about to be renamed into ``paths``: the watcher must not report them."""

    def own_renames_failed(paths):
        """Those announced renames did not happen after all."""

    def check_root():
        """Look at the share folder now (a download found it gone)."""

    def local_files_recorded():
        """A Deferred merging must wait for (an adopting first scan), or None."""

    def peer_manifest_seen(peer_id, revision):
        """Remember the revision of a peer's manifest, to ask for changes since it next time."""

    def note_refused(path, why):
        """List a peer's record that cannot be taken (``status --skipped``); True if new."""


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
        """Want (record, fetch path or None, source peer IDs) items; sources add up for the
        same content; (files added, change in bytes)."""

    def wanted_page(share_id, after=None, limit=1000, source=None):
        """The next page of wanted files (WantedRow: record, fetch_path, sources), or only
        those ``source`` has."""

    def wanted_many(share_id, paths):
        """path -> WantedRow for those of ``paths`` that are wanted."""

    def wanted_totals(share_id):
        """(how many files are wanted, their bytes)."""

    def remove_wanted(share_id, paths):
        """No longer want these paths; (files removed, their bytes)."""

    def remove_wanted_superseded(share_id, records):
        """Local edits came first: unwant their paths unless for the same content;
        (files removed, their bytes)."""

    def take_wanted_page(share_id, after, limit):
        """The next page of wanted files after ``after``, taken out of the list."""

    def clear_wanted(share_id):
        """Forget every wanted file of the share."""

    def drop_source(share_id, peer_id):
        """The peer left: no longer a source of any wanted file."""

    def signed_page(share_id, kind, after=None, limit=1000):
        """A read-only share's kept signed messages of one kind, (key, part, text,
        signature), after (key, part) ``after``."""


# --- sync: engine, sessions, read-only signing ------------------------------


class ISyncSession(Interface):
    """One authenticated connection of a share, as the share's sync engine sees it."""

    peer_id = Attribute("The peer's ID.")
    opener_key = Attribute("(peer ID of the side that opened the TCP connection, its source "
                           "port): of two connections with one peer, the smaller stays.")
    connection = Attribute("The peer connection (its ``established`` info, ``close(reason)``).")
    alive = Attribute("False once the connection is lost.")
    remote_index = Attribute(
        "The peer's latest record of each path that we merged, in the database "
        "(clearskies.sync.announced.AnnouncedRecords: ``many(paths)``, ``put(records)``).")
    manifest_sent_revision = Attribute(
        "The newest revision of ours the peer has (int), or None before our manifest.")
    in_sync = Attribute("The peer has our latest revision (and all its content, if it says).")
    merging = Attribute("Records from this peer are waiting to be merged, or being merged.")

    def keep_over(newcomer):
        """Of two connections with one peer, True when this one stays."""

    def has_room():
        """The request window has room for another download."""

    def request(receiver, remote_path):
        """Ask the peer for a file, into ``receiver`` (clearskies.transfer.receiver.FileReceiver)."""

    def push_changes(records, moves, revision, force=False):
        """Send our changes at ``revision`` unless the peer has them already."""

    def merge_again(records):
        """Records of this peer whose merge could not be carried out: merge them again."""

    def acknowledge(record):
        """The peer holds our version of ``record`` (for peers without version vectors)."""

    def local_unacked(local):
        """Our version of a path has changes this peer has not confirmed holding."""

    def send_progress():
        """Tell the peer which of its revisions we hold completely, if we do."""


# --- discovery sources and transports ---------------------------------------


class IDiscoverySource(IService):
    """One way of finding peers (protocol/discovery.md): the LAN announcer, a tracker
    client, the peers a user named, the peers we remember (later a DHT or a relay).

    A source is a service the daemon starts and stops.  It is made with what
    it needs from the daemon, which is at most two things: ``registrations``,
    a callable returning the (target ID, our peer ID) pairs we announce now
    (share IDs, live access IDs, pending attaches), and ``found``, the one
    callback every candidate goes through::

        found(target_id: str, address: Address, peer_id: str | None, source: str)

    where ``source`` is the source's :attr:`source`.  What it does with
    neither (the network it asks, its timers) is its own business.
    """

    source = Attribute(
        'The name its candidates carry ("lan", "tracker", "manual"; see '
        "clearskies.discovery.connector.SOURCES): it sets how long an unrefreshed "
        "candidate is kept.")

    def announce_changed() -> None:
        """What we announce (or where we can be reached) changed: tell the world now
        rather than at the next round.  A source that announces nothing ignores it."""


class IPeerTransport(Interface):
    """One way of reaching a peer's address: TCP and Tor today, a relay later.

    The daemon dials an address through the first of its transports that
    :meth:`can_reach` it; the listening side that matters to the dialler is
    :meth:`own_addresses`, the addresses that are ourselves.
    """

    name = Attribute('What the transport is called ("tcp", "tor").')

    def can_reach(address: object) -> bool:
        """Whether this transport is the one for ``address`` (a
        ``clearskies.addresses.Address``) in the daemon's current mode.  It may still
        fail to dial it, saying why (Tor not running, not yet bootstrapped)."""

    def endpoint_for(address: object) -> object:
        """(async) A Deferred firing with the ``IStreamClientEndpoint`` that connects
        to ``address``, once the transport is ready; or failing with the reason it
        cannot be reached."""

    def own_addresses() -> list[object]:
        """The addresses this transport reaches us at ourselves: never dialled, and
        (for those peers cannot see, like an onion address) told to peers."""


# --- the daemon, as a share runtime and the control commands see it ---------


class IShareHost(Interface):
    """What one share's runtime (``clearskies.daemon.runtime.ShareRuntime``) needs
    from the daemon that runs it: the daemon-wide state it follows and the
    places it reports to.  The runtime gets its reactor, store and the files
    runner as constructor arguments, and nothing else of the daemon."""

    paused = Attribute("True while the daemon is paused: a share started now starts paused.")

    def now() -> float:
        """The reactor's time, in seconds."""

    def own_paths() -> list[str]:
        """What the daemon keeps for itself (data directory, control socket): no share
        may hold or lie in them, and a share that holds one never syncs it."""

    def read_only_files() -> bool:
        """Whether read-only shares keep their files without write permission (a setting)."""

    def share_adopted(share_id: str) -> None:
        """The first scan of a share attached with --merge has recorded the folder's files."""

    def advertised_addresses() -> list[object]:
        """Where peers can reach us beyond what they see (protocol/sync.md, "Addresses")."""

    def add_peer_candidates(share_id: str, peer_id: str | None, addresses: object) -> None:
        """Offer addresses a peer told us (or we remembered) for dialling."""

    def retry_peers(share_id: str) -> None:
        """The share is usable again: dial its peers now rather than at their next backoff."""

    def peer_connection_lost(share_id: str, peer_id: str, address: object) -> None:
        """A session of the share ended (``address``: the one we dialled, or None)."""

    def share_event(share_id: str, path: str, kind: str, fields: dict) -> None:
        """What a share's engine reported (ISyncEvents), for the daemon's events."""


class IAttachDialler(Interface):
    """What an attach waiting for its answer needs of the daemon's dialling:
    the peers the user named, checked and dialled; and to stop dialling once
    the attach failed."""

    def check_peer_address(text):
        """Parse a peer address the user gave; raise ``ConfigurationError`` if unusable."""

    def add_manual_peer(target_id, address):
        """Dial ``address`` (text) for ``target_id`` (an access ID) until told otherwise."""

    def forget_target_soon(target_id):
        """Stop dialling for ``target_id`` once the dial under way has finished."""


class IDaemonControl(Interface):
    """The daemon as the control commands (``clearskies.control.commands``) see it.

    Its attributes are read-only: the commands change the daemon through its methods.
    """

    name = Attribute("The name peers see.")
    paused = Attribute("True between ``pause`` and ``resume``.")
    shares = Attribute("Share ID -> the share's runtime, for every share of the daemon.")
    joins = Attribute("Access ID -> pending (or failed) attach, for codes we were given.")
    codes = Attribute("Access ID -> live access code, for codes we made.")
    tor_mode = Attribute('"off", "on" or "only".')
    listening_port = Attribute("The TCP port peers reach us on (0 before it is known).")
    events = Attribute("The event bus (clearskies.events.EventBus): what happened, numbered.")

    def now() -> float:
        """The reactor's time, in seconds."""

    def request_stop() -> None:
        """Stop the daemon shortly (after the reply to ``stop`` has gone out)."""

    def pause() -> None:
        """No new transfers, scans or announcements until ``resume``."""

    def resume() -> None:
        """Undo ``pause``."""

    def is_tracking() -> bool:
        """Whether some tracker has our registration."""

    def rates() -> tuple[float, float]:
        """Upload and download rates, bytes per second over the last few seconds."""

    def onion_address() -> str | None:
        """``tor:<name>.onion:<port>`` while our onion service is published."""

    def tor_error() -> str | None:
        """Why Tor is not working, or None."""

    def share_by_path(path: str) -> object:
        """The runtime of the share at ``path`` (a real path), or None."""

    def create_share(path: str) -> object:
        """(async) Make a new share of an existing directory; its runtime."""

    def share_with_keys(keys: object, path: str) -> object:
        """(async) Make an empty directory the share whose saved keys are given; its runtime."""

    def size_warning(path: str) -> object:
        """(async) A warning for a share that is a home directory or very large, or None."""

    def remove_share(path: str) -> object:
        """(async) Detach the share at ``path``."""

    def create_code(path: str, level: str, one_time: bool, lifetime: float | None) -> object:
        """(async) A new access code for the share at ``path``."""

    def cancel_code(access_id_prefix: str) -> object:
        """(async) Cancel the one live code whose access ID starts with the prefix."""

    def add_join(code: bytes, path: str, peers: list[str], merge: bool = False) -> object:
        """(async) Remember a code we were given and start looking for its share."""

    def remove_join(path: str) -> object:
        """(async) Forget the pending or failed attach into ``path``; whether there was one."""

    def share_health(runtime: object) -> dict:
        """A share's health for its status: ``last_in_sync``, ``last_verified``, and
        ``warnings`` and ``damaged`` files if any."""

    def verify_share(runtime: object) -> object:
        """(async) Read every file of the share back against its SHA-256 now."""

    def share_setting(share_id: str, key: str) -> object:
        """The stored value of a share's own setting, or None when it was never set."""

    def set_share_setting(share_id: str, key: str, value: object) -> object:
        """(async) Store a share's own checked setting (or ``paused``) and apply it."""

    def setting(key: str) -> object:
        """The stored value of a setting, or None when it was never set."""

    def set_setting(key: str, value: object) -> object:
        """(async) Store a checked setting and apply what applies at once."""

    def web_login() -> dict | None:
        """``{"url": …, "expires": …}`` to log a browser in once; None without a web UI."""

    def remember_manual_peer(share_id: str, address: str) -> object:
        """(async) Keep a peer address for a share and dial it."""
