//! The retry layer's configuration: serde, environment variables, validation.

use std::time::Duration;

use http::HeaderName;
use serde::{Deserialize, Serialize};

use super::budget::BudgetError;
use crate::config::{
    ConfigError, Env, FieldMistake, duration, env_var, field_problem, parse_optional,
    parse_optional_duration, record_mistakes,
};
use crate::jitter::Jitter;

/// The prefix of the retry layer's environment variables.
pub(super) const PREFIX: &str = "PALISADE_RETRY";

/// Configuration of a [`RetryLayer`](super::RetryLayer), from a file (serde) or from
/// `PALISADE_RETRY_*` environment variables ([`RetryConfig::from_env`]). Build the layer
/// with [`RetryConfig::build`].
///
/// ```
/// use palisade::retry::{Jitter, RetryConfig};
///
/// let cfg: RetryConfig = toml::from_str(r#"
///     max_retries = 2
///     base_delay = "250ms"
///     max_delay = "4s"
///     jitter = "equal"
///     deadline = "30s"
///     assume_idempotent = true
/// "#).unwrap();
/// assert_eq!(cfg.jitter, Jitter::Equal);
/// assert!(cfg.budget, "the retry budget is on by default");
/// let layer = cfg.build().unwrap();
/// # let _ = layer;
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct RetryConfig {
    /// Most retries after the first attempt (default 3; 0 turns retrying off).
    pub max_retries: u32,
    /// The delay before the first retry, before jitter (default 500 ms).
    #[serde(with = "duration")]
    pub base_delay: Duration,
    /// Each delay is `factor` times the one before (default 2, at least 1).
    pub factor: f64,
    /// The cap on any delay, after jitter (default 8 s). A server that asks for a longer
    /// wait gets its answer back at once instead of an early retry.
    #[serde(with = "duration")]
    pub max_delay: Duration,
    /// How delays are randomised (default full jitter).
    pub jitter: Jitter,
    /// Overall time limit for the call, retries included (default none).
    #[serde(with = "duration::option")]
    pub deadline: Option<Duration>,
    /// Time limit for each attempt (default none).
    #[serde(with = "duration::option")]
    pub attempt_timeout: Option<Duration>,
    /// Whether retries are limited by a retry budget (default on).
    pub budget: bool,
    /// The budget's sliding window (default 10 s).
    #[serde(with = "duration")]
    pub budget_window: Duration,
    /// Retries per second always allowed by the budget (default 10).
    pub budget_min_per_sec: u32,
    /// Retries earned by each request (default 0.2: retries add at most 20% load).
    pub budget_ratio: f64,
    /// The most request-body bytes kept for replay (default 1 MiB); larger bodies are sent
    /// once.
    pub body_limit: usize,
    /// Treat every request as idempotent, so a POST is retried on 500/502/504/timeouts too
    /// (LLM APIs that deduplicate may opt in; default off).
    pub assume_idempotent: bool,
    /// A response header that carries the retry count, such as `x-retry-count` (default
    /// none; the count is always in the `RetryCount` extension).
    pub count_header: Option<String>,
    /// A seed for the jitter generator, for reproducible delays (default none: thread
    /// RNG).
    pub seed: Option<u64>,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_retries: 3,
            base_delay: Duration::from_millis(500),
            factor: 2.0,
            max_delay: Duration::from_secs(8),
            jitter: Jitter::Full,
            deadline: None,
            attempt_timeout: None,
            budget: true,
            budget_window: Duration::from_secs(10),
            budget_min_per_sec: 10,
            budget_ratio: 0.2,
            body_limit: 1024 * 1024,
            assume_idempotent: false,
            count_header: None,
            seed: None,
        }
    }
}

