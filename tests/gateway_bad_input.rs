//! The chat_gateway against bad input, over real sockets: a table of raw HTTP/1.1 requests
//! (malformed, truncated and deeply nested JSON, wrong types, missing and extra fields,
//! invalid roles and content blocks, invalid UTF-8, huge and slow bodies, bad content
//! types and headers, odd routes, methods and ids, near-miss API keys, other users' bots).
//! Each gets its documented 4xx with a JSON error body in the configured format; nothing
//! answers 5xx, nothing is echoed into a header, and `/health` is 200 afterwards.
#![allow(dead_code)]

include!("chat_gateway_support/modules.rs");

use std::net::SocketAddr;
use std::time::Duration;

use proptest::prelude::*;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use fixture::{ADMIN, OTHER, USER};

const MODEL: &str = "claude-sonnet-4-5";

/// The gateway on the built-in mock with `vars` on top; its address. The matrix sends more
/// than a minute's worth of requests per user, so the global limit is lifted.
async fn start(vars: &[(&str, &str)]) -> SocketAddr {
    let lifted = [(
        "PALISADE_RATE_LIMIT_RULES",
        r#"[{"name":"global","key":"principal","limit":1000000,"window":"1m","skip_anonymous":true}]"#,
    )];
    fixture::start(&fixture::with(&lifted, vars)).await.addr
}

/// A raw answer.
#[derive(Debug)]
struct Raw {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Raw {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Sends `bytes` on a new connection and reads the answer to the end (the requests say
/// `connection: close`). The peer may stop reading early (a refused large body), so a
/// failed write is not an error: the answer is what counts.
async fn send(addr: SocketAddr, bytes: Vec<u8>) -> Raw {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut rd, mut wr) = stream.into_split();
    let writer = tokio::spawn(async move {
        for chunk in bytes.chunks(64 * 1024) {
            if wr.write_all(chunk).await.is_err() {
                return;
            }
        }
        let _ = wr.flush().await;
        // Keep the write half open until the answer is read.
        tokio::time::sleep(Duration::from_secs(30)).await;
    });
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), async {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match rd.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            if complete(&buf) {
                break;
            }
        }
    })
    .await;
    writer.abort();
    assert!(read.is_ok(), "no answer within 20 s");
    parse(&buf)
}

fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

