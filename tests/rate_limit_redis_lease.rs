//! Local leases of the Redis store, against a real server: answers without a round trip,
//! never more admitted than the limit (one store, two stores), leases that end with their
//! window, refusals of a top-up asked again alone, GCRA rules never leased (each decision a
//! round trip, give-backs exact), shadow rules, resets, and the settings.
#![cfg(feature = "redis")]

mod support;

use std::sync::Arc;
use std::time::Duration;

use palisade::config::Env;
use palisade::rate_limit::algorithm::{Params, Verdict};
use palisade::rate_limit::store::{CheckItem, RuleDecision, Settlement};
use palisade::rate_limit::{
    Algorithm, Lease, Quota, RateKey, RedisConfigError, RedisFailMode, RedisStore,
    RedisStoreConfig, Store,
};
use support::RedisServer;

/// A window long enough that no test crosses an edge of a fixed window (2^40 µs, 12.7 days).
const LONG: Duration = Duration::from_micros(1 << 40);

fn params(algorithm: Algorithm, limit: u64) -> Params {
    Params::new(algorithm, Quota::new(limit, LONG))
}

/// One rule of a request, owned so a task can carry it.
#[derive(Clone)]
struct Owned {
    name: &'static str,
    key: RateKey,
    params: Params,
    cost: u64,
    shadow: bool,
}

impl Owned {
    fn new(name: &'static str, user: &str, params: Params) -> Self {
        Self {
            name,
            key: RateKey::principal(user),
            params,
            cost: 1,
            shadow: false,
        }
    }

    fn item(&self) -> CheckItem<'_> {
        CheckItem {
            rule_index: 0,
            rule: self.name,
            key: &self.key,
            params: self.params,
            cost: self.cost,
            shadow: self.shadow,
        }
    }

    fn costing(&self, cost: u64) -> Self {
        Self {
            cost,
            ..self.clone()
        }
    }
}

fn unique(tag: &str) -> String {
    format!("t{}:{tag}", rand::random::<u32>())
}

async fn leased(url: &str, prefix: &str, lease: Lease) -> RedisStore {
    RedisStore::builder()
        .url(url)
        .prefix(prefix)
        .timeout(Duration::from_secs(2))
        .lease(lease)
        .build()
        .await
        .unwrap()
}

async fn exact(url: &str, prefix: &str) -> RedisStore {
    RedisStore::builder()
        .url(url)
        .prefix(prefix)
        .timeout(Duration::from_secs(2))
        .build()
        .await
        .unwrap()
}

/// `INFO commandstats` calls of `EVALSHA` on one server.
async fn evalsha(url: &str) -> u64 {
    let mut conn = redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
        .map_or(0, |rest| rest.split(',').next().unwrap().parse().unwrap())
}

/// What Redis has left for a rule (a peek through a store without leases).
async fn redis_remaining(store: &RedisStore, rule: &Owned) -> u64 {
    store.peek(&rule.item()).await.unwrap().remaining
}

async fn admit(store: &RedisStore, rules: &[&Owned]) -> bool {
    let items: Vec<CheckItem<'_>> = rules.iter().map(|r| r.item()).collect();
    store.check(&items).await.unwrap().admitted
}

/// One decision takes a lease of 10 units beside its own; the next 10 are answered here,
/// without a script call, and so are they when Redis is gone (failing closed).
#[tokio::test]
async fn a_lease_answers_without_a_round_trip_even_when_redis_is_gone() {
    let mut server = RedisServer::start().await.expect("redis-server");
    let store = leased(&server.url(), &unique("rt"), Lease::units(100)).await;
    let rule = Owned::new("chat", "u1", params(Algorithm::FixedWindow, 1_000));
    let first = store.check(&[rule.item()]).await.unwrap();
    assert!(first.admitted);
    // 1 for the request and 10 leased were debited; the request is told what it leaves
    assert_eq!(first.rules[0].remaining, 999);
    let calls = evalsha(&server.url()).await;
    for n in 1..=10 {
        let d = store.check(&[rule.item()]).await.unwrap();
        assert!(d.admitted && d.rules[0].debited);
        assert_eq!(d.rules[0].remaining, 999 - n);
        assert_eq!(d.rules[0].window_start, first.rules[0].window_start);
    }
    assert_eq!(evalsha(&server.url()).await, calls);
    assert_eq!(store.health().lease_answers, 10);
    // the 12th asks Redis (and takes the next lease), then Redis goes away
    assert!(admit(&store, &[&rule]).await);
    assert_eq!(evalsha(&server.url()).await, calls + 1);
    server.kill();
    for _ in 0..10 {
        assert!(admit(&store, &[&rule]).await, "a live lease answers");
    }
    let err = store.check(&[rule.item()]).await;
    assert!(
        err.is_err(),
        "past the lease, the failure mode (closed): {err:?}"
    );
    assert_eq!(store.health().lease_answers, 20);
}

