//! CostMeterLayer in front of a mock Anthropic upstream, offline.
//!
//! Serves on 127.0.0.1:0 a tiny `/v1/messages` that answers JSON or a streamed SSE
//! response, metered by `CostMeterLayer`; makes three requests with a hyper-util client
//! (one JSON, one stream, one stream abandoned half-way), then prints the records, a
//! per-user summary and the top spenders, and exits.
//!
//! `cargo run --example cost`

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Either, Full, StreamBody};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use palisade::cost::{
    Completion, CostConfig, CostMeterLayer, MemorySink, RecorderConfig, Subject, UsageRecorder,
};
use tokio::net::TcpListener;
use tower::ServiceBuilder;

const JSON: &str = r#"{"id":"msg_1","type":"message","role":"assistant","model":"claude-3-7-sonnet-20250219","content":[{"type":"text","text":"Hello!"}],"usage":{"input_tokens":3,"cache_creation_input_tokens":12304,"cache_read_input_tokens":0,"output_tokens":550}}"#;

fn sse_events() -> Vec<String> {
    let mut events = vec![
        "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"claude-opus-4-7\",\"usage\":{\"input_tokens\":6,\"cache_creation_input_tokens\":159217,\"output_tokens\":1}}}\n\n".to_owned(),
    ];
    for word in ["Metered", " to", " the", " pico-dollar."] {
        events.push(format!(
            "event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{{\"type\":\"text_delta\",\"text\":\"{word}\"}}}}\n\n"
        ));
    }
    events.push("event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":2745}}\n\n".to_owned());
    events.push("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n".to_owned());
    events
}

type Frames = std::vec::IntoIter<Result<http_body::Frame<Bytes>, Infallible>>;
type UpstreamBody = Either<Full<Bytes>, StreamBody<futures_iter::Iter<Frames>>>;

async fn upstream(
    req: http::Request<hyper::body::Incoming>,
) -> Result<http::Response<UpstreamBody>, Infallible> {
    let response = http::Response::builder();
    if req.headers().get("x-stream").is_none() {
        // A complete JSON body of known length: small enough for the cost headers.
        return Ok(response
            .header("content-type", "application/json")
            .body(Either::Left(Full::new(Bytes::from_static(JSON.as_bytes()))))
            .unwrap());
    }
    let hang = req.headers().get("x-hang").is_some();
    let mut events = sse_events();
    if hang {
        events.truncate(2);
    }
    let frames: Vec<_> = events
        .into_iter()
        .map(|c| Ok(http_body::Frame::data(Bytes::from(c))))
        .collect();
    Ok(response
        .header("content-type", "text/event-stream")
        .body(Either::Right(StreamBody::new(futures_iter::Iter(
            frames.into_iter(),
            hang,
        ))))
        .unwrap())
}

/// A `Stream` over an iterator (the example avoids a `futures` dependency).
mod futures_iter {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    /// Yields the items; then ends, or (`hang`) stays pending like an upstream that is
    /// still thinking.
    pub struct Iter<I>(pub I, pub bool);

    impl<I: Iterator + Unpin> futures_core::Stream for Iter<I> {
        type Item = I::Item;
        fn poll_next(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<I::Item>> {
            match self.0.next() {
                None if self.1 => Poll::Pending,
                next => Poll::Ready(next),
            }
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let mut config = CostConfig::default();
    config.sse_comment = true;
    config.headers = true;
    // This demo's client stands for a trusted proxy that sets `x-user-id`; on an open
    // endpoint, put a `Principal` in the request extensions from your authentication.
    config.user_header = Some("x-user-id".to_owned());
    let sink = Arc::new(MemorySink::new());
    let (layer, shutdown) = config.spawn(Arc::clone(&sink))?;
    // A layer from the environment, in one line: PALISADE_COST_* (every mistake listed at
    // once; unset variables keep their defaults), recording through its own recorder.
    let (recorder, env_shutdown) =
        UsageRecorder::spawn(Arc::new(MemorySink::new()), RecorderConfig::default());
    let _from_env = CostMeterLayer::from_env(recorder)?;
    env_shutdown.shutdown().await;

    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service(tower::service_fn(upstream));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let svc = hyper_util::service::TowerToHyperService::new(svc.clone());
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });

    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let request = |user: &str, stream: bool, hang: bool| {
        let mut b = http::Request::builder()
            .method("POST")
            .uri(format!("http://{addr}/v1/messages"))
            .header("x-api-key", "sk-ant-api03-example-key-0000")
            .header("x-user-id", user);
        if stream {
            b = b.header("x-stream", "1");
        }
        if hang {
            b = b.header("x-hang", "1");
        }
        b.body(Full::new(Bytes::from_static(b"{}"))).unwrap()
    };

    let res = client.request(request("ann", false, false)).await?;
    println!(
        "JSON response cost header: {:?}",
        res.headers().get("x-palisade-cost-usd")
    );
    res.into_body().collect().await?;

    let res = client.request(request("bob", true, false)).await?;
    let body = res.into_body().collect().await?.to_bytes();
    let text = String::from_utf8_lossy(&body);
    println!(
        "stream ends with: {}",
        text.lines().rev().nth(1).unwrap_or_default()
    );

    // A client that reads the first event and hangs up.
    let res = client.request(request("ann", true, true)).await?;
    let mut body = res.into_body();
    let _first = body.frame().await;
    drop(body);

    // Wait until the abandoned stream's partial record is queued, then flush.
    let stats = loop {
        let s = shutdown.stats().snapshot();
        if s.queued >= 3 {
            break shutdown.shutdown().await;
        }
        tokio::task::yield_now().await;
    };
    println!("recorder: {stats:?}");
    for r in sink.records() {
        println!(
            "{:<6} {:<28} {:>9} {:?} in={} out={} cache_w={}",
            r.attribution.user.as_deref().unwrap_or("-"),
            r.model.as_deref().unwrap_or("-"),
            r.cost
                .map_or_else(|| "unknown".to_owned(), |c| c.to_string()),
            r.completion,
            r.usage.input_tokens,
            r.usage.output_tokens,
            r.usage.cache_write_5m_tokens,
        );
    }
    let (from, to) = (
        SystemTime::UNIX_EPOCH,
        SystemTime::now() + Duration::from_secs(1),
    );
    let ann = sink.summary(&Subject::User("ann".into()), from, to);
    println!("ann: {} requests, {}", ann.total.requests, ann.total.cost);
    for (subject, totals) in sink.top(3, from, to) {
        println!("top: {subject:?} {}", totals.cost);
    }
    assert_eq!(sink.len(), 3);
    assert!(
        sink.records()
            .iter()
            .any(|r| r.completion == Completion::Partial)
    );
    Ok(())
}
