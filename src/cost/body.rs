//! The response body wrapper that meters usage as bytes pass through.

use std::fmt::Write as _;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use smallvec::SmallVec;
use tokio::time::Instant;

use super::json_scan::{ScanState, TopLevelScan};
use super::json_view::View;
use super::layer::Shared;
use super::pricing::Money;
use super::record::{Attribution, Completion, UsageRecord};
use super::sse::SseParser;
use super::usage::{Usage, UsageExtractor};

/// What the request told us, carried until the record is written.
#[derive(Debug)]
pub(crate) struct RequestMeta {
    pub(crate) time: SystemTime,
    pub(crate) start: Instant,
    pub(crate) attribution: Attribution,
    pub(crate) route: String,
    pub(crate) request_id: Option<String>,
    pub(crate) body_user: Option<Arc<std::sync::OnceLock<String>>>,
    /// The request's budget reservation, settled with the measured cost.
    pub(crate) budget: Option<super::budget::BudgetReservation>,
    /// The response's [`Fallback`](super::Fallback) mark, read with its head.
    pub(crate) fallback: Option<String>,
}

#[derive(Debug)]
enum Scan {
    Sse(SseParser),
    Json {
        /// Most answers arrive in one or two frames: held without a heap vector.
        chunks: SmallVec<[Bytes; 2]>,
        len: usize,
    },
    /// A JSON body larger than `max_json_body`: read by its top-level members only.
    Large(Box<TopLevelScan>),
}

/// The top-level members of a large JSON body that carry its usage.
const LARGE_KEYS: &[&str] = &["type", "object", "model", "usage", "error", "status"];
/// The largest top-level member kept from a large JSON body.
const LARGE_MAX_VALUE: usize = 64 * 1024;

/// The metering state of one response: fed every data frame, finished exactly once. A
/// meter dropped before it is finished (the client went away, the future was dropped
/// while buffering) writes its record, marked partial, as it goes.
#[derive(Debug)]
pub(crate) struct Meter {
    shared: Arc<Shared>,
    meta: RequestMeta,
    time_to_headers: Duration,
    status: u16,
    scan: Scan,
    extractor: UsageExtractor,
    /// The whole body was read and parsed (for cost headers): its usage is final.
    settled: bool,
    written: bool,
}

/// What a finished meter reports back (for the SSE comment and cost headers).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Outcome {
    pub(crate) usage: Usage,
    pub(crate) cost: Option<Money>,
    /// Whether the response reported usage (no usage: no cost headers).
    pub(crate) saw_usage: bool,
    /// Whether the response was recognised as an LLM API response at all.
    pub(crate) recognised: bool,
}

impl Meter {
    pub(crate) fn new(shared: Arc<Shared>, meta: RequestMeta, status: u16, stream: bool) -> Self {
        let time_to_headers = meta.start.elapsed();
        let scan = if stream {
            Scan::Sse(SseParser::with_max_line(shared.max_sse_line))
        } else {
            Scan::Json {
                chunks: SmallVec::new(),
                len: 0,
            }
        };
        Self {
            shared,
            meta,
            time_to_headers,
            status,
            scan,
            extractor: UsageExtractor::new(),
            settled: false,
            written: false,
        }
    }

    pub(crate) fn is_stream(&self) -> bool {
        matches!(self.scan, Scan::Sse(_))
    }

    /// Whether a line appended now would stand on its own without completing an event
    /// the upstream left unfinished: `None` when an event is pending (nothing may be
    /// appended), `Some(true)` when a newline must come first.
    pub(crate) fn append_point(&self) -> Option<bool> {
        match &self.scan {
            Scan::Sse(p) if p.event_pending() => None,
            Scan::Sse(p) => Some(!p.at_line_start()),
            _ => Some(false),
        }
    }

    pub(crate) fn feed(&mut self, data: &Bytes) {
        match &mut self.scan {
            Scan::Sse(parser) => {
                let x = &mut self.extractor;
                parser.feed_filtered(data, UsageExtractor::wants_data, |ev| {
                    x.on_event(ev.event, ev.data)
                });
            }
            Scan::Json { chunks, len } => {
                if *len + data.len() > self.shared.max_json_body {
                    // Too large to hold: read on by the top-level members, where both
                    // providers put the usage (at the end), in bounded memory.
                    self.shared.stats.add_oversize_body();
                    tracing::debug!(target: "palisade::cost", route = %self.meta.route,
                        limit = self.shared.max_json_body,
                        "large JSON body: reading its top-level usage as it passes");
                    let mut scan = Box::new(TopLevelScan::new(LARGE_KEYS, LARGE_MAX_VALUE));
                    chunks.iter().for_each(|c| scan.feed(c));
                    scan.feed(data);
                    self.scan = Scan::Large(scan);
                } else if !data.is_empty() {
                    *len += data.len();
                    chunks.push(data.clone());
                }
            }
            Scan::Large(scan) => scan.feed(data),
        }
    }

