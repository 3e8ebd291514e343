-- Write this node's counts of a room and read the sum over live nodes.
-- KEYS: presence hash. ARGV: node ("" = read only), conns, users, ttl ms.
-- Returns {conns, users} summed over live nodes (deadline judged by Redis' clock).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[1] ~= '' then
  if tonumber(ARGV[2]) > 0 then
    redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ' ' .. ARGV[3] .. ' ' .. (now + tonumber(ARGV[4])))
    redis.call('PEXPIRE', KEYS[1], ARGV[4])
  else
    redis.call('HDEL', KEYS[1], ARGV[1])
  end
end
local all = redis.call('HGETALL', KEYS[1])
local c, u = 0, 0
for i = 1, #all, 2 do
  local a, b, d = string.match(all[i + 1], '^(%d+) (%d+) (%d+)$')
  if d and tonumber(d) >= now then
    c = c + tonumber(a)
    u = u + tonumber(b)
  else
    redis.call('HDEL', KEYS[1], all[i])
  end
end
return {c, u}
