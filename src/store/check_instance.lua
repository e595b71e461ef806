-- Whether this Redis server vouches for the state (instance.lua is prepended). Read-only.
--
-- KEYS: instance last_restart handoff_seq pending
-- ARGV: (none)
-- KEYS[1] the instance key, KEYS[2] the last restart's record (see vouch.lua),
-- KEYS[3] the hand-off sequence, KEYS[4] pending
-- Returns {this server's run id, the run id in the key or '', the last restart's record or '',
-- 1 if nothing was ever vouched for, handed off or left pending (a new state) else 0}.
local vouched_by = redis.call('GET', KEYS[1])
local new = not vouched_by and redis.call('EXISTS', KEYS[3]) == 0 and redis.call('EXISTS', KEYS[4]) == 0
return {this_server(), vouched_by or '', redis.call('GET', KEYS[2]) or '', new and 1 or 0}
