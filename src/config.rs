//! Typed configuration: from files through serde, or from environment variables with
//! validation that reports every problem at once.
//!
//! ```
//! use palisade::config::{Env, Environment, Settings};
//!
//! let mut env = Env::from_pairs([
//!     ("PALISADE_ENV", "production"),
//!     ("PALISADE_FEATURES", "cost_headers, shadow_limits"),
//! ]);
//! let settings = Settings::from_env(&mut env);
//! env.finish().unwrap();
//! assert_eq!(settings.environment, Environment::Production);
//! assert!(settings.features.is_enabled("cost_headers"));
//! assert!(!settings.features.is_enabled("dashboard"));
//!
//! // Every problem is reported at once.
//! let mut env = Env::from_pairs([("PALISADE_ENV", "staging"), ("PORT", "eighty")]);
//! let _ = Settings::from_env(&mut env);
//! let _port: Option<u16> = env.required("PORT", "8080");
//! let _key: Option<String> = env.required("UPSTREAM_API_KEY", "sk-ant-api03-...");
//! let err = env.finish().unwrap_err();
//! assert_eq!(err.problems().len(), 3);
//! let text = err.to_string();
//! assert!(text.contains("PALISADE_ENV"));
//! assert!(text.contains("UPSTREAM_API_KEY is missing"));
//! ```
//!
//! Each layer has its own configuration type (with serde `Deserialize` and defaults), so a
//! whole stack can be described in one TOML or JSON file. This module holds what they share:
//!
//! - [`Settings`]: the environment ([`Environment::Development`] or
//!   [`Environment::Production`]), feature flags, the error format and the Redis URL;
//! - [`Env`]: reads environment variables, collecting **every** missing or invalid one, then
//!   [`Env::finish`] returns one [`ConfigError`] that lists them all, each with what is
//!   wrong and an example value;
//! - [`ErrorFormat::from_env`] and [`ErrorFormat::from_env_with_override`]: the one
//!   reader of the shared `PALISADE_ERROR_FORMAT`, with a layer's own override;
//! - [`env_var`]: the rule that names every layer's variables;
//! - [`duration`]: human durations (`"250ms"`, `"30s"`, `"5m"`, `"1h30m"`) for serde fields
//!   and environment variables.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

use crate::error::ErrorFormat;

/// Where the service runs. Production turns on behaviour that only makes sense there (for
/// example HSTS on every response).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Environment {
    /// Local development and tests (the default).
    #[default]
    #[serde(alias = "dev", alias = "local", alias = "test")]
    Development,
    /// A deployed service.
    #[serde(alias = "prod")]
    Production,
}

impl Environment {
    /// Whether this is [`Environment::Production`].
    pub const fn is_production(self) -> bool {
        matches!(self, Environment::Production)
    }
}

impl Environment {
    /// Reads `PALISADE_ENV` (default: development), recording a problem in `env` when it is
    /// invalid. Every layer that depends on the environment reads it through here, and `Env`
    /// reports a variable's problem once however many readers there are.
    pub fn from_env(env: &mut Env) -> Self {
        env.optional("PALISADE_ENV", Environment::default(), "production")
    }
}

impl FromStr for Environment {
    type Err = ParseChoiceError;

    fn from_str(s: &str) -> Result<Self, ParseChoiceError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "development" | "dev" | "local" | "test" => Ok(Environment::Development),
            "production" | "prod" => Ok(Environment::Production),
            _ => Err(ParseChoiceError::new(s, "`development` or `production`")),
        }
    }
}

/// A word that is not one of the values a setting accepts (the `FromStr` error of
/// [`Environment`], [`ErrorFormat`] and the security headers' value types).
///
/// ```
/// use palisade::config::Environment;
///
/// let err = "staging".parse::<Environment>().unwrap_err();
/// assert_eq!(err.value(), "staging");
/// assert_eq!(err.to_string(), "expected `development` or `production`");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("expected {expected}")]
pub struct ParseChoiceError {
    value: String,
    expected: std::borrow::Cow<'static, str>,
}

impl ParseChoiceError {
    /// `value` is not one of `expected` (written for people: "`api` or `web`").
    pub fn new(value: &str, expected: impl Into<std::borrow::Cow<'static, str>>) -> Self {
        Self {
            value: value.trim().to_owned(),
            expected: expected.into(),
        }
    }

    /// The value as given (trimmed).
    pub fn value(&self) -> &str {
        &self.value
    }

    /// What would have been accepted.
    pub fn expected(&self) -> &str {
        &self.expected
    }
}

/// The name of the shared setting that decides how every layer renders refusals.
pub const ERROR_FORMAT_VAR: &str = "PALISADE_ERROR_FORMAT";

impl ErrorFormat {
    /// Reads the shared `PALISADE_ERROR_FORMAT` (default [`ErrorFormat::ProblemJson`]),
    /// recording a problem in `env` when it is invalid. This is the one place the shared
    /// setting is read; a bad value is reported once however many layers read it.
    ///
    /// ```
    /// use palisade::config::Env;
    /// use palisade::ErrorFormat;
    ///
    /// let mut env = Env::from_pairs([("PALISADE_ERROR_FORMAT", "anthropic")]);
    /// assert_eq!(ErrorFormat::from_env(&mut env), ErrorFormat::Anthropic);
    /// assert_eq!(ErrorFormat::from_env(&mut Env::default()), ErrorFormat::ProblemJson);
    /// ```
    pub fn from_env(env: &mut Env) -> Self {
        env.optional(ERROR_FORMAT_VAR, ErrorFormat::default(), "anthropic")
    }

