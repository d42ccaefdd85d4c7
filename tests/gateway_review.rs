//! Attacks on the gateway's middlewares, its connection handling and its health counts,
//! over real sockets on 127.0.0.1: what a client controls (the method, the path, when it
//! hangs up) must not grow the gateway's state or lose a line.
#![allow(dead_code)]

include!("chat_gateway_support/modules.rs");

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::Method;
use http_body_util::Full;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use fixture::{FAST_RETRIES, Gateway, USER};
use sse_upstream::slow_stream_upstream;

/// The gateway on the built-in mock, retrying in milliseconds, with `vars` on top.
async fn start(vars: &[(&str, &str)]) -> Gateway {
    fixture::start(&fixture::with(FAST_RETRIES, vars)).await
}

/// The `method` label values of `palisade_gateway_requests_total` in `/metrics`.
async fn method_labels(gw: &Gateway) -> BTreeSet<String> {
    let r = gw.call(Method::GET, "/metrics", None, None, &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    r.text()
        .lines()
        .filter(|l| l.starts_with("palisade_gateway_requests_total{"))
        .filter_map(|l| {
            let at = l.find("method=\"")? + "method=\"".len();
            let len = l[at..].find('"')?;
            Some(l[at..at + len].to_owned())
        })
        .collect()
}

/// Methods are the client's to choose (any token): each distinct one was a new series in
/// `/metrics` and a label kept for the life of the process, so a client could grow the
/// registry without bound. Methods outside the standard ones are counted as `other`.
#[tokio::test]
async fn methods_a_client_makes_up_do_not_add_metric_series() {
    let gw = start(&[]).await;
    for i in 0..40 {
        for path in ["/v1/messages", "/no/such/route"] {
            let method = Method::from_bytes(format!("MADEUP{i}").as_bytes()).unwrap();
            let req = http::Request::builder()
                .method(method)
                .uri(format!("http://{}{path}", gw.addr))
                .header("x-api-key", USER)
                .body(Full::new(Bytes::new()))
                .unwrap();
            let r = gw.send(req).await;
            assert!(
                r.status.is_client_error(),
                "{path}: {} {}",
                r.status,
                r.text()
            );
        }
    }
    let standard = [
        "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE",
    ];
    let labels = method_labels(&gw).await;
    let made_up: Vec<_> = labels
        .iter()
        .filter(|m| !standard.contains(&m.as_str()) && *m != "other")
        .collect();
    assert!(made_up.is_empty(), "series per made-up method: {made_up:?}");
    assert!(labels.contains("other"), "{labels:?}");
}

/// Everything the tests' tracing subscriber writes (JSON lines).
fn captured() -> &'static Arc<Mutex<Vec<u8>>> {
    fixture::captured_logs("chat_gateway=info")
}

/// The request lines (their fields) logged for `route` so far.
fn request_lines(route: &str) -> Vec<serde_json::Value> {
    let text = String::from_utf8_lossy(&captured().lock().unwrap()).into_owned();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["target"] == "chat_gateway::request" && l["fields"]["route"] == route)
        .map(|l| l["fields"].clone())
        .collect()
}

/// A raw HTTP/1.1 `POST path` with `body` as JSON, sent on a fresh connection.
async fn raw_post(gw: &Gateway, path: &str, body: &serde_json::Value) -> TcpStream {
    let body = serde_json::to_vec(body).unwrap();
    let mut tcp = TcpStream::connect(gw.addr).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nx-api-key: {USER}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    tcp.write_all(&body).await.unwrap();
    tcp
}

/// A client that hangs up while the upstream is still thinking (before any answer) paid
/// for nothing it saw, but the request happened: it has its request line, not complete,
/// as one whose stream was cut has.
#[tokio::test(start_paused = true)]
async fn a_request_whose_client_hangs_up_before_the_answer_still_has_its_line() {
    captured();
    let gw = start(&[("PALISADE_GATEWAY_MOCK_SLOW_DELAY", "100s")]).await;
    let tcp = raw_post(&gw, "/v1/messages", &fixture::chat("mock-slow")).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    drop(tcp);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let lines = request_lines("/v1/messages");
    // Only a hang-up before the answer makes a 499 (the other tests here log as well).
    let lines: Vec<_> = lines.iter().filter(|l| l["status"] == 499).collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["method"], "POST", "{:?}", lines[0]);
    assert_eq!(lines[0]["complete"], false, "{:?}", lines[0]);
}

/// An upstream that answers every POST with the start of an SSE stream and then nothing
/// (it never ends).
async fn endless_stream_upstream() -> String {
    let app = axum::Router::new().route(
        "/v1/messages",
        axum::routing::post(|| async {
            let (tx, rx) = mpsc::channel::<Bytes>(4);
            tokio::spawn(async move {
                let _ = tx.send(sse_upstream::message_start()).await;
                tx.closed().await;
            });
            sse_upstream::answer(rx)
        }),
    );
    sse_upstream::serve(app).await
}

