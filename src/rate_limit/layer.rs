//! `RateLimitLayer`, the `RateLimit` service and its response future.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http::{HeaderName, HeaderValue, Request, Response};
use pin_project_lite::pin_project;
use smallvec::SmallVec;
use tower_layer::Layer;
use tower_service::Service;

use super::algorithm::{Params, Verdict};
use super::error::{AdminError, RateLimitConfigError, StoreError};
use super::headers::{self, ceil_secs};
use super::key::{KeySource, RateKey, TrustedProxies, peer_key};
use super::quota::Quota;
use super::rule::{Cost, Route, Rule, validate_quota};
use super::store::{CheckItem, Decision, MemoryStore, RuleDecision, Settlement, Store};
use crate::body::ResponseBody;
use crate::error::{Error, ErrorFormat, ErrorKind};

/// Applies rate-limit rules to requests; builds [`RateLimit`] services.
///
/// Cloning is cheap (one `Arc`), and every clone (and every service it builds) shares the
/// same rules, store, overrides and counters. See the [module docs](super) for an example.
#[must_use]
pub struct RateLimitLayer<St = MemoryStore> {
    shared: Arc<Shared<St>>,
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
    rules: Vec<Rule>,
    store: St,
    format: ErrorFormat,
    draft_headers: bool,
    legacy_headers: bool,
    proxies: TrustedProxies,
    fail_mode: FailMode,
}

impl<St> fmt::Debug for RateLimitLayerBuilder<St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitLayerBuilder")
            .field("rules", &self.rules)
            .field("format", &self.format)
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
    /// reporting every problem at once.
    ///
    /// ```no_run
    /// # fn main() -> Result<(), palisade::config::ConfigError> {
    /// // PALISADE_RATE_LIMIT_RULES='[{"name":"chat","key":"api_key","limit":20,"window":"1m"}]'
    /// let layer = palisade::rate_limit::RateLimitLayer::from_env()?;
    /// # Ok(()) }
    /// ```
    pub fn from_env() -> Result<Self, crate::config::ConfigError> {
        let mut env = crate::config::Env::from_process();
        let config = super::RateLimitConfig::from_env(&mut env);
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
                lean_single: matches!(&rules[..], [r] if r.lean),
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

pub(crate) struct Shared<St> {
    rules: Box<[CompiledRule]>,
    /// One rule, and it is lean: `RateLimit::call` decides it without the general path.
    lean_single: bool,
    /// That lean rule's fixed cost when it is also *plain* (see `CompiledRule::plain_cost`).
    plain_cost: Option<u64>,
    store: St,
    format: ErrorFormat,
    draft_headers: bool,
    legacy_headers: bool,
    proxies: TrustedProxies,
    fail_mode: FailMode,
    overrides: RwLock<HashMap<(u32, RateKey), Quota>>,
    override_count: AtomicUsize,
}

struct CompiledRule {
    rule: Rule,
    params: Params,
    policy: HeaderValue,
    counters: Counters,
    /// An admitted request needs nothing but its counter: no headers (the layer sends
    /// none), not a shadow rule, nothing to reserve.
    lean: bool,
    /// Whether a request without a peer address has been logged (a `PeerIp` rule).
    warned_no_peer: AtomicBool,
}

impl CompiledRule {
    /// The key source found nothing: counted, and for a rule keyed by the peer address
    /// (which every request over a socket has) logged loudly once, since it means the
    /// server does not pass the address on and every client shares one bucket.
    #[cold]
    #[inline(never)]
    fn no_key(&self) {
        self.counters
            .stripe()
            .no_key
            .fetch_add(1, Ordering::Relaxed);
        if matches!(
            self.rule.key,
            KeySource::PeerIp | KeySource::PrincipalOrPeerIp
        ) && !self.warned_no_peer.swap(true, Ordering::Relaxed)
        {
            tracing::error!(
                target: "palisade::rate_limit",
                rule = %self.rule.name,
                "rate-limit rule `{}` is keyed by the client IP, but a request came without a peer \
                 address: every such request shares one `anonymous` bucket. Serve axum with \
                 `into_make_service_with_connect_info::<SocketAddr>()` (palisade's `axum` \
                 feature on) or insert the `SocketAddr` as a request extension. Counted in \
                 `RuleCounters::no_key`; logged once.",
                self.rule.name
            );
        }
    }

    /// The fixed cost of a lean rule that needs nothing from the request but its peer
    /// address: every route and method, keyed by the peer (no proxy trusted) or globally,
    /// a fixed cost. `RateLimit::call` decides such a rule without lending the request to
    /// code that is not inlined; a request whose address has been lent that way must be
    /// copied before the inner service takes it (the compiler cannot tell that no one kept
    /// the address), and that copy measured about 5 ns of the layer's overhead.
    fn plain_cost(&self, proxies: &TrustedProxies) -> Option<u64> {
        let rule = &self.rule;
        let keyed_plainly = match rule.key {
            KeySource::Global => true,
            KeySource::PeerIp => proxies.is_empty(),
            _ => false,
        };
        match rule.cost {
            Cost::Fixed(cost)
                if self.lean
                    && keyed_plainly
                    && rule.method.is_none()
                    && matches!(rule.route, Route::All) =>
            {
                Some(cost)
            }
            _ => None,
        }
    }
}

/// Counters striped over cache lines so threads do not fight over one.
#[derive(Default)]
struct Counters {
    stripes: [Stripe; STRIPES],
}

const STRIPES: usize = 8;

#[derive(Default)]
#[repr(align(128))]
struct Stripe {
    allowed: AtomicU64,
    limited: AtomicU64,
    shadow_limited: AtomicU64,
    never: AtomicU64,
    no_key: AtomicU64,
}

#[inline]
fn stripe_index() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static INDEX: usize = NEXT.fetch_add(1, Ordering::Relaxed) % STRIPES;
    }
    INDEX.with(|i| *i)
}

