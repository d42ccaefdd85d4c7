//! [`BudgetLayer`], its builder, the [`BudgetService`] and the [`BudgetReservation`]
//! handle.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Limited};
use tower_layer::Layer;
use tower_service::Service;

use super::estimate::{Assumptions, BudgetEstimate, Estimate, estimate};
use super::future::ResponseFuture;
use super::store::{BoxFuture, BudgetStore, BudgetStoreError, Charge, MemoryBudgetStore, Reserve};
use super::{Budget, Scope};
use crate::body::ResponseBody;
use crate::cost::alert::{AlertEvent, AlertSink};
use crate::cost::pricing::{Money, PriceTable};
use crate::cost::record::{Attribution, UsageRecord};
use crate::error::{Error, ErrorFormat, ErrorKind, FieldError};
use crate::key::ApiKeyId;

/// Where the budget layer reads the time: the wall clock at start-up, advanced by tokio's
/// clock, so tests with a paused clock (`tokio::time::advance`) move budgets through days
/// deterministically.
#[derive(Clone)]
pub struct BudgetClock {
    base: SystemTime,
    start: tokio::time::Instant,
}

impl fmt::Debug for BudgetClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BudgetClock")
            .field("base", &self.base)
            .finish()
    }
}

impl BudgetClock {
    /// The wall clock now, advancing with tokio's clock.
    pub fn system() -> Self {
        Self::starting_at(SystemTime::now())
    }

    /// A clock reading `base` now and advancing with tokio's clock.
    pub fn starting_at(base: SystemTime) -> Self {
        Self {
            base,
            start: tokio::time::Instant::now(),
        }
    }

    /// The time now.
    pub fn now(&self) -> SystemTime {
        self.base + self.start.elapsed()
    }
}

/// A mistake in a budget layer's set-up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BudgetConfigError {
    /// Two budgets share a name (the name keys their accounts).
    #[error("two budgets are named `{0}`; names must be unique")]
    DuplicateName(String),
    /// A budget of zero would refuse everything.
    #[error("budget `{0}` has a limit of 0")]
    ZeroLimit(String),
    /// The refusal status must be a 4xx or 5xx code.
    #[error("refusal status {0} is not an error status (400–599)")]
    Status(u16),
    /// A header name that is not valid.
    #[error("`{0}` is not a valid header name")]
    HeaderName(String),
    /// A size or ratio that must be positive is 0.
    #[error("`{0}` must be greater than 0")]
    Zero(&'static str),
    /// The price file could not be read or parsed.
    #[error("prices: {0}")]
    Prices(String),
    /// A configured budget is invalid.
    #[error("budget `{name}`: {reason}")]
    Rule {
        /// The budget's name.
        name: String,
        /// What is wrong.
        reason: String,
    },
}

/// `(budget, subject)` → that subject's own limit (`None`: no limit).
type Overrides = std::collections::HashMap<(Arc<str>, Arc<str>), Option<Money>>;

pub(crate) struct Shared {
    pub(super) budgets: Vec<Arc<Budget>>,
    pub(super) store: Arc<dyn BudgetStore>,
    pub(super) prices: Arc<PriceTable>,
    pub(super) format: ErrorFormat,
    pub(super) status: StatusCode,
    pub(super) max_body: usize,
    pub(super) assume: Assumptions,
    pub(super) allow_unpriced: bool,
    pub(super) fail_open: bool,
    pub(super) user_header: Option<HeaderName>,
    pub(super) bot_header: Option<HeaderName>,
    pub(super) alerts: Option<Arc<dyn AlertSink>>,
    pub(super) clock: BudgetClock,
    /// Per-subject limits set at run time: `(budget, subject)` → limit (`None`: none).
    pub(super) overrides: std::sync::RwLock<Overrides>,
    /// Whether a [`BudgetGateLayer`](super::BudgetGateLayer) of this layer wraps a
    /// service: the split form's start refuses every request until one does.
    pub(super) gated: AtomicBool,
    /// The subject of a global budget, `*`, made once.
    pub(super) everyone: Arc<str>,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BudgetLayer")
            .field("budgets", &self.budgets)
            .field("format", &self.format)
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

/// Enforces spend budgets by reserve-then-settle. See the [module docs](super).
#[derive(Debug, Clone)]
#[must_use]
pub struct BudgetLayer {
    pub(super) shared: Arc<Shared>,
}

/// Builds a [`BudgetLayer`].
#[must_use]
pub struct BudgetLayerBuilder {
    budgets: Vec<Budget>,
    store: Option<Arc<dyn BudgetStore>>,
    prices: Option<Arc<PriceTable>>,
    format: ErrorFormat,
    status: u16,
    max_body: usize,
    assume: Assumptions,
    allow_unpriced: bool,
    fail_open: bool,
    user_header: Option<String>,
    bot_header: Option<String>,
    alerts: Option<Arc<dyn AlertSink>>,
    clock: Option<BudgetClock>,
}

impl fmt::Debug for BudgetLayerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BudgetLayerBuilder")
            .field("budgets", &self.budgets)
            .finish_non_exhaustive()
    }
}

impl BudgetLayer {
    /// A builder with the defaults: no budgets, the memory store, the built-in prices,
    /// 429 refusals in [`ErrorFormat::default`], bodies up to 4 MiB, 3 bytes per input
    /// token, 4096 output tokens when a request sets no limit, unpriced models refused.
    pub fn builder() -> BudgetLayerBuilder {
        BudgetLayerBuilder {
            budgets: Vec::new(),
            store: None,
            prices: None,
            format: ErrorFormat::default(),
            status: 429,
            max_body: 4 << 20,
            assume: Assumptions::DEFAULT,
            allow_unpriced: false,
            fail_open: false,
            user_header: None,
            bot_header: Some("x-bot-id".to_owned()),
            alerts: None,
            clock: None,
        }
    }

