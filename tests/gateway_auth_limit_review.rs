//! Attacks on the gateway's limit on failed authentications per client address
//! (`PALISADE_GATEWAY_AUTH_FAILURES_PER_MINUTE`), over real sockets on 127.0.0.1 through
//! the gateway's own serve loop (which gives every request its client's address): who is
//! counted, who can be made to pay for whom, what the refusal says, what the audit gets.
#![allow(dead_code)]

include!("chat_gateway_support/modules.rs");

use std::time::Duration;

use http::Method;

use fixture::{ADMIN, FAST_RETRIES, Gateway, OTHER, USER, WRONG};

/// The gateway, served by its own loop, with `vars` on top of fast retries.
async fn serve(vars: &[(&str, &str)]) -> Gateway {
    fixture::serve_own(fixture::config(&fixture::with(FAST_RETRIES, vars))).await
}

/// Connection deadlines longer than the tests' advances of the paused clock, so the
/// pooled client's connection outlives them.
const PATIENT: &[(&str, &str)] = &[
    ("PALISADE_GATEWAY_IDLE_TIMEOUT", "1h"),
    ("PALISADE_GATEWAY_HEADER_TIMEOUT", "1h"),
];

/// `GET path` with a wrong key, and `X-Forwarded-For: xff` when given.
async fn wrong_key(gw: &Gateway, path: &str, xff: Option<&str>) -> fixture::Reply {
    let headers: Vec<(&str, &str)> = xff.map(|v| ("x-forwarded-for", v)).into_iter().collect();
    gw.call(Method::GET, path, Some(WRONG), None, &headers)
        .await
}

/// The statuses of `n` wrong-key requests on `path`, with `xff(i)` as the forwarded hops.
async fn statuses(
    gw: &Gateway,
    path: &str,
    n: usize,
    xff: impl Fn(usize) -> Option<String>,
) -> Vec<u16> {
    let mut out = Vec::new();
    for i in 0..n {
        let r = wrong_key(gw, path, xff(i).as_deref()).await;
        out.push(r.status.as_u16());
    }
    out
}

/// With no proxy trusted, `X-Forwarded-For` is the client's own claim: a new forged
/// address on every request neither spreads the failures over many counts nor keeps the
/// sender from being limited.
#[tokio::test]
async fn forged_forwarded_for_from_an_untrusted_peer_is_ignored() {
    let gw = serve(&[("PALISADE_GATEWAY_AUTH_FAILURES_PER_MINUTE", "3")]).await;
    let got = statuses(&gw, "/v1/bots", 5, |i| Some(format!("198.51.100.{i}"))).await;
    assert_eq!(got, [401, 401, 401, 429, 429]);
}

/// Behind a trusted proxy the client is the last hop the proxy appended: addresses a
/// client writes to the left of it are neither counted nor able to get another address
/// (a victim's) throttled.
#[tokio::test]
async fn behind_a_trusted_proxy_a_forged_hop_cannot_throttle_a_victim() {
    let gw = serve(&[
        ("PALISADE_GATEWAY_AUTH_FAILURES_PER_MINUTE", "2"),
        ("PALISADE_RATE_LIMIT_TRUSTED_PROXIES", "127.0.0.0/8"),
    ])
    .await;
    // The attacker (203.0.113.9) names the victim (198.51.100.7) first; the proxy appends
    // the attacker's own address.
    let attacker = statuses(&gw, "/v1/bots", 4, |_| {
        Some("198.51.100.7, 203.0.113.9".to_owned())
    })
    .await;
    assert_eq!(attacker, [401, 401, 429, 429]);
    let victim = wrong_key(&gw, "/v1/bots", Some("198.51.100.7")).await;
    assert_eq!(victim.status, 401, "{}", victim.text());
    // and the proxy's own address was never charged for its clients
    let proxy = wrong_key(&gw, "/v1/bots", None).await;
    assert_eq!(proxy.status, 401, "{}", proxy.text());
}

