-- Runs a list of commands atomically, only while the caller holds the flush lease: the fenced
-- form of MULTI/EXEC, for writes under the lease that need no logic of their own (the
-- bootstrap's state writes and checkpoints, a resync after a Redis rollback; claimed.lua may come
-- first, so the commands are read from ARGV[2] and keys are only declared).
-- (lease.lua is prepended: KEYS[1] the lease, ARGV[1] the holder's token.)
--
-- KEYS: lease ..written
-- ARGV: token ..commands
-- KEYS[2..] the keys the commands write (declared for Redis; all under one hash tag)
-- ARGV[2..] the commands: per command its word count n, then its n words (name, arguments)
-- Returns the number of commands run.
local i, run = 2, 0
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  redis.call(unpack(ARGV, i + 1, i + n))
  i = i + n + 1
  run = run + 1
end
return run