impl Counters {
    #[inline]
    fn stripe(&self) -> &Stripe {
        &self.stripes[stripe_index()]
    }

    fn sum(&self, f: impl Fn(&Stripe) -> &AtomicU64) -> u64 {
        self.stripes
            .iter()
            .map(|s| f(s).load(Ordering::Relaxed))
            .sum()
    }
}

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
    /// [`Rule::skip_anonymous`]. For a rule keyed by [`KeySource::PeerIp`] this means the
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

/// The admin handle of a layer (from [`RateLimitLayer::limiter`]).
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
    shared: Arc<Shared<St>>,
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
    fn index(&self, rule: &str) -> Result<u32, AdminError> {
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

impl<St> Shared<St> {
    fn params_for(&self, index: u32, key: &RateKey) -> (Params, Quota) {
        let compiled = &self.rules[index as usize];
        if self.override_count.load(Ordering::Acquire) > 0 {
            let map = self
                .overrides
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some(q) = map.get(&(index, key.clone())) {
                return (compiled.rule.params(*q), *q);
            }
        }
        (compiled.params, compiled.rule.quota)
    }
}

/// A rule that applies to the request being decided.
struct Pending {
    index: u32,
    key: RateKey,
    params: Params,
    cost: u64,
}

type PendingList = SmallVec<[Pending; 2]>;
/// Headers to add to the response: a `Vec` (empty and unallocated when headers are off)
/// keeps the response future small.
type HeaderBlock = Vec<(HeaderName, HeaderValue)>;

/// A reservation for a quantity known only after the response (rules with
/// [`Cost::Settled`]), found in the request extensions of an admitted request.
///
/// Call [`Reservation::settle`] with the actual amount once it is known (for example the
/// tokens a completion used): the difference to the reserved estimate is debited or
/// credited. Settling twice does nothing; dropping it without settling keeps the estimate.
#[derive(Clone)]
pub struct Reservation {
    inner: Arc<ReservationInner>,
}

struct ReservationInner {
    target: Arc<dyn SettleTarget>,
    items: SmallVec<[ReservedItem; 2]>,
    settled: AtomicBool,
}

struct ReservedItem {
    index: u32,
    key: RateKey,
    params: Params,
    window_start: u64,
    reserved: u64,
}

trait SettleTarget: Send + Sync + 'static {
    fn settle_items(&self, s: &[Settlement<'_>])
    -> super::store::BoxFuture<Result<(), StoreError>>;
    fn rule_name(&self, index: u32) -> &str;
}

impl<St: Store> SettleTarget for Shared<St> {
    fn settle_items(
        &self,
        s: &[Settlement<'_>],
    ) -> super::store::BoxFuture<Result<(), StoreError>> {
        self.store.settle(s)
    }
    fn rule_name(&self, index: u32) -> &str {
        &self.rules[index as usize].rule.name
    }
}

impl fmt::Debug for Reservation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reservation")
            .field("reserved", &self.reserved())
            .field("settled", &self.inner.settled.load(Ordering::Relaxed))
            .finish()
    }
}

impl Reservation {
    /// The units reserved (the largest over the settled rules; they usually agree).
    pub fn reserved(&self) -> u64 {
        self.inner
            .items
            .iter()
            .map(|i| i.reserved)
            .max()
            .unwrap_or(0)
    }

    /// Settles the reservation with the `actual` amount. Only the first call counts.
    pub async fn settle(&self, actual: u64) -> Result<(), StoreError> {
        if self.inner.settled.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let target = &*self.inner.target;
        let settlements: SmallVec<[Settlement<'_>; 2]> = self
            .inner
            .items
            .iter()
            .map(|i| Settlement {
                rule_index: i.index,
                rule: target.rule_name(i.index),
                key: &i.key,
                params: i.params,
                window_start: i.window_start,
                delta: settlement_delta(actual, i.reserved),
            })
            .filter(|s| s.delta != 0)
            .collect();
        if settlements.is_empty() {
            return Ok(());
        }
        target.settle_items(&settlements).await
    }
}

/// `actual − reserved` as a settlement delta, clamped to i64 on the side it falls (a refund
/// larger than `i64::MAX` units stays a refund).
fn settlement_delta(actual: u64, reserved: u64) -> i64 {
    let delta = i128::from(actual) - i128::from(reserved);
    i64::try_from(delta).unwrap_or(if delta < 0 { i64::MIN } else { i64::MAX })
}

/// The rate-limiting service built by [`RateLimitLayer`].
pub struct RateLimit<S, St = MemoryStore> {
    inner: S,
    shared: Arc<Shared<St>>,
}

impl<S: Clone, St> Clone for RateLimit<S, St> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S: fmt::Debug, St> fmt::Debug for RateLimit<S, St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimit")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S, St: Store> RateLimit<S, St> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// The admin handle.
    pub fn limiter(&self) -> RateLimiter<St> {
        RateLimiter {
            shared: self.shared.clone(),
        }
    }
}

/// What to do with a decision.
enum Outcome {
    Admit(HeaderBlock, Option<Reservation>),
    Refuse(Box<Response<crate::body::ErrorBody>>),
}

impl<St: Store> Shared<St> {
    #[inline]
    fn pending<B>(&self, req: &Request<B>) -> PendingList {
        let mut pending = PendingList::new();
        for (i, compiled) in self.rules.iter().enumerate() {
            if let Some(p) = self.pending_for(i as u32, compiled, req) {
                pending.push(p);
            }
        }
        pending
    }

    /// The pending check of one rule, if it applies to the request.
    #[inline(always)]
    fn pending_for<B>(
        &self,
        index: u32,
        compiled: &CompiledRule,
        req: &Request<B>,
    ) -> Option<Pending> {
        let rule = &compiled.rule;
        if !rule.matches(req) {
            return None;
        }
        let key = match rule.key.extract(req, &self.proxies) {
            Some(k) => k,
            None => {
                compiled.no_key();
                if rule.skip_anonymous {
                    return None;
                }
                RateKey::Anonymous
            }
        };
        let params = if self.override_count.load(Ordering::Acquire) > 0 {
            self.params_for(index, &key).0
        } else {
            compiled.params
        };
        Some(Pending {
            index,
            key,
            params,
            cost: rule.cost.of(req),
        })
    }

    #[inline]
    fn item<'a>(&'a self, p: &'a Pending) -> CheckItem<'a> {
        let rule = &self.rules[p.index as usize].rule;
        CheckItem {
            rule_index: p.index,
            rule: &rule.name,
            key: &p.key,
            params: p.params,
            cost: p.cost,
            shadow: rule.shadow,
        }
    }

    #[inline]
    fn items<'a>(&'a self, pending: &'a [Pending]) -> SmallVec<[CheckItem<'a>; 2]> {
        pending.iter().map(|p| self.item(p)).collect()
    }

    /// Turns a store's answer into what the layer does.
    #[inline]
    fn resolve(
        self: &Arc<Self>,
        pending: &[Pending],
        decision: Result<Decision, StoreError>,
    ) -> Outcome {
        match decision {
            Ok(d) if d.rules.len() == pending.len() => self.outcome(pending, d.admitted, &d.rules),
            Ok(_) => self.store_failed(StoreError::new(
                "the store answered for the wrong number of rules",
            )),
            Err(e) => self.store_failed(e),
        }
    }

    /// What the layer does for the rules' decisions (`rules[i]` for `pending[i]`).
    fn outcome(
        self: &Arc<Self>,
        pending: &[Pending],
        admitted: bool,
        rules: &[RuleDecision],
    ) -> Outcome {
        // The common case, one admitted rule with nothing to add to the response and
        // nothing to reserve: only the counter (the loop below does the same, slower).
        if let ([p], [d]) = (pending, rules) {
            let compiled = &self.rules[p.index as usize];
            let rule = &compiled.rule;
            let reserves = d.debited && matches!(rule.cost, Cost::Settled { .. });
            if admitted
                && !self.draft_headers
                && !self.legacy_headers
                && d.verdict.is_allowed()
                && !rule.shadow
                && !reserves
            {
                compiled
                    .counters
                    .stripe()
                    .allowed
                    .fetch_add(1, Ordering::Relaxed);
                return Outcome::Admit(HeaderBlock::new(), None);
            }
        }
        let mut headers = HeaderBlock::new();
        if self.draft_headers || self.legacy_headers {
            headers.reserve_exact(2 * pending.len() + 3 * usize::from(self.legacy_headers));
        }
        let mut never: Option<&Pending> = None;
        let mut denied: Option<(&Pending, u64)> = None;
        let mut tightest: Option<(u64, u64, u64)> = None; // (limit, remaining, reset secs)
        let mut reserved: SmallVec<[ReservedItem; 2]> = SmallVec::new();
        for (p, d) in pending.iter().zip(rules) {
            let compiled = &self.rules[p.index as usize];
            let rule = &compiled.rule;
            let stripe = compiled.counters.stripe();
            let reset_secs = match d.verdict {
                Verdict::Allowed => {
                    if admitted {
                        stripe.allowed.fetch_add(1, Ordering::Relaxed);
                    }
                    ceil_secs(d.reset_micros)
                }
                Verdict::Denied { retry_after } => {
                    if rule.shadow {
                        stripe.shadow_limited.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(rule = %rule.name, key = %p.key, cost = p.cost, "rate limit would refuse (shadow mode)");
                    } else {
                        stripe.limited.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(rule = %rule.name, key = %p.key, cost = p.cost, "rate limit refused");
                        if denied.is_none_or(|(_, r)| retry_after > r) {
                            denied = Some((p, retry_after));
                        }
                    }
                    ceil_secs(retry_after).max(1)
                }
                Verdict::Never => {
                    stripe.never.fetch_add(1, Ordering::Relaxed);
                    if rule.shadow {
                        tracing::info!(rule = %rule.name, key = %p.key, cost = p.cost, "request cost exceeds the rule's capacity (shadow mode)");
                    } else {
                        never.get_or_insert(p);
                    }
                    ceil_secs(d.reset_micros)
                }
            };
            // A shadow rule reserves too (a token quota trialled in shadow mode is settled
            // like an enforced one); it only never shows in the headers.
            if d.debited && matches!(rule.cost, Cost::Settled { .. }) {
                reserved.push(ReservedItem {
                    index: p.index,
                    key: p.key.clone(),
                    params: p.params,
                    window_start: d.window_start,
                    reserved: p.cost,
                });
            }
            if rule.shadow {
                continue;
            }
            if self.draft_headers {
                headers.push((headers::RATELIMIT_POLICY, compiled.policy.clone()));
                headers.push((
                    headers::RATELIMIT,
                    headers::ratelimit_value(&rule.name, d.remaining, reset_secs),
                ));
            }
            if self.legacy_headers && tightest.is_none_or(|(_, r, _)| d.remaining < r) {
                tightest = Some((p.params.limit, d.remaining, reset_secs));
            }
        }
        if let Some((limit, remaining, reset)) = tightest {
            headers.push((headers::X_RATELIMIT_LIMIT, HeaderValue::from(limit)));
            headers.push((headers::X_RATELIMIT_REMAINING, HeaderValue::from(remaining)));
            headers.push((headers::X_RATELIMIT_RESET, HeaderValue::from(reset)));
        }
        if admitted {
            // An `if`, not `bool::then` with a closure: the closure would take the list
            // (~170 bytes) by value even when there is nothing to reserve.
            let reservation = if reserved.is_empty() {
                None
            } else {
                Some(Reservation {
                    inner: Arc::new(ReservationInner {
                        target: self.clone(),
                        items: reserved,
                        settled: AtomicBool::new(false),
                    }),
                })
            };
            return Outcome::Admit(headers, reservation);
        }
        let error = if let Some(p) = never {
            let rule = &self.rules[p.index as usize].rule;
            Error::new(
                ErrorKind::PayloadTooLarge,
                format!(
                    "this request costs {} units but rate limit `{}` allows at most {} per {}; it can never be admitted",
                    p.cost,
                    rule.name,
                    p.params.capacity(),
                    crate::config::duration::format(Duration::from_micros(p.params.window)),
                ),
            )
        } else if let Some((p, retry_after)) = denied {
            let rule = &self.rules[p.index as usize].rule;
            let wait = Duration::from_micros(retry_after);
            Error::rate_limited(
                format!(
                    "rate limit `{}` exceeded ({} per {}); retry in {}s",
                    rule.name,
                    p.params.limit,
                    crate::config::duration::format(Duration::from_micros(p.params.window)),
                    crate::error::retry_after_secs(wait),
                ),
                wait,
            )
        } else {
            return self.store_failed(StoreError::new("the store refused without a refusing rule"));
        };
        let mut response = error.to_response(self.format);
        for (name, value) in headers.drain(..) {
            response.headers_mut().append(name, value);
        }
        Outcome::Refuse(Box::new(response))
    }

    fn store_failed(&self, err: StoreError) -> Outcome {
        match self.fail_mode {
            FailMode::Open => {
                tracing::warn!(error = %err, "rate-limit store failed; letting the request through (fail open)");
                Outcome::Admit(HeaderBlock::new(), None)
            }
            FailMode::Closed => {
                let error = Error::new(
                    ErrorKind::Unavailable,
                    "rate limiting is temporarily unavailable",
                )
                .with_retry_after(Duration::from_secs(1))
                .with_source(err);
                Outcome::Refuse(Box::new(error.to_response(self.format)))
            }
        }
    }
}

