-- Writes one chunk of the Notification table's truth for users being reconciled: each
-- notification's state is set to the table's, and its slot is added to the user's draft picture.
-- A reconcile calls it once per chunk of at most `TRUTH_STATES_PER_CALL` states, so no call
-- blocks Redis for long, however many notifications a user has. Events keep applying between
-- the calls (and are journaled; one that changes a notification whose truth is written keeps that
-- truth, see `apply_events.lua`): `reconcile_finish.lua` replays them on top of the truth.
-- (lease.lua and transition.lua are prepended: KEYS[1] the lease, ARGV[1] the holder's token.)
--
-- KEYS[2] the users being reconciled (member = user id, score = fence deadline in ms)
-- ARGV[2] the prefix of draft keys
-- ARGV[3..] groups of one user's notifications in one state shard: user id, state key, n, then
--           n pairs (index in shard, state); n is at most 1000 (Lua's `unpack` takes a few
--           thousand values)
-- Returns the number of states written: a user whose fence expired is skipped (once the fence is
-- down their events are no longer journaled, so a truth written now could not be corrected).
local now = now_ms()
local fenced = {}
local written = 0
local i = 3
while i <= #ARGV do
  local user, key, n = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  local pairs_at = i + 3
  i = pairs_at + 2 * n
  if fenced[user] == nil then
    local deadline = redis.call('ZSCORE', KEYS[2], user)
    fenced[user] = deadline ~= false and deadline ~= nil and tonumber(deadline) > now
  end
  if fenced[user] and n > 0 then
    local sets, slots = {}, {}
    for p = pairs_at, pairs_at + 2 * (n - 1), 2 do
      -- A plain bit offset (2 bits per notification), as the bootstrap writes.
      sets[#sets + 1] = 'SET'
      sets[#sets + 1] = 'u2'
      sets[#sets + 1] = tonumber(ARGV[p]) * 2
      sets[#sets + 1] = ARGV[p + 1]
      slots[#slots + 1] = key .. ' ' .. ARGV[p]
    end
    redis.call('BITFIELD', key, unpack(sets))
    redis.call('SADD', ARGV[2] .. user, unpack(slots))
    written = written + n
  end
end
return written
