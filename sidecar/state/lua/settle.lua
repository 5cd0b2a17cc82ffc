-- Settlement: resolve a hold exactly once, debit the balance, append the ledger event, and record the
-- outcome under the idempotency key. A second settle of the same hold changes nothing.
--
-- KEYS: 1 acct  2 holds  3 hold_dl  4 hold_meta  5 settled (zset id -> resolved ms)  6 stream  7 idem
--       8 tpm (the key's token-window hash)  9 hold_key  10 live_keys  11 hold_idem  12 expired (ids the sweeper voided)
--       13 kbudget (key budgets, see admit.lua)  14 hold_kb (hold id -> amount held against its key's budget)
-- ARGV: 1 hold_id  2 cost_micro (actual cost, before the cap)  3 billed ('1' debits the balance, '0' BYOK
--       or failed: records only)  4 event (opaque JSON, relayed to the ledger)
--       5 idempotency ('' none, 'replay': keep the outcome for replay, 'forget': delete the record)
--       6 status  7 content_type  8 body ('' with status 0: remembered as done, not replayable)
--       9 idem_ttl_ms  10 settled_retention_ms  11 tokens_used
--       12 fee_ppm (the usage fee, parts per million of the cost; 0 none)  13 postpaid ('1': admitted
--       post-charge: nothing was held, the actual cost and fee are debited even below zero)
--       14 the key budget's period kind ('' = the key has none)  15 the call's key id
--       16 the key's budget (micro; '' = none)
--
-- Money: cost = min(actual, hold) (postpaid: the actual cost); fee = ceil(cost * ppm / 10^6), of which
-- the workspace's fee waiver (acct `wtotal` - `waived`) takes what it still has; the balance is
-- debited cost + fee. A hold covers its worst-case cost plus that cost's fee, so cost + fee <= hold.
-- Returns: {0 settled, cost recorded (charged when billed), balance_after ('' if not loaded), hold_micro,
--           lost_hold (0/1), now_ms, record (1 the idempotency record was written or deleted, 0 untouched),
--           fee charged, fee waived,
--           held_after ('' if not loaded): with balance_after, the available balance the balance watch
--           compares to its thresholds, with no second round trip}
--          {1 already_resolved}   {2 need_load}

-- A key budget's period id (the same function as admit.lua's; see sidecar/wallet.py).
local function period_id(kind, now_ms)
  if kind == 'total' then return 't' end
  local day = math.floor(now_ms / 86400000)
  if kind == 'daily' then return string.format('d%d', day) end
  local z = day + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local month = mp < 10 and mp + 3 or mp - 9
  local year = yoe + era * 400
  if month <= 2 then year = year + 1 end
  return string.format('m%d', year * 12 + month - 1)
end

local hold_id = ARGV[1]
if redis.call('ZSCORE', KEYS[5], hold_id) then
  if redis.call('ZSCORE', KEYS[12], hold_id) then return {3} end  -- the sweeper voided it: recorded expired
  return {1}
end

local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cost = tonumber(ARGV[2])
local billed = ARGV[3] == '1'
local fee_ppm = tonumber(ARGV[12] or '0')
local postpaid = ARGV[13] == '1'
local key_id = ARGV[15] or ''
local key_budget = tonumber(ARGV[16] or '')

-- What the key's budget has left now, when Redis has its record (nil: no budget, or no record: the
-- next admission rebuilds it from Postgres and the stream, this call's entry included).
local function key_budget_room()
  if (ARGV[14] or '') == '' or key_id == '' or not key_budget then return nil end
  local kb = redis.call('HMGET', KEYS[13], key_id .. ':p', key_id .. ':s', key_id .. ':h')
  if not kb[1] then return nil end
  local spent = tonumber(kb[2] or '0')
  if kb[1] ~= period_id(ARGV[14], now_ms) then spent = 0 end
  return math.max(key_budget - spent - tonumber(kb[3] or '0'), 0)
end

-- ceil(c * ppm / 10^6) exactly: c splits into whole credits and micro-credits, so no product passes 2^53.
local function fee_of(c)
  if fee_ppm <= 0 or c <= 0 then return 0 end
  local whole = math.floor(c / 1000000)
  local part = c - whole * 1000000
  return whole * fee_ppm + math.floor((part * fee_ppm + 999999) / 1000000)
end

local hold = redis.call('HGET', KEYS[2], hold_id)
local lost = 0
local charged
local room  -- what cost + fee may take from the balance
if hold then
  hold = tonumber(hold)
  charged = math.min(cost, hold)
  room = hold
  if postpaid then charged, room = cost, -1 end  -- -1: no bound
else
  -- Neither resolved nor held: Redis lost the hold (restarted empty) while the call ran. The call
  -- still happened, so it is still recorded once; it is charged only what the balance has free.
  -- A post-charge call was admitted to be debited its actual cost even below zero: losing its hold
  -- changes nothing (it held nothing). Either way, the key's budget: calls admitted since the loss
  -- counted what this one held as free, so it takes at most what the budget has left.
  if redis.call('HEXISTS', KEYS[1], 'balance') == 0 then return {2} end
  lost, hold = 1, 0
  local acct = redis.call('HMGET', KEYS[1], 'balance', 'held')
  room = math.max(tonumber(acct[1]) - tonumber(acct[2]), 0)
  if postpaid then room = -1 end
  local key_room = key_budget_room()
  if key_room and (room < 0 or key_room < room) then room = key_room end
  charged = cost
  if room >= 0 then charged = math.min(cost, room) end
end
local debit, fee, waived = 0, 0, 0
if billed then
  fee = fee_of(charged)
  if fee > 0 then
    local w = redis.call('HMGET', KEYS[1], 'wtotal', 'waived')
    waived = math.min(fee, math.max(tonumber(w[1] or '0') - tonumber(w[2] or '0'), 0))
    fee = fee - waived
  end
  if room >= 0 and charged + fee > room then fee = room - charged end  -- only a lost hold: at most what is free
  debit = charged + fee
else
  charged = cost  -- BYOK: the cost is recorded for the customer to see; nothing is held or debited
end

local balance_after = ''
local held_after = ''
if redis.call('HEXISTS', KEYS[1], 'balance') == 1 then
  -- `held` never goes below zero, even if the account was rebuilt while this hold lived.
  if hold > 0 and redis.call('HINCRBY', KEYS[1], 'held', string.format('%d', -hold)) < 0 then
    redis.call('HSET', KEYS[1], 'held', 0)
  end
  if waived > 0 then redis.call('HINCRBY', KEYS[1], 'waived', string.format('%d', waived)) end
  if debit > 0 then
    balance_after = string.format('%d', redis.call('HINCRBY', KEYS[1], 'balance', string.format('%d', -debit)))
  else
    balance_after = redis.call('HGET', KEYS[1], 'balance')
  end
  held_after = redis.call('HGET', KEYS[1], 'held') or '0'
end
local gen = redis.call('HGET', KEYS[1], 'gen') or ''

-- The hold's concurrency slot: freed once, by whichever script resolves the hold.
local owner = redis.call('HGET', KEYS[9], hold_id)
if owner then
  if redis.call('HINCRBY', KEYS[10], owner, -1) <= 0 then redis.call('HDEL', KEYS[10], owner) end
  redis.call('HDEL', KEYS[9], hold_id)
  -- The key budget: its hold released, what was debited counted as spent in the period of now.
  local kb_held = redis.call('HGET', KEYS[14], hold_id)
  if kb_held then
    if redis.call('HINCRBY', KEYS[13], owner .. ':h', string.format('%d', -tonumber(kb_held))) < 0 then
      redis.call('HSET', KEYS[13], owner .. ':h', 0)
    end
    redis.call('HDEL', KEYS[14], hold_id)
  end
end
-- What was debited counts as the key's spending in the period of now (a lost hold's too: its key is the
-- call's, and a record rebuilt after the loss did not see this debit).
local spender = owner
if not spender and lost == 1 and key_id ~= '' then spender = key_id end
if spender and ARGV[14] ~= '' and debit > 0 and redis.call('HEXISTS', KEYS[13], spender .. ':p') == 1 then
  local period = period_id(ARGV[14], now_ms)
  if redis.call('HGET', KEYS[13], spender .. ':p') ~= period then
    redis.call('HSET', KEYS[13], spender .. ':p', period, spender .. ':s', 0)
  end
  redis.call('HINCRBY', KEYS[13], spender .. ':s', string.format('%d', debit))
end
redis.call('HDEL', KEYS[11], hold_id)
redis.call('HDEL', KEYS[2], hold_id)
redis.call('ZREM', KEYS[3], hold_id)
redis.call('HDEL', KEYS[4], hold_id)
redis.call('ZADD', KEYS[5], string.format('%d', now_ms), hold_id)
redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', string.format('%d', now_ms - tonumber(ARGV[10])))
redis.call('XADD', KEYS[6], '*', 'e', ARGV[4], 'cost', string.format('%d', charged),
  'impact', string.format('%d', -debit), 'after', balance_after, 'at', string.format('%d', now_ms),
  'gen', gen, 'lost', lost, 'status', '', 'fee', string.format('%d', fee), 'waived', string.format('%d', waived),
  'postpaid', postpaid and 1 or 0)

-- The token window counted this call at its ceiling; from now on it counts what it used.
local counted = redis.call('HGET', KEYS[8], hold_id)
if counted then
  redis.call('HSET', KEYS[8], hold_id, ARGV[11])
  if redis.call('HINCRBY', KEYS[8], '#sum', string.format('%d', tonumber(ARGV[11]) - tonumber(counted))) < 0 then
    redis.call('HSET', KEYS[8], '#sum', 0)
  end
end

-- The record is this call's only while it names this hold: once it expired, another call may own it.
local record = 0
if ARGV[5] ~= '' and redis.call('HGET', KEYS[7], 'hold') == hold_id then
  record = 1
  if ARGV[5] == 'replay' then
    redis.call('HSET', KEYS[7], 'state', 'done', 'status', ARGV[6], 'ctype', ARGV[7], 'body', ARGV[8])
    redis.call('PEXPIRE', KEYS[7], tonumber(ARGV[9]))
  else
    redis.call('DEL', KEYS[7])
  end
end
return {0, charged, balance_after, hold, lost, now_ms, record, fee, waived, held_after}
