//! Alert sinks over real sockets: the webhook delivers with retries, and a dead or hanging
//! receiver adds no latency to requests.

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn as hyper_fn;
use hyper_util::rt::TokioIo;
use palisade::cost::Money;
use palisade::cost::alert::{AlertEvent, AlertSink, MemoryAlertSink, WebhookConfig, WebhookSink};
use palisade::cost::budget::{
    Budget, BudgetEstimate, BudgetLayer, BudgetReservation, Period, Scope,
};
use tokio::net::TcpListener;
use tower::{Layer, ServiceExt, service_fn};

/// A receiver that answers `503` to the first `failures` posts, then `200`, and keeps the
/// bodies it accepted.
async fn receiver(failures: usize) -> (SocketAddr, Arc<Mutex<Vec<serde_json::Value>>>) {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let got = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::new(AtomicUsize::new(0));
    let got2 = Arc::clone(&got);
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let got = Arc::clone(&got2);
            let seen = Arc::clone(&seen);
            tokio::spawn(async move {
                let svc = hyper_fn(move |req: Request<Incoming>| {
                    let got = Arc::clone(&got);
                    let seen = Arc::clone(&seen);
                    async move {
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let n = seen.fetch_add(1, Ordering::SeqCst);
                        let status = if n < failures { 503 } else { 200 };
                        if status == 200 {
                            got.lock()
                                .unwrap()
                                .push(serde_json::from_slice(&body).unwrap());
                        }
                        Ok::<_, Infallible>(
                            Response::builder()
                                .status(status)
                                .body(Full::new(Bytes::new()))
                                .unwrap(),
                        )
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, got)
}

fn event(n: u16) -> AlertEvent {
    AlertEvent::threshold(
        "daily",
        format!("user:u{n}"),
        800,
        Money::from_picos(80),
        Money::from_picos(100),
    )
}

#[tokio::test]
async fn the_webhook_posts_json_and_retries_a_failing_receiver() {
    let (addr, got) = receiver(2).await;
    let mut config = WebhookConfig::new(format!("http://{addr}/alerts"));
    config.retry_backoff = Duration::from_millis(5);
    let sink = WebhookSink::spawn(config).unwrap();
    sink.send(event(1));
    sink.send(event(2));
    let deadline = Instant::now() + Duration::from_secs(10);
    while sink.stats().delivered < 2 {
        assert!(
            Instant::now() < deadline,
            "not delivered: {:?}",
            sink.stats()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let got = got.lock().unwrap().clone();
    assert_eq!(got.len(), 2);
    assert_eq!(got[0]["kind"], "threshold");
    assert_eq!(got[0]["ratio"], 0.8);
    assert_eq!(got[0]["subject"], "user:u1");
    assert_eq!(got[0]["source"], "daily");
    assert_eq!(got[0]["spent_usd"], "0.00000000008");
    assert_eq!(got[1]["subject"], "user:u2");
    let stats = sink.stats();
    assert_eq!(
        (stats.queued, stats.delivered, stats.failed, stats.dropped),
        (2, 2, 0, 0)
    );
}

/// `queued` was counted after the event was handed to the delivery task, and read before
/// `delivered`, so a reader could see more delivered than queued. Two threads send while
/// a third reads the counters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_never_sees_more_delivered_than_queued() {
    let (addr, _got) = receiver(0).await;
    let mut config = WebhookConfig::new(format!("http://{addr}/alerts"));
    config.capacity = 100_000;
    let sink = WebhookSink::spawn(config).unwrap();
    const EACH: u16 = 3_000;
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let sink = sink.clone();
        let done = Arc::clone(&done);
        std::thread::spawn(move || {
            let mut bad = 0u64;
            while !done.load(Ordering::Relaxed) {
                let s = sink.stats();
                if s.delivered + s.failed > s.queued {
                    bad += 1;
                }
            }
            bad
        })
    };
    let senders: Vec<_> = (0..2u16)
        .map(|t| {
            let sink = sink.clone();
            std::thread::spawn(move || {
                for i in 0..EACH {
                    sink.send(event(t * EACH + i));
                    if i % 8 == 0 {
                        std::thread::yield_now();
                    }
                }
            })
        })
        .collect();
    for s in senders {
        s.join().unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while sink.stats().delivered < u64::from(2 * EACH) {
        assert!(Instant::now() < deadline, "{:?}", sink.stats());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    done.store(true, Ordering::Relaxed);
    assert_eq!(
        reader.join().unwrap(),
        0,
        "snapshots with delivered > queued"
    );
}

#[tokio::test]
async fn a_receiver_that_never_answers_times_out_and_is_counted() {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let held = Arc::new(Mutex::new(Vec::new()));
    let held2 = Arc::clone(&held);
    tokio::spawn(async move {
        loop {
            let (s, _) = listener.accept().await.unwrap();
            held2.lock().unwrap().push(s); // accepted, never read, never answered
        }
    });
    let mut config = WebhookConfig::new(format!("http://{addr}/"));
    config.timeout = Duration::from_millis(50);
    config.retries = 1;
    config.retry_backoff = Duration::from_millis(1);
    let sink = WebhookSink::spawn(config).unwrap();
    sink.send(event(1));
    let deadline = Instant::now() + Duration::from_secs(10);
    while sink.stats().failed < 1 {
        assert!(Instant::now() < deadline, "{:?}", sink.stats());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(sink.stats().delivered, 0);
}

#[test]
fn a_webhook_url_must_be_http_with_a_host() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    assert!(WebhookSink::spawn(WebhookConfig::new("ftp://example.com/")).is_err());
    assert!(WebhookSink::spawn(WebhookConfig::new("not a url")).is_err());
    assert!(WebhookSink::spawn(WebhookConfig::new("http://127.0.0.1:9/")).is_ok());
}

/// Sends `users` requests, each crossing all three thresholds of its own budget account,
/// and returns the total and the slowest request time.
async fn run_requests(alerts: impl AlertSink, users: usize) -> (Duration, Duration) {
    let layer = BudgetLayer::builder()
        .budget(Budget::new(
            "daily",
            Scope::User,
            Period::Day,
            Money::from_picos(100),
        ))
        .user_header(Some("x-user-id")) // the test stands for a trusted proxy
        .alerts(alerts)
        .build()
        .unwrap();
    let svc = layer.layer(service_fn(|req: Request<Full<Bytes>>| async move {
        let r = req.extensions().get::<BudgetReservation>().unwrap();
        r.settle(r.amount()); // 100 %: three alerts
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
    }));
    let mut total = Duration::ZERO;
    let mut slowest = Duration::ZERO;
    for i in 0..users {
        let mut req = Request::post("/v1/messages")
            .header("x-user-id", format!("u{i}"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        req.extensions_mut()
            .insert(BudgetEstimate(Money::from_picos(100)));
        let t = Instant::now();
        let res = svc.clone().oneshot(req).await.unwrap();
        let took = t.elapsed();
        assert_eq!(res.status(), 200);
        total += took;
        slowest = slowest.max(took);
    }
    (total, slowest)
}

#[tokio::test]
async fn a_dead_or_hanging_webhook_receiver_adds_no_latency_to_requests() {
    const USERS: usize = 2000;
    // a receiver that accepts connections and never answers
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let hanging = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let (s, _) = listener.accept().await.unwrap();
            held.push(s);
        }
    });
    // a port nobody listens on
    let dead = {
        let l = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        l.local_addr().unwrap()
    };
    let memory = Arc::new(MemoryAlertSink::default());
    let (base_total, base_slowest) = run_requests(Arc::clone(&memory), USERS).await;
    assert_eq!(memory.events().len(), USERS * 3);
    for addr in [hanging, dead] {
        let mut config = WebhookConfig::new(format!("http://{addr}/"));
        config.capacity = 16;
        config.timeout = Duration::from_secs(30);
        let sink = WebhookSink::spawn(config).unwrap();
        let (total, slowest) = run_requests(sink.clone(), USERS).await;
        let stats = sink.stats();
        eprintln!(
            "{USERS} requests, {} alerts: memory sink {base_total:?} (slowest {base_slowest:?}), \
             webhook to {addr} {total:?} (slowest {slowest:?}); {stats:?}",
            USERS * 3
        );
        assert_eq!(stats.delivered, 0);
        assert!(stats.dropped > 0, "{stats:?}");
        assert_eq!(stats.queued + stats.dropped, (USERS * 3) as u64);
        // Queueing an event costs about what keeping it in memory does; the receiver's
        // state never enters the request's time. Generous bounds for a shared machine.
        assert!(
            total < base_total * 3 + Duration::from_millis(100),
            "webhook {total:?} vs memory {base_total:?}"
        );
        assert!(
            slowest < Duration::from_millis(250),
            "slowest request {slowest:?}"
        );
    }
}
