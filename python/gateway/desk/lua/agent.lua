-- Set an agent's status, capacity and departments (empty string: keep).
-- KEYS[1]: <p>owner.  ARGV: prefix, user, status, capacity, departments (comma-joined,
-- or '-' to keep). Returns {status, capacity, load, departments, last, gone}.
local p, u, status, cap, depts = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local ak = p .. 'a:' .. u
redis.call('SADD', p .. 'agents', u)
if status ~= '' then redis.call('HSET', ak, 'status', status) end
if cap ~= '' then redis.call('HSET', ak, 'cap', cap) end
if redis.call('HEXISTS', ak, 'status') == 0 then redis.call('HSET', ak, 'status', 'offline') end
if redis.call('HEXISTS', ak, 'load') == 0 then redis.call('HSET', ak, 'load', 0) end
if depts ~= '-' then
  local old = redis.call('HGET', ak, 'depts') or ''
  for d in string.gmatch(old, '[^,]+') do redis.call('SREM', p .. 'd:' .. d, u) end
  for d in string.gmatch(depts, '[^,]+') do redis.call('SADD', p .. 'd:' .. d, u) end
  redis.call('HSET', ak, 'depts', depts)
end
return redis.call('HMGET', ak, 'status', 'cap', 'load', 'depts', 'last', 'gone')