/// Through the layer: a one-rule layer (its lean path asks `check_one_now`) and a
/// two-rule one are answered from leases, one script call for 11 requests, and the
/// rate-limit headers count the leased units as remaining.
#[tokio::test]
async fn the_layer_is_answered_from_leases() {
    use http::{Request, Response};
    use palisade::rate_limit::{KeySource, RateLimitLayer, Rule};
    use tower::{Layer, ServiceExt, service_fn};

    let server = RedisServer::start().await.expect("redis-server");
    let ok = service_fn(|_req: Request<()>| async {
        Ok::<_, std::convert::Infallible>(Response::new(
            http_body_util::Empty::<bytes::Bytes>::new(),
        ))
    });
    let store = leased(&server.url(), &unique("layer"), Lease::units(100)).await;
    let one = RateLimitLayer::builder()
        .store(store.clone())
        .rule(Rule::new("global", Quota::per_minute(1_000)).key(KeySource::Global))
        .build()
        .unwrap()
        .layer(ok);
    let two = RateLimitLayer::builder()
        .store(store.clone())
        .rule(Rule::new("per-key", Quota::per_minute(1_000)).key(KeySource::ApiKey))
        .rule(Rule::new("all", Quota::per_minute(5_000)).key(KeySource::Global))
        .build()
        .unwrap()
        .layer(ok);
    let request = || {
        Request::post("/v1/messages")
            .header("x-api-key", "sk-test-1")
            .body(())
            .unwrap()
    };
    let calls = evalsha(&server.url()).await;
    for _ in 0..11 {
        assert_eq!(one.clone().oneshot(request()).await.unwrap().status(), 200);
    }
    assert_eq!(evalsha(&server.url()).await, calls + 1);
    let calls = evalsha(&server.url()).await;
    let mut last = None;
    for _ in 0..11 {
        let response = two.clone().oneshot(request()).await.unwrap();
        assert_eq!(response.status(), 200);
        last = Some(response);
    }
    assert_eq!(evalsha(&server.url()).await, calls + 1);
    assert_eq!(store.health().lease_answers, 20);
    // the last request leaves 1,000 - 11 units of the per-key rule (10 of them leased here)
    let headers = last.unwrap().headers().clone();
    let ratelimit = headers
        .get("ratelimit")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    assert!(ratelimit.contains("r=989"), "{ratelimit}");
}

/// A decision the local fallback store made never takes a lease: with Redis down from the
/// start, no decision is answered from one.
#[tokio::test]
async fn the_local_fallback_never_creates_a_lease() {
    let mut server = RedisServer::start().await.expect("redis-server");
    let url = server.url();
    server.kill();
    let store = RedisStore::builder()
        .url(url)
        .prefix(unique("fallback"))
        .timeout(Duration::from_millis(200))
        .on_failure(RedisFailMode::Local)
        .lease(Lease::units(100))
        .build()
        .await
        .unwrap();
    let rule = Owned::new("chat", "u1", params(Algorithm::FixedWindow, 1_000));
    for _ in 0..5 {
        assert!(admit(&store, &[&rule]).await);
    }
    let health = store.health();
    assert_eq!(health.lease_answers, 0);
    assert_eq!(health.degraded_decisions, 5);
}

/// `tasks × each` concurrent requests of one unit through `stores` (task `i` through
/// `stores[i % len]`); the number admitted.
async fn race(stores: &[RedisStore], rule: &Owned, tasks: usize, each: usize) -> usize {
    let gate = Arc::new(tokio::sync::Barrier::new(tasks));
    let mut handles = Vec::new();
    for t in 0..tasks {
        let store = stores[t % stores.len()].clone();
        let rule = rule.clone();
        let gate = gate.clone();
        handles.push(tokio::spawn(async move {
            gate.wait().await;
            let mut admitted = 0;
            for _ in 0..each {
                let d = store.check(&[rule.item()]).await.expect("Redis decides");
                assert_eq!(d.rules[0].debited, d.admitted);
                admitted += usize::from(d.admitted);
            }
            admitted
        }));
    }
    let mut admitted = 0;
    for h in handles {
        admitted += h.await.unwrap();
    }
    admitted
}

