-- Finishes reconciling users once `reconcile_truth.lua` has written all their truth: counts the
-- unread (the tally's, plus the notifications created after the table was read, which only the
-- journal names), sets the pending delta so that stored + pending is that true count, holds
-- it as the user's real-time count, makes the draft the user's reconciled picture and lifts the
-- fence. Its work is bounded by the journals, not by the users' notifications.
-- (lease.lua and transition.lua are prepended: KEYS[1] the lease, ARGV[1] the holder's token.)
--
-- KEYS[2] pending, KEYS[3] the users being reconciled
-- ARGV[2] the prefix of journal keys, ARGV[3] the prefix of reconciled-set keys,
-- ARGV[4] how long the reconciled set is kept (ms)
-- ARGV[5] the pub/sub channel told which users' counts changed (comma-separated ids)
-- ARGV[6] the prefix of draft keys, ARGV[7] the prefix of tally keys
-- ARGV[8..] per user: user id, stored count, count bucket key, field in it
-- Returns per user {user id, 'repaired', stored + pending before the reconcile's corrections,
-- true count}, or
-- {user id, 'unfinished'} when the fence expired (the reconcile took too long; states and counts
-- still agree, as every chunk left them; try that user again).
local now = now_ms()
local results = {}
local moved = {}
for i = 8, #ARGV, 4 do
  local user, stored, bucket, field = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2], ARGV[i + 3]
  local deadline = redis.call('ZSCORE', KEYS[3], user)
  local draft, tally = ARGV[6] .. user, ARGV[7] .. user
  if not deadline or tonumber(deadline) <= now or redis.call('EXISTS', tally) == 0 then
    results[#results + 1] = {user, 'unfinished'}
  else
    local unread, corrected = unpack(redis.call('HMGET', tally, 'unread', 'corrected'))
    local actual = tonumber(unread)
    -- Notifications the journal names that the table did not hold: created after it was read,
    -- so their state in Redis is already the journal's result. They join the picture.
    local journal_key = ARGV[2] .. user
    for _, entry in ipairs(redis.call('LRANGE', journal_key, 0, -1)) do
      local _, key, pos = string.match(entry, '^(%S+) (%S+) (%S+)$')
      local slot = key .. ' ' .. string.sub(pos, 2)
      if redis.call('SADD', draft, slot) == 1
        and redis.call('BITFIELD', key, 'GET', 'u2', pos)[1] == UNREAD then
        actual = actual + 1
      end
    end
    local reconciled_key = ARGV[3] .. user
    redis.call('UNLINK', reconciled_key)
    redis.call('RENAME', draft, reconciled_key)
    redis.call('PEXPIRE', reconciled_key, tonumber(ARGV[4]))
    -- What countersink would count without this reconcile: the drift it repaired.
    local before = stored + tonumber(redis.call('ZSCORE', KEYS[2], user) or '0') - tonumber(corrected)
    if actual - stored == 0 then
      redis.call('ZREM', KEYS[2], user)
    else
      redis.call('ZADD', KEYS[2], actual - stored, user)
    end
    redis.call('HSET', bucket, field, actual)
    if actual ~= before + tonumber(corrected) then moved[#moved + 1] = user end
    redis.call('UNLINK', journal_key, tally)
    redis.call('ZREM', KEYS[3], user)
    results[#results + 1] = {user, 'repaired', before, actual}
  end
end
if #moved > 0 then
  redis.call('PUBLISH', ARGV[5], table.concat(moved, ','))
end
return results
