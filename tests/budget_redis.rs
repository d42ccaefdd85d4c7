//! Budgets in Redis: one account shared by instances, atomic under concurrency.
#![cfg(feature = "redis")]

mod support;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use palisade::cost::Money;
use palisade::cost::alert::{AlertKind, MemoryAlertSink};
use palisade::cost::budget::{
    Budget, BudgetEstimate, BudgetLayer, BudgetReservation, Hold, Period, RedisBudgetStore, Scope,
};
use tower::{Layer, ServiceExt, service_fn};

async fn manager(url: &str) -> redis::aio::ConnectionManager {
    let client = redis::Client::open(url).unwrap();
    redis::aio::ConnectionManager::new(client).await.unwrap()
}

fn request(user: &str, estimate: u128) -> Request<Full<Bytes>> {
    let mut r = Request::post("/v1/messages")
        .body(Full::new(Bytes::from(
            r#"{"model":"claude-3-5-haiku","max_tokens":10}"#,
        )))
        .unwrap();
    r.extensions_mut()
        .insert(BudgetEstimate(Money::from_picos(estimate)));
    r.extensions_mut()
        .insert(palisade::cost::Principal::new(user));
    r
}

fn daily(limit: u128) -> Budget {
    Budget::new("daily", Scope::User, Period::Day, Money::from_picos(limit))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_sharing_redis_let_fifty_concurrent_requests_through_ten_times() {
    let server = support::RedisServer::start()
        .await
        .expect("redis-server is installed");
    let calls = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let mut instances = Vec::new();
    for _ in 0..2 {
        let layer = BudgetLayer::builder()
            .budget(daily(1000))
            .store(RedisBudgetStore::new(manager(&server.url()).await))
            .build()
            .unwrap();
        let calls = Arc::clone(&calls);
        let gate = Arc::clone(&gate);
        instances.push(layer.layer(service_fn(move |req: Request<Full<Bytes>>| {
            let calls = Arc::clone(&calls);
            let gate = Arc::clone(&gate);
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                let _p = gate.acquire().await.unwrap();
                req.extensions()
                    .get::<BudgetReservation>()
                    .unwrap()
                    .settle(Money::from_picos(100));
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
            }
        })));
    }
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let svc = instances[i % 2].clone();
            tokio::spawn(async move { svc.oneshot(request("ann", 100)).await.unwrap() })
        })
        .collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while calls.load(Ordering::SeqCst) + tasks.iter().filter(|t| t.is_finished()).count() < 50 {
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(calls.load(Ordering::SeqCst), 10);
    gate.add_permits(100);
    let mut refused = 0;
    for t in tasks {
        let res = t.await.unwrap();
        if res.status() == 429 {
            refused += 1;
            assert_eq!(res.headers()["x-should-retry"], "false");
            let retry: u64 = res.headers()["retry-after"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!((1..=86_400).contains(&retry), "{retry}");
        }
    }
    assert_eq!(refused, 40);
    // the account in Redis: 1000 spent, nothing reserved (a settlement against Redis
    // finishes on a background task after the response: wait for it, not for a time)
    let mut conn = manager(&server.url()).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (reserved, spent) = account(&mut conn, "palisade:budget:{budget}:daily:ann").await;
        if reserved == "0" || std::time::Instant::now() > deadline {
            assert_eq!((spent.as_str(), reserved.as_str()), ("1000", "0"));
            break;
        }
        tokio::task::yield_now().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refunds_and_threshold_alerts_work_through_redis() {
    let server = support::RedisServer::start()
        .await
        .expect("redis-server is installed");
    let alerts = Arc::new(MemoryAlertSink::default());
    let layer = BudgetLayer::builder()
        .budget(daily(100))
        .store(RedisBudgetStore::new(manager(&server.url()).await))
        .alerts(Arc::clone(&alerts))
        .build()
        .unwrap();
    let svc = layer.layer(service_fn(|req: Request<Full<Bytes>>| async move {
        // each call really costs 15 of the 20 it reserved
        req.extensions()
            .get::<BudgetReservation>()
            .unwrap()
            .settle(Money::from_picos(15));
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
    }));
    for _ in 0..6 {
        // spent 15, 30, …, 90: with refunds each 20 still fits
        let status = svc
            .clone()
            .oneshot(request("ann", 20))
            .await
            .unwrap()
            .status();
        assert_eq!(status, 200);
        tokio::time::sleep(Duration::from_millis(20)).await; // the settlement lands
    }
    // wait for the settlements (they finish on spawned tasks)
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while alerts.events().len() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "{:?}",
            alerts.events()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let ratios: Vec<f64> = alerts
        .events()
        .iter()
        .map(|e| match e.kind {
            AlertKind::Threshold { ratio } => ratio,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(ratios, [0.5, 0.8]);
    assert_eq!(alerts.events()[1].spent, Money::from_picos(90));
    // 90 spent: a reservation of 11 no longer fits, one of 10 does
    assert_eq!(
        svc.clone()
            .oneshot(request("ann", 11))
            .await
            .unwrap()
            .status(),
        429
    );
    assert_eq!(svc.oneshot(request("ann", 10)).await.unwrap().status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_budget_in_redis_says_when_it_frees_up() {
    let server = support::RedisServer::start()
        .await
        .expect("redis-server is installed");
    let layer = BudgetLayer::builder()
        .budget(Budget::new(
            "hourly",
            Scope::User,
            Period::Rolling(Duration::from_secs(3600)),
            Money::from_picos(100),
        ))
        .store(RedisBudgetStore::new(manager(&server.url()).await))
        .build()
        .unwrap();
    let svc = layer.layer(service_fn(|req: Request<Full<Bytes>>| async move {
        let r = req.extensions().get::<BudgetReservation>().unwrap();
        r.settle(r.amount());
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
    }));
    assert_eq!(
        svc.clone()
            .oneshot(request("ann", 100))
            .await
            .unwrap()
            .status(),
        200
    );
    tokio::time::sleep(Duration::from_millis(50)).await; // the settlement lands
    let refused = svc.oneshot(request("ann", 1)).await.unwrap();
    assert_eq!(refused.status(), 429);
    let retry: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((3540..=3600).contains(&retry), "{retry}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budgets_work_on_a_redis_cluster() {
    let cluster = support::RedisCluster::start()
        .await
        .expect("redis-server is installed");
    let client = redis::cluster::ClusterClient::new(cluster.urls()).unwrap();
    let conn = client.get_async_connection().await.unwrap();
    let layer = BudgetLayer::builder()
        .budget(daily(100))
        .budget(Budget::new(
            "bots",
            Scope::Bot,
            Period::Month,
            Money::from_picos(1000),
        ))
        .store(RedisBudgetStore::new(conn))
        .build()
        .unwrap();
    let svc = layer.layer(service_fn(|req: Request<Full<Bytes>>| async move {
        let r = req.extensions().get::<BudgetReservation>().unwrap();
        r.settle(r.amount());
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
    }));
    let req = |n| {
        let mut r = request("ann", n);
        r.headers_mut()
            .insert("x-bot-id", "helper".parse().unwrap());
        r
    };
    assert_eq!(svc.clone().oneshot(req(60)).await.unwrap().status(), 200);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(svc.oneshot(req(60)).await.unwrap().status(), 429);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_refuses_with_503_or_passes_when_failing_open() {
    let server = support::RedisServer::start()
        .await
        .expect("redis-server is installed");
    let url = server.url();
    let conn = manager(&url).await;
    drop(server); // killed
    let calls = Arc::new(AtomicUsize::new(0));
    let upstream = {
        let calls = Arc::clone(&calls);
        service_fn(move |_req: Request<Full<Bytes>>| {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, Infallible>(Response::new(Full::new(Bytes::new()))) }
        })
    };
    let closed = BudgetLayer::builder()
        .budget(daily(100))
        .store(RedisBudgetStore::new(conn.clone()))
        .build()
        .unwrap()
        .layer(upstream.clone());
    let res = closed.oneshot(request("ann", 1)).await.unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    let open = BudgetLayer::builder()
        .budget(daily(100))
        .store(RedisBudgetStore::new(conn))
        .fail_open(true)
        .build()
        .unwrap()
        .layer(upstream);
    assert_eq!(open.oneshot(request("ann", 1)).await.unwrap().status(), 200);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// One account in Redis and the same account in memory, asked the same questions.
struct Twin {
    redis: RedisBudgetStore<redis::aio::ConnectionManager>,
    memory: palisade::cost::budget::MemoryBudgetStore,
    charges: Arc<[palisade::cost::budget::Charge]>,
    /// The holds of the reservations in Redis not yet settled.
    holds: std::sync::Mutex<Vec<Hold>>,
}

impl Twin {
    async fn new(server: &support::RedisServer, budget: Budget) -> Self {
        Self {
            redis: RedisBudgetStore::new(manager(&server.url()).await),
            memory: palisade::cost::budget::MemoryBudgetStore::new(),
            charges: Arc::from(vec![palisade::cost::budget::Charge {
                budget: Arc::new(budget),
                subject: "ann".into(),
            }]),
            holds: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// Reserves `picos` in both stores; both must answer alike (the refusal's wait
    /// aside: each reads its own clock). Returns whether it was granted.
    async fn reserve(&self, picos: u128) -> bool {
        use palisade::cost::budget::{BudgetStore, Reserve};
        let now = std::time::SystemTime::now();
        let amount = Money::from_picos(picos);
        let strip = |r: Reserve| match r {
            Reserve::Refused { index, spent, .. } => Some((index, spent)),
            _ => None,
        };
        let answer = self
            .redis
            .reserve(&self.charges, amount, now)
            .await
            .unwrap();
        if let Reserve::Granted(hold) = answer {
            self.holds.lock().unwrap().push(hold);
        }
        let in_redis = strip(answer);
        let in_memory = strip(
            self.memory
                .reserve(&self.charges, amount, now)
                .await
                .unwrap(),
        );
        assert_eq!(in_redis, in_memory, "reserving {picos} pico-dollars");
        in_redis.is_none()
    }

    /// Settles a reservation of `reserved` at `actual` in both stores; both must report
    /// the same crossings.
    async fn settle(&self, reserved: u128, actual: u128) -> Vec<(u16, Money)> {
        use palisade::cost::budget::BudgetStore;
        let now = std::time::SystemTime::now();
        let (r, a) = (Money::from_picos(reserved), Money::from_picos(actual));
        let strip = |c: Vec<palisade::cost::budget::Crossing>| {
            c.into_iter()
                .map(|c| (c.permille, c.spent))
                .collect::<Vec<_>>()
        };
        let hold = self.holds.lock().unwrap().pop().unwrap_or(Hold::NONE);
        let in_redis = strip(
            self.redis
                .settle_hold(Arc::clone(&self.charges), hold, r, a, now)
                .await
                .unwrap(),
        );
        let in_memory = strip(
            self.memory
                .settle(Arc::clone(&self.charges), r, a, now)
                .await
                .unwrap(),
        );
        assert_eq!(in_redis, in_memory, "settling {actual} of {reserved}");
        in_redis
    }

    /// Reserves and settles `picos`.
    async fn spend(&self, picos: u128) -> Vec<(u16, Money)> {
        assert!(self.reserve(picos).await, "{picos} should fit");
        self.settle(picos, picos).await
    }
}

/// Lua numbers are doubles: past 2^53 pico-dollars (about $9,007) the scripts compared
/// rounded sums, so an ordinary $10,000 monthly budget let a request through one
/// pico-dollar over its limit and reported a rounded spend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ten_thousand_dollar_budget_in_redis_refuses_exactly_at_its_limit() {
    let server = support::RedisServer::start()
        .await
        .expect("redis-server is installed");
    let limit = 10_000 * 1_000_000_000_000u128; // $10,000
    let periods = [
        ("monthly", Period::Month),
        ("hourly", Period::Rolling(Duration::from_secs(3600))),
    ];
    for (name, period) in periods {
        let twin = Twin::new(
            &server,
            Budget::new(name, Scope::User, period, Money::from_picos(limit)),
        )
        .await;
        // odd amounts up to one pico-dollar short of the limit
        for _ in 0..3 {
            twin.spend(3_333_333_333_333_333).await;
        }
        assert!(
            !twin.reserve(2).await,
            "{name}: one pico-dollar over the limit"
        );
        assert!(twin.reserve(1).await, "{name}: exactly the limit");
        twin.settle(1, 1).await;
        assert!(!twin.reserve(1).await, "{name}: the budget is used up");
    }
}

/// Spend was kept with HINCRBY: past $9.2 million (2^63 pico-dollars) per account the
/// settlement failed and the spend was lost. Thresholds are compared on exact amounts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_totals_in_redis_past_nine_million_dollars_are_exact() {
    let server = support::RedisServer::start()
        .await
        .expect("redis-server is installed");
    let dollar = 1_000_000_000_000u128;
    let limit = 20_000_000 * dollar + 2; // $20 million and two pico-dollars
    let twin = Twin::new(
        &server,
        Budget::new(
            "monthly",
            Scope::User,
            Period::Month,
            Money::from_picos(limit),
        )
        .thresholds([0.5, 1.0]),
    )
    .await;
    let half = limit / 2; // $10 million and one pico-dollar
    assert!(twin.spend(half - 7).await.is_empty());
    assert!(
        twin.spend(6).await.is_empty(),
        "one pico-dollar short of half"
    );
    assert_eq!(twin.spend(1).await, [(500, Money::from_picos(half))]);
    assert!(twin.spend(half - 1).await.is_empty());
    assert!(!twin.reserve(2).await);
    assert_eq!(twin.spend(1).await, [(1000, Money::from_picos(limit))]);
    let mut conn = manager(&server.url()).await;
    let (reserved, spent) = account(&mut conn, "palisade:budget:{budget}:monthly:ann").await;
    assert_eq!((spent, reserved), (limit.to_string(), "0".to_owned()));
    // amounts as large as Money holds are kept too
    let huge = Twin::new(
        &server,
        Budget::new(
            "huge",
            Scope::User,
            Period::Month,
            Money::from_picos(u128::MAX),
        ),
    )
    .await;
    huge.spend(u128::MAX - 1).await;
    assert!(!huge.reserve(2).await);
    huge.spend(1).await;
    assert!(!huge.reserve(1).await);
}

/// A refused reservation read (and, for a new account, created) the account's hash but
/// set no expiry, so every subject whose first request was refused left a key in Redis
/// for ever; the memory store forgets such accounts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_reservation_leaves_no_key_without_an_expiry() {
    let server = support::RedisServer::start()
        .await
        .expect("redis-server is installed");
    let mut conn = manager(&server.url()).await;
    let periods = [
        ("daily", Period::Day),
        ("monthly", Period::Month),
        ("hourly", Period::Rolling(Duration::from_secs(3600))),
    ];
    for (name, period) in periods {
        let twin = Twin::new(
            &server,
            Budget::new(name, Scope::User, period, Money::from_picos(10)),
        )
        .await;
        assert!(!twin.reserve(11).await, "{name}: over the limit");
        let key = format!("palisade:budget:{{budget}}:{name}:ann");
        let ttl: i64 = redis::cmd("PTTL")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_ne!(ttl, -1, "{name}: {key} has no expiry");
    }
}

/// The charge of `subject` on `budget`.
fn charge_of(budget: &Arc<Budget>, subject: &str) -> Arc<[palisade::cost::budget::Charge]> {
    Arc::from(vec![palisade::cost::budget::Charge {
        budget: Arc::clone(budget),
        subject: subject.into(),
    }])
}

/// The `calls` of one command in `INFO commandstats`.
async fn calls_of(conn: &mut impl redis::aio::ConnectionLike, command: &str) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .unwrap();
    let prefix = format!("cmdstat_{command}:calls=");
    info.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|l| l.split(',').next())
        .map_or(0, |n| n.parse().unwrap())
}

/// The reserved amount of an account, as Redis keeps it: the sum of its holds (fields
/// `h<until_ms>`, live or not yet cleared) and of `r` (kept by earlier versions); `None`
/// when it has neither.
async fn reserved_of(conn: &mut impl redis::aio::ConnectionLike, key: &str) -> Option<String> {
    let (reserved, _) = fields_of(conn, key).await;
    reserved
}

/// The reserved (as [`reserved_of`]) and the settled amounts of an account, read at once.
async fn fields_of(
    conn: &mut impl redis::aio::ConnectionLike,
    key: &str,
) -> (Option<String>, Option<String>) {
    let fields: Vec<(String, String)> = redis::cmd("HGETALL")
        .arg(key)
        .query_async(conn)
        .await
        .unwrap();
    let held: Vec<u128> = fields
        .iter()
        .filter(|(f, _)| f == "r" || f.starts_with('h'))
        .map(|(_, v)| v.parse().unwrap())
        .collect();
    let spent = fields
        .iter()
        .find(|(f, _)| f == "s")
        .map(|(_, v)| v.clone());
    (
        (!held.is_empty()).then(|| held.iter().sum::<u128>().to_string()),
        spent,
    )
}

/// The reserved and the settled amounts of an account, as Redis keeps them.
async fn account(conn: &mut impl redis::aio::ConnectionLike, key: &str) -> (String, String) {
    let (reserved, spent) = fields_of(conn, key).await;
    (
        reserved.unwrap_or_else(|| "0".into()),
        spent.unwrap_or_else(|| "0".into()),
    )
}

/// The account at `key` once `done` holds for it, looked at up to 1,000 times (each look a
/// round trip, behind the calls sent before it), or as last seen.
async fn account_once(
    conn: &mut impl redis::aio::ConnectionLike,
    key: &str,
    done: impl Fn(&(String, String)) -> bool,
) -> (String, String) {
    let mut seen = account(conn, key).await;
    for _ in 0..1000 {
        if done(&seen) {
            break;
        }
        tokio::task::yield_now().await;
        seen = account(conn, key).await;
    }
    seen
}

/// Reservations of `picos` on each of `charges` at once, each on a task of its own;
/// whether each was granted (`None`: the store failed).
async fn reserve_at_once<C>(
    store: &Arc<RedisBudgetStore<C>>,
    charges: &[Arc<[palisade::cost::budget::Charge]>],
    picos: u128,
) -> Vec<Option<bool>>
where
    RedisBudgetStore<C>: palisade::cost::budget::BudgetStore,
    C: Send + Sync + 'static,
{
    holds_at_once(store, charges, picos)
        .await
        .into_iter()
        .map(|answer| answer.map(|hold| hold.is_some()))
        .collect()
}

/// Reservations of `picos` on each of `charges` at once, each on a task of its own; the
/// hold of each granted one (`Some(None)`: refused; `None`: the store failed).
async fn holds_at_once<C>(
    store: &Arc<RedisBudgetStore<C>>,
    charges: &[Arc<[palisade::cost::budget::Charge]>],
    picos: u128,
) -> Vec<Option<Option<Hold>>>
where
    RedisBudgetStore<C>: palisade::cost::budget::BudgetStore,
    C: Send + Sync + 'static,
{
    use palisade::cost::budget::{BudgetStore, Reserve};
    let mut tasks = tokio::task::JoinSet::new();
    for (i, charges) in charges.iter().enumerate() {
        let store = Arc::clone(store);
        let charges = Arc::clone(charges);
        tasks.spawn(async move {
            let answer = store
                .reserve(
                    &charges,
                    Money::from_picos(picos),
                    std::time::SystemTime::now(),
                )
                .await;
            let hold = answer.ok().map(|r| match r {
                Reserve::Granted(hold) => Some(hold),
                _ => None,
            });
            (i, hold)
        });
    }
    let mut out = vec![None; charges.len()];
    while let Some(done) = tasks.join_next().await {
        let (i, hold) = done.unwrap();
        out[i] = hold;
    }
    out
}

/// The settlements of the reservations of `holds` (each of `reserved`) at `actual` on
/// `charges` at once, each on a task of its own.
async fn settle_at_once<C>(
    store: &Arc<RedisBudgetStore<C>>,
    charges: &Arc<[palisade::cost::budget::Charge]>,
    holds: &[Hold],
    reserved: u128,
    actual: u128,
) where
    RedisBudgetStore<C>: palisade::cost::budget::BudgetStore,
    C: Send + Sync + 'static,
{
    use palisade::cost::budget::BudgetStore;
    let mut tasks = tokio::task::JoinSet::new();
    for &hold in holds {
        let store = Arc::clone(store);
        let charges = Arc::clone(charges);
        tasks.spawn(async move {
            store
                .settle_hold(
                    charges,
                    hold,
                    Money::from_picos(reserved),
                    Money::from_picos(actual),
                    std::time::SystemTime::now(),
                )
                .await
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap().unwrap();
    }
}

/// The one hold of a single granted reservation of `picos` on `charges`.
async fn hold_of<C>(
    store: &Arc<RedisBudgetStore<C>>,
    charges: &Arc<[palisade::cost::budget::Charge]>,
    picos: u128,
) -> Hold
where
    RedisBudgetStore<C>: palisade::cost::budget::BudgetStore,
    C: Send + Sync + 'static,
{
    let answers = holds_at_once(store, std::slice::from_ref(charges), picos).await;
    answers[0].expect("the store answers").expect("granted")
}

/// Reservations made while two calls are in flight wait and go together as one script
/// call; each runs exactly as it would alone, so one budget admits exactly what fits.
#[tokio::test]
async fn concurrent_reservations_and_settlements_go_in_batches_and_stay_exact() {
    let server = support::RedisServer::start()
        .await
        .expect("redis-server is installed");
    let mut admin = manager(&server.url()).await;
    let store = Arc::new(RedisBudgetStore::new(manager(&server.url()).await));
    let budget = Arc::new(daily(7 * 40 + 6));
    let ann = charge_of(&budget, "ann");
    // the script is loaded, and the counts start from here
    assert_eq!(
        reserve_at_once(&store, &[charge_of(&budget, "warm")], 1).await,
        [Some(true)]
    );
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut admin)
        .await
        .unwrap();
    let granted = holds_at_once(&store, &vec![Arc::clone(&ann); 100], 7).await;
    let holds: Vec<Hold> = granted.iter().flatten().flatten().copied().collect();
    assert_eq!(holds.len(), 40);
    assert_eq!(granted.iter().filter(|g| **g == Some(None)).count(), 60);
    let key = "palisade:budget:{budget}:daily:ann";
    assert_eq!(account(&mut admin, key).await, ("280".into(), "0".into()));
    let evals = calls_of(&mut admin, "evalsha").await;
    assert!(evals <= 10, "100 reservations took {evals} script calls");
    assert!(store.batched_calls() >= 90, "{}", store.batched_calls());
    // settlements batch too: 40 at 5 of their 7
    let before = store.batched_calls();
    settle_at_once(&store, &ann, &holds, 7, 5).await;
    assert_eq!(account(&mut admin, key).await, ("0".into(), "200".into()));
    assert!(store.batched_calls() > before);
}

/// A batch sent after Redis forgot the script (`NOSCRIPT`: restart, `SCRIPT FLUSH`) is
/// sent again once the script is loaded: no reservation is lost or made twice.
#[tokio::test]
async fn a_batch_sent_again_after_noscript_reserves_each_call_once() {
    let server = support::RedisServer::start()
        .await
        .expect("redis-server is installed");
    let mut admin = manager(&server.url()).await;
    let store = Arc::new(RedisBudgetStore::new(manager(&server.url()).await));
    let budget = Arc::new(daily(7 * 40 + 6));
    assert_eq!(
        reserve_at_once(&store, &[charge_of(&budget, "warm")], 1).await,
        [Some(true)]
    );
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut admin)
        .await
        .unwrap();
    let granted = reserve_at_once(&store, &vec![charge_of(&budget, "ann"); 100], 7).await;
    assert!(granted.iter().all(Option::is_some), "{granted:?}");
    assert_eq!(granted.iter().filter(|g| **g == Some(true)).count(), 40);
    let key = "palisade:budget:{budget}:daily:ann";
    assert_eq!(account(&mut admin, key).await, ("280".into(), "0".into()));
    assert!(store.batched_calls() > 0);
}

/// A batch that Redis refuses fails each of its calls (the layer then follows its failure
/// mode) and reserves nothing.
#[tokio::test]
async fn a_failing_batch_fails_each_of_its_calls() {
    let server = support::RedisServer::start()
        .await
        .expect("redis-server is installed");
    let mut admin = manager(&server.url()).await;
    let store = Arc::new(RedisBudgetStore::new(manager(&server.url()).await));
    let budget = Arc::new(daily(1000));
    assert_eq!(
        reserve_at_once(&store, &[charge_of(&budget, "warm")], 1).await,
        [Some(true)]
    );
    let acl = |rule: &'static str| {
        let mut admin = admin.clone();
        async move {
            let _: () = redis::cmd("ACL")
                .arg("SETUSER")
                .arg("default")
                .arg(rule)
                .query_async(&mut admin)
                .await
                .unwrap();
        }
    };
    acl("-evalsha").await;
    let granted = reserve_at_once(&store, &vec![charge_of(&budget, "ann"); 20], 7).await;
    assert_eq!(granted, vec![None; 20]);
    assert_eq!(
        store.batched_calls(),
        18,
        "two went alone, the rest as one batch"
    );
    acl("+evalsha").await;
    let key = "palisade:budget:{budget}:daily:ann";
    assert_eq!(account(&mut admin, key).await, ("0".into(), "0".into()));
    assert_eq!(
        reserve_at_once(&store, &[charge_of(&budget, "ann")], 7).await,
        [Some(true)]
    );
}

/// A call that fails inside a batch (here its account is not a hash) fails alone: the
/// other calls of the batch run and count exactly.
#[tokio::test]
async fn a_call_that_fails_inside_a_batch_fails_alone() {
    let server = support::RedisServer::start()
        .await
        .expect("redis-server is installed");
    let mut admin = manager(&server.url()).await;
    let store = Arc::new(RedisBudgetStore::new(manager(&server.url()).await));
    let budget = Arc::new(daily(1000));
    let _: () = redis::cmd("SET")
        .arg("palisade:budget:{budget}:daily:bob")
        .arg("not a hash")
        .query_async(&mut admin)
        .await
        .unwrap();
    let mut charges = vec![charge_of(&budget, "ann"); 20];
    charges[10] = charge_of(&budget, "bob");
    let granted = reserve_at_once(&store, &charges, 7).await;
    let mut expected = vec![Some(true); 20];
    expected[10] = None;
    assert_eq!(granted, expected);
    assert!(store.batched_calls() >= 10);
    let key = "palisade:budget:{budget}:daily:ann";
    assert_eq!(account(&mut admin, key).await, ("133".into(), "0".into()));
}

/// A settlement whose future is dropped at once (its caller gone) still reaches Redis:
/// what it releases would otherwise stay reserved until the period ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settlement_dropped_by_its_caller_still_lands() {
    use palisade::cost::budget::BudgetStore;
    let server = support::RedisServer::start()
        .await
        .expect("redis-server is installed");
    let mut admin = manager(&server.url()).await;
    let store = Arc::new(RedisBudgetStore::new(manager(&server.url()).await));
    let budget = Arc::new(daily(100));
    let ann = charge_of(&budget, "ann");
    let hold = hold_of(&store, &ann, 100).await;
    drop(store.settle_hold(
        Arc::clone(&ann),
        hold,
        Money::from_picos(100),
        Money::from_picos(30),
        std::time::SystemTime::now(),
    ));
    let key = "palisade:budget:{budget}:daily:ann";
    // each look is a round trip: the settlement, sent first, lands within a few
    let seen = account_once(&mut admin, key, |seen| seen.1 != "0").await;
    assert_eq!(seen, ("0".into(), "30".into()));
}

/// On a Cluster every key of the store carries its hash tag: the calls of a batch share
/// one slot, and one script call carries them.
#[tokio::test]
async fn reservations_and_settlements_batch_on_a_redis_cluster() {
    let cluster = support::RedisCluster::start()
        .await
        .expect("redis-server is installed");
    let client = redis::cluster::ClusterClient::new(cluster.urls()).unwrap();
    let mut admin = client.get_async_connection().await.unwrap();
    let store = Arc::new(
        RedisBudgetStore::new(client.get_async_connection().await.unwrap()).hash_tag("team"),
    );
    let budget = Arc::new(daily(7 * 40 + 6));
    let mut charges = vec![charge_of(&budget, "ann"); 60];
    for c in charges.iter_mut().skip(1).step_by(2) {
        *c = charge_of(&budget, "bob");
    }
    let granted = holds_at_once(&store, &charges, 7).await;
    assert_eq!(
        granted
            .iter()
            .filter(|g| matches!(g, Some(Some(_))))
            .count(),
        60
    );
    assert!(store.batched_calls() >= 50, "{}", store.batched_calls());
    // bob's are the odd ones
    let bobs: Vec<Hold> = granted
        .iter()
        .skip(1)
        .step_by(2)
        .map(|g| g.unwrap().unwrap())
        .collect();
    let ann = "palisade:budget:{team}:daily:ann";
    let bob = "palisade:budget:{team}:daily:bob";
    assert_eq!(account(&mut admin, ann).await, ("210".into(), "0".into()));
    settle_at_once(&store, &charge_of(&budget, "bob"), &bobs, 7, 7).await;
    assert_eq!(account(&mut admin, bob).await, ("0".into(), "210".into()));
    let refused = reserve_at_once(&store, &[charge_of(&budget, "bob")], 77).await;
    assert_eq!(refused, [Some(false)]);
}

/// A burst of requests through the layer: each reserves and settles, and the calls made
/// while the connection is busy share script calls, so the burst takes far fewer than the
/// two script calls per request it would one by one.
#[tokio::test]
async fn a_burst_of_requests_through_the_layer_shares_script_calls() {
    let server = support::RedisServer::start()
        .await
        .expect("redis-server is installed");
    let mut admin = manager(&server.url()).await;
    let layer = BudgetLayer::builder()
        .budget(daily(1_000_000))
        .store(RedisBudgetStore::new(manager(&server.url()).await))
        .build()
        .unwrap();
    let svc = layer.layer(service_fn(|req: Request<Full<Bytes>>| async move {
        let r = req.extensions().get::<BudgetReservation>().unwrap();
        r.settle(Money::from_picos(3));
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
    }));
    // the script is loaded, and the counts start from here
    assert_eq!(
        svc.clone()
            .oneshot(request("warm", 1))
            .await
            .unwrap()
            .status(),
        200
    );
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut admin)
        .await
        .unwrap();
    let requests = 200;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..requests {
        let svc = svc.clone();
        tasks.spawn(async move { svc.oneshot(request("ann", 5)).await.unwrap().status() });
    }
    while let Some(status) = tasks.join_next().await {
        assert_eq!(status.unwrap(), 200);
    }
    // settlements finish on background tasks: each look is a round trip behind them
    let key = "palisade:budget:{budget}:daily:ann";
    let seen = account_once(&mut admin, key, |seen| seen.0 == "0").await;
    assert_eq!(seen, ("0".into(), (3 * requests).to_string()));
    let evals = calls_of(&mut admin, "evalsha").await;
    assert!(
        evals * 4 <= 2 * requests,
        "{requests} requests took {evals} script calls"
    );
}

/// A settlement made and dropped on a thread outside any tokio runtime (a reservation
/// dropped there, say) still lands: the store sends it from the runtime it was made on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settlement_dropped_outside_a_runtime_still_lands() {
    use palisade::cost::budget::BudgetStore;
    let server = support::RedisServer::start()
        .await
        .expect("redis-server is installed");
    let mut admin = manager(&server.url()).await;
    let store = Arc::new(RedisBudgetStore::new(manager(&server.url()).await));
    let budget = Arc::new(daily(100));
    let ann = charge_of(&budget, "ann");
    let hold = hold_of(&store, &ann, 100).await;
    let outside = {
        let store = Arc::clone(&store);
        let ann = Arc::clone(&ann);
        std::thread::spawn(move || {
            assert!(tokio::runtime::Handle::try_current().is_err());
            drop(store.settle_hold(
                ann,
                hold,
                Money::from_picos(100),
                Money::from_picos(30),
                std::time::SystemTime::now(),
            ));
        })
    };
    outside.join().unwrap();
    let key = "palisade:budget:{budget}:daily:ann";
    let seen = account_once(&mut admin, key, |seen| seen.1 != "0").await;
    assert_eq!(seen, ("0".into(), "30".into()));
}

/// A settlement is all or nothing across the request's accounts: when one of them cannot
/// be settled (here it is not a hash), the call fails and the others keep their
/// reservation too, as the layer reports ("stays charged"), alone or in a batch.
#[tokio::test]
async fn a_settlement_that_fails_on_one_account_changes_none() {
    use palisade::cost::budget::BudgetStore;
    let server = support::RedisServer::start()
        .await
        .expect("redis-server is installed");
    let mut admin = manager(&server.url()).await;
    let store = Arc::new(RedisBudgetStore::new(manager(&server.url()).await));
    let charges: Arc<[palisade::cost::budget::Charge]> = Arc::from(vec![
        palisade::cost::budget::Charge {
            budget: Arc::new(daily(1000)),
            subject: "ann".into(),
        },
        palisade::cost::budget::Charge {
            budget: Arc::new(Budget::new(
                "monthly",
                Scope::User,
                Period::Month,
                Money::from_picos(1000),
            )),
            subject: "ann".into(),
        },
    ]);
    let hold = hold_of(&store, &charges, 100).await;
    let monthly = "palisade:budget:{budget}:monthly:ann";
    let _: () = redis::cmd("SET")
        .arg(monthly)
        .arg("not a hash")
        .query_async(&mut admin)
        .await
        .unwrap();
    let settled = store
        .settle_hold(
            Arc::clone(&charges),
            hold,
            Money::from_picos(100),
            Money::from_picos(30),
            std::time::SystemTime::now(),
        )
        .await;
    assert!(settled.is_err(), "{settled:?}");
    let daily_key = "palisade:budget:{budget}:daily:ann";
    assert_eq!(
        account(&mut admin, daily_key).await,
        ("100".into(), "0".into())
    );
}

/// Budget names and subjects with colons never share an account, as they do not in the
/// memory store: `daily` of `vip:ann` and `daily:vip` of `ann` are two accounts.
#[tokio::test]
async fn budget_names_and_subjects_with_colons_never_share_an_account() {
    let server = support::RedisServer::start()
        .await
        .expect("redis-server is installed");
    let store = Arc::new(RedisBudgetStore::new(manager(&server.url()).await));
    let daily_budget = Arc::new(daily(100));
    let vip = Arc::new(Budget::new(
        "daily:vip",
        Scope::User,
        Period::Day,
        Money::from_picos(100),
    ));
    assert_eq!(
        reserve_at_once(&store, &[charge_of(&daily_budget, "vip:ann")], 100).await,
        [Some(true)]
    );
    assert_eq!(
        reserve_at_once(&store, &[charge_of(&vip, "ann")], 100).await,
        [Some(true)]
    );
    assert_ne!(
        store.key(&charge_of(&daily_budget, "vip:ann")[0]),
        store.key(&charge_of(&vip, "ann")[0])
    );
    // names without a colon or a percent sign keep their keys
    assert_eq!(
        store.key(&charge_of(&daily_budget, "ann")[0]),
        "palisade:budget:{budget}:daily:ann"
    );
}

/// A request whose client goes away while its reservation is on its way to Redis: the
/// reservation, granted there, is released once its answer comes, not held until the
/// period ends.
#[tokio::test]
async fn a_request_dropped_while_its_reservation_is_in_flight_releases_it() {
    let server = support::RedisServer::start()
        .await
        .expect("redis-server is installed");
    let mut admin = manager(&server.url()).await;
    let layer = BudgetLayer::builder()
        .budget(daily(1000))
        .store(RedisBudgetStore::new(manager(&server.url()).await))
        .build()
        .unwrap();
    let svc = layer.layer(service_fn(|_req: Request<Full<Bytes>>| async move {
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
    }));
    // a burst of requests, each polled once (its reservation sent or queued) and dropped
    let users: Vec<String> = (0..20).map(|i| format!("user{i}")).collect();
    for user in &users {
        let mut call = std::pin::pin!(svc.clone().oneshot(request(user, 50)));
        let first =
            std::future::poll_fn(|cx| std::task::Poll::Ready(call.as_mut().poll(cx).is_pending()))
                .await;
        assert!(first, "the request waits for Redis");
    }
    // each account's hold appears with its reservation and is back to 0 once released
    for user in &users {
        let key = format!("palisade:budget:{{budget}}:daily:{user}");
        let reserved = || {
            let mut admin = admin.clone();
            let key = key.clone();
            async move { reserved_of(&mut admin, &key).await }
        };
        let mut seen = reserved().await;
        for _ in 0..1000 {
            if seen.as_deref() == Some("0") {
                break;
            }
            tokio::task::yield_now().await;
            seen = reserved().await;
        }
        assert_eq!(seen.as_deref(), Some("0"), "{user}");
        assert_eq!(account(&mut admin, &key).await.1, "0", "{user}");
    }
}

/// A rolling window longer than Redis can set an expiry for (a "lifetime" budget of
/// `Duration::MAX`) still counts: the account's expiry is capped, not refused by Redis.
#[tokio::test]
async fn a_rolling_budget_of_the_longest_window_counts_in_redis() {
    let server = support::RedisServer::start()
        .await
        .expect("redis-server is installed");
    let store = Arc::new(RedisBudgetStore::new(manager(&server.url()).await));
    let lifetime = Arc::new(Budget::new(
        "lifetime",
        Scope::User,
        Period::Rolling(Duration::MAX),
        Money::from_picos(100),
    ));
    let ann = charge_of(&lifetime, "ann");
    let hold = hold_of(&store, &ann, 60).await;
    settle_at_once(&store, &ann, &[hold], 60, 60).await;
    assert_eq!(
        reserve_at_once(&store, &[Arc::clone(&ann)], 60).await,
        [Some(false)]
    );
}

/// Until `check` holds (each look is a round trip to Redis), at most `secs` seconds of
/// real time: Redis keeps its own clock, which a paused tokio clock does not move.
async fn within<F, Fut>(secs: u64, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if check().await {
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        tokio::task::yield_now().await;
    }
}

/// A reservation answered after the connection's response timeout (Redis held up: here
/// its writes paused) failed for its caller, who holds nothing; once Redis runs it, its
/// hold lands too, and frees itself once its lifetime is over: the user can then spend
/// the whole budget again.
#[tokio::test]
async fn a_reservation_that_lands_after_its_timeout_is_not_held() {
    use palisade::cost::budget::BudgetStore;
    let server = support::RedisServer::start()
        .await
        .expect("redis-server is installed");
    let admin = manager(&server.url()).await;
    let store = Arc::new(
        RedisBudgetStore::new(manager(&server.url()).await).hold_ttl(Duration::from_secs(1)),
    );
    let budget = Arc::new(daily(1000));
    assert_eq!(
        reserve_at_once(&store, &[charge_of(&budget, "warm")], 1).await,
        [Some(true)]
    );
    let pause = |args: &'static [&'static str]| {
        let mut admin = admin.clone();
        async move {
            let _: () = redis::cmd("CLIENT")
                .arg(args)
                .query_async(&mut admin)
                .await
                .unwrap();
        }
    };
    pause(&["PAUSE", "60000", "WRITE"]).await;
    let ann = charge_of(&budget, "ann");
    let late = store
        .reserve(&ann, Money::from_picos(100), std::time::SystemTime::now())
        .await;
    assert!(late.is_err(), "{late:?}");
    pause(&["UNPAUSE"]).await;
    let key = "palisade:budget:{budget}:daily:ann";
    let reserved = || {
        let mut admin = admin.clone();
        async move { reserved_of(&mut admin, key).await }
    };
    // it ran in Redis after all, and holds its amount for a while
    assert!(
        within(20, || async { reserved().await.as_deref() == Some("100") }).await,
        "the late reservation lands"
    );
    assert_eq!(
        reserve_at_once(&store, std::slice::from_ref(&ann), 1000).await,
        [Some(false)],
        "held while its hold lives"
    );
    // at most two lifetimes later the hold is gone: the whole budget fits again
    let whole = || {
        let store = Arc::clone(&store);
        let ann = Arc::clone(&ann);
        async move { reserve_at_once(&store, std::slice::from_ref(&ann), 1000).await == [Some(true)] }
    };
    assert!(within(20, whole).await, "the late hold expires");
    assert_eq!(
        account(&mut admin.clone(), key).await,
        ("1000".into(), "0".into())
    );
}

