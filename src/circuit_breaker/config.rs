//! Configuration of a circuit breaker: serde, environment variables and validation.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::clock::ClockSource;
use crate::config::{
    ConfigError, Env, FieldMistake, env_var, field_problem, parse_optional,
    parse_optional_duration, record_mistakes,
};
use crate::jitter::Jitter;

/// The prefix of the breaker's environment variables.
pub(super) const PREFIX: &str = "PALISADE_CIRCUIT_BREAKER";

/// Which calls the breaker judges the upstream by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WindowKind {
    /// The last `window_size` calls (a sliding ring of outcomes).
    #[default]
    Count,
    /// The calls of the last `window_size` seconds (one bucket per second).
    Time,
}

/// Configuration of one circuit breaker.
///
/// Every field has a default suited to an LLM upstream; see the field docs. Build a layer
/// with [`CircuitBreakerConfig::build`] (or [`CircuitBreakerLayer::from_config`]), which
/// validates the values first.
///
/// ```
/// use palisade::circuit_breaker::{CircuitBreakerConfig, WindowKind};
///
/// let cfg: CircuitBreakerConfig = toml::from_str(r#"
///     window_kind = "time"
///     window_size = 30
///     failure_rate_threshold = 0.25
///     open_duration = "5s"
/// "#).unwrap();
/// assert_eq!(cfg.window_kind, WindowKind::Time);
/// let layer = cfg.build().unwrap();
/// assert_eq!(layer.handle().state(), palisade::circuit_breaker::CircuitState::Closed);
/// ```
///
/// [`CircuitBreakerLayer::from_config`]: super::CircuitBreakerLayer::from_config
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct CircuitBreakerConfig {
    /// A name for logs, callbacks and health reports (default `"default"`).
    pub name: String,
    /// Count or time window (default count).
    pub window_kind: WindowKind,
    /// Calls (count window) or seconds (time window) in the window (default 100).
    pub window_size: u32,
    /// Open when this fraction of the calls in the window failed, from 0 (exclusive) to 1
    /// (default 0.5).
    pub failure_rate_threshold: f64,
    /// A call longer than this is slow; `None` turns the slow-call rule off (the default:
    /// LLM calls are often long by nature).
    #[serde(with = "crate::config::duration::option")]
    pub slow_call_duration: Option<Duration>,
    /// Open when this fraction of the calls in the window were slow, from 0 (exclusive) to
    /// 1 (default 1.0).
    pub slow_call_rate_threshold: f64,
    /// The rates are only judged once the window holds this many calls (default 20).
    pub minimum_calls: u32,
    /// Also open after this many failures in a row, whatever the window says (default off).
    pub consecutive_failures: Option<u32>,
    /// How long the circuit stays open the first time (default 10 s).
    #[serde(with = "crate::config::duration")]
    pub open_duration: Duration,
    /// The open duration never grows beyond this (default 5 min).
    #[serde(with = "crate::config::duration")]
    pub max_open_duration: Duration,
    /// Each failed half-open attempt multiplies the open duration by this (default 2.0).
    pub backoff_multiplier: f64,
    /// How each open duration is randomised (default [`Jitter::Spread`]`(0.2)`, ±20 %):
    /// the same [`Jitter`] as retry's, so `"0.2"`, `"full"` or `"none"` in configuration.
    pub jitter: Jitter,
    /// How many probe calls half-open lets through; all must succeed to close (default 3).
    pub half_open_probes: u32,
    /// Half-open goes back to open if no probe has succeeded within this time and none is
    /// still in flight (default 60 s; `None` waits for ever). A success is kept until the
    /// probes decide, however long the next call takes to come. A probe in flight is
    /// always waited for, however long it takes (a non-streamed LLM call can take
    /// minutes); bound a hung call with a per-attempt timeout on the client (for example
    /// [`RetryLayerBuilder::attempt_timeout`](crate::retry::RetryLayerBuilder::attempt_timeout)),
    /// which drops it and gives its probe slot back.
    #[serde(with = "crate::config::duration::option")]
    pub max_wait_in_half_open: Option<Duration>,
    /// Where the breaker reads time (default [`ClockSource::Tokio`], which tests can
    /// pause). [`ClockSource::Coarse`] makes a time window's closed path about one clock
    /// read cheaper, with buckets and call durations late by up to about a millisecond.
    pub clock: ClockSource,
    /// A seed for the open durations' jitter, for reproducible schedules (default none:
    /// the thread's generator).
    pub seed: Option<u64>,
}

