//! Regression tests for what the fuzz targets (`fuzz/`, run by `scripts/fuzz.sh`) found.
//! Each test replays the smallest input of one finding.

use std::time::Duration;

use palisade::config::Env;
use palisade::cost::budget::{BudgetConfig, BudgetLayer};
use palisade::rate_limit::{Quota, RateLimitLayer, Rule};
use palisade::security_headers::ContentSecurityPolicy;
use tower::{Layer, ServiceExt, service_fn};

/// fuzz target `csp`: a policy whose `script-src` is only the per-request nonce renders as
/// `script-src 'nonce-{nonce}'; ...`, and the parser refuses that text ("no sources"), so a
/// policy written out by `Display` cannot be read back.
#[test]
fn csp_with_a_nonce_only_directive_reads_back() {
    let policy: ContentSecurityPolicy = "style-src 'self' 'nonce-{nonce}'\n".parse().unwrap();
    let rendered = policy.to_string();
    assert_eq!(
        rendered,
        "script-src 'nonce-{nonce}'; style-src 'self' 'nonce-{nonce}'"
    );
    let again: ContentSecurityPolicy = rendered
        .parse()
        .unwrap_or_else(|e| panic!("{rendered:?} is refused: {e}"));
    assert_eq!(again, policy);
}

/// fuzz target `config`: `BudgetConfig::from_env` accepts a price file that does not exist;
/// only building the layer reads it, so `BudgetLayer::from_env` reports it alone (not with
/// the other problems) and under `PALISADE_BUDGET_RULES`, not the variable to fix.
#[test]
fn budget_from_env_reports_a_missing_price_file() {
    let mut env = Env::from_pairs([("PALISADE_BUDGET_PRICES_FILE", "/no/such/prices.json")]);
    let config = BudgetConfig::from_env(&mut env);
    let built = BudgetLayer::from_config(config);
    assert!(built.is_err(), "the file does not exist");
    let names: Vec<&str> = env.problems().iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["PALISADE_BUDGET_PRICES_FILE"]);
}

/// fuzz target `headers`: a rule name may hold `,` and `;`; the `RateLimit-Policy` and
/// `RateLimit` fields still hold one RFC 8941 item per rule (the name is an sf-string).
#[tokio::test]
async fn rate_limit_fields_quote_a_rule_name_holding_list_separators() {
    let layer = RateLimitLayer::builder()
        .rule(Rule::new(
            ",WW;x",
            Quota::new(3, Duration::from_millis(1500)),
        ))
        .build()
        .unwrap();
    let svc = layer.layer(service_fn(|_req: http::Request<()>| async {
        Ok::<_, std::convert::Infallible>(http::Response::new(()))
    }));
    let mut req = http::Request::new(());
    req.extensions_mut()
        .insert("192.0.2.1:9".parse::<std::net::SocketAddr>().unwrap());
    let res = svc.oneshot(req).await.unwrap();
    assert_eq!(res.headers()["ratelimit-policy"], "\",WW;x\";q=3;w=2");
    let limit = res.headers()["ratelimit"].to_str().unwrap();
    let t = limit.strip_prefix("\",WW;x\";r=2;t=").unwrap();
    assert!(t.parse::<u64>().is_ok_and(|t| t >= 1), "{limit}");
}

/// fuzz target `csp`: `style-src 'none'` with the nonce on renders as a nonce-only
/// `style-src`, which must read back as "only the nonce", not as a missing directive that
/// falls back to `default-src`.
#[test]
fn a_nonce_only_directive_is_not_a_missing_one() {
    let text = "script-src 'self'; default-src 'self' 'strict-dynamic' 'nonce-{nonce}' \
                allow-scripts 'unsafe-inline' ; style-src 'none' ; ";
    let policy: ContentSecurityPolicy = text.parse().unwrap();
    let rendered = policy.to_string();
    let again: ContentSecurityPolicy = rendered
        .parse()
        .unwrap_or_else(|e| panic!("{rendered:?} is refused: {e}"));
    assert_eq!(again, policy, "{rendered}");
    assert_eq!(again.to_string(), rendered);
}
