//! The Redis usage sink against a real redis-server (and a real Cluster) started by the
//! harness.
#![cfg(feature = "redis")]

#[path = "support/records.rs"]
mod records;
mod support;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use palisade::cost::sink::{RedisSink, RedisSinkConfig, UsageSink};
use palisade::cost::summary::{Subject, summarize, top};
use palisade::cost::{
    Attribution, MemorySink, Money, RecorderConfig, Usage, UsageRecord, UsageRecorder,
};
use palisade::key::ApiKeyId;
use records::{USERS, assert_dead_letter, record};

async fn manager(url: &str) -> redis::aio::ConnectionManager {
    let client = redis::Client::open(url).unwrap();
    redis::aio::ConnectionManager::new(client).await.unwrap()
}

/// Whole UTC days: 2025-12-31 up to 2026-01-06.
fn window() -> (SystemTime, SystemTime) {
    let day = |d: u64| UNIX_EPOCH + Duration::from_secs((20_453 + d) * 86_400);
    (day(0), day(6))
}

async fn xlen(url: &str, key: &str) -> u64 {
    let mut conn = manager(url).await;
    redis::cmd("XLEN")
        .arg(key)
        .query_async(&mut conn)
        .await
        .unwrap()
}

/// The sink's health once its backlog is stored: flushes (each try one answer from
/// Redis, no backoff) until nothing waits; the counters add up at every step.
async fn drained<C>(sink: &RedisSink<C>) -> palisade::cost::sink::SinkHealth
where
    C: redis::aio::ConnectionLike + Clone + Send + Sync + 'static,
{
    for _ in 0..100 {
        let flushed = sink.flush().await;
        let h = sink.health();
        assert_eq!(h.accepted, h.delivered + h.dropped + h.backlog, "{h:?}");
        match flushed {
            Ok(()) => return h,
            Err(e) => assert!(e.is_retryable(), "{e}"),
        }
    }
    panic!("Redis never took the backlog: {:?}", sink.health());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_records_under_load_are_counted_once_and_sum_like_the_memory_sink() {
    let server = support::RedisServer::start()
        .await
        .expect("redis-server is required");
    let sink = RedisSink::new(manager(&server.url()).await, RedisSinkConfig::default());
    let (recorder, shutdown) = UsageRecorder::spawn(
        sink.clone(),
        RecorderConfig {
            capacity: 20_000,
            max_batch: 1000,
            ..RecorderConfig::default()
        },
    );
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
    let stats = shutdown.shutdown().await;
    assert_eq!(stats.written, 10_000);
    // a batch delivered twice (a retry after a lost answer) counts once
    sink.record_batch(&records[..500]).await.unwrap();
    // Under load a write can outlast the connection's response timeout: its records then
    // wait in the sink's backlog (backing off), still counted. Wait for Redis to take them.
    let health = drained(&sink).await;
    assert_eq!(
        (health.accepted, health.delivered, health.duplicates),
        (10_500, 10_500, 500)
    );
    assert_eq!(
        (health.dropped, health.backlog, health.last_error.clone()),
        (0, 0, None)
    );
    assert_eq!(xlen(&server.url(), &sink.stream_key()).await, 10_000);

    let memory = MemorySink::new();
    memory.record_batch(&records).await.unwrap();
    let (from, to) = window();
    let mut subjects = vec![
        Subject::All,
        Subject::Anonymous,
        Subject::Bot("helper".into()),
    ];
    subjects.extend(USERS.iter().map(|u| Subject::User((*u).to_owned())));
    subjects.extend((0..5).map(|k| Subject::ApiKey(ApiKeyId::from_key(&format!("sk-{k}")))));
    for subject in &subjects {
        let redis = sink.summary(subject, from, to).await.unwrap();
        let mem = summarize(&memory.records(), subject, from, to);
        assert_eq!(redis, mem, "{subject:?}");
        assert!(
            mem.total.requests > 0 || *subject == Subject::Anonymous,
            "{subject:?}"
        );
    }
    // one whole day inside the data
    let a = from + Duration::from_secs(2 * 86_400);
    let b = a + Duration::from_secs(86_400);
    let ann = Subject::User("ann".into());
    assert_eq!(
        sink.summary(&ann, a, b).await.unwrap(),
        summarize(&memory.records(), &ann, a, b)
    );
    assert_eq!(
        sink.top(5, from, to).await.unwrap(),
        top(&memory.records(), 5, from, to)
    );
    assert_eq!(
        sink.top(50, a, b).await.unwrap(),
        top(&memory.records(), 50, a, b)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_stopped_and_restarted_mid_run_loses_nothing_uncounted() {
    let mut server = support::RedisServer::start()
        .await
        .expect("redis-server is required");
    let mut config = RedisSinkConfig::default();
    config.max_buffer = 2_500;
    config.max_backoff = Duration::from_millis(200);
    config.timeout = Duration::from_secs(1);
    let sink = RedisSink::new(manager(&server.url()).await, config);
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
    server.kill();
    send(2_000..6_000).await; // Redis is away: buffered up to 2 500, then dropped
    tokio::time::sleep(Duration::from_millis(300)).await;
    let away = sink.health();
    assert!(away.last_error.is_some(), "{away:?}");
    server.restart().await; // empty: what it held before is gone with it
    let before = sink.health().delivered;
    send(6_000..8_000).await;
    let stats = shutdown.shutdown().await; // flushes the backlog
    let h = sink.health();
    eprintln!("recorder {stats:?}\nsink {h:?}");
    let sent = 8_000u64;
    assert_eq!(h.backlog, 0, "{h:?}");
    assert_eq!(h.accepted, stats.written);
    assert_eq!(h.accepted, h.delivered + h.dropped);
    // every record sent is counted once, or counted dropped (by the sink's buffer or the
    // recorder's queue), never both and never neither
    assert_eq!(
        h.delivered + h.dropped + stats.dropped_full + stats.failed,
        sent
    );
    assert!(
        h.dropped + stats.dropped_full > 0,
        "the outage was long enough to drop"
    );
    // what was delivered after the restart is in the new server, once
    let after = h.delivered - before - h.duplicates;
    assert_eq!(xlen(&server.url(), &sink.stream_key()).await, after);
    let (from, to) = (UNIX_EPOCH, UNIX_EPOCH + Duration::from_secs(2_000_000_000));
    let all = sink.summary(&Subject::All, from, to).await.unwrap();
    assert_eq!(all.total.requests, after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_land_on_a_redis_cluster_in_one_slot_per_call() {
    let cluster = support::RedisCluster::start()
        .await
        .expect("redis-server is required");
    let client = redis::cluster::ClusterClient::new(cluster.urls()).unwrap();
    let conn = client.get_async_connection().await.unwrap();
    let sink = RedisSink::new(conn, RedisSinkConfig::default());
    let records: Vec<UsageRecord> = (0..300).map(record).collect();
    sink.record_batch(&records[..200]).await.unwrap();
    sink.record_batch(&records[100..]).await.unwrap();
    let h = sink.health();
    assert_eq!((h.delivered, h.duplicates, h.last_error), (400, 100, None));
    let (from, to) = window();
    let memory = MemorySink::new();
    memory.record_batch(&records).await.unwrap();
    for subject in [Subject::All, Subject::User("ann".into())] {
        assert_eq!(
            sink.summary(&subject, from, to).await.unwrap(),
            summarize(&memory.records(), &subject, from, to)
        );
    }
    assert_eq!(
        sink.top(3, from, to).await.unwrap(),
        top(&memory.records(), 3, from, to)
    );
}

/// Costs are u128 pico-dollars; Redis hash counters are 64-bit. A day's spend past
/// i64::MAX pico-dollars (about $9.2 million) on one model, or one record above it, must
/// still sum exactly like the memory sink, and no record may be half-counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spend_past_64_bits_of_pico_dollars_sums_exactly_like_the_memory_sink() {
    let server = support::RedisServer::start()
        .await
        .expect("redis-server is required");
    let sink = RedisSink::new(manager(&server.url()).await, RedisSinkConfig::default());
    let day = UNIX_EPOCH + Duration::from_secs(20_454 * 86_400);
    let big = |i: u64, picos: u128| {
        let mut r = UsageRecord::new(
            day + Duration::from_secs(i),
            Some("gpt-4o".to_owned()),
            Usage {
                input_tokens: 1,
                ..Usage::default()
            },
            Some(Money::from_picos(picos)),
        )
        .with_attribution(Attribution {
            user: Some("whale".to_owned()),
            ..Attribution::default()
        });
        r.route = "/v1/chat/completions".into();
        r
    };
    let records: Vec<UsageRecord> = vec![
        big(1, 5_000_000_000_000_000_001),
        big(2, 5_000_000_000_000_000_003), // the day's sum passes i64::MAX
        big(3, u128::from(u64::MAX) * 3 + 7), // one record past it
        big(4, 999_999_999_999),
    ];
    for r in &records {
        sink.record_batch(std::slice::from_ref(r)).await.unwrap();
    }
    sink.flush().await.unwrap();
    let health = sink.health();
    assert_eq!(
        (
            health.delivered,
            health.duplicates,
            health.dropped,
            health.backlog
        ),
        (4, 0, 0, 0),
        "{health:?}"
    );
    let memory = MemorySink::new();
    memory.record_batch(&records).await.unwrap();
    let (from, to) = window();
    for subject in [Subject::All, Subject::User("whale".into())] {
        let redis = sink.summary(&subject, from, to).await.unwrap();
        let mem = summarize(&memory.records(), &subject, from, to);
        assert_eq!(redis, mem, "{subject:?}");
    }
    assert_eq!(
        sink.top(5, from, to).await.unwrap(),
        top(&memory.records(), 5, from, to)
    );
}

/// A record Redis can never store (here a key of the wrong type in one user's daily
/// aggregate) was retried for ever and held every record behind it. It is now set aside
/// in the dead-letter stream, counted and stored nowhere else (its half-done writes
/// undone, so no aggregate holds part of it), and the records around it are stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_redis_refuses_is_dead_lettered_and_the_records_behind_it_flow_on() {
    let server = support::RedisServer::start()
        .await
        .expect("redis-server is required");
    let sink = RedisSink::new(manager(&server.url()).await, RedisSinkConfig::default());
    let day = UNIX_EPOCH + Duration::from_secs(20_454 * 86_400);
    let by = |user: &str, i: u64| {
        UsageRecord::new(
            day + Duration::from_secs(i),
            Some("gpt-4o".to_owned()),
            Usage {
                input_tokens: 10 + i,
                ..Usage::default()
            },
            Some(Money::from_picos(1_000_000 + u128::from(i))),
        )
        .with_attribution(Attribution {
            user: Some(user.to_owned()),
            ..Attribution::default()
        })
    };
    let records = vec![by("ann", 1), by("bob", 2), by("ann", 3)];
    // bob's aggregate for the day is taken by a key of another type
    let poisoned = "palisade:usage:{usage}:day:20454:user:bob";
    let mut conn = manager(&server.url()).await;
    let () = redis::cmd("SET")
        .arg(poisoned)
        .arg("not a hash")
        .query_async(&mut conn)
        .await
        .unwrap();
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
        (3, 2, 1, 0, 0),
        "{h:?}"
    );
    assert_eq!(h.duplicates, 0, "{h:?}");
    assert_eq!(xlen(&server.url(), &sink.stream_key()).await, 2);
    // the dead letter: bob's record, whole, and why
    let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(sink.dead_letter_key())
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(entries.len(), 1, "{entries:?}");
    let field = |name: &str| {
        entries[0]
            .1
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("no {name} in {entries:?}"))
    };
    assert_dead_letter(
        &records[1],
        &field("id"),
        &field("record"),
        &field("error"),
        "WRONGTYPE",
    );
    // the same batch again (a lost answer): nothing is stored or set aside twice
    sink.record_batch(&records).await.unwrap();
    let h = sink.health();
    assert_eq!(
        (h.delivered, h.duplicates, h.dead_lettered, h.backlog),
        (4, 2, 2, 0),
        "{h:?}"
    );
    assert_eq!(xlen(&server.url(), &sink.stream_key()).await, 2);
    assert_eq!(xlen(&server.url(), &sink.dead_letter_key()).await, 1);
    // the aggregates hold ann's records and nothing of bob's
    let memory = MemorySink::new();
    memory
        .record_batch(&[records[0].clone(), records[2].clone()])
        .await
        .unwrap();
    let (from, to) = window();
    for subject in [Subject::All, Subject::User("ann".into())] {
        assert_eq!(
            sink.summary(&subject, from, to).await.unwrap(),
            summarize(&memory.records(), &subject, from, to),
            "{subject:?}"
        );
    }
}

/// A token count past what a Redis counter holds (`i64::MAX`) can be neither added nor
/// cut down without the day's totals lying: the record is set aside whole, with why, and
/// the records around it are stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_count_past_a_redis_counter_is_dead_lettered_not_clamped() {
    let server = support::RedisServer::start()
        .await
        .expect("redis-server is required");
    let sink = RedisSink::new(manager(&server.url()).await, RedisSinkConfig::default());
    let mut records: Vec<UsageRecord> = (1..4).map(record).collect();
    records[1].usage.output_tokens = i64::MAX.unsigned_abs() + 1;
    sink.record_batch(&records).await.unwrap();
    let h = sink.health();
    assert_eq!(
        (h.delivered, h.dead_lettered, h.dropped, h.backlog),
        (2, 1, 0, 0),
        "{h:?}"
    );
    assert_eq!(xlen(&server.url(), &sink.stream_key()).await, 2);
    let mut conn = manager(&server.url()).await;
    let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(sink.dead_letter_key())
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(entries.len(), 1, "{entries:?}");
    let field = |name: &str| {
        entries[0]
            .1
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("no {name} in {entries:?}"))
    };
    assert_dead_letter(
        &records[1],
        &field("id"),
        &field("record"),
        &field("error"),
        "past what a Redis counter holds",
    );
    let memory = MemorySink::new();
    memory
        .record_batch(&[records[0].clone(), records[2].clone()])
        .await
        .unwrap();
    let (from, to) = window();
    assert_eq!(
        sink.summary(&Subject::All, from, to).await.unwrap(),
        summarize(&memory.records(), &Subject::All, from, to)
    );
}