    /// The settled and reserved spend of `budget`'s account for `subject` (`*` for a
    /// global budget; a hashed key's hex for an API-key budget), if the store keeps it.
    pub fn spend(&self, budget: &str, subject: &str) -> Option<(Money, Money)> {
        let b = self.shared.budgets.iter().find(|b| &*b.name == budget)?;
        let charge = Charge {
            budget: Arc::clone(b),
            subject: subject.into(),
        };
        self.shared.store.spend(&charge, self.shared.clock.now())
    }

    /// Gives `subject` its own limit on the budget named `budget` (`None`: no limit for
    /// that subject), replacing the configured one from the next request on; a limit of
    /// 0 refuses every metered request of the subject with a budget refusal. `false`
    /// when no budget has that name.
    ///
    /// Overrides live in this layer (clones share them), not in the store: every
    /// instance sharing a store sets its own.
    ///
    /// ```
    /// use palisade::cost::budget::{Budget, BudgetLayer, Period, Scope};
    /// use palisade::cost::Money;
    ///
    /// let layer = BudgetLayer::builder()
    ///     .budget(Budget::new("daily", Scope::User, Period::Day, Money::parse_dollars("5").unwrap()))
    ///     .build()
    ///     .unwrap();
    /// assert!(layer.set_limit("daily", "ann", Some(Money::parse_dollars("20").unwrap())));
    /// assert_eq!(layer.limit("daily", "ann"), Some((Some(Money::parse_dollars("20").unwrap()), true)));
    /// assert_eq!(layer.limit("daily", "bob"), Some((Some(Money::parse_dollars("5").unwrap()), false)));
    /// assert!(layer.clear_limit("daily", "ann"));
    /// assert!(!layer.set_limit("monthly", "ann", None));
    /// ```
    pub fn set_limit(&self, budget: &str, subject: &str, limit: Option<Money>) -> bool {
        let Some(b) = self.shared.budgets.iter().find(|b| &*b.name == budget) else {
            return false;
        };
        self.shared
            .overrides
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert((Arc::clone(&b.name), subject.into()), limit);
        true
    }

    /// Removes `subject`'s own limit on `budget`, back to the configured one. `false` when
    /// no budget has that name.
    pub fn clear_limit(&self, budget: &str, subject: &str) -> bool {
        if !self.shared.budgets.iter().any(|b| &*b.name == budget) {
            return false;
        }
        self.shared
            .overrides
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&(Arc::from(budget), Arc::from(subject)));
        true
    }

    /// `subject`'s limit on `budget` (`None` inside: no limit) and whether it is the
    /// subject's own; `None` when no budget has that name.
    pub fn limit(&self, budget: &str, subject: &str) -> Option<(Option<Money>, bool)> {
        let b = self.shared.budgets.iter().find(|b| &*b.name == budget)?;
        let map = self
            .shared
            .overrides
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Some(match map.get(&(Arc::clone(&b.name), Arc::from(subject))) {
            Some(limit) => (*limit, true),
            None => (Some(b.limit), false),
        })
    }

    /// The budgets, in the order they were added.
    pub fn budgets(&self) -> impl Iterator<Item = &Budget> {
        self.shared.budgets.iter().map(|b| &**b)
    }
}

impl BudgetLayerBuilder {
    /// Adds a budget.
    pub fn budget(mut self, budget: Budget) -> Self {
        self.budgets.push(budget);
        self
    }

    /// Keeps accounts in `store` (default: a fresh [`MemoryBudgetStore`]).
    pub fn store(mut self, store: impl BudgetStore) -> Self {
        self.store = Some(Arc::new(store));
        self
    }

    /// Keeps accounts in a shared store (several layers, or a store you also read).
    pub fn shared_store(mut self, store: Arc<dyn BudgetStore>) -> Self {
        self.store = Some(store);
        self
    }

    /// Prices reservations with `prices` (default: [`PriceTable::builtin`]).
    pub fn prices(mut self, prices: impl Into<Arc<PriceTable>>) -> Self {
        self.prices = Some(prices.into());
        self
    }

    /// How refusals are rendered.
    pub fn error_format(mut self, format: ErrorFormat) -> Self {
        self.format = format;
        self
    }

    /// The status of a refusal (default 429; 402 is another common choice).
    pub fn refusal_status(mut self, status: u16) -> Self {
        self.status = status;
        self
    }

    /// The largest request body read for the estimate (larger: 413).
    pub fn max_body(mut self, bytes: usize) -> Self {
        self.max_body = bytes;
        self
    }

    /// Bytes of request body counted as one input token in the estimate (default 3; 1
    /// never underestimates).
    pub fn bytes_per_token(mut self, bytes: u64) -> Self {
        self.assume.bytes_per_token = bytes;
        self
    }

    /// The output tokens reserved when a request sets no `max_tokens`.
    pub fn default_max_tokens(mut self, tokens: u64) -> Self {
        self.assume.default_max_tokens = tokens;
        self
    }

    /// The searches (or fetches) reserved for a server-side web search (or web fetch) tool
    /// without `max_uses` (default 10). Anthropic documents `max_uses` as optional, and
    /// nothing but the model bounds a tool without it, so no reservation is a true bound
    /// for it. 10 is one use for each iteration of Anthropic's server-side loop before it
    /// pauses the turn (`pause_turn`, after 10 iterations by default); an iteration
    /// searching in parallel, or a paused turn sent again, can use more. A request that
    /// does is still charged its actual cost when it settles; give the tool `max_uses` for
    /// a true bound on its uses. 0 reserves none for such a tool.
    ///
    /// ```
    /// use palisade::cost::budget::BudgetLayer;
    /// let layer = BudgetLayer::builder().default_max_uses(20).build().unwrap();
    /// # drop(layer);
    /// ```
    pub fn default_max_uses(mut self, uses: u64) -> Self {
        self.assume.default_max_uses = uses;
        self
    }

