//! Builds the gateway from a [`GatewayConfig`]: the state, the layers and the routes, so
//! that `main` and the tests build the same thing.
//!
//! ```text
//! request id -> request log -> security headers -> auth -> budget start -> rate limits -> route
//!   route: body limit, content type, validation -> upstream stack (upstream.rs)
//!   upstream stack: budget gate -> cost meter (settles it) -> retry -> breaker -> client
//! ```
//!
//! The budget start begins the request's reservation and goes on at once; the budget gate
//! waits for it before the upstream call, so with Redis the rate limits' and the budgets'
//! store calls are in flight together: one round trip of latency, not two in a row.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::extract::Request;
use http::HeaderValue;
use palisade::BoxError;
use palisade::cost::alert::{AlertEvent, AlertSink, SpikeDetector, TracingAlertSink, WebhookSink};
use palisade::cost::budget::BudgetLayer;
use palisade::cost::{CostStats, RecorderShutdown, SinkError, UsageRecord, UsageSink};
use palisade::rate_limit::{KeySource, Quota, RateLimiter, Rule, RuleConfig};
use tower::ServiceBuilder;
use tower_http::request_id::{
    MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};

use crate::auth::KeyStore;
use crate::config::{GatewayConfig, UpstreamTarget};
use crate::schema::Limits;
use crate::store::{Bots, Budgets, Ledger};
use crate::upstream::Upstreams;
use crate::{mock, routes};

/// What every handler shares, behind one `Arc`: axum clones the state for every request,
/// so a clone is one reference-count bump. Reads go through `Deref` to [`Shared`].
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// The parts of [`AppState`].
pub struct Shared {
    /// The configuration.
    pub config: Arc<GatewayConfig>,
    /// Hashed API keys.
    pub keys: Arc<KeyStore>,
    /// The primary upstream and its fallback.
    pub upstreams: Upstreams,
    /// Bots.
    pub bots: Arc<Bots>,
    /// Usage records and spend.
    pub ledger: Ledger,
    /// Spend budgets (palisade's budget layer) for the admin routes.
    pub budgets: Arc<Budgets>,
    /// The rate limiter's admin handle (`None` with the layers off).
    pub limiter: Option<Limiter>,
    /// The usage recorder's counters (`None` with the layers off).
    pub cost_stats: Option<Arc<CostStats>>,
    /// What requests are checked against.
    pub limits: Arc<Limits>,
    /// Failed authentications counted per client address (`None`: no limit).
    pub auth_failures: Option<Arc<crate::auth::FailureLimit>>,
    /// Bounds the audit events of each caller's refusals.
    pub refusal_audit: crate::auth::RefusalAudit,
    /// `/metrics` and the dashboard's counters.
    pub metrics: crate::metrics::Metrics,
    /// The Redis store of rate limits, for `/health` (`REDIS_URL`).
    #[cfg(feature = "redis")]
    pub redis: Option<palisade::rate_limit::RedisStore>,
    /// Security events: the log, and `audit_logs` with `DATABASE_URL`.
    pub audit: crate::audit::Audit,
    /// Where alerts go (the log, and the webhook when set).
    pub alerts: Arc<Alerts>,
    /// The spend-spike detector fed by every usage record (`None` when switched off).
    #[allow(dead_code)] // the tests give it a history
    pub spikes: Option<Arc<SpikeDetector>>,
    /// The PostgreSQL ledger, for `/health` (`DATABASE_URL`).
    #[cfg(feature = "postgres")]
    pub postgres: Option<palisade::cost::sink::PostgresSink>,
}

/// A built gateway: its router and what shutdown needs.
pub struct App {
    /// The routes with every layer.
    pub router: Router,
    /// The shared state (tests read it).
    pub state: AppState,
    /// Flushes the usage recorder.
    pub recorder: Option<RecorderShutdown>,
    /// The mock upstream's address, when it serves.
    pub mock_addr: Option<std::net::SocketAddr>,
    /// Error tracking, when `SENTRY_DSN` is set (flushed at shutdown).
    pub sentry: Option<crate::sentry::Sentry>,
}

