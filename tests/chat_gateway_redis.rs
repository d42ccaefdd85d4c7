//! The chat gateway with `REDIS_URL` on a real `redis-server` (started here on a free
//! loopback port): two gateway instances sharing one Redis hold one rate limit and one
//! budget between them, and `/health` reports Redis.
#![cfg(feature = "redis")]
#![allow(dead_code)]

mod support;

include!("chat_gateway_support/modules.rs");

use std::time::Duration;

use http::Method;
use serde_json::{Value, json};

use support::RedisServer;

use fixture::{ADMIN, Gateway, Reply, USER};

async fn redis() -> RedisServer {
    RedisServer::start()
        .await
        .expect("redis-server is required for these tests")
}

/// The gateway with `REDIS_URL` on `redis`, with `vars` on top.
///
/// The rate-limit store's timeout is 5 s here, not its 50 ms default: these tests hold the
/// shared limits and budgets, not the timeout, and on a busy machine a loopback round trip
/// can miss 50 ms, which fails closed with a 529.
async fn start(redis: &RedisServer, vars: &[(&str, &str)]) -> Gateway {
    let url = redis.url();
    fixture::start(&fixture::with(
        &[
            ("REDIS_URL", url.as_str()),
            ("PALISADE_RATE_LIMIT_REDIS_TIMEOUT", "5s"),
        ],
        vars,
    ))
    .await
}

