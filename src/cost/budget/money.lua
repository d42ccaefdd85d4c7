-- Shared by the budget scripts: exact pico-dollar amounts. Lua numbers are doubles, exact
-- only below 2^53 (about $9,007), so amounts travel and are stored as decimal strings and
-- are computed on here as little-endian limbs of 7 decimal digits.
local LIMB, WIDTH = 10000000, 7

-- An amount from a decimal string (anything else, a missing field included, is zero).
local function big(s)
  local t = {}
  if type(s) ~= 'string' or not string.match(s, '^%d+$') then return t end
  local i = #s
  while i >= 1 do
    local j = math.max(1, i - WIDTH + 1)
    t[#t + 1] = tonumber(string.sub(s, j, i))
    i = j - 1
  end
  while #t > 0 and t[#t] == 0 do t[#t] = nil end
  return t
end

local function big_str(a)
  if #a == 0 then return '0' end
  local parts = {string.format('%d', a[#a])}
  for i = #a - 1, 1, -1 do parts[#parts + 1] = string.format('%07d', a[i]) end
  return table.concat(parts)
end

-- -1, 0 or 1 as a <, =, > b.
local function big_cmp(a, b)
  if #a ~= #b then return #a < #b and -1 or 1 end
  for i = #a, 1, -1 do
    if a[i] ~= b[i] then return a[i] < b[i] and -1 or 1 end
  end
  return 0
end

local function big_add(a, b)
  local t, carry = {}, 0
  for i = 1, math.max(#a, #b) do
    local v = (a[i] or 0) + (b[i] or 0) + carry
    if v >= LIMB then t[i], carry = v - LIMB, 1 else t[i], carry = v, 0 end
  end
  if carry > 0 then t[#t + 1] = carry end
  return t
end

-- a - b, or zero when b > a.
local function big_sub(a, b)
  if big_cmp(a, b) <= 0 then return {} end
  local t, borrow = {}, 0
  for i = 1, #a do
    local v = a[i] - (b[i] or 0) - borrow
    if v < 0 then t[i], borrow = v + LIMB, 1 else t[i], borrow = v, 0 end
  end
  while #t > 0 and t[#t] == 0 do t[#t] = nil end
  return t
end

-- a * m for a small integer m (at most 65535, so every product stays exact).
local function big_mul(a, m)
  local t, carry = {}, 0
  for i = 1, #a do
    local v = a[i] * m + carry
    carry = math.floor(v / LIMB)
    t[i] = v - carry * LIMB
  end
  while carry > 0 do
    local c = math.floor(carry / LIMB)
    t[#t + 1] = carry - c * LIMB
    carry = c
  end
  while #t > 0 and t[#t] == 0 do t[#t] = nil end
  return t
end
