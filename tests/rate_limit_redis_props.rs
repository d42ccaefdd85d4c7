//! The Redis store answers exactly as the memory store: the same random sequences of
//! requests, costs, settlements, resets and times through both, against a real
//! redis-server, with identical decisions, remaining counts, resets and retry-after values.
#![cfg(feature = "redis")]

mod support;

use palisade::rate_limit::algorithm::Params;
use palisade::rate_limit::store::{CheckItem, Settlement};
use palisade::rate_limit::{Algorithm, MemoryStore, RateKey, RedisStore};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use support::RedisServer;

/// One rule of the group under test.
#[derive(Debug, Clone)]
struct RuleSpec {
    params: Params,
    /// 0: a per-principal key, 1: global.
    key: u8,
    shadow: bool,
}

#[derive(Debug, Clone)]
enum Op {
    /// Advance time, then decide the rules in `mask` with these costs.
    Check { dt: u64, mask: u8, costs: [u64; 3] },
    /// Settle the reservation `which` (modulo the reservations made) by `delta`.
    Settle { which: usize, delta: i64 },
    /// Reset rule `rule`.
    Reset { rule: usize },
}

fn params() -> impl Strategy<Value = Params> {
    let window = prop_oneof![
        Just(1u64),
        1u64..5_000,
        Just(1_000_000),
        Just(60_000_000),
        Just(86_400_000_000),
    ];
    let limit = prop_oneof![1u64..12, 1u64..2_000, Just(10_000_000u64)];
    (0u8..4, limit, window, 1u64..4).prop_map(|(alg, limit, window, burst_factor)| {
        let algorithm = match alg {
            0 | 1 => Algorithm::SlidingWindow,
            2 => Algorithm::FixedWindow,
            _ => Algorithm::Gcra,
        };
        Params {
            algorithm,
            limit,
            window,
            burst: (limit * burst_factor / 2).max(1),
            strict: alg == 1,
        }
    })
}

fn rule() -> impl Strategy<Value = RuleSpec> {
    (params(), 0u8..2, prop::bool::weighted(0.2)).prop_map(|(params, key, shadow)| RuleSpec {
        params,
        key,
        shadow,
    })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (
            prop_oneof![Just(0u64), 0u64..2_000, 0u64..100_000_000, 0u64..200_000_000_000],
            1u8..8,
            prop::array::uniform3(prop_oneof![Just(0u64), 1u64..4, 1u64..20_000_000]),
        )
            .prop_map(|(dt, mask, costs)| Op::Check { dt, mask, costs }),
        1 => (0usize..64, -3_000_000i64..3_000_000).prop_map(|(which, delta)| Op::Settle { which, delta }),
        1 => (0usize..3).prop_map(|rule| Op::Reset { rule }),
    ]
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn redis_store_decides_exactly_as_the_memory_store() {
    let rt = rt();
    let server = rt
        .block_on(RedisServer::start())
        .expect("redis-server is required");
    let mut runner = TestRunner::new(Config {
        // PROPTEST_CASES=2000 for a longer search.
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(96),
        failure_persistence: None,
        ..Config::default()
    });
    let strategy = (
        prop::collection::vec(rule(), 1..4),
        prop::collection::vec(op(), 1..120),
        0u64..(1 << 50),
    );
    let case = std::sync::atomic::AtomicU64::new(0);
    runner
        .run(&strategy, |(rules, ops, t0)| {
            let case = case.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            rt.block_on(run_case(&server, case, &rules, &ops, t0))
        })
        .unwrap();
}

async fn run_case(
    server: &RedisServer,
    case: u64,
    rules: &[RuleSpec],
    ops: &[Op],
    t0: u64,
) -> Result<(), TestCaseError> {
    let redis = RedisStore::builder()
        .url(server.url())
        .prefix(format!("prop{case}"))
        .timeout(std::time::Duration::from_secs(5))
        .blocked_cache(0)
        .build()
        .await
        .unwrap();
    let memory = MemoryStore::new();
    let keys = [RateKey::principal("user-7"), RateKey::Global];
    let names = ["a", "b", "c"];
    let mut now = t0;
    // (rule, window_start) of admitted requests, for settlements
    let mut reservations: Vec<(usize, u64)> = Vec::new();
    let item = |i: usize, cost: u64| CheckItem {
        rule_index: i as u32,
        rule: names[i],
        key: &keys[usize::from(rules[i].key)],
        params: rules[i].params,
        cost,
        shadow: rules[i].shadow,
    };
    for (step, op) in ops.iter().enumerate() {
        match op {
            Op::Check { dt, mask, costs } => {
                now += dt;
                let chosen: Vec<usize> =
                    (0..rules.len()).filter(|i| mask & (1 << i) != 0).collect();
                if chosen.is_empty() {
                    continue;
                }
                let items: Vec<CheckItem<'_>> = chosen.iter().map(|&i| item(i, costs[i])).collect();
                let want = memory.check_at(&items, now);
                let got = redis.check_at(&items, now).await.unwrap();
                prop_assert_eq!(&got, &want, "step {} at {}: {:?}", step, now, op);
                for (&i, d) in chosen.iter().zip(&got.rules) {
                    if d.debited {
                        reservations.push((i, d.window_start));
                    }
                }
                // A peek reports what a cost-0 check does.
                let i = chosen[0];
                let peek = redis.peek_at(&item(i, 0), now).await.unwrap();
                let zero = memory.check_at(&[item(i, 0)], now);
                prop_assert_eq!(
                    peek.remaining,
                    zero.rules[0].remaining,
                    "peek at step {}",
                    step
                );
                prop_assert_eq!(peek.reset_micros, zero.rules[0].reset_micros);
                let zero_redis = redis.check_at(&[item(i, 0)], now).await.unwrap();
                prop_assert_eq!(&zero_redis, &zero, "cost 0 at step {}", step);
            }
            Op::Settle { which, delta } => {
                if reservations.is_empty() {
                    continue;
                }
                let (i, window_start) = reservations[which % reservations.len()];
                let cap = i64::try_from(rules[i].params.capacity() * 4).unwrap();
                let s = Settlement {
                    rule_index: i as u32,
                    rule: names[i],
                    key: &keys[usize::from(rules[i].key)],
                    params: rules[i].params,
                    window_start,
                    // Settlements of up to four times the rule's capacity: every time stays
                    // in the store's documented range (below 2^53 µs).
                    delta: (*delta).clamp(-cap, cap),
                };
                memory.settle_now(&[s]);
                redis.settle_at(&[s], now).await.unwrap();
            }
            Op::Reset { rule } => {
                if *rule >= rules.len() {
                    continue;
                }
                let key = &keys[usize::from(rules[*rule].key)];
                memory.reset_now(*rule as u32, key);
                use palisade::rate_limit::Store;
                redis.reset(*rule as u32, names[*rule], key).await.unwrap();
            }
        }
    }
    Ok(())
}