/// An IPv6 client holds a whole /64: its addresses share one count, as the rate limits
/// count them; another /64 is another client, and so is each IPv4-mapped address.
#[tokio::test]
async fn ipv6_addresses_of_one_64_share_one_count() {
    let gw = serve(&[
        ("PALISADE_GATEWAY_AUTH_FAILURES_PER_MINUTE", "3"),
        ("PALISADE_RATE_LIMIT_TRUSTED_PROXIES", "127.0.0.0/8"),
    ])
    .await;
    let got = statuses(&gw, "/v1/bots", 5, |i| {
        Some(format!("2001:db8:1:2:{:x}::{:x}", i + 1, i * 7 + 1))
    })
    .await;
    assert_eq!(got, [401, 401, 401, 429, 429]);
    let other = wrong_key(&gw, "/v1/bots", Some("2001:db8:1:3::1")).await;
    assert_eq!(other.status, 401, "{}", other.text());
    // IPv4 clients of a dual-stack listener arrive IPv4-mapped: each is its own client,
    // never one shared ::ffff:0:0/64
    let mapped = statuses(&gw, "/v1/bots", 4, |_| {
        Some("::ffff:198.51.100.1".to_owned())
    })
    .await;
    assert_eq!(mapped, [401, 401, 401, 429]);
    let neighbour = wrong_key(&gw, "/v1/bots", Some("::ffff:198.51.100.2")).await;
    assert_eq!(neighbour.status, 401, "{}", neighbour.text());
    // and the mapped form is the same client as the plain one
    let plain = wrong_key(&gw, "/v1/bots", Some("198.51.100.1")).await;
    assert_eq!(plain.status, 429, "{}", plain.text());
}

/// A valid key from an address past its limit is never refused by it: a user key, an
/// admin key on an admin route, and a user key on an admin route still gets its 403.
#[tokio::test]
async fn valid_keys_from_a_throttled_address_are_never_refused() {
    let gw = serve(&[("PALISADE_GATEWAY_AUTH_FAILURES_PER_MINUTE", "1")]).await;
    assert_eq!(
        statuses(&gw, "/v1/bots", 3, |_| None).await,
        [401, 429, 429]
    );
    assert_eq!(gw.get("/v1/bots", USER).await.status, 200);
    assert_eq!(gw.get("/v1/usage", ADMIN).await.status, 200);
    let forbidden = gw.get("/admin/budgets/alice", USER).await;
    assert_eq!(forbidden.status, 403, "{}", forbidden.text());
    // the failures still answer 429 after them
    assert_eq!(statuses(&gw, "/v1/bots", 1, |_| None).await, [429]);
}

/// The 429 counts down to the end of the minute, and once the minute is over the
/// address's failures answer 401 again, up to the limit.
#[tokio::test(start_paused = true)]
async fn retry_after_counts_down_and_failures_are_401_again_after_the_minute() {
    let gw = serve(&fixture::with(
        PATIENT,
        &[("PALISADE_GATEWAY_AUTH_FAILURES_PER_MINUTE", "2")],
    ))
    .await;
    assert_eq!(
        statuses(&gw, "/v1/bots", 3, |_| None).await,
        [401, 401, 429]
    );
    tokio::time::advance(Duration::from_secs(45)).await;
    let r = wrong_key(&gw, "/v1/bots", None).await;
    assert_eq!(r.status, 429, "{}", r.text());
    let secs: u64 = r.expect_header("retry-after").parse().unwrap();
    assert!((14..=15).contains(&secs), "retry-after {secs}");
    tokio::time::advance(Duration::from_secs(secs)).await;
    assert_eq!(
        statuses(&gw, "/v1/bots", 3, |_| None).await,
        [401, 401, 429]
    );
}

