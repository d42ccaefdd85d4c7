//! The client side: a pooled hyper-util client (rustls for https upstreams) under the cost
//! meter, retry (with its budget and a per-attempt timeout) and a circuit breaker per
//! upstream; and graceful degradation to a configured fallback.
//!
//! ```text
//! Budget -> CostMeter -> Retry -> CircuitBreaker -> hyper-util Client   (primary)
//! Budget -> CostMeter -> Retry -> CircuitBreaker -> hyper-util Client   (fallback, if configured)
//! ```
//!
//! The budget layer reserves the most a call can cost before it goes out; the cost meter
//! settles that reservation with the metered cost. A primary that answers 529 or is
//! refused by its breaker has its reservation refunded before the fallback reserves its own.
//!
//! ```text
//! ```

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderName, HeaderValue};
use http::{Request, Response};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use palisade::body::ResponseBody;
use palisade::circuit_breaker::{
    CircuitBreakerHandle, CircuitBreakerLayerBuilder, CircuitState, Transition,
};
use palisade::cost::alert::{AlertEvent, AlertSink};
use palisade::cost::budget::BudgetLayer;
use palisade::cost::{Attribution, CostMeterLayer, Fallback};
use palisade::{BoxError, Error, ErrorKind};
use tower::util::BoxCloneSyncService;
use tower::{Layer, ServiceBuilder, ServiceExt};

use crate::config::{GatewayConfig, UpstreamTarget};

/// The response header that says a fallback served the request.
pub const X_PALISADE_FALLBACK: HeaderName = HeaderName::from_static("x-palisade-fallback");

pub type Connector = hyper_rustls::HttpsConnector<HttpConnector>;
type Svc = BoxCloneSyncService<Request<Full<Bytes>>, Response<Body>, BoxError>;

/// How long the upstream took to answer (to the response head, retries included), in the
/// response extensions of every upstream answer; `/metrics` reads it.
#[derive(Debug, Clone, Copy)]
pub struct UpstreamTime(pub Duration);

/// One upstream with its own client stack and breaker. Cloned with the gateway's state on
/// every request, so its parts sit behind one `Arc`.
#[derive(Clone)]
pub struct Upstream {
    /// `primary` or `fallback`.
    pub name: &'static str,
    parts: Arc<Parts>,
}

struct Parts {
    base_url: String,
    /// `{base_url}/v1/messages`, parsed once (`None` when it does not parse: each call then
    /// fails as it would with the text).
    messages_uri: Option<http::Uri>,
    api_key: Option<HeaderValue>,
    /// A model that replaces the caller's (a fallback to another model).
    model: Option<String>,
    /// For the fallback: its name in the `x-palisade-fallback` header and in usage records.
    fallback_label: Option<String>,
    svc: Svc,
    breaker: Option<CircuitBreakerHandle>,
    /// The longest silence inside a response body.
    idle_timeout: Duration,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("name", &self.name)
            .field("base_url", &self.parts.base_url)
            .field("model", &self.parts.model)
            .finish_non_exhaustive()
    }
}

/// One call to `/v1/messages` upstream.
#[derive(Debug, Clone)]
pub struct Call {
    /// The JSON body.
    pub body: Bytes,
    /// `anthropic-version`, `anthropic-beta` as the client sent them.
    pub headers: Forwarded,
    /// Who pays.
    pub attribution: Attribution,
    /// The gateway's request id (the usage record's idempotency key), as its header value.
    pub request_id: HeaderValue,
}

/// The client's headers a call forwards upstream, in the order of [`Forwarded::FORWARDED`]
/// (`None`: the client did not send it).
#[derive(Debug, Clone, Default)]
pub struct Forwarded(pub [Option<HeaderValue>; 2]);

impl Forwarded {
    /// The names forwarded.
    pub const FORWARDED: [HeaderName; 2] = [ANTHROPIC_VERSION, ANTHROPIC_BETA];

    /// The headers the client sent, with their names.
    fn iter(&self) -> impl Iterator<Item = (HeaderName, &HeaderValue)> {
        Self::FORWARDED
            .into_iter()
            .zip(&self.0)
            .filter_map(|(name, value)| Some((name, value.as_ref()?)))
    }
}

/// The primary upstream and its fallback.
#[derive(Debug, Clone)]
pub struct Upstreams {
    /// Where requests go first.
    pub primary: Upstream,
    /// Where they go when the primary's breaker is open or it answers 529.
    pub fallback: Option<Upstream>,
}

/// A breaker's state for `/health`.
#[derive(Debug, serde::Serialize)]
pub struct BreakerHealth {
    /// The upstream.
    pub upstream: &'static str,
    /// `closed`, `open`, `half_open`, ...
    pub state: String,
    /// Whether it lets calls through.
    pub available: bool,
}

