//! The split budget layer (`BudgetLayer::split`): the reservation starts above a rate
//! limiter and is awaited just above the upstream; money stays exact, holds are released
//! exactly once, refusals answer as the plain layer does. Memory store here, Redis below.

#[cfg(feature = "redis")]
mod support;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use palisade::body::ResponseBody;
use palisade::cost::Money;
use palisade::cost::budget::{
    Budget, BudgetEstimate, BudgetLayer, BudgetReservation, Period, Scope, StartBody,
};
use tower::{Layer, Service, ServiceExt, service_fn};

const BODY: &str = r#"{"model":"claude-3-5-haiku-20241022","max_tokens":1000,"messages":[{"role":"user","content":"hi"}]}"#;

type Body = StartBody<Full<Bytes>>;
type Res = Response<ResponseBody<Full<Bytes>>>;

fn request(user: &str, block: bool) -> Request<Full<Bytes>> {
    let mut req = Request::post("/v1/messages")
        .header("x-test", if block { "block" } else { "pass" })
        .body(Full::new(Bytes::from(BODY)))
        .unwrap();
    req.extensions_mut()
        .insert(palisade::cost::Principal::new(user));
    req
}

fn layer(limit: Money) -> BudgetLayer {
    BudgetLayer::builder()
        .budget(Budget::new("daily", Scope::User, Period::Day, limit))
        .build()
        .unwrap()
}

/// What one `BODY` request reserves.
async fn amount_of_body() -> Money {
    let probe = layer(Money::parse_dollars("100").unwrap());
    let svc = probe.layer(service_fn(|req: Request<Full<Bytes>>| async move {
        let r = req.extensions().get::<BudgetReservation>().unwrap();
        let amount = r.amount();
        r.refund();
        let mut res = Response::new(Full::new(Bytes::new()));
        res.extensions_mut().insert(amount);
        Ok::<_, Infallible>(res)
    }));
    let res = svc.oneshot(request("probe", false)).await.unwrap();
    *res.extensions().get::<Money>().unwrap()
}

/// What sits between the start and the gate: a stand-in for a rate limiter that refuses
/// requests marked `x-test: refuse`, holds those marked `block` until the test drops them,
/// and passes the others on.
#[derive(Clone)]
struct Middle<S> {
    inner: S,
    reached: Arc<AtomicUsize>,
}

impl<S> Service<Request<Body>> for Middle<S>
where
    S: Service<Request<Body>, Response = Res, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send,
{
    type Response = Res;
    type Error = Infallible;
    type Future = std::pin::Pin<Box<dyn Future<Output = Result<Res, Infallible>> + Send>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let inner = self.inner.clone();
        let reached = Arc::clone(&self.reached);
        Box::pin(async move {
            reached.fetch_add(1, Ordering::SeqCst);
            // the rate limiter's own store call
            tokio::task::yield_now().await;
            match req.headers()["x-test"].to_str().unwrap() {
                "refuse" => {
                    let mut res = Response::new(ResponseBody::inner(Full::new(Bytes::new())));
                    *res.status_mut() = http::StatusCode::TOO_MANY_REQUESTS;
                    Ok(res)
                }
                "block" => std::future::pending().await,
                _ => inner.oneshot(req).await,
            }
        })
    }
}

/// start -> middle -> gate -> `upstream`.
fn stack<U>(
    budgets: &BudgetLayer,
    upstream: U,
) -> (
    impl Service<Request<Full<Bytes>>, Response = Res, Error = Infallible, Future: Send>
    + Clone
    + Send
    + 'static,
    Arc<AtomicUsize>,
)
where
    U: Service<Request<Body>, Response = Response<Full<Bytes>>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    U::Future: Send + 'static,
{
    let (start, gate) = budgets.split();
    let reached = Arc::new(AtomicUsize::new(0));
    let middle = Middle {
        inner: gate.layer(upstream),
        reached: Arc::clone(&reached),
    };
    let svc =
        start
            .layer(middle)
            .map_response(|r: Response<ResponseBody<ResponseBody<Full<Bytes>>>>| {
                // the start's own body wrapper around the middle's answer
                let (parts, body) = r.into_parts();
                match body {
                    ResponseBody::Inner { body } => Response::from_parts(parts, body),
                    ResponseBody::Error { body } => {
                        Response::from_parts(parts, ResponseBody::Error { body })
                    }
                }
            });
    (svc, reached)
}