    /// The input tokens reserved for each web search a request allows (default 10,000), at
    /// the dearest input rate: the results a search retrieves are added to the model's
    /// context and billed as input tokens of the request. A result's size is not bounded
    /// by the request, so this is an assumption: the default is above the 7,345 tokens
    /// that the one-search usage example of Anthropic's web search documentation writes
    /// to its cache. Anthropic bills the results again in each later iteration of the same
    /// turn, so a request running many searches can use more; raise this when your
    /// requests search often. 0 reserves only the search fee.
    pub fn tokens_per_web_search(mut self, tokens: u64) -> Self {
        self.assume.tokens_per_web_search = tokens;
        self
    }

    /// The input tokens reserved for each fetch a web fetch tool without
    /// `max_content_tokens` allows (default 25,000), at the dearest input rate. A fetch
    /// has no fee, but the page it fetches joins the context and is billed as input
    /// tokens; a tool's `max_content_tokens` bounds each page, and is reserved instead.
    /// Without it a page (a long PDF) can be far larger: the default is the one-fetch
    /// usage example of Anthropic's web fetch documentation (25,039 input tokens for the
    /// whole request).
    pub fn tokens_per_web_fetch(mut self, tokens: u64) -> Self {
        self.assume.tokens_per_web_fetch = tokens;
        self
    }

    /// Whether a model without a price passes unchecked (default: refused with 400,
    /// because its cost cannot be bounded).
    pub fn allow_unpriced(mut self, allow: bool) -> Self {
        self.allow_unpriced = allow;
        self
    }

    /// Whether requests pass unchecked when the store fails (default: refused with 503).
    pub fn fail_open(mut self, open: bool) -> Self {
        self.fail_open = open;
        self
    }

    /// The header naming the user when the request has neither a
    /// [`Principal`](crate::key::Principal) nor an [`Attribution`] user (default `None`:
    /// not read). The client writes it, so anyone could spend another user's budget or
    /// escape their own: set it only when a trusted proxy in front sets (and strips) it.
    pub fn user_header(mut self, name: Option<&str>) -> Self {
        self.user_header = name.map(str::to_owned);
        self
    }

    /// The header naming the bot when the request has no [`Attribution`] (`None`: none).
    pub fn bot_header(mut self, name: Option<&str>) -> Self {
        self.bot_header = name.map(str::to_owned);
        self
    }

    /// Sends threshold alerts to `sink`.
    pub fn alerts(mut self, sink: impl AlertSink) -> Self {
        self.alerts = Some(Arc::new(sink));
        self
    }

    /// Reads time from `clock` (default: [`BudgetClock::system`] when built).
    pub fn clock(mut self, clock: BudgetClock) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Checks the set-up and builds the layer.
    pub fn build(self) -> Result<BudgetLayer, BudgetConfigError> {
        let mut names = std::collections::HashSet::new();
        for b in &self.budgets {
            if !names.insert(b.name.clone()) {
                return Err(BudgetConfigError::DuplicateName(b.name.to_string()));
            }
            if b.limit == Money::ZERO {
                return Err(BudgetConfigError::ZeroLimit(b.name.to_string()));
            }
        }
        let status = StatusCode::from_u16(self.status)
            .ok()
            .filter(|s| s.is_client_error() || s.is_server_error())
            .ok_or(BudgetConfigError::Status(self.status))?;
        if self.max_body == 0 {
            return Err(BudgetConfigError::Zero("max_body"));
        }
        if self.assume.bytes_per_token == 0 {
            return Err(BudgetConfigError::Zero("bytes_per_token"));
        }
        let header = |h: Option<String>| {
            h.map(|h| HeaderName::try_from(h.trim()).map_err(|_| BudgetConfigError::HeaderName(h)))
                .transpose()
        };
        Ok(BudgetLayer {
            shared: Arc::new(Shared {
                budgets: self.budgets.into_iter().map(Arc::new).collect(),
                store: self
                    .store
                    .unwrap_or_else(|| Arc::new(MemoryBudgetStore::new())),
                prices: self
                    .prices
                    .unwrap_or_else(|| Arc::new(PriceTable::builtin())),
                format: self.format,
                status,
                max_body: self.max_body,
                assume: self.assume,
                allow_unpriced: self.allow_unpriced,
                fail_open: self.fail_open,
                user_header: header(self.user_header)?,
                bot_header: header(self.bot_header)?,
                alerts: self.alerts,
                clock: self.clock.unwrap_or_else(BudgetClock::system),
                overrides: std::sync::RwLock::default(),
                gated: AtomicBool::new(false),
                everyone: Arc::from("*"),
            }),
        })
    }
}

impl<S> Layer<S> for BudgetLayer {
    type Service = BudgetService<S>;

    fn layer(&self, inner: S) -> BudgetService<S> {
        // this service is a gate for the layer's split start (see `split`)
        self.shared.gated.store(true, Ordering::Release);
        BudgetService {
            inner,
            shared: Arc::clone(&self.shared),
        }
    }
}

/// The service built by [`BudgetLayer`].
#[derive(Debug, Clone)]
pub struct BudgetService<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> BudgetService<S> {
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
}

