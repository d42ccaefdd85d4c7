//! Jitter: how retry delays and the circuit breaker's open durations are randomised, so
//! that clients that failed together do not come back together.
//!
//! One type for both layers, parsed the same way from configuration and the environment,
//! and seeded the same way (`seed` in either layer's configuration) for reproducible
//! schedules.
//!
//! ```
//! use std::time::Duration;
//! use palisade::jitter::{Jitter, JitterRng};
//!
//! assert_eq!("full".parse::<Jitter>().unwrap(), Jitter::Full);
//! assert_eq!("0.2".parse::<Jitter>().unwrap(), Jitter::Spread(0.2));
//! assert!("sometimes".parse::<Jitter>().is_err());
//!
//! let d = Duration::from_secs(10);
//! let mut rng = JitterRng::seeded(7);
//! let spread = Jitter::Spread(0.2).apply(d, d, d, &mut rng);
//! assert!(spread >= Duration::from_secs(8) && spread <= Duration::from_secs(12));
//! assert_eq!(Jitter::None.apply(d, d, d, &mut rng), d);
//! ```

use std::fmt;
use std::str::FromStr;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// How a delay `d` is randomised.
///
/// | kind | delay | in configuration |
/// |---|---|---|
/// | `None` | `d` | `"none"` (or `"off"`) |
/// | `Full` | uniform in `[0, d]` | `"full"` |
/// | `Equal` | `d/2` plus uniform in `[0, d/2]` | `"equal"` |
/// | `Decorrelated` | uniform in `[base, 3 * max(base, previous)]` (AWS's "decorrelated jitter") | `"decorrelated"` |
/// | `Spread(r)` | `d` times uniform in `[1 − r, 1 + r]`, `r` a fraction in `[0, 1)` | a number, `0.2` |
///
/// Retry defaults to `Full`; the circuit breaker to `Spread(0.2)` (±20 %). A layer caps the
/// result after jitter (retry at `max_delay`, the breaker at `max_open_duration`).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
#[non_exhaustive]
pub enum Jitter {
    /// No randomness: exactly `d`.
    None,
    /// Uniform in `[0, d]`.
    #[default]
    Full,
    /// Half fixed, half random: uniform in `[d/2, d]`.
    Equal,
    /// Uniform in `[base, 3 * max(base, previous)]`.
    Decorrelated,
    /// `d` times uniform in `[1 − r, 1 + r]`: `Spread(0.2)` is ±20 %. `r` must be a
    /// fraction in `[0, 1)`: the layers' builders refuse others (see [`Jitter::check`]).
    Spread(f64),
}

/// The error of parsing a [`Jitter`].
///
/// ```
/// use palisade::jitter::Jitter;
/// let err = "sometimes".parse::<Jitter>().unwrap_err();
/// assert_eq!(
///     err.to_string(),
///     "unknown jitter `sometimes`: expected `full`, `equal`, `decorrelated`, `none` or a fraction in [0, 1) such as `0.2`"
/// );
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown jitter `{0}`: expected `full`, `equal`, `decorrelated`, `none` or a fraction in [0, 1) such as `0.2`"
)]
pub struct ParseJitterError(String);

impl Jitter {
    /// `Ok` unless this is a [`Jitter::Spread`] outside `[0, 1)` (or not a number): the
    /// spread, for the layer's configuration error.
    pub fn check(self) -> Result<(), f64> {
        match self {
            Jitter::Spread(r) if !(r.is_finite() && (0.0..1.0).contains(&r)) => Err(r),
            _ => Ok(()),
        }
    }

    /// The jittered form of `d`. `base` and `previous` are read by
    /// [`Jitter::Decorrelated`] only (the first delay, and the delay before this one).
    pub fn apply(
        self,
        d: Duration,
        base: Duration,
        previous: Duration,
        rng: &mut JitterRng,
    ) -> Duration {
        match self {
            Jitter::None => d,
            Jitter::Full => d.mul_f64(rng.unit()),
            Jitter::Equal => d / 2 + (d / 2).mul_f64(rng.unit()),
            Jitter::Decorrelated => {
                let high = previous.max(base).saturating_mul(3);
                base + (high - base).mul_f64(rng.unit())
            }
            Jitter::Spread(r) if r > 0.0 && r.is_finite() => {
                let r = r.min(1.0);
                // Saturating: a spread may lengthen `d` past `Duration::MAX`.
                Duration::try_from_secs_f64(d.as_secs_f64() * (1.0 - r + 2.0 * r * rng.unit()))
                    .unwrap_or(Duration::MAX)
            }
            Jitter::Spread(_) => d,
        }
    }
}

