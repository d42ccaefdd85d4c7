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
    // `remaining` is computed once, for the state the decision leaves behind.
    let remaining_before = || units_in(params, (now + tolerance).saturating_sub(tat));
    if cost > params.burst {
        decided.verdict = Verdict::Never;
        decided.remaining = remaining_before();
        return decided;
    }
    let new_tat = tat.saturating_add(increment(params, cost));
    if new_tat <= now.saturating_add(tolerance) {
        decided.state.start = new_tat;
        decided.remaining = units_in(params, now + tolerance - new_tat);
        decided.reset = new_tat - now;
        decided.expires_at = new_tat;
    } else {
        decided.verdict = Verdict::Denied {
            retry_after: new_tat - tolerance - now,
        };
        decided.remaining = remaining_before();
    }
    decided
}
