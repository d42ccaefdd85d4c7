//! Tests of the layer as a whole: body passthrough, records, partial streams, headers.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full};
use tower::{Layer, Service, ServiceBuilder, ServiceExt, service_fn};

use super::*;

pub(crate) const SONNET_37: &str = include_str!("../../tests/cost_data/anthropic_sonnet37.sse");
pub(crate) const OPUS_47: &str = include_str!("../../tests/cost_data/anthropic_opus47.sse");
pub(crate) const OPUS_47_1H: &str = include_str!("../../tests/cost_data/anthropic_opus47_1h.sse");
pub(crate) const OPENAI: &str = include_str!("../../tests/cost_data/openai_gpt4o.sse");

/// A body yielding fixed chunks, optionally with trailers, reporting its end only when
/// polled past it (like hyper's `Incoming`).
#[derive(Debug, Clone)]
struct Chunks {
    chunks: VecDeque<Bytes>,
    trailers: Option<http::HeaderMap>,
}

impl Chunks {
    fn new<I: IntoIterator<Item = Bytes>>(it: I) -> Self {
        Self {
            chunks: it.into_iter().collect(),
            trailers: None,
        }
    }
}

impl Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(c) = self.chunks.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(c))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }
}

fn split(text: &str, cuts: &[usize]) -> Vec<Bytes> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut last = 0;
    for &c in cuts {
        out.push(Bytes::copy_from_slice(&b[last..c]));
        last = c;
    }
    out.push(Bytes::copy_from_slice(&b[last..]));
    out
}

fn upstream(
    content_type: &'static str,
    body: Chunks,
) -> impl Service<
    http::Request<Full<Bytes>>,
    Response = http::Response<Chunks>,
    Error = Infallible,
    Future = impl Future<Output = Result<http::Response<Chunks>, Infallible>> + Send,
> + Clone {
    service_fn(move |_req: http::Request<Full<Bytes>>| {
        let body = body.clone();
        async move {
            Ok::<_, Infallible>(
                http::Response::builder()
                    .header("content-type", content_type)
                    .header("request-id", "req_up_1")
                    .body(body)
                    .unwrap(),
            )
        }
    })
}

fn request() -> http::Request<Full<Bytes>> {
    http::Request::builder()
        .uri("/v1/messages?beta=true")
        .header("x-api-key", "sk-ant-api03-secret-f3a9")
        .header("x-bot-id", "support")
        .header("x-conversation-id", "conv-1")
        .body(Full::new(Bytes::new()))
        .unwrap()
}

async fn meter(
    configure: impl FnOnce(CostMeterLayer) -> CostMeterLayer,
    content_type: &'static str,
    body: Chunks,
) -> (http::HeaderMap, Bytes, Vec<UsageRecord>, CostStatsSnapshot) {
    let sink = Arc::new(MemorySink::new());
    let (recorder, shutdown) = UsageRecorder::spawn(Arc::clone(&sink), RecorderConfig::default());
    let layer = configure(CostMeterLayer::new(PriceTable::builtin(), recorder));
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service(upstream(content_type, body));
    let res = svc.oneshot(request()).await.unwrap();
    let (parts, body) = res.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    let stats = shutdown.shutdown().await;
    (parts.headers, bytes, sink.records(), stats)
}

#[tokio::test]
async fn streams_pass_unchanged_and_price_exactly() {
    for (text, model, dollars) in [
        (SONNET_37, "claude-3-7-sonnet-20250219", "0.054399"),
        (OPUS_47, "claude-opus-4-7", "1.06376125"),
    ] {
        let chunks = split(text, &[7, 100, 101, 400]);
        let (_, out, records, stats) = meter(
            |l| l,
            "text/event-stream; charset=utf-8",
            Chunks::new(chunks),
        )
        .await;
        assert_eq!(out, text.as_bytes(), "body changed");
        assert_eq!(records.len(), 1);
        let r = &records[0];
        assert_eq!(r.model.as_deref(), Some(model));
        assert_eq!(r.cost.unwrap().dollars_string(), dollars);
        assert!(r.stream);
        assert_eq!(r.completion, Completion::Complete);
        assert_eq!(r.route, "/v1/messages");
        assert_eq!(r.request_id.as_deref(), Some("req_up_1"));
        assert_eq!(r.attribution.bot.as_deref(), Some("support"));
        assert_eq!(r.attribution.conversation.as_deref(), Some("conv-1"));
        assert_eq!(
            r.attribution.api_key,
            Some(crate::key::ApiKeyId::from_key("sk-ant-api03-secret-f3a9"))
        );
        assert_eq!(stats.written, 1);
        assert_eq!(stats.unknown_model, 0);
    }
}

#[tokio::test]
async fn streamed_one_hour_cache_write_is_billed_at_the_one_hour_rate() {
    let (_, out, records, _) = meter(
        |l| l,
        "text/event-stream",
        Chunks::new(split(OPUS_47_1H, &[9, 300])),
    )
    .await;
    assert_eq!(out, OPUS_47_1H.as_bytes());
    let r = &records[0];
    assert_eq!(r.usage.cache_write_1h_tokens, 159_217);
    assert_eq!(r.usage.cache_write_5m_tokens, 0);
    // 6 × $5 + 159,217 × $10 + 2,745 × $25 per MTok
    assert_eq!(r.cost.unwrap().dollars_string(), "1.660825");
    assert_eq!(r.cost.unwrap().picos(), 1_660_825_000_000);
}

