//! `GET /metrics`: Prometheus text through the `metrics` facade and
//! `metrics-exporter-prometheus`, one registry per gateway (no global recorder, so several
//! gateways in one process keep their own numbers).
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `palisade_gateway_requests_total` | counter | `route` (the route template, `unmatched` for no route), `method` (`other` for a non-standard one), `status` (499: the client hung up before the answer) |
//! | `palisade_gateway_refusals_total` | counter | `reason` (`unauthenticated`, `rate_limited`, `budget_exceeded`, ...) |
//! | `palisade_gateway_request_duration_seconds` | histogram | `route`: time to the response head (for a client that hung up first, 499, the time until it did) |
//! | `palisade_gateway_upstream_duration_seconds` | histogram | `route`: the upstream's time to the response head, retries included |
//! | `palisade_gateway_overhead_seconds` | histogram | `route`: the gateway's own time (request minus upstream) |
//! | `palisade_gateway_tokens_total` | counter | `model`, `kind` (`input`, `output`, `cache_write`, `cache_read`) |
//! | `palisade_gateway_cost_picodollars_total` | counter | `model` (integer pico-dollars, as the meter prices) |
//! | `palisade_gateway_usage_records_total` | counter | `model`, `completion` |
//! | `palisade_gateway_breaker_state` | gauge | `upstream`, `state`: 1 for the current state, 0 for the others |
//! | `palisade_gateway_csp_reports_total` | counter | CSP violation reports the dashboard received |
//!
//! Requests are counted by [`MetricsLayer`] (a middleware outside every other layer but the
//! request log); tokens and cost by [`MeteredSink`], which sees every usage record the cost
//! meter writes; breaker states are read when `/metrics` is scraped.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{MatchedPath, Request, State};
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use http::header::CONTENT_TYPE;
use metrics::{
    Counter, Histogram, SharedString, Unit, counter, describe_counter, describe_gauge,
    describe_histogram, gauge, histogram,
};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};
use palisade::cost::{Completion, SinkError, UsageRecord, UsageSink};
use pin_project_lite::pin_project;
use serde::Serialize;

use crate::app::AppState;
use crate::upstream::UpstreamTime;

const REQUESTS: &str = "palisade_gateway_requests_total";
const REFUSALS: &str = "palisade_gateway_refusals_total";
const REQUEST_SECONDS: &str = "palisade_gateway_request_duration_seconds";
const UPSTREAM_SECONDS: &str = "palisade_gateway_upstream_duration_seconds";
const OVERHEAD_SECONDS: &str = "palisade_gateway_overhead_seconds";
const TOKENS: &str = "palisade_gateway_tokens_total";
const COST: &str = "palisade_gateway_cost_picodollars_total";
const RECORDS: &str = "palisade_gateway_usage_records_total";
const BREAKER: &str = "palisade_gateway_breaker_state";
const CSP_REPORTS: &str = "palisade_gateway_csp_reports_total";

/// The breaker states the `palisade_gateway_breaker_state` gauge enumerates (as `/health`
/// names them).
const BREAKER_STATES: [&str; 6] = [
    "Closed",
    "Open",
    "HalfOpen",
    "ForcedOpen",
    "ForcedClosed",
    "MetricsOnly",
];

/// Why the gateway (or the upstream) refused a request, from the response status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// 400: validation failed.
    InvalidRequest,
    /// 401: no key or an unknown key.
    Unauthenticated,
    /// 403: a user key on an admin route.
    Forbidden,
    /// 404: no such route or object.
    NotFound,
    /// 405.
    MethodNotAllowed,
    /// 413: the body is too large.
    PayloadTooLarge,
    /// 415: the body is not JSON.
    UnsupportedMediaType,
    /// 429 that may be retried: a rate limit.
    RateLimited,
    /// 429 with `x-should-retry: false` from the gateway itself (not the upstream): a
    /// spend budget.
    BudgetExceeded,
    /// 503: a breaker is open and no fallback served.
    Unavailable,
    /// 529: the upstream is overloaded.
    Overloaded,
}

impl Refusal {
    /// Every reason, in the order the dashboard lists them.
    pub const ALL: [Refusal; 11] = [
        Refusal::InvalidRequest,
        Refusal::Unauthenticated,
        Refusal::Forbidden,
        Refusal::NotFound,
        Refusal::MethodNotAllowed,
        Refusal::PayloadTooLarge,
        Refusal::UnsupportedMediaType,
        Refusal::RateLimited,
        Refusal::BudgetExceeded,
        Refusal::Unavailable,
        Refusal::Overloaded,
    ];

