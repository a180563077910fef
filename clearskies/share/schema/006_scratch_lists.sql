-- What peers announced and what a share wants last only as long as the daemon
-- runs (every row of a share was dropped when the share started).  They now live
-- in temporary tables of the database connection (scratch.sql), so the many rows
-- a sync writes and deletes never pass through the write-ahead log or its
-- checkpoints.
DROP INDEX wanted_sources_by_peer;
DROP TABLE wanted_sources;
DROP TABLE wanted;
DROP TABLE announced;
