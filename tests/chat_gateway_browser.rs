//! The chat_gateway's dashboard in a real browser: Debian's headless Chromium loads `/`
//! from a gateway on a loopback port, with no console error and no CSP violation, and a
//! screenshot lands in target/dashboard.png (the README's picture, docs/dashboard.png, is a
//! copy of it).
//!
//! Chromium is driven through its command line (`--dump-dom`, `--screenshot`,
//! `--enable-logging=stderr`, which prints every console message), so the test needs no
//! DevTools client. It fails, never skips, when `chromium` is missing (`$PALISADE_CHROMIUM`
//! names another binary). Two control tests show that the harness does see a console error
//! and a CSP violation when there is one.
#![allow(dead_code)]

include!("chat_gateway_support/modules.rs");

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use axum::response::Html;
use http::Method;
use palisade::cost::{Attribution, PriceTable, Usage, UsageRecord, UsageSink};
use palisade::security_headers::SecurityHeadersLayer;
use serde_json::json;

use fixture::{ADMIN, Gateway, NO_RETRIES, OTHER, USER, chat};

/// The gateway on the built-in mock, without retries, with `vars` on top.
async fn start(vars: &[(&str, &str)]) -> Gateway {
    fixture::start(&fixture::with(NO_RETRIES, vars)).await
}

impl Gateway {
    /// `POST /v1/messages` with `body`, as `key` or anonymously; the status.
    async fn message_status(&self, key: Option<&str>, body: serde_json::Value) -> u16 {
        self.call(Method::POST, "/v1/messages", key, Some(body), &[])
            .await
            .status
            .as_u16()
    }

    /// `GET path` anonymously; the body as text.
    async fn page(&self, path: &str) -> String {
        self.call(Method::GET, path, None, None, &[]).await.text()
    }
}

/// `palisade_gateway_requests_total` by series (`route`, `method`, `status` labels).
async fn requests(gw: &Gateway) -> std::collections::BTreeMap<String, f64> {
    gw.page("/metrics")
        .await
        .lines()
        .filter_map(|l| l.strip_prefix("palisade_gateway_requests_total{"))
        .filter_map(|l| l.rsplit_once("} "))
        .map(|(labels, v)| (labels.to_owned(), v.parse().unwrap()))
        .collect()
}

/// What the browser asked of the gateway between two [`requests`] readings: the series that
/// grew, with how much.
fn grown(
    before: &std::collections::BTreeMap<String, f64>,
    after: &std::collections::BTreeMap<String, f64>,
) -> Vec<(String, f64)> {
    after
        .iter()
        .filter_map(|(k, v)| {
            let d = v - before.get(k).copied().unwrap_or(0.0);
            (d > 0.0).then(|| (k.clone(), d))
        })
        .collect()
}

/// What one headless Chromium run printed.
struct Run {
    /// Every console message (errors, warnings, CSP violations, failed loads).
    console: Vec<String>,
    /// Standard output (the DOM, with `--dump-dom`).
    stdout: String,
}

fn chromium_binary() -> PathBuf {
    std::env::var_os("PALISADE_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"))
}

