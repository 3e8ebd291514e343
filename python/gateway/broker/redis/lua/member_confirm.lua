-- Hook debounce: after the grace period. KEYS: counts, marker. ARGV: token, gone
-- instances... 1 = the leave is real (nobody came back). (sum_live.lua is prepended.)
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[2])
if live_total(2) > 0 then return 0 end
return 1