/// The reservation a request holds on its budgets, in its request extensions.
///
/// Settle it with the real cost once known ([`settle`](Self::settle), or
/// [`settle_record`](Self::settle_record) with the usage record); only the first
/// settlement counts. Dropped without one, the whole reservation is charged.
///
/// With budget layers nested (a per-user [`BudgetLayer`] outside a global one, plain or
/// split), the request extensions hold the innermost layer's reservation, which carries
/// those of the layers outside it ([`outer`](Self::outer)). Settling it settles each of
/// them with the same actual cost, each once; [`amount`](Self::amount) is the innermost
/// layer's own. A request an inner layer refuses, or whose client goes away while an
/// inner layer waits for its store, never reaches the upstream: the reservations of the
/// layers outside it are released. With a retry between nested layers, an attempt after
/// one that settled the outer reservations (an upstream error refunds them) still charges
/// the outer accounts what it costs, with nothing more reserved there for it.
#[derive(Clone)]
pub struct BudgetReservation {
    inner: Arc<ReservationInner>,
    /// The reservation of the budget layer outside this one, settled with it.
    outer: Option<Arc<BudgetReservation>>,
}

pub(super) struct ReservationInner {
    shared: Arc<Shared>,
    charges: Arc<[Charge]>,
    amount: Money,
    hold: super::store::Hold,
    settled: AtomicBool,
}

impl fmt::Debug for BudgetReservation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BudgetReservation")
            .field("amount", &self.inner.amount)
            .field("settled", &self.inner.settled.load(Ordering::Relaxed))
            .field("outer", &self.outer)
            .finish()
    }
}

impl BudgetReservation {
    /// The amount this layer reserved on each of its budgets.
    pub fn amount(&self) -> Money {
        self.inner.amount
    }

    /// The reservation of the budget layer outside the one that made this, when budget
    /// layers are nested; settled together with this one.
    pub fn outer(&self) -> Option<&BudgetReservation> {
        self.outer.as_deref()
    }

    /// This reservation and those of the layers outside it, innermost first.
    fn each(&self) -> impl Iterator<Item = &ReservationInner> {
        std::iter::successors(Some(self), |r| r.outer.as_deref()).map(|r| &*r.inner)
    }

    /// Charges `actual` and refunds the rest of the reservation (an `actual` above the
    /// reservation is charged in full), on this layer's budgets and those of the layers
    /// outside it. Only the first settlement of each counts.
    pub fn settle(&self, actual: Money) {
        for r in self.each() {
            r.settle(actual);
        }
    }

    /// Refunds the whole reservation (the call failed before any usage), this layer's
    /// and those of the layers outside it.
    pub fn refund(&self) {
        for r in self.each() {
            r.settle(Money::ZERO);
        }
    }

    /// Settles from a usage record: its cost; nothing when the call failed (an upstream
    /// error or no response) before any usage; the whole reservation when the cost is
    /// unknown, including a response that reported no usage at all (an OpenAI stream
    /// without `stream_options.include_usage`, or one cut short before its usage chunk).
    /// With nested layers each reservation is settled so, an unknown cost charging each
    /// its own whole amount.
    pub fn settle_record(&self, record: &UsageRecord) {
        for r in self.each() {
            let actual = match record.cost {
                Some(cost) => cost,
                None if record.usage.is_empty() && record.completion.is_error() => Money::ZERO,
                None => r.amount,
            };
            r.settle(actual);
        }
    }

    /// Whether it has been settled, and those of the layers outside it too.
    pub fn is_settled(&self) -> bool {
        self.each().all(|r| r.settled.load(Ordering::Acquire))
    }

    /// Puts this reservation in `extensions`. A reservation of a budget layer outside
    /// this one found there is carried by it (settled with it), not replaced.
    pub(super) fn hold_in(&self, extensions: &mut http::Extensions) {
        let Some(outer) = extensions.insert(self.clone()) else {
            return;
        };
        if Arc::ptr_eq(&outer.inner, &self.inner) {
            extensions.insert(outer); // already held there, with what it carries
            return;
        }
        extensions.insert(BudgetReservation {
            inner: Arc::clone(&self.inner),
            outer: Some(Arc::new(outer.renewed())),
        });
    }

    /// This reservation for another attempt at the upstream (a retry between budget
    /// layers): each part already settled by an earlier attempt (an upstream error
    /// refunds it) is replaced by an empty one on the same accounts, so that what this
    /// attempt costs is still charged to them.
    fn renewed(&self) -> BudgetReservation {
        let inner = if self.inner.settled.load(Ordering::Acquire) {
            Arc::new(ReservationInner {
                shared: Arc::clone(&self.inner.shared),
                charges: Arc::clone(&self.inner.charges),
                amount: Money::ZERO,
                hold: super::store::Hold::NONE,
                settled: AtomicBool::new(false),
            })
        } else {
            Arc::clone(&self.inner)
        };
        BudgetReservation {
            inner,
            outer: self.outer.as_ref().map(|o| Arc::new(o.renewed())),
        }
    }
}

/// The reservation of the budget layers outside this one that a request carries while
/// this layer waits (for its store, or for its start's decision): dropped before
/// [`sent`](Self::sent) (the client gone), it is released, as nothing reached the upstream.
pub(super) struct OuterUnsent(Option<BudgetReservation>);

impl OuterUnsent {
    /// Guards the outer reservation `extensions` hold, if any.
    pub(super) fn of(extensions: &http::Extensions) -> Self {
        Self(extensions.get::<BudgetReservation>().cloned())
    }

    /// The wait is over: the request goes on (or is refused, releasing it itself).
    pub(super) fn sent(mut self) {
        self.0 = None;
    }
}

impl Drop for OuterUnsent {
    fn drop(&mut self) {
        if let Some(outer) = self.0.take() {
            tracing::debug!(target: "palisade::cost::budget", amount = %outer.amount(),
                "request gone before an inner budget layer let it through: the outer reservation is released");
            outer.refund();
        }
    }
}