/// What the lean one-rule path decided: small enough to come back in registers.
enum Lean {
    /// Let the request through (admitted and counted, or the rule does not apply).
    Pass,
    /// Answer with this refusal.
    Refuse(Box<Response<crate::body::ErrorBody>>),
    /// The store cannot answer at once: nothing was decided, take the general path.
    General,
}

impl<St: Store> Shared<St> {
    /// Decides a request for a layer whose only rule is lean (see `CompiledRule::lean`):
    /// an admitted request needs nothing but its counter.
    #[inline]
    fn decide_lean<B>(self: &Arc<Self>, req: &Request<B>) -> Lean {
        // Written out rather than through `pending_for` and `item`, which build a `Pending`
        // first and borrow the key back from it: that measured ~20 ns slower here in two
        // runs of the layer bench (the general path below uses them).
        let compiled = &self.rules[0];
        let rule = &compiled.rule;
        if !rule.matches(req) {
            return Lean::Pass;
        }
        let key = match rule.key.extract(req, &self.proxies) {
            Some(k) => k,
            None => {
                compiled.no_key();
                if rule.skip_anonymous {
                    return Lean::Pass;
                }
                RateKey::Anonymous
            }
        };
        self.decide_lean_key(key, rule.cost.of(req))
    }

    /// [`Shared::decide_lean`] for a plain rule (see `CompiledRule::plain_cost`): the
    /// request is only read through inlined code, so its address is never lent out.
    #[inline(always)]
    fn decide_plain<B>(self: &Arc<Self>, req: &Request<B>, cost: u64) -> Lean {
        let compiled = &self.rules[0];
        let rule = &compiled.rule;
        let key = match rule.key {
            KeySource::Global => RateKey::Global,
            _ => match peer_key(req) {
                Some(k) => RateKey::Ip(k),
                None => {
                    compiled.no_key();
                    if rule.skip_anonymous {
                        return Lean::Pass;
                    }
                    RateKey::Anonymous
                }
            },
        };
        self.decide_lean_key(key, cost)
    }

