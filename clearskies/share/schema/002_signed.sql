-- Read-only shares: the read_write peers' signed manifests and changes, kept
-- verbatim so they can be relayed to other read-only peers (protocol/readonly.md).

CREATE TABLE signed_messages (
    share_id   TEXT NOT NULL REFERENCES shares (share_id) ON DELETE CASCADE,
    kind       TEXT NOT NULL CHECK (kind IN ('manifest', 'update')),
    key        TEXT NOT NULL,                 -- manifest: origin peer ID; update: path
    text       BLOB NOT NULL,                 -- the exact signed JSON line
    signature  BLOB NOT NULL,
    PRIMARY KEY (share_id, kind, key)
);
