//! The chat_gateway's security promises, over real sockets: keys are checked in constant
//! time on their hashes, every admin route refuses user keys (and the list of admin
//! routes tested is the router's), no configured key reaches the logs of a whole run, and
//! the headers served over TLS pass the MDN HTTP Observatory's rules.
#![allow(dead_code)]

include!("chat_gateway_support/modules.rs");

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::Method;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use palisade::config::Env;
use serde_json::json;

use fixture::{ADMIN, FAST_RETRIES, OTHER, TLS_CERT, TLS_KEY, USER};
const UPSTREAM_KEY: &str = "sk-ant-upstream-secret-9f8e7d";
/// A string sent as message content: it must not be logged either.
const CONTENT: &str = "private-content-5b1e0c";

/// Every admin route, as `(method, path)`.
const ADMIN_ROUTES: [(&str, &str); 3] = [
    ("POST", "/admin/rate-limits/reset"),
    ("GET", "/admin/budgets/alice"),
    ("PUT", "/admin/budgets/alice"),
];

/// Everything the tests' tracing subscriber writes.
fn captured() -> &'static Arc<Mutex<Vec<u8>>> {
    fixture::captured_logs("trace,hyper=debug,hyper_util=debug,h2=debug,wiremock=info")
}

/// The gateway on the built-in mock, retrying in milliseconds, with `vars` on top; its
/// address.
async fn start(vars: &[(&str, &str)]) -> SocketAddr {
    fixture::start(&fixture::with(FAST_RETRIES, vars))
        .await
        .addr
}

