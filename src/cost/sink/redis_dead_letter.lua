-- Sets a refused usage record aside in the capped dead-letter stream, once.
--
-- KEYS[1]  the dead-letter stream
-- KEYS[2]  the record's dead-letter marker (kept for the dedupe ttl)
-- ARGV     stream max length, dedupe ttl (s), record id, record json, error
-- Returns 1 when set aside now, 0 when it was set aside before.
if redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[2]) == false then
  return 0
end
local r = redis.pcall('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*',
  'id', ARGV[3], 'record', ARGV[4], 'error', ARGV[5])
if type(r) == 'table' and r.err then
  redis.call('DEL', KEYS[2])
  return redis.error_reply(r.err)
end
return 1
