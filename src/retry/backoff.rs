//! Exponential backoff with jitter.

use std::time::Duration;

pub use crate::jitter::{Jitter, JitterRng};

/// An exponential backoff schedule: `base * factor^n`, jittered, then capped at
/// `max_delay`.
///
/// ```
/// use std::time::Duration;
/// use palisade::retry::{Backoff, Jitter};
///
/// let backoff = Backoff::new(Duration::from_millis(100), 2.0, Duration::from_secs(1), Jitter::None);
/// let mut rng = palisade::retry::JitterRng::seeded(7);
/// let delays: Vec<_> = (0..5)
///     .map(|n| backoff.delay(n, Duration::ZERO, &mut rng).as_millis())
///     .collect();
/// assert_eq!(delays, [100, 200, 400, 800, 1000]);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    base: Duration,
    factor: f64,
    max_delay: Duration,
    jitter: Jitter,
}

impl Backoff {
    /// A schedule. `factor` below 1 or not finite is treated as 1 (the builders refuse
    /// such values with an error before they get here).
    pub fn new(base: Duration, factor: f64, max_delay: Duration, jitter: Jitter) -> Self {
        let factor = if factor.is_finite() && factor >= 1.0 {
            factor
        } else {
            1.0
        };
        Self {
            base,
            factor,
            max_delay,
            jitter,
        }
    }

    /// The first delay before jitter.
    pub fn base(&self) -> Duration {
        self.base
    }

    /// The growth factor.
    pub fn factor(&self) -> f64 {
        self.factor
    }

    /// The cap, applied after jitter.
    pub fn max_delay(&self) -> Duration {
        self.max_delay
    }

    /// The jitter kind.
    pub fn jitter(&self) -> Jitter {
        self.jitter
    }

    /// The un-jittered delay before retry `n` (0-based): `min(max_delay, base * factor^n)`.
    pub fn nominal(&self, n: u32) -> Duration {
        let exp = i32::try_from(n).unwrap_or(i32::MAX);
        let secs = self.base.as_secs_f64() * self.factor.powi(exp);
        let cap = self.max_delay.as_secs_f64();
        if !secs.is_finite() || secs >= cap {
            self.max_delay
        } else {
            Duration::from_secs_f64(secs.max(0.0))
        }
    }

    /// The delay before retry `n` (0-based). `previous` is the delay used before the
    /// previous retry (only [`Jitter::Decorrelated`] reads it; pass `Duration::ZERO` for the
    /// first retry).
    pub fn delay(&self, n: u32, previous: Duration, rng: &mut JitterRng) -> Duration {
        self.jitter
            .apply(self.nominal(n), self.base, previous, rng)
            .min(self.max_delay)
    }
}

impl Default for Backoff {
    /// 500 ms doubling up to 8 s with full jitter (the Anthropic SDKs' schedule).
    fn default() -> Self {
        Self::new(
            Duration::from_millis(500),
            2.0,
            Duration::from_secs(8),
            Jitter::Full,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn nominal_schedule_grows_and_caps() {
        let b = Backoff::new(ms(100), 3.0, ms(2000), Jitter::None);
        let got: Vec<u128> = (0..6).map(|n| b.nominal(n).as_millis()).collect();
        assert_eq!(got, [100, 300, 900, 2000, 2000, 2000]);
        // huge exponents saturate at the cap instead of overflowing
        assert_eq!(b.nominal(u32::MAX), ms(2000));
    }

    #[test]
    fn invalid_factor_is_treated_as_one() {
        let b = Backoff::new(ms(100), f64::NAN, ms(2000), Jitter::None);
        assert_eq!(b.nominal(5), ms(100));
        let b = Backoff::new(ms(100), 0.5, ms(2000), Jitter::None);
        assert_eq!(b.factor(), 1.0);
    }

    #[test]
    fn seeded_rng_is_reproducible() {
        let b = Backoff::new(ms(100), 2.0, ms(10_000), Jitter::Full);
        let run = |seed| {
            let mut rng = JitterRng::seeded(seed);
            (0..8)
                .map(|n| b.delay(n, Duration::ZERO, &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(42), run(42));
        assert_ne!(run(42), run(43));
    }

    proptest! {
        #[test]
        fn delays_stay_within_bounds(
            base_ms in 0u64..5_000,
            factor in 1.0f64..10.0,
            cap_ms in 0u64..60_000,
            n in 0u32..64,
            prev_ms in 0u64..120_000,
            seed in any::<u64>(),
        ) {
            let mut rng = JitterRng::seeded(seed);
            let prev = ms(prev_ms);
            for jitter in [Jitter::None, Jitter::Full, Jitter::Equal, Jitter::Decorrelated] {
                let b = Backoff::new(ms(base_ms), factor, ms(cap_ms), jitter);
                let d = b.delay(n, prev, &mut rng);
                let nominal = b.nominal(n);
                // never above the cap (and never negative: Duration cannot be)
                prop_assert!(d <= ms(cap_ms), "{jitter}: {d:?} > cap {cap_ms}ms");
                match jitter {
                    Jitter::None => prop_assert_eq!(d, nominal),
                    Jitter::Full => prop_assert!(d <= nominal),
                    Jitter::Equal => prop_assert!(d >= nominal / 2 && d <= nominal),
                    Jitter::Decorrelated => {
                        let high = prev.max(ms(base_ms)) * 3;
                        prop_assert!(d <= high.min(ms(cap_ms)));
                        prop_assert!(d >= ms(base_ms).min(ms(cap_ms)));
                    }
                    _ => unreachable!("only the four kinds above are drawn"),
                }
            }
        }
    }
}
