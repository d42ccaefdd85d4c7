//! The Redis store answers exactly as the memory store: the same random sequences of
//! requests, costs, settlements, resets, keys dropped (deleted in Redis, forgotten by the
//! memory store, as a full store or an operator drops them) and times through both, against
//! a real redis-server, with identical decisions, remaining counts, resets and retry-after
//! values.
//! Both hold at least what a model of each reservation's outstanding part holds: a
//! give-back never refunds units that other requests still hold.
#![cfg(feature = "redis")]

mod support;

use palisade::rate_limit::algorithm::{self, Params, State};
use palisade::rate_limit::store::{CheckItem, Decision, RuleDecision, Settlement};
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
    /// Settle the reservation `which` (modulo those not settled yet) by `delta`.
    Settle { which: usize, delta: i64 },
    /// Reset rule `rule`.
    Reset { rule: usize },
    /// Drop rule `rule`'s key, its generation with it.
    Drop { rule: usize },
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
        1 => (0usize..3).prop_map(|rule| Op::Drop { rule }),
    ]
}

/// µs that `units` advance a GCRA bucket: `ceil(units × window / limit)`.
fn increment(params: &Params, units: u64) -> u64 {
    let num = u128::from(units) * u128::from(params.window);
    u64::try_from(num.div_ceil(u128::from(params.limit.max(1)))).unwrap_or(u64::MAX)
}

/// What one rule's key must still hold, reservation by reservation: the units admitted and
/// not given back that have not drained yet. A GCRA bucket is a queue of cells (one per
/// reservation, one per charge) that drains from the bottom, one µs a µs: a give-back takes
/// back at most the part of its own cell still above now, and the cells above it move down.
/// A window keeps every unit counted in it until the window is dropped: a give-back takes
/// back its own units. Settlements made before a reset of the key settle nothing.
///
/// A store may hold more than the model (a GCRA give-back may refund less than its cell
/// still holds, when other give-backs have moved the bucket since), never less: every
/// admission must fit beside what the model holds, and the store's remaining units are at
/// most the model's.
#[derive(Debug, Default)]
struct Held {
    /// GCRA: the cells, bottom first, as (reservation, µs); `None` for a charge.
    cells: Vec<(Option<usize>, u64)>,
    /// GCRA: where the last cell ends (µs; below now when the bucket is full).
    top: u64,
    /// Windows: units counted per window start.
    windows: Vec<(u64, u64)>,
}

impl Held {
    /// The model as the algorithm's state at `now`.
    fn state(&self, params: &Params, now: u64) -> State {
        let units = |start: u64| {
            self.windows
                .iter()
                .filter(|(s, _)| *s == start)
                .map(|(_, u)| *u)
                .sum::<u64>()
        };
        let aligned = now - now % params.window;
        match params.algorithm {
            Algorithm::Gcra => State {
                start: self.top,
                prev: 0,
                count: 0,
            },
            Algorithm::FixedWindow => State {
                start: aligned,
                prev: 0,
                count: units(aligned),
            },
            Algorithm::SlidingWindow => State {
                start: aligned,
                prev: aligned.checked_sub(params.window).map_or(0, units),
                count: units(aligned),
            },
        }
    }

    /// Whether `cost` units fit beside what the model holds at `now`.
    fn fits(&self, params: &Params, now: u64, cost: u64) -> bool {
        algorithm::decide(params, &self.state(params, now), now, cost)
            .verdict
            .is_allowed()
    }

    /// The units the model leaves at `now`, and (GCRA) µs until its bucket is full again.
    fn left(&self, params: &Params, now: u64) -> (u64, u64) {
        let d = algorithm::decide(params, &self.state(params, now), now, 0);
        (d.remaining, d.reset)
    }

    /// Reservation `id` of `units` units, admitted at `now` in window `window_start`.
    fn admit(&mut self, params: &Params, id: usize, window_start: u64, now: u64, units: u64) {
        if params.algorithm == Algorithm::Gcra {
            if self.top <= now {
                // every cell has drained
                self.cells.clear();
                self.top = now;
            }
            let step = increment(params, units);
            self.top = self.top.saturating_add(step);
            self.cells.push((Some(id), step));
        } else {
            self.windows.push((window_start, units));
        }
    }