    /// The lean rule's decision once its key and cost are known.
    #[inline]
    fn decide_lean_key(self: &Arc<Self>, key: RateKey, cost: u64) -> Lean {
        let compiled = &self.rules[0];
        let rule = &compiled.rule;
        let params = if self.override_count.load(Ordering::Acquire) > 0 {
            self.params_for(0, &key).0
        } else {
            compiled.params
        };
        let item = CheckItem {
            rule_index: 0,
            rule: &rule.name,
            key: &key,
            params,
            cost,
            shadow: false,
        };
        match self.store.check_one_now(&item) {
            Some(Ok(d)) if d.debited => {
                compiled
                    .counters
                    .stripe()
                    .allowed
                    .fetch_add(1, Ordering::Relaxed);
                Lean::Pass
            }
            Some(Ok(d)) => {
                let pending = Pending {
                    index: 0,
                    key,
                    params,
                    cost,
                };
                self.lean_refusal(pending, d)
            }
            Some(Err(e)) => Lean::from(self.store_failed(e)),
            None => Lean::General,
        }
    }

    /// The lean rule did not debit: the request is refused (counted and logged there).
    #[cold]
    #[inline(never)]
    fn lean_refusal(self: &Arc<Self>, pending: Pending, d: RuleDecision) -> Lean {
        Lean::from(self.outcome(std::slice::from_ref(&pending), false, &[d]))
    }
}

