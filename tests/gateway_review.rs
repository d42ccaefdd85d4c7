//! Attacks on the gateway's middlewares, its connection handling and its health counts,
//! over real sockets on 127.0.0.1: what a client controls (the method, the path, when it
//! hangs up) must not grow the gateway's state or lose a line.
#![allow(dead_code)]

include!("chat_gateway_support/modules.rs");

use std::collections::BTreeSet;

use bytes::Bytes;
use http::Method;
use http_body_util::Full;

use fixture::{FAST_RETRIES, Gateway, USER};

/// The gateway on the built-in mock, retrying in milliseconds, with `vars` on top.
async fn start(vars: &[(&str, &str)]) -> Gateway {
    fixture::start(&fixture::with(FAST_RETRIES, vars)).await
}

/// The `method` label values of `palisade_gateway_requests_total` in `/metrics`.
async fn method_labels(gw: &Gateway) -> BTreeSet<String> {
    let r = gw.call(Method::GET, "/metrics", None, None, &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    r.text()
        .lines()
        .filter(|l| l.starts_with("palisade_gateway_requests_total{"))
        .filter_map(|l| {
            let at = l.find("method=\"")? + "method=\"".len();
            let len = l[at..].find('"')?;
            Some(l[at..at + len].to_owned())
        })
        .collect()
}

/// Methods are the client's to choose (any token): each distinct one was a new series in
/// `/metrics` and a label kept for the life of the process, so a client could grow the
/// registry without bound. Methods outside the standard ones are counted as `other`.
#[tokio::test]
async fn methods_a_client_makes_up_do_not_add_metric_series() {
    let gw = start(&[]).await;
    for i in 0..40 {
        for path in ["/v1/messages", "/no/such/route"] {
            let method = Method::from_bytes(format!("MADEUP{i}").as_bytes()).unwrap();
            let req = http::Request::builder()
                .method(method)
                .uri(format!("http://{}{path}", gw.addr))
                .header("x-api-key", USER)
                .body(Full::new(Bytes::new()))
                .unwrap();
            let r = gw.send(req).await;
            assert!(
                r.status.is_client_error(),
                "{path}: {} {}",
                r.status,
                r.text()
            );
        }
    }
    let standard = [
        "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE",
    ];
    let labels = method_labels(&gw).await;
    let made_up: Vec<_> = labels
        .iter()
        .filter(|m| !standard.contains(&m.as_str()) && *m != "other")
        .collect();
    assert!(made_up.is_empty(), "series per made-up method: {made_up:?}");
    assert!(labels.contains("other"), "{labels:?}");
}
