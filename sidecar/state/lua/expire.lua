-- Void one hold that will never be settled, and record the call: `expired` when its deadline passed
-- (the sidecar that took it died), `failed` when admission's own reply was lost (nothing was sent).
-- Frees the call's idempotency key, so the client's retry is not refused as "in progress".
--
-- KEYS: 1 acct  2 holds  3 hold_dl  4 hold_meta  5 settled  6 stream  7 idem (may not exist)
-- ARGV: 1 hold_id  2 status ('expired' checks the deadline; 'failed' does not)  3 settled_retention_ms
-- Returns: 1 voided, 0 nothing to do (already resolved, or not yet due)

local hold_id = ARGV[1]
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local hold = redis.call('HGET', KEYS[2], hold_id)
if not hold then return 0 end
if ARGV[2] == 'expired' then
  local deadline = redis.call('ZSCORE', KEYS[3], hold_id)
  if deadline and tonumber(deadline) > now_ms then return 0 end
end

hold = tonumber(hold)
local balance = ''
if redis.call('HEXISTS', KEYS[1], 'balance') == 1 then
  if hold > 0 and redis.call('HINCRBY', KEYS[1], 'held', -hold) < 0 then redis.call('HSET', KEYS[1], 'held', 0) end
  balance = redis.call('HGET', KEYS[1], 'balance')
end
local gen = redis.call('HGET', KEYS[1], 'gen') or ''
local meta = redis.call('HGET', KEYS[4], hold_id) or '{}'
redis.call('HDEL', KEYS[2], hold_id)
redis.call('ZREM', KEYS[3], hold_id)
redis.call('HDEL', KEYS[4], hold_id)
redis.call('ZADD', KEYS[5], now_ms, hold_id)
redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now_ms - tonumber(ARGV[3]))
redis.call('XADD', KEYS[6], '*', 'e', meta, 'cost', 0, 'impact', 0, 'after', balance,
  'at', now_ms, 'gen', gen, 'lost', 0, 'status', ARGV[2])
if redis.call('HGET', KEYS[7], 'hold') == hold_id then redis.call('DEL', KEYS[7]) end
return 1
