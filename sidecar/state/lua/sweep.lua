-- The hold sweeper: void holds whose deadline passed (the sidecar that took them died) and write
-- an `expired` ledger event for each, from the template stored at admission.
--
-- KEYS: 1 acct  2 holds  3 hold_dl  4 hold_meta  5 settled  6 stream
-- ARGV: 1 batch_max  2 settled_retention_ms
-- Returns: number of holds voided

local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expired = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now_ms, 'LIMIT', 0, tonumber(ARGV[1]))
local gen = redis.call('HGET', KEYS[1], 'gen') or ''
for _, hold_id in ipairs(expired) do
  local hold = tonumber(redis.call('HGET', KEYS[2], hold_id) or '0')
  local meta = redis.call('HGET', KEYS[4], hold_id) or '{}'
  if hold > 0 then redis.call('HINCRBY', KEYS[1], 'held', -hold) end
  local balance = redis.call('HGET', KEYS[1], 'balance') or ''
  redis.call('HDEL', KEYS[2], hold_id)
  redis.call('ZREM', KEYS[3], hold_id)
  redis.call('HDEL', KEYS[4], hold_id)
  redis.call('ZADD', KEYS[5], now_ms, hold_id)
  redis.call('XADD', KEYS[6], '*', 'e', meta, 'cost', 0, 'impact', 0, 'after', balance,
    'at', now_ms, 'gen', gen, 'lost', 0, 'status', 'expired')
end
redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now_ms - tonumber(ARGV[2]))
return #expired
