-- Holds: what requests in flight reserve, kept in fields 'h<until_ms>', each the sum of
-- the reservations granted in one span of hold_ms and counted until until_ms
-- ((span + 2) * hold_ms): a hold lives between one and two spans, then frees itself,
-- whether or not its settlement ever comes. 'r' is the reserved amount of accounts
-- written before holds expired: counted, and drained by the settlements of those
-- reservations.

-- The account's live holds, 'r' included; deletes the expired ones.
local function held(key)
  local flat = redis.call('HGETALL', key)
  local sum = {}
  for i = 1, #flat, 2 do
    local f = flat[i]
    if f == 'r' then
      sum = big_add(sum, big(flat[i + 1]))
    elseif string.sub(f, 1, 1) == 'h' then
      local until_ms = tonumber(string.sub(f, 2))
      if until_ms == nil or until_ms <= now_ms then
        redis.call('HDEL', key, f)
      else
        sum = big_add(sum, big(flat[i + 1]))
      end
    end
  end
  return sum
end

-- Sets the account's expiry to ttl (ms, a decimal string), or longer while one of its
-- holds lives (until_ms, or one an earlier call kept it for): a hold may outlive the
-- account's own expiry (a hold_ttl past a day), and the key's expiry would free it early.
local function expire(key, ttl, until_ms)
  local left = redis.call('PTTL', key)
  if until_ms ~= nil then left = math.max(left, until_ms - now_ms) end
  if left > tonumber(ttl) then
    redis.call('PEXPIRE', key, string.format('%d', left))
  else
    redis.call('PEXPIRE', key, ttl)
  end
end

-- A reservation: the amount on every account of the call's keys, or on none.
-- Arguments (after the mode): amount, hold_ms, then per key: limit, kind, window_ms,
-- ttl_ms.
-- Answers {0, until_ms} when granted (the hold's field is 'h' .. until_ms), else
-- {1, index (0-based), spent, retry_after_ms or -1}.
local function reserve(ko, n, base)
  local amount = big(ARGV[base + 1])
  local hold_ms = math.max(1, tonumber(ARGV[base + 2]) or 1)
  local until_ms = (math.floor(now_ms / hold_ms) + 2) * hold_ms
  local field = 'h' .. string.format('%d', until_ms)
  for i = 1, n do
    local key = KEYS[ko + i]
    local b = base + 3 + (i - 1) * 4
    local limit, kind, window_ms = big(ARGV[b]), ARGV[b + 1], tonumber(ARGV[b + 2])
    local spent, slots, slot_ms = roll(key, kind, window_ms, now_ms)
    -- rolling may have created the account: it expires even when the reservation is refused
    expire(key, ARGV[b + 3])
    local reserved = held(key)
    local total = big_add(big_add(spent, reserved), amount)
    if big_cmp(total, limit) > 0 then
      local retry = -1
      if kind == 'r' then
        local need, freed = big_sub(total, limit), {}
        for _, s in ipairs(slots) do
          freed = big_add(freed, s[2])
          if big_cmp(freed, need) >= 0 then retry = (s[1] + 60) * slot_ms - now_ms; break end
        end
      else
        local _, next_ms = period(kind, now_ms)
        retry = next_ms - now_ms
      end
      return {1, i - 1, big_str(spent), retry}
    end
  end
  for i = 1, n do
    local key = KEYS[ko + i]
    local before = big(redis.call('HGET', key, field))
    redis.call('HSET', key, field, big_str(big_add(before, amount)))
    expire(key, ARGV[base + 3 + (i - 1) * 4 + 3], until_ms)
  end
  return {0, until_ms}
end