/// Releases the reservations of budget layers outside this one that a refused request
/// carries: it never reaches the upstream.
pub(super) fn release_outer(extensions: &http::Extensions) {
    if let Some(outer) = extensions.get::<BudgetReservation>() {
        tracing::debug!(target: "palisade::cost::budget", amount = %outer.amount(),
            "request refused by an inner budget layer: the outer reservation is released");
        outer.refund();
    }
}

impl ReservationInner {
    fn settle(&self, actual: Money) {
        if self.settled.swap(true, Ordering::AcqRel) {
            return;
        }
        let now = self.shared.clock.now();
        self.shared.store.settle_and_report(
            Arc::clone(&self.charges),
            self.hold,
            self.amount,
            actual,
            now,
            Settlement {
                shared: Arc::clone(&self.shared),
                charges: Arc::clone(&self.charges),
                amount: self.amount,
                now,
            },
        );
    }
}

/// What a budget layer does with the answer to one of its settlements: raise the alerts
/// of the thresholds it crossed, or log the store's failure. Given to
/// [`BudgetStore::settle_and_report`](super::BudgetStore::settle_and_report).
pub struct Settlement {
    shared: Arc<Shared>,
    charges: Arc<[Charge]>,
    amount: Money,
    now: SystemTime,
}

impl fmt::Debug for Settlement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settlement")
            .field("amount", &self.amount)
            .finish_non_exhaustive()
    }
}

impl Settlement {
    /// Raises the alerts of the thresholds the settlement crossed, or logs its failure.
    pub fn report(self, result: Result<Vec<super::store::Crossing>, BudgetStoreError>) {
        raise(&self.shared, &self.charges, result, self.now);
    }

    /// Reports `settling` once it answers: at once when it is ready on its first poll (a
    /// memory store), otherwise from a task spawned on the current tokio runtime.
    pub fn after(
        self,
        mut settling: BoxFuture<'static, Result<Vec<super::store::Crossing>, BudgetStoreError>>,
    ) {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        if let Poll::Ready(result) = settling.as_mut().poll(&mut cx) {
            self.report(result);
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    let result = settling.await;
                    self.report(result);
                });
            }
            Err(_) => tracing::error!(target: "palisade::cost::budget", amount = %self.amount,
                "budget settled outside a tokio runtime: the store's answer is lost"),
        }
    }
}

/// Sends the alerts of the thresholds a settlement crossed (or logs the store's failure).
fn raise(
    shared: &Shared,
    charges: &[Charge],
    result: Result<Vec<super::store::Crossing>, super::store::BudgetStoreError>,
    now: SystemTime,
) {
    let crossings = match result {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(target: "palisade::cost::budget", error = %e,
                "budget settlement failed: the reservation stays held until the store frees it (a Redis hold expires; see RedisBudgetStore::hold_ttl)");
            return;
        }
    };
    let Some(alerts) = &shared.alerts else { return };
    for c in crossings {
        let Some(charge) = charges.get(c.index) else {
            continue;
        };
        let mut event = AlertEvent::threshold(
            charge.budget.name.to_string(),
            format!("{}:{}", charge.budget.scope.as_str(), charge.subject),
            c.permille,
            c.spent,
            charge.budget.limit,
        );
        event.time = now;
        alerts.send(event);
    }
}

impl Drop for ReservationInner {
    fn drop(&mut self) {
        if !self.settled.load(Ordering::Acquire) {
            tracing::debug!(target: "palisade::cost::budget", amount = %self.amount,
                "budget reservation dropped unsettled: charged in full");
            self.settle(self.amount);
        }
    }
}

fn header_str<'a>(headers: &'a HeaderMap, name: Option<&HeaderName>) -> Option<&'a str> {
    let v = headers.get(name?)?.to_str().ok()?.trim();
    (!v.is_empty()).then_some(v)
}

impl Shared {
    /// The accounts `req` is charged to.
    pub(super) fn charges<B>(&self, req: &Request<B>) -> Vec<Charge> {
        let attribution = req.extensions().get::<Attribution>();
        let headers = req.headers();
        let mut out = Vec::with_capacity(self.budgets.len());
        let mut key: Option<Option<String>> = None;
        let overrides = self
            .overrides
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for b in &self.budgets {
            let subject: Option<Arc<str>> = match b.scope {
                Scope::Global => Some(Arc::clone(&self.everyone)),
                // The authenticated caller first, as the cost meter attributes spend.
                Scope::User => match req.extensions().get::<crate::key::Principal>() {
                    Some(p) => Some(Arc::clone(p.shared_id())),
                    None => attribution
                        .and_then(|a| a.user.as_deref())
                        .or_else(|| header_str(headers, self.user_header.as_ref()))
                        .map(Into::into),
                },
                Scope::Bot => attribution
                    .and_then(|a| a.bot.as_deref())
                    .or_else(|| header_str(headers, self.bot_header.as_ref()))
                    .map(Into::into),
                Scope::ApiKey => key
                    .get_or_insert_with(|| {
                        attribution
                            .and_then(|a| a.api_key)
                            .or_else(|| ApiKeyId::from_headers(headers))
                            .map(|id| id.to_string())
                    })
                    .as_deref()
                    .map(Into::into),
            };
            let Some(subject) = subject else { continue };
            let over = if overrides.is_empty() {
                None
            } else {
                overrides.get(&(Arc::clone(&b.name), Arc::clone(&subject)))
            };
            let budget = match over {
                None => Arc::clone(b),
                Some(None) => continue, // this subject has no limit
                Some(Some(limit)) => Arc::new(Budget {
                    limit: *limit,
                    ..(**b).clone()
                }),
            };
            out.push(Charge { budget, subject });
        }
        out
    }