/// In a long batch the refused record is found in one round trip and the records before
/// and after it are stored in order, none twice; a Redis that is away is not a refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_record_in_a_long_batch_is_set_aside_and_an_absent_redis_refuses_nothing() {
    let server = support::RedisServer::start()
        .await
        .expect("redis-server is required");
    let sink = RedisSink::new(manager(&server.url()).await, RedisSinkConfig::default());
    let mut records: Vec<UsageRecord> = (0..200).map(record).collect();
    let user = "poisoned-user";
    records[137].attribution.user = Some(user.to_owned());
    let day = records[137]
        .time
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        / 86_400;
    let mut conn = manager(&server.url()).await;
    let () = redis::cmd("LPUSH")
        .arg(format!("palisade:usage:{{usage}}:day:{day}:user:{user}"))
        .arg("x")
        .query_async(&mut conn)
        .await
        .unwrap();
    sink.record_batch(&records).await.unwrap();
    let h = sink.health();
    assert_eq!(
        (
            h.delivered,
            h.duplicates,
            h.dead_lettered,
            h.dropped,
            h.backlog
        ),
        (199, 0, 1, 0, 0),
        "{h:?}"
    );
    assert_eq!(xlen(&server.url(), &sink.dead_letter_key()).await, 1);
    // Redis away: the records wait, nothing is set aside
    drop(server);
    sink.record_batch(&records[..3]).await.unwrap();
    let h = sink.health();
    assert_eq!((h.dead_lettered, h.dropped, h.backlog), (1, 0, 3), "{h:?}");
    assert!(h.last_error.is_some(), "{h:?}");
}

