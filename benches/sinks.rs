//! The request path's cost of recording (enqueue, alone and with two threads recording at
//! once, next to a tokio channel's `try_send`) and of a budget check, and records per
//! second into each sink at batch sizes 1, 100 and 1000. The PostgreSQL rows run with
//! `--features postgres`, the Redis rows with `--features redis`, each against a server the
//! bench starts (the test harness's).

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use palisade::cost::budget::{Budget, Charge, MemoryBudgetStore, Period, Scope};
use palisade::cost::{
    Attribution, MemorySink, Money, RecorderConfig, SinkError, Usage, UsageRecord, UsageRecorder,
    UsageSink,
};

#[cfg(feature = "postgres")]
#[path = "../tests/support/postgres.rs"]
mod pg;

#[cfg(feature = "redis")]
#[path = "../tests/support/mod.rs"]
mod support;

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

fn record() -> UsageRecord {
    let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let mut r = UsageRecord::new(
        SystemTime::now(),
        Some("claude-sonnet-4-5".into()),
        Usage {
            input_tokens: 1200,
            output_tokens: 350,
            cache_read_tokens: 8000,
            ..Usage::default()
        },
        Some(Money::from_picos(9_150_000_000)),
    )
    .with_attribution(
        Attribution::default()
            .with_user(format!("u{}", n % 1000))
            .with_bot("helper"),
    );
    r.request_id = Some(format!("req_{n}"));
    r.route = "/v1/messages".into();
    r
}

/// The answer of a future that is ready at once (the memory store's), polled on the spot
/// as the budget layer does.
fn ready<T>(mut f: std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + '_>>) -> T {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match f.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(v) => v,
        std::task::Poll::Pending => unreachable!("the memory store answers at once"),
    }
}

/// Runs `send` `iters` times on each of two threads at once, in rounds of up to 1000
/// records cloned beforehand, and returns the time of the slower thread: the time of
/// `iters` calls each made while the other thread calls too.
fn contended(iters: u64, send: impl Fn(UsageRecord) -> bool + Sync) -> Duration {
    const ROUND: u64 = 1000;
    let template = record();
    let barrier = std::sync::Barrier::new(2);
    let mut total = Duration::ZERO;
    let mut left = iters;
    while left > 0 {
        let n = left.min(ROUND);
        left -= n;
        let (a, b) = std::thread::scope(|s| {
            let run = || {
                let records: Vec<UsageRecord> = (0..n).map(|_| template.clone()).collect();
                barrier.wait();
                let t = Instant::now();
                for r in records {
                    black_box(send(r));
                }
                t.elapsed()
            };
            let other = s.spawn(run);
            let mine = run();
            (mine, other.join().unwrap())
        });
        total += a.max(b);
    }
    total
}

struct Discard;

impl UsageSink for Discard {
    async fn record_batch(&self, batch: &[UsageRecord]) -> Result<(), SinkError> {
        black_box(batch);
        Ok(())
    }
}

fn enqueue(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let (recorder, _shutdown) = UsageRecorder::spawn(
        Discard,
        RecorderConfig {
            capacity: 1 << 20,
            ..RecorderConfig::default()
        },
    );
    let mut g = c.benchmark_group("record_path");
    g.measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500));
    let template = record();
    g.bench_function("enqueue", |b| {
        b.iter_batched(
            || template.clone(),
            |r| recorder.record(r),
            BatchSize::SmallInput,
        )
    });
    // The same job done the plain way, a tokio channel that wakes its receiver on every
    // send: what `enqueue` is measured against.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<UsageRecord>(1 << 20);
    rt.spawn(async move {
        let mut batch = Vec::with_capacity(256);
        while rx.recv_many(&mut batch, 256).await > 0 {
            black_box(&batch);
            batch.clear();
        }
    });
    g.bench_function("enqueue_mpsc_baseline", |b| {
        b.iter_batched(
            || template.clone(),
            |r| tx.try_send(r).is_ok(),
            BatchSize::SmallInput,
        )
    });
    // Two threads recording at once: the time of one call while the other thread calls
    // too (each thread's records are cloned before the clock runs).
    g.bench_function("enqueue_2_threads", |b| {
        b.iter_custom(|iters| contended(iters, |r| recorder.record(r)))
    });
    g.bench_function("enqueue_mpsc_baseline_2_threads", |b| {
        b.iter_custom(|iters| contended(iters, |r| tx.try_send(r).is_ok()))
    });
    let store = MemoryBudgetStore::new();
    let budget = Arc::new(Budget::new(
        "daily",
        Scope::User,
        Period::Day,
        Money::parse_dollars("1000000").unwrap(),
    ));
    let charges: Arc<[Charge]> = vec![Charge {
        budget,
        subject: "ann".into(),
    }]
    .into();
    g.bench_function("budget_reserve_settle_memory", |b| {
        use palisade::cost::budget::BudgetStore;
        b.iter(|| {
            let now = SystemTime::now();
            let amount = Money::from_picos(1_000_000);
            black_box(ready(store.reserve(&charges, amount, now)).unwrap());
            black_box(ready(store.settle(Arc::clone(&charges), amount, amount, now)).unwrap());
        })
    });
    g.finish();
}