/// The gateway's rate-limit rules when `PALISADE_RATE_LIMIT_RULES` is unset: palisade's
/// presets — `global` (100 a minute per user), `chat` (20 a minute per API key on
/// `POST /v1/messages`), `bot_creation` (10 an hour per user on `POST /v1/bots`) and
/// `orchestrator` (30 a minute per user on `POST /v1/orchestrator/*`) — and the gateway's
/// `bot_chat` (20 a minute per user on `POST /v1/bots/{id}/messages`), for which there is
/// no preset.
pub fn default_rules() -> Vec<RuleConfig> {
    let bot_chat = Rule::new("bot_chat", Quota::per_minute(20))
        .post("/v1/bots/{id}/messages")
        .key(KeySource::Principal);
    [
        Rule::global(),
        Rule::chat(),
        Rule::bot_creation(),
        Rule::orchestrator(),
        bot_chat,
    ]
    .iter()
    .map(RuleConfig::from)
    .collect()
}

/// The limit on failed authentications per client address, reading the client as the
/// rate limits do (`PALISADE_RATE_LIMIT_TRUSTED_PROXIES`); at most 65,536 addresses tracked.
fn auth_failures(config: &GatewayConfig) -> Result<Option<crate::auth::FailureLimit>, BoxError> {
    let proxies = if config.rate_limit.trusted_proxies.is_empty() {
        palisade::rate_limit::TrustedProxies::none()
    } else {
        config
            .rate_limit
            .trusted_proxies
            .join(",")
            .parse()
            .map_err(|e| format!("PALISADE_RATE_LIMIT_TRUSTED_PROXIES: {e}"))?
    };
    Ok(crate::auth::FailureLimit::new(
        config.auth_failures_per_minute,
        proxies,
        1 << 16,
    )?)
}

/// The budget layer: the configured budgets, charged to the caller (the gateway's
/// attribution, never a client header), threshold alerts to the alert sinks.
///
/// With `REDIS_URL`, the accounts live in Redis, so every instance shares them; the
/// connection is returned for the users' own limits, shared the same way.
async fn budget_layer(
    config: &GatewayConfig,
    alerts: Arc<Alerts>,
) -> Result<(BudgetLayer, Option<SharedConn>), BoxError> {
    let builder = config
        .budget
        .builder()?
        .user_header(None)
        .bot_header(None)
        .alerts(alerts);
    #[cfg(feature = "redis")]
    let (builder, conn) = match &config.redis {
        Some(r) if !r.cluster_nodes.is_empty() => {
            let conn = redis::cluster::ClusterClient::new(r.cluster_nodes.clone())
                .map_err(|e| format!("REDIS_URL: {e}"))?
                .get_async_connection()
                .await
                .map_err(|e| format!("REDIS_URL: cannot connect to the Cluster: {e}"))?;
            (
                builder.store(
                    palisade::cost::budget::RedisBudgetStore::new(conn.clone())
                        .hold_ttl(config.budget_hold_ttl),
                ),
                Some(crate::store::RedisConn::Cluster(conn)),
            )
        }
        Some(r) => {
            let url = r.url.clone().unwrap_or_default();
            let conn = redis::Client::open(url)
                .map_err(|e| format!("REDIS_URL: {e}"))?
                .get_connection_manager()
                .await
                .map_err(|e| format!("REDIS_URL: cannot connect: {e}"))?;
            (
                builder.store(
                    palisade::cost::budget::RedisBudgetStore::new(conn.clone())
                        .hold_ttl(config.budget_hold_ttl),
                ),
                Some(crate::store::RedisConn::Single(conn)),
            )
        }
        None => (builder, None),
    };
    #[cfg(not(feature = "redis"))]
    let conn = None;
    Ok((builder.build()?, conn))
}