#[tokio::test]
async fn json_responses_price_exactly_with_and_without_headers() {
    let json = r#"{"id":"msg_1","type":"message","role":"assistant","model":"claude-opus-4-7","content":[{"type":"text","text":"hi"}],"stop_reason":"end_turn","usage":{"input_tokens":6,"cache_creation_input_tokens":159217,"cache_read_input_tokens":0,"output_tokens":2745}}"#;
    let body = || Chunks::new(split(json, &[10, 50]));
    let (headers, out, records, _) = meter(|l| l, "application/json", body()).await;
    assert_eq!(out, json.as_bytes());
    assert!(headers.get(X_PALISADE_COST_USD).is_none());
    assert_eq!(records[0].cost.unwrap().dollars_string(), "1.06376125");
    assert!(!records[0].stream);

    // With headers: only for bodies whose size is known and small (`Full` here).
    let sink = Arc::new(MemorySink::new());
    let (recorder, shutdown) = UsageRecorder::spawn(Arc::clone(&sink), RecorderConfig::default());
    let layer = CostMeterLayer::new(PriceTable::builtin(), recorder).cost_headers(Some(4096));
    let svc = layer.layer(service_fn(
        move |_req: http::Request<Full<Bytes>>| async move {
            Ok::<_, Infallible>(
                http::Response::builder()
                    .header("content-type", "application/json")
                    .header("content-length", json.len())
                    .body(Full::new(Bytes::from_static(json.as_bytes())))
                    .unwrap(),
            )
        },
    ));
    let res = svc.oneshot(request()).await.unwrap();
    assert_eq!(res.headers()[X_PALISADE_COST_USD], "1.06376125");
    assert_eq!(res.headers()[X_PALISADE_INPUT_TOKENS], "6");
    assert_eq!(res.headers()[X_PALISADE_CACHE_WRITE_TOKENS], "159217");
    assert_eq!(res.headers()[X_PALISADE_OUTPUT_TOKENS], "2745");
    assert_eq!(
        res.headers()["content-length"],
        json.len().to_string().as_str()
    );
    assert_eq!(res.body().size_hint().exact(), Some(json.len() as u64));
    // Like hyper with a content-length: read the last byte, then stop polling.
    let mut metered = res.into_body();
    let frame = metered.frame().await.unwrap().unwrap();
    assert_eq!(frame.into_data().unwrap(), json.as_bytes());
    assert!(metered.is_end_stream());
    drop(metered);
    shutdown.shutdown().await;
    assert_eq!(sink.len(), 1, "exactly one record");
    assert_eq!(sink.records()[0].completion, Completion::Complete);

    // A chunked body (no size) streams without headers.
    let (headers, _, records, _) =
        meter(|l| l.cost_headers(Some(4096)), "application/json", body()).await;
    assert!(headers.get(X_PALISADE_COST_USD).is_none());
    assert_eq!(records.len(), 1);
}

#[tokio::test]
async fn sse_comment_is_appended_once() {
    let (_, out, records, _) = meter(
        |l| l.sse_cost_comment(true),
        "text/event-stream",
        Chunks::new(split(SONNET_37, &[50])),
    )
    .await;
    let out = std::str::from_utf8(&out).unwrap();
    let tail = out.strip_prefix(SONNET_37).expect("original bytes first");
    assert_eq!(
        tail,
        ": palisade-cost usd=0.054399 input=3 output=550 cache_write_5m=12304 cache_write_1h=0 cache_read=0\n\n"
    );
    assert_eq!(records.len(), 1);
}

#[tokio::test]
async fn final_cost_comment_never_completes_an_unfinished_event() {
    // Cut mid-line, mid-event (all lines ended, no blank line), and between events.
    for (text, comment) in [
        (&b"data: {\"model\":\"gpt-4o\",\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":1}}\n\ndata: partial"[..], false),
        (
            &b"data: {\"model\":\"gpt-4o\",\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":1}}\n\nevent: x\ndata: {}\n"[..],
            false,
        ),
        (&b"data: {\"model\":\"gpt-4o\",\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":1}}\n\n"[..], true),
    ] {
        let (_, out, records, _) = meter(
            |l| l.sse_cost_comment(true),
            "text/event-stream",
            Chunks::new([Bytes::copy_from_slice(text)]),
        )
        .await;
        assert!(out.starts_with(text));
        assert_eq!(
            out.len() > text.len(),
            comment,
            "{}",
            String::from_utf8_lossy(&out)
        );
        // and a stream that ends without `[DONE]` is partial, not complete
        assert_eq!(records[0].completion, Completion::Partial);
    }
}

#[tokio::test]
async fn comment_goes_before_trailers() {
    let mut trailers = http::HeaderMap::new();
    trailers.insert("x-t", "1".parse().unwrap());
    let body = Chunks {
        chunks: split(OPENAI, &[]).into(),
        trailers: Some(trailers),
    };
    let sink = Arc::new(MemorySink::new());
    let (recorder, shutdown) = UsageRecorder::spawn(Arc::clone(&sink), RecorderConfig::default());
    let layer = CostMeterLayer::new(PriceTable::builtin(), recorder).sse_cost_comment(true);
    let svc = layer.layer(upstream("text/event-stream", body));
    let res = svc.oneshot(request()).await.unwrap();
    let collected = res.into_body().collect().await.unwrap();
    assert_eq!(collected.trailers().unwrap()["x-t"], "1");
    let bytes = collected.to_bytes();
    assert!(bytes.ends_with(
        b"usd=0.005615 input=86 output=300 cache_write_5m=0 cache_write_1h=0 cache_read=1920\n\n"
    ));
    shutdown.shutdown().await;
    assert_eq!(sink.len(), 1);
}

#[tokio::test]
async fn openai_stream_converts_cached_tokens() {
    let (_, out, records, _) = meter(
        |l| l,
        "text/event-stream",
        Chunks::new(split(OPENAI, &[3, 333])),
    )
    .await;
    assert_eq!(out, OPENAI.as_bytes());
    let r = &records[0];
    assert_eq!(r.usage.input_tokens, 86);
    assert_eq!(r.usage.cache_read_tokens, 1920);
    assert_eq!(r.usage.output_tokens, 300);
    // 86 × 2.50 + 1920 × 1.25 + 300 × 10 per MTok
    assert_eq!(r.cost.unwrap().dollars_string(), "0.005615");
}

