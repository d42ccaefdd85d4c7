//! Security headers on every response: a modern set following helmet and the OWASP Secure
//! Headers Project, a typed Content-Security-Policy with per-request nonces, HSTS in
//! production, and removal of fingerprinting headers.
//!
//! ```
//! use palisade::security_headers::SecurityHeadersLayer;
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let svc = ServiceBuilder::new()
//!     .layer(SecurityHeadersLayer::api()) // or ::web(), ::builder(), ::from_env()?
//!     .service(service_fn(|_req: http::Request<()>| async {
//!         Ok::<_, std::convert::Infallible>(http::Response::new(()))
//!     }));
//! let res = svc.oneshot(http::Request::new(())).await?;
//! assert_eq!(res.headers()["x-content-type-options"], "nosniff");
//! assert_eq!(res.headers()["content-security-policy"], "default-src 'none'; frame-ancestors 'none'");
//! # Ok(())
//! # }
//! ```
//!
//! Two presets:
//!
//! - [`SecurityHeadersLayer::api`] for JSON APIs: `Content-Security-Policy: default-src
//!   'none'; frame-ancestors 'none'` and `Referrer-Policy: no-referrer`
//!   (`Cache-Control: no-store` on request, see
//!   [`SecurityHeadersLayerBuilder::cache_control_no_store`]);
//! - [`SecurityHeadersLayer::web`] for pages: [`ContentSecurityPolicy::web`] with a fresh
//!   [`CspNonce`] per response, in the header and in the request extensions.
//!
//! Both always send `X-Content-Type-Options: nosniff`, `X-Frame-Options: DENY`,
//! `Permissions-Policy` denying camera, microphone, geolocation and the other powerful
//! features ([`DENIED_FEATURES`]), `Cross-Origin-Opener-Policy: same-origin`,
//! `Cross-Origin-Resource-Policy: same-origin`, `Origin-Agent-Cluster: ?1`,
//! `X-DNS-Prefetch-Control: off`, `X-Permitted-Cross-Domain-Policies: none` and
//! `X-XSS-Protection: 0` (see [`XssProtection`] for why not `1; mode=block`).
//! `Strict-Transport-Security: max-age=63072000; includeSubDomains` goes out in production
//! or when the request came over https ([`HstsWhen`]). `Server`, `X-Powered-By` and
//! similar headers are removed ([`DEFAULT_REMOVED_HEADERS`]).
//!
//! Each header has a [`HeaderMode`]: `if-not-present` (the default: a handler's own value
//! wins), `override`, or `off`. Every value is checked and built once, when the layer is
//! built; per response the layer only inserts prebuilt values, and with nonces formats the
//! one CSP value.
//!
//! The same shape as every palisade layer: [`SecurityHeadersLayer::builder`] (a
//! [`SecurityHeadersLayerBuilder`]), [`SecurityHeadersLayer::from_config`] with a
//! [`SecurityHeadersConfig`], and [`SecurityHeadersLayer::from_env`], which reads
//! `PALISADE_SECURITY_HEADERS_*` and reports every problem at once. Mistakes are
//! [`SecurityHeadersConfigError`]s.
//!
//! # Example: pages with nonces
//!
//! ```
//! use http::{Request, Response};
//! use palisade::security_headers::{CspNonce, SecurityHeadersLayer};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! // A page handler that writes the nonce into its inline script.
//! let svc = ServiceBuilder::new()
//!     .layer(SecurityHeadersLayer::web())
//!     .service(service_fn(|req: Request<()>| async move {
//!         let nonce = req.extensions().get::<CspNonce>().unwrap();
//!         let page = format!("<script nonce=\"{nonce}\">hello()</script>");
//!         let mut res = Response::new(page);
//!         res.headers_mut().insert("server", "nginx/1.25.3".parse().unwrap());
//!         Ok::<_, std::convert::Infallible>(res)
//!     }));
//!
//! let res = svc.oneshot(Request::new(())).await.unwrap();
//! let csp = res.headers()["content-security-policy"].to_str().unwrap();
//! let nonce = res.body().split('"').nth(1).unwrap();
//! assert!(csp.contains(&format!("script-src 'self' 'nonce-{nonce}'")));
//! assert_eq!(res.headers()["x-content-type-options"], "nosniff");
//! assert_eq!(res.headers()["x-frame-options"], "DENY");
//! assert!(res.headers().get("server").is_none());
//! // Not production and not https: no HSTS.
//! assert!(res.headers().get("strict-transport-security").is_none());
//! # }
//! ```
//!
//! A custom policy:
//!
//! ```
//! use palisade::config::Environment;
//! use palisade::security_headers::{
//!     ContentSecurityPolicy, HeaderMode, SecurityHeader, SecurityHeadersLayer,
//! };
//!
//! let csp = ContentSecurityPolicy::builder()
//!     .default_src(["'self'"])
//!     .connect_src(["'self'", "https://api.anthropic.com"])
//!     .report_uri("/csp-reports")
//!     .report_only(true)
//!     .build()
//!     .unwrap();
//! let layer = SecurityHeadersLayer::builder()
//!     .csp(csp)
//!     .environment(Environment::Production)
//!     .header_mode(SecurityHeader::XFrameOptions, HeaderMode::Off)
//!     .mode(HeaderMode::Override)
//!     .build()
//!     .unwrap();
//! # let _ = layer;
//! ```

mod builder;
mod config;
mod csp;
mod future;
mod layer;
mod values;

pub mod observatory;
#[cfg(test)]
mod tests;

pub use builder::{
    DEFAULT_REMOVED_HEADERS, SecurityHeadersConfigError, SecurityHeadersLayerBuilder,
};
pub use config::{Preset, SecurityHeadersConfig};
pub use csp::{ContentSecurityPolicy, CspBuilder, CspError, CspNonce, Directive, Source};
pub use future::ResponseFuture;
pub use layer::{SecurityHeaders, SecurityHeadersLayer};
pub use values::{
    CrossOriginEmbedderPolicy, CrossOriginOpenerPolicy, CrossOriginResourcePolicy, DENIED_FEATURES,
    FrameOptions, HeaderMode, Hsts, HstsWhen, PermissionsPolicy, ReferrerPolicy, SecurityHeader,
    XssProtection,
};
