//! Cost metering: exact token cost of JSON and streamed (SSE) LLM responses, attributed,
//! recorded through a non-blocking queue, and summarised.
//!
//! ```
//! # use bytes::Bytes; use http_body_util::{BodyExt, Full}; use tower::{Layer, ServiceExt, service_fn};
//! use palisade::cost::{CostMeterLayer, MemorySink, RecorderConfig, UsageRecorder};
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let (recorder, shutdown) = UsageRecorder::spawn(MemorySink::new(), RecorderConfig::default());
//! let layer = CostMeterLayer::builder().recorder(recorder).headers(Some(64 * 1024)).build().unwrap();
//! let upstream = service_fn(|_req: http::Request<Full<Bytes>>| async {
//!     let body = r#"{"type":"message","model":"claude-opus-4-7","usage":{"input_tokens":6,"output_tokens":2745}}"#;
//!     http::Response::builder().header("content-type", "application/json").body(Full::new(Bytes::from(body)))
//! });
//! let res = layer.layer(upstream).oneshot(http::Request::new(Full::new(Bytes::new()))).await.unwrap();
//! assert_eq!(res.headers()["x-palisade-cost-usd"], "0.068655"); // 6 × $5 + 2,745 × $25 per MTok
//! # drop(res.into_body().collect().await); shutdown.shutdown().await; }
//! ```
//!
//! [`CostMeterLayer`] wraps a server (or an upstream client). For every response whose
//! `content-type` is `application/json` or `text/event-stream` it reads the usage the
//! upstream reports — Anthropic Messages, OpenAI chat completions or OpenAI Responses,
//! whole or streamed — **as the bytes pass, without changing one**, prices it in integer
//! pico-dollars from a [`PriceTable`] (built in, or merged from a LiteLLM JSON map), and
//! writes exactly one [`UsageRecord`] per request that reached the upstream to a
//! [`UsageRecorder`], with how it ended ([`Completion`]):
//!
//! - the body ended with its end marker (`message_stop`, `[DONE]`, `response.completed`,
//!   a whole JSON document): complete;
//! - the client went away, the body failed, or a stream closed without its end marker:
//!   partial, with the usage seen so far (input tokens from `message_start` are never
//!   lost);
//! - an error status or an in-body error: an upstream error; no response at all (a
//!   transport error, an open breaker's refusal raised as an error): failed; the request
//!   dropped before its response head: cancelled. Summaries count errors apart from
//!   unpriced models. A JSON response that is no LLM API's (another route behind the same
//!   layer) is recorded only for a 5xx or 429, and gets no cost headers; so is a response
//!   of any other content type (a gateway's HTML 502) or a compressed one.
//!
//! More rules:
//!
//! - Anthropic's streamed `message_delta` usage is a running total: it replaces, never
//!   adds, and keeps the 5-minute / 1-hour cache-write split of `message_start`. OpenAI's
//!   `prompt_tokens` (Responses: `input_tokens`) includes cached tokens: input = prompt −
//!   cached.
//! - A JSON body larger than `max_json_body` is not held: it is read by its top-level
//!   members as it passes, where both providers put the usage (at the end).
//! - An unknown model is recorded with its tokens and `cost: None`, a warning and a
//!   counter (`unknown_model` in [`CostStats`]) — never a silent 0.
//! - Who pays: the authenticated [`Principal`] from the request extensions first, then an
//!   [`Attribution`] extension, then (opt-in, as the client writes them) a user header
//!   and the body's top-level `metadata.user_id` with [`BodyUserIdLayer`]; bot and
//!   conversation labels from `x-bot-id` / `x-conversation-id`, and the hashed API key.
//! - Compressed responses (`content-encoding` other than `identity`) pass unmetered and are
//!   counted (`encoded_body`; an error status is still recorded): put the meter inside any
//!   compression layer.
//! - Showing the cost, only on responses that reported usage: `x-palisade-cost-usd` and
//!   token headers on small non-streamed JSON responses (read whole before the head is
//!   sent, which is why it is limited to bodies with a small `content-length`; HTTP
//!   trailers were rejected because most clients drop them), and a final SSE comment
//!   `: palisade-cost usd=…` that SSE clients ignore (never appended where it would
//!   complete an event the upstream left unfinished).
//! - Money leaves the crate as an exact decimal string of dollars ([`Money`]'s serde).
//!
//! # A whole example: attribution, records and summaries
//!
//! ```
//! use std::sync::Arc;
//! use bytes::Bytes;
//! use http_body_util::{BodyExt, Full};
//! use palisade::cost::{CostMeterLayer, MemorySink, PriceTable, Principal, RecorderConfig, Subject, UsageRecorder};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let sink = Arc::new(MemorySink::new());
//! let (recorder, shutdown) = UsageRecorder::spawn(Arc::clone(&sink), RecorderConfig::default());
//! let layer = CostMeterLayer::new(PriceTable::builtin(), recorder).cost_headers(Some(64 * 1024));
//!
//! let upstream = service_fn(|_req: http::Request<Full<Bytes>>| async {
//!     let body = r#"{"type":"message","model":"claude-3-7-sonnet-20250219","content":[],
//!         "usage":{"input_tokens":3,"cache_creation_input_tokens":12304,"output_tokens":550}}"#;
//!     Ok::<_, std::convert::Infallible>(
//!         http::Response::builder().header("content-type", "application/json")
//!             .body(Full::new(Bytes::from(body))).unwrap())
//! });
//! let svc = ServiceBuilder::new().layer(layer).service(upstream);
//! let mut req = http::Request::builder().uri("/v1/messages").body(Full::new(Bytes::new())).unwrap();
//! req.extensions_mut().insert(Principal::new("ann")); // set by your authentication

