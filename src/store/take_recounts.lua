-- Takes the users waiting for a recount. KEYS[1] waiting, KEYS[2] taken.
-- If an earlier worker took users and died before it was done, those are returned again.
if redis.call('EXISTS', KEYS[2]) == 0 then
  if redis.call('EXISTS', KEYS[1]) == 0 then return {} end
  redis.call('RENAME', KEYS[1], KEYS[2])
end
return redis.call('SMEMBERS', KEYS[2])
