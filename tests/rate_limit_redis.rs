//! The Redis store against real servers: exact under concurrency through one store, two
//! stores and a Cluster; faults (a killed server, a Cluster failover) handled by each
//! failure mode; one script call per decision and none for a blocked key.
#![cfg(feature = "redis")]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use palisade::rate_limit::algorithm::{Params, Verdict};
use palisade::rate_limit::store::{CheckItem, Decision, RuleDecision, Settlement};
use palisade::rate_limit::{
    Algorithm, HashTag, MemoryStore, Quota, RateKey, RedisFailMode, RedisStore, Store, StoreError,
};
use support::{RedisCluster, RedisServer};

/// A window long enough that no test crosses an edge of a fixed window (2^40 µs, 12.7 days).
const LONG: Duration = Duration::from_micros(1 << 40);

fn params(algorithm: Algorithm, limit: u64) -> Params {
    Params::new(algorithm, Quota::new(limit, LONG))
}

const ALGORITHMS: [Algorithm; 3] = [
    Algorithm::SlidingWindow,
    Algorithm::FixedWindow,
    Algorithm::Gcra,
];

/// One rule of a request, owned so a task can carry it.
#[derive(Clone)]
struct Owned {
    index: u32,
    name: &'static str,
    key: RateKey,
    params: Params,
    cost: u64,
}

impl Owned {
    fn item(&self) -> CheckItem<'_> {
        CheckItem {
            rule_index: self.index,
            rule: self.name,
            key: &self.key,
            params: self.params,
            cost: self.cost,
            shadow: false,
        }
    }
}

fn unique(tag: &str) -> String {
    format!("t{}:{tag}", rand::random::<u32>())
}

async fn single(url: &str, prefix: &str) -> RedisStore {
    RedisStore::builder()
        .url(url)
        .prefix(prefix)
        .timeout(Duration::from_secs(2))
        .build()
        .await
        .unwrap()
}

/// Sends `n` concurrent decisions, request `i` through `stores[i % len]` with the rules
/// `rules(i)`; returns the admitted requests' indices.
async fn race(stores: &[RedisStore], n: usize, rules: impl Fn(usize) -> Vec<Owned>) -> Vec<usize> {
    let mut tasks = Vec::with_capacity(n);
    let gate = Arc::new(tokio::sync::Barrier::new(n));
    for i in 0..n {
        let store = stores[i % stores.len()].clone();
        let rules = rules(i);
        let gate = gate.clone();
        tasks.push(tokio::spawn(async move {
            gate.wait().await;
            let items: Vec<CheckItem<'_>> = rules.iter().map(Owned::item).collect();
            let d = store.check(&items).await.expect("Redis decides");
            assert_eq!(d.rules.len(), items.len());
            // all or nothing
            assert!(d.rules.iter().all(|r| r.debited == d.admitted));
            d.admitted.then_some(i)
        }));
    }
    let mut admitted = Vec::new();
    for t in tasks {
        admitted.extend(t.await.unwrap());
    }
    admitted
}

/// The settlement of `rule`'s reservation `d`, by `delta` units.
fn settlement<'a>(rule: &'a Owned, d: &RuleDecision, delta: i64) -> Settlement<'a> {
    Settlement {
        rule_index: rule.index,
        rule: rule.name,
        key: &rule.key,
        params: rule.params,
        window_start: d.window_start,
        generation: d.generation,
        reservation_end: d.reservation_end,
        delta,
    }
}

/// What a peek answers, from a cost-0 check's decision (which debits nothing).
fn peeked(d: Decision) -> RuleDecision {
    RuleDecision {
        debited: false,
        ..d.rules[0]
    }
}

/// A Redis store and a memory store taking the same steps at the same instants, so a test
/// holds Redis to the memory store's answers one line per step. Each method answers
/// (Redis's, the memory store's).
struct Both {
    redis: RedisStore,
    memory: MemoryStore,
}

impl Both {
    /// A store on `server` under a fresh prefix from `tag`, beside a fresh memory store.
    async fn start(server: &RedisServer, tag: &str) -> Self {
        Self {
            redis: single(&server.url(), &unique(tag)).await,
            memory: MemoryStore::new(),
        }
    }

    /// `rule` checked in each at `at`.
    async fn check(&self, rule: &Owned, at: u64) -> (Decision, Decision) {
        let redis = self.redis.check_at(&[rule.item()], at).await.unwrap();
        (redis, self.memory.check_at(&[rule.item()], at))
    }

    /// `delta` units of `rule` settled in each at `at`, each against its own decision
    /// (Redis's, the memory store's); answers Redis's result.
    async fn settle(
        &self,
        rule: &Owned,
        (redis, memory): (&RuleDecision, &RuleDecision),
        delta: i64,
        at: u64,
    ) -> Result<(), StoreError> {
        self.memory
            .settle_at(&[settlement(rule, memory, delta)], at);
        self.redis
            .settle_at(&[settlement(rule, redis, delta)], at)
            .await
    }

    /// What `rule`'s key holds in each at `at`: Redis's peek, the memory store's answer
    /// to a check of cost 0 (which debits nothing).
    async fn peek(&self, rule: &Owned, at: u64) -> (RuleDecision, RuleDecision) {
        let zero = Owned {
            cost: 0,
            ..rule.clone()
        };
        let redis = self.redis.peek_at(&rule.item(), at).await.unwrap();
        (redis, peeked(self.memory.check_at(&[zero.item()], at)))
    }
}

/// A store on one server with a timeout and a failure mode, under a fresh prefix.
async fn failing(url: &str, tag: &str, timeout: Duration, mode: RedisFailMode) -> RedisStore {
    RedisStore::builder()
        .url(url)
        .prefix(unique(tag))
        .timeout(timeout)
        .on_failure(mode)
        .build()
        .await
        .unwrap()
}

/// A store failing to a local memory store (returned too), with a 50 ms timeout, under a
/// fresh prefix.
async fn with_local_fallback(url: &str, tag: &str) -> (RedisStore, MemoryStore) {
    let local = MemoryStore::new();
    let store = RedisStore::builder()
        .url(url)
        .prefix(unique(tag))
        .timeout(Duration::from_millis(50))
        .on_failure(RedisFailMode::Local)
        .fallback(local.clone())
        .build()
        .await
        .unwrap();
    (store, local)
}

/// Holds up every write command (scripts included) on the server at `addr` for `ms`.
async fn pause_writes(addr: std::net::SocketAddr, ms: u64) {
    let paused = support::command(addr, &format!("CLIENT PAUSE {ms} WRITE"))
        .await
        .unwrap();
    assert!(paused.starts_with("+OK"), "{paused}");
}

/// Holds the server's writes (scripts included) until [`release_writes`], however long the
/// test takes to get there: a test that needs calls to wait in Redis waits on its own
/// conditions, not on a pause length a loaded machine may outrun.
async fn hold_writes(addr: std::net::SocketAddr) {
    pause_writes(addr, 600_000).await;
}

/// Ends [`hold_writes`].
async fn release_writes(addr: std::net::SocketAddr) {
    let released = support::command(addr, "CLIENT UNPAUSE").await.unwrap();
    assert!(released.starts_with("+OK"), "{released}");
}

