//! `RateLimiter`, the admin handle: peek, reset, overrides and counters.

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use super::shared::Shared;
use crate::rate_limit::error::AdminError;
use crate::rate_limit::key::RateKey;
use crate::rate_limit::quota::Quota;
use crate::rate_limit::rule::validate_quota;
use crate::rate_limit::store::{CheckItem, MemoryStore, Store};

/// Counts for one rule since the layer was built.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct RuleCounters {
    /// The rule.
    pub rule: String,
    /// Requests the rule admitted (and that were let through: a request another rule
    /// refused does not count here).
    pub allowed: u64,
    /// Requests the rule refused (not in shadow mode).
    pub limited: u64,
    /// Requests the rule would have refused in shadow mode.
    pub shadow_limited: u64,
    /// Requests refused because their cost exceeds the rule's capacity.
    pub never: u64,
    /// Requests for which the rule's key source found no key (no header, no principal, no
    /// peer address): counted against the shared `anonymous` key, or skipped with
    /// [`Rule::skip_anonymous`](super::Rule::skip_anonymous). For a rule keyed by [`KeySource::PeerIp`](super::KeySource::PeerIp) this means the
    /// server gives no peer address (see the module docs), and the first one is logged at
    /// `error`.
    pub no_key: u64,
}

/// The state of one rule for one key, from [`RateLimiter::peek`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct RuleStatus {
    /// The quota in force (after overrides).
    pub quota: Quota,
    /// Units left now.
    pub remaining: u64,
    /// Time until the quota is fully restored.
    pub reset: Duration,
}

/// The admin handle of a layer (from [`RateLimitLayer::limiter`](super::RateLimitLayer::limiter)).
///
/// ```
/// use palisade::rate_limit::{Quota, RateKey, RateLimitLayer, Rule};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let layer = RateLimitLayer::new([Rule::new("global", Quota::per_minute(100))]).unwrap();
/// let admin = layer.limiter();
/// admin.set_override("global", RateKey::Global, Quota::per_minute(5)).unwrap();
/// let status = admin.peek("global", &RateKey::Global).await.unwrap();
/// assert_eq!(status.remaining, 5);
/// assert_eq!(admin.counters()[0].allowed, 0);
/// # }
/// ```
pub struct RateLimiter<St = MemoryStore> {
    pub(super) shared: Arc<Shared<St>>,
}

impl<St> Clone for RateLimiter<St> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<St> fmt::Debug for RateLimiter<St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimiter").finish_non_exhaustive()
    }
}

impl<St: Store> RateLimiter<St> {
    pub(super) fn index(&self, rule: &str) -> Result<u32, AdminError> {
        self.shared
            .rules
            .iter()
            .position(|r| &*r.rule.name == rule)
            .and_then(|i| u32::try_from(i).ok())
            .ok_or_else(|| AdminError::UnknownRule { rule: rule.into() })
    }

    /// The rule names, in order.
    pub fn rules(&self) -> Vec<&str> {
        self.shared.rules.iter().map(|r| &*r.rule.name).collect()
    }

    /// The state of `rule` for `key`, unchanged.
    pub async fn peek(&self, rule: &str, key: &RateKey) -> Result<RuleStatus, AdminError> {
        let index = self.index(rule)?;
        let compiled = &self.shared.rules[index as usize];
        let (params, quota) = self.shared.params_for(index, key);
        let item = CheckItem {
            rule_index: index,
            rule: &compiled.rule.name,
            key,
            params,
            cost: 0,
            shadow: compiled.rule.shadow,
        };
        let d = self.shared.store.peek(&item).await?;
        Ok(RuleStatus {
            quota,
            remaining: d.remaining,
            reset: Duration::from_micros(d.reset_micros),
        })
    }

    /// Forgets `rule`'s state for `key` (its quota is whole again).
    pub async fn reset(&self, rule: &str, key: &RateKey) -> Result<(), AdminError> {
        let index = self.index(rule)?;
        let name = &self.shared.rules[index as usize].rule.name;
        self.shared.store.reset(index, name, key).await?;
        Ok(())
    }

    /// Gives `key` its own quota for `rule` (a paying customer, a noisy neighbour).
    pub fn set_override(&self, rule: &str, key: RateKey, quota: Quota) -> Result<(), AdminError> {
        let index = self.index(rule)?;
        validate_quota(rule, quota)?;
        let mut map = self
            .shared
            .overrides
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        map.insert((index, key), quota);
        self.shared
            .override_count
            .store(map.len(), Ordering::Release);
        Ok(())
    }

    /// Removes an override; returns the quota it had.
    pub fn remove_override(&self, rule: &str, key: &RateKey) -> Result<Option<Quota>, AdminError> {
        let index = self.index(rule)?;
        let mut map = self
            .shared
            .overrides
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let old = map.remove(&(index, key.clone()));
        self.shared
            .override_count
            .store(map.len(), Ordering::Release);
        Ok(old)
    }

    /// Emits every rule's counters as one `tracing` event per rule (target
    /// `palisade::rate_limit`, level `info`), for a periodic report.
    pub fn log_counters(&self) {
        for c in self.counters() {
            tracing::info!(
                target: "palisade::rate_limit",
                rule = %c.rule,
                allowed = c.allowed,
                limited = c.limited,
                shadow_limited = c.shadow_limited,
                never = c.never,
                no_key = c.no_key,
                "rate-limit counters"
            );
        }
    }

    /// A snapshot of every rule's counters.
    pub fn counters(&self) -> Vec<RuleCounters> {
        self.shared
            .rules
            .iter()
            .map(|r| RuleCounters {
                rule: r.rule.name.to_string(),
                allowed: r.counters.sum(|s| &s.allowed),
                limited: r.counters.sum(|s| &s.limited),
                shadow_limited: r.counters.sum(|s| &s.shadow_limited),
                never: r.counters.sum(|s| &s.never),
                no_key: r.counters.sum(|s| &s.no_key),
            })
            .collect()
    }
}
