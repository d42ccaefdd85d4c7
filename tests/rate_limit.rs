//! Rate limiting over real sockets on 127.0.0.1, and under real concurrency.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::routing::post;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use palisade::ErrorFormat;
use palisade::rate_limit::{KeySource, Quota, RateLimitLayer, Rule};
use tower::{Layer, ServiceExt, service_fn};

async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .unwrap();
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_requests_admit_exactly_the_limit() {
    let layer = RateLimitLayer::new([Rule::new("global", Quota::per_hour(100))]).unwrap();
    let svc = layer.layer(service_fn(|_req: Request<()>| async {
        tokio::task::yield_now().await;
        Ok::<_, Infallible>(Response::new(Empty::<Bytes>::new()))
    }));
    let mut tasks = Vec::with_capacity(1000);
    for _ in 0..1000 {
        let svc = svc.clone();
        tasks.push(tokio::spawn(async move {
            svc.oneshot(Request::new(())).await.unwrap().status()
        }));
    }
    let mut ok = 0;
    let mut limited = 0;
    for t in tasks {
        match t.await.unwrap() {
            StatusCode::OK => ok += 1,
            StatusCode::TOO_MANY_REQUESTS => limited += 1,
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!((ok, limited), (100, 900));
    assert_eq!(layer.limiter().counters()[0].allowed, 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_over_sockets_are_exact_per_key() {
    let layer = RateLimitLayer::builder()
        .rule(
            Rule::new("chat", Quota::per_hour(100))
                .post("/v1/messages")
                .key(KeySource::ApiKey),
        )
        .rule(Rule::new("all", Quota::per_hour(150)))
        .error_format(ErrorFormat::Anthropic)
        .build()
        .unwrap();
    let app = Router::new()
        .route("/v1/messages", post(|| async { "ok" }))
        .layer(layer.clone());
    let addr = serve(app).await;
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let client = Arc::new(client);
    let mut tasks = Vec::new();
    for i in 0..400 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let key = if i % 2 == 0 { "sk-even" } else { "sk-odd" };
            let req = Request::post(format!("http://{addr}/v1/messages"))
                .header("x-api-key", key)
                .body(Full::new(Bytes::new()))
                .unwrap();
            let res = client.request(req).await.unwrap();
            (key, res.status())
        }));
    }
    let mut even = 0;
    let mut odd = 0;
    for t in tasks {
        let (key, status) = t.await.unwrap();
        if status == StatusCode::OK {
            if key == "sk-even" {
                even += 1;
            } else {
                odd += 1;
            }
        } else {
            assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        }
    }
    // each key may spend 100, but together they may spend only 150
    assert_eq!(even + odd, 150);
    assert!(even <= 100 && odd <= 100, "{even} {odd}");
}

#[tokio::test]
async fn headers_and_forwarded_for_over_a_real_socket() {
    let layer = RateLimitLayer::builder()
        .rule(Rule::new("ip", Quota::per_minute(2)).key(KeySource::PeerIp))
        .trusted_proxies("127.0.0.1".parse().unwrap())
        .legacy_headers(true)
        .build()
        .unwrap();
    let app = Router::new()
        .route("/v1/messages", post(|| async { "ok" }))
        .layer(layer);
    // palisade reads axum's `ConnectInfo` itself with its `axum` feature; without it, the
    // server hands the peer address on as a plain `SocketAddr` extension.
    #[cfg(not(feature = "axum"))]
    let app = app.layer(axum::middleware::map_request(
        |mut req: Request<axum::body::Body>| async move {
            let peer = req
                .extensions()
                .get::<axum::extract::ConnectInfo<SocketAddr>>()
                .map(|c| c.0);
            if let Some(peer) = peer {
                req.extensions_mut().insert(peer);
            }
            req
        },
    ));
    let addr = serve(app).await;
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let send = |xff: &'static str| {
        let req = Request::post(format!("http://{addr}/v1/messages"))
            .header("x-forwarded-for", xff)
            .body(Full::new(Bytes::new()))
            .unwrap();
        client.request(req)
    };
    let r = send("203.0.113.5").await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["ratelimit-policy"], "\"ip\";q=2;w=60");
    let rl = r.headers()["ratelimit"].to_str().unwrap().to_owned();
    assert!(rl.starts_with("\"ip\";r=1;t="), "{rl}");
    assert_eq!(r.headers()["x-ratelimit-limit"], "2");
    // a forged leftmost hop: the rightmost untrusted hop is still 203.0.113.5
    assert_eq!(send("1.2.3.4, 203.0.113.5").await.unwrap().status(), 200);
    let r = send("5.6.7.8, 203.0.113.5").await.unwrap();
    assert_eq!(r.status(), 429);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    // never 0, and a sliding window never asks for more than two windows
    assert!((1..=120).contains(&retry), "{retry}");
    let body = r.into_body().collect().await.unwrap().to_bytes();
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["status"], 429);
    // another client behind the same proxy has its own quota
    assert_eq!(send("203.0.113.6").await.unwrap().status(), 200);
}

