-- Whether a batch a flush read is still the one on this Redis server, before the flush commits it
-- (instance.lua is prepended). Read-only. A Redis that restarted from an older snapshot may have
-- lost the batch under the flush (its chunk reads then come back short or empty), or hold it
-- again as it was; only a vouched-for state with the batch whole is committed.
--
-- KEYS: batch instance
-- ARGV: (none)
-- KEYS[1] the batch, KEYS[2] the instance key
-- Returns {users in the batch (0 if it is gone), 1 if this server vouches for the state else 0}.
return {redis.call('ZCARD', KEYS[1]), redis.call('GET', KEYS[2]) == this_server() and 1 or 0}
