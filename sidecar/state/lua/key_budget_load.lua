-- Rebuild one key's budget record (spent and held in the current period) when Redis has none: first
-- use of the budget, Redis restarted empty, or the period kind changed. Postgres is the record.
--
-- The caller holds the workspace's account row locked (no ledger rows commit meanwhile), sums the
-- key's usage rows of the period in Postgres, adds the stream entries it read that Postgres does not
-- have, and passes the last entry id it read: the entries settled after that are counted here, so
-- none is missed or counted twice. `held` is rebuilt from the live holds of the key.
--
-- KEYS: 1 kbudget  2 hold_kb  3 hold_key  4 stream
-- ARGV: 1 key_id  2 period kind  3 period id  4 spent known to the caller  5 the last stream entry id
--       it counted ('' = none)  6 the period's start (ms)
-- Returns: 1 loaded, 0 already loaded for this period kind
local k = ARGV[1]
local current = redis.call('HMGET', KEYS[1], k .. ':p', k .. ':t')
if current[1] and current[2] == ARGV[2] then return 0 end
local spent = tonumber(ARGV[4])
local since = tonumber(ARGV[6])
local start = '-'
if ARGV[5] ~= '' then start = '(' .. ARGV[5] end
for _, entry in ipairs(redis.call('XRANGE', KEYS[4], start, '+')) do
  local fields = {}
  for i = 1, #entry[2], 2 do fields[entry[2][i]] = entry[2][i + 1] end
  if (fields['kind'] or 'usage') == 'usage' and tonumber(fields['at'] or '0') >= since then
    local ok, event = pcall(cjson.decode, fields['e'] or '')
    if ok and type(event) == 'table' and event['key_id'] == k then
      spent = spent - tonumber(fields['impact'] or '0')
    end
  end
end
local held = 0
for _, hold_id in ipairs(redis.call('HKEYS', KEYS[2])) do
  if redis.call('HGET', KEYS[3], hold_id) == k then held = held + tonumber(redis.call('HGET', KEYS[2], hold_id)) end
end
redis.call('HSET', KEYS[1], k .. ':p', ARGV[3], k .. ':t', ARGV[2], k .. ':s', string.format('%d', spent),
  k .. ':h', string.format('%d', held))
return 1
