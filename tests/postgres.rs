//! The PostgreSQL ledger against a real server started by the harness.
#![cfg(feature = "postgres")]

#[path = "support/postgres.rs"]
mod pg;
#[path = "support/records.rs"]
mod records;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use palisade::cost::sink::{AuditEvent, PostgresConfig, PostgresSink, UsageSink};
use palisade::cost::summary::{Subject, summarize, top};
use palisade::cost::{MemorySink, Money, RecorderConfig, UsageRecord, UsageRecorder};
use palisade::key::ApiKeyId;
use records::{USERS, assert_dead_letter, record};

async fn count(url: &str, sql: &str) -> i64 {
    let client = pg::client(url).await;
    client.query_one(sql, &[]).await.unwrap().get(0)
}

/// Applies the first `n` migrations the way a release that had only those did.
async fn migrate_by_hand(client: &tokio_postgres::Client, n: usize) {
    client
        .batch_execute(
            "CREATE TABLE palisade_schema_migrations (version integer PRIMARY KEY, \
             name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())",
        )
        .await
        .unwrap();
    for (version, name, sql) in &palisade::cost::sink::MIGRATIONS[..n] {
        client.batch_execute(sql).await.unwrap();
        client
            .execute(
                "INSERT INTO palisade_schema_migrations (version, name) VALUES ($1, $2)",
                &[version, name],
            )
            .await
            .unwrap();
    }
}

