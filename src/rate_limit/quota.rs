//! Quotas (how many units per window) and the algorithms that enforce them.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How many units a key may spend per window, with an optional burst for GCRA.
///
/// The constructors read as they are spoken: `Quota::per_minute(20)` is 20 per minute.
///
/// ```
/// use std::time::Duration;
/// use palisade::rate_limit::Quota;
///
/// let q = Quota::per_minute(20);
/// assert_eq!(q.limit(), 20);
/// assert_eq!(q.window(), Duration::from_secs(60));
/// assert_eq!(Quota::per_hour(1000).with_burst(50).burst(), 50);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Quota {
    limit: u64,
    #[serde(with = "crate::config::duration")]
    window: Duration,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    burst: Option<u64>,
}

impl Quota {
    /// `limit` units per `window`.
    pub const fn new(limit: u64, window: Duration) -> Self {
        Self {
            limit,
            window,
            burst: None,
        }
    }

    /// `limit` units per second.
    pub const fn per_second(limit: u64) -> Self {
        Self::new(limit, Duration::from_secs(1))
    }

    /// `limit` units per minute.
    pub const fn per_minute(limit: u64) -> Self {
        Self::new(limit, Duration::from_secs(60))
    }

    /// `limit` units per hour.
    pub const fn per_hour(limit: u64) -> Self {
        Self::new(limit, Duration::from_secs(3600))
    }

    /// `limit` units per day.
    pub const fn per_day(limit: u64) -> Self {
        Self::new(limit, Duration::from_secs(86_400))
    }

    /// The burst GCRA allows (how many units may be spent at once after a quiet spell).
    /// Defaults to the limit. The window algorithms ignore it.
    #[must_use]
    pub const fn with_burst(mut self, burst: u64) -> Self {
        self.burst = Some(burst);
        self
    }

    /// Units per window.
    pub const fn limit(&self) -> u64 {
        self.limit
    }

    /// The window.
    pub const fn window(&self) -> Duration {
        self.window
    }

    /// The GCRA burst (the limit unless set).
    pub const fn burst(&self) -> u64 {
        match self.burst {
            Some(b) => b,
            None => self.limit,
        }
    }

    /// The window in whole microseconds (the store's time unit), at least 1.
    pub fn window_micros(&self) -> u64 {
        u64::try_from(self.window.as_micros())
            .unwrap_or(u64::MAX)
            .max(1)
    }
}

impl fmt::Display for Quota {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} per {}",
            self.limit,
            crate::config::duration::format(self.window)
        )
    }
}

/// Which algorithm enforces a quota.
///
/// | algorithm | state per key | bound in any span of one window | notes |
/// |---|---|---|---|
/// | `SlidingWindow` (default) | 3 integers | < 2 × limit (≤ limit when strict) | smooth, cheap, exact retry-after |
/// | `FixedWindow` | 2 integers | 2 × limit across an edge | simplest; resets at window edges |
/// | `Gcra` | 1 integer | limit + burst | a token bucket without a timer |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    /// The sliding-window counter: the previous window's count, weighted by how much of it
    /// still overlaps the sliding window, plus the current window's count.
    #[default]
    SlidingWindow,
    /// A counter per aligned window.
    FixedWindow,
    /// The generic cell rate algorithm (a token bucket kept as one timestamp).
    Gcra,
}

impl Algorithm {
    /// The snake_case name (`sliding_window`, `fixed_window`, `gcra`).
    pub const fn as_str(self) -> &'static str {
        match self {
            Algorithm::SlidingWindow => "sliding_window",
            Algorithm::FixedWindow => "fixed_window",
            Algorithm::Gcra => "gcra",
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
