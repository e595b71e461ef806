-- The fence of a write made under the flush lease, prepended to every script that makes one:
-- a holder that lost its lease (it stalled past the lease's time to live, and another process
-- may hold it now) changes nothing. Checked before the first write, so a refusal leaves no trace.
--
-- KEYS: lease
-- ARGV: token
-- KEYS[1] the lease, ARGV[1] the token the holder was given when it took the lease.
-- Fails with `LEASE_LOST` when another token (or none) is in the lease.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('LEASE_LOST the flush lease ' .. ARGV[1] .. ' has expired or passed to another process')
end
