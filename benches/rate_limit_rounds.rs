//! A cross-check of `rate_limit`'s `layer_overhead` and 1-thread `keyed_decision` rows that
//! drift cannot bias: the rows run in turn, round after round (300,000 requests or 1,000,000
//! decisions a row per round), and each row keeps its fastest round. A criterion group runs its rows one after the other, so on a shared
//! machine a row that happens to run during a busy second reads slower; here every row sees
//! every second. Code layout still moves the results, so read it beside
//! the criterion run, not instead of it.
//!
//! `cargo bench --features axum --bench rate_limit_rounds` (`ROUNDS=30` for more rounds,
//! `KEYED_KEYS=1000000` for the keyed rows over more keys, `ONLY=keyed` or `ONLY=layer` for
//! one half).
//!
//! `PROFILE=N` runs only the no-headers palisade layer for N requests (after 10,000 to warm
//! up) and prints nothing: a steady loop to read under a profiler, for example
//! `PROFILE=1000000 valgrind --tool=callgrind target/release/deps/rate_limit_rounds-*`.

use std::convert::Infallible;
use std::hint::black_box;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Instant;

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
    KEYS, decide_one, poll_now, request, tower_governor_config, tower_governor_headers_config,
};

const PER_ROUND: u64 = 300_000;
const DECISIONS_PER_ROUND: u64 = 1_000_000;

/// Nanoseconds per decision over one round of `decide(i)` for `keys` keys.
fn keyed_round(decide: &mut impl FnMut(usize) -> bool, keys: usize) -> f64 {
    let start = Instant::now();
    for i in 0..DECISIONS_PER_ROUND as usize {
        assert!(decide(i * 7 % keys));
    }
    start.elapsed().as_nanos() as f64 / DECISIONS_PER_ROUND as f64
}

/// A named bench row: one decision for the key at an index.
type Row<'a> = (&'static str, Box<dyn FnMut(usize) -> bool + 'a>);

/// The keyed rows of `rate_limit`'s `keyed_decision` group (1 thread), interleaved.
fn keyed(rounds: usize, keys: usize) {
    // 10.0.0.0/8 holds 16,777,216 addresses: enough distinct keys for any count asked for.
    let ips: Vec<IpAddr> = (0..keys as u32)
        .map(|i| IpAddr::from((0x0a00_0000u32 + i).to_be_bytes()))
        .collect();
    let rate_keys: Vec<RateKey> = ips.iter().map(|ip| RateKey::ip(*ip)).collect();
    let store = |clock| MemoryStore::builder().clock(clock).build().unwrap();
    let (fast, coarse) = (store(ClockSource::Fast), store(ClockSource::Coarse));
    let wide = Quota::per_second(u64::from(u32::MAX));
    let sliding = Params::new(Algorithm::SlidingWindow, wide);
    let gcra = Params::new(Algorithm::Gcra, wide);
    let governor = GRateLimiter::keyed(GQuota::per_second(NonZeroU32::MAX));
    let mut rows: [Row<'_>; 4] = [
        (
            "governor keyed",
            Box::new(|k| governor.check_key(&ips[k]).is_ok()),
        ),
        (
            "palisade, single item",
            Box::new(|k| decide_one(&fast, &rate_keys[k], sliding)),
        ),
        (
            "palisade, coarse clock",
            Box::new(|k| decide_one(&coarse, &rate_keys[k], sliding)),
        ),
        (
            "palisade, GCRA",
            Box::new(|k| decide_one(&fast, &rate_keys[k], gcra)),
        ),
    ];
    for (_, decide) in rows.iter_mut() {
        for k in 0..keys {
            assert!(decide(k), "warm-up");
        }
    }
    let mut best = [f64::MAX; 4];
    for _ in 0..rounds {
        for ((_, decide), b) in rows.iter_mut().zip(&mut best) {
            *b = b.min(keyed_round(decide, keys));
        }
    }
    println!(
        "keyed decision, 1 thread, {keys} keys: fastest of {rounds} interleaved rounds, {DECISIONS_PER_ROUND} decisions each:"
    );
    for ((name, _), t) in rows.iter().zip(best) {
        println!("  {name:<28} {t:7.1} ns  {:.2}x", t / best[0]);
    }
}

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

/// `n` requests through `svc`, after a warm-up, for a profiler.
#[inline(never)]
fn profile<S, B>(svc: &mut S, n: u64)
where
    S: Service<Request<()>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
{
    for i in 0..10_000 + n {
        black_box(poll_now(svc.call(request(i))).unwrap());
    }
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
    if let Some(n) = std::env::var("PROFILE").ok().and_then(|s| s.parse().ok()) {
        return profile(&mut palisade(false), n);
    }
    let mut bare = service_fn(handler);
    let (mut p, mut ph) = (palisade(false), palisade(true));
    let config = tower_governor_config();
    let mut g = tower_governor::GovernorLayer::new(config).layer(service_fn(handler));
    let config = tower_governor_headers_config();
    let mut gh = tower_governor::GovernorLayer::new(config).layer(service_fn(handler));

    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(15);
    let only = std::env::var("ONLY").unwrap_or_default();
    if only != "layer" {
        let keys = std::env::var("KEYED_KEYS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(KEYS);
        keyed(rounds, keys);
    }
    if only == "keyed" {
        return;
    }
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