fn sinks(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut g = c.benchmark_group("sink_records");
    g.measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_millis(500))
        .sample_size(10);
    let memory = MemorySink::with_capacity(100_000);
    for batch in [1usize, 100, 1000] {
        g.throughput(Throughput::Elements(batch as u64));
        g.bench_with_input(BenchmarkId::new("memory", batch), &batch, |b, &n| {
            b.to_async(&rt).iter_custom(|iters| {
                let memory = &memory;
                async move {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let records: Vec<UsageRecord> = (0..n).map(|_| record()).collect();
                        let t = Instant::now();
                        memory.record_batch(&records).await.unwrap();
                        total += t.elapsed();
                    }
                    total
                }
            })
        });
    }
    #[cfg(feature = "postgres")]
    {
        use palisade::cost::sink::{PostgresConfig, PostgresSink};
        let server = pg::Postgres::start();
        let url = rt.block_on(server.database("bench"));
        let sink = rt.block_on(async {
            let sink = PostgresSink::connect(PostgresConfig::new(url)).unwrap();
            sink.migrate().await.unwrap();
            sink
        });
        for batch in [1usize, 100, 1000] {
            g.throughput(Throughput::Elements(batch as u64));
            g.bench_with_input(BenchmarkId::new("postgres", batch), &batch, |b, &n| {
                b.to_async(&rt).iter_custom(|iters| {
                    let sink = sink.clone();
                    async move {
                        let mut total = Duration::ZERO;
                        for _ in 0..iters {
                            let records: Vec<UsageRecord> = (0..n).map(|_| record()).collect();
                            let t = Instant::now();
                            sink.record_batch(&records).await.unwrap();
                            total += t.elapsed();
                        }
                        assert_eq!(sink.health().backlog, 0);
                        total
                    }
                })
            });
        }
    }
    #[cfg(feature = "redis")]
    {
        use palisade::cost::sink::{RedisSink, RedisSinkConfig};
        let server = rt
            .block_on(support::RedisServer::start())
            .expect("redis-server is required");
        let sink = rt.block_on(async {
            let client = redis::Client::open(server.url()).unwrap();
            let conn = redis::aio::ConnectionManager::new(client).await.unwrap();
            let mut config = RedisSinkConfig::default();
            config.max_batch = 1000;
            RedisSink::new(conn, config)
        });
        for batch in [1usize, 100, 1000] {
            g.throughput(Throughput::Elements(batch as u64));
            g.bench_with_input(BenchmarkId::new("redis", batch), &batch, |b, &n| {
                b.to_async(&rt).iter_custom(|iters| {
                    let sink = sink.clone();
                    async move {
                        let mut total = Duration::ZERO;
                        for _ in 0..iters {
                            let records: Vec<UsageRecord> = (0..n).map(|_| record()).collect();
                            let t = Instant::now();
                            sink.record_batch(&records).await.unwrap();
                            total += t.elapsed();
                        }
                        let h = sink.health();
                        assert_eq!((h.backlog, h.duplicates), (0, 0), "{h:?}");
                        total
                    }
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, enqueue, sinks);
criterion_main!(benches);
