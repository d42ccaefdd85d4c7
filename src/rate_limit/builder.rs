//! `RateLimitLayerBuilder` and the store failure mode.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::{Arc, RwLock};

use super::layer::RateLimitLayer;
use super::shared::{CompiledRule, Counters, Shared};
use crate::error::ErrorFormat;
use crate::rate_limit::error::RateLimitConfigError;
use crate::rate_limit::headers;
use crate::rate_limit::key::TrustedProxies;
use crate::rate_limit::rule::{Cost, Rule};
use crate::rate_limit::store::{MemoryStore, Store};

/// What the layer does when its store fails (a remote store is unreachable).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailMode {
    /// Refuse with 503 (`Unavailable`): no request passes unmetered.
    #[default]
    Closed,
    /// Let the request through without limits (logged at `warn`).
    Open,
}

/// Builds a [`RateLimitLayer`].
#[must_use]
pub struct RateLimitLayerBuilder<St = MemoryStore> {
    pub(super) rules: Vec<Rule>,
    pub(super) store: St,
    pub(super) format: ErrorFormat,
    pub(super) draft_headers: bool,
    pub(super) legacy_headers: bool,
    pub(super) proxies: TrustedProxies,
    pub(super) fail_mode: FailMode,
}

impl<St> fmt::Debug for RateLimitLayerBuilder<St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitLayerBuilder")
            .field("rules", &self.rules)
            .field("format", &self.format)
            .finish_non_exhaustive()
    }
}

impl<St: Store> RateLimitLayerBuilder<St> {
    /// Adds a rule.
    pub fn rule(mut self, rule: Rule) -> Self {
        self.rules.push(rule);
        self
    }

    /// Adds rules.
    pub fn rules(mut self, rules: impl IntoIterator<Item = Rule>) -> Self {
        self.rules.extend(rules);
        self
    }

    /// Uses another store.
    pub fn store<S2: Store>(self, store: S2) -> RateLimitLayerBuilder<S2> {
        RateLimitLayerBuilder {
            rules: self.rules,
            store,
            format: self.format,
            draft_headers: self.draft_headers,
            legacy_headers: self.legacy_headers,
            proxies: self.proxies,
            fail_mode: self.fail_mode,
        }
    }

    /// How refusals are rendered.
    pub fn error_format(mut self, format: ErrorFormat) -> Self {
        self.format = format;
        self
    }

    /// Whether to send `RateLimit-Policy` and `RateLimit` (default yes).
    pub fn draft_headers(mut self, on: bool) -> Self {
        self.draft_headers = on;
        self
    }

    /// Whether to send `X-RateLimit-Limit/Remaining/Reset` (default no).
    pub fn legacy_headers(mut self, on: bool) -> Self {
        self.legacy_headers = on;
        self
    }

    /// Proxies whose `X-Forwarded-For` is believed (for [`KeySource::PeerIp`](super::KeySource::PeerIp)).
    pub fn trusted_proxies(mut self, proxies: TrustedProxies) -> Self {
        self.proxies = proxies;
        self
    }

    /// What to do when the store fails (default [`FailMode::Closed`]).
    pub fn on_store_error(mut self, mode: FailMode) -> Self {
        self.fail_mode = mode;
        self
    }

    /// Validates the rules and builds the layer.
    pub fn build(self) -> Result<RateLimitLayer<St>, RateLimitConfigError> {
        let mut rules = Vec::with_capacity(self.rules.len());
        for rule in self.rules {
            rule.validate()?;
            if rules
                .iter()
                .any(|r: &CompiledRule| r.rule.name == rule.name)
            {
                return Err(RateLimitConfigError::DuplicateRule {
                    rule: rule.name.to_string(),
                });
            }
            rules.push(CompiledRule {
                lean: !self.draft_headers
                    && !self.legacy_headers
                    && !rule.shadow
                    && !matches!(rule.cost, Cost::Settled { .. }),
                params: rule.params(rule.quota),
                policy: headers::policy_value(&rule.name, rule.quota.limit(), rule.quota.window()),
                counters: Counters::default(),
                warned_no_peer: AtomicBool::new(false),
                rule,
            });
        }
        if u32::try_from(rules.len()).is_err() {
            return Err(RateLimitConfigError::Invalid {
                rule: "*".into(),
                field: "rules",
                reason: "too many rules".into(),
            });
        }
        let plain_cost = match &rules[..] {
            [r] if r.lean => r.plain_cost(&self.proxies),
            _ => None,
        };
        Ok(RateLimitLayer {
            shared: Arc::new(Shared {
                plain_cost,
                rules: rules.into_boxed_slice(),
                store: self.store,
                format: self.format,
                draft_headers: self.draft_headers,
                legacy_headers: self.legacy_headers,
                proxies: self.proxies,
                fail_mode: self.fail_mode,
                overrides: RwLock::new(HashMap::new()),
                override_count: AtomicUsize::new(0),
            }),
        })
    }
}
