//! `RateLimitConfig`: the layer's configuration from files or the environment.

use std::time::Duration;

use http::Method;
use serde::{Deserialize, Serialize};

use super::builder::FailMode;
use super::error::{ParseIpNetError, ParseKeySourceError, RateLimitConfigError};
use super::key::{KeySource, TrustedProxies};
use super::layer::RateLimitLayer;
use super::quota::{Algorithm, Quota};
use super::rule::{Cost, Route, Rule};
use super::store::{DEFAULT_RESET_RETENTION, MemoryStore, Store, memory, reset_retention_micros};
use crate::clock::ClockSource;
use crate::config::{Env, ProblemKind, env_var};
use crate::error::ErrorFormat;

/// The prefix of the rate limiter's environment variables.
pub(crate) const ENV_PREFIX: &str = "PALISADE_RATE_LIMIT";

/// How a rule's cost is found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CostMode {
    /// `cost` units per request.
    #[default]
    Fixed,
    /// The `RequestCost` extension, or `cost` without one.
    Extension,
    /// Reserve the `RequestCost` extension (or `cost`) and settle later.
    Settled,
}

/// One rule, as written in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuleConfig {
    /// Unique name, shown in headers (`chat`).
    pub name: String,
    /// Only this method (`POST`); any when unset.
    pub method: Option<String>,
    /// `*`, an exact path, `/prefix/*` or a template with `{param}` segments.
    pub route: String,
    /// `global`, `principal`, `api_key`, `ip`, `principal_or_ip` or `header:<name>`.
    pub key: String,
    /// The algorithm.
    pub algorithm: Algorithm,
    /// Units per window.
    pub limit: u64,
    /// The window (`1m`).
    #[serde(with = "crate::config::duration")]
    pub window: Duration,
    /// GCRA burst (defaults to the limit).
    pub burst: Option<u64>,
    /// Strict sliding window.
    pub strict: bool,
    /// Units per request (or the default / estimate, see `cost_mode`).
    pub cost: u64,
    /// How the cost is found.
    pub cost_mode: CostMode,
    /// Decide and log, never refuse.
    pub shadow: bool,
    /// Skip requests without a key instead of counting them as `anonymous`.
    pub skip_anonymous: bool,
}

impl Default for RuleConfig {
    fn default() -> Self {
        Self {
            name: String::new(),
            method: None,
            route: "*".into(),
            key: "global".into(),
            algorithm: Algorithm::SlidingWindow,
            limit: 60,
            window: Duration::from_secs(60),
            burst: None,
            strict: false,
            cost: 1,
            cost_mode: CostMode::Fixed,
            shadow: false,
            skip_anonymous: false,
        }
    }
}

impl RuleConfig {
    /// The rule this configuration describes.
    pub fn to_rule(&self) -> Result<Rule, RateLimitConfigError> {
        let invalid = |field: &'static str, reason: String| RateLimitConfigError::Invalid {
            rule: self.name.clone(),
            field,
            reason,
        };
        let mut quota = Quota::new(self.limit, self.window);
        if let Some(b) = self.burst {
            quota = quota.with_burst(b);
        }
        let route = Route::parse(&self.route).map_err(|r| invalid("route", r.to_string()))?;
        let key: KeySource = self
            .key
            .parse()
            .map_err(|r: ParseKeySourceError| invalid("key", r.to_string()))?;
        let cost = match self.cost_mode {
            CostMode::Fixed => Cost::Fixed(self.cost),
            CostMode::Extension => Cost::Extension { default: self.cost },
            CostMode::Settled => Cost::Settled {
                estimate: self.cost,
            },
        };
        let mut rule = Rule::new(self.name.as_str(), quota)
            .route(route)
            .key(key)
            .algorithm(self.algorithm)
            .strict(self.strict)
            .cost(cost)
            .shadow(self.shadow)
            .skip_anonymous(self.skip_anonymous);
        if let Some(m) = &self.method {
            let method = Method::from_bytes(m.trim().to_ascii_uppercase().as_bytes())
                .map_err(|_| invalid("method", format!("`{m}` is not an HTTP method")))?;
            rule = rule.method(method);
        }
        rule.validate()?;
        Ok(rule)
    }
}

impl From<&Rule> for RuleConfig {
    /// The configuration that describes `rule`, so that a preset can be listed, adjusted
    /// and built like any configured rule.
    ///
    /// ```
    /// use palisade::rate_limit::{Rule, RuleConfig};
    /// let mut chat = RuleConfig::from(&Rule::chat());
    /// assert_eq!((chat.route.as_str(), chat.key.as_str(), chat.limit), ("/v1/messages", "api_key", 20));
    /// chat.limit = 60;
    /// assert_eq!(chat.to_rule().unwrap().quota().limit(), 60);
    /// ```
    fn from(rule: &Rule) -> Self {
        let (cost, cost_mode) = match rule.cost {
            Cost::Fixed(n) => (n, CostMode::Fixed),
            Cost::Extension { default } => (default, CostMode::Extension),
            Cost::Settled { estimate } => (estimate, CostMode::Settled),
        };
        let quota = rule.quota;
        Self {
            name: rule.name.to_string(),
            method: rule.method.as_ref().map(ToString::to_string),
            route: rule.route.to_string(),
            key: rule.key.to_string(),
            algorithm: rule.algorithm,
            limit: quota.limit(),
            window: quota.window(),
            burst: (quota.burst() != quota.limit()).then(|| quota.burst()),
            strict: rule.strict,
            cost,
            cost_mode,
            shadow: rule.shadow,
            skip_anonymous: rule.skip_anonymous,
        }
    }
}

