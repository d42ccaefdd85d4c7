//! Local leases of the Redis store against a real server, at the edges: GCRA give-backs
//! through either instance never letting more than the burst pass (GCRA rules are never
//! leased), and a lease topped up by requests larger than it holds.
#![cfg(feature = "redis")]

mod support;

use std::time::Duration;

use palisade::rate_limit::algorithm::Params;
use palisade::rate_limit::store::CheckItem;
use palisade::rate_limit::{Algorithm, Lease, Quota, RateKey, RedisStore, Store};
use support::RedisServer;

/// A window long enough that no test crosses an edge of a fixed window (2^40 µs, 12.7 days).
const LONG: Duration = Duration::from_micros(1 << 40);

fn unique(tag: &str) -> String {
    format!("t{}:{tag}", rand::random::<u32>())
}

async fn store(url: &str, prefix: &str, lease: Option<Lease>) -> RedisStore {
    let builder = RedisStore::builder()
        .url(url)
        .prefix(prefix)
        .timeout(Duration::from_secs(2));
    match lease {
        Some(lease) => builder.lease(lease),
        None => builder,
    }
    .build()
    .await
    .unwrap()
}

fn item<'a>(key: &'a RateKey, params: Params, cost: u64) -> CheckItem<'a> {
    CheckItem {
        rule_index: 0,
        rule: "chat",
        key,
        params,
        cost,
        shadow: false,
    }
}

/// Units admitted one at a time at `t` until the first refusal.
async fn take_all(store: &RedisStore, key: &RateKey, params: Params, t: u64) -> u64 {
    let mut n = 0;
    while store
        .check_at(&[item(key, params, 1)], t)
        .await
        .unwrap()
        .admitted
    {
        n += 1;
        assert!(n <= params.burst * 2, "never refused");
    }
    n
}

/// GCRA rules are never leased, so a give-back through another instance cannot free units
/// a lease here still answers with: a reservation taken through another store is given
/// back there after this store decided a request of the same key, and once the bucket has
/// drained, the two stores together admit at most one burst at one instant.
#[tokio::test]
async fn a_gcra_give_back_through_another_instance_never_lets_more_than_the_burst_pass() {
    use palisade::rate_limit::store::Settlement;
    let server = RedisServer::start().await.expect("redis-server");
    let prefix = unique("gcra-other");
    let leasing = store(
        &server.url(),
        &prefix,
        Some(
            Lease::units(100)
                .share(0.1)
                .max_age(Duration::from_secs(60)),
        ),
    )
    .await;
    let other = store(&server.url(), &prefix, None).await;
    // 100 a second, a burst of 100: a unit is 10 ms of the timeline
    let params = Params::new(Algorithm::Gcra, Quota::per_second(100));
    let key = RateKey::principal("u1");
    let t = 1u64 << 45;
    let reserved = other.check_at(&[item(&key, params, 89)], t).await.unwrap();
    assert!(reserved.admitted);
    assert!(
        leasing
            .check_at(&[item(&key, params, 1)], t)
            .await
            .unwrap()
            .admitted
    );
    // the other instance's request used none of its 89 units
    let r = reserved.rules[0];
    other
        .settle_at(
            &[Settlement {
                rule_index: 0,
                rule: "chat",
                key: &key,
                params,
                window_start: r.window_start,
                generation: r.generation,
                reservation_end: r.reservation_end,
                delta: -89,
            }],
            t + 1_000,
        )
        .await
        .unwrap();
    // half a second on, the bucket has drained: one burst in all
    let now = t + 500_000;
    let by_other = take_all(&other, &key, params, now).await;
    let by_leasing = take_all(&leasing, &key, params, now).await;
    assert_eq!(by_other, params.burst);
    assert_eq!(by_leasing, 0, "beyond a burst of {}", params.burst);
    assert_eq!(leasing.health().lease_answers, 0);
}

