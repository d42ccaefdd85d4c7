//! A chat endpoint limited to 3 requests a minute per API key plus 5 a minute overall.
//!
//! Serves on 127.0.0.1 (a free port), makes a few requests with a hyper client, prints the
//! statuses and rate-limit headers, and exits.
//!
//! ```text
//! cargo run --example rate_limit
//! ```

use std::net::SocketAddr;

use axum::Router;
use axum::routing::post;
use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use palisade::ErrorFormat;
use palisade::rate_limit::{KeySource, Quota, RateKey, RateLimitLayer, Rule};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let layer = RateLimitLayer::builder()
        .rule(
            Rule::new("chat", Quota::per_minute(3))
                .post("/v1/messages")
                .key(KeySource::ApiKey),
        )
        .rule(Rule::new("all", Quota::per_minute(5)))
        .error_format(ErrorFormat::Anthropic)
        .build()?;
    let admin = layer.limiter();
    // Another route's limits from the environment, in one line: PALISADE_RATE_LIMIT_RULES
    // (JSON) and the other PALISADE_RATE_LIMIT_* variables, every mistake listed at once.
    let from_env = RateLimitLayer::from_env()?;
    let app = Router::new()
        .route("/v1/messages", post(|| async { "{\"type\":\"message\"}" }))
        .layer(layer)
        .route("/v1/status", post(|| async { "ok" }).layer(from_env));

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
    });

    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    for (i, key) in [
        "sk-alice", "sk-alice", "sk-alice", "sk-alice", "sk-bob", "sk-carol",
    ]
    .into_iter()
    .enumerate()
    {
        let req = Request::post(format!("http://{addr}/v1/messages"))
            .header("x-api-key", key)
            .body(Full::new(Bytes::from_static(b"{}")))?;
        let res = client.request(req).await?;
        let status = res.status();
        let show = |name: &str| {
            res.headers()
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect::<Vec<_>>()
                .join(", ")
        };
        println!("#{} {key}: {status}", i + 1);
        println!("   RateLimit-Policy: {}", show("ratelimit-policy"));
        println!("   RateLimit:        {}", show("ratelimit"));
        if let Some(retry) = res.headers().get("retry-after") {
            println!("   retry-after:      {}", retry.to_str()?);
        }
        let body = res.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            println!("   body:             {}", String::from_utf8_lossy(&body));
        }
    }

    let alice = admin.peek("chat", &RateKey::api_key("sk-alice")).await?;
    println!("alice has {} of {} left", alice.remaining, alice.quota);
    for c in admin.counters() {
        println!(
            "rule {}: allowed {}, limited {}",
            c.rule, c.allowed, c.limited
        );
    }
    server.abort();
    Ok(())
}