    /// Reservation `id` (in window `window_start`) used `delta` more units than it
    /// reserved (a charge, at the top of the bucket), or gave back `-delta` (at most what
    /// it reserved).
    fn settle(&mut self, params: &Params, id: usize, window_start: u64, now: u64, delta: i64) {
        let units = delta.unsigned_abs();
        if params.algorithm != Algorithm::Gcra {
            if delta >= 0 {
                self.windows.push((window_start, units));
            } else {
                // the reservation's own units, counted in its window
                let mut left = units;
                for (_, u) in self.windows.iter_mut().filter(|(s, _)| *s == window_start) {
                    let take = left.min(*u);
                    *u -= take;
                    left -= take;
                }
            }
            return;
        }
        let step = increment(params, units);
        if delta >= 0 {
            self.cells.push((None, step));
            self.top = self.top.saturating_add(step);
            return;
        }
        let Some(k) = self.cells.iter().position(|(r, _)| *r == Some(id)) else {
            return; // drained, and dropped with the others
        };
        let above: u64 = self.cells[k + 1..].iter().map(|(_, len)| len).sum();
        let end = self.top - above;
        let back = step.min(self.cells[k].1).min(end.saturating_sub(now));
        if back < step && back < self.top.saturating_sub(now) {
            // part of the cell has drained, and later cells hold the rest of the bucket:
            // a give-back of all it asks would refund them
            PARTLY_DRAINED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        self.cells[k].1 -= back;
        self.top -= back;
    }

    /// The key was reset: nothing is held.
    fn reset(&mut self) {
        *self = Held::default();
    }
}

/// GCRA give-backs of a reservation partly drained, with later cells above it.
static PARTLY_DRAINED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A request a rule admitted, for settling.
#[derive(Debug)]
struct Reservation {
    rule: usize,
    decision: RuleDecision,
    units: u64,
    /// The rule's resets before it.
    resets: u32,
    /// The times the rule's key was dropped before it.
    drops: u32,
    settled: bool,
}

/// Whether a store's peek at `now` holds at least what the model holds: no more units
/// left, and (GCRA) no sooner full again.
fn holds_at_least(
    held: &Held,
    params: &Params,
    peek: &RuleDecision,
    now: u64,
    step: usize,
) -> Result<(), TestCaseError> {
    let (remaining, full_in) = held.left(params, now);
    prop_assert!(
        peek.remaining <= remaining,
        "step {}: {} units left where the requests admitted and not given back leave {}: {:?}",
        step,
        peek.remaining,
        remaining,
        held
    );
    if params.algorithm == Algorithm::Gcra {
        prop_assert!(
            peek.reset_micros >= full_in,
            "step {}: the bucket is full in {} µs where the requests admitted and not given back hold it {} µs: {:?}",
            step,
            peek.reset_micros,
            full_in,
            held
        );
    }
    Ok(())
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A runner of `cases` cases (PROPTEST_CASES=2000 for a longer search).
fn runner(cases: u32) -> TestRunner {
    TestRunner::new(Config {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(cases),
        failure_persistence: None,
        ..Config::default()
    })
}

#[test]
fn redis_store_decides_exactly_as_the_memory_store() {
    let rt = rt();
    let server = rt
        .block_on(RedisServer::start())
        .expect("redis-server is required");
    let mut runner = runner(96);
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
    // the cases did settle reservations made before a reset of their key
    assert!(
        SETTLED_AFTER_RESET.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "no settlement followed a reset"
    );
    // and charged reservations made after a reset of a key dropped and started again since
    assert!(
        CHARGED_AFTER_RESET_AND_DROP.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "no charge from after a reset followed a drop of its key"
    );
}

/// Settlements of a reservation whose key had been reset since it was made.
static SETTLED_AFTER_RESET: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Charges of a reservation made after a reset (generation above 0) whose key has been
/// dropped since.
static CHARGED_AFTER_RESET_AND_DROP: std::sync::atomic::AtomicU64 =
    std::sync::atomic::AtomicU64::new(0);

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
    // Admitted requests, for settlements: some are settled after a reset of their key,
    // which must give back nothing in both stores. Each is settled at most once (as a
    // `Reservation` is), and gives back at most what it reserved.
    let mut reservations: Vec<Reservation> = Vec::new();
    // resets of each rule so far, and drops of its key
    let mut resets = [0u32; 3];
    let mut drops = [0u32; 3];
    // what each rule's key must still hold
    let mut held: Vec<Held> = rules.iter().map(|_| Held::default()).collect();
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
                        let p = &rules[i].params;
                        prop_assert!(
                            held[i].fits(p, now, costs[i]),
                            "step {}: rule {} admitted {} units beside {:?}",
                            step,
                            i,
                            costs[i],
                            held[i]
                        );
                        held[i].admit(p, reservations.len(), d.window_start, now, costs[i]);
                        reservations.push(Reservation {
                            rule: i,
                            decision: *d,
                            units: costs[i],
                            resets: resets[i],
                            drops: drops[i],
                            settled: false,
                        });
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
                holds_at_least(&held[i], &rules[i].params, &peek, now, step)?;
            }
            Op::Settle { which, delta } => {
                let open: Vec<usize> = (0..reservations.len())
                    .filter(|&r| !reservations[r].settled)
                    .collect();
                if open.is_empty() {
                    continue;
                }
                let id = open[which % open.len()];
                let r = &mut reservations[id];
                r.settled = true;
                let i = r.rule;
                let cap = i64::try_from(rules[i].params.capacity() * 4).unwrap();
                // Settlements of up to four times the rule's capacity: every time stays in
                // the store's documented range (below 2^53 µs).
                let delta = (*delta).clamp(-i64::try_from(r.units).unwrap().min(cap), cap);
                // A give-back of a reservation whose key was dropped since may refund units
                // of the key started again (as a store that loses a key loses its count):
                // not sent. A charge is, and both stores must agree on it.
                if r.drops != drops[i] && delta < 0 {
                    continue;
                }
                let s = Settlement {
                    rule_index: i as u32,
                    rule: names[i],
                    key: &keys[usize::from(rules[i].key)],
                    params: rules[i].params,
                    window_start: r.decision.window_start,
                    generation: r.decision.generation,
                    reservation_end: r.decision.reservation_end,
                    delta,
                };
                if r.drops != drops[i] {
                    // the model holds nothing of the key from before the drop
                    if r.decision.generation > 0 {
                        CHARGED_AFTER_RESET_AND_DROP
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                } else if r.resets != resets[i] {
                    SETTLED_AFTER_RESET.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                } else {
                    held[i].settle(&rules[i].params, id, r.decision.window_start, now, delta);
                }
                memory.settle_at(&[s], now);
                redis.settle_at(&[s], now).await.unwrap();
                let (want, got) = (
                    memory.check_at(&[item(i, 0)], now),
                    redis.check_at(&[item(i, 0)], now).await.unwrap(),
                );
                prop_assert_eq!(&got, &want, "after the settlement at step {}", step);
                for (j, h) in held.iter().enumerate() {
                    let peek = redis.peek_at(&item(j, 0), now).await.unwrap();
                    holds_at_least(h, &rules[j].params, &peek, now, step)?;
                }
            }
            Op::Reset { rule } => {
                if *rule >= rules.len() {
                    continue;
                }
                let key = &keys[usize::from(rules[*rule].key)];
                memory.reset_at(*rule as u32, key, now);
                redis
                    .reset_at(*rule as u32, names[*rule], key, now)
                    .await
                    .unwrap();
                resets[*rule] += 1;
                held[*rule].reset();
                let (want, got) = (
                    memory.check_at(&[item(*rule, 0)], now),
                    redis.check_at(&[item(*rule, 0)], now).await.unwrap(),
                );
                prop_assert_eq!(&got, &want, "after the reset at step {}", step);
            }
            Op::Drop { rule } => {
                if *rule >= rules.len() {
                    continue;
                }
                let key = &keys[usize::from(rules[*rule].key)];
                memory.forget(*rule as u32, key);
                let name = redis.key_name(names[*rule], key);
                support::command(server.addr(), &format!("DEL {name}"))
                    .await
                    .unwrap();
                drops[*rule] += 1;
                // the key's units are gone with it
                held[*rule].reset();
                let (want, got) = (
                    memory.check_at(&[item(*rule, 0)], now),
                    redis.check_at(&[item(*rule, 0)], now).await.unwrap(),
                );
                prop_assert_eq!(&got, &want, "after the drop at step {}", step);
            }
        }
    }
    Ok(())
}

