-- Starts reconciling users: from now until the fence deadline, their events are journaled.
-- (transition.lua is prepended.)
--
-- KEYS[1] the users being reconciled (member = user id, score = fence deadline in ms)
-- ARGV[1] the prefix of journal keys, ARGV[2] the fence's length in ms, ARGV[3..] user ids
local now = now_ms()
-- Fences left by reconciles that died have expired: drop them, so events stop checking.
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local deadline = now + tonumber(ARGV[2])
for i = 3, #ARGV do
  redis.call('DEL', ARGV[1] .. ARGV[i])
  redis.call('ZADD', KEYS[1], deadline, ARGV[i])
end
return #ARGV - 2
