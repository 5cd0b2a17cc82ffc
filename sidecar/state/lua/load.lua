-- Load a workspace's balance from Postgres into Redis. `pgv` is the Postgres account version the
-- balance was read at. A load starts a new record of applied changes: only changes committed after
-- `pgv` can be applied from now on.
--
-- Two modes:
-- * first load (ARGV[5] = ''): only when Redis has no balance; the first loader wins, later ones
--   change nothing.
-- * reload (ARGV[5] = the load id found): Redis kept a balance it cannot be trusted with (it
--   restarted from an older snapshot, or a replica was promoted: its run_id changed). Replaced only
--   if that load is still the live one, so concurrent reloaders replace it once.
-- Either way `held` is rebuilt from the live holds themselves: holds can outlive an evicted or
-- restored account, and a hold whose call Postgres already recorded (ARGV[6..]) is dropped as resolved.
--
-- A dropped hold also gives back its key's concurrency slot, and its idempotency record (if still
-- pending under that hold) is marked done without a body: the call was recorded, so a retry must not
-- run (and be billed) again; it gets 409 "already completed" instead of "in progress" for a day.
--
-- KEYS: 1 acct  2 applied (set of tokens)  3 holds  4 hold_dl  5 hold_meta  6 settled
--       7 hold_key  8 live_keys  9 hold_idem  10 kbudget  11 hold_kb
--       12.. the idempotency record of each ARGV[12..] hold
--       (a placeholder key of the workspace where it has none)
-- ARGV: 1 balance_micro  2 pgv  3 gen (a fresh random token: identifies this load)  4 redis run_id
--       5 the load id being replaced ('' = first load)  6 fee waiver used (at pgv)
--       7..11 the wallet settings (see wallet.lua): wv, mode, climit, exp, wtotal
--       12.. hold ids already recorded in Postgres
-- Returns: 1 loaded, 0 nothing changed (already loaded, or reloaded by someone else)
local current = redis.call('HGET', KEYS[1], 'gen')
if ARGV[5] == '' then
  if redis.call('HEXISTS', KEYS[1], 'balance') == 1 then return 0 end
elseif current ~= ARGV[5] then
  return 0
end

local FIRST_HOLD = 12
if #ARGV >= FIRST_HOLD then
  local t = redis.call('TIME')
  local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  for i = FIRST_HOLD, #ARGV do
    local hold_id = ARGV[i]
    if redis.call('HDEL', KEYS[3], hold_id) == 1 then
      redis.call('ZREM', KEYS[4], hold_id)
      redis.call('HDEL', KEYS[5], hold_id)
      redis.call('ZADD', KEYS[6], string.format('%d', now_ms), hold_id)  -- a late settle or retry finds it resolved
      local owner = redis.call('HGET', KEYS[7], hold_id)
      if owner then
        if redis.call('HINCRBY', KEYS[8], owner, -1) <= 0 then redis.call('HDEL', KEYS[8], owner) end
        redis.call('HDEL', KEYS[7], hold_id)
        -- Its key budget hold too; what it spent is in the ledger, which a budget rebuild reads.
        local kb_held = redis.call('HGET', KEYS[11], hold_id)
        if kb_held then
          if redis.call('HINCRBY', KEYS[10], owner .. ':h', string.format('%d', -tonumber(kb_held))) < 0 then
            redis.call('HSET', KEYS[10], owner .. ':h', 0)
          end
          redis.call('HDEL', KEYS[11], hold_id)
        end
      end
      redis.call('HDEL', KEYS[9], hold_id)
      local record = KEYS[12 + i - FIRST_HOLD]
      if redis.call('HGET', record, 'hold') == hold_id and redis.call('HGET', record, 'state') ~= 'done' then
        redis.call('HSET', record, 'state', 'done', 'status', 0, 'ctype', '', 'body', '')
      end
    end
  end
end

local held = 0
local amounts = redis.call('HVALS', KEYS[3])
for _, amount in ipairs(amounts) do held = held + tonumber(amount) end

redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[1], 'balance', ARGV[1], 'held', string.format('%d', held), 'pgv', ARGV[2],
  'gen', ARGV[3], 'run', ARGV[4], 'waived', ARGV[6])
-- The wallet settings, unless a newer version was set meanwhile (wallet.lua never runs on an unloaded
-- account, but a reload keeps what a later setting wrote).
if tonumber(redis.call('HGET', KEYS[1], 'wv') or '-1') < tonumber(ARGV[7]) then
  redis.call('HSET', KEYS[1], 'wv', ARGV[7], 'mode', ARGV[8], 'climit', ARGV[9], 'exp', ARGV[10], 'wtotal', ARGV[11])
end
return 1