    /// The format a layer renders its refusals in: the layer's own variable `layer_var`
    /// when it is set, or else the shared `PALISADE_ERROR_FORMAT`, or else the default.
    /// Both variables are checked, and every problem is recorded in `env`.
    ///
    /// Every layer that renders errors reads its format through here, so one shared
    /// setting is honoured everywhere unless a layer overrides it.
    ///
    /// ```
    /// use palisade::config::{Env, env_var};
    /// use palisade::ErrorFormat;
    ///
    /// let own = env_var("PALISADE_RATE_LIMIT", "error_format");
    /// let mut env = Env::from_pairs([("PALISADE_ERROR_FORMAT", "anthropic")]);
    /// assert_eq!(ErrorFormat::from_env_with_override(&mut env, &own), ErrorFormat::Anthropic);
    ///
    /// let mut env = Env::from_pairs([
    ///     ("PALISADE_ERROR_FORMAT", "anthropic"),
    ///     ("PALISADE_RATE_LIMIT_ERROR_FORMAT", "problem"),
    /// ]);
    /// assert_eq!(ErrorFormat::from_env_with_override(&mut env, &own), ErrorFormat::ProblemJson);
    /// env.finish().unwrap();
    /// ```
    pub fn from_env_with_override(env: &mut Env, layer_var: &str) -> Self {
        let shared = Self::from_env(env);
        env.optional(layer_var, shared, "anthropic")
    }
}

/// A set of named feature switches, matched case-insensitively.
///
/// Deserializes from a list of enabled names (`["cost_headers"]`) or a map of booleans
/// (`{cost_headers = true, dashboard = false}`); parses from a comma-separated list.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct FeatureFlags {
    enabled: BTreeSet<String>,
}

impl FeatureFlags {
    /// No flags enabled.
    pub fn new() -> Self {
        Self::default()
    }

    /// Enables `name`.
    #[must_use]
    pub fn with(mut self, name: &str) -> Self {
        self.enable(name);
        self
    }

    /// Enables `name`.
    pub fn enable(&mut self, name: &str) {
        self.enabled.insert(name.trim().to_ascii_lowercase());
    }

    /// Disables `name`.
    pub fn disable(&mut self, name: &str) {
        self.enabled.remove(&name.trim().to_ascii_lowercase());
    }

    /// Whether `name` is enabled.
    pub fn is_enabled(&self, name: &str) -> bool {
        if name.bytes().any(|b| b.is_ascii_uppercase()) || name.trim().len() != name.len() {
            self.enabled.contains(&name.trim().to_ascii_lowercase())
        } else {
            self.enabled.contains(name)
        }
    }

    /// The enabled flags, sorted.
    pub fn iter(&self) -> impl Iterator<Item = &str> {
        self.enabled.iter().map(String::as_str)
    }
}

/// A feature flag name with a character other than letters, digits, `_`, `-` and `.`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("flag `{flag}` may only hold letters, digits, `_`, `-` and `.`")]
pub struct InvalidFlagError {
    /// The flag as given.
    pub flag: String,
}

impl FromStr for FeatureFlags {
    type Err = InvalidFlagError;

    fn from_str(s: &str) -> Result<Self, InvalidFlagError> {
        let mut flags = FeatureFlags::new();
        for name in s.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
            {
                return Err(InvalidFlagError {
                    flag: name.to_owned(),
                });
            }
            flags.enable(name);
        }
        Ok(flags)
    }
}

impl<'de> Deserialize<'de> for FeatureFlags {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr {
            List(Vec<String>),
            Map(BTreeMap<String, bool>),
        }
        let mut flags = FeatureFlags::new();
        match Repr::deserialize(deserializer)? {
            Repr::List(names) => names.iter().for_each(|n| flags.enable(n)),
            Repr::Map(map) => map
                .iter()
                .filter(|(_, on)| **on)
                .for_each(|(n, _)| flags.enable(n)),
        }
        Ok(flags)
    }
}

/// Settings shared by the whole stack.
///
/// ```
/// let settings: palisade::config::Settings = serde_json::from_str(r#"{
///     "environment": "production",
///     "features": {"cost_headers": true},
///     "error_format": "anthropic"
/// }"#).unwrap();
/// assert!(settings.environment.is_production());
/// assert_eq!(settings.error_format, palisade::ErrorFormat::Anthropic);
/// ```
///
/// Its `Debug` shows the Redis URL without its password (see [`crate::key::redact_url`]).
#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct Settings {
    /// Development or production.
    pub environment: Environment,
    /// Feature switches.
    pub features: FeatureFlags,
    /// How refusals are rendered.
    pub error_format: ErrorFormat,
    /// A Redis URL (`redis://`, `rediss://` or `unix://`, from `PALISADE_REDIS_URL`) for
    /// your own code to read. No palisade layer reads it, so it keeps nothing in Redis by
    /// itself: the Redis rate-limit store takes its own address
    /// (`RedisStoreConfig::url`, `PALISADE_RATE_LIMIT_REDIS_URL`), and the Redis budget
    /// store and sink are given a connection.
    pub redis_url: Option<String>,
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field("environment", &self.environment)
            .field("features", &self.features)
            .field("error_format", &self.error_format)
            .field(
                "redis_url",
                &self.redis_url.as_deref().map(crate::key::redact_url),
            )
            .finish()
    }
}

