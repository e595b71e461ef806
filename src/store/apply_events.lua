-- Applies a batch of events atomically: one state transition per event, one ZINCRBY per user.
--
-- KEYS[1]   the pending sorted set (member = user id, score = pending delta)
-- KEYS[2]   the idempotency key of this request (its webhook-id)
-- KEYS[3..] state shard bitmaps, 2 bits per notification:
--           0 unseen, 1 read, 2 unread, 3 deleted
-- ARGV[1]   seconds to remember the idempotency key; 0 when the request has none
-- ARGV[2..] 4 values per event: op, key index (into KEYS), index in shard, user id
--           op: C1 created unread, C0 created read, S1 saved unread, S0 saved read, D deleted
--
-- Returns {changed, recorded, duplicate, stale, after_delete, replayed}: events that changed a
-- count, that changed only the state, that repeated the current state, that were stale
-- creations, that arrived after the notification was deleted; replayed is 1 when the request's
-- id was seen before, and the counts are then those of its first delivery.
local UNSEEN, READ, UNREAD, DELETED = 0, 1, 2, 3
local ttl = tonumber(ARGV[1])

if ttl > 0 then
  local first = redis.call('GET', KEYS[2])
  if first then
    local counts = {}
    for n in string.gmatch(first, '%d+') do counts[#counts + 1] = tonumber(n) end
    counts[#counts + 1] = 1
    return counts
  end
end

local changed, recorded, duplicate, stale, after_delete = 0, 0, 0, 0, 0
local deltas, users = {}, {}

for i = 2, #ARGV, 4 do
  local op, key, pos, user = ARGV[i], KEYS[tonumber(ARGV[i + 1])], '#' .. ARGV[i + 2], ARGV[i + 3]
  local old = redis.call('BITFIELD', key, 'GET', 'u2', pos)[1]
  local new = old
  if old == DELETED then
    -- A deleted notification never comes back.
    if op == 'D' then duplicate = duplicate + 1 else after_delete = after_delete + 1 end
  elseif op == 'D' then
    new = DELETED
  elseif string.sub(op, 1, 1) == 'C' and old ~= UNSEEN then
    -- A creation for a notification already seen is a late retry: newer state wins.
    stale = stale + 1
  else
    new = (string.sub(op, 2, 2) == '1') and UNREAD or READ
    if new == old then duplicate = duplicate + 1 end
  end

  if new ~= old then
    redis.call('BITFIELD', key, 'SET', 'u2', pos, new)
    local delta = (new == UNREAD and 1 or 0) - (old == UNREAD and 1 or 0)
    if delta == 0 then
      recorded = recorded + 1
    else
      changed = changed + 1
      if deltas[user] == nil then
        deltas[user] = 0
        users[#users + 1] = user
      end
      deltas[user] = deltas[user] + delta
    end
  end
end

for _, user in ipairs(users) do
  local delta = deltas[user]
  if delta ~= 0 then
    -- A user whose pending delta returns to zero leaves the set: nothing to flush.
    if tonumber(redis.call('ZINCRBY', KEYS[1], delta, user)) == 0 then
      redis.call('ZREM', KEYS[1], user)
    end
  end
end

if ttl > 0 then
  redis.call('SET', KEYS[2], table.concat({changed, recorded, duplicate, stale, after_delete}, ' '), 'EX', ttl)
end
return {changed, recorded, duplicate, stale, after_delete, 0}
