//! The Redis store against Redis's own yardstick, on one freshly started redis-server.
//!
//! - `redis/decisions_50_tasks`: decisions per second with 50 concurrent tasks through one
//!   `RedisStore` (one script call each), beside `redis-benchmark` running `EVALSHA` of a
//!   trivial one-key script with 50 clients against the same server, in the same run.
//!   Goal: at least 1.0× redis-benchmark's rate. A second yardstick runs the store's own
//!   decision script through redis-benchmark with the same arguments, which separates the
//!   client path's cost from the script's time on the server.
//! - `redis/one_decision`: one decision's round trip, beside a refusal answered by the
//!   local blocked-key cache (which asks Redis again once a second, included). Goal: the
//!   cache at least 100× faster.
//!
//! The ratios are printed at the end, each side's best of five alternating rounds.
//! `cargo bench --features redis --bench rate_limit_redis` (redis-server and redis-benchmark from Debian's redis-server and
//! redis-tools packages).

use std::hint::black_box;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group};
use palisade::rate_limit::algorithm::Params;
use palisade::rate_limit::store::CheckItem;
use palisade::rate_limit::{Algorithm, Quota, RateKey, RedisStore, Store};

#[path = "../tests/support/mod.rs"]
mod support;

const TASKS: usize = 50;
/// Decisions each task makes per measured batch.
const PER_TASK: usize = 400;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// `redis-benchmark`'s EVALSHA rate (requests per second) with 50 clients, of `script`
/// called with `args` (after the key count and one key).
fn redis_benchmark_rate(port: u16, script: &str, key: &str, args: &[&str]) -> f64 {
    let load = Command::new("redis-cli")
        .args(["-p", &port.to_string(), "SCRIPT", "LOAD"])
        .arg(script)
        .output()
        .expect("redis-cli");
    let sha = String::from_utf8(load.stdout).unwrap().trim().to_owned();
    let out = Command::new("redis-benchmark")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["-c", "50", "-n", "20000", "-q"])
        .args(["EVALSHA", &sha, "1", key])
        .args(args)
        .output()
        .expect("redis-benchmark (Debian's redis-tools)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    // "EVALSHA ...: 71428.57 requests per second, p50=0.343 msec"
    let rate = text
        .rsplit_once(": ")
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|n| n.parse::<f64>().ok());
    rate.unwrap_or_else(|| panic!("unexpected redis-benchmark output: {text}"))
}

/// The trivial one-key script of the goal.
const TRIVIAL: &str = "return redis.call('GET', KEYS[1])";
/// The store's own decision script, and a check of one sliding-window rule as the store
/// sends it (mode, Redis's clock, grace; algorithm, limit, window in us, burst, strict,
/// cost, shadow).
const DECIDE: &str = include_str!("../src/rate_limit/store/redis/decide.lua");
const DECIDE_ARGS: &[&str] = &[
    "c",
    "-",
    "1000",
    "0",
    "4294967295",
    "1000000",
    "0",
    "0",
    "1",
    "0",
];

fn item(key: &RateKey) -> CheckItem<'_> {
    CheckItem {
        rule_index: 0,
        rule: "bench",
        key,
        params: Params::new(
            Algorithm::SlidingWindow,
            Quota::per_second(u64::from(u32::MAX)),
        ),
        cost: 1,
        shadow: false,
    }
}

