//! A mock upstream that answers like the Anthropic Messages API, so the gateway runs offline.
//!
//! - JSON and SSE (`"stream": true`) answers with realistic usage, cache tokens included,
//!   and Anthropic's headers (`request-id`, `anthropic-ratelimit-*`).
//! - Faults on request: the models `mock-overloaded` (529), `mock-error` (500) and
//!   `mock-slow` (answers after a delay); or the header `x-mock-fault` with `overloaded`,
//!   `error` or `slow`, for clients that call the mock directly.
//! - The orchestrator's bot-draft request (a system prompt holding `BOT_DRAFT_JSON`) gets
//!   a JSON bot draft derived from the description, or malformed text when the description
//!   says `malformed`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};

/// The marker the orchestrator's system prompt holds.
pub const BOT_DRAFT_MARKER: &str = "BOT_DRAFT_JSON";

#[derive(Clone)]
struct MockState {
    slow: Duration,
    counter: std::sync::Arc<AtomicU64>,
}

/// Starts the mock on a free loopback port; returns its address.
pub async fn spawn(slow: Duration) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
    let addr = listener.local_addr()?;
    let app = router(slow);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "mock upstream stopped");
        }
    });
    Ok(addr)
}

/// The mock's routes.
pub fn router(slow: Duration) -> Router {
    Router::new()
        .route("/v1/messages", post(messages))
        .with_state(MockState {
            slow,
            counter: Default::default(),
        })
}

fn anthropic_error(status: StatusCode, kind: &str, message: &str) -> Response {
    let body = json!({"type": "error", "error": {"type": kind, "message": message}});
    let mut res = (status, axum::Json(body)).into_response();
    res.headers_mut()
        .insert("request-id", HeaderValue::from_static("req_mock_error"));
    res
}

async fn messages(State(state): State<MockState>, headers: HeaderMap, body: Bytes) -> Response {
    let n = state.counter.fetch_add(1, Ordering::Relaxed);
    let Ok(req) = serde_json::from_slice::<Value>(&body) else {
        return anthropic_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "body is not JSON",
        );
    };
    let model = req["model"]
        .as_str()
        .unwrap_or("claude-sonnet-4-5")
        .to_owned();
    let fault = headers
        .get("x-mock-fault")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| model.strip_prefix("mock-").map(str::to_owned));
    match fault.as_deref() {
        Some("overloaded") => {
            let mut res = anthropic_error(
                StatusCode::from_u16(529).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
                "overloaded_error",
                "Overloaded",
            );
            res.headers_mut()
                .insert("x-should-retry", HeaderValue::from_static("true"));
            return res;
        }
        Some("error") => {
            return anthropic_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "api_error",
                "Internal server error",
            );
        }
        Some("slow") => tokio::time::sleep(state.slow).await,
        _ => {}
    }

    let text = reply_text(&req);
    // About four bytes a token, as a rough tokenizer would say.
    let input_tokens = (body.len() as u64 / 4).max(1);
    let (cache_write, cache_read) = if req.get("system").is_some() {
        (
            if n % 4 == 0 { 1_024 } else { 0 },
            if n % 4 == 0 { 0 } else { 1_024 },
        )
    } else {
        (0, 0)
    };
    let output_tokens = (text.len() as u64 / 4).max(1);
    let id = format!("msg_mock_{n:016x}");
    let stream = req["stream"].as_bool().unwrap_or(false);
    let mut res = if stream {
        sse(
            &id,
            &model,
            &text,
            input_tokens,
            cache_write,
            cache_read,
            output_tokens,
        )
    } else {
        let body = json!({
            "id": id, "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": text}],
            "stop_reason": "end_turn", "stop_sequence": null,
            "usage": {
                "input_tokens": input_tokens,
                "cache_creation_input_tokens": cache_write,
                "cache_read_input_tokens": cache_read,
                "output_tokens": output_tokens,
            }
        });
        axum::Json(body).into_response()
    };
    let h = res.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&format!("req_mock_{n:016x}")) {
        h.insert("request-id", v);
    }
    h.insert(
        "anthropic-ratelimit-requests-limit",
        HeaderValue::from_static("4000"),
    );
    h.insert(
        "anthropic-ratelimit-requests-remaining",
        HeaderValue::from_static("3999"),
    );
    h.insert(
        "anthropic-ratelimit-tokens-limit",
        HeaderValue::from_static("2000000"),
    );
    res
}

fn reply_text(req: &Value) -> String {
    let system = match &req["system"] {
        Value::String(s) => s.clone(),
        Value::Array(blocks) => blocks.iter().filter_map(|b| b["text"].as_str()).collect(),
        _ => String::new(),
    };
    let last = last_user_text(req);
    if system.contains(BOT_DRAFT_MARKER) {
        if last.contains("malformed") {
            return "Sure! Here is a bot: name=Helper (no JSON, sorry)".into();
        }
        let name: String = last
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ");
        let name = if name.is_empty() {
            "Assistant".to_owned()
        } else {
            name
        };
        return json!({
            "name": name,
            "model": "claude-haiku-4-5",
            "system_prompt": format!("You are a helpful bot. Your job: {last}"),
            "max_tokens": 1024,
            "temperature": 0.7
        })
        .to_string();
    }
    format!(
        "This is the mock upstream of palisade's chat gateway. You said: {}",
        last.chars().take(200).collect::<String>()
    )
}

fn last_user_text(req: &Value) -> String {
    let Some(messages) = req["messages"].as_array() else {
        return String::new();
    };
    let Some(last) = messages.iter().rev().find(|m| m["role"] == "user") else {
        return String::new();
    };
    match &last["content"] {
        Value::String(s) => s.clone(),
        Value::Array(blocks) => blocks
            .iter()
            .filter_map(|b| b["text"].as_str())
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

fn sse(
    id: &str,
    model: &str,
    text: &str,
    input: u64,
    cache_write: u64,
    cache_read: u64,
    output: u64,
) -> Response {
    let mut events = Vec::new();
    let mut push = |event: &str, data: Value| {
        events.push(Ok::<_, Infallible>(Bytes::from(format!(
            "event: {event}\ndata: {data}\n\n"
        ))));
    };
    push(
        "message_start",
        json!({"type": "message_start", "message": {
            "id": id, "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": input, "cache_creation_input_tokens": cache_write,
                      "cache_read_input_tokens": cache_read, "output_tokens": 1}}}),
    );
    push(
        "content_block_start",
        json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
    );
    push("ping", json!({"type": "ping"}));
    let words: Vec<&str> = text.split_inclusive(' ').collect();
    for chunk in words.chunks(4) {
        push(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0,
                   "delta": {"type": "text_delta", "text": chunk.concat()}}),
        );
    }
    push(
        "content_block_stop",
        json!({"type": "content_block_stop", "index": 0}),
    );
    push(
        "message_delta",
        json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null},
               "usage": {"output_tokens": output}}),
    );
    push("message_stop", json!({"type": "message_stop"}));
    let stream = event_body(events);
    Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(stream)
        .unwrap_or_else(|_| Response::new(Body::empty()))
}

/// A body sending each event as its own frame, as a real stream does.
fn event_body(events: Vec<Result<Bytes, Infallible>>) -> Body {
    let frames = IterStream(events.into_iter().map(|r| r.map(http_body::Frame::data)));
    Body::new(http_body_util::StreamBody::new(frames))
}

/// A stream over an iterator (what `futures::stream::iter` does, without the dependency).
struct IterStream<I>(I);

impl<I: Iterator + Unpin> futures_core::Stream for IterStream<I> {
    type Item = I::Item;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        std::task::Poll::Ready(self.0.next())
    }
}