/// The fallback a response came from travels in the stream entry's record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fallback_a_record_came_from_is_in_its_stream_entry() {
    let server = support::RedisServer::start()
        .await
        .expect("redis-server is required");
    let sink = RedisSink::new(manager(&server.url()).await, RedisSinkConfig::default());
    let mut served = record(1);
    served.fallback = Some("upstream:https://backup.example".into());
    sink.record_batch(&[served.clone(), record(2)])
        .await
        .unwrap();
    let mut conn = manager(&server.url()).await;
    let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(sink.stream_key())
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    let records: Vec<UsageRecord> = entries
        .iter()
        .map(|(_, fields)| {
            let json = &fields.iter().find(|(k, _)| k == "record").unwrap().1;
            serde_json::from_str(json).unwrap()
        })
        .collect();
    assert_eq!(records.len(), 2);
    assert_eq!(records[0], served);
    assert_eq!(records[1].fallback, None);
}

/// A Redis that cannot persist refuses writes with `MISCONF` until its disk is back: a
/// passing state. It was taken for a lasting refusal, so every record was split out,
/// refused again as a dead letter, and dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_cannot_persist_refuses_nothing_for_good() {
    let server = support::RedisServer::start()
        .await
        .expect("redis-server is required");
    let sink = RedisSink::new(manager(&server.url()).await, RedisSinkConfig::default());
    let mut conn = manager(&server.url()).await;
    // snapshots on, into the server's directory, which is then removed: the next fails
    for (k, v) in [("save", "3600 1"), ("stop-writes-on-bgsave-error", "yes")] {
        let () = redis::cmd("CONFIG")
            .arg("SET")
            .arg(k)
            .arg(v)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let (_, dir): (String, String) = redis::cmd("CONFIG")
        .arg("GET")
        .arg("dir")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(dir.contains("palisade-redis"), "{dir}");
    std::fs::remove_dir_all(&dir).unwrap();
    let _: redis::Value = redis::cmd("BGSAVE").query_async(&mut conn).await.unwrap();
    loop {
        let info: String = redis::cmd("INFO")
            .arg("persistence")
            .query_async(&mut conn)
            .await
            .unwrap();
        if info.contains("rdb_last_bgsave_status:err") {
            break;
        }
        tokio::task::yield_now().await;
    }
    let records: Vec<UsageRecord> = (0..3).map(record).collect();
    sink.record_batch(&records).await.unwrap();
    let h = sink.health();
    assert_eq!((h.dead_lettered, h.dropped, h.backlog), (0, 0, 3), "{h:?}");
    assert!(
        h.last_error.as_deref().unwrap_or("").contains("MISCONF"),
        "{h:?}"
    );
    // the disk is back: everything is stored, nothing set aside
    let () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("stop-writes-on-bgsave-error")
        .arg("no")
        .query_async(&mut conn)
        .await
        .unwrap();
    sink.flush().await.unwrap();
    let h = sink.health();
    assert_eq!(
        (h.delivered, h.dead_lettered, h.dropped, h.backlog),
        (3, 0, 0, 0),
        "{h:?}"
    );
    assert_eq!(xlen(&server.url(), &sink.stream_key()).await, 3);
    assert_eq!(xlen(&server.url(), &sink.dead_letter_key()).await, 0);
}

