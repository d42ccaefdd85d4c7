//! The budget layers' calls that reserve nothing: they call the inner service as it is,
//! and decide exactly as a call that reads the body does. The ready service is the one
//! called on every path, and the split pair's gate still checks what the start let by.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use palisade::cost::Money;
use palisade::cost::budget::{Budget, BudgetLayer, BudgetReservation, Period, Scope};
use tower::{Layer, Service, ServiceExt};

const BODY: &str = r#"{"model":"claude-3-5-haiku-20241022","max_tokens":1000,"messages":[{"role":"user","content":"hi"}]}"#;

fn layer(scope: Scope, limit: &str) -> BudgetLayer {
    BudgetLayer::builder()
        .budget(Budget::new(
            "daily",
            scope,
            Period::Day,
            Money::parse_dollars(limit).unwrap(),
        ))
        .build()
        .unwrap()
}

fn request(method: http::Method, user: Option<&str>) -> Request<Full<Bytes>> {
    let mut req = Request::builder()
        .method(method)
        .uri("/v1/messages")
        .body(Full::new(Bytes::from(BODY)))
        .unwrap();
    if let Some(user) = user {
        req.extensions_mut()
            .insert(palisade::cost::Principal::new(user));
    }
    req
}

/// A service that must be made ready before each call: a clone starts not ready (as a
/// `Buffer`'s or a concurrency limit's clone does), and `call` on a service that is not
/// ready fails the test.
struct Readiness {
    ready: bool,
    calls: Arc<AtomicUsize>,
    unready_calls: Arc<AtomicUsize>,
}

impl Clone for Readiness {
    fn clone(&self) -> Self {
        Self {
            ready: false,
            calls: Arc::clone(&self.calls),
            unready_calls: Arc::clone(&self.unready_calls),
        }
    }
}

impl<B: Send + 'static> Service<Request<B>> for Readiness {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.ready = true;
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        if !std::mem::take(&mut self.ready) {
            self.unready_calls.fetch_add(1, Ordering::SeqCst);
        }
        self.calls.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            if let Some(r) = req.extensions().get::<BudgetReservation>() {
                r.settle(Money::ZERO);
            }
            Ok(Response::new(Full::new(Bytes::new())))
        })
    }
}

async fn send<S>(svc: &mut S, req: Request<Full<Bytes>>) -> S::Response
where
    S: Service<Request<Full<Bytes>>, Error = Infallible>,
{
    svc.ready().await.unwrap().call(req).await.unwrap()
}

fn readiness() -> (Readiness, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let unready = Arc::new(AtomicUsize::new(0));
    (
        Readiness {
            ready: false,
            calls: Arc::clone(&calls),
            unready_calls: Arc::clone(&unready),
        },
        calls,
        unready,
    )
}

