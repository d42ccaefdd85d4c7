//! A cross-check of `rate_limit`'s `layer_overhead` rows that drift cannot bias: the rows
//! run in turn, round after round (300,000 requests a row per round), and each row keeps its
//! fastest round. A criterion group runs its rows one after the other, so on a shared
//! machine a row that happens to run during a busy second reads slower; here every row sees
//! every second. Code layout still moves the results (see BENCHMARKS.md), so read it beside
//! the criterion run, not instead of it.
//!
//! `cargo bench --features axum --bench rate_limit_rounds` (`ROUNDS=30` for more rounds).

use std::convert::Infallible;
use std::hint::black_box;
use std::time::Instant;

use http::{Request, Response};
use palisade::clock::ClockSource;
use palisade::rate_limit::{KeySource, MemoryStore, Quota, RateLimitLayer, Rule};
use tower::{Layer, Service, service_fn};

mod rate_limit_common;
use rate_limit_common::{poll_now, request};

const PER_ROUND: u64 = 300_000;

/// Nanoseconds per request over one round.
fn round<S, B>(svc: &mut S, i: &mut u64) -> f64
where
    S: Service<Request<()>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
{
    let start = Instant::now();
    for _ in 0..PER_ROUND {
        *i += 1;
        let res = poll_now(svc.call(request(*i))).unwrap();
        assert_eq!(res.status(), 200);
        black_box(res);
    }
    start.elapsed().as_nanos() as f64 / PER_ROUND as f64
}

fn main() {
    let handler =
        |_req: Request<()>| async { Ok::<_, Infallible>(Response::new(axum::body::Body::empty())) };
    let rule = Rule::new("ip", Quota::per_second(u64::from(u32::MAX))).key(KeySource::PeerIp);
    let palisade = |headers: bool| {
        RateLimitLayer::builder()
            .store(
                MemoryStore::builder()
                    .clock(ClockSource::Fast)
                    .build()
                    .unwrap(),
            )
            .rule(rule.clone())
            .draft_headers(headers)
            .build()
            .unwrap()
            .layer(service_fn(handler))
    };
    let mut bare = service_fn(handler);
    let (mut p, mut ph) = (palisade(false), palisade(true));
    let config = tower_governor::governor::GovernorConfigBuilder::default()
        .per_nanosecond(1)
        .burst_size(u32::MAX)
        .finish()
        .unwrap();
    let mut g = tower_governor::GovernorLayer::new(config).layer(service_fn(handler));
    // `use_headers` changes the builder's type, so the second layer is built on its own.
    let config = tower_governor::governor::GovernorConfigBuilder::default()
        .per_nanosecond(1)
        .burst_size(u32::MAX)
        .use_headers()
        .finish()
        .unwrap();
    let mut gh = tower_governor::GovernorLayer::new(config).layer(service_fn(handler));

    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(15);
    let mut best = [f64::MAX; 5];
    let mut i = 0u64;
    for _ in 0..rounds {
        let times = [
            round(&mut bare, &mut i),
            round(&mut p, &mut i),
            round(&mut g, &mut i),
            round(&mut ph, &mut i),
            round(&mut gh, &mut i),
        ];
        for (b, t) in best.iter_mut().zip(times) {
            *b = b.min(t);
        }
    }
    let [bare, p, g, ph, gh] = best;
    println!("fastest of {rounds} interleaved rounds, {PER_ROUND} requests each:");
    println!("  bare                         {bare:7.1} ns");
    for (name, t, peer) in [
        ("palisade, no headers", p, g),
        ("tower_governor", g, g),
        ("palisade, draft headers", ph, gh),
        ("tower_governor, use_headers", gh, gh),
    ] {
        println!(
            "  {name:<28} {t:7.1} ns  +{:6.1} ns  {:.2}x",
            t - bare,
            (t - bare) / (peer - bare)
        );
    }
}
