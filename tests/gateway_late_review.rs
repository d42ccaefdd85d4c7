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
            let err = env
                .finish()
                .expect_err(&format!("{name}={bad} is refused"));
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
