//! Service-level tests of the retry layer, on tokio's paused clock.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt, service_fn};

use super::*;
use crate::BoxError;
use crate::classify::{Classification, Outcome, Retry as Verdict};

type Req = http::Request<ReplayBody<Full<Bytes>>>;

/// What the upstream saw: the time and body of each call.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<(Instant, Bytes)>>>);

impl Log {
    fn times(&self) -> Vec<Duration> {
        let calls = self.0.lock().unwrap();
        calls.windows(2).map(|w| w[1].0 - w[0].0).collect()
    }
    fn count(&self) -> usize {
        self.0.lock().unwrap().len()
    }
    fn bodies(&self) -> Vec<Bytes> {
        self.0.lock().unwrap().iter().map(|c| c.1.clone()).collect()
    }
}

fn response(status: u16, headers: &[(&'static str, String)]) -> http::Response<()> {
    let mut builder = http::Response::builder().status(status);
    for (k, v) in headers {
        builder = builder.header(*k, v.as_str());
    }
    builder.body(()).unwrap()
}

/// An upstream that answers the n-th call (0-based) with `answer(n)`.
fn upstream<F>(
    log: &Log,
    answer: F,
) -> impl Service<Req, Response = http::Response<()>, Error = BoxError, Future: Send> + Clone + use<F>
where
    F: Fn(usize) -> Result<http::Response<()>, BoxError> + Clone + Send + Sync + 'static,
{
    let log = log.clone();
    service_fn(move |req: Req| {
        let log = log.clone();
        let answer = answer.clone();
        async move {
            let body = req.into_body().collect().await?.to_bytes();
            let n = {
                let mut calls = log.0.lock().unwrap();
                calls.push((Instant::now(), body));
                calls.len() - 1
            };
            answer(n)
        }
    })
}

fn get() -> http::Request<Full<Bytes>> {
    http::Request::get("http://127.0.0.1/v1/models")
        .body(Full::new(Bytes::new()))
        .unwrap()
}

fn post(body: &'static str) -> http::Request<Full<Bytes>> {
    http::Request::post("http://127.0.0.1/v1/messages")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn no_jitter() -> RetryLayerBuilder {
    RetryLayer::builder()
        .jitter(Jitter::None)
        .base_delay(ms(100))
        .factor(2.0)
        .max_delay(Duration::from_secs(1))
        .without_budget()
}

#[tokio::test(start_paused = true)]
async fn delays_follow_the_schedule_and_cap() {
    let log = Log::default();
    let svc = no_jitter()
        .max_retries(5)
        .build()
        .unwrap()
        .layer(upstream(&log, |_| Ok(response(503, &[]))));
    let res = svc.oneshot(get()).await.unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(RetryCount::of(&res), 5);
    assert_eq!(log.times(), [ms(100), ms(200), ms(400), ms(800), ms(1000)]);
}

#[tokio::test(start_paused = true)]
async fn every_jitter_kind_stays_under_the_cap() {
    for jitter in [Jitter::Full, Jitter::Equal, Jitter::Decorrelated] {
        for seed in 0..20 {
            let log = Log::default();
            let svc = no_jitter()
                .jitter(jitter)
                .seed(seed)
                .max_retries(6)
                .build()
                .unwrap()
                .layer(upstream(&log, |_| Ok(response(502, &[]))));
            svc.oneshot(get()).await.unwrap();
            let delays = log.times();
            assert_eq!(delays.len(), 6);
            for (n, d) in delays.iter().enumerate() {
                let nominal = ms(100 * (1 << n)).min(ms(1000));
                assert!(*d <= ms(1000), "{jitter} {d:?} over the cap");
                match jitter {
                    Jitter::Full => assert!(*d <= nominal, "{jitter} {n}: {d:?}"),
                    Jitter::Equal => {
                        assert!(*d >= nominal / 2 && *d <= nominal, "{jitter} {n}: {d:?}")
                    }
                    _ => assert!(*d >= ms(100), "{jitter} {n}: {d:?}"),
                }
            }
        }
    }
}

#[tokio::test(start_paused = true)]
async fn seeded_layers_repeat_their_delays() {
    let run = || async {
        let log = Log::default();
        let svc = no_jitter()
            .jitter(Jitter::Full)
            .seed(9)
            .max_retries(4)
            .build()
            .unwrap()
            .layer(upstream(&log, |_| Ok(response(500, &[]))));
        svc.oneshot(get()).await.unwrap();
        log.times()
    };
    assert_eq!(run().await, run().await);
}

#[tokio::test(start_paused = true)]
async fn retry_after_seconds_ms_and_date_are_honoured() {
    let log = Log::default();
    let svc = no_jitter()
        .max_delay(Duration::from_secs(10))
        .max_retries(3)
        .build()
        .unwrap()
        .layer(upstream(&log, |n| {
            Ok(match n {
                0 => response(429, &[("retry-after", "3".into())]),
                1 => response(529, &[("retry-after-ms", "1500".into())]),
                2 => {
                    let when = SystemTime::now() + Duration::from_secs(6);
                    response(503, &[("retry-after", httpdate::fmt_http_date(when))])
                }
                _ => response(200, &[]),
            })
        }));
    let res = svc.oneshot(post("{}")).await.unwrap();
    assert_eq!(res.status(), 200);
    let t = log.times();
    assert_eq!(t[0], Duration::from_secs(3));
    assert_eq!(t[1], ms(1500));
    // an HTTP-date has whole seconds: 6s ahead, minus the part of a second already gone
    assert!(
        t[2] > Duration::from_secs(4) && t[2] <= Duration::from_secs(6),
        "{:?}",
        t[2]
    );
}

/// A 429 asking for 60 s with `max_delay` at 1 s used to be retried after 1 s: early, so
/// refused again, and paid for from the budget. The caller gets the answer at once.
#[tokio::test(start_paused = true)]
async fn retry_after_beyond_max_delay_returns_the_response() {
    let log = Log::default();
    let layer = no_jitter()
        .max_retries(3)
        .budget(Duration::from_secs(10), 1, 0.0)
        .build()
        .unwrap();
    let svc = layer.layer(upstream(&log, |_| {
        Ok(response(429, &[("retry-after", "60".into())]))
    }));
    let start = Instant::now();
    let res = svc.oneshot(get()).await.unwrap();
    assert_eq!(res.status(), 429);
    assert_eq!(res.headers()["retry-after"], "60");
    assert_eq!(RetryCount::of(&res), 0);
    assert_eq!(log.count(), 1);
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert_eq!(layer.budget().unwrap().available(), 10, "no budget spent");

    // an error classified with a wait longer than max_delay comes back carrying the wait
    let log = Log::default();
    let svc = no_jitter()
        .classifier(|_: Result<&http::Response<()>, &BoxError>| {
            Classification::new(Outcome::Failure, Verdict::Safe)
                .with_retry_after(Some(Duration::from_secs(30)))
        })
        .build()
        .unwrap()
        .layer(upstream(&log, |_| Err("connection reset".into())));
    let err = svc.oneshot(get()).await.unwrap_err();
    let err = err.downcast::<crate::Error>().unwrap();
    assert_eq!(err.retry_after(), Some(Duration::from_secs(30)));
    assert_eq!(log.count(), 1);

    // a wait within max_delay is honoured exactly
    let log = Log::default();
    let svc = no_jitter()
        .max_retries(1)
        .build()
        .unwrap()
        .layer(upstream(&log, |n| {
            Ok(match n {
                0 => response(429, &[("retry-after", "1".into())]),
                _ => response(200, &[]),
            })
        }));
    assert_eq!(svc.oneshot(get()).await.unwrap().status(), 200);
    assert_eq!(log.times(), [Duration::from_secs(1)]);
}

/// `Duration::MAX` as a deadline, an attempt timeout or a max delay means "no limit in
/// practice"; it used to pass validation and panic on the first call (`Instant + MAX`).
#[tokio::test(start_paused = true)]
async fn duration_max_limits_never_panic() {
    let log = Log::default();
    let svc = RetryLayer::builder()
        .deadline(Duration::MAX)
        .attempt_timeout(Duration::MAX)
        .max_delay(Duration::MAX)
        .base_delay(ms(10))
        .jitter(Jitter::None)
        .max_retries(2)
        .without_budget()
        .build()
        .unwrap()
        .layer(upstream(&log, |n| {
            Ok(response(if n < 2 { 503 } else { 200 }, &[]))
        }));
    assert_eq!(svc.oneshot(get()).await.unwrap().status(), 200);
    assert_eq!(log.times(), [ms(10), ms(20)]);
}

#[tokio::test(start_paused = true)]
async fn retry_after_past_the_deadline_gives_up_at_once() {
    let log = Log::default();
    let svc = no_jitter()
        .deadline(Duration::from_secs(10))
        .build()
        .unwrap()
        .layer(upstream(&log, |_| {
            Ok(response(529, &[("retry-after", "30".into())]))
        }));
    let start = Instant::now();
    let res = svc.oneshot(get()).await.unwrap();
    assert_eq!(res.status(), 529);
    assert_eq!(res.headers()["retry-after"], "30");
    assert_eq!(log.count(), 1);
    assert_eq!(start.elapsed(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn error_with_retry_after_past_the_deadline_carries_it() {
    let svc = no_jitter()
        .deadline(Duration::from_secs(10))
        .classifier(|r: Result<&http::Response<()>, &BoxError>| match r {
            Ok(_) => Classification::SUCCESS,
            Err(_) => Classification::new(Outcome::Failure, Verdict::Safe)
                .with_retry_after(Some(Duration::from_secs(60))),
        })
        .build()
        .unwrap()
        .layer(upstream(
            &Log::default(),
            |_| Err("connection reset".into()),
        ));
    let err = svc.oneshot(get()).await.unwrap_err();
    let err = err.downcast::<crate::Error>().unwrap();
    assert_eq!(err.kind(), crate::ErrorKind::Unavailable);
    assert_eq!(err.retry_after(), Some(Duration::from_secs(60)));
}

#[tokio::test(start_paused = true)]
async fn should_retry_false_stops_and_true_starts() {
    let log = Log::default();
    let svc = no_jitter().build().unwrap().layer(upstream(&log, |_| {
        Ok(response(503, &[("x-should-retry", "false".into())]))
    }));
    assert_eq!(svc.oneshot(get()).await.unwrap().status(), 503);
    assert_eq!(log.count(), 1);

    let log = Log::default();
    let svc = no_jitter().build().unwrap().layer(upstream(&log, |n| {
        Ok(if n == 0 {
            response(409, &[("x-should-retry", "true".into())])
        } else {
            response(200, &[])
        })
    }));
    // a POST, so only x-should-retry: true makes the 409 retryable
    assert_eq!(svc.oneshot(post("x")).await.unwrap().status(), 200);
    assert_eq!(log.count(), 2);
}

#[tokio::test(start_paused = true)]
async fn post_is_retried_only_when_safe_or_opted_in() {
    let fails_500 = |_: usize| Ok(response(500, &[]));
    // a POST on 500: not retried
    let log = Log::default();
    let layer = no_jitter().build().unwrap();
    layer
        .layer(upstream(&log, fails_500))
        .oneshot(post("{}"))
        .await
        .unwrap();
    assert_eq!(log.count(), 1);
    // a GET on 500: retried
    let log = Log::default();
    layer
        .layer(upstream(&log, fails_500))
        .oneshot(get())
        .await
        .unwrap();
    assert_eq!(log.count(), 4);
    // a POST with an Idempotency-Key: retried
    let log = Log::default();
    let mut keyed = post("{}");
    keyed
        .headers_mut()
        .insert("idempotency-key", "req-1".parse().unwrap());
    layer
        .layer(upstream(&log, fails_500))
        .oneshot(keyed)
        .await
        .unwrap();
    assert_eq!(log.count(), 4);
    // a POST when the user opts in: retried
    let log = Log::default();
    no_jitter()
        .assume_idempotent(true)
        .build()
        .unwrap()
        .layer(upstream(&log, fails_500))
        .oneshot(post("{}"))
        .await
        .unwrap();
    assert_eq!(log.count(), 4);
    // a POST on 529 (not processed): retried, with the same body every time
    let log = Log::default();
    layer
        .layer(upstream(&log, |n| {
            Ok(response(if n < 2 { 529 } else { 200 }, &[]))
        }))
        .oneshot(post(r#"{"model":"m"}"#))
        .await
        .unwrap();
    assert_eq!(log.bodies(), vec![Bytes::from(r#"{"model":"m"}"#); 3]);
}

#[tokio::test(start_paused = true)]
async fn a_body_over_the_limit_is_not_retried() {
    let log = Log::default();
    let svc = no_jitter()
        .body_limit(4)
        .build()
        .unwrap()
        .layer(upstream(&log, |_| Ok(response(529, &[]))));
    let res = svc.oneshot(post("more than four bytes")).await.unwrap();
    assert_eq!(res.status(), 529);
    assert_eq!(log.count(), 1);
    assert_eq!(log.bodies()[0], "more than four bytes");
}

#[tokio::test(start_paused = true)]
async fn a_streamed_body_is_replayed() {
    let (tx, body) = super::body::tests::streaming();
    let calls = Arc::new(Mutex::new(Vec::new()));
    let svc = no_jitter().build().unwrap().layer(service_fn({
        let calls = calls.clone();
        move |req: http::Request<ReplayBody<_>>| {
            let calls = calls.clone();
            async move {
                let body = req.into_body().collect().await?.to_bytes();
                let mut calls = calls.lock().unwrap();
                calls.push(body);
                Ok::<_, BoxError>(response(if calls.len() < 3 { 529 } else { 200 }, &[]))
            }
        }
    }));
    let request = http::Request::post("http://127.0.0.1/").body(body).unwrap();
    let call = tokio::spawn(svc.oneshot(request));
    tx.send(Ok(http_body::Frame::data(Bytes::from_static(b"he"))))
        .await
        .unwrap();
    tx.send(Ok(http_body::Frame::data(Bytes::from_static(b"llo"))))
        .await
        .unwrap();
    drop(tx);
    assert_eq!(call.await.unwrap().unwrap().status(), 200);
    assert_eq!(*calls.lock().unwrap(), vec![Bytes::from("hello"); 3]);
}

#[tokio::test(start_paused = true)]
async fn budget_bounds_attempts_under_total_failure() {
    let requests = 200u32;
    let (ratio, min_per_sec, window) = (0.2, 1, Duration::from_secs(10));
    let log = Log::default();
    let layer = RetryLayer::builder()
        .base_delay(ms(1))
        .max_delay(ms(2))
        .max_retries(3)
        .budget(window, min_per_sec, ratio)
        .build()
        .unwrap();
    let svc = layer.layer(upstream(&log, |_| Ok(response(503, &[]))));
    let start = Instant::now();
    for _ in 0..requests {
        svc.clone().oneshot(get()).await.unwrap();
    }
    // everything happened within one window
    assert!(start.elapsed() < window);
    let attempts = log.count() as f64;
    let bound = (1.0 + ratio) * f64::from(requests) + f64::from(min_per_sec) * window.as_secs_f64();
    assert!(attempts <= bound, "{attempts} attempts > {bound}");
    // and the budget was used, not just refused
    assert!(
        attempts >= f64::from(requests) * (1.0 + ratio) - 1.0,
        "{attempts}"
    );
    assert_eq!(layer.budget().unwrap().available(), 0);
}

#[tokio::test(start_paused = true)]
async fn rejections_spend_no_budget() {
    let rejecting = |r: Result<&http::Response<()>, &BoxError>| match r {
        Ok(r) if r.status() == 503 => Classification::new(Outcome::Rejected, Verdict::Safe),
        Ok(r) if r.status() == 500 => Classification::new(Outcome::Failure, Verdict::Safe),
        _ => Classification::SUCCESS,
    };
    let layer = no_jitter()
        .budget(Duration::from_secs(10), 0, 0.0)
        .classifier(rejecting)
        .build()
        .unwrap();
    let log = Log::default();
    let res = layer
        .layer(upstream(&log, |n| {
            Ok(response(if n < 2 { 503 } else { 200 }, &[]))
        }))
        .oneshot(get())
        .await
        .unwrap();
    assert_eq!((res.status().as_u16(), log.count()), (200, 3));
    // a real failure finds the empty budget
    let log = Log::default();
    layer
        .layer(upstream(&log, |_| Ok(response(500, &[]))))
        .oneshot(get())
        .await
        .unwrap();
    assert_eq!(log.count(), 1);
}

#[tokio::test(start_paused = true)]
async fn attempt_timeout_retries_a_hung_attempt() {
    let calls = Arc::new(AtomicU32::new(0));
    let svc = no_jitter()
        .attempt_timeout(Duration::from_secs(5))
        .build()
        .unwrap()
        .layer(service_fn({
            let calls = calls.clone();
            move |_req: Req| {
                let n = calls.fetch_add(1, Ordering::SeqCst);
                async move {
                    if n == 0 {
                        std::future::pending::<()>().await;
                    }
                    Ok::<_, BoxError>(response(200, &[]))
                }
            }
        }));
    let start = Instant::now();
    let res = svc.oneshot(get()).await.unwrap();
    assert_eq!(RetryCount::of(&res), 1);
    assert_eq!(start.elapsed(), Duration::from_secs(5) + ms(100));
}

#[tokio::test(start_paused = true)]
async fn the_deadline_bounds_the_whole_call() {
    let log = Log::default();
    let svc = no_jitter()
        .base_delay(ms(400))
        .max_delay(Duration::from_secs(5))
        .deadline(Duration::from_secs(1))
        .build()
        .unwrap()
        .layer(upstream(&log, |_| Ok(response(503, &[]))));
    let res = svc.oneshot(get()).await.unwrap();
    assert_eq!(res.status(), 503);
    // 0 ms, 400 ms; the next wait (800 ms) would end past the deadline
    assert_eq!(log.times(), [ms(400)]);

    // an attempt still running at the deadline ends with a timeout error
    let svc = no_jitter()
        .deadline(Duration::from_secs(1))
        .build()
        .unwrap()
        .layer(service_fn(|_req: Req| async {
            std::future::pending::<()>().await;
            Ok::<_, BoxError>(response(200, &[]))
        }));
    let err = svc.oneshot(get()).await.unwrap_err();
    let err = err.downcast::<crate::Error>().unwrap();
    assert_eq!(err.kind(), crate::ErrorKind::Timeout);
}

/// The LLM preset's deadline was 2 minutes: a normal non-streamed generation of a few
/// minutes (a large `max_tokens`) was cut off with a timeout, after the upstream had done
/// (and billed) the work. The official SDKs wait 10 minutes.
#[tokio::test(start_paused = true)]
async fn the_llm_preset_lets_a_long_non_streamed_call_finish() {
    let calls = Arc::new(AtomicU32::new(0));
    let seen = Arc::clone(&calls);
    let svc = RetryLayer::llm().layer(service_fn(move |_req: Req| {
        seen.fetch_add(1, Ordering::SeqCst);
        async {
            tokio::time::sleep(Duration::from_secs(5 * 60)).await;
            Ok::<_, BoxError>(response(200, &[]))
        }
    }));
    let start = Instant::now();
    let res = svc.oneshot(post("{}")).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(start.elapsed(), Duration::from_secs(300));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn a_retried_response_is_dropped_before_the_next_attempt() {
    struct Flag(Arc<AtomicBool>);
    impl Drop for Flag {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    let dropped = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicU32::new(0));
    let svc = no_jitter().build().unwrap().layer(service_fn({
        let (dropped, calls) = (dropped.clone(), calls.clone());
        move |_req: Req| {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            let dropped = dropped.clone();
            async move {
                if n == 1 {
                    assert!(dropped.load(Ordering::SeqCst), "first response still alive");
                }
                let status = if n == 0 { 502 } else { 200 };
                Ok::<_, BoxError>(
                    http::Response::builder()
                        .status(status)
                        .body(Flag(dropped))
                        .unwrap(),
                )
            }
        }
    }));
    let res = svc.oneshot(get()).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn transport_errors_are_retried_and_the_last_is_returned() {
    let calls = Arc::new(AtomicU32::new(0));
    let svc = no_jitter()
        .max_retries(2)
        .build()
        .unwrap()
        .layer(service_fn({
            let calls = calls.clone();
            move |_req: Req| {
                calls.fetch_add(1, Ordering::SeqCst);
                async {
                    Err::<http::Response<()>, _>(std::io::Error::from(
                        std::io::ErrorKind::ConnectionRefused,
                    ))
                }
            }
        }));
    // connection refused: nothing was sent, so even a POST is retried
    let err = svc.oneshot(post("{}")).await.unwrap_err();
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert_eq!(
        err.downcast_ref::<std::io::Error>().unwrap().kind(),
        std::io::ErrorKind::ConnectionRefused
    );
}

#[tokio::test(start_paused = true)]
async fn generic_form_retries_cloned_requests() {
    #[derive(Debug)]
    struct Reply(u32);
    impl RetryResponse for Reply {}
    let calls = Arc::new(AtomicU32::new(0));
    let svc = RetryLayer::builder()
        .without_budget()
        .classifier(|r: Result<&Reply, &BoxError>| match r {
            Ok(Reply(n)) if *n < 2 => Classification::new(Outcome::Failure, Verdict::IfIdempotent),
            Ok(_) => Classification::SUCCESS,
            Err(_) => Classification::new(Outcome::Failure, Verdict::Never),
        })
        .build()
        .unwrap()
        .layer(service_fn({
            let calls = calls.clone();
            move |req: String| {
                assert_eq!(req, "ping");
                let n = calls.fetch_add(1, Ordering::SeqCst);
                async move { Ok::<_, BoxError>(Reply(n)) }
            }
        }));
    let reply = svc
        .clone()
        .oneshot(Cloned::new("ping".to_owned()))
        .await
        .unwrap();
    assert_eq!(reply.0, 2);
    // not idempotent: an IfIdempotent verdict is not enough
    calls.store(0, Ordering::SeqCst);
    let reply = svc
        .oneshot(Cloned::not_idempotent("ping".to_owned()))
        .await
        .unwrap();
    assert_eq!(reply.0, 0);
}

#[tokio::test(start_paused = true)]
async fn poll_ready_is_forwarded() {
    let (mock, mut handle) = tower_test_like::pair();
    let mut svc = RetryLayer::new().layer(mock);
    handle.ready.store(false, Ordering::SeqCst);
    assert!(futures_poll_ready(&mut svc).is_pending());
    handle.ready.store(true, Ordering::SeqCst);
    assert!(futures_poll_ready(&mut svc).is_ready());
    let _ = &mut handle;
}

fn futures_poll_ready<S: Service<http::Request<Full<Bytes>>>>(
    svc: &mut S,
) -> std::task::Poll<Result<(), S::Error>> {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    svc.poll_ready(&mut cx)
}

/// A service whose readiness the test controls.
mod tower_test_like {
    use super::*;

    #[derive(Clone)]
    pub(super) struct Gate {
        ready: Arc<AtomicBool>,
    }

    pub(super) struct Handle {
        pub(super) ready: Arc<AtomicBool>,
    }

    pub(super) fn pair() -> (Gate, Handle) {
        let ready = Arc::new(AtomicBool::new(true));
        (
            Gate {
                ready: ready.clone(),
            },
            Handle { ready },
        )
    }

    impl Service<Req> for Gate {
        type Response = http::Response<()>;
        type Error = BoxError;
        type Future = std::future::Ready<Result<http::Response<()>, BoxError>>;

        fn poll_ready(
            &mut self,
            _cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), BoxError>> {
            if self.ready.load(Ordering::SeqCst) {
                std::task::Poll::Ready(Ok(()))
            } else {
                std::task::Poll::Pending
            }
        }

        fn call(&mut self, _req: Req) -> Self::Future {
            std::future::ready(Ok(response(200, &[])))
        }
    }
}

#[test]
fn layer_from_config() {
    let cfg = RetryConfig {
        max_retries: 7,
        budget: false,
        ..RetryConfig::default()
    };
    let layer = RetryLayer::from_config(&cfg).unwrap();
    assert_eq!(layer.max_retries(), 7);
    assert!(layer.budget().is_none());
    let bad = RetryConfig {
        factor: 0.0,
        ..RetryConfig::default()
    };
    assert_eq!(bad.build().unwrap_err(), RetryConfigError::Factor(0.0));
    assert!(
        RetryLayer::builder()
            .count_header("bad header")
            .build()
            .is_err()
    );
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]

    /// Under a 100% failing upstream, within one budget window:
    /// attempts <= (1 + ratio) * requests + min_per_sec * window.
    #[test]
    fn budget_bound_holds_for_any_setting(
        ratio in 0.0f64..1.5,
        min_per_sec in 0u32..4,
        requests in 1u32..120,
        max_retries in 0u32..6,
    ) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        let window = Duration::from_secs(10);
        let attempts = rt.block_on(async {
            let log = Log::default();
            let svc = RetryLayer::builder()
                .jitter(Jitter::None)
                .base_delay(ms(1))
                .max_delay(ms(1))
                .max_retries(max_retries)
                .budget(window, min_per_sec, ratio)
                .build()
                .unwrap()
                .layer(upstream(&log, |_| Ok(response(502, &[]))));
            for _ in 0..requests {
                svc.clone().oneshot(get()).await.unwrap();
            }
            log.count() as f64
        });
        let bound = (1.0 + ratio) * f64::from(requests) + f64::from(min_per_sec) * window.as_secs_f64();
        proptest::prop_assert!(attempts <= bound, "{} attempts > {}", attempts, bound);
        // and retrying is not refused while the budget lasts
        let possible = f64::from(requests) * f64::from(1 + max_retries);
        proptest::prop_assert!(attempts >= possible.min(bound - 1.0 - f64::from(requests) * 0.001).floor(),
            "{} attempts, possible {}, bound {}", attempts, possible, bound);
    }
}