/// A mistake in a retry configuration.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum RetryConfigError {
    /// The backoff factor must be a finite number of at least 1.
    #[error("the backoff factor must be a finite number >= 1, got {0}")]
    Factor(f64),
    /// The max delay must not be below the base delay.
    #[error("max_delay ({max_delay:?}) is below base_delay ({base_delay:?})")]
    MaxDelayBelowBase {
        /// The base delay.
        base_delay: Duration,
        /// The max delay.
        max_delay: Duration,
    },
    /// A zero deadline or attempt timeout would fail every call.
    #[error("{0} must be more than zero (leave it unset for no limit)")]
    ZeroLimit(&'static str),
    /// The budget settings are invalid.
    #[error(transparent)]
    Budget(#[from] BudgetError),
    /// The count header is not a valid header name.
    #[error("count_header `{0}` is not a valid HTTP header name")]
    CountHeader(String),
    /// A [`Jitter::Spread`] outside `[0, 1)`.
    #[error("a jitter spread must be a fraction in [0, 1), got {0}")]
    Jitter(f64),
}

impl RetryConfigError {
    /// The configuration field at fault (its serde name), for example `"max_delay"`.
    pub fn field(&self) -> &'static str {
        match self {
            Self::Factor(_) => "factor",
            Self::MaxDelayBelowBase { .. } => "max_delay",
            Self::ZeroLimit(field) => field,
            Self::Budget(BudgetError::WindowTooShort(_)) => "budget_window",
            Self::Budget(_) => "budget_ratio",
            Self::CountHeader(_) => "count_header",
            Self::Jitter(_) => "jitter",
        }
    }

    /// This mistake as a [`ConfigError`] naming its `PALISADE_RETRY_*` variable.
    pub fn to_config_error(&self) -> ConfigError {
        ConfigError::new(vec![field_problem(PREFIX, self)])
    }
}

impl FieldMistake for RetryConfigError {
    fn field(&self) -> &'static str {
        RetryConfigError::field(self)
    }

    fn example(&self) -> &'static str {
        match self.field() {
            "factor" => "2",
            "max_delay" => "8s",
            "deadline" => "30s",
            "attempt_timeout" => "10s",
            "budget_window" => "10s",
            "budget_ratio" => "0.2",
            "jitter" => "full",
            _ => "x-retry-count",
        }
    }

    fn judged_against(&self) -> &'static [&'static str] {
        match self {
            Self::MaxDelayBelowBase { .. } => &["base_delay"],
            _ => &[],
        }
    }
}

impl RetryConfig {
    /// A preset for LLM APIs: the defaults (the official SDKs' schedule: 500 ms doubling
    /// to 8 s with full jitter, 3 retries, a 20% retry budget) and a 10-minute deadline for
    /// the whole call, retries and waits included: the official SDKs' request timeout, so a
    /// long non-streamed generation (minutes, for a large `max_tokens`) is not cut short.
    /// See [`RetryLayer::llm`](super::RetryLayer::llm).
    ///
    /// ```
    /// use std::time::Duration;
    /// let cfg = palisade::retry::RetryConfig::llm();
    /// assert_eq!(cfg.deadline, Some(Duration::from_secs(600)));
    /// cfg.validate().unwrap();
    /// ```
    pub fn llm() -> Self {
        Self {
            deadline: Some(Duration::from_secs(600)),
            ..Self::default()
        }
    }

