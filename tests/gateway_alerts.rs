//! The chat gateway's alerts through its sinks (the log, and the webhook of
//! `PALISADE_GATEWAY_ALERT_WEBHOOK`, here a receiver on 127.0.0.1): a breaker that opens
//! raises one alert per episode, a spend spike one per window, and a receiver that never
//! answers slows no request.
#![allow(dead_code)]

include!("chat_gateway_support/modules.rs");

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use palisade::circuit_breaker::{CircuitBreakerLayerBuilder, CircuitState};
use palisade::config::Env;
use palisade::cost::Money;
use palisade::cost::alert::{AlertEvent, AlertKind, AlertSink, MemoryAlertSink};
use serde_json::Value;
use tower::{Layer, ServiceExt, service_fn};

use fixture::{Gateway, NO_RETRIES, USER};

type Received = Arc<Mutex<Vec<Value>>>;

/// A webhook receiver on 127.0.0.1 that keeps every JSON body; with `hang`, it accepts
/// posts and never answers them.
async fn receiver(hang: bool) -> (SocketAddr, Received) {
    let got: Received = Arc::default();
    let kept = Arc::clone(&got);
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: Bytes| {
            let kept = Arc::clone(&kept);
            async move {
                kept.lock()
                    .unwrap()
                    .push(serde_json::from_slice(&body).unwrap());
                if hang {
                    std::future::pending::<()>().await;
                }
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, got)
}

/// The gateway posting its alerts to `hook`, without retries, with `vars` on top.
async fn start(hook: SocketAddr, vars: &[(&str, &str)]) -> Gateway {
    let hook = format!("http://{hook}/hook");
    let base = fixture::with(
        NO_RETRIES,
        &[("PALISADE_GATEWAY_ALERT_WEBHOOK", hook.as_str())],
    );
    fixture::start(&fixture::with(&base, vars)).await
}

impl Gateway {
    /// A chat with `model` as alice (with `anthropic-version`); the status.
    async fn alice_chat(&self, model: &str) -> u16 {
        self.call(
            http::Method::POST,
            "/v1/messages",
            Some(USER),
            Some(fixture::chat(model)),
            &[("anthropic-version", "2023-06-01")],
        )
        .await
        .status
        .as_u16()
    }

    /// Waits until the webhook has settled every event it queued (delivered or failed).
    async fn alerts_settled(&self) {
        for _ in 0..1000 {
            let s = self.state.alerts.webhook_stats().expect("a webhook");
            if s.queued == s.delivered + s.failed + s.dropped {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("the webhook never delivered its queue");
    }
}

fn of_kind<'a>(got: &'a [Value], kind: &str) -> Vec<&'a Value> {
    got.iter().filter(|e| e["kind"] == kind).collect()
}

#[tokio::test]
async fn a_breaker_opening_posts_one_alert_to_the_webhook() {
    let (hook, got) = receiver(false).await;
    let gw = start(
        hook,
        &[
            ("PALISADE_CIRCUIT_BREAKER_CONSECUTIVE_FAILURES", "2"),
            ("PALISADE_CIRCUIT_BREAKER_OPEN_DURATION", "2m"),
        ],
    )
    .await;
    // Two 529s open the breaker; the calls after it are refused by the open breaker.
    for _ in 0..6 {
        assert_eq!(gw.alice_chat("mock-overloaded").await, 529);
    }
    gw.alerts_settled().await;
    let got = got.lock().unwrap().clone();
    let opened = of_kind(&got, "circuit_opened");
    assert_eq!(opened.len(), 1, "one alert for the episode: {got:?}");
    assert_eq!(opened[0]["source"], "primary");
    assert_eq!(opened[0]["subject"], "upstream:primary");
    // Two minutes, give or take the breaker's jitter.
    let open_for = opened[0]["open_for_ms"].as_u64().unwrap();
    assert!((90_000..=150_000).contains(&open_for), "{open_for}");
}

/// A breaker that fails its probe opens again within the same episode: no second alert.
/// One that recovered and opens again starts a new episode: a second alert.
#[tokio::test(start_paused = true)]
async fn a_breaker_alerts_once_per_episode_not_on_each_failed_probe() {
    let alerts = Arc::new(MemoryAlertSink::default());
    let sink = Arc::clone(&alerts);
    let breaker = CircuitBreakerLayerBuilder::new(Default::default())
        .name("primary")
        .consecutive_failures(2)
        .open_duration(Duration::from_secs(10))
        .on_transition(move |t| {
            if let Some(e) = upstream::breaker_alert(t) {
                sink.send(e);
            }
        })
        .build()
        .unwrap();
    let handle = breaker.handle();
    let fail = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let f = Arc::clone(&fail);
    let svc = breaker.layer(service_fn(move |_: http::Request<()>| {
        let fail = f.load(std::sync::atomic::Ordering::SeqCst);
        async move {
            Ok::<_, std::convert::Infallible>(
                http::Response::builder()
                    .status(if fail { 529 } else { 200 })
                    .body(())
                    .unwrap(),
            )
        }
    }));
    let call = || svc.clone().oneshot(http::Request::new(()));
    let opened = || {
        alerts
            .events()
            .into_iter()
            .filter(|e| matches!(e.kind, AlertKind::CircuitOpened { .. }))
            .count()
    };

    let _ = call().await;
    let _ = call().await;
    assert_eq!(handle.state(), CircuitState::Open);
    assert_eq!(opened(), 1);

    // The probe fails: open again, same episode.
    tokio::time::advance(Duration::from_secs(11)).await;
    let _ = call().await;
    assert_eq!(handle.state(), CircuitState::Open);
    assert_eq!(opened(), 1, "a failed probe is the same episode");

    // Recovered (after the longer open time a failed probe earns), then failing again: a
    // new episode.
    fail.store(false, std::sync::atomic::Ordering::SeqCst);
    tokio::time::advance(Duration::from_secs(600)).await;
    for _ in 0..5 {
        let _ = call().await;
    }
    assert_eq!(handle.state(), CircuitState::Closed);
    fail.store(true, std::sync::atomic::Ordering::SeqCst);
    let _ = call().await;
    let _ = call().await;
    assert_eq!(handle.state(), CircuitState::Open);
    assert_eq!(opened(), 2, "a new episode, a new alert");
}

#[tokio::test]
async fn a_spend_spike_posts_one_alert_per_window() {
    let (hook, got) = receiver(false).await;
    let gw = start(
        hook,
        &[
            ("PALISADE_GATEWAY_SPIKE_WINDOW", "1h"),
            ("PALISADE_GATEWAY_SPIKE_MULTIPLE", "3"),
            ("PALISADE_GATEWAY_SPIKE_MIN_SPEND", "0.0001"),
        ],
    )
    .await;
    // An hour earlier alice spent a millionth of a dollar: a trailing average far below
    // what one request costs now.
    let spikes = gw
        .state
        .spikes
        .as_ref()
        .expect("spike alerts are on by default");
    spikes.observe(
        "alice",
        SystemTime::now() - Duration::from_secs(3600),
        Money::parse_dollars("0.000001").unwrap(),
    );
    for _ in 0..3 {
        assert_eq!(gw.alice_chat("claude-sonnet-4-5").await, 200);
    }
    gw.usage_records(3).await;
    gw.alerts_settled().await;
    let got = got.lock().unwrap().clone();
    let spikes = of_kind(&got, "spike");
    assert_eq!(spikes.len(), 1, "one alert in the window: {got:?}");
    assert_eq!(spikes[0]["subject"], "user:alice");
}

#[tokio::test]
async fn spike_alerts_can_be_switched_off_and_bad_settings_are_reported() {
    let mut env = Env::from_pairs([("PALISADE_GATEWAY_SPIKE_ALERTS", "off")]);
    let config = config::GatewayConfig::from_env(&mut env);
    env.finish().unwrap();
    assert!(config.spike.is_none());

    let mut env = Env::from_pairs([
        ("PALISADE_GATEWAY_SPIKE_MULTIPLE", "0.5"),
        ("PALISADE_GATEWAY_SPIKE_MIN_SPEND", "lots"),
        ("PALISADE_GATEWAY_SPIKE_WINDOW", "0s"),
    ]);
    let _ = config::GatewayConfig::from_env(&mut env);
    let err = env.finish().unwrap_err();
    let names: Vec<&str> = err.problems().iter().map(|p| p.name.as_str()).collect();
    for name in [
        "PALISADE_GATEWAY_SPIKE_MULTIPLE",
        "PALISADE_GATEWAY_SPIKE_MIN_SPEND",
        "PALISADE_GATEWAY_SPIKE_WINDOW",
    ] {
        assert!(names.contains(&name), "{name} not reported: {err}");
    }
}

/// A receiver that takes the post and never answers holds no request up.
#[tokio::test]
async fn a_webhook_that_never_answers_slows_no_request() {
    let (hook, got) = receiver(true).await;
    let gw = start(
        hook,
        &[("PALISADE_CIRCUIT_BREAKER_CONSECUTIVE_FAILURES", "1")],
    )
    .await;
    for _ in 0..5 {
        let t = Instant::now();
        assert_eq!(gw.alice_chat("mock-overloaded").await, 529);
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "a request waited {:?} on the webhook",
            t.elapsed()
        );
    }
    for _ in 0..1000 {
        if !got.lock().unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        of_kind(&got.lock().unwrap(), "circuit_opened").len(),
        1,
        "the alert reached the receiver while requests went on"
    );
}

#[test]
fn circuit_opened_events_render_for_the_webhook() {
    let e = AlertEvent::circuit_opened("primary", Duration::from_secs(30));
    let doc = e.to_json();
    assert_eq!(doc["kind"], "circuit_opened");
    assert_eq!(doc["open_for_ms"], 30_000);
    assert_eq!(doc["subject"], "upstream:primary");
}
