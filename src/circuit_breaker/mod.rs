//! Stop calling an upstream that keeps failing; probe it back to health.
//!
//! ```
//! use palisade::circuit_breaker::{CircuitBreakerLayer, CircuitState};
//! use palisade::{BoxError, Error, ErrorKind};
//! use tower::{Layer, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), BoxError> {
//! let layer = CircuitBreakerLayer::builder().count_window(4).minimum_calls(4).build()?;
//! let svc = layer.layer(service_fn(|_req: http::Request<()>| async {
//!     Ok::<_, BoxError>(http::Response::builder().status(503).body(())?) // always failing
//! }));
//! for _ in 0..4 {
//!     svc.clone().oneshot(http::Request::new(())).await?;
//! }
//! assert_eq!(layer.handle().state(), CircuitState::Open);
//! let refused = svc.oneshot(http::Request::new(())).await.unwrap_err();
//! assert_eq!(refused.downcast_ref::<Error>().unwrap().kind(), ErrorKind::CircuitOpen);
//! # Ok(())
//! # }
//! ```
//!
//! [`CircuitBreakerLayer`] wraps a client service (an HTTP client calling an LLM API, or
//! any `tower::Service`). It judges every call with the shared [`classify`](crate::classify)
//! rules (5xx, 529 among them, timeouts and transport errors fail; every 4xx, 408 and 429
//! included, is ignored) or your own classifier, over a sliding window:
//!
//! - a **count window** (the last N calls) or a **time window** (the last N seconds, in
//!   per-second buckets);
//! - it opens when, with at least `minimum_calls` in the window, the **failure rate**
//!   reaches its threshold, or the **slow-call rate** does (slow = longer than a duration),
//!   or optionally after a run of **consecutive failures**.
//!
//! | state | calls | leaves when |
//! |---|---|---|
//! | `Closed` | pass, counted | a rule trips: `Open` |
//! | `Open` | refused at once, with `retry_after` | the open duration passed: `HalfOpen` |
//! | `HalfOpen` | exactly N probes pass, the rest are refused | all probes succeed: `Closed`; one fails, or the maximum wait passes with no probe in flight and none succeeded: `Open` |
//! | `ForcedOpen` | refused | the handle says so |
//! | `ForcedClosed` | pass, not counted | the handle says so |
//! | `MetricsOnly` | pass, counted, never opens | the handle says so |
//!
//! The open duration grows (times `backoff_multiplier`, with jitter, up to
//! `max_open_duration`) each time half-open fails, and falls back to its base when the
//! circuit closes. A probe that is dropped or cancelled gives its slot back.
//!
//! A refused call never reaches the upstream. It costs an atomic load, a clock read and one small
//! allocation (the error), and says when to come back: by default the service's error
//! type is [`BoxError`](crate::BoxError) (inner errors pass through boxed) and a refusal
//! is a [`palisade::Error`](crate::Error) of kind
//! [`CircuitOpen`](crate::ErrorKind::CircuitOpen) with `retry_after`; with
//! [`respond_with`](CircuitBreakerLayer::respond_with) it is a rendered response (503 with
//! `retry-after`, or 529 `overloaded_error` in the Anthropic format).
//!
//! The closed path is lock-free and allocation-free: one atomic load to admit a call; to
//! record it, one compare-and-swap on the count window's head (its totals are touched only
//! when an outcome changes), or one compare-and-swap on the current second's bucket of the
//! time window, so the cost does not grow with the call rate. A time window or slow-call
//! rule also reads the clock once a call: tokio's by default (tests pause it), or a
//! cached one read with one atomic load when you choose
//! [`ClockSource::Coarse`](crate::clock::ClockSource::Coarse) with
//! [`clock`](CircuitBreakerLayerBuilder::clock). Transitions take a mutex,
//! emit `tracing` events (`warn` when opening) and call your
//! [`on_transition`](CircuitBreakerLayerBuilder::on_transition) callbacks.
//!
//! A [`CircuitBreakerHandle`] (from the layer, a service, or a registry) forces and resets
//! the breaker from anywhere and takes [`CircuitSnapshot`]s. A [`CircuitBreakerRegistry`]
//! keeps one breaker per key (upstream host, model), bounded in number, and reports
//! [`RegistryHealth`] as JSON for a `/health` endpoint.
//!
//! # Example: the schedule, a handle, the refusal's `retry_after`
//!
//! The open duration is jittered (±20 % by default); a `seed` makes the schedule
//! reproducible.
//!
//! ```
//! use std::time::Duration;
//! use palisade::circuit_breaker::{CircuitBreakerLayer, CircuitState};
//! use palisade::{BoxError, Error, ErrorKind};
//! use tower::{Layer, Service, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! let layer = CircuitBreakerLayer::builder()
//!     .name("anthropic")
//!     .count_window(10)
//!     .minimum_calls(4)
//!     .failure_rate_threshold(0.5)
//!     .open_duration(Duration::from_secs(5))
//!     .seed(7)
//!     .build()
//!     .unwrap();
//! let handle = layer.handle();
//!
//! // An upstream that answers 503.
//! let upstream = service_fn(|_req: http::Request<()>| async {
//!     Ok::<_, BoxError>(http::Response::builder().status(503).body(()).unwrap())
//! });
//! let mut svc = layer.layer(upstream);
//! for _ in 0..4 {
//!     let response = svc.ready().await.unwrap().call(http::Request::new(())).await.unwrap();
//!     assert_eq!(response.status(), 503);
//! }
//! assert_eq!(handle.state(), CircuitState::Open);
//!
//! // Refused without calling the upstream, with the time until the next probe.
//! let err = svc.ready().await.unwrap().call(http::Request::new(())).await.unwrap_err();
//! let err = err.downcast::<Error>().unwrap();
//! assert_eq!(err.kind(), ErrorKind::CircuitOpen);
//! let retry_after = err.retry_after().unwrap();
//! assert!(retry_after >= Duration::from_secs(4) && retry_after <= Duration::from_secs(6));
//! # }
//! ```

mod config;
mod future;
mod layer;
mod registry;
mod state;
mod window;

pub use config::{
    CircuitBreakerConfig, CircuitBreakerConfigError, MAX_COUNT_WINDOW, MAX_HALF_OPEN_PROBES,
    MAX_TIME_WINDOW_SECS, WindowKind,
};
pub use future::{RespondFuture, ResponseFuture};
#[allow(deprecated)]
pub use layer::CircuitBreakerBuilder;
pub use layer::{
    CircuitBreaker, CircuitBreakerLayer, CircuitBreakerLayerBuilder, Respond, ReturnError,
};
pub use registry::{
    BreakerKey, CircuitBreakerRegistry, KeyedCircuitBreaker, KeyedCircuitBreakerLayer,
    RegistryHealth,
};
pub use state::{
    CircuitBreakerHandle, CircuitSnapshot, CircuitState, Transition, TransitionReason,
};

#[cfg(test)]
mod tests;
