-- The hand-off sequence number of each batch: a Redis whose sequence is below the highest one
-- recorded here went back in time (a restart from an older snapshot), and its pending deltas
-- may already be in the database.
ALTER TABLE countersink_flush_batches ADD COLUMN handoff_seq BIGINT NOT NULL DEFAULT 0;
