//! The gateway's late changes under hostile input, over real sockets on 127.0.0.1: the
//! server loop's deadlines at their configured extremes, and the histogram upkeep.
#![allow(dead_code)]

include!("chat_gateway_support/modules.rs");

use fixture::USER;

/// The server loop's deadlines: each must be given as a positive duration it can add to
/// the clock. A duration past what tokio's clock can hold (`Instant + Duration`
/// overflows, about 292 billion years on Linux) was accepted and made every connection's
/// task panic: the header deadline on accept, the idle and write deadlines on the first
/// request.
const DEADLINES: [&str; 3] = [
    "PALISADE_GATEWAY_HEADER_TIMEOUT",
    "PALISADE_GATEWAY_IDLE_TIMEOUT",
    "PALISADE_GATEWAY_WRITE_TIMEOUT",
];

#[test]
fn an_absurd_server_deadline_is_a_configuration_error() {
    for name in DEADLINES {
        for bad in ["200000000000000d", "18446744073709551615s", "100000000h"] {
            let mut env = palisade::config::Env::from_pairs([(name, bad)]);
            let _ = config::GatewayConfig::from_env(&mut env);
            let err = env.finish().expect_err(&format!("{name}={bad} is refused"));
            assert!(
                err.problems().iter().any(|p| p.name == name),
                "{name}={bad}: {err}"
            );
        }
    }
}

/// The longest deadline the configuration takes is served: a request is answered and the
/// connection stays usable.
#[tokio::test]
async fn the_longest_accepted_deadlines_serve_requests() {
    let vars = [
        ("PALISADE_GATEWAY_HEADER_TIMEOUT", "24h"),
        ("PALISADE_GATEWAY_IDLE_TIMEOUT", "24h"),
        ("PALISADE_GATEWAY_WRITE_TIMEOUT", "24h"),
    ];
    let gw = fixture::serve_own(fixture::config(&vars)).await;
    for _ in 0..2 {
        let r = gw.get("/v1/usage", USER).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
}

/// `name{labels} value` in Prometheus text: the value.
fn sample(text: &str, name: &str, labels: &str) -> f64 {
    let head = format!("{name}{{{labels}}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(head.as_str()))
        .unwrap_or_else(|| panic!("no {head} in\n{text}"))
        .parse()
        .unwrap()
}

/// Histogram samples folded by the upkeep every 5 s and by scrapes are neither lost nor
/// counted twice: counts and sums stay exact over many upkeeps and scrapes.
#[tokio::test(start_paused = true)]
async fn histogram_counts_and_sums_stay_exact_across_upkeeps_and_scrapes() {
    let app = crate::app::build(fixture::config(&[]))
        .await
        .expect("gateway builds");
    let metrics = &app.state.metrics;
    let ok = || axum::response::IntoResponse::into_response(http::StatusCode::OK);
    let mut n = 0u64;
    let mut sum = 0.0f64;
    for round in 0..40u64 {
        for i in 0..25u64 {
            // Binary fractions: every sum is exact in f64.
            let total = std::time::Duration::from_secs_f64(0.25 * (1 + (i + round) % 4) as f64);
            metrics.request("/late", &http::Method::POST, &ok(), total, None);
            n += 1;
            sum += total.as_secs_f64();
        }
        // Upkeeps on the paused clock, and a scrape every third round.
        tokio::time::sleep(std::time::Duration::from_millis(2_500)).await;
        tokio::task::yield_now().await;
        if round % 3 == 0 {
            let text = metrics.render(&app.state);
            let count = sample(
                &text,
                "palisade_gateway_request_duration_seconds_count",
                r#"route="/late""#,
            );
            assert_eq!(count, n as f64, "round {round}");
        }
    }
    tokio::time::sleep(std::time::Duration::from_secs(11)).await;
    let text = metrics.render(&app.state);
    let labels = r#"route="/late""#;
    assert_eq!(
        sample(
            &text,
            "palisade_gateway_request_duration_seconds_count",
            labels
        ),
        n as f64
    );
    assert_eq!(
        sample(
            &text,
            "palisade_gateway_request_duration_seconds_sum",
            labels
        ),
        sum
    );
    let requests = sample(
        &text,
        "palisade_gateway_requests_total",
        r#"route="/late",method="POST",status="200""#,
    );
    assert_eq!(requests, n as f64);
    // A second scrape with nothing new says the same.
    let again = metrics.render(&app.state);
    assert_eq!(
        sample(
            &again,
            "palisade_gateway_request_duration_seconds_count",
            labels
        ),
        n as f64
    );
    assert_eq!(
        sample(
            &again,
            "palisade_gateway_request_duration_seconds_sum",
            labels
        ),
        sum
    );
}

/// The upkeep task ends with its registry: building metrics many times (as tests build the
/// gateway) leaves no task behind once they are dropped.
#[tokio::test(start_paused = true)]
async fn the_upkeep_task_ends_with_its_registry() {
    let runtime = tokio::runtime::Handle::current();
    let before = runtime.metrics().num_alive_tasks();
    let built: Vec<_> = (0..50)
        .map(|_| crate::metrics::Metrics::new().unwrap())
        .collect();
    tokio::task::yield_now().await;
    assert_eq!(runtime.metrics().num_alive_tasks(), before + 50);
    drop(built);
    tokio::time::sleep(std::time::Duration::from_secs(6)).await;
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert_eq!(runtime.metrics().num_alive_tasks(), before);
}