fn window() -> (SystemTime, SystemTime) {
    (UNIX_EPOCH, UNIX_EPOCH + Duration::from_secs(2_000_000_000))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_records_under_load_are_stored_exactly_once_and_sum_like_the_memory_sink() {
    let server = pg::Postgres::start();
    let url = server.database("load").await;
    let sink = PostgresSink::connect(PostgresConfig::new(url.clone())).unwrap();
    assert_eq!(sink.migrate().await.unwrap(), [1, 2, 3, 4, 5, 6, 7, 8]);
    let config = RecorderConfig {
        capacity: 20_000,
        max_batch: 1000,
        ..RecorderConfig::default()
    };
    let (recorder, shutdown) = UsageRecorder::spawn(sink.clone(), config);
    let memory = Arc::new(MemorySink::new());
    let records: Arc<Vec<UsageRecord>> = Arc::new((0..10_000).map(record).collect());
    let producers: Vec<_> = (0..8usize)
        .map(|p| {
            let recorder = recorder.clone();
            let records = Arc::clone(&records);
            tokio::spawn(async move {
                for i in (p..10_000).step_by(8) {
                    assert!(recorder.record(records[i].clone()));
                    if i % 64 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
            })
        })
        .collect();
    for p in producers {
        p.await.unwrap();
    }
    memory.record_batch(&records).await.unwrap();
    let stats = shutdown.shutdown().await;
    assert_eq!(stats.written, 10_000);
    // records a caller sends again are stored once, and counted as duplicates
    sink.record_batch(&records[..500]).await.unwrap();
    let health = sink.health();
    assert_eq!(
        (health.accepted, health.delivered, health.duplicates),
        (10_500, 10_500, 500)
    );
    assert_eq!(
        (health.dropped, health.backlog, health.last_error.clone()),
        (0, 0, None)
    );
    assert_eq!(count(&url, "SELECT count(*) FROM usage_logs").await, 10_000);
    assert_eq!(
        count(&url, "SELECT count(DISTINCT record_id) FROM usage_logs").await,
        10_000
    );

    let (from, to) = window();
    let mut subjects = vec![
        Subject::All,
        Subject::Anonymous,
        Subject::Bot("helper".into()),
    ];
    subjects.extend(USERS.iter().map(|u| Subject::User((*u).to_owned())));
    subjects.push(Subject::ApiKey(ApiKeyId::from_key("sk-3")));
    for subject in &subjects {
        let sql = sink.summary(subject, from, to).await.unwrap();
        let mem = summarize(&memory.records(), subject, from, to);
        assert_eq!(sql, mem, "{subject:?}");
    }
    // a window inside the data, cutting days
    let a = UNIX_EPOCH + Duration::from_secs(1_767_225_600 + 40_000);
    let b = a + Duration::from_secs(100_000);
    assert_eq!(
        sink.summary(&Subject::User("ann".into()), a, b)
            .await
            .unwrap(),
        summarize(&memory.records(), &Subject::User("ann".into()), a, b)
    );
    assert_eq!(
        sink.top(5, from, to).await.unwrap(),
        top(&memory.records(), 5, from, to)
    );
    assert_eq!(
        sink.top(50, a, b).await.unwrap(),
        top(&memory.records(), 50, a, b)
    );

    // the daily statistics view
    sink.refresh_stats().await.unwrap();
    let stats_requests = count(&url, "SELECT sum(requests)::int8 FROM user_usage_stats").await;
    assert_eq!(stats_requests, 10_000);
    let ann = count(
        &url,
        "SELECT sum(requests)::int8 FROM user_usage_stats WHERE user_id = 'ann'",
    )
    .await;
    let mem_ann = summarize(&memory.records(), &Subject::User("ann".into()), from, to);
    assert_eq!(ann as u64, mem_ann.total.requests);
}

#[tokio::test]
async fn migrations_run_twice_or_at_once_are_a_no_op() {
    let server = pg::Postgres::start();
    let url = server.database("migrate").await;
    let a = PostgresSink::connect(PostgresConfig::new(url.clone())).unwrap();
    let b = PostgresSink::connect(PostgresConfig::new(url.clone())).unwrap();
    let (ra, rb) = tokio::join!(a.migrate(), b.migrate());
    let mut applied = ra.unwrap();
    applied.extend(rb.unwrap());
    assert_eq!(
        applied,
        [1, 2, 3, 4, 5, 6, 7, 8],
        "each migration applied once"
    );
    assert!(a.migrate().await.unwrap().is_empty());
    assert_eq!(
        count(&url, "SELECT count(*) FROM palisade_schema_migrations").await,
        palisade::cost::sink::MIGRATIONS.len() as i64
    );
}

#[tokio::test]
async fn a_user_role_sees_only_its_own_rows() {
    let server = pg::Postgres::start();
    let url = server.database("rls").await;
    let sink = PostgresSink::connect(PostgresConfig::new(url.clone())).unwrap();
    sink.migrate().await.unwrap();
    let records: Vec<UsageRecord> = (1..=700).map(record).collect();
    sink.record_batch(&records).await.unwrap();
    let anns = records
        .iter()
        .filter(|r| r.attribution.user.as_deref() == Some("ann"))
        .count() as i64;
    assert!(anns > 0);
    let client = pg::client(&url).await;
    client
        .batch_execute("SET ROLE palisade_user")
        .await
        .unwrap();
    let seen: i64 = client
        .query_one("SELECT count(*) FROM usage_logs", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(seen, 0, "no app.user_id: no rows");
    client
        .batch_execute("SET app.user_id = 'ann'")
        .await
        .unwrap();
    let row = client
        .query_one(
            "SELECT count(*), count(*) FILTER (WHERE user_id IS DISTINCT FROM 'ann') FROM usage_logs",
            &[],
        )
        .await
        .unwrap();
    assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1)), (anns, 0));
    // and it cannot write
    assert!(
        client
            .batch_execute("DELETE FROM usage_logs")
            .await
            .is_err()
    );
    // nor read the tables that are not granted to it (every user's records are in the
    // dead letters; the batch ids are the sink's own)
    for table in [
        "audit_logs",
        "usage_dead_letters",
        "usage_batches",
        "user_usage_stats",
    ] {
        let read = client
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await;
        assert!(read.is_err(), "{table} is readable: {read:?}");
    }
}