/// Meters `text` split at the given points and returns the recorded usage.
async fn usage_of(text: &str, cuts: &[usize]) -> (Usage, Option<String>) {
    let (_, _, records, _) =
        meter(|l| l, "text/event-stream", Chunks::new(split(text, cuts))).await;
    assert_eq!(records.len(), 1);
    (records[0].usage, records[0].model.clone())
}

#[tokio::test]
async fn every_split_point_gives_the_same_usage() {
    for text in [SONNET_37, OPUS_47, OPUS_47_1H, OPENAI, RESPONSES] {
        let whole = usage_of(text, &[]).await;
        assert!(!whole.0.is_empty());
        for i in 1..text.len() {
            assert_eq!(usage_of(text, &[i]).await, whole, "split at {i}");
        }
        // and three-way splits on a coarser grid
        for i in (1..text.len()).step_by(37) {
            for j in (i..text.len()).step_by(29) {
                assert_eq!(usage_of(text, &[i, j]).await, whole, "split at {i},{j}");
            }
        }
    }
}

#[tokio::test]
async fn dropped_stream_records_partial_usage() {
    let sink = Arc::new(MemorySink::new());
    let (recorder, shutdown) = UsageRecorder::spawn(Arc::clone(&sink), RecorderConfig::default());
    let layer = CostMeterLayer::new(PriceTable::builtin(), recorder);
    let at = SONNET_37.find("event: content_block_delta").unwrap();
    let svc = layer.layer(upstream(
        "text/event-stream",
        Chunks::new(split(SONNET_37, &[at])),
    ));
    let res = svc.oneshot(request()).await.unwrap();
    let mut body = res.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert_eq!(first.data_ref().unwrap().len(), at);
    drop(body); // the client goes away
    shutdown.shutdown().await;
    let records = sink.records();
    assert_eq!(records.len(), 1);
    let r = &records[0];
    assert_eq!(r.completion, Completion::Partial);
    assert_eq!(r.usage.input_tokens, 3);
    assert_eq!(r.usage.cache_write_5m_tokens, 12_304);
    assert_eq!(r.usage.output_tokens, 1);
    // 3 × 3 + 12304 × 3.75 + 1 × 15 per MTok
    assert_eq!(r.cost.unwrap().dollars_string(), "0.046164");
}

#[tokio::test]
async fn upstream_error_event_and_unknown_model() {
    let text = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"claude-next-9\",\"usage\":{\"input_tokens\":12,\"output_tokens\":1}}}\n\nevent: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n";
    let (_, _, records, stats) =
        meter(|l| l, "text/event-stream", Chunks::new([Bytes::from(text)])).await;
    let r = &records[0];
    assert_eq!(r.completion, Completion::UpstreamError);
    assert_eq!(r.upstream_error.as_deref(), Some("overloaded_error"));
    assert_eq!(r.cost, None, "unknown model: None, never 0");
    assert_eq!(r.usage.input_tokens, 12);
    assert_eq!(stats.unknown_model, 1);
}

#[tokio::test]
async fn other_content_is_not_metered() {
    let (_, out, records, _) =
        meter(|l| l, "text/html", Chunks::new([Bytes::from("<p>hi</p>")])).await;
    assert_eq!(out, "<p>hi</p>");
    assert!(records.is_empty());

    let json = r#"{"type":"message","model":"claude-haiku-4-5","usage":{"input_tokens":1,"output_tokens":1}}"#;
    let (_, out, records, stats) = meter(
        |l| l.max_json_body(16),
        "application/json",
        Chunks::new(split(json, &[10])),
    )
    .await;
    assert_eq!(out, json.as_bytes());
    assert_eq!(stats.oversize_body, 1);
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].usage.output_tokens, 1);
    assert_eq!(records[0].completion, Completion::Complete);
}

#[tokio::test]
async fn json_body_over_max_json_body_is_still_recorded_from_its_top_level_usage() {
    // 3 MiB of content (with a decoy usage inside a string) before the real usage.
    let filler = "x\"usage\":{\"output_tokens\":999999} ".repeat(3 << 15);
    for (json, want_output, dollars) in [
        (
            format!(
                r#"{{"id":"msg_1","type":"message","model":"claude-opus-4-7","content":[{{"type":"text","text":"{filler}"}}],"usage":{{"input_tokens":6,"cache_creation_input_tokens":159217,"output_tokens":2745}}}}"#
            ),
            2745,
            "1.06376125",
        ),
        (
            format!(
                r#"{{"id":"c","object":"chat.completion","model":"gpt-4o-2024-08-06","choices":[{{"message":{{"content":"{filler}"}}}}],"usage":{{"prompt_tokens":2006,"completion_tokens":300,"prompt_tokens_details":{{"cached_tokens":1920}}}}}}"#
            ),
            300,
            "0.005615",
        ),
    ] {
        assert!(json.len() > 3 << 20);
        let cuts: Vec<usize> = (1..json.len()).step_by(8191).collect();
        let chunks = split(&json, &cuts);
        let (_, out, records, stats) = meter(|l| l, "application/json", Chunks::new(chunks)).await;
        assert_eq!(out.len(), json.len());
        assert_eq!(stats.oversize_body, 1);
        assert_eq!(records.len(), 1, "exactly one record");
        let r = &records[0];
        assert_eq!(r.usage.output_tokens, want_output);
        assert_eq!(r.cost.unwrap().dollars_string(), dollars);
        assert_eq!(r.completion, Completion::Complete);
    }
}

