//! The breaker in front of a real upstream over real sockets (wiremock on 127.0.0.1):
//! it fails for a while, then recovers. The breaker opens, refuses fast without calling
//! the upstream, probes once the open duration has passed, and closes.

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Empty;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use palisade::circuit_breaker::{CircuitBreakerLayer, CircuitState};
use palisade::{Error, ErrorKind};
use tower::{Service, ServiceBuilder, ServiceExt};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

#[tokio::test(start_paused = true)]
async fn opens_refuses_probes_and_closes_against_a_real_upstream() {
    let server = MockServer::start().await;
    // The first 6 calls fail with 529 (overloaded), then the upstream recovers.
    Mock::given(method("GET"))
        .and(path("/v1/models"))
        .respond_with(ResponseTemplate::new(529))
        .up_to_n_times(6)
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/v1/models"))
        .respond_with(ResponseTemplate::new(200).set_body_string("{\"data\":[]}"))
        .with_priority(2)
        .mount(&server)
        .await;

    let layer = CircuitBreakerLayer::builder()
        .name("mock-upstream")
        .count_window(10)
        .minimum_calls(5)
        .failure_rate_threshold(0.5)
        .open_duration(Duration::from_secs(30))
        .jitter(0.0)
        .half_open_probes(2)
        .build()
        .unwrap();
    let handle = layer.handle();
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut svc = ServiceBuilder::new().layer(layer).service(client);
    let uri = format!("{}/v1/models", server.uri());
    let get = || {
        Request::get(uri.as_str())
            .body(Empty::<Bytes>::new())
            .unwrap()
    };

    // Five failures: the breaker opens.
    for _ in 0..5 {
        let response = svc.ready().await.unwrap().call(get()).await.unwrap();
        assert_eq!(response.status(), 529);
    }
    assert_eq!(handle.state(), CircuitState::Open);
    let before = server.received_requests().await.unwrap().len();
    assert_eq!(before, 5);

    // While open: refused at once, with the time until the next probe, and the upstream
    // sees nothing.
    for i in 0..50u64 {
        let err = svc.ready().await.unwrap().call(get()).await.unwrap_err();
        let err = err.downcast::<Error>().unwrap();
        assert_eq!(err.kind(), ErrorKind::CircuitOpen);
        assert_eq!(
            err.retry_after(),
            Some(Duration::from_secs(30) - Duration::from_millis(500 * i))
        );
        tokio::time::advance(Duration::from_millis(500)).await;
    }
    assert_eq!(
        server.received_requests().await.unwrap().len(),
        before,
        "no upstream call while open"
    );

    // 25 s have passed; 5 more and it probes. The upstream still fails the first probe:
    // open again, for twice as long.
    tokio::time::advance(Duration::from_secs(5)).await;
    let response = svc.ready().await.unwrap().call(get()).await.unwrap();
    assert_eq!(response.status(), 529);
    assert_eq!(handle.state(), CircuitState::Open);
    let err = svc.ready().await.unwrap().call(get()).await.unwrap_err();
    assert_eq!(
        err.downcast::<Error>().unwrap().retry_after(),
        Some(Duration::from_secs(60))
    );
    assert_eq!(server.received_requests().await.unwrap().len(), 6);

    // The upstream has recovered: two probes succeed and the breaker closes.
    tokio::time::advance(Duration::from_secs(60)).await;
    for _ in 0..2 {
        let response = svc.ready().await.unwrap().call(get()).await.unwrap();
        assert_eq!(response.status(), 200);
    }
    assert_eq!(handle.state(), CircuitState::Closed);
    for _ in 0..10 {
        let response = svc.ready().await.unwrap().call(get()).await.unwrap();
        assert_eq!(response.status(), 200);
    }
    assert_eq!(server.received_requests().await.unwrap().len(), 18);
    let snapshot = handle.snapshot();
    assert_eq!(snapshot.calls_in_window, 10);
    assert_eq!(snapshot.failure_rate, Some(0.0));
}

#[tokio::test(start_paused = true)]
async fn connection_refused_counts_as_failure() {
    // A port nothing listens on.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let layer = CircuitBreakerLayer::builder()
        .count_window(5)
        .minimum_calls(3)
        .jitter(0.0)
        .build()
        .unwrap();
    let handle = layer.handle();
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut svc = ServiceBuilder::new().layer(layer).service(client);
    for _ in 0..3 {
        let req = Request::get(format!("http://127.0.0.1:{port}/"))
            .body(Empty::<Bytes>::new())
            .unwrap();
        let err = svc.ready().await.unwrap().call(req).await.unwrap_err();
        assert!(
            err.downcast_ref::<Error>().is_none(),
            "a transport error: {err}"
        );
    }
    assert_eq!(handle.state(), CircuitState::Open);
}

/// Retry over the breaker over a hyper-util client, moved into a spawned task (which, as an
/// axum handler does, must prove its future `Send` with lifetimes erased). This failed to
/// compile with "implementation of `ClassifyError` is not general enough" while the stack
/// needed a `map_err(BoxError::from)` below the breaker; the breaker now takes the
/// client's own error type and answers with `BoxError` itself.
#[tokio::test]
async fn retry_over_breaker_over_a_hyper_client_runs_in_a_spawned_task() {
    use palisade::retry::{ReplayBody, RetryCount, RetryLayer};

    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/v1/models"))
        .respond_with(ResponseTemplate::new(529).insert_header("retry-after-ms", "10"))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/v1/models"))
        .respond_with(ResponseTemplate::new(200))
        .with_priority(2)
        .mount(&server)
        .await;
    let client = Client::builder(TokioExecutor::new()).build_http::<ReplayBody<Empty<Bytes>>>();
    let stack = ServiceBuilder::new()
        .layer(RetryLayer::builder().max_retries(2).build().unwrap())
        .layer(CircuitBreakerLayer::builder().build().unwrap())
        .service(client);
    let uri = format!("{}/v1/models", server.uri());
    let task = tokio::spawn(async move {
        let request = Request::get(uri).body(Empty::<Bytes>::new()).unwrap();
        stack.oneshot(request).await
    });
    let response = task.await.unwrap().unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(RetryCount::of(&response), 1);
}
