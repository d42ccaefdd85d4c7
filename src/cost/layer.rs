//! [`CostMeterLayer`] and the [`CostMeter`] service.

use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::SystemTime;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, Request, Response};
use http_body::Body;
use tokio::time::Instant;
use tower_layer::Layer;
use tower_service::Service;

use super::body::{MeteredBody, RequestMeta};
pub use super::future::ResponseFuture;
use super::pricing::PriceTable;
use super::record::Attribution;
use super::sink::{CostStats, UsageRecorder};
use crate::key::ApiKeyId;
use crate::key::Principal;

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
    /// options: the user from a [`Principal`] or [`Attribution`] extension only (no user
    /// header), bot and conversation labels from `x-bot-id` and `x-conversation-id`, the
    /// request id from `x-request-id`, API keys hashed, no cost headers or comment.
    pub fn new(prices: impl Into<Arc<PriceTable>>, recorder: UsageRecorder) -> Self {
        let stats = Arc::clone(recorder.stats());
        Self {
            shared: Arc::new(Shared {
                prices: prices.into(),
                recorder,
                stats,
                user_header: None,
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

    /// The header naming the user (default `None`: not read). Such a header is written by
    /// the client, so anyone could put their spend on another user: set it only when a
    /// trusted proxy in front sets (and strips) it. A [`Principal`] or an
    /// [`Attribution`] user in the request extensions comes first.
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
    /// clients) at the end of event streams that reported usage.
    pub fn sse_cost_comment(self, on: bool) -> Self {
        self.edit(|s| s.sse_comment = on)
    }

    /// The largest JSON body held and parsed whole (larger ones are counted in
    /// `oversize_body` and read by their top-level members as they pass, in bounded
    /// memory: the usage is still found).
    pub fn max_json_body(self, bytes: usize) -> Self {
        self.edit(|s| s.max_json_body = bytes)
    }

    /// The longest SSE line kept (longer lines are dropped and counted).
    pub fn max_sse_line(self, bytes: usize) -> Self {
        self.edit(|s| s.max_sse_line = bytes.max(1))
    }

    /// The price table.
    pub fn prices(&self) -> &Arc<PriceTable> {
        &self.shared.prices
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

pub(crate) fn header_string(headers: &HeaderMap, name: Option<&HeaderName>) -> Option<String> {
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
        if let Some(principal) = req.extensions().get::<Principal>() {
            attribution.user = Some(principal.id().to_owned());
        } else if attribution.user.is_none() {
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
            fallback: None,
        };
        ResponseFuture::new(self.inner.call(req), Arc::clone(&self.shared), meta)
    }
}
