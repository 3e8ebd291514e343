-- Hook debounce: a connection left. KEYS: counts, marker. ARGV: instance, marker ttl ms,
-- token, gone instances... 1 = the last connection left: the caller owns the pending
-- leave (confirm after the grace period). (sum_live.lua is prepended.)
if redis.call('HINCRBY', KEYS[1], ARGV[1], -1) <= 0 then redis.call('HDEL', KEYS[1], ARGV[1]) end
if live_total(4) > 0 then return 0 end
redis.call('DEL', KEYS[1])
redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[2])
return 1