#[tokio::test(start_paused = true)]
async fn every_path_of_the_plain_layer_calls_the_service_made_ready() {
    let budgets = layer(Scope::User, "5");
    let (inner, calls, unready) = readiness();
    let mut svc = budgets.layer(inner);
    // unmetered, metered with no account, metered with an account: twice each, in turn
    for _ in 0..2 {
        for req in [
            request(http::Method::GET, Some("ann")),
            request(http::Method::POST, None),
            request(http::Method::POST, Some("ann")),
        ] {
            let res = send(&mut svc, req).await;
            assert_eq!(res.status(), 200);
        }
    }
    assert_eq!(calls.load(Ordering::SeqCst), 6);
    assert_eq!(unready.load(Ordering::SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn every_path_of_the_split_start_calls_the_service_made_ready() {
    let budgets = layer(Scope::User, "5");
    let (start, gate) = budgets.split();
    let (inner, calls, unready) = readiness();
    let mut svc = start.layer(gate.layer(inner));
    for _ in 0..2 {
        for req in [
            request(http::Method::GET, Some("ann")),
            request(http::Method::POST, None),
            request(http::Method::POST, Some("ann")),
        ] {
            let res = send(&mut svc, req).await;
            assert_eq!(res.status(), 200);
        }
    }
    assert_eq!(calls.load(Ordering::SeqCst), 6);
    assert_eq!(unready.load(Ordering::SeqCst), 0);
    assert_eq!(
        budgets.spend("daily", "ann").unwrap(),
        (Money::ZERO, Money::ZERO)
    );
}

/// An authentication layer between the start and the gate: the caller is known only
/// below the start, so the start reserves nothing and the gate checks the request.
#[derive(Clone)]
struct Auth<S>(S);

impl<S, B> Service<Request<B>> for Auth<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> S::Future {
        req.extensions_mut()
            .insert(palisade::cost::Principal::new("ann"));
        self.0.call(req)
    }
}

#[tokio::test(start_paused = true)]
async fn a_caller_known_only_below_the_start_is_checked_at_the_gate() {
    // a budget smaller than one request: the gate refuses what the start let by
    let budgets = layer(Scope::User, "0.000001");
    let (start, gate) = budgets.split();
    let (inner, calls, _) = readiness();
    let svc = start.layer(Auth(gate.layer(inner)));
    let mut svc = svc;
    let res = send(&mut svc, request(http::Method::POST, None)).await;
    assert_ne!(
        res.status(),
        200,
        "the gate refuses what the budget cannot hold"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 0);

    // the same through the plain layer
    let budgets = layer(Scope::User, "0.000001");
    let (inner, calls, _) = readiness();
    let mut plain = Auth(budgets.layer(inner));
    let plain_res = send(&mut plain, request(http::Method::POST, None)).await;
    assert_eq!(res.status(), plain_res.status());
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn a_start_without_its_gate_refuses_unmetered_and_unaccounted_requests_too() {
    let budgets = layer(Scope::User, "5");
    let (start, _gate) = budgets.split();
    let (inner, calls, _) = readiness();
    let mut svc = start.layer(inner);
    for req in [
        request(http::Method::GET, Some("ann")),
        request(http::Method::POST, None),
        request(http::Method::POST, Some("ann")),
    ] {
        let res = send(&mut svc, req).await;
        assert_eq!(res.status(), 500);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn a_budget_of_one_picodollar_refuses_and_a_second_budget_alone_charges() {
    // a global budget of one pico-dollar refuses every metered request; a user budget that does not
    // charge a request with no caller leaves it to the global one
    let budgets = BudgetLayer::builder()
        .budget(Budget::new(
            "daily",
            Scope::User,
            Period::Day,
            Money::parse_dollars("5").unwrap(),
        ))
        .budget(Budget::new(
            "all",
            Scope::Global,
            Period::Day,
            Money::parse_dollars("0.000000000001").unwrap(),
        ))
        .build()
        .unwrap();
    let (inner, calls, _) = readiness();
    let mut svc = budgets.layer(inner);
    let res = send(&mut svc, request(http::Method::POST, None)).await;
    assert_ne!(res.status(), 200);
    let res = send(&mut svc, request(http::Method::GET, None)).await;
    assert_eq!(res.status(), 200);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn a_subjects_own_limits_zero_and_none_decide_as_the_budget_does() {
    let budgets = layer(Scope::User, "5");
    assert!(budgets.set_limit("daily", "ann", Some(Money::ZERO)));
    assert!(budgets.set_limit("daily", "bob", None));
    for split in [false, true] {
        let (inner, calls, unready) = readiness();
        let (start, gate) = budgets.split();
        let mut plain = budgets.layer(inner.clone());
        let mut started = start.layer(gate.layer(inner));
        let (ann, bob) = if split {
            (
                send(&mut started, request(http::Method::POST, Some("ann")))
                    .await
                    .status(),
                send(&mut started, request(http::Method::POST, Some("bob")))
                    .await
                    .status(),
            )
        } else {
            (
                send(&mut plain, request(http::Method::POST, Some("ann")))
                    .await
                    .status(),
                send(&mut plain, request(http::Method::POST, Some("bob")))
                    .await
                    .status(),
            )
        };
        assert_ne!(ann, 200, "a limit of zero holds nothing (split: {split})");
        assert_eq!(bob, 200, "no limit lets the request by (split: {split})");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(unready.load(Ordering::SeqCst), 0);
    }
    assert_eq!(budgets.spend("daily", "bob"), None);
}

/// The response future is `Send`, and `Unpin` over an `Unpin` inner future, on every path.
#[tokio::test(start_paused = true)]
async fn the_response_future_is_send_and_unpin_over_an_unpin_inner_future() {
    fn send_unpin<T: Send + Unpin>(t: T) -> T {
        t
    }
    let budgets = layer(Scope::User, "5");
    let (inner, _, _) = readiness();
    let mut svc = budgets.layer(inner);
    for req in [
        request(http::Method::GET, Some("ann")),
        request(http::Method::POST, Some("ann")),
    ] {
        ServiceExt::<Request<Full<Bytes>>>::ready(&mut svc)
            .await
            .unwrap();
        let mut fut = send_unpin(svc.call(req));
        let res = std::future::poll_fn(|cx| Pin::new(&mut fut).poll(cx))
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
    }
}

/// An inner service that panics in its future, before any answer.
#[derive(Clone)]
struct Panics;

impl<B: Send + 'static> Service<Request<B>> for Panics {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _req: Request<B>) -> Self::Future {
        Box::pin(async move {
            tokio::task::yield_now().await;
            panic!("the inner service failed");
        })
    }
}

/// A panic below the layer leaves no hold behind, plain or split: the reservation is
/// settled once (charged in full, as any reservation dropped unsettled), never held on.
#[tokio::test(start_paused = true)]
async fn a_panic_below_the_layer_leaves_no_hold() {
    for split in [false, true] {
        let budgets = layer(Scope::User, "5");
        let task = if split {
            let (start, gate) = budgets.split();
            let mut svc = start.layer(gate.layer(Panics));
            tokio::spawn(async move {
                send(&mut svc, request(http::Method::POST, Some("ann"))).await;
            })
        } else {
            let mut svc = budgets.layer(Panics);
            tokio::spawn(async move {
                send(&mut svc, request(http::Method::POST, Some("ann"))).await;
            })
        };
        assert!(task.await.unwrap_err().is_panic());
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        let (spent, held) = budgets.spend("daily", "ann").unwrap();
        assert_eq!(held, Money::ZERO, "split: {split}");
        assert_eq!(
            spent,
            amount().await,
            "split: {split}: settled once, in full"
        );
    }
}

/// What one request reserves (through a roomy layer whose upstream refunds it).
async fn amount() -> Money {
    let budgets = layer(Scope::User, "5");
    let mut svc = budgets.layer(tower::service_fn(|req: Request<Full<Bytes>>| async move {
        let r = req.extensions().get::<BudgetReservation>().unwrap();
        r.refund();
        let mut res = Response::new(Full::new(Bytes::new()));
        res.extensions_mut().insert(r.amount());
        Ok::<_, Infallible>(res)
    }));
    let res = send(&mut svc, request(http::Method::POST, Some("probe"))).await;
    *res.extensions().get::<Money>().unwrap()
}
