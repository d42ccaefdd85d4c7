//! CostMeterLayer over real sockets: a hyper server on 127.0.0.1 metering an upstream
//! that streams SSE and JSON, read by a hyper-util client.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use palisade::cost::{
    Completion, CostMeterLayer, MemorySink, PriceTable, RecorderConfig, SinkError, Subject,
    UsageRecord, UsageRecorder, UsageSink,
};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tower::ServiceBuilder;

const SONNET_37: &str = include_str!("cost_data/anthropic_sonnet37.sse");
const OPUS_47: &str = include_str!("cost_data/anthropic_opus47.sse");

/// A response body fed by a channel: it stays open until the sender is dropped.
struct ChanBody(mpsc::Receiver<Bytes>);

impl Body for ChanBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|c| c.map(|b| Ok(Frame::data(b))))
    }
}

/// A sink that forwards records to the test, so it can wait for them without sleeping.
#[derive(Clone)]
struct Forward(mpsc::UnboundedSender<UsageRecord>, Arc<MemorySink>);

impl UsageSink for Forward {
    async fn record_batch(&self, batch: &[UsageRecord]) -> Result<(), SinkError> {
        self.1.record_batch(batch).await?;
        for r in batch {
            let _ = self.0.send(r.clone());
        }
        Ok(())
    }
}

type Streams = Arc<tokio::sync::Mutex<mpsc::Receiver<ChanBody>>>;

/// Serves the metered upstream on 127.0.0.1:0. `/json` answers the Opus 4.7 golden JSON;
/// `/sse` answers with the next body the test queued.
async fn serve(layer: CostMeterLayer, streams: Streams) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let upstream = tower::service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let streams = Arc::clone(&streams);
        async move {
            let res = if req.uri().path() == "/json" {
                let json = r#"{"id":"msg_1","type":"message","role":"assistant","model":"claude-opus-4-7","content":[],"usage":{"input_tokens":6,"cache_creation_input_tokens":159217,"output_tokens":2745}}"#;
                let (tx, rx) = mpsc::channel(1);
                tx.send(Bytes::from_static(json.as_bytes())).await.unwrap();
                http::Response::builder()
                    .header("content-type", "application/json")
                    .body(ChanBody(rx))
                    .unwrap()
            } else {
                let body = streams.lock().await.recv().await.unwrap();
                http::Response::builder()
                    .header("content-type", "text/event-stream")
                    .body(body)
                    .unwrap()
            };
            Ok::<_, Infallible>(res)
        }
    });
    let svc = ServiceBuilder::new().layer(layer).service(upstream);
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let svc = hyper_util::service::TowerToHyperService::new(svc.clone());
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

struct Harness {
    addr: SocketAddr,
    queue: mpsc::Sender<ChanBody>,
    records: mpsc::UnboundedReceiver<UsageRecord>,
    sink: Arc<MemorySink>,
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
}

async fn harness(comment: bool) -> Harness {
    let sink = Arc::new(MemorySink::new());
    let (tx, records) = mpsc::unbounded_channel();
    let (recorder, _shutdown) =
        UsageRecorder::spawn(Forward(tx, Arc::clone(&sink)), RecorderConfig::default());
    // The test client stands for a trusted proxy that sets `x-user-id`.
    let layer = CostMeterLayer::new(PriceTable::builtin(), recorder)
        .user_header(Some(http::HeaderName::from_static("x-user-id")))
        .sse_cost_comment(comment);
    let (queue, rx) = mpsc::channel(8);
    let addr = serve(layer, Arc::new(tokio::sync::Mutex::new(rx))).await;
    Harness {
        addr,
        queue,
        records,
        sink,
        client: Client::builder(TokioExecutor::new()).build_http(),
    }
}

impl Harness {
    fn request(&self, path: &str, user: &str) -> http::Request<Full<Bytes>> {
        http::Request::builder()
            .method("POST")
            .uri(format!("http://{}{path}", self.addr))
            .header("x-user-id", user)
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap()
    }

    async fn next_record(&mut self) -> UsageRecord {
        tokio::time::timeout(Duration::from_secs(30), self.records.recv())
            .await
            .expect("a record within 30s")
            .expect("recorder alive")
    }
}

