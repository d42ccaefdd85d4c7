//! [`SecurityHeadersLayer`] and the [`SecurityHeaders`] service.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower_layer::Layer;
use tower_service::Service;

use super::builder::{Policy, SecurityHeadersConfigError, SecurityHeadersLayerBuilder};
use super::config::{PREFIX, SecurityHeadersConfig};
use super::csp::CspNonce;
use super::future::ResponseFuture;
use crate::config::{ConfigError, Env, Problem, ProblemKind, env_var};

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
    /// The preset for JSON APIs (see [`SecurityHeadersLayerBuilder::api`]).
    pub fn api() -> Self {
        Self::from_policy(Arc::new(preset(SecurityHeadersLayerBuilder::api())))
    }

    /// The preset for pages, with a CSP nonce per response (see
    /// [`SecurityHeadersLayerBuilder::web`]).
    pub fn web() -> Self {
        Self::from_policy(Arc::new(preset(SecurityHeadersLayerBuilder::web())))
    }

    /// A builder starting from the API preset (see [`SecurityHeadersLayerBuilder::web`]
    /// for pages).
    pub fn builder() -> SecurityHeadersLayerBuilder {
        SecurityHeadersLayerBuilder::api()
    }

    /// The layer `config` describes (from a file, or built in code).
    ///
    /// ```
    /// use palisade::security_headers::{Preset, SecurityHeadersConfig, SecurityHeadersLayer};
    ///
    /// let mut config = SecurityHeadersConfig::default();
    /// config.preset = Preset::Web;
    /// let layer = SecurityHeadersLayer::from_config(config).unwrap();
    /// # let _ = layer;
    /// ```
    pub fn from_config(config: SecurityHeadersConfig) -> Result<Self, SecurityHeadersConfigError> {
        config.build()
    }

    /// The layer the process environment describes (`PALISADE_SECURITY_HEADERS_*` and
    /// `PALISADE_ENV`; see [`SecurityHeadersConfig::from_env`]), reporting every problem
    /// at once.
    ///
    /// ```no_run
    /// # fn main() -> Result<(), palisade::config::ConfigError> {
    /// // PALISADE_ENV=production PALISADE_SECURITY_HEADERS_PRESET=web
    /// let layer = palisade::security_headers::SecurityHeadersLayer::from_env()?;
    /// # let _ = layer;
    /// # Ok(()) }
    /// ```
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_env_in(Env::from_process())
    }

    /// [`from_env`](Self::from_env) over the given variables.
    pub(crate) fn from_env_in(mut env: Env) -> Result<Self, ConfigError> {
        let config = SecurityHeadersConfig::from_env(&mut env);
        env.finish()?;
        // `from_env` has already recorded every mistake `build` knows of; should one slip
        // through, it is still reported as a configuration problem, never a panic.
        config.build().map_err(|err| {
            ConfigError::new(vec![Problem {
                name: env_var(PREFIX, "csp"),
                kind: ProblemKind::Invalid {
                    value: String::new(),
                    reason: err.to_string(),
                },
                example: "default-src 'none'; frame-ancestors 'none'".to_owned(),
            }])
        })
    }

    pub(crate) fn from_policy(policy: Arc<Policy>) -> Self {
        Self { policy }
    }
}

/// The presets are made of constant, valid parts (the tests build both), so compiling
/// them cannot fail; this runs when the layer is built, never per request.
fn preset(builder: SecurityHeadersLayerBuilder) -> Policy {
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
