-- Where idempotency records live, prepended to apply_events.lua (which says what a record holds).
-- A Redis key with an expiry costs about 100 bytes before it holds anything, so records are packed
-- into hashes, a 12-byte field (the webhook-id's digest) and a short value each: about 25 bytes a
-- record while a hash stays a listpack (docs/design.md, *Idempotency records*).
--
-- Records are grouped by epoch, epoch e = floor(now / ttl) on Redis's clock. Every key of epoch e
-- expires at (e + 2) * ttl, so a record lives at least ttl and less than twice that, and a lookup
-- reads epochs e and e - 1: one bucket each. The ttl is in the names: records written under
-- another --idempotency-ttl-secs are not found.
--
-- An epoch's records are a linear hash table (Litwin's linear hashing), so a lookup reads one
-- bucket however many records the epoch holds, and the table grows one bucket at a time:
--   `<prefix><ttl>:<e>`     how many buckets the epoch has, n;
--   `<prefix><ttl>:<e>:n`   how many records it holds;
--   `<prefix><ttl>:<e>:<b>` bucket b, a hash: field = the record's 12 bytes, value = the record,
--                           and the field '' (empty), so that a write knows it made the bucket
--                           (HSET answers 2) and gives it its expiry.
-- With low the largest power of two <= n, a record with seed s (its field's first 4 bytes) is in
-- bucket s mod 2low, or s mod low when that is n or more. Each time the epoch passes RECORD_FILL
-- records per bucket, bucket n - low is split: those of its records with s mod 2low = n move to
-- the new bucket n. A bucket holds RECORD_FILL records on average and one not yet split in a
-- round up to about twice that, under Redis's default hash-max-listpack-entries (128).
--
-- Keys the former version wrote, one per record (`{P}:webhook:<id>`), are read while the window
-- key (apply_events.lua's KEYS[8]) exists. Each process sets it for a ttl with its first call:
-- an upgrade stops the former version first (docs/design.md), so every key it wrote is older than
-- that call and expires within the window; a rollback and a second upgrade open it again.
--
-- All the keys share the deployment's hash tag (the prefix's): one Redis Cluster slot.
--
-- KEYS: (none)
-- ARGV: (none)
local RECORD_FILL = 48

-- The largest power of two not above `buckets`: the table's round.
local function record_round(buckets)
  local low = 1
  while low * 2 <= buckets do low = low * 2 end
  return low
end

-- The bucket of `seed` in a table of `buckets` buckets.
local function record_bucket(seed, buckets)
  local low = record_round(buckets)
  local b = seed % (2 * low)
  if b >= buckets then b = seed % low end
  return b
end

-- A record's seed: its field's first 4 bytes, a number below 2^32.
local function record_seed(field)
  local a, b, c, d = string.byte(field, 1, 4)
  return ((a * 256 + b) * 256 + c) * 256 + d
end

-- The current and the previous epoch: their keys, bucket counts (0 for an epoch without records)
-- and expiry; and whether a key the former version wrote may still live (`window` exists).
local function record_epochs(prefix, ttl, window)
  local e = math.floor(tonumber(redis.call('TIME')[1]) / ttl)
  local current, previous = prefix .. ttl .. ':' .. e, prefix .. ttl .. ':' .. (e - 1)
  local listed = redis.call('MGET', current, previous, window)
  local epochs = {former_keys_may_live = listed[3] ~= false}
  for i, key in ipairs({current, previous}) do
    epochs[i] = {key = key, buckets = tonumber(listed[i]) or 0, expires = (e + 3 - i) * ttl}
  end
  return epochs
end

-- The record of the id with `field`, newest epoch first, and the bucket holding it; false when
-- there is none.
local function find_record(epochs, field)
  local seed = record_seed(field)
  for _, epoch in ipairs(epochs) do
    if epoch.buckets > 0 then
      local bucket = epoch.key .. ':' .. record_bucket(seed, epoch.buckets)
      local value = redis.call('HGET', bucket, field)
      if value then return value, bucket end
    end
  end
  return false, nil
end

-- Writes new records (`entries`: field, value, field, value...) in `bucket`; a bucket it makes
-- gets the epoch's expiry.
local function put_records(epoch, bucket, entries)
  if redis.call('HSET', bucket, '', '', unpack(entries)) > #entries / 2 then
    redis.call('EXPIREAT', bucket, epoch.expires)
  end
end

-- Adds bucket n to the epoch: the records of bucket n - low that belong there move.
local function split_bucket(epoch)
  local n = epoch.buckets
  local low = record_round(n)
  local from = epoch.key .. ':' .. (n - low)
  local held = redis.call('HGETALL', from)
  local moved, fields = {}, {}
  for i = 1, #held, 2 do
    local field = held[i]
    -- Only the 12-byte fields this script writes move (another's would stay where they are).
    if #field == 12 and record_seed(field) % (2 * low) == n then
      moved[#moved + 1], moved[#moved + 2] = field, held[i + 1]
      fields[#fields + 1] = field
    end
  end
  put_records(epoch, epoch.key .. ':' .. n, moved)
  if #fields > 0 then redis.call('HDEL', from, unpack(fields)) end
  epoch.buckets = n + 1
  redis.call('SET', epoch.key, epoch.buckets, 'EXAT', epoch.expires)
end

-- Writes a new record in the current epoch (which it starts if it has none yet).
local function write_record(epochs, field, value)
  local epoch = epochs[1]
  if epoch.buckets == 0 then
    epoch.buckets = 1
    redis.call('SET', epoch.key, '1', 'EXAT', epoch.expires)
  end
  put_records(epoch, epoch.key .. ':' .. record_bucket(record_seed(field), epoch.buckets), {field, value})
  local count_key = epoch.key .. ':n'
  local records = redis.call('INCR', count_key)
  if records == 1 then redis.call('EXPIREAT', count_key, epoch.expires) end
  if records > RECORD_FILL * epoch.buckets then split_bucket(epoch) end
end