    fn refuse(&self, err: Error) -> http::Response<crate::body::ErrorBody> {
        let budget_refusal = err.kind() == ErrorKind::BudgetExceeded;
        let mut res = err.to_response(self.format);
        if budget_refusal {
            *res.status_mut() = self.status;
        }
        res
    }
}

pub(super) fn refusal<B>(shared: &Shared, err: Error) -> Response<ResponseBody<B>> {
    shared.refuse(err).map(ResponseBody::error)
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for BudgetService<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqB: Body + From<Bytes> + Send + 'static,
    ReqB::Data: Send,
    ReqB::Error: Into<crate::BoxError>,
    ResB: Send + 'static,
{
    type Response = Response<ResponseBody<ResB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResB, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        if let Some(pending) = super::split::pending_for(&self.shared, &req) {
            let (shared, inner) = self.take_inner();
            return ResponseFuture::boxed(super::split::gate(shared, inner, req, pending));
        }
        // Nothing to reserve: the inner call as it is, no body read, no box.
        if !metered_method(req.method()) {
            return ResponseFuture::inner(self.inner.call(req));
        }
        let charges = self.shared.charges(&req);
        if charges.is_empty() {
            return ResponseFuture::inner(self.inner.call(req));
        }
        let (shared, inner) = self.take_inner();
        ResponseFuture::boxed(check_charged(shared, inner, req, charges))
    }
}

impl<S: Clone> BudgetService<S> {
    /// The ready inner service (a clone stays behind) and the shared state, for a call
    /// that goes on after `call` returns.
    fn take_inner(&mut self) -> (Arc<Shared>, S) {
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        (Arc::clone(&self.shared), inner)
    }
}

/// Whether requests of `method` are checked against budgets (reads and deletes are not).
pub(super) fn metered_method(method: &Method) -> bool {
    !matches!(
        *method,
        Method::GET | Method::HEAD | Method::DELETE | Method::OPTIONS
    )
}

pub(super) async fn pass<S, ReqB, ResB>(
    mut inner: S,
    req: Request<ReqB>,
) -> Result<Response<ResponseBody<ResB>>, S::Error>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
{
    inner.call(req).await.map(|r| r.map(ResponseBody::inner))
}

pub(super) async fn check<S, ReqB, ResB>(
    shared: Arc<Shared>,
    inner: S,
    req: Request<ReqB>,
) -> Result<Response<ResponseBody<ResB>>, S::Error>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    ReqB: Body + From<Bytes>,
    ReqB::Error: Into<crate::BoxError>,
{
    let charges = shared.charges(&req);
    check_charged(shared, inner, req, charges).await
}

/// [`check`] of a request whose accounts are known.
pub(super) async fn check_charged<S, ReqB, ResB>(
    shared: Arc<Shared>,
    inner: S,
    req: Request<ReqB>,
    charges: Vec<Charge>,
) -> Result<Response<ResponseBody<ResB>>, S::Error>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    ReqB: Body + From<Bytes>,
    ReqB::Error: Into<crate::BoxError>,
{
    match prepare_charged(&shared, req, charges, None).await {
        Prepared::Pass(req) => pass(inner, req).await,
        Prepared::Refuse(err) => Ok(refusal(&shared, err)),
        Prepared::Reserve {
            req,
            charges,
            amount,
        } => reserve_and_pass(shared, inner, req, charges, amount).await,
    }
}

/// What the layer makes of a request before asking the store.
pub(super) enum Prepared<B> {
    /// Nothing to reserve.
    Pass(Request<B>),
    /// Refused before any reservation (the reservations of outer budget layers the
    /// request carried are released).
    Refuse(Error),
    /// Reserve `amount` on `charges`.
    Reserve {
        req: Request<B>,
        charges: Vec<Charge>,
        amount: Money,
    },
}

/// The accounts and the amount a request needs, from its `BudgetEstimate` or its body.
/// `known`: a body already estimated and the amount it needs, taken as it is when the
/// request's body is the same (the estimate reads nothing else).
pub(super) async fn prepare<B>(
    shared: &Shared,
    req: Request<B>,
    known: Option<(Bytes, Money)>,
) -> Prepared<B>
where
    B: Body + From<Bytes>,
    B::Error: Into<crate::BoxError>,
{
    let charges = shared.charges(&req);
    prepare_charged(shared, req, charges, known).await
}

/// [`prepare`] of a request whose accounts are known.
pub(super) async fn prepare_charged<B>(
    shared: &Shared,
    req: Request<B>,
    charges: Vec<Charge>,
    known: Option<(Bytes, Money)>,
) -> Prepared<B>
where
    B: Body + From<Bytes>,
    B::Error: Into<crate::BoxError>,
{
    if charges.is_empty() || !metered_method(req.method()) {
        return Prepared::Pass(req);
    }
    let (req, amount) = match req.extensions().get::<BudgetEstimate>() {
        Some(&BudgetEstimate(amount)) => (req, amount),
        None => {
            let (parts, body) = req.into_parts();
            let bytes = match Limited::new(body, shared.max_body).collect().await {
                Ok(c) => c.to_bytes(),
                Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                    release_outer(&parts.extensions);
                    return Prepared::Refuse(Error::new(
                        ErrorKind::PayloadTooLarge,
                        format!(
                            "the request body is larger than {} bytes, the most the budget check reads",
                            shared.max_body
                        ),
                    ));
                }
                Err(e) => {
                    release_outer(&parts.extensions);
                    return Prepared::Refuse(
                        Error::invalid_request("the request body could not be read").with_source(e),
                    );
                }
            };
            let plan = match known {
                Some((seen, amount)) if seen == bytes => Plan::Reserve(amount),
                _ => plan(shared, estimate(&bytes, &shared.prices, &shared.assume)),
            };
            let req = Request::from_parts(parts, B::from(bytes));
            match plan {
                Plan::Pass => return Prepared::Pass(req),
                Plan::Refuse(err) => {
                    release_outer(req.extensions());
                    return Prepared::Refuse(err);
                }
                Plan::Reserve(amount) => (req, amount),
            }
        }
    };
    if let Some(err) = larger_than_budget(&charges, amount) {
        release_outer(req.extensions());
        return Prepared::Refuse(err);
    }
    Prepared::Reserve {
        req,
        charges,
        amount,
    }
}

