//! `mock_upstream`: a zero-latency stand-in for the Anthropic Messages API, for load tests.
//!
//! Every answer is built once at start-up and only copied per request, so the mock costs as
//! little as a server can and a load test measures the proxy in front of it, not the mock.
//! `POST /v1/messages` answers a message with usage; with `"stream": true` in the body it
//! answers Server-Sent Events, one frame per event (`message_start`, `ping`, text deltas,
//! `message_delta` with the output tokens, `message_stop`), as the real API does.
//!
//! ```sh
//! cargo run --release --example mock_upstream -- 127.0.0.1:9000
//! # MOCK_SSE_DELTAS=100 (default): text deltas per streamed answer, about 4 tokens each
//! ```
//!
//! It prints `listening on ADDR` once bound (port 0 picks a free port).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Either, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

const MODEL: &str = "claude-sonnet-4-5";
const WORDS: [&str; 8] = [
    "The ",
    "gateway ",
    "answers ",
    "quickly, ",
    "and ",
    "every ",
    "token ",
    "counts. ",
];

/// The prepared answers.
struct Answers {
    json: Bytes,
    events: Vec<Bytes>,
}

impl Answers {
    fn new(deltas: usize) -> Self {
        let output_tokens = deltas * 4;
        let text: String = (0..deltas * 4).map(|i| WORDS[i % WORDS.len()]).collect();
        let usage = format!(
            r#"{{"input_tokens":42,"cache_creation_input_tokens":0,"cache_read_input_tokens":1024,"output_tokens":{output_tokens}}}"#
        );
        let json = format!(
            r#"{{"id":"msg_mock_load","type":"message","role":"assistant","model":"{MODEL}","content":[{{"type":"text","text":"{text}"}}],"stop_reason":"end_turn","stop_sequence":null,"usage":{usage}}}"#
        );
        let mut events = Vec::with_capacity(deltas + 6);
        let mut push = |event: &str, data: String| {
            events.push(Bytes::from(format!("event: {event}\ndata: {data}\n\n")));
        };
        push(
            "message_start",
            format!(
                r#"{{"type":"message_start","message":{{"id":"msg_mock_load","type":"message","role":"assistant","model":"{MODEL}","content":[],"stop_reason":null,"stop_sequence":null,"usage":{{"input_tokens":42,"cache_creation_input_tokens":0,"cache_read_input_tokens":1024,"output_tokens":1}}}}}}"#
            ),
        );
        push(
            "content_block_start",
            r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#
                .into(),
        );
        push("ping", r#"{"type":"ping"}"#.into());
        for i in 0..deltas {
            let chunk: String = (0..4).map(|j| WORDS[(i * 4 + j) % WORDS.len()]).collect();
            push(
                "content_block_delta",
                format!(
                    r#"{{"type":"content_block_delta","index":0,"delta":{{"type":"text_delta","text":"{chunk}"}}}}"#
                ),
            );
        }
        push(
            "content_block_stop",
            r#"{"type":"content_block_stop","index":0}"#.into(),
        );
        push(
            "message_delta",
            format!(
                r#"{{"type":"message_delta","delta":{{"stop_reason":"end_turn","stop_sequence":null}},"usage":{{"output_tokens":{output_tokens}}}}}"#
            ),
        );
        push("message_stop", r#"{"type":"message_stop"}"#.into());
        Self {
            json: Bytes::from(json),
            events,
        }
    }
}

type Events = StreamBody<IterStream<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;
type Body = Either<Full<Bytes>, Events>;

/// A stream over an iterator, one item per poll.
struct IterStream<I>(I);

impl<I: Iterator + Unpin> futures_core::Stream for IterStream<I> {
    type Item = I::Item;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        std::task::Poll::Ready(self.0.next())
    }
}

fn is_stream(body: &[u8]) -> bool {
    let key = b"\"stream\"";
    let Some(at) = body.windows(key.len()).position(|w| w == key) else {
        return false;
    };
    let rest = &body[at + key.len()..];
    let rest: Vec<u8> = rest
        .iter()
        .copied()
        .skip_while(|b| b.is_ascii_whitespace() || *b == b':')
        .take(4)
        .collect();
    rest == b"true"
}

async fn answer(
    answers: Arc<Answers>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    if req.uri().path() != "/v1/messages" {
        let mut res = Response::new(Either::Left(Full::new(Bytes::from_static(
            br#"{"type":"error","error":{"type":"not_found_error","message":"not found"}}"#,
        ))));
        *res.status_mut() = StatusCode::NOT_FOUND;
        return Ok(res);
    }
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let res = if is_stream(&body) {
        let frames: Vec<_> = answers
            .events
            .iter()
            .map(|e| Ok(Frame::data(e.clone())))
            .collect();
        Response::builder()
            .header("content-type", "text/event-stream")
            .header("cache-control", "no-cache")
            .header("request-id", "req_mock_load")
            .body(Either::Right(StreamBody::new(IterStream(
                frames.into_iter(),
            ))))
    } else {
        Response::builder()
            .header("content-type", "application/json")
            .header("request-id", "req_mock_load")
            .body(Either::Left(Full::new(answers.json.clone())))
    };
    Ok(res.unwrap_or_else(|_| Response::new(Either::Left(Full::new(Bytes::new())))))
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .as_deref()
        .unwrap_or("127.0.0.1:0")
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let deltas = match std::env::var("MOCK_SSE_DELTAS") {
        Ok(v) => v
            .trim()
            .parse()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?,
        Err(_) => 100,
    };
    let answers = Arc::new(Answers::new(deltas));
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("listening on {}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let answers = answers.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| answer(answers.clone(), req));
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::is_stream;

    #[test]
    fn stream_flag_is_read_with_or_without_spaces() {
        assert!(is_stream(br#"{"model":"m","stream":true}"#));
        assert!(is_stream(br#"{"stream" : true, "model":"m"}"#));
        assert!(!is_stream(br#"{"stream":false}"#));
        assert!(!is_stream(br#"{"model":"m"}"#));
    }
}
