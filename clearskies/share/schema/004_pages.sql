-- Per-file lists that grow with the tree are kept here and read back one page at a
-- time, instead of being held whole in the daemon's memory.

-- What each peer announced (its manifest, later updates and moves): its latest
-- record per path, in the columns of `files`.
CREATE TABLE announced (
    share_id        TEXT NOT NULL REFERENCES shares (share_id) ON DELETE CASCADE,
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
CREATE TABLE wanted (
    share_id        TEXT NOT NULL REFERENCES shares (share_id) ON DELETE CASCADE,
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
CREATE TABLE wanted_sources (
    share_id  TEXT NOT NULL,
    path      TEXT NOT NULL,
    peer_id   TEXT NOT NULL,
    PRIMARY KEY (share_id, path, peer_id),
    FOREIGN KEY (share_id, path) REFERENCES wanted (share_id, path) ON DELETE CASCADE
) WITHOUT ROWID;

CREATE INDEX wanted_sources_by_peer ON wanted_sources (share_id, peer_id);
