//! Fuzzes the configuration loader: `palisade::config::Env` over arbitrary variables, read
//! by every layer's `from_env`.
//!
//! Properties:
//! - no panic, whatever the variables hold;
//! - every problem names a variable of the layer (its prefix, or a shared setting), says
//!   why, and shows a value only for a variable that is set;
//! - every problem is reported at once: when `XConfig::from_env` records none, building
//!   the layer from that configuration succeeds;
//! - variables outside a layer's names change nothing;
//! - durations read back as written: `duration::parse(duration::format(d)) = d`.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use palisade::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerLayer};
use palisade::config::{ConfigError, Env, ProblemKind, duration, env_var};
use palisade::cost::budget::{BudgetConfig, BudgetLayer};
use palisade::cost::{CostConfig, CostMeterLayer, MemorySink, RecorderConfig, UsageRecorder};
use palisade::rate_limit::{RateLimitConfig, RateLimitLayer};
use palisade::retry::{RetryConfig, RetryLayer};
use palisade::security_headers::{SecurityHeadersConfig, SecurityHeadersLayer};
use serde_json::Value;

#[derive(Debug, Arbitrary)]
struct Input {
    vars: Vec<(u16, Val)>,
    secs: u64,
    nanos: u32,
}

#[derive(Debug, Arbitrary)]
enum Val {
    Known(u8),
    Text(String),
}

const SHARED: &[&str] = &["PALISADE_ENV", "PALISADE_ERROR_FORMAT"];

const VALUES: &[&str] = &[
    "",
    " ",
    "0",
    "1",
    "-1",
    "2",
    "0.5",
    "1.5",
    "-0.1",
    "100",
    "18446744073709551615",
    "18446744073709551616",
    "1e400",
    "NaN",
    "inf",
    "true",
    "false",
    "yes",
    "on",
    "30s",
    "250ms",
    "5m",
    "1h30m",
    "0s",
    "99999999999d",
    "soon",
    "anthropic",
    "problem",
    "problem_json",
    "production",
    "development",
    "staging",
    "none",
    "full",
    "equal",
    "decorrelated",
    "api",
    "web",
    "x-user-id",
    "bad header",
    "[]",
    "{}",
    r#"[{"name":"chat","key":"api_key","limit":20,"window":"1m"}]"#,
    r#"[{"name":"chat","key":"ip","limit":0,"window":"0s"}]"#,
    r#"[{"name":"a","key":"api_key","limit":1},{"name":"a","key":"api_key","limit":1}]"#,
    r#"[{"name":"daily","period":"day","limit_usd":"1.50"}]"#,
    r#"[{"name":"daily","period":"fortnight","limit_usd":"-1"}]"#,
    "default-src 'self'",
    "default-src self",
    "script-src 'nonce-{nonce}'",
    "sliding_window",
    "fixed_window",
    "gcra",
    "open",
    "closed",
    "local",
    "10.0.0.0/8",
    "10.0.0.0/33",
    "/no/such/prices.json",
];

/// Every variable of every layer, from the serde field paths of its default config.
fn names() -> &'static [String] {
    static NAMES: OnceLock<Vec<String>> = OnceLock::new();
    NAMES.get_or_init(|| {
        fn walk(prefix: &str, path: &str, v: &Value, out: &mut Vec<String>) {
            if !path.is_empty() {
                out.push(env_var(prefix, path));
            }
            if let Value::Object(m) = v {
                for (k, v) in m {
                    let p = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    walk(prefix, &p, v, out);
                }
            }
        }
        let mut out: Vec<String> = SHARED.iter().map(|s| (*s).to_owned()).collect();
        for (prefix, v) in [
            (
                "PALISADE_RETRY",
                serde_json::to_value(RetryConfig::default()),
            ),
            (
                "PALISADE_CIRCUIT_BREAKER",
                serde_json::to_value(CircuitBreakerConfig::default()),
            ),
            (
                "PALISADE_RATE_LIMIT",
                serde_json::to_value(RateLimitConfig::default()),
            ),
            (
                "PALISADE_SECURITY_HEADERS",
                serde_json::to_value(SecurityHeadersConfig::default()),
            ),
            ("PALISADE_COST", serde_json::to_value(CostConfig::default())),
            (
                "PALISADE_BUDGET",
                serde_json::to_value(BudgetConfig::default()),
            ),
        ] {
            walk(prefix, "", &v.unwrap(), &mut out);
        }
        // Names the serde paths do not show: old names and layer overrides.
        for extra in [
            "PALISADE_COST_COST_HEADERS",
            "PALISADE_COST_BATCH_SIZE",
            "PALISADE_RATE_LIMIT_ERROR_FORMAT",
            "PALISADE_BUDGET_ERROR_FORMAT",
            "PALISADE_SECURITY_HEADERS_CSP",
            "OTHER_VARIABLE",
            "PALISADE_RETRYX",
        ] {
            out.push(extra.to_owned());
        }
        out.sort();
        out.dedup();
        out
    })
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    })
}

