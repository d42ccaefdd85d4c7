//! The gateway's configuration: every `PALISADE_GATEWAY_*` variable plus each layer's own
//! `PALISADE_*` variables, read in one pass so that every problem is reported at once.
//!
//! An optional file (`PALISADE_GATEWAY_ENV_FILE`, lines of `NAME=value`) supplies values the
//! process environment does not set; the environment always wins.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use palisade::ErrorFormat;
use palisade::circuit_breaker::CircuitBreakerConfig;
use palisade::config::{ConfigError, Env, Environment, ProblemKind, Settings};
use palisade::cost::alert::SpikeConfig;
use palisade::cost::budget::{BudgetConfig, BudgetRuleConfig, Period, Scope};
use palisade::cost::{CostConfig, Money};
use palisade::rate_limit::RateLimitConfig;
use palisade::retry::RetryConfig;
use palisade::security_headers::SecurityHeadersConfig;

/// Models the built-in mock upstream answers with a fault, for demos and tests: 529
/// `overloaded_error`, 500 `api_error`, and an answer delayed by
/// `PALISADE_GATEWAY_MOCK_SLOW_DELAY`.
pub const MOCK_FAULT_MODELS: [&str; 3] = ["mock-overloaded", "mock-error", "mock-slow"];

/// The models allowed when `PALISADE_GATEWAY_MODELS` is unset.
pub const DEFAULT_MODELS: [&str; 12] = [
    "claude-opus-4-7",
    "claude-opus-4-6",
    "claude-opus-4-5",
    "claude-opus-4-1",
    "claude-opus-4-0",
    "claude-sonnet-4-6",
    "claude-sonnet-4-5",
    "claude-sonnet-4-0",
    "claude-3-7-sonnet-latest",
    "claude-haiku-4-5",
    "claude-3-5-haiku-latest",
    "claude-3-haiku-20240307",
];

/// A named API key from `PALISADE_GATEWAY_API_KEYS` or `PALISADE_GATEWAY_ADMIN_KEYS`.
#[derive(Clone)]
pub struct NamedKey {
    /// Who the key belongs to (the user id in limits, usage and budgets).
    pub name: String,
    /// The key itself (hashed as soon as the key store is built).
    pub key: String,
}

impl std::fmt::Debug for NamedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NamedKey")
            .field("name", &self.name)
            .field("key", &palisade::key::redact(&self.key))
            .finish()
    }
}

/// Where the gateway sends `/v1/messages`.
#[derive(Clone)]
pub enum UpstreamTarget {
    /// The built-in mock, started on a free loopback port.
    Mock,
    /// A real Anthropic-compatible API.
    Remote {
        /// `https://api.anthropic.com` or any compatible base URL.
        base_url: String,
        /// Sent as `x-api-key`; never logged.
        api_key: String,
    },
}

impl std::fmt::Debug for UpstreamTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamTarget::Mock => f.write_str("Mock"),
            UpstreamTarget::Remote { base_url, .. } => f
                .debug_struct("Remote")
                .field("base_url", base_url)
                .field("api_key", &"[redacted]")
                .finish(),
        }
    }
}

