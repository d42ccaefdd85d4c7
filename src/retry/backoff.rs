//! Exponential backoff with jitter.

use std::fmt;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};

/// How the computed delay is randomised, so that clients that failed together do not
/// retry together.
///
/// With `d = min(max_delay, base * factor^n)` for the `n`-th retry (counting from 0):
///
/// | kind | delay |
/// |---|---|
/// | `None` | `d` |
/// | `Full` (default) | uniform in `[0, d]` |
/// | `Equal` | `d/2` plus uniform in `[0, d/2]` |
/// | `Decorrelated` | uniform in `[base, 3 * previous delay]` (AWS's "decorrelated jitter") |
///
/// Whatever the kind, the result is capped at `max_delay` after jitter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Jitter {
    /// No randomness: exactly `base * factor^n`, capped.
    None,
    /// Uniform in `[0, d]` (the default).
    #[default]
    Full,
    /// Half fixed, half random: uniform in `[d/2, d]`.
    Equal,
    /// Uniform in `[base, 3 * previous delay]`, capped.
    Decorrelated,
}

/// The error of parsing a [`Jitter`].
///
/// ```
/// use palisade::retry::Jitter;
/// let err = "sometimes".parse::<Jitter>().unwrap_err();
/// assert_eq!(err.to_string(), "unknown jitter `sometimes`: expected `full`, `equal`, `decorrelated` or `none`");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown jitter `{0}`: expected `full`, `equal`, `decorrelated` or `none`")]
pub struct ParseJitterError(String);

impl FromStr for Jitter {
    type Err = ParseJitterError;

    fn from_str(s: &str) -> Result<Self, ParseJitterError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "none" | "off" => Ok(Jitter::None),
            "full" => Ok(Jitter::Full),
            "equal" => Ok(Jitter::Equal),
            "decorrelated" => Ok(Jitter::Decorrelated),
            other => Err(ParseJitterError(other.to_owned())),
        }
    }
}

impl fmt::Display for Jitter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Jitter::None => "none",
            Jitter::Full => "full",
            Jitter::Equal => "equal",
            Jitter::Decorrelated => "decorrelated",
        })
    }
}

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
        let d = self.nominal(n);
        let jittered = match self.jitter {
            Jitter::None => d,
            Jitter::Full => d.mul_f64(rng.unit()),
            Jitter::Equal => d / 2 + (d / 2).mul_f64(rng.unit()),
            Jitter::Decorrelated => {
                let low = self.base;
                let high = previous.max(self.base).saturating_mul(3);
                low + (high - low).mul_f64(rng.unit())
            }
        };
        jittered.min(self.max_delay)
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

/// The source of randomness for jitter: the thread-local generator, or a seeded one for
/// reproducible schedules (tests, simulations).
#[derive(Debug)]
pub struct JitterRng {
    seeded: Option<StdRng>,
}

impl JitterRng {
    /// The thread-local generator (`rand::rng()`).
    pub fn thread() -> Self {
        Self { seeded: None }
    }

    /// A deterministic generator from `seed`.
    pub fn seeded(seed: u64) -> Self {
        Self {
            seeded: Some(StdRng::seed_from_u64(seed)),
        }
    }

    /// A uniform number in `[0, 1]`.
    pub fn unit(&mut self) -> f64 {
        match &mut self.seeded {
            Some(rng) => rng.random_range(0.0..=1.0),
            None => rand::rng().random_range(0.0..=1.0),
        }
    }
}

/// A jitter source shared by every request of one layer: seeded (behind a mutex, taken
/// only when a retry is scheduled) or thread-local.
#[derive(Debug)]
pub(crate) struct SharedRng(Option<Mutex<JitterRng>>);

impl SharedRng {
    pub(crate) fn new(seed: Option<u64>) -> Self {
        Self(seed.map(|s| Mutex::new(JitterRng::seeded(s))))
    }

    pub(crate) fn delay(&self, backoff: &Backoff, n: u32, previous: Duration) -> Duration {
        match &self.0 {
            Some(rng) => {
                let mut rng = rng.lock().unwrap_or_else(|e| e.into_inner());
                backoff.delay(n, previous, &mut rng)
            }
            None => backoff.delay(n, previous, &mut JitterRng::thread()),
        }
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

    #[test]
    fn jitter_parses_and_prints() {
        for j in [
            Jitter::None,
            Jitter::Full,
            Jitter::Equal,
            Jitter::Decorrelated,
        ] {
            assert_eq!(j.to_string().parse::<Jitter>(), Ok(j));
        }
        assert!("sometimes".parse::<Jitter>().is_err());
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
                }
            }
        }
    }
}