impl Default for CircuitBreakerConfig {
    fn default() -> Self {
        Self {
            name: "default".to_owned(),
            window_kind: WindowKind::Count,
            window_size: 100,
            failure_rate_threshold: 0.5,
            slow_call_duration: None,
            slow_call_rate_threshold: 1.0,
            minimum_calls: 20,
            consecutive_failures: None,
            open_duration: Duration::from_secs(10),
            max_open_duration: Duration::from_secs(300),
            backoff_multiplier: 2.0,
            jitter: Jitter::Spread(0.2),
            half_open_probes: 3,
            max_wait_in_half_open: Some(Duration::from_secs(60)),
            clock: ClockSource::Tokio,
            seed: None,
        }
    }
}

/// The largest count window (calls) and time window (seconds).
pub const MAX_COUNT_WINDOW: u32 = (1 << 20) - 1;
/// The largest time window, in seconds (one hour).
pub const MAX_TIME_WINDOW_SECS: u32 = 3600;
/// The most half-open probes.
pub const MAX_HALF_OPEN_PROBES: u32 = u16::MAX as u32;

/// A circuit breaker configuration that cannot work.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum CircuitBreakerConfigError {
    /// The window holds no calls, or more than the breaker supports.
    #[error("window_size must be between 1 and {max} for a {kind:?} window, got {got}")]
    WindowSize {
        /// The window kind.
        kind: WindowKind,
        /// The size given.
        got: u32,
        /// The largest size allowed.
        max: u32,
    },
    /// A rate threshold is not a fraction in `(0, 1]`.
    #[error("{field} must be a fraction in (0, 1], got {got}")]
    Threshold {
        /// `failure_rate_threshold` or `slow_call_rate_threshold`.
        field: &'static str,
        /// The value given.
        got: f64,
    },
    /// `minimum_calls` is 0, or larger than a count window, so the breaker could never trip.
    #[error("minimum_calls must be between 1 and the count window size ({window}), got {got}")]
    MinimumCalls {
        /// The value given.
        got: u32,
        /// The count window size (or `u32::MAX` for time windows).
        window: u32,
    },
    /// `consecutive_failures` is `Some(0)`.
    #[error("consecutive_failures must be at least 1 when set")]
    ConsecutiveFailures,
    /// A duration that must be positive is zero, or the cap is below the base.
    #[error("{field} is invalid: {reason}")]
    Duration {
        /// The field.
        field: &'static str,
        /// What is wrong.
        reason: &'static str,
    },
    /// `backoff_multiplier` is below 1 or not finite.
    #[error("backoff_multiplier must be a finite number >= 1, got {0}")]
    Multiplier(f64),
    /// `jitter` is a [`Jitter::Spread`] outside `[0, 1)`.
    #[error("a jitter spread must be a fraction in [0, 1), got {0}")]
    Jitter(f64),
    /// `half_open_probes` is 0 or too large.
    #[error("half_open_probes must be between 1 and {MAX_HALF_OPEN_PROBES}, got {0}")]
    HalfOpenProbes(u32),
    /// A registry was asked to hold no breakers.
    #[error("a circuit breaker registry must hold at least one breaker")]
    RegistrySize,
}