/// An upstream that settles what it is given, after waiting for a permit.
fn upstream<B: Send + 'static>(
    permits: Arc<tokio::sync::Semaphore>,
    called: Arc<AtomicUsize>,
    cost: Money,
) -> impl Service<Request<B>, Response = Response<Full<Bytes>>, Error = Infallible, Future: Send>
+ Clone
+ Send
+ 'static {
    service_fn(move |req: Request<B>| {
        let permits = Arc::clone(&permits);
        let called = Arc::clone(&called);
        async move {
            let reservation = req
                .extensions()
                .get::<BudgetReservation>()
                .cloned()
                .expect("the gate lets a request through with its reservation");
            called.fetch_add(1, Ordering::SeqCst);
            let _permit = permits.acquire().await.unwrap();
            reservation.settle(cost);
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
        }
    })
}

fn spend(budgets: &BudgetLayer, user: &str) -> (Money, Money) {
    budgets
        .spend("daily", user)
        .unwrap_or((Money::ZERO, Money::ZERO))
}

/// Lets spawned tasks run until nothing moves (the paused clock never advances here).
async fn settle_down() {
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
}

/// Runs 50 concurrent requests against a budget room for exactly 10, all held at the
/// upstream at once; returns how many reached it.
async fn fifty_at_once(split: bool) -> usize {
    let amount = amount_of_body().await;
    let budgets = layer(Money::from_picos(amount.picos() * 10));
    let permits = Arc::new(tokio::sync::Semaphore::new(0));
    let called = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = if split {
        let up = upstream(Arc::clone(&permits), Arc::clone(&called), amount);
        let (svc, _) = stack(&budgets, up);
        (0..50)
            .map(|_| {
                let svc = svc.clone();
                tokio::spawn(
                    async move { svc.oneshot(request("ann", false)).await.unwrap().status() },
                )
            })
            .collect()
    } else {
        let up = upstream(Arc::clone(&permits), Arc::clone(&called), amount);
        let svc = budgets.layer(up);
        (0..50)
            .map(|_| {
                let svc = svc.clone();
                tokio::spawn(
                    async move { svc.oneshot(request("ann", false)).await.unwrap().status() },
                )
            })
            .collect()
    };
    settle_down().await;
    let admitted = called.load(Ordering::SeqCst);
    permits.add_permits(50);
    let mut refused = 0;
    for t in tasks {
        if t.await.unwrap() == 429 {
            refused += 1;
        }
    }
    assert_eq!(admitted + refused, 50);
    assert_eq!(
        spend(&budgets, "ann"),
        (Money::from_picos(amount.picos() * 10), Money::ZERO)
    );
    admitted
}

#[tokio::test(start_paused = true)]
async fn split_admits_exactly_what_fits_under_concurrency_as_the_plain_layer_does() {
    assert_eq!(fifty_at_once(false).await, 10);
    assert_eq!(fifty_at_once(true).await, 10);
}

#[tokio::test(start_paused = true)]
async fn a_request_refused_between_start_and_gate_releases_its_hold_and_is_not_charged() {
    let amount = amount_of_body().await;
    let budgets = layer(Money::from_picos(amount.picos() * 2));
    let permits = Arc::new(tokio::sync::Semaphore::new(100));
    let called = Arc::new(AtomicUsize::new(0));
    let (svc, reached) = stack(&budgets, upstream(permits, Arc::clone(&called), amount));
    for _ in 0..5 {
        let mut req = request("ann", false);
        req.headers_mut()
            .insert("x-test", "refuse".parse().unwrap());
        assert_eq!(svc.clone().oneshot(req).await.unwrap().status(), 429);
    }
    assert_eq!(reached.load(Ordering::SeqCst), 5);
    assert_eq!(called.load(Ordering::SeqCst), 0);
    assert_eq!(spend(&budgets, "ann"), (Money::ZERO, Money::ZERO));
    // the whole budget is still there
    for _ in 0..2 {
        assert_eq!(
            svc.clone()
                .oneshot(request("ann", false))
                .await
                .unwrap()
                .status(),
            200
        );
    }
    assert_eq!(
        svc.oneshot(request("ann", false)).await.unwrap().status(),
        429
    );
}