/// Waits until a script call is queued in Redis behind another that writes hold: a client
/// whose last command is EVALSHA has bytes in its query buffer.
async fn await_script_call_queued_behind(addr: std::net::SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let clients = support::command(addr, "CLIENT LIST").await.unwrap();
        let queued = clients.lines().any(|c| {
            c.contains(" cmd=evalsha ")
                && c.split(' ')
                    .any(|f| f.strip_prefix("qbuf=").is_some_and(|n| n != "0"))
        });
        if queued {
            return;
        }
        assert!(Instant::now() < deadline, "{clients}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits (up to `within`) until the stores have given back `n` late debits in all.
async fn await_late_returns(stores: &[&RedisStore], n: u64, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let returned: u64 = stores.iter().map(|s| s.health().late_debits_returned).sum();
        if returned >= n {
            assert_eq!(
                returned, n,
                "more late debits given back than decisions ran late"
            );
            return;
        }
        let health: Vec<_> = stores.iter().map(|s| s.health()).collect();
        assert!(
            Instant::now() < deadline,
            "{returned} of {n} late debits given back: {health:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn remaining(store: &RedisStore, rule: &Owned) -> u64 {
    store.peek(&rule.item()).await.unwrap().remaining
}

fn one_rule(algorithm: Algorithm, limit: u64, cost: u64) -> Owned {
    Owned {
        index: 0,
        name: "per-key",
        key: RateKey::principal("hot"),
        params: params(algorithm, limit),
        cost,
    }
}

/// `n` copies of [`one_rule`], each on its own key `user-{i}`.
fn per_user(n: usize, algorithm: Algorithm, limit: u64, cost: u64) -> Vec<Owned> {
    (0..n)
        .map(|i| Owned {
            key: RateKey::principal(format!("user-{i}")),
            ..one_rule(algorithm, limit, cost)
        })
        .collect()
}

/// A store on `cluster` with a fresh prefix tagged `tag`.
async fn cluster_store(cluster: &RedisCluster, tag: &str, timeout: Duration) -> RedisStore {
    RedisStore::builder()
        .cluster(cluster.urls())
        .prefix(unique(tag))
        .timeout(timeout)
        .build()
        .await
        .unwrap()
}

/// The group: a per-user rule (20 each) and a global rule (100 in all), ten users.
fn group(algorithm: Algorithm, i: usize) -> Vec<Owned> {
    vec![
        Owned {
            index: 0,
            name: "per-user",
            key: RateKey::principal(format!("user-{}", i % 10)),
            params: params(algorithm, 20),
            cost: 1,
        },
        Owned {
            index: 1,
            name: "global",
            key: RateKey::Global,
            params: params(algorithm, 100),
            cost: 1,
        },
    ]
}

async fn exactness(stores: &[RedisStore], groups: bool) {
    for algorithm in ALGORITHMS {
        // 1,000 requests against a limit of 100
        let rule = one_rule(algorithm, 100, 1);
        let admitted = race(stores, 1_000, |_| vec![rule.clone()]).await;
        assert_eq!(admitted.len(), 100, "{algorithm:?}");
        assert_eq!(remaining(&stores[0], &rule).await, 0);

        // with costs 1 to 7: never more than 100 units, and what is left is exact
        let costly = |i: usize| Owned {
            name: "costly",
            index: 2,
            cost: 1 + (i as u64 % 7),
            ..one_rule(algorithm, 100, 1)
        };
        let admitted = race(stores, 1_000, |i| vec![costly(i)]).await;
        let spent: u64 = admitted.iter().map(|&i| costly(i).cost).sum();
        assert!((94..=100).contains(&spent), "{algorithm:?}: {spent}");
        assert_eq!(remaining(&stores[0], &costly(0)).await, 100 - spent);

        if groups {
            let admitted = race(stores, 1_000, |i| group(algorithm, i)).await;
            assert_eq!(admitted.len(), 100, "{algorithm:?}");
            let mut per_user = [0u64; 10];
            for i in &admitted {
                per_user[i % 10] += 1;
            }
            assert!(per_user.iter().all(|&n| n <= 20), "{per_user:?}");
            // the refused requests debited no user's rule
            for (u, &n) in per_user.iter().enumerate() {
                assert_eq!(remaining(&stores[0], &group(algorithm, u)[0]).await, 20 - n);
            }
            assert_eq!(remaining(&stores[0], &group(algorithm, 0)[1]).await, 0);
        }
        for s in stores {
            s.clear_blocked_cache();
        }
        // the next algorithm starts afresh
        for rule in [rule, costly(0)] {
            stores[0]
                .reset(rule.index, rule.name, &rule.key)
                .await
                .unwrap();
        }
        for u in 0..10 {
            for r in group(algorithm, u) {
                stores[0].reset(r.index, r.name, &r.key).await.unwrap();
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_requests_admit_exactly_the_limit_through_one_store() {
    let server = RedisServer::start().await.expect("redis-server");
    let store = single(&server.url(), &unique("one")).await;
    exactness(std::slice::from_ref(&store), true).await;
    // decisions made while one was in flight went to Redis together
    assert!(store.health().batched_calls > 0, "{:?}", store.health());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_stores_sharing_one_redis_admit_exactly_the_limit() {
    let server = RedisServer::start().await.expect("redis-server");
    let prefix = unique("two");
    let a = single(&server.url(), &prefix).await;
    let b = single(&server.url(), &prefix).await;
    exactness(&[a, b], true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_master_cluster_admits_exactly_the_limit() {
    let cluster = RedisCluster::start().await.expect("redis cluster");
    let store = |tag: HashTag| {
        RedisStore::builder()
            .cluster(cluster.urls())
            .prefix("cluster")
            .hash_tag(tag)
            .timeout(Duration::from_secs(2))
            .build()
    };
    // one key per decision: per-key tags spread keys over the masters
    let a = store(HashTag::Key).await.unwrap();
    let b = store(HashTag::Key).await.unwrap();
    exactness(&[a.clone(), b], false).await;
    // per-user and global rules together need one slot: a fixed tag
    let a = store(HashTag::Fixed("limits".into())).await.unwrap();
    let b = store(HashTag::Fixed("limits".into())).await.unwrap();
    exactness(&[a, b], true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_decisions_on_many_cluster_slots_batch_per_slot_and_stay_exact() {
    let cluster = RedisCluster::start().await.expect("redis cluster");
    let store = cluster_store(&cluster, "slots", Duration::from_secs(2)).await;
    // 40 keys spread over the masters' slots, 5 each admitted of 25 requests: a batch
    // mixing keys of several slots must never become one cross-slot script call
    let rule = |i: usize| Owned {
        key: RateKey::principal(format!("user-{}", i % 40)),
        ..one_rule(Algorithm::SlidingWindow, 5, 1)
    };
    let admitted = race(std::slice::from_ref(&store), 1_000, |i| vec![rule(i)]).await;
    let mut per_key = [0usize; 40];
    for i in admitted {
        per_key[i % 40] += 1;
    }
    assert_eq!(per_key, [5; 40]);
    let health = store.health();
    assert!(health.batched_calls > 0, "{health:?}");
    assert_eq!(health.failures, 0, "{health:?}");
}

#[tokio::test]
async fn a_cluster_store_refuses_a_group_that_would_cross_slots() {
    let cluster = RedisCluster::start().await.expect("redis cluster");
    let store = RedisStore::builder()
        .cluster(cluster.urls())
        .build()
        .await
        .unwrap();
    let rules = group(Algorithm::FixedWindow, 0);
    let items: Vec<CheckItem<'_>> = rules.iter().map(Owned::item).collect();
    let err = store.check(&items).await.unwrap_err();
    assert!(err.to_string().contains("HashTag::Fixed"), "{err}");
}

/// `INFO commandstats` calls of `cmd` on one server.
async fn calls(url: &str, cmd: &str) -> u64 {
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
        .find_map(|l| l.strip_prefix(&format!("cmdstat_{cmd}:calls=")))
        .map_or(0, |rest| rest.split(',').next().unwrap().parse().unwrap())
}

async fn reset_stats(url: &str) {
    let mut conn = redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut conn)
        .await
        .unwrap();
}

/// The script answers its integers packed with `struct.pack('<i8...')`: Redis's Lua must
/// convert every number the script can hold (doubles: integers up to 2^53, the batch's -1
/// marker, a stray fraction) to the same 64-bit integer as it does for a number in a
/// returned table, the form the script answered in before.
#[tokio::test]
async fn the_scripts_packed_integers_are_the_ones_redis_returns_in_a_table() {
    let server = RedisServer::start().await.expect("redis-server");
    let mut conn = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let numbers = [
        "0",
        "1",
        "-1",
        "4294967295",
        "4503599627370496",
        "9007199254740991",
        "9007199254740992",
        "-9007199254740992",
        "1796606185341901",
        "2.5",
        "-2.5",
    ];
    let read = "local n = {} for i = 1, #ARGV do n[i] = tonumber(ARGV[i]) end ";
    let table: Vec<i64> = redis::cmd("EVAL")
        .arg(format!("{read} return n"))
        .arg(0)
        .arg(&numbers[..])
        .query_async(&mut conn)
        .await
        .unwrap();
    let packed: Vec<u8> = redis::cmd("EVAL")
        .arg(format!(
            "{read} return struct.pack('<' .. string.rep('i8', #n), unpack(n))"
        ))
        .arg(0)
        .arg(&numbers[..])
        .query_async(&mut conn)
        .await
        .unwrap();
    let unpacked: Vec<i64> = packed
        .chunks_exact(8)
        .map(|w| i64::from_le_bytes(w.try_into().unwrap()))
        .collect();
    assert_eq!(packed.len(), 8 * numbers.len());
    assert_eq!(unpacked, table);
    assert_eq!(table[2], -1);
    assert_eq!(table[7], -(1 << 53));
}

#[tokio::test]
async fn one_script_call_per_decision_and_none_for_a_blocked_key() {
    let server = RedisServer::start().await.expect("redis-server");
    let store = single(&server.url(), &unique("stats")).await;
    let rules = group(Algorithm::SlidingWindow, 3);
    let items: Vec<CheckItem<'_>> = rules.iter().map(Owned::item).collect();
    // the first call loads the script (NOSCRIPT, SCRIPT LOAD, EVALSHA)
    assert!(store.check(&items).await.unwrap().admitted);
    reset_stats(&server.url()).await;
    for _ in 0..19 {
        assert!(store.check(&items).await.unwrap().admitted);
    }
    assert_eq!(calls(&server.url(), "evalsha").await, 19);
    assert_eq!(calls(&server.url(), "eval").await, 0);
    // user-3 has spent its 20: the decision that took the last unit told the store the
    // key is blocked, so every refusal comes from the local cache alone
    for _ in 0..500 {
        let d = store.check(&items).await.unwrap();
        assert!(!d.admitted);
        let Verdict::Denied { retry_after } = d.rules[0].verdict else {
            panic!("{d:?}");
        };
        assert!(retry_after > 0);
    }
    assert_eq!(calls(&server.url(), "evalsha").await, 19);
    assert_eq!(store.health().blocked_cache_hits, 500);
    // a reset (one script call) clears the cache: the next decision goes to Redis again,
    // and passes
    store.reset(0, "per-user", &rules[0].key).await.unwrap();
    assert_eq!(calls(&server.url(), "evalsha").await, 20);
    assert!(store.check(&items).await.unwrap().admitted);
    assert_eq!(calls(&server.url(), "evalsha").await, 21);
}

#[tokio::test]
async fn a_per_key_override_is_not_answered_by_the_blocked_cache() {
    let server = RedisServer::start().await.expect("redis-server");
    let store = single(&server.url(), &unique("override")).await;
    let rule = one_rule(Algorithm::FixedWindow, 2, 1);
    for _ in 0..2 {
        assert!(store.check(&[rule.item()]).await.unwrap().admitted);
    }
    assert!(!store.check(&[rule.item()]).await.unwrap().admitted);
    assert_eq!(store.health().blocked_keys, 1);
    // the layer raised this key's quota: new parameters, so a round trip decides
    let raised = Owned {
        params: params(Algorithm::FixedWindow, 5),
        ..rule
    };
    assert!(store.check(&[raised.item()]).await.unwrap().admitted);
}

#[tokio::test]
async fn settling_less_than_reserved_unblocks_the_key() {
    let server = RedisServer::start().await.expect("redis-server");
    let store = single(&server.url(), &unique("settle")).await;
    let rule = one_rule(Algorithm::FixedWindow, 10, 10);
    let d = store.check(&[rule.item()]).await.unwrap();
    assert!(d.admitted);
    let small = Owned {
        cost: 1,
        ..rule.clone()
    };
    assert!(!store.check(&[small.item()]).await.unwrap().admitted);
    store
        .settle(&[settlement(&rule, &d.rules[0], -4)])
        .await
        .unwrap();
    assert_eq!(remaining(&store, &rule).await, 4);
    assert!(store.check(&[small.item()]).await.unwrap().admitted);
}

/// Decides one request and measures how long it took.
async fn timed(store: &RedisStore, rule: &Owned) -> (Result<Decision, String>, Duration) {
    let start = Instant::now();
    let d = store.check(&[rule.item()]).await.map_err(|e| e.to_string());
    (d, start.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_server_is_survived_by_every_failure_mode() {
    let mut server = RedisServer::start().await.expect("redis-server");
    let timeout = Duration::from_millis(50);
    let mut stores = Vec::new();
    for mode in [
        RedisFailMode::Closed,
        RedisFailMode::Open,
        RedisFailMode::Local,
    ] {
        let store = failing(&server.url(), mode.as_str(), timeout, mode).await;
        stores.push((mode, store));
    }
    let rule = one_rule(Algorithm::FixedWindow, 3, 1);
    let blocked = Owned {
        name: "blocked",
        index: 1,
        params: params(Algorithm::FixedWindow, 1),
        ..rule.clone()
    };
    for (_, store) in &stores {
        assert!(timed(store, &rule).await.0.unwrap().admitted);
        assert!(timed(store, &blocked).await.0.unwrap().admitted);
        assert!(!timed(store, &blocked).await.0.unwrap().admitted);
    }

    server.kill();
    // A decision never waits much past the timeout (scheduling slack on a busy machine).
    let bound = timeout + Duration::from_millis(150);
    for (mode, store) in &stores {
        for attempt in 0..5 {
            let (d, took) = timed(store, &rule).await;
            assert!(took < bound, "{mode:?} attempt {attempt} took {took:?}");
            match mode {
                RedisFailMode::Closed => assert!(d.is_err(), "{d:?}"),
                RedisFailMode::Open => assert!(d.unwrap().admitted),
                // the local store starts empty: 3 pass, then it refuses
                RedisFailMode::Local => assert_eq!(d.unwrap().admitted, attempt < 3),
                _ => unreachable!(),
            }
            // a key known blocked stays refused, without waiting for Redis
            let (d, took) = timed(store, &blocked).await;
            assert!(took < Duration::from_millis(20), "{took:?}");
            assert!(!d.unwrap().admitted);
        }
        let health = store.health();
        assert!(!health.healthy);
        assert_eq!(health.episodes, 1);
        assert!(health.failures >= 5);
        assert!(health.last_error.is_some());
        if *mode != RedisFailMode::Closed {
            assert_eq!(health.degraded_decisions, 5);
        }
    }

    server.restart().await;
    let restarted = Instant::now();
    for (mode, store) in &stores {
        loop {
            // the restarted server is empty: the rule is fresh there
            if let (Ok(d), _) = timed(store, &rule).await {
                if store.health().healthy {
                    assert!(d.admitted);
                    break;
                }
            }
            assert!(
                restarted.elapsed() < Duration::from_secs(1),
                "{mode:?}: decisions did not resume within a second of the restart"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(store.health().episodes, 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_failover_is_survived() {
    let cluster = RedisCluster::start_with_replicas()
        .await
        .expect("redis cluster with replicas");
    let store = cluster_store(&cluster, "failover", Duration::from_millis(500)).await;
    let rule = one_rule(Algorithm::FixedWindow, 1_000, 1);
    for _ in 0..10 {
        assert!(store.check(&[rule.item()]).await.unwrap().admitted);
    }
    // promote the replica of the master that holds the key
    let key = store.key_name(rule.name, &rule.key);
    cluster.fail_over_slot(cluster.key_slot(&key).await).await;
    // decisions go on, on the promoted node, with the state it replicated
    let start = Instant::now();
    let mut admitted = 0;
    while admitted < 10 {
        match store.check(&[rule.item()]).await {
            Ok(d) => {
                assert!(d.admitted);
                admitted += 1;
            }
            Err(e) => {
                assert!(
                    start.elapsed() < Duration::from_secs(5),
                    "no decision 5s after the failover: {e}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    let left = store.peek(&rule.item()).await.unwrap().remaining;
    assert_eq!(left, 1_000 - 20);
}

#[tokio::test]
async fn a_store_refuses_bad_settings_with_typed_errors() {
    use palisade::rate_limit::RedisConfigError as E;
    let b = || RedisStore::builder();
    assert!(matches!(b().build().await, Err(E::NoServer)));
    assert!(matches!(
        b().url("redis://127.0.0.1:1/")
            .cluster(["redis://127.0.0.1:2/"])
            .build()
            .await,
        Err(E::BothServers)
    ));
    let err = b()
        .url("http://user:hunter2@example/")
        .build()
        .await
        .unwrap_err();
    assert!(matches!(err, E::InvalidUrl { .. }));
    assert!(!err.to_string().contains("hunter2"), "{err}");
    assert!(matches!(
        b().url("redis://127.0.0.1:1/").prefix("a{b").build().await,
        Err(E::InvalidPrefix)
    ));
    assert!(matches!(
        b().url("redis://127.0.0.1:1/")
            .timeout(Duration::ZERO)
            .build()
            .await,
        Err(E::ZeroTimeout)
    ));
    let debug = format!("{:?}", b().url("redis://:hunter2@127.0.0.1:1/"));
    assert!(!debug.contains("hunter2"), "{debug}");
}

#[tokio::test]
async fn header_keys_reach_redis_only_as_digests() {
    let server = RedisServer::start().await.expect("redis-server");
    let store = single(&server.url(), "digest").await;
    let name = store.key_name("r", &RateKey::Header("sk-secret-value".into()));
    assert!(!name.contains("sk-secret"), "{name}");
    assert!(name.starts_with("digest:r:{header:"), "{name}");
    let braces = store.key_name("r", &RateKey::principal("a}b{c"));
    assert_eq!(braces, "digest:r:{principal:a%7Db%7Bc}");
}

/// Requests that reached the inner service in the layer test.
static LAYER_ADMITTED: AtomicU64 = AtomicU64::new(0);

#[tokio::test]
async fn the_layer_enforces_limits_through_the_redis_store() {
    use http::{Request, Response};
    use palisade::rate_limit::{KeySource, RateLimitLayer, Rule};
    use tower::{Layer, ServiceExt, service_fn};

    let server = RedisServer::start().await.expect("redis-server");
    let layer = RateLimitLayer::builder()
        .store(single(&server.url(), &unique("layer")).await)
        .rule(Rule::new("chat", Quota::per_minute(2)).key(KeySource::ApiKey))
        .build()
        .unwrap();
    let svc = layer.layer(service_fn(|_req: Request<()>| async {
        LAYER_ADMITTED.fetch_add(1, Ordering::Relaxed);
        Ok::<_, std::convert::Infallible>(Response::new(
            http_body_util::Empty::<bytes::Bytes>::new(),
        ))
    }));
    let request = || {
        Request::post("/v1/messages")
            .header("x-api-key", "sk-test-1")
            .body(())
            .unwrap()
    };
    for _ in 0..2 {
        assert_eq!(svc.clone().oneshot(request()).await.unwrap().status(), 200);
    }
    let refused = svc.clone().oneshot(request()).await.unwrap();
    assert_eq!(refused.status(), 429);
    assert!(refused.headers().contains_key("retry-after"));
    // answered by the blocked cache the second time, the same way
    let again = svc.oneshot(request()).await.unwrap();
    assert_eq!(again.status(), 429);
    assert_eq!(LAYER_ADMITTED.load(Ordering::Relaxed), 2);
}

/// The state of one rule for one key costs Redis what the module docs state (`MEMORY
/// USAGE`, which counts the key, the value and the expiry), whatever the algorithm: at most
/// 136 bytes for an API key, 120 for a principal such as `user-1234567`; 16 more for a
/// GCRA key that has had units given back in its epoch or has been reset and holds a long
/// epoch (its value is past 28 bytes), 32 more for both.
#[tokio::test]
async fn a_key_costs_redis_what_the_docs_state() {
    let server = RedisServer::start().await.expect("redis-server");
    let store = single(&server.url(), "palisade:rl").await;
    let mut conn = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let api_key = RateKey::ApiKey(palisade::key::ApiKeyId::from_key("sk-ant-api03-example"));
    for algorithm in ALGORITHMS {
        for (key, most) in [(&api_key, 136), (&RateKey::principal("user-1234567"), 120)] {
            let rule = Owned {
                name: "chat",
                key: key.clone(),
                ..one_rule(algorithm, 1_000, 7)
            };
            let name = store.key_name(rule.name, &rule.key);
            // each algorithm starts from a key never seen (a reset leaves its generation)
            let _: () = redis::cmd("DEL")
                .arg(&name)
                .query_async(&mut conn)
                .await
                .unwrap();
            let mut usage = async || -> u64 {
                redis::cmd("MEMORY")
                    .arg("USAGE")
                    .arg(&name)
                    .query_async(&mut conn)
                    .await
                    .unwrap()
            };
            let d = store.check(&[rule.item()]).await.unwrap();
            assert!(d.admitted);
            let bytes = usage().await;
            eprintln!("{algorithm:?}: {bytes} bytes for {name}");
            assert!(bytes <= most, "{algorithm:?}: {bytes} bytes for {name}");
            // a give-back: no more memory, but for a GCRA key, which then holds how far
            // give-backs moved its bucket back (10 digits here)
            let gcra = |extra| {
                if algorithm == Algorithm::Gcra {
                    most + extra
                } else {
                    most
                }
            };
            store
                .settle(&[settlement(&rule, &d.rules[0], -3)])
                .await
                .unwrap();
            let bytes = usage().await;
            eprintln!("{algorithm:?}: {bytes} bytes for {name} once settled");
            assert!(
                bytes <= gcra(16),
                "{algorithm:?}: {bytes} bytes for {name} once settled"
            );
            // a key that has been reset also holds its generation: no more memory, but for a
            // GCRA key with a 10-digit epoch length (and give-backs)
            store.reset(rule.index, rule.name, &rule.key).await.unwrap();
            let d = store.check(&[rule.item()]).await.unwrap();
            assert!(d.admitted);
            let bytes = usage().await;
            eprintln!("{algorithm:?}: {bytes} bytes for {name} once reset");
            assert!(
                bytes <= gcra(16),
                "{algorithm:?}: {bytes} bytes for {name} once reset"
            );
            store
                .settle(&[settlement(&rule, &d.rules[0], -3)])
                .await
                .unwrap();
            let bytes = usage().await;
            eprintln!("{algorithm:?}: {bytes} bytes for {name} once reset and settled");
            assert!(
                bytes <= gcra(32),
                "{algorithm:?}: {bytes} bytes for {name} once reset and settled"
            );
        }
    }
}

#[tokio::test]
async fn a_store_is_built_from_the_environment() {
    use palisade::config::Env;
    use palisade::rate_limit::RedisStoreConfig;

    let server = RedisServer::start().await.expect("redis-server");
    let mut env = Env::from_pairs([
        ("PALISADE_RATE_LIMIT_REDIS_URL", server.url()),
        ("PALISADE_RATE_LIMIT_REDIS_PREFIX", "envapp".to_owned()),
        ("PALISADE_RATE_LIMIT_REDIS_FAIL_MODE", "open".to_owned()),
        ("PALISADE_RATE_LIMIT_REDIS_HASH_TAG", "all".to_owned()),
    ]);
    let config = RedisStoreConfig::from_env(&mut env);
    env.finish().unwrap();
    assert!(!format!("{config:?}").contains(&server.url()));
    let store = RedisStore::from_config(config).await.unwrap();
    assert_eq!(store.health().fail_mode, RedisFailMode::Open);
    let rule = one_rule(Algorithm::Gcra, 1, 1);
    assert!(store.check(&[rule.item()]).await.unwrap().admitted);
    assert_eq!(
        store.key_name(rule.name, &rule.key),
        "envapp:{all}:per-key:principal:hot"
    );

    // every problem at once
    let mut env = Env::from_pairs([
        ("PALISADE_RATE_LIMIT_REDIS_TIMEOUT", "soon"),
        ("PALISADE_RATE_LIMIT_REDIS_FAIL_MODE", "maybe"),
        ("PALISADE_RATE_LIMIT_REDIS_CLOCK", "wall"),
        ("PALISADE_RATE_LIMIT_REDIS_RESET_RETENTION", "0"),
    ]);
    let _ = RedisStoreConfig::from_env(&mut env);
    let problems = env.finish().unwrap_err();
    assert_eq!(problems.problems().len(), 4, "{problems:?}");
    assert!(
        problems.to_string().contains("reset retention"),
        "{problems}"
    );

    // the reset retention reaches the store: a reset key lives that long
    let mut env = Env::from_pairs([
        ("PALISADE_RATE_LIMIT_REDIS_URL", server.url()),
        ("PALISADE_RATE_LIMIT_REDIS_PREFIX", "retention".to_owned()),
        ("PALISADE_RATE_LIMIT_REDIS_RESET_RETENTION", "2h".to_owned()),
    ]);
    let config = RedisStoreConfig::from_env(&mut env);
    env.finish().unwrap();
    assert_eq!(config.reset_retention, std::time::Duration::from_secs(7200));
    let store = RedisStore::from_config(config).await.unwrap();
    // a second's bucket: its own state would expire within a second
    let second = CheckItem {
        params: Params::new(Algorithm::Gcra, Quota::per_second(1)),
        ..rule.item()
    };
    assert!(store.check(&[second]).await.unwrap().admitted);
    store.reset(0, rule.name, &rule.key).await.unwrap();
    let name = store.key_name(rule.name, &rule.key);
    let ttl = support::command(server.addr(), &format!("PTTL {name}"))
        .await
        .unwrap();
    let ttl: i64 = ttl.trim_start_matches(':').trim().parse().unwrap();
    assert!(ttl > 7_100_000 && ttl <= 7_200_000, "{ttl} ms");
}

/// With the client's clock, windows follow this machine's time (sent with each call), and
/// two stores on one Redis still share one count.
#[tokio::test]
async fn the_client_clock_decides_windows_from_this_machines_time() {
    use palisade::rate_limit::RedisClock;

    let server = RedisServer::start().await.expect("redis-server");
    let prefix = unique("client-clock");
    let store = || {
        RedisStore::builder()
            .url(server.url())
            .prefix(&prefix)
            .clock(RedisClock::Client)
            .build()
    };
    let (a, b) = (store().await.unwrap(), store().await.unwrap());
    let rule = one_rule(Algorithm::FixedWindow, 2, 1);
    assert!(a.check(&[rule.item()]).await.unwrap().admitted);
    let second = b.check(&[rule.item()]).await.unwrap();
    assert!(second.admitted);
    let third = a.check(&[rule.item()]).await.unwrap();
    assert!(!third.admitted);
    // the refusal waits for the end of the window on this machine's clock
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64;
    let window = LONG.as_micros() as u64;
    let to_edge = window - now % window;
    let Verdict::Denied { retry_after } = third.rules[0].verdict else {
        panic!("{third:?}");
    };
    assert!(
        retry_after.abs_diff(to_edge) < 1_000_000,
        "{retry_after} vs {to_edge}"
    );
}

#[tokio::test]
async fn quotas_past_what_lua_counts_exactly_are_refused_with_an_error() {
    let server = RedisServer::start().await.expect("redis-server");
    let both = Both::start(&server, "huge").await;
    let store = &both.redis;
    let now = 1u64 << 40;
    // the largest quota the script counts exactly: the same answers as the memory store
    for (n, algorithm) in (0..).zip(ALGORITHMS) {
        let limit = (1u64 << 52) - 1;
        let rule = Owned {
            index: n,
            name: ["near-0", "near-1", "near-2"][n as usize],
            cost: limit - 1,
            ..one_rule(algorithm, limit, 1)
        };
        let (r, m) = both.check(&rule, now).await;
        assert_eq!(r, m, "{algorithm:?}");
    }
    // past it a double cannot hold every count: an error, never a silently wrong answer
    for (n, algorithm) in (0..).zip(ALGORITHMS) {
        let huge = Owned {
            name: "huge",
            ..one_rule(algorithm, (1u64 << 53) + 3, 1)
        };
        let err = store.check_at(&[huge.item()], now).await.unwrap_err();
        assert!(err.to_string().contains("2^52"), "{algorithm:?}: {err}");
        let costly = Owned {
            index: 10 + n,
            name: ["costly-0", "costly-1", "costly-2"][n as usize],
            cost: 1u64 << 60,
            ..one_rule(algorithm, 100, 1)
        };
        // a cost past every capacity is refused as the memory store refuses it
        let (r, m) = both.check(&costly, now).await;
        assert_eq!(r, m, "{algorithm:?}");
        assert_eq!(r.rules[0].verdict, Verdict::Never);
        assert!(store.peek_at(&huge.item(), now).await.is_err());
    }
}

#[tokio::test]
async fn rule_names_with_colons_or_braces_never_share_a_redis_key() {
    let server = RedisServer::start().await.expect("redis-server");
    let fixed = RedisStore::builder()
        .url(server.url())
        .prefix(unique("names"))
        .hash_tag(HashTag::Fixed("limits".into()))
        .build()
        .await
        .unwrap();
    // rule `chat:principal` counting the global key, and rule `chat` counting principal
    // `global`: two counters
    let global = Owned {
        index: 0,
        name: "chat:principal",
        key: RateKey::Global,
        params: params(Algorithm::FixedWindow, 1),
        cost: 1,
    };
    let user = Owned {
        index: 1,
        name: "chat",
        key: RateKey::principal("global"),
        ..global.clone()
    };
    assert_ne!(
        fixed.key_name(global.name, &global.key),
        fixed.key_name(user.name, &user.key)
    );
    assert!(fixed.check(&[global.item()]).await.unwrap().admitted);
    assert!(fixed.check(&[user.item()]).await.unwrap().admitted);
    // with per-key tags, a brace in a rule name must not move the key to another slot
    let keyed = single(&server.url(), "names").await;
    let name = keyed.key_name("a{b}", &RateKey::principal("u"));
    assert_eq!(name.matches('{').count(), 1, "{name}");
    assert!(name.ends_with(":{principal:u}"), "{name}");
}

#[tokio::test]
async fn a_reset_by_another_instance_reaches_this_ones_blocked_cache_within_a_second() {
    let server = RedisServer::start().await.expect("redis-server");
    let prefix = unique("stale");
    let a = single(&server.url(), &prefix).await;
    let b = single(&server.url(), &prefix).await;
    // a per-day rule: the key is blocked for hours
    let rule = Owned {
        params: Params::new(Algorithm::FixedWindow, Quota::per_day(1)),
        ..one_rule(Algorithm::FixedWindow, 1, 1)
    };
    assert!(a.check(&[rule.item()]).await.unwrap().admitted);
    assert!(!a.check(&[rule.item()]).await.unwrap().admitted);
    assert_eq!(a.health().blocked_keys, 1);
    // an operator resets the key through the other instance
    b.reset(rule.index, rule.name, &rule.key).await.unwrap();
    assert!(b.check(&[rule.item()]).await.unwrap().admitted);
    b.reset(rule.index, rule.name, &rule.key).await.unwrap();
    // this instance learns it without waiting out the day
    let start = Instant::now();
    loop {
        if a.check(&[rule.item()]).await.unwrap().admitted {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_millis(1_500),
            "still refused from the local cache long after the reset"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn two_layers_sharing_a_store_do_not_share_blocked_cache_entries() {
    let server = RedisServer::start().await.expect("redis-server");
    let store = single(&server.url(), &unique("layers")).await;
    // each layer's first rule has index 0; the names tell them apart, in Redis and here
    let chat = Owned {
        name: "chat",
        ..one_rule(Algorithm::FixedWindow, 1, 1)
    };
    let embed = Owned {
        name: "embed",
        ..chat.clone()
    };
    assert!(store.check(&[chat.item()]).await.unwrap().admitted);
    assert!(!store.check(&[chat.item()]).await.unwrap().admitted);
    assert!(store.check(&[embed.item()]).await.unwrap().admitted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_fallback_settles_what_it_reserved_while_redis_is_away() {
    let mut server = RedisServer::start().await.expect("redis-server");
    let store = failing(
        &server.url(),
        "local-settle",
        Duration::from_millis(50),
        RedisFailMode::Local,
    )
    .await;
    server.kill();
    // a reservation of the whole quota, decided locally
    let rule = one_rule(Algorithm::FixedWindow, 10, 10);
    let d = store.check(&[rule.item()]).await.unwrap();
    assert!(d.admitted);
    assert_eq!(store.health().degraded_decisions, 1);
    // the request used 1 unit: 9 come back to the store that counted them
    store
        .settle(&[settlement(&rule, &d.rules[0], -9)])
        .await
        .unwrap();
    let five = Owned {
        cost: 5,
        ..rule.clone()
    };
    assert!(store.check(&[five.item()]).await.unwrap().admitted);
}

#[tokio::test]
async fn a_flushed_script_cache_is_reloaded_by_the_next_decision() {
    let server = RedisServer::start().await.expect("redis-server");
    let store = single(&server.url(), &unique("flush")).await;
    let rule = one_rule(Algorithm::SlidingWindow, 3, 1);
    assert!(store.check(&[rule.item()]).await.unwrap().admitted);
    let mut conn = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(store.check(&[rule.item()]).await.unwrap().admitted);
    assert_eq!(remaining(&store, &rule).await, 1);
    assert!(store.health().healthy);
}

#[tokio::test]
async fn passwords_in_node_urls_stay_out_of_errors_and_debug() {
    use palisade::rate_limit::RedisConfigError as E;
    // nothing listens on port 1: the first Cluster connection fails
    let err = RedisStore::builder()
        .cluster(["redis://:hunter2@127.0.0.1:1/"])
        .timeout(Duration::from_millis(20))
        .build()
        .await
        .unwrap_err();
    assert!(matches!(err, E::Connect { .. }), "{err:?}");
    assert!(!format!("{err} {err:?}").contains("hunter2"), "{err:?}");
    // TLS: a single server connects lazily, a Cluster at once; neither shows the password
    let url = "rediss://:hunter2@127.0.0.1:1/";
    let single = RedisStore::builder()
        .url(url)
        .timeout(Duration::from_millis(100))
        .build()
        .await
        .unwrap();
    let rule = one_rule(Algorithm::FixedWindow, 1, 1);
    let err = single.check(&[rule.item()]).await.unwrap_err();
    let shown = format!("{err} {err:?} {:?} {single:?}", single.health());
    assert!(!shown.contains("hunter2"), "{shown}");
    let cluster = RedisStore::builder()
        .cluster([url])
        .timeout(Duration::from_millis(20))
        .build()
        .await
        .unwrap_err();
    assert!(matches!(cluster, E::Connect { .. }), "{cluster:?}");
    assert!(!format!("{cluster} {cluster:?}").contains("hunter2"));
    // a server that wants another password: health shows the error, never the URL's
    let server = RedisServer::start().await.expect("redis-server");
    let url = server.url().replace("redis://", "redis://:hunter2@");
    let store = RedisStore::builder()
        .url(url)
        .timeout(Duration::from_millis(200))
        .build()
        .await
        .unwrap();
    let rule = one_rule(Algorithm::FixedWindow, 1, 1);
    let err = store.check(&[rule.item()]).await.unwrap_err();
    let health = store.health();
    let shown = format!("{err} {err:?} {health:?} {store:?}");
    assert!(!shown.contains("hunter2"), "{shown}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_key_is_refused_at_once_all_through_a_long_outage() {
    let server = RedisServer::start().await.expect("redis-server");
    // A timeout a loaded machine meets: the first decision must be Redis's own (one that
    // fails open leaves no entry in the cache, and the key is then admitted all through
    // the outage), and "at once" is measured against it.
    let timeout = Duration::from_secs(1);
    let store = failing(&server.url(), "outage", timeout, RedisFailMode::Open).await;
    // GCRA: blocked for a day from the first decision on, whatever the time of day (a fixed
    // window's day could end during the test)
    let rule = Owned {
        params: Params::new(Algorithm::Gcra, Quota::per_day(1)),
        ..one_rule(Algorithm::Gcra, 1, 1)
    };
    let first = store.check(&[rule.item()]).await.unwrap();
    assert!(first.admitted && first.rules[0].debited, "{first:?}");
    assert_eq!(store.health().degraded_decisions, 0);
    // Redis stops answering (paused rather than killed: a killed server's port may be
    // taken by another test's server meanwhile)
    let mut admin = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(10_000)
        .arg("ALL")
        .query_async(&mut admin)
        .await
        .unwrap();
    let other = Owned {
        name: "other",
        ..rule.clone()
    };
    // the outage is known: a decision for another rule failed
    assert!(store.check(&[other.item()]).await.unwrap().admitted);
    assert!(!store.health().healthy);
    // past the second in which an entry answers alone, Redis is still away: the entry
    // answers, without waiting out the timeout
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let hits = store.health().blocked_cache_hits;
    for i in 1..=3 {
        let start = Instant::now();
        let d = store.check(&[rule.item()]).await.unwrap();
        assert!(!d.admitted, "{d:?} {:?}", store.health());
        assert!(start.elapsed() < timeout, "{:?}", start.elapsed());
        assert_eq!(store.health().blocked_cache_hits, hits + i);
    }
}

#[test]
fn settings_never_show_a_password() {
    use palisade::config::Env;
    use palisade::rate_limit::RedisStoreConfig;
    let shown = format!(
        "{:?} {:?}",
        RedisStore::builder().url("redis://:hunter2@cache.internal:6379/"),
        RedisStore::builder().cluster(["redis://user:hunter2@node-1:7000/"])
    );
    assert!(!shown.contains("hunter2"), "{shown}");
    let mut env = Env::from_pairs([(
        "PALISADE_RATE_LIMIT_REDIS_CLUSTER_NODES",
        "redis://user:hunter2@node-1:7000/",
    )]);
    let config = RedisStoreConfig::from_env(&mut env);
    env.finish().unwrap();
    let shown = format!("{config:?}");
    assert!(!shown.contains("hunter2"), "{shown}");
}

/// A decision held up in Redis (`CLIENT PAUSE`) past the timeout is answered by the failure
/// mode; when it then runs in Redis, what it debited is given back, so for the failing-closed
/// and local stores only their own answer counts, for every algorithm.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decision_that_lands_after_the_timeout_gives_back_what_it_debited() {
    let server = RedisServer::start().await.expect("redis-server");
    for mode in [RedisFailMode::Closed, RedisFailMode::Local] {
        for algorithm in ALGORITHMS {
            let prefix = unique(mode.as_str());
            let with_timeout = |timeout, mode| {
                RedisStore::builder()
                    .url(server.url())
                    .prefix(prefix.as_str())
                    .timeout(timeout)
                    .on_failure(mode)
                    .build()
            };
            let store = with_timeout(Duration::from_millis(50), mode).await.unwrap();
            // The first decision and the reads go through a store of the same keys that
            // waits as long as a loaded machine needs; only the decision under test has 50 ms.
            let steady = with_timeout(Duration::from_secs(5), RedisFailMode::Closed)
                .await
                .unwrap();
            let rule = one_rule(algorithm, 10, 3);
            assert!(steady.check(&[rule.item()]).await.unwrap().admitted);
            assert_eq!(remaining(&steady, &rule).await, 7);
            // the store's own connection is up before the pause (a peek debits nothing)
            let _ = store.peek(&rule.item()).await;
            pause_writes(server.addr(), 300).await;
            let started = Instant::now();
            let late = store.check(&[rule.item()]).await;
            assert!(started.elapsed() < Duration::from_millis(250));
            match mode {
                RedisFailMode::Closed => assert!(late.is_err(), "{late:?}"),
                _ => assert!(late.unwrap().admitted, "the local store decides"),
            }
            // The paused script runs once the pause ends; its debit must come back.
            await_late_returns(&[&store], 1, Duration::from_secs(3)).await;
            assert_eq!(
                remaining(&steady, &rule).await,
                7,
                "{mode:?} {algorithm:?}: only the first decision counts in Redis"
            );
        }
    }
}

/// With the local fallback, a peek that Redis does not answer reads the local store (it
/// failed before, though checks were answered locally).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_fallback_answers_peeks_while_redis_is_away() {
    let mut server = RedisServer::start().await.expect("redis-server");
    let store = failing(
        &server.url(),
        "peek",
        Duration::from_millis(50),
        RedisFailMode::Local,
    )
    .await;
    let rule = one_rule(Algorithm::SlidingWindow, 10, 2);
    assert!(store.check(&[rule.item()]).await.unwrap().admitted);
    server.kill();
    assert!(store.check(&[rule.item()]).await.unwrap().admitted);
    assert!(store.check(&[rule.item()]).await.unwrap().admitted);
    let peeked = store
        .peek(&rule.item())
        .await
        .expect("the local store answers the peek");
    assert_eq!(peeked.remaining, 10 - 2 * 2);
    let closed = RedisStore::builder()
        .url(server.url())
        .timeout(Duration::from_millis(50))
        .build()
        .await
        .unwrap();
    assert!(closed.peek(&rule.item()).await.is_err());
}

/// A reservation the local fallback decided (Redis held up past the timeout) is settled in
/// the local store that counted it, never in Redis, where it was not debited: settling it
/// there would give back units that other requests spent, for every algorithm.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reservation_decided_locally_is_never_settled_in_redis() {
    let server = RedisServer::start().await.expect("redis-server");
    for algorithm in ALGORITHMS {
        let store = failing(
            &server.url(),
            "local-reserve",
            Duration::from_millis(50),
            RedisFailMode::Local,
        )
        .await;
        let spent = one_rule(algorithm, 10, 6);
        assert!(store.check(&[spent.item()]).await.unwrap().admitted);
        assert_eq!(remaining(&store, &spent).await, 4);
        pause_writes(server.addr(), 300).await;
        // 5 units do not fit in Redis (4 left), so the late run debits nothing there; the
        // local store admits them.
        let reserve = Owned {
            cost: 5,
            ..spent.clone()
        };
        let local = store.check(&[reserve.item()]).await.unwrap();
        assert!(local.admitted && local.rules[0].debited, "{local:?}");
        assert_eq!(store.health().degraded_decisions, 1);
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(remaining(&store, &spent).await, 4, "{algorithm:?}");
        assert!(store.health().healthy);
        // the request used nothing: the 5 units it reserved locally come back locally
        store
            .settle(&[settlement(&reserve, &local.rules[0], -5)])
            .await
            .unwrap();
        assert_eq!(
            remaining(&store, &spent).await,
            4,
            "{algorithm:?}: a local reservation's refund reached Redis"
        );
        assert_eq!(store.health().late_debits_returned, 0);
    }
}

/// A Cluster decision held up for more than a second (its node paused) still has its debit
/// given back once it runs: the cluster connection keeps waiting for the late answer as
/// long as the store does, instead of dropping it after a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_decision_held_up_past_a_second_still_gives_back_its_debit() {
    let cluster = RedisCluster::start().await.expect("redis cluster");
    let prefix = unique("late-cluster");
    let store = |timeout| {
        RedisStore::builder()
            .cluster(cluster.urls())
            .prefix(prefix.as_str())
            .timeout(timeout)
            .build()
    };
    // The decisions around the held-up one go through a store whose timeout a loaded
    // machine meets (a first call on a Cluster may take several round trips: loading
    // the script, a redirection); only the held-up one has the short timeout.
    let steady = store(Duration::from_secs(5)).await.unwrap();
    let short = store(Duration::from_millis(50)).await.unwrap();
    let rule = one_rule(Algorithm::FixedWindow, 10, 3);
    assert!(steady.check(&[rule.item()]).await.unwrap().admitted);
    assert_eq!(remaining(&steady, &rule).await, 7);
    for addr in cluster.addrs() {
        pause_writes(*addr, 1600).await;
    }
    assert!(short.check(&[rule.item()]).await.is_err());
    await_late_returns(&[&short], 1, Duration::from_secs(8)).await;
    // the give-back was answered before the count above moved
    assert_eq!(
        remaining(&steady, &rule).await,
        7,
        "the late decision's debit stayed in Redis"
    );
}

/// 1,000 decisions against a limit of 100 through two stores while Redis is paused past
/// their timeout: none is admitted (failing closed), every late run's debit is given back,
/// and once Redis answers again exactly 100 of another 1,000 are admitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_decisions_from_two_stores_leave_the_limit_whole() {
    let server = RedisServer::start().await.expect("redis-server");
    let prefix = unique("late-race");
    let store = || {
        RedisStore::builder()
            .url(server.url())
            .prefix(prefix.as_str())
            .timeout(Duration::from_millis(50))
            .build()
    };
    let stores = [store().await.unwrap(), store().await.unwrap()];
    // reads go through a store that waits as long as a loaded machine needs
    let reader = single(&server.url(), &prefix).await;
    let rule = one_rule(Algorithm::SlidingWindow, 100, 1);
    assert_eq!(remaining(&reader, &rule).await, 100);
    // Redis runs nothing until every decision has timed out, however long that takes
    hold_writes(server.addr()).await;
    let mut tasks = Vec::new();
    for i in 0..1_000 {
        let store = stores[i % 2].clone();
        let rule = rule.clone();
        tasks.push(tokio::spawn(async move {
            store.check(&[rule.item()]).await.is_ok_and(|d| d.admitted)
        }));
    }
    let mut admitted = 0;
    for t in tasks {
        admitted += usize::from(t.await.unwrap());
    }
    assert_eq!(
        admitted, 0,
        "failing closed, a decision past the timeout refuses"
    );
    release_writes(server.addr()).await;
    // Every late debit is given back: at least the 100 units the limit held (a give-back
    // may land before a later batch of late decisions, which then debits and gives back
    // again). Waits on that condition; the bound only keeps a broken store from hanging.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let returned: u64 = stores.iter().map(|s| s.health().late_debits_returned).sum();
        if returned >= 100 && remaining(&reader, &rule).await == 100 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{:?}",
            stores.each_ref().map(RedisStore::health)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Redis answers again (stores that wait long enough for 1,000 decisions on a busy machine)
    let patient = [
        single(&server.url(), &prefix).await,
        single(&server.url(), &prefix).await,
    ];
    let admitted = race(&patient, 1_000, |_| vec![rule.clone()]).await;
    assert_eq!(admitted.len(), 100);
}

/// A refusal that was under way when the key was reset (sent before the reset, answered
/// after the reset cleared the blocked cache) does not block the reset key afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_under_way_during_a_reset_does_not_block_the_reset_key() {
    let server = RedisServer::start().await.expect("redis-server");
    let store = single(&server.url(), &unique("reset-race")).await;
    let rule = one_rule(Algorithm::FixedWindow, 2, 2);
    assert!(store.check(&[rule.item()]).await.unwrap().admitted);
    assert!(!store.check(&[rule.item()]).await.unwrap().admitted);
    store.clear_blocked_cache();
    pause_writes(server.addr(), 300).await;
    let under_way = {
        let store = store.clone();
        let rule = rule.clone();
        tokio::spawn(async move { store.check(&[rule.item()]).await.unwrap() })
    };
    // the refusal reaches Redis (and waits out the pause) before the reset does
    tokio::time::sleep(Duration::from_millis(50)).await;
    store.reset(rule.index, rule.name, &rule.key).await.unwrap();
    assert!(!under_way.await.unwrap().admitted);
    let after = store.check(&[rule.item()]).await.unwrap();
    assert!(after.admitted, "the reset key is still blocked: {after:?}");
}

/// A reservation made before an admin reset and settled after it (a give-back) returns
/// nothing: the units a request admitted after the reset paid stay paid, while that
/// request's own settlement still applies; for every algorithm.
#[tokio::test]
async fn a_give_back_after_a_reset_does_not_refund_requests_admitted_after_it() {
    let server = RedisServer::start().await.expect("redis-server");
    let store = single(&server.url(), &unique("reset-give-back")).await;
    for (algorithm, name) in ALGORITHMS.into_iter().zip(["sliding", "fixed", "gcra"]) {
        let rule = Owned {
            name,
            ..one_rule(algorithm, 10, 6)
        };
        let before = store.check(&[rule.item()]).await.unwrap().rules[0];
        assert!(before.debited);
        store.reset(rule.index, rule.name, &rule.key).await.unwrap();
        let seven = Owned {
            cost: 7,
            ..rule.clone()
        };
        let after = store.check(&[seven.item()]).await.unwrap().rules[0];
        assert!(after.debited);
        assert_ne!(after.generation, before.generation);
        store
            .settle(&[settlement(&rule, &before, -6)])
            .await
            .unwrap();
        assert_eq!(
            remaining(&store, &rule).await,
            3,
            "{algorithm:?}: a give-back from before the reset refunded a later request"
        );
        store
            .settle(&[settlement(&rule, &after, -2)])
            .await
            .unwrap();
        assert_eq!(remaining(&store, &rule).await, 5, "{algorithm:?}");
    }
}

/// A refusal decided in Redis before a give-back, but answered after the store had
/// forgotten the key's blocked entry for that give-back, does not keep the key refused
/// here once the units are back in Redis.
#[tokio::test]
async fn a_give_back_unblocks_a_key_that_a_refusal_blocked_meanwhile() {
    let server = RedisServer::start().await.expect("redis-server");
    let store = single(&server.url(), &unique("give-back-race")).await;
    let rule = one_rule(Algorithm::FixedWindow, 2, 2);
    let reserved = store.check(&[rule.item()]).await.unwrap().rules[0];
    assert!(reserved.debited);
    // the give-back is under way: called, not yet applied in Redis
    let settling = store.settle(&[settlement(&rule, &reserved, -2)]);
    let one = Owned {
        cost: 1,
        ..rule.clone()
    };
    assert!(!store.check(&[one.item()]).await.unwrap().admitted);
    settling.await.unwrap();
    assert_eq!(remaining(&store, &rule).await, 2);
    let after = store.check(&[one.item()]).await.unwrap();
    assert!(
        after.admitted,
        "the key is still refused locally: {after:?}"
    );
}

/// A decision that ran in Redis after its timeout, and whose debit was given back, does
/// not leave the key refused here by a refusal decided between the two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_decisions_give_back_unblocks_a_key_that_a_refusal_blocked_meanwhile() {
    let server = RedisServer::start().await.expect("redis-server");
    // long enough for a loaded machine to answer the refusal below once writes go on
    let store = failing(
        &server.url(),
        "late-give-back",
        Duration::from_secs(2),
        RedisFailMode::Closed,
    )
    .await;
    let rule = one_rule(Algorithm::FixedWindow, 2, 1);
    assert!(store.check(&[rule.item()]).await.unwrap().admitted);
    hold_writes(server.addr()).await;
    // the late decision waits in Redis past its timeout
    let late = store.check(&[rule.item()]).await;
    assert!(late.is_err(), "the late decision timed out: {late:?}");
    // queued in Redis behind the late decision before Redis runs either: Redis runs the
    // late decision (the second unit), then refuses this one and it blocks the key
    let refusing = {
        let store = store.clone();
        let rule = rule.clone();
        tokio::spawn(async move { store.check(&[rule.item()]).await })
    };
    await_script_call_queued_behind(server.addr()).await;
    release_writes(server.addr()).await;
    let refused = refusing.await.unwrap().unwrap();
    assert!(!refused.admitted, "{refused:?}");
    await_late_returns(&[&store], 1, Duration::from_secs(60)).await;
    assert_eq!(remaining(&store, &rule).await, 1);
    let after = store.check(&[rule.item()]).await.unwrap();
    assert!(
        after.admitted,
        "the key is still refused locally: {after:?}"
    );
}

/// A flood of distinct keys, each refused until it is blocked, never holds more blocked
/// entries than the cache's capacity, and the newest blocked key is still answered locally.
#[tokio::test]
async fn a_flood_of_distinct_blocked_keys_keeps_the_blocked_cache_within_its_capacity() {
    let server = RedisServer::start().await.expect("redis-server");
    let store = RedisStore::builder()
        .url(server.url())
        .prefix(unique("flood"))
        .timeout(Duration::from_secs(2))
        .blocked_cache(40)
        .build()
        .await
        .unwrap();
    for i in 0..300 {
        let rule = Owned {
            key: RateKey::principal(format!("flood-{i}")),
            ..one_rule(Algorithm::FixedWindow, 1, 1)
        };
        assert!(store.check(&[rule.item()]).await.unwrap().admitted);
        assert!(store.health().blocked_keys <= 40, "{:?}", store.health());
        let hits = store.health().blocked_cache_hits;
        assert!(!store.check(&[rule.item()]).await.unwrap().admitted);
        assert_eq!(store.health().blocked_cache_hits, hits + 1, "flood-{i}");
    }
}

/// A reset key keeps its generation until its state from before the reset would have
/// expired, whatever is decided or settled after the reset. A GCRA decision after the reset
/// set the key's expiry to its own, shorter state, and a give-back after it (the request
/// failed downstream) to about a millisecond: the key then expired, started again at
/// generation 0, and a give-back from before the reset refunded requests admitted after it.
#[tokio::test]
async fn a_reset_keys_generation_outlives_what_is_decided_and_given_back_after_the_reset() {
    let server = RedisServer::start().await.expect("redis-server");
    let store = single(&server.url(), &unique("reset-expiry")).await;
    let rule = one_rule(Algorithm::Gcra, 10, 6);
    let name = store.key_name(rule.name, &rule.key);
    let pttl = || async {
        let reply = support::command(server.addr(), &format!("PTTL {name}"))
            .await
            .unwrap();
        reply.trim().trim_start_matches(':').parse::<i64>().unwrap()
    };
    let before = store.check(&[rule.item()]).await.unwrap().rules[0];
    assert!(before.debited);
    store.reset(rule.index, rule.name, &rule.key).await.unwrap();
    // the old state (6 of 10 units a window of 12.7 days) would have expired in 7.6 days
    let kept = pttl().await;
    assert!(kept > 7 * 86_400_000, "{kept} ms");
    let one = Owned {
        cost: 1,
        ..rule.clone()
    };
    let after = store.check(&[one.item()]).await.unwrap().rules[0];
    assert!(after.debited);
    assert!(
        pttl().await > kept - 60_000,
        "a decision shortened the reset key's life"
    );
    store.settle(&[settlement(&one, &after, -1)]).await.unwrap();
    let left = pttl().await;
    assert!(
        left > kept - 60_000,
        "a give-back shortened the reset key's life to {left} ms"
    );
    // a request for the whole quota, then the give-back from before the reset
    let all = Owned {
        cost: 10,
        ..rule.clone()
    };
    let last = store.check(&[all.item()]).await.unwrap().rules[0];
    assert!(last.debited);
    assert_eq!(last.generation, after.generation);
    store
        .settle(&[settlement(&rule, &before, -6)])
        .await
        .unwrap();
    assert_eq!(
        remaining(&store, &rule).await,
        0,
        "a give-back from before the reset refunded a later request"
    );
}

/// A GCRA give-back applies only to the state its reservation debited: once the key has
/// expired on its own (its bucket full again) and a new request has recreated it, a
/// give-back of a reservation made before refunds nothing (as after a reset), while the new
/// request's own give-back applies. The memory store agrees.
#[tokio::test]
async fn a_gcra_give_back_after_the_key_expired_does_not_refund_the_new_state() {
    let server = RedisServer::start().await.expect("redis-server");
    let both = Both::start(&server, "gcra-expiry").await;
    // 10 units a second: 6 units weigh 0.6 s, and the key lives 1 s longer (the grace of
    // explicit times)
    let rule = Owned {
        params: Params::new(Algorithm::Gcra, Quota::per_second(10)),
        ..one_rule(Algorithm::Gcra, 10, 6)
    };
    let seven = Owned {
        cost: 7,
        ..rule.clone()
    };
    let name = both.redis.key_name(rule.name, &rule.key);
    let sec = 1_000_000;
    let t0 = 1 << 40;
    let (before, mem_before) = both.check(&rule, t0).await;
    let (before, mem_before) = (before.rules[0], mem_before.rules[0]);
    assert!(before.debited);
    // Redis drops the key on its own
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let reply = support::command(server.addr(), &format!("EXISTS {name}"))
            .await
            .unwrap();
        if reply.trim() == ":0" {
            break;
        }
        assert!(Instant::now() < deadline, "the key never expired: {reply}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let at = t0 + 5 * sec;
    let (after, mem_after) = both.check(&seven, at).await;
    let (after, mem_after) = (after.rules[0], mem_after.rules[0]);
    assert!(after.debited);
    both.settle(&rule, (&before, &mem_before), -6, at)
        .await
        .unwrap();
    let left = both
        .redis
        .peek_at(&rule.item(), at)
        .await
        .unwrap()
        .remaining;
    assert_eq!(
        left, 3,
        "a give-back from before the key expired refunded a later request"
    );
    both.settle(&rule, (&after, &mem_after), -2, at)
        .await
        .unwrap();
    let (redis_peek, mem_peek) = both.peek(&rule, at).await;
    assert_eq!(redis_peek.remaining, 5);
    assert_eq!(mem_peek.remaining, 5);
    // the two stores name the same epochs
    assert_eq!(
        (before.window_start, after.window_start),
        (mem_before.window_start, mem_after.window_start)
    );
}

/// A GCRA charge (a request used more than it reserved) is kept in Redis as in the memory
/// store whatever epoch the key is in: a request that reserved 1 unit, used 6, and
/// settled after another request started the key afresh still pays its 5 units.
#[tokio::test]
async fn a_gcra_charge_from_an_earlier_epoch_is_kept() {
    let server = RedisServer::start().await.expect("redis-server");
    let both = Both::start(&server, "gcra-charge").await;
    let rule = Owned {
        params: Params::new(Algorithm::Gcra, Quota::per_second(10)),
        ..one_rule(Algorithm::Gcra, 10, 1)
    };
    let sec = 1_000_000;
    let t0 = 1 << 40;
    let (long, mem_long) = both.check(&rule, t0).await;
    let (long, mem_long) = (long.rules[0], mem_long.rules[0]);
    // full again after 0.1 s: at 5 s another request starts a new epoch
    let at = t0 + 5 * sec;
    let next = both.check(&rule, at).await.0.rules[0];
    assert!(long.debited && next.debited);
    assert_ne!(next.window_start, long.window_start);
    both.settle(&rule, (&long, &mem_long), 5, at).await.unwrap();
    let (left, mem_left) = both.peek(&rule, at).await;
    assert_eq!(
        (left.remaining, mem_left.remaining),
        (4, 4),
        "a charge from an earlier epoch was dropped"
    );
}

/// A GCRA give-back refunds at most what of its reservation is still outstanding, in
/// Redis as in the memory store. At 10 units a second, A takes 6 at 0 and B 5 at 0.5 s; by
/// then 5 of A's units have drained, so A giving its 6 back refunds one and the bucket
/// keeps B's 5 (it was left full: B's units refunded, 10 more admitted beside them). B's
/// own give-back then refunds its 5.
#[tokio::test]
async fn a_gcra_give_back_refunds_only_what_its_reservation_still_holds() {
    let server = RedisServer::start().await.expect("redis-server");
    let both = Both::start(&server, "gcra-outstanding").await;
    let rule = Owned {
        params: Params::new(Algorithm::Gcra, Quota::per_second(10)),
        ..one_rule(Algorithm::Gcra, 10, 6)
    };
    let five = Owned {
        cost: 5,
        ..rule.clone()
    };
    let t0 = 1 << 40;
    let half = t0 + 500_000;
    let (a, mem_a) = both.check(&rule, t0).await;
    assert_eq!(a, mem_a);
    let (b, mem_b) = both.check(&five, half).await;
    assert_eq!(b, mem_b);
    assert!(a.admitted && b.admitted);
    both.settle(&rule, (&a.rules[0], &mem_a.rules[0]), -6, half)
        .await
        .unwrap();
    let (left, mem_left) = both.peek(&rule, half).await;
    assert_eq!(
        left.remaining, 5,
        "a give-back refunded units a later request holds"
    );
    assert_eq!(left, mem_left);
    let six = both.redis.check_at(&[rule.item()], half).await.unwrap();
    assert!(!six.admitted, "{six:?}");
    both.settle(&rule, (&b.rules[0], &mem_b.rules[0]), -5, half)
        .await
        .unwrap();
    let (left, mem_left) = both.peek(&rule, half).await;
    assert_eq!(left.remaining, 10);
    assert_eq!(left, mem_left);
}

/// A give-back that another give-back has moved down the bucket refunds no more than what
/// of it is still outstanding there, in Redis as in the memory store. At 10 units a
/// second, X and A take 5 each at 0, X gives its 5 back at once (A's units now drain
/// first), B takes 5 at 0.49 s, and A gives its 5 back: 0.01 s of A is left, so the bucket
/// keeps B's 5 (counting A's end from its reservation alone refunded 4 of B's units).
#[tokio::test]
async fn a_gcra_give_back_moved_down_by_another_refunds_only_its_outstanding_part() {
    let server = RedisServer::start().await.expect("redis-server");
    let both = Both::start(&server, "gcra-moved").await;
    let rule = Owned {
        params: Params::new(Algorithm::Gcra, Quota::per_second(10)),
        ..one_rule(Algorithm::Gcra, 10, 5)
    };
    let t0 = 1 << 40;
    let later = t0 + 490_000;
    let mut taken = Vec::new();
    for at in [t0, t0, later] {
        if at == later {
            both.settle(&rule, (&taken[0], &taken[0]), -5, t0)
                .await
                .unwrap();
        }
        let (d, m) = both.check(&rule, at).await;
        assert_eq!(d, m);
        assert!(d.admitted, "{d:?}");
        taken.push(d.rules[0]);
    }
    both.settle(&rule, (&taken[1], &taken[1]), -5, later)
        .await
        .unwrap();
    let (left, mem_left) = both.peek(&rule, later).await;
    assert_eq!(left.remaining, 5, "A's give-back refunded B's units");
    assert_eq!(left, mem_left);
}

/// The layer carries a GCRA reservation's end to its settlement: a request that reserved
/// 10 units and used none gives them back through its `Reservation` (a settlement without
/// the end would give nothing back).
#[tokio::test]
async fn a_gcra_reservation_settled_through_the_layer_gives_back_what_it_holds() {
    use http::{Request, Response};
    use palisade::rate_limit::{Cost, KeySource, RateLimitLayer, Reservation, Rule};
    use tower::{Layer, ServiceExt, service_fn};

    let server = RedisServer::start().await.expect("redis-server");
    let layer = RateLimitLayer::builder()
        .store(single(&server.url(), &unique("layer-gcra")).await)
        .rule(
            Rule::new("tpm", Quota::per_minute(60))
                .algorithm(Algorithm::Gcra)
                .key(KeySource::ApiKey)
                .cost(Cost::Settled { estimate: 10 }),
        )
        .build()
        .unwrap();
    let limiter = layer.limiter();
    let svc = layer.layer(service_fn(|req: Request<()>| async move {
        let reservation = req.extensions().get::<Reservation>().expect("reserved");
        assert_eq!(reservation.reserved(), 10);
        reservation.settle(0).await.unwrap();
        Ok::<_, std::convert::Infallible>(Response::new(
            http_body_util::Empty::<bytes::Bytes>::new(),
        ))
    }));
    let request = Request::post("/v1/messages")
        .header("x-api-key", "sk-test-gcra")
        .body(())
        .unwrap();
    assert_eq!(svc.oneshot(request).await.unwrap().status(), 200);
    let status = limiter
        .peek("tpm", &RateKey::api_key("sk-test-gcra"))
        .await
        .unwrap();
    assert_eq!(
        status.remaining, 60,
        "the 10 reserved units were not given back"
    );
}

/// With the local fallback, a give-back of a reservation Redis made is not applied to the
/// local store when Redis is away: the local store never counted those units, and giving
/// them back there refunded requests it had admitted (a GCRA reservation, which has no
/// window to tell the stores apart).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_give_back_of_a_redis_reservation_refunds_nothing_in_the_local_fallback() {
    let mut server = RedisServer::start().await.expect("redis-server");
    let (store, local) = with_local_fallback(&server.url(), "local-give-back").await;
    let rule = one_rule(Algorithm::Gcra, 10, 5);
    let reserved = store.check(&[rule.item()]).await.unwrap();
    assert!(reserved.admitted);
    assert_eq!(store.health().degraded_decisions, 0, "Redis decided");
    server.kill();
    // Redis is away: the whole quota, decided locally
    let all = Owned {
        cost: 10,
        ..rule.clone()
    };
    assert!(store.check(&[all.item()]).await.unwrap().admitted);
    assert_eq!(store.health().degraded_decisions, 1);
    // the request Redis admitted used nothing
    store
        .settle(&[settlement(&rule, &reserved.rules[0], -5)])
        .await
        .unwrap();
    assert_eq!(
        local.peek_now(&rule.item()).remaining,
        0,
        "the local store gave back units it never counted"
    );
}

/// A reset forgets the key in the local fallback too: a key that the fallback exhausted
/// while Redis was away, and that was reset once Redis was back, is not refused by the
/// fallback's old count at the next outage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_forgets_the_key_in_the_local_fallback_too() {
    let mut server = RedisServer::start().await.expect("redis-server");
    let (store, local) = with_local_fallback(&server.url(), "local-reset").await;
    let rule = one_rule(Algorithm::FixedWindow, 10, 10);
    server.kill();
    assert!(store.check(&[rule.item()]).await.unwrap().admitted);
    assert_eq!(store.health().degraded_decisions, 1);
    assert_eq!(local.peek_now(&rule.item()).remaining, 0);
    server.restart().await;
    let restarted = Instant::now();
    while store.reset(rule.index, rule.name, &rule.key).await.is_err() {
        assert!(
            restarted.elapsed() < Duration::from_secs(5),
            "the restarted server never took the reset"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        local.peek_now(&rule.item()).remaining,
        10,
        "the reset key is still exhausted in the local fallback"
    );
}

/// On a Cluster, a script cache flushed on every master is loaded again by the next
/// decision, a settlement and a reset, whichever master holds the key.
#[tokio::test]
async fn a_flushed_script_cache_is_reloaded_on_every_cluster_master() {
    let cluster = RedisCluster::start().await.expect("redis cluster");
    let store = cluster_store(&cluster, "cluster-flush", Duration::from_secs(2)).await;
    let rules = per_user(12, Algorithm::Gcra, 3, 1);
    for rule in &rules {
        assert!(store.check(&[rule.item()]).await.unwrap().admitted);
    }
    let flush = || async {
        for &addr in cluster.addrs() {
            let reply = support::command(addr, "SCRIPT FLUSH").await.unwrap();
            assert!(reply.starts_with("+OK"), "{reply}");
        }
    };
    flush().await;
    let mut reserved = Vec::new();
    for rule in &rules {
        let d = store.check(&[rule.item()]).await.unwrap();
        assert!(d.admitted);
        reserved.push(d.rules[0]);
    }
    flush().await;
    for (rule, d) in rules.iter().zip(&reserved) {
        store.settle(&[settlement(rule, d, -1)]).await.unwrap();
        assert_eq!(remaining(&store, rule).await, 2);
    }
    flush().await;
    for rule in &rules {
        store.reset(rule.index, rule.name, &rule.key).await.unwrap();
        assert_eq!(remaining(&store, rule).await, 3);
    }
    assert!(store.health().healthy);
}

/// Sends `n` concurrent decisions, request `i` on `rule_of(i)`, while Redis is held up;
/// returns how many were admitted and how many were turned away for want of room (any
/// other error fails the test).
async fn bounded_burst(
    store: &RedisStore,
    n: usize,
    rule_of: impl Fn(usize) -> Owned,
) -> (usize, usize) {
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let store = store.clone();
            let rule = rule_of(i);
            tokio::spawn(async move {
                match store.check(&[rule.item()]).await {
                    Ok(d) => (usize::from(d.admitted), 0),
                    Err(e) => {
                        assert!(e.to_string().contains("already waiting"), "{e}");
                        (0, 1)
                    }
                }
            })
        })
        .collect();
    let (mut admitted, mut turned_away) = (0, 0);
    for t in tasks {
        let (a, r) = t.await.unwrap();
        admitted += a;
        turned_away += r;
    }
    (admitted, turned_away)
}

/// A burst while Redis stalls: the calls waiting for room are bounded, and those past the
/// bound are failed at once (their failure mode answers) instead of piling up in memory
/// and running in Redis long after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_while_redis_stalls_waits_in_a_bounded_queue() {
    let server = RedisServer::start().await.expect("redis-server");
    let store = failing(
        &server.url(),
        "bounded",
        Duration::from_secs(10),
        RedisFailMode::Closed,
    )
    .await;
    let rule = one_rule(Algorithm::FixedWindow, 10, 1);
    assert_eq!(remaining(&store, &rule).await, 10);
    pause_writes(server.addr(), 2_000).await;
    // two calls in flight (held up), 8,192 waiting, the rest failed at once
    let burst = 10_000;
    let (admitted, turned_away) = bounded_burst(&store, burst, |_| rule.clone()).await;
    assert_eq!(turned_away, burst - 2 - 8_192);
    assert_eq!(admitted, 10);
    assert_eq!(remaining(&store, &rule).await, 0);
}

/// A caller cancelled while its decision waits for room: the decision is never sent, so
/// Redis holds no debit that nobody owns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decision_cancelled_while_it_waits_for_room_is_not_sent() {
    let server = RedisServer::start().await.expect("redis-server");
    let store = failing(
        &server.url(),
        "cancelled",
        Duration::from_secs(10),
        RedisFailMode::Closed,
    )
    .await;
    let rule = one_rule(Algorithm::FixedWindow, 10, 1);
    assert_eq!(remaining(&store, &rule).await, 10);
    pause_writes(server.addr(), 1_000).await;
    // two decisions take the connection's two places, held up by the pause
    let held: Vec<_> = (0..2)
        .map(|_| {
            let store = store.clone();
            let rule = rule.clone();
            tokio::spawn(async move { store.check(&[rule.item()]).await.unwrap().admitted })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // a third waits for room, and its caller goes away
    let gone = tokio::time::timeout(Duration::from_millis(200), store.check(&[rule.item()])).await;
    assert!(gone.is_err(), "{gone:?}");
    for h in held {
        assert!(h.await.unwrap());
    }
    // room again: had the cancelled decision been kept, it would be sent now
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        remaining(&store, &rule).await,
        8,
        "a cancelled decision debited Redis"
    );
}

/// The connection killed while a batch is in flight and more decisions wait: each decision
/// is answered once, by Redis or by the local fallback (counted there once), none hangs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_killed_mid_batch_answers_each_decision_once() {
    let server = RedisServer::start().await.expect("redis-server");
    let local = MemoryStore::new();
    let store = RedisStore::builder()
        .url(server.url())
        .prefix(unique("killed"))
        .timeout(Duration::from_secs(10))
        .on_failure(RedisFailMode::Local)
        .fallback(local.clone())
        .build()
        .await
        .unwrap();
    let rule = one_rule(Algorithm::FixedWindow, 1_000, 1);
    assert_eq!(remaining(&store, &rule).await, 1_000);
    pause_writes(server.addr(), 1_000).await;
    let decisions = 300;
    let tasks: Vec<_> = (0..decisions)
        .map(|_| {
            let store = store.clone();
            let rule = rule.clone();
            tokio::spawn(async move { store.check(&[rule.item()]).await.unwrap().admitted })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let killed = support::command(server.addr(), "CLIENT KILL TYPE normal")
        .await
        .unwrap();
    assert!(killed.starts_with(':'), "{killed}");
    for t in tasks {
        assert!(t.await.unwrap());
    }
    let in_redis = 1_000 - remaining(&store, &rule).await;
    let in_local = 1_000 - local.peek(&rule.item()).await.unwrap().remaining;
    let health = store.health();
    assert_eq!(in_redis + in_local, decisions, "{health:?}");
    assert_eq!(health.degraded_decisions, in_local, "{health:?}");
    assert!(in_local > 0, "{health:?}");
}

/// A call of a batch that fails in the script (its key holds another type) fails alone:
/// the others of the batch are answered with their own decisions, exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_failing_in_a_batch_fails_alone() {
    let server = RedisServer::start().await.expect("redis-server");
    let store = failing(
        &server.url(),
        "one-fails",
        Duration::from_secs(10),
        RedisFailMode::Closed,
    )
    .await;
    let good = one_rule(Algorithm::FixedWindow, 5, 1);
    let broken = Owned {
        name: "broken",
        ..good.clone()
    };
    let name = store.key_name(broken.name, &broken.key);
    let pushed = support::command(server.addr(), &format!("LPUSH {name} x"))
        .await
        .unwrap();
    assert!(pushed.starts_with(":1"), "{pushed}");
    assert_eq!(remaining(&store, &good).await, 5);
    pause_writes(server.addr(), 500).await;
    let tasks: Vec<_> = (0..40)
        .map(|i| {
            let store = store.clone();
            let rule = if i % 2 == 0 { &good } else { &broken }.clone();
            tokio::spawn(async move { (i, store.check(&[rule.item()]).await) })
        })
        .collect();
    let mut admitted = 0;
    for t in tasks {
        let (i, answer) = t.await.unwrap();
        if i % 2 == 0 {
            let d = answer.unwrap();
            admitted += usize::from(d.admitted);
            assert_eq!(d.rules.len(), 1);
        } else {
            assert!(answer.is_err(), "{answer:?}");
        }
    }
    assert_eq!(admitted, 5);
    assert!(store.health().batched_calls > 0, "{:?}", store.health());
    assert_eq!(remaining(&store, &good).await, 0);
}

/// The script cache flushed while decisions go in batches: each batch loads the script
/// again and the limit is admitted exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_after_a_script_flush_admit_exactly_the_limit() {
    let server = RedisServer::start().await.expect("redis-server");
    let store = RedisStore::builder()
        .url(server.url())
        .prefix(unique("flushed-batch"))
        .timeout(Duration::from_secs(10))
        .blocked_cache(0)
        .build()
        .await
        .unwrap();
    for (round, name) in ["first", "second", "third"].into_iter().enumerate() {
        let rule = Owned {
            name,
            ..one_rule(Algorithm::SlidingWindow, 50, 1)
        };
        let flushed = support::command(server.addr(), "SCRIPT FLUSH")
            .await
            .unwrap();
        assert!(flushed.starts_with("+OK"), "{flushed}");
        let tasks: Vec<_> = (0..200)
            .map(|_| {
                let store = store.clone();
                let rule = rule.clone();
                tokio::spawn(async move { store.check(&[rule.item()]).await.unwrap().admitted })
            })
            .collect();
        let mut admitted = 0;
        for t in tasks {
            admitted += usize::from(t.await.unwrap());
        }
        assert_eq!(admitted, 50, "round {round}");
    }
    assert!(store.health().batched_calls > 0, "{:?}", store.health());
    assert_eq!(store.health().failures, 0, "{:?}", store.health());
}

/// A give-back whose caller went away while it waited for room is still sent: the units
/// it returns would otherwise stay counted until the window passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_give_back_whose_caller_went_away_while_it_waited_is_still_sent() {
    let server = RedisServer::start().await.expect("redis-server");
    let store = failing(
        &server.url(),
        "give-back-gone",
        Duration::from_secs(10),
        RedisFailMode::Closed,
    )
    .await;
    let rule = one_rule(Algorithm::FixedWindow, 10, 4);
    let reserved = store.check(&[rule.item()]).await.unwrap();
    assert!(reserved.admitted);
    pause_writes(server.addr(), 1_000).await;
    let probe = Owned {
        cost: 1,
        ..rule.clone()
    };
    let held: Vec<_> = (0..2)
        .map(|_| {
            let store = store.clone();
            let probe = probe.clone();
            tokio::spawn(async move { store.check(&[probe.item()]).await.unwrap().admitted })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let gone = tokio::time::timeout(
        Duration::from_millis(200),
        store.settle(&[settlement(&rule, &reserved.rules[0], -4)]),
    )
    .await;
    assert!(gone.is_err(), "{gone:?}");
    for h in held {
        assert!(h.await.unwrap());
    }
    // 10 - 4 reserved - 2 held + 4 given back; waits for the give-back, sent after the
    // held decisions
    let deadline = Instant::now() + Duration::from_secs(10);
    while remaining(&store, &rule).await != 8 {
        assert!(Instant::now() < deadline, "the give-back was dropped");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Batches on several slots keep going through a Cluster failover: no call crosses slots,
/// and once the late answers are in, Redis counts exactly what was admitted on every key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_through_a_cluster_failover_count_exactly_what_was_admitted() {
    let cluster = RedisCluster::start_with_replicas()
        .await
        .expect("redis cluster with replicas");
    let store = cluster_store(&cluster, "failover-batch", Duration::from_millis(500)).await;
    let rules = per_user(8, Algorithm::FixedWindow, 100_000, 1);
    for rule in &rules {
        assert!(store.check(&[rule.item()]).await.unwrap().admitted);
    }
    let admitted: Arc<Vec<AtomicU64>> = Arc::new(rules.iter().map(|_| AtomicU64::new(1)).collect());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workers: Vec<_> = (0..32)
        .map(|w| {
            let (store, rules, admitted, stop) =
                (store.clone(), rules.clone(), admitted.clone(), stop.clone());
            tokio::spawn(async move {
                let mut i = w;
                while !stop.load(Ordering::Relaxed) {
                    let k = i % rules.len();
                    i += 1;
                    match store.check(&[rules[k].item()]).await {
                        Ok(d) => {
                            assert!(d.admitted, "{d:?}");
                            admitted[k].fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            assert!(!e.to_string().contains("CROSSSLOT"), "{e}");
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                    }
                }
            })
        })
        .collect();
    // promote the replica of the master holding the first key
    let key = store.key_name(rules[0].name, &rules[0].key);
    let start = Instant::now();
    cluster.fail_over_slot(cluster.key_slot(&key).await).await;
    // decisions go on after it
    let before = admitted[0].load(Ordering::Relaxed);
    while admitted[0].load(Ordering::Relaxed) < before + 50 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no decision after the failover"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    assert!(store.health().batched_calls > 0, "{:?}", store.health());
    // late decisions give back what they debited: wait for the counts to agree
    let deadline = Instant::now() + Duration::from_secs(15);
    for (k, rule) in rules.iter().enumerate() {
        loop {
            let used = 100_000 - remaining(&store, rule).await;
            let want = admitted[k].load(Ordering::Relaxed);
            if used == want {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "key {k}: Redis counts {used}, {want} admitted: {:?}",
                store.health()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A reset made while decisions wait for room, then a decision and a give-back of a
/// reservation made before the reset, batched together: the decision counts against the
/// fresh state and the give-back refunds nothing of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batched_give_back_of_a_reservation_from_before_a_reset_refunds_nothing() {
    for algorithm in ALGORITHMS {
        let server = RedisServer::start().await.expect("redis-server");
        let store = RedisStore::builder()
            .url(server.url())
            .prefix(unique("reset-batch"))
            .timeout(Duration::from_secs(10))
            .blocked_cache(0)
            .build()
            .await
            .unwrap();
        let rule = one_rule(algorithm, 10, 6);
        let old = store.check(&[rule.item()]).await.unwrap();
        assert!(old.admitted);
        pause_writes(server.addr(), 600).await;
        let probe = Owned {
            cost: 1,
            ..rule.clone()
        };
        let held: Vec<_> = (0..2)
            .map(|_| {
                let store = store.clone();
                let probe = probe.clone();
                tokio::spawn(async move { store.check(&[probe.item()]).await.unwrap() })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let reset = {
            let store = store.clone();
            let rule = rule.clone();
            tokio::spawn(async move { store.reset(rule.index, rule.name, &rule.key).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        let three = Owned {
            cost: 3,
            ..rule.clone()
        };
        let (after, give_back) = tokio::join!(
            store.check(&[three.item()]),
            store.settle(&[settlement(&rule, &old.rules[0], -6)])
        );
        for h in held {
            h.await.unwrap();
        }
        reset.await.unwrap().unwrap();
        give_back.unwrap();
        let after = after.unwrap();
        assert!(after.admitted, "{algorithm:?}: {after:?}");
        assert_eq!(
            remaining(&store, &rule).await,
            7,
            "{algorithm:?}: {:?}",
            store.health()
        );
    }
}

/// Batched decisions that all miss the timeout, failing to the local store: each is
/// decided there once (exactly the limit admitted), and every debit their late runs made
/// in Redis is given back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_decisions_past_the_timeout_fall_back_locally_once_each() {
    let server = RedisServer::start().await.expect("redis-server");
    let (store, local) = with_local_fallback(&server.url(), "late-local-batch").await;
    let rule = one_rule(Algorithm::SlidingWindow, 100, 1);
    assert_eq!(remaining(&store, &rule).await, 100);
    pause_writes(server.addr(), 500).await;
    let tasks: Vec<_> = (0..300)
        .map(|_| {
            let store = store.clone();
            let rule = rule.clone();
            tokio::spawn(async move { store.check(&[rule.item()]).await.unwrap().admitted })
        })
        .collect();
    let mut admitted = 0;
    for t in tasks {
        admitted += usize::from(t.await.unwrap());
    }
    assert_eq!(admitted, 100);
    assert_eq!(store.health().degraded_decisions, 300);
    assert_eq!(local.peek(&rule.item()).await.unwrap().remaining, 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let health = store.health();
        if health.late_debits_returned >= 100 && remaining(&store, &rule).await == 100 {
            break;
        }
        assert!(Instant::now() < deadline, "{health:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(store.health().batched_calls > 0, "{:?}", store.health());
}

/// `RedisHealth::round_trips` counts the calls Redis answered, each call of a batch once:
/// under load more than the script calls Redis ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trips_count_each_call_of_a_batch() {
    let server = RedisServer::start().await.expect("redis-server");
    let store = RedisStore::builder()
        .url(server.url())
        .prefix(unique("counted"))
        .timeout(Duration::from_secs(10))
        .blocked_cache(0)
        .build()
        .await
        .unwrap();
    let rule = one_rule(Algorithm::FixedWindow, 1_000, 1);
    assert_eq!(remaining(&store, &rule).await, 1_000);
    reset_stats(&server.url()).await;
    let before = store.health().round_trips;
    let tasks: Vec<_> = (0..500)
        .map(|_| {
            let store = store.clone();
            let rule = rule.clone();
            tokio::spawn(async move { store.check(&[rule.item()]).await.unwrap().admitted })
        })
        .collect();
    for t in tasks {
        assert!(t.await.unwrap());
    }
    let health = store.health();
    assert_eq!(health.round_trips - before, 500, "{health:?}");
    assert_eq!(health.failures, 0, "{health:?}");
    let script_calls = calls(&server.url(), "evalsha").await;
    assert!(
        script_calls < 500,
        "{script_calls} script calls: {health:?}"
    );
}

/// One Cluster master held up does not hold up decisions on the others: calls wait for
/// room only behind calls of their own slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_up_cluster_master_does_not_hold_up_keys_on_the_others() {
    let cluster = RedisCluster::start().await.expect("redis cluster");
    let store = RedisStore::builder()
        .cluster(cluster.urls())
        .prefix(unique("head-of-line"))
        .timeout(Duration::from_millis(500))
        .on_failure(RedisFailMode::Closed)
        .build()
        .await
        .unwrap();
    // the master of a key: the node that answers for it without a redirection
    let owner = |key: String| {
        let addrs = cluster.addrs().to_vec();
        async move {
            for addr in addrs {
                let reply = support::command(addr, &format!("EXISTS {key}"))
                    .await
                    .unwrap();
                if reply.starts_with(':') {
                    return addr;
                }
            }
            panic!("no master answers for {key}");
        }
    };
    let rule_of = |i: usize| Owned {
        key: RateKey::principal(format!("user-{i}")),
        ..one_rule(Algorithm::FixedWindow, 100, 1)
    };
    let held_rule = rule_of(0);
    let held_node = owner(store.key_name(held_rule.name, &held_rule.key)).await;
    let mut free_rule = None;
    for i in 1..100 {
        let rule = rule_of(i);
        if owner(store.key_name(rule.name, &rule.key)).await != held_node {
            free_rule = Some(rule);
            break;
        }
    }
    let free_rule = free_rule.expect("a key on another master");
    for rule in [&held_rule, &free_rule] {
        assert!(store.check(&[rule.item()]).await.unwrap().admitted);
    }
    pause_writes(held_node, 1_500).await;
    let held: Vec<_> = (0..2)
        .map(|_| {
            let store = store.clone();
            let rule = held_rule.clone();
            tokio::spawn(async move { store.check(&[rule.item()]).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    for _ in 0..3 {
        let d = store.check(&[free_rule.item()]).await;
        assert!(
            d.as_ref().is_ok_and(|d| d.admitted),
            "{d:?} {:?}",
            store.health()
        );
    }
    for h in held {
        let _ = h.await.unwrap();
    }
}

/// On a Cluster the bound on waiting calls holds for all slots together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_on_many_cluster_slots_waits_in_one_bounded_queue() {
    let cluster = RedisCluster::start().await.expect("redis cluster");
    let store = RedisStore::builder()
        .cluster(cluster.urls())
        .prefix(unique("bounded-cluster"))
        .timeout(Duration::from_secs(10))
        .on_failure(RedisFailMode::Closed)
        .build()
        .await
        .unwrap();
    let rules = per_user(8, Algorithm::FixedWindow, 10, 1);
    let mut slots = std::collections::BTreeSet::new();
    for rule in &rules {
        assert_eq!(remaining(&store, rule).await, 10);
        let key = store.key_name(rule.name, &rule.key);
        slots.insert(cluster.key_slot(&key).await);
    }
    for addr in cluster.addrs() {
        pause_writes(*addr, 2_000).await;
    }
    let burst = 10_000;
    let (admitted, turned_away) =
        bounded_burst(&store, burst, |i| rules[i % rules.len()].clone()).await;
    // two calls in flight on each slot, 8,192 waiting in all
    assert_eq!(turned_away, burst - 2 * slots.len() - 8_192);
    assert_eq!(admitted, 10 * rules.len());
}

/// A settlement of the largest charge (`i64::MAX` units, what a request reporting
/// `u64::MAX` used settles) leaves the key refused in Redis as in the memory store, and
/// the key answers afterwards: for every algorithm.
#[tokio::test]
async fn the_largest_charge_settles_as_in_the_memory_store() {
    let server = RedisServer::start().await.expect("redis-server");
    for (algorithm, name) in ALGORITHMS.into_iter().zip(["sliding", "fixed", "gcra"]) {
        let both = Both::start(&server, "huge-charge").await;
        let rule = Owned {
            name,
            ..one_rule(algorithm, 10, 1)
        };
        let t0 = 1 << 40;
        let (d, m) = both.check(&rule, t0).await;
        let settled = both
            .settle(&rule, (&d.rules[0], &m.rules[0]), i64::MAX, t0)
            .await;
        assert!(settled.is_ok(), "{algorithm:?}: {settled:?}");
        let (got, want) = both.peek(&rule, t0).await;
        assert_eq!(got.remaining, want.remaining, "{algorithm:?}");
        let again = both.redis.check_at(&[rule.item()], t0).await;
        let again = again.unwrap_or_else(|e| panic!("{algorithm:?}: {e}"));
        assert!(!again.admitted, "{algorithm:?}: {again:?}");
    }
}

/// A field of `INFO section` on one server, as a number.
async fn info_number(url: &str, section: &str, field: &str) -> u64 {
    let mut conn = redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let info: String = redis::cmd("INFO")
        .arg(section)
        .query_async(&mut conn)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in {info}"))
        .trim()
        .parse()
        .unwrap()
}

/// The server's connected clients once they number `want`, asked again (up to 1,000 times)
/// while they do not: a connection closed just before (the start-up check's, an earlier
/// question's own) is counted until the server has handled its close, which a busy machine
/// delays. Returns the last count.
async fn connected_clients_settled(url: &str, want: u64) -> u64 {
    let mut clients = 0;
    for _ in 0..1000 {
        clients = info_number(url, "clients", "connected_clients").await;
        if clients == want {
            break;
        }
        tokio::task::yield_now().await;
    }
    clients
}

/// A store on one server is connected, and its script loaded, once `build` returns (the
/// server being up). Its first decision is then one script call: before, it also made the
/// connection, met `NOSCRIPT` and loaded the script, all within the decision's timeout
/// (50 ms by default), which a busy machine or a distant server misses, so the first
/// request after start-up failed closed (a 529 in the gateway).
#[tokio::test]
async fn a_store_on_one_server_is_connected_and_its_script_loaded_once_built() {
    let server = RedisServer::start().await.expect("redis-server");
    let url = server.url();
    // `info_number` itself holds one connection while it asks
    assert_eq!(connected_clients_settled(&url, 1).await, 1);
    assert_eq!(
        info_number(&url, "memory", "number_of_cached_scripts").await,
        0
    );
    let store = single(&url, &unique("warm")).await;
    assert_eq!(
        connected_clients_settled(&url, 2).await,
        2,
        "the store's connection is open"
    );
    assert_eq!(
        info_number(&url, "memory", "number_of_cached_scripts").await,
        1,
        "the store's script is loaded"
    );
    reset_stats(&url).await;
    let rules = group(Algorithm::SlidingWindow, 1);
    let items: Vec<CheckItem<'_>> = rules.iter().map(Owned::item).collect();
    assert!(store.check(&items).await.unwrap().admitted);
    assert_eq!(calls(&url, "evalsha").await, 1, "one script call");
    assert_eq!(calls(&url, "script|load").await, 0);
}

/// A store built while its server is down still builds, within its connection timeout,
/// and its first decision once the server is back connects and is answered by Redis (not
/// the error of the connection attempt made at build).
#[tokio::test]
async fn a_store_built_while_its_server_is_down_decides_in_redis_on_its_first_call_once_it_is_up() {
    let mut server = RedisServer::start().await.expect("redis-server");
    let url = server.url();
    server.kill();
    let started = Instant::now();
    let store = RedisStore::builder()
        .url(&url)
        .prefix(unique("down"))
        .timeout(Duration::from_secs(2))
        .on_failure(RedisFailMode::Closed)
        .build()
        .await
        .expect("building succeeds while the server is down");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "build took {:?}",
        started.elapsed()
    );
    server.restart().await;
    let rules = group(Algorithm::SlidingWindow, 1);
    let items: Vec<CheckItem<'_>> = rules.iter().map(Owned::item).collect();
    let first = store.check(&items).await;
    assert!(
        first.as_ref().is_ok_and(|d| d.admitted),
        "the first decision: {first:?}"
    );
    assert_eq!(calls(&url, "evalsha").await, 2, "NOSCRIPT, then the script");
}

/// A server that accepts the connection but never answers holds `build` for the
/// connection timeout (the larger of the timeout and 250 ms), no longer.
#[tokio::test]
async fn building_against_a_silent_server_waits_the_connection_timeout_and_no_longer() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let held = Arc::new(tokio::sync::Mutex::new(Vec::new()));
    let accepting = {
        let held = held.clone();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                held.lock().await.push(socket);
            }
        })
    };
    for (timeout, bound) in [
        (Duration::from_millis(50), Duration::from_millis(250)),
        (Duration::from_millis(600), Duration::from_millis(600)),
    ] {
        let started = Instant::now();
        let store = RedisStore::builder()
            .url(format!("redis://{addr}/"))
            .prefix(unique("silent"))
            .timeout(timeout)
            .build()
            .await
            .expect("building succeeds");
        let took = started.elapsed();
        assert!(took >= bound, "{timeout:?}: build took {took:?}");
        assert!(
            took < bound + Duration::from_secs(5),
            "{timeout:?}: build took {took:?}"
        );
        drop(store);
    }
    accepting.abort();
}

/// A wrong password does not fail `build` (a single server may be down when the store is
/// built): the first decision fails with the server's error, which the failure mode
/// answers; with the right one, the script is loaded at build.
#[tokio::test]
async fn a_wrong_password_shows_on_the_first_decision_and_the_right_one_loads_at_build() {
    let server = RedisServer::start().await.expect("redis-server");
    let set = support::command(server.addr(), "CONFIG SET requirepass s3cret")
        .await
        .unwrap();
    assert!(set.starts_with("+OK"), "{set}");
    let rules = group(Algorithm::FixedWindow, 1);
    let items: Vec<CheckItem<'_>> = rules.iter().map(Owned::item).collect();
    let wrong = RedisStore::builder()
        .url(format!("redis://:wrong@{}/", server.addr()))
        .prefix(unique("auth"))
        .timeout(Duration::from_secs(2))
        .on_failure(RedisFailMode::Closed)
        .build()
        .await
        .expect("building succeeds");
    let first = wrong.check(&items).await;
    assert!(first.is_err(), "{first:?}");
    let right = RedisStore::builder()
        .url(format!("redis://:s3cret@{}/", server.addr()))
        .prefix(unique("auth"))
        .timeout(Duration::from_secs(2))
        .on_failure(RedisFailMode::Closed)
        .build()
        .await
        .expect("building succeeds");
    assert!(right.check(&items).await.unwrap().admitted);
}

/// The script's batch of 64 calls of two rules answers 1,344 integers, packed in chunks of
/// 200 that split calls: each call's part is its length and then exactly what the same
/// call answers alone, in the same order on the same state.
#[tokio::test]
async fn a_batch_of_64_calls_answers_each_exactly_as_alone() {
    let server = RedisServer::start().await.expect("redis-server");
    let mut conn = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let script = include_str!("../src/rate_limit/store/redis/decide.lua");
    let words = |bytes: Vec<u8>| -> Vec<i64> {
        assert_eq!(bytes.len() % 8, 0);
        bytes
            .chunks_exact(8)
            .map(|w| i64::from_le_bytes(w.try_into().unwrap()))
            .collect()
    };
    // call i: its two keys, then its numbers as the script reads them (8 bytes each): the
    // time, the grace and each rule's
    let call = |prefix: &str, i: u64| {
        let keys = vec![format!("{prefix}:a{}", i % 3), format!("{prefix}:g")];
        let mut numbers: Vec<u8> = Vec::new();
        for n in [1_000_000 + i * 1_000, 0] {
            numbers.extend(n.to_le_bytes());
        }
        for (r, limit) in [(i % 3, 3 + i % 2), (2 - i % 3, 40)] {
            for n in [r, limit, 60_000_000, limit, 0, 1 + i % 2, 0] {
                numbers.extend(n.to_le_bytes());
            }
        }
        (keys, numbers)
    };
    let mut keys = Vec::new();
    let mut args: Vec<Vec<u8>> = vec![b"b".to_vec(), b"64".to_vec()];
    for i in 0..64 {
        let (k, numbers) = call("batch", i);
        args.extend([b"c".to_vec(), b"2".to_vec(), numbers]);
        keys.extend(k);
    }
    let batch: Vec<u8> = redis::cmd("EVAL")
        .arg(script)
        .arg(keys.len())
        .arg(&keys)
        .arg(&args)
        .query_async(&mut conn)
        .await
        .unwrap();
    let batch = words(batch);
    assert_eq!(batch.len(), 64 * (1 + 2 + 2 * 9));
    let mut at = 0;
    for i in 0..64 {
        let (k, numbers) = call("alone", i);
        let alone: Vec<u8> = redis::cmd("EVAL")
            .arg(script)
            .arg(2)
            .arg(&k)
            .arg("c")
            .arg(numbers)
            .query_async(&mut conn)
            .await
            .unwrap();
        let alone = words(alone);
        assert_eq!(batch[at], i64::try_from(alone.len()).unwrap(), "call {i}");
        assert_eq!(&batch[at + 1..at + 1 + alone.len()], &alone[..], "call {i}");
        at += 1 + alone.len();
    }
    assert_eq!(at, batch.len());
}

/// A window's end past 2^53 µs is not a double the script can hold (its start, below 2^53,
/// plus a window below 2^52): the time until it, the decision's `reset`, is still exact, as
/// in the memory store (a window of about 60 years, checked in the year 2211).
#[tokio::test]
async fn a_reset_whose_window_ends_past_2_53_is_exact() {
    let server = RedisServer::start().await.expect("redis-server");
    let both = Both::start(&server, "late-reset").await;
    let window = Duration::from_micros(1_904_176_396_976_475);
    let at = 7_635_004_549_537_266;
    for (index, algorithm) in [Algorithm::FixedWindow, Algorithm::SlidingWindow]
        .into_iter()
        .enumerate()
    {
        let rule = Owned {
            index: u32::try_from(index).unwrap(),
            name: match algorithm {
                Algorithm::FixedWindow => "fixed",
                _ => "sliding",
            },
            params: Params::new(algorithm, Quota::new(5, window)),
            ..one_rule(algorithm, 5, 1)
        };
        let (redis, memory) = both.check(&rule, at).await;
        assert!(redis.admitted && memory.admitted, "{algorithm:?}");
        assert_eq!(
            redis.rules[0].reset_micros, memory.rules[0].reset_micros,
            "{algorithm:?}"
        );
        assert_eq!(redis.rules[0], memory.rules[0], "{algorithm:?}");
    }
}

/// A GCRA rule whose limit, burst and window are each below 2^52 but whose tolerance (the
/// burst's µs, `burst × window / limit`) reaches 2^52 cannot be decided exactly in the
/// script's doubles (the time plus it passes 2^53): the store refuses it with an error
/// naming the rule, as it refuses a limit past 2^52, never an inexact answer.
#[tokio::test]
async fn a_gcra_rule_whose_burst_spans_past_2_53_us_is_refused_not_inexact() {
    let server = RedisServer::start().await.expect("redis-server");
    let both = Both::start(&server, "wide-burst").await;
    for (n, (limit, window, burst)) in [
        (1, 86_400_000_000, 200_000),
        (1, 1 << 51, 1 << 51),
        (3, (1 << 51) - 1, 1 << 40),
        (1, 86_400_000_000, 50_000),
    ]
    .into_iter()
    .enumerate()
    {
        let rule = Owned {
            index: u32::try_from(n).unwrap(),
            key: RateKey::principal(format!("wide-{n}")),
            params: Params {
                algorithm: Algorithm::Gcra,
                limit,
                window,
                burst,
                strict: false,
            },
            ..one_rule(Algorithm::Gcra, 1, 1)
        };
        let mut at = 1_765_000_000_000_001;
        for _ in 0..20 {
            let redis = both.redis.check_at(&[rule.item()], at).await;
            let memory = both.memory.check_at(&[rule.item()], at);
            let span = (u128::from(burst) * u128::from(window)).div_ceil(u128::from(limit));
            if span >= 1 << 52 {
                let e = redis.expect_err("refused");
                assert!(e.to_string().contains("rule `per-key`"), "{e}");
            } else {
                assert_eq!(redis.unwrap(), memory, "at {at}");
            }
            at += 1_234_567;
        }
    }
}

/// A window key is written with an expiry only when the one it has ends before its state
/// is back to fresh: a decision that needs the key for less time (here a client whose
/// clock runs ahead) keeps the longer expiry, one that needs it for longer (a client behind,
/// a new window) lengthens it.
#[tokio::test]
async fn a_window_keys_expiry_is_kept_when_long_enough_and_lengthened_when_not() {
    let server = RedisServer::start().await.expect("redis-server");
    let store = single(&server.url(), &unique("window-expiry")).await;
    let window = 100_000_000; // µs
    let rule = Owned {
        params: Params::new(
            Algorithm::SlidingWindow,
            Quota::new(100, Duration::from_micros(window)),
        ),
        ..one_rule(Algorithm::SlidingWindow, 100, 1)
    };
    let name = store.key_name(rule.name, &rule.key);
    let pttl = || async {
        let reply = support::command(server.addr(), &format!("PTTL {name}"))
            .await
            .unwrap();
        reply.trim().trim_start_matches(':').parse::<i64>().unwrap()
    };
    let start = 1_000 * window;
    let check = |at: u64| {
        let item = rule.item();
        let store = &store;
        async move {
            let decision = store.check_at(&[item], at).await.unwrap();
            assert!(decision.admitted, "{decision:?}");
        }
    };
    // 90 s into the window: the state is fresh 110 s later (two windows from its start),
    // plus the client clock's grace of 1 s
    check(start + 90_000_000).await;
    let first = pttl().await;
    assert!((100_000..=111_000).contains(&first), "{first} ms");
    // a client 60 s behind needs the key 60 s longer
    check(start + 30_000_000).await;
    let behind = pttl().await;
    assert!(behind > 160_000, "{behind} ms");
    // the client ahead again: the longer expiry stays
    check(start + 90_000_000).await;
    let kept = pttl().await;
    assert!(kept > 160_000, "the expiry was shortened to {kept} ms");
    // the next window's state is fresh two windows from its start
    check(start + window).await;
    let next = pttl().await;
    assert!(next > 190_000, "{next} ms");
}

/// Settlements that charge past every count (each delta saturates below 2^52) pile a
/// window's count up past 2^63: the key still holds a readable state, and the rule denies
/// as the memory store's saturated count does, rather than failing every later decision
/// on the key.
#[tokio::test]
async fn a_count_charged_past_2_63_by_settlements_still_decides() {
    let server = RedisServer::start().await.expect("redis-server");
    let both = Both::start(&server, "huge-count").await;
    let at = 1_000 * LONG.as_micros() as u64 + 5;
    for algorithm in [Algorithm::FixedWindow, Algorithm::SlidingWindow] {
        let rule = Owned {
            key: RateKey::principal(format!("{algorithm:?}")),
            ..one_rule(algorithm, 10, 1)
        };
        let (redis, memory) = both.check(&rule, at).await;
        assert!(redis.admitted && memory.admitted);
        let charges = vec![settlement(&rule, &redis.rules[0], i64::MAX); 64];
        for _ in 0..40 {
            both.redis.settle_at(&charges, at).await.unwrap();
        }
        both.memory.settle_now(&charges);
        let (redis, memory) = both.check(&rule, at + 1).await;
        assert!(!memory.admitted);
        assert!(!redis.admitted, "{algorithm:?}: {redis:?}");
        let name = both.redis.key_name(rule.name, &rule.key);
        let state = support::command(server.addr(), &format!("GET {name}"))
            .await
            .unwrap();
        assert!(!state.contains('-'), "{algorithm:?}: {state}");
    }
}

/// A reset of a key at the last generation (2^32 - 1) wraps to generation 0: the state
/// starts fresh, and a settlement of a reservation made before the reset settles nothing.
#[tokio::test]
async fn a_reset_at_the_last_generation_wraps_to_0_and_drops_older_settlements() {
    let server = RedisServer::start().await.expect("redis-server");
    let store = single(&server.url(), &unique("wrap")).await;
    let rule = one_rule(Algorithm::FixedWindow, 10, 4);
    let at = 1_000 * LONG.as_micros() as u64 + 5;
    let name = store.key_name(rule.name, &rule.key);
    let start = at - at % LONG.as_micros() as u64;
    let set = format!("SET {name} \"{start} 0 3 4294967295\" PX 100000000");
    support::command(server.addr(), &set).await.unwrap();
    let before = store.check_at(&[rule.item()], at).await.unwrap();
    assert!(before.admitted);
    assert_eq!(before.rules[0].generation, u32::MAX);
    assert_eq!(before.rules[0].remaining, 3);
    store.reset(rule.index, rule.name, &rule.key).await.unwrap();
    let after = store.check_at(&[rule.item()], at).await.unwrap();
    assert!(after.admitted);
    assert_eq!(after.rules[0].generation, 0);
    assert_eq!(after.rules[0].remaining, 6);
    store
        .settle_at(&[settlement(&rule, &before.rules[0], -4)], at)
        .await
        .unwrap();
    store
        .settle_at(&[settlement(&rule, &before.rules[0], 5)], at)
        .await
        .unwrap();
    let peeked = store.peek_at(&rule.item(), at).await.unwrap();
    assert_eq!(peeked.remaining, 6);
    assert_eq!(peeked.generation, 0);
}