/// A request larger than what its lease holds asks Redis with a new top-up; the lease it
/// keeps never holds more than one lease's size, however many such requests come (else
/// units the other instances are refused pile up here).
#[tokio::test]
async fn a_lease_never_holds_more_than_its_size_when_large_requests_top_it_up() {
    let server = RedisServer::start().await.expect("redis-server");
    let prefix = unique("pile");
    let leased = store(&server.url(), &prefix, Some(Lease::units(100))).await;
    let peeker = store(&server.url(), &prefix, None).await;
    // a lease of 10 units (1 % of 1,000)
    let params = Params::new(Algorithm::FixedWindow, Quota::new(1_000, LONG));
    let key = RateKey::principal("u1");
    for n in 1..=20u64 {
        let d = leased.check(&[item(&key, params, 20)]).await.unwrap();
        assert!(d.admitted);
        let in_redis = peeker.peek(&item(&key, params, 1)).await.unwrap().remaining;
        let held = 1_000 - 20 * n - in_redis;
        assert!(
            held <= 10,
            "after {n} requests of 20, the lease holds {held} units"
        );
    }
}

/// A check that reaches Redis before a reset of its key but is answered after the reset
/// was asked for took a lease of the old state: once the reset is done, no unit of it is
/// answered, so what the store admits after the reset stays within the limit.
#[tokio::test]
async fn a_lease_granted_before_a_reset_lands_is_not_answered_after_it() {
    let server = RedisServer::start().await.expect("redis-server");
    let leased = store(&server.url(), &unique("reset"), Some(Lease::units(100))).await;
    let params = Params::new(Algorithm::FixedWindow, Quota::new(1_000, LONG));
    let key = RateKey::principal("u1");
    let reset = leased.reset(0, "chat", &key);
    // decided (1 + 10 leased) before the reset reaches Redis
    assert!(
        leased
            .check(&[item(&key, params, 1)])
            .await
            .unwrap()
            .admitted
    );
    reset.await.unwrap();
    let mut after = 0;
    while leased
        .check(&[item(&key, params, 1)])
        .await
        .unwrap()
        .admitted
    {
        after += 1;
        assert!(after <= 2_000, "never refused");
    }
    assert_eq!(after, 1_000, "admitted after the reset");
}

/// A long store timeout (it bounds how long a top-up is awaited) never panics a leased
/// decision.
#[tokio::test]
async fn a_huge_timeout_with_leases_never_panics() {
    let server = RedisServer::start().await.expect("redis-server");
    let leased = RedisStore::builder()
        .url(server.url())
        .prefix(unique("timeout"))
        .timeout(Duration::MAX)
        .lease(Lease::units(100))
        .build()
        .await
        .unwrap();
    let params = Params::new(Algorithm::FixedWindow, Quota::new(1_000, LONG));
    let key = RateKey::principal("u1");
    for _ in 0..12 {
        assert!(
            leased
                .check(&[item(&key, params, 1)])
                .await
                .unwrap()
                .admitted
        );
    }
}

/// Settings at their extremes (a lease of the whole capacity, an age that never ends, one
/// entry) and costs at theirs never panic: a cost above any capacity is refused, and a
/// lease of all but the request's units answers the rest.
#[tokio::test]
async fn extreme_lease_settings_and_costs_never_panic() {
    let server = RedisServer::start().await.expect("redis-server");
    let leased = store(
        &server.url(),
        &unique("extreme"),
        Some(
            Lease::units(u64::MAX)
                .share(1.0)
                .max_age(Duration::MAX)
                .entries(1),
        ),
    )
    .await;
    let limit = (1u64 << 52) - 1;
    let params = Params::new(Algorithm::FixedWindow, Quota::new(limit, LONG));
    let (a, b) = (RateKey::principal("a"), RateKey::principal("b"));
    for cost in [u64::MAX, limit + 1] {
        let d = leased.check(&[item(&a, params, cost)]).await.unwrap();
        assert!(!d.admitted, "{d:?}");
    }
    let d = leased.check(&[item(&a, params, 1)]).await.unwrap();
    assert!(d.admitted);
    assert_eq!(d.rules[0].remaining, limit - 1);
    // the rest of the quota is this store's lease: answered here, whatever the cost
    let d = leased.check(&[item(&a, params, limit - 1)]).await.unwrap();
    assert!(d.admitted && d.rules[0].remaining == 0, "{d:?}");
    assert!(!leased.check(&[item(&a, params, 1)]).await.unwrap().admitted);
    // a full table of one entry: another key is decided without a lease
    for _ in 0..3 {
        assert!(leased.check(&[item(&b, params, 1)]).await.unwrap().admitted);
    }
    assert_eq!(leased.health().lease_answers, 1);
}

