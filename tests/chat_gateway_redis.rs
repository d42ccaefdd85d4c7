//! The chat gateway with `REDIS_URL` on a real `redis-server` (started here on a free
//! loopback port): two gateway instances sharing one Redis hold one rate limit and one
//! budget between them, and `/health` reports Redis.
#![cfg(feature = "redis")]
#![allow(dead_code)]

mod support;

include!("chat_gateway_support/modules.rs");

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::Method;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use palisade::config::Env;
use serde_json::{Value, json};

use support::RedisServer;

const USER: &str = "sk-test-alice-0123456789";
const ADMIN: &str = "sk-test-admin-0123456789";

struct Gateway {
    addr: SocketAddr,
    state: app::AppState,
    client: Client<HttpConnector, Full<Bytes>>,
}

struct Answer {
    status: u16,
    headers: http::HeaderMap,
    body: Bytes,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

async fn redis() -> RedisServer {
    RedisServer::start()
        .await
        .expect("redis-server is required for these tests")
}

async fn start(redis: &RedisServer, vars: &[(&str, &str)]) -> Gateway {
    let mut pairs = vec![
        ("PALISADE_GATEWAY_API_KEYS", format!("alice={USER}")),
        ("PALISADE_GATEWAY_ADMIN_KEYS", format!("ops={ADMIN}")),
        ("REDIS_URL", redis.url()),
    ];
    for (k, v) in vars {
        pairs.retain(|(name, _)| name != k);
        pairs.push((k, (*v).to_owned()));
    }
    let mut env = Env::from_pairs(pairs);
    let config = config::GatewayConfig::from_env(&mut env);
    env.finish().expect("test configuration is valid");
    let app = app::build(config).await.expect("gateway builds");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = app.router;
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    Gateway {
        addr,
        state: app.state,
        client: Client::builder(TokioExecutor::new()).build_http(),
    }
}

impl Gateway {
    async fn call(&self, method: Method, path: &str, key: &str, body: Option<Value>) -> Answer {
        let mut req = http::Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.addr))
            .header("x-api-key", key)
            .header("anthropic-version", "2023-06-01");
        let body = match body {
            Some(v) => {
                req = req.header("content-type", "application/json");
                Bytes::from(v.to_string())
            }
            None => Bytes::new(),
        };
        let res = self
            .client
            .request(req.body(Full::new(body)).unwrap())
            .await
            .unwrap();
        let status = res.status().as_u16();
        let headers = res.headers().clone();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        Answer {
            status,
            headers,
            body,
        }
    }

    async fn chat(&self) -> Answer {
        self.call(
            Method::POST,
            "/v1/messages",
            USER,
            Some(json!({
                "model": "claude-sonnet-4-5",
                "max_tokens": 256,
                "messages": [{"role": "user", "content": "Hello there"}]
            })),
        )
        .await
    }

    async fn usage_records(&self, n: usize) {
        for _ in 0..500 {
            let entries = self.state.ledger.entries(
                std::time::UNIX_EPOCH,
                std::time::SystemTime::now() + Duration::from_secs(60),
                |_| true,
            );
            if entries.len() >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        panic!("the ledger never held {n} records");
    }
}