/// The connection the users' own budget limits are shared through (Redis).
#[cfg(feature = "redis")]
type SharedConn = crate::store::RedisConn;
#[cfg(not(feature = "redis"))]
type SharedConn = std::convert::Infallible;

/// Alerts (budget thresholds, spend spikes, breakers opening) go to the log, and to
/// `PALISADE_GATEWAY_ALERT_WEBHOOK` when it is set. Sending never waits: the webhook posts
/// from its own task through a bounded queue.
pub struct Alerts {
    webhook: Option<WebhookSink>,
}

impl Alerts {
    /// The sinks `config` names.
    pub fn new(config: &GatewayConfig) -> Result<Self, BoxError> {
        let webhook = match &config.alert_webhook {
            None => None,
            Some(webhook) => {
                let client = hyper_util::client::legacy::Client::builder(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .build(crate::upstream::connector());
                Some(
                    WebhookSink::with_client(webhook.clone(), client)
                        .map_err(|e| format!("PALISADE_GATEWAY_ALERT_WEBHOOK: {e}"))?,
                )
            }
        };
        Ok(Self { webhook })
    }
}

impl Alerts {
    /// The webhook's counters (`None` without a webhook).
    pub fn webhook_stats(&self) -> Option<palisade::cost::alert::WebhookStats> {
        self.webhook.as_ref().map(WebhookSink::stats)
    }
}

impl AlertSink for Alerts {
    fn send(&self, event: AlertEvent) {
        if let Some(webhook) = &self.webhook {
            webhook.send(event.clone());
        }
        TracingAlertSink.send(event);
    }
}

/// The rate-limit layer over the store in use.
enum RateLimits {
    Memory(palisade::rate_limit::RateLimitLayer),
    #[cfg(feature = "redis")]
    Redis(palisade::rate_limit::RateLimitLayer<palisade::rate_limit::RedisStore>),
}

impl RateLimits {
    fn limiter(&self) -> Limiter {
        match self {
            RateLimits::Memory(l) => Limiter::Memory(l.limiter()),
            #[cfg(feature = "redis")]
            RateLimits::Redis(l) => Limiter::Redis(l.limiter()),
        }
    }
}

/// The rate limiter's admin handle, over the store in use.
#[derive(Clone)]
pub enum Limiter {
    /// In this process.
    Memory(RateLimiter),
    /// In Redis, shared by every instance.
    #[cfg(feature = "redis")]
    Redis(RateLimiter<palisade::rate_limit::RedisStore>),
}

impl Limiter {
    /// The rules' names.
    pub fn rules(&self) -> Vec<&str> {
        match self {
            Limiter::Memory(l) => l.rules(),
            #[cfg(feature = "redis")]
            Limiter::Redis(l) => l.rules(),
        }
    }

    /// Resets `key`'s count on `rule`.
    pub async fn reset(
        &self,
        rule: &str,
        key: &palisade::rate_limit::RateKey,
    ) -> Result<(), palisade::rate_limit::AdminError> {
        match self {
            Limiter::Memory(l) => l.reset(rule, key).await,
            #[cfg(feature = "redis")]
            Limiter::Redis(l) => l.reset(rule, key).await,
        }
    }
}

/// Where usage records go: the in-memory ledger behind `/v1/usage` (counted in the
/// metrics) and, with `DATABASE_URL`, PostgreSQL's `usage_logs`.
struct GatewaySink {
    ledger: crate::metrics::MeteredSink<Ledger>,
    spikes: Option<Arc<SpikeDetector>>,
    #[cfg(feature = "postgres")]
    postgres: Option<palisade::cost::sink::PostgresSink>,
}

impl UsageSink for GatewaySink {
    async fn record_batch(&self, batch: &[UsageRecord]) -> Result<(), SinkError> {
        // PostgreSQL first: its sink buffers what it cannot write yet and never fails a
        // batch, so a batch is never retried into the in-memory ledger twice.
        #[cfg(feature = "postgres")]
        if let Some(pg) = &self.postgres {
            pg.record_batch(batch).await?;
        }
        self.ledger.record_batch(batch).await?;
        // On the recorder's task, off the request path.
        if let Some(spikes) = &self.spikes {
            batch.iter().for_each(|r| spikes.observe_record(r));
        }
        Ok(())
    }

