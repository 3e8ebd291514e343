-- One agent takes one session: exactly one claim of a session wins.
-- KEYS[1]: <p>owner.  ARGV: prefix, session, agent, department ('' none), force ("1"/"0"), now.
-- Returns 'ok', 'mine' (already theirs), 'taken', 'offline' or 'full'.
local p, s, agent, dept, force, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local owner = redis.call('HGET', KEYS[1], s)
if owner then
  if owner == agent then return 'mine' end
  return 'taken'
end
local ak = p .. 'a:' .. agent
if force ~= '1' then
  local a = redis.call('HMGET', ak, 'status', 'cap', 'load')
  if a[1] ~= 'online' and a[1] ~= 'away' then return 'offline' end
  if (tonumber(a[3]) or 0) >= (tonumber(a[2]) or 0) then return 'full' end
end
if dept ~= '' then redis.call('ZREM', p .. 'q:' .. dept, s) end
redis.call('HDEL', p .. 'sticky', s)
redis.call('HSET', KEYS[1], s, agent)
redis.call('HINCRBY', ak, 'load', 1)
redis.call('HSET', ak, 'last', now)
redis.call('SADD', p .. 'mine:' .. agent, s)
return 'ok'
