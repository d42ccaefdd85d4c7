-- Takes ARGV[1] (the reservation) off the reserved amount and adds ARGV[2] to the spend
-- of every account in KEYS.
-- ARGV[3..]: per key: limit, kind, window_ms, ttl_ms, thresholds ("500,800,1000").
-- Returns the crossings, flat: index (0-based), permille, spent, ...
local release, actual = big(ARGV[1]), big(ARGV[2])
local crossings = {}
for i = 1, #KEYS do
  local key = KEYS[i]
  local b = 3 + (i - 1) * 5
  local limit, kind, window_ms = big(ARGV[b]), ARGV[b + 1], tonumber(ARGV[b + 2])
  local reserved = big(redis.call('HGET', key, 'r'))
  redis.call('HSET', key, 'r', big_str(big_sub(reserved, release)))
  local _, _, slot_ms, cur = roll(key, kind, window_ms, now_ms)
  local field = kind == 'r' and 'w' .. cur or 's'
  local before = big(redis.call('HGET', key, field))
  redis.call('HSET', key, field, big_str(big_add(before, actual)))
  redis.call('PEXPIRE', key, ARGV[b + 3])
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
