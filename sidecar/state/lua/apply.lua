-- Apply a balance change that Postgres committed (a grant, or ledger events that were settled in a
-- Redis that has since restarted) unless the loaded balance already includes it.
-- KEYS: 1 acct  2 applied (zset token -> ms)
-- ARGV: 1 pg_version (account version of the commit)  2 delta_micro  3 token (unique per change)
--       4 retention_ms
-- Returns: 1 applied, 0 already included, -1 not loaded (load first, then apply again)
local acct = redis.call('HMGET', KEYS[1], 'balance', 'pgv')
if not acct[1] then return -1 end
if tonumber(acct[2]) >= tonumber(ARGV[1]) then return 0 end
if redis.call('ZSCORE', KEYS[2], ARGV[3]) then return 0 end
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000
redis.call('HINCRBY', KEYS[1], 'balance', tonumber(ARGV[2]))
redis.call('ZADD', KEYS[2], now_ms, ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now_ms - tonumber(ARGV[4]))
return 1
