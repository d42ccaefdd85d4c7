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
-- or 1); for a settlement 9: window_start, delta, the reservation's generation and its end
-- (GCRA: where its units end on the epoch's timeline; the window algorithms ignore it).
--
-- A key holds "start prev count", "start count" when prev is 0, or, once it has been reset,
-- "start prev count generation" (GCRA: the TAT, the us that give-backs have moved it back
-- in its epoch, and the TAT's distance from its epoch's start).
-- A reset writes a fresh state with the next generation (modulo 2^32) that keeps the key's
-- expiry (which later writes never shorten), so that a settlement of a reservation made
-- before it is dropped.
--
-- A check answers {admitted, now, then per rule: verdict (0 allowed, 1 denied, 2 never),
-- retry_after, remaining, reset, window_start, debited, blocked_for, generation,
-- reservation_end}; blocked_for is how long (us) no request of any cost can pass the rule, 0
-- when one could pass now; reservation_end is, for GCRA, the decided TAT plus what
-- give-backs have moved the TAT back in its epoch (0 for the window algorithms). A peek
-- answers the same for its one rule; a settlement and a reset answer {}.
--
-- The script returns its answer as one string: every integer as 8 bytes, little-endian two's
-- complement ("" for {}). struct.pack converts a number of magnitude below 2^63 (the times
-- and µs answered here are far below it) to a 64-bit integer as Redis converts one in a
-- returned table, with no text formatting, and the client then reads one value instead of
-- one per integer. The script needs Lua's `struct` library (built into Redis and Valkey).

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

-- sat_sub(base + span, now) without forming base + span, which can pass 2^53 (a window's
-- start below 2^53 plus a window below 2^52) where a double no longer holds it exactly.
local function left_until(base, span, now)
  if now >= base then
    return sat_sub(span, now - base)
  end
  return (base - now) + span
end

local match, format, tonumber, unpack = string.match, string.format, tonumber, unpack

-- The rule being decided, read from ARGV by `rule`: the helpers below read these instead of
-- a table of parameters, so that a decision builds no table and no closure.
local alg, limit, window, burst, strict

-- Reads the rule whose numbers follow ARGV[o].
local function rule(o)
  alg = tonumber(ARGV[o + 1])
  limit = tonumber(ARGV[o + 2])
  window = tonumber(ARGV[o + 3])
  burst = tonumber(ARGV[o + 4])
  strict = ARGV[o + 5] == '1'
end

-- GCRA: us that `units` advance the TAT, ceil(units * window / limit).
local function increment(units)
  local l = limit
  if l < 1 then
    l = 1
  end
  return mul_div_ceil(units, window, l)
end

-- GCRA: whole units in `micros` of slack, floor(micros * limit / window).
local function units_in(micros)
  if micros == 0 then
    return 0
  end
  local q = muldiv(micros, limit, window)
  return q
end

-- Sliding window: what is left after `c` units in the current window.
local function sliding_remaining(prev, weighted, c)
  if strict then
    return sat_sub(limit, prev + c)
  end
  return sat_sub(sat_sub(limit, weighted), c)
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

-- A decision, from the kept state (start, prev, count), answers: verdict, retry_after,
-- remaining, reset, window_start, the state to keep if it is debited (start, prev, count,
-- expires_at), and the state to keep if it is not (start, prev, count).
local function decide_sliding(s0, p0, c0, now, cost)
  local w = window
  local aligned = now - now % w
  local start, prev, count
  if s0 >= aligned then
    start, prev, count = s0, p0, c0
  elseif s0 + w == aligned then
    start, prev, count = aligned, c0, 0
  else
    start, prev, count = aligned, 0, 0
  end
  local elapsed = sat_sub(now, start)
  if elapsed > w - 1 then
    elapsed = w - 1
  end
  local weighted = 0
  if not strict then
    weighted = mul_div_ceil(prev, w - elapsed, w)
  end
  local to_next = w - elapsed
  local expires_at = start + 2 * w
  if cost > limit then
    return 2, 0, sliding_remaining(prev, weighted, count), to_next, start,
      start, prev, count, expires_at, start, prev, count
  end
  local total = count + cost
  local fits
  if strict then
    fits = prev + total <= limit
  else
    fits = total <= limit and weighted <= limit - total
  end
  if fits then
    return 0, 0, sliding_remaining(prev, weighted, total), to_next, start,
      start, prev, total, expires_at, start, prev, count
  end
  local retry
  if strict then
    if total <= limit then
      retry = to_next
    else
      retry = to_next + w
    end
  elseif total <= limit then
    local f = first_fit(w, prev, limit - total)
    if f < elapsed + 1 then
      f = elapsed + 1
    end
    retry = f - elapsed
  else
    retry = to_next + first_fit(w, count, limit - cost)
  end
  return 1, retry, sliding_remaining(prev, weighted, count), to_next, start,
    start, prev, count, expires_at, start, prev, count
end

local function decide_fixed(s0, c0, now, cost)
  local w = window
  local start = now - now % w
  local count = 0
  if s0 >= start then
    count = c0
    start = s0
  end
  local finish = start + w
  local reset = left_until(start, w, now)
  if cost > limit then
    return 2, 0, sat_sub(limit, count), reset, start, start, 0, count, finish, start, 0, count
  end
  if count + cost <= limit then
    return 0, 0, limit - count - cost, reset, start,
      start, 0, count + cost, finish, start, 0, count
  end
  return 1, reset, sat_sub(limit, count), reset, start, start, 0, count, finish, start, 0, count
end

-- GCRA keeps its epoch, the time its bucket was last found full, as the TAT's distance from
-- it in `count`, and answers it as the window start: a give-back applies only in its
-- reservation's epoch. `prev` holds the us that give-backs have moved the TAT back in the
-- epoch; the TAT plus them is where the decided units end on the epoch's timeline, answered
-- last (a give-back refunds at most what of its reservation is still outstanding).
local function decide_gcra(s0, p0, c0, now, cost)
  local tolerance = increment(burst)
  local tat, epoch, back = s0, now, 0
  if tat > now then
    epoch = tat - c0
    back = p0
  else
    tat = now
  end
  local age = tat - epoch
  local horizon = now + tolerance
  if cost > burst then
    return 2, 0, units_in(sat_sub(horizon, tat)), tat - now, epoch,
      tat, back, age, tat, tat, back, age, tat + back
  end
  local new_tat = tat + increment(cost)
  if new_tat <= horizon then
    return 0, 0, units_in(horizon - new_tat), new_tat - now, epoch,
      new_tat, back, new_tat - epoch, new_tat, tat, back, age, new_tat + back
  end
  return 1, new_tat - horizon, units_in(sat_sub(horizon, tat)), tat - now, epoch,
    tat, back, age, tat, tat, back, age, tat + back
end

-- As rate_limit::algorithm::decide: `reset` is when the quota is whole again, and a cost of
-- 0 is a peek, always allowed. Answers what the algorithms answer, then the reservation's
-- end (GCRA; 0 for the windows).
local function decide(s0, p0, c0, now, cost)
  local v, retry, rem, reset, ws, st, pr, co, exp, bs, bp, bc
  local re = 0
  if alg == 0 then
    v, retry, rem, reset, ws, st, pr, co, exp, bs, bp, bc =
      decide_sliding(s0, p0, c0, now, cost)
    -- The current window's units weigh until the end of the next window, the previous
    -- window's until the end of the current one.
    if co > 0 then
      reset = left_until(st, 2 * window, now)
    elseif pr > 0 then
      reset = left_until(st, window, now)
    else
      reset = 0
    end
  elseif alg == 1 then
    v, retry, rem, reset, ws, st, pr, co, exp, bs, bp, bc = decide_fixed(s0, c0, now, cost)
    if co == 0 then
      reset = 0
    end
  else
    v, retry, rem, reset, ws, st, pr, co, exp, bs, bp, bc, re =
      decide_gcra(s0, p0, c0, now, cost)
  end
  if cost == 0 then
    v = 0
  end
  return v, retry, rem, reset, ws, st, pr, co, exp, bs, bp, bc, re
end

-- A stored state: start, prev, count, generation, and whether there was one.
local function parse(v)
  if not v then
    return 0, 0, 0, 0, false
  end
  local a, b, c, g = match(v, '^(%d+) (%d+) ?(%d*) ?(%d*)$')
  if c == '' then
    -- "start count": prev and generation 0
    return tonumber(a), 0, tonumber(b), 0, true
  end
  return tonumber(a), tonumber(b), tonumber(c), tonumber(g) or 0, true
end

-- A key's state, as `parse` gives it.
local function load(key)
  return parse(redis.call('GET', key))
end

local function encode(start, prev, count, gen)
  if gen > 0 then
    return format('%.0f %.0f %.0f %.0f', start, prev, count, gen)
  end
  if prev == 0 then
    return format('%.0f %.0f', start, count)
  end
  return format('%.0f %.0f %.0f', start, prev, count)
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
local function write(key, start, prev, count, gen, ms)
  if gen > 0 then
    local left = redis.call('PTTL', key)
    if left > ms then
      ms = left
    end
  end
  redis.call('SET', key, encode(start, prev, count, gen), 'PX', ms)
end

local function server_time()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

-- The time and grace of the call being run.
local now
local grace

-- How long no request of any cost can pass the current rule, from the state kept.
local function blocked_for(start, prev, count)
  local v, retry = decide(start, prev, count, now, 1)
  if v == 1 then
    return retry
  end
  return 0
end

-- x moved by delta, not below 0.
local function apply(x, delta)
  if delta >= 0 then
    return x + delta
  end
  return sat_sub(x, -delta)
end

-- A reset of the `n` keys after KEYS[ko].
local function run_reset(ko, n)
  for i = 1, n do
    local key = KEYS[ko + i]
    local _, _, _, gen, found = load(key)
    if found then
      redis.call('SET', key, encode(0, 0, 0, (gen + 1) % 4294967296), 'KEEPTTL')
    end
  end
end

-- A settlement of the `n` keys after KEYS[ko], their numbers after ARGV[base].
local function run_settle(ko, n, base)
  for i = 1, n do
    local key = KEYS[ko + i]
    local o = base + (i - 1) * 9
    rule(o)
    local window_start, delta, gen = tonumber(ARGV[o + 6]), tonumber(ARGV[o + 7]),
      tonumber(ARGV[o + 8])
    local start, prev, count, g, found = load(key)
    -- a key reset since the reservation holds another generation: nothing to settle
    if found and g == gen then
      if alg == 2 then
        -- a charge in any epoch (the units were used); a give-back only in the
        -- reservation's epoch, by no more than what of the reservation is still
        -- outstanding (its end, less what give-backs have moved the TAT back since it was
        -- made, minus now: the units before have drained, those after belong to later
        -- requests), and never before the epoch's start (the bucket is then full, and
        -- stays no fuller)
        local epoch = start - count
        if delta >= 0 or epoch == window_start then
          local was = start
          if delta >= 0 then
            -- no further than 2^53 us (285 years): past it the TAT is no longer exact,
            -- and its expiry is past what SET PX takes
            start = start + increment(delta)
            if start > P53 then
              start = P53
            end
          else
            local back = increment(-delta)
            local outstanding = sat_sub(sat_sub(tonumber(ARGV[o + 9]), prev), now)
            if back > outstanding then
              back = outstanding
            end
            start = sat_sub(start, back)
            if start < epoch then
              start = epoch
            end
            prev = prev + (was - start)
          end
          write(key, start, prev, start - epoch, g, ttl_ms(start, now, grace))
        end
      elseif start == window_start then
        redis.call('SET', key, encode(start, prev, apply(count, delta), g), 'KEEPTTL')
      elseif alg == 0 and start == window_start + window then
        redis.call('SET', key, encode(start, apply(prev, delta), count, g), 'KEEPTTL')
      end
    end
  end
