//! Clients that read an answer slowly, against the gateway's server loop over real sockets
//! on 127.0.0.1: one that stops reading mid-stream is closed once
//! `PALISADE_GATEWAY_WRITE_TIMEOUT` passes with nothing written, and its usage is recorded
//! once, as partial (over HTTP/1.1, and over HTTP/2 with its window closed); one that
//! reads slowly but steadily gets the whole stream. The HTTP/1.1 client sets a tiny
//! receive buffer so that the server's writes wait on it. Tokio's paused clock
//! makes the waits instant.
#![allow(dead_code)]

include!("chat_gateway_support/modules.rs");

use std::time::Duration;

use bytes::Bytes;
use palisade::cost::Completion;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

use fixture::{Gateway, NO_RETRIES, USER};

/// Events in the upstream's stream, and the text of each: about 1.5 MB in all, more
/// than the sockets between the gateway and the client hold.
const EVENTS: usize = 1_500;
const EVENT_TEXT: usize = 1000;

/// An upstream that answers every POST at once with a stream of `EVENTS` deltas.
async fn big_stream_upstream() -> String {
    let app = axum::Router::new().route(
        "/v1/messages",
        axum::routing::post(|| async {
            let (tx, rx) = mpsc::channel::<Bytes>(16);
            tokio::spawn(async move {
                let _ = tx.send(sse_upstream::message_start()).await;
                let text = "x".repeat(EVENT_TEXT);
                for i in 0..EVENTS {
                    let delta = sse_upstream::text_delta(&format!("{i:05}{text}"));
                    if tx.send(delta).await.is_err() {
                        return;
                    }
                }
                for event in sse_upstream::message_end() {
                    let _ = tx.send(event).await;
                }
            });
            sse_upstream::answer(rx)
        }),
    );
    sse_upstream::serve(app).await
}

/// The gateway on its own server loop, in front of the big stream, write timeout 30 s.
async fn start() -> Gateway {
    let upstream = big_stream_upstream().await;
    let vars = fixture::with(
        NO_RETRIES,
        &[
            ("ANTHROPIC_BASE_URL", upstream.as_str()),
            ("ANTHROPIC_API_KEY", "sk-ant-upstream-test"),
            ("PALISADE_GATEWAY_WRITE_TIMEOUT", "30s"),
        ],
    );
    let config = fixture::config(&vars);
    assert_eq!(config.write_timeout, Duration::from_secs(30));
    fixture::serve_own(config).await
}

/// A connection with a tiny receive buffer that has sent a streamed chat request.
async fn stream_request(gw: &Gateway) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 * 1024).unwrap();
    let mut tcp = socket.connect(gw.addr).await.unwrap();
    let mut body = fixture::chat("claude-sonnet-4-5");
    body["stream"] = serde_json::Value::Bool(true);
    let body = serde_json::to_vec(&body).unwrap();
    let head = format!(
        "POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nx-api-key: {USER}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    tcp.write_all(&body).await.unwrap();
    tcp
}

/// Reads `n` bytes at most (fewer at the end of the stream); `None` at its end.
async fn read_some(tcp: &mut TcpStream, n: usize) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; n];
    match tcp.read(&mut buf).await {
        Ok(0) | Err(_) => None,
        Ok(k) => {
            buf.truncate(k);
            Some(buf)
        }
    }
}

