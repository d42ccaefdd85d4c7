//! palisade's rate limiter against governor and tower_governor, in one run.
//!
//! - `keyed_decision/*`: one allowed decision for one of 10,000 IP keys, on 1 and 2 threads
//!   (palisade's `MemoryStore` through the `Store` trait vs governor's keyed limiter; the
//!   `_one` rows use `Store::check_one_now`, the others `Store::check_now` with a list of one).
//! - `layer_overhead/*`: one request through the bare service, palisade's layer (with and
//!   without its headers) and tower_governor's layer, keyed by peer IP, polled by hand.

use std::convert::Infallible;
use std::hint::black_box;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use governor::{Quota as GQuota, RateLimiter as GRateLimiter};
use http::{Request, Response};
use palisade::clock::ClockSource;
use palisade::rate_limit::algorithm::Params;
use palisade::rate_limit::{
    Algorithm, KeySource, MemoryStore, Quota, RateKey, RateLimitLayer, Rule,
};
use tower::{Layer, Service, service_fn};

mod rate_limit_common;
use rate_limit_common::{
    KEYS, decide, decide_one, ip, poll_now, request, tower_governor_config,
    tower_governor_headers_config,
};

fn ips() -> Vec<IpAddr> {
    (0..KEYS as u64).map(ip).collect()
}

fn keyed(c: &mut Criterion) {
    let ips = ips();
    let rate_keys: Arc<Vec<RateKey>> = Arc::new(ips.iter().map(|ip| RateKey::ip(*ip)).collect());
    let ips = Arc::new(ips);
    let store = MemoryStore::builder()
        .clock(ClockSource::Fast)
        .build()
        .unwrap();
    let tokio_store = MemoryStore::new();
    let coarse_store = MemoryStore::builder()
        .clock(ClockSource::Coarse)
        .build()
        .unwrap();
    let params = Params::new(
        Algorithm::SlidingWindow,
        Quota::per_second(u64::from(u32::MAX)),
    );
    let gcra = Params::new(Algorithm::Gcra, Quota::per_second(u64::from(u32::MAX)));
    let governor = Arc::new(GRateLimiter::keyed(GQuota::per_second(NonZeroU32::MAX)));
    // warm every key into both maps
    for (ip, key) in ips.iter().zip(rate_keys.iter()) {
        let _ = governor.check_key(ip);
        decide(&store, key, params);
        decide(&store, key, gcra);
        decide(&tokio_store, key, params);
        decide(&coarse_store, key, params);
    }

    let mut group = c.benchmark_group("keyed_decision");
    for threads in [1usize, 2] {
        group.bench_function(format!("palisade_sliding_window/{threads}t"), |b| {
            b.iter_custom(|iters| {
                run_threads(threads, iters, |t, i| {
                    let key = &rate_keys[(i as usize * 7 + t * 5003) % KEYS];
                    black_box(decide(&store, key, params));
                })
            })
        });
        group.bench_function(
            format!("palisade_sliding_window_tokio_clock/{threads}t"),
            |b| {
                b.iter_custom(|iters| {
                    run_threads(threads, iters, |t, i| {
                        let key = &rate_keys[(i as usize * 7 + t * 5003) % KEYS];
                        black_box(decide(&tokio_store, key, params));
                    })
                })
            },
        );
        group.bench_function(format!("palisade_gcra/{threads}t"), |b| {
            b.iter_custom(|iters| {
                run_threads(threads, iters, |t, i| {
                    let key = &rate_keys[(i as usize * 7 + t * 5003) % KEYS];
                    black_box(decide(&store, key, gcra));
                })
            })
        });
        group.bench_function(format!("palisade_sliding_window_one/{threads}t"), |b| {
            b.iter_custom(|iters| {
                run_threads(threads, iters, |t, i| {
                    let key = &rate_keys[(i as usize * 7 + t * 5003) % KEYS];
                    black_box(decide_one(&store, key, params));
                })
            })
        });
        group.bench_function(
            format!("palisade_sliding_window_one_coarse_clock/{threads}t"),
            |b| {
                b.iter_custom(|iters| {
                    run_threads(threads, iters, |t, i| {
                        let key = &rate_keys[(i as usize * 7 + t * 5003) % KEYS];
                        black_box(decide_one(&coarse_store, key, params));
                    })
                })
            },
        );
        group.bench_function(format!("palisade_gcra_one/{threads}t"), |b| {
            b.iter_custom(|iters| {
                run_threads(threads, iters, |t, i| {
                    let key = &rate_keys[(i as usize * 7 + t * 5003) % KEYS];
                    black_box(decide_one(&store, key, gcra));
                })
            })
        });
        group.bench_function(format!("governor/{threads}t"), |b| {
            b.iter_custom(|iters| {
                run_threads(threads, iters, |t, i| {
                    let ip = &ips[(i as usize * 7 + t * 5003) % KEYS];
                    let _ = black_box(governor.check_key(ip));
                })
            })
        });
    }
    group.finish();
}