#[tokio::test]
async fn two_instances_sharing_redis_hold_one_rate_limit() {
    let redis = redis().await;
    let rules = r#"[{"name":"chat","method":"POST","route":"/v1/messages","key":"principal","limit":2,"window":"1m","skip_anonymous":true}]"#;
    let vars = [
        ("PALISADE_RATE_LIMIT_RULES", rules),
        ("PALISADE_GATEWAY_DAILY_BUDGET", "none"),
    ];
    let a = start(&redis, &vars).await;
    let b = start(&redis, &vars).await;
    assert_eq!(a.chat().await.status, 200);
    assert_eq!(b.chat().await.status, 200);
    for gw in [&a, &b] {
        let r = gw.chat().await;
        assert_eq!(
            r.status, 429,
            "the pair's third request is over the limit of 2"
        );
        assert!(r.header("retry-after").is_some());
        assert_ne!(r.header("x-should-retry"), Some("false"));
    }
    // An admin reset clears the shared count (each instance's local cache of blocked keys
    // still refuses until its retry-after, so the reset is checked on the instance it ran on).
    let r = b
        .call(
            Method::POST,
            "/admin/rate-limits/reset",
            ADMIN,
            Some(json!({"user": "alice"})),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(b.chat().await.status, 200);
}

#[tokio::test]
async fn two_instances_sharing_redis_hold_one_budget() {
    let redis = redis().await;
    // One request reserves about $0.00404: one fits in $0.00405, and once it settled at
    // its real cost, no second one fits, whichever instance it reaches.
    let vars = [("PALISADE_GATEWAY_DAILY_BUDGET", "0.00405")];
    let a = start(&redis, &vars).await;
    let b = start(&redis, &vars).await;
    assert_eq!(a.chat().await.status, 200);
    a.usage_records(1).await;
    // The settlement goes to Redis on a task of its own, spawned before the record
    // reached the ledger: one round trip on loopback.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let r = b.chat().await;
    assert_eq!(
        r.status, 429,
        "instance b admitted a request over the shared budget"
    );
    assert_eq!(r.header("x-should-retry"), Some("false"));
    assert_eq!(r.json()["error"]["type"], "rate_limit_error");
    assert_eq!(a.chat().await.status, 429);
}

#[tokio::test]
async fn health_reports_redis() {
    let redis = redis().await;
    let gw = start(&redis, &[]).await;
    assert_eq!(gw.chat().await.status, 200);
    let h = gw.call(Method::GET, "/health", USER, None).await;
    assert_eq!(h.status, 200);
    let body = h.json();
    assert_eq!(body["redis"]["healthy"], true, "{body}");
    assert!(
        body["redis"]["round_trips"].as_u64().unwrap() >= 1,
        "{body}"
    );
}

#[tokio::test]
async fn budget_threshold_alerts_reach_the_webhook() {
    use wiremock::matchers::{method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};

    let receiver = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/alerts"))
        .respond_with(ResponseTemplate::new(204))
        .mount(&receiver)
        .await;
    let redis = redis().await;
    let hook = format!("{}/alerts", receiver.uri());
    // A threshold at 0.1 % of $0.01: the first request's real cost crosses it.
    let rules =
        r#"[{"name":"daily","scope":"user","period":"day","limit":"0.01","thresholds":[0.001]}]"#;
    let gw = start(
        &redis,
        &[
            ("PALISADE_BUDGET_RULES", rules),
            ("PALISADE_GATEWAY_ALERT_WEBHOOK", hook.as_str()),
        ],
    )
    .await;
    assert_eq!(gw.chat().await.status, 200);
    gw.usage_records(1).await;
    let mut received = Vec::new();
    for _ in 0..500 {
        received = receiver.received_requests().await.unwrap_or_default();
        if !received.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(received.len(), 1, "one threshold, one alert");
    let event: Value = serde_json::from_slice(&received[0].body).unwrap();
    let text = event.to_string();
    assert!(text.contains("daily"), "{text}");
    assert!(text.contains("user:alice"), "{text}");
}

/// `PUT /admin/budgets/{user}` on one instance holds on every instance sharing the Redis:
/// those running read it back within the sync interval, one started later at start-up.
#[tokio::test]
async fn a_budget_limit_set_on_one_instance_holds_on_every_instance() {
    let redis = redis().await;
    let vars = [("PALISADE_GATEWAY_BUDGET_SYNC_INTERVAL", "20ms")];
    let a = start(&redis, &vars).await;
    let b = start(&redis, &vars).await;
    assert_eq!(b.chat().await.status, 200);
    let r = a
        .call(
            Method::PUT,
            "/admin/budgets/alice",
            ADMIN,
            Some(json!({"daily_limit_usd": "0"})),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.json()["custom"], true);

    let mut view = Value::Null;
    for _ in 0..500 {
        view = b
            .call(Method::GET, "/admin/budgets/alice", ADMIN, None)
            .await
            .json();
        if view["custom"] == true {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        view["custom"], true,
        "instance b never saw the limit: {view}"
    );
    assert_eq!(view["daily_limit_usd"], "0");
    let r = b.chat().await;
    assert_eq!(r.status, 429, "instance b enforces the limit set on a");
    assert_eq!(r.header("x-should-retry"), Some("false"));

    let c = start(&redis, &vars).await;
    let view = c
        .call(Method::GET, "/admin/budgets/alice", ADMIN, None)
        .await
        .json();
    assert_eq!(view["custom"], true, "read at start-up: {view}");
    assert_eq!(c.chat().await.status, 429);

    // Lifted on b: a serves again.
    let r = b
        .call(
            Method::PUT,
            "/admin/budgets/alice",
            ADMIN,
            Some(json!({"daily_limit_usd": null})),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let mut status = 0;
    for _ in 0..500 {
        status = a.chat().await.status;
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(status, 200, "instance a never saw the limit lifted");
}
