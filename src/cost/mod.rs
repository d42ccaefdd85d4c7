//! Cost metering: exact token cost of JSON and streamed (SSE) LLM responses, attributed,
//! recorded through a non-blocking queue, and summarised.
//!
//! [`CostMeterLayer`] wraps a server (or an upstream client). For every response whose
//! `content-type` is `application/json` or `text/event-stream` it reads the usage the
//! upstream reports — Anthropic Messages or OpenAI chat completions, whole or streamed —
//! **as the bytes pass, without changing one**, prices it in integer pico-dollars from a
//! [`PriceTable`] (built in, or merged from a LiteLLM JSON map), and writes exactly one
//! [`UsageRecord`] per response to a [`UsageRecorder`]: when the body ends, or, when the
//! client goes away first, with the usage seen so far marked [`Completion::Partial`]
//! (input tokens from `message_start` are never lost).
//!
//! - Anthropic's streamed `message_delta` usage is a running total: it replaces, never
//!   adds. OpenAI's `prompt_tokens` includes cached tokens: input = prompt − cached.
//! - An unknown model is recorded with its tokens and `cost: None`, a warning and a
//!   counter (`unknown_model` in [`CostStats`]) — never a silent 0.
//! - Who pays: an [`Attribution`] from the request extensions, else the `x-user-id`,
//!   `x-bot-id`, `x-conversation-id` headers and the hashed API key; optionally the
//!   body's `metadata.user_id` with [`BodyUserIdLayer`].
//! - Compressed responses (`content-encoding` other than `identity`) pass unmetered and are
//!   counted (`encoded_body`): put the meter inside any compression layer.
//! - Showing the cost: `x-palisade-cost-usd` and token headers on small non-streamed JSON
//!   responses (read whole before the head is sent, which is why it is limited to bodies
//!   with a small `content-length`; HTTP trailers were rejected because most clients drop
//!   them), and a final SSE comment `: palisade-cost usd=…` that SSE clients ignore.
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use bytes::Bytes;
//! use http_body_util::{BodyExt, Full};
//! use palisade::cost::{CostMeterLayer, MemorySink, PriceTable, RecorderConfig, Subject, UsageRecorder};
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
//! let req = http::Request::builder().uri("/v1/messages").header("x-user-id", "ann")
//!     .body(Full::new(Bytes::new())).unwrap();
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
mod config;
mod layer;
mod peek;
pub mod pricing;
mod record;
pub mod sink;
pub mod sse;
pub mod summary;
pub mod usage;

pub use alert::{AlertEvent, AlertSink, TracingAlertSink, WebhookSink};
pub use body::MeteredBody;
pub use budget::{Budget, BudgetLayer, BudgetReservation};
pub use config::{CostConfig, CostConfigError};
pub use layer::{
    BodyUserSlot, CostMeter, CostMeterLayer, ResponseFuture, X_PALISADE_CACHE_READ_TOKENS,
    X_PALISADE_CACHE_WRITE_TOKENS, X_PALISADE_COST_USD, X_PALISADE_INPUT_TOKENS,
    X_PALISADE_OUTPUT_TOKENS,
};
pub use peek::{BodyUserId, BodyUserIdLayer, UserIdBody};
pub use pricing::{ModelPrice, Money, PriceTable, TokenPrices};
pub use record::{Attribution, Completion, UsageRecord};
pub use sink::{
    CostStats, CostStatsSnapshot, MemorySink, RecorderConfig, RecorderShutdown, SinkError,
    TracingSink, UsageRecorder, UsageSink,
};
pub use summary::{Day, Subject, Summary, Totals};
pub use usage::{Usage, UsageExtractor};

#[cfg(test)]
mod tests;