    /// The label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Refusal::InvalidRequest => "invalid_request",
            Refusal::Unauthenticated => "unauthenticated",
            Refusal::Forbidden => "forbidden",
            Refusal::NotFound => "not_found",
            Refusal::MethodNotAllowed => "method_not_allowed",
            Refusal::PayloadTooLarge => "payload_too_large",
            Refusal::UnsupportedMediaType => "unsupported_media_type",
            Refusal::RateLimited => "rate_limited",
            Refusal::BudgetExceeded => "budget_exceeded",
            Refusal::Unavailable => "unavailable",
            Refusal::Overloaded => "overloaded",
        }
    }

    /// The refusal a response stands for, if it is one (500, 502 and 504 are failures, not
    /// refusals: they count in `palisade_gateway_requests_total` by status).
    pub fn of(res: &Response) -> Option<Refusal> {
        Some(match res.status().as_u16() {
            400 => Refusal::InvalidRequest,
            401 => Refusal::Unauthenticated,
            403 => Refusal::Forbidden,
            404 => Refusal::NotFound,
            405 => Refusal::MethodNotAllowed,
            413 => Refusal::PayloadTooLarge,
            415 => Refusal::UnsupportedMediaType,
            // The budgets answer without calling the upstream; an upstream's own 429 (which
            // may say `x-should-retry: false` too) carries the time it took.
            429 if res.extensions().get::<UpstreamTime>().is_none()
                && res
                    .headers()
                    .get("x-should-retry")
                    .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"false")) =>
            {
                Refusal::BudgetExceeded
            }
            429 => Refusal::RateLimited,
            503 => Refusal::Unavailable,
            529 => Refusal::Overloaded,
            _ => return None,
        })
    }
}

/// Refusals per reason since start, and per minute over the last hour (for the dashboard).
#[derive(Debug, Default)]
struct RefusalCounts {
    by_reason: [AtomicU64; Refusal::ALL.len()],
    /// (minute since the epoch, refusals in it), oldest first, at most 60.
    per_minute: Mutex<VecDeque<(u64, u64)>>,
}

