//! Fixed window: one counter per aligned window.
//!
//! Simple and exact within a window, but a client may spend `limit` at the end of one
//! window and `limit` again at the start of the next: up to 2 × limit in a span of one
//! window. Use the sliding window (strict, if it matters) to avoid that.

use super::{Decided, Params, State, Verdict, window_start};

#[inline]
pub(super) fn decide(params: &Params, state: &State, now: u64, cost: u64) -> Decided {
    let w = params.window;
    let start = window_start(now, w);
    let count = if state.start >= start { state.count } else { 0 };
    let start = start.max(state.start);
    let end = start.saturating_add(w);
    let reset = end.saturating_sub(now);
    let base = State {
        start,
        prev: 0,
        count,
    };
    let mut decided = Decided {
        verdict: Verdict::Allowed,
        state: base,
        remaining: params.limit.saturating_sub(count),
        reset,
        expires_at: end,
        window_start: start,
    };
    if cost > params.limit {
        decided.verdict = Verdict::Never;
    } else if count.saturating_add(cost) <= params.limit {
        decided.state.count = count + cost;
        decided.remaining = params.limit - count - cost;
    } else {
        decided.verdict = Verdict::Denied { retry_after: reset };
    }
    if decided.state.count == 0 {
        // Nothing counted in this window: the quota is whole now.
        decided.reset = 0;
    }
    decided
}
