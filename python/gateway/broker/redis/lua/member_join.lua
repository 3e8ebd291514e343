-- Hook debounce: a connection joined. KEYS: counts, marker. ARGV: instance, safety ttl
-- ms, gone instances... 1 = a real join, 0 = already present or a reconnect within the
-- grace period. (sum_live.lua is prepended.)
redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
if live_total(3) == 1 then
  if redis.call('DEL', KEYS[2]) == 1 then return 0 end
  return 1
end
return 0