/// The refusal is the gateway's typed error in either format, with `retry-after`.
#[tokio::test]
async fn the_429_is_the_typed_error_in_both_formats() {
    let anthropic = serve(&[("PALISADE_GATEWAY_AUTH_FAILURES_PER_MINUTE", "1")]).await;
    let problem = serve(&[
        ("PALISADE_GATEWAY_AUTH_FAILURES_PER_MINUTE", "1"),
        ("PALISADE_ERROR_FORMAT", "problem_json"),
    ])
    .await;
    for gw in [&anthropic, &problem] {
        assert_eq!(statuses(gw, "/v1/bots", 1, |_| None).await, [401]);
    }
    let r = wrong_key(&anthropic, "/v1/bots", None).await;
    r.anthropic_error(429, "rate_limit_error");
    assert!(r.header("retry-after").is_some(), "{:?}", r.headers);
    let r = wrong_key(&problem, "/v1/bots", None).await;
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.expect_header("content-type"), "application/problem+json");
    let doc = r.json();
    assert_eq!(doc["status"], 429, "{doc}");
    assert_eq!(doc["kind"], "rate_limited", "{doc}");
    assert_eq!(
        doc["retry_after"]
            .as_u64()
            .map(|s| s.to_string())
            .as_deref(),
        r.header("retry-after"),
        "{doc}"
    );
}

/// The `auth_throttled` audit events logged for `subject` so far.
fn throttled_events(subject: &str) -> Vec<serde_json::Value> {
    let logs = fixture::captured_logs("chat_gateway=info");
    let text = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["target"] == "chat_gateway::audit")
        .map(|l| l["fields"].clone())
        .filter(|f| f["event"] == "auth_throttled" && f["subject"] == subject)
        .collect()
}

/// Each address past its limit is audited once a minute, however many failures it
/// sends: one event per address in the first minute, one again in the next.
#[tokio::test(start_paused = true)]
async fn throttled_failures_are_audited_once_a_minute_per_address() {
    fixture::captured_logs("chat_gateway=info");
    let gw = serve(&fixture::with(
        PATIENT,
        &[
            ("PALISADE_GATEWAY_AUTH_FAILURES_PER_MINUTE", "2"),
            ("PALISADE_RATE_LIMIT_TRUSTED_PROXIES", "127.0.0.0/8"),
        ],
    ))
    .await;
    let path = "/v1/bots/bot_audited_once_a_minute";
    for _minute in 0..2 {
        for addr in ["198.51.100.1", "198.51.100.2"] {
            let got = statuses(&gw, path, 10, |_| Some(addr.to_owned())).await;
            assert_eq!(&got[..2], [401, 401], "{got:?}");
            assert!(got[2..].iter().all(|&s| s == 429), "{got:?}");
        }
        tokio::time::advance(Duration::from_secs(60)).await;
    }
    assert_eq!(
        throttled_events(path).len(),
        4,
        "{:?}",
        throttled_events(path)
    );
}

/// The setting takes any whole number: the largest is no limit in practice, never a
/// panic; one past it, or a sign, is refused at start-up with the variable named.
#[tokio::test]
async fn extreme_limits_are_served_or_refused_by_name() {
    let gw = serve(&[(
        "PALISADE_GATEWAY_AUTH_FAILURES_PER_MINUTE",
        "18446744073709551615",
    )])
    .await;
    assert_eq!(statuses(&gw, "/v1/bots", 3, |_| None).await, [401; 3]);
    for bad in ["18446744073709551616", "+-1"] {
        let mut env =
            palisade::config::Env::from_pairs([("PALISADE_GATEWAY_AUTH_FAILURES_PER_MINUTE", bad)]);
        let _ = config::GatewayConfig::from_env(&mut env);
        let err = env.finish().expect_err(bad);
        assert_eq!(
            err.problems()[0].name,
            "PALISADE_GATEWAY_AUTH_FAILURES_PER_MINUTE",
            "{bad}"
        );
    }
}

