//! `ValidatedJson` over real sockets on 127.0.0.1: 200, 400 with field paths, 413, 415,
//! and the error format taken from the request extensions.
#![cfg(feature = "axum")]

use std::net::SocketAddr;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Extension};
use axum::routing::post;
use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use palisade::validate::{Validate, ValidatedJson, Validator};
use palisade::{ErrorFormat, FieldError};
use serde_json::{Value, json};

#[derive(Debug, serde::Deserialize)]
struct Message {
    role: String,
    content: String,
}

#[derive(Debug, serde::Deserialize)]
struct ChatRequest {
    model: String,
    max_tokens: u32,
    messages: Vec<Message>,
}

impl Validate for Message {
    fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut v = Validator::new();
        v.one_of("role", self.role.as_str(), &["user", "assistant"])
            .length("content", &self.content, 1, 10_000);
        v.finish()
    }
}

impl Validate for ChatRequest {
    fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut v = Validator::new();
        v.length("model", &self.model, 1, 64)
            .range("max_tokens", self.max_tokens, 1, 8_192)
            .count("messages", self.messages.len(), 1, 100)
            .each("messages", &self.messages);
        v.finish()
    }
}

async fn chat(ValidatedJson(req): ValidatedJson<ChatRequest>) -> String {
    format!("{} {}", req.model, req.messages.len())
}

async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

fn app() -> Router {
    Router::new()
        .route("/v1/messages", post(chat))
        .layer(DefaultBodyLimit::max(1024))
}

async fn post_to(
    addr: SocketAddr,
    content_type: Option<&str>,
    body: impl Into<Bytes>,
) -> (u16, http::HeaderMap, Bytes) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut req = Request::post(format!("http://{addr}/v1/messages"));
    if let Some(ct) = content_type {
        req = req.header("content-type", ct);
    }
    let res = client
        .request(req.body(Full::new(body.into())).unwrap())
        .await
        .unwrap();
    let status = res.status().as_u16();
    let headers = res.headers().clone();
    (
        status,
        headers,
        res.into_body().collect().await.unwrap().to_bytes(),
    )
}

fn json_body(bytes: &Bytes) -> Value {
    serde_json::from_slice(bytes).unwrap()
}

#[tokio::test]
async fn valid_json_reaches_the_handler() {
    let addr = serve(app()).await;
    let body = json!({"model": "claude-sonnet", "max_tokens": 100,
                      "messages": [{"role": "user", "content": "hi"}]});
    let (status, _, bytes) = post_to(addr, Some("application/json"), body.to_string()).await;
    assert_eq!(status, 200);
    assert_eq!(bytes, "claude-sonnet 1");
}

#[tokio::test]
async fn invalid_fields_are_listed_in_a_400() {
    let addr = serve(app()).await;
    let body = json!({"model": "", "max_tokens": 0,
                      "messages": [{"role": "robot", "content": "x"}, {"role": "user", "content": ""}]});
    let (status, headers, bytes) = post_to(
        addr,
        Some("application/json; charset=utf-8"),
        body.to_string(),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(headers["content-type"], "application/problem+json");
    let doc = json_body(&bytes);
    let fields: Vec<&str> = doc["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    assert_eq!(
        fields,
        [
            "model",
            "max_tokens",
            "messages[0].role",
            "messages[1].content"
        ]
    );

    // A wrong type names its path.
    let (status, _, bytes) = post_to(
        addr,
        Some("application/json"),
        r#"{"model": "m", "max_tokens": "many", "messages": []}"#,
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(json_body(&bytes)["errors"][0]["field"], "max_tokens");

    // Broken JSON.
    let (status, _, bytes) = post_to(addr, Some("application/json"), "{").await;
    assert_eq!(status, 400);
    assert_eq!(json_body(&bytes)["errors"][0]["field"], "body");
}

#[tokio::test]
async fn wrong_content_type_is_415_and_oversized_body_is_413() {
    let addr = serve(app()).await;
    let (status, _, bytes) = post_to(addr, Some("text/plain"), "{}").await;
    assert_eq!(status, 415);
    assert_eq!(json_body(&bytes)["kind"], "unsupported_media_type");
    let (status, _, _) = post_to(addr, None, "{}").await;
    assert_eq!(status, 415);

    let big = format!(r#"{{"model": "{}"}}"#, "m".repeat(4096));
    let (status, _, bytes) = post_to(addr, Some("application/json"), big).await;
    assert_eq!(status, 413);
    assert_eq!(json_body(&bytes)["kind"], "payload_too_large");
}

#[tokio::test]
async fn error_format_comes_from_the_extensions() {
    let addr = serve(app().layer(Extension(ErrorFormat::Anthropic))).await;
    let (status, headers, bytes) =
        post_to(addr, Some("application/json"), r#"{"model": "m"}"#).await;
    assert_eq!(status, 400);
    assert_eq!(headers["content-type"], "application/json");
    let doc = json_body(&bytes);
    assert_eq!(doc["type"], "error");
    assert_eq!(doc["error"]["type"], "invalid_request_error");
    assert!(
        doc["error"]["message"]
            .as_str()
            .unwrap()
            .contains("missing field `max_tokens`"),
        "{doc}"
    );
    // 415 renders as Anthropic's 400 invalid_request_error.
    let (status, _, bytes) = post_to(addr, Some("text/plain"), "x").await;
    assert_eq!(status, 400);
    assert_eq!(json_body(&bytes)["error"]["type"], "invalid_request_error");
}