/// Through one store, 8 tasks × 250 requests against a limit of 1,000 with leases of 10
/// units (1 %, which divides it): exactly the limit is admitted, for each algorithm (no
/// leased unit is lost within one instance); GCRA is decided in Redis alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leased_decisions_admit_exactly_the_limit_through_one_store() {
    let server = RedisServer::start().await.expect("redis-server");
    let lease = Lease::units(100).max_age(Duration::from_secs(120));
    for algorithm in [
        Algorithm::FixedWindow,
        Algorithm::SlidingWindow,
        Algorithm::Gcra,
    ] {
        let store = leased(&server.url(), &unique("one"), lease).await;
        let rule = Owned::new("chat", "hot", params(algorithm, 1_000));
        let admitted = race(std::slice::from_ref(&store), &rule, 8, 250).await;
        assert_eq!(admitted, 1_000, "{algorithm:?}");
        let health = store.health();
        if algorithm == Algorithm::Gcra {
            assert_eq!(health.lease_answers, 0, "{health:?}");
            assert_eq!(health.leased_keys, 0, "{health:?}");
        } else {
            assert!(health.lease_answers > 500, "{health:?}");
        }
    }
}

/// Two stores sharing one server, both leasing: never more than the limit, and at most one
/// lease per store left unused (GCRA, never leased: exactly the limit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_leasing_stores_sharing_one_redis_never_admit_more_than_the_limit() {
    let server = RedisServer::start().await.expect("redis-server");
    let prefix = unique("two");
    let lease = Lease::units(100).max_age(Duration::from_secs(120));
    let stores = [
        leased(&server.url(), &prefix, lease).await,
        leased(&server.url(), &prefix, lease).await,
    ];
    for algorithm in [
        Algorithm::FixedWindow,
        Algorithm::SlidingWindow,
        Algorithm::Gcra,
    ] {
        let rule = Owned::new("chat", &format!("{algorithm:?}"), params(algorithm, 1_000));
        let admitted = race(&stores, &rule, 8, 250).await;
        assert!(admitted <= 1_000, "{algorithm:?}: {admitted}");
        assert!(admitted >= 1_000 - 2 * 10 - 1, "{algorithm:?}: {admitted}");
        if algorithm == Algorithm::Gcra {
            assert_eq!(admitted, 1_000);
        }
    }
}

/// With explicit times, a fixed window's lease taken a second before the window ends
/// answers within it, and not past its end: the next decision asks Redis, in the new
/// window.
#[tokio::test]
async fn a_lease_ends_with_the_window_it_was_taken_in() {
    let server = RedisServer::start().await.expect("redis-server");
    let store = leased(
        &server.url(),
        &unique("edge"),
        Lease::units(100).max_age(Duration::from_secs(3_600)),
    )
    .await;
    let rule = Owned::new(
        "chat",
        "u1",
        Params::new(Algorithm::FixedWindow, Quota::per_minute(1_000)),
    );
    // a minute's edge
    let edge = 28_333_334 * 60_000_000u64;
    let first = store
        .check_at(&[rule.item()], edge - 1_000_000)
        .await
        .unwrap();
    assert!(first.admitted);
    let calls = evalsha(&server.url()).await;
    let within = store.check_at(&[rule.item()], edge - 1).await.unwrap();
    assert!(within.admitted);
    assert_eq!(within.rules[0].remaining, 1_000 - 11 + 9);
    assert_eq!(evalsha(&server.url()).await, calls);
    // past the edge: Redis decides, in the new window (its count starts again)
    let after = store.check_at(&[rule.item()], edge).await.unwrap();
    assert!(after.admitted);
    assert_eq!(evalsha(&server.url()).await, calls + 1);
    assert_eq!(after.rules[0].window_start, edge);
    assert_eq!(after.rules[0].remaining, 999);
}

