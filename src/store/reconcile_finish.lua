-- Finishes reconciling users whose truth `reconcile_truth.lua` wrote: replays the events
-- journaled since the fence went up on top of the truth of the notifications they name, counts
-- the unread, sets the user's pending delta so that stored + pending is the true count, holds
-- that count as the user's real-time count, makes the draft the user's reconciled picture and
-- lifts the fence. Its work per user is bounded by the journal, not by the user's notifications.
-- (lease.lua and transition.lua are prepended: KEYS[1] the lease, ARGV[1] the holder's token.)
--
-- KEYS[2] pending, KEYS[3] the users being reconciled
-- ARGV[2] the prefix of journal keys, ARGV[3] the prefix of reconciled-set keys,
-- ARGV[4] how long the reconciled set is kept (ms)
-- ARGV[5] the pub/sub channel told which users' counts changed (comma-separated ids)
-- ARGV[6] the prefix of draft keys, ARGV[7] the prefix of overwritten-truth keys
-- ARGV[8..] per user: user id, stored count, the table's unread count (as read), count bucket
--           key, field in it
-- Returns per user {user id, 'done', stored + pending before, true count}, or {user id,
-- 'expired'} when the fence expired (the reconcile took too long): nothing changed, try that
-- user again.
local now = now_ms()
local results = {}
local moved = {}
for i = 8, #ARGV, 5 do
  local user, stored, actual = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  local bucket, field = ARGV[i + 3], ARGV[i + 4]
  local deadline = redis.call('ZSCORE', KEYS[3], user)
  local draft_key, truth_key = ARGV[6] .. user, ARGV[7] .. user
  if not deadline or tonumber(deadline) <= now or redis.call('EXISTS', draft_key) == 0 then
    results[#results + 1] = {user, 'expired'}
  else
    -- Per slot the journal names: the table's state (`truth`) replayed (`known`), or, for a
    -- notification the table did not hold when read, Redis's own state, which is already the
    -- journal's result (`extra`).
    local truth, known, extra = {}, {}, {}
    local journal_key = ARGV[2] .. user
    for _, entry in ipairs(redis.call('LRANGE', journal_key, 0, -1)) do
      local op, key, pos = string.match(entry, '^(%S+) (%S+) (%S+)$')
      local slot = key .. ' ' .. string.sub(pos, 2)
      if known[slot] == nil and extra[slot] == nil then
        if redis.call('SISMEMBER', draft_key, slot) == 1 then
          -- The truth an event overwrote (kept by `apply_events.lua`), or, when none did since
          -- the truth was written, the state now.
          local kept = redis.call('HGET', truth_key, slot)
          truth[slot] = kept and tonumber(kept) or redis.call('BITFIELD', key, 'GET', 'u2', pos)[1]
          known[slot] = truth[slot]
        else
          extra[slot] = {key, pos}
        end
      end
      if known[slot] ~= nil then known[slot] = transition(known[slot], op) end
    end
    for slot, state in pairs(known) do
      local key, index = string.match(slot, '^(%S+) (%S+)$')
      redis.call('BITFIELD', key, 'SET', 'u2', '#' .. index, state)
      actual = actual + (state == UNREAD and 1 or 0) - (truth[slot] == UNREAD and 1 or 0)
    end
    for slot, where in pairs(extra) do
      -- Created after the read: from now on it belongs to the reconciled picture.
      redis.call('SADD', draft_key, slot)
      if redis.call('BITFIELD', where[1], 'GET', 'u2', where[2])[1] == UNREAD then actual = actual + 1 end
    end
    -- The draft becomes the picture. The old picture may hold a million members: UNLINK frees
    -- it without blocking Redis (a RENAME over it would free it in place).
    local reconciled_key = ARGV[3] .. user
    redis.call('UNLINK', reconciled_key)
    redis.call('RENAME', draft_key, reconciled_key)
    redis.call('PEXPIRE', reconciled_key, tonumber(ARGV[4]))
    local before = stored + tonumber(redis.call('ZSCORE', KEYS[2], user) or '0')
    if actual - stored == 0 then
      redis.call('ZREM', KEYS[2], user)
    else
      redis.call('ZADD', KEYS[2], actual - stored, user)
    end
    redis.call('HSET', bucket, field, actual)
    if actual ~= before then moved[#moved + 1] = user end
    redis.call('UNLINK', journal_key, truth_key)
    redis.call('ZREM', KEYS[3], user)
    results[#results + 1] = {user, 'done', before, actual}
  end
end
if #moved > 0 then
  redis.call('PUBLISH', ARGV[5], table.concat(moved, ','))
end
return results