impl CircuitBreakerConfigError {
    /// The configuration field at fault (its serde name), for example `"window_size"`.
    pub fn field(&self) -> &'static str {
        match self {
            Self::WindowSize { .. } => "window_size",
            Self::Threshold { field, .. } | Self::Duration { field, .. } => field,
            Self::MinimumCalls { .. } => "minimum_calls",
            Self::ConsecutiveFailures => "consecutive_failures",
            Self::Multiplier(_) => "backoff_multiplier",
            Self::Jitter(_) => "jitter",
            Self::HalfOpenProbes(_) => "half_open_probes",
            Self::RegistrySize => "max_breakers",
        }
    }

    /// This mistake as a [`ConfigError`] naming its `PALISADE_CIRCUIT_BREAKER_*` variable.
    pub fn to_config_error(&self) -> ConfigError {
        ConfigError::new(vec![field_problem(PREFIX, self)])
    }
}

impl FieldMistake for CircuitBreakerConfigError {
    fn field(&self) -> &'static str {
        CircuitBreakerConfigError::field(self)
    }

    fn example(&self) -> &'static str {
        match self.field() {
            "window_size" => "100",
            "failure_rate_threshold" => "0.5",
            "slow_call_rate_threshold" => "0.8",
            "minimum_calls" => "20",
            "consecutive_failures" => "5",
            "slow_call_duration" => "30s",
            "open_duration" => "10s",
            "max_open_duration" => "5m",
            "max_wait_in_half_open" => "60s",
            "backoff_multiplier" => "2",
            "jitter" => "0.2",
            "half_open_probes" => "3",
            _ => "1000",
        }
    }

    fn judged_against(&self) -> &'static [&'static str] {
        match self {
            Self::WindowSize { .. } => &["window_kind"],
            Self::MinimumCalls { .. } => &["window_kind", "window_size"],
            Self::Duration {
                field: "max_open_duration",
                reason: SHORTER_THAN_OPEN,
            } => &["open_duration"],
            _ => &[],
        }
    }
}

impl From<CircuitBreakerConfigError> for crate::Error {
    fn from(err: CircuitBreakerConfigError) -> Self {
        crate::Error::new(crate::ErrorKind::Config, err.to_string()).with_source(err)
    }
}

/// Why a cap below the open duration is refused.
const SHORTER_THAN_OPEN: &str = "must not be shorter than open_duration";

fn fraction_ok(p: f64) -> bool {
    p.is_finite() && p > 0.0 && p <= 1.0
}

impl CircuitBreakerConfig {
    /// A preset for an LLM upstream (Anthropic, OpenAI), whose calls take seconds to
    /// minutes and whose outages come in bursts:
    ///
    /// | setting | value | why |
    /// |---|---|---|
    /// | window | the last 60 s (time window) | judges the recent minute whatever the call rate |
    /// | `minimum_calls` | 10 | a few unlucky calls at low traffic do not open it |
    /// | `failure_rate_threshold` | 0.5 | half the calls failing is an outage |
    /// | `consecutive_failures` | 5 | opens fast when every call fails |
    /// | `slow_call_duration` | 90 s | a non-streamed completion can take a minute |
    /// | `slow_call_rate_threshold` | 0.8 | most calls that slow is an overloaded upstream |
    /// | `open_duration` | 30 s, doubling to 5 min | gives an overloaded upstream room |
    /// | `half_open_probes` | 2 | |
    /// | `max_wait_in_half_open` | 3 min | probes in flight are always waited for |
    ///
    /// ```
    /// use std::time::Duration;
    /// use palisade::circuit_breaker::{CircuitBreakerConfig, WindowKind};
    ///
    /// let cfg = CircuitBreakerConfig::llm_upstream();
    /// assert_eq!(cfg.window_kind, WindowKind::Time);
    /// assert_eq!(cfg.slow_call_duration, Some(Duration::from_secs(90)));
    /// cfg.validate().unwrap();
    /// ```
    pub fn llm_upstream() -> Self {
        Self {
            name: "llm".to_owned(),
            window_kind: WindowKind::Time,
            window_size: 60,
            failure_rate_threshold: 0.5,
            slow_call_duration: Some(Duration::from_secs(90)),
            slow_call_rate_threshold: 0.8,
            minimum_calls: 10,
            consecutive_failures: Some(5),
            open_duration: Duration::from_secs(30),
            max_open_duration: Duration::from_secs(300),
            backoff_multiplier: 2.0,
            jitter: Jitter::Spread(0.2),
            half_open_probes: 2,
            max_wait_in_half_open: Some(Duration::from_secs(180)),
            clock: ClockSource::Tokio,
            seed: None,
        }
    }