/// The https-or-http connector (webpki roots) of every outgoing client.
pub fn connector() -> Connector {
    // No Nagle delay on the upstream side either: requests and SSE frames are small writes.
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http)
}

impl Upstreams {
    /// Builds both stacks. `mock` is the base URL of the built-in mock, when it serves.
    pub fn new(
        config: &GatewayConfig,
        mock: Option<String>,
        meter: Option<CostMeterLayer>,
        budget: Option<BudgetLayer>,
        alerts: Arc<dyn AlertSink>,
    ) -> Result<Self, BoxError> {
        let (base_url, api_key) = match &config.upstream {
            UpstreamTarget::Mock => (mock.ok_or("the mock upstream is not running")?, None),
            UpstreamTarget::Remote { base_url, api_key } => {
                let mut v = HeaderValue::from_str(api_key)
                    .map_err(|_| "ANTHROPIC_API_KEY holds characters a header cannot")?;
                v.set_sensitive(true);
                (base_url.clone(), Some(v))
            }
        };
        let primary = Upstream::build(
            "primary",
            config,
            base_url.clone(),
            api_key.clone(),
            None,
            meter.clone(),
            budget.clone(),
            Arc::clone(&alerts),
        )?;
        let fallback = if config.has_fallback() {
            let url = config.fallback_base_url.clone().unwrap_or(base_url);
            Some(Upstream::build(
                "fallback",
                config,
                url,
                api_key,
                config.fallback_model.clone(),
                meter,
                budget,
                alerts,
            )?)
        } else {
            None
        };
        Ok(Self { primary, fallback })
    }

    /// Calls the primary; on an open breaker or a 529, the fallback (marked in the
    /// `x-palisade-fallback` header and, through [`Fallback`], in its usage record).
    pub async fn send(&self, mut call: Call) -> Result<Response<Body>, Error> {
        let attribution = std::mem::take(&mut call.attribution);
        let Some(fallback) = &self.fallback else {
            return self.primary.send(&call, attribution).await;
        };
        let first = self.primary.send(&call, attribution.clone()).await;
        let reason = match &first {
            Ok(res) if res.status().as_u16() == 529 => "overloaded",
            Err(e) if e.kind() == ErrorKind::CircuitOpen => "circuit_open",
            _ => return first,
        };
        drop(first);
        let label = fallback.parts.fallback_label.as_deref().unwrap_or_default();
        let request_id = call.request_id.to_str().unwrap_or("req_unknown");
        tracing::warn!(request_id, reason, fallback = %label, "primary upstream unavailable: fallback taken");
        // the fallback's usage record carries the mark itself (see `Upstream::build`)
        let mut res = fallback.send(&call, attribution).await?;
        if let Ok(v) = HeaderValue::from_str(label) {
            res.headers_mut().insert(X_PALISADE_FALLBACK, v);
        }
        Ok(res)
    }

    /// The breakers' states.
    pub fn health(&self) -> Vec<BreakerHealth> {
        std::iter::once(&self.primary)
            .chain(self.fallback.as_ref())
            .filter_map(|u| {
                let b = u.parts.breaker.as_ref()?;
                let state = b.state();
                Some(BreakerHealth {
                    upstream: u.name,
                    state: format!("{state:?}"),
                    available: !matches!(state, CircuitState::Open | CircuitState::ForcedOpen),
                })
            })
            .collect()
    }
}

fn to_error(e: BoxError) -> Error {
    match e.downcast::<Error>() {
        Ok(e) => *e,
        Err(e) => Error::upstream(
            "the upstream API could not be reached; try again shortly",
            e,
        ),
    }
}

/// The alert a breaker's transition raises: one when it opens after being closed, so an
/// episode of failed probes (half-open, then open again) raises nothing more.
pub fn breaker_alert(t: &Transition) -> Option<AlertEvent> {
    (t.to == CircuitState::Open && t.from != CircuitState::HalfOpen)
        .then(|| AlertEvent::circuit_opened(&*t.name, t.open_for.unwrap_or_default()))
}

