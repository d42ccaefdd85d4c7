//! [`SecurityHeadersServiceBuilderExt`]: the layer's presets as `ServiceBuilder` methods.

use tower_layer::Stack;

use super::layer::SecurityHeadersLayer;

mod sealed {
    pub trait Sealed {}
    impl<L> Sealed for tower::ServiceBuilder<L> {}
}

/// `.security_headers_api()` and `.security_headers_web()` on tower's `ServiceBuilder`: each
/// builds its preset layer and adds it.
///
/// ```
/// use palisade::security_headers::SecurityHeadersServiceBuilderExt;
/// use tower::{ServiceBuilder, ServiceExt, service_fn};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let svc = ServiceBuilder::new()
///     .security_headers_api()
///     .service(service_fn(|_req: http::Request<()>| async {
///         Ok::<_, std::convert::Infallible>(http::Response::new(()))
///     }));
/// let res = svc.oneshot(http::Request::new(())).await.unwrap();
/// assert_eq!(res.headers()["referrer-policy"], "no-referrer");
/// # }
/// ```
pub trait SecurityHeadersServiceBuilderExt<L>: sealed::Sealed {
    /// Adds [`SecurityHeadersLayer::api`], the preset for JSON APIs.
    fn security_headers_api(self) -> tower::ServiceBuilder<Stack<SecurityHeadersLayer, L>>;

    /// Adds [`SecurityHeadersLayer::web`], the preset for pages, with a CSP nonce per
    /// response.
    fn security_headers_web(self) -> tower::ServiceBuilder<Stack<SecurityHeadersLayer, L>>;
}

impl<L> SecurityHeadersServiceBuilderExt<L> for tower::ServiceBuilder<L> {
    fn security_headers_api(self) -> tower::ServiceBuilder<Stack<SecurityHeadersLayer, L>> {
        self.layer(SecurityHeadersLayer::api())
    }

    fn security_headers_web(self) -> tower::ServiceBuilder<Stack<SecurityHeadersLayer, L>> {
        self.layer(SecurityHeadersLayer::web())
    }
}
