//! The response future of [`CostMeter`](super::CostMeter).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderMap, HeaderName, HeaderValue, Response};
use http_body::Body;
use pin_project_lite::pin_project;

use super::body::{Meter, MeteredBody, Outcome, RequestMeta};
use super::layer::{
    Shared, X_PALISADE_CACHE_READ_TOKENS, X_PALISADE_CACHE_WRITE_TOKENS, X_PALISADE_COST_USD,
    X_PALISADE_INPUT_TOKENS, X_PALISADE_OUTPUT_TOKENS, header_string,
};
use super::record::Completion;

/// The request until its response head arrives: dropped before then (the client went
/// away while the upstream was still thinking), it writes a record marked
/// [`Completion::Cancelled`].
#[derive(Debug)]
struct Pending {
    shared: Arc<Shared>,
    meta: Option<RequestMeta>,
    polled: bool,
}

impl Pending {
    /// Writes the record of a request that got no response.
    fn record(&mut self, completion: Completion) {
        self.record_status(0, completion);
    }

    /// Writes the record of a request answered with `status` and no usage.
    fn record_status(&mut self, status: u16, completion: Completion) {
        if let Some(mut meta) = self.meta.take() {
            // A call that failed without a response, or whose failure could not be
            // metered, used no tokens: its reservation is refunded. A cancelled one may
            // still be billed upstream, so its reservation is left to be charged in full
            // when dropped.
            let budget = meta.budget.take();
            let record = meta.record(&self.shared, status, completion);
            match (budget, completion) {
                (Some(budget), Completion::Failed) => budget.settle_record(&record),
                (Some(budget), Completion::UpstreamError) => budget.refund(),
                _ => {}
            }
            self.shared.recorder.record(record);
        }
    }
}

/// Whether a response that cannot be metered (neither JSON nor SSE, or compressed) is an
/// error a dashboard must see: the same rule as for JSON that is no LLM API's.
fn is_recorded_error(status: u16) -> bool {
    status >= 500 || status == 429
}

