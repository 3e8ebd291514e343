-- Shared by the debounce scripts (prepended to member_*.lua, not a script of its own):
-- sum KEYS[1]'s per-instance counts, removing those of gone instances (ARGV from index
-- ``first`` on).
local function live_total(first)
  local gone = {}
  for i = first, #ARGV do gone[ARGV[i]] = true end
  local total = 0
  local all = redis.call('HGETALL', KEYS[1])
  for i = 1, #all, 2 do
    if gone[all[i]] then redis.call('HDEL', KEYS[1], all[i]) else total = total + tonumber(all[i + 1]) end
  end
  return total
end
