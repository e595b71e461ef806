-- The state machine of one notification, shared by the scripts that change state.
-- States (2 bits per notification): 0 unseen, 1 read, 2 unread, 3 deleted.
-- Ops: C1 created unread, C0 created read, S1 saved unread, S0 saved read, D deleted.
--
-- KEYS: (none)
-- ARGV: (none)
local UNSEEN, READ, UNREAD, DELETED = 0, 1, 2, 3

-- Returns the new state and, when nothing changes, why: 'duplicate', 'stale' or 'after_delete'.
local function transition(old, op)
  if old == DELETED then
    -- A deleted notification never comes back.
    if op == 'D' then return old, 'duplicate' end
    return old, 'after_delete'
  end
  if op == 'D' then return DELETED, nil end
  if string.sub(op, 1, 1) == 'C' and old ~= UNSEEN then
    -- A creation for a notification already seen is a late retry: newer state wins.
    return old, 'stale'
  end
  local new = (string.sub(op, 2, 2) == '1') and UNREAD or READ
  if new == old then return old, 'duplicate' end
  return new, nil
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
