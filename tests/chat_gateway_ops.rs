//! The chat_gateway's operations side over real sockets: `/metrics`, the dashboard page and
//! its data, and (with the `sentry` feature) error reports to a stand-in ingestion endpoint.
#![allow(dead_code)]

include!("chat_gateway_support/modules.rs");

use bytes::Bytes;
use http::Method;
use http_body_util::Full;
use palisade::config::Env;
use serde_json::json;

use fixture::{ADMIN, FAST_RETRIES, Gateway, OTHER, USER, chat};

/// The gateway on the built-in mock, retrying in milliseconds, with `vars` on top.
async fn start(vars: &[(&str, &str)]) -> Gateway {
    fixture::start(&fixture::with(FAST_RETRIES, vars)).await
}

impl Gateway {
    async fn metrics(&self) -> Metrics {
        let r = self.call(Method::GET, "/metrics", None, None, &[]).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(
            r.expect_header("content-type")
                .starts_with("text/plain; version=0.0.4")
        );
        Metrics(r.text())
    }
}

/// Prometheus text, read by exact sample lines.
struct Metrics(String);

impl Metrics {
    /// The value of the sample `name{labels}` (labels as the exporter writes them, in
    /// order), or `None` when there is no such line.
    fn get(&self, name: &str, labels: &str) -> Option<f64> {
        let series = if labels.is_empty() {
            name.to_owned()
        } else {
            format!("{name}{{{labels}}}")
        };
        self.0.lines().find_map(|line| {
            let (k, v) = line.rsplit_once(' ')?;
            (k == series).then(|| v.parse().expect("a number"))
        })
    }

    fn value(&self, name: &str, labels: &str) -> f64 {
        self.get(name, labels)
            .unwrap_or_else(|| panic!("no sample {name}{{{labels}}} in:\n{}", self.0))
    }
}