impl Upstream {
    #[allow(clippy::too_many_arguments)]
    fn build(
        name: &'static str,
        config: &GatewayConfig,
        base_url: String,
        api_key: Option<HeaderValue>,
        model: Option<String>,
        meter: Option<CostMeterLayer>,
        budget: Option<BudgetLayer>,
        alerts: Arc<dyn AlertSink>,
    ) -> Result<Self, BoxError> {
        let executor = TokioExecutor::new();
        let fallback_label = (name == "fallback").then(|| match &model {
            Some(model) => format!("model:{model}"),
            None => format!("upstream:{base_url}"),
        });
        if !config.layers {
            let client: Client<Connector, Full<Bytes>> = Client::builder(executor)
                .pool_idle_timeout(Duration::from_secs(90))
                .build(connector());
            let svc = client
                .map_err(BoxError::from)
                .map_response(|r| as_arrived(r).map(Body::new));
            return Ok(Self {
                name,
                parts: Arc::new(Parts {
                    messages_uri: messages_uri(&base_url),
                    base_url,
                    api_key,
                    model,
                    fallback_label,
                    svc: BoxCloneSyncService::new(svc),
                    breaker: None,
                    idle_timeout: config.stream_idle_timeout,
                }),
            });
        }
        let client: Client<Connector, palisade::retry::ReplayBody<Full<Bytes>>> =
            Client::builder(executor)
                .pool_idle_timeout(Duration::from_secs(90))
                .build(connector());
        let mut breaker_config = config.breaker.clone();
        breaker_config.name = name.to_owned();
        let breaker = CircuitBreakerLayerBuilder::new(breaker_config)
            .on_transition(move |t| {
                // The sink queues (the webhook posts from its own task): never blocks.
                if let Some(event) = breaker_alert(t) {
                    alerts.send(event);
                }
            })
            .build()?;
        let handle = breaker.handle();
        let retry = config.retry.build()?;
        let meter = meter.ok_or("the cost meter is required with the layers on")?;
        // The fallback's answers carry a mark the meter copies into their usage records.
        let mark = fallback_label.clone().map(Fallback::new);
        let stack = ServiceBuilder::new()
            .layer(meter)
            .map_response(move |mut res: Response<_>| {
                if let Some(mark) = &mark {
                    res.extensions_mut().insert(mark.clone());
                }
                res
            })
            .layer(retry)
            .layer(breaker)
            .service(client.map_err(BoxError::from).map_response(as_arrived));
        let svc = match budget {
            Some(budget) => BoxCloneSyncService::new(budget.layer(stack).map_response(|r| {
                let (mut parts, body) = r.into_parts();
                if matches!(body, ResponseBody::Error { .. }) {
                    parts.extensions.insert(BudgetRefusal);
                }
                Response::from_parts(parts, Body::new(body))
            })),
            None => BoxCloneSyncService::new(stack.map_response(|r| r.map(Body::new))),
        };
        Ok(Self {
            name,
            parts: Arc::new(Parts {
                messages_uri: messages_uri(&base_url),
                base_url,
                api_key,
                model,
                fallback_label,
                svc,
                breaker: Some(handle),
                idle_timeout: config.stream_idle_timeout,
            }),
        })
    }

    async fn send(&self, call: &Call, attribution: Attribution) -> Result<Response<Body>, Error> {
        let body = match &self.parts.model {
            Some(model) => replace_model(&call.body, model)?,
            None => call.body.clone(),
        };
        let uri = match &self.parts.messages_uri {
            Some(uri) => uri.clone(),
            None => format!("{}/v1/messages", self.parts.base_url)
                .parse()
                .map_err(|e| Error::internal("bad upstream request").with_source(e))?,
        };
        let mut req = Request::new(Full::new(body));
        *req.method_mut() = http::Method::POST;
        *req.uri_mut() = uri;
        // Sized once for every header it gets.
        let h = req.headers_mut();
        h.reserve(6);
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        h.insert(ANTHROPIC_VERSION, HeaderValue::from_static("2023-06-01"));
        for (k, v) in call.headers.iter() {
            h.insert(k, v.clone());
        }
        if let Some(key) = &self.parts.api_key {
            h.insert(X_API_KEY, key.clone());
        }
        h.insert(X_REQUEST_ID, call.request_id.clone());
        req.extensions_mut().insert(attribution);
        let start = std::time::Instant::now();
        let mut res = self
            .parts
            .svc
            .clone()
            .oneshot(req)
            .await
            .map_err(to_error)?;
        if is_budget_refusal(&res) {
            // Audited by the authentication middleware, which sees every refusal.
            return Ok(res);
        }
        res.extensions_mut().insert(UpstreamTime(start.elapsed()));
        let sse = res
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        let timeout = self.parts.idle_timeout;
        if sse {
            return Ok(res.map(|body| Body::new(Guarded::new(body, timeout, true))));
        }
        // A whole answer is read before its head is passed on, so one that breaks off is
        // an error response rather than a connection closed without a word.
        let (parts, body) = res.into_parts();
        let bytes = crate::routes::whole(Guarded::new(body, timeout, false))
            .await
            .map_err(|e| {
                Error::upstream(
                    "the upstream answer broke off before its end; try again shortly",
                    e,
                )
            })?;
        Ok(Response::from_parts(parts, Body::from(bytes)))
    }
}

