//! The chat gateway with `DATABASE_URL` on a real PostgreSQL (started here on a free
//! loopback port): every usage record lands once in `usage_logs` at the cost `/v1/usage`
//! reports, security events land in `audit_logs`, no row holds an API key, and `/health`
//! reports the ledger.
#![cfg(feature = "postgres")]
#![allow(dead_code)]

#[path = "support/postgres.rs"]
mod pg;

include!("chat_gateway_support/modules.rs");

use std::time::Duration;

use http::Method;
use palisade::config::Env;
use palisade::cost::Money;
use serde_json::{Value, json};

use fixture::{ADMIN, Gateway, Reply, USER, WRONG};

/// The gateway with `DATABASE_URL` at `database_url`, with `vars` on top.
async fn start(database_url: &str, vars: &[(&str, &str)]) -> Gateway {
    fixture::start(&fixture::with(&[("DATABASE_URL", database_url)], vars)).await
}

impl Gateway {
    /// A chat as alice, streamed or not.
    async fn alice_chat(&self, stream: bool) -> Reply {
        let mut body = fixture::chat("claude-sonnet-4-5");
        if stream {
            body["stream"] = Value::Bool(true);
        }
        self.call_versioned(Method::POST, "/v1/messages", USER, Some(body))
            .await
    }
}

async fn client(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect to the test server");
    tokio::spawn(conn);
    client
}