/// The gateway's whole configuration.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Where to listen (`PALISADE_GATEWAY_ADDR`).
    pub addr: SocketAddr,
    /// Shared settings: environment, error format.
    pub settings: Settings,
    /// `false` when `PALISADE_GATEWAY_LAYERS=off`: the bare pass-through floor.
    pub layers: bool,
    /// The primary upstream.
    pub upstream: UpstreamTarget,
    /// Another base URL to fall back to (`PALISADE_GATEWAY_FALLBACK_BASE_URL`).
    pub fallback_base_url: Option<String>,
    /// Another model to fall back to (`PALISADE_GATEWAY_FALLBACK_MODEL`).
    pub fallback_model: Option<String>,
    /// User keys.
    pub api_keys: Vec<NamedKey>,
    /// Admin keys.
    pub admin_keys: Vec<NamedKey>,
    /// `true` when the demo keys are in use (printed at start-up).
    pub demo_keys: bool,
    /// Models a caller may ask for.
    pub models: BTreeSet<String>,
    /// The largest `max_tokens` accepted.
    pub max_tokens: u64,
    /// The largest request body, in bytes.
    pub max_body: usize,
    /// How long a client may take to send a request head (and to finish the TLS
    /// handshake) before its connection is closed (`PALISADE_GATEWAY_HEADER_TIMEOUT`).
    pub header_timeout: Duration,
    /// How long an open connection may go with no request in flight before it is closed
    /// gracefully (`PALISADE_GATEWAY_IDLE_TIMEOUT`): an HTTP/2 client that only answers
    /// pings, or an HTTP/1.1 keep-alive connection between requests.
    pub idle_timeout: Duration,
    /// How long a response may wait for its client to read before the connection is
    /// closed (`PALISADE_GATEWAY_WRITE_TIMEOUT`): a client that stops reading mid-answer
    /// (slow read) cannot hold a connection and its upstream stream forever.
    pub write_timeout: Duration,
    /// How long a request body may take to arrive (408 after that).
    pub body_timeout: Duration,
    /// The longest silence inside an upstream response body (a stream then ends with an
    /// `error` event).
    pub stream_idle_timeout: Duration,
    /// The model the orchestrator asks for bot drafts.
    pub orchestrator_model: String,
    /// Serve https with this certificate chain and key (PEM files).
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Where alerts (budget thresholds) are posted as JSON, besides the log
    /// (`PALISADE_GATEWAY_ALERT_WEBHOOK`). A secret (the URL often holds a token):
    /// `WebhookConfig`'s Debug shows its host only.
    pub alert_webhook: Option<palisade::cost::alert::WebhookConfig>,
    /// Spend-spike alerts (`PALISADE_GATEWAY_SPIKE_*`; `None` when switched off).
    pub spike: Option<SpikeConfig>,
    /// Shared state in Redis (`REDIS_URL`, with the `redis` feature): rate limits and
    /// budgets.
    #[cfg(feature = "redis")]
    pub redis: Option<palisade::rate_limit::RedisStoreConfig>,
    /// The PostgreSQL ledger (`DATABASE_URL`, with the `postgres` feature): usage records
    /// in `usage_logs`, security events in `audit_logs`.
    #[cfg(feature = "postgres")]
    pub database: Option<palisade::cost::sink::PostgresConfig>,
    /// Spend budgets (`PALISADE_BUDGET_*`); when `PALISADE_BUDGET_RULES` is unset, one
    /// budget named `daily` per user per UTC day of `PALISADE_GATEWAY_DAILY_BUDGET`.
    pub budget: BudgetConfig,
    /// How often each instance reads the users' own budget limits back from Redis
    /// (`PALISADE_GATEWAY_BUDGET_SYNC_INTERVAL`, with `REDIS_URL`).
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub budget_sync_interval: Duration,
    /// How long a budget reservation held in Redis lasts when it is never settled (a lost
    /// answer, an instance that died): `PALISADE_GATEWAY_BUDGET_HOLD_TTL`, with `REDIS_URL`.
    /// Set it above the longest request or stream the gateway serves.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub budget_hold_ttl: Duration,
    /// How long shutdown waits for in-flight requests and streams.
    pub shutdown_grace: Duration,
    /// Failed authentications a minute from one client address before its failures
    /// answer 429 (`PALISADE_GATEWAY_AUTH_FAILURES_PER_MINUTE`; 0: no limit).
    pub auth_failures_per_minute: u64,
    /// How long the mock's `mock-slow` model waits before answering.
    pub mock_slow_delay: Duration,
    /// JSON logs (`PALISADE_GATEWAY_LOG_FORMAT`, default: JSON in production).
    pub json_logs: bool,
    /// Which logs to write (`RUST_LOG`, default `info`).
    pub log_filter: String,
    /// The layers' own configurations.
    pub retry: RetryConfig,
    /// The circuit breaker (one per upstream).
    pub breaker: CircuitBreakerConfig,
    /// Rate-limit rules: the gateway's defaults ([`crate::app::default_rules`]) when
    /// `PALISADE_RATE_LIMIT_RULES` is unset, none when it is `[]`.
    pub rate_limit: RateLimitConfig,
    /// Security headers.
    pub security_headers: SecurityHeadersConfig,
    /// The cost meter and its usage queue.
    pub cost: CostConfig,
    /// Error tracking (`SENTRY_DSN`, with the `sentry` feature).
    #[cfg_attr(not(feature = "sentry"), allow(dead_code))]
    pub sentry: crate::sentry::SentryConfig,
}

/// The demo user key printed at start-up when no keys are configured.
pub const DEMO_USER_KEY: &str = "sk-demo-user-0000000000000000";
/// The demo admin key printed at start-up when no keys are configured.
pub const DEMO_ADMIN_KEY: &str = "sk-demo-admin-000000000000000";

