//! Retry failed upstream calls: exponential backoff with jitter, server-directed delays,
//! a retry budget, and request bodies replayed without `Clone`.
//!
//! ```
//! use std::sync::atomic::{AtomicU32, Ordering};
//! use palisade::retry::{ReplayBody, RetryCount, RetryLayer};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), palisade::BoxError> {
//! static CALLS: AtomicU32 = AtomicU32::new(0); // an upstream overloaded twice, then fine
//! let upstream = service_fn(|_req: http::Request<ReplayBody<String>>| async {
//!     let status = if CALLS.fetch_add(1, Ordering::SeqCst) < 2 { 529 } else { 200 };
//!     Ok::<_, palisade::BoxError>(http::Response::builder().status(status).body(())?)
//! });
//! let client = ServiceBuilder::new().layer(RetryLayer::llm()).service(upstream);
//! let response = client.oneshot(http::Request::new("{}".to_owned())).await?;
//! assert_eq!((response.status(), RetryCount::of(&response)), (http::StatusCode::OK, 2));
//! # Ok(())
//! # }
//! ```
//!
//! [`RetryLayer`] wraps the client side of a service (typically a hyper-util client that
//! calls an LLM API). For each call it decides, with a [`Classify`](crate::classify::Classify)
//! verdict on the whole `Result`, whether another attempt may help and is safe:
//!
//! - **What is retried**: by default ([`DefaultClassifier`](crate::classify::DefaultClassifier))
//!   408, 409, 429, 500, 502, 503, 504, 529, timeouts and transport errors (other 5xx are
//!   not retried). `GET`, `HEAD`, `PUT`, `DELETE`, `OPTIONS`, `TRACE` are retried on any
//!   of them; a `POST` only when the server said it did not process the request (429, 529,
//!   503 with `retry-after`, connection never made), when it carries an `Idempotency-Key`,
//!   or when the layer is told to [`assume_idempotent`](RetryLayerBuilder::assume_idempotent).
//! - **When**: after `base * factor^n` with [`Jitter`] (full by default), capped at
//!   `max_delay` after jitter. `retry-after-ms`, `retry-after` (seconds or HTTP-date) and
//!   `x-should-retry` override the schedule; a server that asks for longer than
//!   `max_delay` or than the [deadline](RetryLayerBuilder::deadline) leaves gets its answer
//!   back at once (retrying earlier than asked would be refused again, and spend budget).
//! - **How much**: a [`RetryBudget`] (on by default: 20% of requests plus 10 per second,
//!   over 10 s) keeps a failing upstream from seeing a retry storm. Refusals by an open
//!   circuit breaker (`Outcome::Rejected`) spend no budget.
//! - **Bodies**: the request body is kept as it is read, up to a limit (1 MiB by default),
//!   and replayed from memory ([`ReplayBody`]); a larger body is sent once and not
//!   retried. The request head is copied for each attempt but the last, which takes the
//!   original. Any other `Clone` request can be retried through [`Cloned`].
//! - **Responses** are handed on whole: a response that will be retried is dropped, body
//!   and all, before the wait; the caller only ever reads the one that is returned, so no
//!   byte of a response is ever handed on and then retried.
//! - **Observability**: a tracing event per retry (attempt, delay, status or error), the
//!   retry count in the [`RetryCount`] response extension and, if asked, in a header.
//!
//! The service's error type is [`BoxError`](crate::BoxError): a per-attempt timeout or the
//! deadline ends an attempt with a [`crate::Error`] of kind `Timeout`.
//!
//! # Example: replayed bodies, a count header
//!
//! ```
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicU32, Ordering};
//! use std::time::Duration;
//! use bytes::Bytes;
//! use http_body_util::{BodyExt, Full};
//! use palisade::retry::{ReplayBody, RetryCount, RetryLayer};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! // An upstream that is overloaded twice, then answers.
//! let calls = Arc::new(AtomicU32::new(0));
//! let upstream = service_fn({
//!     let calls = calls.clone();
//!     move |req: http::Request<ReplayBody<Full<Bytes>>>| {
//!         let n = calls.fetch_add(1, Ordering::SeqCst);
//!         async move {
//!             let body = req.into_body().collect().await?.to_bytes();
//!             assert_eq!(body, r#"{"model":"claude"}"#, "every attempt sends the same body");
//!             let status = if n < 2 { 529 } else { 200 };
//!             Ok::<_, palisade::BoxError>(http::Response::builder().status(status).body(()).unwrap())
//!         }
//!     }
//! });
//!
//! let layer = RetryLayer::builder()
//!     .max_retries(3)
//!     .base_delay(Duration::from_millis(100))
//!     .count_header("x-retry-count")
//!     .build()
//!     .unwrap();
//! let client = ServiceBuilder::new().layer(layer).service(upstream);
//!
//! let request = http::Request::post("http://127.0.0.1/v1/messages")
//!     .body(Full::new(Bytes::from(r#"{"model":"claude"}"#)))
//!     .unwrap();
//! let response = client.oneshot(request).await.unwrap();
//! assert_eq!(response.status(), 200);
//! assert_eq!(RetryCount::of(&response), 2);
//! assert_eq!(response.headers()["x-retry-count"], "2");
//! assert_eq!(calls.load(Ordering::SeqCst), 3);
//! # }
//! ```

mod backoff;
mod body;
mod budget;
mod config;
mod future;
mod layer;
mod policy;

pub use crate::jitter::{Jitter, JitterRng, ParseJitterError};
pub use backoff::Backoff;
pub use body::ReplayBody;
pub use budget::{BudgetError, RetryBudget};
pub use config::{RetryConfig, RetryConfigError};
pub use future::ResponseFuture;
#[allow(deprecated)]
pub use layer::RetryBuilder;
pub use layer::{Retry, RetryLayer, RetryLayerBuilder};
pub use policy::{
    Cloned, HttpSource, IDEMPOTENCY_KEY, Replay, ReplaySource, RetryCount, RetryResponse,
    is_idempotent_method,
};

#[cfg(test)]
mod tests;
