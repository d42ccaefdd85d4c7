//! SecurityHeadersLayer over real sockets on 127.0.0.1: an axum server, a hyper client.

use std::net::SocketAddr;

use axum::Router;
use axum::extract::Extension;
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use bytes::Bytes;
use http::{HeaderMap, Request};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use palisade::config::Environment;
use palisade::security_headers::{CspNonce, SecurityHeadersLayer};

async fn page(Extension(nonce): Extension<CspNonce>) -> impl IntoResponse {
    (
        [("server", "axum"), ("x-powered-by", "palisade-tests")],
        Html(format!("<script nonce=\"{nonce}\">go()</script>")),
    )
}

async fn json() -> impl IntoResponse {
    (
        [("server", "axum"), ("x-frame-options", "SAMEORIGIN")],
        axum::Json(serde_json::json!({"ok": true})),
    )
}

async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

async fn get_from(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> (HeaderMap, String) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let mut req = Request::get(format!("http://{addr}{path}"));
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let res = client
        .request(req.body(Empty::new()).unwrap())
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let headers = res.headers().clone();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    (headers, String::from_utf8(body.to_vec()).unwrap())
}

#[tokio::test]
async fn api_preset_over_a_socket() {
    let app = Router::new()
        .route("/v1/ping", get(json))
        .layer(SecurityHeadersLayer::api());
    let addr = serve(app).await;
    let (h, body) = get_from(addr, "/v1/ping", &[]).await;
    assert_eq!(body, r#"{"ok":true}"#);
    assert_eq!(
        h["content-security-policy"],
        "default-src 'none'; frame-ancestors 'none'"
    );
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert_eq!(h["referrer-policy"], "no-referrer");
    assert_eq!(h["cross-origin-resource-policy"], "same-origin");
    assert_eq!(h["origin-agent-cluster"], "?1");
    assert!(
        h["permissions-policy"]
            .to_str()
            .unwrap()
            .contains("camera=()")
    );
    // The handler's own X-Frame-Options wins (if-not-present); Server is gone.
    assert_eq!(h["x-frame-options"], "SAMEORIGIN");
    assert!(h.get("server").is_none());
    // Plain http in development: no HSTS.
    assert!(h.get("strict-transport-security").is_none());
    assert_eq!(h["content-type"], "application/json");
}

#[tokio::test]
async fn web_preset_nonce_reaches_the_handler_and_the_header() {
    let app = Router::new()
        .route("/", get(page))
        .layer(SecurityHeadersLayer::web());
    let addr = serve(app).await;
    let mut nonces = Vec::new();
    for _ in 0..3 {
        let (h, body) = get_from(addr, "/", &[]).await;
        let nonce = body.split('"').nth(1).unwrap().to_owned();
        assert_eq!(nonce.len(), 24);
        let csp = h["content-security-policy"].to_str().unwrap();
        assert!(
            csp.contains(&format!("script-src 'self' 'nonce-{nonce}'")),
            "{csp}"
        );
        assert!(
            csp.contains(&format!("style-src 'self' 'nonce-{nonce}'")),
            "{csp}"
        );
        assert!(h.get("server").is_none());
        assert!(h.get("x-powered-by").is_none());
        assert!(!nonces.contains(&nonce));
        nonces.push(nonce);
    }
}

#[tokio::test]
async fn hsts_behind_a_trusted_proxy_and_in_production() {
    let behind_proxy = SecurityHeadersLayer::builder()
        .trust_forwarded_proto(true)
        .build()
        .unwrap();
    let addr = serve(Router::new().route("/", get(json)).layer(behind_proxy)).await;
    let (h, _) = get_from(addr, "/", &[("x-forwarded-proto", "https")]).await;
    assert_eq!(
        h["strict-transport-security"],
        "max-age=63072000; includeSubDomains"
    );
    let (h, _) = get_from(addr, "/", &[("x-forwarded-proto", "http")]).await;
    assert!(h.get("strict-transport-security").is_none());

    let production = SecurityHeadersLayer::builder()
        .environment(Environment::Production)
        .build()
        .unwrap();
    let addr = serve(Router::new().route("/", get(json)).layer(production)).await;
    let (h, _) = get_from(addr, "/", &[]).await;
    assert_eq!(
        h["strict-transport-security"],
        "max-age=63072000; includeSubDomains"
    );
}

#[cfg(feature = "axum")]
#[tokio::test]
async fn handlers_can_take_the_nonce_directly() {
    async fn direct(nonce: CspNonce) -> String {
        nonce.to_string()
    }
    let with_nonce = Router::new()
        .route("/", get(direct))
        .layer(SecurityHeadersLayer::web());
    let addr = serve(with_nonce).await;
    let (h, body) = get_from(addr, "/", &[]).await;
    let csp = h["content-security-policy"].to_str().unwrap();
    assert!(csp.contains(&format!("'nonce-{body}'")), "{csp}");

    // Without a nonce policy the extractor refuses with a 500 that shows no internals.
    let without = Router::new()
        .route("/", get(direct))
        .layer(SecurityHeadersLayer::api());
    let addr = serve(without).await;
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let res = client
        .get(format!("http://{addr}/").parse().unwrap())
        .await
        .unwrap();
    assert_eq!(res.status(), 500);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert!(!String::from_utf8_lossy(&body).contains("CspNonce"));
}