#[tokio::test]
async fn audit_events_are_stored() {
    let server = pg::Postgres::start();
    let url = server.database("audit").await;
    let sink = PostgresSink::connect(PostgresConfig::new(url.clone())).unwrap();
    sink.migrate().await.unwrap();
    sink.audit(&[
        AuditEvent::new("auth_failure", "refused").actor("203.0.113.9"),
        AuditEvent::new("budget_refused", "refused")
            .actor("ann")
            .target("daily"),
        AuditEvent::new("bot_deleted", "allowed")
            .actor("admin")
            .target("bot_7")
            .detail("by request"),
    ])
    .await
    .unwrap();
    assert_eq!(count(&url, "SELECT count(*) FROM audit_logs").await, 3);
    assert_eq!(
        count(&url, "SELECT count(*) FROM audit_logs WHERE actor = 'ann' AND action = 'budget_refused' AND target = 'daily'").await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_stopped_and_restarted_mid_run_loses_nothing_uncounted() {
    let server = pg::Postgres::start();
    let url = server.database("restart").await;
    let mut config = PostgresConfig::new(url.clone());
    config.max_buffer = 2_500;
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
    let send = |range: std::ops::Range<u64>| {
        let recorder = recorder.clone();
        async move {
            for i in range {
                recorder.record(record(i));
                if i % 50 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        }
    };
    send(0..2_000).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    server.stop();
    send(2_000..6_000).await; // the server is away: buffered up to 2 500, then dropped
    tokio::time::sleep(Duration::from_millis(300)).await;
    let away = sink.health();
    assert!(away.last_error.is_some(), "{away:?}");
    server.resume();
    send(6_000..8_000).await;
    let stats = shutdown.shutdown().await; // flushes the backlog
    let h = sink.health();
    eprintln!("recorder {stats:?}\nsink {h:?}");
    let sent = 8_000u64;
    assert_eq!(h.backlog, 0, "{h:?}");
    assert_eq!(h.accepted, stats.written);
    assert_eq!(h.accepted, h.delivered + h.dropped);
    // every record sent is stored once, or counted dropped (by the sink's buffer or the
    // recorder's queue), never both and never neither
    assert_eq!(
        h.delivered + h.dropped + stats.dropped_full + stats.failed,
        sent
    );
    assert!(
        h.dropped + stats.dropped_full > 0,
        "the outage was long enough to drop"
    );
    let stored = count(&url, "SELECT count(*) FROM usage_logs").await as u64;
    assert_eq!(stored, h.delivered - h.duplicates);
    assert_eq!(
        count(&url, "SELECT count(DISTINCT record_id) FROM usage_logs").await as u64,
        stored
    );
}

/// The request id comes from the client (`x-request-id`), and it was the ledger's unique
/// key: a second request sent with the same id was dropped as a "duplicate", so a client
/// could keep its own usage out of the ledger. The key is now the record's server-made id.
#[tokio::test]
async fn two_records_with_the_same_client_request_id_are_both_stored() {
    let server = pg::Postgres::start();
    let url = server.database("reqid").await;
    let sink = PostgresSink::connect(PostgresConfig::new(url.clone())).unwrap();
    sink.migrate().await.unwrap();
    let mut a = record(1);
    let mut b = record(2);
    a.request_id = Some("req_chosen_by_client".into());
    b.request_id = Some("req_chosen_by_client".into());
    // two records alike in every field but their id are two records too
    let c = record(3);
    let mut d = c.clone();
    d.id = palisade::cost::RecordId::generate();
    sink.record_batch(&[a, b, c.clone(), d]).await.unwrap();
    sink.record_batch(&[c]).await.unwrap(); // a retried record is stored once
    let h = sink.health();
    assert_eq!((h.delivered, h.duplicates, h.dropped), (5, 1, 0), "{h:?}");
    assert_eq!(
        count(
            &url,
            "SELECT count(*) FROM usage_logs WHERE request_id = 'req_chosen_by_client'"
        )
        .await,
        2
    );
    assert_eq!(count(&url, "SELECT count(*) FROM usage_logs").await, 4);
}

/// A record PostgreSQL refuses (text holding a NUL byte, which a `text` column cannot
/// store: SQLSTATE 22021) was retried for ever with its whole batch, and every record
/// behind it waited. The batch is now split: the refused records go to
/// `usage_dead_letters` with the error, counted, and the others are stored, once.
#[tokio::test]
async fn records_postgres_refuses_are_dead_lettered_and_the_rest_are_stored() {
    let server = pg::Postgres::start();
    let url = server.database("poison").await;
    let sink = PostgresSink::connect(PostgresConfig::new(url.clone())).unwrap();
    sink.migrate().await.unwrap();
    let mut records: Vec<UsageRecord> = (0..100).map(record).collect();
    for i in [3, 71] {
        records[i].route = "/v1/messages\0".into();
    }
    sink.record_batch(&records).await.unwrap();
    let h = sink.health();
    assert_eq!(
        (
            h.accepted,
            h.delivered,
            h.dead_lettered,
            h.dropped,
            h.backlog
        ),
        (100, 98, 2, 0, 0),
        "{h:?}"
    );
    assert_eq!(h.duplicates, 0, "{h:?}");
    assert_eq!(count(&url, "SELECT count(*) FROM usage_logs").await, 98);
    let client = pg::client(&url).await;
    let rows = client
        .query(
            "SELECT record_id, record::text, error FROM usage_dead_letters ORDER BY id",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 2);
    for (row, i) in rows.iter().zip([3, 71]) {
        assert_dead_letter(&records[i], row.get(0), row.get(1), row.get(2), "22021");
    }
    // sent again (a lost answer): nothing stored or set aside twice
    sink.record_batch(&records).await.unwrap();
    let h = sink.health();
    assert_eq!(
        (h.delivered, h.duplicates, h.dead_lettered, h.backlog),
        (196, 98, 4, 0),
        "{h:?}"
    );
    assert_eq!(count(&url, "SELECT count(*) FROM usage_logs").await, 98);
    assert_eq!(
        count(&url, "SELECT count(*) FROM usage_dead_letters").await,
        2
    );
}

/// A server that is away is not a refusal: the records wait, none is set aside, and they
/// are stored once it is back.
#[tokio::test]
async fn a_stopped_server_sets_nothing_aside() {
    let server = pg::Postgres::start();
    let url = server.database("away").await;
    let sink = PostgresSink::connect(PostgresConfig::new(url.clone())).unwrap();
    sink.migrate().await.unwrap();
    server.stop();
    let records: Vec<UsageRecord> = (0..10).map(record).collect();
    sink.record_batch(&records).await.unwrap();
    let h = sink.health();
    assert_eq!((h.dead_lettered, h.dropped, h.backlog), (0, 0, 10), "{h:?}");
    server.resume();
    let mut flushed = sink.flush().await;
    for _ in 0..100 {
        if flushed.is_ok() {
            break;
        }
        // a pooled connection from before the stop fails once
        assert!(flushed.as_ref().unwrap_err().is_retryable(), "{flushed:?}");
        flushed = sink.flush().await;
    }
    flushed.unwrap();
    let h = sink.health();
    assert_eq!(
        (h.delivered, h.dead_lettered, h.dropped, h.backlog),
        (10, 0, 0, 0),
        "{h:?}"
    );
}

/// A table created before record ids existed keeps its rows, gets ids, and accepts
/// records whose request ids repeat.
#[tokio::test]
async fn the_record_id_migration_keeps_existing_rows() {
    let server = pg::Postgres::start();
    let url = server.database("legacy").await;
    let client = pg::client(&url).await;
    migrate_by_hand(&client, 4).await;
    client
        .batch_execute(
            "INSERT INTO usage_logs (request_id, time, route, input_tokens, output_tokens, \
             cache_write_5m_tokens, cache_write_1h_tokens, cache_read_tokens, \
             web_search_requests, status, stream, completion, duration_ms, time_to_headers_ms) \
             VALUES ('req_old', now(), '/', 1, 0, 0, 0, 0, 0, 200, false, 'complete', 0, 0), \
             ('palisade:0123456789abcdef0123456789abcdef', now(), '/', 1, 0, 0, 0, 0, 0, 200, \
             false, 'complete', 0, 0)",
        )
        .await
        .unwrap();
    let sink = PostgresSink::connect(PostgresConfig::new(url.clone())).unwrap();
    assert_eq!(sink.migrate().await.unwrap(), [5, 6, 7, 8]);
    assert!(sink.migrate().await.unwrap().is_empty());
    assert_eq!(
        count(
            &url,
            "SELECT count(*) FROM usage_logs WHERE record_id = 'req_old' AND request_id = 'req_old'"
        )
        .await,
        1
    );
    assert_eq!(
        count(
            &url,
            "SELECT count(*) FROM usage_logs WHERE request_id IS NULL \
            AND record_id = 'palisade:0123456789abcdef0123456789abcdef'"
        )
        .await,
        1
    );
    let mut r = record(4);
    r.request_id = Some("req_old".into());
    sink.record_batch(&[r]).await.unwrap();
    assert_eq!(
        count(
            &url,
            "SELECT count(*) FROM usage_logs WHERE request_id = 'req_old'"
        )
        .await,
        2
    );
}

/// The fallback a response came from was kept only in the gateway's memory: the record
/// carries it now, and `usage_logs.fallback` stores it (NULL for rows stored before the
/// column, and for records no fallback served).
#[tokio::test]
async fn the_fallback_a_record_came_from_is_stored_and_old_rows_keep_null() {
    let server = pg::Postgres::start();
    let url = server.database("fallback").await;
    let client = pg::client(&url).await;
    migrate_by_hand(&client, 5).await;
    client
        .batch_execute(
            "INSERT INTO usage_logs (record_id, time, route, input_tokens, output_tokens, \
             cache_write_5m_tokens, cache_write_1h_tokens, cache_read_tokens, \
             web_search_requests, status, stream, completion, duration_ms, time_to_headers_ms) \
             VALUES ('old', now(), '/', 1, 0, 0, 0, 0, 0, 200, false, 'complete', 0, 0)",
        )
        .await
        .unwrap();
    let sink = PostgresSink::connect(PostgresConfig::new(url.clone())).unwrap();
    assert_eq!(sink.migrate().await.unwrap(), [6, 7, 8]);
    let mut served = record(1);
    served.fallback = Some("model:claude-haiku-4-5".into());
    let plain = record(2);
    sink.record_batch(&[served.clone(), plain.clone()])
        .await
        .unwrap();
    let row = |id: String| {
        let client = &client;
        async move {
            client
                .query_one(
                    "SELECT fallback FROM usage_logs WHERE record_id = $1",
                    &[&id],
                )
                .await
                .unwrap()
                .get::<_, Option<String>>(0)
        }
    };
    assert_eq!(
        row(served.id.to_string()).await.as_deref(),
        Some("model:claude-haiku-4-5")
    );
    assert_eq!(row(plain.id.to_string()).await, None);
    assert_eq!(row("old".to_owned()).await, None);
}

/// `usage_logs.cost` is a bigint of pico-dollars: a cost past `i64::MAX` (about $9.2
/// million) was stored as `i64::MAX`, a wrong amount counted as delivered. The record
/// is set aside with the reason, and the records around it are stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cost_past_the_column_is_set_aside_not_stored_wrong() {
    let server = pg::Postgres::start();
    let url = server.database("bigcost").await;
    let sink = PostgresSink::connect(PostgresConfig::new(url.clone())).unwrap();
    sink.migrate().await.unwrap();
    let mut records: Vec<UsageRecord> = (1..5).map(record).collect();
    records[2].cost = Some(Money::from_picos(i64::MAX as u128 + 1));
    sink.record_batch(&records).await.unwrap();
    let h = sink.health();
    assert_eq!(
        (h.delivered, h.dead_lettered, h.dropped, h.backlog),
        (3, 1, 0, 0),
        "{h:?}"
    );
    assert_eq!(count(&url, "SELECT count(*) FROM usage_logs").await, 3);
    assert_eq!(
        count(
            &url,
            "SELECT count(*) FROM usage_logs WHERE cost_picos = 9223372036854775807"
        )
        .await,
        0
    );
    assert_eq!(
        count(&url, "SELECT count(*) FROM usage_dead_letters").await,
        1
    );
}

/// Whether `bytes`, PostgreSQL backend messages, hold a BindComplete: the start of the
/// answer to a statement's execution, which the server sends only after the implicit
/// transaction of its `Sync` has committed.
fn answers_a_bind(mut bytes: &[u8]) -> bool {
    while let [kind, a, b, c, d, ..] = bytes {
        if *kind == b'2' {
            return true;
        }
        let len = u32::from_be_bytes([*a, *b, *c, *d]) as usize;
        bytes = bytes.get(1 + len..).unwrap_or(&[]);
    }
    false
}

/// A TCP relay on 127.0.0.1 to the test server that, once `cut` is set, swallows the
/// next answer to a statement's execution and closes that connection: what the server did
/// stays done, and the client sees its connection lost.
async fn relay_losing_one_answer(server_port: u16, cut: Arc<std::sync::atomic::AtomicBool>) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((client, _)) = listener.accept().await else {
                return;
            };
            let server = tokio::net::TcpStream::connect(("127.0.0.1", server_port))
                .await
                .unwrap();
            let (mut client_read, mut client_write) = client.into_split();
            let (mut server_read, mut server_write) = server.into_split();
            let up = tokio::spawn(async move {
                let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
            });
            let cut = Arc::clone(&cut);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = match server_read.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    // the answer to the batch's statement, sent once it is committed (not
                    // one to a statement closed in the background)
                    if answers_a_bind(&buf[..n])
                        && cut.swap(false, std::sync::atomic::Ordering::SeqCst)
                    {
                        break; // the answer is lost with the connection
                    }
                    if client_write.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                up.abort();
            });
        }
    });
    port
}

