//! SecurityHeadersLayer in front of a small axum app: an API route with the `api()` preset,
//! a page with the `web()` preset and its per-request CSP nonce, and a route whose layer
//! comes from the environment in one line (`PALISADE_SECURITY_HEADERS_*`, `PALISADE_ENV`).
//!
//! Serves on 127.0.0.1 (a free port), makes a few requests with a hyper client, prints the
//! headers, and exits.
//!
//! ```text
//! cargo run --example security_headers
//! ```

use axum::Router;
use axum::extract::Extension;
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use palisade::config::Environment;
use palisade::security_headers::{CspNonce, SecurityHeadersLayer};

async fn page(Extension(nonce): Extension<CspNonce>) -> impl IntoResponse {
    (
        [("server", "my-framework/1.2.3")],
        Html(format!(
            "<!doctype html><script nonce=\"{nonce}\">console.log('hello')</script>"
        )),
    )
}

async fn status() -> impl IntoResponse {
    axum::Json(serde_json::json!({"status": "ok"}))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The API in production (HSTS on every response), the page with the web preset.
    let api = SecurityHeadersLayer::builder()
        .environment(Environment::Production)
        .cache_control_no_store(true)
        .build()?;
    // From the environment: every mistake in PALISADE_SECURITY_HEADERS_* is listed at once.
    let from_env = SecurityHeadersLayer::from_env()?;
    let app = Router::new()
        .route("/v1/status", get(status).layer(api))
        .route("/v1/health", get(status).layer(from_env))
        .route("/", get(page).layer(SecurityHeadersLayer::web()));

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });

    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    for path in ["/v1/status", "/v1/health", "/", "/"] {
        let res = client.get(format!("http://{addr}{path}").parse()?).await?;
        println!("GET {path} -> {}", res.status());
        let mut names: Vec<_> = res.headers().keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        for name in names {
            println!("  {name}: {}", res.headers()[name].to_str()?);
        }
        assert!(res.headers().get("server").is_none());
        let body = res.into_body().collect().await?.to_bytes();
        println!("  body: {}\n", String::from_utf8_lossy(&body));
    }
    Ok(())
}