/// The refusals as the dashboard shows them.
#[derive(Debug, Serialize)]
pub struct RefusalView {
    /// Since start, by reason (every reason listed, zeros too).
    pub by_reason: Vec<(&'static str, u64)>,
    /// `[unix_ms, count]` per minute over the last hour, oldest first (missing minutes are 0).
    pub per_minute: Vec<(u64, u64)>,
}

/// The gateway's metrics: a Prometheus registry of its own, plus the refusal counts the
/// dashboard reads.
#[derive(Clone)]
pub struct Metrics {
    recorder: Arc<PrometheusRecorder>,
    handle: PrometheusHandle,
    refusals: Arc<RefusalCounts>,
    handles: Arc<RwLock<HashMap<HandleKey, Arc<Handles>, foldhash::fast::RandomState>>>,
    usage_handles: Arc<RwLock<HashMap<&'static str, Arc<UsageHandles>>>>,
}

/// The usage metrics of one model, each registered when first counted (so the registry
/// holds the same series as when every record registers its own), then kept.
struct UsageHandles {
    model: SharedString,
    /// By [`TOKEN_KINDS`].
    tokens: [OnceLock<Counter>; 4],
    cost: OnceLock<Counter>,
    /// By [`completion_index`].
    records: [OnceLock<Counter>; 5],
}

impl UsageHandles {
    fn new(model: SharedString) -> Self {
        Self {
            model,
            tokens: Default::default(),
            cost: OnceLock::new(),
            records: Default::default(),
        }
    }
}

/// The `kind` labels of `palisade_gateway_tokens_total`.
const TOKEN_KINDS: [&str; 4] = ["input", "output", "cache_write", "cache_read"];

/// Route template, method and status of a request's metrics.
type HandleKey = (&'static str, &'static str, u16);

/// The most `(route, method, status)` triples whose metrics are kept registered.
const MAX_HANDLES: usize = 4096;

/// The metrics one request updates, for one `(route, method, status)`.
struct Handles {
    requests: Counter,
    request_seconds: Histogram,
    upstream_seconds: Histogram,
    overhead_seconds: Histogram,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn minute_of(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() / 60)
}

impl Metrics {
    /// A fresh registry with the histograms' buckets and every metric described.
    pub fn new() -> Result<Self, palisade::BoxError> {
        // Requests and upstream calls: 5 ms to a minute (long generations and streams).
        let latency = [
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
        ];
        // The gateway's own time: 50 µs to a quarter second.
        let overhead = [
            0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
            0.25,
        ];
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(REQUEST_SECONDS.into()), &latency)?
            .set_buckets_for_metric(Matcher::Full(UPSTREAM_SECONDS.into()), &latency)?
            .set_buckets_for_metric(Matcher::Full(OVERHEAD_SECONDS.into()), &overhead)?
            .build_recorder();
        let handle = recorder.handle();
        let recorder = Arc::new(recorder);
        spawn_upkeep(Arc::downgrade(&recorder));
        let metrics = Self {
            recorder,
            handle,
            refusals: Arc::default(),
            handles: Arc::default(),
            usage_handles: Arc::default(),
        };
        metrics.with(|| {
            describe_counter!(REQUESTS, Unit::Count, "Requests, by route template, method and status (499: the client hung up before the answer).");
            describe_counter!(REFUSALS, Unit::Count, "Requests refused, by reason (from the status; the gateway's own 429 with x-should-retry: false is a budget).");
            describe_histogram!(REQUEST_SECONDS, Unit::Seconds, "Time from the request to the response head (or to the client hanging up, status 499), by route.");
            describe_histogram!(UPSTREAM_SECONDS, Unit::Seconds, "The upstream's time to the response head (retries included), by route.");
            describe_histogram!(OVERHEAD_SECONDS, Unit::Seconds, "The gateway's own time on requests that went upstream: request time minus upstream time.");
            describe_counter!(TOKENS, Unit::Count, "Tokens metered from upstream responses, by model and kind.");
            describe_counter!(COST, Unit::Count, "Cost metered from upstream responses, in pico-dollars (1e-12 USD), by model.");
            describe_counter!(RECORDS, Unit::Count, "Usage records written, by model and completion.");
            describe_gauge!(BREAKER, "Circuit breaker state per upstream: 1 for the current state, 0 for the others.");
            describe_counter!(CSP_REPORTS, Unit::Count, "Content-Security-Policy violation reports received from the dashboard page.");
        });
        Ok(metrics)
    }

    /// Runs `f` with this gateway's registry as the recorder of the `metrics` macros.
    fn with<T>(&self, f: impl FnOnce() -> T) -> T {
        metrics::with_local_recorder(&*self.recorder, f)
    }

    /// Counts one answered request.
    #[allow(dead_code)] // the middleware counts through `count`; the tests call this
    pub fn request(
        &self,
        route: &str,
        method: &http::Method,
        res: &Response,
        total: Duration,
        upstream: Option<Duration>,
    ) {
        let route = intern(route).ok_or(route);
        self.count(
            route,
            method_label(method),
            res.status(),
            Refusal::of(res),
            total,
            upstream,
        );
    }

    /// Counts one request under `route` (kept, interned, or past the bound of kept values,
    /// as it is), answered with `status` (499: its client hung up before the answer).
    fn count(
        &self,
        route: Result<&'static str, &str>,
        method: &'static str,
        status: StatusCode,
        refusal: Option<Refusal>,
        total: Duration,
        upstream: Option<Duration>,
    ) {
        let kept = route
            .ok()
            .and_then(|route| self.handles(route, method, status));
        let fresh;
        let h = match &kept {
            Some(h) => &**h,
            None => {
                let route = match route {
                    Ok(kept) => SharedString::const_str(kept),
                    Err(other) => SharedString::from_owned(other.to_owned()),
                };
                fresh = self.register(route, SharedString::const_str(method), status);
                &fresh
            }
        };
        h.requests.increment(1);
        h.request_seconds.record(total.as_secs_f64());
        if let Some(up) = upstream {
            h.upstream_seconds.record(up.as_secs_f64());
            h.overhead_seconds
                .record(total.saturating_sub(up).as_secs_f64());
        }
        if let Some(r) = refusal {
            self.with(|| counter!(REFUSALS, "reason" => r.as_str()).increment(1));
            self.count_refusal(r, SystemTime::now());
        }
    }