/// Many give-backs among small quotas, at times spread over the first rule's window: both
/// stores hold at least what the reservations admitted and not given back hold, when a
/// reservation gives back after part of it has drained and later requests hold the rest of
/// the bucket (the test requires some), and after resets.
#[test]
fn give_backs_never_refund_units_other_requests_hold() {
    let rt = rt();
    let server = rt
        .block_on(RedisServer::start())
        .expect("redis-server is required");
    let mut runner = runner(96);
    let rule = (
        0u8..5,
        1u64..12,
        prop_oneof![Just(1_000_000u64), Just(60_000_000), 1u64..5_000],
        1u64..4,
        prop::bool::weighted(0.2),
    )
        .prop_map(|(alg, limit, window, burst_factor, shadow)| RuleSpec {
            params: Params {
                algorithm: match alg {
                    0 => Algorithm::SlidingWindow,
                    1 => Algorithm::FixedWindow,
                    _ => Algorithm::Gcra,
                },
                limit,
                window,
                burst: (limit * burst_factor / 2).max(1),
                strict: false,
            },
            key: 0,
            shadow,
        });
    let strategy = prop::collection::vec(rule, 1..4).prop_flat_map(|rules| {
        let window = rules[0].params.window;
        let op = prop_oneof![
            6 => (
                prop_oneof![Just(0u64), 0u64..24, 0u64..24],
                1u8..8,
                prop::array::uniform3(0u64..6),
            )
                .prop_map(move |(sixteenths, mask, costs)| Op::Check {
                    dt: window * sixteenths / 16,
                    mask,
                    costs,
                }),
            3 => (0usize..64, -20i64..8).prop_map(|(which, delta)| Op::Settle { which, delta }),
            1 => (0usize..3).prop_map(|rule| Op::Reset { rule }),
        ];
        (
            Just(rules),
            prop::collection::vec(op, 1..80),
            0u64..(1 << 50),
        )
    });
    let case = std::sync::atomic::AtomicU64::new(0);
    runner
        .run(&strategy, |(rules, ops, t0)| {
            let case = 2_000_000 + case.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            rt.block_on(run_case(&server, case, &rules, &ops, t0))
        })
        .unwrap();
    assert!(
        PARTLY_DRAINED.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "no give-back of a partly drained reservation below later ones"
    );
}