    /// Checks every value, returning the first problem.
    pub fn validate(&self) -> Result<(), CircuitBreakerConfigError> {
        self.errors().into_iter().next().map_or(Ok(()), Err)
    }

    /// Every problem, in field order (so `from_env` reports them all at once).
    fn errors(&self) -> Vec<CircuitBreakerConfigError> {
        use CircuitBreakerConfigError as E;
        let mut errs = Vec::new();
        let max = match self.window_kind {
            WindowKind::Count => MAX_COUNT_WINDOW,
            WindowKind::Time => MAX_TIME_WINDOW_SECS,
        };
        if self.window_size == 0 || self.window_size > max {
            errs.push(E::WindowSize {
                kind: self.window_kind,
                got: self.window_size,
                max,
            });
        }
        if !fraction_ok(self.failure_rate_threshold) {
            errs.push(E::Threshold {
                field: "failure_rate_threshold",
                got: self.failure_rate_threshold,
            });
        }
        if !fraction_ok(self.slow_call_rate_threshold) {
            errs.push(E::Threshold {
                field: "slow_call_rate_threshold",
                got: self.slow_call_rate_threshold,
            });
        }
        let window = match self.window_kind {
            WindowKind::Count => self.window_size,
            WindowKind::Time => u32::MAX,
        };
        if self.minimum_calls == 0 || self.minimum_calls > window {
            errs.push(E::MinimumCalls {
                got: self.minimum_calls,
                window,
            });
        }
        if self.consecutive_failures == Some(0) {
            errs.push(E::ConsecutiveFailures);
        }
        if self.slow_call_duration == Some(Duration::ZERO) {
            errs.push(E::Duration {
                field: "slow_call_duration",
                reason: "must be positive",
            });
        }
        if self.open_duration.is_zero() {
            errs.push(E::Duration {
                field: "open_duration",
                reason: "must be positive",
            });
        }
        if self.max_open_duration < self.open_duration {
            errs.push(E::Duration {
                field: "max_open_duration",
                reason: SHORTER_THAN_OPEN,
            });
        }
        if self.max_open_duration > Duration::from_secs(86_400 * 365) {
            errs.push(E::Duration {
                field: "max_open_duration",
                reason: "must not exceed a year",
            });
        }
        if self.max_wait_in_half_open == Some(Duration::ZERO) {
            errs.push(E::Duration {
                field: "max_wait_in_half_open",
                reason: "must be positive (or unset to wait for ever)",
            });
        }
        if !(self.backoff_multiplier.is_finite() && self.backoff_multiplier >= 1.0) {
            errs.push(E::Multiplier(self.backoff_multiplier));
        }
        if let Err(spread) = self.jitter.check() {
            errs.push(E::Jitter(spread));
        }
        if self.half_open_probes == 0 || self.half_open_probes > MAX_HALF_OPEN_PROBES {
            errs.push(E::HalfOpenProbes(self.half_open_probes));
        }
        errs
    }

    /// Validates the configuration and builds a layer with the default classifier.
    pub fn build(&self) -> Result<super::CircuitBreakerLayer, CircuitBreakerConfigError> {
        super::CircuitBreakerLayer::from_config(self)
    }

