//! The retry layer in front of a real hyper-util client, over real sockets on 127.0.0.1.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use palisade::retry::{ReplayBody, RetryCount, RetryLayer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tower::{Layer, ServiceExt, service_fn};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

type Body = ReplayBody<Full<Bytes>>;

fn client() -> Client<hyper_util::client::legacy::connect::HttpConnector, Body> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// Short real delays: these tests check what is sent, not when (the schedule is tested
/// on tokio's paused clock in the unit tests).
fn layer() -> RetryLayer {
    RetryLayer::builder()
        .base_delay(Duration::from_millis(1))
        .max_delay(Duration::from_millis(5))
        .count_header("x-retry-count")
        .build()
        .unwrap()
}

#[tokio::test]
async fn overloaded_twice_then_ok_is_one_ok_after_two_retries() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/messages"))
        .respond_with(ResponseTemplate::new(529).set_body_string("overloaded"))
        .up_to_n_times(2)
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/v1/messages"))
        .respond_with(ResponseTemplate::new(200).set_body_string("{\"id\":\"msg_1\"}"))
        .with_priority(2)
        .mount(&server)
        .await;

    let svc = layer().layer(client());
    let request = http::Request::post(format!("{}/v1/messages", server.uri()))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(b"{\"model\":\"claude\"}")))
        .unwrap();
    let response = svc.oneshot(request).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(RetryCount::of(&response), 2);
    assert_eq!(response.headers()["x-retry-count"], "2");
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "{\"id\":\"msg_1\"}");

    let received = server.received_requests().await.unwrap();
    assert_eq!(received.len(), 3);
    for request in &received {
        assert_eq!(request.body, b"{\"model\":\"claude\"}");
        assert_eq!(request.headers["content-type"], "application/json");
    }
}

#[tokio::test]
async fn a_bad_request_is_not_retried() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(400))
        .mount(&server)
        .await;
    let svc = layer().layer(client());
    let request = http::Request::get(format!("{}/v1/models", server.uri()))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = svc.oneshot(request).await.unwrap();
    assert_eq!(response.status(), 400);
    assert_eq!(RetryCount::of(&response), 0);
    assert!(response.headers().get("x-retry-count").is_none());
    assert_eq!(server.received_requests().await.unwrap().len(), 1);
}

/// A server that cuts the first `cuts` connections after reading the request, then answers
/// `200 ok`. Returns its address and the number of connections it accepted.
async fn cutting_server(cuts: u32) -> (std::net::SocketAddr, Arc<AtomicU32>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicU32::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            let n = count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut seen = Vec::new();
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => seen.extend_from_slice(&buf[..k]),
                    }
                }
                if n < cuts {
                    // cut: close without answering
                    drop(socket);
                } else {
                    let _ = socket
                        .write_all(
                            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                        )
                        .await;
                    let _ = socket.shutdown().await;
                }
            });
        }
    });
    (addr, accepted)
}

#[tokio::test]
async fn a_cut_connection_is_retried() {
    let (addr, accepted) = cutting_server(1).await;
    let svc = layer().layer(client());
    let request = http::Request::get(format!("http://{addr}/v1/models"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = svc.oneshot(request).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(RetryCount::of(&response), 1);
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_cut_post_is_not_retried_without_opt_in() {
    // the server may have processed it: a POST is not resent
    let (addr, accepted) = cutting_server(1).await;
    let svc = layer().layer(client());
    let request = http::Request::post(format!("http://{addr}/v1/messages"))
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    assert!(svc.oneshot(request).await.is_err());
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_refused_connection_is_retried_even_for_post() {
    // a port with nothing listening: nothing was sent, so any method is retried
    let addr = {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    };
    let attempts = Arc::new(AtomicU32::new(0));
    let counted = service_fn({
        let attempts = attempts.clone();
        let client = client();
        move |req: http::Request<Body>| {
            attempts.fetch_add(1, Ordering::SeqCst);
            client.request(req)
        }
    });
    let svc = RetryLayer::builder()
        .base_delay(Duration::from_millis(1))
        .max_delay(Duration::from_millis(2))
        .max_retries(2)
        .build()
        .unwrap()
        .layer(counted);
    let request = http::Request::post(format!("http://{addr}/v1/messages"))
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let err = svc.oneshot(request).await.unwrap_err();
    assert_eq!(attempts.load(Ordering::SeqCst), 3);
    let err = err.downcast::<hyper_util::client::legacy::Error>().unwrap();
    assert!(err.is_connect());
}

/// A request body fed chunk by chunk, as a proxy streams an incoming request upstream.
struct ChannelBody(tokio::sync::mpsc::Receiver<Bytes>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, std::io::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|c| Ok(http_body::Frame::data(c))))
    }
}

#[tokio::test]
async fn a_streamed_request_body_is_recorded_and_replayed_over_the_wire() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(529))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200))
        .with_priority(2)
        .mount(&server)
        .await;

    let client = Client::builder(TokioExecutor::new()).build_http::<ReplayBody<ChannelBody>>();
    let svc = layer().layer(client);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let request = http::Request::post(format!("{}/v1/messages", server.uri()))
        .body(ChannelBody(rx))
        .unwrap();
    let call = tokio::spawn(svc.oneshot(request));
    for chunk in ["{\"model\":", "\"claude\",", "\"stream\":true}"] {
        tx.send(Bytes::from_static(chunk.as_bytes())).await.unwrap();
    }
    drop(tx);
    let response = call.await.unwrap().unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(RetryCount::of(&response), 1);
    let received = server.received_requests().await.unwrap();
    assert_eq!(received.len(), 2);
    for request in &received {
        assert_eq!(request.body, b"{\"model\":\"claude\",\"stream\":true}");
    }
}