impl Settings {
    /// Reads `PALISADE_ENV`, `PALISADE_FEATURES`, `PALISADE_ERROR_FORMAT` and
    /// `PALISADE_REDIS_URL`, recording problems in `env`.
    pub fn from_env(env: &mut Env) -> Self {
        let environment = Environment::from_env(env);
        let features = env.optional(
            "PALISADE_FEATURES",
            FeatureFlags::default(),
            "cost_headers,shadow_limits",
        );
        let error_format = ErrorFormat::from_env(env);
        let redis_url = env.secret_with("PALISADE_REDIS_URL", "redis://127.0.0.1:6379/", |s| {
            if s.starts_with("redis://")
                || s.starts_with("rediss://")
                || s.starts_with("redis+unix://")
                || s.starts_with("unix://")
            {
                Ok(s.to_owned())
            } else {
                Err("must start with redis://, rediss:// or unix://".to_owned())
            }
        });
        Settings {
            environment,
            features,
            error_format,
            redis_url,
        }
    }
}

/// What is wrong with one variable.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProblemKind {
    /// The variable is required and not set (or empty).
    Missing,
    /// The variable is set but its value does not parse, or does not validate (a value
    /// may also be judged against another one).
    Invalid {
        /// The value as given (redacted for secrets); empty for a variable left unset and
        /// judged against another one, and then left out of the report.
        value: String,
        /// Why it was refused.
        reason: String,
    },
}

/// One missing or invalid configuration value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The variable (or field) name.
    pub name: String,
    /// What is wrong.
    pub kind: ProblemKind,
    /// An example of a valid value.
    pub example: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            ProblemKind::Missing => write!(f, "{} is missing", self.name)?,
            // No value: a variable left unset, judged against another one.
            ProblemKind::Invalid { value, reason } if value.is_empty() => {
                write!(f, "{} is invalid: {reason}", self.name)?;
            }
            ProblemKind::Invalid { value, reason } => {
                write!(f, "{} is invalid ({value:?}): {reason}", self.name)?;
            }
        }
        write!(f, "; for example {}={}", self.name, self.example)
    }
}

/// Every problem found in a configuration, reported together.
///
/// Its `Debug` is its `Display`, the readable list, so `fn main() -> Result<(),
/// ConfigError>` (or a `?` into `Box<dyn Error>`) prints what to fix:
///
/// ```text
/// Error: invalid configuration: 2 problems
///   - PALISADE_ENV is invalid ("staging"): expected `development` or `production`; for example PALISADE_ENV=production
///   - ANTHROPIC_API_KEY is missing; for example ANTHROPIC_API_KEY=sk-ant-api03-...
/// ```
#[derive(Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    problems: Vec<Problem>,
}

impl ConfigError {
    /// A configuration error listing `problems`.
    pub fn new(problems: Vec<Problem>) -> Self {
        Self { problems }
    }

    /// The problems, in the order they were found.
    pub fn problems(&self) -> &[Problem] {
        &self.problems
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        write!(
            f,
            "invalid configuration: {n} problem{}",
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            write!(f, "\n  - {p}")?;
        }
        Ok(())
    }
}

/// The readable list, as [`Display`](fmt::Display) writes it; use
/// [`ConfigError::problems`] for the structure.
impl fmt::Debug for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl From<ConfigError> for crate::Error {
    fn from(err: ConfigError) -> Self {
        crate::Error::new(crate::ErrorKind::Config, err.to_string()).with_source(err)
    }
}

/// Records a value that parsed but did not validate, under its variable, unless that
/// variable already has a problem (a value that did not parse is not reported twice). The
/// problem shows the value as set (a field left unset, judged against another, shows none).
pub(crate) fn record_invalid(env: &mut Env, mut problem: Problem) {
    if env.problems().iter().any(|p| p.name == problem.name) {
        return;
    }
    if let ProblemKind::Invalid { value, .. } = &mut problem.kind {
        if value.is_empty() {
            env.raw(&problem.name).unwrap_or_default().clone_into(value);
        }
    }
    env.problem(&problem.name, problem.kind, &problem.example);
}

/// A mistake in a layer's configuration that knows the field at fault: what retry's and
/// the circuit breaker's configuration errors share, so that both report it under the
/// field's variable the same way.
pub(crate) trait FieldMistake: fmt::Display {
    /// The configuration field at fault (its serde path).
    fn field(&self) -> &'static str;
    /// A valid value of that field, for the report.
    fn example(&self) -> &'static str;
    /// The other fields the value was judged against (their serde paths): when one of
    /// their variables did not parse, its default stood in, and the judgement says
    /// nothing about what was set.
    fn judged_against(&self) -> &'static [&'static str] {
        &[]
    }
}