/// GCRA rules are never leased: with leases on, every decision of a GCRA rule, alone or in
/// a group with a leased window rule, is a script call, and each answer is exactly that of
/// a store without leases (refusals, what remains, reservation ends).
#[tokio::test]
async fn a_gcra_rule_is_never_leased_and_every_decision_is_a_round_trip() {
    let server = RedisServer::start().await.expect("redis-server");
    let lease = Lease::units(100)
        .share(0.1)
        .max_age(Duration::from_secs(60));
    // no cache of blocked keys: every decision of either store goes to Redis
    let build = |prefix: String, lease: Option<Lease>| {
        let builder = RedisStore::builder()
            .url(server.url())
            .prefix(prefix)
            .timeout(Duration::from_secs(2))
            .blocked_cache(0);
        async move {
            match lease {
                Some(lease) => builder.lease(lease),
                None => builder,
            }
            .build()
            .await
            .unwrap()
        }
    };
    let store = build(unique("never"), Some(lease)).await;
    let plain = build(unique("never-plain"), None).await;
    // 100 a second, a burst of 100: a unit drains in 10 ms
    let gcra = Owned::new(
        "chat",
        "u1",
        Params::new(Algorithm::Gcra, Quota::per_second(100)),
    );
    let t = 1u64 << 45;
    // 1 to 3 units every 5 ms: faster than the bucket drains, so it fills and refuses
    let mut refused = 0;
    for step in 0..150u64 {
        let rule = gcra.costing(1 + step % 3);
        let now = t + step * 5_000;
        let calls = evalsha(&server.url()).await;
        let a = store.check_at(&[rule.item()], now).await.unwrap();
        let after = evalsha(&server.url()).await;
        let b = plain.check_at(&[rule.item()], now).await.unwrap();
        assert_eq!(a, b, "step {step}");
        assert_eq!(after, calls + 1, "step {step}: not a round trip");
        refused += usize::from(!a.admitted);
    }
    assert!(refused > 10, "{refused}");
    let (h, p) = (store.health(), plain.health());
    assert_eq!(h.round_trips, p.round_trips, "{h:?} {p:?}");
    assert_eq!((h.lease_answers, h.leased_keys), (0, 0), "{h:?}");

    // beside a window rule that is leased, the group still goes to Redis every time
    let window = Owned::new("day", "u2", params(Algorithm::FixedWindow, 100_000));
    let gcra = Owned::new("chat", "u2", params(Algorithm::Gcra, 100_000));
    let calls = evalsha(&server.url()).await;
    for _ in 0..20 {
        assert!(admit(&store, &[&window, &gcra]).await);
    }
    assert_eq!(evalsha(&server.url()).await, calls + 20);
    assert_eq!(store.health().lease_answers, 0);
    // the window rule alone is answered from its lease
    assert!(admit(&store, &[&window]).await);
    assert_eq!(evalsha(&server.url()).await, calls + 20);
    assert_eq!(store.health().lease_answers, 1);
}

/// Near the end of a quota, Redis refuses the request with its top-up: the store asks
/// again for the request alone (admitted), does not cache the refusal, and asks no top-up
/// for that key until its window ends, so each later request is one round trip.
#[tokio::test]
async fn a_refused_top_up_is_asked_again_alone_and_not_cached() {
    let server = RedisServer::start().await.expect("redis-server");
    let prefix = unique("refused");
    let other = exact(&server.url(), &prefix).await;
    let store = leased(&server.url(), &prefix, Lease::units(100)).await;
    let rule = Owned::new("chat", "u1", params(Algorithm::FixedWindow, 1_000));
    // another instance spends all but 5
    assert!(admit(&other, &[&rule.costing(995)]).await);
    let calls = evalsha(&server.url()).await;
    let d = store.check(&[rule.item()]).await.unwrap();
    assert!(d.admitted, "{d:?}");
    assert_eq!(d.rules[0].remaining, 4);
    assert_eq!(evalsha(&server.url()).await, calls + 2);
    assert_eq!(store.health().blocked_keys, 0);
    // leasing is off for the key: one round trip a request
    for left in (0..4).rev() {
        let d = store.check(&[rule.item()]).await.unwrap();
        assert!(d.admitted);
        assert_eq!(d.rules[0].remaining, left);
    }
    assert_eq!(evalsha(&server.url()).await, calls + 6);
    // exhausted: refused, then by the blocked cache alone
    assert!(!admit(&store, &[&rule]).await);
    assert!(!admit(&store, &[&rule]).await);
    assert_eq!(evalsha(&server.url()).await, calls + 6);
    assert_eq!(store.health().blocked_cache_hits, 2);
    assert_eq!(redis_remaining(&other, &rule).await, 0);
}

