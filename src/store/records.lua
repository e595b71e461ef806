-- Where idempotency records live, prepended to apply_events.lua (which says what a record holds).
-- A Redis key with an expiry costs about 100 bytes before it holds anything, so records are packed
-- into hashes, a 12-byte field (the webhook-id's digest) and a short value each: about 25 bytes a
-- record while a hash stays a listpack (docs/design.md, *Idempotency records*).
--
-- Records are grouped by epoch, epoch e = floor(now / ttl) on Redis's clock. Every key of epoch e
-- expires at (e + 2) * ttl, so a record lives at least ttl and less than twice that, and a lookup
-- reads epochs e and e - 1. In an epoch, records go to buckets, hashes `<prefix><ttl>:<e>:<N>:<b>`
-- with b = the id's seed mod N. The epoch key `<prefix><ttl>:<e>` lists the bucket counts N it
-- has used, oldest first: a generation each. A record stays where it was written, a new one goes
-- to the last generation, and a lookup reads the id's bucket in each. When a bucket passes
-- RECORD_FILL entries (under Redis's default hash-max-listpack-entries, 128) the epoch starts a
-- generation RECORD_GROWTH times larger; a new epoch starts as large as one sample bucket of the
-- previous epoch says its records need. The ttl is in the names: records written under another
-- --idempotency-ttl-secs are not found.
--
-- All the keys share the deployment's hash tag (the prefix's): one Redis Cluster slot.
--
-- KEYS: (none)
-- ARGV: (none)
local RECORD_FILL, RECORD_GROWTH, RECORD_MAX_BUCKETS = 96, 4, 4194304

-- The current and the previous epoch: their keys, generations (bucket counts) and expiry.
local function record_epochs(prefix, ttl)
  local e = math.floor(tonumber(redis.call('TIME')[1]) / ttl)
  local epochs = {}
  for i, epoch in ipairs({e, e - 1}) do
    local key = prefix .. ttl .. ':' .. epoch
    local sizes = {}
    local listed = redis.call('GET', key)
    if listed then
      for size in string.gmatch(listed, '%d+') do sizes[#sizes + 1] = tonumber(size) end
    end
    epochs[i] = {key = key, sizes = sizes, expires = (epoch + 2) * ttl}
  end
  return epochs
end

-- The record of the id with digest `field` and `seed`, newest first, and the bucket holding it;
-- false when there is none.
local function find_record(epochs, field, seed)
  for _, epoch in ipairs(epochs) do
    for g = #epoch.sizes, 1, -1 do
      local size = epoch.sizes[g]
      local bucket = epoch.key .. ':' .. size .. ':' .. (seed % size)
      local value = redis.call('HGET', bucket, field)
      if value then return value, bucket end
    end
  end
  return false, nil
end

-- Writes a new record in the current epoch's last generation.
local function write_record(epochs, field, seed, value)
  local epoch, previous = epochs[1], epochs[2]
  if #epoch.sizes == 0 then
    -- Buckets for about half of RECORD_FILL each, if the epoch takes as many records as the last.
    local size, last = 1, previous.sizes[#previous.sizes]
    if last then
      local sampled = redis.call('HLEN', previous.key .. ':' .. last .. ':' .. (seed % last)) * last
      while size < RECORD_MAX_BUCKETS and size * RECORD_FILL / 2 < sampled do size = size * 2 end
    end
    epoch.sizes[1] = size
    redis.call('SET', epoch.key, size, 'EXAT', epoch.expires)
  end
  local size = epoch.sizes[#epoch.sizes]
  local bucket = epoch.key .. ':' .. size .. ':' .. (seed % size)
  redis.call('HSET', bucket, field, value)
  local entries = redis.call('HLEN', bucket)
  if entries == 1 then redis.call('EXPIREAT', bucket, epoch.expires) end
  if entries > RECORD_FILL and size < RECORD_MAX_BUCKETS then
    epoch.sizes[#epoch.sizes + 1] = math.min(size * RECORD_GROWTH, RECORD_MAX_BUCKETS)
    redis.call('SET', epoch.key, table.concat(epoch.sizes, ' '), 'EXAT', epoch.expires)
  end
end
