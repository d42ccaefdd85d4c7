//! The closed path of a circuit breaker: palisade (count and time windows) beside
//! tower-resilience (count and time windows) and failsafe, in one run.
//!
//! Every breaker wraps the same upstream: a `service_fn` that answers `200 OK` at once.
//! `bare` is that upstream alone; the difference is what a breaker adds to every call.
//!
//! Run: `cargo bench --bench circuit_breaker -- --warm-up-time 1 --measurement-time 3`

use std::future::{Ready, ready};
use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use failsafe::futures::CircuitBreaker as _;
use http::{Request, Response};
use palisade::BoxError;
use palisade::circuit_breaker::CircuitBreakerLayer;
use palisade::clock::ClockSource;
use tower::{Layer, Service, ServiceExt, service_fn};

type Upstream = tower::util::ServiceFn<fn(Request<()>) -> Ready<Result<Response<()>, BoxError>>>;

fn upstream() -> Upstream {
    fn answer(_req: Request<()>) -> Ready<Result<Response<()>, BoxError>> {
        ready(Ok(Response::new(())))
    }
    service_fn(answer as fn(Request<()>) -> Ready<Result<Response<()>, BoxError>>)
}

/// Calls `svc` `iters` times, `poll_ready` included; the time it took.
async fn call_n<S>(svc: &mut S, iters: u64) -> Duration
where
    S: Service<Request<()>>,
    S::Error: std::fmt::Debug,
{
    let start = std::time::Instant::now();
    for _ in 0..iters {
        let response = svc
            .ready()
            .await
            .unwrap()
            .call(Request::new(()))
            .await
            .unwrap();
        black_box(response);
    }
    start.elapsed()
}

/// Calls a clone of `svc` once per iteration, `poll_ready` included.
fn bench_service<S>(c: &mut Criterion, rt: &tokio::runtime::Runtime, name: &str, svc: S)
where
    S: Service<Request<()>> + Clone + 'static,
    S::Error: std::fmt::Debug,
    S::Response: 'static,
{
    let mut group = c.benchmark_group("circuit_breaker_closed");
    group.bench_function(name, |b| {
        b.to_async(rt).iter_custom(|iters| {
            let mut svc = svc.clone();
            async move { call_n(&mut svc, iters).await }
        });
    });
    group.finish();
}

fn closed_path(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // Build every breaker inside the runtime (some read the clock or spawn).
    let _guard = rt.enter();

    bench_service(c, &rt, "bare", upstream());

    let count = CircuitBreakerLayer::builder()
        .count_window(100)
        .build()
        .unwrap();
    bench_service(c, &rt, "palisade_count_100", count.layer(upstream()));

    let time = CircuitBreakerLayer::builder()
        .time_window(Duration::from_secs(10))
        .build()
        .unwrap();
    bench_service(c, &rt, "palisade_time_10s", time.layer(upstream()));

    let fast = CircuitBreakerLayer::builder()
        .time_window(Duration::from_secs(10))
        .clock(ClockSource::Fast)
        .build()
        .unwrap();
    bench_service(c, &rt, "palisade_time_10s_fast", fast.layer(upstream()));

    let coarse = CircuitBreakerLayer::builder()
        .time_window(Duration::from_secs(10))
        .clock(ClockSource::Coarse)
        .build()
        .unwrap();
    bench_service(c, &rt, "palisade_time_10s_coarse", coarse.layer(upstream()));

    let slow = CircuitBreakerLayer::builder()
        .time_window(Duration::from_secs(10))
        .slow_calls(Duration::from_secs(30), 0.8)
        .build()
        .unwrap();
    bench_service(
        c,
        &rt,
        "palisade_time_10s_slow_rule",
        slow.layer(upstream()),
    );

    let slow_coarse = CircuitBreakerLayer::builder()
        .time_window(Duration::from_secs(10))
        .slow_calls(Duration::from_secs(30), 0.8)
        .clock(ClockSource::Coarse)
        .build()
        .unwrap();
    bench_service(
        c,
        &rt,
        "palisade_time_10s_slow_rule_coarse",
        slow_coarse.layer(upstream()),
    );

    use tower_resilience::circuitbreaker::{CircuitBreakerLayer as TrLayer, SlidingWindowType};
    let tr_count = TrLayer::builder()
        .sliding_window_type(SlidingWindowType::CountBased)
        .sliding_window_size(100)
        .build()
        .unwrap();
    bench_service(
        c,
        &rt,
        "tower_resilience_count_100",
        tr_count.layer(upstream()),
    );
    let tr_time = TrLayer::builder()
        .sliding_window_type(SlidingWindowType::TimeBased)
        .sliding_window_duration(Duration::from_secs(10))
        .build()
        .unwrap();
    bench_service(
        c,
        &rt,
        "tower_resilience_time_10s",
        tr_time.layer(upstream()),
    );

    // failsafe is not a tower layer: wrap each call's future.
    let breaker = failsafe::Config::new().build();
    let svc = upstream();
    let mut group = c.benchmark_group("circuit_breaker_closed");
    group.bench_function("failsafe", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let mut svc = svc;
            let breaker = breaker.clone();
            async move {
                let start = std::time::Instant::now();
                for _ in 0..iters {
                    svc.ready().await.unwrap();
                    let response = breaker.call(svc.call(Request::new(()))).await.unwrap();
                    black_box(response);
                }
                start.elapsed()
            }
        });
    });
    group.finish();
}

