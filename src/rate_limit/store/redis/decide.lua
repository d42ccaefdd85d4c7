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
-- ARGV[2]: the call's numbers, each 8 bytes, little-endian two's complement (one
-- struct.unpack reads a rule's, where a decimal argument would cost a tonumber each): the
-- time in microseconds (-1 for the server's own clock, TIME), the milliseconds added to
-- every expiry (grace for clocks that do not follow Redis's), then for a reset the us a reset
-- key keeps its generation at least (the store's reset retention; a reset sent without it
-- keeps the key's expiry), and for the other calls 7 numbers per rule: algorithm (0
-- sliding window, 1 fixed window, 2 GCRA), limit, window (us), burst, strict (0 or 1),
-- then for a check cost and shadow (0 or 1); for a settlement 9: window_start, delta, the
-- reservation's generation and its end (GCRA: where its units end on the epoch's
-- timeline; the window algorithms ignore it).
--
-- A key holds "start prev count", "start count" when prev is 0, or, once it has been reset,
-- "start prev count generation" (GCRA: the TAT, the us that give-backs have moved it back
-- in its epoch, and the TAT's distance from its epoch's start).
-- That text is the same in every version of this script: during a rolling upgrade, instances
-- running older and newer versions share the keys, each calling its own script (by its
-- SHA1) with the arguments it builds.
-- A reset writes a fresh state with the next generation (modulo 2^32) that lives as long as
-- the key would have, and at least the reset retention (later writes never shorten it), so
-- that a settlement of a reservation made before it is dropped. A charge (delta above 0)
-- whose generation is newer than the key's (modulo 2^32: 1 to 2^31 - 1 resets past it)
-- was made after a reset the key no longer knows of (it was deleted, and started again at
-- generation 0): its units were used, and it applies.
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
--
-- Redis runs this whole script on every call, so each function it defines is built again
-- each time: it defines only the six a call needs (`muldiv`, `sat_sub`, `decide`, `load`,
-- `write`, `run`), writes the other helpers out where they are used, and keeps the long
-- multiplication inside the branch that needs it.

local floor, format, match, tonumber, unpack = math.floor, string.format, string.match,
  tonumber, unpack
local struct_unpack = struct.unpack
local P53 = 9007199254740992
-- A rule's numbers in a call, and in a check's answer.
local CHECK_RULE, SETTLE_RULE = '<i8i8i8i8i8i8i8', '<i8i8i8i8i8i8i8i8i8'
local pack, ANSWER_RULE = struct.pack, '<i8i8i8i8i8i8i8i8i8'

-- The call being run: its numbers (ARGV[2], or a batched call's), time and grace, and the
-- server's time, read once for every call of a batch that asks for it.
local nums, now, grace, server_now

-- The rule being decided: `decide` reads these instead of a table of parameters, so that a
-- decision builds no table.
local alg, limit, window, burst, strict

-- floor(a * b / c), or its ceiling when `up` is true (0 when a or c is 0), and whether the
-- division left a remainder; a, b < 2^52,
-- 1 <= c < 2^52, and the quotient below 2^53. A product below 2^53 is one division (whose
-- floor is exact there); past it, a = qa c + ra and b = qb c + rb give
-- a b / c = qa b + ra qb + ra rb / c, where ra rb < c^2 is usually small enough for one
-- division again (always for c < 2^26.5, and for a count that is a multiple of the limit);
-- else a long division.
local function muldiv(a, b, c, up)
  if up and (a == 0 or c == 0) then
    return 0
  end
  local p = a * b
  local q, rem
  if p < P53 then
    q = floor(p / c)
    rem = p - q * c ~= 0
  else
    local qa, qb = floor(a / c), floor(b / c)
    local ra, rb = a - qa * c, b - qb * c
    local t = ra * rb
    if t < P53 then
      q = floor(t / c)
      rem = t - q * c ~= 0
    else
      -- ra rb in base-2^24 limbs, least significant first, then binary long division
      -- (the remainder stays below c, so 2r + 1 < 2^53).
      local LIMB = 16777216
      local x = { ra % LIMB, floor(ra / LIMB) % LIMB, floor(ra / LIMB / LIMB) }
      local y = { rb % LIMB, floor(rb / LIMB) % LIMB, floor(rb / LIMB / LIMB) }
      local z = { 0, 0, 0, 0, 0, 0, 0 }
      for i = 1, 3 do
        local carry = 0
        for j = 1, 3 do
          local s = z[i + j - 1] + x[i] * y[j] + carry
          z[i + j - 1] = s % LIMB
          carry = floor(s / LIMB)
        end
        local k = i + 3
        while carry > 0 do
          local s = z[k] + carry
          z[k] = s % LIMB
          carry = floor(s / LIMB)
          k = k + 1
        end
      end
      local r = 0
      q = 0
      for i = 7, 1, -1 do
        local limb = z[i]
        for bit = 23, 0, -1 do
          local d = 2 ^ bit
          r = 2 * r + floor(limb / d) % 2
          q = 2 * q
          if r >= c then
            r = r - c
            q = q + 1
          end
        end
      end
      rem = r ~= 0
    end
    q = qa * b + ra * qb + q
  end
  if up and rem then
    q = q + 1
  end
  return q, rem
end

-- a - b, or 0 when b is larger.
local function sat_sub(a, b)
  if a > b then
    return a - b
  end
  return 0
end

-- As rate_limit::algorithm::decide, for the rule read last, at `now`: `reset` is when the
-- quota is whole again, and a cost of 0 is a peek, always allowed. From the kept state
-- (start, prev, count) it answers: verdict, retry_after, remaining, reset, window_start, the
-- state to keep if it is debited (start, prev, count, expires_at), the state to keep if it
-- is not (start, prev, count), and the reservation's end (GCRA; 0 for the windows).
local function decide(s0, p0, c0, cost)
  local v, retry, rem, reset, ws, st, pr, co, exp, bs, bp, bc
  local re = 0
  if alg == 0 then
    -- Sliding window.
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
      weighted = muldiv(prev, w - elapsed, w, true)
    end
    local to_next = w - elapsed
    v, retry, ws = 0, 0, start
    st, pr, co, exp, bs, bp, bc = start, prev, count, start + 2 * w, start, prev, count
    -- the units in the current window once decided
    local used = count
    local total = count + cost
    if cost > limit then
      v = 2
    elseif strict and prev + total <= limit
      or not strict and total <= limit and weighted <= limit - total then
      co, used = total, total
    else
      v = 1
      if strict then
        retry = to_next
        if total > limit then
          retry = to_next + w
        end
      else
        -- The first instant (us into the window) at which `pp` units of the previous
        -- window weigh at most `x`: the window less x w / pp (0 for no units).
        local pp, x = prev, limit - total
        if total > limit then
          pp, x = count, limit - cost
        end
        local fit = 0
        if pp > 0 then
          local slack = muldiv(x, w, pp)
          fit = sat_sub(w, slack)
        end
        if total <= limit then
          if fit < elapsed + 1 then
            fit = elapsed + 1
          end
          retry = fit - elapsed
        else
          retry = to_next + fit
        end
      end
    end
    -- what is left after `used` units in the current window
    if strict then
      rem = sat_sub(limit, prev + used)
    else
      rem = sat_sub(sat_sub(limit, weighted), used)
    end
    -- The current window's units weigh until the end of the next window, the previous
    -- window's until the end of the current one: `span` after the window's start, measured
    -- without forming start + span, which can pass 2^53 (a start below 2^53 plus a window
    -- below 2^52) where a double no longer holds it exactly.
    local span = 0
    if co > 0 then
      span = 2 * w
    elseif pr > 0 then
      span = w
    end
    if span == 0 then
      reset = 0
    elseif now >= st then
      reset = sat_sub(span, now - st)
    else
      reset = (st - now) + span
    end
  elseif alg == 1 then
    -- Fixed window.
    local w = window
    local start = now - now % w
    local count = 0
    if s0 >= start then
      count = c0
      start = s0
    end
    -- the window's end, measured as the sliding window's reset is
    if now >= start then
      reset = sat_sub(w, now - start)
    else
      reset = (start - now) + w
    end
    v, retry, ws = 0, 0, start
    st, pr, co, exp, bs, bp, bc = start, 0, count, start + w, start, 0, count
    if cost > limit then
      v, rem = 2, sat_sub(limit, count)
    elseif count + cost <= limit then
      rem, co = limit - count - cost, count + cost
    else
      v, retry, rem = 1, reset, sat_sub(limit, count)
    end
    if co == 0 then
      reset = 0
    end
  else
    -- GCRA keeps its epoch, the time its bucket was last found full, as the TAT's distance
    -- from it in `count`, and answers it as the window start: a give-back applies only in
    -- its reservation's epoch. `prev` holds the us that give-backs have moved the TAT back
    -- in the epoch; the TAT plus them is where the decided units end on the epoch's
    -- timeline, answered last (a give-back refunds at most what of its reservation is still
    -- outstanding). `units` advance the TAT by ceil(units * window / per) us, and `micros`
    -- of slack hold floor(micros * limit / window) whole units.
    local per = limit < 1 and 1 or limit
    local tat, epoch, back = s0, now, 0
    if tat > now then
      epoch = tat - c0
      back = p0
    else
      tat = now
    end
    local age = tat - epoch
    local horizon = now + muldiv(burst, window, per, true)
    v, retry, reset, ws, re = 0, 0, tat - now, epoch, tat + back
    st, pr, co, exp, bs, bp, bc = tat, back, age, tat, tat, back, age
    local slack = sat_sub(horizon, tat)
    if cost > burst then
      v = 2
    else
      local new_tat = tat + muldiv(cost, window, per, true)
      if new_tat <= horizon then
        slack, reset, re = horizon - new_tat, new_tat - now, new_tat + back
        st, co, exp = new_tat, new_tat - epoch, new_tat
      else
        v, retry = 1, new_tat - horizon
      end
    end
    rem = muldiv(slack, limit, window)
  end
  if cost == 0 then
    v = 0
  end
  return v, retry, rem, reset, ws, st, pr, co, exp, bs, bp, bc, re
end

-- A key's state: start, prev, count, generation, and whether there was one.
local function load(key)
  local v = redis.call('GET', key)
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

-- Writes a state that expires at `expires_at` (us) plus the call's grace, or, without
-- `expires_at`, keeps the key's expiry. `%d` prints a number as a C long (64 bits), exactly
-- for the integers below 2^53 kept here, without the arbitrary-precision digit loop that
-- `%.0f` runs for a double. A key that has been reset (generation above 0) never expires
-- sooner than it already would: its generation lives at least as long as the state from
-- before the reset would have, so a give-back of a reservation made before the reset cannot
-- find the key started again at generation 0. Nor does a window's key (`keep` true): a
-- window's state past its expiry decides as no state, so a key that lives longer changes no
-- answer, and keeping its expiry (KEEPTTL) spares SET the work of a new one on most writes
-- (the state's window, and so its expiry, changes once a window). A GCRA key's expiry
-- follows its TAT, which a give-back moves back.
local function write(key, start, prev, count, gen, expires_at, keep)
  local text
  if gen > 0 then
    text = format('%d %d %d %d', start, prev, count, gen)
  elseif prev == 0 then
    text = format('%d %d', start, count)
  else
    text = format('%d %d %d', start, prev, count)
  end
  if not expires_at then
    redis.call('SET', key, text, 'KEEPTTL')
    return
  end
  local ms = floor((sat_sub(expires_at, now) + 999) / 1000) + grace
  if ms < 1 then
    ms = 1
  end
  if gen > 0 or keep then
    local left = redis.call('PTTL', key)
    if left >= ms then
      redis.call('SET', key, text, 'KEEPTTL')
      return
    end
  end
  redis.call('SET', key, text, 'PX', ms)
end

-- Runs one call on the `n` keys after KEYS[ko]: its time and grace lead its numbers, its
-- rules' follow from byte 17. A check or peek appends its answer to `out`, packed as the
-- header describes: its first two integers, then one string a rule.
local function run(mode, ko, n, out)
  local t, g = struct_unpack('<i8i8', nums)
  if t < 0 then
    if not server_now then
      local time = redis.call('TIME')
      server_now = tonumber(time[1]) * 1000000 + tonumber(time[2])
    end
    now = server_now
  else
    now = t
  end
  grace = g

  if mode == 'r' then
    -- A reset: the next generation, modulo 2^32, kept at least the reset retention (the
    -- call's third number, when it has one).
    local keep
    if #nums >= 24 then
      local _, _, retention = struct_unpack('<i8i8i8', nums)
      keep = now + retention
    end
    for i = 1, n do
      local key = KEYS[ko + i]
      local _, _, _, gen, found = load(key)
      if found then
        write(key, 0, 0, 0, (gen + 1) % 4294967296, keep)
      end
    end
    return
  end

  if mode == 's' then
    -- A settlement.
    for i = 1, n do
      local key = KEYS[ko + i]
      local window_start, delta, gen, reservation_end
      alg, limit, window, burst, strict, window_start, delta, gen, reservation_end =
        struct_unpack(SETTLE_RULE, nums, 17 + (i - 1) * 72)
      strict = strict == 1
      local start, prev, count, g, found = load(key)
      -- a key reset since the reservation holds a newer generation: nothing to settle; a
      -- charge from a newer generation than the key's (modulo 2^32) was made after a
      -- reset the key, started again since, no longer knows of: it applies; a GCRA charge
      -- on a key with no state (it may have expired as idle) lands as on a fresh one, so
      -- the units are not lost
      local newer = (gen - g) % 4294967296
      if found and (newer == 0 or delta > 0 and newer < 2147483648)
        or not found and alg == 2 and delta > 0 then
        if alg == 2 then
          -- a bucket that has drained full takes a charge from now, in a new epoch, as a
          -- request's units would be: it decides as no state, and so settles
          if delta > 0 and start <= now then
            start, prev, count = now, 0, 0
          end
          -- a charge in any epoch (the units were used); a give-back only in the
          -- reservation's epoch, by no more than what of the reservation is still
          -- outstanding (its end, less what give-backs have moved the TAT back since it
          -- was made, minus now: the units before have drained, those after belong to
          -- later requests), and never before the epoch's start (the bucket is then full,
          -- and stays no fuller)
          local epoch = start - count
          if delta >= 0 or epoch == window_start then
            local was = start
            local per = limit < 1 and 1 or limit
            if delta >= 0 then
              -- no further than 2^53 us (285 years): past it the TAT is no longer exact,
              -- and its expiry is past what SET PX takes
              start = start + muldiv(delta, window, per, true)
              if start > P53 then
                start = P53
              end
            else
              local back = muldiv(-delta, window, per, true)
              local outstanding = sat_sub(sat_sub(reservation_end, prev), now)
              if back > outstanding then
                back = outstanding
              end
              start = sat_sub(start, back)
              if start < epoch then
                start = epoch
              end
              prev = prev + (was - start)
            end
            write(key, start, prev, start - epoch, g, start)
          end
        else
          -- the window the reservation counted in: the current one, or (sliding) the
          -- previous one; a delta moves its count, not below 0
          local moved
          if start == window_start then
            moved = count
          elseif alg == 0 and start == window_start + window then
            moved = prev
          end
          if moved then
            if delta >= 0 then
              -- no further than 2^53, past every limit (as a GCRA's TAT): `write` prints
              -- a count with `%d`, whose C long cannot hold one past 2^63
              moved = moved + delta
              if moved > P53 then
                moved = P53
              end
            else
              moved = moved > -delta and moved + delta or 0
            end
            if start == window_start then
              write(key, start, prev, moved, g)
            else
              write(key, start, moved, count, g)
            end
          end
        end
      end
    end
    return
  end

  -- A check or peek, in two passes: every rule decided, then, if all admit (or are in
  -- shadow), every allowed rule debited. `r` keeps what the second needs of each rule.
  local admitted = mode ~= 'p'
  local r = {}
  for i = 1, n do
    local cost, shadow
    alg, limit, window, burst, strict, cost, shadow =
      struct_unpack(CHECK_RULE, nums, 17 + (i - 1) * 56)
    strict = strict == 1
    if mode == 'p' then
      cost = 0
    end
    shadow = shadow == 1
    local s0, p0, c0, gen = load(KEYS[ko + i])
    local v, retry, rem, reset, ws, st, pr, co, exp, bs, bp, bc, re = decide(s0, p0, c0, cost)
    if v ~= 0 and not shadow then
      admitted = false
    end
    r[i] = { v, retry, rem, reset, ws, st, pr, co, exp, bs, bp, bc, gen, shadow, re, alg }
  end
  -- the rule `decide` reads: the last one read
  local ruled = n
  local at = #out + 1
  out[at] = pack('<i8i8', admitted and 1 or 0, now)
  for i = 1, n do
    local v, retry, rem, reset, ws, st, pr, co, exp, bs, bp, bc, gen, shadow, re, a =
      unpack(r[i])
    local debited = 0
    -- the state kept
    local ks, kp, kc = bs, bp, bc
    if v == 0 then
      if admitted then
        debited = 1
        ks, kp, kc = st, pr, co
        write(KEYS[ko + i], st, pr, co, gen, exp, a ~= 2)
      else
        -- nothing was debited: what is left is what a peek sees (GCRA rounds its remaining
        -- down, so adding the cost back could come out one short)
        if ruled ~= i then
          alg, limit, window, burst, strict = struct_unpack(CHECK_RULE, nums, 17 + (i - 1) * 56)
          strict = strict == 1
          ruled = i
        end
        local _, _, peeked = decide(bs, bp, bc, 0)
        rem = peeked
      end
    end
    -- `remaining` is what the kept state leaves now: one unit or more passes exactly when
    -- it is at least 1, so only an exhausted rule needs the second look: how long no request
    -- of any cost can pass it, 0 when one could pass now.
    local blocked = 0
    if mode == 'c' and not shadow and rem < 1 then
      if ruled ~= i then
        alg, limit, window, burst, strict = struct_unpack(CHECK_RULE, nums, 17 + (i - 1) * 56)
        strict = strict == 1
        ruled = i
      end
      local verdict, wait = decide(ks, kp, kc, 1)
      if verdict == 1 then
        blocked = wait
      end
    end
    out[at + i] = pack(ANSWER_RULE, v, retry, rem, reset, ws, debited, blocked, gen, re)
  end
end

local out = {}
local mode = ARGV[1]
if mode ~= 'b' then
  nums = ARGV[2]
  run(mode, 0, #KEYS, out)
else
  -- A batch: ARGV[2] calls, each as mode, key count and numbers (as ARGV[2] of a call
  -- alone), its keys following the previous call's in KEYS. They run one after another,
  -- each exactly as it would alone (one TIME for those on the server's clock), and each
  -- answer follows its length (-1 for a call that failed: its error fails it alone).
  local ko, base = 0, 2
  for _ = 1, tonumber(ARGV[2]) do
    local m, n = ARGV[base + 1], tonumber(ARGV[base + 2])
    nums = ARGV[base + 3]
    base = base + 3
    local answer = {}
    if pcall(run, m, ko, n, answer) then
      local text = table.concat(answer)
      out[#out + 1] = pack('<i8', #text / 8) .. text
    else
      out[#out + 1] = pack('<i8', -1)
    end
    ko = ko + n
  end
end

return table.concat(out)