impl From<Outcome> for Lean {
    fn from(outcome: Outcome) -> Self {
        match outcome {
            // A lean rule adds no headers and reserves nothing.
            Outcome::Admit(..) => Lean::Pass,
            Outcome::Refuse(response) => Lean::Refuse(response),
        }
    }
}

impl<S, St, B, ResBody> Service<Request<B>> for RateLimit<S, St>
where
    S: Service<Request<B>, Response = Response<ResBody>> + Clone,
    St: Store,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, St, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    #[inline]
    fn call(&mut self, req: Request<B>) -> Self::Future {
        if let Some(cost) = self.shared.plain_cost {
            // The request stays with the caller and is read only by inlined code, so it
            // moves into the inner call without a copy; the decision comes back in
            // registers.
            match self.shared.decide_plain(&req, cost) {
                Lean::Pass => return ResponseFuture::passing(self.inner.call(req)),
                Lean::Refuse(response) => return ResponseFuture::refused(response),
                Lean::General => {}
            }
        }
        self.call_general(req)
    }
}

impl<S, St: Store> RateLimit<S, St> {
    /// Every layer but the lean one-rule kind (headers, shadow rules, reservations, several
    /// rules, stores that answer asynchronously).
    #[inline(never)]
    fn call_general<B, ResBody>(&mut self, mut req: Request<B>) -> ResponseFuture<S, St, B>
    where
        S: Service<Request<B>, Response = Response<ResBody>> + Clone,
    {
        // A lean rule that is not plain (a route, a header key, trusted proxies...), or a
        // plain one whose store could not answer at once (then this answers `General` too,
        // having decided nothing).
        if self.shared.lean_single {
            match self.shared.decide_lean(&req) {
                Lean::Pass => return ResponseFuture::passing(self.inner.call(req)),
                Lean::Refuse(response) => return ResponseFuture::refused(response),
                Lean::General => {}
            }
        }
        // The request stays in this frame until the inner call: no helper takes it by
        // value, so it is not copied on the way.
        let outcome = if self.shared.rules.len() == 1 {
            // A layer with one rule: no lists are built for it.
            let shared = &self.shared;
            let Some(pending) = shared.pending_for(0, &shared.rules[0], &req) else {
                return ResponseFuture::passing(self.inner.call(req));
            };
            let item = shared.item(&pending);
            match shared.store.check_one_now(&item) {
                Some(Ok(d)) => {
                    let admitted = d.debited || item.shadow;
                    shared.outcome(std::slice::from_ref(&pending), admitted, &[d])
                }
                Some(Err(e)) => shared.store_failed(e),
                None => match shared.store.check_now(std::slice::from_ref(&item)) {
                    Some(decision) => shared.resolve(std::slice::from_ref(&pending), decision),
                    None => {
                        let check = shared.store.check(std::slice::from_ref(&item));
                        let mut list = PendingList::new();
                        list.push(pending);
                        return wait(&mut self.inner, &self.shared, check, list, req);
                    }
                },
            }
        } else {
            let pending = self.shared.pending(&req);
            if pending.is_empty() {
                return ResponseFuture::passing(self.inner.call(req));
            }
            let items = self.shared.items(&pending);
            match self.shared.store.check_now(&items) {
                Some(decision) => {
                    drop(items);
                    self.shared.resolve(&pending, decision)
                }
                None => {
                    let check = self.shared.store.check(&items);
                    drop(items);
                    return wait(&mut self.inner, &self.shared, check, pending, req);
                }
            }
        };
        match outcome {
            Outcome::Admit(headers, reservation) => {
                if let Some(r) = reservation {
                    req.extensions_mut().insert(r);
                }
                ResponseFuture::calling(self.inner.call(req), headers)
            }
            Outcome::Refuse(response) => ResponseFuture::refused(response),
        }
    }
}

