-- Hands the pending set off to a batch, atomically: after this, new deltas start a fresh set.
-- (lease.lua and instance.lua are prepended: KEYS[1] the lease, ARGV[1] the holder's token.)
--
-- KEYS: lease pending batch batches handoff_seq instance
-- ARGV: token batch_id
-- KEYS[2] pending, KEYS[3] the batch key, KEYS[4] the set of batch ids, KEYS[5] the hand-off sequence,
-- KEYS[6] the instance key
-- ARGV[2] the batch id
-- Returns the batch's hand-off sequence number, or 0 if nothing was pending.
-- Fails with `UNVOUCHED` when this Redis server does not vouch for the pending deltas: restored
-- from a snapshot, they may be stored already.
if redis.call('EXISTS', KEYS[2]) == 0 then
  return 0
end
if redis.call('GET', KEYS[6]) ~= this_server() then
  return redis.error_reply('UNVOUCHED Redis restarted since its pending deltas were vouched for; nothing was handed off')
end
redis.call('RENAME', KEYS[2], KEYS[3])
redis.call('SADD', KEYS[4], ARGV[2])
-- Readers compare this before and after reading the database (a sequence lock); the flush
-- records it with the batch, to notice a Redis that went back in time.
return redis.call('INCR', KEYS[5])
