//! What every service of a layer shares, and the decision: rules, counters, outcomes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use http::{HeaderName, HeaderValue, Request, Response};
use smallvec::SmallVec;

use super::builder::FailMode;
use super::reservation::{Reservation, ReservationInner, ReservedItem};
use crate::error::{Error, ErrorFormat, ErrorKind};
use crate::rate_limit::algorithm::{Params, Verdict};
use crate::rate_limit::error::StoreError;
use crate::rate_limit::headers::{self, ceil_secs};
use crate::rate_limit::key::{KeySource, RateKey, TrustedProxies, peer_key};
use crate::rate_limit::quota::Quota;
use crate::rate_limit::rule::{Cost, Route, Rule};
use crate::rate_limit::store::{CheckItem, Decision, RuleDecision, Store};

pub(super) struct Shared<St> {
    pub(super) rules: Box<[CompiledRule]>,
    /// The fixed cost of the layer's only rule when it is *plain* (see
    /// `CompiledRule::plain_cost`): `RateLimit::call` decides it on its own path.
    pub(super) plain_cost: Option<u64>,
    pub(super) store: St,
    pub(super) format: ErrorFormat,
    pub(super) draft_headers: bool,
    pub(super) legacy_headers: bool,
    pub(super) proxies: TrustedProxies,
    pub(super) fail_mode: FailMode,
    pub(super) overrides: RwLock<HashMap<(u32, RateKey), Quota>>,
    pub(super) override_count: AtomicUsize,
}

pub(super) struct CompiledRule {
    pub(super) rule: Rule,
    pub(super) params: Params,
    pub(super) policy: HeaderValue,
    pub(super) counters: Counters,
    /// An admitted request needs nothing but its counter: no headers (the layer sends
    /// none), not a shadow rule, nothing to reserve.
    pub(super) lean: bool,
    /// Whether a request without a peer address has been logged (a `PeerIp` rule).
    pub(super) warned_no_peer: AtomicBool,
}

impl CompiledRule {
    /// The key source found nothing: counted, and for a rule keyed by the peer address
    /// (which every request over a socket has) logged loudly once, since it means the
    /// server does not pass the address on and every client shares one bucket.
    #[cold]
    #[inline(never)]
    pub(super) fn no_key(&self) {
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

    /// The fixed cost of a *plain* rule: lean (see `CompiledRule::lean`) and needing nothing
    /// from the request but its peer address: every route and method, keyed by the peer
    /// (no proxy trusted) or globally, a fixed cost. `RateLimit::call` decides such a rule
    /// without lending the request to code that is not inlined; a request whose address
    /// has been lent that way must be copied before the inner service takes it (the
    /// compiler cannot tell that no one kept the address), and the general path measured
    /// slower than this one for the layer without headers.
    pub(super) fn plain_cost(&self, proxies: &TrustedProxies) -> Option<u64> {
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
pub(super) struct Counters {
    pub(super) stripes: [Stripe; STRIPES],
}

pub(super) const STRIPES: usize = 8;

#[derive(Default)]
#[repr(align(128))]
pub(super) struct Stripe {
    pub(super) allowed: AtomicU64,
    pub(super) limited: AtomicU64,
    pub(super) shadow_limited: AtomicU64,
    pub(super) never: AtomicU64,
    pub(super) no_key: AtomicU64,
}

#[inline]
pub(super) fn stripe_index() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static INDEX: usize = NEXT.fetch_add(1, Ordering::Relaxed) % STRIPES;
    }
    INDEX.with(|i| *i)
}

impl Counters {
    #[inline]
    pub(super) fn stripe(&self) -> &Stripe {
        &self.stripes[stripe_index()]
    }