#[tokio::test]
async fn attribution_from_extensions_wins_over_headers() {
    let sink = Arc::new(MemorySink::new());
    let (recorder, shutdown) = UsageRecorder::spawn(Arc::clone(&sink), RecorderConfig::default());
    let layer = CostMeterLayer::new(PriceTable::builtin(), recorder)
        .hash_api_key(false)
        .bot_header(None);
    let svc = layer.layer(upstream(
        "text/event-stream",
        Chunks::new([Bytes::from(OPENAI)]),
    ));
    let mut req = request();
    req.headers_mut()
        .insert("x-user-id", "from-header".parse().unwrap());
    req.headers_mut()
        .insert("x-request-id", "rid-7".parse().unwrap());
    req.extensions_mut()
        .insert(Attribution::default().with_conversation("from-ext"));
    let res = svc.oneshot(req).await.unwrap();
    res.into_body().collect().await.unwrap();
    shutdown.shutdown().await;
    let r = &sink.records()[0];
    assert_eq!(
        r.attribution.user, None,
        "a client's x-user-id is not trusted by default"
    );
    assert_eq!(r.attribution.conversation.as_deref(), Some("from-ext"));
    assert_eq!(r.attribution.bot, None);
    assert_eq!(r.attribution.api_key, None);
    assert_eq!(r.request_id.as_deref(), Some("rid-7"));
}

#[tokio::test]
async fn user_from_request_body_metadata() {
    let sink = Arc::new(MemorySink::new());
    let (recorder, shutdown) = UsageRecorder::spawn(Arc::clone(&sink), RecorderConfig::default());
    let layer = CostMeterLayer::new(PriceTable::builtin(), recorder).user_from_body(true);
    let inner = service_fn(|req: http::Request<UserIdBody<Full<Bytes>>>| async move {
        // the handler reads the request body, as a real one does
        let _ = req.into_body().collect().await;
        Ok::<_, Infallible>(
            http::Response::builder()
                .header("content-type", "text/event-stream")
                .body(Chunks::new([Bytes::from(SONNET_37)]))
                .unwrap(),
        )
    });
    let svc = ServiceBuilder::new()
        .layer(layer)
        .layer(BodyUserIdLayer::new())
        .service(inner);
    let req = http::Request::builder()
        .uri("/v1/messages")
        .body(Full::new(Bytes::from(
            r#"{"model":"claude-3-7-sonnet-latest","max_tokens":5,"metadata":{"user_id":"u-body"},"messages":[]}"#,
        )))
        .unwrap();
    let res = svc.oneshot(req).await.unwrap();
    res.into_body().collect().await.unwrap();
    shutdown.shutdown().await;
    assert_eq!(
        sink.records()[0].attribution.user.as_deref(),
        Some("u-body")
    );
}

#[tokio::test(start_paused = true)]
async fn durations_use_the_tokio_clock() {
    let sink = Arc::new(MemorySink::new());
    let (recorder, shutdown) = UsageRecorder::spawn(Arc::clone(&sink), RecorderConfig::default());
    let layer = CostMeterLayer::new(PriceTable::builtin(), recorder);
    let svc = layer.layer(service_fn(|_req: http::Request<Full<Bytes>>| async {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        Ok::<_, Infallible>(
            http::Response::builder()
                .header("content-type", "text/event-stream")
                .body(Chunks::new([Bytes::from(OPENAI)]))
                .unwrap(),
        )
    }));
    let res = svc.oneshot(request()).await.unwrap();
    tokio::time::advance(std::time::Duration::from_millis(200)).await;
    res.into_body().collect().await.unwrap();
    shutdown.shutdown().await;
    let r = &sink.records()[0];
    assert_eq!(r.time_to_headers, std::time::Duration::from_millis(300));
    assert_eq!(r.duration, std::time::Duration::from_millis(500));
}

#[tokio::test]
async fn abandoned_openai_stream_without_usage_has_no_cost() {
    let sink = Arc::new(MemorySink::new());
    let (recorder, shutdown) = UsageRecorder::spawn(Arc::clone(&sink), RecorderConfig::default());
    let layer = CostMeterLayer::new(PriceTable::builtin(), recorder);
    let at = OPENAI.find("\r\r").unwrap() + 2; // after the first chunk
    let svc = layer.layer(upstream(
        "text/event-stream",
        Chunks::new(split(OPENAI, &[at])),
    ));
    let res = svc.oneshot(request()).await.unwrap();
    let mut body = res.into_body();
    body.frame().await.unwrap().unwrap();
    drop(body);
    let stats = shutdown.shutdown().await;
    let r = &sink.records()[0];
    assert_eq!(r.completion, Completion::Partial);
    assert_eq!(r.model.as_deref(), Some("gpt-4o-2024-08-06"));
    assert_eq!(r.cost, None, "no usage seen: unknown, not $0");
    assert_eq!(stats.unknown_model, 0, "the model itself is priced");
}

#[tokio::test]
async fn json_error_and_openai_json_bodies() {
    let err = r#"{"type":"error","error":{"type":"invalid_request_error","message":"max_tokens: field required"}}"#;
    let (_, out, records, _) =
        meter(|l| l, "application/json", Chunks::new([Bytes::from(err)])).await;
    assert_eq!(out, err.as_bytes());
    assert_eq!(records[0].completion, Completion::UpstreamError);
    assert_eq!(
        records[0].upstream_error.as_deref(),
        Some("invalid_request_error")
    );
    assert_eq!(records[0].cost, None);

    let ok = r#"{"id":"c1","object":"chat.completion","model":"gpt-4.1-mini-2025-04-14","choices":[{"index":0,"message":{"role":"assistant","content":"hi"}}],"usage":{"prompt_tokens":1000,"completion_tokens":100,"prompt_tokens_details":{"cached_tokens":500}}}"#;
    let (_, _, records, _) = meter(
        |l| l,
        "application/vnd.api+json; charset=utf-8",
        Chunks::new(split(ok, &[1, 2, 3])),
    )
    .await;
    // 500 × 0.40 + 500 × 0.10 + 100 × 1.60 per MTok
    assert_eq!(records[0].cost.unwrap().dollars_string(), "0.00041");
    assert_eq!(records[0].completion, Completion::Complete);
}

