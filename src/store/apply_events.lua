-- Applies the events of one or more requests atomically: one state transition per event, then per
-- user one ZINCRBY of the pending delta and, if the user's real-time count is held, one HINCRBY of
-- it. Several requests in one call are a group commit (`store::GroupCommit`): each keeps its own
-- idempotency record and outcome, as if each had been its own call, in the order sent.
-- (transition.lua, instance.lua, move_counts.lua and records.lua are prepended.)
--
-- A state shard that one event touches is read and written by that event (one BITFIELD GET, and
-- one SET if the state changes): the usual single-event request pays nothing more. A shard that
-- several events touch is read with one BITFIELD of GETs before the first of them, the events
-- run on that copy in order, and the states that changed are written with one BITFIELD of SETs
-- after the last. A call with several users asks with one EXISTS whether any of them has a
-- reconciled set before asking per user.
--
-- KEYS: pending reconciling ready rebuilt recounts instance handoff_seq former_window ..webhooks_states_buckets
-- ARGV: idempotency_ttl journal_prefix reconciled_prefix requires_bootstrap live_channel requests draft_prefix tally_prefix records_prefix open_former_window ..requests_then_events
-- KEYS[1]   the pending sorted set (member = user id, score = pending delta)
-- KEYS[2]   the users being reconciled (member = user id, score = fence deadline in ms)
-- KEYS[3]   the marker a bootstrap writes when the state is complete
-- KEYS[4]   what the last bootstrap read: "shard index ms", the highest notification slot it
--           read (-1 -1 for none) and when it finished (unix ms)
-- KEYS[5]   the users waiting for a recount (stale events, saves after a delete and decrements
--           below zero add theirs)
-- KEYS[6]   the instance key: the run id of the Redis server that vouches for the state
-- KEYS[7]   the hand-off sequence
-- KEYS[8]   while it exists, a key the former version wrote (`{P}:webhook:<id>`) may still live
--           and is read (records.lua)
-- KEYS[9..] the requests' former idempotency keys (`{P}:webhook:<id>`, written before records
--           were packed and still honoured until they expire), state shard bitmaps (2 bits per
--           notification) and held-count buckets (hashes: field = user id within the bucket,
--           value = the user's real-time count)
-- ARGV[1]   seconds to remember an idempotency record (0: none is written or looked up)
-- ARGV[2]   the prefix of journal keys (journal key = prefix .. user id)
-- ARGV[3]   the prefix of reconciled-set keys (set key = prefix .. user id)
-- ARGV[4]   1 if the state must be bootstrapped (the marker must exist), else 0
-- ARGV[5]   the pub/sub channel told which users' counts changed (comma-separated ids)
-- ARGV[6]   the number of requests, R
-- ARGV[7]   the prefix of a reconcile's draft-picture keys (key = prefix .. user id)
-- ARGV[8]   the prefix of a reconcile's tally keys (key = prefix .. user id)
-- ARGV[9]   the prefix of the packed idempotency records' keys (records.lua)
-- ARGV[10]  1 for a process's first call: KEYS[8] is set for a ttl (records.lua says why)
-- ARGV[11..] 4 values per request: its former idempotency key's index (into KEYS; 0 when it has
--           no webhook-id), its record's field (12 bytes of the webhook-id's SHA-256), a digest of
--           its body (8 bytes, kept in the record) and its number of events
-- then      7 values per event, the requests' events in order: op, state key index (into KEYS),
--           index in shard, user id, when it occurred (unix ms, 0 if the sender did not say), the
--           user's count bucket index (into KEYS) and field in it
--
-- Returns 6 numbers per request, in order: {changed, recorded, duplicate, stale, after_delete,
-- replayed}: events that changed a count, that changed only the state, that repeated the current
-- state, that were stale creations, that arrived after the notification was deleted; replayed is
-- 1 when the request's id was seen before (in an earlier call or earlier in this one), and the
-- counts are then those of its first delivery. {-3, 0, 0, 0, 0, 0} for a request whose
-- idempotency key was seen with another body, {-5, 0, 0, 0, 0, 0} for one whose stored record is
-- not one this script wrote (damaged, or another program's key): its events are not applied.
-- Returns {-1} when the marker is required and missing: the state was lost, nothing is applied.
-- Returns {-4} when this Redis server does not vouch for the state (it restarted, from a snapshot
-- or empty, since the state was vouched for): nothing is applied until it is rebuilt or resynced.
-- Locals, not globals: each global read is a lookup in the globals table, and ARGV is read
-- several times per event.
local KEYS, ARGV = KEYS, ARGV
-- The sentinel replies (store::scripts::reply names them alike).
local STATE_MISSING, ID_REUSED, UNVOUCHED, RECORD_UNREADABLE = -1, -3, -4, -5
-- A record's outcomes: changed, recorded, duplicate, stale, after_delete.
local OUTCOMES = 5
local ttl = tonumber(ARGV[1])
local requests = tonumber(ARGV[6])
local FIRST_REQUEST, REQUEST_ARGS, EVENT_ARGS = 11, 4, 7
local FIRST_EVENT = FIRST_REQUEST + REQUEST_ARGS * requests
-- Arguments per command built here: unpack() must fit them on Lua's C stack (8,000 slots); a
-- multiple of both a GET's 3 and a SET's 4.
local MAX_ARGS = 3000
-- States as text: Redis formats a Lua number argument with printf, which costs more than a lookup.
local STATE_TEXT = {[UNSEEN] = '0', [READ] = '1', [UNREAD] = '2', [DELETED] = '3'}

if ARGV[4] == '1' and redis.call('EXISTS', KEYS[3]) == 0 then
  return {STATE_MISSING}
end

local server = this_server()
local vouched_by = redis.call('GET', KEYS[6])
if vouched_by ~= server then
  if vouched_by == false and ARGV[4] == '0'
    and redis.call('EXISTS', KEYS[7]) == 0 and redis.call('EXISTS', KEYS[1]) == 0 then
    -- Nothing was ever vouched for, handed off or left pending: a new deployment (or a Redis that
    -- lost everything, whose pending deltas were all lost with it). This server holds it from now.
    redis.call('SET', KEYS[6], server)
  else
    return {UNVOUCHED}
  end
end

if ARGV[10] == '1' and ttl > 0 then
  redis.call('SET', KEYS[8], '1', 'EX', ttl)
end

-- Each request's idempotency record. A request seen before, in an earlier call or earlier in this
-- one, is answered as its first delivery was and its events are skipped. `live` lists the ARGV
-- index of every event to apply, `live_tally` the outcome of its request, `record_of_request` the
-- ARGV index of each request's values when it has a webhook-id (false for none). Arrays indexed
-- from 1, not tables keyed by ARGV index: the call's bookkeeping costs little beside one event's work.
--
-- A record (records.lua finds and keeps it) is the body's 8-byte digest, then the outcomes
-- (changed recorded duplicate stale after_delete) as numbers separated by spaces, without the
-- zeros at the end: the usual single-event request's is its digest and "1".
local answers, live, live_tally, record_of_request, seen_here = {}, {}, {}, {}, {}
local REFUSED, UNREADABLE = 'refused', 'unreadable'
local tallies = {}
local epochs = nil
-- A request's digest is ARGV[FIRST_REQUEST + REQUEST_ARGS * (r - 1) + 2], written out where it is
-- read: a helper function is a closure made at every call, 2% of a one-request call's work.
local next_event = FIRST_EVENT
for r = 1, requests do
  local at = FIRST_REQUEST + REQUEST_ARGS * (r - 1)
  local former_index, field, digest, n = ARGV[at], ARGV[at + 1], ARGV[at + 2], tonumber(ARGV[at + 3])
  record_of_request[r] = former_index ~= '0' and at
  if former_index ~= '0' then
    local earlier = seen_here[field]
    if earlier then
      -- Filled in at the end, from the earlier request's outcome.
      answers[r] = ARGV[FIRST_REQUEST + REQUEST_ARGS * (earlier - 1) + 2] == digest and earlier or REFUSED
    else
      local first, bucket = false, nil
      if ttl > 0 then
        epochs = epochs or record_epochs(ARGV[9], ttl, KEYS[8])
        first, bucket = find_record(epochs, field)
      end
      local former = KEYS[tonumber(former_index)]
      local first_digest, outcomes
      if first then
        first_digest, outcomes = string.sub(first, 1, 8), string.sub(first, 9)
        if #first < 8 or not string.match(outcomes, '^[%d ]*$') then outcomes = nil end
      elseif ttl > 0 and epochs.former_keys_may_live then
        -- Written before records were packed: "hex digest:outcomes", or the outcomes alone.
        first = redis.call('GET', former)
        if first then
          local hex
          hex, outcomes = string.match(first, '^(%x+):(.*)$')
          first_digest = hex and string.gsub(hex, '%x%x', function(b) return string.char(tonumber(b, 16)) end)
          outcomes = outcomes or first
        end
      end
      if first then
        local counts = {}
        for c in string.gmatch(outcomes or '', '%d+') do counts[#counts + 1] = tonumber(c) end
        if outcomes == nil or #counts > OUTCOMES or (bucket == nil and #counts ~= OUTCOMES) then
          -- Not a record this script wrote (another program's key, a damaged value): refused, for
          -- this request alone; the others in the call go on.
          answers[r] = UNREADABLE
        elseif first_digest and first_digest ~= digest then
          answers[r] = REFUSED
        else
          for j = #counts + 1, OUTCOMES do counts[j] = 0 end
          counts[OUTCOMES + 1] = 1
          answers[r] = counts
          -- Written again as it is: a replay writes, so a WAIT after this call (the sidecar's
          -- --redis-wait-replicas) waits until a replica has everything up to here, the first
          -- delivery included, even on a connection that never wrote it, whatever else this
          -- call writes or not.
          if bucket then
            redis.call('HSET', bucket, field, first)
          else
            redis.call('SET', former, first, 'KEEPTTL')
          end
        end
      else
        seen_here[field] = r
      end
    end
  end
  if answers[r] == nil then
    local tally = {changed = 0, recorded = 0, duplicate = 0, stale = 0, after_delete = 0}
    tallies[r] = tally
    for i = next_event, next_event + (n - 1) * EVENT_ARGS, EVENT_ARGS do
      local k = #live + 1
      live[k] = i
      live_tally[k] = tally
    end
  end
  next_event = next_event + n * EVENT_ARGS
end
local events = #live

-- Runs `command` with `head` and then `args`, at most MAX_ARGS of them per call; calls
-- `each(reply, offset)` with the offset in `args` of each call's first argument.
local function call_chunked(command, head, args, each)
  for s = 1, #args, MAX_ARGS do
    local part = {}
    for j = 1, #head do part[j] = head[j] end
    for j = s, math.min(s + MAX_ARGS - 1, #args) do part[#part + 1] = args[j] end
    local reply = redis.call(command, unpack(part))
    if each then each(reply, s) end
  end
end

-- The shards several events touch, by key index (as sent): the states read (`was`), the states
-- as the events leave them (`now`), by index in shard (as sent); `list` the indices read.
local copies, copied = {}, {}
-- The request's users, each once, when it has several events.
local request_users = {}
if events > 1 then
  local per_shard, seen = {}, {}
  for _, i in ipairs(live) do
    local key_index, user = ARGV[i + 1], ARGV[i + 3]
    per_shard[key_index] = (per_shard[key_index] or 0) + 1
    if not seen[user] then
      seen[user] = true
      request_users[#request_users + 1] = user
    end
  end
  for _, i in ipairs(live) do
    local key_index, index = ARGV[i + 1], ARGV[i + 2]
    if per_shard[key_index] > 1 then
      local copy = copies[key_index]
      if copy == nil then
        copy = {was = {}, now = {}, list = {}}
        copies[key_index] = copy
        copied[#copied + 1] = key_index
      end
      if copy.was[index] == nil then
        copy.was[index] = false
        copy.list[#copy.list + 1] = index
      end
    end
  end
  for _, key_index in ipairs(copied) do
    local copy = copies[key_index]
    local gets = {}
    for _, index in ipairs(copy.list) do
      gets[#gets + 1] = 'GET'
      gets[#gets + 1] = 'u2'
      gets[#gets + 1] = '#' .. index
    end
    call_chunked('BITFIELD', {KEYS[tonumber(key_index)]}, gets, function(states, offset)
      local first = (offset - 1) / 3
      for j, state in ipairs(states) do
        local index = copy.list[first + j]
        copy.was[index] = state
        copy.now[index] = state
      end
    end)
  end
end

-- A notification's state: from the shard's copy, or read now.
local function state_of(key, key_index, index)
  local copy = copies[key_index]
  if copy then return copy.now[index] end
  return redis.call('BITFIELD', key, 'GET', 'u2', '#' .. index)[1]
end
-- Sets a notification's state: in the shard's copy (written after the last event), or now.
local function set_state(key, key_index, index, state)
  local copy = copies[key_index]
  if copy then
    copy.now[index] = state
  else
    redis.call('BITFIELD', key, 'SET', 'u2', '#' .. index, STATE_TEXT[state])
  end
end

-- While a user is reconciled, their events are also journaled, so the reconcile can replay
-- what arrived between its read of the Notification table and its write.
local fenced = {}
local fencing = redis.call('EXISTS', KEYS[2]) == 1
local now = fencing and now_ms() or 0
local function journal(user, entry)
  if not fencing then return end
  if fenced[user] == nil then
    local deadline = redis.call('ZSCORE', KEYS[2], user)
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
-- Nearly always no user of the request has such a set: with several users, one EXISTS over all
-- their sets says so (this script adds to a set only if it exists, so the answer holds to its end).
local reconciled = {}
local any_reconciled = nil
local function held_by_table(user, key, index, old)
  if any_reconciled == nil then
    any_reconciled = true
    if #request_users > 1 then
      local sets = {}
      for _, u in ipairs(request_users) do sets[#sets + 1] = ARGV[3] .. u end
      local found = 0
      call_chunked('EXISTS', {}, sets, function(n) found = found + n end)
      any_reconciled = found > 0
    end
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
  local rebuilt = redis.call('GET', KEYS[4])
  if rebuilt then
    local shard, index, at = string.match(rebuilt, '^(-?%d+) (-?%d+) (%d+)$')
    rebuilt_shard, rebuilt_index, rebuilt_at = tonumber(shard), tonumber(index), tonumber(at)
  end
end
local function should_have_been_rebuilt(key, index, occurred)
  -- No rebuild recorded: nothing is suspect (and the usual request parses nothing here).
  if rebuilt_at < 0 then return false end
  local at, occurred_ms = tonumber(index), tonumber(occurred)
  local shard = tonumber(string.match(key, ':(%d+)$'))
  return shard < rebuilt_shard or (shard == rebuilt_shard and at <= rebuilt_index)
    or (occurred_ms > 0 and occurred_ms < rebuilt_at)
end

local deltas, users = {}, {}

local count_at = {}
-- A decrement that would take a held count below zero undoes nothing Redis counted: the last
-- reconcile took its notification for gone, and its event came after the reconciled set expired.
-- The state changes, the count stays at zero and, with the table to ask, the user is recounted.
-- (A count not held cannot get there that way: a reconcile holds the counts of the users it
-- repairs, and only it leaves an unread state uncounted. A recipient change, which events do not
-- tell, can; docs/design.md, *Never below zero*.) Judged event by event, on the count as this request
-- has moved it so far, so that a request ends as its events would one by one.
local held = {}
local function below_zero(user, delta)
  if delta >= 0 then return false end
  if held[user] == nil then
    held[user] = tonumber(redis.call('HGET', count_at[user][1], count_at[user][2])) or false
  end
  if held[user] == false or held[user] + (deltas[user] or 0) + delta >= 0 then return false end
  if ARGV[4] == '1' then redis.call('SADD', KEYS[5], user) end
  return true
end
-- Each state shard's key by its index as sent (tonumber is a strtod: once per shard, not per event).
local key_of = {}
for k, i in ipairs(live) do
  local tally = live_tally[k]
  local op, key_index, index, user = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local key = key_of[key_index]
  if key == nil then
    key = KEYS[tonumber(key_index)]
    key_of[key_index] = key
  end
  -- A user's count bucket and field follow from the user id: the same in each of their events.
  if count_at[user] == nil then count_at[user] = {KEYS[tonumber(ARGV[i + 5])], ARGV[i + 6]} end
  local old = state_of(key, key_index, index)
  -- "op key #index old occurred": the state before the event tells the reconcile whether Redis
  -- knew the notification before its fence, and when it occurred whether it may be older than
  -- the table's read.
  if fencing then journal(user, op .. ' ' .. key .. ' #' .. index .. ' ' .. old .. ' ' .. ARGV[i + 4]) end
  local new, why = transition(old, op)
  if not why and old == UNSEEN and new ~= DELETED
    and should_have_been_rebuilt(key, index, ARGV[i + 4]) then
    redis.call('SADD', KEYS[5], user)
    why = 'stale'
  end
  if not why and not held_by_table(user, key, index, old) then
    -- The reconcile counted it as gone: record that, and count nothing.
    set_state(key, key_index, index, DELETED)
    why = 'after_delete'
  end
  if why == 'after_delete' and op ~= 'D' and ARGV[4] == '1' then
    -- A save of a notification counted as gone: a late save that lost a race with its delete,
    -- an un-soft-delete, or a save that re-inserted a row deleted under it (Django's save() of a
    -- loaded instance). Only the table can tell which, so its user is recounted.
    redis.call('SADD', KEYS[5], user)
  end
  if why then
    tally[why] = tally[why] + 1
  else
    set_state(key, key_index, index, new)
    local delta = (new == UNREAD and 1 or 0) - (old == UNREAD and 1 or 0)
    -- A reconcile already wrote this notification's truth: its tally of the unread follows the state.
    if delta ~= 0 and fenced[user] and redis.call('SISMEMBER', ARGV[7] .. user, key .. ' ' .. index) == 1 then
      redis.call('HINCRBY', ARGV[8] .. user, 'unread', delta)
    end
    if below_zero(user, delta) then delta = 0 end
    if delta == 0 then
      tally.recorded = tally.recorded + 1
    else
      tally.changed = tally.changed + 1
      if deltas[user] == nil then
        deltas[user] = 0
        users[#users + 1] = user
      end
      deltas[user] = deltas[user] + delta
    end
  end
end

-- The copied shards' states that the events changed, one BITFIELD of SETs per shard.
for _, key_index in ipairs(copied) do
  local copy = copies[key_index]
  local sets = {}
  for _, index in ipairs(copy.list) do
    if copy.now[index] ~= copy.was[index] then
      sets[#sets + 1] = 'SET'
      sets[#sets + 1] = 'u2'
      sets[#sets + 1] = '#' .. index
      sets[#sets + 1] = STATE_TEXT[copy.now[index]]
    end
  end
  if #sets > 0 then call_chunked('BITFIELD', {KEYS[tonumber(key_index)]}, sets, nil) end
end

-- A decrement's user had its held count read already (below_zero).
move_counts(KEYS[1], users, deltas, count_at, ARGV[5], held)

local reply = {}
for r = 1, requests do
  local answer = answers[r]
  if answer == REFUSED then
    answer = {ID_REUSED, 0, 0, 0, 0, 0}
  elseif answer == UNREADABLE then
    answer = {RECORD_UNREADABLE, 0, 0, 0, 0, 0}
  elseif type(answer) == 'number' then
    -- The same request twice in this call: the second is a replay of the first.
    local first = tallies[answer]
    answer = {first.changed, first.recorded, first.duplicate, first.stale, first.after_delete, 1}
  elseif answer == nil then
    local t = tallies[r]
    answer = {t.changed, t.recorded, t.duplicate, t.stale, t.after_delete}
    local at = record_of_request[r]
    if at and ttl > 0 then
      local last = 0
      for j = 1, OUTCOMES do if answer[j] ~= 0 then last = j end end
      epochs = epochs or record_epochs(ARGV[9], ttl, KEYS[8])
      write_record(epochs, ARGV[at + 1], ARGV[at + 2] .. table.concat(answer, ' ', 1, last))
    end
    answer[6] = 0
  end
  for j = 1, 6 do reply[#reply + 1] = answer[j] end
end
return reply
