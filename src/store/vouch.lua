-- Vouches for the state on this Redis server: writes its run id into the instance key.
-- (lease.lua and instance.lua are prepended: KEYS[1] the lease, ARGV[1] the holder's token.)
--
-- KEYS: lease instance
-- ARGV: token mode
-- KEYS[2] the instance key
-- ARGV[2] 'claim' to vouch whatever the key holds (a rebuild or resync starts over from a state it
--         knows), or 'confirm' to vouch only if the key already names this server (a rebuild that
--         claimed it at its start: a restart since then lost some of what it wrote)
-- Returns this server's run id; fails with `UNVOUCHED` when 'confirm' finds another server.
local server = this_server()
if ARGV[2] == 'confirm' and redis.call('GET', KEYS[2]) ~= server then
  return redis.error_reply('UNVOUCHED Redis restarted while the state was rebuilt; the rebuild starts again')
end
redis.call('SET', KEYS[2], server)
return server