/// Sends 200 records to `db` on `server` through a relay that loses the answer to the
/// commit of the second batch (199 records): the sink sends that batch again under its
/// id. Returns the sink, flushed.
async fn lose_one_commit_answer(server: &pg::Postgres, db: &str) -> PostgresSink {
    let url = format!("postgres://postgres@127.0.0.1:{}/{db}", server.port());
    let cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let port = relay_losing_one_answer(server.port(), Arc::clone(&cut)).await;
    let relayed = format!("postgres://postgres@127.0.0.1:{port}/{db}");
    let sink = PostgresSink::connect(PostgresConfig::new(relayed)).unwrap();
    let before = count(&url, "SELECT count(*) FROM usage_logs").await;
    let records: Vec<UsageRecord> = (0..200).map(record).collect();
    // the pool's connection is open and the insert prepared: the next answer is the
    // insert's, sent once it is committed
    sink.record_batch(&records[..1]).await.unwrap();
    cut.store(true, std::sync::atomic::Ordering::SeqCst);
    sink.record_batch(&records[1..]).await.unwrap();
    let h = sink.health();
    assert_eq!((h.accepted, h.delivered, h.backlog), (200, 1, 199), "{h:?}");
    assert!(h.last_error.is_some(), "{h:?}");
    assert_eq!(
        count(&url, "SELECT count(*) FROM usage_logs").await,
        before + 200,
        "the lost answer's batch was committed"
    );
    sink.flush().await.unwrap();
    sink
}