    pub(super) fn sum(&self, f: impl Fn(&Stripe) -> &AtomicU64) -> u64 {
        self.stripes
            .iter()
            .map(|s| f(s).load(Ordering::Relaxed))
            .sum()
    }
}

impl<St> Shared<St> {
    pub(super) fn params_for(&self, index: u32, key: &RateKey) -> (Params, Quota) {
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
pub(super) struct Pending {
    pub(super) index: u32,
    pub(super) key: RateKey,
    pub(super) params: Params,
    pub(super) cost: u64,
}

pub(super) type PendingList = SmallVec<[Pending; 2]>;
/// Headers to add to the response: a `Vec` (empty and unallocated when headers are off)
/// keeps the response future small.
pub(super) type HeaderBlock = Vec<(HeaderName, HeaderValue)>;

/// What to do with a decision.
pub(super) enum Outcome {
    Admit(HeaderBlock, Option<Reservation>),
    Refuse(Box<Response<crate::body::ErrorBody>>),
}

impl<St: Store> Shared<St> {
    #[inline]
    pub(super) fn pending<B>(&self, req: &Request<B>) -> PendingList {
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
    pub(super) fn pending_for<B>(
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
    pub(super) fn item<'a>(&'a self, p: &'a Pending) -> CheckItem<'a> {
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
    pub(super) fn items<'a>(&'a self, pending: &'a [Pending]) -> SmallVec<[CheckItem<'a>; 2]> {
        pending.iter().map(|p| self.item(p)).collect()
    }

    /// Turns a store's answer into what the layer does.
    #[inline]
    pub(super) fn resolve(
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
    pub(super) fn outcome(
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
        // The block holds each name's values together (every `RateLimit-Policy`, then
        // every `RateLimit`): the response gets the same fields, and each name is looked
        // up in its map once.
        let mut policies = 0;
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
                    generation: d.generation,
                    reservation_end: d.reservation_end,
                    reserved: p.cost,
                });
            }
            if rule.shadow {
                continue;
            }
            if self.draft_headers {
                headers.insert(
                    policies,
                    (headers::RATELIMIT_POLICY, compiled.policy.clone()),
                );
                policies += 1;
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

    pub(super) fn store_failed(&self, err: StoreError) -> Outcome {
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

/// What the plain one-rule path decided: small enough to come back in registers.
pub(super) enum Lean {
    /// Let the request through (admitted and counted, or the rule does not apply).
    Pass,
    /// Answer with this refusal.
    Refuse(Box<Response<crate::body::ErrorBody>>),
    /// The store cannot answer at once: nothing was decided, take the general path.
    General,
}

impl<St: Store> Shared<St> {
    /// Decides a request for a layer whose only rule is plain (see
    /// `CompiledRule::plain_cost`): an admitted request needs nothing but its counter, and
    /// the request is only read through inlined code, so its address is never lent out
    /// (`RateLimit::call_general` decides every other layer, and gives the same answers:
    /// see the property test `the_plain_path_decides_as_the_general_path`).
    #[inline(always)]
    pub(super) fn decide_plain<B>(self: &Arc<Self>, req: &Request<B>, cost: u64) -> Lean {
        let compiled = &self.rules[0];
        let rule = &compiled.rule;
        let key = match rule.key {
            KeySource::Global => RateKey::Global,
            _ => match peer_key(req) {
                Some(k) => RateKey::Ip(k),
                // Counted, skipped or keyed `anonymous` by the general path, once (the
                // plain path may fall back to it after the store's answer).
                None => return Lean::General,
            },
        };
        self.decide_plain_key(key, cost)
    }

    /// The plain rule's decision once its key and cost are known.
    #[inline]
    pub(super) fn decide_plain_key(self: &Arc<Self>, key: RateKey, cost: u64) -> Lean {
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
                self.plain_refusal(pending, d)
            }
            Some(Err(e)) => Lean::from(self.store_failed(e)),
            None => Lean::General,
        }
    }

    /// The plain rule did not debit: the request is refused (counted and logged there).
    #[cold]
    #[inline(never)]
    pub(super) fn plain_refusal(self: &Arc<Self>, pending: Pending, d: RuleDecision) -> Lean {
        Lean::from(self.outcome(std::slice::from_ref(&pending), false, &[d]))
    }
}

impl From<Outcome> for Lean {
    fn from(outcome: Outcome) -> Self {
        match outcome {
            // A plain rule adds no headers and reserves nothing.
            Outcome::Admit(..) => Lean::Pass,
            Outcome::Refuse(response) => Lean::Refuse(response),
        }
    }
}