impl From<f64> for Jitter {
    /// A [`Jitter::Spread`] of `r` (`0.0` is no jitter).
    fn from(r: f64) -> Self {
        Jitter::Spread(r)
    }
}

impl FromStr for Jitter {
    type Err = ParseJitterError;

    fn from_str(s: &str) -> Result<Self, ParseJitterError> {
        let t = s.trim().to_ascii_lowercase();
        match t.as_str() {
            "none" | "off" => Ok(Jitter::None),
            "full" => Ok(Jitter::Full),
            "equal" => Ok(Jitter::Equal),
            "decorrelated" => Ok(Jitter::Decorrelated),
            // A number is a spread; its range is checked with the rest of the layer's
            // configuration (`Jitter::check`), so every mistake is reported at once.
            other => match other.parse::<f64>() {
                Ok(r) if r.is_finite() => Ok(Jitter::Spread(r)),
                _ => Err(ParseJitterError(s.trim().to_owned())),
            },
        }
    }
}

impl fmt::Display for Jitter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Jitter::None => f.write_str("none"),
            Jitter::Full => f.write_str("full"),
            Jitter::Equal => f.write_str("equal"),
            Jitter::Decorrelated => f.write_str("decorrelated"),
            Jitter::Spread(r) => write!(f, "{r}"),
        }
    }
}

/// A name (`"full"`) or a number (`0.2`, a spread).
impl Serialize for Jitter {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Jitter::Spread(r) => serializer.serialize_f64(*r),
            other => serializer.collect_str(other),
        }
    }
}

impl<'de> Deserialize<'de> for Jitter {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr {
            Number(f64),
            Name(String),
        }
        match Repr::deserialize(deserializer)? {
            Repr::Number(r) => Ok(Jitter::Spread(r)),
            Repr::Name(s) => s.parse().map_err(serde::de::Error::custom),
        }
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