/// Units that do not parse are one problem, named as such: the other lease settings are
/// not also reported as doing nothing "while leases are off".
#[test]
fn lease_units_that_do_not_parse_are_the_only_problem_reported() {
    use palisade::config::Env;
    use palisade::rate_limit::RedisStoreConfig;

    let mut env = Env::from_pairs([
        ("PALISADE_RATE_LIMIT_REDIS_LEASE_UNITS", "lots"),
        ("PALISADE_RATE_LIMIT_REDIS_LEASE_SHARE", "0.05"),
        ("PALISADE_RATE_LIMIT_REDIS_LEASE_MAX_AGE", "2s"),
    ]);
    let _ = RedisStoreConfig::from_env(&mut env);
    let problems = env.finish().unwrap_err();
    assert_eq!(problems.problems().len(), 1, "{problems}");
    assert!(
        problems
            .to_string()
            .contains("PALISADE_RATE_LIMIT_REDIS_LEASE_UNITS"),
        "{problems}"
    );
}

/// GCRA: a give-back through a leasing store moves the bucket's TAT back in Redis, and
/// nothing of the key is answered here: once another instance may take the burst the
/// give-back freed, the two stores together admit at most that burst.
#[tokio::test]
async fn a_gcra_give_back_through_a_leasing_store_never_lets_more_than_the_burst_pass() {
    use palisade::rate_limit::store::Settlement;
    let server = RedisServer::start().await.expect("redis-server");
    let prefix = unique("gcra-back");
    let leased = store(
        &server.url(),
        &prefix,
        Some(
            Lease::units(100)
                .share(0.1)
                .max_age(Duration::from_secs(60)),
        ),
    )
    .await;
    let other = store(&server.url(), &prefix, None).await;
    let params = Params::new(Algorithm::Gcra, Quota::per_second(100));
    let key = RateKey::principal("u1");
    let t = 1u64 << 45;
    // 50 units: the TAT is 500 ms ahead
    let d = leased.check_at(&[item(&key, params, 50)], t).await.unwrap();
    assert!(d.admitted);
    let r = d.rules[0];
    leased
        .settle_at(
            &[Settlement {
                rule_index: 0,
                rule: "chat",
                key: &key,
                params,
                window_start: r.window_start,
                generation: r.generation,
                reservation_end: r.reservation_end,
                delta: -50,
            }],
            t + 1_000,
        )
        .await
        .unwrap();
    // the request used none of its 50: the bucket is empty again, and 95 ms on, one burst
    // passes in all
    let now = t + 95_000;
    let by_other = take_all(&other, &key, params, now).await;
    let by_lease = take_all(&leased, &key, params, now).await;
    assert_eq!(by_other, params.burst);
    assert_eq!(by_lease, 0, "beyond a burst of {}", params.burst);
    assert_eq!(leased.health().lease_answers, 0);
}

/// A lease of 1 unit is never taken (no lease is below 2 units): asking for one is refused
/// with a typed error, not accepted to do nothing.
#[tokio::test]
async fn a_lease_of_one_unit_is_refused_as_it_would_do_nothing() {
    use palisade::rate_limit::RedisConfigError;

    let err = RedisStore::builder()
        .url("redis://127.0.0.1:1/")
        .lease(Lease::units(1))
        .build()
        .await
        .unwrap_err();
    assert!(
        matches!(err, RedisConfigError::InvalidLease { .. }),
        "{err}"
    );
    let mut env =
        palisade::config::Env::from_pairs([("PALISADE_RATE_LIMIT_REDIS_LEASE_UNITS", "1")]);
    let _ = palisade::rate_limit::RedisStoreConfig::from_env(&mut env);
    let problems = env.finish().unwrap_err();
    assert_eq!(problems.problems().len(), 1, "{problems}");
}