/// A client that hangs up in the middle of a stream: its line is written, with the
/// caller, the status and `complete: false`.
#[tokio::test(start_paused = true)]
async fn a_stream_cut_by_the_client_is_logged_as_incomplete() {
    captured();
    let upstream = endless_stream_upstream().await;
    let gw = start(&[
        ("ANTHROPIC_BASE_URL", upstream.as_str()),
        ("ANTHROPIC_API_KEY", "sk-ant-upstream-test"),
        ("PALISADE_RETRY_MAX_RETRIES", "0"),
    ])
    .await;
    let mut body = fixture::chat("claude-sonnet-4-5");
    body["stream"] = serde_json::Value::Bool(true);
    let mut tcp = raw_post(&gw, "/v1/messages", &body).await;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("message_start") {
        let n = tcp.read(&mut buf).await.unwrap();
        assert!(n > 0, "{}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    assert!(
        seen.starts_with(b"HTTP/1.1 200 "),
        "{}",
        String::from_utf8_lossy(&seen)
    );
    drop(tcp);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let lines = request_lines("/v1/messages");
    let cut: Vec<_> = lines
        .iter()
        .filter(|l| l["status"] == 200 && l["complete"] == false)
        .collect();
    assert_eq!(cut.len(), 1, "{lines:?}");
    assert_eq!(cut[0]["user"], "alice", "{:?}", cut[0]);
}

/// The configuration of a gateway in front of `upstream`, idle timeout 30 s.
fn own_config(upstream: &str) -> config::GatewayConfig {
    fixture::config(&[
        ("ANTHROPIC_BASE_URL", upstream),
        ("ANTHROPIC_API_KEY", "sk-ant-upstream-test"),
        ("PALISADE_RETRY_MAX_RETRIES", "0"),
        ("PALISADE_GATEWAY_IDLE_TIMEOUT", "30s"),
    ])
}

/// A streamed chat request as alice.
fn stream_request(gw: &Gateway) -> http::Request<Full<Bytes>> {
    let mut body = fixture::chat("claude-sonnet-4-5");
    body["stream"] = serde_json::Value::Bool(true);
    http::Request::builder()
        .method(Method::POST)
        .uri(format!("http://{}/v1/messages", gw.addr))
        .header("x-api-key", USER)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(&body).unwrap())))
        .unwrap()
}

fn assert_whole_stream(text: &str, events: usize) {
    for i in 0..events {
        assert!(text.contains(&format!("part {i} ")), "{text}");
    }
    assert!(text.contains("event: message_stop"), "{text}");
}

/// HTTP/2 (prior knowledge): a 100 s stream and, on the same connection, short requests
/// that begin and end while it runs: the idle timeout (30 s) neither cuts the stream nor
/// closes the connection under the others.
#[tokio::test(start_paused = true)]
async fn http2_streams_ending_beside_a_long_one_do_not_make_the_connection_idle() {
    use http_body_util::BodyExt;
    let upstream = slow_stream_upstream(5, Duration::from_secs(20)).await;
    let gw = fixture::serve_own(own_config(&upstream)).await;
    let h2: hyper_util::client::legacy::Client<_, Full<Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .build_http();
    let start = tokio::time::Instant::now();
    let long = tokio::spawn({
        let req = stream_request(&gw);
        let h2 = h2.clone();
        async move {
            let res = h2.request(req).await.expect("stream answered");
            assert_eq!(res.status(), 200);
            let body = res.into_body().collect().await.expect("stream whole");
            String::from_utf8_lossy(&body.to_bytes()).into_owned()
        }
    });
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_secs(25)).await;
        let req = http::Request::builder()
            .uri(format!("http://{}/health", gw.addr))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let res = h2.request(req).await.expect("answered beside the stream");
        assert_eq!(res.version(), http::Version::HTTP_2);
        assert_eq!(res.status(), 200);
        res.into_body().collect().await.unwrap();
    }
    let text = long.await.unwrap();
    assert!(
        start.elapsed() >= Duration::from_secs(100),
        "{:?}",
        start.elapsed()
    );
    assert_whole_stream(&text, 5);
}

/// Shutdown of the whole server while a stream is in flight over HTTP/1.1 (`h2` false) or
/// HTTP/2: the stream is delivered whole, then the server ends.
async fn shutdown_with_a_stream_in_flight(h2: bool) {
    use http_body_util::BodyExt;
    let upstream = slow_stream_upstream(3, Duration::from_secs(1)).await;
    let (gw, server) = fixture::serve_own_stoppable(own_config(&upstream)).await;
    let client: hyper_util::client::legacy::Client<_, Full<Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(h2)
            .build_http();
    let res = client.request(stream_request(&gw)).await.unwrap();
    assert_eq!(res.status(), 200);
    let body = tokio::spawn(async move {
        let body = res.into_body().collect().await.expect("stream whole");
        String::from_utf8_lossy(&body.to_bytes()).into_owned()
    });
    let start = tokio::time::Instant::now();
    server.shutdown().await;
    assert!(
        start.elapsed() >= Duration::from_secs(3),
        "h2 {h2}: {:?}",
        start.elapsed()
    );
    assert_whole_stream(&body.await.unwrap(), 3);
}