async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<serde_json::Value>,
) -> (u16, String) {
    let mut req = http::Request::builder()
        .method(Method::from_bytes(method.as_bytes()).unwrap())
        .uri(format!("http://{addr}{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let bytes = match body {
        Some(b) => {
            req = req.header("content-type", "application/json");
            Bytes::from(b.to_string())
        }
        None => Bytes::new(),
    };
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let res = client
        .request(req.body(Full::new(bytes)).unwrap())
        .await
        .unwrap();
    let status = res.status().as_u16();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

fn admin_body(path: &str) -> Option<serde_json::Value> {
    if path.contains("reset") {
        Some(json!({"user": "alice"}))
    } else {
        Some(json!({"daily_limit_usd": "5"}))
    }
}

/// The admin routes the router declares, read from its source, so that a new admin
/// route cannot be added without this suite checking it.
#[test]
fn the_admin_route_list_is_the_routers() {
    let source = include_str!("../examples/chat_gateway/routes/mod.rs");
    let mut declared = 0;
    for line in source.lines() {
        if let Some(start) = line.find("\"/admin") {
            let path = &line[start + 1..];
            let path = &path[..path.find('"').unwrap()];
            declared += 1;
            let concrete = path.replace("{user}", "alice");
            assert!(
                ADMIN_ROUTES.iter().any(|(_, p)| *p == concrete),
                "{path} is not in ADMIN_ROUTES"
            );
        }
    }
    assert_eq!(declared, 2, "admin paths in routes/mod.rs");
}

#[tokio::test]
async fn every_admin_route_refuses_user_keys_and_anonymous_callers_and_admits_admins() {
    captured();
    let addr = start(&[]).await;
    for (m, path) in ADMIN_ROUTES {
        let body = if m == "GET" { None } else { admin_body(path) };
        for key in [USER, OTHER] {
            let (status, text) = call(addr, m, path, &[("x-api-key", key)], body.clone()).await;
            assert_eq!(status, 403, "{m} {path} with a user key: {text}");
            assert!(text.contains("permission_error"), "{text}");
            let bearer = format!("Bearer {key}");
            let (status, _) =
                call(addr, m, path, &[("authorization", &bearer)], body.clone()).await;
            assert_eq!(status, 403, "{m} {path} with a user bearer");
        }
        let (status, _) = call(addr, m, path, &[], body.clone()).await;
        assert_eq!(status, 401, "{m} {path} without a key");
        let (status, text) = call(addr, m, path, &[("x-api-key", ADMIN)], body.clone()).await;
        assert!(
            (200..300).contains(&status),
            "{m} {path} as admin: {status} {text}"
        );
    }
    // Spellings of an admin path that must not reach an admin handler with a user key.
    for path in [
        "/%61dmin/budgets/alice",
        "//admin/budgets/alice",
        "/admin/../admin/budgets/alice",
        "/v1/../admin/budgets/alice",
        "/ADMIN/budgets/alice",
        "/admin%2Fbudgets%2Falice",
    ] {
        let (status, text) = call(addr, "GET", path, &[("x-api-key", USER)], None).await;
        assert!(
            status == 403 || status == 404,
            "GET {path} with a user key: {status} {text}"
        );
    }
    // Usage of others is an admin power too.
    let (status, _) = call(
        addr,
        "GET",
        "/v1/usage?user=bob",
        &[("x-api-key", USER)],
        None,
    )
    .await;
    assert_eq!(status, 403);
    let (status, _) = call(
        addr,
        "GET",
        "/v1/usage?user=bob",
        &[("x-api-key", ADMIN)],
        None,
    )
    .await;
    assert_eq!(status, 200);
}

#[test]
fn keys_are_compared_as_hashes_in_constant_time_against_every_entry() {
    let source = include_str!("../examples/chat_gateway/auth.rs");
    let body = &source[source.find("pub fn authenticate(&self").unwrap()..];
    let body = &body[..body.find("\n    }\n").unwrap()];
    assert!(
        body.contains("ApiKeyId::from_key(key)"),
        "the presented key is hashed"
    );
    assert!(
        body.contains("constant_time_eq(&e.hash, id.as_bytes())"),
        "hashes are compared with palisade::key::constant_time_eq"
    );
    assert!(
        body.contains("for e in &self.entries") && !body.contains("return"),
        "every entry is compared, with no early return"
    );
    // The store holds no key, only hashes.
    let store = auth::KeyStore::new(
        &[config::NamedKey {
            name: "alice".into(),
            key: USER.into(),
        }],
        &[],
    );
    assert!(!format!("{store:?}").contains(USER));
    assert!(store.authenticate(USER).is_some());
    for near in [
        USER.to_ascii_uppercase(),
        USER[..USER.len() - 1].to_owned(),
        format!("{USER} "),
        format!("{}X", &USER[..USER.len() - 1]),
    ] {
        assert!(store.authenticate(&near).is_none(), "{near}");
    }
    assert!(palisade::key::constant_time_eq(b"abc", b"abc"));
    assert!(!palisade::key::constant_time_eq(b"abc", b"abd"));
    assert!(!palisade::key::constant_time_eq(b"abc", b"abcd"));
}

#[tokio::test]
async fn no_configured_key_or_message_content_reaches_the_logs_of_a_whole_run() {
    let logs = captured();
    let upstream = fixture::upstream_failing_once(json!({
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
        "content": [{"type": "text", "text": CONTENT}],
        "usage": {"input_tokens": 10, "output_tokens": 3}
    }))
    .await;
    let uri = upstream.uri();
    let remote = start(&[
        ("ANTHROPIC_BASE_URL", uri.as_str()),
        ("ANTHROPIC_API_KEY", UPSTREAM_KEY),
    ])
    .await;
    let mock = start(&[]).await;
    let chat = |stream: bool| {
        json!({
            "model": "claude-sonnet-4-5", "max_tokens": 64, "stream": stream,
            "messages": [{"role": "user", "content": CONTENT}]
        })
    };
    let near_misses = [
        USER.to_ascii_uppercase(),
        format!("{}0", &USER[..USER.len() - 1]),
        format!("{ADMIN}x"),
    ];
    for addr in [remote, mock] {
        // Success (a retried 500 upstream first), streams, refusals, admin, bots.
        call(
            addr,
            "POST",
            "/v1/messages",
            &[("x-api-key", USER)],
            Some(chat(false)),
        )
        .await;
        call(
            addr,
            "POST",
            "/v1/messages",
            &[("x-api-key", USER)],
            Some(chat(true)),
        )
        .await;
        let bearer = format!("Bearer {OTHER}");
        call(
            addr,
            "POST",
            "/v1/messages",
            &[("authorization", &bearer)],
            Some(chat(false)),
        )
        .await;
        for key in &near_misses {
            call(
                addr,
                "POST",
                "/v1/messages",
                &[("x-api-key", key)],
                Some(chat(false)),
            )
            .await;
            let bearer = format!("Bearer {key}");
            call(addr, "GET", "/v1/bots", &[("authorization", &bearer)], None).await;
        }
        call(
            addr,
            "POST",
            "/v1/messages",
            &[("x-api-key", USER)],
            Some(json!({"model": CONTENT})),
        )
        .await;
        call(
            addr,
            "GET",
            "/admin/budgets/alice",
            &[("x-api-key", USER)],
            None,
        )
        .await;
        call(
            addr,
            "PUT",
            "/admin/budgets/alice",
            &[("x-api-key", ADMIN)],
            Some(json!({"daily_limit_usd": "5"})),
        )
        .await;
        call(
            addr,
            "POST",
            "/admin/rate-limits/reset",
            &[("x-api-key", ADMIN)],
            Some(json!({"user": "alice"})),
        )
        .await;
        let (_, bot) = call(
            addr,
            "POST",
            "/v1/bots",
            &[("x-api-key", USER)],
            Some(json!({"name": "Helper", "model": "claude-sonnet-4-5", "system_prompt": CONTENT})),
        )
        .await;
        let bot: serde_json::Value = serde_json::from_str(&bot).unwrap();
        let path = format!("/v1/bots/{}/messages", bot["id"].as_str().unwrap());
        call(
            addr,
            "POST",
            &path,
            &[("x-api-key", USER), ("x-conversation-id", "conv-1")],
            Some(json!({"messages": [{"role": "user", "content": CONTENT}]})),
        )
        .await;
        call(addr, "GET", "/v1/usage", &[("x-api-key", ADMIN)], None).await;
        call(addr, "GET", "/health", &[], None).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let text = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    assert!(
        text.contains("auth_failed"),
        "the run was captured: {} bytes",
        text.len()
    );
    assert!(
        text.contains("chat_gateway::request"),
        "request lines were captured"
    );
    let mut secrets: Vec<String> = vec![
        USER.into(),
        OTHER.into(),
        ADMIN.into(),
        UPSTREAM_KEY.into(),
        CONTENT.into(),
    ];
    secrets.extend(near_misses);
    for secret in &secrets {
        // Any 12-character piece of a key would be a leak too.
        let piece = &secret[secret.len() - 12..];
        assert!(
            !text.contains(piece),
            "{piece:?} (of a secret) is in the logs:\n{}",
            text.lines()
                .filter(|l| l.contains(piece))
                .take(3)
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

/// Served over TLS (the gateway's own https mode), every kind of answer — a chat, a
/// refusal, a 404, health — scores A+ under the Observatory's header rules, over HTTP/2
/// and HTTP/1.1.
#[tokio::test]
async fn headers_served_over_tls_score_a_plus_on_the_observatory_rules() {
    use palisade::security_headers::observatory;
    for env_name in ["development", "production"] {
        let config = fixture::config(&[
            ("PALISADE_GATEWAY_TLS_CERT", TLS_CERT),
            ("PALISADE_GATEWAY_TLS_KEY", TLS_KEY),
            ("PALISADE_ENV", env_name),
        ]);
        assert!(config.tls.is_some(), "TLS configured");
        let addr = fixture::serve_own(config).await.addr;

        for http2 in [true, false] {
            let client = fixture::https_client(Some(http2));
            let base = format!("https://localhost:{}", addr.port());
            let chat = json!({
                "model": "claude-sonnet-4-5", "max_tokens": 64,
                "messages": [{"role": "user", "content": "hi"}]
            });
            let requests = [
                ("POST", "/v1/messages", Some(USER), Some(chat.clone())),
                ("POST", "/v1/messages", Some("sk-wrong"), Some(chat)),
                ("GET", "/nowhere", None, None),
                ("GET", "/health", None, None),
            ];
            for (m, path, key, body) in requests {
                let mut req = http::Request::builder()
                    .method(m)
                    .uri(format!("{base}{path}"));
                if let Some(key) = key {
                    req = req.header("x-api-key", key);
                }
                let bytes = match body {
                    Some(b) => {
                        req = req.header("content-type", "application/json");
                        Bytes::from(b.to_string())
                    }
                    None => Bytes::new(),
                };
                let res = client
                    .request(req.body(Full::new(bytes)).unwrap())
                    .await
                    .expect("https answer");
                let grade = observatory::grade(res.headers());
                assert!(
                    grade.failing.is_empty() && grade.letter() == "A+",
                    "{env_name}, http2={http2}, {m} {path} ({}): {} {:?}\n{:?}",
                    res.status(),
                    grade.score,
                    grade.failing,
                    res.headers()
                );
            }
        }
    }
}

/// The webhook URL is read as a secret (a Slack or PagerDuty URL holds its token in the
/// path): the configuration's Debug output must not show it, as it hides the upstream key.
#[test]
fn the_configurations_debug_output_hides_the_alert_webhooks_token() {
    const TOKEN: &str = "T0000000/B0000000/XXXXsecretXXXXtoken";
    let mut env = Env::from_pairs([
        (
            "PALISADE_GATEWAY_ALERT_WEBHOOK",
            format!("https://hooks.slack.com/services/{TOKEN}"),
        ),
        ("ANTHROPIC_BASE_URL", "https://api.anthropic.com".to_owned()),
        ("ANTHROPIC_API_KEY", "sk-ant-upstream-secret-key".to_owned()),
    ]);
    let config = config::GatewayConfig::from_env(&mut env);
    env.finish().expect("test configuration is valid");
    let debug = format!("{config:?}");
    assert!(!debug.contains("secretXXXXtoken"), "{debug}");
    assert!(!debug.contains("sk-ant-upstream-secret-key"), "{debug}");
    assert!(debug.contains("hooks.slack.com"), "{debug}");
}

/// The captured log lines of `target` that carry `request_id`, as JSON.
fn lines_of(target: &str, request_id: &str) -> Vec<serde_json::Value> {
    let text = String::from_utf8_lossy(&captured().lock().unwrap()).into_owned();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["target"] == target && l["fields"]["request_id"] == request_id)
        .collect()
}

/// Authentication's refusals (no key, an unknown key, a user key on an admin route) and
/// the refusals of the rate limits below it are each one audit event naming the route and
/// the request id (and the caller when known), and every request's log line names its
/// caller and status.
#[tokio::test]
async fn auth_and_limit_refusals_are_audited_and_request_lines_name_the_caller() {
    captured();
    let rules = r#"[{"name":"tight","method":"GET","route":"/v1/bots","key":"principal","limit":1,"window":"1h"}]"#;
    let addr = start(&[("PALISADE_RATE_LIMIT_RULES", rules)]).await;
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    // (status, x-request-id) of one call.
    let send = |path: &'static str, key: Option<&'static str>| {
        let client = client.clone();
        async move {
            let mut req = http::Request::builder().uri(format!("http://{addr}{path}"));
            if let Some(key) = key {
                req = req.header("x-api-key", key);
            }
            let res = client
                .request(req.body(Full::new(Bytes::new())).unwrap())
                .await
                .unwrap();
            let id = res.headers()["x-request-id"].to_str().unwrap().to_owned();
            (res.status().as_u16(), id)
        }
    };
    let (status, no_key) = send("/v1/bots", None).await;
    assert_eq!(status, 401);
    let (status, unknown) = send("/v1/bots", Some("sk-test-nobody-000000000")).await;
    assert_eq!(status, 401);
    let (status, forbidden) = send("/admin/budgets/alice", Some(USER)).await;
    assert_eq!(status, 403);
    let (status, admitted) = send("/v1/bots", Some(USER)).await;
    assert_eq!(status, 200);
    let (status, limited) = send("/v1/bots", Some(USER)).await;
    assert_eq!(status, 429);
    // The request line is written when the body ends: give the server a moment.
    tokio::time::sleep(Duration::from_millis(50)).await;

    let audit = |id: &str| {
        let lines = lines_of("chat_gateway::audit", id);
        assert_eq!(lines.len(), 1, "one audit event for {id}: {lines:?}");
        lines[0]["fields"].clone()
    };
    let e = audit(&no_key);
    assert_eq!(
        (&e["event"], &e["actor"], &e["subject"], &e["detail"]),
        (
            &json!("auth_failed"),
            &json!("-"),
            &json!("/v1/bots"),
            &json!("no key")
        )
    );
    let e = audit(&unknown);
    assert_eq!(e["event"], "auth_failed");
    assert_eq!(e["detail"], "unknown key");
    assert!(e["actor"].as_str().unwrap().starts_with("key:"), "{e}");
    let e = audit(&forbidden);
    assert_eq!(
        (&e["event"], &e["actor"], &e["subject"]),
        (
            &json!("forbidden"),
            &json!("alice"),
            &json!("/admin/budgets/alice")
        )
    );
    let e = audit(&limited);
    assert_eq!(
        (&e["event"], &e["outcome"], &e["actor"], &e["subject"]),
        (
            &json!("rate_limited"),
            &json!("refused"),
            &json!("alice"),
            &json!("/v1/bots")
        )
    );
    assert!(lines_of("chat_gateway::audit", &admitted).is_empty());

    let line = |id: &str| {
        let lines = lines_of("chat_gateway::request", id);
        assert_eq!(lines.len(), 1, "one request line for {id}: {lines:?}");
        lines[0]["fields"].clone()
    };
    for (id, user, status) in [
        (&no_key, "-", 401),
        (&forbidden, "-", 403),
        (&admitted, "alice", 200),
        (&limited, "alice", 429),
    ] {
        let l = line(id);
        assert_eq!(
            (&l["user"], &l["status"]),
            (&json!(user), &json!(status)),
            "{l}"
        );
        assert_eq!(
            l["route"],
            if status == 403 {
                "/admin/budgets/alice"
            } else {
                "/v1/bots"
            }
        );
        assert_eq!(l["complete"], true, "{l}");
    }
}
