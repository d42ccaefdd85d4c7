//! Unit tests of the breaker: every transition on a paused clock, both windows, probes
//! under concurrency, forced states, registry and responses.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use http_body_util::BodyExt;
use tower::{Layer, Service, ServiceExt, service_fn};

use super::*;
use crate::classify::{Classification, Outcome, Retry};
use crate::{BoxError, Error, ErrorFormat, ErrorKind};

/// What the fake upstream should do with one request.
#[derive(Clone, Copy)]
struct Call {
    status: u16,
    delay: Duration,
}

const OK: Call = Call {
    status: 200,
    delay: Duration::ZERO,
};
const FAIL: Call = Call {
    status: 500,
    delay: Duration::ZERO,
};
const BAD_REQUEST: Call = Call {
    status: 400,
    delay: Duration::ZERO,
};

fn slow(status: u16, delay: Duration) -> Call {
    Call { status, delay }
}

type Svc = tower::util::BoxService<Request<Call>, Response<()>, BoxError>;

/// A breaker around an upstream that counts its calls.
fn guarded(builder: CircuitBreakerLayerBuilder) -> (Svc, CircuitBreakerHandle, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&calls);
    let upstream = service_fn(move |req: Request<Call>| {
        seen.fetch_add(1, Ordering::SeqCst);
        let call = *req.body();
        async move {
            if !call.delay.is_zero() {
                tokio::time::sleep(call.delay).await;
            }
            Ok::<_, BoxError>(Response::builder().status(call.status).body(()).unwrap())
        }
    });
    let layer = builder.build().unwrap();
    let handle = layer.handle();
    (
        tower::util::BoxService::new(layer.layer(upstream)),
        handle,
        calls,
    )
}

fn base() -> CircuitBreakerLayerBuilder {
    CircuitBreakerLayer::builder()
        .name("test")
        .count_window(10)
        .minimum_calls(5)
        .failure_rate_threshold(0.5)
        .open_duration(Duration::from_secs(10))
        .max_open_duration(Duration::from_secs(60))
        .jitter(0.0)
        .half_open_probes(2)
        .max_wait_in_half_open(Some(Duration::from_secs(30)))
}

async fn send(svc: &mut Svc, call: Call) -> Result<u16, Error> {
    match svc.ready().await.unwrap().call(Request::new(call)).await {
        Ok(r) => Ok(r.status().as_u16()),
        Err(e) => Err(*e.downcast::<Error>().expect("a palisade error")),
    }
}

fn refused_after(result: Result<u16, Error>) -> Duration {
    let err = result.expect_err("expected a refusal");
    assert_eq!(err.kind(), ErrorKind::CircuitOpen);
    err.retry_after().expect("refusals carry retry_after")
}

#[tokio::test(start_paused = true)]
async fn closed_opens_on_failure_rate_only_after_minimum_calls() {
    let (mut svc, handle, calls) = guarded(base());
    for _ in 0..4 {
        assert_eq!(send(&mut svc, FAIL).await.unwrap(), 500);
    }
    // 4 failures of 4 calls is 100 %, but the minimum is 5 calls
    assert_eq!(handle.state(), CircuitState::Closed);
    assert_eq!(send(&mut svc, FAIL).await.unwrap(), 500);
    assert_eq!(handle.state(), CircuitState::Open);
    assert_eq!(
        refused_after(send(&mut svc, OK).await),
        Duration::from_secs(10)
    );
    assert_eq!(calls.load(Ordering::SeqCst), 5);
}

