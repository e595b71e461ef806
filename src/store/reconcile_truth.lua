-- Writes one chunk of the Notification table's truth for users being reconciled. A reconcile
-- calls it once per chunk of at most `TRUTH_STATES_PER_CALL` notifications, so no call blocks
-- Redis for long however many notifications a user has; events keep applying between the calls.
--
-- Each chunk leaves states and counts agreeing, so a reconcile that stops after any chunk (it
-- died, or its fence expired) leaves nothing wrong, only unfinished. For each notification:
-- its new state is the table's, with the events journaled since the fence replayed on top (they
-- may be newer than the read); the user's pending delta and held count move by the change in
-- unread (an unread state counts as the event script counts it: not if the last reconcile's
-- picture, still kept, took the notification for gone), which the user's tally keeps as
-- `corrected`; the notification joins the user's draft
-- picture, and the tally's `unread` counts it if unread (events after this call keep that count,
-- see `apply_events.lua`).
-- (lease.lua, transition.lua and move_counts.lua are prepended: KEYS[1] the lease, ARGV[1] the
-- holder's token.)
--
-- KEYS: lease reconciling pending
-- ARGV: token journal_prefix draft_prefix tally_prefix reconciled_prefix live_channel fence_ms ..pieces
-- KEYS[2] the users being reconciled (member = user id, score = fence deadline in ms)
-- KEYS[3] pending (member = user id, score = pending delta)
-- ARGV[2] the prefix of journal keys, ARGV[3] the prefix of draft keys,
-- ARGV[4] the prefix of tally keys, ARGV[5] the prefix of reconciled-set keys,
-- ARGV[6] the pub/sub channel told which users' counts changed (comma-separated ids)
-- ARGV[7] the fence's length in ms: a chunk moves its users' fence deadlines that far ahead, so a
--         reconcile that keeps writing (a user with millions of notifications) keeps its fence,
--         and one that stalled loses it that long after its last chunk
-- ARGV[8..] groups of one user's notifications in one state shard: user id, count bucket key,
--           field in it, state key, n, then n pairs (index in shard, state)
-- Returns the number of states written: a user whose fence expired is skipped (their events are
-- no longer journaled, so a truth written now could be older than an event already applied).
local now = now_ms()
local fenced, journals = {}, {}
local deltas, users, buckets = {}, {}, {}

-- The ops journaled for each notification of `user` so far, by slot ("state key index").
local function journaled(user)
  if journals[user] == nil then
    local ops = {}
    for _, entry in ipairs(redis.call('LRANGE', ARGV[2] .. user, 0, -1)) do
      local op, key, pos = string.match(entry, '^(%S+) (%S+) (%S+)')
      local slot = key .. ' ' .. string.sub(pos, 2)
      if ops[slot] == nil then ops[slot] = {} end
      table.insert(ops[slot], op)
    end
    journals[user] = ops
  end
  return journals[user]
end

local written = 0
local fence = tonumber(ARGV[7])
local i = 8
while i <= #ARGV do
  local user, bucket, field, key, n = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], tonumber(ARGV[i + 4])
  local pairs_at = i + 5
  i = pairs_at + 2 * n
  if fenced[user] == nil then
    local deadline = redis.call('ZSCORE', KEYS[2], user)
    fenced[user] = deadline ~= false and deadline ~= nil and tonumber(deadline) > now
  end
  if fenced[user] and n > 0 then
    if deltas[user] == nil then
      redis.call('ZADD', KEYS[2], 'GT', now + fence, user)
      redis.call('PEXPIRE', ARGV[3] .. user, 2 * fence)
      redis.call('PEXPIRE', ARGV[4] .. user, 2 * fence)
    end
    local ops = journaled(user)
    local gets = {}
    for p = pairs_at, pairs_at + 2 * (n - 1), 2 do
      gets[#gets + 1] = 'GET'
      gets[#gets + 1] = 'u2'
      gets[#gets + 1] = '#' .. ARGV[p]
    end
    local olds = redis.call('BITFIELD', key, unpack(gets))
    local slots = {}
    for p = pairs_at, pairs_at + 2 * (n - 1), 2 do
      slots[#slots + 1] = key .. ' ' .. ARGV[p]
    end
    -- The last reconcile's picture, if still kept, counted a notification it did not hold as gone
    -- whatever its state (see `held_by_table` in `apply_events.lua`). The table holds these now:
    -- they join that picture, so their events count even if this reconcile never finishes.
    local picture = ARGV[5] .. user
    local held = {}
    if redis.call('EXISTS', picture) == 1 then
      held = redis.call('SMISMEMBER', picture, unpack(slots))
      redis.call('SADD', picture, unpack(slots))
    end
    local sets = {}
    local unread, delta = 0, 0
    for j = 1, n do
      local p = pairs_at + 2 * (j - 1)
      local slot = slots[j]
      local state = tonumber(ARGV[p + 1])
      for _, op in ipairs(ops[slot] or {}) do
        state = transition(state, op)
      end
      sets[#sets + 1] = 'SET'
      sets[#sets + 1] = 'u2'
      sets[#sets + 1] = '#' .. ARGV[p]
      sets[#sets + 1] = state
      if state == UNREAD then unread = unread + 1 end
      local counted = olds[j] == UNREAD and held[j] ~= 0
      delta = delta + (state == UNREAD and 1 or 0) - (counted and 1 or 0)
    end
    redis.call('BITFIELD', key, unpack(sets))
    redis.call('SADD', ARGV[3] .. user, unpack(slots))
    redis.call('HINCRBY', ARGV[4] .. user, 'unread', unread)
    redis.call('HINCRBY', ARGV[4] .. user, 'corrected', delta)
    if deltas[user] == nil then
      deltas[user] = 0
      users[#users + 1] = user
    end
    deltas[user] = deltas[user] + delta
    buckets[user] = {bucket, field}
    written = written + n
  end
end

move_counts(KEYS[3], users, deltas, buckets, ARGV[6])
return written