    async fn flush(&self) -> Result<(), SinkError> {
        self.ledger.flush().await?;
        #[cfg(feature = "postgres")]
        if let Some(pg) = &self.postgres {
            pg.flush().await?;
        }
        Ok(())
    }
}

/// The PostgreSQL ledger (`DATABASE_URL`): connected and migrated, or a start-up error.
#[cfg(feature = "postgres")]
async fn postgres(
    config: &GatewayConfig,
) -> Result<Option<palisade::cost::sink::PostgresSink>, BoxError> {
    let Some(settings) = &config.database else {
        return Ok(None);
    };
    let sink = palisade::cost::sink::PostgresSink::connect(settings.clone())
        .map_err(|e| format!("DATABASE_URL: {e}"))?;
    let applied = sink
        .migrate()
        .await
        .map_err(|e| format!("DATABASE_URL: cannot apply the ledger's migrations: {e}"))?;
    if !applied.is_empty() {
        tracing::info!(versions = ?applied, "PostgreSQL ledger: migrations applied");
    }
    Ok(Some(sink))
}

/// Request ids: a random prefix per process and a counter (`req_3f2a…_000001`).
#[derive(Clone)]
struct MakeId {
    prefix: Arc<str>,
    next: Arc<AtomicU64>,
}

impl MakeRequestId for MakeId {
    fn make_request_id<B>(&mut self, _req: &http::Request<B>) -> Option<RequestId> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        // Written into a buffer of its exact length, which becomes the header value's bytes
        // without a copy: one allocation per id.
        let digits = n.checked_ilog10().map_or(1, |d| d as usize + 1).max(8);
        let mut id = Vec::with_capacity(4 + self.prefix.len() + 1 + digits);
        id.extend_from_slice(b"req_");
        id.extend_from_slice(self.prefix.as_bytes());
        id.push(b'_');
        let start = id.len();
        id.resize(start + digits, b'0');
        let mut rest = n;
        for d in id[start..].iter_mut().rev() {
            *d = b'0' + (rest % 10) as u8;
            rest /= 10;
        }
        HeaderValue::from_maybe_shared(bytes::Bytes::from(id))
            .ok()
            .map(RequestId::new)
    }
}