/// The client reads the head and the first bytes, then nothing: before the write timeout
/// existed, the connection, its task and its upstream stream were held forever.
#[tokio::test(start_paused = true)]
async fn a_client_that_stops_reading_mid_stream_is_closed_after_the_write_timeout_and_its_usage_is_recorded_once_as_partial()
 {
    let gw = start().await;
    let mut tcp = stream_request(&gw).await;
    let first = read_some(&mut tcp, 1024).await.expect("an answer");
    assert!(
        first.starts_with(b"HTTP/1.1 200 "),
        "{}",
        String::from_utf8_lossy(&first)
    );
    // The client stops reading. Within the write timeout the stream is still held.
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert!(gw.records().is_empty(), "{:?}", gw.records());
    // After it, the connection is closed and the stream's usage is written.
    tokio::time::sleep(Duration::from_secs(15)).await;
    let records = gw.usage_records(1).await;
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0].record.completion, Completion::Partial);
    assert_eq!(records[0].record.usage.input_tokens, 10);
    // What the sockets held is all the client gets: the stream ends without its last event.
    let start = Instant::now();
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(chunk) = read_some(&mut tcp, 65536).await {
            rest.extend_from_slice(&chunk);
        }
    })
    .await;
    assert!(ended.is_ok(), "the connection is closed");
    assert!(start.elapsed() < Duration::from_secs(1));
    assert!(
        rest.len() < EVENTS * EVENT_TEXT / 2,
        "only what was in flight: {} bytes",
        rest.len()
    );
    assert!(!String::from_utf8_lossy(&rest).contains("event: message_stop"));
    // Recorded once, never again.
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(gw.records().len(), 1);
}

/// The client reads 16 KiB at most every 2 s: the server's writes wait on it all the time, but
/// never for the write timeout, so the stream (minutes long here) is not cut.
#[tokio::test(start_paused = true)]
async fn a_client_that_reads_slowly_but_steadily_gets_the_whole_stream() {
    let gw = start().await;
    let mut tcp = stream_request(&gw).await;
    let start = Instant::now();
    let mut all = Vec::new();
    while let Some(chunk) = read_some(&mut tcp, 16 * 1024).await {
        all.extend_from_slice(&chunk);
        if all.windows(20).any(|w| w == b"event: message_stop") {
            break;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let text = String::from_utf8_lossy(&all);
    assert!(
        text.contains("event: message_stop"),
        "{} bytes after {:?}, ending {}",
        all.len(),
        start.elapsed(),
        &text[text.len().saturating_sub(300)..]
    );
    assert!(text.contains(&format!("{:05}", EVENTS - 1)));
    assert!(
        start.elapsed() > Duration::from_secs(60),
        "the reads took {:?}",
        start.elapsed()
    );
    let records = gw.usage_records(1).await;
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].record.completion, Completion::Complete);
    assert_eq!(records[0].record.usage.output_tokens, 7);
}

#[test]
fn a_zero_or_malformed_write_timeout_is_reported() {
    for bad in ["0s", "soon"] {
        let mut env = palisade::config::Env::from_pairs([("PALISADE_GATEWAY_WRITE_TIMEOUT", bad)]);
        let _ = config::GatewayConfig::from_env(&mut env);
        let err = env.finish().unwrap_err();
        assert!(
            err.problems()
                .iter()
                .any(|p| p.name == "PALISADE_GATEWAY_WRITE_TIMEOUT"),
            "{bad}: {err}"
        );
    }
}

/// Over HTTP/2 the client reads the head, then lets its flow-control window close: the
/// stream waits for the write timeout, and the connection is closed, its usage recorded
/// once, as partial.
#[tokio::test(start_paused = true)]
async fn an_http2_client_whose_window_stays_closed_is_closed_after_the_write_timeout() {
    let gw = start().await;
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    // The smallest windows HTTP/2 starts with (hyper's client asks for megabytes).
    let (mut sender, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .initial_stream_window_size(65_535)
            .initial_connection_window_size(65_535)
            .handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    let mut body = fixture::chat("claude-sonnet-4-5");
    body["stream"] = serde_json::Value::Bool(true);
    let req = http::Request::post(format!("http://{}/v1/messages", gw.addr))
        .header("x-api-key", USER)
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(Bytes::from(
            serde_json::to_vec(&body).unwrap(),
        )))
        .unwrap();
    let res = sender.send_request(req).await.unwrap();
    assert_eq!(res.status(), 200);
    // The body is never read: no window update, the window closes after 64 KiB.
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert!(gw.records().is_empty(), "{:?}", gw.records());
    tokio::time::sleep(Duration::from_secs(15)).await;
    let records = gw.usage_records(1).await;
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0].record.completion, Completion::Partial);
    let ended = tokio::time::timeout(Duration::from_secs(5), conn).await;
    assert!(ended.is_ok(), "the connection is closed");
    drop(res);
}
