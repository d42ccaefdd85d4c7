-- The budget script's calls, after money.lua, period.lua, reserve.lua and settle.lua.
-- Alone: KEYS are the call's accounts, ARGV[1] its mode ('r' reserve, 's' settle), then
-- its arguments.
-- A batch (mode 'b'): ARGV[2] calls, each as mode, key count, then its arguments, its keys
-- following the previous call's in KEYS. They run one after another, each exactly as it
-- would alone (one TIME serves the batch), and each answer follows its length (-1 for a
-- call that failed: its error fails it alone).
local function run(mode, ko, n, base)
  if mode == 'r' then return reserve(ko, n, base) end
  if mode == 's' then return settle(ko, n, base) end
  error('unknown budget call ' .. tostring(mode))
end

if ARGV[1] ~= 'b' then
  return run(ARGV[1], 0, #KEYS, 1)
end

local out, ko, base = {}, 0, 2
for _ = 1, tonumber(ARGV[2]) do
  local m, n = ARGV[base + 1], tonumber(ARGV[base + 2])
  base = base + 2
  local ok, answer = pcall(run, m, ko, n, base)
  if ok then
    out[#out + 1] = #answer
    for i = 1, #answer do out[#out + 1] = answer[i] end
  else
    out[#out + 1] = -1
  end
  ko = ko + n
  if m == 'r' then base = base + 2 + 4 * n else base = base + 3 + 5 * n end
end
return out