/// The event that ends a stream the upstream broke off or let stall: SDKs raise it as an
/// API error instead of waiting or taking a cut answer for a whole one.
const STREAM_ERROR_EVENT: &str = "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"api_error\",\"message\":\"the upstream stream was interrupted; the answer is incomplete\"}}\n\n";

pin_project_lite::pin_project! {
    /// An upstream response body under an idle timeout. A stream (SSE) that fails or
    /// stalls ends with an `error` event; any other body fails, so a cut answer is never
    /// taken for a whole one. Dropping the inner body lets the cost meter record what it
    /// saw, marked partial.
    pub struct Guarded {
        #[pin]
        inner: Body,
        #[pin]
        idle: tokio::time::Sleep,
        timeout: Duration,
        sse: bool,
        done: bool,
    }
}

impl Guarded {
    /// Guards `inner`; `sse` when it is an event stream.
    pub fn new(inner: Body, timeout: Duration, sse: bool) -> Self {
        Self {
            inner,
            idle: tokio::time::sleep(timeout),
            timeout,
            sse,
            done: false,
        }
    }
}

impl http_body::Body for Guarded {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        use std::task::Poll;
        let mut this = self.project();
        if *this.done {
            return Poll::Ready(None);
        }
        let failure = match this.inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let deadline = tokio::time::Instant::now() + *this.timeout;
                this.idle.as_mut().reset(deadline);
                return Poll::Ready(Some(Ok(frame)));
            }
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Ready(Some(Err(e))) => e,
            Poll::Pending => match this.idle.poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(()) => axum::Error::new(format!(
                    "the upstream sent nothing for {}",
                    palisade::config::duration::format(*this.timeout)
                )),
            },
        };
        *this.done = true;
        tracing::warn!(error = %failure, stream = *this.sse, "upstream response body broke off");
        if *this.sse {
            Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from_static(
                STREAM_ERROR_EVENT.as_bytes(),
            )))))
        } else {
            Poll::Ready(Some(Err(failure)))
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }
}

/// `{base_url}/v1/messages` as a URI, when it is one.
fn messages_uri(base_url: &str) -> Option<http::Uri> {
    format!("{base_url}/v1/messages").parse().ok()
}

/// The upstream's answer without its hop-by-hop headers and its `x-palisade-*` headers,
/// dropped as it arrives, before the gateway's layers set theirs (the cost meter's, the
/// fallback mark): the names its `connection` header lists are the upstream's own headers,
/// never the gateway's, and the `x-palisade-*` namespace is the gateway's alone, so an
/// upstream's never reaches the client (or the request log) where the gateway sets none of
/// that name (an error answer, a stream, the layers off, a name it never sets).
fn as_arrived<B>(mut res: Response<B>) -> Response<B> {
    let h = res.headers_mut();
    crate::routes::strip_hop_by_hop(h);
    strip_gateway_namespace(h);
    res
}

/// The prefix of the headers the gateway says on its answers (`x-palisade-cost-usd`,
/// `x-palisade-fallback`, ...). Header names are lower case.
const GATEWAY_NAMESPACE: &str = "x-palisade-";

/// Drops every `x-palisade-*` header of an upstream's answer. Allocates only when there is
/// one to drop.
fn strip_gateway_namespace(h: &mut http::HeaderMap) {
    let ours = |name: &HeaderName| name.as_str().starts_with(GATEWAY_NAMESPACE);
    if !h.keys().any(ours) {
        return;
    }
    let named: Vec<HeaderName> = h.keys().filter(|n| ours(n)).cloned().collect();
    for name in named {
        h.remove(name);
    }
}

const ANTHROPIC_VERSION: HeaderName = HeaderName::from_static("anthropic-version");
const ANTHROPIC_BETA: HeaderName = HeaderName::from_static("anthropic-beta");
const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Marks an answer the budget layer gave itself (a refusal), not the upstream.
#[derive(Debug, Clone, Copy)]
struct BudgetRefusal;

fn is_budget_refusal(res: &Response<Body>) -> bool {
    res.extensions().get::<BudgetRefusal>().is_some()
}

fn replace_model(body: &Bytes, model: &str) -> Result<Bytes, Error> {
    let mut value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| Error::internal("request body changed after validation").with_source(e))?;
    value["model"] = serde_json::Value::String(model.to_owned());
    serde_json::to_vec(&value)
        .map(Bytes::from)
        .map_err(|e| Error::internal("cannot encode the fallback request").with_source(e))
}