/// Runs `iters` operations on each of `threads` threads at once; returns the wall time, so
/// the result is the time per operation as each thread sees it under contention.
fn run_threads(threads: usize, iters: u64, op: impl Fn(usize, u64) + Sync) -> Duration {
    let barrier = Barrier::new(threads);
    let times: Vec<Duration> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let op = &op;
                let barrier = &barrier;
                s.spawn(move || {
                    barrier.wait();
                    let start = Instant::now();
                    for i in 0..iters {
                        op(t, i);
                    }
                    start.elapsed()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    times.into_iter().max().unwrap_or_default()
}

fn layer_overhead(c: &mut Criterion) {
    let handler =
        |_req: Request<()>| async { Ok::<_, Infallible>(Response::new(axum::body::Body::empty())) };
    let mut group = c.benchmark_group("layer_overhead");

    let mut bare = service_fn(handler);
    let mut i = 0u64;
    group.bench_function("bare", |b| {
        b.iter(|| {
            i += 1;
            black_box(poll_now(bare.call(request(i))).unwrap());
        })
    });

    // The rows below must count each peer address apart (as tower_governor does), not
    // every request against one key: check it before measuring anything.
    let one_each =
        RateLimitLayer::new([Rule::new("ip", Quota::per_minute(1)).key(KeySource::PeerIp)])
            .unwrap()
            .layer(service_fn(handler));
    for (n, status) in [(1, 200), (2, 200), (1, 429)] {
        let res = poll_now(one_each.clone().call(request(n)));
        assert_eq!(
            res.unwrap().status(),
            status,
            "the layer must key by peer IP"
        );
    }

    let rule = Rule::new("ip", Quota::per_second(u64::from(u32::MAX))).key(KeySource::PeerIp);
    // The default algorithm (sliding window), and GCRA, the algorithm governor runs.
    let gcra_rule = rule.clone().algorithm(Algorithm::Gcra);
    for (name, headers, clock, rule) in [
        ("palisade", true, ClockSource::Fast, &rule),
        ("palisade_no_headers", false, ClockSource::Fast, &rule),
        (
            "palisade_no_headers_coarse_clock",
            false,
            ClockSource::Coarse,
            &rule,
        ),
        (
            "palisade_gcra_no_headers_coarse_clock",
            false,
            ClockSource::Coarse,
            &gcra_rule,
        ),
        ("palisade_tokio_clock", true, ClockSource::Tokio, &rule),
    ] {
        let layer = RateLimitLayer::builder()
            .store(MemoryStore::builder().clock(clock).build().unwrap())
            .rule(rule.clone())
            .draft_headers(headers)
            .build()
            .unwrap();
        let mut svc = layer.layer(service_fn(handler));
        group.bench_function(name, |b| {
            b.iter(|| {
                i += 1;
                let res = poll_now(svc.call(request(i))).unwrap();
                assert_eq!(res.status(), 200);
                black_box(res);
            })
        });
    }

    let config = tower_governor_config();
    let layer = tower_governor::GovernorLayer::new(config);
    let mut svc = layer.layer(service_fn(handler));
    group.bench_function("tower_governor", |b| {
        b.iter(|| {
            i += 1;
            let res = poll_now(svc.call(request(i))).unwrap();
            assert_eq!(res.status(), 200);
            black_box(res);
        })
    });

    let config = tower_governor_headers_config();
    let layer = tower_governor::GovernorLayer::new(config);
    let mut svc = layer.layer(service_fn(handler));
    group.bench_function("tower_governor_headers", |b| {
        b.iter(|| {
            i += 1;
            let res = poll_now(svc.call(request(i))).unwrap();
            assert_eq!(res.status(), 200);
            black_box(res);
        })
    });
    group.finish();
}

criterion_group!(benches, keyed, layer_overhead);
criterion_main!(benches);
