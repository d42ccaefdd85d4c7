//! A circuit breaker in front of a flaky upstream, offline.
//!
//! Starts an upstream on 127.0.0.1 (an axum app) that answers `529 overloaded` to its first
//! five calls and `200` after that, then calls it through a hyper-util client guarded by a
//! `CircuitBreakerLayer`: the breaker opens, refuses calls without touching the upstream,
//! probes after the open duration, and closes. Prints each step and the health report.
//!
//! Run: `cargo run --example circuit_breaker`

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use palisade::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerRegistry, CircuitState};
use palisade::jitter::Jitter;
use palisade::{BoxError, Error};
use tower::{Service, ServiceBuilder, ServiceExt};

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    // The upstream: overloaded for its first five calls.
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&hits);
    let app = Router::new().route(
        "/v1/messages",
        get(move || {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            async move {
                if n < 5 {
                    (StatusCode::from_u16(529).unwrap(), "overloaded")
                } else {
                    (StatusCode::OK, "{\"type\":\"message\"}")
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    // One breaker per upstream host, from a registry (which also serves /health data).
    let mut config = CircuitBreakerConfig::default();
    config.window_size = 10;
    config.minimum_calls = 5;
    config.open_duration = Duration::from_millis(300);
    config.jitter = Jitter::None;
    config.half_open_probes = 2;
    // One breaker from the environment, in one line: PALISADE_CIRCUIT_BREAKER_* (every
    // mistake listed at once; unset variables keep their defaults).
    let from_env = palisade::circuit_breaker::CircuitBreakerLayer::from_env()?;
    println!(
        "breaker from the environment: `{}`, {:?}",
        from_env.handle().name(),
        from_env.handle().state()
    );
    let registry = CircuitBreakerRegistry::new(config, 64)?
        .on_transition(|t| println!("  transition: {} -> {} ({:?})", t.from, t.to, t.reason));
    let layer = registry.layer("127.0.0.1");
    let handle = layer.handle();

    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut svc = ServiceBuilder::new().layer(layer).service(client);
    let uri = format!("http://{addr}/v1/messages");

    for round in 1..=12 {
        if round == 9 {
            println!("waiting out the open duration...");
            tokio::time::sleep(Duration::from_millis(350)).await;
        }
        let req = http::Request::get(uri.as_str()).body(Empty::<Bytes>::new())?;
        match svc.ready().await?.call(req).await {
            Ok(response) => println!("call {round:>2}: upstream answered {}", response.status()),
            Err(err) => match err.downcast::<Error>() {
                Ok(refusal) => println!(
                    "call {round:>2}: refused ({}), retry after {:?}",
                    refusal.kind(),
                    refusal.retry_after().unwrap_or_default()
                ),
                Err(other) => return Err(other),
            },
        }
    }
    println!("upstream saw {} calls", hits.load(Ordering::SeqCst));
    println!(
        "health: {}",
        serde_json::to_string_pretty(&registry.health())?
    );
    assert_eq!(handle.state(), CircuitState::Closed);
    server.abort();
    Ok(())
}
