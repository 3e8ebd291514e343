-- An agent gone since `at` is taken offline, once: only if their gone mark is still `at`
-- (nobody came back, no other node took it) and no node reports a live connection.
-- KEYS[1]: <p>owner.  ARGV: prefix, user, at, now (ms). Returns 1 (taken offline) or 0.
local p, u, at, now = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local ak = p .. 'a:' .. u
if redis.call('HGET', ak, 'gone') ~= at then return 0 end
local on = redis.call('HGETALL', p .. 'on:' .. u)
for i = 2, #on, 2 do
  if (tonumber(on[i]) or 0) > now then return 0 end
end
redis.call('HDEL', ak, 'gone')
redis.call('HSET', ak, 'status', 'offline')
return 1