/// A refused call: the circuit is open, the upstream is never called.
fn open_path(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let layer = CircuitBreakerLayer::builder().build().unwrap();
    layer.handle().force_open();
    let svc = layer.layer(upstream());
    let mut group = c.benchmark_group("circuit_breaker_open");
    group.bench_function("palisade_refusal", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let mut svc = svc.clone();
            async move {
                let start = std::time::Instant::now();
                for _ in 0..iters {
                    let err = svc
                        .ready()
                        .await
                        .unwrap()
                        .call(Request::new(()))
                        .await
                        .unwrap_err();
                    black_box(err);
                }
                start.elapsed()
            }
        });
    });
    let breaker = failsafe::Config::new().build();
    for _ in 0..10 {
        let _ = failsafe::CircuitBreaker::call(&breaker, || Err::<(), ()>(()));
    }
    assert!(!failsafe::futures::CircuitBreaker::is_call_permitted(
        &breaker
    ));
    group.bench_function("failsafe_refusal", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let mut svc = upstream();
            let breaker = breaker.clone();
            async move {
                let start = std::time::Instant::now();
                for _ in 0..iters {
                    svc.ready().await.unwrap();
                    let err = breaker.call(svc.call(Request::new(()))).await.unwrap_err();
                    black_box(err);
                }
                start.elapsed()
            }
        });
    });
    group.finish();
}

/// Two OS threads, each with its own current-thread runtime and its own clone of the
/// service, call one shared breaker at once (the shape of a multi-threaded server with one
/// breaker per upstream); the time is per call as one thread sees it.
fn contended(c: &mut Criterion) {
    fn on_two_threads<S>(iters: u64, svc: &S) -> Duration
    where
        S: Service<Request<()>> + Clone + Send,
        S::Future: Send,
        S::Error: std::fmt::Debug,
    {
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..2)
                .map(|_| {
                    let mut svc = svc.clone();
                    scope.spawn(move || {
                        let rt = tokio::runtime::Builder::new_current_thread()
                            .build()
                            .unwrap();
                        rt.block_on(call_n(&mut svc, iters))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap())
                .max()
                .unwrap_or_default()
        })
    }

    let mut group = c.benchmark_group("circuit_breaker_closed_2_threads");
    // Few, long samples: a short run is dominated by where the scheduler first puts the two
    // threads on a 2-core machine (runs of 20,000 calls swing 2x; runs of millions agree).
    group.sample_size(10);
    let bare = upstream();
    group.bench_function("bare", |b| {
        b.iter_custom(|iters| on_two_threads(iters, &bare))
    });
    let count = CircuitBreakerLayer::builder()
        .count_window(100)
        .build()
        .unwrap()
        .layer(upstream());
    group.bench_function("palisade_count_100", |b| {
        b.iter_custom(|iters| on_two_threads(iters, &count))
    });
    let coarse = CircuitBreakerLayer::builder()
        .time_window(Duration::from_secs(10))
        .clock(ClockSource::Coarse)
        .build()
        .unwrap()
        .layer(upstream());
    group.bench_function("palisade_time_10s_coarse", |b| {
        b.iter_custom(|iters| on_two_threads(iters, &coarse))
    });
    group.finish();
}

criterion_group!(benches, closed_path, open_path, contended);
criterion_main!(benches);
