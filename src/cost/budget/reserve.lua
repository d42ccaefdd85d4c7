-- A reservation: the amount on every account of the call's keys, or on none.
-- Arguments (after the mode): amount, then per key: limit, kind, window_ms, ttl_ms.
-- Answers {0} when granted, else {1, index (0-based), spent, retry_after_ms or -1}.
local function reserve(ko, n, base)
  local amount = big(ARGV[base + 1])
  for i = 1, n do
    local key = KEYS[ko + i]
    local b = base + 2 + (i - 1) * 4
    local limit, kind, window_ms = big(ARGV[b]), ARGV[b + 1], tonumber(ARGV[b + 2])
    local spent, slots, slot_ms = roll(key, kind, window_ms, now_ms)
    -- rolling may have created the account: it expires even when the reservation is refused
    redis.call('PEXPIRE', key, ARGV[b + 3])
    local reserved = big(redis.call('HGET', key, 'r'))
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
    local reserved = big(redis.call('HGET', key, 'r'))
    redis.call('HSET', key, 'r', big_str(big_add(reserved, amount)))
  end
  return {0}
end