/// Waits for an asynchronous store before calling the inner service.
fn wait<S, St, B, ResBody>(
    inner: &mut S,
    shared: &Arc<Shared<St>>,
    check: St::CheckFuture,
    pending: PendingList,
    req: Request<B>,
) -> ResponseFuture<S, St, B>
where
    S: Service<Request<B>, Response = Response<ResBody>> + Clone,
    St: Store,
{
    // The inner service was made ready by `poll_ready`; keep that one for this call.
    let clone = inner.clone();
    let inner = std::mem::replace(inner, clone);
    ResponseFuture {
        state: State::Checking {
            waiting: Box::new(Waiting {
                check: Box::pin(check),
                parts: Some(WaitingParts {
                    req,
                    inner,
                    pending,
                    shared: shared.clone(),
                }),
            }),
        },
    }
}

/// What an asynchronous check holds until the store answers: one box, so every state of
/// the response future is one pointer beside the inner future (the common synchronous
/// path then moves a future no wider than the inner one needs).
struct Waiting<S, St: Store, B> {
    check: Pin<Box<St::CheckFuture>>,
    parts: Option<WaitingParts<S, St, B>>,
}

struct WaitingParts<S, St, B> {
    req: Request<B>,
    inner: S,
    pending: PendingList,
    shared: Arc<Shared<St>>,
}