/// Quotas of ten million units a day, whose products (count × window in µs) pass 2^53:
/// whole decisions across window edges match the memory store's at every step.
#[test]
fn large_quotas_past_two_to_the_53_decide_exactly() {
    let rt = rt();
    let server = rt
        .block_on(RedisServer::start())
        .expect("redis-server is required");
    let day = 86_400_000_000u64;
    for (case, (algorithm, strict)) in [
        (Algorithm::SlidingWindow, false),
        (Algorithm::SlidingWindow, true),
        (Algorithm::Gcra, false),
    ]
    .into_iter()
    .enumerate()
    {
        let rules = [RuleSpec {
            params: Params {
                algorithm,
                limit: 10_000_000,
                window: day,
                burst: 10_000_000,
                strict,
            },
            key: 0,
            shadow: false,
        }];
        let mut ops = vec![Op::Check {
            dt: day - 3,
            mask: 1,
            costs: [9_999_991, 0, 0],
        }];
        // dt and costs from a fixed xorshift: elapsed times all over the window, and
        // counts in the millions, so the products land anywhere past 2^53
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for _ in 0..400 {
            let dt = if next(4) == 0 { day } else { next(day / 8) };
            ops.push(Op::Check {
                dt,
                mask: 1,
                costs: [1 + next(2_500_000), 0, 0],
            });
        }
        rt.block_on(run_case(
            &server,
            1_000_000 + case as u64,
            &rules,
            &ops,
            1 << 45,
        ))
        .unwrap();
    }
}