//! let res = svc.oneshot(req).await.unwrap();
//! assert_eq!(res.headers()["x-palisade-cost-usd"], "0.054399");
//! let body = res.into_body().collect().await.unwrap().to_bytes();
//! assert!(body.starts_with(b"{\"type\":\"message\""));
//!
//! shutdown.shutdown().await;
//! let records = sink.records();
//! assert_eq!(records.len(), 1);
//! assert_eq!(records[0].attribution.user.as_deref(), Some("ann"));
//! assert_eq!(records[0].cost.unwrap().to_string(), "$0.054399");
//! let day = sink.summary(&Subject::User("ann".into()), std::time::SystemTime::UNIX_EPOCH,
//!     std::time::SystemTime::now() + std::time::Duration::from_secs(1));
//! assert_eq!(day.total.usage.cache_write_5m_tokens, 12_304);
//! # }
//! ```

pub mod alert;
mod body;
pub mod budget;
mod builder;
mod config;
mod future;
mod json_fast;
mod json_scan;
mod json_view;
mod layer;
mod peek;
pub mod pricing;
mod record;
pub mod sink;
pub mod sse;
pub mod summary;
pub mod usage;

/// The authenticated caller (shared with the other layers): see [`crate::key::Principal`].
pub use crate::key::Principal;
#[cfg(feature = "hyper-util")]
pub use alert::WebhookSink;
pub use alert::{AlertEvent, AlertSink, TracingAlertSink};
pub use body::MeteredBody;
pub use budget::{Budget, BudgetLayer, BudgetReservation};
pub use builder::CostMeterLayerBuilder;
pub use config::{CostConfig, CostConfigError};
pub use layer::{
    BodyUserSlot, CostMeter, CostMeterLayer, ResponseFuture, X_PALISADE_CACHE_READ_TOKENS,
    X_PALISADE_CACHE_WRITE_TOKENS, X_PALISADE_COST_USD, X_PALISADE_INPUT_TOKENS,
    X_PALISADE_OUTPUT_TOKENS,
};
pub use peek::{BodyUserId, BodyUserIdLayer, UserIdBody};
pub use pricing::{ModelPrice, Money, PriceTable, TokenPrices};
pub use record::{Attribution, Completion, Fallback, ParseRecordIdError, RecordId, UsageRecord};
pub use sink::{
    CostStats, CostStatsSnapshot, MemorySink, RecorderConfig, RecorderShutdown, SinkError,
    TracingSink, UsageRecorder, UsageSink,
};
pub use summary::{Day, Subject, Summary, Totals};
pub use usage::{Usage, UsageExtractor};

#[cfg(test)]
mod tests;
