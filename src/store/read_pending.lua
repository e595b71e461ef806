-- Reads, in one atomic step, what Redis holds for some users and is not in the database yet:
-- their pending deltas and their deltas in every batch handed off but not dropped.
--
-- KEYS[1] pending, KEYS[2] the set of batch ids, KEYS[3] the hand-off sequence, KEYS[4] the ready marker
-- ARGV[1] the batch key prefix (batch key = prefix .. id), ARGV[2] 1 if the marker is required,
-- ARGV[3..] user ids
-- Returns {seq, {batch ids}, {per user: pending, then one delta per batch id}}; deltas as strings.
-- Returns {-1} when the marker is required and missing: pending deltas are gone or half-built.
if ARGV[2] == '1' and redis.call('EXISTS', KEYS[4]) == 0 then
  return {-1}
end
local seq = redis.call('GET', KEYS[3]) or '0'
local batch_ids = redis.call('SMEMBERS', KEYS[2])
local rows = {}
for i = 3, #ARGV do
  local user = ARGV[i]
  local row = {redis.call('ZSCORE', KEYS[1], user) or '0'}
  for _, id in ipairs(batch_ids) do
    row[#row + 1] = redis.call('ZSCORE', ARGV[1] .. id, user) or '0'
  end
  rows[#rows + 1] = row
end
return {seq, batch_ids, rows}