/// `mistake` as a problem with the variable of its field (the value is filled in by
/// [`record_invalid`], from the variable as set).
pub(crate) fn field_problem(prefix: &str, mistake: &impl FieldMistake) -> Problem {
    Problem {
        name: env_var(prefix, mistake.field()),
        kind: ProblemKind::Invalid {
            value: String::new(),
            reason: mistake.to_string(),
        },
        example: mistake.example().to_owned(),
    }
}

/// Records each of `mistakes` (values that parsed but do not validate) under its own
/// variable, so `from_env` reports them all at once; not a mistake judged against a
/// variable that did not parse (its problem is already recorded).
pub(crate) fn record_mistakes<M: FieldMistake>(
    env: &mut Env,
    prefix: &str,
    mistakes: impl IntoIterator<Item = M>,
) {
    for mistake in mistakes {
        let other_unread = mistake.judged_against().iter().any(|field| {
            let name = env_var(prefix, field);
            env.problems().iter().any(|p| p.name == name)
        });
        if !other_unread {
            record_invalid(env, field_problem(prefix, &mistake));
        }
    }
}

/// A layer from the variables in `env`: `read` reads its configuration (recording every
/// problem), and only when there is none is it built. `from_env` has recorded every
/// mistake `build` knows of; should one slip through, it is still a [`ConfigError`]
/// naming its variable, never a panic.
pub(crate) fn layer_from_env<C, L, M: FieldMistake>(
    mut env: Env,
    prefix: &str,
    read: impl FnOnce(&mut Env) -> C,
    build: impl FnOnce(&C) -> Result<L, M>,
) -> Result<L, ConfigError> {
    let config = read(&mut env);
    env.finish()?;
    build(&config).map_err(|mistake| ConfigError::new(vec![field_problem(prefix, &mistake)]))
}

/// Whether a setting's value says "unset": `none` or `off`, in any case.
fn is_unset(s: &str) -> bool {
    let s = s.trim();
    s.eq_ignore_ascii_case("none") || s.eq_ignore_ascii_case("off")
}

/// Parses an optional duration setting: `none` or `off` (any case) for none, else a
/// [`duration`].
pub(crate) fn parse_optional_duration(s: &str) -> Result<Option<Duration>, String> {
    if is_unset(s) {
        Ok(None)
    } else {
        duration::parse(s).map(Some)
    }
}

/// Parses an optional setting with `FromStr`: `none` or `off` (any case) for none.
pub(crate) fn parse_optional<T>(s: &str) -> Result<Option<T>, String>
where
    T: FromStr,
    T::Err: fmt::Display,
{
    if is_unset(s) {
        Ok(None)
    } else {
        s.trim()
            .parse()
            .map(Some)
            .map_err(|e: T::Err| e.to_string())
    }
}

/// The environment variable that configures `field` of the layer whose variables start with
/// `prefix`: the one naming rule every layer's `from_env` follows.
///
/// The field is the configuration's serde field path, nested fields joined by `.`; the name
/// is the prefix, `_`, then the path upper-cased with `.` and `-` turned into `_`.
///
/// ```
/// use palisade::config::env_var;
///
/// assert_eq!(env_var("PALISADE_COST", "queue.max_batch"), "PALISADE_COST_QUEUE_MAX_BATCH");
/// assert_eq!(env_var("PALISADE_RETRY", "base_delay"), "PALISADE_RETRY_BASE_DELAY");
/// ```
pub fn env_var(prefix: &str, field: &str) -> String {
    let mut name = String::with_capacity(prefix.len() + 1 + field.len());
    name.push_str(prefix);
    name.push('_');
    name.extend(field.chars().map(|c| match c {
        '.' | '-' => '_',
        c => c.to_ascii_uppercase(),
    }));
    name
}

/// A reader of environment variables that collects problems instead of stopping at the
/// first.
///
/// Each getter returns a value (or `None` when the variable is unusable) and records what
/// went wrong; [`Env::finish`] then reports everything at once. Empty values count as
/// missing.
///
/// Its `Debug` lists the variable names, never their values (they may hold keys).
#[derive(Clone, Default)]
pub struct Env {
    vars: HashMap<String, String>,
    problems: Vec<Problem>,
}

impl fmt::Debug for Env {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names: Vec<&str> = self.vars.keys().map(String::as_str).collect();
        names.sort_unstable();
        f.debug_struct("Env")
            .field("vars", &names)
            .field("problems", &self.problems)
            .finish()
    }
}

impl Env {
    /// The process environment (variables that are not valid Unicode are ignored).
    pub fn from_process() -> Self {
        Self::from_pairs(std::env::vars())
    }

