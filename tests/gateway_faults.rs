//! The chat_gateway against a failing upstream, over real sockets: wiremock for statuses,
//! a raw TCP upstream for what wiremock cannot do (a connection reset mid-body, a stream
//! cut after `message_start`, a stream that stalls, garbage SSE, a slow trickle). The
//! client sees the right status or a stream that ends with an SSE `error` event, and the
//! usage the meter saw is in the ledger exactly once.
#![allow(dead_code)]

include!("chat_gateway_support/modules.rs");

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use palisade::cost::Completion;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

use fixture::{FAST_RETRIES, Gateway, USER};
const UPSTREAM_KEY: &str = "sk-ant-upstream-secret-42";

/// The gateway in front of `upstream` (with a key of its own), retrying in milliseconds,
/// with `vars` on top.
async fn start(upstream: &str, vars: &[(&str, &str)]) -> Gateway {
    let base = fixture::with(
        FAST_RETRIES,
        &[
            ("ANTHROPIC_BASE_URL", upstream),
            ("ANTHROPIC_API_KEY", UPSTREAM_KEY),
        ],
    );
    fixture::start(&fixture::with(&base, vars)).await
}

/// An answer whose body may have failed midway.
struct Reply {
    status: u16,
    headers: http::HeaderMap,
    /// The body, or the error that ended it.
    body: Result<Bytes, String>,
}

impl Reply {
    fn text(&self) -> String {
        match &self.body {
            Ok(b) => String::from_utf8_lossy(b).into_owned(),
            Err(e) => panic!("the body failed: {e}"),
        }
    }
    fn json(&self) -> Value {
        serde_json::from_str(&self.text()).unwrap()
    }
}

impl Gateway {
    /// A small chat as alice, streamed or not, within 20 s.
    async fn alice_chat(&self, stream: bool) -> Reply {
        let body = json!({
            "model": "claude-sonnet-4-5",
            "max_tokens": 64,
            "stream": stream,
            "messages": [{"role": "user", "content": "Hello"}]
        });
        let req = http::Request::post(format!("http://{}/v1/messages", self.addr))
            .header("x-api-key", USER)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap();
        let client: Client<HttpConnector, Full<Bytes>> =
            Client::builder(TokioExecutor::new()).build_http();
        let res = tokio::time::timeout(Duration::from_secs(20), client.request(req))
            .await
            .expect("the gateway answers within 20 s")
            .expect("the gateway answers");
        let status = res.status().as_u16();
        let headers = res.headers().clone();
        let body = tokio::time::timeout(Duration::from_secs(20), res.into_body().collect())
            .await
            .expect("the body ends within 20 s")
            .map(|c| c.to_bytes())
            .map_err(|e| e.to_string());
        Reply {
            status,
            headers,
            body,
        }
    }

    async fn health(&self) -> u16 {
        let client: Client<HttpConnector, Full<Bytes>> =
            Client::builder(TokioExecutor::new()).build_http();
        let res = client
            .get(format!("http://{}/health", self.addr).parse().unwrap())
            .await
            .unwrap();
        res.status().as_u16()
    }

    /// Waits until the ledger holds `n` records, then a little longer to see that no more
    /// arrive; returns them.
    async fn exactly(&self, n: usize) -> Vec<store::LedgerEntry> {
        for _ in 0..1000 {
            if self.records().len() >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let records = self.records();
        assert_eq!(
            records.len(),
            n,
            "{:#?}",
            records.iter().map(|r| &r.record).collect::<Vec<_>>()
        );
        records
    }
}

/// One step of a raw upstream's answer.
#[derive(Clone)]
enum Step {
    Write(&'static str),
    WriteOwned(String),
    Wait(Duration),
    /// Keep the connection open and silent.
    Hold,
    /// Close with a TCP reset.
    Reset,
}

/// A raw HTTP/1.1 upstream: reads each request, then plays `steps`. Returns its base URL
/// and a count of requests.
async fn raw_upstream(steps: Vec<Step>) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let count = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&count);
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let steps = steps.clone();
            let seen = Arc::clone(&seen);
            tokio::spawn(async move {
                read_request(&mut sock).await;
                seen.fetch_add(1, Ordering::SeqCst);
                for step in steps {
                    match step {
                        Step::Write(s) => {
                            let _ = sock.write_all(s.as_bytes()).await;
                        }
                        Step::WriteOwned(s) => {
                            let _ = sock.write_all(s.as_bytes()).await;
                        }
                        Step::Wait(d) => tokio::time::sleep(d).await,
                        Step::Hold => {
                            tokio::time::sleep(Duration::from_secs(60)).await;
                            return;
                        }
                        Step::Reset => {
                            // Linger 0 makes the close a reset; the thread does not block.
                            #[allow(deprecated)]
                            let _ = sock.set_linger(Some(Duration::ZERO));
                            drop(sock);
                            return;
                        }
                    }
                }
            });
        }
    });
    (url, count)
}