#[tokio::test(start_paused = true)]
async fn a_budget_refusal_at_the_gate_answers_the_plain_layers_status_headers_and_body() {
    let amount = amount_of_body().await;
    let answer = |res: Res| async move {
        let (parts, body) = res.into_parts();
        let mut headers = parts.headers;
        headers.remove("date");
        (
            parts.status,
            headers,
            body.collect().await.unwrap().to_bytes(),
        )
    };
    let plain_budgets = layer(amount);
    let plain = plain_budgets.layer(service_fn(|req: Request<Full<Bytes>>| async move {
        req.extensions()
            .get::<BudgetReservation>()
            .unwrap()
            .settle(Money::from_picos(1));
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
    }));
    assert_eq!(
        plain
            .clone()
            .oneshot(request("ann", false))
            .await
            .unwrap()
            .status(),
        200
    );
    let expected = answer(plain.oneshot(request("ann", false)).await.unwrap()).await;

    let budgets = layer(amount);
    let permits = Arc::new(tokio::sync::Semaphore::new(100));
    let called = Arc::new(AtomicUsize::new(0));
    let (svc, _) = stack(
        &budgets,
        upstream(permits, Arc::clone(&called), Money::from_picos(1)),
    );
    assert_eq!(
        svc.clone()
            .oneshot(request("ann", false))
            .await
            .unwrap()
            .status(),
        200
    );
    let got = answer(svc.oneshot(request("ann", false)).await.unwrap()).await;
    assert_eq!(got.0, 429);
    assert_eq!(got, expected);
    assert_eq!(
        called.load(Ordering::SeqCst),
        1,
        "the refused request never went upstream"
    );
}

#[tokio::test(start_paused = true)]
async fn a_client_gone_before_the_gate_has_its_hold_released_exactly_once() {
    let amount = amount_of_body().await;
    let budgets = layer(Money::from_picos(amount.picos() * 3));
    let permits = Arc::new(tokio::sync::Semaphore::new(0));
    let called = Arc::new(AtomicUsize::new(0));
    let (svc, reached) = stack(
        &budgets,
        upstream(Arc::clone(&permits), Arc::clone(&called), amount),
    );
    // one request held at the upstream keeps its reservation
    let held = tokio::spawn(svc.clone().oneshot(request("ann", false)));
    settle_down().await;
    assert_eq!(called.load(Ordering::SeqCst), 1);
    // another, held between start and gate, is abandoned by its client
    let gone = tokio::spawn(svc.clone().oneshot(request("ann", true)));
    settle_down().await;
    assert_eq!(reached.load(Ordering::SeqCst), 2);
    assert_eq!(
        spend(&budgets, "ann").1,
        Money::from_picos(amount.picos() * 2)
    );
    gone.abort();
    assert!(gone.await.unwrap_err().is_cancelled());
    settle_down().await;
    // released once: the held request's reservation is still counted
    assert_eq!(spend(&budgets, "ann"), (Money::ZERO, amount));
    permits.add_permits(1);
    assert_eq!(held.await.unwrap().unwrap().status(), 200);
    assert_eq!(spend(&budgets, "ann"), (amount, Money::ZERO));
}

#[tokio::test(start_paused = true)]
async fn a_start_without_its_gate_refuses_instead_of_passing_requests_unchecked() {
    let budgets = layer(Money::parse_dollars("5").unwrap());
    let (start, _gate) = budgets.split();
    let called = Arc::new(AtomicUsize::new(0));
    let c = Arc::clone(&called);
    let svc = start.layer(service_fn(move |_req: Request<Body>| {
        c.fetch_add(1, Ordering::SeqCst);
        async { Ok::<_, Infallible>(Response::new(Full::new(Bytes::new()))) }
    }));
    let res = svc.oneshot(request("ann", false)).await.unwrap();
    assert_eq!(res.status(), 500);
    assert_eq!(called.load(Ordering::SeqCst), 0);
}

/// A handler that builds its own upstream request (another body, no extensions) still
/// meets its request's reservation at the gate, and a second upstream call of the same
/// request (a fallback) is checked at the gate on its own.
#[tokio::test(start_paused = true)]
async fn a_request_built_anew_below_the_start_is_checked_at_the_gate() {
    let amount = amount_of_body().await;
    let budgets = layer(Money::from_picos(amount.picos() * 3));
    let (start, gate) = budgets.split();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let s = Arc::clone(&seen);
    let upstream = gate.layer(service_fn(move |req: Request<Full<Bytes>>| {
        let r = req
            .extensions()
            .get::<BudgetReservation>()
            .cloned()
            .unwrap();
        s.lock().unwrap().push(r.amount());
        r.settle(Money::ZERO);
        async { Ok::<_, Infallible>(Response::new(Full::new(Bytes::new()))) }
    }));
    let handler = service_fn(move |req: Request<Body>| {
        let upstream = upstream.clone();
        async move {
            let body = req.into_body().collect().await.unwrap().to_bytes();
            // first call: a new request of the same body; second: a priced estimate
            let mut first = Request::post("/v1/messages").body(Full::new(body)).unwrap();
            first
                .extensions_mut()
                .insert(palisade::cost::Principal::new("ann"));
            let first = upstream.clone().oneshot(first);
            let status = first.await.unwrap().status();
            assert_eq!(status, 200);
            let mut second = Request::post("/v1/messages")
                .body(Full::new(Bytes::new()))
                .unwrap();
            second
                .extensions_mut()
                .insert(palisade::cost::Principal::new("ann"));
            second
                .extensions_mut()
                .insert(BudgetEstimate(Money::from_picos(7)));
            let res = upstream.oneshot(second).await.unwrap();
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(
                res.status().as_str().to_owned(),
            ))))
        }
    });
    let svc = start.layer(handler);
    let res = svc.oneshot(request("ann", false)).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(*seen.lock().unwrap(), vec![amount, Money::from_picos(7)]);
    assert_eq!(spend(&budgets, "ann"), (Money::ZERO, Money::ZERO));
}

