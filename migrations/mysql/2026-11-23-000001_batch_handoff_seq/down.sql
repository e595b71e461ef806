ALTER TABLE countersink_flush_batches DROP COLUMN handoff_seq;
