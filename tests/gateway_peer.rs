//! The client's address reaches the rate limiter through the gateway's own server loop
//! (as `main.rs` serves), over a real socket on 127.0.0.1: rules keyed by the client IP
//! give each client its own bucket, and `X-Forwarded-For` is believed only from a trusted
//! proxy.
#![allow(dead_code)]

include!("chat_gateway_support/modules.rs");

use http::{Method, StatusCode};

use fixture::{NO_RETRIES, USER};

#[tokio::test]
async fn rules_keyed_by_the_client_ip_give_each_client_its_own_bucket_on_the_gateways_own_loop() {
    let vars = fixture::with(
        NO_RETRIES,
        &[
            (
                "PALISADE_RATE_LIMIT_RULES",
                r#"[{"name":"ip","key":"ip","limit":1,"window":"1h"}]"#,
            ),
            ("PALISADE_RATE_LIMIT_TRUSTED_PROXIES", "127.0.0.1/32"),
        ],
    );
    let gw = fixture::serve_own(fixture::config(&vars)).await;
    let from = |ip: &'static str| {
        let gw = &gw;
        async move {
            gw.call(
                Method::GET,
                "/v1/usage",
                Some(USER),
                None,
                &[("x-forwarded-for", ip)],
            )
            .await
            .status
        }
    };
    assert_eq!(from("10.0.0.1").await, StatusCode::OK);
    assert_eq!(from("10.0.0.1").await, StatusCode::TOO_MANY_REQUESTS);
    // Another client: its own bucket, not the first one's (without the peer address every
    // client shared one anonymous bucket).
    assert_eq!(from("10.0.0.2").await, StatusCode::OK);
}
