-- Read-only shares keep every page of a paged signed manifest (protocol/readonly.md):
-- a manifest row is now one page, keyed by its origin and `part` (revision/page).
-- Rows of the older schema get an empty part; the daemon rewrites them under
-- their own part when it loads them.

CREATE TABLE signed_messages_paged (
    share_id   TEXT NOT NULL REFERENCES shares (share_id) ON DELETE CASCADE,
    kind       TEXT NOT NULL CHECK (kind IN ('manifest', 'update')),
    key        TEXT NOT NULL,                 -- manifest: origin peer ID; update: path
    part       TEXT NOT NULL DEFAULT '',      -- manifest: "<revision>/<page>"; update: ''
    text       BLOB NOT NULL,                 -- the exact signed JSON line
    signature  BLOB NOT NULL,
    PRIMARY KEY (share_id, kind, key, part)
);

INSERT INTO signed_messages_paged (share_id, kind, key, part, text, signature)
    SELECT share_id, kind, key, '', text, signature FROM signed_messages ORDER BY rowid;
DROP TABLE signed_messages;
ALTER TABLE signed_messages_paged RENAME TO signed_messages;