    /// The request metrics of `(route, method, status)` (kept label values), registered
    /// once and kept (up to [`MAX_HANDLES`] of them), so that counting a request neither
    /// allocates nor looks its labels up in the registry. `None` past the bound: the caller
    /// registers per use.
    fn handles(
        &self,
        route: &'static str,
        method: &'static str,
        status: StatusCode,
    ) -> Option<Arc<Handles>> {
        let key = (route, method, status.as_u16());
        if let Some(h) = self
            .handles
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
        {
            return Some(Arc::clone(h));
        }
        let mut kept = self.handles.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(h) = kept.get(&key) {
            return Some(Arc::clone(h));
        }
        if kept.len() >= MAX_HANDLES {
            return None;
        }
        let h = Arc::new(self.register(
            SharedString::const_str(key.0),
            SharedString::const_str(key.1),
            status,
        ));
        kept.insert(key, Arc::clone(&h));
        Some(h)
    }

    /// Registers (or finds) the request metrics of `(route, method, status)`.
    fn register(&self, route: SharedString, method: SharedString, status: StatusCode) -> Handles {
        self.with(|| Handles {
            requests: counter!(REQUESTS, "route" => route.clone(), "method" => method, "status" => label(status.as_str())),
            request_seconds: histogram!(REQUEST_SECONDS, "route" => route.clone()),
            upstream_seconds: histogram!(UPSTREAM_SECONDS, "route" => route.clone()),
            overhead_seconds: histogram!(OVERHEAD_SECONDS, "route" => route),
        })
    }

    fn count_refusal(&self, r: Refusal, now: SystemTime) {
        let i = Refusal::ALL.iter().position(|x| *x == r).unwrap_or(0);
        self.refusals.by_reason[i].fetch_add(1, Ordering::Relaxed);
        let minute = minute_of(now);
        let mut q = self
            .refusals
            .per_minute
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match q.back_mut() {
            Some((m, n)) if *m == minute => *n += 1,
            _ => q.push_back((minute, 1)),
        }
        while q.front().is_some_and(|(m, _)| *m + 60 <= minute) {
            q.pop_front();
        }
    }

    /// The refusals for the dashboard, the last hour ending at `now`.
    pub fn refusals(&self, now: SystemTime) -> RefusalView {
        let by_reason = Refusal::ALL
            .iter()
            .zip(&self.refusals.by_reason)
            .map(|(r, n)| (r.as_str(), n.load(Ordering::Relaxed)))
            .collect();
        let q = self
            .refusals
            .per_minute
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let last = minute_of(now);
        let per_minute = (last.saturating_sub(59)..=last)
            .map(|m| {
                let n = q.iter().find(|(x, _)| *x == m).map_or(0, |(_, n)| *n);
                (m * 60_000, n)
            })
            .collect();
        RefusalView {
            by_reason,
            per_minute,
        }
    }

    /// Counts the usage of metered records.
    pub fn usage(&self, batch: &[UsageRecord]) {
        for r in batch {
            let model = r.model.as_deref().unwrap_or("unknown");
            let kept = self.usage_handles(model);
            let fresh;
            let h = match &kept {
                Some(h) => &**h,
                None => {
                    fresh = UsageHandles::new(label(model));
                    &fresh
                }
            };
            let u = &r.usage;
            let counts = [
                u.input_tokens,
                u.output_tokens,
                u.cache_write_5m_tokens
                    .saturating_add(u.cache_write_1h_tokens),
                u.cache_read_tokens,
            ];
            for ((kind, n), slot) in TOKEN_KINDS.into_iter().zip(counts).zip(&h.tokens) {
                if n > 0 {
                    slot.get_or_init(|| {
                        self.with(|| counter!(TOKENS, "model" => h.model.clone(), "kind" => kind))
                    })
                    .increment(n);
                }
            }
            if let Some(cost) = r.cost {
                let picos = u64::try_from(cost.picos()).unwrap_or(u64::MAX);
                h.cost
                    .get_or_init(|| self.with(|| counter!(COST, "model" => h.model.clone())))
                    .increment(picos);
            }
            let records = || {
                self.with(|| {
                    counter!(RECORDS, "model" => h.model.clone(), "completion" => completion_label(r.completion))
                })
            };
            match completion_index(r.completion) {
                Some(i) => h.records[i].get_or_init(records).increment(1),
                None => records().increment(1),
            }
        }
    }