/// A batch whose insert was committed but whose answer was lost with the connection is
/// sent again: the retry adds no row (each record's id is unique), and every record is
/// delivered once. The retry counted its 199 records as duplicates, though no client
/// sent a record twice: the batch's id, noted with its rows, now answers the retry with
/// the count of its first store.
#[tokio::test]
async fn a_batch_whose_commit_answer_was_lost_is_stored_once_and_counts_no_duplicate() {
    let server = pg::Postgres::start();
    let url = server.database("lostanswer").await;
    let direct = PostgresSink::connect(PostgresConfig::new(url.clone())).unwrap();
    direct.migrate().await.unwrap();
    let sink = lose_one_commit_answer(&server, "lostanswer").await;
    let h = sink.health();
    assert_eq!(
        (
            h.accepted,
            h.delivered,
            h.duplicates,
            h.backlog,
            h.last_error
        ),
        (200, 200, 0, 0, None)
    );
    assert_eq!(count(&url, "SELECT count(*) FROM usage_logs").await, 200);
    assert_eq!(
        count(&url, "SELECT count(DISTINCT record_id) FROM usage_logs").await,
        200
    );
    // one row per batch id, with the count of its first store
    assert_eq!(
        count(
            &url,
            "SELECT count(*) FROM usage_batches WHERE fresh IN (1, 199)"
        )
        .await,
        2
    );

    // a record a client really sends twice still counts, once
    let twice = record(1_000);
    sink.record_batch(std::slice::from_ref(&twice))
        .await
        .unwrap();
    sink.record_batch(&[twice, record(1_001)]).await.unwrap();
    let h = sink.health();
    assert_eq!((h.delivered, h.duplicates), (203, 1), "{h:?}");
    assert_eq!(count(&url, "SELECT count(*) FROM usage_logs").await, 202);
}

