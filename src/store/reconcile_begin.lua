-- Starts reconciling users: from now until the fence deadline, their events are journaled.
-- (lease.lua and transition.lua are prepended: KEYS[1] the lease, ARGV[1] the holder's token.)
--
-- KEYS[2] the users being reconciled (member = user id, score = fence deadline in ms)
-- ARGV[2] the prefix of journal keys, ARGV[3] the fence's length in ms, ARGV[4..] user ids
local now = now_ms()
-- Fences left by reconciles that died have expired: drop them, so events stop checking.
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local deadline = now + tonumber(ARGV[3])
for i = 4, #ARGV do
  redis.call('DEL', ARGV[2] .. ARGV[i])
  redis.call('ZADD', KEYS[2], deadline, ARGV[i])
end
return #ARGV - 3