    /// Parses a JSON body read to its end now (used before sending cost headers).
    pub(crate) fn settle(&mut self) -> Outcome {
        self.parse_held();
        self.outcome().0
    }

    /// Parses what a JSON body held (nothing once parsed: its bytes go with it).
    fn parse_held(&mut self) {
        self.settled = true;
        match &mut self.scan {
            Scan::Json { chunks, len } => {
                match chunks.len() {
                    0 => {}
                    1 => self.extractor.feed_json(&chunks[0]),
                    _ => {
                        let mut all = Vec::with_capacity(*len);
                        chunks.iter().for_each(|c| all.extend_from_slice(c));
                        self.extractor.feed_json(&all);
                    }
                }
                self.scan = Scan::Json {
                    chunks: SmallVec::new(),
                    len: 0,
                };
            }
            Scan::Large(scan) => {
                let doc: Vec<_> = LARGE_KEYS
                    .iter()
                    .enumerate()
                    .filter_map(|(i, key)| Some((*key, View::parse(scan.value(i)?)?)))
                    .collect();
                let complete = scan.state() == ScanState::Closed;
                if !doc.is_empty() {
                    self.extractor.feed_value(&View::Object(doc), complete);
                }
                self.scan = Scan::Large(Box::new(TopLevelScan::new(&[], 0)));
            }
            Scan::Sse(_) => {}
        }
    }

    /// Whether the JSON body held so far is a whole document.
    fn whole_document(&self) -> bool {
        match &self.scan {
            Scan::Json { chunks, .. } if !chunks.is_empty() => {
                let mut all = Vec::new();
                chunks.iter().for_each(|c| all.extend_from_slice(c));
                serde_json::from_slice::<serde::de::IgnoredAny>(&all).is_ok()
            }
            Scan::Large(scan) => scan.state() == ScanState::Closed,
            _ => false,
        }
    }

    /// The usage and its cost. The cost is `None` when the model has no price, and also
    /// when no usage was reported at all (an OpenAI stream abandoned before its final
    /// usage chunk): unknown is not free.
    ///
    /// Also whether the model has a price (one look-up for both).
    fn outcome(&self) -> (Outcome, bool) {
        let x = &self.extractor;
        let model = x.model();
        let usage = *x.usage();
        let price = model.and_then(|m| self.shared.prices.get(m));
        let cost = price.filter(|_| x.saw_usage()).map(|p| p.cost(&usage));
        let outcome = Outcome {
            usage,
            cost,
            saw_usage: x.saw_usage(),
            recognised: x.saw_usage() || model.is_some() || x.format().is_some(),
        };
        (outcome, price.is_some())
    }

    /// Writes the record. `ended` is whether the body reached its end.
    pub(crate) fn finish(mut self, ended: bool) -> Outcome {
        self.write(ended)
    }

    fn write(&mut self, ended: bool) -> Outcome {
        self.written = true;
        // A body read whole before its head was sent ended upstream, whatever the client
        // does with it afterwards.
        let mut ended = ended || self.settled;
        if !ended {
            // Dropped before the end was polled: a JSON document whose bytes all arrived
            // (the reader stopped after the last byte) ended all the same.
            ended = self.whole_document();
        }
        if ended {
            self.parse_held();
        }
        let stats = &self.shared.stats;
        stats.add_parse_failures(self.extractor.parse_failures());
        if let Scan::Sse(p) = &self.scan {
            stats.add_overlong_lines(p.overlong_lines());
        }
        let (outcome, priced) = self.outcome();
        // Written once: the extractor's copy of the model moves into the record.
        let model = self.extractor.take_model_name();
        let upstream_error = self.extractor.upstream_error().map(|e| e.kind.clone());
        let completion = if upstream_error.is_some() || self.status >= 400 {
            Completion::UpstreamError
        } else if !ended || (outcome.recognised && !self.extractor.finished()) {
            // Gone early, or the body ended without the end its format promises
            // (`message_stop`, `[DONE]`, `response.completed`, a whole JSON document).
            Completion::Partial
        } else {
            Completion::Complete
        };
        // A response that is not an LLM API's (another route behind the same layer) is
        // recorded only when it failed in a way a dashboard must see (5xx, 429), or when it
        // was cut short before it could be told apart.
        let worth_recording = outcome.recognised
            || upstream_error.is_some()
            || self.status >= 500
            || self.status == 429
            || !ended;
        if !worth_recording {
            if let Some(budget) = self.meta.budget.take() {
                budget.refund(); // nothing was used
            }
            return outcome;
        }
        if completion == Completion::Complete && model.is_some() && !outcome.saw_usage {
            stats.add_missing_usage();
            tracing::warn!(target: "palisade::cost", model = model.as_deref().unwrap_or_default(),
                route = %self.meta.route,
                "response reported no usage (OpenAI streams need stream_options.include_usage): cost None");
        }
        if !priced && (model.is_some() || !outcome.usage.is_empty()) {
            stats.add_unknown_model();
            tracing::warn!(target: "palisade::cost", model = model.as_deref().unwrap_or("<none>"),
                route = %self.meta.route, "no price for model: usage recorded with cost None");
        }
        let mut record = self.meta.record(&self.shared, self.status, completion);
        record.model = model;
        record.usage = outcome.usage;
        record.cost = outcome.cost;
        record.time_to_headers = self.time_to_headers;
        record.stream = self.is_stream();
        record.upstream_error = upstream_error;
        if let Some(budget) = self.meta.budget.take() {
            budget.settle_record(&record);
        }
        self.shared.recorder.record(record);
        outcome
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        if !self.written {
            self.write(false);
        }
    }
}