/// Loads `url` in a fresh headless Chromium profile with `extra` flags, letting the page run
/// for four seconds of virtual time.
async fn chromium(url: &str, extra: &[String]) -> Run {
    let binary = chromium_binary();
    let profile = std::env::temp_dir().join(format!(
        "palisade-chromium-{}-{}",
        std::process::id(),
        rand::random::<u64>()
    ));
    std::fs::create_dir_all(&profile).unwrap();
    let out = tokio::time::timeout(
        Duration::from_secs(90),
        tokio::process::Command::new(&binary)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-extensions",
                "--hide-scrollbars",
                "--enable-logging=stderr",
                "--v=0",
                "--virtual-time-budget=4000",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(extra)
            .arg(url)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("chromium finishes within 90 s")
    .unwrap_or_else(|e| {
        panic!(
            "cannot run {} ({e}): install Debian's chromium (scripts/test.sh does) or set \
             PALISADE_CHROMIUM",
            binary.display()
        )
    });
    let _ = std::fs::remove_dir_all(&profile);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "chromium failed ({}):\n{stderr}",
        out.status
    );
    Run {
        console: stderr
            .lines()
            .filter(|l| l.contains(":CONSOLE"))
            .map(str::to_owned)
            .collect(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
    }
}

/// An hour of demo usage (deterministic), written through the ledger's sink as the cost
/// meter writes it, so the charts have a history to draw.
async fn backfill(state: &app::AppState) {
    let prices = PriceTable::builtin();
    let now = SystemTime::now();
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut batch = Vec::new();
    for minute in (1..60u64).rev() {
        for (user, model, rate) in [
            ("alice", "claude-sonnet-4-5", 3),
            ("bob", "claude-haiku-4-5", 5),
            ("carol", "claude-opus-4-1", 1),
            ("alice", "claude-haiku-4-5", 2),
        ] {
            for _ in 0..(next() % (rate + 1)) {
                let usage = Usage {
                    input_tokens: 200 + next() % 1800,
                    output_tokens: 50 + next() % 700,
                    cache_read_tokens: next() % 1000,
                    ..Usage::default()
                };
                let time = now - Duration::from_secs(minute * 60 + next() % 60);
                let cost = prices.cost(model, &usage);
                let mut rec = UsageRecord::new(time, Some(model.to_owned()), usage, cost);
                rec.attribution = Attribution::default().with_user(user);
                rec.route = "/v1/messages".to_owned();
                rec.status = 200;
                batch.push(rec);
            }
        }
    }
    state.ledger.record_batch(&batch).await.unwrap();
}

#[tokio::test]
async fn dashboard_loads_in_headless_chromium_without_console_errors_or_csp_violations() {
    let rules = r#"[{"name":"chat","method":"POST","route":"/v1/messages","key":"principal","limit":6,"window":"1m","skip_anonymous":true}]"#;
    let gw = start(&[("PALISADE_RATE_LIMIT_RULES", rules)]).await;
    backfill(&gw.state).await;
    let before = gw.state.ledger.entries(
        std::time::UNIX_EPOCH,
        SystemTime::now() + Duration::from_secs(60),
        |_| true,
    );
    // Live traffic: chats, and refusals of four kinds.
    for (key, model) in [
        (USER, "claude-sonnet-4-5"),
        (USER, "claude-haiku-4-5"),
        (OTHER, "claude-haiku-4-5"),
    ] {
        assert_eq!(gw.message_status(Some(key), chat(model)).await, 200);
    }
    gw.usage_records(before.len() + 3).await;
    assert_eq!(gw.message_status(None, chat("claude-haiku-4-5")).await, 401);
    assert_eq!(
        gw.message_status(Some(USER), json!({"model": "claude-haiku-4-5"}))
            .await,
        400
    );
    assert_eq!(
        gw.message_status(Some(USER), chat("mock-overloaded")).await,
        529
    );
    let mut limited = 0;
    for _ in 0..8 {
        if gw
            .message_status(Some(OTHER), chat("claude-haiku-4-5"))
            .await
            == 429
        {
            limited += 1;
        }
    }
    assert!(limited >= 2, "bob hit the rate limit");

    let url = format!("http://{}/#key={ADMIN}", gw.addr);
    let seen = requests(&gw).await;
    let run = chromium(&url, &["--dump-dom".to_owned()]).await;
    // Failed loads do not reach the console log; the gateway saw every request the page made
    // (the policy allows no other origin), and answered each with a 200.
    let asked = grown(&seen, &requests(&gw).await);
    for route in [
        "/",
        "/dashboard/app.js",
        "/dashboard/app.css",
        "/v1/dashboard/data",
    ] {
        assert!(
            asked
                .iter()
                .any(|(k, _)| k
                    .starts_with(&format!(r#"route="{route}",method="GET",status="200""#))),
            "the page loaded {route}: {asked:?}"
        );
    }
    let failed: Vec<_> = asked
        .iter()
        .filter(|(k, _)| !k.contains(r#"status="200""#) && !k.starts_with(r#"route="/metrics""#))
        .collect();
    assert!(
        failed.is_empty(),
        "the page's requests that failed: {failed:?}"
    );
    assert!(
        run.console.is_empty(),
        "the dashboard logged to the console:\n{}",
        run.console.join("\n")
    );
    let dom = run.stdout;
    assert!(
        dom.contains(r#"<html lang="en" data-state="live">"#),
        "the script ran and drew live data:\n{dom}"
    );
    assert!(
        !dom.contains("data-csp-violations"),
        "no CSP violation event"
    );
    assert!(
        dom.contains("<td>carol</td><td>claude-opus-4-1</td>"),
        "{dom}"
    );
    assert!(
        dom.contains(r#"<span class="badge closed">Closed</span>"#),
        "{dom}"
    );
    assert!(dom.contains("<path d=\"M"), "the spend chart has lines");
    assert!(
        !dom.contains(ADMIN),
        "the key left the address bar and the page"
    );

    // The screenshot, at a desktop size.
    let target = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target");
    std::fs::create_dir_all(&target).unwrap();
    let png = target.join("dashboard.png");
    let _ = std::fs::remove_file(&png);
    let run = chromium(
        &url,
        &[
            format!("--screenshot={}", png.display()),
            "--window-size=1280,1330".to_owned(),
        ],
    )
    .await;
    assert!(
        run.console.is_empty(),
        "console messages while taking the screenshot:\n{}",
        run.console.join("\n")
    );
    let bytes = std::fs::read(&png).expect("chromium wrote the screenshot");
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG");
    assert!(
        bytes.len() > 20_000,
        "a drawn page, not a blank one ({} bytes)",
        bytes.len()
    );

    let metrics = gw.page("/metrics").await;
    assert!(
        !metrics.contains("palisade_gateway_csp_reports_total"),
        "no CSP report reached the gateway"
    );
}

#[tokio::test]
async fn control_the_harness_sees_a_failed_request() {
    let gw = start(&[]).await;
    let url = format!("http://{}/#key=sk-not-an-admin-key-00000", gw.addr);
    let seen = requests(&gw).await;
    let run = chromium(&url, &["--dump-dom".to_owned()]).await;
    let asked = grown(&seen, &requests(&gw).await);
    assert!(
        asked
            .iter()
            .any(|(k, _)| k == r#"route="/v1/dashboard/data",method="GET",status="401""#),
        "the refused key shows among the page's requests: {asked:?}"
    );
    assert!(
        run.stdout.contains("<form id=\"key-form\" class=\"card\">"),
        "the page asks for a key again"
    );
}

#[tokio::test]
async fn control_the_harness_sees_a_csp_violation() {
    // The dashboard's own policy on a page with an inline script and no nonce.
    let app = axum::Router::new()
        .route(
            "/",
            axum::routing::get(|| async {
                Html("<!doctype html><link rel=\"icon\" href=\"data:,\"><script>document.title = 'ran'</script>")
            }),
        )
        .layer(SecurityHeadersLayer::web());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let run = chromium(&format!("http://{addr}/"), &["--dump-dom".to_owned()]).await;
    assert!(
        run.console
            .iter()
            .any(|l| l.contains("Content Security Policy")),
        "the violation shows in the console: {:?}",
        run.console
    );
    assert!(
        !run.stdout.contains("<title>ran</title>"),
        "the inline script was blocked"
    );
}