/// The gate takes the start's estimate only for the very body the start read: a handler
/// that sends upstream a dearer body (a larger output limit) has it estimated and reserved
/// anew, the start's smaller reservation released.
#[tokio::test(start_paused = true)]
async fn a_dearer_body_at_the_gate_is_estimated_again_not_taken_from_the_start() {
    let amount = amount_of_body().await;
    let dearer = BODY.replace("\"max_tokens\":1000", "\"max_tokens\":9000");
    let budgets = layer(Money::parse_dollars("100").unwrap());
    let (start, gate) = budgets.split();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let s = Arc::clone(&seen);
    let upstream = gate.layer(service_fn(move |req: Request<Full<Bytes>>| {
        let r = req
            .extensions()
            .get::<BudgetReservation>()
            .cloned()
            .unwrap();
        s.lock().unwrap().push(r.amount());
        r.settle(Money::ZERO);
        async { Ok::<_, Infallible>(Response::new(Full::new(Bytes::new()))) }
    }));
    let handler = service_fn(move |req: Request<Body>| {
        let upstream = upstream.clone();
        let dearer = dearer.clone();
        async move {
            let (parts, body) = req.into_parts();
            body.collect().await.unwrap();
            let req = Request::from_parts(parts, Full::new(Bytes::from(dearer)));
            upstream.oneshot(req).await
        }
    });
    let res = start
        .layer(handler)
        .oneshot(request("ann", false))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert!(
        seen[0] > amount,
        "reserved {} for the dearer body, {amount} for the start's",
        seen[0]
    );
    assert_eq!(spend(&budgets, "ann"), (Money::ZERO, Money::ZERO));
}

#[cfg(feature = "redis")]
mod redis_store {
    use super::*;
    use palisade::cost::budget::RedisBudgetStore;

    async fn redis_layer(url: &str, limit: Money) -> BudgetLayer {
        let client = redis::Client::open(url).unwrap();
        let conn = redis::aio::ConnectionManager::new(client).await.unwrap();
        BudgetLayer::builder()
            .budget(Budget::new("daily", Scope::User, Period::Day, limit))
            .store(RedisBudgetStore::new(conn))
            .build()
            .unwrap()
    }

    async fn account(url: &str, user: &str) -> (Option<String>, Option<String>) {
        let client = redis::Client::open(url).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let fields: Vec<(String, String)> = redis::cmd("HGETALL")
            .arg(format!("palisade:budget:{{budget}}:daily:{user}"))
            .query_async(&mut conn)
            .await
            .unwrap();
        // reserved: the holds (`h<until_ms>`) and `r` of accounts written before holds
        let held: Vec<u128> = fields
            .iter()
            .filter(|(f, _)| f == "r" || f.starts_with('h'))
            .map(|(_, v)| v.parse().unwrap())
            .collect();
        let spent = fields
            .iter()
            .find(|(f, _)| f == "s")
            .map(|(_, v)| v.clone());
        let reserved = (!held.is_empty()).then(|| held.iter().sum::<u128>().to_string());
        (spent, reserved)
    }

