//! [`CostMeterLayer`], the [`CostMeter`] service and its response future.

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, ready};
use std::time::SystemTime;

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response};
use http_body::Body;
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower_layer::Layer;
use tower_service::Service;

use super::body::{Meter, MeteredBody, Outcome, RequestMeta};
use super::pricing::PriceTable;
use super::record::Attribution;
use super::sink::{CostStats, UsageRecorder};
use crate::key::ApiKeyId;

/// Response header with the cost in dollars (`0.054399`, or `unknown`).
pub const X_PALISADE_COST_USD: HeaderName = HeaderName::from_static("x-palisade-cost-usd");
/// Response header with the uncached input tokens.
pub const X_PALISADE_INPUT_TOKENS: HeaderName = HeaderName::from_static("x-palisade-input-tokens");
/// Response header with the output tokens.
pub const X_PALISADE_OUTPUT_TOKENS: HeaderName =
    HeaderName::from_static("x-palisade-output-tokens");
/// Response header with the cache-write tokens (5-minute and 1-hour together).
pub const X_PALISADE_CACHE_WRITE_TOKENS: HeaderName =
    HeaderName::from_static("x-palisade-cache-write-tokens");
/// Response header with the cache-read tokens.
pub const X_PALISADE_CACHE_READ_TOKENS: HeaderName =
    HeaderName::from_static("x-palisade-cache-read-tokens");

/// The user id found in the request body's `metadata.user_id`, filled by
/// [`BodyUserIdLayer`](super::BodyUserIdLayer) when it runs inside the meter.
#[derive(Debug, Clone, Default)]
pub struct BodyUserSlot(pub(crate) Arc<OnceLock<String>>);

impl BodyUserSlot {
    /// The user id, once the request body has been read that far.
    pub fn get(&self) -> Option<&str> {
        self.0.get().map(String::as_str)
    }
}

/// Everything the layer's services share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) prices: Arc<PriceTable>,
    pub(crate) recorder: UsageRecorder,
    pub(crate) stats: Arc<CostStats>,
    pub(crate) user_header: Option<HeaderName>,
    pub(crate) bot_header: Option<HeaderName>,
    pub(crate) conversation_header: Option<HeaderName>,
    pub(crate) request_id_header: Option<HeaderName>,
    pub(crate) hash_api_key: bool,
    pub(crate) user_from_body: bool,
    pub(crate) cost_headers: bool,
    pub(crate) header_buffer: u64,
    pub(crate) sse_comment: bool,
    pub(crate) max_json_body: usize,
    pub(crate) max_sse_line: usize,
}

/// Meters the token usage and cost of every JSON or SSE response passing through. See
/// the [module docs](super).
#[derive(Debug, Clone)]
#[must_use]
pub struct CostMeterLayer {
    shared: Arc<Shared>,
}

impl CostMeterLayer {
    /// A layer pricing with `prices` and recording into `recorder`, with the default
    /// options (ids from `x-user-id`, `x-bot-id`, `x-conversation-id`, `x-request-id`; API
    /// keys hashed; no cost headers or comment).
    pub fn new(prices: impl Into<Arc<PriceTable>>, recorder: UsageRecorder) -> Self {
        let stats = Arc::clone(recorder.stats());
        Self {
            shared: Arc::new(Shared {
                prices: prices.into(),
                recorder,
                stats,
                user_header: Some(HeaderName::from_static("x-user-id")),
                bot_header: Some(HeaderName::from_static("x-bot-id")),
                conversation_header: Some(HeaderName::from_static("x-conversation-id")),
                request_id_header: Some(HeaderName::from_static("x-request-id")),
                hash_api_key: true,
                user_from_body: false,
                cost_headers: false,
                header_buffer: 256 * 1024,
                sse_comment: false,
                max_json_body: 1 << 20,
                max_sse_line: super::sse::DEFAULT_MAX_LINE,
            }),
        }
    }

