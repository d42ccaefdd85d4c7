//! Per-key, per-route rate limits: correct under concurrency, bounded in memory, with the
//! headers clients understand.
//!
//! ```
//! use palisade::rate_limit::{KeySource, Quota, RateLimitLayer, Rule};
//! use tower::{Layer, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let rule = Rule::new("chat", Quota::per_minute(1)).key(KeySource::ApiKey);
//! let svc = RateLimitLayer::new([rule]).unwrap().layer(service_fn(|_req| async {
//!     Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
//! }));
//! let request = || http::Request::post("/").header("x-api-key", "sk-1").body(()).unwrap();
//! assert_eq!(svc.clone().oneshot(request()).await.unwrap().status(), 200);
//! assert_eq!(svc.oneshot(request()).await.unwrap().status(), 429);
//! # }
//! ```
//!
//! A [`RateLimitLayer`] holds [`Rule`]s. A rule has a name, a matcher (method and route),
//! a [`KeySource`] (global, an authenticated [`Principal`], a header, the hashed API key or
//! the client IP), a [`Quota`] enforced by an [`Algorithm`] (sliding window by default,
//! fixed window, or GCRA), and a [`Cost`] per request. All rules that match a request are
//! decided **together and atomically** by the [`Store`]: either every one is debited or
//! none is, and refused requests never count.
//!
//! - A refusal is a 429 rendered in the configured [`ErrorFormat`](crate::ErrorFormat) with
//!   `retry-after` (whole seconds, rounded up, never 0), computed exactly from the
//!   algorithm's state.
//! - A request whose cost exceeds a rule's capacity can never pass: it is refused at once
//!   with 413 and a message saying so, not with a `retry-after` to loop on.
//! - Every response carries the IETF draft `RateLimit-Policy` and `RateLimit` headers
//!   ([`headers`]), and optionally the legacy `X-RateLimit-*` ones.
//! - Shadow rules decide and log but never refuse; per-key quota overrides, `peek`, `reset`
//!   and counters are on the [`RateLimiter`] admin handle.
//! - Quantities known only after the response (tokens) use [`Cost::Settled`]: the estimate
//!   is reserved, and the handler settles the actual amount with the [`Reservation`] in its
//!   request extensions.
//!
//! The default [`MemoryStore`] is sharded and bounded: idle keys are dropped first, and a
//! flood of distinct keys never grows it past its cap.
//!
//! # Headers
//!
//! ```
//! use std::convert::Infallible;
//! use http::{Request, Response};
//! use palisade::rate_limit::{KeySource, Quota, RateLimitLayer, Rule};
//! use tower::{Layer, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let layer = RateLimitLayer::new([
//!     Rule::new("chat", Quota::per_minute(2)).post("/v1/messages").key(KeySource::ApiKey),
//! ])
//! .unwrap();
//! let svc = layer.layer(service_fn(|_req: Request<()>| async {
//!     Ok::<_, Infallible>(Response::new(http_body_util::Empty::<bytes::Bytes>::new()))
//! }));
//!
//! let request = || {
//!     Request::post("/v1/messages").header("x-api-key", "sk-test-1").body(()).unwrap()
//! };
//! let ok = svc.clone().oneshot(request()).await.unwrap();
//! assert_eq!(ok.status(), 200);
//! assert_eq!(ok.headers()["ratelimit-policy"], "\"chat\";q=2;w=60");
//! // the request weighs on the sliding window until the end of the next minute
//! assert_eq!(ok.headers()["ratelimit"], "\"chat\";r=1;t=120");
//!
//! svc.clone().oneshot(request()).await.unwrap();
//! let refused = svc.oneshot(request()).await.unwrap();
//! assert_eq!(refused.status(), 429);
//! // the two earlier requests must weigh no more than one: half-way into the next minute
//! assert_eq!(refused.headers()["retry-after"], "90");
//! # }
//! ```

pub mod algorithm;
mod builder;
mod config;
mod error;
mod future;
pub mod headers;
mod key;
mod layer;
mod limiter;
mod quota;
mod reservation;
mod rule;
mod service;
mod shared;
pub mod store;

pub use builder::{FailMode, RateLimitLayerBuilder};
pub use config::{CostMode, RateLimitConfig, RuleConfig};
pub use error::{
    AdminError, ParseIpNetError, ParseKeySourceError, ParseRouteError, RateLimitConfigError,
    StoreError,
};
pub use future::ResponseFuture;
pub use key::{IpKey, IpNet, KeySource, MAX_HEADER_KEY_LEN, Principal, RateKey, TrustedProxies};
pub use layer::RateLimitLayer;
pub use limiter::{RateLimiter, RuleCounters, RuleStatus};
pub use quota::{Algorithm, Quota};
pub use reservation::Reservation;
pub use rule::{Cost, RequestCost, Route, Rule, Segment};
pub use service::RateLimit;
#[cfg(feature = "redis")]
pub use store::{
    HashTag, Lease, RedisClock, RedisConfigError, RedisFailMode, RedisHealth, RedisStore,
    RedisStoreBuilder, RedisStoreConfig,
};
pub use store::{MemoryStore, MemoryStoreBuilder, Store};

#[cfg(test)]
mod tests;
