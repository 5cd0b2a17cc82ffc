-- Admission: rate limit, concurrency limit, idempotency and the hold of the price ceiling, all or nothing.
-- Every check happens before the first write that concerns this call, so a refused call leaves no
-- trace. (Entries that already left the rate window are dropped first: that changes no answer.)
--
-- KEYS: 1 acct (hash: balance, held, gen, pgv)   2 holds (hash id -> amount)
--       3 hold_dl (zset id -> deadline ms)       4 hold_meta (hash id -> event template)
--       5 rl (zset of admitted calls, score = µs) 6 idem (hash)   7 stream (ledger stream)
--       8 settled (zset of resolved hold ids)     9 tpm (hash id -> tokens, for the calls in rl, and
--         '#sum' -> the running total of those tokens)
--       10 hold_key (hash id -> key id)  11 live_keys (hash key id -> live holds)
--       12 hold_idem (hash id -> idem record key)
--       13 kbudget (hash '<key id>:p|t|s|h' -> the key budget's period id, period kind, spent, held)
--       14 hold_kb (hash id -> what the hold holds against its key's budget)
-- ARGV: 1 hold_id  2 ceiling_micro  3 rate_limit  4 window_ms  5 hold_ttl_ms  6 idem_fingerprint ('' = none)
--       7 idem_ttl_ms  8 meta  9 unflushed_max (ledger backlog bound)
--       10 ceiling_tokens (input + output bound)  11 token_limit (per window; 0 = none)
--       12 key_id  13 concurrent_per_key (0 = none)  14 concurrent_per_workspace (0 = none)
--       15 evict_max (entries leaving the window dropped per call: bounds the work of one call)
--       16 key budget micro ('' = the key has none)  17 its period ('total' | 'monthly' | 'daily')
--       18 what the call holds against the key budget (its credits ceiling, fee included)
--
-- The workspace's wallet settings live in the acct hash (load.lua, wallet.lua): `mode` ('postpaid':
-- admit while balance > -climit, hold nothing), `climit`, `exp` (ms: from this instant no call that
-- needs credits is admitted).
-- Returns: {0 admitted, remaining, reset_ms, balance, held, gen, now_us, tokens_remaining}
--          {1 rate_limited, retry_after_ms, reset_ms, 'requests' | 'tokens'}
--          {2 insufficient, available, remaining, reset_ms}
--          {3 duplicate, status, content_type, body}     {4 in_progress}   {5 idem_conflict}
--          {6 need_load}   {7 backlog, stream_length}   {8 already_resolved}   {9 over_token_limit}
--          {10 too_many_concurrent, 'key' | 'workspace'}
--          {12 need_key_load (rebuild the key budget from Postgres)}   {13 over_key_budget, remaining}
--          {14 expired, expiry ms}
-- The admitted reply's 9th element is 1 when the call is admitted postpaid (nothing held).
--
-- Safe to run twice for the same hold id (a client retry after a lost reply): the second run sees
-- its own hold and answers as the first did, without holding again.

local hold_id = ARGV[1]
local ceiling = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
local window_ms = tonumber(ARGV[4])
local fingerprint = ARGV[6]
local ceiling_tokens = tonumber(ARGV[10])
local token_limit = tonumber(ARGV[11])
local key_id = ARGV[12]
local per_key_max = tonumber(ARGV[13])
local per_ws_max = tonumber(ARGV[14])
local evict_max = tonumber(ARGV[15])
local key_budget = ARGV[16] or ''
local key_hold = tonumber(ARGV[18] or '0')
local SUM = '#sum'  -- not a hold id (those are hex)

local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now_ms = math.floor(now_us / 1000)
local window_start_us = now_us - window_ms * 1000
-- Bounds formatted as integers: Lua's default number formatting rounds to 14 digits.
local after_start = string.format('(%d', window_start_us)
local window_start = string.format('%d', window_start_us)

-- Drop (at most evict_max of) the calls that left the window, and their tokens from the running sum:
-- admission then costs O(entries leaving), never O(window). When more were waiting than one call may
-- drop, the sum still counts the rest: it over-counts (refuses early), never admits past the limit.
local function evict_leaving()
  local leaving = redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', window_start, 'LIMIT', 0, evict_max)
  if #leaving == 0 then return false end
  local tokens = redis.call('HMGET', KEYS[9], unpack(leaving))
  local gone = 0
  for _, n in ipairs(tokens) do if n then gone = gone + tonumber(n) end end
  if gone > 0 and redis.call('HINCRBY', KEYS[9], SUM, string.format('%d', -gone)) < 0 then
    redis.call('HSET', KEYS[9], SUM, 0)
  end
  redis.call('HDEL', KEYS[9], unpack(leaving))
  redis.call('ZREM', KEYS[5], unpack(leaving))
  return #leaving == evict_max and redis.call('ZCOUNT', KEYS[5], '-inf', window_start) > 0
end

local function tokens_in_window()
  return tonumber(redis.call('HGET', KEYS[9], SUM) or '0')
end

-- A key budget's period id at now (UTC): 't', 'd<day>', 'm<year*12+month-1>' (sidecar/wallet.py).
local function period_id(kind)
  if kind == 'total' then return 't' end
  local day = math.floor(now_ms / 86400000)
  if kind == 'daily' then return string.format('d%d', day) end
  -- civil_from_days (H. Hinnant): the calendar month of a day count, exact in doubles.
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

local function admitted_reply(balance, held, gen, postpaid)
  local in_window = redis.call('ZCOUNT', KEYS[5], after_start, '+inf')
  local oldest = redis.call('ZRANGEBYSCORE', KEYS[5], after_start, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
  local reset_ms = now_ms + window_ms
  if oldest[2] then reset_ms = math.floor(tonumber(oldest[2]) / 1000) + window_ms end
  local tokens_left = -1
  if token_limit > 0 then tokens_left = math.max(token_limit - tokens_in_window(), 0) end
  return {0, math.max(limit - in_window, 0), reset_ms, balance, held, gen, now_us, tokens_left, postpaid or 0}
end

local evicting_behind = evict_leaving()

if redis.call('HEXISTS', KEYS[2], hold_id) == 1 then
  local acct = redis.call('HMGET', KEYS[1], 'balance', 'held', 'gen')
  local postpaid = 0
  if tonumber(redis.call('HGET', KEYS[2], hold_id)) == 0 and ceiling > 0 then postpaid = 1 end
  return admitted_reply(tonumber(acct[1] or '0'), tonumber(acct[2] or '0'), acct[3] or '', postpaid)
end
-- Resolved, or voided before it arrived (a "failed" expire leaves this tombstone): never hold again.
if redis.call('ZSCORE', KEYS[8], hold_id) then return {8} end

if fingerprint ~= '' then
  local prior = redis.call('HMGET', KEYS[6], 'fp', 'state', 'status', 'ctype', 'body')
  if prior[1] then
    if prior[1] ~= fingerprint then return {5} end
    if prior[2] ~= 'done' then return {4} end
    return {3, tonumber(prior[3]), prior[4] or '', prior[5] or ''}
  end
end

local function limited(which)
  -- The oldest call in the window is the first to free room.
  local oldest = redis.call('ZRANGEBYSCORE', KEYS[5], after_start, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
  local frees_at_ms = now_ms + window_ms
  if oldest[2] then frees_at_ms = math.floor(tonumber(oldest[2]) / 1000) + window_ms end
  return {1, math.max(frees_at_ms - now_ms, 1), frees_at_ms, which}
end

local admitted = redis.call('ZCOUNT', KEYS[5], after_start, '+inf')
if admitted >= limit then return limited('requests') end
if token_limit > 0 then
  if ceiling_tokens > token_limit then return {9} end
  if tokens_in_window() + ceiling_tokens > token_limit then
    -- Still dropping a backlog of calls that left the window: the sum over-counts; retry at once.
    if evicting_behind then return {1, 1, now_ms + 1, 'tokens'} end
    return limited('tokens')
  end
end

-- Live holds: the holds hash is exactly the workspace's live calls; live_keys counts them per key.
if per_ws_max > 0 and redis.call('HLEN', KEYS[2]) >= per_ws_max then return {10, 'workspace'} end
if per_key_max > 0 then
  if redis.call('EXISTS', KEYS[11]) == 0 and redis.call('HLEN', KEYS[10]) > 0 then
    -- The counts were lost (evicted, or a partial restore) while holds live: rebuild them from the
    -- holds' own record. Bounded by the workspace's live holds.
    local owners = redis.call('HVALS', KEYS[10])
    local counts = {}
    for _, owner in ipairs(owners) do counts[owner] = (counts[owner] or 0) + 1 end
    for owner, n in pairs(counts) do redis.call('HSET', KEYS[11], owner, n) end
  end
  if tonumber(redis.call('HGET', KEYS[11], key_id) or '0') >= per_key_max then return {10, 'key'} end
end

local backlog = redis.call('XLEN', KEYS[7])
if backlog >= tonumber(ARGV[9]) then return {7, backlog} end

local function insufficient(available)
  local oldest = redis.call('ZRANGEBYSCORE', KEYS[5], after_start, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
  local reset_ms = now_ms + window_ms
  if oldest[2] then reset_ms = math.floor(tonumber(oldest[2]) / 1000) + window_ms end
  return {2, available, limit - admitted, reset_ms}
end

local balance, held, gen = 0, 0, ''
local hold_amount, postpaid = ceiling, 0
if ceiling > 0 then
  local acct = redis.call('HMGET', KEYS[1], 'balance', 'held', 'gen', 'mode', 'climit', 'exp')
  if not acct[1] then return {6} end
  balance, held, gen = tonumber(acct[1]), tonumber(acct[2]), acct[3]
  if acct[6] and acct[6] ~= '' and now_ms >= tonumber(acct[6]) then return {14, tonumber(acct[6])} end
  if acct[4] == 'postpaid' then
    -- Post-charge: nothing is held; the balance may end below zero by at most the calls admitted
    -- while it was above the limit.
    if balance <= -tonumber(acct[5] or '0') then return insufficient(balance - held) end
    hold_amount, postpaid = 0, 1
  elseif ceiling > balance - held then
    return insufficient(balance - held)
  end
end

-- The key's budget: held in this same call, against spent + held in the current period.
local kb_p, kb_t, kb_s, kb_h = key_id .. ':p', key_id .. ':t', key_id .. ':s', key_id .. ':h'
local kb_period, kb_reset = '', false
if key_budget ~= '' and key_hold > 0 then
  local kb = redis.call('HMGET', KEYS[13], kb_p, kb_s, kb_h, kb_t)
  if not kb[1] then return {12} end
  kb_period = period_id(ARGV[17])
  if kb[4] ~= ARGV[17] then return {12} end  -- the period kind changed: rebuild from Postgres
  local spent = tonumber(kb[2] or '0')
  if kb[1] ~= kb_period then spent, kb_reset = 0, true end
  local kheld = tonumber(kb[3] or '0')
  if spent + kheld + key_hold > tonumber(key_budget) then
    return {13, math.max(tonumber(key_budget) - spent - kheld, 0)}
  end
end

-- Writes. From here on the call is admitted. Every number written is formatted as an integer.
redis.call('ZADD', KEYS[5], string.format('%d', now_us), hold_id)
redis.call('PEXPIRE', KEYS[5], window_ms + 1000)
if token_limit > 0 then
  redis.call('HSET', KEYS[9], hold_id, ARGV[10])
  redis.call('HINCRBY', KEYS[9], SUM, ARGV[10])
  redis.call('PEXPIRE', KEYS[9], window_ms + 1000)
end
if hold_amount > 0 then
  held = redis.call('HINCRBY', KEYS[1], 'held', ARGV[2])
end
redis.call('HSET', KEYS[2], hold_id, string.format('%d', hold_amount))
if kb_period ~= '' then
  if kb_reset then redis.call('HSET', KEYS[13], kb_p, kb_period, kb_s, 0) end
  redis.call('HINCRBY', KEYS[13], kb_h, ARGV[18])
  redis.call('HSET', KEYS[14], hold_id, ARGV[18])
end
redis.call('ZADD', KEYS[3], string.format('%d', now_ms + tonumber(ARGV[5])), hold_id)
redis.call('HSET', KEYS[4], hold_id, ARGV[8])
redis.call('HSET', KEYS[10], hold_id, key_id)
redis.call('HINCRBY', KEYS[11], key_id, 1)
if fingerprint ~= '' then
  redis.call('HSET', KEYS[6], 'fp', fingerprint, 'state', 'pending', 'hold', hold_id)
  redis.call('PEXPIRE', KEYS[6], tonumber(ARGV[7]))
  redis.call('HSET', KEYS[12], hold_id, KEYS[6])
end

return admitted_reply(balance, held, gen, postpaid)
