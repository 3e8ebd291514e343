-- send_user with an idempotency key (one round trip). KEYS: idempotency key, control
-- channel (the key's hash tag is the channel's name: one slot in Redis Cluster).
-- ARGV: message (``node|body``), key ttl ms, sharded ("1"/"0").
-- Returns 1 (published) or 0 (the key was used within its ttl: nothing published).
if not redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[2]) then return 0 end
if ARGV[3] == '1' then
  redis.call('SPUBLISH', KEYS[2], ARGV[1])
else
  redis.call('PUBLISH', KEYS[2], ARGV[1])
end
return 1
