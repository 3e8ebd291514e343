-- A session leaves its agent (closed, transferred, requeued).
-- KEYS[1]: <p>owner.  ARGV: prefix, session, agent ('' = whoever has it).
-- Returns the agent it left, or false (nobody had it, or another agent does).
local p, s, agent = ARGV[1], ARGV[2], ARGV[3]
local owner = redis.call('HGET', KEYS[1], s)
if not owner or (agent ~= '' and owner ~= agent) then return false end
redis.call('HDEL', KEYS[1], s)
redis.call('SREM', p .. 'mine:' .. owner, s)
local load = redis.call('HINCRBY', p .. 'a:' .. owner, 'load', -1)
if load < 0 then redis.call('HSET', p .. 'a:' .. owner, 'load', 0) end
return owner