impl GatewayConfig {
    /// Reads the process environment (and the optional env file).
    pub fn from_process() -> Result<Self, ConfigError> {
        let mut pairs: Vec<(String, String)> = std::env::vars().collect();
        let mut file_error = None;
        if let Some(path) = std::env::var_os("PALISADE_GATEWAY_ENV_FILE") {
            let path = PathBuf::from(path);
            match std::fs::read_to_string(&path) {
                Ok(text) => {
                    for (k, v) in parse_env_file(&text) {
                        if !pairs.iter().any(|(name, _)| *name == k) {
                            pairs.push((k, v));
                        }
                    }
                }
                Err(e) => {
                    file_error = Some(ProblemKind::Invalid {
                        value: path.display().to_string(),
                        reason: format!("cannot be read: {e}"),
                    })
                }
            }
        }
        let mut env = Env::from_pairs(pairs);
        if let Some(kind) = file_error {
            env.problem(
                "PALISADE_GATEWAY_ENV_FILE",
                kind,
                "examples/chat_gateway/load.env",
            );
        }
        let config = Self::from_env(&mut env);
        env.finish()?;
        Ok(config)
    }

    /// Reads every variable from `env`, recording every problem there.
    pub fn from_env(env: &mut Env) -> Self {
        let mut settings = Settings::from_env(env);
        if env.raw("PALISADE_ERROR_FORMAT").is_none() {
            // An Anthropic-compatible gateway answers in Anthropic's error format.
            settings.error_format = ErrorFormat::Anthropic;
        }
        let addr = env.optional(
            "PALISADE_GATEWAY_ADDR",
            SocketAddr::from(([127, 0, 0, 1], 8080)),
            "127.0.0.1:8080",
        );
        let layers = env.optional_with("PALISADE_GATEWAY_LAYERS", true, "on", |s| {
            match s.trim().to_ascii_lowercase().as_str() {
                "on" | "true" | "1" => Ok(true),
                "off" | "false" | "0" => Ok(false),
                _ => Err("expected `on` or `off`".into()),
            }
        });

        let base_url = env.raw("ANTHROPIC_BASE_URL").map(|s| s.trim().to_owned());
        let upstream = match base_url {
            None => UpstreamTarget::Mock,
            Some(url) => {
                if let Err(reason) = check_base_url(&url) {
                    env.problem(
                        "ANTHROPIC_BASE_URL",
                        ProblemKind::Invalid {
                            value: url.clone(),
                            reason,
                        },
                        "https://api.anthropic.com",
                    );
                }
                let api_key: Option<String> =
                    env.secret_with("ANTHROPIC_API_KEY", "sk-ant-api03-...", |s| {
                        Ok(s.trim().to_owned())
                    });
                if api_key.is_none() && env.raw("ANTHROPIC_API_KEY").is_none() {
                    env.problem(
                        "ANTHROPIC_API_KEY",
                        ProblemKind::Missing,
                        "sk-ant-api03-... (required with ANTHROPIC_BASE_URL)",
                    );
                }
                UpstreamTarget::Remote {
                    base_url: url.trim_end_matches('/').to_owned(),
                    api_key: api_key.unwrap_or_default(),
                }
            }
        };
        let fallback_base_url = env.optional_with(
            "PALISADE_GATEWAY_FALLBACK_BASE_URL",
            None,
            "https://fallback.example.com",
            |s| check_base_url(s.trim()).map(|()| Some(s.trim().trim_end_matches('/').to_owned())),
        );
        let fallback_model = env
            .raw("PALISADE_GATEWAY_FALLBACK_MODEL")
            .map(|s| s.trim().to_owned());

        let user_keys = keys_env(
            env,
            "PALISADE_GATEWAY_API_KEYS",
            "alice=sk-alice-...,bob=sk-bob-...",
        );
        let admin_keys = keys_env(env, "PALISADE_GATEWAY_ADMIN_KEYS", "ops=sk-admin-...");
        key_listed_twice(env, user_keys.as_deref(), admin_keys.as_deref());
        let demo_keys = user_keys.is_none() && admin_keys.is_none();
        let (api_keys, admin_keys) = if demo_keys {
            (
                vec![NamedKey {
                    name: "demo-user".into(),
                    key: DEMO_USER_KEY.into(),
                }],
                vec![NamedKey {
                    name: "demo-admin".into(),
                    key: DEMO_ADMIN_KEY.into(),
                }],
            )
        } else {
            (
                user_keys.unwrap_or_default(),
                admin_keys.unwrap_or_default(),
            )
        };

        let mock = matches!(upstream, UpstreamTarget::Mock);
        let models = env.optional_with(
            "PALISADE_GATEWAY_MODELS",
            default_models(mock),
            "claude-sonnet-4-5,claude-haiku-4-5",
            |s| {
                let set: BTreeSet<String> = s
                    .split(',')
                    .map(|m| m.trim().to_owned())
                    .filter(|m| !m.is_empty())
                    .collect();
                if set.is_empty() {
                    Err("name at least one model".into())
                } else {
                    Ok(set)
                }
            },
        );
        let auth_failures_per_minute = env.optional_with(
            "PALISADE_GATEWAY_AUTH_FAILURES_PER_MINUTE",
            60u64,
            "60 (0: no limit)",
            |s| s.trim().parse::<u64>().map_err(|e| e.to_string()),
        );
        let max_tokens = env.optional_with(
            "PALISADE_GATEWAY_MAX_TOKENS",
            64_000u64,
            "64000",
            |s| match s.trim().parse::<u64>() {
                Ok(0) => Err("must be at least 1".into()),
                Ok(n) => Ok(n),
                Err(e) => Err(e.to_string()),
            },
        );
        let max_body =
            env.optional_with("PALISADE_GATEWAY_MAX_BODY", 4 << 20, "4194304", |s| match s
                .trim()
                .parse::<usize>(
            ) {
                Ok(n) if n >= 1024 => Ok(n),
                Ok(_) => Err("must be at least 1024 bytes".into()),
                Err(e) => Err(e.to_string()),
            });
        let orchestrator_model = env.optional(
            "PALISADE_GATEWAY_ORCHESTRATOR_MODEL",
            "claude-haiku-4-5".to_owned(),
            "claude-haiku-4-5",
        );
        let daily_budget = env.optional_with(
            "PALISADE_GATEWAY_DAILY_BUDGET",
            Some(Money::from_picos(5 * Money::PICOS_PER_DOLLAR)),
            "5.00 (dollars per user per UTC day, or `none`)",
            |s| {
                if s.trim().eq_ignore_ascii_case("none") {
                    Ok(None)
                } else {
                    Money::parse_dollars(s.trim())
                        .map(Some)
                        .map_err(|e| e.to_string())
                }
            },
        );
        let budget_sync_interval = env.optional_with(
            "PALISADE_GATEWAY_BUDGET_SYNC_INTERVAL",
            Duration::from_secs(1),
            "1s",
            positive_duration,
        );
        let budget_hold_ttl = env.optional_with(
            "PALISADE_GATEWAY_BUDGET_HOLD_TTL",
            Duration::from_secs(15 * 60),
            "15m",
            positive_duration,
        );
        let shutdown_grace = env.optional_with(
            "PALISADE_GATEWAY_SHUTDOWN_GRACE",
            Duration::from_secs(30),
            "30s",
            at_most_a_day,
        );
        let body_timeout = env.optional_with(
            "PALISADE_GATEWAY_BODY_TIMEOUT",
            Duration::from_secs(30),
            "30s",
            server_deadline,
        );
        let header_timeout = env.optional_with(
            "PALISADE_GATEWAY_HEADER_TIMEOUT",
            Duration::from_secs(10),
            "10s",
            server_deadline,
        );
        let idle_timeout = env.optional_with(
            "PALISADE_GATEWAY_IDLE_TIMEOUT",
            Duration::from_secs(60),
            "60s",
            server_deadline,
        );
        let write_timeout = env.optional_with(
            "PALISADE_GATEWAY_WRITE_TIMEOUT",
            Duration::from_secs(30),
            "30s",
            server_deadline,
        );
        let stream_idle_timeout = env.optional_with(
            "PALISADE_GATEWAY_STREAM_IDLE_TIMEOUT",
            Duration::from_secs(120),
            "120s",
            server_deadline,
        );
        let mock_slow_delay = env.duration(
            "PALISADE_GATEWAY_MOCK_SLOW_DELAY",
            Duration::from_secs(5),
            "5s",
        );
        let log_filter = env.optional_with(
            "RUST_LOG",
            "info".to_owned(),
            "info,chat_gateway::audit=info",
            |s| {
                tracing_subscriber::EnvFilter::try_new(s.trim())
                    .map(|_| s.trim().to_owned())
                    .map_err(|e| e.to_string())
            },
        );
        let json_logs = env.optional_with(
            "PALISADE_GATEWAY_LOG_FORMAT",
            settings.environment == Environment::Production,
            "json",
            |s| match s.trim().to_ascii_lowercase().as_str() {
                "json" => Ok(true),
                "pretty" | "text" => Ok(false),
                _ => Err("expected `json` or `text`".into()),
            },
        );

        #[cfg_attr(
            not(feature = "redis"),
            allow(unused_variables, clippy::let_unit_value)
        )]
        let redis = redis_env(env);
        #[cfg_attr(
            not(feature = "postgres"),
            allow(unused_variables, clippy::let_unit_value)
        )]
        let database = database_env(env);
        let alert_webhook = env.secret_with(
            "PALISADE_GATEWAY_ALERT_WEBHOOK",
            "https://hooks.example.com/palisade",
            |s| {
                let url = s.trim();
                check_base_url(url).map(|()| palisade::cost::alert::WebhookConfig::new(url))
            },
        );
        let tls = tls_env(env);
        let spike = spike_env(env);

        let mut retry = RetryConfig::from_env(env);
        if env.raw("PALISADE_RETRY_ASSUME_IDEMPOTENT").is_none() {
            // The Messages API is safe to repeat the way Anthropic's own SDKs do: they retry
            // 500s and timeouts on POST too.
            retry.assume_idempotent = true;
        }
        if env.raw("PALISADE_RETRY_ATTEMPT_TIMEOUT").is_none() {
            retry.attempt_timeout = Some(Duration::from_secs(600));
        }
        let breaker = CircuitBreakerConfig::from_env(env);
        let mut rate_limit = RateLimitConfig::from_env(env);
        if env.raw("PALISADE_RATE_LIMIT_ERROR_FORMAT").is_none() {
            rate_limit.error_format = settings.error_format;
        }
        // Set, the variable replaces the gateway's rules, `[]` too (no route limits).
        if env.raw("PALISADE_RATE_LIMIT_RULES").is_none() {
            rate_limit.rules = crate::app::default_rules();
        }
        let mut budget = BudgetConfig::from_env(env);
        if env.raw("PALISADE_BUDGET_RULES").is_none()
            && let Some(limit) = daily_budget
        {
            budget.rules = vec![daily_rule(limit)];
        }
        if budget.error_format.is_none() {
            budget.error_format = Some(settings.error_format);
        }
        if mock && env.raw("PALISADE_BUDGET_ALLOW_UNPRICED").is_none() {
            // The mock's fault models (`mock-overloaded`, ...) have no price.
            budget.allow_unpriced = true;
        }
        if env.raw("PALISADE_BUDGET_MAX_BODY").is_none() {
            budget.max_body = max_body;
        }
        let security_headers = SecurityHeadersConfig::from_env(env);
        let sentry = crate::sentry::SentryConfig::from_env(env);
        let mut cost = CostConfig::from_env(env);
        if env.raw("PALISADE_COST_HEADERS").is_none() {
            cost.headers = true;
        }
        if env.raw("PALISADE_COST_SSE_COMMENT").is_none() {
            // SSE clients, the Anthropic SDKs among them, skip comment lines.
            cost.sse_comment = true;
        }

        Self {
            addr,
            settings,
            layers,
            upstream,
            fallback_base_url,
            fallback_model,
            api_keys,
            admin_keys,
            demo_keys,
            models,
            max_tokens,
            max_body,
            header_timeout,
            idle_timeout,
            write_timeout,
            body_timeout,
            stream_idle_timeout,
            orchestrator_model,
            budget,
            alert_webhook,
            spike,
            #[cfg(feature = "redis")]
            redis,
            #[cfg(feature = "postgres")]
            database,
            tls,
            budget_sync_interval,
            budget_hold_ttl,
            shutdown_grace,
            auth_failures_per_minute,
            mock_slow_delay,
            json_logs,
            log_filter,
            retry,
            breaker,
            rate_limit,
            security_headers,
            cost,
            sentry,
        }
    }

    /// How refusals are rendered.
    pub fn error_format(&self) -> ErrorFormat {
        self.settings.error_format
    }

    /// Whether a fallback is configured.
    pub fn has_fallback(&self) -> bool {
        self.fallback_base_url.is_some() || self.fallback_model.is_some()
    }
}

