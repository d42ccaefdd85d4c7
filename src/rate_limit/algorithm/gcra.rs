//! GCRA, the generic cell rate algorithm: a token bucket kept as one timestamp.
//!
//! Each unit advances the theoretical arrival time (TAT) by the emission interval
//! `window / limit`; a request is admitted while its new TAT is at most `burst` intervals
//! ahead of now. The bucket refills continuously, so there are no window edges; any span
//! of one window admits at most `limit + burst` units.

use super::{Decided, Params, State, Verdict};

/// µs that `units` advance the TAT: `ceil(units × window / limit)`.
pub(super) fn increment(params: &Params, units: u64) -> u64 {
    let limit = params.limit.max(1);
    if let Some(num) = units.checked_mul(params.window) {
        return num.div_ceil(limit);
    }
    let num = u128::from(units) * u128::from(params.window);
    u64::try_from(num.div_ceil(u128::from(limit))).unwrap_or(u64::MAX)
}

/// Whole units that fit in `micros` of slack: `floor(micros × limit / window)`.
fn units_in(params: &Params, micros: u64) -> u64 {
    if let Some(num) = micros.checked_mul(params.limit) {
        return num / params.window;
    }
    let num = u128::from(micros) * u128::from(params.limit);
    u64::try_from(num / u128::from(params.window)).unwrap_or(u64::MAX)
}

#[inline]
pub(super) fn decide(params: &Params, state: &State, now: u64, cost: u64) -> Decided {
    let tolerance = increment(params, params.burst);
    let tat = state.start.max(now);
    let base = State {
        start: tat,
        prev: 0,
        count: 0,
    };
    let mut decided = Decided {
        verdict: Verdict::Allowed,
        state: base,
        remaining: 0,
        reset: tat - now,
        expires_at: tat,
        window_start: 0,
    };
    // The latest TAT that still admits, and TATs, in u128: a huge burst's horizon or a TAT
    // plus a long increment can pass u64::MAX, and saturating there would admit.
    let horizon = u128::from(now) + u128::from(tolerance);
    let sat = |v: u128| u64::try_from(v).unwrap_or(u64::MAX);
    let remaining_before = || units_in(params, sat(horizon.saturating_sub(u128::from(tat))));
    if cost > params.burst {
        decided.verdict = Verdict::Never;
        decided.remaining = remaining_before();
        return decided;
    }
    let new_tat = u128::from(tat) + u128::from(increment(params, cost));
    if new_tat <= horizon {
        let new_tat = sat(new_tat);
        decided.state.start = new_tat;
        decided.remaining = units_in(params, sat(horizon - u128::from(new_tat)));
        decided.reset = new_tat - now;
        decided.expires_at = new_tat;
    } else {
        decided.verdict = Verdict::Denied {
            retry_after: sat(new_tat - horizon),
        };
        decided.remaining = remaining_before();
    }
    decided
}