#[tokio::test]
async fn compressed_responses_are_counted_not_misread() {
    let sink = Arc::new(MemorySink::new());
    let (recorder, shutdown) = UsageRecorder::spawn(Arc::clone(&sink), RecorderConfig::default());
    let layer = CostMeterLayer::new(PriceTable::builtin(), recorder);
    let svc = layer.layer(service_fn(|_req: http::Request<Full<Bytes>>| async {
        Ok::<_, Infallible>(
            http::Response::builder()
                .header("content-type", "application/json")
                .header("content-encoding", "gzip")
                .body(Chunks::new([Bytes::from_static(b"\x1f\x8b\x08\x00")]))
                .unwrap(),
        )
    }));
    let res = svc.oneshot(request()).await.unwrap();
    assert!(!res.body().is_metered());
    let out = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(out, &b"\x1f\x8b\x08\x00"[..]);
    let stats = shutdown.shutdown().await;
    assert_eq!(stats.encoded_body, 1);
    assert_eq!(stats.parse_failures, 0);
    assert!(sink.is_empty());
}

#[tokio::test]
async fn openai_stream_without_usage_is_counted() {
    let text = "data: {\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o\",\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\ndata: [DONE]\n\n";
    let (_, out, records, stats) =
        meter(|l| l, "text/event-stream", Chunks::new([Bytes::from(text)])).await;
    assert_eq!(out, text.as_bytes());
    assert_eq!(records[0].completion, Completion::Complete);
    assert_eq!(records[0].cost, None);
    assert_eq!(stats.missing_usage, 1);
    assert_eq!(stats.unknown_model, 0);
}

/// A recorder into a fresh memory sink, and the sink.
fn fresh_recorder() -> (Arc<MemorySink>, UsageRecorder, RecorderShutdown) {
    let sink = Arc::new(MemorySink::new());
    let (recorder, shutdown) = UsageRecorder::spawn(Arc::clone(&sink), RecorderConfig::default());
    (sink, recorder, shutdown)
}

/// A JSON body whose length is known but whose bytes never all arrive.
#[derive(Debug)]
struct Stalled(Option<Bytes>, u64);

impl Body for Stalled {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.0.take() {
            Some(b) => Poll::Ready(Some(Ok(Frame::data(b)))),
            None => Poll::Pending,
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.1)
    }
}

#[tokio::test(start_paused = true)]
async fn client_gone_while_buffering_for_cost_headers_still_records() {
    let (sink, recorder, shutdown) = fresh_recorder();
    let layer = CostMeterLayer::new(PriceTable::builtin(), recorder).cost_headers(Some(4096));
    let svc = layer.layer(service_fn(|_req: http::Request<Full<Bytes>>| async {
        let first = Bytes::from_static(br#"{"type":"message","model":"claude-haiku-4-5","#);
        Ok::<_, Infallible>(
            http::Response::builder()
                .header("content-type", "application/json")
                .body(Stalled(Some(first), 200))
                .unwrap(),
        )
    }));
    let fut = svc.oneshot(request());
    let timed = tokio::time::timeout(std::time::Duration::from_millis(20), fut).await;
    assert!(timed.is_err(), "still buffering");
    shutdown.shutdown().await;
    let records = sink.records();
    assert_eq!(records.len(), 1, "exactly one record");
    assert_eq!(records[0].completion, Completion::Partial);
    assert_eq!(records[0].status, 200);
}

#[tokio::test(start_paused = true)]
async fn request_dropped_before_the_response_head_is_recorded_as_cancelled() {
    let (sink, recorder, shutdown) = fresh_recorder();
    let layer = CostMeterLayer::new(PriceTable::builtin(), recorder);
    let svc = layer.layer(service_fn(|_req: http::Request<Full<Bytes>>| async {
        std::future::pending::<Result<http::Response<Full<Bytes>>, Infallible>>().await
    }));
    let timed =
        tokio::time::timeout(std::time::Duration::from_millis(20), svc.oneshot(request())).await;
    assert!(timed.is_err());
    // A future dropped without ever being polled never reached the upstream.
    let (recorder2_sink, recorder2, shutdown2) = fresh_recorder();
    let mut svc2 = CostMeterLayer::new(PriceTable::builtin(), recorder2)
        .layer(upstream("application/json", Chunks::new([])));
    drop(svc2.call(request()));
    shutdown.shutdown().await;
    shutdown2.shutdown().await;
    let records = sink.records();
    assert_eq!(records.len(), 1, "exactly one record");
    let r = &records[0];
    assert_eq!(r.completion, Completion::Cancelled);
    assert_eq!(r.status, 0);
    assert_eq!(r.route, "/v1/messages");
    assert_eq!(r.attribution.bot.as_deref(), Some("support"));
    assert!(recorder2_sink.is_empty());
}

#[tokio::test]
async fn upstream_errors_and_failed_calls_are_errors_not_unknown_models() {
    // The inner service fails without a response (as an open breaker does).
    let (sink, recorder, shutdown) = fresh_recorder();
    let svc = CostMeterLayer::new(PriceTable::builtin(), recorder.clone()).layer(service_fn(
        |_req: http::Request<Full<Bytes>>| async {
            Err::<http::Response<Full<Bytes>>, _>(std::io::Error::other("circuit open"))
        },
    ));
    assert!(svc.oneshot(request()).await.is_err());
    // An error status with an error body (a refusal rendered by an inner layer).
    let svc = CostMeterLayer::new(PriceTable::builtin(), recorder).layer(service_fn(
        |_req: http::Request<Full<Bytes>>| async {
            Ok::<_, Infallible>(
                http::Response::builder()
                    .status(503)
                    .header("content-type", "application/problem+json")
                    .body(Full::new(Bytes::from_static(
                        br#"{"type":"about:blank","title":"upstream unavailable","status":503}"#,
                    )))
                    .unwrap(),
            )
        },
    ));
    let res = svc.oneshot(request()).await.unwrap();
    res.into_body().collect().await.unwrap();
    shutdown.shutdown().await;
    let records = sink.records();
    assert_eq!(records.len(), 2);
    assert_eq!(records[0].completion, Completion::Failed);
    assert_eq!(records[0].status, 0);
    assert_eq!(records[1].completion, Completion::UpstreamError);
    assert_eq!(records[1].status, 503);
    let s = summary::summarize(
        &records,
        &Subject::All,
        std::time::UNIX_EPOCH,
        std::time::SystemTime::now() + std::time::Duration::from_secs(1),
    );
    assert_eq!(s.total.errors, 2);
    assert_eq!(s.total.unpriced, 0, "errors are not unpriced models");
}

#[tokio::test]
async fn stream_that_ends_without_message_stop_is_partial() {
    let at = SONNET_37.find("event: message_stop").unwrap();
    let (_, out, records, _) = meter(
        |l| l,
        "text/event-stream",
        Chunks::new([Bytes::copy_from_slice(&SONNET_37.as_bytes()[..at])]),
    )
    .await;
    assert_eq!(out.len(), at);
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].completion, Completion::Partial);
    // the usage seen is still priced
    assert_eq!(records[0].cost.unwrap().dollars_string(), "0.054399");
    let at = OPENAI.find("data: [DONE]").unwrap();
    let (_, _, records, _) = meter(
        |l| l,
        "text/event-stream",
        Chunks::new([Bytes::copy_from_slice(&OPENAI.as_bytes()[..at])]),
    )
    .await;
    assert_eq!(records[0].completion, Completion::Partial);
}

