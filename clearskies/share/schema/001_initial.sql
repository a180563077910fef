-- State of every share this daemon holds: one database per daemon.
-- Applied inside one transaction by clearskies.share.database; the runner
-- sets PRAGMA user_version to this file's number afterwards.

CREATE TABLE shares (
    share_id   TEXT PRIMARY KEY,              -- 64 lowercase hex
    path       TEXT NOT NULL UNIQUE,          -- absolute local root
    peer_id    TEXT NOT NULL,                 -- our peer ID in this share
    access     TEXT NOT NULL
               CHECK (access IN ('read_write', 'read_only', 'untrusted', 'unknown')),
    revision   INTEGER NOT NULL DEFAULT 0,    -- bumped once per committed change set
    state      TEXT NOT NULL DEFAULT 'ok' CHECK (state IN ('ok', 'error')),
    error      TEXT,                          -- why the share is in the error state
    last_scan  REAL,                          -- start time of the last completed full scan
    created    REAL NOT NULL
);

-- One row per path ever seen in a share; deletions stay as tombstones.
CREATE TABLE files (
    share_id        TEXT NOT NULL REFERENCES shares (share_id) ON DELETE CASCADE,
    path            TEXT NOT NULL,            -- wire form: relative, '/'-separated, NFC
    utime           REAL NOT NULL,
    deleted         INTEGER NOT NULL DEFAULT 0,
    is_dir          INTEGER NOT NULL DEFAULT 0,
    size            INTEGER,
    mtime_sec       INTEGER,
    mtime_nsec      INTEGER,
    mode            INTEGER,                  -- permission bits only
    sha256          TEXT,
    vv              TEXT NOT NULL DEFAULT '{}', -- version vector, JSON object
    file_id         TEXT,
    file_key        TEXT,
    conflict_source TEXT,
    revision        INTEGER NOT NULL,         -- share revision that last changed this row
    -- Cache key of the local copy: when all three still match, the content
    -- is unchanged and is not hashed again.  NULL = unknown, hash next time.
    local_inode     INTEGER,
    local_size      INTEGER,
    local_mtime_ns  INTEGER,
    PRIMARY KEY (share_id, path)
) WITHOUT ROWID;

CREATE INDEX files_by_revision ON files (share_id, revision);
CREATE INDEX files_by_sha256 ON files (share_id, sha256) WHERE sha256 IS NOT NULL;

CREATE TABLE peers (
    share_id          TEXT NOT NULL REFERENCES shares (share_id) ON DELETE CASCADE,
    peer_id           TEXT NOT NULL,
    name              TEXT,
    last_seen         REAL,
    addresses         TEXT NOT NULL DEFAULT '[]', -- JSON list of "proto:host:port"
    manifest_revision NUMERIC,                  -- their last manifest revision we saw (int, or a
                                                -- float "version" from the reference peer)
    acked_revision    INTEGER,                  -- our revision they have acknowledged
    PRIMARY KEY (share_id, peer_id)
) WITHOUT ROWID;

CREATE TABLE access_codes (
    access_id  TEXT PRIMARY KEY,                -- SHA-256 hex of the code bytes
    code       TEXT NOT NULL,                   -- the 16 code bytes, hex (secret)
    share_id   TEXT NOT NULL REFERENCES shares (share_id) ON DELETE CASCADE,
    level      TEXT NOT NULL CHECK (level IN ('read_write', 'read_only', 'untrusted')),
    created    REAL NOT NULL,
    expires    REAL,                            -- NULL: never
    one_time   INTEGER NOT NULL DEFAULT 1,
    used       INTEGER NOT NULL DEFAULT 0,
    revoked    INTEGER NOT NULL DEFAULT 0
);

CREATE INDEX access_codes_by_share ON access_codes (share_id);

CREATE TABLE config (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL                         -- JSON
) WITHOUT ROWID;
