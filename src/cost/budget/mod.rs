//! ```
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use palisade::cost::budget::{Budget, BudgetEstimate, BudgetLayer, Period, Scope};
//! use palisade::cost::{Money, Principal};
//! use tower::{Layer, ServiceExt, service_fn};
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let daily = Budget::new("daily", Scope::User, Period::Day, Money::parse_dollars("5").unwrap());
//! let svc = BudgetLayer::builder().budget(daily).build().unwrap().layer(service_fn(
//!     |_req| async { Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::new()))) },
//! ));
//! let mut req = http::Request::post("/v1/messages")
//!     .body(Full::new(Bytes::from(r#"{"model":"claude-3-5-haiku"}"#)))
//!     .unwrap();
//! req.extensions_mut().insert(Principal::new("ann")); // set by your authentication
//! req.extensions_mut().insert(BudgetEstimate(Money::parse_dollars("6").unwrap())); // may cost $6
//! assert_eq!(svc.oneshot(req).await.unwrap().status(), 400); // more than the whole budget
//! # }
//! ```
//!
//! Spend budgets per user, API key, bot (or overall), per calendar day or month (UTC) or
//! a rolling window, enforced by **reserve-then-settle**.
//!
//! [`BudgetLayer`] runs before the upstream call. For each request whose JSON body names
//! a model (a UTF-8 byte-order mark before it is skipped, as lenient JSON readers do) it
//! reserves the most the request can cost — the input estimated from the body
//! size plus `max_tokens` output tokens (the largest output limit given, for each of
//! OpenAI's `n` choices), and the web searches and fetches its tools allow (`max_uses`,
//! or [`default_max_uses`](BudgetLayerBuilder::default_max_uses) for a tool without it)
//! with their results and pages as input tokens
//! ([`tokens_per_web_search`](BudgetLayerBuilder::tokens_per_web_search) for each
//! search; a fetch tool's `max_content_tokens`, else
//! [`tokens_per_web_fetch`](BudgetLayerBuilder::tokens_per_web_fetch), for each fetch),
//! at the model's prices — on every budget that applies, all or none, atomically. When the response has been metered, the
//! [`BudgetReservation`] left in the request extensions is settled with the real cost
//! (complete, partial or failed) and the rest is refunded. So concurrent requests can never
//! spend together more than the budget holds, as long as each costs no more than it
//! reserved.
//!
//! - A refusal is a 429 (or the status you choose) in the configured error format, with
//!   `retry-after` until the budget frees up (the next day or month for calendar budgets)
//!   and `x-should-retry: false`. A request that could cost more than a whole budget is
//!   refused with 400, naming the budget and what to lower. So is a JSON body naming a
//!   model whose limits cannot be read (a field given twice, a `max_tokens` that is not
//!   a whole number): it is refused, never passed unchecked.
//! - [`CostMeterLayer`](super::CostMeterLayer) inside this layer settles the reservation
//!   when it writes the usage record. Without it, settle yourself with
//!   [`BudgetReservation::settle`]; a reservation dropped unsettled is charged in full
//!   (unknown is not free), and one whose upstream call failed is refunded.
//! - Budget layers nest (a per-user layer outside a global one, plain or split): each
//!   reserves on its own budgets, and the [`BudgetReservation`] in the request extensions
//!   is the innermost layer's, carrying the outer ones ([`BudgetReservation::outer`]).
//!   Settling it settles each with the same actual cost, once; a request an inner layer
//!   refuses, or dropped while an inner layer waits for its store, releases the
//!   reservations of the layers outside it.
//! - Thresholds (50 %, 80 %, 100 % by default) raise an
//!   [`AlertEvent`](super::alert::AlertEvent) once per period per subject through the
//!   [`AlertSink`](super::alert::AlertSink) you give the builder.
//! - The default [`MemoryBudgetStore`] keeps accounts in this process; `RedisBudgetStore`
//!   (feature `redis`) shares them between instances, or implement [`BudgetStore`] for
//!   another store.
//! - [`BudgetLayer::split`] gives the layer in two halves for stacks with another store
//!   call before the upstream (a rate limiter in Redis): [`BudgetStartLayer`] starts the
//!   reservation above it, [`BudgetGateLayer`] waits for it just above the upstream, so
//!   the two store calls are in flight together.
//!
//! **A token budget per minute** is a rate limit, not a spend budget: give
//! [`RateLimitLayer`](crate::rate_limit::RateLimitLayer) a rule with
//! `Cost::Settled { estimate }` (for example `Rule::new("tokens", Quota::per_minute(100_000))
//! .key(KeySource::ApiKey).cost(Cost::Settled { estimate: 4_096 })`), put the request's
//! token estimate in its `RequestCost` extension, and settle the rule's `Reservation` with
//! the tokens used.
//!
//! # Example
//!
//! ```
//! use std::convert::Infallible;
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use palisade::cost::budget::{Budget, BudgetLayer, BudgetReservation, Period, Scope};
//! use palisade::cost::{Money, Principal};
//! use tower::{Layer, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let layer = BudgetLayer::builder()
//!     .budget(Budget::new("daily", Scope::User, Period::Day, Money::parse_dollars("0.02").unwrap()))
//!     .build()
//!     .unwrap();
//! let svc = layer.layer(service_fn(|req: http::Request<Full<Bytes>>| async move {
//!     // the upstream call; here the handler settles what the call really cost
//!     let reservation = req.extensions().get::<BudgetReservation>().unwrap();
//!     reservation.settle(Money::parse_dollars("0.001").unwrap());
//!     Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::new())))
//! }));
//! // claude-3-5-haiku: up to 1000 output tokens at $4/Mtok = $0.004 reserved (plus the input)
//! let request = || {
//!     let mut req = http::Request::post("/v1/messages")
//!         .body(Full::new(Bytes::from(r#"{"model":"claude-3-5-haiku-20241022","max_tokens":1000,"messages":[]}"#)))
//!         .unwrap();
//!     req.extensions_mut().insert(Principal::new("ann")); // set by your authentication
//!     req
//! };
//! assert_eq!(svc.clone().oneshot(request()).await.unwrap().status(), 200);
//! // a request reserving 5000 × $4/Mtok = $0.02 plus its input no longer fits
//! let mut big = http::Request::post("/v1/messages")
//!     .body(Full::new(Bytes::from(r#"{"model":"claude-3-5-haiku-20241022","max_tokens":4900,"messages":[]}"#)))
//!     .unwrap();
//! big.extensions_mut().insert(Principal::new("ann"));
//! let refused = svc.oneshot(big).await.unwrap();
//! assert_eq!(refused.status(), 429);
//! assert_eq!(refused.headers()["x-should-retry"], "false");
//! # }
//! ```