#[tokio::test]
async fn no_cost_headers_where_no_usage_was_found() {
    let (_sink, recorder, shutdown) = fresh_recorder();
    let second = recorder.clone();
    let layer = CostMeterLayer::new(PriceTable::builtin(), recorder).cost_headers(Some(4096));
    let svc = layer.layer(service_fn(|_req: http::Request<Full<Bytes>>| async {
        Ok::<_, Infallible>(
            http::Response::builder()
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from_static(
                    br#"{"users":[{"id":"ann"}]}"#,
                )))
                .unwrap(),
        )
    }));
    let res = svc.oneshot(request()).await.unwrap();
    assert!(res.headers().get(X_PALISADE_COST_USD).is_none());
    assert!(res.headers().get(X_PALISADE_INPUT_TOKENS).is_none());
    drop(res);
    // Nor a record for another route's client error.
    let svc = CostMeterLayer::new(PriceTable::builtin(), second).layer(service_fn(
        |_req: http::Request<Full<Bytes>>| async {
            Ok::<_, Infallible>(
                http::Response::builder()
                    .status(404)
                    .header("content-type", "application/problem+json")
                    .body(Full::new(Bytes::from_static(br#"{"title":"no such bot"}"#)))
                    .unwrap(),
            )
        },
    ));
    let _ = svc
        .oneshot(request())
        .await
        .unwrap()
        .into_body()
        .collect()
        .await;
    let stats = shutdown.shutdown().await;
    assert_eq!(stats.written, 0, "not an LLM response: no record");
}

const RESPONSES: &str = include_str!("../../tests/cost_data/openai_responses.sse");

#[tokio::test]
async fn openai_responses_api_stream_and_json_are_metered() {
    // gpt-4.1: $2 input, $0.50 cached input, $8 output per MTok:
    // 86 × 2 + 1920 × 0.5 + 300 × 8 = 172 + 960 + 2400 micro-dollars
    let (_, out, records, _) = meter(
        |l| l,
        "text/event-stream",
        Chunks::new(split(RESPONSES, &[5, 700])),
    )
    .await;
    assert_eq!(out, RESPONSES.as_bytes());
    let r = &records[0];
    assert_eq!(r.model.as_deref(), Some("gpt-4.1-2025-04-14"));
    assert_eq!(
        (
            r.usage.input_tokens,
            r.usage.cache_read_tokens,
            r.usage.output_tokens
        ),
        (86, 1920, 300)
    );
    assert_eq!(r.cost.unwrap().dollars_string(), "0.003532");
    assert_eq!(
        r.completion,
        Completion::Complete,
        "response.completed ends it"
    );

    let json = r#"{"id":"resp_1","object":"response","created_at":1764000000,"status":"completed","model":"gpt-4.1-2025-04-14","output":[],"usage":{"input_tokens":2006,"input_tokens_details":{"cached_tokens":1920},"output_tokens":300,"output_tokens_details":{"reasoning_tokens":120},"total_tokens":2306}}"#;
    let (_, _, records, _) =
        meter(|l| l, "application/json", Chunks::new([Bytes::from(json)])).await;
    let r = &records[0];
    assert_eq!(
        r.usage.input_tokens, 86,
        "input_tokens includes the cached ones"
    );
    assert_eq!(r.cost.unwrap().dollars_string(), "0.003532");

    // A failed response is an upstream error, with whatever usage it reported.
    let failed = "event: response.failed\ndata: {\"type\":\"response.failed\",\"response\":{\"object\":\"response\",\"status\":\"failed\",\"model\":\"gpt-4.1\",\"error\":{\"code\":\"server_error\",\"message\":\"x\"},\"usage\":null}}\n\n";
    let (_, _, records, _) = meter(
        |l| l,
        "text/event-stream",
        Chunks::new([Bytes::from(failed)]),
    )
    .await;
    assert_eq!(records[0].completion, Completion::UpstreamError);
    assert_eq!(records[0].upstream_error.as_deref(), Some("server_error"));
}

#[tokio::test]
async fn user_header_is_opt_in_and_the_principal_comes_first() {
    let (sink, recorder, shutdown) = fresh_recorder();
    let layer = CostMeterLayer::new(PriceTable::builtin(), recorder)
        .user_header(Some(http::HeaderName::from_static("x-user-id")));
    let svc = layer.layer(upstream(
        "text/event-stream",
        Chunks::new([Bytes::from(OPENAI)]),
    ));
    for (principal, attribution) in [
        (None, None),
        (None, Some("from-ext")),
        (Some("alice"), Some("from-ext")),
    ] {
        let mut req = request();
        req.headers_mut()
            .insert("x-user-id", "from-header".parse().unwrap());
        if let Some(user) = attribution {
            req.extensions_mut()
                .insert(Attribution::default().with_user(user));
        }
        if let Some(p) = principal {
            req.extensions_mut().insert(Principal::new(p));
        }
        let res = svc.clone().oneshot(req).await.unwrap();
        res.into_body().collect().await.unwrap();
    }
    shutdown.shutdown().await;
    let users: Vec<_> = sink
        .records()
        .iter()
        .map(|r| r.attribution.user.clone().unwrap())
        .collect();
    assert_eq!(users, ["from-header", "from-ext", "alice"]);
}

/// A service answering every request with `status`, `content-type` and `body` (either may
/// be absent), and a `content-encoding` when given.
fn answering(
    status: u16,
    content_type: Option<&'static str>,
    encoding: Option<&'static str>,
    body: &'static str,
) -> impl Service<
    http::Request<Full<Bytes>>,
    Response = http::Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Future<Output = Result<http::Response<Full<Bytes>>, Infallible>> + Send,
> + Clone {
    service_fn(move |_req: http::Request<Full<Bytes>>| async move {
        let mut b = http::Response::builder().status(status);
        if let Some(ct) = content_type {
            b = b.header("content-type", ct);
        }
        if let Some(enc) = encoding {
            b = b.header("content-encoding", enc);
        }
        Ok::<_, Infallible>(
            b.body(Full::new(Bytes::from_static(body.as_bytes())))
                .unwrap(),
        )
    })
}

#[tokio::test]
async fn error_responses_that_are_not_json_are_still_recorded_as_upstream_errors() {
    // A gateway's HTML 502, a plain-text 429, a 503 without a content type and a
    // compressed JSON 500 all come from a request that reached the upstream.
    let (sink, recorder, shutdown) = fresh_recorder();
    for (status, ct, enc, body) in [
        (502, Some("text/html"), None, "<html>Bad Gateway</html>"),
        (429, Some("text/plain"), None, "slow down"),
        (503, None, None, ""),
        (500, Some("application/json"), Some("gzip"), "\x1f\u{8b}"),
    ] {
        let svc = CostMeterLayer::new(PriceTable::builtin(), recorder.clone())
            .layer(answering(status, ct, enc, body));
        let res = svc.oneshot(request()).await.unwrap();
        assert_eq!(res.status().as_u16(), status);
        let out = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(out, body.as_bytes(), "passes unchanged");
    }
    // A successful response of another kind is still not recorded.
    let svc = CostMeterLayer::new(PriceTable::builtin(), recorder).layer(answering(
        200,
        Some("text/html"),
        None,
        "<p>ok</p>",
    ));
    svc.oneshot(request())
        .await
        .unwrap()
        .into_body()
        .collect()
        .await
        .unwrap();
    shutdown.shutdown().await;
    let records = sink.records();
    let got: Vec<_> = records.iter().map(|r| (r.status, r.completion)).collect();
    assert_eq!(
        got,
        [
            (502, Completion::UpstreamError),
            (429, Completion::UpstreamError),
            (503, Completion::UpstreamError),
            (500, Completion::UpstreamError),
        ]
    );
    assert!(
        records
            .iter()
            .all(|r| r.model.is_none() && r.cost.is_none())
    );
    assert_eq!(records[0].route, "/v1/messages");
    assert_eq!(records[0].attribution.bot.as_deref(), Some("support"));
}

#[tokio::test]
async fn openai_error_chunk_in_a_stream_is_an_upstream_error() {
    // OpenAI reports a failure mid-stream as an unnamed `data: {"error": …}` event and
    // closes the stream (no `[DONE]`).
    let text = concat!(
        "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-2024-08-06\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}]}\n\n",
        "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-2024-08-06\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" \\\"error\\\": {\"}}]}\n\n",
        "data: {\"error\":{\"message\":\"The server had an error\",\"type\":\"server_error\",\"param\":null,\"code\":null}}\n\n",
    );
    let (_, out, records, _) =
        meter(|l| l, "text/event-stream", Chunks::new([Bytes::from(text)])).await;
    assert_eq!(out, text.as_bytes());
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].completion, Completion::UpstreamError);
    assert_eq!(records[0].upstream_error.as_deref(), Some("server_error"));
    assert_eq!(records[0].model.as_deref(), Some("gpt-4o-2024-08-06"));
}