/// A cost above what the lease has left goes to Redis with a top-up that fills the lease
/// back to its size; the lease's old units stay usable (same window), and what the
/// decision reports counts them.
#[tokio::test]
async fn a_cost_above_the_lease_asks_redis_and_keeps_the_old_units() {
    let server = RedisServer::start().await.expect("redis-server");
    let prefix = unique("cost");
    let store = leased(&server.url(), &prefix, Lease::units(100)).await;
    let peeker = exact(&server.url(), &prefix).await;
    let rule = Owned::new("chat", "u1", params(Algorithm::FixedWindow, 1_000));
    assert!(admit(&store, &[&rule]).await); // 1 + 10 leased
    for _ in 0..7 {
        assert!(admit(&store, &[&rule]).await); // 3 leased left
    }
    let calls = evalsha(&server.url()).await;
    let d = store.check(&[rule.costing(5).item()]).await.unwrap();
    assert!(d.admitted);
    assert_eq!(evalsha(&server.url()).await, calls + 1);
    // Redis: 11 + 5 + 7 debited; this instance holds 3 + 7 of them (one lease's size)
    assert_eq!(redis_remaining(&peeker, &rule).await, 1_000 - 23);
    assert_eq!(d.rules[0].remaining, 1_000 - 23 + 10);
    let calls = evalsha(&server.url()).await; // the peek was one
    for _ in 0..10 {
        assert!(admit(&store, &[&rule]).await);
    }
    assert_eq!(evalsha(&server.url()).await, calls);
    assert!(admit(&store, &[&rule]).await);
    assert_eq!(evalsha(&server.url()).await, calls + 1);
}

/// A rule whose 1 % share is below 2 units is never leased: every decision is exact and
/// one round trip.
#[tokio::test]
async fn a_rule_with_a_small_limit_is_never_leased() {
    let server = RedisServer::start().await.expect("redis-server");
    let store = leased(&server.url(), &unique("small"), Lease::units(100)).await;
    let rule = Owned::new("chat", "u1", params(Algorithm::SlidingWindow, 150));
    let calls = evalsha(&server.url()).await;
    let mut admitted = 0;
    for _ in 0..150 {
        let d = store.check(&[rule.item()]).await.unwrap();
        assert!(d.admitted);
        admitted += 1;
        assert_eq!(d.rules[0].remaining, 150 - admitted);
    }
    assert_eq!(evalsha(&server.url()).await, calls + 150);
    assert!(!admit(&store, &[&rule]).await);
    assert_eq!(store.health().lease_answers, 0);
}

/// A reset drops this store's lease of the key: the next decision asks Redis and sees the
/// fresh state.
#[tokio::test]
async fn a_reset_drops_the_lease() {
    let server = RedisServer::start().await.expect("redis-server");
    let store = leased(&server.url(), &unique("reset"), Lease::units(100)).await;
    let rule = Owned::new("chat", "u1", params(Algorithm::FixedWindow, 1_000));
    assert!(admit(&store, &[&rule]).await);
    assert!(admit(&store, &[&rule]).await); // from the lease
    store.reset(0, rule.name, &rule.key).await.unwrap();
    let calls = evalsha(&server.url()).await;
    let d = store.check(&[rule.item()]).await.unwrap();
    assert!(d.admitted);
    assert_eq!(evalsha(&server.url()).await, calls + 1);
    assert_eq!(d.rules[0].remaining, 999);
    assert_eq!(d.rules[0].generation, 1);
}