pin_project! {
    /// The response future of [`RateLimit`].
    pub struct ResponseFuture<S, St, B>
    where
        S: Service<Request<B>>,
        St: Store,
    {
        #[pin]
        state: State<S, St, B>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, St, B>
    where
        S: Service<Request<B>>,
        St: Store,
    {
        Checking {
            waiting: Box<Waiting<S, St, B>>,
        },
        // Admitted with nothing to add to the response (the common case).
        Passing {
            #[pin]
            fut: S::Future,
        },
        // Admitted, with headers to add (a boxed slice: the list's own allocation, two
        // words in the future).
        Calling {
            #[pin]
            fut: S::Future,
            headers: Box<[(HeaderName, HeaderValue)]>,
        },
        Refused {
            response: Option<Box<Response<crate::body::ErrorBody>>>,
        },
    }
}

impl<S, St, B> ResponseFuture<S, St, B>
where
    S: Service<Request<B>>,
    St: Store,
{
    #[inline]
    fn calling(fut: S::Future, headers: HeaderBlock) -> Self {
        if headers.is_empty() {
            return Self::passing(fut);
        }
        Self {
            state: State::Calling {
                fut,
                headers: headers.into_boxed_slice(),
            },
        }
    }

    #[inline]
    fn passing(fut: S::Future) -> Self {
        Self {
            state: State::Passing { fut },
        }
    }

    fn refused(response: Box<Response<crate::body::ErrorBody>>) -> Self {
        Self {
            state: State::Refused {
                response: Some(response),
            },
        }
    }
}

impl<S, St, B> fmt::Debug for ResponseFuture<S, St, B>
where
    S: Service<Request<B>>,
    St: Store,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<S, St, B, ResBody> Future for ResponseFuture<S, St, B>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
    St: Store,
{
    type Output = Result<Response<ResponseBody<ResBody>>, S::Error>;

    #[inline]
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // The common state first, in a small frame; the others are out of line.
        if let StateProj::Passing { fut } = self.as_mut().project().state.project() {
            let response = ready!(fut.poll(cx))?;
            return Poll::Ready(Ok(response.map(ResponseBody::inner)));
        }
        self.poll_other(cx)
    }
}

/// The inner response with the layer's body type and its headers appended.
#[inline]
fn finish<B>(
    response: Response<B>,
    headers: &mut Box<[(HeaderName, HeaderValue)]>,
) -> Response<ResponseBody<B>> {
    let mut response = response.map(ResponseBody::inner);
    let headers = std::mem::take(headers).into_vec();
    response.headers_mut().reserve(headers.len());
    for (name, value) in headers {
        response.headers_mut().append(name, value);
    }
    response
}