/// The settings of the Redis store (`REDIS_URL`).
#[cfg(feature = "redis")]
type RedisSettings = Option<palisade::rate_limit::RedisStoreConfig>;
#[cfg(not(feature = "redis"))]
type RedisSettings = ();

/// `REDIS_URL`: one server's URL, or a comma-separated list of Cluster nodes; the rate-limit
/// store's own `PALISADE_RATE_LIMIT_REDIS_*` settings (fail mode, timeout, ...) apply.
/// Without the `redis` feature, a set `REDIS_URL` is a problem that says how to build.
fn redis_env(env: &mut Env) -> RedisSettings {
    // Other names for a Redis address: read by palisade's own readers, never by the
    // gateway, so each is refused rather than left to keep state in memory unsaid.
    for name in [
        "PALISADE_REDIS_URL",
        "PALISADE_RATE_LIMIT_REDIS_URL",
        "PALISADE_RATE_LIMIT_REDIS_CLUSTER_NODES",
    ] {
        if env.raw(name).is_some() {
            env.problem(
                name,
                ProblemKind::Invalid {
                    value: "[redacted]".into(),
                    reason: "the gateway reads its Redis address from REDIS_URL only \
                             (a comma-separated node list is a Cluster): set REDIS_URL \
                             instead"
                        .into(),
                },
                "(unset; REDIS_URL=redis://127.0.0.1:6379/)",
            );
        }
    }
    let url: Option<String> = env.secret_with(
        "REDIS_URL",
        "redis://127.0.0.1:6379/ (or redis://10.0.0.1:7000/,redis://10.0.0.2:7000/ for a Cluster)",
        |s| Ok(s.trim().to_owned()),
    );
    #[cfg(feature = "redis")]
    {
        let mut store = palisade::rate_limit::RedisStoreConfig::from_env(env);
        let url = url?;
        if url
            .split(',')
            .map(str::trim)
            .any(|n| !(n.is_empty() || n.starts_with("redis://") || n.starts_with("rediss://")))
        {
            env.problem(
                "REDIS_URL",
                ProblemKind::Invalid {
                    value: "[redacted]".into(),
                    reason: "every URL must start with redis:// or rediss://".into(),
                },
                "redis://127.0.0.1:6379/",
            );
            return None;
        }
        let nodes: Vec<String> = url
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(str::to_owned)
            .collect();
        if nodes.len() > 1 {
            store.cluster_nodes = nodes;
            store.url = None;
            // The gateway's rules key users and IPs alike: one slot for them all, so that
            // a reset or a group of keys never spans nodes.
            if store.hash_tag.is_none() {
                store.hash_tag = Some("palisade-gateway".to_owned());
            }
        } else {
            store.url = Some(url);
        }
        Some(store)
    }
    #[cfg(not(feature = "redis"))]
    if url.is_some() {
        env.problem(
            "REDIS_URL",
            ProblemKind::Invalid {
                value: "[redacted]".into(),
                reason: "this build has no Redis support: run with `--features redis` (cargo run --example chat_gateway --features redis), or unset it".into(),
            },
            "(unset)",
        );
    }
}

