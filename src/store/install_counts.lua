-- Starts holding the real-time counts of users read for the first time (or again after their
-- counts were cleared): count = base + the pending delta as it is now, where base is what the
-- caller read outside the pending set (stored count + deltas of batches not yet committed).
--
-- base stays right only while no hand-off moves pending deltas into a new batch and no rebuild or
-- rollback rewrites the stored counts, so the caller passes the hand-off sequence and the ready
-- marker it read with base, and nothing is installed if either has changed since.
--
-- KEYS: handoff_seq ready pending counts_stale ..buckets
-- ARGV: read_seq read_ready ..users
-- KEYS[1]   the hand-off sequence
-- KEYS[2]   the ready marker
-- KEYS[3]   the pending sorted set
-- KEYS[4]   the flag a rollback resync sets while it drops the held counts
-- KEYS[5..] count buckets (hashes: field = user id within the bucket, value = count)
-- ARGV[1]   the hand-off sequence the caller read ('0' when none)
-- ARGV[2]   the ready marker's value the caller read ('' when there was none)
-- ARGV[3..] 4 values per user: user id, bucket index (into KEYS), field, base
--
-- Returns {1, count per user (in order)} when installed: a count already held (another read or an
-- event got there first) is kept and returned as it is; {0} when the sequence or the marker moved,
-- and the caller reads base again; {2} while held counts are being dropped (a held one may be stale).
-- The reply codes (store::scripts::reply names them alike).
local MOVED, INSTALLED, RELOADING = 0, 1, 2
if (redis.call('GET', KEYS[1]) or '0') ~= ARGV[1] or (redis.call('GET', KEYS[2]) or '') ~= ARGV[2] then
  return {MOVED}
end
if redis.call('EXISTS', KEYS[4]) == 1 then
  return {RELOADING}
end
local counts = {INSTALLED}
for i = 3, #ARGV, 4 do
  local user, bucket, field = ARGV[i], KEYS[tonumber(ARGV[i + 1])], ARGV[i + 2]
  local held = redis.call('HGET', bucket, field)
  if not held then
    held = tonumber(ARGV[i + 3]) + tonumber(redis.call('ZSCORE', KEYS[3], user) or '0')
    redis.call('HSET', bucket, field, held)
  end
  counts[#counts + 1] = tonumber(held)
end
return counts