#[tokio::test(start_paused = true)]
async fn below_threshold_stays_closed_and_ignored_outcomes_do_not_count() {
    let (mut svc, handle, _) = guarded(base());
    for _ in 0..20 {
        send(&mut svc, OK).await.unwrap();
        send(&mut svc, OK).await.unwrap();
        send(&mut svc, FAIL).await.unwrap(); // 33 %
        send(&mut svc, BAD_REQUEST).await.unwrap(); // ignored
    }
    assert_eq!(handle.state(), CircuitState::Closed);
    let snap = handle.snapshot();
    assert_eq!(snap.calls_in_window, 10);
    assert!(
        (0.3..=0.4).contains(&snap.failure_rate.unwrap()),
        "{snap:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn count_window_slides_after_ten_thousand_successes() {
    let (mut svc, handle, _) = guarded(base().count_window(100).minimum_calls(100));
    for _ in 0..10_000 {
        send(&mut svc, OK).await.unwrap();
    }
    let mut failures = 0;
    while handle.state() == CircuitState::Closed && failures < 200 {
        send(&mut svc, FAIL).await.unwrap();
        failures += 1;
    }
    assert_eq!(handle.state(), CircuitState::Open);
    assert_eq!(failures, 50, "50 failures in a window of 100 is 50 %");
}

#[tokio::test(start_paused = true)]
async fn time_window_counts_only_recent_seconds() {
    let builder = base().time_window(Duration::from_secs(10)).minimum_calls(5);
    let (mut svc, handle, _) = guarded(builder);
    for _ in 0..4 {
        send(&mut svc, FAIL).await.unwrap();
    }
    for _ in 0..6 {
        send(&mut svc, OK).await.unwrap();
    }
    // 4 of 10 failed; once those seconds pass, they are forgotten
    tokio::time::advance(Duration::from_secs(11)).await;
    assert_eq!(handle.snapshot().calls_in_window, 0);
    for _ in 0..5 {
        send(&mut svc, OK).await.unwrap();
    }
    for _ in 0..4 {
        send(&mut svc, FAIL).await.unwrap();
    }
    assert_eq!(handle.state(), CircuitState::Closed, "4 of 9");
    send(&mut svc, FAIL).await.unwrap();
    assert_eq!(handle.state(), CircuitState::Open, "5 of 10");
    let snap = handle.snapshot();
    assert_eq!((snap.calls_in_window, snap.failures_in_window), (10, 5));
}

/// The coarse clock drives the window and the open duration from real time (cached), not
/// from tokio's clock: a paused clock advanced by 20 s does not end a 10 s open period.
#[tokio::test(start_paused = true)]
async fn coarse_clock_time_window_trips_and_ignores_the_paused_clock() {
    let builder = base()
        .time_window(Duration::from_secs(10))
        .slow_calls(Duration::from_secs(60), 1.0)
        .clock(crate::clock::ClockSource::Coarse);
    let (mut svc, handle, calls) = guarded(builder);
    for _ in 0..5 {
        send(&mut svc, OK).await.unwrap();
    }
    for _ in 0..4 {
        send(&mut svc, FAIL).await.unwrap();
    }
    assert_eq!(handle.state(), CircuitState::Closed, "4 of 9");
    let snap = handle.snapshot();
    assert_eq!((snap.calls_in_window, snap.failures_in_window), (9, 4));
    assert_eq!(snap.slow_calls_in_window, 0);
    send(&mut svc, FAIL).await.unwrap();
    assert_eq!(handle.state(), CircuitState::Open, "5 of 10");

    let wait = refused_after(send(&mut svc, OK).await);
    assert!(wait <= Duration::from_secs(10), "{wait:?}");
    assert!(wait > Duration::from_secs(5), "{wait:?}");
    tokio::time::advance(Duration::from_secs(20)).await;
    assert_eq!(handle.state(), CircuitState::Open);
    assert!(send(&mut svc, OK).await.is_err(), "still refused");
    assert_eq!(calls.load(Ordering::SeqCst), 10, "no call while open");
}

#[tokio::test(start_paused = true)]
async fn time_window_of_ten_thousand_successes_then_failures_opens() {
    let builder = base()
        .time_window(Duration::from_secs(10))
        .minimum_calls(100);
    let (mut svc, handle, _) = guarded(builder);
    for i in 0..10_000 {
        if i % 1000 == 0 {
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        send(&mut svc, OK).await.unwrap();
    }
    tokio::time::advance(Duration::from_secs(10)).await;
    for _ in 0..100 {
        send(&mut svc, OK).await.unwrap();
    }
    let mut failures = 0;
    while handle.state() == CircuitState::Closed {
        send(&mut svc, FAIL).await.unwrap();
        failures += 1;
    }
    assert_eq!(failures, 100);
}

#[tokio::test(start_paused = true)]
async fn slow_calls_trip_the_slow_rate() {
    let builder = base().slow_calls(Duration::from_secs(2), 0.6);
    let (mut svc, handle, _) = guarded(builder);
    for _ in 0..5 {
        send(&mut svc, slow(200, Duration::from_secs(1)))
            .await
            .unwrap();
    }
    for _ in 0..5 {
        send(&mut svc, slow(200, Duration::from_secs(3)))
            .await
            .unwrap();
    }
    assert_eq!(handle.state(), CircuitState::Closed, "50 % slow");
    assert_eq!(handle.snapshot().slow_calls_in_window, 5);
    send(&mut svc, slow(200, Duration::from_secs(3)))
        .await
        .unwrap();
    assert_eq!(handle.state(), CircuitState::Open, "60 % slow");
}

#[tokio::test(start_paused = true)]
async fn consecutive_failures_rule() {
    let builder = base()
        .count_window(100)
        .minimum_calls(100)
        .consecutive_failures(3);
    let (mut svc, handle, _) = guarded(builder);
    send(&mut svc, FAIL).await.unwrap();
    send(&mut svc, FAIL).await.unwrap();
    send(&mut svc, OK).await.unwrap();
    send(&mut svc, FAIL).await.unwrap();
    send(&mut svc, BAD_REQUEST).await.unwrap(); // ignored: the run goes on
    send(&mut svc, FAIL).await.unwrap();
    assert_eq!(handle.state(), CircuitState::Closed);
    assert_eq!(handle.snapshot().consecutive_failures, 2);
    send(&mut svc, FAIL).await.unwrap();
    assert_eq!(handle.state(), CircuitState::Open);
}

async fn trip(svc: &mut Svc) {
    for _ in 0..5 {
        let _ = send(svc, FAIL).await;
    }
}

/// A breaker of `builder` (open for 10 s) tripped, and the open duration passed: the next
/// call is a probe.
async fn tripped_and_due_a_probe(
    builder: CircuitBreakerLayerBuilder,
) -> (Svc, CircuitBreakerHandle) {
    let (mut svc, handle, _) = guarded(builder);
    trip(&mut svc).await;
    tokio::time::advance(Duration::from_secs(10)).await;
    (svc, handle)
}

#[tokio::test(start_paused = true)]
async fn open_half_open_closed_and_growing_open_duration() {
    let transitions = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&transitions);
    let builder = base().on_transition(move |t: &Transition| {
        log.lock()
            .unwrap()
            .push((t.from, t.to, t.reason, t.open_for));
    });
    let (mut svc, handle, calls) = guarded(builder);
    trip(&mut svc).await;
    assert_eq!(handle.state(), CircuitState::Open);

    // refused while open, with a shrinking retry_after, and the upstream is not called
    tokio::time::advance(Duration::from_secs(4)).await;
    assert_eq!(
        refused_after(send(&mut svc, OK).await),
        Duration::from_secs(6)
    );
    assert_eq!(handle.snapshot().next_probe_in_ms, Some(6000));
    assert_eq!(calls.load(Ordering::SeqCst), 5);

    // after 10 s: half-open, a probe fails: open again for 20 s
    tokio::time::advance(Duration::from_secs(6)).await;
    assert_eq!(send(&mut svc, FAIL).await.unwrap(), 500);
    assert_eq!(handle.state(), CircuitState::Open);
    assert_eq!(
        refused_after(send(&mut svc, OK).await),
        Duration::from_secs(20)
    );
    tokio::time::advance(Duration::from_secs(20)).await;
    send(&mut svc, FAIL).await.unwrap();
    assert_eq!(
        refused_after(send(&mut svc, OK).await),
        Duration::from_secs(40)
    );
    tokio::time::advance(Duration::from_secs(40)).await;
    send(&mut svc, FAIL).await.unwrap();
    // capped at 60 s
    assert_eq!(
        refused_after(send(&mut svc, OK).await),
        Duration::from_secs(60)
    );
    tokio::time::advance(Duration::from_secs(60)).await;

    // two successful probes close it, and the window starts empty
    assert_eq!(send(&mut svc, OK).await.unwrap(), 200);
    assert_eq!(handle.state(), CircuitState::HalfOpen);
    assert_eq!(send(&mut svc, OK).await.unwrap(), 200);
    assert_eq!(handle.state(), CircuitState::Closed);
    assert_eq!(handle.snapshot().calls_in_window, 0);

    // the open duration is back at its base
    trip(&mut svc).await;
    assert_eq!(
        refused_after(send(&mut svc, OK).await),
        Duration::from_secs(10)
    );

    use CircuitState::*;
    use TransitionReason::*;
    let seen: Vec<_> = transitions.lock().unwrap().clone();
    let secs = |s| Some(Duration::from_secs(s));
    assert_eq!(
        seen,
        vec![
            (Closed, Open, FailureRate, secs(10)),
            (Open, HalfOpen, OpenDurationElapsed, None),
            (HalfOpen, Open, ProbeFailed, secs(20)),
            (Open, HalfOpen, OpenDurationElapsed, None),
            (HalfOpen, Open, ProbeFailed, secs(40)),
            (Open, HalfOpen, OpenDurationElapsed, None),
            (HalfOpen, Open, ProbeFailed, secs(60)),
            (Open, HalfOpen, OpenDurationElapsed, None),
            (HalfOpen, Closed, ProbesSucceeded, None),
            (Closed, Open, FailureRate, secs(10)),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn jitter_spreads_open_durations_within_bounds() {
    let (mut svc, handle, _) = guarded(base().jitter(0.5));
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..20 {
        trip(&mut svc).await;
        let wait = refused_after(send(&mut svc, OK).await);
        assert!(
            wait >= Duration::from_secs(5) && wait <= Duration::from_secs(15),
            "{wait:?}"
        );
        seen.insert(wait);
        handle.reset();
    }
    assert!(seen.len() > 1, "jitter must vary the open duration");
}

/// A seeded breaker repeats its open durations, jitter and all, as a seeded retry layer
/// repeats its delays.
#[tokio::test(start_paused = true)]
async fn seeded_jitter_repeats_open_durations() {
    async fn waits(seed: u64) -> Vec<Duration> {
        let (mut svc, handle, _) = guarded(base().jitter(0.5).seed(seed));
        let mut waits = Vec::new();
        for _ in 0..8 {
            trip(&mut svc).await;
            waits.push(refused_after(send(&mut svc, OK).await));
            handle.reset();
        }
        waits
    }
    let first = waits(7).await;
    assert_eq!(first, waits(7).await);
    assert_ne!(first, waits(8).await);
    assert!(first.iter().any(|w| *w != first[0]), "{first:?}");
}

#[tokio::test(start_paused = true)]
async fn half_open_admits_exactly_n_of_100_concurrent_callers() {
    let (mut svc, handle, calls) = guarded(base().half_open_probes(3));
    trip(&mut svc).await;
    tokio::time::advance(Duration::from_secs(10)).await;
    let hang = slow(200, Duration::from_secs(3600));
    let mut admitted = Vec::new();
    let mut refused = 0;
    let mut futures = Vec::new();
    for _ in 0..100 {
        futures.push(svc.ready().await.unwrap().call(Request::new(hang)));
    }
    // the permits were taken at `call`; poll each once to see which were refused
    for mut f in futures {
        let waker = futures_noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        match std::pin::Pin::new(&mut f).poll(&mut cx) {
            std::task::Poll::Ready(Err(e)) => {
                assert_eq!(
                    e.downcast::<Error>().unwrap().kind(),
                    ErrorKind::CircuitOpen
                );
                refused += 1;
            }
            std::task::Poll::Pending => admitted.push(f),
            std::task::Poll::Ready(Ok(_)) => panic!("a hanging probe cannot finish"),
        }
    }
    assert_eq!((admitted.len(), refused), (3, 97));
    assert_eq!(calls.load(Ordering::SeqCst), 5 + 3);
    assert_eq!(handle.snapshot().half_open_probes_in_flight, Some(3));

    // a cancelled probe gives its slot back: exactly one more caller gets through
    drop(admitted.pop());
    assert_eq!(handle.snapshot().half_open_probes_in_flight, Some(2));
    assert_eq!(send(&mut svc, OK).await.unwrap(), 200);
    assert_eq!(handle.state(), CircuitState::HalfOpen);
    assert!(
        send(&mut svc, OK).await.is_err(),
        "all slots are taken again"
    );
    drop(admitted);
}

fn futures_noop_waker() -> std::task::Waker {
    std::task::Waker::noop().clone()
}

use std::future::Future;

/// Non-streamed LLM calls can take longer than `max_wait_in_half_open` (30 s here, 60 s by
/// default). Half-open used to time out while its probes were still running and discard
/// their successes, so such an upstream never closed the breaker again.
#[tokio::test(start_paused = true)]
async fn half_open_does_not_time_out_while_its_probes_are_in_flight() {
    let (mut svc, handle) = tripped_and_due_a_probe(base()).await;
    let long = slow(200, Duration::from_secs(90));
    let p1 = svc.ready().await.unwrap().call(Request::new(long));
    let p2 = svc.ready().await.unwrap().call(Request::new(long));
    assert_eq!(handle.state(), CircuitState::HalfOpen);
    let probes = tokio::spawn(async move { (p1.await.unwrap(), p2.await.unwrap()) });
    // refused while the probes decide
    assert_eq!(
        refused_after(send(&mut svc, OK).await),
        Duration::from_secs(10)
    );
    // past the maximum wait, the probes are still running: still half-open, still refusing
    tokio::time::advance(Duration::from_secs(60)).await;
    assert!(send(&mut svc, OK).await.is_err());
    assert_eq!(handle.state(), CircuitState::HalfOpen);
    // the probes succeed after 90 s: the upstream is healthy again
    tokio::time::advance(Duration::from_secs(30)).await;
    let (r1, r2) = probes.await.unwrap();
    assert_eq!((r1.status().as_u16(), r2.status().as_u16()), (200, 200));
    assert_eq!(handle.state(), CircuitState::Closed);
    assert_eq!(send(&mut svc, OK).await.unwrap(), 200);
}

/// Half-open still gives up when no probe succeeded and none is in flight at the end of
/// the maximum wait.
#[tokio::test(start_paused = true)]
async fn half_open_times_out_when_no_probe_is_in_flight() {
    let (mut svc, handle) = tripped_and_due_a_probe(base()).await;
    // the only probe is ignored (a 400 says nothing about the upstream's health)
    assert_eq!(send(&mut svc, BAD_REQUEST).await.unwrap(), 400);
    assert_eq!(handle.state(), CircuitState::HalfOpen);
    tokio::time::advance(Duration::from_secs(30)).await;
    // open again, for longer
    assert_eq!(
        refused_after(send(&mut svc, OK).await),
        Duration::from_secs(20)
    );
    assert_eq!(handle.state(), CircuitState::Open);
}

/// An upstream called less often than `max_wait_in_half_open`: half-open reopened the
/// breaker between two successful probes (no failure seen), doubling the open duration
/// each time, so a healthy upstream with light traffic never closed it again and every
/// other call was refused.
#[tokio::test(start_paused = true)]
async fn a_healthy_upstream_called_rarely_closes_the_breaker() {
    let (mut svc, handle) = tripped_and_due_a_probe(base()).await;
    assert_eq!(send(&mut svc, OK).await.unwrap(), 200);
    assert_eq!(handle.state(), CircuitState::HalfOpen);
    // the next call comes after the maximum wait: it is the second probe, not refused
    tokio::time::advance(Duration::from_secs(45)).await;
    assert_eq!(send(&mut svc, OK).await.unwrap(), 200);
    assert_eq!(handle.state(), CircuitState::Closed);
}

#[tokio::test(start_paused = true)]
async fn ignored_probe_releases_its_slot() {
    let (mut svc, handle) = tripped_and_due_a_probe(base().half_open_probes(1)).await;
    assert_eq!(send(&mut svc, BAD_REQUEST).await.unwrap(), 400);
    assert_eq!(handle.state(), CircuitState::HalfOpen);
    assert_eq!(send(&mut svc, OK).await.unwrap(), 200);
    assert_eq!(handle.state(), CircuitState::Closed);
}

#[tokio::test(start_paused = true)]
async fn calls_admitted_before_opening_do_not_count_later() {
    let (mut svc, handle, _) = guarded(base().half_open_probes(1));
    // a long call admitted while closed
    let late = svc
        .ready()
        .await
        .unwrap()
        .call(Request::new(slow(500, Duration::from_secs(100))));
    trip(&mut svc).await;
    tokio::time::advance(Duration::from_secs(10)).await;
    send(&mut svc, OK).await.unwrap();
    assert_eq!(handle.state(), CircuitState::Closed);
    // it fails now, in the new closed period: not counted
    assert_eq!(late.await.unwrap().status(), 500);
    assert_eq!(handle.snapshot().calls_in_window, 0);
}

#[tokio::test(start_paused = true)]
async fn forced_states() {
    let (mut svc, handle, calls) = guarded(base());
    handle.force_open();
    assert_eq!(handle.state(), CircuitState::ForcedOpen);
    assert_eq!(
        refused_after(send(&mut svc, OK).await),
        Duration::from_secs(10)
    );
    assert_eq!(calls.load(Ordering::SeqCst), 0);

    handle.force_closed();
    for _ in 0..20 {
        assert_eq!(send(&mut svc, FAIL).await.unwrap(), 500);
    }
    assert_eq!(handle.state(), CircuitState::ForcedClosed);
    assert_eq!(handle.snapshot().calls_in_window, 0, "not counted");

    handle.metrics_only();
    for _ in 0..20 {
        send(&mut svc, FAIL).await.unwrap();
    }
    assert_eq!(handle.state(), CircuitState::MetricsOnly);
    let snap = handle.snapshot();
    assert_eq!(snap.calls_in_window, 10);
    assert_eq!(snap.failure_rate, Some(1.0));

    handle.reset();
    assert_eq!(handle.state(), CircuitState::Closed);
    assert_eq!(handle.snapshot().calls_in_window, 0);
    trip(&mut svc).await;
    assert_eq!(handle.state(), CircuitState::Open);
    handle.reset();
    assert_eq!(send(&mut svc, OK).await.unwrap(), 200);
}

#[tokio::test(start_paused = true)]
async fn custom_classifier_closure() {
    // an upstream whose 404 means "broken", and whose 500 is the caller's fault
    let classifier = |r: Result<&Response<()>, &BoxError>| match r {
        Ok(r) if r.status() == 404 => Classification::new(Outcome::Failure, Retry::Never),
        Ok(_) => Classification::new(Outcome::Ignored, Retry::Never),
        Err(_) => Classification::new(Outcome::Failure, Retry::Never),
    };
    let layer = base().build().unwrap().classifier(classifier);
    let handle = layer.handle();
    let mut svc = layer.layer(service_fn(|req: Request<u16>| async move {
        Ok::<_, BoxError>(Response::builder().status(*req.body()).body(()).unwrap())
    }));
    for _ in 0..10 {
        svc.ready()
            .await
            .unwrap()
            .call(Request::new(500))
            .await
            .unwrap();
    }
    assert_eq!(handle.state(), CircuitState::Closed);
    for _ in 0..5 {
        svc.ready()
            .await
            .unwrap()
            .call(Request::new(404))
            .await
            .unwrap();
    }
    assert_eq!(handle.state(), CircuitState::Open);
}

#[tokio::test(start_paused = true)]
async fn transport_errors_fail_and_refusals_from_below_are_not_counted() {
    let layer = base().build().unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(service_fn(|req: Request<u8>| async move {
        match *req.body() {
            0 => Err::<Response<()>, BoxError>(Box::new(std::io::Error::from(
                std::io::ErrorKind::ConnectionReset,
            ))),
            _ => Err(
                Box::new(Error::rate_limited("local limit", Duration::from_secs(1))) as BoxError,
            ),
        }
    }));
    for _ in 0..10 {
        let _ = svc.ready().await.unwrap().call(Request::new(1)).await;
    }
    assert_eq!(
        handle.snapshot().calls_in_window,
        0,
        "rejected: not counted"
    );
    for _ in 0..5 {
        let _ = svc.ready().await.unwrap().call(Request::new(0)).await;
    }
    assert_eq!(handle.state(), CircuitState::Open);
}

#[tokio::test(start_paused = true)]
async fn respond_mode_renders_refusals() {
    let upstream = service_fn(|_req: Request<()>| async {
        Ok::<_, BoxError>(
            Response::builder()
                .status(502)
                .body(http_body_util::Full::new(bytes::Bytes::from("bad gateway")))
                .unwrap(),
        )
    });
    let layer = base().build().unwrap();
    let handle = layer.handle();
    let mut problem = layer
        .clone()
        .respond_with(ErrorFormat::ProblemJson)
        .layer(upstream);
    let mut anthropic = layer.respond_with(ErrorFormat::Anthropic).layer(upstream);
    for _ in 0..5 {
        let r = problem
            .ready()
            .await
            .unwrap()
            .call(Request::new(()))
            .await
            .unwrap();
        assert_eq!(r.status(), 502);
        assert_eq!(
            r.into_body().collect().await.unwrap().to_bytes(),
            "bad gateway"
        );
    }
    assert_eq!(handle.state(), CircuitState::Open);
    tokio::time::advance(Duration::from_millis(2500)).await;
    let r = problem
        .ready()
        .await
        .unwrap()
        .call(Request::new(()))
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "8");
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let body: serde_json::Value =
        serde_json::from_slice(&r.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(body["kind"], "circuit_open");
    assert_eq!(body["status"], 503);

    let r = anthropic
        .ready()
        .await
        .unwrap()
        .call(Request::new(()))
        .await
        .unwrap();
    assert_eq!(r.status(), 529);
    assert_eq!(r.headers()["retry-after"], "8");
    let body: serde_json::Value =
        serde_json::from_slice(&r.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(body["error"]["type"], "overloaded_error");
}

#[tokio::test(start_paused = true)]
async fn registry_health_snapshot_json() {
    let registry = CircuitBreakerRegistry::new(
        CircuitBreakerConfig {
            window_size: 10,
            minimum_calls: 5,
            jitter: crate::jitter::Jitter::None,
            ..CircuitBreakerConfig::default()
        },
        10,
    )
    .unwrap();
    let up = |status: u16| {
        service_fn(move |_req: Request<()>| async move {
            Ok::<_, BoxError>(Response::builder().status(status).body(()).unwrap())
        })
    };
    let mut good = registry.layer("api.openai.com").layer(up(200));
    let mut bad = registry.layer("api.anthropic.com").layer(up(529));
    for _ in 0..4 {
        good.ready()
            .await
            .unwrap()
            .call(Request::new(()))
            .await
            .unwrap();
    }
    for _ in 0..5 {
        bad.ready()
            .await
            .unwrap()
            .call(Request::new(()))
            .await
            .unwrap();
    }
    tokio::time::advance(Duration::from_secs(3)).await;
    let health = registry.health();
    let json = serde_json::to_value(&health).unwrap();
    assert_eq!(json["healthy"], false);
    assert_eq!(json["open"], 1);
    let b = &json["breakers"][0];
    assert_eq!(b["name"], "api.anthropic.com");
    assert_eq!(b["state"], "open");
    assert_eq!(b["failure_rate"], 1.0);
    assert_eq!(b["calls_in_window"], 5);
    assert_eq!(b["in_state_for_ms"], 3000);
    assert_eq!(b["next_probe_in_ms"], 7000);
    assert!(b["since_unix_ms"].as_u64().unwrap() > 1_600_000_000_000);
    let g = &json["breakers"][1];
    assert_eq!(g["name"], "api.openai.com");
    assert_eq!(g["state"], "closed");
    assert_eq!(g["failure_rate"], 0.0);
    assert_eq!(g["slow_call_rate"], 0.0);
    assert_eq!(g["next_probe_in_ms"], serde_json::Value::Null);
    // round trip
    let back: RegistryHealth = serde_json::from_value(json).unwrap();
    assert_eq!(back, health);
}

#[tokio::test(start_paused = true)]
async fn registry_is_bounded_and_evicts_idle_closed_breakers_first() {
    let registry = CircuitBreakerRegistry::new(CircuitBreakerConfig::default(), 3).unwrap();
    let open = registry.handle("a");
    open.force_open();
    drop(open);
    let held = registry.handle("b");
    let _ = registry.handle("c");
    let _ = registry.handle("d"); // evicts c: idle and closed (a is open, b is held)
    assert_eq!(registry.len(), 3);
    assert!(registry.get("c").is_none());
    assert!(registry.get("a").is_some() && registry.get("b").is_some());
    let _ = registry.handle("e"); // d is idle; b is held
    assert!(registry.get("d").is_none());
    assert!(registry.get("b").unwrap().same_breaker(&held));
    for i in 0..100 {
        let _ = registry.handle(&format!("k{i}"));
    }
    assert_eq!(registry.len(), 3);
    assert!(
        registry.get("a").is_some(),
        "an open breaker is forgotten last"
    );
    assert!(CircuitBreakerRegistry::new(CircuitBreakerConfig::default(), 0).is_err());
}

#[tokio::test(start_paused = true)]
async fn keyed_layer_keeps_one_breaker_per_host() {
    let registry = CircuitBreakerRegistry::new(
        CircuitBreakerConfig {
            window_size: 10,
            minimum_calls: 5,
            ..CircuitBreakerConfig::default()
        },
        8,
    )
    .unwrap();
    let upstream = service_fn(|req: Request<()>| async move {
        let status = if req.uri().host() == Some("down.example") {
            500
        } else {
            200
        };
        Ok::<_, BoxError>(Response::builder().status(status).body(()).unwrap())
    });
    let mut svc = registry.keyed_layer(BreakerKey::Host).layer(upstream);
    let req = |host: &str| {
        Request::builder()
            .uri(format!("http://{host}/v1/messages"))
            .body(())
            .unwrap()
    };
    for _ in 0..5 {
        svc.ready()
            .await
            .unwrap()
            .call(req("down.example"))
            .await
            .unwrap();
    }
    let err = svc
        .ready()
        .await
        .unwrap()
        .call(req("down.example"))
        .await
        .unwrap_err();
    assert_eq!(
        err.downcast::<Error>().unwrap().kind(),
        ErrorKind::CircuitOpen
    );
    let ok = svc
        .ready()
        .await
        .unwrap()
        .call(req("up.example"))
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(
        registry.get("down.example").unwrap().state(),
        CircuitState::Open
    );
    assert_eq!(
        registry.get("up.example").unwrap().state(),
        CircuitState::Closed
    );
}

/// Many threads race for the probe slots of many half-open periods; none ever admits
/// more than N, and every period admits exactly N.
#[test]
fn half_open_never_admits_more_than_n_under_contention() {
    const THREADS: usize = 8;
    const ROUNDS: usize = 300;
    const PROBES: u32 = 3;
    let handle = CircuitBreakerLayer::builder()
        .count_window(10)
        .minimum_calls(1)
        .consecutive_failures(1)
        .open_duration(Duration::from_nanos(1))
        .max_open_duration(Duration::from_nanos(1))
        .jitter(0.0)
        .half_open_probes(PROBES)
        .max_wait_in_half_open(None)
        .build_handle()
        .unwrap();
    let shared = Arc::clone(&handle.shared);
    let barrier = std::sync::Barrier::new(THREADS + 1);
    let admitted = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..THREADS {
            s.spawn(|| {
                for _ in 0..ROUNDS {
                    barrier.wait(); // the breaker is open
                    let mut held = Vec::new();
                    for _ in 0..4 {
                        if let Ok(p) = shared.acquire() {
                            held.push(p);
                        }
                    }
                    admitted.fetch_add(held.len(), Ordering::SeqCst);
                    barrier.wait(); // everyone has tried
                    barrier.wait(); // counted
                    drop(held);
                }
            });
        }
        for _ in 0..ROUNDS {
            handle.reset();
            let permit = shared.acquire().unwrap();
            permit.complete(Outcome::Failure);
            assert!(matches!(handle.state(), CircuitState::Open));
            barrier.wait();
            barrier.wait();
            assert_eq!(admitted.swap(0, Ordering::SeqCst), PROBES as usize);
            assert_eq!(handle.state(), CircuitState::HalfOpen);
            barrier.wait();
        }
    });
}

#[test]
fn the_closed_path_future_adds_only_two_words() {
    // A permit is an `Arc` and one packed word; the future of a ready upstream stays at
    // 128 bytes, small enough to be moved inline rather than through `memcpy`.
    type Ready = std::future::Ready<Result<Response<()>, BoxError>>;
    assert_eq!(std::mem::size_of::<Option<super::state::Permit>>(), 16);
    assert_eq!(
        std::mem::size_of::<ResponseFuture<Ready, crate::classify::DefaultClassifier>>(),
        std::mem::size_of::<Ready>() + 16
    );
}