/// Waits until `sql` (a count) reaches `n`; fails the test after 10 s.
async fn wait_count(db: &tokio_postgres::Client, sql: &str, n: i64) {
    let mut last = -1;
    for _ in 0..1000 {
        last = db.query_one(sql, &[]).await.unwrap().get(0);
        if last >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("`{sql}` reached {last}, not {n}");
}

/// `/v1/usage` once `ready` holds of it (up to ten seconds): the gateway writes a batch to
/// PostgreSQL first and to the in-memory ledger behind `/v1/usage` right after, so a row
/// seen in the database may be a moment ahead of the report.
async fn usage_when(gw: &Gateway, path: &str, ready: impl Fn(&Value) -> bool) -> Value {
    let mut last = Value::Null;
    for _ in 0..1000 {
        let reply = gw.call_versioned(Method::GET, path, USER, None).await;
        assert_eq!(reply.status, 200);
        last = reply.json();
        if ready(&last) {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{path} never reached the expected state: {last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_is_one_usage_row_at_the_cost_usage_reports_and_security_events_are_audited()
{
    let server = pg::Postgres::start();
    let url = server.database("gateway").await;
    let gw = start(
        &url,
        // One listing of bots a minute, so the second is a rate-limit refusal.
        &[(
            "PALISADE_RATE_LIMIT_RULES",
            r#"[{"name":"list_bots","method":"GET","route":"/v1/bots","key":"principal","limit":1,"window":"1m","skip_anonymous":true}]"#,
        )],
    )
    .await;
    let db = client(&url).await;

    const N: i64 = 6;
    for i in 0..N {
        let a = gw.alice_chat(i % 2 == 1).await;
        assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    }
    wait_count(&db, "SELECT count(*) FROM usage_logs", N).await;

    let rows = db
        .query(
            "SELECT request_id, cost_picos, stream, user_id FROM usage_logs",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len() as i64, N, "exactly one row per request");
    let mut ids: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len() as i64, N, "each request once");
    let streamed = rows.iter().filter(|r| r.get::<_, bool>(2)).count() as i64;
    assert_eq!(streamed, N / 2, "JSON and streamed answers both recorded");
    assert!(
        rows.iter()
            .all(|r| r.get::<_, Option<String>>(3).as_deref() == Some("alice"))
    );
    let db_cost: i64 = rows
        .iter()
        .map(|r| r.get::<_, Option<i64>>(1).expect("a priced model"))
        .sum();
    assert!(db_cost > 0);

    let reported_cost = |usage: &Value| {
        Money::parse_dollars(usage["total_cost_usd"].as_str().unwrap())
            .unwrap()
            .picos()
    };
    let usage = usage_when(&gw, "/v1/usage", |u| reported_cost(u) >= db_cost as u128).await;
    assert_eq!(
        reported_cost(&usage),
        db_cost as u128,
        "PostgreSQL and /v1/usage agree to the pico-dollar"
    );

    // An authentication failure, a rate-limit refusal and an admin action.
    let a = gw
        .call_versioned(Method::GET, "/v1/bots", WRONG, None)
        .await;
    assert_eq!(a.status, 401);
    assert_eq!(
        gw.call_versioned(Method::GET, "/v1/bots", USER, None)
            .await
            .status,
        200
    );
    assert_eq!(
        gw.call_versioned(Method::GET, "/v1/bots", USER, None)
            .await
            .status,
        429
    );
    let a = gw
        .call_versioned(
            Method::PUT,
            "/admin/budgets/alice",
            ADMIN,
            Some(json!({"daily_limit_usd": "12.50"})),
        )
        .await;
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    assert!(
        gw.state.audit.flush().await,
        "audit events go to PostgreSQL"
    );

    let audit = db
        .query(
            "SELECT action, actor, target, outcome, request_id FROM audit_logs ORDER BY id",
            &[],
        )
        .await
        .unwrap();
    let of = |action: &str| -> Vec<&tokio_postgres::Row> {
        audit
            .iter()
            .filter(|r| r.get::<_, String>(0) == action)
            .collect()
    };
    let auth = of("auth_failed");
    assert_eq!(auth.len(), 1, "one row per authentication failure");
    assert_eq!(auth[0].get::<_, String>(3), "refused");
    assert_eq!(
        auth[0].get::<_, Option<String>>(2).as_deref(),
        Some("/v1/bots")
    );
    let limited = of("rate_limited");
    assert_eq!(limited.len(), 1, "one row per rate-limit refusal");
    assert_eq!(
        limited[0].get::<_, Option<String>>(1).as_deref(),
        Some("alice")
    );
    assert!(
        limited[0].get::<_, Option<String>>(4).is_some(),
        "with the request id"
    );
    let admin = of("budget_set");
    assert_eq!(admin.len(), 1, "one row per admin action");
    assert_eq!(admin[0].get::<_, Option<String>>(1).as_deref(), Some("ops"));
    assert_eq!(
        admin[0].get::<_, Option<String>>(2).as_deref(),
        Some("alice")
    );
    assert_eq!(admin[0].get::<_, String>(3), "done");
    assert_eq!(audit.len(), 3, "nothing else was audited: {audit:?}");

    // No row anywhere holds an API key.
    let dump: Vec<String> = db
        .query(
            "SELECT row_to_json(u)::text FROM usage_logs u \
             UNION ALL SELECT row_to_json(a)::text FROM audit_logs a",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(dump.len() as i64, N + 3);
    for row in &dump {
        for key in [USER, ADMIN, WRONG] {
            assert!(!row.contains(key), "a key in a row: {row}");
        }
    }

    let health = gw
        .call_versioned(Method::GET, "/health", USER, None)
        .await
        .json();
    let pg = &health["postgres"];
    assert_eq!(pg["backlog"], 0, "{health}");
    assert_eq!(pg["dropped"], 0, "{health}");
    assert_eq!(pg["dead_lettered"], 0, "{health}");
    assert_eq!(pg["last_error"], Value::Null, "{health}");
    let audit = &health["audit_writer"];
    assert_eq!(audit["queued"], 3, "{health}");
    assert_eq!(audit["written"], 3, "{health}");
    assert_eq!(audit["backlog"], 0, "{health}");
    assert_eq!(audit["dropped"], 0, "{health}");
}

/// The audit writer's `[queued, written, backlog, queue_full, failed, dropped]`.
fn counts(audit: &audit::Audit) -> [u64; 6] {
    let h = audit.health().expect("a PostgreSQL writer");
    assert_eq!(h.queued, h.written + h.failed + h.backlog, "{h:?}");
    assert_eq!(h.dropped, h.queue_full + h.failed, "{h:?}");
    [
        h.queued,
        h.written,
        h.backlog,
        h.queue_full,
        h.failed,
        h.dropped,
    ]
}

/// Events that found the audit queue full are dropped, never queued: they do not hide the
/// events still waiting in the backlog (the backlog read 0 while 4 events waited), and a
/// batch PostgreSQL refuses after every retry leaves the backlog for `failed`.
#[tokio::test]
async fn the_audit_backlog_stays_true_after_queue_full_drops() {
    use palisade::cost::sink::{PostgresConfig, PostgresSink};
    let server = pg::Postgres::start();
    let url = server.database("audit_backlog").await;
    let sink = PostgresSink::connect(PostgresConfig::new(url.as_str())).unwrap();
    sink.migrate().await.unwrap();
    let audit = audit::Audit::postgres_with_capacity(sink, 4);
    let event = |i: usize| audit::AuditEntry::new("auth_failed", "refused").target(format!("#{i}"));

    // PostgreSQL away; 20 events at once (the writer has not run yet): 4 fit the queue.
    server.stop();
    for i in 0..20 {
        audit.record(event(i));
    }
    assert_eq!(counts(&audit), [4, 0, 4, 16, 0, 16]);

    // The writer gives up on those 4 after its retries: no backlog, 20 dropped in all.
    assert!(audit.flush().await);
    assert_eq!(counts(&audit), [4, 0, 0, 16, 4, 20]);
    assert!(audit.health().unwrap().last_error.is_some());

    // PostgreSQL back: new events are written, the counts add up.
    server.resume();
    for i in 20..22 {
        audit.record(event(i));
    }
    assert!(audit.flush().await);
    assert_eq!(counts(&audit), [6, 2, 0, 16, 4, 20]);
    let db = client(&url).await;
    let rows: i64 = db
        .query_one("SELECT count(*) FROM audit_logs", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 2);
}

/// A budget refusal (a 429 with `x-should-retry: false`) is one audit row too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_refusal_is_audited() {
    let server = pg::Postgres::start();
    let url = server.database("budget").await;
    // One request reserves about $0.00404: the first fits in $0.00405, the second no
    // longer does once the first settled.
    let gw = start(&url, &[("PALISADE_GATEWAY_DAILY_BUDGET", "0.00405")]).await;
    let db = client(&url).await;
    assert_eq!(gw.alice_chat(false).await.status, 200);
    wait_count(&db, "SELECT count(*) FROM usage_logs", 1).await;
    let a = gw.alice_chat(false).await;
    assert_eq!(a.status, 429, "{}", String::from_utf8_lossy(&a.body));
    assert!(gw.state.audit.flush().await);
    let rows = db
        .query("SELECT action, actor, outcome FROM audit_logs", &[])
        .await
        .unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].get::<_, String>(0), "budget_refused");
    assert_eq!(
        rows[0].get::<_, Option<String>>(1).as_deref(),
        Some("alice")
    );
    assert_eq!(rows[0].get::<_, String>(2), "refused");
}

/// Refused and failed attempts are security events too: a user key reading another
/// user's usage, an admin call with a body the gateway refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forbidden_usage_read_and_refused_admin_calls_are_audited() {
    let server = pg::Postgres::start();
    let url = server.database("refusals").await;
    let gw = start(&url, &[]).await;
    let db = client(&url).await;
    let a = gw
        .call_versioned(Method::GET, "/v1/usage?user=ops", USER, None)
        .await;
    assert_eq!(a.status, 403, "{}", String::from_utf8_lossy(&a.body));
    let a = gw
        .call_versioned(
            Method::PUT,
            "/admin/budgets/alice",
            ADMIN,
            Some(json!({"daily_limit_usd": "lots"})),
        )
        .await;
    assert_eq!(a.status, 400, "{}", String::from_utf8_lossy(&a.body));
    let a = gw
        .call_versioned(
            Method::POST,
            "/admin/rate-limits/reset",
            ADMIN,
            Some(json!({"user": "alice", "rules": ["no_such_rule"]})),
        )
        .await;
    assert_eq!(a.status, 400, "{}", String::from_utf8_lossy(&a.body));
    assert!(gw.state.audit.flush().await);
    let rows = db
        .query(
            "SELECT action, actor, outcome FROM audit_logs ORDER BY id",
            &[],
        )
        .await
        .unwrap();
    let got: Vec<(String, Option<String>, String)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let want = [
        ("forbidden", "alice", "refused"),
        ("budget_set", "ops", "failed"),
        ("rate_limits_reset", "ops", "failed"),
    ];
    assert_eq!(
        got,
        want.map(|(a, b, c)| (a.to_owned(), Some(b.to_owned()), c.to_owned())),
    );
}

/// The gateway applies the ledger's migrations at start-up, and a second instance on the
/// same database starts too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_are_applied_at_start_up_by_every_instance() {
    let server = pg::Postgres::start();
    let url = server.database("migrate").await;
    let _one = start(&url, &[]).await;
    let _two = start(&url, &[]).await;
    let db = client(&url).await;
    let n: i64 = db
        .query_one("SELECT count(*) FROM palisade_schema_migrations", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, palisade::cost::sink::MIGRATIONS.len() as i64);
}

