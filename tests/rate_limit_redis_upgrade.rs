//! The rate limiter's Redis script against its previous version (the one that read its
//! numbers as decimal arguments and wrote states with `%.0f`, kept in
//! tests/rate_limit_redis_data/decide_v1.lua): the same random calls through both on a real
//! redis-server answer the same and leave the same states, and a key written by either
//! version is read by the other as its own (instances of both share keys during a rolling
//! upgrade). A rule changed since that version is applied to it first (see `OLD`).
#![cfg(feature = "redis")]

mod support;

use support::RedisServer;

const NEW: &str = include_str!("../src/rate_limit/store/redis/decide.lua");
/// The previous version as it shipped.
const V1: &str = include_str!("rate_limit_redis_data/decide_v1.lua");

/// The previous version with the rules changed since: a GCRA charge on a bucket that has
/// drained full, or on a key with no state (expired as idle), is debited from now, in a
/// new epoch, as a request's units would be, so that whether Redis still holds an idle key
/// changes no later decision; and a charge whose generation is newer than the key's
/// (modulo 2^32: made after a reset the key, deleted and started again since, no longer
/// knows of) applies. Everything else (numbers read as decimal arguments, states written
/// with `%.0f`) is compared as it shipped.
static OLD: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let from = "    if found and g == gen then\n      if alg == 2 then\n";
    let to = "    local newer = (gen - g) % 4294967296\n    \
              if found and (newer == 0 or delta > 0 and newer < 2147483648) \
              or not found and alg == 2 and delta > 0 then\n      \
              if alg == 2 then\n        \
              if delta > 0 and start <= now then start, prev, count = now, 0, 0 end\n";
    assert!(
        V1.contains(from),
        "the previous version's settlement changed"
    );
    V1.replacen(from, to, 1)
});

/// SplitMix64: a seeded, deterministic sequence.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A rule's numbers: algorithm, limit, window (µs), burst, strict.
#[derive(Clone, Copy, Debug)]
struct Rule {
    alg: i64,
    limit: i64,
    window: i64,
    burst: i64,
    strict: i64,
}

fn rule(rng: &mut Rng) -> Rule {
    let alg = rng.below(3) as i64;
    let (limit, window) = match rng.below(4) {
        0 => (
            1 + rng.below(5) as i64,
            10_000_000 + rng.below(3) as i64 * 7_000_000,
        ),
        1 => (1 + rng.below(100) as i64, 60_000_000),
        2 => (1 + rng.below(1_000_000) as i64, 3_600_000_000),
        // near the largest the store sends: below 2^52
        _ => (
            (1 << 52) - 1 - rng.below(1000) as i64,
            (1 << 40) + rng.below(1 << 20) as i64,
        ),
    };
    let burst = if alg == 2 {
        // GCRA: burst × window / limit stays below 2^52
        let most = ((1u128 << 52) - 1) * limit as u128 / window as u128;
        1 + rng.below(most.min(limit as u128 * 3) as u64) as i64
    } else {
        limit
    };
    Rule {
        alg,
        limit,
        window,
        burst,
        strict: (alg == 0 && rng.below(2) == 0) as i64,
    }
}

/// One call: mode, time, and per key its rule and numbers (cost and shadow for a check,
/// window start, delta, generation and reservation end for a settlement).
struct Call {
    mode: &'static str,
    time: i64,
    keys: Vec<usize>,
    rules: Vec<(Rule, Vec<i64>)>,
}

const GRACE: i64 = 600_000;

fn new_numbers(call: &Call) -> Vec<u8> {
    let mut out = Vec::new();
    for n in [call.time, GRACE] {
        out.extend(n.to_le_bytes());
    }
    if call.mode == "r" {
        // the reset retention (an hour), which the previous version did not take
        out.extend(3_600_000_000i64.to_le_bytes());
    }
    // a reset sends no rule
    for (r, extra) in call.rules.iter().filter(|_| call.mode != "r") {
        for n in [r.alg, r.limit, r.window, r.burst, r.strict]
            .iter()
            .chain(extra)
        {
            out.extend(n.to_le_bytes());
        }
    }
    out
}