    fn edit(mut self, f: impl FnOnce(&mut Shared)) -> Self {
        match Arc::get_mut(&mut self.shared) {
            Some(s) => f(s),
            None => {
                let s = &*self.shared;
                let mut copy = Shared {
                    prices: Arc::clone(&s.prices),
                    recorder: s.recorder.clone(),
                    stats: Arc::clone(&s.stats),
                    user_header: s.user_header.clone(),
                    bot_header: s.bot_header.clone(),
                    conversation_header: s.conversation_header.clone(),
                    request_id_header: s.request_id_header.clone(),
                    ..*s
                };
                f(&mut copy);
                self.shared = Arc::new(copy);
            }
        }
        self
    }

    /// The header naming the user (`None`: do not read one).
    pub fn user_header(self, name: Option<HeaderName>) -> Self {
        self.edit(|s| s.user_header = name)
    }

    /// The header naming the bot (`None`: do not read one).
    pub fn bot_header(self, name: Option<HeaderName>) -> Self {
        self.edit(|s| s.bot_header = name)
    }

    /// The header naming the conversation (`None`: do not read one).
    pub fn conversation_header(self, name: Option<HeaderName>) -> Self {
        self.edit(|s| s.conversation_header = name)
    }

    /// The header holding the request id (`None`: do not read one). The response's
    /// `request-id` (Anthropic) or this header is used when the request has none.
    pub fn request_id_header(self, name: Option<HeaderName>) -> Self {
        self.edit(|s| s.request_id_header = name)
    }

    /// Whether to record the hashed API key from `x-api-key` / `authorization`.
    pub fn hash_api_key(self, on: bool) -> Self {
        self.edit(|s| s.hash_api_key = on)
    }

    /// Whether to take the user from the request body's `metadata.user_id` (needs
    /// [`BodyUserIdLayer`](super::BodyUserIdLayer) inside this layer).
    pub fn user_from_body(self, on: bool) -> Self {
        self.edit(|s| s.user_from_body = on)
    }

    /// Adds `x-palisade-cost-usd` and token-count headers to non-streamed JSON responses
    /// whose `content-length` is at most `max_body` bytes. Such a response is read whole
    /// before its head is sent (headers cannot follow the body); larger or chunked
    /// responses pass without the headers.
    pub fn cost_headers(self, max_body: Option<u64>) -> Self {
        self.edit(|s| match max_body {
            Some(n) => {
                s.cost_headers = true;
                s.header_buffer = n;
            }
            None => s.cost_headers = false,
        })
    }

    /// Appends `: palisade-cost usd=… input=… output=…` (an SSE comment, ignored by
    /// clients) at the end of event streams.
    pub fn sse_cost_comment(self, on: bool) -> Self {
        self.edit(|s| s.sse_comment = on)
    }

    /// The largest JSON body scanned for usage (larger ones are counted in
    /// `oversize_body` and recorded without usage).
    pub fn max_json_body(self, bytes: usize) -> Self {
        self.edit(|s| s.max_json_body = bytes)
    }

    /// The longest SSE line kept (longer lines are dropped and counted).
    pub fn max_sse_line(self, bytes: usize) -> Self {
        self.edit(|s| s.max_sse_line = bytes.max(1))
    }

    /// The counters (queue, sink, unknown models, oversize bodies).
    pub fn stats(&self) -> &Arc<CostStats> {
        &self.shared.stats
    }
}

impl<S> Layer<S> for CostMeterLayer {
    type Service = CostMeter<S>;

    fn layer(&self, inner: S) -> CostMeter<S> {
        CostMeter {
            inner,
            shared: Arc::clone(&self.shared),
        }
    }
}