/// Redis's clock, in milliseconds since the epoch.
async fn redis_now_ms(conn: &mut impl redis::aio::ConnectionLike) -> u64 {
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(conn).await.unwrap();
    secs * 1000 + micros / 1000
}

/// The holds of an account (fields `h<until_ms>`), sorted.
async fn holds_in(conn: &mut impl redis::aio::ConnectionLike, key: &str) -> Vec<(String, String)> {
    let fields: Vec<(String, String)> = redis::cmd("HGETALL")
        .arg(key)
        .query_async(conn)
        .await
        .unwrap();
    let mut holds: Vec<_> = fields
        .into_iter()
        .filter(|(f, _)| f.starts_with('h'))
        .collect();
    holds.sort();
    holds
}

/// A settlement of a live hold takes exactly its reservation off (amounts past what Lua's
/// doubles hold exactly) and leaves the others held in the same span.
#[tokio::test]
async fn a_settlement_of_a_live_hold_releases_exactly_it() {
    let server = support::RedisServer::start()
        .await
        .expect("redis-server is installed");
    let mut admin = manager(&server.url()).await;
    let store = Arc::new(RedisBudgetStore::new(manager(&server.url()).await));
    let limit = 20_000 * 1_000_000_000_000u128; // $20,000
    let budget = Arc::new(daily(limit));
    let ann = charge_of(&budget, "ann");
    let first = 9_007_199_254_740_993u128; // 2^53 + 1
    let second = 3_333_333_333_333_337u128;
    let hold = hold_of(&store, &ann, first).await;
    let other = hold_of(&store, &ann, second).await;
    let key = "palisade:budget:{budget}:daily:ann";
    assert_eq!(
        account(&mut admin, key).await,
        ((first + second).to_string(), "0".into())
    );
    settle_at_once(&store, &ann, &[hold], first, 1_234_567_890_123_457).await;
    assert_eq!(
        account(&mut admin, key).await,
        (second.to_string(), "1234567890123457".into())
    );
    settle_at_once(&store, &ann, &[other], second, second).await;
    assert_eq!(
        account(&mut admin, key).await,
        ("0".into(), (1_234_567_890_123_457 + second).to_string())
    );
}