fn old_args(call: &Call) -> Vec<String> {
    let mut out = vec![call.time.to_string(), GRACE.to_string()];
    // a reset sends no rule
    for (r, extra) in call.rules.iter().filter(|_| call.mode != "r") {
        for n in [r.alg, r.limit, r.window, r.burst, r.strict]
            .iter()
            .chain(extra)
        {
            out.push(n.to_string());
        }
    }
    out
}

fn words(bytes: &[u8]) -> Vec<i64> {
    assert_eq!(bytes.len() % 8, 0);
    bytes
        .chunks_exact(8)
        .map(|w| i64::from_le_bytes(w.try_into().unwrap()))
        .collect()
}

async fn run(
    conn: &mut redis::aio::MultiplexedConnection,
    script: &str,
    old: bool,
    prefix: &str,
    call: &Call,
) -> Result<Vec<i64>, String> {
    let keys: Vec<String> = call.keys.iter().map(|k| format!("{prefix}:{k}")).collect();
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(script).arg(keys.len()).arg(&keys).arg(call.mode);
    if old {
        cmd.arg(old_args(call));
    } else {
        cmd.arg(new_numbers(call));
    }
    let answer: redis::RedisResult<Vec<u8>> = cmd.query_async(conn).await;
    answer.map(|a| words(&a)).map_err(|e| e.to_string())
}

