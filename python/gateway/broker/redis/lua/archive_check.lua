-- Upkeep of one archive-log stream (gateway.broker.redis.archive), in one atomic step:
-- 1. Entries trimmed (the log's MAXLEN) before the consumer group read them are lost.
--    Redis 7.0 keeps counting them in the group's lag forever; count them here once and
--    move the group's read counter past them, so that its lag is again the number of
--    entries still to read. Two cases are exact: the group is behind the first entry
--    still in the stream (or the stream is empty), and the group has read everything
--    (last-delivered-id is the last one added). A group that read past a gap and still
--    has a backlog is counted later, once it catches up.
-- 2. Trim what the group has acknowledged (entries older than the oldest pending one, or
--    than the last delivered one when none is pending): the stream then holds only the
--    backlog, whole blocks at a time ("~").
-- 3. With ARGV[3] > 0: remove consumers other than ARGV[2] (the caller) that hold nothing
--    and were not seen for ARGV[3] ms (old ids of restarted nodes). A consumer with
--    pending entries is never removed: its entries would leave the group with it.
-- KEYS[1]: the stream. ARGV[1]: the group. Returns {lag, pending, lost}: lag -1 when
-- Redis cannot tell it; {-2, 0, 0} when the stream or the group does not exist.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {-2, 0, 0}
end
local function map(flat)
  local m = {}
  for i = 1, #flat, 2 do
    m[flat[i]] = flat[i + 1]
  end
  return m
end
local function numcmp(a, b)  -- decimal strings of any length
  if #a ~= #b then
    return #a < #b and -1 or 1
  end
  if a == b then
    return 0
  end
  return a < b and -1 or 1
end
local function idcmp(a, b)
  local ams, aseq = string.match(a, '^(%d+)-(%d+)$')
  local bms, bseq = string.match(b, '^(%d+)-(%d+)$')
  local c = numcmp(ams, bms)
  if c ~= 0 then
    return c
  end
  return numcmp(aseq, bseq)
end
local info = map(redis.call('XINFO', 'STREAM', KEYS[1]))
local g = nil
for _, flat in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local x = map(flat)
  if x['name'] == ARGV[1] then
    g = x
  end
end
if not g then
  return {-2, 0, 0}
end
local added = tonumber(info['entries-added'])
local length = tonumber(info['length'])
local delivered = g['last-delivered-id']
local read = g['entries-read']
local lag = g['lag']
local lost = 0
if read then
  read = tonumber(read)
  local removed = added - length
  local behind = length == 0 or idcmp(delivered, info['recorded-first-entry-id']) < 0
  local upto = nil
  if behind and removed > read then
    upto = removed  -- every entry before the first one left was read or lost
  elseif delivered == info['last-generated-id'] and added > read then
    upto = added  -- everything left was read: the rest was lost
  end
  if upto then
    lost = upto - read
    redis.call('XGROUP', 'SETID', KEYS[1], ARGV[1], delivered, 'ENTRIESREAD', upto)
    read = upto
  end
  lag = added - read
end
local pend = redis.call('XPENDING', KEYS[1], ARGV[1])
local pending = tonumber(pend[1])
local minid = delivered
if pending > 0 then
  minid = pend[2]
end
if minid ~= '0-0' then
  redis.call('XTRIM', KEYS[1], 'MINID', '~', minid)
end
local forget = tonumber(ARGV[3])
if forget and forget > 0 then
  for _, flat in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
    local c = map(flat)
    if c['name'] ~= ARGV[2] and c['pending'] == 0 and c['idle'] > forget then
      redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], c['name'])
    end
  end
end
return {lag or -1, pending, lost}
