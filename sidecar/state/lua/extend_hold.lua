-- Push a live hold's deadline to now + ttl (Redis time), so the sweeper never voids a call that is
-- still running. Never shortens a deadline; a resolved or unknown hold is left alone.
-- KEYS: 1 holds  2 hold_dl
-- ARGV: 1 hold_id  2 ttl_ms
-- Returns: {1 extended, deadline_ms}  {2 already later, deadline_ms}  {0 not live}
local hold_id = ARGV[1]
if redis.call('HEXISTS', KEYS[1], hold_id) == 0 then return {0, 0} end
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local wanted = now_ms + tonumber(ARGV[2])
local current = tonumber(redis.call('ZSCORE', KEYS[2], hold_id) or '0')
if current >= wanted then return {2, current} end
redis.call('ZADD', KEYS[2], string.format('%d', wanted), hold_id)
return {1, wanted}
