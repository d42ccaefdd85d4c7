//! Overhead of a retry layer on a call that succeeds first time, budget on, side by side:
//! palisade's `RetryLayer`, `tower::retry::Retry` with `TpsBudget`, and
//! tower-resilience's retry with its token-bucket budget.
//!
//! Three requests: `cheap_clone` (a `u64`, through palisade's generic `Cloned` form),
//! `minimal` (`GET /`, no headers, empty body) and `llm_post` (a `POST` with two headers
//! and a small JSON body). Every case
//! builds its request inside the loop and calls an inner service that answers `200` at
//! once, so the differences from `bare` are the layers' own.

use std::convert::Infallible;
use std::future::{Ready, ready};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http::{Request, Response};
use http_body_util::Full;
use tower::retry::budget::{Budget, TpsBudget};
use tower::{Layer, Service, ServiceExt};

type Body = Full<Bytes>;

/// The inner service: answers 200 at once, for any body type.
#[derive(Clone, Copy)]
struct Ok200;

impl<B> Service<Request<B>> for Ok200 {
    type Response = Response<()>;
    type Error = Infallible;
    type Future = Ready<Result<Response<()>, Infallible>>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        drop(req);
        ready(Ok(Response::new(())))
    }
}

impl Service<u64> for Ok200 {
    type Response = Response<()>;
    type Error = Infallible;
    type Future = Ready<Result<Response<()>, Infallible>>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _req: u64) -> Self::Future {
        ready(Ok(Response::new(())))
    }
}

fn request() -> Request<Body> {
    Request::post("http://127.0.0.1/v1/messages")
        .header("content-type", "application/json")
        .header("anthropic-version", "2023-06-01")
        .body(Full::new(Bytes::from_static(
            b"{\"model\":\"claude\",\"max_tokens\":1}",
        )))
        .unwrap()
}

/// tower's retry with a TPS budget: deposit on success, withdraw to retry.
#[derive(Clone)]
struct TowerPolicy {
    budget: Arc<TpsBudget>,
}

impl<E> tower::retry::Policy<Request<Body>, Response<()>, E> for TowerPolicy {
    type Future = Ready<()>;

    fn retry(
        &mut self,
        _req: &mut Request<Body>,
        result: &mut Result<Response<()>, E>,
    ) -> Option<Self::Future> {
        match result {
            Ok(response) if !response.status().is_server_error() => {
                self.budget.deposit();
                None
            }
            _ => self.budget.withdraw().then(|| ready(())),
        }
    }

    fn clone_request(&mut self, req: &Request<Body>) -> Option<Request<Body>> {
        Some(req.clone())
    }
}

/// The bare request of the reference measurement: `GET /`, no headers, no body.
fn minimal() -> Request<Body> {
    Request::new(Full::new(Bytes::new()))
}

impl<E> tower::retry::Policy<u64, Response<()>, E> for TowerPolicy {
    type Future = Ready<()>;

    fn retry(
        &mut self,
        _req: &mut u64,
        result: &mut Result<Response<()>, E>,
    ) -> Option<Self::Future> {
        match result {
            Ok(response) if !response.status().is_server_error() => {
                self.budget.deposit();
                None
            }
            _ => self.budget.withdraw().then(|| ready(())),
        }
    }

    fn clone_request(&mut self, req: &u64) -> Option<u64> {
        Some(*req)
    }
}

/// The generic form on a request that is free to clone: what is left is each layer's own
/// bookkeeping (budget, classification, future).
fn bench_cheap_clone(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    rt: &tokio::runtime::Runtime,
) {
    use palisade::retry::Cloned;
    use tower_resilience::retry::{RetryBudgetBuilder, RetryLayer as ResilienceLayer};
    let palisade = rt.block_on(async {
        palisade::retry::RetryLayer::builder()
            .build()
            .unwrap()
            .layer(Ok200)
    });
    let tower_retry = tower::retry::RetryLayer::new(TowerPolicy {
        budget: Arc::new(TpsBudget::new(Duration::from_secs(10), 10, 0.2)),
    })
    .layer(Ok200);
    let resilience = ResilienceLayer::<u64, Response<()>, Infallible>::builder()
        .max_attempts(4)
        .exponential_backoff(Duration::from_millis(500))
        .budget(RetryBudgetBuilder::new().token_bucket().build().unwrap())
        .build()
        .layer(Ok200);
    let seven = || std::hint::black_box(7u64);
    bench_call(group, rt, "cheap_clone/bare", &Ok200, seven);
    bench_call(group, rt, "cheap_clone/palisade", &palisade, || {
        Cloned::new(seven())
    });
    bench_call(group, rt, "cheap_clone/tower", &tower_retry, seven);
    bench_call(
        group,
        rt,
        "cheap_clone/tower_resilience",
        &resilience,
        seven,
    );
}

/// Benches `id`: each iteration makes a clone of `svc` ready and calls it with `make()`.
fn bench_call<S, R>(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    rt: &tokio::runtime::Runtime,
    id: &str,
    svc: &S,
    make: impl Fn() -> R + Copy,
) where
    S: Service<R> + Clone,
    S::Error: std::fmt::Debug,
{
    group.bench_function(id, |b| {
        b.to_async(rt).iter(|| {
            let mut svc = svc.clone();
            async move {
                ServiceExt::<R>::ready(&mut svc).await.unwrap();
                svc.call(make()).await.unwrap()
            }
        })
    });
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let palisade = rt.block_on(async {
        palisade::retry::RetryLayer::builder()
            .build()
            .unwrap()
            .layer(Ok200)
    });
    let tower_retry = tower::retry::RetryLayer::new(TowerPolicy {
        budget: Arc::new(TpsBudget::new(Duration::from_secs(10), 10, 0.2)),
    })
    .layer(Ok200);
    use tower_resilience::retry::{RetryBudgetBuilder, RetryLayer as ResilienceLayer};
    let resilience = ResilienceLayer::<Request<Body>, Response<()>, Infallible>::builder()
        .max_attempts(4)
        .exponential_backoff(Duration::from_millis(500))
        .budget(RetryBudgetBuilder::new().token_bucket().build().unwrap())
        .build()
        .layer(Ok200);

    let mut group = c.benchmark_group("retry_first_success");
    for (name, make) in [
        ("minimal", minimal as fn() -> Request<Body>),
        ("llm_post", request),
    ] {
        bench_call(&mut group, &rt, &format!("{name}/bare"), &Ok200, make);
        bench_call(
            &mut group,
            &rt,
            &format!("{name}/palisade"),
            &palisade,
            make,
        );
        bench_call(
            &mut group,
            &rt,
            &format!("{name}/tower"),
            &tower_retry,
            make,
        );
        bench_call(
            &mut group,
            &rt,
            &format!("{name}/tower_resilience"),
            &resilience,
            make,
        );
    }
    bench_cheap_clone(&mut group, &rt);
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