impl RequestMeta {
    /// A record of this request with no usage yet: who, where, when and how it ended.
    pub(crate) fn record(
        &mut self,
        shared: &Shared,
        status: u16,
        completion: Completion,
    ) -> UsageRecord {
        let mut attribution = std::mem::take(&mut self.attribution);
        if attribution.user.is_none() && shared.user_from_body {
            attribution.user = self.body_user.as_ref().and_then(|slot| slot.get().cloned());
        }
        let duration = self.start.elapsed();
        UsageRecord {
            id: super::record::RecordId::at(self.time),
            time: self.time,
            request_id: self.request_id.take(),
            attribution,
            route: std::mem::take(&mut self.route),
            model: None,
            usage: Usage::default(),
            cost: None,
            duration,
            time_to_headers: duration,
            status,
            stream: false,
            completion,
            upstream_error: None,
            fallback: self.fallback.take(),
        }
    }
}

/// The SSE comment line announcing the cost, e.g.
/// `: palisade-cost usd=0.054399 input=3 output=550 cache_write_5m=12304 cache_write_1h=0 cache_read=0`.
pub(crate) fn cost_comment(outcome: &Outcome, newline_first: bool) -> Bytes {
    let mut s = String::with_capacity(128);
    if newline_first {
        s.push('\n');
    }
    let u = &outcome.usage;
    let dollars = outcome.cost.map(Money::dollars);
    let usd = dollars.as_ref().map_or("unknown", |d| d.as_str());
    let _ = write!(
        s,
        ": palisade-cost usd={usd} input={} output={} cache_write_5m={} cache_write_1h={} cache_read={}\n\n",
        u.input_tokens,
        u.output_tokens,
        u.cache_write_5m_tokens,
        u.cache_write_1h_tokens,
        u.cache_read_tokens
    );
    Bytes::from(s)
}

pin_project! {
    /// The inner body: in place, or boxed when it was moved out of a pinned future
    /// (after reading a small JSON body for the cost headers).
    #[project = InnerProj]
    enum InnerBody<B> {
        Plain { #[pin] body: B },
        Boxed { body: Pin<Box<B>> },
    }
}

type PolledFrame<B> = Poll<Option<Result<Frame<<B as Body>::Data>, <B as Body>::Error>>>;

impl<B: Body> InnerBody<B> {
    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> PolledFrame<B> {
        match self.project() {
            InnerProj::Plain { body } => body.poll_frame(cx),
            InnerProj::Boxed { body } => body.as_mut().poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            InnerBody::Plain { body } => body.is_end_stream(),
            InnerBody::Boxed { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            InnerBody::Plain { body } => body.size_hint(),
            InnerBody::Boxed { body } => body.size_hint(),
        }
    }
}

pin_project! {
    /// The response body of [`CostMeter`](super::CostMeter): the inner body, byte for byte,
    /// metered as it passes (plus, when enabled, one SSE comment line at the end of a
    /// stream). Exactly one usage record is written per metered response: at the end of
    /// the body, or, if the body is dropped first, marked partial.
    pub struct MeteredBody<B: Body> {
        #[pin]
        inner: InnerBody<B>,
        prefix: std::collections::VecDeque<Bytes>,
        prefix_error: Option<B::Error>,
        tail: Option<Bytes>,
        trailers: Option<HeaderMap>,
        inner_done: bool,
        comment: bool,
        meter: Option<Meter>,
    }
}

impl<B: Body> std::fmt::Debug for MeteredBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeteredBody")
            .field("metered", &self.meter.is_some())
            .field("inner_done", &self.inner_done)
            .finish_non_exhaustive()
    }
}