impl Drop for Pending {
    fn drop(&mut self) {
        // A future never polled never reached the upstream.
        if self.polled {
            self.record(Completion::Cancelled);
        }
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, B: Body> {
        Waiting { #[pin] future: F },
        Buffering {
            parts: Option<http::response::Parts>,
            body: Option<Pin<Box<B>>>,
            chunks: Vec<Bytes>,
            len: u64,
            meter: Option<Meter>,
        },
        Done,
    }
}

pin_project! {
    /// The response future of [`CostMeter`].
    pub struct ResponseFuture<F, B: Body> {
        #[pin]
        state: State<F, B>,
        pending: Pending,
    }
}

impl<F, B: Body> ResponseFuture<F, B> {
    pub(crate) fn new(future: F, shared: Arc<Shared>, meta: RequestMeta) -> Self {
        Self {
            state: State::Waiting { future },
            pending: Pending {
                shared,
                meta: Some(meta),
                polled: false,
            },
        }
    }
}

impl<F, B: Body> std::fmt::Debug for ResponseFuture<F, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

/// What a response's `content-type` says its body is, as far as the meter cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyKind {
    /// `text/event-stream`.
    Stream,
    /// `application/json` or any `…+json`.
    Json,
    /// Anything else, or no `content-type`.
    Other,
}

/// The body kind of a response, from one look-up of its `content-type`.
fn body_kind(headers: &HeaderMap) -> BodyKind {
    let Some(v) = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
    else {
        return BodyKind::Other;
    };
    let v = v.trim();
    if v.eq_ignore_ascii_case("text/event-stream") {
        BodyKind::Stream
    } else if v.eq_ignore_ascii_case("application/json")
        || (v.len() > 5 && v[v.len() - 5..].eq_ignore_ascii_case("+json"))
    {
        BodyKind::Json
    } else {
        BodyKind::Other
    }
}

fn add_cost_headers(headers: &mut HeaderMap, outcome: &Outcome) {
    let u = &outcome.usage;
    // Five headers: one growth of the map, not several. A map at its size limit (an
    // inner service's, with thousands of names) gets those that still fit: never a panic.
    let _ = headers.try_reserve(5);
    let cost = match outcome.cost {
        Some(cost) => HeaderValue::from_str(cost.dollars().as_str()),
        None => Ok(HeaderValue::from_static("unknown")),
    };
    let mut set = |name, value| {
        let _ = headers.try_insert(name, value);
    };
    if let Ok(v) = cost {
        set(X_PALISADE_COST_USD, v);
    }
    set(X_PALISADE_INPUT_TOKENS, count(u.input_tokens));
    set(X_PALISADE_OUTPUT_TOKENS, count(u.output_tokens));
    set(
        X_PALISADE_CACHE_WRITE_TOKENS,
        count(
            u.cache_write_5m_tokens
                .saturating_add(u.cache_write_1h_tokens),
        ),
    );
    set(X_PALISADE_CACHE_READ_TOKENS, count(u.cache_read_tokens));
}

/// A token count as a header value; 0 (the cache counts, most of the time) without
/// allocating.
fn count(n: u64) -> HeaderValue {
    if n == 0 {
        HeaderValue::from_static("0")
    } else {
        HeaderValue::from(n)
    }
}

impl<F, B, E> Future for ResponseFuture<F, B>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Body<Data = Bytes>,
{
    type Output = Result<Response<MeteredBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Waiting { future } => {
                    this.pending.polled = true;
                    let mut response = match ready!(future.poll(cx)) {
                        Ok(response) => response,
                        Err(e) => {
                            // No response at all (a transport error, a refusal raised as an
                            // error): recorded as failed, never as an unknown model.
                            this.pending.record(Completion::Failed);
                            this.state.set(State::Done);
                            return Poll::Ready(Err(e));
                        }
                    };
                    let Some(mut meta) = this.pending.meta.take() else {
                        this.state.set(State::Done);
                        return Poll::Ready(Ok(response.map(MeteredBody::passthrough)));
                    };
                    meta.fallback = response
                        .extensions()
                        .get::<super::record::Fallback>()
                        .map(|f| f.as_str().to_owned());
                    let headers = response.headers();
                    let kind = body_kind(headers);
                    let stream = kind == BodyKind::Stream;
                    let json = kind == BodyKind::Json;
                    if !stream && !json {
                        // An error page (a gateway's HTML 502, a plain-text 429) still
                        // comes from a request that reached the upstream.
                        let status = response.status().as_u16();
                        if is_recorded_error(status) {
                            this.pending.meta = Some(meta);
                            this.pending
                                .record_status(status, Completion::UpstreamError);
                        } else if !response.status().is_success() {
                            // An unmetered failure used no tokens.
                            if let Some(budget) = &meta.budget {
                                budget.refund();
                            }
                        }
                        this.state.set(State::Done);
                        return Poll::Ready(Ok(response.map(MeteredBody::passthrough)));
                    }
                    let encoded = headers
                        .get(http::header::CONTENT_ENCODING)
                        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
                    if encoded {
                        // Compressed bytes cannot be read for usage; meter before compression.
                        this.pending.shared.stats.add_encoded_body();
                        tracing::warn!(target: "palisade::cost", route = %meta.route,
                            "compressed response not metered: place CostMeterLayer inside compression");
                        let status = response.status().as_u16();
                        if is_recorded_error(status) {
                            this.pending.meta = Some(meta);
                            this.pending
                                .record_status(status, Completion::UpstreamError);
                        }
                        this.state.set(State::Done);
                        return Poll::Ready(Ok(response.map(MeteredBody::passthrough)));
                    }
                    if meta.request_id.is_none() {
                        meta.request_id =
                            header_string(headers, Some(&HeaderName::from_static("request-id")))
                                .or_else(|| {
                                    header_string(
                                        headers,
                                        this.pending.shared.request_id_header.as_ref(),
                                    )
                                });
                    }
                    let status = response.status().as_u16();
                    let shared = &this.pending.shared;
                    let meter = Meter::new(Arc::clone(shared), meta, status, stream);
                    let s = &**shared;
                    let small = response
                        .body()
                        .size_hint()
                        .upper()
                        .is_some_and(|n| n <= s.header_buffer);
                    if json && s.cost_headers && small {
                        let (parts, body) = response.into_parts();
                        this.state.set(State::Buffering {
                            parts: Some(parts),
                            body: Some(Box::pin(body)),
                            chunks: Vec::new(),
                            len: 0,
                            meter: Some(meter),
                        });
                        continue;
                    }
                    if stream && s.sse_comment {
                        response.headers_mut().remove(CONTENT_LENGTH);
                    }
                    let comment = s.sse_comment;
                    this.state.set(State::Done);
                    return Poll::Ready(Ok(
                        response.map(|b| MeteredBody::new(b, Some(meter), comment))
                    ));
                }
                StateProj::Buffering {
                    parts,
                    body,
                    chunks,
                    len,
                    meter,
                } => {
                    // Read the (small, bounded) body to its end so the cost can go in the head.
                    let mut error = None;
                    let mut trailers = None;
                    let mut done = false;
                    let pinned = body.as_mut().expect("body present while buffering");
                    loop {
                        match ready!(pinned.as_mut().poll_frame(cx)) {
                            Some(Ok(frame)) => match frame.into_data() {
                                Ok(data) => {
                                    if let Some(m) = meter.as_mut() {
                                        m.feed(&data);
                                    }
                                    *len += data.len() as u64;
                                    chunks.push(data);
                                    if *len > this.pending.shared.header_buffer {
                                        break; // the size hint lied: stream the rest
                                    }
                                }
                                Err(frame) => {
                                    trailers = frame.into_trailers().ok();
                                    done = true;
                                    break;
                                }
                            },
                            Some(Err(e)) => {
                                error = Some(e);
                                break;
                            }
                            None => {
                                done = true;
                                break;
                            }
                        }
                    }
                    let mut meter = meter.take().expect("meter present while buffering");
                    let mut parts = parts.take().expect("parts present while buffering");
                    if done {
                        let outcome = meter.settle();
                        if outcome.saw_usage {
                            add_cost_headers(&mut parts.headers, &outcome);
                        }
                    }
                    let chunks = std::mem::take(chunks);
                    let body = body.take().expect("body present while buffering");
                    this.state.set(State::Done);
                    let body = MeteredBody::buffered(body, chunks, error, trailers, done, meter);
                    return Poll::Ready(Ok(Response::from_parts(parts, body)));
                }
                StateProj::Done => panic!("ResponseFuture polled after completion"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_kind_reads_the_media_type_alone() {
        let kind = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(CONTENT_TYPE, HeaderValue::from_static(v));
            body_kind(&h)
        };
        assert_eq!(kind("text/event-stream"), BodyKind::Stream);
        assert_eq!(kind("Text/Event-Stream; charset=utf-8"), BodyKind::Stream);
        assert_eq!(kind("application/json"), BodyKind::Json);
        assert_eq!(kind(" APPLICATION/JSON ;charset=utf-8"), BodyKind::Json);
        assert_eq!(kind("application/problem+json"), BodyKind::Json);
        assert_eq!(
            kind("+json"),
            BodyKind::Other,
            "a suffix needs a type before it"
        );
        assert_eq!(kind("text/html"), BodyKind::Other);
        assert_eq!(kind("application/jsonl"), BodyKind::Other);
        assert_eq!(body_kind(&HeaderMap::new()), BodyKind::Other);
    }
}