/// Builds the gateway (starting the mock upstream and the usage recorder).
pub async fn build(config: GatewayConfig) -> Result<App, BoxError> {
    let config = Arc::new(config);
    let mock_addr = match config.upstream {
        UpstreamTarget::Mock => Some(mock::spawn(config.mock_slow_delay).await?),
        UpstreamTarget::Remote { .. } => None,
    };
    let ledger = Ledger::memory();
    let metrics = crate::metrics::Metrics::new()?;
    #[cfg(feature = "postgres")]
    let postgres = postgres(&config).await?;
    #[cfg(feature = "postgres")]
    let audit = match &postgres {
        Some(pg) => crate::audit::Audit::postgres(pg.clone()),
        None => crate::audit::Audit::log_only(),
    };
    #[cfg(not(feature = "postgres"))]
    let audit = crate::audit::Audit::log_only();
    let alerts = Arc::new(Alerts::new(&config)?);
    let spikes = match &config.spike {
        Some(spike) => Some(Arc::new(
            SpikeDetector::new(spike.clone(), Arc::clone(&alerts))
                .map_err(|e| format!("PALISADE_GATEWAY_SPIKE_*: {e}"))?,
        )),
        None => None,
    };
    let (meter, recorder) = if config.layers {
        let sink = GatewaySink {
            spikes: spikes.clone(),
            ledger: crate::metrics::MeteredSink::new(ledger.clone(), metrics.clone()),
            #[cfg(feature = "postgres")]
            postgres: postgres.clone(),
        };
        let (layer, shutdown) = config.cost.spawn(sink)?;
        (Some(layer), Some(shutdown))
    } else {
        (None, None)
    };
    let cost_stats = meter.as_ref().map(|m| Arc::clone(m.stats()));
    #[cfg_attr(not(feature = "redis"), allow(unused_mut))]
    let mut budgets = Budgets::new(None);
    if config.layers {
        let (layer, conn) = budget_layer(&config, Arc::clone(&alerts)).await?;
        budgets = Budgets::new(Some(layer));
        #[cfg(feature = "redis")]
        if let Some(conn) = conn {
            budgets.share(conn, config.budget_sync_interval).await;
        }
        #[cfg(not(feature = "redis"))]
        let _ = conn;
    }
    let upstreams = Upstreams::new(
        &config,
        mock_addr.map(|a| format!("http://{a}")),
        meter,
        budgets.layer().cloned(),
        Arc::clone(&alerts) as Arc<dyn AlertSink>,
    )?;

    let rl = config.rate_limit.clone();
    #[cfg(feature = "redis")]
    let redis = match (&config.redis, config.layers) {
        (Some(settings), true) => Some(
            palisade::rate_limit::RedisStore::from_config(settings.clone())
                .await
                .map_err(|e| format!("REDIS_URL: {e}"))?,
        ),
        _ => None,
    };
    #[cfg(feature = "redis")]
    let rate_limit = match (&redis, config.layers) {
        (Some(store), true) => Some(RateLimits::Redis(rl.build_with_store(store.clone())?)),
        (None, true) => Some(RateLimits::Memory(rl.build()?)),
        _ => None,
    };
    #[cfg(not(feature = "redis"))]
    let rate_limit = if config.layers {
        Some(RateLimits::Memory(rl.build()?))
    } else {
        None
    };
    let security_headers = if config.layers {
        Some(config.security_headers.build()?)
    } else {
        None
    };

    let state = AppState(Arc::new(Shared {
        keys: Arc::new(KeyStore::new(&config.api_keys, &config.admin_keys)),
        upstreams,
        bots: Arc::new(Bots::memory()),
        ledger: ledger.clone(),
        budgets: Arc::new(budgets),
        limiter: rate_limit.as_ref().map(RateLimits::limiter),
        #[cfg(feature = "redis")]
        redis,
        audit,
        alerts,
        spikes,
        #[cfg(feature = "postgres")]
        postgres,
        cost_stats,
        auth_failures: auth_failures(&config)?.map(Arc::new),
        refusal_audit: crate::auth::RefusalAudit::new(1 << 16)?,
        limits: Arc::new(Limits {
            models: config.models.clone(),
            max_tokens: config.max_tokens,
        }),
        metrics: metrics.clone(),
        config: Arc::clone(&config),
    }));

    // Authentication, the budgets' start and the rate limits go on the API routes as one
    // layer: axum boxes each layer it puts on a route and clones every box below the one
    // it calls, on every request, so one layer instead of three saves those clones.
    let auth = crate::auth::AuthLayer::new(state.clone());
    let api = routes::api().with_state(state.clone());
    let api = match rate_limit {
        Some(RateLimits::Memory(layer)) => guard(api, &state, auth.clone(), layer),
        #[cfg(feature = "redis")]
        Some(RateLimits::Redis(layer)) => guard(api, &state, auth.clone(), layer),
        None => {
            let none = tower::layer::util::Identity::new();
            guard(api, &state, auth.clone(), none)
        }
    };
    let api = api.merge(
        crate::dashboard::api()
            .with_state(state.clone())
            .layer(auth),
    );
    #[cfg_attr(not(feature = "sentry"), allow(unused_mut))]
    let mut router = Router::new()
        .merge(api)
        .merge(routes::public().with_state(state.clone()))
        .merge(crate::dashboard::public(&state)?)
        .fallback({
            let format = config.error_format();
            move || async move { routes::not_found(format) }
        });
    let sentry = crate::sentry::Sentry::init(&config)?;
    #[cfg(feature = "sentry")]
    if let Some(sentry) = &sentry {
        router = router.layer(axum::middleware::from_fn_with_state(
            sentry.clone(),
            crate::sentry::report,
        ));
    }
    let router = router.layer(crate::metrics::MetricsLayer::new(metrics));
    let make_id = MakeId {
        prefix: Arc::from(format!("{:08x}", rand::random::<u32>())),
        next: Arc::new(AtomicU64::new(1)),
    };
    // The layers that need no routing (no `MatchedPath`) wrap the whole router once rather
    // than every route: a route's layers are cloned on each request, once per middleware
    // above them, so each layer kept out of the routes saves allocations on every request.
    // The security headers are among them (every answer gets them, the 404 too).
    let router = match security_headers {
        Some(layer) => outside_the_routes(make_id, tower::Layer::layer(&layer, router)),
        None => outside_the_routes(make_id, router),
    };
    Ok(App {
        router,
        state,
        recorder,
        mock_addr,
        sentry,
    })
}

