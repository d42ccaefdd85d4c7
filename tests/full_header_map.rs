//! Layers that add headers to an inner service's response never panic when its header map
//! is at its size limit (`http::HeaderMap` holds at most 24,576 names): the headers that no
//! longer fit are left out, the response goes through.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use palisade::cost::{CostMeterLayer, MemorySink, PriceTable, RecorderConfig, UsageRecorder};
use palisade::rate_limit::{Quota, RateLimitLayer, Rule};
use palisade::retry::{ReplayBody, RetryLayer};
use tower::{Layer, ServiceExt, service_fn};

/// A header map filled to its limit with `x-h-N` names, then `free` of them removed.
fn full_map(free: usize) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for i in 0.. {
        let name = HeaderName::from_bytes(format!("x-h-{i}").as_bytes()).unwrap();
        if headers
            .try_insert(name, HeaderValue::from_static("v"))
            .is_err()
        {
            break;
        }
    }
    for i in 0..free {
        headers.remove(format!("x-h-{i}"));
    }
    headers
}

fn response(status: StatusCode, headers: HeaderMap, body: &'static str) -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *res.status_mut() = status;
    *res.headers_mut() = headers;
    res
}

const JSON: &str = r#"{"id":"msg_1","type":"message","role":"assistant","model":"claude-opus-4-7","content":[{"type":"text","text":"hi"}],"stop_reason":"end_turn","usage":{"input_tokens":6,"output_tokens":2}}"#;

#[tokio::test]
async fn the_rate_limit_layer_passes_a_response_whose_header_map_is_full() {
    for free in [0, 1, 2] {
        let layer = RateLimitLayer::builder()
            .rule(Rule::new("all", Quota::per_minute(100)))
            .build()
            .unwrap();
        let svc = layer.layer(service_fn(move |_req: Request<Full<Bytes>>| async move {
            Ok::<_, Infallible>(response(StatusCode::OK, full_map(free), "ok"))
        }));
        let res = svc
            .oneshot(Request::new(Full::new(Bytes::new())))
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(res.headers()["x-h-100"], "v");
        // What fits goes in: with room for one name, the first of the layer's headers.
        assert_eq!(res.headers().contains_key("ratelimit-policy"), free > 0);
        assert_eq!(res.into_body().collect().await.unwrap().to_bytes(), "ok");
    }
}

#[tokio::test]
async fn the_cost_meter_passes_a_response_whose_header_map_is_full() {
    for free in [0, 1, 2, 6] {
        let sink = Arc::new(MemorySink::new());
        let (recorder, shutdown) =
            UsageRecorder::spawn(Arc::clone(&sink), RecorderConfig::default());
        let layer = CostMeterLayer::new(PriceTable::builtin(), recorder).cost_headers(Some(4096));
        let svc = layer.layer(service_fn(move |_req: Request<Full<Bytes>>| async move {
            let mut headers = full_map(free);
            if free > 0 {
                headers.insert("content-type", HeaderValue::from_static("application/json"));
            }
            Ok::<_, Infallible>(response(StatusCode::OK, headers, JSON))
        }));
        let res = svc
            .oneshot(Request::new(Full::new(Bytes::new())))
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(res.headers()["x-h-100"], "v");
        // Room for all five cost headers only when five names were free besides the
        // content type's.
        assert_eq!(
            res.headers().contains_key("x-palisade-cache-read-tokens"),
            free == 6
        );
        assert_eq!(res.into_body().collect().await.unwrap().to_bytes(), JSON);
        shutdown.shutdown().await;
        if free > 0 {
            // A JSON answer: metered and recorded however many headers fitted.
            assert_eq!(sink.records()[0].usage.output_tokens, 2);
        }
    }
}

#[tokio::test(start_paused = true)]
async fn retry_passes_a_response_whose_header_map_is_full() {
    for free in [0, 1] {
        let calls = Arc::new(AtomicU32::new(0));
        let layer = RetryLayer::builder()
            .count_header("x-retry-count")
            .build()
            .unwrap();
        let seen = Arc::clone(&calls);
        let svc = layer.layer(service_fn(move |_req: Request<ReplayBody<Full<Bytes>>>| {
            let first = seen.fetch_add(1, Ordering::SeqCst) == 0;
            async move {
                Ok::<_, Infallible>(if first {
                    response(StatusCode::BAD_GATEWAY, HeaderMap::new(), "")
                } else {
                    response(StatusCode::OK, full_map(free), "ok")
                })
            }
        }));
        let res = svc
            .oneshot(Request::new(Full::new(Bytes::new())))
            .await
            .unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(
            res.headers()
                .get("x-retry-count")
                .map(|v| v.to_str().unwrap()),
            (free > 0).then_some("1")
        );
    }
}