async fn read_request(sock: &mut TcpStream) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let Ok(n) = sock.read(&mut chunk).await else {
            return;
        };
        if n == 0 {
            return;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                return;
            }
        }
    }
}

/// A chunk of a chunked body.
fn chunk(s: &str) -> String {
    format!("{:x}\r\n{s}\r\n", s.len())
}

const SSE_HEAD: &str =
    "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";

fn message_start() -> String {
    chunk(
        "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"claude-sonnet-4-5\",\"content\":[],\"usage\":{\"input_tokens\":1200,\"output_tokens\":1}}}\n\n",
    )
}

fn delta(text: &str) -> String {
    chunk(&format!(
        "event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{{\"type\":\"text_delta\",\"text\":\"{text}\"}}}}\n\n"
    ))
}

fn message_end(output: u64) -> String {
    chunk(&format!(
        "event: message_delta\ndata: {{\"type\":\"message_delta\",\"delta\":{{\"stop_reason\":\"end_turn\"}},\"usage\":{{\"output_tokens\":{output}}}}}\n\nevent: message_stop\ndata: {{\"type\":\"message_stop\"}}\n\n"
    )) + "0\r\n\r\n"
}

/// The last SSE event of `text` is an `error` event in Anthropic's shape.
fn ends_with_error_event(text: &str) {
    let last = text
        .trim_end()
        .rsplit("\n\n")
        .find(|e| !e.trim_start().starts_with(':'))
        .unwrap_or("");
    assert!(
        last.starts_with("event: error\ndata: "),
        "the stream does not end with an error event: {text:?}"
    );
    let data: Value =
        serde_json::from_str(last.trim_start_matches("event: error\ndata: ")).unwrap();
    assert_eq!(data["type"], "error");
    assert_eq!(data["error"]["type"], "api_error");
}

#[tokio::test]
async fn a_stream_cut_after_message_start_ends_with_an_error_event_and_records_partial_usage_once()
{
    let (url, calls) = raw_upstream(vec![
        Step::Write(SSE_HEAD),
        Step::WriteOwned(message_start()),
        Step::WriteOwned(delta("Hel")),
        Step::Wait(Duration::from_millis(20)),
        Step::Reset,
    ])
    .await;
    let gw = start(&url, &[]).await;
    let r = gw.alice_chat(true).await;
    assert_eq!(r.status, 200);
    let text = r.text();
    assert!(text.starts_with("event: message_start"), "{text}");
    assert!(text.contains("Hel"));
    ends_with_error_event(&text);
    let records = gw.exactly(1).await;
    assert_eq!(records[0].record.completion, Completion::Partial);
    assert_eq!(records[0].record.usage.input_tokens, 1200);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "a started stream is not retried"
    );
    assert_eq!(gw.health().await, 200);
}

#[tokio::test]
async fn a_stalled_stream_ends_at_the_idle_timeout_with_an_error_event_and_partial_usage() {
    let (url, _) = raw_upstream(vec![
        Step::Write(SSE_HEAD),
        Step::WriteOwned(message_start()),
        Step::Hold,
    ])
    .await;
    let gw = start(&url, &[("PALISADE_GATEWAY_STREAM_IDLE_TIMEOUT", "300ms")]).await;
    let started = std::time::Instant::now();
    let r = gw.alice_chat(true).await;
    assert_eq!(r.status, 200);
    ends_with_error_event(&r.text());
    assert!(started.elapsed() < Duration::from_secs(10));
    let records = gw.exactly(1).await;
    assert_eq!(records[0].record.completion, Completion::Partial);
    assert_eq!(records[0].record.usage.input_tokens, 1200);
}

