-- Releases the flush lock only if this process still holds it.
-- KEYS[1] the lock; ARGV[1] this holder's token
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
