-- palisade rate limiter: decides, peeks, settles or resets every rule of one request at once.
--
-- The arithmetic is the one of palisade's `rate_limit::algorithm` module, integer for
-- integer: Lua numbers are doubles, exact for integers below 2^53, and the one product
-- that can pass that (a count times a window in microseconds) goes through `muldiv`, which
-- is exact for factors below 2^52.
--
-- KEYS: one state key per rule.
-- ARGV[1]: mode, "c" (check), "p" (peek the first rule), "s" (settle), "r" (reset), or "b"
-- (a batch of calls, see the end of the script).
-- ARGV[2]: the time in microseconds, or "-" for the server's own clock (TIME).
-- ARGV[3]: milliseconds added to every expiry (grace for clocks that do not follow Redis's).
-- Then, except for a reset, 7 numbers per rule: algorithm (0 sliding window, 1 fixed window,
-- 2 GCRA), limit, window (us), burst, strict (0 or 1), then for a check cost and shadow (0
-- or 1); for a settlement 8: window_start, delta and the reservation's generation.
--
-- A key holds "start prev count", "start count" when prev is 0, or, once it has been reset,
-- "start prev count generation" (GCRA: the TAT, 0, and the TAT's distance from its epoch's
-- start).
-- A reset writes a fresh state with the next generation (modulo 2^32) that keeps the key's
-- expiry (which later writes never shorten), so that a settlement of a reservation made
-- before it is dropped.
--
-- A check answers {admitted, now, then per rule: verdict (0 allowed, 1 denied, 2 never),
-- retry_after, remaining, reset, window_start, debited, blocked_for, generation};
-- blocked_for is how long (us) no request of any cost can pass the rule, 0 when one could
-- pass now. A peek answers the same for its one rule; a settlement and a reset answer {}.

local floor = math.floor
local P53 = 9007199254740992
local LIMB = 16777216 -- 2^24

-- floor(a * b / c) and whether it left a remainder, for a product past 2^53 (a, b < c):
-- the product in base-2^24 limbs, least significant first, then binary long division (the
-- remainder stays below c, so 2r + 1 < 2^53).
local function muldiv_long(a, b, c)
  local x = { a % LIMB, floor(a / LIMB) % LIMB, floor(a / LIMB / LIMB) }
  local y = { b % LIMB, floor(b / LIMB) % LIMB, floor(b / LIMB / LIMB) }
  local z = { 0, 0, 0, 0, 0, 0, 0 }
  for i = 1, 3 do
    local carry = 0
    for j = 1, 3 do
      local t = z[i + j - 1] + x[i] * y[j] + carry
      z[i + j - 1] = t % LIMB
      carry = floor(t / LIMB)
    end
    local k = i + 3
    while carry > 0 do
      local t = z[k] + carry
      z[k] = t % LIMB
      carry = floor(t / LIMB)
      k = k + 1
    end
  end
  local q, r = 0, 0
  for i = 7, 1, -1 do
    local limb = z[i]
    for bit = 23, 0, -1 do
      local d = 2 ^ bit
      local b1 = floor(limb / d) % 2
      r = 2 * r + b1
      q = 2 * q
      if r >= c then
        r = r - c
        q = q + 1
      end
    end
  end
  return q, r ~= 0
end

-- floor(a * b / c) and whether it left a remainder; a, b < 2^52, 1 <= c < 2^52, and the
-- quotient below 2^53. A product below 2^53 is one division (whose floor is exact there);
-- past it, a = qa c + ra and b = qb c + rb give a b / c = qa b + ra qb + ra rb / c, where
-- ra rb < c^2 is usually small enough for one division again (always for c < 2^26.5, and
-- for a count that is a multiple of the limit); else the long division.
local function muldiv(a, b, c)
  local p = a * b
  if p < P53 then
    local q = floor(p / c)
    return q, p - q * c ~= 0
  end
  local qa, qb = floor(a / c), floor(b / c)
  local ra, rb = a - qa * c, b - qb * c
  local t = ra * rb
  local q, rem
  if t < P53 then
    q = floor(t / c)
    rem = t - q * c ~= 0
  else
    q, rem = muldiv_long(ra, rb, c)
  end
  return qa * b + ra * qb + q, rem
end

local function mul_div_ceil(a, b, c)
  if a == 0 or c == 0 then
    return 0
  end
  local q, rem = muldiv(a, b, c)
  if rem then
    q = q + 1
  end
  return q
end

local function sat_sub(a, b)
  if a > b then
    return a - b
  end
  return 0
end

-- GCRA: us that `units` advance the TAT, ceil(units * window / limit).
local function increment(p, units)
  local limit = p.limit
  if limit < 1 then
    limit = 1
  end
  return mul_div_ceil(units, p.window, limit)
end

-- GCRA: whole units in `micros` of slack, floor(micros * limit / window).
local function units_in(p, micros)
  if micros == 0 then
    return 0
  end
  local q = muldiv(micros, p.limit, p.window)
  return q
end

-- Sliding window: what is left after `c` units in the current window.
local function sliding_remaining(p, prev, weighted, c)
  if p.strict then
    return sat_sub(p.limit, prev + c)
  end
  return sat_sub(sat_sub(p.limit, weighted), c)
end

-- Sliding window: the first instant (us into the window) at which `pp` units of the previous
-- window weigh at most `x`.
local function first_fit(w, pp, x)
  if pp == 0 then
    return 0
  end
  local slack = muldiv(x, w, pp)
  if slack > w then
    slack = w
  end
  return w - slack
end

-- A decision: verdict, retry_after, remaining, reset, window_start, and the state to keep
-- (start, prev, count, expires_at).
local function decide_sliding(p, s, now, cost)
  local w, limit = p.window, p.limit
  local aligned = now - now % w
  local start, prev, count
  if s.start >= aligned then
    start, prev, count = s.start, s.prev, s.count
  elseif s.start + w == aligned then
    start, prev, count = aligned, s.count, 0
  else
    start, prev, count = aligned, 0, 0
  end
  local elapsed = sat_sub(now, start)
  if elapsed > w - 1 then
    elapsed = w - 1
  end
  local weighted = 0
  if not p.strict then
    weighted = mul_div_ceil(prev, w - elapsed, w)
  end
  local d = {
    verdict = 0, retry = 0, remaining = 0, reset = w - elapsed, window_start = start,
    start = start, prev = prev, count = count, expires_at = start + 2 * w,
    base = { start = start, prev = prev, count = count },
  }
  if cost > limit then
    d.verdict = 2
    d.remaining = sliding_remaining(p, prev, weighted, count)
    return d
  end
  local total = count + cost
  local fits
  if p.strict then
    fits = prev + total <= limit
  else
    fits = total <= limit and weighted <= limit - total
  end
  if fits then
    d.count = total
    d.remaining = sliding_remaining(p, prev, weighted, total)
    return d
  end
  d.verdict = 1
  d.remaining = sliding_remaining(p, prev, weighted, count)
  local to_next = w - elapsed
  if p.strict then
    if total <= limit then
      d.retry = to_next
    else
      d.retry = to_next + w
    end
    return d
  end
  if total <= limit then
    local f = first_fit(w, prev, limit - total)
    if f < elapsed + 1 then
      f = elapsed + 1
    end
    d.retry = f - elapsed
  else
    d.retry = to_next + first_fit(w, count, limit - cost)
  end
  return d
end

local function decide_fixed(p, s, now, cost)
  local w = p.window
  local start = now - now % w
  local count = 0
  if s.start >= start then
    count = s.count
    start = s.start
  end
  local finish = start + w
  local d = {
    verdict = 0, retry = 0, remaining = sat_sub(p.limit, count), reset = sat_sub(finish, now),
    window_start = start, start = start, prev = 0, count = count, expires_at = finish,
    base = { start = start, prev = 0, count = count },
  }
  if cost > p.limit then
    d.verdict = 2
  elseif count + cost <= p.limit then
    d.count = count + cost
    d.remaining = p.limit - count - cost
  else
    d.verdict = 1
    d.retry = d.reset
  end
  return d
end

-- GCRA keeps its epoch, the time its bucket was last found full, as the TAT's distance from
-- it in `count`, and answers it as the window start: a settlement applies only in its
-- reservation's epoch.
local function decide_gcra(p, s, now, cost)
  local tolerance = increment(p, p.burst)
  local tat = s.start
  local epoch = now
  if tat > now then
    epoch = tat - s.count
  else
    tat = now
  end
  local horizon = now + tolerance
  local d = {
    verdict = 0, retry = 0, remaining = 0, reset = tat - now, window_start = epoch,
    start = tat, prev = 0, count = tat - epoch, expires_at = tat,
    base = { start = tat, prev = 0, count = tat - epoch },
  }
  if cost > p.burst then
    d.verdict = 2
    d.remaining = units_in(p, sat_sub(horizon, tat))
    return d
  end
  local new_tat = tat + increment(p, cost)
  if new_tat <= horizon then
    d.start = new_tat
    d.count = new_tat - epoch
    d.remaining = units_in(p, horizon - new_tat)
    d.reset = new_tat - now
    d.expires_at = new_tat
  else
    d.verdict = 1
    d.retry = new_tat - horizon
    d.remaining = units_in(p, sat_sub(horizon, tat))
  end
  return d
end

-- As rate_limit::algorithm::decide: `reset` is when the quota is whole again, and a cost of
-- 0 is a peek, always allowed.
local function decide(p, s, now, cost)
  local d
  if p.algorithm == 0 then
    d = decide_sliding(p, s, now, cost)
    -- The current window's units weigh until the end of the next window, the previous
    -- window's until the end of the current one.
    if d.count > 0 then
      d.reset = sat_sub(d.start + 2 * p.window, now)
    elseif d.prev > 0 then
      d.reset = sat_sub(d.start + p.window, now)
    else
      d.reset = 0
    end
  elseif p.algorithm == 1 then
    d = decide_fixed(p, s, now, cost)
    if d.count == 0 then
      d.reset = 0
    end
  else
    d = decide_gcra(p, s, now, cost)
  end
  if cost == 0 then
    d.verdict = 0
  end
  return d
end

local function load(key)
  local v = redis.call('GET', key)
  if not v then
    return { start = 0, prev = 0, count = 0, gen = 0 }, false
  end
  local a, b, c, g = string.match(v, '^(%d+) (%d+) ?(%d*) ?(%d*)$')
  if c == '' then
    -- "start count": prev and generation 0
    return { start = tonumber(a), prev = 0, count = tonumber(b), gen = 0 }, true
  end
  return { start = tonumber(a), prev = tonumber(b), count = tonumber(c), gen = tonumber(g) or 0 },
    true
end

local function encode(s)
  if s.gen > 0 then
    return string.format('%.0f %.0f %.0f %.0f', s.start, s.prev, s.count, s.gen)
  end
  if s.prev == 0 then
    return string.format('%.0f %.0f', s.start, s.count)
  end
  return string.format('%.0f %.0f %.0f', s.start, s.prev, s.count)
end

local function ttl_ms(expires_at, now, grace)
  local ms = floor((sat_sub(expires_at, now) + 999) / 1000) + grace
  if ms < 1 then
    ms = 1
  end
  return ms
end

-- Writes a state that expires in `ms`. A key that has been reset (generation above 0)
-- never expires sooner than it already would: its generation lives at least as long as the
-- state from before the reset would have, so a give-back of a reservation made before the
-- reset cannot find the key started again at generation 0.
local function write(key, s, ms)
  if s.gen > 0 then
    local left = redis.call('PTTL', key)
    if left > ms then
      ms = left
    end
  end
  redis.call('SET', key, encode(s), 'PX', ms)
end

-- The rule `i` of a call whose numbers follow ARGV[base], `stride` numbers a rule.
local function params(base, i, stride)
  local o = base + (i - 1) * stride
  return {
    algorithm = tonumber(ARGV[o + 1]),
    limit = tonumber(ARGV[o + 2]),
    window = tonumber(ARGV[o + 3]),
    burst = tonumber(ARGV[o + 4]),
    strict = ARGV[o + 5] == '1',
  }, tonumber(ARGV[o + 6]), tonumber(ARGV[o + 7]), tonumber(ARGV[o + 8])
end

local function server_time()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

-- The time and grace of the call being run.
local now
local grace

-- How long no request of any cost can pass, from the state `s` that was kept.
local function blocked_for(p, s)
  local unit = decide(p, s, now, 1)
  if unit.verdict == 1 then
    return unit.retry
  end
  return 0
end

-- A reset of the `n` keys after KEYS[ko].
local function run_reset(ko, n)
  for i = 1, n do
    local key = KEYS[ko + i]
    local s, found = load(key)
    if found then
      local fresh = { start = 0, prev = 0, count = 0, gen = (s.gen + 1) % 4294967296 }
      redis.call('SET', key, encode(fresh), 'KEEPTTL')
    end
  end
end

-- A settlement of the `n` keys after KEYS[ko], their numbers after ARGV[base].
local function run_settle(ko, n, base)
  for i = 1, n do
    local key = KEYS[ko + i]
    local p, window_start, delta, gen = params(base, i, 8)
    local s, found = load(key)
    -- a key reset since the reservation holds another generation: nothing to settle
    if found and s.gen == gen then
      local function apply(x)
        if delta >= 0 then
          return x + delta
        end
        return sat_sub(x, -delta)
      end
      if p.algorithm == 2 then
        -- only in the reservation's epoch; never before the epoch's start (the bucket is
        -- then full, and stays no fuller)
        local epoch = s.start - s.count
        if epoch == window_start then
          local step = increment(p, math.abs(delta))
          if delta >= 0 then
            s.start = s.start + step
          else
            s.start = sat_sub(s.start, step)
            if s.start < epoch then
              s.start = epoch
            end
          end
          s.count = s.start - epoch
          write(key, s, ttl_ms(s.start, now, grace))
        end
      else
        if s.start == window_start then
          s.count = apply(s.count)
        elseif p.algorithm == 0 and s.start == window_start + p.window then
          s.prev = apply(s.prev)
        end
        redis.call('SET', key, encode(s), 'KEEPTTL')
      end
    end
  end
end

-- A check or peek of the `n` keys after KEYS[ko], their numbers after ARGV[base]; appends
-- the answer to `out`.
local function run_check(mode, ko, n, base, out)
  local ds = {}
  local ps = {}
  local admitted = true
  for i = 1, n do
    local p, cost, shadow = params(base, i, 7)
    if mode == 'p' then
      cost = 0
    end
    local s = load(KEYS[ko + i])
    local d = decide(p, s, now, cost)
    d.gen = s.gen
    d.base.gen = s.gen
    d.shadow = shadow == 1
    if d.verdict ~= 0 and not d.shadow then
      admitted = false
    end
    ds[i] = d
    ps[i] = p
  end
  if mode == 'p' then
    admitted = false
  end
  out[#out + 1] = admitted and 1 or 0
  out[#out + 1] = now
  for i = 1, n do
    local d, p = ds[i], ps[i]
    local debited = 0
    local kept = d.base
    if d.verdict == 0 then
      if admitted then
        debited = 1
        kept = d
        write(KEYS[ko + i], d, ttl_ms(d.expires_at, now, grace))
      else
        -- nothing was debited: what is left is what a peek sees (GCRA rounds its remaining
        -- down, so adding the cost back could come out one short)
        d.remaining = decide(p, d.base, now, 0).remaining
      end
    end
    -- `remaining` is what the kept state leaves now: one unit or more passes exactly when
    -- it is at least 1, so only an exhausted rule needs the second look.
    local blocked = 0
    if mode == 'c' and not d.shadow and d.remaining < 1 then
      blocked = blocked_for(p, kept)
    end
    local k = #out
    out[k + 1] = d.verdict
    out[k + 2] = d.retry
    out[k + 3] = d.remaining
    out[k + 4] = d.reset
    out[k + 5] = d.window_start
    out[k + 6] = debited
    out[k + 7] = blocked
    out[k + 8] = d.gen
  end
end

local function run(mode, ko, n, base, out)
  if mode == 'r' then
    run_reset(ko, n)
  elseif mode == 's' then
    run_settle(ko, n, base)
  else
    run_check(mode, ko, n, base, out)
  end
end

local mode = ARGV[1]

if mode ~= 'b' then
  if ARGV[2] == '-' then
    now = server_time()
  else
    now = tonumber(ARGV[2])
  end
  grace = tonumber(ARGV[3])
  local out = {}
  run(mode, 0, #KEYS, 3, out)
  return out
end

-- A batch: ARGV[2] calls, each as mode, key count, time, grace, then its numbers, its keys
-- following the previous call's in KEYS. They run one after another, each exactly as it
-- would alone (one TIME for those on the server's clock), and each answer follows its
-- length (-1 for a call that failed: its error fails it alone).
local out = {}
local server_now
local ko, base = 0, 2
for _ = 1, tonumber(ARGV[2]) do
  local m, n, t = ARGV[base + 1], tonumber(ARGV[base + 2]), ARGV[base + 3]
  grace = tonumber(ARGV[base + 4])
  base = base + 4
  if t == '-' then
    if not server_now then
      server_now = server_time()
    end
    now = server_now
  else
    now = tonumber(t)
  end
  local at = #out + 1
  out[at] = 0
  local answer = {}
  if pcall(run, m, ko, n, base, answer) then
    for i = 1, #answer do
      out[at + i] = answer[i]
    end
    out[at] = #answer
  else
    out[at] = -1
  end
  ko = ko + n
  if m == 's' then
    base = base + 8 * n
  elseif m ~= 'r' then
    base = base + 7 * n
  end
end
return out