/// A GCRA reservation made through a leasing store is Redis's own: its reservation end is
/// the bucket's, and give-backs through the store (one larger than its reservation too)
/// refund exactly what they refund through a store without leases.
#[tokio::test]
async fn a_gcra_give_back_through_a_leasing_store_is_exact() {
    let server = RedisServer::start().await.expect("redis-server");
    let store = leased(&server.url(), &unique("gcra"), Lease::units(100)).await;
    let plain = exact(&server.url(), &unique("gcra-plain")).await;
    // a unit is exactly a second of the timeline
    let rule = Owned::new(
        "chat",
        "u1",
        Params::new(
            Algorithm::Gcra,
            Quota::new(1_000, Duration::from_secs(1_000)),
        ),
    );
    let p = rule.params;
    let t = 1u64 << 45;
    let settle = |d: &RuleDecision, delta| Settlement {
        rule_index: 0,
        rule: rule.name,
        key: &rule.key,
        params: p,
        window_start: d.window_start,
        generation: d.generation,
        reservation_end: d.reservation_end,
        delta,
    };
    let mut remaining = Vec::new();
    for s in [&store, &plain] {
        let a = s
            .check_at(&[rule.costing(5).item()], t)
            .await
            .unwrap()
            .rules[0];
        let b = s
            .check_at(&[rule.costing(3).item()], t)
            .await
            .unwrap()
            .rules[0];
        assert!(a.debited && b.debited);
        let peek = s.peek_at(&rule.item(), t).await.unwrap();
        assert_eq!(peek.remaining, 992);
        assert_eq!(b.reservation_end, peek.reservation_end, "b ends at the TAT");
        assert!(a.reservation_end < b.reservation_end);
        // b gives its 3 units back: Redis has them again
        s.settle_at(&[settle(&b, -3)], t + 1).await.unwrap();
        let after_b = s.peek_at(&rule.item(), t + 1).await.unwrap().remaining;
        assert_eq!(after_b, 995);
        // a asks back far more than its 5 units
        s.settle_at(&[settle(&a, -50)], t + 2).await.unwrap();
        let after_a = s.peek_at(&rule.item(), t + 2).await.unwrap().remaining;
        assert!(after_a <= 1_000, "{after_a}");
        remaining.push((after_b, after_a));
    }
    assert_eq!(remaining[0], remaining[1]);
    assert_eq!(store.health().lease_answers, 0);
}

/// A shadow rule is leased like the others; when its top-up is refused while the group is
/// admitted, it is asked again alone, so its verdict describes the request.
#[tokio::test]
async fn a_shadow_rule_is_leased_and_its_refused_top_up_is_asked_again() {
    let server = RedisServer::start().await.expect("redis-server");
    let prefix = unique("shadow");
    let store = leased(&server.url(), &prefix, Lease::units(100)).await;
    let other = exact(&server.url(), &prefix).await;
    let enforced = Owned::new("chat", "u1", params(Algorithm::FixedWindow, 1_000));
    let shadow = Owned {
        shadow: true,
        ..Owned::new("trial", "u1", params(Algorithm::FixedWindow, 1_000))
    };
    // the shadow rule has 5 left
    assert!(admit(&other, &[&shadow.costing(995)]).await);
    let calls = evalsha(&server.url()).await;
    let d = store
        .check(&[enforced.item(), shadow.item()])
        .await
        .unwrap();
    assert!(d.admitted);
    assert!(
        d.rules[1].verdict.is_allowed() && d.rules[1].debited,
        "{d:?}"
    );
    assert_eq!(d.rules[1].remaining, 4);
    assert_eq!(evalsha(&server.url()).await, calls + 2);
    assert_eq!(redis_remaining(&other, &shadow).await, 4);
    assert_eq!(redis_remaining(&other, &enforced).await, 1_000 - 11);
    // a shadow rule with its own lease answers from it with the enforced one
    let shadow2 = Owned {
        shadow: true,
        ..Owned::new("trial2", "u1", params(Algorithm::FixedWindow, 1_000))
    };
    let enforced2 = Owned::new("chat2", "u1", params(Algorithm::FixedWindow, 1_000));
    assert!(admit(&store, &[&enforced2, &shadow2]).await);
    let calls = evalsha(&server.url()).await;
    let d = store
        .check(&[enforced2.item(), shadow2.item()])
        .await
        .unwrap();
    assert!(d.admitted && d.rules[1].debited);
    assert_eq!(d.rules[1].verdict, Verdict::Allowed);
    assert_eq!(evalsha(&server.url()).await, calls);
}

#[tokio::test]
async fn bad_lease_settings_are_refused_with_typed_errors() {
    for bad in [
        Lease::units(0),
        Lease::units(100).share(0.0),
        Lease::units(100).share(1.01),
        Lease::units(100).share(-0.5),
        Lease::units(100).max_age(Duration::ZERO),
        Lease::units(100).entries(0),
    ] {
        let err = RedisStore::builder()
            .url("redis://127.0.0.1:1/")
            .lease(bad)
            .build()
            .await
            .unwrap_err();
        assert!(
            matches!(err, RedisConfigError::InvalidLease { .. }),
            "{err}"
        );
    }
    // from a file's settings: a share without units does nothing, and is refused
    let mut config = RedisStoreConfig::default();
    config.url = Some("redis://127.0.0.1:1/".into());
    config.lease_share = Some(0.05);
    let err = RedisStore::from_config(config).await.unwrap_err();
    assert!(err.to_string().contains("lease_units"), "{err}");
}

