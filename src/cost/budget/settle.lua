-- Adds ARGV[1] (the reservation, negated) to the reserved amount and ARGV[2] to the spend
-- of every account in KEYS.
-- ARGV[3..]: per key: limit, kind, window_ms, ttl_ms, thresholds ("500,800,1000").
-- Returns the crossings, flat: index (0-based), permille, spent, ...
local crossings = {}
for i = 1, #KEYS do
  local key = KEYS[i]
  local b = 3 + (i - 1) * 5
  local limit, kind, window_ms = tonumber(ARGV[b]), ARGV[b + 1], tonumber(ARGV[b + 2])
  if redis.call('HINCRBY', key, 'r', ARGV[1]) < 0 then redis.call('HSET', key, 'r', 0) end
  local _, _, slot_ms, cur = roll(key, kind, window_ms, now_ms)
  if kind == 'r' then
    redis.call('HINCRBY', key, 'w' .. cur, ARGV[2])
  else
    redis.call('HINCRBY', key, 's', ARGV[2])
  end
  redis.call('PEXPIRE', key, ARGV[b + 3])
  local spent = roll(key, kind, window_ms, now_ms)
  local fired = tonumber(redis.call('HGET', key, 'f')) or 0
  local bit_i = 0
  for permille in string.gmatch(ARGV[b + 4], '%d+') do
    local mask = 2 ^ bit_i
    local is_set = math.floor(fired / mask) % 2 == 1
    local reached = spent * 1000 >= limit * tonumber(permille)
    if reached and not is_set then
      fired = fired + mask
      crossings[#crossings + 1] = i - 1
      crossings[#crossings + 1] = tonumber(permille)
      crossings[#crossings + 1] = string.format('%.0f', spent)
    elseif not reached and is_set and kind == 'r' then
      fired = fired - mask
    end
    bit_i = bit_i + 1
  end
  redis.call('HSET', key, 'f', fired)
end
return crossings
