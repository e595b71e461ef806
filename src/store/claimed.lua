-- The second fence of a rebuild's writes, after lease.lua (instance.lua is prepended too): the
-- rebuild claimed the instance for this Redis server at its start (vouch.lua), and a server
-- restarted since (from a snapshot, or empty) must not get the rest of a rebuild whose beginning
-- it lost: its checkpoint would then promise states it does not hold.
--
-- KEYS: lease instance
-- ARGV: token
-- KEYS[2] the instance key. Fails with `UNVOUCHED` when it names another server, or none.
if redis.call('GET', KEYS[2]) ~= this_server() then
  return redis.error_reply('UNVOUCHED Redis restarted since this rebuild began; nothing was written, it begins again')
end