/// The rate limiter's configuration.
///
/// ```
/// use palisade::rate_limit::RateLimitConfig;
///
/// let cfg: RateLimitConfig = toml::from_str(r#"
///     legacy_headers = true
///     [[rules]]
///     name = "chat"
///     method = "POST"
///     route = "/v1/messages"
///     key = "api_key"
///     limit = 20
///     window = "1m"
/// "#).unwrap();
/// let layer = cfg.build().unwrap();
/// assert_eq!(layer.limiter().rules(), ["chat"]);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitConfig {
    /// The rules, all checked together for each request.
    pub rules: Vec<RuleConfig>,
    /// Memory store: the bound on resident keys.
    pub max_entries: usize,
    /// Memory store: the number of shards.
    pub shards: usize,
    /// Memory store: where it reads time (`tokio`, `fast` or `coarse`; see
    /// [`clock`](crate::clock)).
    pub clock: ClockSource,
    /// Memory store: how long a reset key keeps its generation at least (1 ms to 24 h;
    /// see [`MemoryStoreBuilder::reset_retention`](super::MemoryStoreBuilder::reset_retention)).
    #[serde(with = "crate::config::duration")]
    pub reset_retention: Duration,
    /// How refusals are rendered.
    pub error_format: ErrorFormat,
    /// Send `RateLimit-Policy` and `RateLimit`.
    pub draft_headers: bool,
    /// Send `X-RateLimit-Limit/Remaining/Reset`.
    pub legacy_headers: bool,
    /// Networks whose `X-Forwarded-For` is believed (`10.0.0.0/8`).
    pub trusted_proxies: Vec<String>,
    /// What to do when the store fails.
    pub on_store_error: FailMode,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            rules: Vec::new(),
            max_entries: memory::DEFAULT_MAX_ENTRIES,
            shards: memory::DEFAULT_SHARDS,
            clock: ClockSource::Tokio,
            reset_retention: DEFAULT_RESET_RETENTION,
            error_format: ErrorFormat::default(),
            draft_headers: true,
            legacy_headers: false,
            trusted_proxies: Vec::new(),
            on_store_error: FailMode::Closed,
        }
    }
}

