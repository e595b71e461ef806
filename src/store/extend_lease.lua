-- Renews the flush lease if this holder still has it.
-- KEYS: lease
-- ARGV: token ttl_ms
-- KEYS[1] the lease; ARGV[1] this holder's token, ARGV[2] the new time to live in ms.
-- Returns 1 if renewed, 0 if the lease expired or passed to another process.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
