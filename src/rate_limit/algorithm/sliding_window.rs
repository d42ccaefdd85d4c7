//! The sliding-window counter.
//!
//! The estimate at time `now`, a fraction `e / W` into the current window, is
//! `prev × (W − e) / W + count`: the previous window's count weighted by the part of it the
//! sliding window still covers. A request of cost `k` is admitted when
//! `estimate + k ≤ limit`, checked *before* counting, so refused requests never count. All
//! arithmetic is exact integer arithmetic (`prev × (W − e) + (count + k) × W ≤ limit × W`).
//!
//! **Bound.** The weighting assumes the previous window's requests were spread evenly.
//! If they all came at its very end, a span of one window straddling the edge can hold up
//! to (but less than) `2 × limit`. **Strict mode** counts the previous window in full until
//! it has completely slid out (`prev + count + k ≤ limit`), which guarantees at most
//! `limit` in *any* span of one window, at the cost of admitting less after a busy window.
//!
//! The wait returned for a refusal is exact: the first instant at which the same request
//! would be admitted if nothing else arrives.

use super::{Decided, Params, State, Verdict, window_start};

#[inline]
pub(super) fn decide(params: &Params, state: &State, now: u64, cost: u64) -> Decided {
    let w = params.window;
    let limit = params.limit;
    let aligned = window_start(now, w);
    let (start, prev, count) = if state.start >= aligned {
        (state.start, state.prev, state.count)
    } else if state.start.checked_add(w) == Some(aligned) {
        (aligned, state.count, 0)
    } else {
        (aligned, 0, 0)
    };
    let elapsed = now.saturating_sub(start).min(w - 1);
    let remaining_after = |count: u64| -> u64 {
        if params.strict {
            limit.saturating_sub(prev.saturating_add(count))
        } else {
            // floor((limit × W − prev × (W − e)) / W) − count
            //   = limit − ceil(prev × (W − e) / W) − count
            let weighted = mul_div_ceil(prev, w - elapsed, w);
            limit.saturating_sub(weighted).saturating_sub(count)
        }
    };
    // Units left after admitting `k` more, or `None` when `k` does not fit. Computed from
    // the products the check itself forms, so an admission does not share the refusals'
    // `remaining_after` and a caller that never reads `remaining` (a layer without headers)
    // drops this division once the decision is inlined.
    let admit = |k: u64| -> Option<u64> {
        // Counts can exceed the limit after a large settlement: past u64 nothing fits.
        let total = count.checked_add(k)?;
        if params.strict {
            let used = prev.checked_add(total)?;
            return (used <= limit).then(|| limit - used);
        }
        // prev × (W − e) + (count + k) × W ≤ limit × W; then what is left is
        // floor((limit × W − used) / W) = limit − ceil(prev × (W − e) / W) − count − k.
        if let (Some(used), Some(cap)) = (
            prev.checked_mul(w - elapsed)
                .and_then(|u| u.checked_add(total.checked_mul(w)?)),
            limit.checked_mul(w),
        ) {
            return (used <= cap).then(|| (cap - used) / w);
        }
        let used = (u128::from(prev) * u128::from(w - elapsed))
            .checked_add(u128::from(total) * u128::from(w))?;
        let cap = u128::from(limit) * u128::from(w);
        (used <= cap).then(|| u64::try_from((cap - used) / u128::from(w)).unwrap_or(u64::MAX))
    };
    let mut decided = Decided {
        verdict: Verdict::Allowed,
        state: State { start, prev, count },
        remaining: 0,
        reset: 0,
        expires_at: start.saturating_add(w.saturating_mul(2)),
        window_start: start,
    };
    if cost > limit {
        decided.verdict = Verdict::Never;
        decided.remaining = remaining_after(count);
    } else if let Some(left) = admit(cost) {
        decided.state.count = count + cost;
        decided.remaining = left;
    } else {
        decided.verdict = Verdict::Denied {
            retry_after: wait(params, prev, count, cost, elapsed),
        };
        decided.remaining = remaining_after(count);
    }
    decided.reset = restored_in(&decided.state, w, now);
    decided
}

/// µs from `now` until `state` weighs nothing: the current window's units count until the
/// end of the next window (where they are the previous window, weighted down to zero), the
/// previous window's until the end of the current one.
#[inline]
fn restored_in(state: &State, w: u64, now: u64) -> u64 {
    let until = if state.count > 0 {
        state.start.saturating_add(w.saturating_mul(2))
    } else if state.prev > 0 {
        state.start.saturating_add(w)
    } else {
        return 0;
    };
    until.saturating_sub(now)
}

/// µs from `elapsed` (into the current window) until a request of `cost` fits.
fn wait(params: &Params, prev: u64, count: u64, cost: u64, elapsed: u64) -> u64 {
    let w = params.window;
    let limit = params.limit;
    let to_next = w - elapsed;
    // This window's count with the request, when it is within the limit.
    let total = count.checked_add(cost).filter(|t| *t <= limit);
    if params.strict {
        // The previous window drops out at the next edge; the current one a window later.
        return if total.is_some() {
            to_next
        } else {
            to_next.saturating_add(w)
        };
    }
    // First e' with p × (W − e') ≤ x × W, that is W − e' ≤ floor(x × W / p).
    let first_fit = |p: u64, x: u64| -> u64 {
        if p == 0 {
            return 0;
        }
        let slack = u128::from(x) * u128::from(w) / u128::from(p);
        w - u64::try_from(slack.min(u128::from(w))).unwrap_or(w)
    };
    if let Some(total) = total {
        // Fits later in this window as the previous window's weight shrinks.
        first_fit(prev, limit - total).max(elapsed + 1) - elapsed
    } else {
        // Not before the next window, where this window becomes the previous one.
        to_next.saturating_add(first_fit(count, limit - cost))
    }
}

/// `ceil(a × b / c)`, in u64 when it fits.
///
/// `c` is a window length (at least 1); the early return for 0 also tells the compiler the
/// division cannot fault, so a caller that drops the result (a layer without headers
/// does not read `remaining`) does not pay for it.
#[inline]
fn mul_div_ceil(a: u64, b: u64, c: u64) -> u64 {
    if a == 0 || c == 0 {
        return 0;
    }
    match a.checked_mul(b) {
        Some(p) => p.div_ceil(c),
        None => u64::try_from((u128::from(a) * u128::from(b)).div_ceil(u128::from(c)))
            .unwrap_or(u64::MAX),
    }
}
