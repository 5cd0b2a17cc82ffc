-- Apply a balance change that Postgres committed (a grant, or ledger events that were settled in a
-- Redis that has since restarted) unless the loaded balance already includes it.
-- The `applied` set is never trimmed by time (a grant replayed weeks later must still find its
-- token); it is reset by each load, which makes every older token irrelevant through `pgv`.
-- KEYS: 1 acct  2 applied (set of tokens)
-- ARGV: 1 pg_version (account version of the commit)  2 delta_micro  3 token (unique per change)
--       4 fee waiver used by the change (events settled under an older load; '' or 0: none)
-- Returns: 1 applied, 0 already included, -1 not loaded (load first, then apply again)
local acct = redis.call('HMGET', KEYS[1], 'balance', 'pgv')
if not acct[1] then return -1 end
if tonumber(acct[2]) >= tonumber(ARGV[1]) then return 0 end
if redis.call('SADD', KEYS[2], ARGV[3]) == 0 then return 0 end
redis.call('HINCRBY', KEYS[1], 'balance', ARGV[2])  -- the integer as sent: never through a Lua double
if ARGV[4] and ARGV[4] ~= '' and ARGV[4] ~= '0' then redis.call('HINCRBY', KEYS[1], 'waived', ARGV[4]) end
return 1