    /// A fixed set of variables, for tests and for configuration from other sources.
    pub fn from_pairs<K: Into<String>, V: Into<String>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        Self {
            vars: pairs
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
            problems: Vec::new(),
        }
    }

    /// The raw value of `name`, if set and not blank.
    pub fn raw(&self, name: &str) -> Option<&str> {
        self.vars
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.trim().is_empty())
    }

    /// A required variable parsed with `FromStr`; records a problem when missing or invalid.
    pub fn required<T>(&mut self, name: &str, example: &str) -> Option<T>
    where
        T: FromStr,
        T::Err: fmt::Display,
    {
        self.required_with(name, example, |s| {
            T::from_str(s.trim()).map_err(|e| e.to_string())
        })
    }

    /// A required variable with a custom parser; the parser's error says why a value is
    /// refused (`.map_err(|e| e.to_string())` turns a typed error into one).
    pub fn required_with<T>(
        &mut self,
        name: &str,
        example: &str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        self.get(name, example, false, parse, true)
    }

    /// An optional variable parsed with `FromStr`, or `default` when unset. An invalid
    /// value is a problem (it is not silently replaced by the default).
    pub fn optional<T>(&mut self, name: &str, default: T, example: &str) -> T
    where
        T: FromStr,
        T::Err: fmt::Display,
    {
        self.optional_with(name, default, example, |s| {
            T::from_str(s.trim()).map_err(|e| e.to_string())
        })
    }

    /// An optional variable with a custom parser; the parser's error says why a value is
    /// refused (`.map_err(|e| e.to_string())` turns a typed error into one).
    pub fn optional_with<T>(
        &mut self,
        name: &str,
        default: T,
        example: &str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> T {
        self.get(name, example, false, parse, false)
            .unwrap_or(default)
    }

    /// An optional duration such as `30s` or `250ms` (see [`duration::parse`]).
    pub fn duration(&mut self, name: &str, default: Duration, example: &str) -> Duration {
        self.optional_with(name, default, example, duration::parse)
    }

    /// An optional secret (a key, a URL with a password): when invalid, the value is
    /// redacted in the report. `None` when unset or invalid.
    pub fn secret_with<T>(
        &mut self,
        name: &str,
        example: &str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        self.get(name, example, true, parse, false)
    }

    /// Records a problem found by other means (for example two variables that contradict
    /// each other). The same problem with the same variable is recorded once, so several
    /// readers of one variable (such as `PALISADE_ENV`) report it once.
    pub fn problem(&mut self, name: &str, kind: ProblemKind, example: &str) {
        if self
            .problems
            .iter()
            .any(|p| p.name == name && p.kind == kind)
        {
            return;
        }
        self.problems.push(Problem {
            name: name.to_owned(),
            kind,
            example: example.to_owned(),
        });
    }

    /// The problems recorded so far.
    pub fn problems(&self) -> &[Problem] {
        &self.problems
    }

    /// `Ok(())` when every variable read was fine, else every problem at once.
    pub fn finish(self) -> Result<(), ConfigError> {
        if self.problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::new(self.problems))
        }
    }

    fn get<T>(
        &mut self,
        name: &str,
        example: &str,
        secret: bool,
        parse: impl FnOnce(&str) -> Result<T, String>,
        required: bool,
    ) -> Option<T> {
        let Some(raw) = self.raw(name) else {
            if required {
                self.problem(name, ProblemKind::Missing, example);
            }
            return None;
        };
        match parse(raw) {
            Ok(v) => Some(v),
            Err(reason) => {
                let value = if secret && raw.contains("://") {
                    crate::key::redact_url(raw)
                } else if secret {
                    crate::key::redact(raw)
                } else {
                    raw.to_owned()
                };
                self.problem(name, ProblemKind::Invalid { value, reason }, example);
                None
            }
        }
    }
}