/// `api` under authentication (outermost), the budgets' reservation start (when budgets
/// are on) and `limits` (innermost: rate limits need the principal that authentication
/// sets), as one layer on its routes.
///
/// The budgets' start charges the accounts the upstream call will be billed to (the
/// caller, as the handlers bill it); a call billed otherwise (a bot's) is checked at the
/// gate, the budget layer on the upstream stacks, which awaits the reservation started
/// here: with Redis, both store calls are in flight together.
fn guard<L>(api: Router, state: &AppState, auth: crate::auth::AuthLayer, limits: L) -> Router
where
    L: tower::Layer<axum::routing::Route> + Clone + Send + Sync + 'static,
    L::Service: tower::Service<Request, Error = Infallible> + Clone + Send + Sync + 'static,
    <L::Service as tower::Service<Request>>::Response: axum::response::IntoResponse + 'static,
    <L::Service as tower::Service<Request>>::Future: Send + 'static,
{
    use axum::response::IntoResponse;
    let Some(budgets) = state.budgets.layer() else {
        return api.layer(
            ServiceBuilder::new()
                .layer(auth)
                .map_response(IntoResponse::into_response)
                .layer(limits),
        );
    };
    let (start, _gate) = budgets.split(); // the upstream stacks' budget layer is the gate
    api.layer(
        ServiceBuilder::new()
            .layer(auth)
            .map_response(IntoResponse::into_response)
            .map_request(|mut req: Request| {
                if let Some(caller) = req.extensions().get::<crate::auth::Caller>() {
                    let billed = routes::billed_to(caller);
                    req.extensions_mut().insert(billed);
                }
                req
            })
            .layer(start)
            .map_request(|req: http::Request<_>| req.map(axum::body::Body::new))
            .map_response(IntoResponse::into_response)
            .layer(limits),
    )
}

/// `routes` under the layers that need no routing: request id, request log (and the
/// security headers, which the caller has put on `routes`), as one router.
fn outside_the_routes<S>(make_id: MakeId, routes: S) -> Router
where
    S: tower::Service<Request, Response = axum::response::Response, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    let outer = ServiceBuilder::new()
        .map_request(drop_client_request_id)
        .layer(SetRequestIdLayer::x_request_id(make_id))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(crate::log::RequestLogLayer)
        .service(routes);
    Router::new().fallback_service(outer)
}

/// The gateway makes every request id itself (logs, audit rows and usage records carry it):
/// an id chosen by a client could collide with another's or impersonate it.
fn drop_client_request_id(mut req: Request) -> Request {
    const X_REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");
    req.headers_mut().remove(X_REQUEST_ID);
    req
}

/// The gateway's request id of `req` (set by the request-id layer).
pub fn request_id(req: &Request) -> String {
    req.extensions()
        .get::<RequestId>()
        .and_then(|id| id.header_value().to_str().ok())
        .unwrap_or("req_unknown")
        .to_owned()
}
