-- Publish one room message (one round trip per message).
-- KEYS: state hash, stream, channel[, idempotency key][, archive stream]. ARGV: head,
-- tail, origin node, prio, recoverable ("1"/"0"), maxlen, history ttl ms, epoch
-- candidate, state ttl ms, sharded ("1"/"0"), deadline (Redis time in ms, or ""),
-- idempotency ttl ms, floor (the highest seq the caller knows taken in a room whose
-- messages are stored: a room whose state was lost (expired, FLUSHALL) numbers on after
-- it, never reusing a stored seq)[, archive maxlen, route[, cid]].
-- Returns {seq, epoch}; publishes ``node|prio|seq|epoch|frame``. With the idempotency
-- key: when it exists (the same key within its ttl) nothing is published and the first
-- publish's {seq, epoch, 1} is returned; otherwise it is set to "seq epoch".
-- Past the deadline (the publishing node stopped waiting and acked "degraded": Redis was
-- stopped or slow) nothing happens and {-1, ""} is returned.
-- Archive log: with ARGV[14] (the log's approximate MAXLEN) the LAST key is an archive
-- stream; a recoverable message is appended to it as {f = frame, r = route (ARGV[15])
-- [, c = cid (ARGV[16])]} in the same step that numbers and publishes it, so a message is
-- either published and logged or neither. A duplicate (idempotency key hit) and a
-- message past its deadline are not logged. gateway.broker.redis.archive writes the log
-- to the store.
local nkeys = #KEYS
local alog = nil
if ARGV[14] and ARGV[14] ~= '' then
  alog = KEYS[nkeys]
  nkeys = nkeys - 1
end
local ikey = nil
if nkeys >= 4 then ikey = KEYS[4] end
if ARGV[11] ~= '' then
  local t = redis.call('TIME')
  if tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) > tonumber(ARGV[11]) then
    return {-1, ''}
  end
end
if ikey then
  local prev = redis.call('GET', ikey)
  if prev then
    local s, e = string.match(prev, '^(%d+) (.*)$')
    if s then return {tonumber(s), e, 1} end
  end
end
local seq = 0
local epoch
if ARGV[5] == '1' then
  seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
  local floor = tonumber(ARGV[13]) or 0
  local lost = seq <= floor
  if lost then
    -- behind a seq already taken: the room's state was lost (expired, FLUSHALL)
    seq = floor + 1
    redis.call('HSET', KEYS[1], 'seq', seq)
  end
  epoch = redis.call('HGET', KEYS[1], 'epoch')
  if seq == 1 or lost or not epoch then
    -- the room is new or its state was lost: history is gone, start a new epoch
    epoch = ARGV[8]
    redis.call('HSET', KEYS[1], 'epoch', epoch)
    redis.call('DEL', KEYS[2])
  end
  redis.call('PEXPIRE', KEYS[1], ARGV[9])
else
  epoch = redis.call('HGET', KEYS[1], 'epoch') or ''
end
local frame = ARGV[1] .. seq .. ',"epoch":"' .. epoch .. '"' .. ARGV[2]
if seq > 0 then
  local id = seq .. '-0'
  local ok = redis.pcall('XADD', KEYS[2], 'MAXLEN', ARGV[6], id, 'f', frame)
  if type(ok) == 'table' and ok.err then
    redis.call('DEL', KEYS[2])
    redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[6], id, 'f', frame)
  end
  redis.call('PEXPIRE', KEYS[2], ARGV[7])
  if alog then
    if ARGV[16] then
      redis.call('XADD', alog, 'MAXLEN', '~', ARGV[14], '*', 'f', frame, 'r', ARGV[15], 'c', ARGV[16])
    else
      redis.call('XADD', alog, 'MAXLEN', '~', ARGV[14], '*', 'f', frame, 'r', ARGV[15])
    end
  end
end
local msg = ARGV[3] .. '|' .. ARGV[4] .. '|' .. seq .. '|' .. epoch .. '|' .. frame
if ARGV[10] == '1' then
  redis.call('SPUBLISH', KEYS[3], msg)
else
  redis.call('PUBLISH', KEYS[3], msg)
end
if ikey then
  redis.call('SET', ikey, seq .. ' ' .. epoch, 'PX', ARGV[12])
end
return {seq, epoch}
