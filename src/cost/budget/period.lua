-- Shared by the budget scripts: the account's period on Redis's clock.
-- kind: 'd' (UTC day), 'm' (UTC month), 'r' (rolling, window_ms, 60 slots).
local function month_of(days)
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400 + (m <= 2 and 1 or 0)
  local ny, nm = y, m + 1
  if nm == 13 then ny = y + 1; nm = 1 end
  local yy = nm <= 2 and ny - 1 or ny
  local era2 = math.floor(yy / 400)
  local yoe2 = yy - era2 * 400
  local mp2 = nm > 2 and nm - 3 or nm + 9
  local doe2 = yoe2 * 365 + math.floor(yoe2 / 4) - math.floor(yoe2 / 100) + math.floor((153 * mp2 + 2) / 5)
  return y * 12 + m - 1, era2 * 146097 + doe2 - 719468
end

-- The period's id and when the next one starts (ms); rolling: nil.
local function period(kind, now_ms)
  local days = math.floor(now_ms / 86400000)
  if kind == 'd' then return days, (days + 1) * 86400000 end
  if kind == 'm' then
    local id, next_days = month_of(days)
    return id, next_days * 86400000
  end
  return nil, nil
end

-- Moves the account to the current period; returns its settled spend (an amount of
-- money.lua) and, for rolling windows, its live slots (oldest first: slot, amount).
local function roll(key, kind, window_ms, now_ms)
  if kind == 'r' then
    local slot_ms = math.max(1, math.floor(window_ms / 60))
    local cur = math.floor(now_ms / slot_ms)
    local flat = redis.call('HGETALL', key)
    local spent, slots = {}, {}
    for i = 1, #flat, 2 do
      local f = flat[i]
      if string.sub(f, 1, 1) == 'w' then
        local slot = tonumber(string.sub(f, 2))
        if slot + 60 <= cur then
          redis.call('HDEL', key, f)
        else
          local v = big(flat[i + 1])
          spent = big_add(spent, v)
          slots[#slots + 1] = {slot, v}
        end
      end
    end
    table.sort(slots, function(a, b) return a[1] < b[1] end)
    return spent, slots, slot_ms, cur
  end
  local id = period(kind, now_ms)
  if tonumber(redis.call('HGET', key, 'p')) ~= id then
    redis.call('HSET', key, 'p', id, 's', 0, 'f', 0)
  end
  return big(redis.call('HGET', key, 's')), nil, nil, nil
end

local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