/// The settings of the PostgreSQL ledger (`DATABASE_URL`).
#[cfg(feature = "postgres")]
type DatabaseSettings = Option<palisade::cost::sink::PostgresConfig>;
#[cfg(not(feature = "postgres"))]
type DatabaseSettings = ();

/// `DATABASE_URL`: a `postgres://` URL (or a `key=value` connection string). Without the
/// `postgres` feature, a set `DATABASE_URL` is a problem that says how to build.
fn database_env(env: &mut Env) -> DatabaseSettings {
    let url: Option<String> = env.secret_with(
        "DATABASE_URL",
        "postgres://palisade@127.0.0.1:5432/palisade",
        |s| Ok(s.trim().to_owned()),
    );
    #[cfg(feature = "postgres")]
    {
        let url = url?;
        let reason = if url.contains("://")
            && !(url.starts_with("postgres://") || url.starts_with("postgresql://"))
        {
            Some("must start with postgres:// or postgresql://".to_owned())
        } else {
            <tokio_postgres::Config as std::str::FromStr>::from_str(&url)
                .err()
                .map(|e| format!("not a PostgreSQL connection string: {e}"))
        };
        if let Some(reason) = reason {
            env.problem(
                "DATABASE_URL",
                ProblemKind::Invalid {
                    value: "[redacted]".into(),
                    reason,
                },
                "postgres://palisade@127.0.0.1:5432/palisade",
            );
            return None;
        }
        Some(palisade::cost::sink::PostgresConfig::new(url))
    }
    #[cfg(not(feature = "postgres"))]
    if url.is_some() {
        env.problem(
            "DATABASE_URL",
            ProblemKind::Invalid {
                value: "[redacted]".into(),
                reason: "this build has no PostgreSQL support: run with `--features postgres` (cargo run --example chat_gateway --features postgres), or unset it".into(),
            },
            "(unset)",
        );
    }
}