/// A settlement that comes after its hold expired finds nothing to release: it leaves
/// every other hold as it is, and still charges the actual cost.
#[tokio::test]
async fn a_settlement_after_its_hold_expired_changes_no_hold_and_charges_the_actual_cost() {
    let server = support::RedisServer::start()
        .await
        .expect("redis-server is installed");
    let admin = manager(&server.url()).await;
    let store = Arc::new(
        RedisBudgetStore::new(manager(&server.url()).await).hold_ttl(Duration::from_millis(50)),
    );
    let budget = Arc::new(daily(1000));
    let ann = charge_of(&budget, "ann");
    let key = "palisade:budget:{budget}:daily:ann";
    let expired = hold_of(&store, &ann, 600).await;
    let until = expired.get();
    assert!(
        within(20, || {
            let mut admin = admin.clone();
            async move { redis_now_ms(&mut admin).await >= until }
        })
        .await,
        "Redis's clock passes the hold's end"
    );
    // the expired hold no longer counts: 900 fits beside nothing else held
    let live = hold_of(&store, &ann, 900).await;
    assert_ne!(live, expired);
    let mut conn = admin.clone();
    let before = holds_in(&mut conn, key).await;
    assert_eq!(before, [(format!("h{}", live.get()), "900".into())]);
    settle_at_once(&store, &ann, &[expired], 600, 70).await;
    assert_eq!(holds_in(&mut conn, key).await, before);
    assert_eq!(account(&mut conn, key).await, ("900".into(), "70".into()));
}

