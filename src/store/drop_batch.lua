-- Drops a batch whose deltas are committed to the database.
-- (lease.lua is prepended: KEYS[1] the lease, ARGV[1] the holder's token.)
--
-- KEYS: lease batch batches
-- ARGV: token batch_id
-- KEYS[2] the batch key, KEYS[3] the set of batch ids; ARGV[2] the batch id
redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[3], ARGV[2])
return 1
