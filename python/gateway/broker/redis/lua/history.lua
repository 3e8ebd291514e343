-- Read a room's history: the last K messages, or those after a client's position.
-- KEYS: state hash, stream. ARGV: limit, since ("" = last K), client epoch.
-- Returns {seq, epoch, recovered (-1 none, 0, 1, -2 no state), frames...}.
local st = redis.call('HMGET', KEYS[1], 'seq', 'epoch')
local seq = tonumber(st[1])
local epoch = st[2]
if not seq or not epoch then
  return {0, '', -2}
end
local limit = tonumber(ARGV[1])
if ARGV[2] == '' then
  local out = {seq, epoch, -1}
  if limit > 0 then
    local items = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', limit)
    for i = #items, 1, -1 do out[#out + 1] = items[i][2][2] end
  end
  return out
end
local since = tonumber(ARGV[2])
if ARGV[3] ~= epoch or since > seq or since < 0 then
  return {seq, epoch, 0}
end
if since == seq then
  return {seq, epoch, 1}
end
local items = redis.call('XRANGE', KEYS[2], (since + 1) .. '-0', '+')
local n = #items
local complete = 0
if n > 0 and tonumber(string.match(items[1][1], '^(%d+)')) == since + 1 then
  complete = 1
end
local first = 1
if limit <= 0 then
  first = n + 1
elseif n > limit then
  first = n - limit + 1
end
if first > 1 then complete = 0 end
local out = {seq, epoch, complete}
for i = first, n do out[#out + 1] = items[i][2][2] end
return out