/// A batch some of whose records another batch stored before, and whose commit answer was
/// lost: the retry answers what its first store did, so exactly the records stored before
/// count as duplicates (they are ones a caller sent twice), and the sink's own retry adds
/// none.
#[tokio::test]
async fn a_partly_stored_batch_whose_commit_answer_was_lost_counts_only_its_old_records() {
    let server = pg::Postgres::start();
    let url = server.database("partlost").await;
    let direct = PostgresSink::connect(PostgresConfig::new(url.clone())).unwrap();
    direct.migrate().await.unwrap();
    let records: Vec<UsageRecord> = (0..200).map(record).collect();
    direct.record_batch(&records[100..150]).await.unwrap();
    assert_eq!(direct.health().delivered, 50);
    let cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let port = relay_losing_one_answer(server.port(), Arc::clone(&cut)).await;
    let relayed = format!("postgres://postgres@127.0.0.1:{port}/partlost");
    let sink = PostgresSink::connect(PostgresConfig::new(relayed)).unwrap();
    sink.record_batch(&records[..1]).await.unwrap();
    cut.store(true, std::sync::atomic::Ordering::SeqCst);
    sink.record_batch(&records[1..]).await.unwrap();
    let h = sink.health();
    assert_eq!(
        (h.delivered, h.backlog),
        (1, 199),
        "the answer was lost: {h:?}"
    );
    assert_eq!(count(&url, "SELECT count(*) FROM usage_logs").await, 200);
    sink.flush().await.unwrap();
    let h = sink.health();
    assert_eq!(
        (h.accepted, h.delivered, h.duplicates, h.backlog),
        (200, 200, 50, 0),
        "{h:?}"
    );
    assert_eq!(count(&url, "SELECT count(*) FROM usage_logs").await, 200);
}