/// A request refused for its client's failures cannot succeed by retrying it (its key is
/// still wrong or missing): the 429 says so with `x-should-retry: false`, which the
/// official SDKs obey. Without it they retry every 429 after `retry-after` (up to a
/// minute, twice by default), each retry another failure, and the user waits minutes for
/// an error that says nothing of the key.
#[tokio::test]
async fn a_throttled_failure_tells_clients_not_to_retry() {
    let gw = serve(&[("PALISADE_GATEWAY_AUTH_FAILURES_PER_MINUTE", "1")]).await;
    assert_eq!(statuses(&gw, "/v1/bots", 1, |_| None).await, [401]);
    for key in [Some(WRONG), None] {
        let r = gw.call(Method::GET, "/v1/bots", key, None, &[]).await;
        assert_eq!(r.status, 429, "{}", r.text());
        assert_eq!(r.header("x-should-retry"), Some("false"), "{:?}", r.headers);
    }
}

/// The audit events of `event` logged for `subject` so far.
fn audit_events(event: &str, subject: &str) -> usize {
    let logs = fixture::captured_logs("chat_gateway=info");
    let text = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["target"] == "chat_gateway::audit")
        .filter(|l| l["fields"]["event"] == event && l["fields"]["subject"] == subject)
        .count()
}

/// A valid key's refusals are audited at most 60 a minute per caller: a user key looping on
/// an admin route, or past its own rate limit, gets 60 events and one
/// `refusals_unaudited` event for the rest of the minute; the next minute is audited again.
#[tokio::test(start_paused = true)]
async fn a_valid_keys_refusals_are_audited_at_most_60_a_minute() {
    fixture::captured_logs("chat_gateway=info");
    let gw = serve(&fixture::with(
        PATIENT,
        &[(
            "PALISADE_RATE_LIMIT_RULES",
            r#"[{"name":"tiny","limit":1,"window":"1h"}]"#,
        )],
    ))
    .await;
    let admin_path = "/admin/budgets/refusals_audited";
    let bot_path = "/v1/bots/bot_refusals_audited";
    for _ in 0..100 {
        assert_eq!(gw.get(admin_path, USER).await.status, 403);
    }
    assert_eq!(gw.get(bot_path, OTHER).await.status, 404);
    for _ in 0..100 {
        assert_eq!(gw.get(bot_path, OTHER).await.status, 429);
    }
    assert_eq!(audit_events("forbidden", admin_path), 60);
    assert_eq!(audit_events("refusals_unaudited", admin_path), 1);
    assert_eq!(audit_events("rate_limited", bot_path), 60);
    assert_eq!(audit_events("refusals_unaudited", bot_path), 1);
    tokio::time::advance(Duration::from_secs(60)).await;
    assert_eq!(gw.get(admin_path, USER).await.status, 403);
    assert_eq!(audit_events("forbidden", admin_path), 61);
}

/// Failures from many addresses, each under its own limit, are audited at most 600 a
/// minute all together (an IPv6 /48 alone holds 65,536 /64s): past that one
/// `auth_failures_unaudited` event stands for the rest of the minute's, the failures still
/// answer 401, and the next minute is audited again.
#[tokio::test(start_paused = true)]
async fn failures_from_many_addresses_are_audited_at_most_600_a_minute() {
    fixture::captured_logs("chat_gateway=info");
    let gw = serve(&fixture::with(
        PATIENT,
        &[
            ("PALISADE_GATEWAY_AUTH_FAILURES_PER_MINUTE", "5"),
            ("PALISADE_RATE_LIMIT_TRUSTED_PROXIES", "127.0.0.0/8"),
        ],
    ))
    .await;
    let path = "/v1/bots/bot_many_addresses";
    let addr = |i: usize| Some(format!("10.1.{}.{}", i / 250, i % 250));
    let got = statuses(&gw, path, 700, addr).await;
    assert!(got.iter().all(|&s| s == 401), "{got:?}");
    assert_eq!(audit_events("auth_failed", path), 600);
    assert_eq!(audit_events("auth_failures_unaudited", path), 1);
    tokio::time::advance(Duration::from_secs(60)).await;
    assert_eq!(statuses(&gw, path, 1, addr).await, [401]);
    assert_eq!(audit_events("auth_failed", path), 601);
}
