-- Per-file lists that grow with the tree and last only while the daemon runs:
-- read back one page at a time instead of being held whole in its memory.
-- TEMP tables: private to the connection, never in the database file, gone on
-- close; SQLite keeps them in a page cache of its own (about 2 MB) and spills
-- to a temporary file beyond that.  Not numbered: made anew by every
-- connection (StateDatabase), not migrated.

-- What each peer announced (its manifest, later updates and moves): its latest
-- record per path, in the columns of `files`.
CREATE TEMP TABLE announced (
    share_id        TEXT NOT NULL,
    peer_id         TEXT NOT NULL,
    path            TEXT NOT NULL,
    utime           REAL NOT NULL,
    deleted         INTEGER NOT NULL DEFAULT 0,
    is_dir          INTEGER NOT NULL DEFAULT 0,
    size            INTEGER,
    mtime_sec       INTEGER,
    mtime_nsec      INTEGER,
    mode            INTEGER,
    sha256          TEXT,
    vv              TEXT NOT NULL DEFAULT '{}',
    file_id         TEXT,
    file_key        TEXT,
    conflict_source TEXT,
    acked           TEXT,                     -- SHA-256 of our content the peer holds
    announced       INTEGER NOT NULL DEFAULT 1, -- 0: a row holding only `acked`
    PRIMARY KEY (share_id, peer_id, path)
) WITHOUT ROWID;

-- Files the share needs: the record to fetch and what to ask peers for.
CREATE TEMP TABLE wanted (
    share_id        TEXT NOT NULL,
    path            TEXT NOT NULL,
    utime           REAL NOT NULL,
    deleted         INTEGER NOT NULL DEFAULT 0,
    is_dir          INTEGER NOT NULL DEFAULT 0,
    size            INTEGER,
    mtime_sec       INTEGER,
    mtime_nsec      INTEGER,
    mode            INTEGER,
    sha256          TEXT,
    vv              TEXT NOT NULL DEFAULT '{}',
    file_id         TEXT,
    file_key        TEXT,
    conflict_source TEXT,
    fetch_path      TEXT,                     -- what to ask peers for, when not path
    PRIMARY KEY (share_id, path)
) WITHOUT ROWID;

-- Which connected peers announced a wanted file's content.
CREATE TEMP TABLE wanted_sources (
    share_id  TEXT NOT NULL,
    path      TEXT NOT NULL,
    peer_id   TEXT NOT NULL,
    PRIMARY KEY (share_id, path, peer_id),
    FOREIGN KEY (share_id, path) REFERENCES wanted (share_id, path) ON DELETE CASCADE
) WITHOUT ROWID;

CREATE INDEX temp.wanted_sources_by_peer ON wanted_sources (share_id, peer_id);
