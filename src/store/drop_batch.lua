-- Drops a batch whose deltas are committed to the database.
--
-- KEYS[1] the batch key, KEYS[2] the set of batch ids; ARGV[1] the batch id
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
return 1