#[tokio::test]
async fn a_slow_trickle_within_the_idle_timeout_is_delivered_whole_and_recorded_once() {
    let mut steps = vec![Step::Write(SSE_HEAD), Step::WriteOwned(message_start())];
    for i in 0..10 {
        steps.push(Step::Wait(Duration::from_millis(40)));
        steps.push(Step::WriteOwned(delta(&format!("w{i} "))));
    }
    steps.push(Step::WriteOwned(message_end(37)));
    let (url, _) = raw_upstream(steps).await;
    let gw = start(&url, &[("PALISADE_GATEWAY_STREAM_IDLE_TIMEOUT", "300ms")]).await;
    let r = gw.alice_chat(true).await;
    assert_eq!(r.status, 200);
    let text = r.text();
    assert!(text.contains("w9 "), "{text}");
    assert!(!text.contains("event: error"), "{text}");
    let records = gw.exactly(1).await;
    assert_eq!(records[0].record.completion, Completion::Complete);
    assert_eq!(records[0].record.usage.output_tokens, 37);
}

#[tokio::test]
async fn a_json_body_reset_midway_is_a_500_api_error_and_is_recorded_once_as_partial() {
    let (url, _) = raw_upstream(vec![
        Step::Write(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 400\r\n\r\n{\"id\":\"msg_1\",\"type\":\"message\",",
        ),
        Step::Wait(Duration::from_millis(20)),
        Step::Reset,
    ])
    .await;
    let gw = start(&url, &[]).await;
    let r = gw.alice_chat(false).await;
    // Never a connection closed without a word, never a short 200: an error response.
    assert_eq!(r.status, 500, "{:?}", r.body);
    assert_eq!(r.json()["error"]["type"], "api_error");
    let records = gw.exactly(1).await;
    assert_eq!(records[0].record.completion, Completion::Partial);
    assert_eq!(gw.health().await, 200);
}

#[tokio::test]
async fn garbage_sse_passes_through_and_bills_nothing() {
    let (url, _) = raw_upstream(vec![
        Step::Write(SSE_HEAD),
        Step::WriteOwned(chunk("data: {not json\n\n")),
        Step::WriteOwned(chunk("\u{1}\u{2}garbage without newlines")),
        Step::WriteOwned(chunk("\n\nevent: message_start\ndata: [1,2\n\n")),
        Step::Write("0\r\n\r\n"),
    ])
    .await;
    let gw = start(&url, &[]).await;
    let r = gw.alice_chat(true).await;
    assert_eq!(r.status, 200);
    assert!(r.text().contains("garbage"));
    // Nothing usable was seen: nothing is billed, and the gateway keeps serving.
    assert!(
        gw.records()
            .iter()
            .all(|e| e.record.usage.total_input_tokens() == 0 && e.record.usage.output_tokens == 0)
    );
    assert_eq!(gw.health().await, 200);
}

#[tokio::test]
async fn a_json_answer_without_usage_is_passed_on_and_recorded_once_with_no_tokens() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "id": "msg_1", "type": "message", "role": "assistant",
            "model": "claude-sonnet-4-5", "content": [{"type": "text", "text": "hi"}]
        })))
        .mount(&server)
        .await;
    let gw = start(&server.uri(), &[]).await;
    let r = gw.alice_chat(false).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["content"][0]["text"], "hi");
    let records = gw.exactly(1).await;
    assert_eq!(records[0].record.usage.input_tokens, 0);
    assert_eq!(records[0].record.usage.output_tokens, 0);
}

#[tokio::test]
async fn a_429_with_retry_after_reaches_the_client_with_its_retry_after() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(429)
                .insert_header("retry-after", "7")
                .set_body_json(json!({"type":"error","error":{"type":"rate_limit_error","message":"slow down"}})),
        )
        .mount(&server)
        .await;
    let gw = start(&server.uri(), &[("PALISADE_RETRY_MAX_RETRIES", "0")]).await;
    let r = gw.alice_chat(false).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.headers.get("retry-after").unwrap(), "7");
    assert_eq!(r.json()["error"]["type"], "rate_limit_error");
    // A refusal with no usage is not billed.
    assert!(
        gw.records()
            .iter()
            .all(|e| e.record.usage.input_tokens == 0)
    );
}