/// An unreachable server is a start-up error that names the variable.
#[tokio::test]
async fn an_unreachable_database_fails_start_up() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut env = Env::from_pairs([
        ("PALISADE_GATEWAY_API_KEYS", format!("alice={USER}")),
        (
            "DATABASE_URL",
            format!("postgres://ledger:s3cret@127.0.0.1:{port}/none?connect_timeout=1"),
        ),
    ]);
    let config = config::GatewayConfig::from_env(&mut env);
    env.finish().expect("a valid URL");
    let Err(e) = app::build(config).await else {
        panic!("the gateway started without its database");
    };
    let text = e.to_string();
    assert!(text.contains("DATABASE_URL"), "{text}");
    assert!(!text.contains("s3cret"), "{text}");
}

/// "Served by a fallback" was kept in the gateway's memory only, keyed by the request id:
/// `usage_logs` could not tell. The record carries the mark now, into PostgreSQL and into
/// the in-memory ledger behind `/v1/usage`; the primary's refused attempt carries none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_served_by_the_fallback_says_so_in_its_usage_row() {
    let server = pg::Postgres::start();
    let url = server.database("fallback").await;
    let gw = start(
        &url,
        &[
            ("PALISADE_GATEWAY_FALLBACK_MODEL", "claude-haiku-4-5"),
            ("PALISADE_RETRY_MAX_RETRIES", "0"),
        ],
    )
    .await;
    let db = client(&url).await;
    let body = json!({
        "model": "mock-overloaded",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": "Hello there"}]
    });
    let a = gw.post("/v1/messages", USER, body).await;
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    // the primary's 529 and the fallback's answer
    wait_count(&db, "SELECT count(*) FROM usage_logs", 2).await;
    let rows = db
        .query(
            "SELECT status, fallback, model FROM usage_logs ORDER BY status",
            &[],
        )
        .await
        .unwrap();
    let rows: Vec<(i16, Option<String>, Option<String>)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(
        (rows[0].0, rows[0].1.as_deref(), rows[0].2.as_deref()),
        (
            200,
            Some("model:claude-haiku-4-5"),
            Some("claude-haiku-4-5")
        ),
        "{rows:?}"
    );
    assert_eq!((rows[1].0, rows[1].1.as_deref()), (529, None), "{rows:?}");

    let usage = usage_when(&gw, "/v1/usage", |u| u["report"]["fallbacks"] != 0).await;
    assert_eq!(usage["report"]["fallbacks"], 1, "{usage}");
    assert_eq!(
        usage["report"]["by_fallback"]["model:claude-haiku-4-5"]["requests"], 1,
        "{usage}"
    );
}