/// An account written before holds expired keeps its reserved amount in `r`: it counts
/// against reservations made now, and drains as its own reservations settle, while the
/// new holds stay apart from it.
#[tokio::test]
async fn a_legacy_reserved_amount_counts_and_drains() {
    use palisade::cost::budget::BudgetStore;
    let server = support::RedisServer::start()
        .await
        .expect("redis-server is installed");
    let mut admin = manager(&server.url()).await;
    let store = Arc::new(RedisBudgetStore::new(manager(&server.url()).await));
    let budget = Arc::new(daily(1000));
    let ann = charge_of(&budget, "ann");
    let key = "palisade:budget:{budget}:daily:ann";
    // as the earlier script left it: 400 reserved by an instance still running it
    let _: () = redis::cmd("HSET")
        .arg(key)
        .arg("r")
        .arg("400")
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(
        reserve_at_once(&store, &[Arc::clone(&ann)], 601).await,
        [Some(false)]
    );
    let hold = hold_of(&store, &ann, 600).await;
    assert_eq!(account(&mut admin, key).await, ("1000".into(), "0".into()));
    // the older instance settles its reservation (no hold): `r` drains, the hold stays
    store
        .settle(
            Arc::clone(&ann),
            Money::from_picos(400),
            Money::from_picos(100),
            std::time::SystemTime::now(),
        )
        .await
        .unwrap();
    let r: String = redis::cmd("HGET")
        .arg(key)
        .arg("r")
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(r, "0");
    assert_eq!(account(&mut admin, key).await, ("600".into(), "100".into()));
    assert_eq!(
        reserve_at_once(&store, &[Arc::clone(&ann)], 301).await,
        [Some(false)]
    );
    // and this instance's settlement takes its hold, never `r`
    settle_at_once(&store, &ann, &[hold], 600, 600).await;
    assert_eq!(account(&mut admin, key).await, ("0".into(), "700".into()));
    assert_eq!(
        reserve_at_once(&store, &[Arc::clone(&ann)], 300).await,
        [Some(true)]
    );
}

