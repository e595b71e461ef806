-- Hands the pending set off to a batch, atomically: after this, new deltas start a fresh set.
--
-- KEYS[1] pending, KEYS[2] the batch key, KEYS[3] the set of batch ids, KEYS[4] the hand-off sequence
-- ARGV[1] the batch id
-- Returns the batch's hand-off sequence number, or 0 if nothing was pending.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
redis.call('RENAME', KEYS[1], KEYS[2])
redis.call('SADD', KEYS[3], ARGV[1])
-- Readers compare this before and after reading the database (a sequence lock); the flush
-- records it with the batch, to notice a Redis that went back in time.
return redis.call('INCR', KEYS[4])