impl RateLimitConfig {
    /// Reads `PALISADE_RATE_LIMIT_*`, recording every problem in `env`. Each variable is
    /// named after its field through [`env_var`]`("PALISADE_RATE_LIMIT", field)`:
    ///
    /// | variable | example |
    /// |---|---|
    /// | `PALISADE_RATE_LIMIT_RULES` | `[{"name":"chat","key":"api_key","limit":20,"window":"1m"}]` (JSON) |
    /// | `PALISADE_RATE_LIMIT_MAX_ENTRIES` | `1000000` |
    /// | `PALISADE_RATE_LIMIT_SHARDS` | `64` |
    /// | `PALISADE_RATE_LIMIT_CLOCK` | `tokio`, `fast` or `coarse` |
    /// | `PALISADE_RATE_LIMIT_RESET_RETENTION` | `1h` |
    /// | `PALISADE_RATE_LIMIT_ERROR_FORMAT` | `anthropic` or `problem` (default: the shared `PALISADE_ERROR_FORMAT`) |
    /// | `PALISADE_RATE_LIMIT_DRAFT_HEADERS` | `true` |
    /// | `PALISADE_RATE_LIMIT_LEGACY_HEADERS` | `false` |
    /// | `PALISADE_RATE_LIMIT_TRUSTED_PROXIES` | `10.0.0.0/8,192.168.1.1` |
    /// | `PALISADE_RATE_LIMIT_ON_STORE_ERROR` | `closed` or `open` |
    ///
    /// Refusals render in the shared `PALISADE_ERROR_FORMAT` (as every layer's do) unless
    /// `PALISADE_RATE_LIMIT_ERROR_FORMAT` overrides it. Rules are also checked here
    /// (routes, keys, duplicate names), so a bad rule is reported with the rest.
    ///
    /// ```
    /// use palisade::config::Env;
    /// use palisade::rate_limit::RateLimitConfig;
    /// use palisade::ErrorFormat;
    ///
    /// let mut env = Env::from_pairs([
    ///     ("PALISADE_ERROR_FORMAT", "anthropic"),
    ///     ("PALISADE_RATE_LIMIT_RULES", r#"[{"name":"chat","key":"api_key","limit":20,"window":"1m"}]"#),
    /// ]);
    /// let cfg = RateLimitConfig::from_env(&mut env);
    /// env.finish().unwrap();
    /// assert_eq!(cfg.error_format, ErrorFormat::Anthropic);
    /// ```
    pub fn from_env(env: &mut Env) -> Self {
        let d = Self::default();
        let var = |field: &str| env_var(ENV_PREFIX, field);
        const RULES_EXAMPLE: &str = r#"[{"name":"chat","key":"api_key","limit":20,"window":"1m"}]"#;
        let rules_var = var("rules");
        let rules: Vec<RuleConfig> =
            env.optional_with(&rules_var, Vec::new(), RULES_EXAMPLE, |s| {
                serde_json::from_str(s).map_err(|e| e.to_string())
            });
        for (i, rule) in rules.iter().enumerate() {
            let reason = match rule.to_rule() {
                Err(e) => e.to_string(),
                Ok(_) if rules[..i].iter().any(|r| r.name == rule.name) => {
                    RateLimitConfigError::DuplicateRule {
                        rule: rule.name.clone(),
                    }
                    .to_string()
                }
                Ok(_) => continue,
            };
            env.problem(
                &rules_var,
                ProblemKind::Invalid {
                    value: rule.name.clone(),
                    reason,
                },
                RULES_EXAMPLE,
            );
        }
        let max_entries_var = var("max_entries");
        let max_entries = env.optional(&max_entries_var, d.max_entries, "1000000");
        if max_entries == 0 {
            env.problem(
                &max_entries_var,
                ProblemKind::Invalid {
                    value: "0".into(),
                    reason: RateLimitConfigError::ZeroCapacity.to_string(),
                },
                "1000000",
            );
        }
        let shards = env.optional(&var("shards"), d.shards, "64");
        let clock = env.optional(&var("clock"), d.clock, "coarse");
        let retention_var = var("reset_retention");
        let reset_retention = env.duration(&retention_var, d.reset_retention, "1h");
        if reset_retention_micros(reset_retention).is_none() {
            let value = env.raw(&retention_var).unwrap_or_default().to_owned();
            env.problem(
                &retention_var,
                ProblemKind::Invalid {
                    value,
                    reason: RateLimitConfigError::InvalidResetRetention.to_string(),
                },
                "1h",
            );
        }
        // The shared setting, unless this layer's own overrides it.
        let error_format = ErrorFormat::from_env_with_override(env, &var("error_format"));
        let draft_headers = env.optional(&var("draft_headers"), d.draft_headers, "true");
        let legacy_headers = env.optional(&var("legacy_headers"), d.legacy_headers, "false");
        let trusted_proxies = env.optional_with(
            &var("trusted_proxies"),
            Vec::new(),
            "10.0.0.0/8,192.168.1.1",
            |s| {
                s.parse::<TrustedProxies>().map_err(|e| e.to_string())?;
                Ok(s.split(',')
                    .map(|p| p.trim().to_owned())
                    .filter(|p| !p.is_empty())
                    .collect())
            },
        );
        let on_store_error = env.optional_with(
            &var("on_store_error"),
            d.on_store_error,
            "closed",
            |s| match s.trim().to_ascii_lowercase().as_str() {
                "closed" => Ok(FailMode::Closed),
                "open" => Ok(FailMode::Open),
                _ => Err("expected `closed` or `open`".to_owned()),
            },
        );
        Self {
            rules,
            max_entries,
            shards,
            clock,
            reset_retention,
            error_format,
            draft_headers,
            legacy_headers,
            trusted_proxies,
            on_store_error,
        }
    }

    /// Builds the layer with an in-memory store sized by this configuration.
    pub fn build(&self) -> Result<RateLimitLayer<MemoryStore>, RateLimitConfigError> {
        let store = MemoryStore::builder()
            .max_entries(self.max_entries)
            .shards(self.shards)
            .clock(self.clock)
            .reset_retention(self.reset_retention)
            .build()?;
        self.build_with_store(store)
    }

    /// Builds the layer over another store.
    pub fn build_with_store<St: Store>(
        &self,
        store: St,
    ) -> Result<RateLimitLayer<St>, RateLimitConfigError> {
        let proxies = TrustedProxies::new(
            self.trusted_proxies
                .iter()
                .map(|p| {
                    p.parse()
                        .map_err(|reason: ParseIpNetError| RateLimitConfigError::Invalid {
                            rule: "*".into(),
                            field: "trusted_proxies",
                            reason: reason.to_string(),
                        })
                })
                .collect::<Result<Vec<_>, _>>()?,
        );
        let rules = self
            .rules
            .iter()
            .map(RuleConfig::to_rule)
            .collect::<Result<Vec<_>, _>>()?;
        RateLimitLayer::builder()
            .store(store)
            .rules(rules)
            .error_format(self.error_format)
            .draft_headers(self.draft_headers)
            .legacy_headers(self.legacy_headers)
            .trusted_proxies(proxies)
            .on_store_error(self.on_store_error)
            .build()
    }
}