/// A hold longer than the account's expiry (a day budget's key expires two days after
/// its last write; `hold_ttl` may be longer) keeps the key alive while it lives, through
/// reservations and settlements alike: the key's expiry would free it early otherwise.
#[tokio::test]
async fn a_hold_longer_than_the_accounts_expiry_keeps_the_account() {
    let server = support::RedisServer::start()
        .await
        .expect("redis-server is installed");
    let mut admin = manager(&server.url()).await;
    let store = Arc::new(
        RedisBudgetStore::new(manager(&server.url()).await)
            .hold_ttl(Duration::from_secs(3 * 86_400)),
    );
    let budget = Arc::new(daily(1000));
    let ann = charge_of(&budget, "ann");
    let key = "palisade:budget:{budget}:daily:ann";
    let pttl = |mut conn: redis::aio::ConnectionManager| async move {
        let ttl: i64 = redis::cmd("PTTL")
            .arg(key)
            .query_async(&mut conn)
            .await
            .unwrap();
        ttl
    };
    let hold = hold_of(&store, &ann, 600).await;
    let other = hold_of(&store, &ann, 100).await;
    let left = |now: u64| i64::try_from(hold.get() - now).unwrap();
    let now = redis_now_ms(&mut admin).await;
    assert!(
        pttl(admin.clone()).await >= left(now) - 1000,
        "after the reservations"
    );
    settle_at_once(&store, &ann, &[other], 100, 100).await;
    let now = redis_now_ms(&mut admin).await;
    assert!(
        pttl(admin.clone()).await >= left(now) - 1000,
        "after a settlement"
    );
    assert_eq!(account(&mut admin, key).await, ("600".into(), "100".into()));
}

