-- Which Redis server holds the state, prepended to the scripts that must not apply or flush
-- against a state nobody vouches for. A Redis server's run id is new at every start, so a state
-- whose instance key (`{P}:instance`) names another server, or none, was restored from a
-- snapshot (it may have lost writes since), is on a promoted replica, or was lost: see *Redis
-- restarts* in docs/design.md for who vouches for it again, and how.
local function this_server()
  return string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')
end