/// Problems name a variable of this layer, and a value refused as invalid was set.
fn check_problems(env: &Env, err: Option<&ConfigError>, prefix: &str, pairs: &[(String, String)]) {
    let problems = err.map_or(env.problems(), |e| e.problems());
    for p in problems {
        assert!(
            p.name.starts_with(prefix) || SHARED.contains(&p.name.as_str()),
            "{prefix}: a problem with {}",
            p.name
        );
        if let ProblemKind::Invalid { value, reason } = &p.kind {
            assert!(!reason.is_empty(), "{}: no reason", p.name);
            // A field judged against another may be unset: then no value is shown for it.
            let set = pairs
                .iter()
                .any(|(k, v)| *k == p.name && !v.trim().is_empty());
            assert!(
                set || value.is_empty(),
                "{} shows {value:?} but is not set",
                p.name
            );
        }
    }
    if let Some(e) = err {
        let text = e.to_string();
        assert!(
            text.contains(&format!("{} problem", e.problems().len())),
            "{text}"
        );
    }
}

/// `from_env` over `pairs`, then the layer from the configuration. Returns the config (for
/// comparison) and panics when a build refuses what `from_env` accepted.
macro_rules! layer {
    ($pairs:expr, $prefix:literal, $config:ty, $build:expr) => {{
        let mut env = Env::from_pairs($pairs.iter().cloned());
        let config = <$config>::from_env(&mut env);
        check_problems(&env, None, $prefix, $pairs);
        if env.problems().is_empty() {
            let built = $build(config.clone());
            if let Err(e) = built {
                panic!(
                    "{}: from_env accepted {:?} but the build refuses it: {e}",
                    $prefix, $pairs
                );
            }
        }
        config
    }};
}

fn all(pairs: &[(String, String)]) -> impl std::fmt::Debug + PartialEq + use<> {
    let retry = layer!(pairs, "PALISADE_RETRY", RetryConfig, |c| {
        RetryLayer::from_config(c).map(drop)
    });
    let breaker = layer!(
        pairs,
        "PALISADE_CIRCUIT_BREAKER",
        CircuitBreakerConfig,
        |c| { CircuitBreakerLayer::from_config(c).map(drop) }
    );
    let limit = layer!(pairs, "PALISADE_RATE_LIMIT", RateLimitConfig, |c| {
        RateLimitLayer::from_config(c).map(drop)
    });
    let headers = layer!(
        pairs,
        "PALISADE_SECURITY_HEADERS",
        SecurityHeadersConfig,
        |c| { SecurityHeadersLayer::from_config(c).map(drop) }
    );
    let budget = layer!(pairs, "PALISADE_BUDGET", BudgetConfig, |c| {
        BudgetLayer::from_config(c).map(drop)
    });
    // The cost meter's own `from_env_in` checks the price file as well.
    let cost = runtime().block_on(async {
        let (recorder, shutdown) =
            UsageRecorder::spawn(MemorySink::new(), RecorderConfig::default());
        let got = CostMeterLayer::from_env_in(Env::from_pairs(pairs.iter().cloned()), recorder);
        if let Err(e) = &got {
            check_problems(&Env::default(), Some(e), "PALISADE_COST", pairs);
        }
        shutdown.shutdown().await;
        let mut env = Env::from_pairs(pairs.iter().cloned());
        (CostConfig::from_env(&mut env), got.is_ok())
    });
    (retry, breaker, limit, headers, budget, cost)
}

fuzz_target!(|input: Input| {
    let names = names();
    let pairs: Vec<(String, String)> = input
        .vars
        .iter()
        .take(12)
        .map(|(n, v)| {
            let name = names[usize::from(*n) % names.len()].clone();
            let value = match v {
                Val::Known(i) => VALUES[usize::from(*i) % VALUES.len()].to_owned(),
                // Never let the fuzzer name a file to read (a price file path): only known paths.
                Val::Text(_) if name.contains("FILE") => "/no/such/prices.json".to_owned(),
                Val::Text(t) => t.clone(),
            };
            (name, value)
        })
        .collect();
    let base = all(&pairs);
    // Variables outside every layer's names change nothing.
    let mut more = pairs.clone();
    more.push(("PALISADE_RETRYX".to_owned(), "garbage".to_owned()));
    more.push(("OTHER_VARIABLE".to_owned(), "1".to_owned()));
    if !pairs
        .iter()
        .any(|(k, _)| k == "PALISADE_RETRYX" || k == "OTHER_VARIABLE")
    {
        assert_eq!(all(&more), base);
    }

    let d = Duration::new(input.secs % (1 << 40), input.nanos % 1_000_000_000);
    assert_eq!(duration::parse(&duration::format(d)), Ok(d));
});