/// A group refused by one rule debits no lease of the others: the leased rule's units are
/// all still answered afterwards.
#[tokio::test]
async fn a_refused_group_debits_no_lease() {
    let server = RedisServer::start().await.expect("redis-server");
    let leased = store(&server.url(), &unique("group"), Some(Lease::units(100))).await;
    let big = Params::new(Algorithm::FixedWindow, Quota::new(1_000, LONG));
    // 2 a window: never leased
    let small = Params::new(Algorithm::FixedWindow, Quota::new(2, LONG));
    let key = RateKey::principal("u1");
    let a = |cost| item(&key, big, cost);
    let b = CheckItem {
        rule: "trial",
        ..item(&key, small, 1)
    };
    // 1 + 10 leased for a; b spent
    assert!(leased.check(&[a(1), b]).await.unwrap().admitted);
    assert!(leased.check(&[a(1), b]).await.unwrap().admitted);
    assert_eq!(leased.health().lease_answers, 0);
    for _ in 0..5 {
        assert!(!leased.check(&[a(1), b]).await.unwrap().admitted);
    }
    // a's lease lost no unit to the refusals (nor to the second group, decided in Redis
    // as b had no lease): its 10 units are answered, then Redis decides
    for n in 1..=10 {
        let d = leased.check(&[a(1)]).await.unwrap();
        assert!(d.admitted);
        assert_eq!(leased.health().lease_answers, n);
    }
    assert!(leased.check(&[a(1)]).await.unwrap().admitted);
    assert_eq!(leased.health().lease_answers, 10, "the lease was spent");
}

/// A per-key override that changes a key's quota between requests is never decided from a
/// lease taken under the other quota.
#[tokio::test]
async fn a_lease_is_never_answered_under_another_quota() {
    let server = RedisServer::start().await.expect("redis-server");
    let leased = store(&server.url(), &unique("override"), Some(Lease::units(100))).await;
    let wide = Params::new(Algorithm::FixedWindow, Quota::new(1_000, LONG));
    let narrow = Params::new(Algorithm::FixedWindow, Quota::new(11, LONG));
    let key = RateKey::principal("u1");
    // 1 + 10 leased under the wide quota: the narrow one is spent in Redis
    assert!(leased.check(&[item(&key, wide, 1)]).await.unwrap().admitted);
    assert!(
        !leased
            .check(&[item(&key, narrow, 1)])
            .await
            .unwrap()
            .admitted
    );
    assert_eq!(leased.health().lease_answers, 0);
    // back to the wide quota: its lease (units counted in the key's state) answers
    assert!(leased.check(&[item(&key, wide, 1)]).await.unwrap().admitted);
    assert_eq!(leased.health().lease_answers, 1);
}

/// In a group, a rule whose top-up Redis refuses (its quota nearly spent elsewhere) makes
/// the group be asked again without top-ups: admitted, both rules debited once, nothing
/// cached as blocked, and the other rule's lease not taken twice.
#[tokio::test]
async fn a_refused_top_up_in_a_group_is_asked_again_and_debits_each_rule_once() {
    let server = RedisServer::start().await.expect("redis-server");
    let prefix = unique("group-top-up");
    let leased = store(&server.url(), &prefix, Some(Lease::units(100))).await;
    let other = store(&server.url(), &prefix, None).await;
    let params = Params::new(Algorithm::FixedWindow, Quota::new(1_000, LONG));
    let key = RateKey::principal("u1");
    let a = item(&key, params, 1);
    let b = CheckItem { rule: "all", ..a };
    // a has 5 left
    assert!(
        other
            .check(&[item(&key, params, 995)])
            .await
            .unwrap()
            .admitted
    );
    let d = leased.check(&[a, b]).await.unwrap();
    assert!(d.admitted, "{d:?}");
    assert_eq!(d.rules[0].remaining, 4);
    assert_eq!(leased.health().blocked_keys, 0);
    let in_redis = |rule| {
        let other = &other;
        let key = &key;
        async move {
            other
                .peek(&CheckItem {
                    rule,
                    ..item(key, params, 1)
                })
                .await
                .unwrap()
                .remaining
        }
    };
    assert_eq!(in_redis("chat").await, 4);
    // b: the request's unit, and no lease on the retry (only the first call asked)
    assert_eq!(in_redis("all").await, 999);
    // a's 4 are all still there for anyone: one at a time, exact
    for left in (0..4).rev() {
        let d = leased.check(&[a]).await.unwrap();
        assert!(d.admitted);
        assert_eq!(d.rules[0].remaining, left);
    }
    assert!(!leased.check(&[a]).await.unwrap().admitted);
}