/// Two instances with different `hold_ttl` sharing an account: each reservation is held
/// in the span its own store computes (the same field when both end at once), and each
/// settlement releases exactly its own amount, on a rolling budget whose window fields sit
/// beside the holds.
#[tokio::test]
async fn instances_with_different_hold_lifetimes_share_an_account_exactly() {
    let server = support::RedisServer::start()
        .await
        .expect("redis-server is installed");
    let mut admin = manager(&server.url()).await;
    let short = Arc::new(
        RedisBudgetStore::new(manager(&server.url()).await).hold_ttl(Duration::from_secs(60)),
    );
    let long = Arc::new(
        RedisBudgetStore::new(manager(&server.url()).await).hold_ttl(Duration::from_secs(7200)),
    );
    let budget = Arc::new(Budget::new(
        "hourly",
        Scope::User,
        Period::Rolling(Duration::from_secs(3600)),
        Money::from_picos(1000),
    ));
    let ann = charge_of(&budget, "ann");
    let key = "palisade:budget:{budget}:hourly:ann";
    let a = hold_of(&short, &ann, 300).await;
    let b = hold_of(&long, &ann, 500).await;
    assert_ne!(a, b);
    assert_eq!(
        reserve_at_once(&short, std::slice::from_ref(&ann), 201).await,
        [Some(false)],
        "both holds count on either instance"
    );
    // each settles through the other instance: the hold says where the amount is
    settle_at_once(&long, &ann, &[a], 300, 120).await;
    assert_eq!(account(&mut admin, key).await, ("500".into(), "0".into()));
    settle_at_once(&short, &ann, &[b], 500, 480).await;
    assert_eq!(account(&mut admin, key).await, ("0".into(), "0".into()));
    assert_eq!(
        reserve_at_once(&long, std::slice::from_ref(&ann), 401).await,
        [Some(false)],
        "600 spent in the window"
    );
    assert_eq!(
        reserve_at_once(&long, std::slice::from_ref(&ann), 400).await,
        [Some(true)]
    );
}

/// A rolling account is made by the reservation that first writes it (its roll reads no
/// field): it expires from then on, so a reservation never settled (a lost answer, a
/// crashed instance) leaves no key in Redis for ever.
#[tokio::test]
async fn a_rolling_account_made_by_a_reservation_expires_unsettled() {
    let server = support::RedisServer::start()
        .await
        .expect("redis-server is installed");
    let mut admin = manager(&server.url()).await;
    let store = Arc::new(RedisBudgetStore::new(manager(&server.url()).await));
    let budget = Arc::new(Budget::new(
        "hourly",
        Scope::User,
        Period::Rolling(Duration::from_secs(3600)),
        Money::from_picos(1000),
    ));
    let _unsettled = hold_of(&store, &charge_of(&budget, "ann"), 300).await;
    let ttl: i64 = redis::cmd("PTTL")
        .arg("palisade:budget:{budget}:hourly:ann")
        .query_async(&mut admin)
        .await
        .unwrap();
    assert!(ttl > 0, "the account expires: {ttl}");
}