async fn get(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> Option<String> {
    redis::cmd("GET").arg(key).query_async(conn).await.unwrap()
}

/// A random call over `n` keys, each with its own rule (and now and then another rule,
/// as a configuration change would send), its settlements built from earlier answers.
fn call(rng: &mut Rng, rules: &mut [Rule], answers: &[Option<Vec<i64>>], time: &mut i64) -> Call {
    // time moves on, now and then back (a client clock behind another)
    let w = rules.iter().map(|r| r.window).min().unwrap();
    match rng.below(10) {
        0 => *time = time.saturating_sub(rng.below(w as u64) as i64).max(1),
        1..=3 => {}
        _ => *time += rng.below(w as u64 / 2) as i64,
    }
    let mode = match rng.below(20) {
        0 => "r",
        1 | 2 => "p",
        3..=7 => "s",
        _ => "c",
    };
    let count = if mode == "p" {
        1
    } else {
        1 + rng.below(2) as usize
    };
    let mut keys = Vec::new();
    while keys.len() < count {
        let k = rng.below(rules.len() as u64) as usize;
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    if rng.below(200) == 0 {
        let k = keys[0];
        let mut other = rule(rng);
        other.alg = rules[k].alg;
        rules[k] = other;
    }
    let rules = keys
        .iter()
        .map(|&k| {
            let r = rules[k];
            let extra = match mode {
                "c" | "p" => {
                    let cost = match rng.below(8) {
                        0 => 0,
                        1 => r.limit.max(r.burst) + rng.below(2) as i64,
                        _ => 1 + rng.below((r.limit.min(5)) as u64) as i64,
                    };
                    vec![cost, (rng.below(8) == 0) as i64]
                }
                "s" => {
                    let (ws, generation, end) = match &answers[k] {
                        // now and then a generation past the key's, as a reservation
                        // made after a reset of a key since deleted carries
                        Some(a) if rng.below(5) != 0 => {
                            (a[4], a[7] + i64::from(rng.below(4) == 0), a[8])
                        }
                        _ => (*time - *time % r.window, 0, *time),
                    };
                    let delta = rng.below(7) as i64 - 4;
                    vec![ws, delta, generation, end]
                }
                _ => vec![],
            };
            (r, extra)
        })
        .collect();
    Call {
        mode,
        time: *time,
        keys,
        rules,
    }
}

/// Random calls through both versions, each on its own keys: the same answers, the same
/// states.
#[tokio::test]
async fn the_script_answers_and_writes_as_its_previous_version() {
    let server = RedisServer::start().await.expect("redis-server");
    let mut conn = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    for seed in 0..12u64 {
        let mut rng = Rng(seed);
        let mut rules: Vec<Rule> = (0..4).map(|_| rule(&mut rng)).collect();
        let mut answers: Vec<Option<Vec<i64>>> = vec![None; rules.len()];
        let mut time = 1_700_000_000_000_000 + rng.below(1 << 40) as i64;
        if seed % 4 == 3 {
            // near the largest time the store sends (2^53 µs)
            time = (1 << 53) - (1 << 46);
        }
        for step in 0..400 {
            let c = call(&mut rng, &mut rules, &answers, &mut time);
            let old = run(&mut conn, &OLD, true, &format!("old{seed}"), &c).await;
            let new = run(&mut conn, NEW, false, &format!("new{seed}"), &c).await;
            let what = format!(
                "seed {seed} step {step}: {} at {} keys {:?} rules {:?}",
                c.mode, c.time, c.keys, c.rules
            );
            match (&old, &new) {
                (Ok(a), Ok(b)) => assert_eq!(a, b, "{what}"),
                (Err(_), Err(_)) => {}
                _ => panic!("{what}: {old:?} / {new:?}"),
            }
            if let Ok(a) = &new {
                if c.mode == "c" || c.mode == "p" {
                    for (i, &k) in c.keys.iter().enumerate() {
                        answers[k] = Some(a[2 + 9 * i..11 + 9 * i].to_vec());
                    }
                }
            }
            for k in 0..rules.len() {
                let o = get(&mut conn, &format!("old{seed}:{k}")).await;
                let n = get(&mut conn, &format!("new{seed}:{k}")).await;
                assert_eq!(o, n, "{what}: key {k}");
            }
        }
    }
}

/// A batch (mode `b`) of the calls of either version, the keys shared by both.
async fn batch(
    conn: &mut redis::aio::MultiplexedConnection,
    old: bool,
    prefix: &str,
    calls: &[Call],
) -> Vec<i64> {
    let mut keys = Vec::new();
    let mut args: Vec<Vec<u8>> = vec![b"b".to_vec(), calls.len().to_string().into_bytes()];
    for c in calls {
        keys.extend(c.keys.iter().map(|k| format!("{prefix}:{k}")));
        args.push(c.mode.as_bytes().to_vec());
        args.push(c.keys.len().to_string().into_bytes());
        if old {
            args.extend(old_args(c).into_iter().map(String::into_bytes));
        } else {
            args.push(new_numbers(c));
        }
    }
    let answer: Vec<u8> = redis::cmd("EVAL")
        .arg(if old { OLD.as_str() } else { NEW })
        .arg(keys.len())
        .arg(&keys)
        .arg(&args)
        .query_async(conn)
        .await
        .unwrap();
    words(&answer)
}

/// During a rolling upgrade instances of both versions share keys: calls going to either
/// version at random, alone or in batches, answer and write exactly as if every call had
/// gone to the previous version alone.
#[tokio::test]
async fn keys_shared_by_both_versions_in_a_rolling_upgrade_decide_as_one_version() {
    let server = RedisServer::start().await.expect("redis-server");
    let mut conn = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    for seed in 100..108u64 {
        let mut rng = Rng(seed);
        let mut rules: Vec<Rule> = (0..3).map(|_| rule(&mut rng)).collect();
        let mut answers: Vec<Option<Vec<i64>>> = vec![None; rules.len()];
        let mut time = 1_700_000_000_000_000 + rng.below(1 << 40) as i64;
        for step in 0..150 {
            let calls: Vec<Call> = (0..1 + rng.below(4))
                .map(|_| call(&mut rng, &mut rules, &answers, &mut time))
                .collect();
            let mut reference = Vec::new();
            for c in &calls {
                let a = run(&mut conn, &OLD, true, &format!("ref{seed}"), c).await;
                let a = a.unwrap_or_else(|e| panic!("seed {seed} step {step}: {e}"));
                reference.push(a.len() as i64);
                reference.extend(a);
            }
            let old = rng.below(2) == 0;
            let mixed = batch(&mut conn, old, &format!("mix{seed}"), &calls).await;
            assert_eq!(mixed, reference, "seed {seed} step {step}: old {old}");
            let mut at = 0;
            for c in &calls {
                let len = reference[at] as usize;
                let a = &reference[at + 1..at + 1 + len];
                if c.mode == "c" || c.mode == "p" {
                    for (i, &k) in c.keys.iter().enumerate() {
                        answers[k] = Some(a[2 + 9 * i..11 + 9 * i].to_vec());
                    }
                }
                at += 1 + len;
            }
            for k in 0..rules.len() {
                let o = get(&mut conn, &format!("ref{seed}:{k}")).await;
                let n = get(&mut conn, &format!("mix{seed}:{k}")).await;
                assert_eq!(o, n, "seed {seed} step {step}: key {k}");
            }
        }
    }
}