#[tokio::test]
async fn metrics_count_requests_by_route_and_status_and_refusals_by_reason() {
    let gw = start(&[]).await;
    for _ in 0..2 {
        assert_eq!(gw.chat(USER, "claude-sonnet-4-5").await.status, 200);
    }
    assert_eq!(gw.chat(OTHER, "claude-haiku-4-5").await.status, 200);
    let anonymous = gw
        .call(
            Method::POST,
            "/v1/messages",
            None,
            Some(chat("claude-sonnet-4-5")),
            &[],
        )
        .await;
    assert_eq!(anonymous.status, 401);
    let invalid = gw
        .post("/v1/messages", USER, json!({"model": "claude-sonnet-4-5"}))
        .await;
    assert_eq!(invalid.status, 400);
    let forbidden = gw.get("/admin/budgets/alice", USER).await;
    assert_eq!(forbidden.status, 403);
    // A bot route is counted under its template, not its id.
    let missing = gw.get("/v1/bots/bot_nope", USER).await;
    assert_eq!(missing.status, 404);

    let m = gw.metrics().await;
    let req = "palisade_gateway_requests_total";
    assert_eq!(
        m.value(req, r#"route="/v1/messages",method="POST",status="200""#),
        3.0
    );
    assert_eq!(
        m.value(req, r#"route="/v1/messages",method="POST",status="401""#),
        1.0
    );
    assert_eq!(
        m.value(req, r#"route="/v1/messages",method="POST",status="400""#),
        1.0
    );
    assert_eq!(
        m.value(req, r#"route="/v1/bots/{id}",method="GET",status="404""#),
        1.0
    );
    let refusals = "palisade_gateway_refusals_total";
    assert_eq!(m.value(refusals, r#"reason="unauthenticated""#), 1.0);
    assert_eq!(m.value(refusals, r#"reason="invalid_request""#), 1.0);
    assert_eq!(m.value(refusals, r#"reason="forbidden""#), 1.0);
    assert_eq!(m.value(refusals, r#"reason="not_found""#), 1.0);
    assert_eq!(m.get(refusals, r#"reason="rate_limited""#), None);

    // Latency histograms: every request has a duration; the three that went upstream have
    // an upstream time and an overhead.
    let count = |name: &str| m.value(name, r#"route="/v1/messages""#);
    assert_eq!(
        count("palisade_gateway_request_duration_seconds_count"),
        5.0
    );
    assert_eq!(
        count("palisade_gateway_upstream_duration_seconds_count"),
        3.0
    );
    assert_eq!(count("palisade_gateway_overhead_seconds_count"), 3.0);
    assert!(
        count("palisade_gateway_overhead_seconds_sum")
            <= count("palisade_gateway_request_duration_seconds_sum")
    );
    assert!(m.0.contains("# TYPE palisade_gateway_overhead_seconds histogram"));
    assert!(m.0.contains("# HELP palisade_gateway_requests_total "));
}

#[tokio::test]
async fn metrics_tokens_and_cost_by_model_match_the_ledger_to_the_pico_dollar() {
    let gw = start(&[]).await;
    for (key, model) in [
        (USER, "claude-sonnet-4-5"),
        (USER, "claude-sonnet-4-5"),
        (OTHER, "claude-haiku-4-5"),
    ] {
        assert_eq!(gw.chat(key, model).await.status, 200);
    }
    let entries = gw.usage_records(3).await;
    let m = gw.metrics().await;
    for model in ["claude-sonnet-4-5", "claude-haiku-4-5"] {
        let of_model: Vec<_> = entries
            .iter()
            .filter(|e| e.record.model.as_deref() == Some(model))
            .collect();
        let picos: u128 = of_model
            .iter()
            .map(|e| e.record.cost.expect("priced").picos())
            .sum();
        let input: u64 = of_model.iter().map(|e| e.record.usage.input_tokens).sum();
        let output: u64 = of_model.iter().map(|e| e.record.usage.output_tokens).sum();
        assert!(picos > 0 && input > 0 && output > 0);
        let labels = format!(r#"model="{model}""#);
        assert_eq!(
            m.value("palisade_gateway_cost_picodollars_total", &labels),
            picos as f64
        );
        assert_eq!(
            m.value(
                "palisade_gateway_tokens_total",
                &format!(r#"{labels},kind="input""#)
            ),
            input as f64
        );
        assert_eq!(
            m.value(
                "palisade_gateway_tokens_total",
                &format!(r#"{labels},kind="output""#)
            ),
            output as f64
        );
        assert_eq!(
            m.value(
                "palisade_gateway_usage_records_total",
                &format!(r#"{labels},completion="complete""#)
            ),
            of_model.len() as f64
        );
    }
}

#[tokio::test]
async fn metrics_tell_rate_limits_from_budgets() {
    let rules = r#"[{"name":"chat","method":"POST","route":"/v1/messages","key":"principal","limit":1,"window":"1m","skip_anonymous":true}]"#;
    let gw = start(&[("PALISADE_RATE_LIMIT_RULES", rules)]).await;
    assert_eq!(gw.chat(USER, "claude-sonnet-4-5").await.status, 200);
    let limited = gw.chat(USER, "claude-sonnet-4-5").await;
    assert_eq!(limited.status, 429);

    // The first request's reservation (about $0.00404) fits; the second does not.
    let gw_budget = start(&[("PALISADE_GATEWAY_DAILY_BUDGET", "0.00405")]).await;
    assert_eq!(gw_budget.chat(USER, "claude-sonnet-4-5").await.status, 200);
    gw_budget.usage_records(1).await;
    let over = gw_budget.chat(USER, "claude-sonnet-4-5").await;
    assert_eq!(over.status, 429);
    assert_eq!(over.expect_header("x-should-retry"), "false");

    let m = gw.metrics().await;
    assert_eq!(
        m.value(
            "palisade_gateway_refusals_total",
            r#"reason="rate_limited""#
        ),
        1.0
    );
    assert_eq!(
        m.get(
            "palisade_gateway_refusals_total",
            r#"reason="budget_exceeded""#
        ),
        None
    );
    let m = gw_budget.metrics().await;
    assert_eq!(
        m.value(
            "palisade_gateway_refusals_total",
            r#"reason="budget_exceeded""#
        ),
        1.0
    );
    assert_eq!(
        m.get(
            "palisade_gateway_refusals_total",
            r#"reason="rate_limited""#
        ),
        None
    );
}

#[tokio::test]
async fn metrics_breaker_gauge_follows_the_breaker() {
    let gw = start(&[
        ("PALISADE_RETRY_MAX_RETRIES", "0"),
        ("PALISADE_CIRCUIT_BREAKER_CONSECUTIVE_FAILURES", "2"),
        ("PALISADE_CIRCUIT_BREAKER_MINIMUM_CALLS", "2"),
        ("PALISADE_CIRCUIT_BREAKER_OPEN_DURATION", "30s"),
    ])
    .await;
    let m = gw.metrics().await;
    let gauge = "palisade_gateway_breaker_state";
    assert_eq!(m.value(gauge, r#"upstream="primary",state="Closed""#), 1.0);
    assert_eq!(m.value(gauge, r#"upstream="primary",state="Open""#), 0.0);
    for _ in 0..2 {
        assert_eq!(gw.chat(USER, "mock-error").await.status, 500);
    }
    let refused = gw.chat(USER, "claude-sonnet-4-5").await;
    assert_eq!(refused.status, 529, "{}", refused.text());
    let m = gw.metrics().await;
    assert_eq!(m.value(gauge, r#"upstream="primary",state="Open""#), 1.0);
    assert_eq!(m.value(gauge, r#"upstream="primary",state="Closed""#), 0.0);
    assert_eq!(
        m.value("palisade_gateway_refusals_total", r#"reason="overloaded""#),
        1.0
    );
    // 500s are failures, not refusals.
    assert_eq!(
        m.value(
            "palisade_gateway_requests_total",
            r#"route="/v1/messages",method="POST",status="500""#
        ),
        2.0
    );
}

#[tokio::test]
async fn separate_gateways_keep_separate_metrics() {
    let a = start(&[]).await;
    let b = start(&[]).await;
    assert_eq!(a.chat(USER, "claude-sonnet-4-5").await.status, 200);
    let series = r#"route="/v1/messages",method="POST",status="200""#;
    assert_eq!(
        a.metrics()
            .await
            .value("palisade_gateway_requests_total", series),
        1.0
    );
    assert_eq!(
        b.metrics()
            .await
            .get("palisade_gateway_requests_total", series),
        None
    );
}

#[tokio::test]
async fn dashboard_data_needs_an_admin_key() {
    let gw = start(&[]).await;
    let none = gw
        .call(Method::GET, "/v1/dashboard/data", None, None, &[])
        .await;
    assert_eq!(none.status, 401);
    let user = gw.get("/v1/dashboard/data", USER).await;
    assert_eq!(user.status, 403);
    let body = user.json();
    assert_eq!(body["error"]["type"], "permission_error", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("admin key")
    );
    let admin = gw.get("/v1/dashboard/data", ADMIN).await;
    assert_eq!(admin.status, 200, "{}", admin.text());
}

#[tokio::test]
async fn dashboard_data_minutes_out_of_range_is_a_field_error() {
    let gw = start(&[]).await;
    for bad in ["0", "1441", "an hour", "-5"] {
        let r = gw
            .get(
                &format!("/v1/dashboard/data?minutes={}", bad.replace(' ', "%20")),
                ADMIN,
            )
            .await;
        assert_eq!(r.status, 400, "{bad}: {}", r.text());
        let body = r.json();
        assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
        assert!(body.to_string().contains("minutes"), "{body}");
    }
    let ok = gw.get("/v1/dashboard/data?minutes=1440", ADMIN).await;
    assert_eq!(ok.status, 200);
    let w = &ok.json()["window"];
    assert_eq!(w["bucket_ms"], 24 * 60_000);
}

#[tokio::test]
async fn dashboard_data_shows_spend_per_user_and_model_breakers_and_refusals() {
    let gw = start(&[]).await;
    for (key, model) in [
        (USER, "claude-sonnet-4-5"),
        (USER, "claude-sonnet-4-5"),
        (USER, "claude-haiku-4-5"),
        (OTHER, "claude-haiku-4-5"),
    ] {
        assert_eq!(gw.chat(key, model).await.status, 200);
    }
    assert_eq!(
        gw.call(
            Method::POST,
            "/v1/messages",
            None,
            Some(chat("claude-haiku-4-5")),
            &[],
        )
        .await
        .status,
        401
    );
    // A call that used nothing (the upstream was overloaded) is counted but not drawn.
    assert_eq!(gw.chat(USER, "mock-overloaded").await.status, 529);
    let entries = gw.usage_records(5).await;
    let data = gw.get("/v1/dashboard/data", ADMIN).await.json();

    let spend = data["spend"].as_array().unwrap();
    assert_eq!(spend.len(), 3, "{data}");
    let mut total = palisade::cost::Money::ZERO;
    for s in spend {
        let (user, model) = (s["user"].as_str().unwrap(), s["model"].as_str().unwrap());
        let of: Vec<_> = entries
            .iter()
            .filter(|e| {
                e.record.attribution.user.as_deref() == Some(user)
                    && e.record.model.as_deref() == Some(model)
            })
            .collect();
        let cost = of.iter().fold(palisade::cost::Money::ZERO, |a, e| {
            a.saturating_add(e.record.cost.unwrap())
        });
        total = total.saturating_add(cost);
        assert_eq!(s["cost_usd"], cost.dollars_string(), "{s}");
        assert_eq!(s["requests"], of.len());
        let points: Vec<u64> = serde_json::from_value(s["points_microusd"].clone()).unwrap();
        assert_eq!(points.len(), 60);
        assert!(
            points.windows(2).all(|w| w[0] <= w[1]),
            "cumulative: {points:?}"
        );
        assert_eq!(*points.last().unwrap() as u128, cost.picos() / 1_000_000);
    }
    // The biggest spender comes first: alice's two Sonnet calls.
    assert_eq!(spend[0]["user"], "alice");
    assert_eq!(spend[0]["model"], "claude-sonnet-4-5");
    assert_eq!(data["totals"]["requests"], 5);
    assert_eq!(data["totals"]["cost_usd"], total.dollars_string());

    assert_eq!(data["breakers"][0]["upstream"], "primary");
    assert_eq!(data["breakers"][0]["state"], "Closed");
    let by_reason: Vec<(String, u64)> =
        serde_json::from_value(data["refusals"]["by_reason"].clone()).unwrap();
    assert!(
        by_reason.contains(&("unauthenticated".to_owned(), 1)),
        "{by_reason:?}"
    );
    assert!(by_reason.contains(&("rate_limited".to_owned(), 0)));
    let per_minute: Vec<(u64, u64)> =
        serde_json::from_value(data["refusals"]["per_minute"].clone()).unwrap();
    assert_eq!(per_minute.len(), 60);
    assert!(
        by_reason.contains(&("overloaded".to_owned(), 1)),
        "{by_reason:?}"
    );
    assert_eq!(per_minute.iter().map(|p| p.1).sum::<u64>(), 2);
    assert_eq!(
        per_minute[58..].iter().map(|p| p.1).sum::<u64>(),
        2,
        "counted in the current minute (or the one before, across a minute's turn)"
    );
}

#[tokio::test]
async fn dashboard_page_is_served_under_a_fresh_nonce_csp_with_no_inline_script() {
    let gw = start(&[]).await;
    let page = gw.call(Method::GET, "/", None, None, &[]).await;
    assert_eq!(page.status, 200);
    assert_eq!(
        page.expect_header("content-type"),
        "text/html; charset=utf-8"
    );
    let csp = page.expect_header("content-security-policy").to_owned();
    let nonce = csp
        .split("'nonce-")
        .nth(1)
        .and_then(|s| s.split('\'').next())
        .unwrap_or_else(|| panic!("no nonce in {csp}"));
    assert!(
        csp.contains(&format!("script-src 'self' 'nonce-{nonce}'")),
        "{csp}"
    );
    assert!(csp.contains("default-src 'self'"), "{csp}");
    assert!(csp.contains("report-uri /dashboard/csp-reports"), "{csp}");
    let html = page.text();
    assert!(html.contains(&format!(
        "<script src=\"/dashboard/app.js\" nonce=\"{nonce}\" defer></script>"
    )));
    // Every script is an external file; no inline style or handler either.
    assert_eq!(
        html.matches("<script").count(),
        html.matches("<script src=").count()
    );
    assert!(!html.contains("style="), "no inline style");
    assert!(!html.contains(" onclick=") && !html.contains(" onload="));
    assert!(!html.contains("{{nonce}}"));
    assert_eq!(page.expect_header("x-frame-options"), "DENY");
    assert!(
        !page
            .expect_header("permissions-policy")
            .contains("bluetooth")
    );

    let again = gw.call(Method::GET, "/", None, None, &[]).await;
    assert_ne!(
        again.expect_header("content-security-policy"),
        csp,
        "a fresh nonce per response"
    );
    for (path, kind) in [
        ("/dashboard/app.js", "text/javascript; charset=utf-8"),
        ("/dashboard/app.css", "text/css; charset=utf-8"),
    ] {
        let r = gw.call(Method::GET, path, None, None, &[]).await;
        assert_eq!(r.status, 200, "{path}");
        assert_eq!(r.expect_header("content-type"), kind);
        assert_eq!(r.expect_header("x-content-type-options"), "nosniff");
    }
    // The API keeps its own strict policy.
    let api = gw.get("/v1/dashboard/data", ADMIN).await;
    assert!(
        api.expect_header("content-security-policy")
            .starts_with("default-src 'none'")
    );
}

#[tokio::test]
async fn csp_reports_are_counted_in_metrics() {
    let gw = start(&[]).await;
    let report = json!({"csp-report": {"document-uri": "http://127.0.0.1/", "violated-directive": "script-src-elem"}});
    let req = http::Request::post(format!("http://{}/dashboard/csp-reports", gw.addr))
        .header("content-type", "application/csp-report")
        .body(Full::new(Bytes::from(report.to_string())))
        .unwrap();
    let res = gw.client.request(req).await.unwrap();
    assert_eq!(res.status(), 204);
    let m = gw.metrics().await;
    assert_eq!(m.value("palisade_gateway_csp_reports_total", ""), 1.0);
}

#[cfg(not(feature = "sentry"))]
#[test]
fn sentry_dsn_without_the_sentry_feature_is_a_configuration_problem() {
    let mut env = Env::from_pairs([("SENTRY_DSN", "https://abc@o1.ingest.sentry.io/42")]);
    let _ = config::GatewayConfig::from_env(&mut env);
    let err = env
        .finish()
        .expect_err("a DSN this build cannot use")
        .to_string();
    assert!(err.contains("SENTRY_DSN"), "{err}");
    assert!(err.contains("--features sentry"), "{err}");
    assert!(!err.contains("abc@"), "the DSN is not echoed: {err}");
}

#[cfg(feature = "sentry")]
mod error_tracking {
    use std::time::Duration;

    use axum::extract::State;
    use axum::routing::post;
    use http::HeaderMap;
    use tokio::sync::mpsc;

    use super::*;

    /// One envelope the stand-in received: its `x-sentry-auth` header and its text.
    struct Received {
        auth: String,
        body: String,
    }

    /// A stand-in for Sentry's ingestion endpoint on a loopback port; its DSN and what it
    /// receives.
    async fn ingestion() -> (String, mpsc::UnboundedReceiver<Received>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let app = axum::Router::new()
            .route(
                "/api/42/envelope/",
                post(
                    |State(tx): State<mpsc::UnboundedSender<Received>>,
                     headers: HeaderMap,
                     body: Bytes| async move {
                        let auth = headers
                            .get("x-sentry-auth")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_owned();
                        let body = String::from_utf8_lossy(&body).into_owned();
                        let _ = tx.send(Received { auth, body });
                        axum::Json(json!({"id": "0"}))
                    },
                ),
            )
            .with_state(tx);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (format!("http://publickey0123@{addr}/42"), rx)
    }

    async fn next(rx: &mut mpsc::UnboundedReceiver<Received>) -> Received {
        tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .expect("an envelope reaches the stand-in within 20 s")
            .expect("the stand-in is running")
    }

    #[test]
    fn redact_hides_configured_keys_and_anything_shaped_like_one() {
        let secrets = vec!["my-own-secret-key-123".to_owned(), "short".to_owned()];
        let r = |s: &str| sentry::redact(s, &secrets);
        assert_eq!(r("key sk-ant-api03-AbC_d-123 here"), "key [redacted] here");
        assert_eq!(r("sk-test-alice-0123456789"), "[redacted]");
        assert_eq!(r("x my-own-secret-key-123 y"), "x [redacted] y");
        assert_eq!(
            r("task-12345678 and sk-short"),
            "task-12345678 and sk-short"
        );
        assert_eq!(r("a short word"), "a short word", "too short to be a key");
        assert_eq!(r("(sk-0123456789abcdef)"), "([redacted])");
        assert_eq!(r("héllo sk-ünïcode"), "héllo sk-ünïcode");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sentry_gets_5xx_and_panics_with_keys_and_bodies_scrubbed() {
        let (dsn, mut rx) = ingestion().await;
        let mut env = Env::from_pairs([("SENTRY_DSN", "o1.ingest.sentry.io/42")]);
        let _ = config::GatewayConfig::from_env(&mut env);
        let err = env.finish().expect_err("a malformed DSN").to_string();
        assert!(err.contains("SENTRY_DSN"), "{err}");

        let gw = start(&[
            ("SENTRY_DSN", dsn.as_str()),
            ("PALISADE_RETRY_MAX_RETRIES", "0"),
        ])
        .await;
        assert!(gw.state.config.sentry.dsn.is_some());
        // A success is not reported; the 500 after it is.
        assert_eq!(gw.chat(USER, "claude-sonnet-4-5").await.status, 200);
        let body = json!({
            "model": "mock-error",
            "max_tokens": 64,
            "messages": [{"role": "user", "content": "PROMPT-CANARY my key is sk-ant-api03-leaked0000"}]
        });
        let failed = gw.post("/v1/messages?token=QUERY-CANARY", USER, body).await;
        assert_eq!(failed.status, 500);
        let request_id = failed.expect_header("x-request-id").to_owned();

        let report = next(&mut rx).await;
        assert!(
            report.auth.contains("sentry_key=publickey0123"),
            "{}",
            report.auth
        );
        let text = &report.body;
        assert!(text.contains(r#""route":"/v1/messages""#), "{text}");
        assert!(text.contains(r#""status":"500""#), "{text}");
        assert!(text.contains(&request_id), "the request id: {text}");
        assert!(text.contains(r#""id":"alice""#), "the user: {text}");
        for secret in [
            USER,
            "PROMPT-CANARY",
            "QUERY-CANARY",
            "sk-ant",
            "x-api-key",
            "Hello there",
        ] {
            assert!(!text.contains(secret), "{secret} leaked: {text}");
        }

        // A panic anywhere in the process, with a key in its message.
        let panicked = std::thread::spawn(|| {
            panic!("upstream refused the key {USER} (sk-ant-api03-leaked0001)");
        })
        .join();
        assert!(panicked.is_err());
        let report = next(&mut rx).await;
        let text = &report.body;
        assert!(
            text.contains("upstream refused the key [redacted] ([redacted])"),
            "{text}"
        );
        assert!(!text.contains(USER) && !text.contains("sk-ant"), "{text}");
    }
}
