-- Starts reconciling users: from now until the fence deadline, their events are journaled, and
-- each gets an empty draft of its reconciled picture and a zero tally (with the time the fence
-- began, which `reconcile_finish.lua` compares events with), which `reconcile_truth.lua` fills a
-- chunk at a time.
-- (lease.lua and transition.lua are prepended: KEYS[1] the lease, ARGV[1] the holder's token.)
--
-- KEYS: lease reconciling
-- ARGV: token journal_prefix fence_ms draft_prefix tally_prefix ..users
-- KEYS[2] the users being reconciled (member = user id, score = fence deadline in ms)
-- ARGV[2] the prefix of journal keys, ARGV[3] the fence's length in ms,
-- ARGV[4] the prefix of draft keys, ARGV[5] the prefix of tally keys,
-- ARGV[6..] user ids
-- Returns the number of users fenced.
local now = now_ms()
-- Fences left by reconciles that died have expired: drop them, so events stop checking.
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local fence = tonumber(ARGV[3])
local deadline = now + fence
for i = 6, #ARGV do
  local user = ARGV[i]
  -- A reconcile that died leaves its journal and draft behind (a draft may hold a million
  -- members): UNLINK frees them without blocking Redis.
  redis.call('UNLINK', ARGV[2] .. user, ARGV[4] .. user, ARGV[5] .. user)
  -- The empty member keeps the draft alive for a user with no notification at all: an empty
  -- picture still guards against in-flight deletes. Both outlive the fence, so they exist
  -- whenever it holds, and expire by themselves after a reconcile that died.
  redis.call('SADD', ARGV[4] .. user, '')
  redis.call('PEXPIRE', ARGV[4] .. user, 2 * fence)
  redis.call('HSET', ARGV[5] .. user, 'unread', 0, 'corrected', 0, 'began', now)
  redis.call('PEXPIRE', ARGV[5] .. user, 2 * fence)
  redis.call('ZADD', KEYS[2], deadline, user)
end
return #ARGV - 5
