-- Live conflict copies, looked up by every share status: without this, each
-- status read every row of the share.
CREATE INDEX files_conflict_copies ON files (share_id, path)
    WHERE conflict_source IS NOT NULL AND deleted = 0;
