-- Claims users waiting for a recount for one worker, until a deadline the worker renews while
-- it works (renew_recounts.lua). A claim whose deadline passed belongs to a worker that died or
-- stalled: its users go back to waiting first, so this take or a later one claims them again.
-- A user asked for again while claimed is waiting again too, and is recounted again: the new
-- change may postdate the claimed recount's read.
--
-- KEYS: recounts recount_claims recounts_taken
-- ARGV: claim_id limit ttl_ms
-- KEYS[1] the users waiting for a recount (a set; `recount` events and apply_events.lua add)
-- KEYS[2] the claims (a sorted set: member = "<claim id>:<user id>", score = deadline in ms,
--         Redis time)
-- KEYS[3] the taken set of versions before claims (a set): re-queued and deleted if found
-- ARGV[1] this take's claim id (random; no ':')
-- ARGV[2] users to claim at most (> 0)
-- ARGV[3] the claim's length in ms
--
-- Returns the users claimed, none when nobody is waiting.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local lapsed = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
for _, member in ipairs(lapsed) do
  redis.call('SADD', KEYS[1], string.match(member, ':(%d+)$'))
end
if #lapsed > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
end
if redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('SUNIONSTORE', KEYS[1], KEYS[1], KEYS[3])
  redis.call('DEL', KEYS[3])
end

local users = redis.call('SPOP', KEYS[1], tonumber(ARGV[2]))
local deadline = now + tonumber(ARGV[3])
for _, user in ipairs(users) do
  redis.call('ZADD', KEYS[2], deadline, ARGV[1] .. ':' .. user)
end
return users