#[tokio::test]
async fn streamed_and_json_golden_costs_over_sockets() {
    let mut h = harness(true).await;
    for (text, dollars) in [(SONNET_37, "0.054399"), (OPUS_47, "1.06376125")] {
        let (tx, rx) = mpsc::channel(64);
        h.queue.send(ChanBody(rx)).await.unwrap();
        for piece in text.as_bytes().chunks(61) {
            tx.send(Bytes::copy_from_slice(piece)).await.unwrap();
        }
        drop(tx);
        let res = h.client.request(h.request("/sse", "ann")).await.unwrap();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        let body = std::str::from_utf8(&body).unwrap();
        let tail = body.strip_prefix(text).expect("stream passed unchanged");
        assert!(
            tail.starts_with(&format!(": palisade-cost usd={dollars} ")),
            "{tail}"
        );
        let r = h.next_record().await;
        assert_eq!(r.cost.unwrap().dollars_string(), dollars);
        assert_eq!(r.completion, Completion::Complete);
        assert!(r.stream);
    }
    let res = h.client.request(h.request("/json", "bob")).await.unwrap();
    assert_eq!(res.status(), 200);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert!(body.starts_with(b"{\"id\":\"msg_1\""));
    let r = h.next_record().await;
    assert_eq!(r.cost.unwrap().dollars_string(), "1.06376125");
    assert!(!r.stream);
    let all = h.sink.summary(
        &Subject::All,
        std::time::SystemTime::UNIX_EPOCH,
        std::time::SystemTime::now() + Duration::from_secs(60),
    );
    assert_eq!(all.total.requests, 3);
    assert_eq!(all.total.cost.dollars_string(), "2.1819215");
    let top = h.sink.top(
        1,
        std::time::SystemTime::UNIX_EPOCH,
        std::time::SystemTime::now() + Duration::from_secs(60),
    );
    assert_eq!(top[0].0, Subject::User("ann".into()));
}

#[tokio::test]
async fn client_disconnect_after_message_start_records_partial() {
    let mut h = harness(false).await;
    let (tx, rx) = mpsc::channel(8);
    h.queue.send(ChanBody(rx)).await.unwrap();
    let start_end = SONNET_37.find("event: content_block_start").unwrap();
    tx.send(Bytes::copy_from_slice(&SONNET_37.as_bytes()[..start_end]))
        .await
        .unwrap();
    let res = h.client.request(h.request("/sse", "carol")).await.unwrap();
    let mut body = res.into_body();
    let frame = body.frame().await.unwrap().unwrap();
    assert!(
        frame
            .data_ref()
            .unwrap()
            .starts_with(b"event: message_start")
    );
    drop(body); // the client goes away; the upstream stream is still open
    let r = h.next_record().await;
    assert_eq!(r.completion, Completion::Partial);
    assert_eq!(r.attribution.user.as_deref(), Some("carol"));
    assert_eq!(r.usage.input_tokens, 3);
    assert_eq!(r.usage.cache_write_5m_tokens, 12_304);
    assert_eq!(r.usage.output_tokens, 1);
    assert!(r.cost.is_some());
    drop(tx);
}

#[tokio::test]
async fn composes_under_axum() {
    use axum::response::IntoResponse;
    use tower::ServiceExt;

    let sink = Arc::new(MemorySink::new());
    let (recorder, shutdown) = UsageRecorder::spawn(Arc::clone(&sink), RecorderConfig::default());
    let app = axum::Router::new()
        .route(
            "/v1/messages",
            axum::routing::post(|| async {
                ([("content-type", "text/event-stream")], SONNET_37).into_response()
            }),
        )
        .layer(
            CostMeterLayer::new(PriceTable::builtin(), recorder)
                .user_header(Some(http::HeaderName::from_static("x-user-id")))
                .sse_cost_comment(true),
        );
    let req = http::Request::builder()
        .method("POST")
        .uri("/v1/messages")
        .header("x-user-id", "dora")
        .body(axum::body::Body::empty())
        .unwrap();
    let res = app.oneshot(req).await.unwrap();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert!(body.ends_with(b"cache_read=0\n\n"));
    shutdown.shutdown().await;
    let r = &sink.records()[0];
    assert_eq!(r.attribution.user.as_deref(), Some("dora"));
    assert_eq!(r.cost.unwrap().dollars_string(), "0.054399");
}
