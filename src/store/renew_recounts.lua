-- Renews a worker's claims on the users it is recounting (see take_recounts.lua). A claim that
-- lapsed and was given back to waiting by a take is not renewed (another worker may hold it
-- now); one that lapsed and is still there is, since nobody else took its user.
--
-- KEYS: recount_claims
-- ARGV: ttl_ms ..members
-- KEYS[1] the claims (a sorted set: member = "<claim id>:<user id>", score = deadline in ms)
-- ARGV[1] the claim's new length in ms
-- ARGV[2..] the claim's members, "<claim id>:<user id>"
--
-- Returns how many of them are still held (and were renewed).
local t = redis.call('TIME')
local deadline = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
local held = 0
for i = 2, #ARGV do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    redis.call('ZADD', KEYS[1], 'XX', deadline, ARGV[i])
    held = held + 1
  end
end
return held
