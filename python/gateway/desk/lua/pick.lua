-- Assign the oldest queued session of a department to an agent, atomically.
-- KEYS[1]: <p>owner.  ARGV: prefix, department, strategy, sticky ("1"/"0"), now (ms).
-- Returns {session, agent} or false (empty queue, manual, or nobody online with room).
local p, dept, strategy, sticky, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
if strategy == 'manual' then return false end
local q = p .. 'q:' .. dept
local s = nil
while true do
  local head = redis.call('ZRANGE', q, 0, 0)
  if #head == 0 then return false end
  s = head[1]
  -- A session that already has an owner (queued again by a rebuild that raced an
  -- assignment) is no longer waiting: drop it from the queue.
  if redis.call('HEXISTS', KEYS[1], s) == 0 then break end
  redis.call('ZREM', q, s)
  redis.call('HDEL', p .. 'sticky', s)
end
local function room_left(u)
  local a = redis.call('HMGET', p .. 'a:' .. u, 'status', 'cap', 'load')
  if a[1] ~= 'online' then return nil end
  local cap, load = tonumber(a[2]) or 0, tonumber(a[3]) or 0
  if load >= cap then return nil end
  return load
end
local chosen = nil
if sticky == '1' then
  local st = redis.call('HGET', p .. 'sticky', s)
  if st and room_left(st) then chosen = st end
end
if not chosen then
  local members = redis.call('SMEMBERS', p .. 'd:' .. dept)
  table.sort(members)
  if strategy == 'round_robin' then
    local last = redis.call('GET', p .. 'rr:' .. dept) or ''
    local first = nil
    for _, u in ipairs(members) do
      if room_left(u) then
        if not first then first = u end
        if not chosen and u > last then chosen = u end
      end
    end
    if not chosen then chosen = first end
  else
    local bl, bt = nil, nil
    for _, u in ipairs(members) do
      local l = room_left(u)
      if l then
        local t = tonumber(redis.call('HGET', p .. 'a:' .. u, 'last') or '0') or 0
        if not chosen or l < bl or (l == bl and t < bt) then chosen, bl, bt = u, l, t end
      end
    end
  end
end
if not chosen then return false end
redis.call('ZREM', q, s)
redis.call('HDEL', p .. 'sticky', s)
redis.call('HSET', KEYS[1], s, chosen)
redis.call('HINCRBY', p .. 'a:' .. chosen, 'load', 1)
redis.call('HSET', p .. 'a:' .. chosen, 'last', now)
redis.call('SADD', p .. 'mine:' .. chosen, s)
if strategy == 'round_robin' then redis.call('SET', p .. 'rr:' .. dept, chosen) end
return {s, chosen}
