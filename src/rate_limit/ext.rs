//! `RateLimitServiceBuilderExt`: the layer on tower's `ServiceBuilder`.

use super::layer::RateLimitLayer;
use crate::rate_limit::store::Store;

mod sealed {
    pub trait Sealed {}
    impl<L> Sealed for tower::ServiceBuilder<L> {}
}

/// `.rate_limit_with(layer)` on tower's `ServiceBuilder` (tower's own `rate_limit(n, per)`
/// keeps its name).
///
/// ```
/// use palisade::rate_limit::{Quota, RateLimitLayer, RateLimitServiceBuilderExt, Rule};
/// use tower::{ServiceBuilder, ServiceExt, service_fn};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let layer = RateLimitLayer::new([Rule::new("all", Quota::per_second(1))]).unwrap();
/// let svc = ServiceBuilder::new().rate_limit_with(layer).service(service_fn(|_req: http::Request<()>| async {
///     Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Empty::<bytes::Bytes>::new()))
/// }));
/// assert_eq!(svc.clone().oneshot(http::Request::new(())).await.unwrap().status(), 200);
/// assert_eq!(svc.oneshot(http::Request::new(())).await.unwrap().status(), 429);
/// # }
/// ```
pub trait RateLimitServiceBuilderExt<L>: sealed::Sealed {
    /// Adds a [`RateLimitLayer`].
    fn rate_limit_with<St: Store>(
        self,
        layer: RateLimitLayer<St>,
    ) -> tower::ServiceBuilder<tower_layer::Stack<RateLimitLayer<St>, L>>;
}

impl<L> RateLimitServiceBuilderExt<L> for tower::ServiceBuilder<L> {
    fn rate_limit_with<St: Store>(
        self,
        layer: RateLimitLayer<St>,
    ) -> tower::ServiceBuilder<tower_layer::Stack<RateLimitLayer<St>, L>> {
        self.layer(layer)
    }
}