    /// Reads `PALISADE_RETRY_MAX_RETRIES`, `_BASE_DELAY`, `_FACTOR`, `_MAX_DELAY`, `_JITTER`,
    /// `_DEADLINE`, `_ATTEMPT_TIMEOUT`, `_BUDGET`, `_BUDGET_WINDOW`, `_BUDGET_MIN_PER_SEC`,
    /// `_BUDGET_RATIO`, `_BODY_LIMIT`, `_ASSUME_IDEMPOTENT`, `_COUNT_HEADER` and `_SEED`,
    /// recording problems in `env` (unset variables keep their defaults).
    ///
    /// ```
    /// use std::time::Duration;
    /// use palisade::config::Env;
    /// use palisade::retry::RetryConfig;
    ///
    /// let mut env = Env::from_pairs([
    ///     ("PALISADE_RETRY_MAX_RETRIES", "5"),
    ///     ("PALISADE_RETRY_DEADLINE", "20s"),
    ///     ("PALISADE_RETRY_JITTER", "sometimes"),
    /// ]);
    /// let cfg = RetryConfig::from_env(&mut env);
    /// assert_eq!(cfg.max_retries, 5);
    /// assert_eq!(cfg.deadline, Some(Duration::from_secs(20)));
    /// let err = env.finish().unwrap_err();
    /// assert!(err.to_string().contains("PALISADE_RETRY_JITTER"));
    /// ```
    pub fn from_env(env: &mut Env) -> Self {
        let d = RetryConfig::default();
        let var = |field: &str| env_var(PREFIX, field);
        let cfg = Self {
            max_retries: env.optional(&var("max_retries"), d.max_retries, "3"),
            base_delay: env.duration(&var("base_delay"), d.base_delay, "500ms"),
            factor: env.optional(&var("factor"), d.factor, "2"),
            max_delay: env.duration(&var("max_delay"), d.max_delay, "8s"),
            jitter: env.optional(&var("jitter"), d.jitter, "full"),
            deadline: env.optional_with(
                &var("deadline"),
                d.deadline,
                "30s",
                parse_optional_duration,
            ),
            attempt_timeout: env.optional_with(
                &var("attempt_timeout"),
                d.attempt_timeout,
                "10s",
                parse_optional_duration,
            ),
            budget: env.optional(&var("budget"), d.budget, "true"),
            budget_window: env.duration(&var("budget_window"), d.budget_window, "10s"),
            budget_min_per_sec: env.optional(
                &var("budget_min_per_sec"),
                d.budget_min_per_sec,
                "10",
            ),
            budget_ratio: env.optional(&var("budget_ratio"), d.budget_ratio, "0.2"),
            body_limit: env.optional(&var("body_limit"), d.body_limit, "1048576"),
            assume_idempotent: env.optional(
                &var("assume_idempotent"),
                d.assume_idempotent,
                "false",
            ),
            count_header: env.optional_with(
                &var("count_header"),
                d.count_header,
                "x-retry-count",
                parse_optional,
            ),
            seed: env.optional_with(&var("seed"), d.seed, "42", parse_optional),
        };
        record_mistakes(env, PREFIX, cfg.errors());
        cfg
    }

    /// Checks the configuration without building anything.
    pub fn validate(&self) -> Result<(), RetryConfigError> {
        self.checked().map(|_| ())
    }

    /// Validates and returns the count header name.
    pub(crate) fn checked(&self) -> Result<Option<HeaderName>, RetryConfigError> {
        if let Some(err) = self.errors().into_iter().next() {
            return Err(err);
        }
        Ok(self
            .count_header
            .as_deref()
            .and_then(|name| HeaderName::from_bytes(name.as_bytes()).ok()))
    }

    /// Every problem, in field order (so `from_env` reports them all at once).
    fn errors(&self) -> Vec<RetryConfigError> {
        let mut errs = Vec::new();
        if !(self.factor.is_finite() && self.factor >= 1.0) {
            errs.push(RetryConfigError::Factor(self.factor));
        }
        if let Err(spread) = self.jitter.check() {
            errs.push(RetryConfigError::Jitter(spread));
        }
        if self.max_delay < self.base_delay {
            errs.push(RetryConfigError::MaxDelayBelowBase {
                base_delay: self.base_delay,
                max_delay: self.max_delay,
            });
        }
        if self.deadline == Some(Duration::ZERO) {
            errs.push(RetryConfigError::ZeroLimit("deadline"));
        }
        if self.attempt_timeout == Some(Duration::ZERO) {
            errs.push(RetryConfigError::ZeroLimit("attempt_timeout"));
        }
        if self.budget {
            errs.extend(
                super::budget::RetryBudget::errors(self.budget_window, self.budget_ratio)
                    .map(RetryConfigError::Budget),
            );
        }
        if let Some(name) = self.count_header.as_deref() {
            if HeaderName::from_bytes(name.as_bytes()).is_err() {
                errs.push(RetryConfigError::CountHeader(name.to_owned()));
            }
        }
        errs
    }