    /// Reads `PALISADE_CIRCUIT_BREAKER_*` variables over the defaults, recording every
    /// problem in `env` (see [`Env::finish`]).
    ///
    /// | variable | example |
    /// |---|---|
    /// | `PALISADE_CIRCUIT_BREAKER_NAME` | `anthropic` |
    /// | `PALISADE_CIRCUIT_BREAKER_WINDOW_KIND` | `count` or `time` |
    /// | `PALISADE_CIRCUIT_BREAKER_WINDOW_SIZE` | `100` |
    /// | `PALISADE_CIRCUIT_BREAKER_FAILURE_RATE_THRESHOLD` | `0.5` |
    /// | `PALISADE_CIRCUIT_BREAKER_SLOW_CALL_DURATION` | `30s` (or `none`) |
    /// | `PALISADE_CIRCUIT_BREAKER_SLOW_CALL_RATE_THRESHOLD` | `0.8` |
    /// | `PALISADE_CIRCUIT_BREAKER_MINIMUM_CALLS` | `20` |
    /// | `PALISADE_CIRCUIT_BREAKER_CONSECUTIVE_FAILURES` | `5` (or `none`) |
    /// | `PALISADE_CIRCUIT_BREAKER_OPEN_DURATION` | `10s` |
    /// | `PALISADE_CIRCUIT_BREAKER_MAX_OPEN_DURATION` | `5m` |
    /// | `PALISADE_CIRCUIT_BREAKER_BACKOFF_MULTIPLIER` | `2` |
    /// | `PALISADE_CIRCUIT_BREAKER_JITTER` | `0.2` |
    /// | `PALISADE_CIRCUIT_BREAKER_HALF_OPEN_PROBES` | `3` |
    /// | `PALISADE_CIRCUIT_BREAKER_MAX_WAIT_IN_HALF_OPEN` | `60s` (or `none`) |
    /// | `PALISADE_CIRCUIT_BREAKER_CLOCK` | `tokio`, `fast` or `coarse` |
    /// | `PALISADE_CIRCUIT_BREAKER_SEED` | `42` |
    ///
    /// Values that parse but do not validate (a threshold of 50: ratios are fractions 0–1)
    /// are also recorded, under their own variable.
    ///
    /// ```
    /// use palisade::config::Env;
    /// use palisade::circuit_breaker::CircuitBreakerConfig;
    ///
    /// let mut env = Env::from_pairs([
    ///     ("PALISADE_CIRCUIT_BREAKER_WINDOW_KIND", "time"),
    ///     ("PALISADE_CIRCUIT_BREAKER_WINDOW_SIZE", "30"),
    ///     ("PALISADE_CIRCUIT_BREAKER_CONSECUTIVE_FAILURES", "5"),
    /// ]);
    /// let cfg = CircuitBreakerConfig::from_env(&mut env);
    /// env.finish().unwrap();
    /// assert_eq!(cfg.window_size, 30);
    /// assert_eq!(cfg.consecutive_failures, Some(5));
    /// ```
    pub fn from_env(env: &mut Env) -> Self {
        let var = |field: &str| env_var(PREFIX, field);
        let d = Self::default();
        let name = env.optional(&var("name"), d.name, "anthropic");
        let window_kind =
            env.optional_with(&var("window_kind"), d.window_kind, "count", |s| {
                match s.trim().to_ascii_lowercase().as_str() {
                    "count" => Ok(WindowKind::Count),
                    "time" => Ok(WindowKind::Time),
                    _ => Err("expected `count` or `time`".to_owned()),
                }
            });
        let window_size = env.optional(&var("window_size"), d.window_size, "100");
        let failure_rate_threshold = env.optional(
            &var("failure_rate_threshold"),
            d.failure_rate_threshold,
            "0.5",
        );
        let slow_call_duration = env.optional_with(
            &var("slow_call_duration"),
            d.slow_call_duration,
            "30s",
            parse_optional_duration,
        );
        let slow_call_rate_threshold = env.optional(
            &var("slow_call_rate_threshold"),
            d.slow_call_rate_threshold,
            "0.8",
        );
        let minimum_calls = env.optional(&var("minimum_calls"), d.minimum_calls, "20");
        let consecutive_failures = env.optional_with(
            &var("consecutive_failures"),
            d.consecutive_failures,
            "5",
            parse_optional,
        );
        let open_duration = env.duration(&var("open_duration"), d.open_duration, "10s");
        let max_open_duration = env.duration(&var("max_open_duration"), d.max_open_duration, "5m");
        let backoff_multiplier =
            env.optional(&var("backoff_multiplier"), d.backoff_multiplier, "2");
        let jitter = env.optional(&var("jitter"), d.jitter, "0.2");
        let half_open_probes = env.optional(&var("half_open_probes"), d.half_open_probes, "3");
        let max_wait_in_half_open = env.optional_with(
            &var("max_wait_in_half_open"),
            d.max_wait_in_half_open,
            "60s",
            parse_optional_duration,
        );
        let clock = env.optional(&var("clock"), d.clock, "coarse");
        let seed = env.optional_with(&var("seed"), d.seed, "42", parse_optional);
        let cfg = Self {
            name,
            window_kind,
            window_size,
            failure_rate_threshold,
            slow_call_duration,
            slow_call_rate_threshold,
            minimum_calls,
            consecutive_failures,
            open_duration,
            max_open_duration,
            backoff_multiplier,
            jitter,
            half_open_probes,
            max_wait_in_half_open,
            clock,
            seed,
        };
        record_mistakes(env, PREFIX, cfg.errors());
        cfg
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_round_trip() {
        let cfg = CircuitBreakerConfig::default();
        cfg.validate().unwrap();
        let json = serde_json::to_string(&cfg).unwrap();
        let back: CircuitBreakerConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back, cfg);
        assert_eq!(
            serde_json::from_str::<CircuitBreakerConfig>("{}").unwrap(),
            cfg
        );
        let err = serde_json::from_str::<CircuitBreakerConfig>(r#"{"window":3}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
    }

    #[test]
    fn invalid_values_are_typed_errors() {
        use CircuitBreakerConfigError as E;
        let base = CircuitBreakerConfig::default;
        type Check = fn(&E) -> bool;
        let cases: Vec<(CircuitBreakerConfig, Check)> = vec![
            (
                CircuitBreakerConfig {
                    window_size: 0,
                    ..base()
                },
                |e| matches!(e, E::WindowSize { .. }),
            ),
            (
                CircuitBreakerConfig {
                    window_kind: WindowKind::Time,
                    window_size: 7200,
                    ..base()
                },
                |e| matches!(e, E::WindowSize { max: 3600, .. }),
            ),
            (
                CircuitBreakerConfig {
                    failure_rate_threshold: 0.0,
                    ..base()
                },
                |e| matches!(e, E::Threshold { .. }),
            ),
            (
                CircuitBreakerConfig {
                    slow_call_rate_threshold: f64::NAN,
                    ..base()
                },
                |e| matches!(e, E::Threshold { .. }),
            ),
            (
                CircuitBreakerConfig {
                    minimum_calls: 101,
                    ..base()
                },
                |e| matches!(e, E::MinimumCalls { .. }),
            ),
            (
                CircuitBreakerConfig {
                    consecutive_failures: Some(0),
                    ..base()
                },
                |e| matches!(e, E::ConsecutiveFailures),
            ),
            (
                CircuitBreakerConfig {
                    max_open_duration: Duration::from_secs(1),
                    ..base()
                },
                |e| matches!(e, E::Duration { .. }),
            ),
            (
                CircuitBreakerConfig {
                    backoff_multiplier: 0.5,
                    ..base()
                },
                |e| matches!(e, E::Multiplier(_)),
            ),
            (
                CircuitBreakerConfig {
                    jitter: Jitter::Spread(1.0),
                    ..base()
                },
                |e| matches!(e, E::Jitter(_)),
            ),
            (
                CircuitBreakerConfig {
                    half_open_probes: 0,
                    ..base()
                },
                |e| matches!(e, E::HalfOpenProbes(0)),
            ),
        ];
        for (cfg, check) in cases {
            let err = cfg.validate().unwrap_err();
            assert!(check(&err), "{err:?}");
            assert!(cfg.build().is_err());
        }
        // a time window may hold any number of calls
        CircuitBreakerConfig {
            window_kind: WindowKind::Time,
            window_size: 10,
            minimum_calls: 1000,
            ..base()
        }
        .validate()
        .unwrap();
    }

    #[test]
    fn a_value_that_does_not_validate_names_its_variable() {
        let mut env = Env::from_pairs([("PALISADE_CIRCUIT_BREAKER_WINDOW_SIZE", "0")]);
        let _ = CircuitBreakerConfig::from_env(&mut env);
        let err = env.finish().unwrap_err();
        assert_eq!(
            err.problems()[0].name,
            "PALISADE_CIRCUIT_BREAKER_WINDOW_SIZE"
        );
        CircuitBreakerConfig::llm_upstream().validate().unwrap();
    }

    #[test]
    fn from_env_reports_every_problem() {
        let mut env = Env::from_pairs([
            ("PALISADE_CIRCUIT_BREAKER_WINDOW_KIND", "sliding"),
            ("PALISADE_CIRCUIT_BREAKER_OPEN_DURATION", "soon"),
            ("PALISADE_CIRCUIT_BREAKER_HALF_OPEN_PROBES", "-1"),
            ("PALISADE_CIRCUIT_BREAKER_CLOCK", "wall"),
        ]);
        let _ = CircuitBreakerConfig::from_env(&mut env);
        let err = env.finish().unwrap_err();
        assert_eq!(err.problems().len(), 4, "{err}");
        assert!(
            err.to_string()
                .contains("expected `tokio`, `fast` or `coarse`"),
            "{err}"
        );

        let mut env = Env::from_pairs([
            ("PALISADE_CIRCUIT_BREAKER_FAILURE_RATE_THRESHOLD", "50"),
            ("PALISADE_CIRCUIT_BREAKER_MAX_WAIT_IN_HALF_OPEN", "none"),
        ]);
        let cfg = CircuitBreakerConfig::from_env(&mut env);
        assert_eq!(cfg.max_wait_in_half_open, None);
        let err = env.finish().unwrap_err();
        assert!(err.to_string().contains("failure_rate_threshold"), "{err}");

        let mut env = Env::from_pairs([
            ("PALISADE_CIRCUIT_BREAKER_SLOW_CALL_DURATION", "45s"),
            ("PALISADE_CIRCUIT_BREAKER_NAME", "anthropic"),
            ("PALISADE_CIRCUIT_BREAKER_CLOCK", "coarse"),
        ]);
        let cfg = CircuitBreakerConfig::from_env(&mut env);
        env.finish().unwrap();
        assert_eq!(cfg.clock, ClockSource::Coarse);
        assert_eq!(cfg.slow_call_duration, Some(Duration::from_secs(45)));
        assert_eq!(cfg.name, "anthropic");
    }

    /// `none` and `off` turn an optional setting off in any case, as in retry's
    /// variables: `None` or `OFF` for the half-open wait was refused, and the slow-call
    /// duration and the run of failures could not be turned off at all.
    #[test]
    fn optional_settings_read_none_and_off_in_any_case() {
        let mut env = Env::from_pairs([
            ("PALISADE_CIRCUIT_BREAKER_MAX_WAIT_IN_HALF_OPEN", "None"),
            ("PALISADE_CIRCUIT_BREAKER_SLOW_CALL_DURATION", "OFF"),
            ("PALISADE_CIRCUIT_BREAKER_CONSECUTIVE_FAILURES", "none"),
            ("PALISADE_CIRCUIT_BREAKER_SEED", "off"),
        ]);
        let cfg = CircuitBreakerConfig::from_env(&mut env);
        env.finish().unwrap();
        assert_eq!(cfg.max_wait_in_half_open, None);
        assert_eq!(cfg.slow_call_duration, None);
        assert_eq!(cfg.consecutive_failures, None);
        assert_eq!(cfg.seed, None);
    }

    /// A window size that did not parse left the default (100) in its place, and a
    /// minimum of 500 calls was then reported as larger than the window: a problem the
    /// user never wrote. The same for an open duration that did not parse and the cap.
    #[test]
    fn a_value_judged_against_one_that_did_not_parse_is_not_reported() {
        let mut env = Env::from_pairs([
            ("PALISADE_CIRCUIT_BREAKER_WINDOW_SIZE", "lots"),
            ("PALISADE_CIRCUIT_BREAKER_MINIMUM_CALLS", "500"),
            ("PALISADE_CIRCUIT_BREAKER_OPEN_DURATION", "soon"),
            ("PALISADE_CIRCUIT_BREAKER_MAX_OPEN_DURATION", "5s"),
        ]);
        let _ = CircuitBreakerConfig::from_env(&mut env);
        let err = env.finish().unwrap_err();
        let names: Vec<&str> = err.problems().iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "PALISADE_CIRCUIT_BREAKER_WINDOW_SIZE",
                "PALISADE_CIRCUIT_BREAKER_OPEN_DURATION"
            ],
            "{err}"
        );
    }

    /// A window smaller than the default minimum of calls blames the minimum, which was
    /// not set: the report said it was set to `""`.
    #[test]
    fn a_value_left_unset_is_not_reported_as_set_to_nothing() {
        let mut env = Env::from_pairs([("PALISADE_CIRCUIT_BREAKER_WINDOW_SIZE", "10")]);
        let _ = CircuitBreakerConfig::from_env(&mut env);
        let text = env.finish().unwrap_err().to_string();
        assert!(
            text.contains("PALISADE_CIRCUIT_BREAKER_MINIMUM_CALLS is invalid: minimum_calls"),
            "{text}"
        );
        let text = CircuitBreakerConfigError::Multiplier(0.5)
            .to_config_error()
            .to_string();
        assert!(!text.contains(r#"("")"#), "{text}");
    }

    /// Values that parse but do not validate were reported only when nothing else was
    /// wrong, and only the first of them.
    #[test]
    fn from_env_reports_every_invalid_value_at_once() {
        let mut env = Env::from_pairs([
            ("PALISADE_CIRCUIT_BREAKER_CLOCK", "wall"),
            ("PALISADE_CIRCUIT_BREAKER_FAILURE_RATE_THRESHOLD", "50"),
            ("PALISADE_CIRCUIT_BREAKER_JITTER", "5"),
            ("PALISADE_CIRCUIT_BREAKER_HALF_OPEN_PROBES", "0"),
        ]);
        let _ = CircuitBreakerConfig::from_env(&mut env);
        let err = env.finish().unwrap_err();
        let names: Vec<&str> = err.problems().iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "PALISADE_CIRCUIT_BREAKER_CLOCK",
                "PALISADE_CIRCUIT_BREAKER_FAILURE_RATE_THRESHOLD",
                "PALISADE_CIRCUIT_BREAKER_JITTER",
                "PALISADE_CIRCUIT_BREAKER_HALF_OPEN_PROBES"
            ],
            "{err}"
        );
        let text = err.to_string();
        assert!(
            text.contains(r#"FAILURE_RATE_THRESHOLD is invalid ("50")"#),
            "{text}"
        );
        assert!(text.contains("FAILURE_RATE_THRESHOLD=0.5"), "{text}");
    }
}