/// `PALISADE_GATEWAY_SPIKE_*`: a user's spend in the last `WINDOW` above `MULTIPLE` times
/// their trailing average (and at least `MIN_SPEND` dollars) is an alert, once per window.
fn spike_env(env: &mut Env) -> Option<SpikeConfig> {
    let on = env.optional_with("PALISADE_GATEWAY_SPIKE_ALERTS", true, "on", |s| {
        match s.trim().to_ascii_lowercase().as_str() {
            "on" | "true" | "1" => Ok(true),
            "off" | "false" | "0" => Ok(false),
            _ => Err("expected `on` or `off`".into()),
        }
    });
    let mut spike = SpikeConfig::default();
    // The detector counts spend in whole milliseconds.
    spike.window = env.optional_with("PALISADE_GATEWAY_SPIKE_WINDOW", spike.window, "5m", |s| {
        match palisade::config::duration::parse(s)? {
            d if d < Duration::from_millis(1) => Err("must be at least 1ms".into()),
            d => Ok(d),
        }
    });
    spike.multiple = env.optional_with(
        "PALISADE_GATEWAY_SPIKE_MULTIPLE",
        spike.multiple,
        "3",
        |s| match s.trim().parse::<f64>() {
            Ok(m) if m.is_finite() && m >= 1.0 => Ok(m),
            Ok(_) => Err("must be a number of at least 1".into()),
            Err(e) => Err(e.to_string()),
        },
    );
    spike.min_spend = env.optional_with(
        "PALISADE_GATEWAY_SPIKE_MIN_SPEND",
        spike.min_spend.clone(),
        "1.00 (dollars)",
        |s| {
            Money::parse_dollars(s.trim())
                .map(|_| s.trim().to_owned())
                .map_err(|e| e.to_string())
        },
    );
    on.then_some(spike)
}