impl<B: Body> MeteredBody<B> {
    /// A body that passes `inner` through without metering.
    pub(crate) fn passthrough(inner: B) -> Self {
        Self::new(inner, None, false)
    }

    pub(crate) fn new(inner: B, meter: Option<Meter>, comment: bool) -> Self {
        Self {
            inner: InnerBody::Plain { body: inner },
            prefix: std::collections::VecDeque::new(),
            prefix_error: None,
            tail: None,
            trailers: None,
            inner_done: false,
            comment,
            meter,
        }
    }

    /// A body whose first bytes (and possibly its end) were already read from `inner`.
    pub(crate) fn buffered(
        inner: Pin<Box<B>>,
        chunks: Vec<Bytes>,
        error: Option<B::Error>,
        trailers: Option<HeaderMap>,
        inner_done: bool,
        meter: Meter,
    ) -> Self {
        Self {
            inner: InnerBody::Boxed { body: inner },
            prefix: chunks.into(),
            prefix_error: error,
            tail: None,
            trailers,
            inner_done,
            comment: false,
            meter: Some(meter),
        }
    }

    /// Whether this body is metered (it is not for responses that are neither JSON nor
    /// SSE).
    pub fn is_metered(&self) -> bool {
        self.meter.is_some()
    }
}

impl<B> Body for MeteredBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let mut this = self.project();
        if let Some(chunk) = this.prefix.pop_front() {
            // A server that knows the length stops polling after the last byte, so the
            // record is written with the last chunk, not on the next poll.
            if this.prefix.is_empty()
                && this.prefix_error.is_none()
                && this.trailers.is_none()
                && (*this.inner_done || this.inner.is_end_stream())
            {
                end(this.meter, this.tail, false);
            }
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        if let Some(err) = this.prefix_error.take() {
            if let Some(m) = this.meter.take() {
                m.finish(false);
            }
            return Poll::Ready(Some(Err(err)));
        }
        if let Some(tail) = this.tail.take() {
            return Poll::Ready(Some(Ok(Frame::data(tail))));
        }
        if !*this.inner_done {
            match ready!(this.inner.as_mut().poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        if let Some(m) = this.meter.as_mut() {
                            m.feed(&data);
                            if this.inner.is_end_stream() {
                                *this.inner_done = true;
                                end(this.meter, this.tail, *this.comment);
                            }
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    Err(frame) => {
                        // Trailers end the body: the comment (if any) goes before them.
                        *this.inner_done = true;
                        end(this.meter, this.tail, *this.comment);
                        match this.tail.take() {
                            Some(tail) => {
                                *this.trailers = frame.into_trailers().ok();
                                return Poll::Ready(Some(Ok(Frame::data(tail))));
                            }
                            None => return Poll::Ready(Some(Ok(frame))),
                        }
                    }
                },
                Some(Err(err)) => {
                    *this.inner_done = true;
                    if let Some(m) = this.meter.take() {
                        m.finish(false);
                    }
                    return Poll::Ready(Some(Err(err)));
                }
                None => {
                    *this.inner_done = true;
                    end(this.meter, this.tail, *this.comment);
                    if let Some(tail) = this.tail.take() {
                        return Poll::Ready(Some(Ok(Frame::data(tail))));
                    }
                }
            }
        }
        if let Some(trailers) = this.trailers.take() {
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        end(this.meter, this.tail, false);
        Poll::Ready(None)
    }

    fn is_end_stream(&self) -> bool {
        self.meter.is_none()
            && self.prefix.is_empty()
            && self.prefix_error.is_none()
            && self.tail.is_none()
            && self.trailers.is_none()
            && (self.inner_done || self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let prefix: u64 = self.prefix.iter().map(|c| c.len() as u64).sum();
        let tail = self.tail.as_ref().map_or(0, |t| t.len() as u64);
        let inner = if self.inner_done {
            SizeHint::with_exact(0)
        } else {
            self.inner.size_hint()
        };
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower() + prefix + tail);
        let comment_pending = self.comment && self.meter.is_some();
        if let (Some(upper), false) = (inner.upper(), comment_pending) {
            hint.set_upper(upper + prefix + tail);
        }
        hint
    }
}

/// The body reached its end: write the record and queue the cost comment if asked for
/// (only after a stream that reported usage, and never where it would complete an
/// event the upstream left unfinished).
fn end(meter: &mut Option<Meter>, tail: &mut Option<Bytes>, comment: bool) {
    if let Some(m) = meter.take() {
        let stream = m.is_stream();
        let append = m.append_point();
        let outcome = m.finish(true);
        if let (true, true, true, Some(newline)) = (comment, stream, outcome.saw_usage, append) {
            *tail = Some(cost_comment(&outcome, newline));
        }
    }
}
