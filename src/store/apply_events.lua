-- Applies a batch of events atomically: one state transition per event, then per user one
-- ZINCRBY of the pending delta and, if the user's real-time count is held, one HINCRBY of it.
-- (transition.lua is prepended.)
--
-- Steps (docs/design.md, "The apply script"):
--   1. the ready marker and the idempotency record (a replay answers its first outcome);
--   2. read every state the events touch: one BITFIELD per shard, many GETs in it;
--   3. run the transitions in event order on that local copy (an event sees what the events
--      before it in the request did to the same notification), with the fences (journal), the
--      reconciled sets and the rebuilt-slot rule;
--   4. write every state that changed: one BITFIELD per shard, many SETs in it;
--   5. per user whose delta is not zero: ZINCRBY of the pending set, HINCRBY of a held count;
--      one PUBLISH; the idempotency record.
--
-- KEYS[1]   the pending sorted set (member = user id, score = pending delta)
-- KEYS[2]   the idempotency key of this request (its webhook-id)
-- KEYS[3]   the users being reconciled (member = user id, score = fence deadline in ms)
-- KEYS[4]   the marker a bootstrap writes when the state is complete
-- KEYS[5]   what the last bootstrap read: "shard index ms", the highest notification slot it
--           read (-1 -1 for none) and when it finished (unix ms)
-- KEYS[6]   the users waiting for a recount
-- KEYS[7..] state shard bitmaps, 2 bits per notification, and held-count buckets (hashes:
--           field = user id within the bucket, value = the user's real-time count)
-- ARGV[1]   seconds to remember the idempotency key; 0 when the request has none
-- ARGV[2]   the prefix of journal keys (journal key = prefix .. user id)
-- ARGV[3]   the prefix of reconciled-set keys (set key = prefix .. user id)
-- ARGV[4]   1 if the state must be bootstrapped (the marker must exist), else 0
-- ARGV[5]   the pub/sub channel told which users' counts changed (comma-separated ids)
-- ARGV[6..] 7 values per event: op, state key index (into KEYS), index in shard, user id, when
--           it occurred (unix ms, 0 if the sender did not say), the user's count bucket index
--           (into KEYS) and field in it
--
-- Returns {changed, recorded, duplicate, stale, after_delete, replayed}: events that changed a
-- count, that changed only the state, that repeated the current state, that were stale
-- creations, that arrived after the notification was deleted; replayed is 1 when the request's
-- id was seen before, and the counts are then those of its first delivery.
-- Returns {-1} when the marker is required and missing: the state was lost, nothing is applied.
local ttl = tonumber(ARGV[1])
local FIRST_EVENT, EVENT_ARGS = 6, 7
-- Arguments per command built here: Lua's unpack() must fit them on its C stack (8,000 slots).
local MAX_ARGS = 3000
local STATE_TEXT = {[UNSEEN] = '0', [READ] = '1', [UNREAD] = '2', [DELETED] = '3'}
-- The usual deltas as text (any other is formatted by tostring).
local DELTA_TEXT = {[1] = '1', [-1] = '-1'}

if ARGV[4] == '1' and redis.call('EXISTS', KEYS[4]) == 0 then
  return {-1}
end

if ttl > 0 then
  local first = redis.call('GET', KEYS[2])
  if first then
    local counts = {}
    for n in string.gmatch(first, '%d+') do counts[#counts + 1] = tonumber(n) end
    counts[#counts + 1] = 1
    return counts
  end
end

-- Runs `command` over `args` (appended to `head`) in as few calls as fit, `per` arguments at a
-- time (a multiple of one subcommand's size); calls `each(reply, first)` with the arguments'
-- offset of each call.
local function call_chunked(command, head, args, per, each)
  for s = 1, #args, per do
    local part = {}
    for j = 1, #head do part[j] = head[j] end
    for j = s, math.min(s + per - 1, #args) do part[#part + 1] = args[j] end
    local reply = redis.call(command, unpack(part))
    if each then each(reply, s) end
  end
end

-- Whether any of `keys` exists: one EXISTS (a count) for many keys.
local function any_exists(keys)
  local found = false
  call_chunked('EXISTS', {}, keys, MAX_ARGS, function(n) found = found or n > 0 end)
  return found
end

-- Step 2: the states of every notification the events touch, by shard key: `was` as read,
-- `now` as the transitions leave it, both keyed by the index's text as sent; `list` the indices
-- in first-seen order. Numbers are never passed to redis.call here: Redis formats each with
-- printf, which costs more than the command.
local key_of, shards, shard_order = {}, {}, {}
local users, user_seen = {}, {}
for i = FIRST_EVENT, #ARGV, EVENT_ARGS do
  local key_index = ARGV[i + 1]
  local key = key_of[key_index]
  if key == nil then
    key = KEYS[tonumber(key_index)]
    key_of[key_index] = key
  end
  local index = ARGV[i + 2]
  local shard = shards[key]
  if shard == nil then
    shard = {was = {}, now = {}, list = {}}
    shards[key] = shard
    shard_order[#shard_order + 1] = key
  end
  if shard.was[index] == nil then
    shard.was[index] = false
    shard.list[#shard.list + 1] = index
  end
  local user = ARGV[i + 3]
  if not user_seen[user] then
    user_seen[user] = true
    users[#users + 1] = user
  end
end
for _, key in ipairs(shard_order) do
  local shard = shards[key]
  local gets = {}
  for _, index in ipairs(shard.list) do
    gets[#gets + 1] = 'GET'
    gets[#gets + 1] = 'u2'
    gets[#gets + 1] = '#' .. index
  end
  call_chunked('BITFIELD', {key}, gets, MAX_ARGS, function(reply, first)
    local at = (first - 1) / 3
    for j, state in ipairs(reply) do
      local index = shard.list[at + j]
      shard.was[index] = state
      shard.now[index] = state
    end
  end)
end

-- While a user is reconciled, their events are also journaled, so the reconcile can replay
-- what arrived between its read of the Notification table and its write.
local fenced = {}
local fencing = redis.call('EXISTS', KEYS[3]) == 1
local now = fencing and now_ms() or 0
local function journal(user, entry)
  if fenced[user] == nil then
    local deadline = redis.call('ZSCORE', KEYS[3], user)
    fenced[user] = deadline ~= false and deadline ~= nil and tonumber(deadline) > now
  end
  if fenced[user] then
    redis.call('RPUSH', ARGV[2] .. user, entry)
    -- A reconcile that died leaves its journal behind; it expires on its own.
    redis.call('PEXPIRE', ARGV[2] .. user, 600000)
  end
end

-- For a short while after a reconcile, a user's reconciled set names every notification the
-- Notification table held for them. An event for a notification that Redis knew but the table
-- no longer held (deleted before the read, its event still in flight) must not count again.
-- Nearly always no user of the request has such a set: one EXISTS over all of them says so.
local reconciled = {}
local any_reconciled = nil
local function held_by_table(user, key, index, old)
  if any_reconciled == nil then
    local sets = {}
    for _, u in ipairs(users) do sets[#sets + 1] = ARGV[3] .. u end
    any_reconciled = any_exists(sets)
  end
  if not any_reconciled then return true end
  if reconciled[user] == nil then reconciled[user] = redis.call('EXISTS', ARGV[3] .. user) == 1 end
  if not reconciled[user] then return true end
  local slot = key .. ' ' .. index
  if redis.call('SISMEMBER', ARGV[3] .. user, slot) == 1 then return true end
  if old == UNSEEN then
    -- Created after the read: from now on it belongs to the reconciled picture.
    redis.call('SADD', ARGV[3] .. user, slot)
    return true
  end
  return false
end

-- A bootstrap rebuilds the state from the table, which no longer holds the notifications
-- hard-deleted before it: their state is unseen, not deleted. An event that would make such an
-- unseen notification read or unread is suspect if the bootstrap should have seen it: it is at or
-- below the highest notification the bootstrap read, or it occurred (sender's clock) before the
-- bootstrap finished (Redis's clock). It is a late retry of a deleted notification or a row
-- committed out of order; only the table can tell which, so the event changes nothing here and
-- queues a recount of its user instead.
local rebuilt_shard, rebuilt_index, rebuilt_at = -1, -1, -1
if ARGV[4] == '1' then
  local rebuilt = redis.call('GET', KEYS[5])
  if rebuilt then
    local shard, index, at = string.match(rebuilt, '^(-?%d+) (-?%d+) (%d+)$')
    rebuilt_shard, rebuilt_index, rebuilt_at = tonumber(shard), tonumber(index), tonumber(at)
  end
end
local function should_have_been_rebuilt(key, index, occurred_ms)
  local shard = tonumber(string.match(key, ':(%d+)$'))
  return shard < rebuilt_shard or (shard == rebuilt_shard and index <= rebuilt_index)
    or (occurred_ms > 0 and occurred_ms < rebuilt_at)
end

-- Step 3: the transitions, in order, on the local copy. The state machine is tabled once per
-- call (5 ops x 4 states), so an event costs a lookup.
local outcome_of = {}
for _, op in ipairs({'C1', 'C0', 'S1', 'S0', 'D'}) do
  outcome_of[op] = {}
  for old = UNSEEN, DELETED do
    local new, why = transition(old, op)
    outcome_of[op][old] = {new, why}
  end
end
local outcomes = {duplicate = 0, stale = 0, after_delete = 0}
local changed, recorded = 0, 0
local deltas, changed_users = {}, {}
-- Where each user's count bucket and field are (the ARGV position of the user's last event).
local count_at = {}
for i = FIRST_EVENT, #ARGV, EVENT_ARGS do
  local op, key, index, user = ARGV[i], key_of[ARGV[i + 1]], ARGV[i + 2], ARGV[i + 3]
  count_at[user] = i
  if fencing then journal(user, op .. ' ' .. key .. ' #' .. index) end
  local shard = shards[key]
  local old = shard.now[index]
  local next_state = outcome_of[op][old]
  local new, why = next_state[1], next_state[2]
  if not why and old == UNSEEN and new ~= DELETED and rebuilt_at >= 0
    and should_have_been_rebuilt(key, tonumber(index), tonumber(ARGV[i + 4])) then
    redis.call('SADD', KEYS[6], user)
    why = 'stale'
  end
  if not why and not held_by_table(user, key, index, old) then
    -- The reconcile counted it as gone: record that, and count nothing.
    shard.now[index] = DELETED
    why = 'after_delete'
  end
  if why then
    outcomes[why] = outcomes[why] + 1
  else
    shard.now[index] = new
    local delta = (new == UNREAD and 1 or 0) - (old == UNREAD and 1 or 0)
    if delta == 0 then
      recorded = recorded + 1
    else
      changed = changed + 1
      if deltas[user] == nil then
        deltas[user] = 0
        changed_users[#changed_users + 1] = user
      end
      deltas[user] = deltas[user] + delta
    end
  end
end

-- Step 4: every state whose value moved, one BITFIELD per shard.
for _, key in ipairs(shard_order) do
  local shard = shards[key]
  local sets = {}
  for _, index in ipairs(shard.list) do
    if shard.now[index] ~= shard.was[index] then
      sets[#sets + 1] = 'SET'
      sets[#sets + 1] = 'u2'
      sets[#sets + 1] = '#' .. index
      sets[#sets + 1] = STATE_TEXT[shard.now[index]]
    end
  end
  if #sets > 0 then call_chunked('BITFIELD', {key}, sets, MAX_ARGS, nil) end
end

-- Step 5: the pending deltas and the held counts.
local moved, buckets, bucket_seen = {}, {}, {}
for _, user in ipairs(changed_users) do
  if deltas[user] ~= 0 then
    moved[#moved + 1] = user
    local bucket = key_of[ARGV[count_at[user] + 5]]
    if bucket == nil then
      bucket = KEYS[tonumber(ARGV[count_at[user] + 5])]
      key_of[ARGV[count_at[user] + 5]] = bucket
    end
    if not bucket_seen[bucket] then
      bucket_seen[bucket] = true
      buckets[#buckets + 1] = bucket
    end
  end
end
-- A count not held yet is loaded by its first read (install_counts.lua), which adds the pending
-- delta as it is then: changing nothing here is what keeps that load exact. When none of the
-- users' buckets exists, no count is held: one EXISTS spares a HEXISTS per user.
local any_held = #buckets > 0 and any_exists(buckets)
for _, user in ipairs(moved) do
  local delta = DELTA_TEXT[deltas[user]] or tostring(deltas[user])
  -- A user whose pending delta returns to zero leaves the set: nothing to flush. (Redis sends an
  -- integral score as an integer's digits, so zero is '0', or '-0' for a negative zero.)
  local score = redis.call('ZINCRBY', KEYS[1], delta, user)
  if score == '0' or score == '-0' then
    redis.call('ZREM', KEYS[1], user)
  end
  if any_held then
    local at = count_at[user]
    local bucket, field = key_of[ARGV[at + 5]], ARGV[at + 6]
    if redis.call('HEXISTS', bucket, field) == 1 then
      redis.call('HINCRBY', bucket, field, delta)
    end
  end
end
-- Live streams: one message per request naming the users whose count moved (not per user).
if #moved > 0 then
  redis.call('PUBLISH', ARGV[5], table.concat(moved, ','))
end

local result = {changed, recorded, outcomes.duplicate, outcomes.stale, outcomes.after_delete}
if ttl > 0 then
  redis.call('SET', KEYS[2], table.concat(result, ' '), 'EX', ttl)
end
result[#result + 1] = 0
return result
