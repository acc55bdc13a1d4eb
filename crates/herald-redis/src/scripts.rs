//! Lua scripts: each runs atomically in Redis, so offsets, history and live order agree on
//! every node.

/// Publish with history. KEYS: stream, meta, idempotency key (same slot; checked only when
/// ARGV[8] is "1"). ARGV: publication json, history size, history ttl ms, meta ttl ms,
/// new epoch, pub/sub channel, idempotency ttl ms, idempotency on.
/// Returns {offset, epoch, duplicate(0|1)}.
pub const PUBLISH: &str = r#"
if ARGV[8] == '1' then
  local prev = redis.call('get', KEYS[3])
  if prev then
    local sep = string.find(prev, ':', 1, true)
    return {tonumber(string.sub(prev, 1, sep - 1)), string.sub(prev, sep + 1), 1}
  end
end
local epoch = redis.call('hget', KEYS[2], 'e')
if not epoch then
  epoch = ARGV[5]
  redis.call('hset', KEYS[2], 'e', epoch)
end
local top = redis.call('hincrby', KEYS[2], 's', 1)
redis.call('xadd', KEYS[1], 'MAXLEN', ARGV[2], '0-' .. top, 'd', ARGV[1])
redis.call('pexpire', KEYS[1], ARGV[3])
redis.call('pexpire', KEYS[2], ARGV[4])
redis.call('publish', ARGV[6], 'p' .. top .. ':' .. epoch .. ':' .. ARGV[1])
if ARGV[8] == '1' then
  redis.call('set', KEYS[3], top .. ':' .. epoch, 'PX', ARGV[7])
end
return {top, epoch, 0}
"#;

/// Stream position and publications. KEYS: stream, meta.
/// ARGV: new epoch, meta ttl ms, start id ("-" or "(0-N"), count (-1 all, 0 none),
/// reverse ("1"/"0").
/// Returns {offset, epoch, entries}.
pub const HISTORY: &str = r#"
local epoch = redis.call('hget', KEYS[2], 'e')
if not epoch then
  epoch = ARGV[1]
  redis.call('hset', KEYS[2], 'e', epoch)
  redis.call('pexpire', KEYS[2], ARGV[2])
end
local top = tonumber(redis.call('hget', KEYS[2], 's') or '0')
local entries = {}
local count = tonumber(ARGV[4])
if count ~= 0 then
  if ARGV[5] == '1' then
    local stop = ARGV[3]
    if stop == '-' then stop = '-' end
    if count > 0 then
      entries = redis.call('xrevrange', KEYS[1], '+', stop, 'COUNT', count)
    else
      entries = redis.call('xrevrange', KEYS[1], '+', stop)
    end
  else
    if count > 0 then
      entries = redis.call('xrange', KEYS[1], ARGV[3], '+', 'COUNT', count)
    else
      entries = redis.call('xrange', KEYS[1], ARGV[3], '+')
    end
  end
end
return {top, epoch, entries}
"#;

/// Presence read with expiry. KEYS: hash, expiry zset. ARGV: now ms.
/// Returns HGETALL after dropping entries whose node stopped refreshing them.
pub const PRESENCE: &str = r#"
local expired = redis.call('zrangebyscore', KEYS[2], '-inf', ARGV[1])
if #expired > 0 then
  redis.call('hdel', KEYS[1], unpack(expired))
  redis.call('zremrangebyscore', KEYS[2], '-inf', ARGV[1])
end
return redis.call('hgetall', KEYS[1])
"#;

/// Presence entry. KEYS: hash, expiry zset. ARGV: client id, info json, expires at ms, ttl ms.
pub const PRESENCE_ADD: &str = r#"
redis.call('hset', KEYS[1], ARGV[1], ARGV[2])
redis.call('zadd', KEYS[2], ARGV[3], ARGV[1])
redis.call('pexpire', KEYS[1], ARGV[4])
redis.call('pexpire', KEYS[2], ARGV[4])
return 1
"#;