#[tokio::test]
async fn a_429_then_200_is_retried_after_the_upstreams_retry_after() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(429)
                .insert_header("retry-after", "0")
                .set_body_json(json!({"type":"error","error":{"type":"rate_limit_error","message":"slow down"}})),
        )
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
            "content": [{"type": "text", "text": "hi"}],
            "usage": {"input_tokens": 10, "output_tokens": 3}
        })))
        .with_priority(2)
        .mount(&server)
        .await;
    let gw = start(&server.uri(), &[("PALISADE_RETRY_MAX_RETRIES", "2")]).await;
    let r = gw.alice_chat(false).await;
    assert_eq!(r.status, 200);
    assert_eq!(server.received_requests().await.unwrap().len(), 2);
    let records = gw.exactly(1).await;
    assert_eq!(records[0].record.usage.input_tokens, 10);
}

#[tokio::test]
async fn connection_refused_is_a_json_error_then_the_breaker_opens_and_recovers() {
    // A port that nothing listens on (yet).
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = probe.local_addr().unwrap();
    drop(probe);
    let url = format!("http://{addr}");
    let gw = start(
        &url,
        &[
            ("PALISADE_RETRY_MAX_RETRIES", "0"),
            ("PALISADE_CIRCUIT_BREAKER_CONSECUTIVE_FAILURES", "2"),
            ("PALISADE_CIRCUIT_BREAKER_MINIMUM_CALLS", "2"),
            ("PALISADE_CIRCUIT_BREAKER_OPEN_DURATION", "300ms"),
        ],
    )
    .await;
    for _ in 0..2 {
        let r = gw.alice_chat(false).await;
        assert_eq!(r.status, 500, "{}", r.text());
        let body = r.json();
        assert_eq!(body["error"]["type"], "api_error");
        assert!(!r.text().contains(UPSTREAM_KEY));
    }
    let r = gw.alice_chat(false).await;
    assert_eq!(r.status, 529, "the breaker is open: {}", r.text());
    assert!(r.headers.get("retry-after").is_some());
    assert_eq!(gw.health().await, 503);
    // No usage was seen: nothing is billed (a failed call may be recorded, with no tokens).
    for e in gw.records() {
        assert_eq!(
            e.record.usage,
            palisade::cost::Usage::default(),
            "{:?}",
            e.record
        );
    }

    // The upstream comes back on the same address; after the open period a probe closes
    // the breaker.
    let listener = std::net::TcpListener::bind(addr).unwrap();
    let server = MockServer::builder().listener(listener).start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
            "content": [{"type": "text", "text": "hi"}],
            "usage": {"input_tokens": 10, "output_tokens": 3}
        })))
        .mount(&server)
        .await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let r = gw.alice_chat(false).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(gw.health().await, 200);
    // The recorder hands records to the ledger in batches, off the request path: wait for
    // the billed one, then a little longer to see that no second one arrives.
    let billed = || {
        gw.records()
            .into_iter()
            .filter(|e| e.record.usage.input_tokens > 0)
            .count()
    };
    for _ in 0..1000 {
        if billed() >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(billed(), 1, "the recovered call is recorded once");
}

#[tokio::test]
async fn an_error_event_inside_the_stream_reaches_the_client_and_is_recorded_once_as_upstream_error()
 {
    let (url, _) = raw_upstream(vec![
        Step::Write(SSE_HEAD),
        Step::WriteOwned(message_start()),
        Step::WriteOwned(chunk(
            "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n",
        )),
        Step::Write("0\r\n\r\n"),
    ])
    .await;
    let gw = start(&url, &[]).await;
    let r = gw.alice_chat(true).await;
    assert_eq!(r.status, 200);
    assert!(r.text().contains("overloaded_error"), "{}", r.text());
    let records = gw.exactly(1).await;
    assert_eq!(records[0].record.completion, Completion::UpstreamError);
    assert_eq!(
        records[0].record.upstream_error.as_deref(),
        Some("overloaded_error")
    );
    assert_eq!(records[0].record.usage.input_tokens, 1200);
}