/// The script's multiply-divide (`muldiv` in decide.lua) against u128 arithmetic, on
/// products far past 2^53 and on exact multiples, where a floating-point quotient would be
/// off by one.
#[test]
fn the_scripts_multiply_divide_is_exact_past_two_to_the_53() {
    let source = include_str!("../src/rate_limit/store/redis/decide.lua");
    let end = source
        .find("local function sat_sub")
        .expect("decide.lua defines sat_sub after muldiv");
    let script = format!(
        "{}\nlocal out = {{}}\nfor i = 1, #ARGV, 3 do\n  local q, rem = muldiv(tonumber(ARGV[i]), tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2]))\n  out[#out + 1] = q\n  out[#out + 1] = rem and 1 or 0\nend\nreturn out\n",
        &source[..end]
    );
    let rt = rt();
    let server = rt
        .block_on(RedisServer::start())
        .expect("redis-server is required");
    let mut runner = TestRunner::new(Config {
        cases: 64,
        failure_persistence: None,
        ..Config::default()
    });
    const MAX: u64 = 1 << 52;
    // (a, b, c) with a, b, c < 2^52 and a quotient below 2^53
    let triple = prop_oneof![
        (1u64..MAX, 1u64..MAX, 0.0f64..1.0).prop_map(|(a, b, f)| {
            let p = u128::from(a) * u128::from(b);
            let least = u64::try_from((p >> 52).max(1)).unwrap().min(MAX - 1);
            (a, b, least + ((MAX - 1 - least) as f64 * f) as u64)
        }),
        // exact multiples: c = a1 × b1 divides (a1 x)(b1 y); and the neighbours of c
        (
            1u64..1 << 26,
            1u64..1 << 26,
            1u64..1 << 26,
            1u64..1 << 26,
            0u64..3
        )
            .prop_map(|(a1, x, b1, y, nudge)| (
                a1 * x,
                b1 * y,
                (a1 * b1 + nudge).max(2) - 1
            )),
    ];
    let batch = prop::collection::vec(triple, 50);
    let conn = rt.block_on(async {
        redis::Client::open(server.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    });
    let past_2_53 = std::cell::Cell::new(0u32);
    runner
        .run(&batch, |triples| {
            let mut cmd = redis::cmd("EVAL");
            cmd.arg(&script).arg(0);
            for (a, b, c) in &triples {
                cmd.arg(a).arg(b).arg(c);
            }
            let out: Vec<i64> = rt.block_on(cmd.query_async(&mut conn.clone())).unwrap();
            for ((a, b, c), got) in triples.iter().zip(out.chunks(2)) {
                let p = u128::from(*a) * u128::from(*b);
                if p >= 1 << 53 {
                    past_2_53.set(past_2_53.get() + 1);
                }
                let want_q = p / u128::from(*c);
                let want_rem = p % u128::from(*c) != 0;
                prop_assert_eq!(i128::from(got[0]), want_q as i128, "{} * {} / {}", a, b, c);
                prop_assert_eq!(got[1] == 1, want_rem, "{} * {} % {}", a, b, c);
            }
            Ok(())
        })
        .unwrap();
    assert!(past_2_53.get() > 1_000, "{}", past_2_53.get());
}

/// Polls every future in the order given until all are done: the first goes to Redis
/// alone, the others are made while it is in flight and so go together, in order, as one
/// batched script call.
async fn join_in_order<T>(
    mut futures: Vec<std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>>,
) -> Vec<T> {
    let mut out: Vec<Option<T>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        for (f, slot) in futures.iter_mut().zip(out.iter_mut()) {
            if slot.is_none() {
                if let std::task::Poll::Ready(v) = f.as_mut().poll(cx) {
                    *slot = Some(v);
                }
            }
        }
        if out.iter().all(Option::is_some) {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    out.into_iter().map(Option::unwrap).collect()
}

/// One call of a batching case.
#[derive(Debug, Clone)]
enum BatchOp {
    /// Advance time, then decide the rules in `mask` (0: peek the first rule).
    Check { dt: u64, mask: u8, costs: [u64; 3] },
    /// Settle what the decision `which` (modulo the calls before) debited by `delta`.
    Settle { which: usize, delta: i64 },
    /// Reset rule `rule`.
    Reset { rule: usize },
}

/// What a call answered.
#[derive(Debug, PartialEq)]
enum Outcome {
    Decided(Decision),
    Peeked(RuleDecision),
    Done,
}

/// A call made: a check or a peek at a time, a settlement of an earlier call's debits, or
/// a reset.
enum Call<'a> {
    Check(u64, Vec<CheckItem<'a>>),
    Peek(u64, CheckItem<'a>),
    Settle(u64, usize, i64),
    Reset(usize),
}

/// Decisions, peeks, settlements (give-backs and more) and resets made while another call
/// is in flight go to Redis together, in order: the same sequence answers exactly as when
/// each waits for the one before, and leaves the same state.
#[test]
fn batched_calls_answer_exactly_as_one_by_one() {
    let rt = rt();
    let server = rt
        .block_on(RedisServer::start())
        .expect("redis-server is required");
    let mut runner = runner(48);
    let op = prop_oneof![
        8 => (
            prop_oneof![Just(0u64), 0u64..2_000, 0u64..100_000_000],
            0u8..8,
            prop::array::uniform3(prop_oneof![Just(0u64), 1u64..4, 1u64..20_000_000]),
        )
            .prop_map(|(dt, mask, costs)| BatchOp::Check { dt, mask, costs }),
        2 => (0usize..64, -3_000_000i64..3_000_000)
            .prop_map(|(which, delta)| BatchOp::Settle { which, delta }),
        1 => (0usize..3).prop_map(|rule| BatchOp::Reset { rule }),
    ];
    let strategy = (
        prop::collection::vec(rule(), 1..4),
        prop::collection::vec(op, 2..150),
        0u64..(1 << 50),
    );
    let case = std::sync::atomic::AtomicU64::new(0);
    let batched = std::sync::atomic::AtomicU64::new(0);
    let (settled, reset) = (
        std::sync::atomic::AtomicU64::new(0),
        std::sync::atomic::AtomicU64::new(0),
    );
    runner
        .run(&strategy, |(rules, ops, t0)| {
            let case = case.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            rt.block_on(async {
                use palisade::rate_limit::Store;
                let store = |name: &str| {
                    RedisStore::builder()
                        .url(server.url())
                        .prefix(format!("batch{name}{case}"))
                        .timeout(std::time::Duration::from_secs(5))
                        .blocked_cache(0)
                        .build()
                };
                let (alone, together) = (store("a").await.unwrap(), store("b").await.unwrap());
                let keys = [RateKey::principal("user-7"), RateKey::Global];
                let names = ["a", "b", "c"];
                let item = |i: usize, cost: u64| CheckItem {
                    rule_index: i as u32,
                    rule: names[i],
                    key: &keys[usize::from(rules[i].key)],
                    params: rules[i].params,
                    cost,
                    shadow: rules[i].shadow,
                };
                let mut now = t0;
                let mut calls: Vec<Call<'_>> = Vec::new();
                // each decision is settled at most once, as a `Reservation` is
                let mut settled_calls = std::collections::HashSet::new();
                for op in &ops {
                    match op {
                        BatchOp::Check { dt, mask, costs } => {
                            now += dt;
                            let chosen: Vec<usize> =
                                (0..rules.len()).filter(|i| mask & (1 << i) != 0).collect();
                            if chosen.is_empty() {
                                calls.push(Call::Peek(now, item(0, costs[0])));
                            } else {
                                let items = chosen.into_iter().map(|i| item(i, costs[i])).collect();
                                calls.push(Call::Check(now, items));
                            }
                        }
                        BatchOp::Settle { which, delta } => {
                            if !calls.is_empty() && settled_calls.insert(which % calls.len()) {
                                calls.push(Call::Settle(now, which % calls.len(), *delta));
                            }
                        }
                        BatchOp::Reset { rule } => {
                            if *rule < rules.len() {
                                calls.push(Call::Reset(*rule));
                            }
                        }
                    }
                }
                type Answer = Result<Outcome, String>;
                // What a settlement settles: the debits of the decision it names, as the
                // one-by-one run answered it (the batched run must answer the same).
                let settlements = |answers: &[Answer], j: usize, delta: i64| {
                    let Call::Check(_, items) = &calls[j] else {
                        return Vec::new();
                    };
                    let Some(Ok(Outcome::Decided(decision))) = answers.get(j) else {
                        return Vec::new();
                    };
                    items
                        .iter()
                        .zip(&decision.rules)
                        .filter(|(_, r)| r.debited)
                        .map(|(i, r)| {
                            let cap = i64::try_from(i.params.capacity() * 4).unwrap();
                            // a give-back of at most what was reserved
                            let least = -i64::try_from(i.cost).unwrap().min(cap);
                            Settlement {
                                rule_index: i.rule_index,
                                rule: i.rule,
                                key: i.key,
                                params: i.params,
                                window_start: r.window_start,
                                generation: r.generation,
                                reservation_end: r.reservation_end,
                                delta: delta.clamp(least, cap),
                            }
                        })
                        .collect::<Vec<_>>()
                };
                let call = |store: &RedisStore,
                            c: &Call<'_>,
                            answers: &[Answer]|
                 -> std::pin::Pin<
                    Box<dyn std::future::Future<Output = Answer> + Send>,
                > {
                    let shown = |e: palisade::rate_limit::StoreError| e.to_string();
                    match c {
                        Call::Peek(now, item) => {
                            let f = store.peek_at(item, *now);
                            Box::pin(async move { f.await.map(Outcome::Peeked).map_err(shown) })
                        }
                        Call::Check(now, items) => {
                            let f = store.check_at(items, *now);
                            Box::pin(async move { f.await.map(Outcome::Decided).map_err(shown) })
                        }
                        Call::Settle(now, j, delta) => {
                            let f = store.settle_at(&settlements(answers, *j, *delta), *now);
                            Box::pin(async move { f.await.map(|()| Outcome::Done).map_err(shown) })
                        }
                        Call::Reset(i) => {
                            let f = store.reset(
                                *i as u32,
                                names[*i],
                                &keys[usize::from(rules[*i].key)],
                            );
                            Box::pin(async move { f.await.map(|()| Outcome::Done).map_err(shown) })
                        }
                    }
                };
                let mut want: Vec<Answer> = Vec::new();
                // What each rule's key must still hold, after each call of the one-by-one
                // run; a reservation is rule `r` of call `n`, numbered `3 n + r`.
                let mut held: Vec<Held> = rules.iter().map(|_| Held::default()).collect();
                let mut resets = [0u32; 3];
                let mut resets_before: Vec<[u32; 3]> = Vec::new();
                let mut at = t0;
                for (n, c) in calls.iter().enumerate() {
                    let answer = call(&alone, c, &want).await;
                    match (c, &answer) {
                        (Call::Check(now, items), Ok(Outcome::Decided(d))) => {
                            at = *now;
                            for (item, r) in items.iter().zip(&d.rules).filter(|(_, r)| r.debited) {
                                let i = item.rule_index as usize;
                                prop_assert!(
                                    held[i].fits(&item.params, at, item.cost),
                                    "call {}: rule {} admitted {} units beside {:?}",
                                    n,
                                    i,
                                    item.cost,
                                    held[i]
                                );
                                held[i].admit(
                                    &item.params,
                                    3 * n + i,
                                    r.window_start,
                                    at,
                                    item.cost,
                                );
                            }
                        }
                        (Call::Settle(now, j, delta), Ok(_)) => {
                            at = *now;
                            for s in settlements(&want, *j, *delta) {
                                let i = s.rule_index as usize;
                                if resets_before[*j][i] == resets[i] {
                                    held[i].settle(
                                        &s.params,
                                        3 * j + i,
                                        s.window_start,
                                        at,
                                        s.delta,
                                    );
                                }
                            }
                        }
                        (Call::Reset(i), Ok(_)) => {
                            resets[*i] += 1;
                            held[*i].reset();
                        }
                        (Call::Peek(now, _), _) => at = *now,
                        _ => {}
                    }
                    resets_before.push(resets);
                    for (i, h) in held.iter().enumerate() {
                        let peek = alone.peek_at(&item(i, 0), at).await.unwrap();
                        holds_at_least(h, &rules[i].params, &peek, at, n)?;
                    }
                    want.push(answer);
                }
                let got =
                    join_in_order(calls.iter().map(|c| call(&together, c, &want)).collect()).await;
                for (step, (got, want)) in got.iter().zip(&want).enumerate() {
                    prop_assert_eq!(got, want, "call {} of {}", step, calls.len());
                }
                // the same state is left: every rule peeks the same
                for i in 0..rules.len() {
                    let (a, b) = (
                        alone.peek_at(&item(i, 0), now).await.unwrap(),
                        together.peek_at(&item(i, 0), now).await.unwrap(),
                    );
                    prop_assert_eq!(a, b, "rule {} at the end", i);
                }
                prop_assert_eq!(alone.health().batched_calls, 0);
                batched.fetch_add(
                    together.health().batched_calls,
                    std::sync::atomic::Ordering::Relaxed,
                );
                for c in &calls {
                    match c {
                        Call::Settle(..) => {
                            settled.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                        }
                        Call::Reset(_) => reset.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                        _ => 0,
                    };
                }
                Ok(())
            })
        })
        .unwrap();
    assert!(
        batched.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "no call went to Redis in a batch"
    );
    assert!(
        settled.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "no settlement"
    );
    assert!(
        reset.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "no reset"
    );
}
