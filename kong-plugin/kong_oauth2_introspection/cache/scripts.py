"""The Lua scripts the Redis store runs: each touches one key (or keys of one
hash slot), so it runs unchanged on a Redis Cluster, and reads time from Redis's
clock so every node agrees."""



# Take the lease, or say how long (ms) its holder may keep it. One key: runs
# unchanged on a Redis Cluster.
_LEASE_LUA = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return -1
end
return redis.call('PTTL', KEYS[1])
"""


# Redis's clock in ms: one clock for every node that writes or purges.
_NOW_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""


# An index is a sorted set of cache keys scored by when each entry expires: a
# write drops the members that have expired, and the set lives as long as its
# longest-lived member, so it holds what is live and no more. A set left by an
# older version (a plain set) is converted, keeping its expiry for each member.
_INDEX_LUA = _NOW_LUA + """
if redis.call('TYPE', KEYS[1]).ok == 'set' then
  local left = redis.call('PTTL', KEYS[1])
  local members = redis.call('SMEMBERS', KEYS[1])
  redis.call('DEL', KEYS[1])
  for _, m in ipairs(members) do
    redis.call('ZADD', KEYS[1], now + math.max(left, 1), m)
  end
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIRE', KEYS[1], math.max(1, tonumber(last[2]) - now))
return 1
"""


# The live members of an index, which is then deleted (a purge by claim).
_TAKE_INDEX_LUA = _NOW_LUA + """
local members
if redis.call('TYPE', KEYS[1]).ok == 'set' then
  members = redis.call('SMEMBERS', KEYS[1])
else
  members = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf')
end
redis.call('DEL', KEYS[1])
return members
"""


# Redis's clock, on the node holding the tombstones (one key: a Cluster too).
_TIME_LUA = _NOW_LUA + """
return now
"""


# Delete the lease only when it still holds our token: after it expired another
# caller may have taken it, and that one is not ours to delete. One key, so it
# runs unchanged on a Redis Cluster.
_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