mod config;
mod estimate;
mod future;
mod layer;
mod period;
#[cfg(feature = "redis")]
mod redis;
mod shape;
mod split;
mod store;

use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use config::{BudgetConfig, BudgetRuleConfig};
pub use estimate::BudgetEstimate;
pub use future::ResponseFuture;
pub use layer::{
    BudgetClock, BudgetConfigError, BudgetLayer, BudgetLayerBuilder, BudgetReservation,
    BudgetService, Settlement,
};
pub(crate) use period::unix_millis;
pub use period::{ParsePeriodError, Period};
#[cfg(feature = "redis")]
pub use redis::RedisBudgetStore;
pub use split::{BudgetGateLayer, BudgetStart, BudgetStartLayer, PendingBudget, StartBody};
pub use store::{
    BoxFuture, BudgetStore, BudgetStoreError, Charge, Crossing, Hold, MemoryBudgetStore, Reserve,
};

use super::pricing::Money;

/// Whom a budget counts spend for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Scope {
    /// One account for everyone.
    Global,
    /// Each user: the authenticated [`Principal`](crate::key::Principal), else the
    /// `Attribution` extension's user, else (opt-in, see
    /// [`BudgetLayerBuilder::user_header`]) a user header.
    User,
    /// Each API key (hashed; `x-api-key` or `authorization: Bearer`).
    ApiKey,
    /// Each bot (the `Attribution` extension's bot, else the `x-bot-id` header).
    Bot,
}