impl<S, St, B, ResBody> ResponseFuture<S, St, B>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
    St: Store,
{
    /// Waiting for the store, or refused.
    #[inline(never)]
    fn poll_other(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Response<ResponseBody<ResBody>>, S::Error>> {
        loop {
            let mut this = self.as_mut().project();
            let next = match this.state.as_mut().project() {
                StateProj::Checking { waiting } => {
                    let decision = ready!(waiting.check.as_mut().poll(cx));
                    let Some(parts) = waiting.parts.take() else {
                        unreachable!("the request is taken once");
                    };
                    let WaitingParts {
                        mut req,
                        mut inner,
                        pending,
                        shared,
                    } = parts;
                    match shared.resolve(&pending, decision) {
                        Outcome::Admit(headers, reservation) => {
                            if let Some(r) = reservation {
                                req.extensions_mut().insert(r);
                            }
                            if headers.is_empty() {
                                State::Passing {
                                    fut: inner.call(req),
                                }
                            } else {
                                State::Calling {
                                    fut: inner.call(req),
                                    headers: headers.into_boxed_slice(),
                                }
                            }
                        }
                        Outcome::Refuse(response) => State::Refused {
                            response: Some(response),
                        },
                    }
                }
                StateProj::Passing { fut } => {
                    let response = ready!(fut.poll(cx))?;
                    return Poll::Ready(Ok(response.map(ResponseBody::inner)));
                }
                StateProj::Calling { fut, headers } => {
                    let response = ready!(fut.poll(cx))?;
                    return Poll::Ready(Ok(finish(response, headers)));
                }
                StateProj::Refused { response } => {
                    let response = response
                        .take()
                        .unwrap_or_else(|| unreachable!("polled after completion"));
                    return Poll::Ready(Ok((*response).map(ResponseBody::error)));
                }
            };
            this.state.set(next);
        }
    }
}

mod sealed {
    pub trait Sealed {}
    impl<L> Sealed for tower::ServiceBuilder<L> {}
}

/// `.rate_limit_with(layer)` on tower's `ServiceBuilder` (tower's own `rate_limit(n, per)`
/// keeps its name).
///
/// ```
/// use palisade::rate_limit::{Quota, RateLimitLayer, RateLimitServiceBuilderExt, Rule};
/// use tower::{ServiceBuilder, ServiceExt, service_fn};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let layer = RateLimitLayer::new([Rule::new("all", Quota::per_second(1))]).unwrap();
/// let svc = ServiceBuilder::new().rate_limit_with(layer).service(service_fn(|_req: http::Request<()>| async {
///     Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Empty::<bytes::Bytes>::new()))
/// }));
/// assert_eq!(svc.clone().oneshot(http::Request::new(())).await.unwrap().status(), 200);
/// assert_eq!(svc.oneshot(http::Request::new(())).await.unwrap().status(), 429);
/// # }
/// ```
pub trait RateLimitServiceBuilderExt<L>: sealed::Sealed {
    /// Adds a [`RateLimitLayer`].
    fn rate_limit_with<St: Store>(
        self,
        layer: RateLimitLayer<St>,
    ) -> tower::ServiceBuilder<tower_layer::Stack<RateLimitLayer<St>, L>>;
}

impl<L> RateLimitServiceBuilderExt<L> for tower::ServiceBuilder<L> {
    fn rate_limit_with<St: Store>(
        self,
        layer: RateLimitLayer<St>,
    ) -> tower::ServiceBuilder<tower_layer::Stack<RateLimitLayer<St>, L>> {
        self.layer(layer)
    }
}

#[cfg(test)]
mod tests {
    use super::settlement_delta;

    #[test]
    fn settlement_deltas_keep_their_sign_when_clamped() {
        assert_eq!(settlement_delta(10, 3), 7);
        assert_eq!(settlement_delta(3, 10), -7);
        assert_eq!(settlement_delta(u64::MAX, 0), i64::MAX);
        assert_eq!(settlement_delta(0, u64::MAX), i64::MIN);
        assert_eq!(settlement_delta(0, 1 << 63), i64::MIN);
        assert_eq!(settlement_delta(5, 5), 0);
    }
}
