//! Per-response overhead of `SecurityHeadersLayer` against tower-http's
//! `SetResponseHeaderLayer` setting the same 12 headers, in one run.
//!
//! Every service is called and its (always ready) future polled once with a no-op waker, so
//! the numbers hold the layer's own work and no runtime scheduling.
//!
//! A second group puts the `api()` preset in front of a handler answering with the 13
//! headers of the demo gateway's JSON answer (upstream, cost meter and rate-limit headers,
//! two of them with two values), where every handler header is moved into the layer's map.

use std::convert::Infallible;
use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderName, HeaderValue, Request, Response};
use palisade::config::Environment;
use palisade::security_headers::{HeaderMode, SecurityHeadersLayer, SecurityHeadersLayerBuilder};
use tower::{Layer, Service, ServiceBuilder, service_fn};
use tower_http::set_header::SetResponseHeaderLayer;
use tower_http::set_header::response::SetMultipleResponseHeadersLayer;

type Handler =
    tower::util::ServiceFn<fn(Request<()>) -> std::future::Ready<Result<Response<()>, Infallible>>>;

fn handler() -> Handler {
    fn answer(_req: Request<()>) -> std::future::Ready<Result<Response<()>, Infallible>> {
        let mut res = Response::new(());
        res.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        std::future::ready(Ok(res))
    }
    service_fn(answer as fn(_) -> _)
}

/// A handler answering as the demo gateway's inner stack does on a non-streamed chat
/// request: the upstream's headers, the cost meter's and the rate limit's.
fn gateway_like_handler() -> Handler {
    fn answer(_req: Request<()>) -> std::future::Ready<Result<Response<()>, Infallible>> {
        let mut res = Response::new(());
        let h = res.headers_mut();
        for (name, value) in [
            ("content-type", "application/json"),
            ("request-id", "req_mock_load"),
            ("content-length", "2931"),
            ("date", "Sun, 06 Dec 2026 21:51:53 GMT"),
            ("x-palisade-cost-usd", "0.0064332"),
            ("x-palisade-input-tokens", "42"),
            ("x-palisade-output-tokens", "400"),
            ("x-palisade-cache-write-tokens", "0"),
            ("x-palisade-cache-read-tokens", "1024"),
            ("ratelimit-policy", "\"global\";q=1000000000;w=60"),
            ("ratelimit", "\"global\";r=999999999;t=118"),
            ("ratelimit-policy", "\"chat\";q=1000000000;w=60"),
            ("ratelimit", "\"chat\";r=999999999;t=118"),
        ] {
            h.append(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        std::future::ready(Ok(res))
    }
    service_fn(answer as fn(_) -> _)
}

/// One request through `svc`, polled to completion (the futures here are always ready).
fn call<S>(svc: &mut S) -> Response<()>
where
    S: Service<Request<()>, Response = Response<()>, Error = Infallible>,
{
    let mut cx = Context::from_waker(Waker::noop());
    assert!(svc.poll_ready(&mut cx).is_ready());
    let mut fut = pin!(svc.call(Request::new(())));
    match fut.as_mut().poll(&mut cx) {
        Poll::Ready(Ok(res)) => res,
        _ => unreachable!("the handler is always ready"),
    }
}

fn production_api(mode: HeaderMode) -> SecurityHeadersLayer {
    SecurityHeadersLayer::builder()
        .environment(Environment::Production)
        .mode(mode)
        .build()
        .expect("valid")
}

/// The 12 headers palisade's api() preset sends in production, to give the peers exactly
/// the same work.
fn the_12_headers() -> Vec<(HeaderName, HeaderValue)> {
    let mut svc = production_api(HeaderMode::IfNotPresent).layer(handler());
    let res = call(&mut svc);
    let headers: Vec<_> = res
        .headers()
        .iter()
        .filter(|(name, _)| *name != http::header::CONTENT_TYPE)
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect();
    assert_eq!(headers.len(), 12, "{headers:?}");
    headers
}

macro_rules! stack_of_12 {
    ($ctor:ident, $h:expr) => {{
        let h = $h;
        let l = |i: usize| SetResponseHeaderLayer::$ctor(h[i].0.clone(), h[i].1.clone());
        ServiceBuilder::new()
            .layer(l(0))
            .layer(l(1))
            .layer(l(2))
            .layer(l(3))
            .layer(l(4))
            .layer(l(5))
            .layer(l(6))
            .layer(l(7))
            .layer(l(8))
            .layer(l(9))
            .layer(l(10))
            .layer(l(11))
            .service(handler())
    }};
}

fn bench(c: &mut Criterion) {
    let headers = the_12_headers();
    let mut group = c.benchmark_group("security_headers_12");

    let mut bare = handler();
    group.bench_function("bare", |b| b.iter(|| black_box(call(&mut bare))));

    let mut stack = stack_of_12!(if_not_present, &headers);
    assert_eq!(call(&mut stack).headers().len(), 13);
    group.bench_function("tower_http_stack_if_not_present", |b| {
        b.iter(|| black_box(call(&mut stack)))
    });

    let mut stack = stack_of_12!(overriding, &headers);
    assert_eq!(call(&mut stack).headers().len(), 13);
    group.bench_function("tower_http_stack_overriding", |b| {
        b.iter(|| black_box(call(&mut stack)))
    });

    let meta = || {
        headers
            .iter()
            .map(|(n, v)| (n.clone(), v.clone()).into())
            .collect::<Vec<_>>()
    };
    let mut multi = SetMultipleResponseHeadersLayer::if_not_present(meta()).layer(handler());
    assert_eq!(call(&mut multi).headers().len(), 13);
    group.bench_function("tower_http_multiple_if_not_present", |b| {
        b.iter(|| black_box(call(&mut multi)))
    });

    let mut api = production_api(HeaderMode::IfNotPresent).layer(handler());
    assert_eq!(call(&mut api).headers().len(), 13);
    group.bench_function("palisade_api_if_not_present", |b| {
        b.iter(|| black_box(call(&mut api)))
    });

    let mut api = production_api(HeaderMode::Override).layer(handler());
    assert_eq!(call(&mut api).headers().len(), 13);
    group.bench_function("palisade_api_overriding", |b| {
        b.iter(|| black_box(call(&mut api)))
    });

    let mut web = SecurityHeadersLayerBuilder::web()
        .environment(Environment::Production)
        .build()
        .expect("valid")
        .layer(handler());
    assert_eq!(call(&mut web).headers().len(), 13);
    group.bench_function("palisade_web_with_nonce", |b| {
        b.iter(|| black_box(call(&mut web)))
    });

    group.finish();

    let mut group = c.benchmark_group("security_headers_gateway_response");
    let mut bare = gateway_like_handler();
    assert_eq!(call(&mut bare).headers().len(), 13);
    group.bench_function("bare", |b| b.iter(|| black_box(call(&mut bare))));
    let mut api = production_api(HeaderMode::IfNotPresent).layer(gateway_like_handler());
    assert_eq!(call(&mut api).headers().len(), 13 + 12);
    group.bench_function("palisade_api_if_not_present", |b| {
        b.iter(|| black_box(call(&mut api)))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
