//! The algorithms as pure functions over a small [`State`] and the time `now`.
//!
//! Time is an integer number of microseconds on the store's clock (the memory store counts
//! from its creation; a Redis store would use the server's `TIME`). Windows are aligned to
//! multiples of their length on that clock. Nothing here allocates, locks or reads a clock,
//! so the same arithmetic ports line for line to a Lua script and is easy to test with
//! proptest.
//!
//! ```
//! use palisade::rate_limit::{Algorithm, Quota};
//! use palisade::rate_limit::algorithm::{Params, State, Verdict, decide};
//!
//! let params = Params::new(Algorithm::SlidingWindow, Quota::per_second(2));
//! let mut state = State::default();
//! for _ in 0..2 {
//!     let d = decide(&params, &state, 0, 1);
//!     assert!(d.verdict.is_allowed());
//!     state = d.state;
//! }
//! // The third waits until the two weigh no more than one: half-way into the next second.
//! let d = decide(&params, &state, 0, 1);
//! assert_eq!(d.verdict, Verdict::Denied { retry_after: 1_500_000 });
//! ```

mod fixed_window;
mod gcra;
mod sliding_window;

use super::quota::{Algorithm, Quota};

/// The per-key state, the same three integers for every algorithm.
///
/// - sliding window: `start` of the current window, `prev` (count of the previous window),
///   `count` (count of the current window);
/// - fixed window: `start` and `count`;
/// - GCRA: `start` is the theoretical arrival time (TAT).
///
/// The default (all zero) is a key never seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct State {
    /// Window start (window algorithms) or theoretical arrival time (GCRA), in µs.
    pub start: u64,
    /// The previous window's count (sliding window only).
    pub prev: u64,
    /// The current window's count (window algorithms).
    pub count: u64,
}

/// Everything an algorithm needs about a rule, in the store's integer units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Params {
    /// Which algorithm.
    pub algorithm: Algorithm,
    /// Units per window.
    pub limit: u64,
    /// The window in µs (at least 1).
    pub window: u64,
    /// GCRA burst (units that may be spent at once); the limit by default.
    pub burst: u64,
    /// Sliding window only: count the whole previous window until it ends, so no span of
    /// one window ever admits more than `limit` (see [`sliding_window`](self)).
    pub strict: bool,
}

impl Params {
    /// Parameters for `algorithm` enforcing `quota`, not strict.
    pub fn new(algorithm: Algorithm, quota: Quota) -> Self {
        Self {
            algorithm,
            limit: quota.limit(),
            window: quota.window_micros(),
            burst: quota.burst(),
            strict: false,
        }
    }

    /// The same parameters in strict mode (sliding window only).
    #[must_use]
    pub const fn strict(mut self, strict: bool) -> Self {
        self.strict = strict;
        self
    }

    /// The largest cost a single request can ever be granted.
    pub const fn capacity(&self) -> u64 {
        match self.algorithm {
            Algorithm::Gcra => self.burst,
            _ => self.limit,
        }
    }
}

/// What the algorithm says about one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Admitted; the returned state includes its cost.
    Allowed,
    /// Refused for now; it would fit after `retry_after` µs (exact, assuming no other
    /// traffic).
    Denied {
        /// µs until the same request would be admitted.
        retry_after: u64,
    },
    /// The cost is larger than the rule's capacity: no wait will ever admit it.
    Never,
}

impl Verdict {
    /// Whether the request was admitted.
    pub const fn is_allowed(&self) -> bool {
        matches!(self, Verdict::Allowed)
    }
}

/// The result of [`decide`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decided {
    /// The verdict.
    pub verdict: Verdict,
    /// The state to store if the request is committed (for a refusal, the input state
    /// rolled forward to `now`, with nothing counted).
    pub state: State,
    /// Units left after this decision.
    pub remaining: u64,
    /// µs until the quota is fully restored if nothing else arrives (0 when it is whole):
    /// waiting this long admits any request the rule can ever admit. Fixed window: the
    /// current window's end; sliding window: the end of the window after the last one that
    /// counted units (the previous window's units weigh until the current one ends); GCRA:
    /// until the bucket is full again.
    pub reset: u64,
    /// The time (µs) after which the state equals a fresh one and may be forgotten.
    pub expires_at: u64,
    /// The window the cost was counted in (for [`settle`]).
    pub window_start: u64,
}

/// Decides whether a request of `cost` units fits, at time `now` (µs).
///
/// A cost of 0 is a peek: it is always allowed (even when a settlement has pushed the
/// state past the quota), counts nothing and reports the remaining units.
#[inline]
pub fn decide(params: &Params, state: &State, now: u64, cost: u64) -> Decided {
    let mut decided = match params.algorithm {
        Algorithm::SlidingWindow => sliding_window::decide(params, state, now, cost),
        Algorithm::FixedWindow => fixed_window::decide(params, state, now, cost),
        Algorithm::Gcra => gcra::decide(params, state, now, cost),
    };
    if cost == 0 {
        // A refusal's state is the input rolled forward with nothing counted, which is
        // exactly what a peek stores.
        decided.verdict = Verdict::Allowed;
    }
    decided
}

/// Adjusts a state after the fact by `delta` units (positive: more was used than reserved;
/// negative: less), for quantities known only after the response. `window_start` is
/// [`Decided::window_start`] of the reservation; a correction for a window that has already
/// slid out of the state is dropped.
pub fn settle(params: &Params, state: &State, window_start: u64, delta: i64) -> State {
    let mut s = *state;
    let apply = |v: u64| {
        if delta >= 0 {
            v.saturating_add(delta.unsigned_abs())
        } else {
            v.saturating_sub(delta.unsigned_abs())
        }
    };
    match params.algorithm {
        Algorithm::Gcra => {
            let step = gcra::increment(params, delta.unsigned_abs());
            s.start = if delta >= 0 {
                s.start.saturating_add(step)
            } else {
                s.start.saturating_sub(step)
            };
        }
        Algorithm::FixedWindow => {
            if s.start == window_start {
                s.count = apply(s.count);
            }
        }
        Algorithm::SlidingWindow => {
            if s.start == window_start {
                s.count = apply(s.count);
            } else if s.start == window_start.saturating_add(params.window) {
                s.prev = apply(s.prev);
            }
        }
    }
    s
}

/// The start of the window holding `now`.
const fn window_start(now: u64, window: u64) -> u64 {
    now - now % window
}

#[cfg(test)]
mod tests;