#[tokio::test(start_paused = true)]
async fn shutdown_lets_an_http1_stream_in_flight_finish_then_ends() {
    shutdown_with_a_stream_in_flight(false).await;
}

#[tokio::test(start_paused = true)]
async fn shutdown_lets_an_http2_stream_in_flight_finish_then_ends() {
    shutdown_with_a_stream_in_flight(true).await;
}

/// `/health`'s audit counts read while events find the queue full: an event refused by the
/// full queue was counted as queued for a moment (added, then taken back), so a reading
/// then showed more events queued than the queue holds and more recorded than were.
#[cfg(feature = "postgres")]
#[tokio::test]
async fn audit_counts_read_during_queue_full_drops_never_count_a_dropped_event_as_queued() {
    use palisade::cost::sink::{PostgresConfig, PostgresSink};
    use std::sync::atomic::{AtomicBool, Ordering};
    // Never reached: the writer does not run while this test records (it never awaits).
    let sink = PostgresSink::connect(PostgresConfig::new("postgres://127.0.0.1:1/none")).unwrap();
    let audit = audit::Audit::postgres_with_capacity(sink, 4);
    let event = || audit::AuditEntry::new("auth_failed", "refused");
    for _ in 0..4 {
        audit.record(event());
    }
    // The refusals' error lines are not what this test reads: not written, they cost nothing.
    let _quiet = tracing::subscriber::set_default(tracing::subscriber::NoSubscriber::default());
    let done = AtomicBool::new(false);
    let worst = std::thread::scope(|s| {
        let reader = s.spawn(|| {
            let mut worst = audit.health().unwrap();
            while !done.load(Ordering::Acquire) {
                let h = audit.health().unwrap();
                if h.queued > worst.queued {
                    worst = h;
                }
            }
            worst
        });
        for _ in 0..200_000 {
            audit.record(event());
        }
        done.store(true, Ordering::Release);
        reader.join().unwrap()
    });
    assert_eq!((worst.queued, worst.backlog), (4, 4), "{worst:?}");
    let h = audit.health().unwrap();
    assert_eq!((h.queued, h.queue_full), (4, 200_000), "{h:?}");
}

/// Shutdown does not wait for a connection whose first request head is still arriving
/// (plain HTTP/1.1 bytes that tell the protocol, then nothing; an HTTP/2 preface and
/// settings without a request): no request has begun there, so there is nothing to
/// finish, as for a connection that sent nothing at all.
#[tokio::test(start_paused = true)]
async fn shutdown_does_not_wait_for_a_first_request_head_still_arriving() {
    let partial: [&[u8]; 2] = [
        b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00",
    ];
    for bytes in partial {
        let (gw, server) = fixture::serve_own_stoppable(fixture::config(&[])).await;
        let mut tcp = TcpStream::connect(gw.addr).await.unwrap();
        tcp.write_all(bytes).await.unwrap();
        // Let the server read what was sent.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let start = tokio::time::Instant::now();
        server.shutdown().await;
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "{:?}: {:?}",
            String::from_utf8_lossy(bytes),
            start.elapsed()
        );
    }
}

/// An upstream that answers every POST with its own 429, `x-should-retry: false`
/// (Anthropic's header on its answers).
async fn upstream_refusing_with_429() -> String {
    let app = axum::Router::new().route(
        "/v1/messages",
        axum::routing::post(|| async {
            axum::response::Response::builder()
                .status(429)
                .header("content-type", "application/json")
                .header("x-should-retry", "false")
                .body(axum::body::Body::from(
                    r#"{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}"#,
                ))
                .unwrap()
        }),
    );
    sse_upstream::serve(app).await
}

/// The upstream's own 429 with `x-should-retry: false` is not a refusal by the gateway's
/// budgets: no `budget_refused` audit event names the caller, and `/metrics` does not
/// count a `budget_exceeded` refusal (only the budget layer's own 429s are those).
#[tokio::test]
async fn an_upstream_429_that_says_do_not_retry_is_not_audited_as_a_budget_refusal() {
    captured();
    let upstream = upstream_refusing_with_429().await;
    let gw = start(&[
        ("ANTHROPIC_BASE_URL", upstream.as_str()),
        ("ANTHROPIC_API_KEY", "sk-ant-upstream-test"),
        ("PALISADE_RETRY_MAX_RETRIES", "0"),
    ])
    .await;
    let r = gw.chat(USER, "claude-sonnet-4-5").await;
    assert_eq!(r.status, 429, "{}", r.text());
    let id = r.expect_header("x-request-id").to_owned();
    let text = String::from_utf8_lossy(&captured().lock().unwrap()).into_owned();
    let audited: Vec<_> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["target"] == "chat_gateway::audit" && l["fields"]["request_id"] == id)
        .collect();
    assert!(audited.is_empty(), "{audited:?}");
    let m = gw
        .call(Method::GET, "/metrics", None, None, &[])
        .await
        .text();
    assert!(
        !m.contains(r#"palisade_gateway_refusals_total{reason="budget_exceeded"}"#),
        "{m}"
    );
}
