//! An axum handler that proxies to an upstream through retry and a circuit breaker over a
//! hyper-util client, with no boxing: the stack is a plain `Clone` value in the router's
//! state, called with `oneshot`. Runs offline (a local upstream on 127.0.0.1 that is
//! overloaded once, then answers) and exits by itself:
//!
//! ```text
//! cargo run --example axum_proxy
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use palisade::circuit_breaker::{CircuitBreaker, CircuitBreakerLayer};
use palisade::retry::{ReplayBody, Retry, RetryCount, RetryLayer};
use palisade::{BoxError, ErrorFormat};
use tower::ServiceBuilder;
use tower::ServiceExt;

/// The client stack as the handler sees it: retry, then the breaker, then the pooled
/// client. Both layers answer with `BoxError`: the client's own errors, boxed, or a
/// `palisade::Error` (an open breaker, a timeout).
type Upstream = Retry<CircuitBreaker<Client<HttpConnector, ReplayBody<Body>>>>;

#[derive(Clone)]
struct Proxy {
    upstream: Upstream,
    base: Arc<str>,
}

/// Forwards the request to the upstream, path and query kept, and hands the answer back.
async fn proxy(State(proxy): State<Proxy>, request: Request) -> Response {
    let (mut parts, body) = request.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    parts.uri = match format!("{}{path}", proxy.base).parse::<Uri>() {
        Ok(uri) => uri,
        Err(_) => return StatusCode::BAD_REQUEST.into_response(),
    };
    match proxy
        .upstream
        .oneshot(Request::from_parts(parts, body))
        .await
    {
        Ok(response) => {
            let retries = RetryCount::of(&response);
            let (mut parts, body) = response.into_parts();
            parts.headers.insert("x-proxy-retries", retries.into());
            Response::from_parts(parts, Body::new(body))
        }
        Err(err) => match err.downcast::<palisade::Error>() {
            // A refusal by the open breaker (or a timeout), rendered as JSON.
            Ok(err) => err.to_response(ErrorFormat::Anthropic).map(Body::new),
            Err(_) => StatusCode::BAD_GATEWAY.into_response(),
        },
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    // A stand-in for an LLM API: 529 "overloaded" once, then an answer.
    let calls = Arc::new(AtomicU32::new(0));
    let upstream_app = Router::new().route(
        "/v1/messages",
        post({
            let calls = calls.clone();
            move |body: axum::body::Bytes| async move {
                let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                println!("upstream: call {n} with {} body bytes", body.len());
                if n == 1 {
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
    let upstream_addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, upstream_app).await });

    // The client stack: no `BoxCloneService`, no boxing of the futures.
    let client = Client::builder(TokioExecutor::new()).build_http::<ReplayBody<Body>>();
    let upstream: Upstream = ServiceBuilder::new()
        .layer(
            RetryLayer::builder()
                .max_retries(2)
                .base_delay(Duration::from_millis(100))
                .deadline(Duration::from_secs(30))
                .build()?,
        )
        .layer(CircuitBreakerLayer::builder().name("upstream").build()?)
        .service(client);
    let app = Router::new()
        .route("/v1/messages", post(proxy))
        .with_state(Proxy {
            upstream,
            base: format!("http://{upstream_addr}").into(),
        });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let gateway_addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });

    // One request through the gateway.
    let caller = Client::builder(TokioExecutor::new()).build_http::<String>();
    let request = http::Request::post(format!("http://{gateway_addr}/v1/messages"))
        .header("content-type", "application/json")
        .body(r#"{"model":"claude-sonnet-4-6","max_tokens":16}"#.to_owned())?;
    let response = caller.request(request).await?;
    let status = response.status();
    let retries = response.headers()["x-proxy-retries"].to_str()?.to_owned();
    let body = response.into_body().collect().await?.to_bytes();
    println!(
        "gateway: {status} after {retries} retry, body {}",
        String::from_utf8_lossy(&body)
    );
    assert_eq!(status, StatusCode::OK);
    assert_eq!(retries, "1");
    Ok(())
}