    /// Reads the account until its reserved amount is `want` (each read a round trip, so
    /// background releases get their turn); fails after 2000 reads.
    async fn reserved_becomes(url: &str, user: &str, want: Money) {
        let want = want.picos().to_string();
        for _ in 0..2000 {
            if account(url, user).await.1.as_deref().unwrap_or("0") == want {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("reserved is {:?}, not {want}", account(url, user).await);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn split_over_redis_admits_exactly_what_fits_and_releases_refused_and_abandoned_holds() {
        let server = support::RedisServer::start()
            .await
            .expect("redis-server is installed");
        let url = server.url();
        let amount = amount_of_body().await;
        let budgets = redis_layer(&url, Money::from_picos(amount.picos() * 10)).await;
        let permits = Arc::new(tokio::sync::Semaphore::new(0));
        let called = Arc::new(AtomicUsize::new(0));
        let (svc, reached) = stack(
            &budgets,
            upstream(Arc::clone(&permits), Arc::clone(&called), amount),
        );
        // refused by the rate limiter: 20 of them, their holds all released
        for _ in 0..20 {
            let mut req = request("ann", false);
            req.headers_mut()
                .insert("x-test", "refuse".parse().unwrap());
            assert_eq!(svc.clone().oneshot(req).await.unwrap().status(), 429);
        }
        reserved_becomes(&url, "ann", Money::ZERO).await;
        // abandoned between start and gate, with the store call possibly in flight
        let gone: Vec<_> = (0..10)
            .map(|_| tokio::spawn(svc.clone().oneshot(request("ann", true))))
            .collect();
        while reached.load(Ordering::SeqCst) < 30 {
            tokio::task::yield_now().await;
        }
        for t in gone {
            t.abort();
            assert!(t.await.unwrap_err().is_cancelled());
        }
        reserved_becomes(&url, "ann", Money::ZERO).await;
        // 50 at once: exactly 10 fit
        let tasks: Vec<_> = (0..50)
            .map(|_| {
                let svc = svc.clone();
                tokio::spawn(
                    async move { svc.oneshot(request("ann", false)).await.unwrap().status() },
                )
            })
            .collect();
        let mut finished = 0;
        while called.load(Ordering::SeqCst) + finished < 50 {
            finished = tasks.iter().filter(|t| t.is_finished()).count();
            tokio::task::yield_now().await;
        }
        assert_eq!(called.load(Ordering::SeqCst), 10);
        permits.add_permits(50);
        let mut refused = 0;
        for t in tasks {
            if t.await.unwrap() == 429 {
                refused += 1;
            }
        }
        assert_eq!(refused, 40);
        reserved_becomes(&url, "ann", Money::ZERO).await;
        assert_eq!(
            account(&url, "ann").await.0,
            Some((amount.picos() * 10).to_string())
        );
    }
}

/// A memory store whose reservations wait for the test's go-ahead. With `late_answer`
/// the reservation is made first and only its answer waits (a network store that applied
/// the call and whose reply is still on its way).
struct HeldStore {
    inner: palisade::cost::budget::MemoryBudgetStore,
    started: Arc<tokio::sync::Notify>,
    go: Arc<tokio::sync::Semaphore>,
    late_answer: bool,
}

impl palisade::cost::budget::BudgetStore for HeldStore {
    fn reserve<'a>(
        &'a self,
        charges: &'a [palisade::cost::budget::Charge],
        amount: Money,
        now: std::time::SystemTime,
    ) -> palisade::cost::budget::BoxFuture<
        'a,
        Result<palisade::cost::budget::Reserve, palisade::cost::budget::BudgetStoreError>,
    > {
        Box::pin(async move {
            if self.late_answer {
                let answer = self.inner.reserve(charges, amount, now).await;
                self.started.notify_one();
                let _go = self.go.acquire().await.unwrap();
                return answer;
            }
            self.started.notify_one();
            let _go = self.go.acquire().await.unwrap();
            self.inner.reserve(charges, amount, now).await
        })
    }

    fn settle(
        &self,
        charges: Arc<[palisade::cost::budget::Charge]>,
        reserved: Money,
        actual: Money,
        now: std::time::SystemTime,
    ) -> palisade::cost::budget::BoxFuture<
        'static,
        Result<Vec<palisade::cost::budget::Crossing>, palisade::cost::budget::BudgetStoreError>,
    > {
        self.inner.settle(charges, reserved, actual, now)
    }

    fn spend(
        &self,
        charge: &palisade::cost::budget::Charge,
        now: std::time::SystemTime,
    ) -> Option<(Money, Money)> {
        self.inner.spend(charge, now)
    }
}

/// The layers between start and gate run while the store call is in flight: here the one
/// between lets the store answer only once the reservation has started, which a layer that
/// waited for the reservation before going on could never see.
#[tokio::test(start_paused = true)]
async fn the_reservation_is_in_flight_while_the_layers_between_run() {
    let started = Arc::new(tokio::sync::Notify::new());
    let go = Arc::new(tokio::sync::Semaphore::new(0));
    let budgets = BudgetLayer::builder()
        .budget(Budget::new(
            "daily",
            Scope::User,
            Period::Day,
            Money::parse_dollars("5").unwrap(),
        ))
        .store(HeldStore {
            inner: palisade::cost::budget::MemoryBudgetStore::new(),
            started: Arc::clone(&started),
            go: Arc::clone(&go),
            late_answer: false,
        })
        .build()
        .unwrap();
    let (start, gate) = budgets.split();
    let called = Arc::new(AtomicUsize::new(0));
    let gated = gate.layer(upstream(
        Arc::new(tokio::sync::Semaphore::new(10)),
        Arc::clone(&called),
        Money::ZERO,
    ));
    let middle = service_fn(move |req: Request<Body>| {
        let (started, go, gated) = (Arc::clone(&started), Arc::clone(&go), gated.clone());
        async move {
            // a rate limiter's own store call, answered once the reservation is out too
            started.notified().await;
            go.add_permits(1);
            gated.oneshot(req).await
        }
    });
    let svc = start.layer(middle);
    let res = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        svc.oneshot(request("ann", false)),
    )
    .await
    .expect("the reservation and the layers between ran together")
    .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(called.load(Ordering::SeqCst), 1);
}

/// A request that reaches the gate charged to more accounts than its start knew of (a
/// bot named only once the handler checked it) is checked at the gate on all of them:
/// the start's reservation is released, never counted twice.
#[tokio::test(start_paused = true)]
async fn a_gate_seeing_other_accounts_than_the_start_checks_them_itself() {
    let amount = amount_of_body().await;
    let budgets = BudgetLayer::builder()
        .budget(Budget::new(
            "daily",
            Scope::User,
            Period::Day,
            Money::parse_dollars("5").unwrap(),
        ))
        .budget(Budget::new(
            "bot",
            Scope::Bot,
            Period::Day,
            Money::from_picos(amount.picos() * 3 / 2),
        ))
        .build()
        .unwrap();
    let (start, gate) = budgets.split();
    let upstream = gate.layer(service_fn(move |req: Request<Body>| {
        let r = req.extensions().get::<BudgetReservation>().cloned();
        async move {
            r.expect("reserved at the gate").settle(amount);
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
        }
    }));
    let handler = service_fn(move |mut req: Request<Body>| {
        let upstream = upstream.clone();
        req.extensions_mut().insert(
            palisade::cost::Attribution::default()
                .with_user("ann".to_owned())
                .with_bot("b1".to_owned()),
        );
        async move { upstream.oneshot(req).await }
    });
    let svc = start.layer(handler);
    let first = svc.clone().oneshot(request("ann", false)).await.unwrap();
    assert_eq!(first.status(), 200);
    let second = svc.oneshot(request("ann", false)).await.unwrap();
    assert_eq!(second.status(), 429, "the bot's budget is spent");
    assert_eq!(
        budgets.spend("daily", "ann").unwrap(),
        (amount, Money::ZERO)
    );
    assert_eq!(budgets.spend("bot", "b1").unwrap(), (amount, Money::ZERO));
}

/// The plain layer (no split): a client gone while the store call is in flight leaves
/// nothing held once the store grants the reservation it asked for; it is released,
/// never charged, as the split's start does.
#[tokio::test(start_paused = true)]
async fn a_client_gone_while_the_plain_layer_reserves_leaves_no_hold() {
    let started = Arc::new(tokio::sync::Notify::new());
    let go = Arc::new(tokio::sync::Semaphore::new(0));
    let budgets = BudgetLayer::builder()
        .budget(Budget::new(
            "daily",
            Scope::User,
            Period::Day,
            Money::parse_dollars("5").unwrap(),
        ))
        .store(HeldStore {
            inner: palisade::cost::budget::MemoryBudgetStore::new(),
            started: Arc::clone(&started),
            go: Arc::clone(&go),
            late_answer: true,
        })
        .build()
        .unwrap();
    let called = Arc::new(AtomicUsize::new(0));
    let svc = budgets.layer(upstream(
        Arc::new(tokio::sync::Semaphore::new(10)),
        Arc::clone(&called),
        Money::ZERO,
    ));
    let gone = tokio::spawn(svc.oneshot(request("ann", false)));
    started.notified().await;
    gone.abort();
    assert!(gone.await.unwrap_err().is_cancelled());
    // the store answers after the client left
    go.add_permits(1);
    settle_down().await;
    assert_eq!(called.load(Ordering::SeqCst), 0);
    assert_eq!(spend(&budgets, "ann"), (Money::ZERO, Money::ZERO));
}

/// A start refused on its accounts does not refuse a request the handler built anew for
/// other accounts: the gate checks that one itself, as the plain layer would (here the
/// caller is blocked, the account the handler bills has room).
#[tokio::test(start_paused = true)]
async fn a_start_refused_on_other_accounts_than_the_gate_sees_is_checked_at_the_gate() {
    let budgets = layer(Money::parse_dollars("5").unwrap());
    assert!(budgets.set_limit("daily", "ann", Some(Money::ZERO)));
    let (start, gate) = budgets.split();
    let called = Arc::new(AtomicUsize::new(0));
    let upstream = gate.layer(upstream(
        Arc::new(tokio::sync::Semaphore::new(10)),
        Arc::clone(&called),
        Money::from_picos(7),
    ));
    let handler = service_fn(move |mut req: Request<Body>| {
        let upstream = upstream.clone();
        // billed to the organisation's account, not the caller's
        req.extensions_mut()
            .insert(palisade::cost::Principal::new("org"));
        async move { upstream.oneshot(req).await }
    });
    let svc = start.layer(handler);
    let res = svc.oneshot(request("ann", false)).await.unwrap();
    assert_eq!(res.status(), 200, "the account billed has room");
    assert_eq!(called.load(Ordering::SeqCst), 1);
    assert_eq!(
        budgets.spend("daily", "org").unwrap(),
        (Money::from_picos(7), Money::ZERO)
    );
}

/// A request body whose frames the test sends.
struct ChannelBody(tokio::sync::mpsc::UnboundedReceiver<Bytes>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|b| b.map(|b| Ok(http_body::Frame::data(b))))
    }
}

