-- Admission: rate limit, idempotency and the hold of the price ceiling, all or nothing.
-- Every check happens before the first write, so a refused call leaves no trace.
--
-- KEYS: 1 acct (hash: balance, held, gen, pgv)   2 holds (hash id -> amount)
--       3 hold_dl (zset id -> deadline ms)       4 hold_meta (hash id -> event template)
--       5 rl (zset of admitted calls, score = µs) 6 idem (hash)   7 stream (ledger stream)
--       8 settled (zset of resolved hold ids)     9 tpm (hash id -> tokens, for the calls in rl)
-- ARGV: 1 hold_id  2 ceiling_micro  3 rate_limit  4 window_ms  5 hold_ttl_ms  6 idem_fingerprint ('' = none)
--       7 idem_ttl_ms  8 meta  9 max_unflushed (ledger backlog bound)
--       10 ceiling_tokens (input + output bound)  11 token_limit (per window; 0 = none)
-- Returns: {0 admitted, remaining, reset_ms, balance, held, gen, now_us, tokens_remaining}
--          {1 rate_limited, retry_after_ms, reset_ms, 'requests' | 'tokens'}
--          {2 insufficient, available, remaining, reset_ms}
--          {3 duplicate, status, content_type, body}     {4 in_progress}   {5 idem_conflict}
--          {6 need_load}   {7 backlog, stream_length}   {8 already_resolved}   {9 over_token_limit}
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

local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now_ms = math.floor(now_us / 1000)
local window_start_us = now_us - window_ms * 1000
-- Exclusive lower bound, formatted as an integer: Lua's default number formatting rounds to 14 digits.
local after_start = string.format('(%d', window_start_us)

-- Tokens of the calls admitted in the window: their ceilings, corrected to actual usage at settle.
local function tokens_in_window()
  if token_limit <= 0 then return 0 end
  local members = redis.call('ZRANGEBYSCORE', KEYS[5], after_start, '+inf')
  if #members == 0 then return 0 end
  local used = 0
  for first = 1, #members, 1000 do  -- in slices: unpack is bounded by Lua's stack
    local slice = redis.call('HMGET', KEYS[9], unpack(members, first, math.min(first + 999, #members)))
    for _, tokens in ipairs(slice) do used = used + tonumber(tokens or '0') end
  end
  return used
end

local function admitted_reply(balance, held, gen)
  local in_window = redis.call('ZCOUNT', KEYS[5], after_start, '+inf')
  local oldest = redis.call('ZRANGEBYSCORE', KEYS[5], after_start, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
  local reset_ms = now_ms + window_ms
  if oldest[2] then reset_ms = math.floor(tonumber(oldest[2]) / 1000) + window_ms end
  local tokens_left = -1
  if token_limit > 0 then tokens_left = math.max(token_limit - tokens_in_window(), 0) end
  return {0, math.max(limit - in_window, 0), reset_ms, balance, held, gen, now_us, tokens_left}
end

if redis.call('HEXISTS', KEYS[2], hold_id) == 1 then
  local acct = redis.call('HMGET', KEYS[1], 'balance', 'held', 'gen')
  return admitted_reply(tonumber(acct[1] or '0'), tonumber(acct[2] or '0'), acct[3] or '')
end
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
  if tokens_in_window() + ceiling_tokens > token_limit then return limited('tokens') end
end

local backlog = redis.call('XLEN', KEYS[7])
if backlog >= tonumber(ARGV[9]) then return {7, backlog} end

local balance, held, gen = 0, 0, ''
if ceiling > 0 then
  local acct = redis.call('HMGET', KEYS[1], 'balance', 'held', 'gen')
  if not acct[1] then return {6} end
  balance, held, gen = tonumber(acct[1]), tonumber(acct[2]), acct[3]
  if ceiling > balance - held then
    local oldest = redis.call('ZRANGEBYSCORE', KEYS[5], after_start, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
    local reset_ms = now_ms + window_ms
    if oldest[2] then reset_ms = math.floor(tonumber(oldest[2]) / 1000) + window_ms end
    return {2, balance - held, limit - admitted, reset_ms}
  end
end

-- Writes. From here on the call is admitted.
local window_start = string.format('%d', window_start_us)
local leaving = redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', window_start, 'LIMIT', 0, 1000)
if #leaving > 0 then
  redis.call('HDEL', KEYS[9], unpack(leaving))
  redis.call('ZREM', KEYS[5], unpack(leaving))
end
redis.call('ZADD', KEYS[5], now_us, hold_id)
redis.call('PEXPIRE', KEYS[5], window_ms + 1000)
if token_limit > 0 then
  redis.call('HSET', KEYS[9], hold_id, ceiling_tokens)
  redis.call('PEXPIRE', KEYS[9], window_ms + 1000)
end
if ceiling > 0 then
  held = redis.call('HINCRBY', KEYS[1], 'held', ceiling)
end
redis.call('HSET', KEYS[2], hold_id, ceiling)
redis.call('ZADD', KEYS[3], now_ms + tonumber(ARGV[5]), hold_id)
redis.call('HSET', KEYS[4], hold_id, ARGV[8])
if fingerprint ~= '' then
  redis.call('HSET', KEYS[6], 'fp', fingerprint, 'state', 'pending', 'hold', hold_id)
  redis.call('PEXPIRE', KEYS[6], tonumber(ARGV[7]))
end

return admitted_reply(balance, held, gen)
