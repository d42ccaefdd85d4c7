//! [`SecurityHeadersLayer`] and the [`SecurityHeaders`] service.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower_layer::Layer;
use tower_service::Service;

use super::builder::{Policy, SecurityHeadersBuilder, SecurityHeadersError};
use super::csp::CspNonce;
use super::future::ResponseFuture;

/// Adds security headers to every response, removes fingerprinting headers, and puts a
/// fresh [`CspNonce`] in the request extensions when the policy uses nonces.
///
/// Cheap to clone: the compiled policy is shared.
#[derive(Debug, Clone)]
#[must_use]
pub struct SecurityHeadersLayer {
    policy: Arc<Policy>,
}

impl SecurityHeadersLayer {
    /// The preset for JSON APIs (see [`SecurityHeadersBuilder::api`]).
    pub fn api() -> Self {
        Self::from_policy(Arc::new(preset(SecurityHeadersBuilder::api())))
    }

    /// The preset for pages, with a CSP nonce per response (see
    /// [`SecurityHeadersBuilder::web`]).
    pub fn web() -> Self {
        Self::from_policy(Arc::new(preset(SecurityHeadersBuilder::web())))
    }

    /// A builder starting from the API preset.
    pub fn builder() -> SecurityHeadersBuilder {
        SecurityHeadersBuilder::api()
    }

    /// Builds the layer from configuration.
    pub fn from_config(
        config: &super::SecurityHeadersConfig,
    ) -> Result<Self, SecurityHeadersError> {
        config.builder().build()
    }

    pub(crate) fn from_policy(policy: Arc<Policy>) -> Self {
        Self { policy }
    }
}

/// The presets are made of constant, valid parts (the tests build both), so compiling
/// them cannot fail; this runs when the layer is built, never per request.
fn preset(builder: SecurityHeadersBuilder) -> Policy {
    builder
        .compile()
        .expect("the built-in security headers presets are valid")
}

impl<S> Layer<S> for SecurityHeadersLayer {
    type Service = SecurityHeaders<S>;

    fn layer(&self, inner: S) -> Self::Service {
        SecurityHeaders {
            inner,
            policy: self.policy.clone(),
        }
    }
}

/// The service built by [`SecurityHeadersLayer`].
#[derive(Debug, Clone)]
pub struct SecurityHeaders<S> {
    inner: S,
    policy: Arc<Policy>,
}

impl<S> SecurityHeaders<S> {
    /// A layer with the API preset, for `ServiceBuilder::layer`.
    pub fn layer() -> SecurityHeadersLayer {
        SecurityHeadersLayer::api()
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The inner service, consuming this one.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for SecurityHeaders<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        let hsts = self.policy.wants_hsts(&req);
        let csp = self.policy.csp_template.as_ref().map(|template| {
            let nonce = CspNonce::generate();
            let value = template.render(nonce.as_str());
            req.extensions_mut().insert(nonce);
            value
        });
        ResponseFuture::new(self.inner.call(req), self.policy.clone(), hsts, csp)
    }
}