    /// The usage metrics of `model`, kept (up to [`MAX_HANDLES`] models; `None` past the
    /// bound: the caller registers per use).
    fn usage_handles(&self, model: &str) -> Option<Arc<UsageHandles>> {
        let model = intern(model)?;
        if let Some(h) = self
            .usage_handles
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(model)
        {
            return Some(Arc::clone(h));
        }
        let mut kept = self
            .usage_handles
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if kept.len() >= MAX_HANDLES && !kept.contains_key(model) {
            return None;
        }
        let h = kept
            .entry(model)
            .or_insert_with(|| Arc::new(UsageHandles::new(SharedString::const_str(model))));
        Some(Arc::clone(h))
    }

    /// Counts a CSP violation report.
    pub fn csp_report(&self) {
        self.with(|| counter!(CSP_REPORTS).increment(1));
    }

    /// The Prometheus text, with the breaker gauges read from `state` now.
    pub fn render(&self, state: &AppState) -> String {
        let breakers = state.upstreams.health();
        self.with(|| {
            for b in &breakers {
                for s in BREAKER_STATES {
                    let v = if b.state == s { 1.0 } else { 0.0 };
                    gauge!(BREAKER, "upstream" => b.upstream, "state" => s).set(v);
                }
            }
        });
        self.handle.run_upkeep();
        self.handle.render()
    }
}

/// How often histogram samples are folded into their buckets when nothing scrapes.
const UPKEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Folds the recorder's histogram samples into their buckets every [`UPKEEP_EVERY`] until
/// the recorder is dropped. The exporter keeps each sample until an upkeep, which a scrape
/// of `/metrics` also runs: without a scraper the samples piled up, about 20 bytes a
/// request for the life of the process. Outside a tokio runtime (no request can be served
/// there) nothing is spawned.
fn spawn_upkeep(recorder: std::sync::Weak<PrometheusRecorder>) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    runtime.spawn(async move {
        let mut every = tokio::time::interval(UPKEEP_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            match recorder.upgrade() {
                Some(recorder) => recorder.handle().run_upkeep(),
                None => return,
            }
        }
    });
}

/// The `method` label: the standard methods by name, any other as `other`. A client may
/// send any token as its method; were each one a label value, it would be a series of its
/// own in the registry and a value kept for the life of the process.
fn method_label(method: &http::Method) -> &'static str {
    use http::Method as M;
    match *method {
        M::GET => "GET",
        M::HEAD => "HEAD",
        M::POST => "POST",
        M::PUT => "PUT",
        M::DELETE => "DELETE",
        M::PATCH => "PATCH",
        M::OPTIONS => "OPTIONS",
        M::CONNECT => "CONNECT",
        M::TRACE => "TRACE",
        _ => "other",
    }
}

/// A label value. Route templates, methods, statuses and model names are few: each
/// distinct one is kept once (up to 1,024 of them), so labelling a request allocates
/// nothing; values past that bound are copied per use rather than kept forever.
fn label(value: &str) -> SharedString {
    match intern(value) {
        Some(v) => SharedString::const_str(v),
        None => SharedString::from_owned(value.to_owned()),
    }
}

/// `value`, kept for the life of the process (`None` once 1,024 values are kept).
fn intern(value: &str) -> Option<&'static str> {
    const MAX_KEPT: usize = 1024;
    static KEPT: OnceLock<RwLock<HashSet<&'static str>>> = OnceLock::new();
    let kept = KEPT.get_or_init(RwLock::default);
    if let Some(v) = kept
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .get(value)
    {
        return Some(v);
    }
    let mut kept = kept.write().unwrap_or_else(PoisonError::into_inner);
    if let Some(v) = kept.get(value) {
        return Some(v);
    }
    if kept.len() >= MAX_KEPT {
        return None;
    }
    let v: &'static str = Box::leak(value.into());
    kept.insert(v);
    Some(v)
}

/// The `completion` label of a usage record: its variant's name in lower case.
fn completion_label(c: Completion) -> SharedString {
    SharedString::const_str(match c {
        Completion::Complete => "complete",
        Completion::Partial => "partial",
        Completion::UpstreamError => "upstreamerror",
        Completion::Failed => "failed",
        Completion::Cancelled => "cancelled",
        other => return label(&format!("{other:?}").to_ascii_lowercase()),
    })
}

/// Where a completion's record counter is kept in [`UsageHandles::records`] (`None`: not
/// kept, registered per use).
fn completion_index(c: Completion) -> Option<usize> {
    Some(match c {
        Completion::Complete => 0,
        Completion::Partial => 1,
        Completion::UpstreamError => 2,
        Completion::Failed => 3,
        Completion::Cancelled => 4,
        _ => return None,
    })
}

