-- Extends the flush lock if this process still holds it. KEYS[1] the lock;
-- ARGV[1] this holder's token, ARGV[2] the new time to live in ms. Returns 1 if extended.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