#[tokio::test]
async fn json_body_read_whole_then_dropped_before_its_end_keeps_its_usage() {
    // The client (or a server that knows the length) stops after the last byte and drops
    // the body before polling past its end: the document is whole, its usage is there.
    let json = r#"{"type":"message","model":"claude-opus-4-7","content":[],"usage":{"input_tokens":6,"cache_creation_input_tokens":159217,"output_tokens":2745}}"#;
    for cuts in [vec![], vec![40], vec![7, 90]] {
        let (sink, recorder, shutdown) = fresh_recorder();
        let svc = CostMeterLayer::new(PriceTable::builtin(), recorder).layer(upstream(
            "application/json",
            Chunks::new(split(json, &cuts)),
        ));
        let res = svc.oneshot(request()).await.unwrap();
        let mut body = res.into_body();
        let mut got = Vec::new();
        while got.len() < json.len() {
            let frame = body.frame().await.unwrap().unwrap();
            got.extend_from_slice(frame.data_ref().unwrap());
        }
        drop(body);
        shutdown.shutdown().await;
        let records = sink.records();
        assert_eq!(records.len(), 1, "exactly one record");
        let r = &records[0];
        assert_eq!(r.usage.output_tokens, 2745, "cuts {cuts:?}");
        assert_eq!(r.cost.unwrap().dollars_string(), "1.06376125");
        assert_eq!(
            r.completion,
            Completion::Complete,
            "the whole document arrived"
        );
    }
    // Cut short inside the document: partial, nothing invented.
    let (sink, recorder, shutdown) = fresh_recorder();
    let svc = CostMeterLayer::new(PriceTable::builtin(), recorder).layer(upstream(
        "application/json",
        Chunks::new(split(json, &[60])),
    ));
    let mut body = svc.oneshot(request()).await.unwrap().into_body();
    body.frame().await.unwrap().unwrap();
    drop(body);
    shutdown.shutdown().await;
    let records = sink.records();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].completion, Completion::Partial);
    assert_eq!(records[0].usage, Usage::default());
}