/// Whether `buf` holds a whole response (by content-length, or a chunked body's end).
fn complete(buf: &[u8]) -> bool {
    let Some(end) = head_end(buf) else {
        return false;
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    if let Some(len) = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
    {
        return buf.len() >= end + len;
    }
    if head.contains("transfer-encoding: chunked") {
        return buf[end..].ends_with(b"0\r\n\r\n");
    }
    false
}

fn parse(buf: &[u8]) -> Raw {
    let end = head_end(buf).unwrap_or_else(|| {
        panic!(
            "no response head in {:?}",
            String::from_utf8_lossy(&buf[..buf.len().min(500)])
        )
    });
    let head = String::from_utf8_lossy(&buf[..end]);
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    let headers: Vec<(String, String)> = lines
        .filter(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let mut body = buf[end..].to_vec();
    if headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"))
    {
        body = dechunk(&body);
    }
    Raw {
        status,
        headers,
        body,
    }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(p) = data.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(
            String::from_utf8_lossy(&data[..p])
                .split(';')
                .next()
                .unwrap_or("0")
                .trim(),
            16,
        )
        .unwrap_or(0);
        if size == 0 {
            break;
        }
        let start = p + 2;
        out.extend_from_slice(&data[start..(start + size).min(data.len())]);
        data = &data[(start + size + 2).min(data.len())..];
    }
    out
}

/// A request: `host`, `connection: close` and `content-length` are added.
fn http(method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut out = format!("{method} {path} HTTP/1.1\r\nhost: gateway\r\nconnection: close\r\n");
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" || method == "PUT" {
        out.push_str(&format!("content-length: {}\r\n", body.len()));
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// A JSON POST as alice.
fn post(path: &str, body: impl AsRef<[u8]>) -> Vec<u8> {
    http(
        "POST",
        path,
        &[("x-api-key", USER), ("content-type", "application/json")],
        body.as_ref(),
    )
}

fn get(path: &str, key: &str) -> Vec<u8> {
    http("GET", path, &[("x-api-key", key)], b"")
}

/// A messages request with `field` set to `value` (or removed when `value` is null).
fn with(field: &str, value: Value) -> Vec<u8> {
    let mut body = json!({
        "model": MODEL,
        "max_tokens": 64,
        "messages": [{"role": "user", "content": "Hello"}]
    });
    let mut target = &mut body;
    let parts: Vec<&str> = field.split('.').collect();
    for p in &parts[..parts.len() - 1] {
        target = if let Ok(i) = p.parse::<usize>() {
            &mut target[i]
        } else {
            &mut target[*p]
        };
    }
    let last = parts[parts.len() - 1];
    if value.is_null() {
        target.as_object_mut().unwrap().remove(last);
    } else if let Ok(i) = last.parse::<usize>() {
        target[i] = value;
    } else {
        target[last] = value;
    }
    post("/v1/messages", serde_json::to_vec(&body).unwrap())
}

/// A message with `content`.
fn content(value: Value) -> Vec<u8> {
    with("messages.0.content", value)
}

struct Case {
    name: String,
    request: Vec<u8>,
    status: u16,
    /// Anthropic's `error.type`.
    kind: &'static str,
    /// Words the error message must hold (what to fix).
    says: &'static str,
}

fn case(name: impl Into<String>, request: Vec<u8>, status: u16, kind: &'static str) -> Case {
    Case {
        name: name.into(),
        request,
        status,
        kind,
        says: "",
    }
}

fn nested(depth: usize) -> Vec<u8> {
    let mut s = String::with_capacity(depth * 2 + 100);
    s.push_str(
        r#"{"model":"claude-sonnet-4-5","max_tokens":64,"messages":[{"role":"user","content":"#,
    );
    s.push_str(&"[".repeat(depth));
    s.push_str(&"]".repeat(depth));
    s.push_str("}]}");
    s.into_bytes()
}

fn nested_objects(depth: usize) -> Vec<u8> {
    let mut s = String::with_capacity(depth * 6);
    s.push_str(&r#"{"a":"#.repeat(depth));
    s.push('1');
    s.push_str(&"}".repeat(depth));
    s.into_bytes()
}

fn matrix(bot: &str) -> Vec<Case> {
    let msgs = "/v1/messages";
    let inv = "invalid_request_error";
    let auth = "authentication_error";
    let perm = "permission_error";
    let nf = "not_found_error";
    let mut cases = vec![
        // Malformed and truncated JSON.
        case("truncated object", post(msgs, "{"), 400, inv),
        case(
            "truncated messages array",
            post(msgs, r#"{"model":"claude-sonnet-4-5","max_tokens":64,"messages":["#),
            400,
            inv,
        ),
        case("not JSON at all", post(msgs, "hello"), 400, inv),
        case("empty body", post(msgs, ""), 400, inv),
        case("null document", post(msgs, "null"), 400, inv),
        case("array document", post(msgs, "[]"), 400, inv),
        case("string document", post(msgs, r#""hi""#), 400, inv),
        case("number document", post(msgs, "42"), 400, inv),
        case(
            "trailing garbage",
            post(
                msgs,
                r#"{"model":"claude-sonnet-4-5","max_tokens":64,"messages":[{"role":"user","content":"hi"}]} trailing"#,
            ),
            400,
            inv,
        ),
        case("two documents", post(msgs, "{}{}"), 400, inv),
        case("single quotes", post(msgs, "{'model': 'x'}"), 400, inv),
        case("NaN literal", post(msgs, r#"{"max_tokens": NaN}"#), 400, inv),
        case(
            "duplicate field",
            post(
                msgs,
                r#"{"model":"claude-sonnet-4-5","model":"claude-sonnet-4-5","max_tokens":64,"messages":[{"role":"user","content":"hi"}]}"#,
            ),
            400,
            inv,
        ),
        case("byte order mark", post(msgs, "\u{feff}{}"), 400, inv),
        case(
            "arrays nested 10,000 deep",
            post(msgs, nested(10_000)),
            400,
            inv,
        ),
        case(
            "objects nested 10,000 deep",
            post(msgs, nested_objects(10_000)),
            400,
            inv,
        ),
        case(
            "invalid UTF-8 in a string",
            post(
                msgs,
                b"{\"model\":\"claude-sonnet-4-5\",\"max_tokens\":64,\"messages\":[{\"role\":\"user\",\"content\":\"\xff\xfe\"}]}",
            ),
            400,
            inv,
        ),
        case("invalid UTF-8 outside strings", post(msgs, b"\xc3\x28{}"), 400, inv),
        case(
            "lone surrogate escape",
            content(json!("x")).into_iter().collect::<Vec<u8>>().tap_replace("\"x\"", "\"\\ud800\""),
            400,
            inv,
        ),
        // Missing fields and wrong types.
        case("missing model", with("model", Value::Null), 400, inv),
        case("missing max_tokens", with("max_tokens", Value::Null), 400, inv),
        case("missing messages", with("messages", Value::Null), 400, inv),
        case("model is a number", with("model", json!(4)), 400, inv),
        case("unknown model", with("model", json!("gpt-9")), 400, inv),
        case("max_tokens is a string", with("max_tokens", json!("64")), 400, inv),
        case("max_tokens is fractional", with("max_tokens", json!(1.5)), 400, inv),
        case("max_tokens is negative", with("max_tokens", json!(-1)), 400, inv),
        case("max_tokens is zero", with("max_tokens", json!(0)), 400, inv),
        case(
            "max_tokens above the limit",
            with("max_tokens", json!(1_000_000)),
            400,
            inv,
        ),
        case(
            "max_tokens beyond u64",
            post(
                msgs,
                r#"{"model":"claude-sonnet-4-5","max_tokens":184467440737095516160,"messages":[{"role":"user","content":"hi"}]}"#,
            ),
            400,
            inv,
        ),
        case("max_tokens is 1e30", with("max_tokens", json!(1e30)), 400, inv),
        case("messages is an object", with("messages", json!({})), 400, inv),
        case("messages is a string", with("messages", json!("hi")), 400, inv),
        case("messages is empty", with("messages", json!([])), 400, inv),
        case(
            "message without role",
            with("messages", json!([{"content": "hi"}])),
            400,
            inv,
        ),
        case(
            "message without content",
            with("messages", json!([{"role": "user"}])),
            400,
            inv,
        ),
        case("role system", with("messages.0.role", json!("system")), 400, inv),
        case("role empty", with("messages.0.role", json!("")), 400, inv),
        case("role is a number", with("messages.0.role", json!(1)), 400, inv),
        case("role in capitals", with("messages.0.role", json!("USER")), 400, inv),
        case("content empty string", content(json!("")), 400, inv),
        case("content empty array", content(json!([])), 400, inv),
        case("content is a number", content(json!(7)), 400, inv),
        case("content is null", content(json!({})), 400, inv),
        case("block without type", content(json!([{"text": "hi"}])), 400, inv),
        case(
            "block of unknown type with markup",
            content(json!([{"type": "<script>alert(1)</script>"}])),
            400,
            inv,
        ),
        case("text block without text", content(json!([{"type": "text"}])), 400, inv),
        case(
            "text block with numeric text",
            content(json!([{"type": "text", "text": 5}])),
            400,
            inv,
        ),
        case("temperature 2", with("temperature", json!(2.0)), 400, inv),
        case("temperature negative", with("temperature", json!(-0.5)), 400, inv),
        case("temperature a string", with("temperature", json!("hot")), 400, inv),
        case("top_p 5", with("top_p", json!(5)), 400, inv),
        case("stream a string", with("stream", json!("yes")), 400, inv),
        case("stream a number", with("stream", json!(1)), 400, inv),
        case(
            "metadata.user_id too long",
            with("metadata", json!({"user_id": "u".repeat(300)})),
            400,
            inv,
        ),
        case(
            "metadata.user_id of 1 MiB",
            with("metadata", json!({"user_id": "u".repeat(1 << 20)})),
            400,
            inv,
        ),
        case(
            "metadata.user_id empty",
            with("metadata", json!({"user_id": ""})),
            400,
            inv,
        ),
        case("metadata a string", with("metadata", json!("me")), 400, inv),
        case("system a number", with("system", json!(3)), 400, inv),
        case(
            "system block of the wrong type",
            with("system", json!([{"type": "image"}])),
            400,
            inv,
        ),
        case(
            "model with CR/LF and a header",
            with("model", json!("x\r\nset-cookie: stolen=1")),
            400,
            inv,
        ),
        // Bots: deny unknown fields, validated.
        case(
            "bot with an extra field",
            post(
                "/v1/bots",
                json!({"name": "b", "model": MODEL, "owner": "bob"}).to_string(),
            ),
            400,
            inv,
        ),
        case(
            "bot with an empty name",
            post("/v1/bots", json!({"name": " ", "model": MODEL}).to_string()),
            400,
            inv,
        ),
        case(
            "bot chat with an extra field",
            post(
                &format!("/v1/bots/{bot}/messages"),
                json!({"messages": [{"role": "user", "content": "hi"}], "model": "x"}).to_string(),
            ),
            400,
            inv,
        ),
        case(
            "bot chat stream a string",
            post(
                &format!("/v1/bots/{bot}/messages"),
                json!({"messages": [{"role": "user", "content": "hi"}], "stream": "true"})
                    .to_string(),
            ),
            400,
            inv,
        ),
        case(
            "bot chat with markup in x-conversation-id",
            http(
                "POST",
                &format!("/v1/bots/{bot}/messages"),
                &[
                    ("x-api-key", USER),
                    ("content-type", "application/json"),
                    ("x-conversation-id", "<script>alert(1)</script>"),
                ],
                json!({"messages": [{"role": "user", "content": "hi"}]})
                    .to_string()
                    .as_bytes(),
            ),
            400,
            inv,
        ),
        case(
            "bot chat with a 200-byte x-conversation-id",
            http(
                "POST",
                &format!("/v1/bots/{bot}/messages"),
                &[
                    ("x-api-key", USER),
                    ("content-type", "application/json"),
                    ("x-conversation-id", &"c".repeat(200)),
                ],
                json!({"messages": [{"role": "user", "content": "hi"}]})
                    .to_string()
                    .as_bytes(),
            ),
            400,
            inv,
        ),
        // Content types.
        case(
            "no content type",
            http("POST", msgs, &[("x-api-key", USER)], b"{}"),
            400,
            inv,
        ),
        case(
            "text/plain",
            http(
                "POST",
                msgs,
                &[("x-api-key", USER), ("content-type", "text/plain")],
                b"{}",
            ),
            400,
            inv,
        ),
        case(
            "form",
            http(
                "POST",
                msgs,
                &[
                    ("x-api-key", USER),
                    ("content-type", "application/x-www-form-urlencoded"),
                ],
                b"a=b",
            ),
            400,
            inv,
        ),
        case(
            "application/jsonp",
            http(
                "POST",
                msgs,
                &[("x-api-key", USER), ("content-type", "application/jsonp")],
                b"{}",
            ),
            400,
            inv,
        ),
        // Size.
        case(
            "50 MiB body",
            post(msgs, vec![b' '; 50 << 20]),
            413,
            "request_too_large",
        ),
        // Routes, methods and ids.
        case("unknown route", get("/v2/everything", USER), 404, nf),
        case("unknown route without a key", http("GET", "/nope", &[], b""), 404, nf),
        case("GET on the proxy", get(msgs, USER), 405, inv),
        case("PATCH on bots", http("PATCH", "/v1/bots", &[("x-api-key", USER)], b""), 405, inv),
        case("made-up method", http("BREW", msgs, &[("x-api-key", USER)], b""), 405, inv),
        case("DELETE on health", http("DELETE", "/health", &[], b""), 405, inv),
        case(
            "DELETE on the dashboard's data",
            http("DELETE", "/v1/dashboard/data", &[("x-api-key", ADMIN)], b""),
            405,
            inv,
        ),
        case("POST on the dashboard page", http("POST", "/", &[], b""), 405, inv),
        case("PUT on the metrics", http("PUT", "/metrics", &[], b""), 405, inv),
        case(
            "dot segments to admin",
            get("/v1/bots/../../admin/budgets/alice", USER),
            404,
            nf,
        ),
        case(
            "encoded dot segments to admin",
            get("/v1/bots/%2e%2e%2f%2e%2e%2fadmin%2fbudgets%2falice", USER),
            404,
            nf,
        ),
        case("bot id of invalid UTF-8", get("/v1/bots/%FF%FE", USER), 400, inv),
        case("bot id with NUL", get("/v1/bots/%00", USER), 404, nf),
        case("bot id of markup", get("/v1/bots/%3Cscript%3E", USER), 404, nf),
        case("bot id of 4 KiB", get(&format!("/v1/bots/{}", "b".repeat(4096)), USER), 404, nf),
        case("bot id empty", get("/v1/bots/", USER), 404, nf),
        case(
            "bot chat on an unknown bot",
            post("/v1/bots/bot_nope/messages", "{}"),
            404,
            nf,
        ),
        case(
            "usage with a non-numeric top",
            get("/v1/usage?top=many", USER),
            400,
            inv,
        ),
        case(
            "usage with a bad date",
            get("/v1/usage?from=yesterday", USER),
            400,
            inv,
        ),
        case(
            "usage with invalid UTF-8 in the query",
            get("/v1/usage?from=%FF", USER),
            400,
            inv,
        ),
        case("another user's usage", get("/v1/usage?user=bob", USER), 403, perm),
        // Keys.
        case("no key", http("GET", "/v1/bots", &[], b""), 401, auth),
        case("empty key", get("/v1/bots", ""), 401, auth),
        case(
            "key differing in the last character",
            get("/v1/bots", &format!("{}8", &USER[..USER.len() - 1])),
            401,
            auth,
        ),
        case(
            "key differing in the first character",
            get("/v1/bots", &format!("S{}", &USER[1..])),
            401,
            auth,
        ),
        case(
            "key differing only in case",
            get("/v1/bots", &USER.to_ascii_uppercase()),
            401,
            auth,
        ),
        case(
            "key truncated",
            get("/v1/bots", &USER[..USER.len() - 1]),
            401,
            auth,
        ),
        case(
            "key with a suffix",
            get("/v1/bots", &format!("{USER}0")),
            401,
            auth,
        ),
        case(
            "bearer with a wrong key",
            http(
                "GET",
                "/v1/bots",
                &[("authorization", "Bearer sk-test-alice-012345678")],
                b"",
            ),
            401,
            auth,
        ),
        case(
            "basic authorization",
            http("GET", "/v1/bots", &[("authorization", "Basic YWxpY2U6eA==")], b""),
            401,
            auth,
        ),
        case(
            "spoofed X-Forwarded-For without a key",
            http(
                "GET",
                "/v1/bots",
                &[("x-forwarded-for", "127.0.0.1"), ("x-real-ip", "127.0.0.1")],
                b"",
            ),
            401,
            auth,
        ),
        case(
            "spoofed X-Forwarded-For to an admin route",
            http(
                "GET",
                "/admin/budgets/alice",
                &[("x-api-key", USER), ("x-forwarded-for", "127.0.0.1")],
                b"",
            ),
            403,
            perm,
        ),
        // Admin routes with a user key, and another user's bot.
        case(
            "admin reset with a user key",
            post("/admin/rate-limits/reset", r#"{"user":"bob"}"#),
            403,
            perm,
        ),
        case("admin budget read with a user key", get("/admin/budgets/bob", USER), 403, perm),
        case(
            "admin budget write with a user key",
            http(
                "PUT",
                "/admin/budgets/alice",
                &[("x-api-key", USER), ("content-type", "application/json")],
                br#"{"daily_limit_usd":"1000"}"#,
            ),
            403,
            perm,
        ),
        case(
            "admin route with an invalid UTF-8 user",
            get("/admin/budgets/%FF", ADMIN),
            400,
            inv,
        ),
        case("another user's bot", get(&format!("/v1/bots/{bot}"), OTHER), 404, nf),
        case(
            "delete another user's bot",
            http("DELETE", &format!("/v1/bots/{bot}"), &[("x-api-key", OTHER)], b""),
            404,
            nf,
        ),
        case(
            "chat as another user's bot",
            http(
                "POST",
                &format!("/v1/bots/{bot}/messages"),
                &[("x-api-key", OTHER), ("content-type", "application/json")],
                json!({"messages": [{"role": "user", "content": "hi"}]})
                    .to_string()
                    .as_bytes(),
            ),
            404,
            nf,
        ),
    ];
    // Malformed headers are refused by the HTTP parser before any handler runs.
    for (name, raw) in [
        (
            "header line without a colon",
            "GET /health HTTP/1.1\r\nhost: g\r\nbroken header\r\n\r\n",
        ),
        (
            "header name with a space",
            "GET /health HTTP/1.1\r\nhost: g\r\nbad name: 1\r\n\r\n",
        ),
        (
            "bare CR in a header value",
            "GET /health HTTP/1.1\r\nhost: g\r\nx-a: 1\r2\r\n\r\n",
        ),
        (
            "obsolete line folding",
            "GET /health HTTP/1.1\r\nhost: g\r\nx-a: 1\r\n 2\r\n\r\n",
        ),
        (
            "two content lengths",
            "POST /v1/messages HTTP/1.1\r\nhost: g\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n{}",
        ),
    ] {
        cases.push(Case {
            name: name.to_owned(),
            request: raw.as_bytes().to_vec(),
            status: 400,
            kind: "",
            says: "",
        });
    }
    cases.push(Case {
        name: "a 1 MiB header".to_owned(),
        request: http("GET", "/health", &[("x-big", &"h".repeat(1 << 20))], b""),
        status: 431,
        kind: "",
        says: "",
    });
    cases
}

trait TapReplace {
    fn tap_replace(self, from: &str, to: &str) -> Vec<u8>;
}

impl TapReplace for Vec<u8> {
    fn tap_replace(self, from: &str, to: &str) -> Vec<u8> {
        String::from_utf8(self)
            .unwrap()
            .replacen(from, to, 1)
            .into_bytes()
    }
}

/// Checks one answer against its case; returns what was wrong.
fn check(c: &Case, r: &Raw, format: &str) -> Option<String> {
    let body = String::from_utf8_lossy(&r.body);
    if r.status >= 500 {
        return Some(format!("{}: {} {body}", c.name, r.status));
    }
    let expected = c.status;
    if r.status != expected {
        return Some(format!(
            "{}: expected {expected}, got {} {body}",
            c.name, r.status
        ));
    }
    // Nothing a client sent becomes a header of its own.
    if r.headers.iter().any(|(k, _)| k == "set-cookie") {
        return Some(format!("{}: a set-cookie header was echoed", c.name));
    }
    if c.kind.is_empty() {
        // Refused by the HTTP parser: no handler ran, so no body is promised.
        return None;
    }
    let ct = r.header("content-type").unwrap_or("");
    let json: Value = match serde_json::from_slice(&r.body) {
        Ok(v) => v,
        Err(e) => return Some(format!("{}: body is not JSON ({e}): {body} ({ct})", c.name)),
    };
    match format {
        "anthropic" => {
            if !ct.starts_with("application/json") {
                return Some(format!("{}: content-type {ct}", c.name));
            }
            if json["type"] != "error" || json["error"]["type"] != c.kind {
                return Some(format!("{}: expected {}, got {json}", c.name, c.kind));
            }
            if json["error"]["message"].as_str().is_none_or(str::is_empty) {
                return Some(format!("{}: no message in {json}", c.name));
            }
        }
        _ => {
            if !ct.starts_with("application/problem+json") {
                return Some(format!("{}: content-type {ct}", c.name));
            }
            if json["status"] != r.status {
                return Some(format!("{}: problem status in {json}", c.name));
            }
        }
    }
    if !c.says.is_empty() && !body.contains(c.says) {
        return Some(format!(
            "{}: the message does not say {:?}: {body}",
            c.name, c.says
        ));
    }
    if body.contains(USER) || body.contains(OTHER) || body.contains(ADMIN) {
        return Some(format!("{}: a key was echoed", c.name));
    }
    None
}

async fn create_bot(addr: SocketAddr) -> String {
    let r = send(
        addr,
        post(
            "/v1/bots",
            json!({"name": "Helper", "model": MODEL}).to_string(),
        ),
    )
    .await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let bot: Value = serde_json::from_slice(&r.body).unwrap();
    bot["id"].as_str().unwrap().to_owned()
}

async fn run_matrix(format: &str) -> usize {
    let addr = start(&[("PALISADE_ERROR_FORMAT", format)]).await;
    let bot = create_bot(addr).await;
    let cases = matrix(&bot);
    let mut failures = Vec::new();
    for c in &cases {
        let r = send(addr, c.request.clone()).await;
        // Anthropic's format has no 415: it says 400; problem documents say 415.
        let media = ["no content type", "text/plain", "form", "application/jsonp"];
        let c = Case {
            name: c.name.clone(),
            request: Vec::new(),
            status: if format == "problem" && media.contains(&c.name.as_str()) {
                415
            } else {
                c.status
            },
            kind: c.kind,
            says: c.says,
        };
        if let Some(f) = check(&c, &r, format) {
            failures.push(f);
        }
    }
    let health = send(addr, http("GET", "/health", &[], b"")).await;
    assert_eq!(
        health.status,
        200,
        "{}",
        String::from_utf8_lossy(&health.body)
    );
    // The bot survived every attempt on it.
    let r = send(addr, get(&format!("/v1/bots/{bot}"), USER)).await;
    assert_eq!(r.status, 200);
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    cases.len()
}

#[tokio::test]
async fn every_bad_request_gets_its_4xx_in_anthropics_format_and_the_gateway_stays_healthy() {
    let n = run_matrix("anthropic").await;
    assert!(n >= 60, "{n} cases");
}

/// A body that stops arriving: the gateway answers 408 once its body timeout passes,
/// instead of holding the connection and a handler for as long as the client likes.
#[tokio::test]
async fn a_body_slower_than_the_body_timeout_is_408_in_the_error_format() {
    for (format, kind_field) in [("anthropic", "error"), ("problem", "status")] {
        let addr = start(&[
            ("PALISADE_GATEWAY_BODY_TIMEOUT", "300ms"),
            ("PALISADE_ERROR_FORMAT", format),
        ])
        .await;
        // The head promises 100 bytes; 10 arrive, then nothing.
        let mut request = http(
            "POST",
            "/v1/messages",
            &[("x-api-key", USER), ("content-type", "application/json")],
            b"",
        );
        let head = String::from_utf8(request.clone()).unwrap();
        request = head
            .replace("content-length: 0", "content-length: 100")
            .into_bytes();
        request.extend_from_slice(br#"{"model":""#);
        let started = std::time::Instant::now();
        let r = send(addr, request).await;
        assert_eq!(r.status, 408, "{}", String::from_utf8_lossy(&r.body));
        assert!(started.elapsed() < Duration::from_secs(10));
        let body: Value = serde_json::from_slice(&r.body).unwrap();
        assert!(!body[kind_field].is_null(), "{body}");
        if format == "problem" {
            assert_eq!(body["status"], 408, "{body}");
            assert_eq!(r.header("content-type"), Some("application/problem+json"));
        } else {
            assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
        }
        let health = send(addr, http("GET", "/health", &[], b"")).await;
        assert_eq!(health.status, 200);
    }
}

/// The matrix again with RFC 9457 problem documents: every refusal, 405 included, is an
/// `application/problem+json` document whose `status` is the response's.
#[tokio::test]
async fn every_bad_request_gets_its_4xx_as_a_problem_document() {
    let n = run_matrix("problem").await;
    assert!(n >= 60, "{n} cases");
}

/// The JSON media-type rule written plainly (allocating), the oracle the gateway's
/// allocation-free `is_json` must agree with: a `content-type` of visible ASCII whose part before the first `;`, trimmed and
/// lower-cased, is `application/json` or starts with `application/` and ends with `+json`.
fn plain_is_json(v: &http::HeaderValue) -> bool {
    Some(v)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| {
            let v = v.trim().to_ascii_lowercase();
            v == "application/json" || (v.starts_with("application/") && v.ends_with("+json"))
        })
}

/// The content types at the edges of the rule, with the plain rule's verdict: among them
/// `application/+json` (JSON) and non-ASCII bytes in the parameters or after the essence's
/// `+json` (not JSON), where an allocation-free check most easily goes wrong.
const CONTENT_TYPE_EDGES: &[(&[u8], bool)] = &[
    (b"application/json", true),
    (b"APPLICATION/JSON", true),
    (b" \tapplication/json \t; charset=utf-8", true),
    (b"application/+json", true),
    (b"application/+JSON;x=y", true),
    (b"application/vnd.api+json", true),
    (b"application/problem+json; charset=utf-8", true),
    (b"application/json;", true),
    (b"application/json; charset=caf\xc3\xa9", false),
    (b"application/json;\xff", false),
    (b"application/json\x80", false),
    (b"application/\xe9+json", false),
    (b"\xa0application/json", false),
    (b"application/json\t", true),
    (b"application/jsonp", false),
    (b"application/json+", false),
    (b"application/", false),
    (b"application+json", false),
    (b"application/+jso", false),
    (b"text/json", false),
    (b"", false),
    (b";application/json", false),
];

#[test]
fn the_json_content_type_check_keeps_its_edges() {
    for (ct, json) in CONTENT_TYPE_EDGES {
        let v = http::HeaderValue::from_bytes(ct).unwrap();
        assert_eq!(plain_is_json(&v), *json, "plain rule on {v:?}");
        assert_eq!(routes::is_json(ct), *json, "{v:?}");
    }
}

/// A `content-type` value built from the pieces the rule looks at (white space, the type
/// in mixed case, `/`, a subtype near `json`, parameters), each also possibly bytes of its
/// own; every byte one a header value may hold (tab, space to `~`, 0x80 and above).
fn content_type() -> impl Strategy<Value = Vec<u8>> {
    let byte = prop_oneof![
        Just(b' '),
        Just(b'\t'),
        Just(b';'),
        Just(b'/'),
        Just(b'+'),
        Just(b'='),
        Just(b'j'),
        Just(b'S'),
        Just(b'o'),
        Just(b'N'),
        Just(b'a'),
        Just(b'~'),
        0x80u8..=0xff,
        0x20u8..0x7f,
    ];
    let bytes = proptest::collection::vec(byte, 0..6);
    let piece = |fixed: &'static [&'static str]| {
        prop_oneof![
            3 => proptest::sample::select(fixed).prop_map(|s| s.as_bytes().to_vec()),
            1 => proptest::collection::vec(
                prop_oneof![Just(b' '), Just(b'\t'), Just(b'+'), 0x20u8..0x7f, 0x80u8..=0xff],
                0..6,
            ),
        ]
    };
    let mixed_case = |mut v: Vec<u8>, flips: u64| {
        for (i, b) in v.iter_mut().enumerate() {
            if flips >> (i % 64) & 1 == 1 {
                *b = b.to_ascii_uppercase();
            }
        }
        v
    };
    (
        piece(&["", " ", "\t", " \t "]),
        piece(&["application", "applicatio", "text", "", "xapplication"]),
        piece(&["/", "", "//", "+"]),
        piece(&[
            "json",
            "+json",
            "x+json",
            "vnd.api+json",
            "jsonp",
            "json+",
            "",
            "+jso",
            "+",
        ]),
        piece(&["", " ", "\t", " \t"]),
        prop_oneof![
            Just(Vec::new()),
            bytes.clone().prop_map(|b| [&b";"[..], &b].concat())
        ],
        bytes,
        any::<u64>(),
    )
        .prop_map(move |(lead, ty, slash, sub, trail, params, tail, flips)| {
            let essence = mixed_case([ty, slash, sub].concat(), flips);
            [lead, essence, trail, params, tail].concat()
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(20_000))]

    /// The allocation-free check accepts and refuses exactly what the plain rule does,
    /// on every value a `content-type` header can hold.
    #[test]
    fn the_json_content_type_check_matches_the_plain_rule(ct in content_type()) {
        let v = http::HeaderValue::from_bytes(&ct).expect("a header value's bytes");
        prop_assert_eq!(routes::is_json(&ct), plain_is_json(&v), "{:?}", v);
    }

    /// The same over any bytes a header value may hold, not only the rule's pieces.
    #[test]
    fn the_json_content_type_check_matches_the_plain_rule_on_any_value(
        ct in proptest::collection::vec(
            prop_oneof![Just(b'\t'), 0x20u8..0x7f, 0x80u8..=0xff],
            0..24,
        )
    ) {
        let v = http::HeaderValue::from_bytes(&ct).expect("a header value's bytes");
        prop_assert_eq!(routes::is_json(&ct), plain_is_json(&v), "{:?}", v);
    }
}

/// A chat for the built-in mock as alice, sent with `content_type` as raw bytes.
fn chat_with_content_type(content_type: &[u8]) -> Vec<u8> {
    let body = json!({
        "model": MODEL,
        "max_tokens": 64,
        "messages": [{"role": "user", "content": "Hello"}]
    })
    .to_string();
    let mut out = format!(
        "POST /v1/messages HTTP/1.1\r\nhost: gateway\r\nconnection: close\r\nx-api-key: {USER}\r\ncontent-length: {}\r\ncontent-type: ",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(content_type);
    out.extend_from_slice(b"\r\n\r\n");
    out.extend_from_slice(body.as_bytes());
    out
}

/// Over a real socket, a chat's `content-type` is JSON exactly as the plain rule says:
/// `application/+json` is served, a `content-type` with non-ASCII bytes in its parameters
/// is 415.
#[tokio::test]
async fn the_json_content_type_edges_hold_over_the_wire() {
    let addr = start(&[("PALISADE_ERROR_FORMAT", "problem")]).await;
    for (ct, json) in CONTENT_TYPE_EDGES {
        if ct.is_empty() || ct.starts_with(b" ") {
            // Not a value the HTTP parser hands over as written.
            continue;
        }
        let r = send(addr, chat_with_content_type(ct)).await;
        let expected = if *json { 200 } else { 415 };
        assert_eq!(
            r.status,
            expected,
            "{:?}: {}",
            String::from_utf8_lossy(ct),
            String::from_utf8_lossy(&r.body)
        );
    }
}