/// Reserves `amount` on `charges` and calls `inner` holding the reservation.
pub(super) async fn reserve_and_pass<S, ReqB, ResB>(
    shared: Arc<Shared>,
    inner: S,
    req: Request<ReqB>,
    charges: Vec<Charge>,
    amount: Money,
) -> Result<Response<ResponseBody<ResB>>, S::Error>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
{
    let unsent = OuterUnsent::of(req.extensions());
    let outcome = Reserving::new(&shared, charges.into(), amount).await;
    unsent.sent();
    match outcome {
        Outcome::Granted(reservation) => pass_holding(inner, req, reservation).await,
        Outcome::Refused(err) => {
            release_outer(req.extensions());
            Ok(refusal(&shared, err))
        }
        Outcome::Pass => pass(inner, req).await,
    }
}

/// A reservation in flight, resolving to its [`Outcome`]. Dropped before the store
/// answered (the client went away), it finishes the store call in the background and
/// releases what the store grants: a network store may have applied it already.
pub(super) struct Reserving {
    shared: Arc<Shared>,
    future: Option<BoxFuture<'static, Result<Reserve, BudgetStoreError>>>,
    charges: Arc<[Charge]>,
    amount: Money,
}

impl Reserving {
    /// Asks the store for `amount` on `charges` (sent when first polled).
    pub(super) fn new(shared: &Arc<Shared>, charges: Arc<[Charge]>, amount: Money) -> Self {
        let now = shared.clock.now();
        let store = Arc::clone(&shared.store);
        let for_store = Arc::clone(&charges);
        Self {
            shared: Arc::clone(shared),
            future: Some(Box::pin(async move {
                store.reserve(&for_store, amount, now).await
            })),
            charges,
            amount,
        }
    }

    /// The accounts and the amount asked for.
    pub(super) fn asked(&self) -> (Arc<[Charge]>, Money) {
        (Arc::clone(&self.charges), self.amount)
    }
}

impl Future for Reserving {
    type Output = Outcome;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Outcome> {
        let this = &mut *self;
        let Some(future) = this.future.as_mut() else {
            panic!("Reserving polled after it resolved");
        };
        let Poll::Ready(result) = future.as_mut().poll(cx) else {
            return Poll::Pending;
        };
        this.future = None;
        Poll::Ready(outcome(
            &this.shared,
            Arc::clone(&this.charges),
            this.amount,
            result,
        ))
    }
}

impl Drop for Reserving {
    fn drop(&mut self) {
        let Some(future) = self.future.take() else {
            return;
        };
        let shared = Arc::clone(&self.shared);
        let charges = Arc::clone(&self.charges);
        let amount = self.amount;
        let release = async move {
            let result = future.await;
            if let Outcome::Granted(r) = outcome(&shared, charges, amount, result) {
                tracing::debug!(target: "palisade::cost::budget", amount = %amount,
                    "reservation granted after its request was gone: released");
                r.refund();
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(release);
            }
            Err(_) => tracing::error!(target: "palisade::cost::budget", amount = %amount,
                "a request abandoned outside a tokio runtime: its reservation, if granted, stays held"),
        }
    }
}

/// Calls `inner` with `reservation` in the request extensions; refunded when the call
/// fails without a response.
pub(super) async fn pass_holding<S, ReqB, ResB>(
    inner: S,
    mut req: Request<ReqB>,
    reservation: BudgetReservation,
) -> Result<Response<ResponseBody<ResB>>, S::Error>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
{
    reservation.hold_in(req.extensions_mut());
    match pass(inner, req).await {
        Ok(res) => Ok(res),
        Err(e) => {
            reservation.refund(); // no response, no usage
            Err(e)
        }
    }
}

impl BudgetReservation {
    /// Whether this reservation covers a request needing `amount` on `charges`.
    pub(super) fn covers(&self, charges: &[Charge], amount: Money) -> bool {
        amount <= self.inner.amount && *self.inner.charges == *charges
    }
}

/// What a request's body means for its budgets.
pub(super) enum Plan {
    /// Not metered (or an unpriced model that may pass): no reservation.
    Pass,
    /// Refused before any reservation.
    Refuse(Error),
    /// Reserve this much.
    Reserve(Money),
}

/// The plan for a body's estimate.
pub(super) fn plan(shared: &Shared, est: Estimate) -> Plan {
    match est {
        Estimate::NotMetered => Plan::Pass,
        Estimate::Invalid { field, reason } => {
            Plan::Refuse(Error::invalid_fields([FieldError::new(field, reason)]))
        }
        Estimate::Unpriced(_) if shared.allow_unpriced => Plan::Pass,
        Estimate::Unpriced(model) => Plan::Refuse(Error::invalid_fields([FieldError::new(
            "model",
            format!("`{model}` has no price, so its cost cannot be checked against a budget"),
        )])),
        Estimate::Cost { max, .. } => Plan::Reserve(max),
    }
}