    /// Builds the layer with the default classifier.
    pub fn build(&self) -> Result<super::RetryLayer, RetryConfigError> {
        super::RetryLayer::from_config(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_that_does_not_validate_names_its_variable() {
        let mut env = Env::from_pairs([("PALISADE_RETRY_MAX_DELAY", "100ms")]);
        let _ = RetryConfig::from_env(&mut env);
        let err = env.finish().unwrap_err();
        assert_eq!(err.problems()[0].name, "PALISADE_RETRY_MAX_DELAY");
        assert!(err.to_string().contains("below base_delay"), "{err}");
        RetryConfig::llm().validate().unwrap();
    }

    #[test]
    fn defaults_round_trip_through_serde() {
        let cfg = RetryConfig::default();
        let json = serde_json::to_string(&cfg).unwrap();
        assert_eq!(serde_json::from_str::<RetryConfig>(&json).unwrap(), cfg);
        assert_eq!(serde_json::from_str::<RetryConfig>("{}").unwrap(), cfg);
        assert!(cfg.validate().is_ok());
        let unknown = serde_json::from_str::<RetryConfig>(r#"{"max_retry": 1}"#).unwrap_err();
        assert!(unknown.to_string().contains("max_retry"));
    }

    #[test]
    fn every_env_problem_is_reported() {
        let mut env = Env::from_pairs([
            ("PALISADE_RETRY_MAX_RETRIES", "many"),
            ("PALISADE_RETRY_BASE_DELAY", "1 fortnight"),
            ("PALISADE_RETRY_DEADLINE", "off"),
            ("PALISADE_RETRY_ATTEMPT_TIMEOUT", "5s"),
            ("PALISADE_RETRY_BUDGET", "maybe"),
            ("PALISADE_RETRY_SEED", "-1"),
            ("PALISADE_RETRY_COUNT_HEADER", "x-retry-count"),
        ]);
        let cfg = RetryConfig::from_env(&mut env);
        assert_eq!(cfg.deadline, None);
        assert_eq!(cfg.attempt_timeout, Some(Duration::from_secs(5)));
        assert_eq!(cfg.count_header.as_deref(), Some("x-retry-count"));
        let err = env.finish().unwrap_err();
        let names: Vec<_> = err.problems().iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "PALISADE_RETRY_MAX_RETRIES",
                "PALISADE_RETRY_BASE_DELAY",
                "PALISADE_RETRY_BUDGET",
                "PALISADE_RETRY_SEED"
            ]
        );
    }

    /// A budget window too short and a ratio out of range, both set at once, were
    /// reported one per start: the budget's own check stops at its first problem.
    #[test]
    fn from_env_reports_both_budget_mistakes_at_once() {
        let mut env = Env::from_pairs([
            ("PALISADE_RETRY_BUDGET_WINDOW", "5ms"),
            ("PALISADE_RETRY_BUDGET_RATIO", "5000"),
        ]);
        let _ = RetryConfig::from_env(&mut env);
        let err = env.finish().unwrap_err();
        let names: Vec<&str> = err.problems().iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "PALISADE_RETRY_BUDGET_WINDOW",
                "PALISADE_RETRY_BUDGET_RATIO"
            ],
            "{err}"
        );
    }

    /// A base delay that did not parse left the default (500 ms) in its place, and a
    /// max delay of 100 ms was then reported as below it: a second problem the user
    /// never wrote, gone once the base delay is fixed.
    #[test]
    fn a_value_judged_against_one_that_did_not_parse_is_not_reported() {
        let mut env = Env::from_pairs([
            ("PALISADE_RETRY_BASE_DELAY", "1 fortnight"),
            ("PALISADE_RETRY_MAX_DELAY", "100ms"),
        ]);
        let _ = RetryConfig::from_env(&mut env);
        let err = env.finish().unwrap_err();
        let names: Vec<&str> = err.problems().iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["PALISADE_RETRY_BASE_DELAY"], "{err}");
    }

    /// `off` for the count header made a header named `off`; like every optional
    /// setting, `none` and `off` (any case) now mean none.
    #[test]
    fn off_turns_an_optional_setting_off() {
        let mut env = Env::from_pairs([
            ("PALISADE_RETRY_COUNT_HEADER", "off"),
            ("PALISADE_RETRY_DEADLINE", "None"),
            ("PALISADE_RETRY_SEED", "OFF"),
        ]);
        let cfg = RetryConfig::from_env(&mut env);
        env.finish().unwrap();
        assert_eq!(cfg.count_header, None);
        assert_eq!(cfg.deadline, None);
        assert_eq!(cfg.seed, None);
    }

    #[test]
    fn validation_errors() {
        let bad = |f: fn(&mut RetryConfig)| {
            let mut cfg = RetryConfig::default();
            f(&mut cfg);
            cfg.validate().unwrap_err()
        };
        assert_eq!(bad(|c| c.factor = 0.5), RetryConfigError::Factor(0.5));
        assert!(matches!(
            bad(|c| c.max_delay = Duration::from_millis(1)),
            RetryConfigError::MaxDelayBelowBase { .. }
        ));
        assert_eq!(
            bad(|c| c.deadline = Some(Duration::ZERO)),
            RetryConfigError::ZeroLimit("deadline")
        );
        assert_eq!(
            bad(|c| c.attempt_timeout = Some(Duration::ZERO)),
            RetryConfigError::ZeroLimit("attempt_timeout")
        );
        assert!(matches!(
            bad(|c| c.budget_ratio = -1.0),
            RetryConfigError::Budget(BudgetError::Ratio(_))
        ));
        assert_eq!(
            bad(|c| c.count_header = Some("bad header".into())),
            RetryConfigError::CountHeader("bad header".into())
        );
        // a bad budget does not matter while the budget is off
        let mut cfg = RetryConfig {
            budget: false,
            ..RetryConfig::default()
        };
        cfg.budget_ratio = -1.0;
        assert!(cfg.validate().is_ok());
    }

    /// Values that parse but do not validate were reported only when nothing else was
    /// wrong, and only the first of them, so fixing a configuration took one restart per
    /// mistake; the report showed the value as `""` and `see RetryConfig` as the example.
    #[test]
    fn from_env_reports_every_invalid_value_at_once() {
        let mut env = Env::from_pairs([
            ("PALISADE_RETRY_JITTER", "sometimes"),
            ("PALISADE_RETRY_FACTOR", "0.5"),
            ("PALISADE_RETRY_DEADLINE", "0s"),
            ("PALISADE_RETRY_BUDGET_RATIO", "5000"),
        ]);
        let _ = RetryConfig::from_env(&mut env);
        let err = env.finish().unwrap_err();
        let names: Vec<&str> = err.problems().iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "PALISADE_RETRY_JITTER",
                "PALISADE_RETRY_FACTOR",
                "PALISADE_RETRY_DEADLINE",
                "PALISADE_RETRY_BUDGET_RATIO"
            ],
            "{err}"
        );
        let text = err.to_string();
        assert!(
            text.contains(r#"PALISADE_RETRY_FACTOR is invalid ("0.5")"#),
            "{text}"
        );
        assert!(text.contains("PALISADE_RETRY_FACTOR=2"), "{text}");
        assert!(!text.contains("see RetryConfig"), "{text}");
    }
}