/// 50 tasks, `PER_TASK` decisions each; the time they took.
async fn batch(store: &RedisStore, keys: &Arc<Vec<RateKey>>) -> Duration {
    let start = Instant::now();
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            let (store, keys) = (store.clone(), keys.clone());
            tokio::spawn(async move {
                for _ in 0..PER_TASK {
                    let d = store.check(&[item(&keys[t])]).await.unwrap();
                    assert!(d.admitted);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    start.elapsed()
}

/// A refusal of the blocked key: from the local cache, or (once a second, when the entry
/// is due for a fresh look, as in service) through a round trip that refreshes it.
fn refused(
    rt: &tokio::runtime::Runtime,
    store: &RedisStore,
    blocked: &CheckItem<'_>,
) -> palisade::rate_limit::store::Decision {
    let items = std::slice::from_ref(blocked);
    match store.check_now(items) {
        Some(d) => d.unwrap(),
        None => rt.block_on(store.check(items)).unwrap(),
    }
}

fn benches(c: &mut Criterion) {
    let rt = runtime();
    let server = rt
        .block_on(support::RedisServer::start())
        .expect("redis-server");
    let store = rt.block_on(async {
        RedisStore::builder()
            .url(server.url())
            .timeout(Duration::from_secs(2))
            .build()
            .await
            .unwrap()
    });
    let keys: Arc<Vec<RateKey>> = Arc::new(
        (0..TASKS)
            .map(|i| RateKey::principal(format!("user-{i}")))
            .collect(),
    );
    rt.block_on(batch(&store, &keys));

    let mut group = c.benchmark_group("redis");
    group.sample_size(10);
    group.throughput(Throughput::Elements((TASKS * PER_TASK) as u64));
    group.bench_function(BenchmarkId::new("decisions_50_tasks", "store"), |b| {
        b.iter_custom(|iters| (0..iters).map(|_| rt.block_on(batch(&store, &keys))).sum());
    });
    group.finish();

    let blocked_key = RateKey::principal("flood");
    let blocked = CheckItem {
        params: Params::new(
            Algorithm::FixedWindow,
            Quota::new(1, Duration::from_secs(1 << 20)),
        ),
        ..item(&blocked_key)
    };
    rt.block_on(async {
        assert!(store.check(&[blocked]).await.unwrap().admitted);
        assert!(!store.check(&[blocked]).await.unwrap().admitted);
    });
    let mut group = c.benchmark_group("redis/one_decision");
    group.throughput(Throughput::Elements(1));
    group.bench_function("round_trip", |b| {
        b.iter(|| rt.block_on(store.check(&[item(&keys[0])])).unwrap())
    });
    group.bench_function("blocked_cache", |b| {
        b.iter(|| {
            let d = refused(&rt, &store, black_box(&blocked));
            assert!(!d.admitted);
        })
    });
    group.finish();

    // The ratios, measured outside criterion on the same server: redis-benchmark and the
    // store take turns, five rounds each, and each keeps its best round (a shared machine
    // slows whichever runs during a busy second).
    let port = server.addr().port();
    let (mut bench_rate, mut same_rate, mut store_rate) = (0.0f64, 0.0f64, 0.0f64);
    for _ in 0..5 {
        bench_rate = bench_rate.max(redis_benchmark_rate(port, TRIVIAL, "bench:key", &[]));
        same_rate = same_rate.max(redis_benchmark_rate(
            port,
            DECIDE,
            "bench:{same}",
            DECIDE_ARGS,
        ));
        let took = rt.block_on(batch(&store, &keys));
        store_rate = store_rate.max((TASKS * PER_TASK) as f64 / took.as_secs_f64());
    }
    // The round trip and the cache answer take turns too, five rounds each, best kept.
    let (mut trip, mut hit) = (Duration::MAX, Duration::MAX);
    for _ in 0..5 {
        let trips = 1_000;
        let start = Instant::now();
        for _ in 0..trips {
            rt.block_on(store.check(&[item(&keys[0])])).unwrap();
        }
        trip = trip.min(start.elapsed() / trips);
        let hits = 200_000;
        let start = Instant::now();
        for _ in 0..hits {
            black_box(refused(&rt, &store, black_box(&blocked)));
        }
        hit = hit.min(start.elapsed() / hits);
    }
    println!(
        "redis-benchmark EVALSHA (50 clients): {bench_rate:.0}/s; store (50 tasks): {store_rate:.0}/s; ratio {:.2}x",
        store_rate / bench_rate
    );
    println!(
        "redis-benchmark EVALSHA of the store's own decision script (50 clients): {same_rate:.0}/s; store: ratio {:.2}x",
        store_rate / same_rate
    );
    println!(
        "one decision's round trip: {trip:?}; blocked-cache answer: {hit:?}; ratio {:.0}x",
        trip.as_secs_f64() / hit.as_secs_f64()
    );
}

criterion_group!(redis_benches, benches);

fn main() {
    redis_benches();
    Criterion::default().configure_from_args().final_summary();
}
