-- Finishes reconciling users: sets each notification's state to what the Notification table
-- says, replays the events journaled since the fence went up, and sets the user's pending
-- delta so that stored + pending is the true count, and holds that count as the user's real-time
-- count. (lease.lua and transition.lua are prepended: KEYS[1] the lease, ARGV[1] the holder's
-- token.)
--
-- KEYS[2] pending, KEYS[3] the users being reconciled
-- ARGV[2] the prefix of journal keys, ARGV[3] the prefix of reconciled-set keys,
-- ARGV[4] how long the reconciled set is kept (ms)
-- ARGV[5] the pub/sub channel told which users' counts changed (comma-separated ids)
-- ARGV[6..] per user: user id, stored count, count bucket key, field in it, n, then n triples
--           (state key, index in shard, state)
-- Returns per user {user id, stored + pending before, true count}, or {user id, -1, -1} when the
-- fence expired (the reconcile took too long; try that user again).
local now = now_ms()
local results = {}
local i = 6
local moved = {}
while i <= #ARGV do
  local user, stored, n = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 4])
  local bucket, field = ARGV[i + 2], ARGV[i + 3]
  local rows_at = i + 5
  i = rows_at + 3 * n
  local deadline = redis.call('ZSCORE', KEYS[3], user)
  if not deadline or tonumber(deadline) <= now then
    results[#results + 1] = {user, -1, -1}
  else
    -- The table's truth, then what arrived since it was read.
    local known, extra = {}, {}
    for r = rows_at, rows_at + 3 * (n - 1), 3 do
      known[ARGV[r] .. ' ' .. ARGV[r + 1]] = tonumber(ARGV[r + 2])
    end
    local journal_key = ARGV[2] .. user
    for _, entry in ipairs(redis.call('LRANGE', journal_key, 0, -1)) do
      local op, key, pos = string.match(entry, '^(%S+) (%S+) (%S+)$')
      local slot = key .. ' ' .. string.sub(pos, 2)
      if known[slot] ~= nil then
        known[slot] = transition(known[slot], op)
      else
        -- Created after the table was read: its state in Redis is already the journal's result.
        extra[slot] = {key, pos}
      end
    end
    local actual = 0
    local reconciled_key = ARGV[3] .. user
    redis.call('DEL', reconciled_key)
    for slot, state in pairs(known) do
      local key, index = string.match(slot, '^(%S+) (%S+)$')
      redis.call('BITFIELD', key, 'SET', 'u2', '#' .. index, state)
      redis.call('SADD', reconciled_key, slot)
      if state == UNREAD then actual = actual + 1 end
    end
    for slot, where in pairs(extra) do
      redis.call('SADD', reconciled_key, slot)
      if redis.call('BITFIELD', where[1], 'GET', 'u2', where[2])[1] == UNREAD then actual = actual + 1 end
    end
    -- The empty member keeps the set alive for a user with no notification at all: an empty
    -- picture still guards against in-flight deletes.
    redis.call('SADD', reconciled_key, '')
    redis.call('PEXPIRE', reconciled_key, tonumber(ARGV[4]))
    local before = stored + tonumber(redis.call('ZSCORE', KEYS[2], user) or '0')
    if actual - stored == 0 then
      redis.call('ZREM', KEYS[2], user)
    else
      redis.call('ZADD', KEYS[2], actual - stored, user)
    end
    redis.call('HSET', bucket, field, actual)
    if actual ~= before then moved[#moved + 1] = user end
    redis.call('DEL', journal_key)
    redis.call('ZREM', KEYS[3], user)
    results[#results + 1] = {user, before, actual}
  end
end
if #moved > 0 then
  redis.call('PUBLISH', ARGV[5], table.concat(moved, ','))
end
return results