/// A service below the start that answers at once and reads the body on a task of its
/// own (a proxy still streaming the upload after an early answer) gets the whole body:
/// the start stops reading it when the request is answered, and hands it over.
#[tokio::test(start_paused = true)]
async fn a_body_still_read_after_the_answer_is_handed_over_whole() {
    let budgets = layer(Money::parse_dollars("5").unwrap());
    let (start, gate) = budgets.split();
    let _gated = gate.layer(service_fn(|_: Request<Full<Bytes>>| async {
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
    }));
    let (read_tx, read_rx) = tokio::sync::oneshot::channel();
    let read_tx = Arc::new(std::sync::Mutex::new(Some(read_tx)));
    let svc = start.layer(service_fn(move |req: Request<StartBody<ChannelBody>>| {
        let read_tx = read_tx.lock().unwrap().take().unwrap();
        tokio::spawn(async move {
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let _ = read_tx.send(body);
        });
        async { Ok::<_, Infallible>(Response::new(Full::new(Bytes::new()))) }
    }));
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let (first, rest) = BODY.split_at(20);
    tx.send(Bytes::from(first)).unwrap();
    let mut req = Request::post("/v1/messages").body(ChannelBody(rx)).unwrap();
    req.extensions_mut()
        .insert(palisade::cost::Principal::new("ann"));
    assert_eq!(svc.oneshot(req).await.unwrap().status(), 200);
    tx.send(Bytes::from(rest)).unwrap();
    drop(tx);
    let body = tokio::time::timeout(std::time::Duration::from_secs(60), read_rx)
        .await
        .expect("the body reached its reader")
        .unwrap();
    assert_eq!(&body[..], BODY.as_bytes());
}