/// The 400 for a request that may cost more than a whole budget. A limit of 0 (a subject
/// blocked by an override) is left to the store: a budget refusal.
pub(super) fn larger_than_budget(charges: &[Charge], amount: Money) -> Option<Error> {
    let c = charges
        .iter()
        .find(|c| c.budget.limit > Money::ZERO && amount > c.budget.limit)?;
    Some(Error::invalid_fields([FieldError::new(
        "max_tokens",
        format!(
            "this request may cost up to {amount}, more than the whole budget `{}` ({} per {}); lower max_tokens, give web search and web fetch tools a smaller max_uses (and max_content_tokens), or shorten the input",
            c.budget.name, c.budget.limit, c.budget.period
        ),
    )]))
}

/// What the store's answer to a reservation means for the request.
pub(super) enum Outcome {
    /// Reserved: the request goes on, holding this.
    Granted(BudgetReservation),
    /// Refused (a budget is spent, or the store failed and the layer fails closed).
    Refused(Error),
    /// The store failed and the layer fails open: the request passes unchecked.
    Pass,
}

pub(super) fn outcome(
    shared: &Arc<Shared>,
    charges: Arc<[Charge]>,
    amount: Money,
    result: Result<Reserve, super::store::BudgetStoreError>,
) -> Outcome {
    match result {
        Ok(Reserve::Granted(hold)) => Outcome::Granted(BudgetReservation {
            inner: Arc::new(ReservationInner {
                shared: Arc::clone(shared),
                charges,
                amount,
                hold,
                settled: AtomicBool::new(false),
            }),
            outer: None,
        }),
        Ok(Reserve::Refused {
            index,
            spent,
            retry_after,
        }) => {
            let c = &charges[index.min(charges.len().saturating_sub(1))];
            let err = Error::budget_exceeded(format!(
                "the {} budget `{}` of {} is spent ({} used); it frees up {}",
                c.budget.period,
                c.budget.name,
                c.budget.limit,
                spent,
                match retry_after {
                    Some(d) => format!("in {}s", crate::error::retry_after_secs(d)),
                    None => "as requests in flight finish".to_owned(),
                }
            ));
            Outcome::Refused(err.with_retry_after(retry_after.unwrap_or(Duration::from_secs(1))))
        }
        Err(e) if shared.fail_open => {
            tracing::warn!(target: "palisade::cost::budget", error = %e,
                "budget store failed: request passes unchecked");
            Outcome::Pass
        }
        Err(e) => Outcome::Refused(
            Error::new(
                ErrorKind::Unavailable,
                "budgets cannot be checked right now",
            )
            .with_retry_after(Duration::from_secs(1))
            .with_source(e),
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use bytes::Bytes;
    use http::{Request, Response};
    use http_body_util::Full;
    use tower::{Layer, ServiceExt, service_fn};

    use super::*;
    use crate::cost::budget::Period;

    const BODY: &str = r#"{"model":"claude-3-5-haiku-20241022","max_tokens":1000,"messages":[{"role":"user","content":"hi"}]}"#;

    fn request(user: &str) -> Request<Full<Bytes>> {
        let mut req = Request::post("/v1/messages")
            .body(Full::new(Bytes::from(BODY)))
            .unwrap();
        req.extensions_mut()
            .insert(Attribution::default().with_user(user.to_owned()));
        req
    }

    fn dollars(s: &str) -> Money {
        Money::parse_dollars(s).unwrap()
    }

    /// A layer with a $0.001 daily budget per user: too small for one `BODY` request
    /// ($0.004 of output alone).
    fn small() -> BudgetLayer {
        BudgetLayer::builder()
            .budget(Budget::new(
                "daily",
                Scope::User,
                Period::Day,
                dollars("0.001"),
            ))
            .build()
            .unwrap()
    }

    async fn status(layer: &BudgetLayer, user: &str) -> (u16, Option<String>) {
        let svc = layer.layer(service_fn(|req: Request<Full<Bytes>>| async move {
            if let Some(r) = req.extensions().get::<BudgetReservation>() {
                r.settle(Money::ZERO);
            }
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
        }));
        let res = svc.oneshot(request(user)).await.unwrap();
        let retry = res
            .headers()
            .get("x-should-retry")
            .map(|v| v.to_str().unwrap().to_owned());
        (res.status().as_u16(), retry)
    }

    #[tokio::test]
    async fn override_raises_one_subjects_limit_only() {
        let layer = small();
        assert_eq!(status(&layer, "ann").await.0, 400, "larger than the budget");
        assert!(layer.set_limit("daily", "ann", Some(dollars("1"))));
        assert_eq!(status(&layer, "ann").await.0, 200);
        assert_eq!(status(&layer, "bob").await.0, 400);
        assert_eq!(
            layer.limit("daily", "ann"),
            Some((Some(dollars("1")), true))
        );
        assert!(layer.clear_limit("daily", "ann"));
        assert_eq!(status(&layer, "ann").await.0, 400);
    }

    #[tokio::test]
    async fn override_of_none_lifts_the_limit() {
        let layer = small();
        assert!(layer.set_limit("daily", "ann", None));
        assert_eq!(status(&layer, "ann").await.0, 200);
        assert_eq!(layer.limit("daily", "ann"), Some((None, true)));
    }

    #[tokio::test]
    async fn override_of_zero_is_a_budget_refusal_not_a_bad_request() {
        let layer = BudgetLayer::builder()
            .budget(Budget::new("daily", Scope::User, Period::Day, dollars("5")))
            .build()
            .unwrap();
        assert!(layer.set_limit("daily", "ann", Some(Money::ZERO)));
        assert_eq!(status(&layer, "ann").await, (429, Some("false".into())));
        assert_eq!(status(&layer, "bob").await.0, 200);
    }

    #[test]
    fn override_of_an_unknown_budget_is_refused() {
        let layer = small();
        assert!(!layer.set_limit("monthly", "ann", None));
        assert!(!layer.clear_limit("monthly", "ann"));
        assert_eq!(layer.limit("monthly", "ann"), None);
    }
}