/// A connection to a real Redis that loses the answer to the next `lose` script calls
/// Redis carried out: the write lands, and the sink sees a broken connection (as when an
/// answer outlasts the sink's timeout).
#[derive(Clone)]
struct LosesAnswers {
    conn: redis::aio::ConnectionManager,
    lose: Arc<std::sync::atomic::AtomicUsize>,
}

impl redis::aio::ConnectionLike for LosesAnswers {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        Box::pin(async move {
            let answer = self.conn.req_packed_command(cmd).await;
            let script = cmd.args_iter().next().is_some_and(|a| {
                matches!(a, redis::Arg::Simple(n) if n.eq_ignore_ascii_case(b"EVALSHA") || n.eq_ignore_ascii_case(b"EVAL"))
            });
            if script
                && matches!(&answer, Ok(v) if !matches!(v, redis::Value::ServerError(_)))
                && self
                    .lose
                    .fetch_update(
                        std::sync::atomic::Ordering::SeqCst,
                        std::sync::atomic::Ordering::SeqCst,
                        |n| n.checked_sub(1),
                    )
                    .is_ok()
            {
                return Err(redis::RedisError::from(std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    "the answer was lost",
                )));
            }
            answer
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        self.conn.req_packed_commands(pipeline, offset, count)
    }