end

-- Values kept per rule between the two passes of a check.
local KEPT = 15

-- A check or peek of the `n` keys after KEYS[ko], their numbers after ARGV[base]; appends
-- the answer to `out`.
local function run_check(mode, ko, n, base, out)
  local admitted = mode ~= 'p'
  local r = {}
  for i = 1, n do
    local o = base + (i - 1) * 7
    rule(o)
    local cost = tonumber(ARGV[o + 6])
    if mode == 'p' then
      cost = 0
    end
    local shadow = ARGV[o + 7] == '1'
    local s0, p0, c0, gen = load(KEYS[ko + i])
    local v, retry, rem, reset, ws, st, pr, co, exp, bs, bp, bc, re =
      decide(s0, p0, c0, now, cost)
    if v ~= 0 and not shadow then
      admitted = false
    end
    local k = (i - 1) * KEPT
    r[k + 1], r[k + 2], r[k + 3], r[k + 4], r[k + 5], r[k + 6], r[k + 7] =
      v, retry, rem, reset, ws, st, pr
    r[k + 8], r[k + 9], r[k + 10], r[k + 11], r[k + 12], r[k + 13], r[k + 14], r[k + 15] =
      co, exp, bs, bp, bc, gen, shadow, re
  end
  local at = #out
  out[at + 1] = admitted and 1 or 0
  out[at + 2] = now
  at = at + 2
  for i = 1, n do
    local k = (i - 1) * KEPT
    local v, retry, rem, reset, ws, st, pr, co, exp, bs, bp, bc, gen, shadow, re =
      unpack(r, k + 1, k + KEPT)
    local debited = 0
    -- the state kept
    local ks, kp, kc = bs, bp, bc
    local ruled = n == 1
    if v == 0 then
      if admitted then
        debited = 1
        ks, kp, kc = st, pr, co
        write(KEYS[ko + i], st, pr, co, gen, ttl_ms(exp, now, grace))
      else
        -- nothing was debited: what is left is what a peek sees (GCRA rounds its remaining
        -- down, so adding the cost back could come out one short)
        if not ruled then
          rule(base + (i - 1) * 7)
          ruled = true
        end
        local _, _, peeked = decide(bs, bp, bc, now, 0)
        rem = peeked
      end
    end
    -- `remaining` is what the kept state leaves now: one unit or more passes exactly when
    -- it is at least 1, so only an exhausted rule needs the second look.
    local blocked = 0
    if mode == 'c' and not shadow and rem < 1 then
      if not ruled then
        rule(base + (i - 1) * 7)
      end
      blocked = blocked_for(ks, kp, kc)
    end
    out[at + 1] = v
    out[at + 2] = retry
    out[at + 3] = rem
    out[at + 4] = reset
    out[at + 5] = ws
    out[at + 6] = debited
    out[at + 7] = blocked
    out[at + 8] = gen
    out[at + 9] = re
    at = at + 9
  end
end

-- The answer `out` as the string the header describes. `unpack` takes a bounded number of
-- values, so a long answer is packed in chunks.
local CHUNK = 200
local rep, concat, pack = string.rep, table.concat, struct.pack
local function answer(out)
  local n = #out
  if n <= CHUNK then
    return pack('<' .. rep('i8', n), unpack(out, 1, n))
  end
  local parts = {}
  for i = 1, n, CHUNK do
    local j = i + CHUNK - 1
    if j > n then
      j = n
    end
    parts[#parts + 1] = pack('<' .. rep('i8', j - i + 1), unpack(out, i, j))
  end
  return concat(parts)
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
  return answer(out)
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
    base = base + 9 * n
  elseif m ~= 'r' then
    base = base + 7 * n
  end
end
return answer(out)