impl Gateway {
    /// A chat as alice.
    async fn alice_chat(&self) -> Reply {
        self.call_versioned(
            Method::POST,
            "/v1/messages",
            USER,
            Some(fixture::chat("claude-sonnet-4-5")),
        )
        .await
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
    assert_eq!(a.alice_chat().await.status, 200);
    assert_eq!(b.alice_chat().await.status, 200);
    for gw in [&a, &b] {
        let r = gw.alice_chat().await;
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
        .call_versioned(
            Method::POST,
            "/admin/rate-limits/reset",
            ADMIN,
            Some(json!({"user": "alice"})),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(b.alice_chat().await.status, 200);
}

/// Waits (up to a minute, for a busy machine) until every budget account in `redis` holds
/// no reservation and some spend: the settlement, sent on a task of its own, has landed.
async fn await_settled(redis: &RedisServer) {
    let mut conn = ::redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let mut accounts = Vec::new();
    for _ in 0..12_000 {
        let keys: Vec<String> = ::redis::cmd("KEYS")
            .arg("palisade:budget:*")
            .query_async(&mut conn)
            .await
            .unwrap();
        accounts.clear();
        for key in &keys {
            // reserved: the holds (`h<until_ms>`) and `r` of accounts written before holds
            let fields: Vec<(String, String)> = ::redis::cmd("HGETALL")
                .arg(key)
                .query_async(&mut conn)
                .await
                .unwrap();
            let held = fields
                .iter()
                .filter(|(f, _)| f == "r" || f.starts_with('h'))
                .map(|(_, v)| v.parse::<u128>().unwrap())
                .sum::<u128>();
            let spent = fields
                .iter()
                .find(|(f, _)| f == "s")
                .map(|(_, v)| v.clone());
            accounts.push((held, spent));
        }
        let settled = |(held, s): &(u128, Option<String>)| {
            *held == 0 && s.as_deref().is_some_and(|s| s != "0")
        };
        if !accounts.is_empty() && accounts.iter().all(settled) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("the settlement never reached Redis: {accounts:?}");
}

#[tokio::test]
async fn two_instances_sharing_redis_hold_one_budget() {
    let redis = redis().await;
    // One request reserves about $0.00404: one fits in $0.00405, and once it settled at
    // its real cost, no second one fits, whichever instance it reaches.
    let vars = [("PALISADE_GATEWAY_DAILY_BUDGET", "0.00405")];
    let a = start(&redis, &vars).await;
    let b = start(&redis, &vars).await;
    assert_eq!(a.alice_chat().await.status, 200);
    a.usage_records(1).await;
    // The settlement goes to Redis on a task of its own: wait until it landed.
    await_settled(&redis).await;
    let r = b.alice_chat().await;
    assert_eq!(
        r.status, 429,
        "instance b admitted a request over the shared budget"
    );
    assert_eq!(r.header("x-should-retry"), Some("false"));
    assert_eq!(r.json()["error"]["type"], "rate_limit_error");
    assert_eq!(a.alice_chat().await.status, 429);
}

#[tokio::test]
async fn health_reports_redis() {
    let redis = redis().await;
    let gw = start(&redis, &[]).await;
    assert_eq!(gw.alice_chat().await.status, 200);
    let h = gw.call_versioned(Method::GET, "/health", USER, None).await;
    assert_eq!(h.status, 200);
    let body = h.json();
    assert_eq!(body["redis"]["healthy"], true, "{body}");
    assert!(
        body["redis"]["round_trips"].as_u64().unwrap() >= 1,
        "{body}"
    );
}

/// With leases on, two instances sharing Redis still admit no more than the limit between
/// them, most decisions come from the leases, and `/health` counts them.
#[tokio::test]
async fn two_leasing_instances_hold_one_rate_limit_and_report_their_leases() {
    let redis = redis().await;
    let rules = r#"[{"name":"chat","method":"POST","route":"/v1/messages","key":"principal","limit":30,"window":"1m","skip_anonymous":true}]"#;
    let vars = [
        ("PALISADE_RATE_LIMIT_RULES", rules),
        ("PALISADE_GATEWAY_DAILY_BUDGET", "none"),
        ("PALISADE_RATE_LIMIT_REDIS_LEASE_UNITS", "10"),
        ("PALISADE_RATE_LIMIT_REDIS_LEASE_SHARE", "0.5"),
        ("PALISADE_RATE_LIMIT_REDIS_LEASE_MAX_AGE", "1m"),
    ];
    let a = start(&redis, &vars).await;
    let b = start(&redis, &vars).await;
    let mut admitted = 0;
    for i in 0..40 {
        let gw = if i % 2 == 0 { &a } else { &b };
        match gw.alice_chat().await.status.as_u16() {
            200 => admitted += 1,
            429 => {}
            other => panic!("unexpected status {other}"),
        }
    }
    // Never more than the limit; here every leased unit is used (the two instances take
    // turns), so exactly the limit.
    assert_eq!(admitted, 30);
    let h = a.call_versioned(Method::GET, "/health", USER, None).await;
    let body = h.json();
    assert!(
        body["redis"]["lease_answers"].as_u64().unwrap() >= 5,
        "{body}"
    );
    assert_eq!(body["redis"]["leased_keys"], 1, "{body}");
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
    let r = gw.alice_chat().await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    gw.usage_records(1).await;
    // the alert is posted by a task of its own: wait for it (up to a minute, for a busy
    // machine)
    let mut received = Vec::new();
    for _ in 0..6000 {
        received = receiver.received_requests().await.unwrap_or_default();
        if !received.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
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
    assert_eq!(b.alice_chat().await.status, 200);
    let r = a
        .call_versioned(
            Method::PUT,
            "/admin/budgets/alice",
            ADMIN,
            Some(json!({"daily_limit_usd": "0"})),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.json()["custom"], true);

    // each wait below is for the sync interval (20 ms), up to a minute for a busy machine
    let mut view = Value::Null;
    for _ in 0..12_000 {
        view = b
            .call_versioned(Method::GET, "/admin/budgets/alice", ADMIN, None)
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
    let r = b.alice_chat().await;
    assert_eq!(r.status, 429, "instance b enforces the limit set on a");
    assert_eq!(r.header("x-should-retry"), Some("false"));

    let c = start(&redis, &vars).await;
    let view = c
        .call_versioned(Method::GET, "/admin/budgets/alice", ADMIN, None)
        .await
        .json();
    assert_eq!(view["custom"], true, "read at start-up: {view}");
    assert_eq!(c.alice_chat().await.status, 429);

    // Lifted on b: a serves again.
    let r = b
        .call_versioned(
            Method::PUT,
            "/admin/budgets/alice",
            ADMIN,
            Some(json!({"daily_limit_usd": null})),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let mut status = 0;
    for _ in 0..12_000 {
        status = a.alice_chat().await.status.as_u16();
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(status, 200, "instance a never saw the limit lifted");
}

/// The hold of a reservation in flight (field `h<until_ms>` of its account) ends
/// `PALISADE_GATEWAY_BUDGET_HOLD_TTL` to twice that after Redis's clock, not the store's
/// 15-minute default.
#[tokio::test]
async fn the_budget_hold_ttl_setting_reaches_the_redis_store() {
    let redis = redis().await;
    // The mock's slow model, priced, so that a reservation is held while it waits.
    let dir = std::env::temp_dir().join(format!("palisade-hold-ttl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let prices = dir.join("prices.json");
    std::fs::write(
        &prices,
        r#"{"mock-slow": {"input_cost_per_token": 3e-06, "output_cost_per_token": 1.5e-05}}"#,
    )
    .unwrap();
    let gw = start(
        &redis,
        &[
            ("PALISADE_GATEWAY_BUDGET_HOLD_TTL", "3h"),
            ("PALISADE_GATEWAY_MOCK_SLOW_DELAY", "60s"),
            ("PALISADE_BUDGET_PRICES_FILE", prices.to_str().unwrap()),
        ],
    )
    .await;
    let slow = tokio::spawn(async move {
        gw.call_versioned(
            Method::POST,
            "/v1/messages",
            USER,
            Some(fixture::chat("mock-slow")),
        )
        .await
    });
    let mut conn = ::redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let mut hold = None;
    for _ in 0..12_000 {
        let keys: Vec<String> = ::redis::cmd("KEYS")
            .arg("palisade:budget:*")
            .query_async(&mut conn)
            .await
            .unwrap();
        for key in &keys {
            let fields: Vec<String> = ::redis::cmd("HKEYS")
                .arg(key)
                .query_async(&mut conn)
                .await
                .unwrap();
            hold = hold.or_else(|| {
                fields
                    .iter()
                    .find_map(|f| f.strip_prefix('h')?.parse::<u64>().ok())
            });
        }
        if hold.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let until_ms = hold.expect("no hold appeared while the slow request was in flight");
    let (secs, micros): (u64, u64) = ::redis::cmd("TIME").query_async(&mut conn).await.unwrap();
    let now_ms = secs * 1000 + micros / 1000;
    let left = Duration::from_millis(until_ms.saturating_sub(now_ms));
    let hour = Duration::from_secs(3600);
    assert!(
        left > 3 * hour - Duration::from_secs(60) && left <= 6 * hour,
        "the hold ends in {left:?}, not 3 h to 6 h from now"
    );
    slow.abort();
    let _ = std::fs::remove_dir_all(&dir);
}
