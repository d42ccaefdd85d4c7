-- Stores a batch of usage records: each new record goes to the capped stream and to its
-- daily aggregates; a record already seen (a retried batch) changes nothing.
--
-- KEYS[1]      the stream
-- per record:  its dedupe key, its day's subject set, then `n` aggregate hashes
-- ARGV[1..4]   stream max length, dedupe ttl (s), aggregate ttl (s), record count
-- per record:  id, json, subject-set member, n, model, then 12 counters
--              (requests, 6 token classes, cost's pico-dollars below one dollar,
--              unpriced, incomplete, errors, cost's whole dollars)
-- Counter 7 is carried into counter 11 whenever it reaches a dollar, so it stays below
-- two dollars and no 64-bit counter overflows on money.
-- Returns how many records were new.
local maxlen, seen_ttl, agg_ttl, count = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local k, a, fresh = 2, 5, 0
local dollar = 1000000000000
for _ = 1, count do
    local seen, subjects = KEYS[k], KEYS[k + 1]
    local id, json, member = ARGV[a], ARGV[a + 1], ARGV[a + 2]
    local n, model = tonumber(ARGV[a + 3]), ARGV[a + 4]
    local counters = a + 5
    k = k + 2
    a = a + 17
    if redis.call('SET', seen, '1', 'NX', 'EX', seen_ttl) then
        fresh = fresh + 1
        redis.call('XADD', KEYS[1], 'MAXLEN', '~', maxlen, '*', 'id', id, 'record', json)
        redis.call('SADD', subjects, member)
        redis.call('EXPIRE', subjects, agg_ttl)
        for j = 0, n - 1 do
            local h = KEYS[k + j]
            for c = 0, 11 do
                local v = ARGV[counters + c]
                if v ~= '0' then
                    local sum = redis.call('HINCRBY', h, c .. ':' .. model, v)
                    if c == 7 and sum >= dollar then
                        local carry = math.floor(sum / dollar)
                        redis.call('HINCRBY', h, '7:' .. model, -carry * dollar)
                        redis.call('HINCRBY', h, '11:' .. model, carry)
                    end
                end
            end
            redis.call('EXPIRE', h, agg_ttl)
        end
    end
    k = k + n
end
return fresh
