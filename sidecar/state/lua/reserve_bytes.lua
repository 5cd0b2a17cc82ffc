-- Account replay bytes kept under idempotency keys, against a bound, in time buckets: a record lives
-- idem_ttl_ms, so a bucket is forgotten once every record counted in it has expired. Conservative:
-- a record deleted early stays counted until its bucket goes. Work per call: the bucket count (~26).
-- KEYS: 1 buckets (hash: bucket start ms -> bytes)
-- ARGV: 1 bytes  2 bytes_max  3 idem_ttl_ms  4 bucket ('' reserves now; a bucket start releases into it)
-- Returns: the bucket start the bytes were counted in, '' refused (or nothing to release)
local bytes, ttl = tonumber(ARGV[1]), tonumber(ARGV[3])
if ARGV[4] ~= '' then
  if redis.call('HEXISTS', KEYS[1], ARGV[4]) == 1 then
    redis.call('HINCRBY', KEYS[1], ARGV[4], string.format('%d', -bytes))
  end
  return ''
end
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local width = math.max(math.ceil(ttl / 24), 1000)
local used = 0
local buckets = redis.call('HGETALL', KEYS[1])
for i = 1, #buckets, 2 do
  if tonumber(buckets[i]) + width + ttl <= now_ms then
    redis.call('HDEL', KEYS[1], buckets[i])
  else
    used = used + tonumber(buckets[i + 1])
  end
end
if used + bytes > tonumber(ARGV[2]) then return '' end
local bucket = string.format('%d', math.floor(now_ms / width) * width)
redis.call('HINCRBY', KEYS[1], bucket, string.format('%d', bytes))
redis.call('PEXPIRE', KEYS[1], string.format('%d', ttl + 2 * width))
return bucket
