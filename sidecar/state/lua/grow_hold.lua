-- Raise a call's hold to a new ceiling: a call that began on the customer's own key (BYOK, no
-- hold) and moves to the platform's key is billed as credits from then on, so it must hold first.
-- KEYS: 1 acct  2 holds
-- ARGV: 1 hold_id  2 new_amount_micro (an integer string, below the store's bound)
-- Returns: 1 raised (or already as high), -1 the hold is already resolved, -2 need load, -3 insufficient
local current = redis.call('HGET', KEYS[2], ARGV[1])
if not current then return -1 end
local delta = tonumber(ARGV[2]) - tonumber(current)
if delta <= 0 then return 1 end
local acct = redis.call('HMGET', KEYS[1], 'balance', 'held')
if not acct[1] then return -2 end
if delta > tonumber(acct[1]) - tonumber(acct[2]) then return -3 end
redis.call('HINCRBY', KEYS[1], 'held', string.format('%d', delta))
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return 1