/// A body made whole (the gate's own check rebuilds the body it read).
impl From<Bytes> for ChannelBody {
    fn from(bytes: Bytes) -> Self {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tx.send(bytes).unwrap();
        Self(rx)
    }
}

/// A reservation the gate took from its start is released, never charged, when the client
/// goes away while the gate still reads the body of a request a handler built anew (here
/// the upload itself, streamed on; the start reserved the request's `BudgetEstimate`
/// without reading it): nothing was sent upstream.
#[tokio::test(start_paused = true)]
async fn a_client_gone_while_the_gate_reads_the_body_releases_the_starts_reservation() {
    let budgets = layer(Money::parse_dollars("5").unwrap());
    let (start, gate) = budgets.split();
    let called = Arc::new(AtomicUsize::new(0));
    let c = Arc::clone(&called);
    let upstream = gate.layer(service_fn(move |_: Request<StartBody<ChannelBody>>| {
        c.fetch_add(1, Ordering::SeqCst);
        async { Ok::<_, Infallible>(Response::new(Full::new(Bytes::new()))) }
    }));
    let handler = service_fn(move |req: Request<StartBody<ChannelBody>>| {
        let upstream = upstream.clone();
        async move {
            // a new request streaming the upload on, the caller's identity copied alone
            let principal = req
                .extensions()
                .get::<palisade::cost::Principal>()
                .cloned()
                .unwrap();
            let mut anew = Request::post("/v1/messages").body(req.into_body()).unwrap();
            anew.extensions_mut().insert(principal);
            upstream.oneshot(anew).await
        }
    });
    let svc = start.layer(handler);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tx.send(Bytes::from(&BODY[..20])).unwrap();
    let mut req = Request::post("/v1/messages").body(ChannelBody(rx)).unwrap();
    req.extensions_mut()
        .insert(palisade::cost::Principal::new("ann"));
    let estimate = Money::parse_dollars("1").unwrap();
    req.extensions_mut().insert(BudgetEstimate(estimate));
    let client = tokio::spawn(svc.oneshot(req));
    settle_down().await;
    assert_eq!(spend(&budgets, "ann"), (Money::ZERO, estimate));
    client.abort();
    assert!(client.await.unwrap_err().is_cancelled());
    settle_down().await;
    assert_eq!(called.load(Ordering::SeqCst), 0);
    assert_eq!(spend(&budgets, "ann"), (Money::ZERO, Money::ZERO));
    drop(tx);
}

