//! Store faults under load, over real sockets.
//!
//! - Redis: a gateway with `REDIS_URL` on a real `redis-server` (started here on a free
//!   loopback port) while concurrent requests flow; the server is killed and started again
//!   (empty). Each failure mode does what it says while Redis is away (`open` admits
//!   unmetered, `closed` refuses with 529 `overloaded_error`, `local` limits in the process), the limits are
//!   exact again once it is back, and the usage ledger holds one record per answered
//!   request with the tokens the clients were told.
//! - PostgreSQL: `PostgresSink` under concurrent producers while the server is stopped and
//!   started again twice: every record sent is stored exactly once or counted as dropped,
//!   and the stored token totals are those of the stored records.
#![cfg(all(feature = "redis", feature = "postgres"))]
#![allow(dead_code)]

mod support;

#[path = "support/postgres.rs"]
mod pg;

include!("chat_gateway_support/modules.rs");

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use palisade::config::Env;
use serde_json::{Value, json};

use support::RedisServer;

const ADMIN: &str = "sk-test-admin-0123456789";
/// Users: one per phase of a run, and one whose admin resets probe Redis.
const USERS: [&str; 4] = ["before", "during", "after", "probe"];
const LIMIT: usize = 5;
/// Concurrent requests of one user in one phase: `LIMIT` fit, the rest are over.
const BURST: usize = 8;

fn key(user: &str) -> String {
    format!("sk-test-{user}-0123456789")
}

struct Gateway {
    addr: SocketAddr,
    state: app::AppState,
    client: Client<HttpConnector, Full<Bytes>>,
}

async fn start(redis: &RedisServer, mode: &str) -> Gateway {
    let rules = format!(
        r#"[{{"name":"chat","method":"POST","route":"/v1/messages","key":"principal","limit":{LIMIT},"window":"1h","skip_anonymous":true}}]"#
    );
    start_with(vec![
        ("PALISADE_RATE_LIMIT_RULES", rules),
        ("PALISADE_RATE_LIMIT_REDIS_FAIL_MODE", mode.to_owned()),
        // Generous: a killed server refuses at once, and a loaded machine must not time out.
        ("PALISADE_RATE_LIMIT_REDIS_TIMEOUT", "2s".to_owned()),
        ("REDIS_URL", redis.url()),
    ])
    .await
}