#[tokio::test]
async fn lease_settings_are_read_from_the_environment() {
    let mut env = Env::from_pairs([
        ("PALISADE_RATE_LIMIT_REDIS_URL", "redis://127.0.0.1:1/"),
        ("PALISADE_RATE_LIMIT_REDIS_LEASE_UNITS", "100"),
        ("PALISADE_RATE_LIMIT_REDIS_LEASE_SHARE", "0.05"),
        ("PALISADE_RATE_LIMIT_REDIS_LEASE_MAX_AGE", "250ms"),
        ("PALISADE_RATE_LIMIT_REDIS_LEASE_ENTRIES", "500"),
    ]);
    let config = RedisStoreConfig::from_env(&mut env);
    env.finish().unwrap();
    assert_eq!(config.lease_units, 100);
    assert_eq!(config.lease_share, Some(0.05));
    assert_eq!(config.lease_max_age, Some(Duration::from_millis(250)));
    assert_eq!(config.lease_entries, Some(500));
    let lease = config.lease().unwrap().unwrap();
    assert_eq!(
        lease,
        Lease::units(100)
            .share(0.05)
            .max_age(Duration::from_millis(250))
            .entries(500)
    );
    RedisStore::from_config(config).await.unwrap();

    // off by default
    let mut env = Env::from_pairs([("PALISADE_RATE_LIMIT_REDIS_URL", "redis://127.0.0.1:1/")]);
    let config = RedisStoreConfig::from_env(&mut env);
    env.finish().unwrap();
    assert_eq!(config.lease().unwrap(), None);

    // every problem at once: a share out of range, an age below 1ms, entries of 0, and
    // settings that do nothing while the units are 0
    let mut env = Env::from_pairs([
        ("PALISADE_RATE_LIMIT_REDIS_LEASE_UNITS", "lots"),
        ("PALISADE_RATE_LIMIT_REDIS_LEASE_SHARE", "5"),
        ("PALISADE_RATE_LIMIT_REDIS_LEASE_MAX_AGE", "0s"),
        ("PALISADE_RATE_LIMIT_REDIS_LEASE_ENTRIES", "0"),
    ]);
    let _ = RedisStoreConfig::from_env(&mut env);
    let problems = env.finish().unwrap_err();
    assert_eq!(problems.problems().len(), 4, "{problems}");
    let mut env = Env::from_pairs([
        ("PALISADE_RATE_LIMIT_REDIS_LEASE_SHARE", "0.05"),
        ("PALISADE_RATE_LIMIT_REDIS_LEASE_MAX_AGE", "2s"),
    ]);
    let _ = RedisStoreConfig::from_env(&mut env);
    let problems = env.finish().unwrap_err();
    assert_eq!(problems.problems().len(), 2, "{problems}");
    assert!(
        problems
            .to_string()
            .contains("PALISADE_RATE_LIMIT_REDIS_LEASE_UNITS"),
        "{problems}"
    );
}

mod props {
    //! Random sequences through two leasing stores on one server, at explicit times: what
    //! they admit together stays within what the algorithm allows, request by request.

