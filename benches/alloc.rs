//! Heap allocations per request on each layer's hot path, counted by a global allocator.
//!
//! `cargo bench --bench alloc` prints, for each path, the allocations and bytes per request
//! over many requests after a warm-up (so one-time set-up is not counted), beside the bare
//! inner service of the same path: the difference is what the layer costs.
//!
//! - closed circuit breaker (count window of 100);
//! - in-memory rate-limit decision through `RateLimitLayer` (10,000 peer-IP keys);
//! - security headers (the `api()` preset in production: 12 headers);
//! - a metered JSON response through `CostMeterLayer`, body read to the end and the usage
//!   record delivered to a sink; and the same with the cost headers on (the body read
//!   whole before the head is sent, as the gateway does).

use std::alloc::{GlobalAlloc, Layout, System};
use std::convert::Infallible;
use std::future::{Ready, ready};
use std::hint::black_box;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use palisade::BoxError;
use palisade::circuit_breaker::CircuitBreakerLayer;
use palisade::config::Environment;
use palisade::cost::{
    CostMeterLayer, PriceTable, RecorderConfig, SinkError, UsageRecord, UsageRecorder, UsageSink,
};
use palisade::rate_limit::{KeySource, MemoryStore, Quota, RateLimitLayer, Rule};
use palisade::security_headers::SecurityHeadersLayer;
use tower::{Layer, Service, ServiceExt, service_fn};

struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards to the system allocator; only counts calls and sizes.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(new_size as u64, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const WARM_UP: u64 = 20_000;
const REQUESTS: u64 = 100_000;
const KEYS: u64 = 10_000;

/// Sends WARM_UP requests, then REQUESTS counted ones, each read to the end of its body;
/// returns (allocations, bytes) per request.
async fn per_request<S, B>(svc: &mut S) -> (f64, f64)
where
    S: Service<Request<()>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    for i in 0..WARM_UP {
        one(svc, i).await;
    }
    settle().await;
    let (a0, b0) = (
        ALLOCS.load(Ordering::Relaxed),
        BYTES.load(Ordering::Relaxed),
    );
    for i in 0..REQUESTS {
        one(svc, WARM_UP + i).await;
    }
    // Background work a request causes (the usage recorder's batches) counts too.
    settle().await;
    let (a1, b1) = (
        ALLOCS.load(Ordering::Relaxed),
        BYTES.load(Ordering::Relaxed),
    );
    (
        (a1 - a0) as f64 / REQUESTS as f64,
        (b1 - b0) as f64 / REQUESTS as f64,
    )
}

async fn one<S, B>(svc: &mut S, i: u64)
where
    S: Service<Request<()>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let res = svc.ready().await.unwrap().call(peer(i)).await.unwrap();
    assert_eq!(res.status(), 200);
    black_box(res.into_body().collect().await.unwrap());
}

async fn settle() {
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
}

type Answer = Ready<Result<Response<Empty<Bytes>>, BoxError>>;

fn empty(_req: Request<()>) -> Answer {
    ready(Ok(Response::new(Empty::new())))
}

fn peer(i: u64) -> Request<()> {
    let ip = IpAddr::from((0x0a00_0000u32 + (i % KEYS) as u32).to_be_bytes());
    let mut req = Request::new(());
    req.extensions_mut().insert(SocketAddr::new(ip, 4000));
    req
}

struct Discard;

impl UsageSink for Discard {
    async fn record_batch(&self, batch: &[UsageRecord]) -> Result<(), SinkError> {
        black_box(batch);
        Ok(())
    }
}

const JSON: &[u8] = br#"{"id":"msg_1","type":"message","role":"assistant","model":"claude-sonnet-4-5","content":[{"type":"text","text":"Rate limits keep one caller from spending everyone's budget."}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":42,"cache_creation_input_tokens":0,"cache_read_input_tokens":1024,"output_tokens":12}}"#;

fn json_upstream()
-> impl Service<Request<()>, Response = Response<Full<Bytes>>, Error = Infallible, Future = impl Send>
+ Clone {
    service_fn(|_req: Request<()>| async {
        Ok::<_, Infallible>(
            Response::builder()
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from_static(JSON)))
                .unwrap(),
        )
    })
}

fn row(name: &str, (allocs, bytes): (f64, f64)) {
    println!("{name:<44} {allocs:>8.2} {bytes:>10.1}");
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    println!(
        "{:<44} {:>8} {:>10}",
        "path (per request)", "allocs", "bytes"
    );

    let mut bare = service_fn(empty);
    row("bare service", per_request(&mut bare).await);

    let mut breaker = CircuitBreakerLayer::builder()
        .count_window(100)
        .build()
        .unwrap()
        .layer(service_fn(empty));
    row("circuit breaker, closed", per_request(&mut breaker).await);

    let mut limited = RateLimitLayer::builder()
        .store(MemoryStore::new())
        .rule(Rule::new("ip", Quota::per_second(u64::from(u32::MAX))).key(KeySource::PeerIp))
        .build()
        .unwrap()
        .layer(service_fn(empty));
    row(
        "rate limit, in-memory decision + headers",
        per_request(&mut limited).await,
    );

    let mut headers = SecurityHeadersLayer::builder()
        .environment(Environment::Production)
        .build()
        .unwrap()
        .layer(service_fn(empty));
    row(
        "security headers, api() in production",
        per_request(&mut headers).await,
    );

    let mut plain_json = json_upstream();
    row("bare JSON service", per_request(&mut plain_json).await);

    let (recorder, _shutdown) = UsageRecorder::spawn(
        Discard,
        RecorderConfig {
            capacity: 1 << 20,
            ..RecorderConfig::default()
        },
    );
    let layer = CostMeterLayer::new(PriceTable::builtin(), recorder);
    let mut metered = layer.clone().layer(json_upstream());
    row(
        "cost meter, JSON response metered",
        per_request(&mut metered).await,
    );
    // The gateway's setting: the body read whole first, the cost in five headers.
    let mut with_headers = layer.cost_headers(Some(256 * 1024)).layer(json_upstream());
    row(
        "cost meter, JSON metered with cost headers",
        per_request(&mut with_headers).await,
    );
}