/// The service built by [`CostMeterLayer`].
#[derive(Debug, Clone)]
pub struct CostMeter<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> CostMeter<S> {
    /// Wraps `inner` with `layer`'s settings.
    pub fn new(inner: S, layer: &CostMeterLayer) -> Self {
        layer.layer(inner)
    }

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

fn header_string(headers: &HeaderMap, name: Option<&HeaderName>) -> Option<String> {
    let v = headers.get(name?)?.to_str().ok()?.trim();
    (!v.is_empty()).then(|| v.to_owned())
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for CostMeter<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    ResB: Body<Data = Bytes>,
{
    type Response = Response<MeteredBody<ResB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResB>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqB>) -> Self::Future {
        let s = &self.shared;
        let headers = req.headers();
        let mut attribution = req
            .extensions()
            .get::<Attribution>()
            .cloned()
            .unwrap_or_default();
        if attribution.user.is_none() {
            attribution.user = header_string(headers, s.user_header.as_ref());
        }
        if attribution.bot.is_none() {
            attribution.bot = header_string(headers, s.bot_header.as_ref());
        }
        if attribution.conversation.is_none() {
            attribution.conversation = header_string(headers, s.conversation_header.as_ref());
        }
        if attribution.api_key.is_none() && s.hash_api_key {
            attribution.api_key = ApiKeyId::from_headers(headers);
        }
        let request_id = header_string(headers, s.request_id_header.as_ref());
        let body_user = s.user_from_body.then(|| {
            let slot = BodyUserSlot::default();
            req.extensions_mut().insert(slot.clone());
            slot.0
        });
        let meta = RequestMeta {
            time: SystemTime::now(),
            start: Instant::now(),
            attribution,
            route: req.uri().path().to_owned(),
            request_id,
            body_user,
            budget: req
                .extensions()
                .get::<super::budget::BudgetReservation>()
                .cloned(),
        };
        ResponseFuture {
            state: State::Waiting {
                future: self.inner.call(req),
            },
            shared: Arc::clone(&self.shared),
            meta: Some(meta),
        }
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, B: Body> {
        Waiting { #[pin] future: F },
        Buffering {
            parts: Option<http::response::Parts>,
            body: Option<Pin<Box<B>>>,
            chunks: Vec<Bytes>,
            len: u64,
            meter: Option<Meter>,
        },
        Done,
    }
}

pin_project! {
    /// The response future of [`CostMeter`].
    pub struct ResponseFuture<F, B: Body> {
        #[pin]
        state: State<F, B>,
        shared: Arc<Shared>,
        meta: Option<RequestMeta>,
    }
}

impl<F, B: Body> std::fmt::Debug for ResponseFuture<F, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

fn is_content_type(headers: &HeaderMap, want: &str) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| {
            let v = v.trim();
            v.eq_ignore_ascii_case(want)
                || (want == "application/json"
                    && v.len() > 5
                    && v[v.len() - 5..].eq_ignore_ascii_case("+json"))
        })
}

fn add_cost_headers(headers: &mut HeaderMap, outcome: &Outcome) {
    let u = &outcome.usage;
    let cost = outcome.cost.map_or_else(
        || "unknown".to_owned(),
        super::pricing::Money::dollars_string,
    );
    if let Ok(v) = HeaderValue::try_from(cost) {
        headers.insert(X_PALISADE_COST_USD, v);
    }
    headers.insert(X_PALISADE_INPUT_TOKENS, HeaderValue::from(u.input_tokens));
    headers.insert(X_PALISADE_OUTPUT_TOKENS, HeaderValue::from(u.output_tokens));
    headers.insert(
        X_PALISADE_CACHE_WRITE_TOKENS,
        HeaderValue::from(
            u.cache_write_5m_tokens
                .saturating_add(u.cache_write_1h_tokens),
        ),
    );
    headers.insert(
        X_PALISADE_CACHE_READ_TOKENS,
        HeaderValue::from(u.cache_read_tokens),
    );
}

impl<F, B, E> Future for ResponseFuture<F, B>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Body<Data = Bytes>,
{
    type Output = Result<Response<MeteredBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Waiting { future } => {
                    let mut response = ready!(future.poll(cx))?;
                    let Some(mut meta) = this.meta.take() else {
                        this.state.set(State::Done);
                        return Poll::Ready(Ok(response.map(MeteredBody::passthrough)));
                    };
                    let headers = response.headers();
                    let stream = is_content_type(headers, "text/event-stream");
                    let json = !stream && is_content_type(headers, "application/json");
                    if !stream && !json {
                        if !response.status().is_success() {
                            // an unmetered failure used no tokens
                            if let Some(budget) = &meta.budget {
                                budget.refund();
                            }
                        }
                        this.state.set(State::Done);
                        return Poll::Ready(Ok(response.map(MeteredBody::passthrough)));
                    }
                    let encoded = headers
                        .get(http::header::CONTENT_ENCODING)
                        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
                    if encoded {
                        // Compressed bytes cannot be read for usage; meter before compression.
                        this.shared.stats.add_encoded_body();
                        tracing::warn!(target: "palisade::cost", route = %meta.route,
                            "compressed response not metered: place CostMeterLayer inside compression");
                        this.state.set(State::Done);
                        return Poll::Ready(Ok(response.map(MeteredBody::passthrough)));
                    }
                    if meta.request_id.is_none() {
                        meta.request_id =
                            header_string(headers, Some(&HeaderName::from_static("request-id")))
                                .or_else(|| {
                                    header_string(headers, this.shared.request_id_header.as_ref())
                                });
                    }
                    let status = response.status().as_u16();
                    let meter = Meter::new(Arc::clone(this.shared), meta, status, stream);
                    let s = &**this.shared;
                    let small = response
                        .body()
                        .size_hint()
                        .upper()
                        .is_some_and(|n| n <= s.header_buffer);
                    if json && s.cost_headers && small {
                        let (parts, body) = response.into_parts();
                        this.state.set(State::Buffering {
                            parts: Some(parts),
                            body: Some(Box::pin(body)),
                            chunks: Vec::new(),
                            len: 0,
                            meter: Some(meter),
                        });
                        continue;
                    }
                    if stream && s.sse_comment {
                        response.headers_mut().remove(CONTENT_LENGTH);
                    }
                    let comment = s.sse_comment;
                    this.state.set(State::Done);
                    return Poll::Ready(Ok(
                        response.map(|b| MeteredBody::new(b, Some(meter), comment))
                    ));
                }
                StateProj::Buffering {
                    parts,
                    body,
                    chunks,
                    len,
                    meter,
                } => {
                    // Read the (small, bounded) body to its end so the cost can go in the head.
                    let mut error = None;
                    let mut trailers = None;
                    let mut done = false;
                    let pinned = body.as_mut().expect("body present while buffering");
                    loop {
                        match ready!(pinned.as_mut().poll_frame(cx)) {
                            Some(Ok(frame)) => match frame.into_data() {
                                Ok(data) => {
                                    if let Some(m) = meter.as_mut() {
                                        m.feed(&data);
                                    }
                                    *len += data.len() as u64;
                                    chunks.push(data);
                                    if *len > this.shared.header_buffer {
                                        break; // the size hint lied: stream the rest
                                    }
                                }
                                Err(frame) => {
                                    trailers = frame.into_trailers().ok();
                                    done = true;
                                    break;
                                }
                            },
                            Some(Err(e)) => {
                                error = Some(e);
                                break;
                            }
                            None => {
                                done = true;
                                break;
                            }
                        }
                    }
                    let mut meter = meter.take().expect("meter present while buffering");
                    let mut parts = parts.take().expect("parts present while buffering");
                    if done {
                        let outcome = meter.settle();
                        add_cost_headers(&mut parts.headers, &outcome);
                    }
                    let chunks = std::mem::take(chunks);
                    let body = body.take().expect("body present while buffering");
                    this.state.set(State::Done);
                    let body = MeteredBody::buffered(body, chunks, error, trailers, done, meter);
                    return Poll::Ready(Ok(Response::from_parts(parts, body)));
                }
                StateProj::Done => panic!("ResponseFuture polled after completion"),
            }
        }
    }
}
