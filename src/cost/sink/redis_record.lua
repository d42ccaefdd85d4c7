-- Stores a batch of usage records: each new record goes to the capped stream and to its
-- daily aggregates; a record already seen (a retried batch) changes nothing.
--
-- KEYS[1]      the stream
-- KEYS[2]      the batch key: how many of the batch's records were new, over every call
--              with this batch id (a retry after a lost answer sends the same id)
-- per record:  its dedupe key, its day's subject set, then `n` aggregate hashes
-- ARGV[1..4]   stream max length, dedupe ttl (s), aggregate ttl (s), record count
-- per record:  id, json, subject-set member, n, model, then 12 counters
--              (requests, 6 token classes, cost's pico-dollars below one dollar,
--              unpriced, incomplete, errors, cost's whole dollars)
-- Counter 7 is carried into counter 11 whenever it reaches a dollar, so it stays below
-- two dollars and no 64-bit counter overflows on money.
--
-- A record is stored whole or not at all: it is marked seen only after all its writes
-- succeed, and when one fails (a key of another type, a counter that would overflow) the
-- writes it made are undone and the script stops. Records before it in the batch stay
-- stored (and count as seen).
-- Returns how many records were new to this batch id (in this call or an earlier one);
-- when a record failed, {that count for the records before it, its index in the batch
-- (from 0), the error}.
local maxlen, seen_ttl, agg_ttl, count = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local k, a, fresh = 3, 5, 0

-- Adds this call's new records to the batch's count; returns the count.
local function settle()
  local total = redis.call('INCRBY', KEYS[2], fresh)
  redis.call('EXPIRE', KEYS[2], seen_ttl)
  return total
end
local dollar = 1000000000000

-- The writes of the record being stored, undone in reverse order if a later one fails.
local undo = {}
local function write(...)
  local r = redis.pcall(...)
  if type(r) == 'table' and r.err then
    for i = #undo, 1, -1 do redis.pcall(unpack(undo[i])) end
    undo = {}
    return nil, r.err
  end
  return r
end

local function negate(v)
  if string.sub(v, 1, 1) == '-' then return string.sub(v, 2) end
  return '-' .. v
end

for i = 1, count do
  local seen, subjects = KEYS[k], KEYS[k + 1]
  local id, json, member = ARGV[a], ARGV[a + 1], ARGV[a + 2]
  local n, model = tonumber(ARGV[a + 3]), ARGV[a + 4]
  local counters = a + 5
  k = k + 2
  a = a + 17
  if redis.call('EXISTS', seen) == 0 then
    undo = {}
    local failed
    local entry, err = write('XADD', KEYS[1], 'MAXLEN', '~', maxlen, '*', 'id', id, 'record', json)
    if entry then
      undo[#undo + 1] = {'XDEL', KEYS[1], entry}
      local added
      added, err = write('SADD', subjects, member)
      if added == 1 then undo[#undo + 1] = {'SREM', subjects, member} end
      failed = not added
    else
      failed = true
    end
    for j = 0, n - 1 do
      if failed then break end
      local h = KEYS[k + j]
      for c = 0, 11 do
        local v = ARGV[counters + c]
        if v ~= '0' then
          local field = c .. ':' .. model
          local sum
          sum, err = write('HINCRBY', h, field, v)
          if not sum then failed = true; break end
          undo[#undo + 1] = {'HINCRBY', h, field, negate(v)}
          if c == 7 and sum >= dollar then
            local carry = math.floor(sum / dollar)
            local down = string.format('%d', -carry * dollar)
            local ok
            ok, err = write('HINCRBY', h, '11:' .. model, carry)
            if not ok then failed = true; break end
            undo[#undo + 1] = {'HINCRBY', h, '11:' .. model, -carry}
            ok, err = write('HINCRBY', h, '7:' .. model, down)
            if not ok then failed = true; break end
            undo[#undo + 1] = {'HINCRBY', h, '7:' .. model, negate(down)}
          end
        end
      end
    end
    if failed then
      return {settle(), i - 1, tostring(err)}
    end
    -- expiries only lengthen a key's life: nothing to undo
    redis.call('EXPIRE', subjects, agg_ttl)
    for j = 0, n - 1 do redis.call('EXPIRE', KEYS[k + j], agg_ttl) end
    redis.call('SET', seen, '1', 'EX', seen_ttl)
    fresh = fresh + 1
  end
  k = k + n
end
return settle()