#[tokio::test]
async fn no_cost_comment_on_a_stream_that_reported_no_usage() {
    // As with the cost headers: no usage found, no `usd=unknown input=0 …` comment (an
    // OpenAI stream without `stream_options.include_usage`, an SSE route of another kind).
    for text in [
        "data: {\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o\",\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\ndata: [DONE]\n\n",
        "event: status\ndata: {\"model\":\"build-42\",\"state\":\"running\"}\n\n",
    ] {
        let (_, out, records, _) = meter(
            |l| l.sse_cost_comment(true),
            "text/event-stream",
            Chunks::new([Bytes::from(text)]),
        )
        .await;
        assert_eq!(out, text.as_bytes(), "passes unchanged, nothing appended");
        assert!(records.len() <= 1);
    }
}

#[tokio::test]
async fn json_bodies_split_at_every_byte_give_the_whole_body_record() {
    let bodies = [
        r#"{"id":"msg_1","type":"message","role":"assistant","model":"claude-opus-4-7","content":[{"type":"text","text":"a\"usage\":{}"}],"usage":{"input_tokens":6,"cache_creation_input_tokens":300,"cache_creation":{"ephemeral_5m_input_tokens":100,"ephemeral_1h_input_tokens":200},"cache_read_input_tokens":7,"output_tokens":2745,"server_tool_use":{"web_search_requests":2}}}"#,
        r#"{"id":"c","object":"chat.completion","model":"gpt-4o-2024-08-06","choices":[{"message":{"content":"\u00e9"}}],"usage":{"prompt_tokens":2006,"completion_tokens":300.0,"prompt_tokens_details":{"cached_tokens":1920}}}"#,
        r#"{"id":"r","object":"response","model":"gpt-4.1-mini","status":"completed","output":[],"usage":{"input_tokens":1e3,"output_tokens":5,"input_tokens_details":{"cached_tokens":10},"output_tokens_details":{"reasoning_tokens":2}}}"#,
    ];
    for json in bodies {
        for cap in [usize::MAX >> 1, json.len(), json.len() - 1, json.len() / 2] {
            let (_, _, whole, _) = meter(
                |l| l.max_json_body(cap.min(1 << 30)),
                "application/json",
                Chunks::new(split(json, &[])),
            )
            .await;
            assert_eq!(whole.len(), 1);
            assert!(whole[0].cost.is_some(), "{json}");
            assert_eq!(
                whole[0].completion,
                Completion::Complete,
                "{json} cap {cap}"
            );
            for i in 1..json.len() {
                let (_, _, r, _) = meter(
                    |l| l.max_json_body(cap.min(1 << 30)),
                    "application/json",
                    Chunks::new(split(json, &[i])),
                )
                .await;
                assert_eq!(r.len(), 1);
                assert_eq!(
                    (r[0].usage, r[0].cost, &r[0].model, r[0].completion),
                    (
                        whole[0].usage,
                        whole[0].cost,
                        &whole[0].model,
                        whole[0].completion
                    ),
                    "{json} cap {cap} split at {i}"
                );
            }
        }
    }
}

/// The cost headers of a JSON answer read whole equal the cost of its one record, priced
/// once at the model the answer names (not the one asked for), and an unknown model is
/// counted once: `unknown` in the header, no cost in the record.
#[tokio::test]
async fn cost_headers_equal_the_records_cost_for_the_model_the_answer_names() {
    for (model, dollars, unknown) in [
        ("claude-opus-4-7", Some("1.06376125"), 0),
        ("Anthropic/Claude-Opus-4-7", Some("1.06376125"), 0),
        ("claude-from-the-future-9", None, 1),
    ] {
        let json = format!(
            r#"{{"id":"msg_1","type":"message","role":"assistant","model":"{model}","content":[],"stop_reason":"end_turn","usage":{{"input_tokens":6,"cache_creation_input_tokens":159217,"cache_read_input_tokens":0,"output_tokens":2745}}}}"#
        );
        let sink = Arc::new(MemorySink::new());
        let (recorder, shutdown) =
            UsageRecorder::spawn(Arc::clone(&sink), RecorderConfig::default());
        let layer = CostMeterLayer::new(PriceTable::builtin(), recorder).cost_headers(Some(4096));
        let body = Bytes::from(json);
        let svc = layer.layer(service_fn(move |_req: http::Request<Full<Bytes>>| {
            let body = body.clone();
            async move {
                Ok::<_, Infallible>(
                    http::Response::builder()
                        .header("content-type", "Application/JSON; Charset=UTF-8")
                        .body(Full::new(body))
                        .unwrap(),
                )
            }
        }));
        // asked for another model than the one that answered
        let mut req = request();
        *req.body_mut() = Full::new(Bytes::from_static(
            br#"{"model":"claude-3-5-haiku-20241022","max_tokens":10}"#,
        ));
        let res = svc.oneshot(req).await.unwrap();
        let header = res.headers()[X_PALISADE_COST_USD]
            .to_str()
            .unwrap()
            .to_owned();
        res.into_body().collect().await.unwrap();
        let stats = shutdown.shutdown().await;
        let records = sink.records();
        assert_eq!(records.len(), 1, "{model}: exactly one record");
        let r = &records[0];
        assert_eq!(r.model.as_deref(), Some(model));
        assert_eq!(r.cost.map(|c| c.dollars_string()).as_deref(), dollars);
        assert_eq!(header, dollars.unwrap_or("unknown"), "{model}");
        assert_eq!(stats.unknown_model, unknown, "{model}");
    }
}