impl Scope {
    /// The name used in alert subjects (`user`, `api_key`, `bot`, `global`).
    pub const fn as_str(self) -> &'static str {
        match self {
            Scope::Global => "global",
            Scope::User => "user",
            Scope::ApiKey => "api_key",
            Scope::Bot => "bot",
        }
    }
}

/// One spend budget: a name, whom it counts for, over what period, how much.
///
/// ```
/// use palisade::cost::budget::{Budget, Period, Scope};
/// use palisade::cost::Money;
///
/// let b = Budget::new("monthly-bots", Scope::Bot, Period::Month, Money::parse_dollars("250").unwrap())
///     .thresholds([0.9, 1.0]);
/// assert_eq!(b.name(), "monthly-bots");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Budget {
    pub(crate) name: Arc<str>,
    pub(crate) scope: Scope,
    pub(crate) period: Period,
    pub(crate) limit: Money,
    /// Alert thresholds in thousandths of the limit, ascending.
    pub(crate) thresholds: Vec<u16>,
}

impl Budget {
    /// A budget of `limit` per `period` for each subject of `scope`, with alert thresholds
    /// at 50 %, 80 % and 100 %.
    pub fn new(name: impl Into<Arc<str>>, scope: Scope, period: Period, limit: Money) -> Self {
        Self {
            name: name.into(),
            scope,
            period,
            limit,
            thresholds: vec![500, 800, 1000],
        }
    }

    /// The alert thresholds, as fractions of the limit (0–1; others are ignored, and
    /// precision beyond 0.001 is rounded; one that rounds to 0 is ignored). Empty: no
    /// threshold alerts.
    #[must_use]
    pub fn thresholds(mut self, ratios: impl IntoIterator<Item = f64>) -> Self {
        let mut t: Vec<u16> = ratios
            .into_iter()
            .filter(|r| r.is_finite() && *r > 0.0 && *r <= 1.0)
            .map(|r| (r * 1000.0).round() as u16)
            .filter(|&t| t > 0) // below 0.0005: would fire at no spend at all
            .collect();
        t.sort_unstable();
        t.dedup();
        t.truncate(32);
        self.thresholds = t;
        self
    }

    /// The name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whom it counts for.
    pub fn scope(&self) -> Scope {
        self.scope
    }

    /// The period.
    pub fn period(&self) -> Period {
        self.period
    }

    /// The limit per period.
    pub fn limit(&self) -> Money {
        self.limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_threshold_that_rounds_to_zero_is_dropped_not_fired_on_every_settlement() {
        let b = Budget::new("b", Scope::User, Period::Day, Money::from_picos(1000))
            .thresholds([0.0004, 0.5]);
        assert_eq!(b.thresholds, vec![500]);
        let store = MemoryBudgetStore::new();
        let charges = [Charge {
            budget: Arc::new(
                Budget::new("b", Scope::User, Period::Day, Money::from_picos(1000))
                    .thresholds([0.0004]),
            ),
            subject: "ann".into(),
        }];
        let now = std::time::UNIX_EPOCH;
        let crossed = futures_settle(&store, &charges, now);
        assert!(crossed.is_empty(), "{crossed:?}");
    }

    fn futures_settle(
        store: &MemoryBudgetStore,
        charges: &[Charge],
        now: std::time::SystemTime,
    ) -> Vec<Crossing> {
        let mut f = store.settle(charges.to_vec().into(), Money::ZERO, Money::ZERO, now);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match f.as_mut().poll(&mut cx) {
            std::task::Poll::Ready(r) => r.unwrap(),
            std::task::Poll::Pending => panic!("the memory store answers at once"),
        }
    }
}
