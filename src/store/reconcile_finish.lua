-- Finishes reconciling users once `reconcile_truth.lua` has written all their truth: counts the
-- unread (the tally's, plus the notifications created after the table was read, which only the
-- journal names), sets the pending delta so that stored + pending is that true count, holds
-- it as the user's real-time count, makes the draft the user's reconciled picture and lifts the
-- fence. Its work is bounded by the journals, not by the users' notifications.
--
-- Two kinds of journaled events are not what the replay assumes (newer than the table's read):
-- - an event for a notification the table did not hold, which Redis knew before the fence (the
--   state before its first journaled event was not unseen): the notification was deleted before
--   the read (a late retry of its creation, or any late event), or it is another user's now (its
--   recipient changed). It is not counted (its state is left alone: it may be another user's);
-- - an event that changed the state of a notification the table held, and occurred before the
--   fence began (by the sender's clock against Redis's; a clock ahead of Redis's hides as much, an
--   event with no time is not judged): it committed before the read, perhaps under a later change
--   the read saw (a bulk update, raw SQL), which its replay then undid. Its user is queued for
--   another recount, which reads the table after the event's commit; at most once per user in
--   ARGV[9] ms, so a sender whose clock is behind cannot keep a user recounted back to back.
-- (lease.lua and transition.lua are prepended: KEYS[1] the lease, ARGV[1] the holder's token.)
--
-- KEYS: lease pending reconciling recounts
-- ARGV: token journal_prefix reconciled_prefix grace_ms live_channel draft_prefix tally_prefix recounted_again_prefix recount_again_ms ..users
-- KEYS[2] pending, KEYS[3] the users being reconciled, KEYS[4] the users waiting for a recount
-- ARGV[2] the prefix of journal keys, ARGV[3] the prefix of reconciled-set keys,
-- ARGV[4] how long the reconciled set is kept (ms)
-- ARGV[5] the pub/sub channel told which users' counts changed (comma-separated ids)
-- ARGV[6] the prefix of draft keys, ARGV[7] the prefix of tally keys
-- ARGV[8] the prefix of the keys that mark a user recounted again recently, ARGV[9] their life (ms)
-- ARGV[10..] per user: user id, stored count, count bucket key, field in it
-- Returns per user {user id, 'repaired', stored + pending before the reconcile's corrections,
-- true count, 1 if queued for another recount else 0}, or
-- {user id, 'unfinished'} when the fence expired (the reconcile took too long; states and counts
-- still agree, as every chunk left them; try that user again).
local now = now_ms()
local results = {}
local moved = {}
for i = 10, #ARGV, 4 do
  local user, stored, bucket, field = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2], ARGV[i + 3]
  local deadline = redis.call('ZSCORE', KEYS[3], user)
  local draft, tally = ARGV[6] .. user, ARGV[7] .. user
  if not deadline or tonumber(deadline) <= now or redis.call('EXISTS', tally) == 0 then
    results[#results + 1] = {user, 'unfinished'}
  else
    local unread, corrected, began = unpack(redis.call('HMGET', tally, 'unread', 'corrected', 'began'))
    local actual = tonumber(unread)
    began = tonumber(began) or now
    local again = 0
    -- slot -> true for the notifications the table held (already in the draft), false for those
    -- it did not; decided at each slot's first journaled event.
    local held = {}
    local journal_key = ARGV[2] .. user
    for _, entry in ipairs(redis.call('LRANGE', journal_key, 0, -1)) do
      -- Entries journaled before this format had no state and no time: "" for both.
      local op, key, pos, old, occurred = string.match(entry, '^(%S+) (%S+) (%S+) ?(%d*) ?(%d*)$')
      local slot = key .. ' ' .. string.sub(pos, 2)
      if held[slot] == nil then
        held[slot] = redis.call('SISMEMBER', draft, slot) == 1
        if not held[slot] and (old == '' or tonumber(old) == UNSEEN) then
          -- Created after the table was read: its state in Redis is already the journal's
          -- result, and it joins the picture.
          redis.call('SADD', draft, slot)
          if redis.call('BITFIELD', key, 'GET', 'u2', pos)[1] == UNREAD then
            actual = actual + 1
          end
        end
      end
      local at = tonumber(occurred) or 0
      if held[slot] and again == 0 and at > 0 and at < began then
        local new, why = transition(tonumber(old), op)
        if not why and new ~= tonumber(old)
          and redis.call('SET', ARGV[8] .. user, '1', 'NX', 'PX', ARGV[9]) then
          redis.call('SADD', KEYS[4], user)
          again = 1
        end
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
    results[#results + 1] = {user, 'repaired', before, actual, again}
  end
end
if #moved > 0 then
  redis.call('PUBLISH', ARGV[5], table.concat(moved, ','))
end
return results