/// A usage sink that counts tokens and cost in [`Metrics`], then hands the records on.
#[derive(Debug, Clone)]
pub struct MeteredSink<S> {
    inner: S,
    metrics: Metrics,
}

impl<S> MeteredSink<S> {
    /// Counts what goes to `inner`.
    pub fn new(inner: S, metrics: Metrics) -> Self {
        Self { inner, metrics }
    }
}

impl<S: UsageSink> UsageSink for MeteredSink<S> {
    async fn record_batch(&self, batch: &[UsageRecord]) -> Result<(), SinkError> {
        // Counted once the inner sink has them, so a retried batch is not counted twice.
        self.inner.record_batch(batch).await?;
        self.metrics.usage(batch);
        Ok(())
    }
}

/// Counts every request by route template, method and status, and times it: a tower
/// layer for the router's routes (it reads the [`MatchedPath`] routing sets).
#[derive(Debug, Clone)]
pub struct MetricsLayer {
    metrics: Metrics,
}

impl MetricsLayer {
    /// Counts into `metrics`.
    pub fn new(metrics: Metrics) -> Self {
        Self { metrics }
    }
}

impl<S> tower::Layer<S> for MetricsLayer {
    type Service = RecordMetrics<S>;

    fn layer(&self, inner: S) -> RecordMetrics<S> {
        RecordMetrics {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// The service [`MetricsLayer`] builds.
#[derive(Debug, Clone)]
pub struct RecordMetrics<S> {
    inner: S,
    metrics: Metrics,
}

impl<S> tower::Service<Request> for RecordMetrics<S>
where
    S: tower::Service<Request, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = MetricsFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let start = Instant::now();
        let method = method_label(req.method());
        let route = match req.extensions().get::<MatchedPath>() {
            None => RouteLabel::Kept("unmatched"),
            Some(p) => intern(p.as_str()).map_or_else(
                || RouteLabel::Other(p.as_str().to_owned()),
                RouteLabel::Kept,
            ),
        };
        MetricsFuture {
            inner: self.inner.call(req),
            counted: Some(Counted {
                metrics: self.metrics.clone(),
                start,
                method,
                route,
            }),
        }
    }
}

/// What a request is counted under, kept until its response.
struct Counted {
    metrics: Metrics,
    start: Instant,
    method: &'static str,
    route: RouteLabel,
}

/// A request's `route` label.
enum RouteLabel {
    /// A kept value (see [`intern`]).
    Kept(&'static str),
    /// A value past the bound of kept ones.
    Other(String),
}

/// The status a request is counted under when its client hung up before the answer (as
/// the request log shows it: nginx's "client closed request").
const CLIENT_CLOSED: StatusCode = match StatusCode::from_u16(499) {
    Ok(status) => status,
    Err(_) => StatusCode::BAD_REQUEST,
};

impl Counted {
    fn route(&self) -> Result<&'static str, &str> {
        match &self.route {
            RouteLabel::Kept(route) => Ok(*route),
            RouteLabel::Other(route) => Err(route.as_str()),
        }
    }
}

pin_project! {
    /// The response future of [`RecordMetrics`]. Dropped before the answer (the client
    /// hung up), it counts the request then, with status 499, as the request log does.
    pub struct MetricsFuture<F> {
        #[pin]
        inner: F,
        counted: Option<Counted>,
    }

    impl<F> PinnedDrop for MetricsFuture<F> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(c) = this.project().counted.take() {
                let total = c.start.elapsed();
                c.metrics
                    .count(c.route(), c.method, CLIENT_CLOSED, None, total, None);
            }
        }
    }
}

impl<F, E> Future for MetricsFuture<F>
where
    F: Future<Output = Result<Response, E>>,
{
    type Output = Result<Response, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let res = ready!(this.inner.poll(cx))?;
        if let Some(c) = this.counted.take() {
            let total = c.start.elapsed();
            let upstream = res.extensions().get::<UpstreamTime>().map(|t| t.0);
            let status = res.status();
            c.metrics.count(
                c.route(),
                c.method,
                status,
                Refusal::of(&res),
                total,
                upstream,
            );
        }
        Poll::Ready(Ok(res))
    }
}

/// `GET /metrics`.
pub async fn scrape(State(state): State<AppState>) -> Response {
    let text = state.metrics.render(&state);
    (
        StatusCode::OK,
        [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        text,
    )
        .into_response()
}
