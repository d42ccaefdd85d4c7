//! # palisade
//!
//! Independent, composable [tower] middleware for services that front paid LLM APIs
//! (Anthropic Messages, OpenAI chat completions) or any other upstream. Each layer stands
//! alone: take one, or stack them all in front of a hyper or axum service.
//!
//! ```
//! use palisade::ServiceBuilderExt;
//! use palisade::rate_limit::Rule;
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), palisade::BoxError> {
//! let server = ServiceBuilder::new()
//!     .security_headers_api()
//!     .rate_limit_rules([Rule::chat()])? // 20 a minute per API key
//!     .service(service_fn(|_req: http::Request<String>| async {
//!         Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
//!     }));
//! let request = http::Request::post("/v1/messages").header("x-api-key", "sk-ant-1");
//! let response = server.oneshot(request.body(String::new())?).await?;
//! assert_eq!(response.headers()["x-content-type-options"], "nosniff");
//! assert!(response.headers().contains_key("ratelimit")); // 19 left
//! # Ok(())
//! # }
//! ```
//!
//! | layer | job | side |
//! |---|---|---|
//! | [`RetryLayer`] ([`retry`]) | retry failed upstream calls with exponential backoff and jitter, honouring `retry-after`, inside a retry budget, replaying bodies | client |
//! | [`CircuitBreakerLayer`] ([`circuit_breaker`]) | stop calling an upstream that keeps failing (failure-rate and slow-call windows); probe it back to health; registry with health snapshots | client |
//! | [`RateLimitLayer`] ([`rate_limit`]) | per-key, per-route limits (sliding window, fixed window, GCRA) with IETF `RateLimit` headers, atomic across rules, bounded in memory | server |
//! | [`SecurityHeadersLayer`] ([`security_headers`]) | modern security headers, CSP with nonces, HSTS in production | server |
//! | [`CostMeterLayer`] ([`cost`]) | read token usage from JSON and SSE responses, price it exactly, record and summarise it | server |
//! | [`BudgetLayer`](cost::BudgetLayer) ([`cost::budget`]) | spend budgets per user, API key, bot or overall, reserved before the call and settled after; cost alerts | server |
//!
//! The layers meet in a few shared modules, never in each other:
//!
//! - [`error`]: one [`Error`] with an [`ErrorKind`], rendered as an Anthropic-style error
//!   or an RFC 9457 problem document;
//! - [`classify`]: what an upstream's answer means (success, failure, ignored, retryable,
//!   `retry-after`), shared by retry and circuit breaker;
//! - [`config`]: typed configuration from files or environment variables, reporting every
//!   problem at once;
//! - [`validate`]: request validation with field-level errors (and `ValidatedJson` for axum);
//! - [`key`]: API keys hashed, redacted and compared in constant time;
//! - [`body`]: the response body type server-side layers answer with;
//! - [`clock`]: where layers read time;
//! - [`jitter`]: the one jitter type of retry delays and circuit-breaker open periods;
//! - [`service_builder`]: [`ServiceBuilderExt`], every layer built in one call on tower's
//!   `ServiceBuilder`.
//!
//! Time is tokio's clock by default everywhere (`tokio::time::Instant`), so tests run with
//! a paused clock and no real sleeps; hot paths can opt into a cached clock
//! ([`clock::ClockSource::Coarse`]). Money is integer. The hot paths allocate nothing they can
//! avoid.
//!
//! ## Features
//!
//! - `hyper-util` (default): the default classifier recognises hyper-util's client errors
//!   (a connection never made is safe to retry); turn default features off if you bring
//!   another client.
//! - `axum`: `IntoResponse` for [`Error`], the `ValidatedJson` and `CspNonce` extractors,
//!   and peer IPs from axum's `ConnectInfo` for rate-limit keys.
//! - `redis`: the Redis and Redis Cluster stores of rate limits (`RedisStore`), budgets
//!   (`RedisBudgetStore`) and usage records (`RedisSink`), over `redis://` or `rediss://`.
//! - `postgres`: the PostgreSQL usage and audit ledger (`PostgresSink`), with its
//!   migrations and a connection pool.
//!
//! The default build needs no server and no network.
//!
//! ## Example: the whole stack
//!
//! A gateway's two sides: the client that calls the upstream (retry outside, circuit
//! breaker inside, so each retry asks the breaker), and the server that faces callers
//! (security headers, rate limit, cost meter). Every layer also works on its own.
//!
//! ```
//! use std::sync::Arc;
//! use bytes::Bytes;
//! use http_body_util::{BodyExt, Full};
//! use palisade::circuit_breaker::CircuitBreakerLayer;
//! use palisade::cost::{CostMeterLayer, MemorySink, PriceTable, RecorderConfig, UsageRecorder};
//! use palisade::rate_limit::{KeySource, Quota, RateLimitLayer, Rule};
//! use palisade::retry::{ReplayBody, RetryLayer};
//! use palisade::security_headers::SecurityHeadersLayer;
//! use palisade::BoxError;
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), BoxError> {
//! // The upstream (here a function; in production a hyper-util `Client`).
//! let upstream = service_fn(|_req: http::Request<ReplayBody<Full<Bytes>>>| async {
//!     let body = r#"{"type":"message","model":"claude-sonnet-4-5","content":[],
//!                    "usage":{"input_tokens":1000,"output_tokens":200}}"#;
//!     let response = http::Response::builder()
//!         .header("content-type", "application/json")
//!         .body(Full::new(Bytes::from(body)))?;
//!     Ok::<_, BoxError>(response)
//! });
//! let client = ServiceBuilder::new()
//!     .layer(RetryLayer::builder().max_retries(2).build()?)
//!     .layer(CircuitBreakerLayer::builder().build()?)
//!     .service(upstream);
//!
//! // The server side, forwarding to the client.
//! let sink = Arc::new(MemorySink::new());
//! let (recorder, shutdown) = UsageRecorder::spawn(Arc::clone(&sink), RecorderConfig::default());
//! let server = ServiceBuilder::new()
//!     .layer(SecurityHeadersLayer::api())
//!     .layer(RateLimitLayer::new([
//!         Rule::new("chat", Quota::per_minute(20)).key(KeySource::ApiKey),
//!     ])?)
//!     .layer(CostMeterLayer::new(PriceTable::builtin(), recorder))
//!     .service_fn(move |req: http::Request<Full<Bytes>>| client.clone().oneshot(req));
//!
//! let request = http::Request::post("/v1/messages")
//!     .header("x-api-key", "sk-ant-example")
//!     .body(Full::new(Bytes::from_static(b"{}")))?;
//! let response = server.oneshot(request).await?;
//! assert_eq!(response.status(), 200);
//! assert_eq!(response.headers()["x-content-type-options"], "nosniff");
//! assert_eq!(response.headers()["ratelimit"], "\"chat\";r=19;t=120");
//! response.into_body().collect().await?;
//!
//! shutdown.shutdown().await; // flushes the usage queue
//! // 1,000 input tokens at $3/MTok + 200 output tokens at $15/MTok
//! assert_eq!(sink.records()[0].cost.unwrap().to_string(), "$0.006");
//! # Ok(())
//! # }
//! ```
//!
//! [tower]: https://docs.rs/tower
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod body;
pub mod circuit_breaker;
pub mod classify;
pub mod clock;
pub mod config;
pub mod cost;
pub mod error;
pub mod jitter;
pub mod key;
pub mod rate_limit;
#[cfg(feature = "redis")]
mod redis_batch;
pub mod retry;
pub mod security_headers;
pub mod service_builder;
pub mod validate;

pub use circuit_breaker::CircuitBreakerLayer;
pub use cost::CostMeterLayer;
pub use error::{BoxError, Error, ErrorFormat, ErrorKind, FieldError};
pub use rate_limit::RateLimitLayer;
pub use retry::RetryLayer;
pub use security_headers::SecurityHeadersLayer;
pub use service_builder::ServiceBuilderExt;

/// The README's examples, compiled and run as doctests so they stay true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
