-- Set a workspace's wallet settings in its loaded account, unless a newer version is there already.
-- Postgres (table wallets) is the record; its `version` orders the writers, so a setting and a load
-- racing each other leave the newest. Read by admit.lua (mode, climit, exp) and settle.lua (wtotal).
-- KEYS: 1 acct
-- ARGV: 1 version  2 mode ('prepaid' | 'postpaid')  3 climit (micro, >= 0)  4 exp (ms, '' = none)
--       5 wtotal (the fee waiver, micro)
-- Returns: 1 set, 0 a newer (or the same) version is there, -1 not loaded (the next load reads Postgres)
if redis.call('HEXISTS', KEYS[1], 'balance') == 0 then return -1 end
if tonumber(redis.call('HGET', KEYS[1], 'wv') or '-1') >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'wv', ARGV[1], 'mode', ARGV[2], 'climit', ARGV[3], 'exp', ARGV[4], 'wtotal', ARGV[5])
return 1