    /// Seeded when `seed` is given, else the thread-local generator: what a layer's `seed`
    /// setting makes.
    pub fn from_seed(seed: Option<u64>) -> Self {
        seed.map_or_else(Self::thread, Self::seeded)
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
/// only when a delay is drawn) or thread-local.
#[derive(Debug)]
pub(crate) struct SharedRng(Option<Mutex<JitterRng>>);

impl SharedRng {
    pub(crate) fn new(seed: Option<u64>) -> Self {
        Self(seed.map(|s| Mutex::new(JitterRng::seeded(s))))
    }

    /// Runs `f` with the layer's generator.
    pub(crate) fn with<R>(&self, f: impl FnOnce(&mut JitterRng) -> R) -> R {
        match &self.0 {
            Some(rng) => f(&mut rng.lock().unwrap_or_else(PoisonError::into_inner)),
            None => f(&mut JitterRng::thread()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn parses_and_prints_names_and_spreads() {
        for j in [
            Jitter::None,
            Jitter::Full,
            Jitter::Equal,
            Jitter::Decorrelated,
            Jitter::Spread(0.2),
            Jitter::Spread(0.0),
        ] {
            assert_eq!(j.to_string().parse::<Jitter>(), Ok(j));
            let json = serde_json::to_string(&j).unwrap();
            assert_eq!(serde_json::from_str::<Jitter>(&json).unwrap(), j, "{json}");
        }
        assert_eq!(" Off ".parse::<Jitter>(), Ok(Jitter::None));
        assert_eq!(serde_json::to_string(&Jitter::Equal).unwrap(), r#""equal""#);
        assert_eq!(serde_json::to_string(&Jitter::Spread(0.2)).unwrap(), "0.2");
        for bad in ["sometimes", "NaN", "inf", ""] {
            assert!(bad.parse::<Jitter>().is_err(), "{bad}");
        }
        // A number parses; its range is the configuration's check.
        assert_eq!("1.5".parse::<Jitter>(), Ok(Jitter::Spread(1.5)));
        assert_eq!(Jitter::Spread(1.5).check(), Err(1.5));
        assert_eq!(Jitter::Spread(-0.1).check(), Err(-0.1));
        assert_eq!(Jitter::Spread(1.0).check(), Err(1.0));
        assert_eq!(Jitter::Full.check(), Ok(()));
    }

    /// Retry and the breaker read the same values for their `JITTER` variables, and refuse
    /// the same spreads.
    #[test]
    fn both_layers_read_jitter_from_the_environment_alike() {
        use crate::circuit_breaker::CircuitBreakerConfig;
        use crate::config::Env;
        use crate::retry::RetryConfig;
        for (value, want) in [
            ("full", Jitter::Full),
            ("none", Jitter::None),
            ("0.3", Jitter::Spread(0.3)),
        ] {
            let mut env = Env::from_pairs([
                ("PALISADE_RETRY_JITTER", value),
                ("PALISADE_CIRCUIT_BREAKER_JITTER", value),
            ]);
            let retry = RetryConfig::from_env(&mut env);
            let breaker = CircuitBreakerConfig::from_env(&mut env);
            env.finish().unwrap();
            assert_eq!((retry.jitter, breaker.jitter), (want, want), "{value}");
        }
        let mut env = Env::from_pairs([
            ("PALISADE_RETRY_JITTER", "1.5"),
            ("PALISADE_CIRCUIT_BREAKER_JITTER", "1.5"),
        ]);
        let _ = RetryConfig::from_env(&mut env);
        let _ = CircuitBreakerConfig::from_env(&mut env);
        let err = env.finish().unwrap_err();
        let names: Vec<&str> = err.problems().iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            ["PALISADE_RETRY_JITTER", "PALISADE_CIRCUIT_BREAKER_JITTER"],
            "{err}"
        );
    }

    #[test]
    fn each_kind_stays_in_its_range() {
        let (d, base, previous) = (ms(1000), ms(100), ms(400));
        for seed in 0..200 {
            let mut rng = JitterRng::seeded(seed);
            assert_eq!(Jitter::None.apply(d, base, previous, &mut rng), d);
            assert!(Jitter::Full.apply(d, base, previous, &mut rng) <= d);
            let equal = Jitter::Equal.apply(d, base, previous, &mut rng);
            assert!(equal >= d / 2 && equal <= d);
            let dec = Jitter::Decorrelated.apply(d, base, previous, &mut rng);
            assert!(dec >= base && dec <= previous * 3);
            let spread = Jitter::Spread(0.2).apply(d, base, previous, &mut rng);
            assert!(spread >= ms(800) && spread <= ms(1200), "{spread:?}");
            assert_eq!(Jitter::Spread(0.0).apply(d, base, previous, &mut rng), d);
        }
    }

    /// A spread can lengthen a delay past its nominal value; on a very long delay (a
    /// `max_delay` of `Duration::MAX`, which the retry configuration accepts) that must
    /// saturate, not panic in the middle of a request.
    #[test]
    fn a_spread_of_a_very_long_delay_saturates() {
        for seed in 0..50 {
            let mut rng = JitterRng::seeded(seed);
            let d = Jitter::Spread(0.5).apply(Duration::MAX, ms(1), Duration::MAX, &mut rng);
            assert!(d >= Duration::MAX / 2, "{d:?}");
        }
        let backoff = crate::retry::Backoff::new(ms(500), 2.0, Duration::MAX, Jitter::Spread(0.5));
        let mut rng = JitterRng::seeded(1);
        for n in [0, 10, 100, 1000] {
            assert!(backoff.delay(n, Duration::ZERO, &mut rng) <= Duration::MAX);
        }
    }

    #[test]
    fn a_seed_gives_the_same_schedule() {
        let draw = |rng: &mut JitterRng| {
            (0..8)
                .map(|_| Jitter::Spread(0.5).apply(ms(1000), ms(0), ms(0), rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            draw(&mut JitterRng::from_seed(Some(3))),
            draw(&mut JitterRng::seeded(3))
        );
        let shared = SharedRng::new(Some(3));
        let from_shared: Vec<_> = (0..8)
            .map(|_| shared.with(|rng| Jitter::Spread(0.5).apply(ms(1000), ms(0), ms(0), rng)))
            .collect();
        assert_eq!(from_shared, draw(&mut JitterRng::seeded(3)));
    }
}