/// The name of the per-user daily budget that `/admin/budgets/{user}` shows and sets.
pub const DAILY_BUDGET: &str = "daily";

/// The default budget: `limit` per user per UTC day.
fn daily_rule(limit: Money) -> BudgetRuleConfig {
    BudgetRuleConfig {
        name: DAILY_BUDGET.to_owned(),
        scope: Scope::User,
        period: Period::Day,
        limit: limit.dollars_string(),
        thresholds: vec![0.5, 0.8, 1.0],
    }
}

/// `PALISADE_GATEWAY_TLS_CERT` and `_KEY`: both or neither, and they must load.
fn tls_env(env: &mut Env) -> Option<(PathBuf, PathBuf)> {
    const CERT: &str = "PALISADE_GATEWAY_TLS_CERT";
    const KEY: &str = "PALISADE_GATEWAY_TLS_KEY";
    let cert = env.raw(CERT).map(|s| PathBuf::from(s.trim()));
    let key = env.raw(KEY).map(|s| PathBuf::from(s.trim()));
    match (cert, key) {
        (None, None) => None,
        (Some(_), None) => {
            env.problem(
                KEY,
                ProblemKind::Missing,
                "key.pem (with PALISADE_GATEWAY_TLS_CERT)",
            );
            None
        }
        (None, Some(_)) => {
            env.problem(
                CERT,
                ProblemKind::Missing,
                "cert.pem (with PALISADE_GATEWAY_TLS_KEY)",
            );
            None
        }
        (Some(cert), Some(key)) => match crate::tls::load(&cert, &key) {
            Ok(_) => Some((cert, key)),
            Err(reason) => {
                env.problem(
                    CERT,
                    ProblemKind::Invalid {
                        value: cert.display().to_string(),
                        reason,
                    },
                    "cert.pem (a PEM certificate chain; the key in PALISADE_GATEWAY_TLS_KEY)",
                );
                None
            }
        },
    }
}

