-- Void one hold that will never be settled, and record the call: `expired` when its deadline passed
-- (the sidecar that took it died), `failed` when admission's own reply was lost (nothing was sent).
-- Frees the call's idempotency key, so the client's retry is not refused as "in progress".
--
-- A `failed` expire may reach Redis before the admission it voids (that admission delayed on the
-- network): then it leaves the hold id in `settled`, and the late admission answers "already
-- resolved" without holding anything or claiming the idempotency key.
--
-- KEYS: 1 acct  2 holds  3 hold_dl  4 hold_meta  5 settled  6 stream  7 idem (may not exist)
--       8 hold_key  9 live_keys  10 hold_idem  11 expired (ids the sweeper voided, for a late settle)
--       12 kbudget  13 hold_kb (a voided hold gives its key budget back: nothing was spent)
-- A `lost` expire is for a call whose process died (its journal says so, proxy/inflight.py): still
-- held, it is left to the sweeper; neither held nor resolved, Redis lost the hold (it restarted
-- without its AOF), so the call is recorded `expired` at 0 from the journalled template.
--
-- ARGV: 1 hold_id  2 status ('expired' checks the deadline, by Redis time, now; 'failed' does not;
--       'lost' see above)  3 settled_retention_ms  4 grace_ms (an 'expired' hold is due only this long
--       after its deadline)  5 the call's event template ('lost' only)
-- Returns: 1 voided, 0 not yet due (or still held: 'lost'), -1 already resolved, -2 not held yet:
--          tombstone left, -3 lost hold recorded as expired

local hold_id = ARGV[1]
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local hold = redis.call('HGET', KEYS[2], hold_id)
if not hold then
  if redis.call('ZSCORE', KEYS[5], hold_id) then return -1 end
  if ARGV[2] == 'lost' then
    local balance = redis.call('HGET', KEYS[1], 'balance') or ''
    local gen = redis.call('HGET', KEYS[1], 'gen') or ''
    redis.call('ZADD', KEYS[5], string.format('%d', now_ms), hold_id)
    redis.call('XADD', KEYS[6], '*', 'e', ARGV[5], 'cost', 0, 'impact', 0, 'after', balance,
      'at', string.format('%d', now_ms), 'gen', gen, 'lost', 0, 'status', 'expired')
    return -3
  end
  if ARGV[2] ~= 'failed' then return -1 end
  redis.call('ZADD', KEYS[5], string.format('%d', now_ms), hold_id)
  return -2
end
if ARGV[2] == 'lost' then return 0 end
if ARGV[2] == 'expired' then
  local deadline = redis.call('ZSCORE', KEYS[3], hold_id)
  if deadline and tonumber(deadline) + tonumber(ARGV[4] or '0') > now_ms then return 0 end
end

hold = tonumber(hold)
local balance = ''
if redis.call('HEXISTS', KEYS[1], 'balance') == 1 then
  if hold > 0 and redis.call('HINCRBY', KEYS[1], 'held', string.format('%d', -hold)) < 0 then
    redis.call('HSET', KEYS[1], 'held', 0)
  end
  balance = redis.call('HGET', KEYS[1], 'balance')
end
local gen = redis.call('HGET', KEYS[1], 'gen') or ''
local meta = redis.call('HGET', KEYS[4], hold_id) or '{}'
local owner = redis.call('HGET', KEYS[8], hold_id)
if owner then
  if redis.call('HINCRBY', KEYS[9], owner, -1) <= 0 then redis.call('HDEL', KEYS[9], owner) end
  redis.call('HDEL', KEYS[8], hold_id)
  local kb_held = redis.call('HGET', KEYS[13], hold_id)
  if kb_held then
    if redis.call('HINCRBY', KEYS[12], owner .. ':h', string.format('%d', -tonumber(kb_held))) < 0 then
      redis.call('HSET', KEYS[12], owner .. ':h', 0)
    end
    redis.call('HDEL', KEYS[13], hold_id)
  end
end
redis.call('HDEL', KEYS[10], hold_id)
redis.call('HDEL', KEYS[2], hold_id)
redis.call('ZREM', KEYS[3], hold_id)
redis.call('HDEL', KEYS[4], hold_id)
redis.call('ZADD', KEYS[5], string.format('%d', now_ms), hold_id)
redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', string.format('%d', now_ms - tonumber(ARGV[3])))
if ARGV[2] == 'expired' then
  redis.call('ZADD', KEYS[11], string.format('%d', now_ms), hold_id)
  redis.call('ZREMRANGEBYSCORE', KEYS[11], '-inf', string.format('%d', now_ms - tonumber(ARGV[3])))
end
redis.call('XADD', KEYS[6], '*', 'e', meta, 'cost', 0, 'impact', 0, 'after', balance,
  'at', string.format('%d', now_ms), 'gen', gen, 'lost', 0, 'status', ARGV[2])
if redis.call('HGET', KEYS[7], 'hold') == hold_id then redis.call('DEL', KEYS[7]) end
return 1
