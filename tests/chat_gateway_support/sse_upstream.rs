// Streamed upstreams for the gateway tests: SSE events fed through a channel, served by
// axum on a free loopback port.
#![allow(dead_code)]

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

/// Serves `app` on a free port of 127.0.0.1; its base URL.
pub async fn serve(app: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

/// An upstream that answers every POST with an SSE stream lasting `events` × `gap`.
pub async fn slow_stream_upstream(events: usize, gap: Duration) -> String {
    let app = axum::Router::new().route(
        "/v1/messages",
        axum::routing::post(move || async move {
            let (tx, rx) = mpsc::channel::<Bytes>(4);
            tokio::spawn(async move {
                let _ = tx.send(message_start()).await;
                for i in 0..events {
                    tokio::time::sleep(gap).await;
                    let _ = tx.send(text_delta(&format!("part {i} "))).await;
                }
                for event in message_end() {
                    let _ = tx.send(event).await;
                }
            });
            answer(rx)
        }),
    );
    serve(app).await
}

/// The stream's first event: a `message_start` with 10 input tokens.
pub fn message_start() -> Bytes {
    sse(
        "message_start",
        r#"{"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant","model":"claude-sonnet-4-5","content":[],"usage":{"input_tokens":10,"output_tokens":1}}}"#,
    )
}

/// A `content_block_delta` carrying `text` (plain text: no quotes or backslashes).
pub fn text_delta(text: &str) -> Bytes {
    sse(
        "content_block_delta",
        &format!(
            r#"{{"type":"content_block_delta","index":0,"delta":{{"type":"text_delta","text":"{text}"}}}}"#
        ),
    )
}

/// The stream's last events: a `message_delta` with 7 output tokens, then `message_stop`.
pub fn message_end() -> [Bytes; 2] {
    [
        sse(
            "message_delta",
            r#"{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":7}}"#,
        ),
        sse("message_stop", r#"{"type":"message_stop"}"#),
    ]
}

/// An SSE answer whose body is what arrives on `rx`.
pub fn answer(rx: mpsc::Receiver<Bytes>) -> axum::response::Response {
    axum::response::Response::builder()
        .header("content-type", "text/event-stream")
        .body(axum::body::Body::new(Channel(rx)))
        .unwrap()
}

/// One SSE event.
pub fn sse(event: &str, data: &str) -> Bytes {
    Bytes::from(format!("event: {event}\ndata: {data}\n\n"))
}

/// A response body fed through a channel.
pub struct Channel(pub mpsc::Receiver<Bytes>);

impl http_body::Body for Channel {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|c| Ok(http_body::Frame::data(c))))
    }
}