    fn get_db(&self) -> i64 {
        self.conn.get_db()
    }
}

/// A batch whose write landed in Redis but whose answer was lost is sent again: the
/// retry changes nothing, and its records are delivered once, not reported as
/// duplicates; a batch the caller hands over again still is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_whose_answer_was_lost_is_retried_and_counted_once() {
    let server = support::RedisServer::start()
        .await
        .expect("redis-server is required");
    let lose = Arc::new(std::sync::atomic::AtomicUsize::new(1));
    let conn = LosesAnswers {
        conn: manager(&server.url()).await,
        lose: Arc::clone(&lose),
    };
    let sink = RedisSink::new(conn, RedisSinkConfig::default());
    let records: Vec<UsageRecord> = (0..300).map(record).collect();
    sink.record_batch(&records).await.unwrap();
    let h = sink.health();
    assert_eq!((h.accepted, h.delivered, h.backlog), (300, 0, 300), "{h:?}");
    assert!(h.last_error.is_some(), "{h:?}");
    assert_eq!(xlen(&server.url(), &sink.stream_key()).await, 300);

    let h = drained(&sink).await;
    assert_eq!(
        (
            h.accepted,
            h.delivered,
            h.duplicates,
            h.backlog,
            h.last_error
        ),
        (300, 300, 0, 0, None)
    );
    assert_eq!(xlen(&server.url(), &sink.stream_key()).await, 300);

    sink.record_batch(&records[..100]).await.unwrap();
    let h = drained(&sink).await;
    assert_eq!((h.accepted, h.delivered, h.duplicates), (400, 400, 100));
    assert_eq!(xlen(&server.url(), &sink.stream_key()).await, 300);

    let memory = MemorySink::new();
    memory.record_batch(&records).await.unwrap();
    let (from, to) = window();
    let redis = sink.summary(&Subject::All, from, to).await.unwrap();
    assert_eq!(redis, summarize(&memory.records(), &Subject::All, from, to));
}
