-- Which Redis server holds the state, prepended to the scripts that must not apply or flush
-- against a state nobody vouches for. A Redis server's run id is new at every start, so a state
-- whose instance key (`{P}:instance`) names another server, or none, was restored from a
-- snapshot (it may have lost writes since), is on a promoted replica, or was lost: see *Redis
-- restarts* in docs/design.md for who vouches for it again, and how.
--
-- The run id is read from `INFO server` on every call (scripts keep no state between calls). A
-- plain find of its label and an anchored match after it cost half what an unanchored pattern
-- over the whole section did (docs/design.md, *Redis restarts*, has the figures).
--
-- KEYS: (none)
-- ARGV: (none)
local function this_server()
  local info = redis.call('INFO', 'server')
  local at = string.find(info, 'run_id:', 1, true)
  return at and string.match(info, '^%x+', at + 7)
end
