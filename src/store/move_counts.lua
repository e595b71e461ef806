-- Moves users' counts by their deltas, prepended to the scripts that change counts
-- (apply_events.lua, reconcile_truth.lua): per user one ZINCRBY of the pending delta and, if the
-- user's real-time count is held, one HINCRBY of it; then one message to live streams.
--
-- KEYS: (none)
-- ARGV: (none)
-- pending: the pending sorted set's key; users: user ids in order; deltas[user]: the delta;
-- count_at[user]: {count bucket key, field in it}; channel: the live channel; known_held: nil, or
-- per user the held count the caller read in this script (false: not held), so it is not asked again.
local function move_counts(pending, users, deltas, count_at, channel, known_held)
  local moved = {}
  for _, user in ipairs(users) do
    local delta = deltas[user]
    if delta ~= 0 then
      moved[#moved + 1] = user
      -- Deltas go as text: Redis formats a Lua number argument with printf (%.17g), which costs
      -- more than the command; the usual ones are looked up.
      delta = (delta == 1 and '1') or (delta == -1 and '-1') or tostring(delta)
      -- A user whose pending delta returns to zero leaves the set: nothing to flush. (Redis sends
      -- an integral score as its digits, so zero is '0', or '-0' for a negative zero; comparing the
      -- text spares a strtod per user.)
      local score = redis.call('ZINCRBY', pending, delta, user)
      if score == '0' or score == '-0' then
        redis.call('ZREM', pending, user)
      end
      -- A count not held yet is loaded by its first read (install_counts.lua), which adds the
      -- pending delta as it is then: changing nothing here is what keeps that load exact.
      local bucket, field = count_at[user][1], count_at[user][2]
      local held = known_held and known_held[user]
      if held == nil then held = redis.call('HEXISTS', bucket, field) == 1 end
      if held then
        redis.call('HINCRBY', bucket, field, delta)
      end
    end
  end
  -- Live streams: one message per script naming the users whose count moved (not per user).
  if #moved > 0 then
    redis.call('PUBLISH', channel, table.concat(moved, ','))
  end
end
