-- Takes the flush lease if nobody holds it, with a fresh fencing token.
--
-- KEYS: lease lease_tokens
-- ARGV: ttl_ms random_id floor
-- KEYS[1] the lease, KEYS[2] the counter that numbers tokens
-- ARGV[1] the lease's time to live in ms, ARGV[2] a random id (tokens stay unique even when
--         Redis loses the counter), ARGV[3] the floor: the highest token number the database
--         recorded (the new number is above it, so the database's fence lets it write)
-- Returns {1, token, ms left} when taken; {0, the holder's token, its ms left} when another holds it.
-- The reply codes (store::scripts::reply names them alike).
local TAKEN, BUSY = 1, 0
local holder = redis.call('GET', KEYS[1])
if holder then
  return {BUSY, holder, redis.call('PTTL', KEYS[1])}
end
local n = redis.call('INCR', KEYS[2])
if n <= tonumber(ARGV[3]) then
  n = tonumber(ARGV[3]) + 1
  redis.call('SET', KEYS[2], n)
end
local token = n .. ':' .. ARGV[2]
redis.call('SET', KEYS[1], token, 'PX', ARGV[1])
return {TAKEN, token, tonumber(ARGV[1])}
