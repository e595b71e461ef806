-- Gives the flush lease back, only if this holder still has it.
-- KEYS: lease
-- ARGV: token
-- KEYS[1] the lease; ARGV[1] this holder's token. Returns 1 if released.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