async fn start_with(vars: Vec<(&'static str, String)>) -> Gateway {
    let keys: Vec<String> = USERS.iter().map(|u| format!("{u}={}", key(u))).collect();
    let mut pairs = vec![
        ("PALISADE_GATEWAY_API_KEYS", keys.join(",")),
        ("PALISADE_GATEWAY_ADMIN_KEYS", format!("ops={ADMIN}")),
        ("PALISADE_GATEWAY_DAILY_BUDGET", "none".to_owned()),
    ];
    pairs.extend(vars);
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

/// What one request got: its status, and the usage the client was told of (on a 200).
#[derive(Debug)]
struct Answer {
    status: u16,
    usage: Option<(u64, u64)>,
    body: Value,
}

impl Gateway {
    async fn post(&self, path: &str, key: &str, body: Value) -> Answer {
        let req = http::Request::post(format!("http://{}{path}", self.addr))
            .header("x-api-key", key)
            .header("anthropic-version", "2023-06-01")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap();
        let res = self.client.request(req).await.unwrap();
        let status = res.status().as_u16();
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        let body: Value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| panic!("{status}: not JSON: {bytes:?}"));
        let usage = (status == 200 && path == "/v1/messages").then(|| {
            let u = &body["usage"];
            (
                u["input_tokens"].as_u64().unwrap(),
                u["output_tokens"].as_u64().unwrap(),
            )
        });
        Answer {
            status,
            usage,
            body,
        }
    }

    /// `BURST` concurrent chat requests by `user`, each on a task of its own.
    async fn burst(self: &Arc<Self>, user: &str) -> Vec<Answer> {
        self.burst_of(user, BURST).await
    }

    /// `n` concurrent chat requests by `user`, each on a task of its own.
    async fn burst_of(self: &Arc<Self>, user: &str, n: usize) -> Vec<Answer> {
        let mut set = tokio::task::JoinSet::new();
        for i in 0..n {
            let gw = Arc::clone(self);
            let key = key(user);
            let body = json!({
                "model": "claude-sonnet-4-5",
                "max_tokens": 64,
                "messages": [{"role": "user", "content": format!("request {i} of {user}")}]
            });
            set.spawn(async move { gw.post("/v1/messages", &key, body).await });
        }
        set.join_all().await
    }

    /// Waits until Redis answers the gateway again: an admin reset of the probe user is a
    /// round trip that fails while Redis is away.
    async fn wait_for_redis(&self) {
        for _ in 0..500 {
            let r = self
                .post("/admin/rate-limits/reset", ADMIN, json!({"user": "probe"}))
                .await;
            if r.status == 200 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the gateway never reached the restarted Redis");
    }

    async fn ledger_len(&self, n: usize) -> Vec<store::LedgerEntry> {
        let mut entries = Vec::new();
        for _ in 0..1000 {
            entries = self.state.ledger.entries(
                UNIX_EPOCH,
                SystemTime::now() + Duration::from_secs(60),
                |_| true,
            );
            if entries.len() >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        entries
    }
}

fn statuses(answers: &[Answer]) -> Vec<u16> {
    let mut s: Vec<u16> = answers.iter().map(|a| a.status).collect();
    s.sort_unstable();
    s
}

fn exact(phase: &str, answers: &[Answer]) -> Vec<u16> {
    let mut s = vec![200; LIMIT];
    s.extend(std::iter::repeat_n(429, BURST - LIMIT));
    let got = statuses(answers);
    assert_eq!(got, s, "{phase}: {answers:#?}");
    got
}

/// One run: a burst with Redis up, one with Redis killed, one after its restart.
async fn run(mode: &str) {
    let mut redis = RedisServer::start()
        .await
        .expect("redis-server is required for these tests");
    let gw = Arc::new(start(&redis, mode).await);
    let mut answered = Vec::new();

    // Redis up: the limit is exact under concurrency.
    let before = gw.burst("before").await;
    exact("before the outage", &before);
    answered.extend(before);

    redis.kill();
    let during = gw.burst("during").await;
    match mode {
        // Unmetered: everyone passes.
        "open" => assert_eq!(statuses(&during), vec![200; BURST], "{during:#?}"),
        // No request passes unmetered: "unavailable", which the gateway's Anthropic
        // format writes as 529 `overloaded_error` (the SDKs retry it).
        "closed" => {
            assert_eq!(statuses(&during), vec![529; BURST], "{during:#?}");
            for a in &during {
                assert_eq!(a.body["error"]["type"], "overloaded_error", "{a:?}");
            }
        }
        // The process's own limiter decides, as exactly as Redis did.
        "local" => {
            exact("during the outage", &during);
        }
        _ => unreachable!(),
    }
    answered.extend(during);
    let health = gw.state.redis.as_ref().unwrap().health();
    assert!(!health.healthy, "{health:?}");
    assert_eq!(format!("{:?}", health.fail_mode).to_ascii_lowercase(), mode);
    if mode != "closed" {
        assert!(health.degraded_decisions >= BURST as u64, "{health:?}");
    }

    // Redis back (empty): the limits are exact again.
    redis.restart().await;
    gw.wait_for_redis().await;
    let after = gw.burst("after").await;
    let health = gw.state.redis.as_ref().unwrap().health();
    exact("after the restart", &after);
    answered.extend(after);
    assert!(health.healthy, "{health:?}");

    // The ledger: one record per answered request, with the tokens the client was told.
    let ok: Vec<&Answer> = answered.iter().filter(|a| a.status == 200).collect();
    let entries = gw.ledger_len(ok.len()).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let entries_now = gw.ledger_len(ok.len()).await;
    assert_eq!(entries.len(), entries_now.len(), "records kept arriving");
    assert_eq!(
        entries.len(),
        ok.len(),
        "{mode}: one record per answered request"
    );
    let told: (u64, u64) = ok.iter().fold((0, 0), |acc, a| {
        let (i, o) = a.usage.unwrap();
        (acc.0 + i, acc.1 + o)
    });
    let recorded: (u64, u64) = entries.iter().fold((0, 0), |acc, e| {
        (
            acc.0 + e.record.usage.input_tokens,
            acc.1 + e.record.usage.output_tokens,
        )
    });
    assert_eq!(recorded, told, "{mode}: the ledger's tokens = the clients'");
    let ids: HashSet<_> = entries
        .iter()
        .map(|e| e.record.request_id.clone())
        .collect();
    assert_eq!(ids.len(), entries.len(), "{mode}: a request recorded twice");
    let users: HashSet<_> = entries
        .iter()
        .map(|e| e.record.attribution.user.clone().unwrap_or_default())
        .collect();
    let expected: HashSet<String> = match mode {
        "closed" => ["before", "after"].map(str::to_owned).into(),
        _ => ["before", "during", "after"].map(str::to_owned).into(),
    };
    assert_eq!(users, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_under_load_fail_mode_open() {
    run("open").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_under_load_fail_mode_closed() {
    run("closed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_under_load_fail_mode_local() {
    run("local").await;
}

/// Record `i` of the PostgreSQL run: its own request id, tokens and cost.
fn pg_record(i: u64) -> palisade::cost::UsageRecord {
    use palisade::cost::{Attribution, Money, Usage, UsageRecord};
    let usage = Usage {
        input_tokens: 100 + i % 997,
        output_tokens: 1 + (i * 7) % 4001,
        cache_read_tokens: (i * 13) % 50,
        ..Usage::default()
    };
    let time = UNIX_EPOCH + Duration::from_secs(1_767_225_600 + i);
    let cost = Some(Money::from_picos(u128::from(i) * 1_000_003));
    let attribution = Attribution {
        user: Some(format!("user{}", i % 7)),
        ..Attribution::default()
    };
    let mut r = UsageRecord::new(time, Some("claude-sonnet-4-5".to_owned()), usage, cost)
        .with_attribution(attribution);
    r.request_id = Some(format!("req_{i:06}"));
    r.route = "/v1/messages".into();
    r
}

/// Polls `check` every 10 ms until it gives a value; fails after a minute (a bound far
/// above the few milliseconds it takes on a quiet machine).
async fn until<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The sink's health once its backlog is stored: flushes (each one try, no backoff) until
/// nothing waits, for at most a minute; the counters add up at every step.
async fn drained(sink: &palisade::cost::sink::PostgresSink) -> palisade::cost::sink::SinkHealth {
    use palisade::cost::sink::UsageSink;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let flushed = sink.flush().await;
        let h = sink.health();
        assert_eq!(
            h.accepted,
            h.delivered + h.dead_lettered + h.dropped + h.backlog,
            "{h:?}"
        );
        match flushed {
            Ok(()) => return h,
            Err(e) => assert!(e.is_retryable(), "{e}"),
        }
        assert!(
            std::time::Instant::now() < deadline,
            "PostgreSQL never took the backlog: {h:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Eight producers record 12 000 records while the server is stopped and started again
/// twice: every record is stored exactly once or counted dropped, and the stored tokens and
/// cost are exactly those of the stored records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_and_restarted_twice_under_concurrent_load_adds_up() {
    use palisade::cost::sink::{PostgresConfig, PostgresSink};
    use palisade::cost::{RecorderConfig, UsageRecorder};

    const SENT: u64 = 12_000;
    const PRODUCERS: u64 = 8;
    let server = pg::Postgres::start();
    let url = server.database("faults").await;
    let mut config = PostgresConfig::new(url.clone());
    config.max_buffer = 3_000;
    config.max_backoff = Duration::from_millis(200);
    config.connect_timeout = Duration::from_secs(2);
    let sink = PostgresSink::connect(config).unwrap();
    sink.migrate().await.unwrap();
    let (recorder, shutdown) = UsageRecorder::spawn(
        sink.clone(),
        RecorderConfig {
            capacity: 1_000,
            max_batch: 200,
            ..RecorderConfig::default()
        },
    );
    // Producers record at a steady pace (1 000 records per 100 ms, all together) while
    // the main task stops and starts the server.
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|_| {
            let recorder = recorder.clone();
            let next = Arc::clone(&next);
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= SENT {
                        return;
                    }
                    recorder.record(pg_record(i));
                    if i % 10 == 0 {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
            })
        })
        .collect();
    let at = |n: u64| {
        let next = Arc::clone(&next);
        async move {
            while next.load(std::sync::atomic::Ordering::Relaxed) < n {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    };
    at(2_000).await;
    server.stop();
    at(5_000).await;
    // The sink notices the outage on its next write; under load that write may come late,
    // so wait for it (bounded) rather than read the health at one instant.
    let away = until("the sink sees the outage", || {
        let h = sink.health();
        h.last_error.is_some().then_some(h)
    })
    .await;
    server.resume();
    at(7_000).await;
    server.stop();
    at(9_000).await;
    server.resume();
    for p in producers {
        p.await.unwrap();
    }
    let stats = shutdown.shutdown().await; // flushes the backlog
    // Shutdown's flush is one try: under load it can meet a connection from before the
    // restart, or a new one slower than the connect timeout. Flush until drained.
    let h = drained(&sink).await;
    eprintln!("recorder {stats:?}\nsink {h:?}\nduring the first outage {away:?}");
    assert!(away.last_error.is_some(), "the outage was seen: {away:?}");
    assert_eq!(h.backlog, 0, "{h:?}");
    assert_eq!(h.accepted, stats.written);
    assert_eq!(h.accepted, h.delivered + h.dropped, "{h:?}");
    // Every record sent is stored once or counted dropped (by the sink's buffer or the
    // recorder's queue), never both and never neither.
    assert_eq!(
        h.delivered + h.dropped + stats.dropped_full + stats.failed,
        SENT,
        "{stats:?} {h:?}"
    );

    let client = pg::client(&url).await;
    let rows = client
        .query(
            "SELECT request_id, input_tokens, output_tokens, cache_read_tokens, cost_picos FROM usage_logs",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        rows.len() as u64,
        h.delivered - h.duplicates,
        "stored once each"
    );
    let mut ids = HashSet::new();
    for row in &rows {
        let id: String = row.get(0);
        let i: u64 = id.trim_start_matches("req_").parse().unwrap();
        assert!(ids.insert(i), "{id} stored twice");
        let want = pg_record(i);
        let got: (i64, i64, i64, Option<i64>) = (row.get(1), row.get(2), row.get(3), row.get(4));
        assert_eq!(
            got,
            (
                want.usage.input_tokens as i64,
                want.usage.output_tokens as i64,
                want.usage.cache_read_tokens as i64,
                want.cost.map(|c| c.picos() as i64),
            ),
            "{id} stored with other numbers"
        );
    }
    let sums = client
        .query_one(
            "SELECT sum(input_tokens)::bigint, sum(output_tokens)::bigint, sum(cost_picos)::bigint FROM usage_logs",
            &[],
        )
        .await
        .unwrap();
    let expected = ids.iter().fold((0i64, 0i64, 0i64), |acc, &i| {
        let r = pg_record(i);
        (
            acc.0 + r.usage.input_tokens as i64,
            acc.1 + r.usage.output_tokens as i64,
            acc.2 + r.cost.unwrap().picos() as i64,
        )
    });
    let got: (i64, i64, i64) = (sums.get(0), sums.get(1), sums.get(2));
    assert_eq!(
        got, expected,
        "the ledger's totals are those of its records"
    );
}

/// The gateway with `DATABASE_URL`: PostgreSQL stopped while requests flow and started
/// again. The gateway answers throughout; once the server is back, every record the
/// in-memory ledger holds is in `usage_logs` exactly once, or counted dropped, and the
/// stored tokens are the clients'.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_and_restarted_under_load_through_the_gateway_adds_up() {
    const PER_PHASE: usize = 40;
    let server = pg::Postgres::start();
    let url = server.database("gateway_faults").await;
    let rules = r#"[{"name":"chat","method":"POST","route":"/v1/messages","key":"principal","limit":1000000,"window":"1m","skip_anonymous":true}]"#;
    let gw = Arc::new(
        start_with(vec![
            ("DATABASE_URL", url.clone()),
            ("PALISADE_RATE_LIMIT_RULES", rules.to_owned()),
        ])
        .await,
    );
    let sink = gw
        .state
        .postgres
        .clone()
        .expect("DATABASE_URL wires the sink");
    let mut answered = gw.burst_of("before", PER_PHASE).await;
    server.stop();
    answered.extend(gw.burst_of("during", PER_PHASE).await);
    server.resume();
    answered.extend(gw.burst_of("after", PER_PHASE).await);
    assert!(
        answered.iter().all(|a| a.status == 200),
        "the gateway answers while PostgreSQL is away: {:?}",
        answered.iter().map(|a| a.status).collect::<Vec<_>>()
    );
    let n = answered.len();
    let entries = gw.ledger_len(n).await;
    assert_eq!(entries.len(), n, "one ledger record per answer");
    let mut h = sink.health();
    for _ in 0..2000 {
        h = sink.health();
        if h.accepted as usize == n && h.backlog == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    eprintln!("sink {h:?}");
    assert_eq!(h.accepted as usize, n, "{h:?}");
    assert_eq!(
        h.backlog, 0,
        "the backlog drains once the server is back: {h:?}"
    );
    assert_eq!(h.accepted, h.delivered + h.dropped, "{h:?}");

    let client = pg::client(&url).await;
    let rows = client
        .query(
            "SELECT request_id, input_tokens, output_tokens FROM usage_logs",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        rows.len() as u64,
        h.delivered - h.duplicates,
        "stored once each"
    );
    let by_id: std::collections::HashMap<String, (u64, u64)> = entries
        .iter()
        .map(|e| {
            (
                e.record.request_id.clone().unwrap(),
                (e.record.usage.input_tokens, e.record.usage.output_tokens),
            )
        })
        .collect();
    let mut seen = HashSet::new();
    for row in &rows {
        let id: String = row.get(0);
        assert!(seen.insert(id.clone()), "{id} stored twice");
        let got: (i64, i64) = (row.get(1), row.get(2));
        let want = by_id
            .get(&id)
            .unwrap_or_else(|| panic!("{id} is not in the ledger"));
        assert_eq!((got.0 as u64, got.1 as u64), *want, "{id}");
    }
    let told: u64 = answered.iter().map(|a| a.usage.unwrap().0).sum();
    let recorded: u64 = by_id.values().map(|t| t.0).sum();
    assert_eq!(recorded, told, "the ledger's tokens = the clients'");
}
