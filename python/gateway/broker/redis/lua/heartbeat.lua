-- Node heartbeat of the hook debounce. KEYS: heartbeat hash. ARGV: instance, timeout ms,
-- forget ms. Renews this instance's deadline (Redis' clock) and returns the instances
-- past theirs; entries gone for longer than ``forget`` are dropped (debounce counts
-- expire before that).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], ARGV[1], now + tonumber(ARGV[2]))
local gone = {}
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local d = tonumber(all[i + 1])
  if d < now - tonumber(ARGV[3]) then
    redis.call('HDEL', KEYS[1], all[i])
  elseif d < now and all[i] ~= ARGV[1] then
    gone[#gone + 1] = all[i]
  end
end
return gone
