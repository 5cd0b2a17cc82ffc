-- Load a workspace's balance from Postgres into Redis, once: the first loader wins, later ones
-- change nothing. `pgv` is the Postgres account version the balance was read at. A load starts a
-- new record of applied changes: only changes committed after `pgv` can be applied from now on.
-- KEYS: 1 acct  2 applied (set of tokens)
-- ARGV: 1 balance_micro  2 pgv  3 gen (a fresh random token: identifies this load)
if redis.call('HEXISTS', KEYS[1], 'balance') == 1 then return 0 end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[1], 'balance', ARGV[1], 'held', 0, 'pgv', ARGV[2], 'gen', ARGV[3])
return 1
