-- Debit a movement (a refund, an expiry) from the live balance, at most what remains, exactly once.
-- "What remains" is balance - held: the credits no running call has been promised. Atomic with every
-- admission and settlement, so no hold slips in between the check and the debit.
--
-- KEYS: 1 acct  2 movements (hash event id -> 'taken:short:at_ms:balance_after:gen', never reset by a load)
--       3 stream (ledger stream)
-- ARGV: 1 event_id  2 requested_micro ('' = everything that remains)  3 event (JSON, relayed to the ledger)
--       4 kind
-- Returns: {0 debited now, taken, short, at_ms, balance_after, gen}
--          {1 debited before, taken, short, at_ms, balance_after, gen}   {2 need_load}
local prior = redis.call('HGET', KEYS[2], ARGV[1])
if prior then
  local taken, short, at, after, gen = string.match(prior, '^(%d+):(%d+):(%d+):(-?%d+):(.*)$')
  return {1, tonumber(taken), tonumber(short), tonumber(at), tonumber(after), gen}
end
local acct = redis.call('HMGET', KEYS[1], 'balance', 'held', 'gen')
if not acct[1] then return {2} end
local available = math.max(tonumber(acct[1]) - tonumber(acct[2] or '0'), 0)
local taken, short = available, 0
if ARGV[2] ~= '' then
  local requested = tonumber(ARGV[2])
  taken = math.min(requested, available)
  short = requested - taken
end
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local after = redis.call('HINCRBY', KEYS[1], 'balance', string.format('%d', -taken))
local gen = acct[3] or ''
redis.call('XADD', KEYS[3], '*', 'e', ARGV[3], 'cost', 0, 'impact', string.format('%d', -taken),
  'after', string.format('%d', after), 'at', string.format('%d', now_ms), 'gen', gen, 'lost', 0,
  'status', 'completed', 'kind', ARGV[4], 'short', string.format('%d', short))
redis.call('HSET', KEYS[2], ARGV[1], string.format('%d:%d:%d:%d:%s', taken, short, now_ms, after, gen))
return {0, taken, short, now_ms, after, gen}