/// A ledger at migration 0007 (before batch ids) upgrades to 0008 with its rows kept,
/// and a lost answer then counts no duplicate there too.
#[tokio::test]
async fn a_database_at_migration_7_upgrades_and_a_lost_answer_counts_no_duplicate() {
    let server = pg::Postgres::start();
    let url = server.database("at7").await;
    let client = pg::client(&url).await;
    migrate_by_hand(&client, 7).await;
    client
        .batch_execute(
            "INSERT INTO usage_logs (record_id, time, route, input_tokens, output_tokens, \
             cache_write_5m_tokens, cache_write_1h_tokens, cache_read_tokens, \
             web_search_requests, status, stream, completion, duration_ms, time_to_headers_ms) \
             VALUES ('old', now(), '/', 1, 0, 0, 0, 0, 0, 200, false, 'complete', 0, 0)",
        )
        .await
        .unwrap();
    let direct = PostgresSink::connect(PostgresConfig::new(url.clone())).unwrap();
    assert_eq!(direct.migrate().await.unwrap(), [8]);
    assert!(direct.migrate().await.unwrap().is_empty());
    assert_eq!(
        count(&url, "SELECT count(*) FROM palisade_schema_migrations").await,
        palisade::cost::sink::MIGRATIONS.len() as i64
    );
    let sink = lose_one_commit_answer(&server, "at7").await;
    let h = sink.health();
    assert_eq!((h.delivered, h.duplicates, h.backlog), (200, 0, 0), "{h:?}");
    assert_eq!(count(&url, "SELECT count(*) FROM usage_logs").await, 201);
}

/// Batch ids are kept a day: the sink deletes older ones (on its first store, then at
/// most once a minute), and a fresh one stays.
#[tokio::test]
async fn batch_ids_older_than_a_day_are_deleted() {
    let server = pg::Postgres::start();
    let url = server.database("prune").await;
    let sink = PostgresSink::connect(PostgresConfig::new(url.clone())).unwrap();
    sink.migrate().await.unwrap();
    let client = pg::client(&url).await;
    client
        .batch_execute(
            "INSERT INTO usage_batches (batch_id, fresh, applied_at) VALUES \
             ('stale', 3, now() - interval '25 hours'), \
             ('recent', 2, now() - interval '23 hours')",
        )
        .await
        .unwrap();
    sink.record_batch(&[record(1), record(2)]).await.unwrap();
    let ids: Vec<(String, i64)> = client
        .query(
            "SELECT batch_id, fresh FROM usage_batches ORDER BY applied_at",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(ids.len(), 2, "{ids:?}");
    assert_eq!(ids[0], ("recent".to_owned(), 2));
    assert_eq!(ids[1].1, 2, "{ids:?}");
}
