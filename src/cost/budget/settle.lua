-- A settlement: takes the reservation off its hold, if the hold still lives, and adds the
-- actual cost to the spend of every account of the call's keys.
-- Arguments (after the mode): reservation, actual, the hold's until_ms (as the
-- reservation answered it; "-" for one made before holds expired: its amount is in 'r'),
-- then per key: limit, kind, window_ms, ttl_ms, thresholds ("500,800,1000", or "-").
-- Answers the crossings, flat: index (0-based), permille, spent, ...
local function settle(ko, n, base)
  local release, actual = big(ARGV[base + 1]), big(ARGV[base + 2])
  local until_ms = tonumber(ARGV[base + 3])
  local hold = until_ms == nil and 'r' or 'h' .. ARGV[base + 3]
  local crossings = {}
  -- every account is read before any is written: one that cannot be (not a hash) fails
  -- the call with nothing changed
  for i = 1, n do redis.call('HGET', KEYS[ko + i], 'r') end
  for i = 1, n do
    local key = KEYS[ko + i]
    local b = base + 4 + (i - 1) * 5
    local limit, kind, window_ms = big(ARGV[b]), ARGV[b + 1], tonumber(ARGV[b + 2])
    -- an expired hold is gone already: nothing to release
    if until_ms == nil or until_ms > now_ms then
      -- (a hold emptied stays, at 0, until it expires: one field per span at most)
      local left = big_sub(big(redis.call('HGET', key, hold)), release)
      redis.call('HSET', key, hold, big_str(left))
    end
    local _, _, slot_ms, cur = roll(key, kind, window_ms, now_ms)
    local field = kind == 'r' and 'w' .. cur or 's'
    local before = big(redis.call('HGET', key, field))
    redis.call('HSET', key, field, big_str(big_add(before, actual)))
    expire(key, ARGV[b + 3])
    local spent = roll(key, kind, window_ms, now_ms)
    local fired = tonumber(redis.call('HGET', key, 'f')) or 0
    local bit_i = 0
    for permille in string.gmatch(ARGV[b + 4], '%d+') do
      local mask = 2 ^ bit_i
      local is_set = math.floor(fired / mask) % 2 == 1
      local reached = big_cmp(big_mul(spent, 1000), big_mul(limit, tonumber(permille))) >= 0
      if reached and not is_set then
        fired = fired + mask
        crossings[#crossings + 1] = i - 1
        crossings[#crossings + 1] = tonumber(permille)
        crossings[#crossings + 1] = big_str(spent)
      elseif not reached and is_set and kind == 'r' then
        fired = fired - mask
      end
      bit_i = bit_i + 1
    end
    redis.call('HSET', key, 'f', fired)
  end
  return crossings
end
