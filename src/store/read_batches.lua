-- Reads, in one atomic step, what a first read of some users needs from Redis besides their
-- pending deltas (see install_counts.lua): their deltas in every batch handed off but not
-- dropped, the hand-off sequence and the ready marker.
--
-- KEYS: batches handoff_seq ready
-- ARGV: batch_prefix requires_bootstrap ..users
-- KEYS[1] the set of batch ids, KEYS[2] the hand-off sequence, KEYS[3] the ready marker
-- ARGV[1] the batch key prefix (batch key = prefix .. id), ARGV[2] 1 if the marker is required,
-- ARGV[3..] user ids
-- Returns {seq, ready, {batch ids}, {per user: one delta per batch id}}: ready is the marker's
-- value ('' when there is none), deltas are strings.
-- Returns {-1} when the marker is required and missing: pending deltas are gone or half-built.
-- The sentinel reply (store::scripts::reply names it alike).
local STATE_MISSING = -1
if ARGV[2] == '1' and redis.call('EXISTS', KEYS[3]) == 0 then
  return {STATE_MISSING}
end
local seq = redis.call('GET', KEYS[2]) or '0'
local batch_ids = redis.call('SMEMBERS', KEYS[1])
local rows = {}
for i = 3, #ARGV do
  local user = ARGV[i]
  local row = {}
  for _, id in ipairs(batch_ids) do
    row[#row + 1] = redis.call('ZSCORE', ARGV[1] .. id, user) or '0'
  end
  rows[#rows + 1] = row
end
return {seq, redis.call('GET', KEYS[3]) or '', batch_ids, rows}
