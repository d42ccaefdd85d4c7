//! The retry layer in front of a hyper-util client, against a local upstream that is
//! overloaded for its first two calls. Runs offline and exits by itself:
//!
//! ```text
//! cargo run --example retry
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use axum::routing::post;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use palisade::retry::{ReplayBody, RetryCount, RetryLayer};
use tower::{Layer, ServiceExt};

#[tokio::main]
async fn main() -> Result<(), palisade::BoxError> {
    // A stand-in for an LLM API: 529 "overloaded" twice, then an answer.
    let calls = Arc::new(AtomicU32::new(0));
    let app = Router::new().route(
        "/v1/messages",
        post({
            let calls = calls.clone();
            move |body: Bytes| async move {
                let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                println!("upstream: call {n} with {} body bytes", body.len());
                if n <= 2 {
                    (
                        StatusCode::from_u16(529).unwrap(),
                        [("retry-after-ms", "50")],
                        r#"{"type":"error","error":{"type":"overloaded_error"}}"#,
                    )
                } else {
                    (
                        StatusCode::OK,
                        [("x-request-id", "req_01")],
                        r#"{"id":"msg_01"}"#,
                    )
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });

    // The client side: a hyper-util client wrapped in the retry layer.
    let client = Client::builder(TokioExecutor::new()).build_http::<ReplayBody<Full<Bytes>>>();
    let layer = RetryLayer::builder()
        .max_retries(3)
        .base_delay(Duration::from_millis(100))
        .max_delay(Duration::from_secs(2))
        .deadline(Duration::from_secs(10))
        .count_header("x-retry-count")
        .build()?;
    let upstream = layer.layer(client);
    // The same layer from the environment, in one line: PALISADE_RETRY_* (every mistake
    // listed at once; unset variables keep their defaults).
    let from_env = RetryLayer::from_env()?;
    println!(
        "retries from the environment: up to {}",
        from_env.max_retries()
    );

    let request = http::Request::post(format!("http://{addr}/v1/messages"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(
            br#"{"model":"claude-sonnet-4-5","max_tokens":64,"messages":[]}"#,
        )))?;
    let response = upstream.oneshot(request).await?;
    let status = response.status();
    let retries = RetryCount::of(&response);
    let body = response.into_body().collect().await?.to_bytes();
    println!(
        "client: {status} after {retries} retries: {}",
        String::from_utf8_lossy(&body)
    );
    assert_eq!(status, 200);
    assert_eq!(retries, 2);
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    Ok(())
}