/// Human durations: `"250ms"`, `"30s"`, `"5m"`, `"1h30m"`, `"1d"`, or a bare number of
/// seconds, for environment variables and serde fields.
///
/// ```
/// use std::time::Duration;
/// use palisade::config::duration;
///
/// assert_eq!(duration::parse("250ms"), Ok(Duration::from_millis(250)));
/// assert_eq!(duration::parse("1.5s"), Ok(Duration::from_millis(1500)));
/// assert_eq!(duration::parse("2m"), Ok(Duration::from_secs(120)));
/// assert_eq!(duration::parse("1h30m"), Ok(Duration::from_secs(5400)));
/// assert!(duration::parse("soon").is_err());
///
/// #[derive(serde::Deserialize)]
/// struct Timeouts {
///     #[serde(with = "duration")]
///     connect: Duration,
/// }
/// let t: Timeouts = serde_json::from_str(r#"{"connect": "3s"}"#).unwrap();
/// assert_eq!(t.connect, Duration::from_secs(3));
/// ```
pub mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer, de};

    /// Parses a human duration: one or more `<number><unit>` parts, added up (`"1h30m"`,
    /// `"1m 30s"`, `"1.5s"`), or a bare number of seconds. Units: `ns`, `us` (`µs`), `ms`,
    /// `s` (`sec`, `secs`, `second`, `seconds`), `m` (`min`, `mins`, `minute`, `minutes`),
    /// `h` (`hr`, `hour`, `hours`), `d` (`day`, `days`). The error says what to write.
    pub fn parse(s: &str) -> Result<Duration, String> {
        let text = s.trim();
        let invalid =
            || format!("`{text}` is not a duration; write it like 30s, 250ms, 5m or 1h30m");
        let out_of_range = || format!("`{text}` is out of range for a duration");
        if text.is_empty() {
            return Err(invalid());
        }
        let mut rest = text;
        let mut total: u128 = 0;
        let mut parts = 0;
        while !rest.is_empty() {
            let split = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .unwrap_or(rest.len());
            let (number, tail) = rest.split_at(split);
            if number.is_empty() {
                return Err(invalid());
            }
            let tail = tail.trim_start();
            let unit_len = tail
                .find(|c: char| c.is_ascii_digit() || c == '.' || c.is_whitespace())
                .unwrap_or(tail.len());
            let (unit, after) = tail.split_at(unit_len);
            let unit_nanos: u128 = match unit {
                "" if parts == 0 && after.trim().is_empty() => 1_000_000_000,
                "" => return Err(invalid()),
                "ns" => 1,
                "us" | "µs" => 1_000,
                "ms" => 1_000_000,
                "s" | "sec" | "secs" | "second" | "seconds" => 1_000_000_000,
                "m" | "min" | "mins" | "minute" | "minutes" => 60_000_000_000,
                "h" | "hr" | "hour" | "hours" => 3_600_000_000_000,
                "d" | "day" | "days" => 86_400_000_000_000,
                other => {
                    return Err(format!(
                        "unknown unit `{other}`; use ms, s, m, h or d (for example 1h30m)"
                    ));
                }
            };
            let nanos = if number.contains('.') {
                let value: f64 = number.parse().map_err(|_| invalid())?;
                let nanos = (value * unit_nanos as f64).round();
                if !nanos.is_finite() || nanos > u128::MAX as f64 {
                    return Err(out_of_range());
                }
                nanos as u128
            } else {
                let value: u128 = number.parse().map_err(|_| out_of_range())?;
                value.checked_mul(unit_nanos).ok_or_else(out_of_range)?
            };
            total = total.checked_add(nanos).ok_or_else(out_of_range)?;
            parts += 1;
            rest = after.trim_start();
        }
        let secs = u64::try_from(total / 1_000_000_000).map_err(|_| out_of_range())?;
        Ok(Duration::new(secs, (total % 1_000_000_000) as u32))
    }

    /// Formats a duration the way [`parse`] reads it back exactly (`"1500ms"`, `"30s"`).
    pub fn format(d: Duration) -> String {
        if d.subsec_nanos() == 0 {
            format!("{}s", d.as_secs())
        } else if d.subsec_nanos() % 1_000_000 == 0 {
            format!("{}ms", d.as_millis())
        } else if d.subsec_nanos() % 1_000 == 0 {
            format!("{}us", d.as_micros())
        } else {
            format!("{}ns", d.as_nanos())
        }
    }

    /// serde: deserializes a string (`"30s"`) or a number of seconds.
    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr {
            Secs(f64),
            Text(String),
        }
        match Repr::deserialize(deserializer)? {
            Repr::Secs(s) => Duration::try_from_secs_f64(s).map_err(de::Error::custom),
            Repr::Text(t) => parse(&t).map_err(de::Error::custom),
        }
    }

    /// serde: serializes as a string [`parse`] reads back.
    pub fn serialize<S: Serializer>(d: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&format(*d))
    }

    /// The same for `Option<Duration>`.
    pub mod option {
        use std::time::Duration;

        use serde::{Deserialize, Deserializer, Serializer};

        /// serde: `null`/absent, a string or a number of seconds.
        pub fn deserialize<'de, D: Deserializer<'de>>(
            deserializer: D,
        ) -> Result<Option<Duration>, D::Error> {
            #[derive(Deserialize)]
            struct Wrap(#[serde(with = "super")] Duration);
            Ok(Option::<Wrap>::deserialize(deserializer)?.map(|w| w.0))
        }

        /// serde: `null` or a duration string.
        pub fn serialize<S: Serializer>(
            d: &Option<Duration>,
            serializer: S,
        ) -> Result<S::Ok, S::Error> {
            match d {
                Some(d) => super::serialize(d, serializer),
                None => serializer.serialize_none(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_problems_are_reported_at_once() {
        let mut env = Env::from_pairs([
            ("PALISADE_ENV", "staging"),
            ("PALISADE_REDIS_URL", "http://user:hunter2-password@host"),
            ("PALISADE_FEATURES", "ok,bad flag"),
            ("PORT", "99999"),
            ("TIMEOUT", "5 fortnights"),
            ("BLANK", "   "),
        ]);
        let settings = Settings::from_env(&mut env);
        let port: Option<u16> = env.required("PORT", "8080");
        let timeout = env.duration("TIMEOUT", Duration::from_secs(30), "30s");
        let blank: Option<String> = env.required("BLANK", "anything");
        let absent: Option<String> = env.required("ANTHROPIC_API_KEY", "sk-ant-api03-...");
        assert_eq!(settings.environment, Environment::Development);
        assert_eq!(
            (port, timeout, blank, absent),
            (None, Duration::from_secs(30), None, None)
        );
        let err = env.finish().unwrap_err();
        let names: Vec<&str> = err.problems().iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "PALISADE_ENV",
                "PALISADE_FEATURES",
                "PALISADE_REDIS_URL",
                "PORT",
                "TIMEOUT",
                "BLANK",
                "ANTHROPIC_API_KEY"
            ]
        );
        let text = err.to_string();
        assert!(text.starts_with("invalid configuration: 7 problems\n  - PALISADE_ENV is invalid (\"staging\"): expected `development` or `production`; for example PALISADE_ENV=production"), "{text}");
        assert!(
            text.contains("PORT is invalid (\"99999\"): number too large"),
            "{text}"
        );
        assert!(
            text.contains("TIMEOUT is invalid (\"5 fortnights\"): unknown unit `fortnights`"),
            "{text}"
        );
        assert!(
            text.contains(
                "ANTHROPIC_API_KEY is missing; for example ANTHROPIC_API_KEY=sk-ant-api03-..."
            ),
            "{text}"
        );
        // secrets never appear in clear
        assert!(!text.contains("hunter2"), "{text}");
        // and it converts into a crate error that renders without internals
        let rendered = crate::Error::from(err).to_response(crate::ErrorFormat::ProblemJson);
        assert_eq!(rendered.status(), 500);
        assert!(!String::from_utf8_lossy(rendered.body().as_bytes()).contains("PORT"));
    }

    #[test]
    fn a_variable_read_twice_is_reported_once() {
        let mut env = Env::from_pairs([("PALISADE_ENV", "staging")]);
        let _ = Environment::from_env(&mut env);
        let _ = Settings::from_env(&mut env);
        let _ = Environment::from_env(&mut env);
        assert_eq!(env.problems().len(), 1);
    }

    #[test]
    fn settings_from_files() {
        let json: Settings = serde_json::from_str(
            r#"{"environment":"prod","features":["A","b"],"redis_url":"redis://127.0.0.1/"}"#,
        )
        .unwrap();
        assert!(json.environment.is_production());
        assert!(json.features.is_enabled("a") && json.features.is_enabled("B"));
        let toml: Settings = toml::from_str(
            "environment = \"development\"\nerror_format = \"anthropic\"\n[features]\nx = true\ny = false\n",
        )
        .unwrap();
        assert!(toml.features.is_enabled("x") && !toml.features.is_enabled("y"));
        assert_eq!(toml.error_format, ErrorFormat::Anthropic);
        assert_eq!(
            serde_json::from_str::<Settings>("{}").unwrap(),
            Settings::default()
        );
        let unknown = serde_json::from_str::<Settings>(r#"{"enviroment":"prod"}"#).unwrap_err();
        assert!(unknown.to_string().contains("unknown field `enviroment`"));
    }

    #[test]
    fn durations() {
        assert_eq!(duration::parse("0"), Ok(Duration::ZERO));
        assert_eq!(duration::parse("10"), Ok(Duration::from_secs(10)));
        assert_eq!(duration::parse("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(duration::parse("1d"), Ok(Duration::from_secs(86_400)));
        assert_eq!(duration::parse("5us"), Ok(Duration::from_micros(5)));
        assert!(duration::parse("").is_err());
        assert!(duration::parse("-1s").is_err());
        assert!(duration::parse("1e400s").is_err());
        for d in [
            Duration::from_secs(3),
            Duration::from_millis(1500),
            Duration::from_micros(7),
        ] {
            assert_eq!(duration::parse(&duration::format(d)), Ok(d));
        }
    }

    /// A duration with nanoseconds was written in whole microseconds (1 ns as `0us`), so
    /// a configuration serialised and read back changed.
    #[test]
    fn duration_format_round_trips_to_the_nanosecond() {
        for d in [
            Duration::from_nanos(1),
            Duration::from_nanos(1_500),
            Duration::new(2, 1),
            Duration::new(u64::MAX, 999_999_999),
        ] {
            assert_eq!(duration::parse(&duration::format(d)), Ok(d), "{d:?}");
        }
    }

    #[test]
    fn durations_add_up_their_parts() {
        let secs = Duration::from_secs;
        assert_eq!(duration::parse("1h30m"), Ok(secs(5400)));
        assert_eq!(duration::parse("1h 30m 15s"), Ok(secs(5415)));
        assert_eq!(duration::parse("2s500ms"), Ok(Duration::from_millis(2500)));
        assert_eq!(duration::parse("1d12h"), Ok(secs(129_600)));
        assert_eq!(duration::parse("90 seconds"), Ok(secs(90)));
        assert_eq!(duration::parse("2 minutes"), Ok(secs(120)));
        assert_eq!(duration::parse("250ns"), Ok(Duration::from_nanos(250)));
        assert_eq!(duration::parse("0.25h"), Ok(secs(900)));
        // A bare number is seconds only on its own.
        assert!(duration::parse("1m 30").is_err());
        assert!(duration::parse("1h-30m").is_err());
        assert!(duration::parse("h").is_err());
        assert!(duration::parse("1.2.3s").is_err());
        assert!(duration::parse("99999999999999999999999d").is_err());
        let err = duration::parse("3 fortnights").unwrap_err();
        assert!(err.contains("unknown unit `fortnights`"), "{err}");
    }

    #[test]
    fn error_format_parses_and_reads_the_shared_setting() {
        assert_eq!("Anthropic".parse(), Ok(ErrorFormat::Anthropic));
        for text in ["problem", "problem_json", "problem+json", " PROBLEM "] {
            assert_eq!(text.parse(), Ok(ErrorFormat::ProblemJson), "{text}");
        }
        let err = "xml".parse::<ErrorFormat>().unwrap_err();
        assert_eq!(err.value(), "xml");
        assert_eq!(err.to_string(), "expected `anthropic` or `problem`");
        for format in [ErrorFormat::Anthropic, ErrorFormat::ProblemJson] {
            assert_eq!(format.to_string().parse(), Ok(format));
            let json = serde_json::to_string(&format).unwrap();
            assert_eq!(json, format!("\"{format}\""));
        }
        assert_eq!(
            serde_json::from_str::<ErrorFormat>("\"problem\"").unwrap(),
            ErrorFormat::ProblemJson
        );

        let own = env_var("PALISADE_RATE_LIMIT", "error_format");
        let read = |pairs: &[(&str, &str)]| {
            let mut env = Env::from_pairs(pairs.iter().copied());
            let format = ErrorFormat::from_env_with_override(&mut env, &own);
            (format, env.problems().len())
        };
        assert_eq!(read(&[]), (ErrorFormat::ProblemJson, 0));
        assert_eq!(
            read(&[("PALISADE_ERROR_FORMAT", "anthropic")]),
            (ErrorFormat::Anthropic, 0)
        );
        assert_eq!(
            read(&[
                ("PALISADE_ERROR_FORMAT", "anthropic"),
                ("PALISADE_RATE_LIMIT_ERROR_FORMAT", "problem")
            ]),
            (ErrorFormat::ProblemJson, 0)
        );
        assert_eq!(
            read(&[("PALISADE_RATE_LIMIT_ERROR_FORMAT", "anthropic")]),
            (ErrorFormat::Anthropic, 0)
        );
        // A bad value is a problem, never silently the default.
        assert_eq!(
            read(&[("PALISADE_RATE_LIMIT_ERROR_FORMAT", "xml")]),
            (ErrorFormat::ProblemJson, 1)
        );
    }

    #[test]
    fn a_bad_shared_error_format_is_reported_once_for_every_layer() {
        let mut env = Env::from_pairs([("PALISADE_ERROR_FORMAT", "html")]);
        let _ = Settings::from_env(&mut env);
        let _ = ErrorFormat::from_env_with_override(&mut env, "PALISADE_RATE_LIMIT_ERROR_FORMAT");
        let _ = ErrorFormat::from_env_with_override(&mut env, "PALISADE_COST_ERROR_FORMAT");
        let err = env.finish().unwrap_err();
        assert_eq!(err.problems().len(), 1, "{err}");
        assert!(
            err.to_string().contains(
                "PALISADE_ERROR_FORMAT is invalid (\"html\"): expected `anthropic` or `problem`"
            ),
            "{err}"
        );
    }

    #[test]
    fn settings_debug_never_prints_the_redis_password() {
        let mut env = Env::from_pairs([(
            "PALISADE_REDIS_URL",
            "redis://default:hunter2-password@cache.internal:6379/0",
        )]);
        let settings = Settings::from_env(&mut env);
        env.finish().unwrap();
        let debug = format!("{settings:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(debug.contains("cache.internal:6379"), "{debug}");
    }

    #[test]
    fn env_debug_never_prints_values() {
        let env = Env::from_pairs([("ANTHROPIC_API_KEY", "sk-ant-api03-very-secret-value")]);
        let debug = format!("{env:?}");
        assert!(!debug.contains("very-secret"), "{debug}");
        assert!(debug.contains("ANTHROPIC_API_KEY"), "{debug}");
    }

    #[test]
    fn config_error_debug_reads_like_its_display() {
        let mut env = Env::from_pairs([("PALISADE_ENV", "staging")]);
        let _ = Settings::from_env(&mut env);
        let _: Option<String> = env.required("ANTHROPIC_API_KEY", "sk-ant-api03-...");
        let err = env.finish().unwrap_err();
        // `fn main() -> Result<(), ConfigError>` prints the error with `Debug`.
        assert_eq!(format!("{err:?}"), err.to_string());
        assert_eq!(
            format!("{err:?}"),
            "invalid configuration: 2 problems\n  \
             - PALISADE_ENV is invalid (\"staging\"): expected `development` or `production`; \
             for example PALISADE_ENV=production\n  \
             - ANTHROPIC_API_KEY is missing; for example ANTHROPIC_API_KEY=sk-ant-api03-..."
        );
    }

    #[test]
    fn optional_settings_read_none_and_off_in_any_case() {
        for unset in ["none", "off", " OFF ", "None"] {
            assert_eq!(parse_optional_duration(unset), Ok(None), "{unset}");
            assert_eq!(parse_optional::<u32>(unset), Ok(None), "{unset}");
        }
        assert_eq!(
            parse_optional_duration("30s"),
            Ok(Some(Duration::from_secs(30)))
        );
        assert_eq!(parse_optional::<u64>(" 42 "), Ok(Some(42)));
        assert!(parse_optional_duration("soon").is_err());
        assert!(parse_optional::<u32>("-1").is_err());
    }

    #[test]
    fn flags() {
        let flags: FeatureFlags = "A, b ,,c".parse().unwrap();
        assert_eq!(flags.iter().collect::<Vec<_>>(), ["a", "b", "c"]);
        assert!(flags.is_enabled(" A "));
        let mut flags = flags;
        flags.disable("B");
        assert!(!flags.is_enabled("b"));
    }
}
