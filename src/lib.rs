//! # palisade
//!
//! Independent, composable [tower] middleware for services that front paid LLM APIs
//! (Anthropic Messages, OpenAI chat completions) or any other upstream. Each layer stands
//! alone: take one, or stack them all in front of a hyper or axum service.
//!
//! | layer | job | side |
//! |---|---|---|
//! | `RetryLayer` | retry failed upstream calls with exponential backoff and jitter, honouring `retry-after`, inside a retry budget | client |
//! | `CircuitBreakerLayer` | stop calling an upstream that keeps failing; probe it back to health | client |
//! | `RateLimitLayer` | per-key, per-route limits (sliding window, fixed window, GCRA), in memory or in Redis | server |
//! | `SecurityHeadersLayer` | modern security headers, CSP with nonces, HSTS in production | server |
//! | `CostMeterLayer` | read token usage from JSON and SSE responses, price it exactly, record and summarise it | server |
//!
//! The layers meet in a few shared modules, never in each other:
//!
//! - [`error`]: one [`Error`] with an [`ErrorKind`], rendered as an Anthropic-style error
//!   or an RFC 9457 problem document;
//! - [`classify`]: what an upstream's answer means (success, failure, ignored, retryable,
//!   `retry-after`), shared by retry and circuit breaker;
//! - [`config`]: typed configuration from files or environment variables, reporting every
//!   problem at once;
//! - [`key`]: API keys hashed, redacted and compared in constant time;
//! - [`body`]: the response body type server-side layers answer with.
//!
//! Time is tokio's clock everywhere (`tokio::time::Instant`), so tests run with a paused
//! clock and no real sleeps. Money is integer. The hot paths allocate nothing they can
//! avoid.
//!
//! ## Features
//!
//! - `redis`: Redis and Redis Cluster stores for limits, budgets and usage.
//! - `postgres`: the PostgreSQL usage ledger.
//! - `axum`: `IntoResponse` for [`Error`].
//!
//! The default build needs no server and no network.
//!
//! ## Example
//!
//! ```
//! use palisade::{Error, ErrorFormat};
//! use tower::{ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! // A handler that refuses with a typed error, rendered for Anthropic SDK clients.
//! let svc = service_fn(|_req: http::Request<()>| async {
//!     let refusal = Error::invalid_request("`max_tokens` must be at least 1");
//!     Ok::<_, std::convert::Infallible>(refusal.to_response(ErrorFormat::Anthropic))
//! });
//! let response = svc.oneshot(http::Request::new(())).await.unwrap();
//! assert_eq!(response.status(), 400);
//! # }
//! ```
//!
//! [tower]: https://docs.rs/tower
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod body;
pub mod circuit_breaker;
pub mod classify;
pub mod config;
pub mod cost;
pub mod error;
pub mod key;
pub mod rate_limit;
pub mod retry;
pub mod security_headers;
pub mod validate;

pub use error::{BoxError, Error, ErrorFormat, ErrorKind, FieldError};
pub use retry::{Retry, RetryLayer};
pub use security_headers::{SecurityHeadersConfig, SecurityHeadersLayer};

/// The README's examples, compiled and run as doctests so they stay true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