/// A layer between start and gate that builds the upstream request anew in its `call`
/// (a `map_request` keeping the body and the caller alone) reaches the gate with the
/// start's reservation: a budget room for one request lets it through, as the plain
/// layer does, instead of reserving it twice.
#[tokio::test(start_paused = true)]
async fn a_request_built_anew_in_a_layers_call_is_covered_by_the_starts_reservation() {
    let amount = amount_of_body().await;
    let budgets = layer(amount);
    let (start, gate) = budgets.split();
    let upstream = gate.layer(service_fn(|req: Request<Body>| {
        let r = req.extensions().get::<BudgetReservation>().cloned();
        async move {
            r.expect("let through with its reservation")
                .settle(Money::ZERO);
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
        }
    }));
    let anew = tower::util::MapRequestLayer::new(|req: Request<Body>| {
        let principal = req
            .extensions()
            .get::<palisade::cost::Principal>()
            .cloned()
            .unwrap();
        let mut anew = Request::post("/v1/messages").body(req.into_body()).unwrap();
        anew.extensions_mut().insert(principal);
        anew
    });
    let svc = start.layer(anew.layer(upstream));
    let res = svc.oneshot(request("ann", false)).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(spend(&budgets, "ann"), (Money::ZERO, Money::ZERO));
}

/// Two split layers, one inside the other (a per-user budget and a global one in two
/// layers): a request a handler builds anew reaches each gate with its own start's
/// reservation, so a budget room for one request lets it through.
#[tokio::test(start_paused = true)]
async fn two_split_layers_nested_each_find_their_starts_reservation() {
    let amount = amount_of_body().await;
    let users = layer(amount);
    let everyone = BudgetLayer::builder()
        .budget(Budget::new("all", Scope::Global, Period::Day, amount))
        .build()
        .unwrap();
    let (start_users, gate_users) = users.split();
    let (start_all, gate_all) = everyone.split();
    let upstream = gate_users.layer(gate_all.layer(service_fn(|req: Request<Full<Bytes>>| {
        let n = req.extensions().get::<BudgetReservation>().cloned();
        async move {
            n.expect("let through with a reservation")
                .settle(Money::ZERO);
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
        }
    })));
    let handler = service_fn(move |req: Request<StartBody<StartBody<Full<Bytes>>>>| {
        let upstream = upstream.clone();
        async move {
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let mut anew = Request::post("/v1/messages").body(Full::new(body)).unwrap();
            anew.extensions_mut()
                .insert(palisade::cost::Principal::new("ann"));
            let res = upstream.oneshot(anew).await.unwrap();
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(
                res.status().as_str().to_owned(),
            ))))
        }
    });
    let svc = start_users.layer(start_all.layer(handler));
    let res = svc.oneshot(request("ann", false)).await.unwrap();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"200");
    // the upstream settles the reservation it finds, which carries the outer layer's:
    // nothing charged, nothing left held on either account
    assert_eq!(spend(&users, "ann"), (Money::ZERO, Money::ZERO));
    assert_eq!(spend(&everyone, "*"), (Money::ZERO, Money::ZERO));
}