    use std::sync::atomic::{AtomicU64, Ordering};

    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};

    use super::*;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    fn params() -> impl Strategy<Value = Params> {
        (
            0u8..4,
            20u64..400,
            prop_oneof![Just(1_000_000u64), Just(60_000_000)],
            1u64..3,
        )
            .prop_map(|(alg, limit, window, burst_factor)| Params {
                algorithm: match alg {
                    0 | 1 => Algorithm::SlidingWindow,
                    2 => Algorithm::FixedWindow,
                    _ => Algorithm::Gcra,
                },
                limit,
                window,
                burst: limit * burst_factor,
                strict: alg == 1,
            })
    }

    /// (store, cost, µs since the previous request)
    fn steps(window: u64) -> impl Strategy<Value = Vec<(usize, u64, u64)>> {
        prop::collection::vec(
            (
                0usize..2,
                prop_oneof![Just(1u64), 1u64..9],
                prop_oneof![0u64..1_000, 0..window / 4],
            ),
            1..150,
        )
    }

    /// Whether `admitted` ((time, cost), in order) stays within what `p` allows.
    fn within(p: &Params, admitted: &[(u64, u64)]) -> Result<(), String> {
        let (l, w) = (u128::from(p.limit), u128::from(p.window));
        let window_of = |t: u64| t - t % p.window;
        match p.algorithm {
            Algorithm::FixedWindow => {
                let mut per = std::collections::BTreeMap::<u64, u64>::new();
                for &(t, c) in admitted {
                    *per.entry(window_of(t)).or_default() += c;
                }
                match per.iter().find(|(_, n)| **n > p.limit) {
                    Some((start, n)) => Err(format!("{n} units in the window at {start}")),
                    None => Ok(()),
                }
            }
            Algorithm::SlidingWindow => {
                // at each admission: the current window's units so far, plus the previous
                // window's weighted as the script weighs them (strict: all of them)
                for (i, &(t, _)) in admitted.iter().enumerate() {
                    let start = window_of(t);
                    let (mut count, mut prev) = (0u64, 0u64);
                    for &(u, c) in &admitted[..=i] {
                        if window_of(u) == start {
                            count += c;
                        } else if window_of(u) + p.window == start {
                            prev += c;
                        }
                    }
                    let weighted = if p.strict {
                        u128::from(prev)
                    } else {
                        let elapsed = u128::from((t - start).min(p.window - 1));
                        (u128::from(prev) * (w - elapsed)).div_ceil(w)
                    };
                    if u128::from(count) + weighted > l {
                        return Err(format!("{count} + {weighted} weighted units at {t}"));
                    }
                }
                Ok(())
            }
            Algorithm::Gcra => {
                // a conforming stream: the units of any span [a, b] take at most the span
                // plus the burst's tolerance to emit
                let tolerance = (u128::from(p.burst) * w).div_ceil(l);
                for (i, &(a, _)) in admitted.iter().enumerate() {
                    let mut units = 0u128;
                    for &(b, c) in &admitted[i..] {
                        units += u128::from(c);
                        if units * w > (u128::from(b - a) + tolerance) * l {
                            return Err(format!("{units} units between {a} and {b}"));
                        }
                    }
                }
                Ok(())
            }
        }
    }

    static LEASED: AtomicU64 = AtomicU64::new(0);

    async fn run(
        server: &RedisServer,
        p: Params,
        steps: &[(usize, u64, u64)],
        t0: u64,
    ) -> Result<(), TestCaseError> {
        let prefix = unique("prop");
        let lease = Lease::units(50).share(0.1).max_age(Duration::from_secs(2));
        let stores = [
            leased(&server.url(), &prefix, lease).await,
            leased(&server.url(), &prefix, lease).await,
        ];
        let key = RateKey::principal("u");
        let mut t = t0;
        let mut admitted = Vec::new();
        for &(s, cost, dt) in steps {
            t += dt;
            let item = CheckItem {
                rule_index: 0,
                rule: "r",
                key: &key,
                params: p,
                cost,
                shadow: false,
            };
            let d = stores[s].check_at(&[item], t).await.unwrap();
            prop_assert_eq!(d.rules[0].debited, d.admitted);
            if d.admitted {
                admitted.push((t, cost));
            }
        }
        for s in &stores {
            LEASED.fetch_add(s.health().lease_answers, Ordering::Relaxed);
        }
        within(&p, &admitted).map_err(|e| TestCaseError::fail(format!("{p:?}: {e}")))
    }

    #[test]
    fn leasing_stores_never_admit_more_than_the_algorithm_allows() {
        let rt = rt();
        let server = rt
            .block_on(RedisServer::start())
            .expect("redis-server is required");
        let mut runner = TestRunner::new(Config {
            cases: std::env::var("PROPTEST_CASES")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(64),
            failure_persistence: None,
            ..Config::default()
        });
        let strategy = params().prop_flat_map(|p| (Just(p), steps(p.window), 0u64..(1 << 48)));
        runner
            .run(&strategy, |(p, steps, t0)| {
                rt.block_on(run(&server, p, &steps, t0))
            })
            .unwrap();
        assert!(LEASED.load(Ordering::Relaxed) > 0, "no lease answered");
    }
}
