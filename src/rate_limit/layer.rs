//! `RateLimitLayer`: the rules, shared by every service it builds.

use std::fmt;
use std::sync::Arc;

use tower_layer::Layer;

use super::builder::{FailMode, RateLimitLayerBuilder};
use super::limiter::RateLimiter;
use super::service::RateLimit;
use super::shared::Shared;
use crate::error::ErrorFormat;
use crate::rate_limit::error::RateLimitConfigError;
use crate::rate_limit::key::TrustedProxies;
use crate::rate_limit::rule::Rule;
use crate::rate_limit::store::{MemoryStore, Store};

/// Applies rate-limit rules to requests; builds [`RateLimit`] services.
///
/// Cloning is cheap (one `Arc`), and every clone (and every service it builds) shares the
/// same rules, store, overrides and counters. See the [module docs](super) for an example.
#[must_use]
pub struct RateLimitLayer<St = MemoryStore> {
    pub(super) shared: Arc<Shared<St>>,
}

impl<St> Clone for RateLimitLayer<St> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<St> fmt::Debug for RateLimitLayer<St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitLayer")
            .field(
                "rules",
                &self
                    .shared
                    .rules
                    .iter()
                    .map(|r| &*r.rule.name)
                    .collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl RateLimitLayer<MemoryStore> {
    /// A builder with the in-memory store, RFC 9457 errors and the draft headers.
    pub fn builder() -> RateLimitLayerBuilder<MemoryStore> {
        RateLimitLayerBuilder {
            rules: Vec::new(),
            store: MemoryStore::new(),
            format: ErrorFormat::default(),
            draft_headers: true,
            legacy_headers: false,
            proxies: TrustedProxies::none(),
            fail_mode: FailMode::Closed,
        }
    }

    /// A layer enforcing `rules` with the defaults.
    pub fn new(rules: impl IntoIterator<Item = Rule>) -> Result<Self, RateLimitConfigError> {
        Self::builder().rules(rules).build()
    }

    /// The layer a [`RateLimitConfig`](super::RateLimitConfig) describes, with an
    /// in-memory store sized by it.
    ///
    /// ```
    /// use palisade::rate_limit::{RateLimitConfig, RateLimitLayer, RuleConfig};
    ///
    /// let config = RateLimitConfig {
    ///     rules: vec![RuleConfig { name: "chat".into(), key: "api_key".into(), limit: 20, ..Default::default() }],
    ///     ..Default::default()
    /// };
    /// let layer = RateLimitLayer::from_config(config).unwrap();
    /// assert_eq!(layer.limiter().rules(), ["chat"]);
    /// ```
    pub fn from_config(config: super::RateLimitConfig) -> Result<Self, RateLimitConfigError> {
        config.build()
    }

    /// The layer the process environment describes (`PALISADE_RATE_LIMIT_*` and the shared
    /// `PALISADE_ERROR_FORMAT`, see [`RateLimitConfig::from_env`](super::RateLimitConfig::from_env)),
    /// reporting every problem at once. Its store is the memory store: a set
    /// `PALISADE_RATE_LIMIT_REDIS_URL` or `_CLUSTER_NODES` is a problem, since building a
    /// Redis store connects (`RedisStoreConfig::from_env`, then the async
    /// `RedisStore::from_config`, then [`builder`](Self::builder)`().store(..)`).
    ///
    /// ```no_run
    /// # fn main() -> Result<(), palisade::config::ConfigError> {
    /// // PALISADE_RATE_LIMIT_RULES='[{"name":"chat","key":"api_key","limit":20,"window":"1m"}]'
    /// let layer = palisade::rate_limit::RateLimitLayer::from_env()?;
    /// # Ok(()) }
    /// ```
    pub fn from_env() -> Result<Self, crate::config::ConfigError> {
        Self::from_env_in(crate::config::Env::from_process())
    }

    /// Like [`from_env`](Self::from_env), reading `env` instead of the process environment.
    pub(crate) fn from_env_in(
        mut env: crate::config::Env,
    ) -> Result<Self, crate::config::ConfigError> {
        let config = super::RateLimitConfig::from_env(&mut env);
        // This layer keeps the memory store: a Redis address meant for it would be ignored,
        // and every instance would count alone.
        for field in ["redis.url", "redis.cluster_nodes"] {
            let name = crate::config::env_var(super::config::ENV_PREFIX, field);
            if env.raw(&name).is_some() {
                env.problem(
                    &name,
                    crate::config::ProblemKind::Invalid {
                        value: "[redacted]".into(),
                        reason: "`RateLimitLayer::from_env` keeps limits in memory: build the \
                                 Redis store with `RedisStoreConfig::from_env` and \
                                 `RedisStore::from_config`, then give it to \
                                 `RateLimitLayer::builder().store(..)`"
                            .into(),
                    },
                    "(unset)",
                );
            }
        }
        env.finish()?;
        config.build().map_err(|e| {
            crate::config::ConfigError::new(vec![crate::config::Problem {
                name: crate::config::env_var(super::config::ENV_PREFIX, "rules"),
                kind: crate::config::ProblemKind::Invalid {
                    value: String::new(),
                    reason: e.to_string(),
                },
                example: r#"[{"name":"chat","key":"api_key","limit":20,"window":"1m"}]"#.into(),
            }])
        })
    }
}

impl<St: Store> RateLimitLayer<St> {
    /// Whether `call` decides this layer's rule on its plain path (tests pin which path
    /// they exercise).
    #[cfg(test)]
    pub(crate) fn is_plain(&self) -> bool {
        self.shared.plain_cost.is_some()
    }

    /// The admin handle: peek, reset, overrides and counters.
    pub fn limiter(&self) -> RateLimiter<St> {
        RateLimiter {
            shared: self.shared.clone(),
        }
    }
}

impl<S, St: Store> Layer<S> for RateLimitLayer<St> {
    type Service = RateLimit<S, St>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimit {
            inner,
            shared: self.shared.clone(),
        }
    }
}