/// A duration in the human format, longer than zero.
fn positive_duration(s: &str) -> Result<Duration, String> {
    match palisade::config::duration::parse(s) {
        Ok(d) if d.is_zero() => Err("must be longer than 0".into()),
        Ok(d) => Ok(d),
        Err(e) => Err(e.to_string()),
    }
}

/// A wait the gateway adds to the clock that may be 0 (the shutdown grace: 0 stops without
/// waiting), at most a day.
fn at_most_a_day(s: &str) -> Result<Duration, String> {
    match palisade::config::duration::parse(s)? {
        d if d > Duration::from_secs(24 * 60 * 60) => Err("must be at most 24h".into()),
        d => Ok(d),
    }
}

/// A deadline the gateway adds to the clock (the server loop's header, idle and write
/// timeouts, the upstream stream's idle timeout): positive, and at most a day, so that
/// adding it never overflows (a connection's or a request's task would panic on it).
fn server_deadline(s: &str) -> Result<Duration, String> {
    const LONGEST: Duration = Duration::from_secs(24 * 60 * 60);
    match positive_duration(s)? {
        d if d > LONGEST => Err("must be at most 24h".into()),
        d => Ok(d),
    }
}

fn default_models(mock: bool) -> BTreeSet<String> {
    let mut set: BTreeSet<String> = DEFAULT_MODELS.iter().map(|m| (*m).to_owned()).collect();
    if mock {
        set.extend(MOCK_FAULT_MODELS.iter().map(|m| (*m).to_owned()));
    }
    set
}

fn check_base_url(url: &str) -> Result<(), String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err("must start with http:// or https://".into()),
    }
    if uri.host().is_none() {
        return Err("has no host".into());
    }
    Ok(())
}

/// `name=key` pairs, comma-separated. `None` when unset; an invalid value is a problem.
fn keys_env(env: &mut Env, name: &str, example: &str) -> Option<Vec<NamedKey>> {
    env.secret_with(name, example, |s| {
        let mut keys = Vec::new();
        for (i, pair) in s
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .enumerate()
        {
            let Some((who, key)) = pair.split_once('=') else {
                return Err(format!("entry {} is not `name=key`", i + 1));
            };
            let (who, key) = (who.trim(), key.trim());
            if who.is_empty() || key.is_empty() {
                return Err(format!("entry {} has an empty name or key", i + 1));
            }
            if !who
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.@".contains(&b))
            {
                return Err(format!(
                    "entry {}: a name may hold letters, digits and - _ . @",
                    i + 1
                ));
            }
            if key.len() < 16 {
                return Err(format!(
                    "entry {} ({who}): a key must be at least 16 characters",
                    i + 1
                ));
            }
            keys.push(NamedKey {
                name: who.to_owned(),
                key: key.to_owned(),
            });
        }
        if keys.is_empty() {
            return Err("no keys".into());
        }
        Ok(keys)
    })
}

/// One key under two names, in either list: the first entry would win every request, so
/// the other would never authenticate (an admin named after a user with the same key would
/// lose the admin routes). A problem naming both entries, never the key.
fn key_listed_twice(env: &mut Env, users: Option<&[NamedKey]>, admins: Option<&[NamedKey]>) {
    const USERS: &str = "PALISADE_GATEWAY_API_KEYS";
    const ADMINS: &str = "PALISADE_GATEWAY_ADMIN_KEYS";
    let all: Vec<(&str, &NamedKey)> = users
        .unwrap_or_default()
        .iter()
        .map(|k| (USERS, k))
        .chain(admins.unwrap_or_default().iter().map(|k| (ADMINS, k)))
        .collect();
    for (i, (var, key)) in all.iter().enumerate() {
        if let Some((first_var, first)) = all[..i].iter().find(|(_, k)| k.key == key.key) {
            env.problem(
                var,
                ProblemKind::Invalid {
                    value: "[redacted]".into(),
                    reason: format!(
                        "the key of `{}` is listed twice (as `{}` in {first_var}): give each \
                         name its own key",
                        key.name, first.name
                    ),
                },
                "alice=sk-alice-...,bob=sk-bob-...",
            );
            return;
        }
    }
}

/// Parses `NAME=value` lines; blank lines and `#` comments are skipped, and one pair of
/// surrounding quotes is removed.
pub fn parse_env_file(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let l = l.strip_prefix("export ").unwrap_or(l);
            let (k, v) = l.split_once('=')?;
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .or_else(|| v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
                .unwrap_or(v);
            Some((k.trim().to_owned(), v.to_owned()))
        })
        .collect()
}