/// Counts the bytes allocated and not yet freed by the current thread, to measure what the
/// rate limiter keeps resident.
mod resident {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    pub struct Counting;

    thread_local! {
        static LIVE: Cell<i64> = const { Cell::new(0) };
    }

    fn add(bytes: usize, sign: i64) {
        let _ = LIVE.try_with(|l| l.set(l.get() + sign * bytes as i64));
    }

    /// Bytes this thread has allocated and not freed since it started.
    pub fn live() -> i64 {
        LIVE.with(Cell::get)
    }

    // SAFETY: every call is forwarded to the system allocator unchanged; only a
    // thread-local integer (const-initialised, so touching it never allocates) is updated.
    #[allow(unsafe_code)]
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            add(layout.size(), 1);
            unsafe { System.alloc(layout) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            add(layout.size(), -1);
            unsafe { System.dealloc(ptr, layout) }
        }
        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            add(layout.size(), 1);
            unsafe { System.alloc_zeroed(layout) }
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            add(layout.size(), -1);
            add(new_size, 1);
            unsafe { System.realloc(ptr, layout, new_size) }
        }
    }
}

#[global_allocator]
static ALLOC: resident::Counting = resident::Counting;

/// 10,000 clients each sending a distinct 16 KiB `x-user-id` must cost no more than the
/// documented 300 bytes per header key (they used to keep every value whole: 165 MB).
#[tokio::test(flavor = "current_thread")]
async fn header_keys_stay_bounded_in_memory_for_any_value() {
    let layer =
        RateLimitLayer::new([
            Rule::new("per-user", Quota::per_minute(10)).key(KeySource::Header(
                http::HeaderName::from_static("x-user-id"),
            )),
        ])
        .unwrap();
    let svc = layer.layer(service_fn(|_req: Request<()>| async {
        Ok::<_, Infallible>(Response::new(Empty::<Bytes>::new()))
    }));
    // one request first, so the layer's and the runtime's one-time allocations are made
    let warm = Request::builder()
        .header("x-user-id", "warm-up")
        .body(())
        .unwrap();
    assert_eq!(svc.clone().oneshot(warm).await.unwrap().status(), 200);
    const KEYS: i64 = 10_000;
    let before = resident::live();
    let mut value = vec![b'a'; 16 * 1024];
    for i in 0..KEYS {
        value[..8].copy_from_slice(format!("{i:08}").as_bytes());
        let req = Request::builder()
            .header("x-user-id", http::HeaderValue::from_bytes(&value).unwrap())
            .body(())
            .unwrap();
        assert_eq!(svc.clone().oneshot(req).await.unwrap().status(), 200);
    }
    let grown = resident::live() - before;
    assert!(
        grown <= KEYS * 300,
        "{KEYS} header keys grew memory by {grown} bytes ({} per key)",
        grown / KEYS
    );
}

/// A server that passes no peer address on (no `ConnectInfo`): a `PeerIp` rule cannot tell
/// clients apart, and says so in its `no_key` counter rather than silently.
#[tokio::test]
async fn peer_ip_rules_count_requests_from_a_server_without_peer_addresses() {
    let layer =
        RateLimitLayer::new([Rule::new("ip", Quota::per_minute(100)).key(KeySource::PeerIp)])
            .unwrap();
    let app = Router::new()
        .route("/v1/messages", post(|| async { "ok" }))
        .layer(layer.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    for _ in 0..3 {
        let req = Request::post(format!("http://{addr}/v1/messages"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        assert_eq!(client.request(req).await.unwrap().status(), 200);
    }
    let counters = &layer.limiter().counters()[0];
    assert_eq!((counters.no_key, counters.allowed), (3, 3));
}
