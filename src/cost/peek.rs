//! [`BodyUserIdLayer`]: takes the user id from the request body's `metadata.user_id`.

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::Request;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use super::layer::BodyUserSlot;

/// The longest stretch kept between chunks while looking for `metadata.user_id`.
const WINDOW: usize = 2048;

/// Wraps the request body so that, as the inner service reads it, the value of
/// `"metadata": {"user_id": "…"}` (Anthropic Messages) is handed to the enclosing
/// [`CostMeterLayer`](super::CostMeterLayer) (built with `user_from_body(true)`). The body
/// passes unchanged; the scan looks at no more than `limit` bytes and keeps at most a small
/// window between chunks. Place it *inside* the meter:
/// `ServiceBuilder::new().layer(meter).layer(BodyUserIdLayer::new())`.
#[derive(Debug, Clone, Copy)]
#[must_use]
pub struct BodyUserIdLayer {
    limit: u64,
}

impl Default for BodyUserIdLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl BodyUserIdLayer {
    /// Scans up to 1 MiB of each request body.
    pub const fn new() -> Self {
        Self { limit: 1 << 20 }
    }

    /// Scans up to `limit` bytes of each request body.
    pub const fn limit(limit: u64) -> Self {
        Self { limit }
    }
}

impl<S> Layer<S> for BodyUserIdLayer {
    type Service = BodyUserId<S>;

    fn layer(&self, inner: S) -> BodyUserId<S> {
        BodyUserId {
            inner,
            limit: self.limit,
        }
    }
}

/// The service built by [`BodyUserIdLayer`].
#[derive(Debug, Clone)]
pub struct BodyUserId<S> {
    inner: S,
    limit: u64,
}

impl<S, B> Service<Request<B>> for BodyUserId<S>
where
    S: Service<Request<UserIdBody<B>>>,
    B: Body<Data = Bytes>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> S::Future {
        let slot = req
            .extensions()
            .get::<BodyUserSlot>()
            .map(|s| Arc::clone(&s.0));
        let limit = self.limit;
        self.inner.call(req.map(|body| UserIdBody {
            inner: body,
            scan: slot.map(|slot| Box::new(Scanner::new(slot, limit))),
        }))
    }
}

pin_project! {
    /// A request body that looks for `metadata.user_id` as it is read.
    pub struct UserIdBody<B> {
        #[pin]
        inner: B,
        scan: Option<Box<Scanner>>,
    }
}

impl<B> std::fmt::Debug for UserIdBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserIdBody")
            .field("scanning", &self.scan.is_some())
            .finish_non_exhaustive()
    }
}

impl<B: Body<Data = Bytes>> Body for UserIdBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        if let (Some(Ok(frame)), Some(scan)) = (&frame, this.scan.as_mut()) {
            if let Some(data) = frame.data_ref() {
                if scan.feed(data) {
                    *this.scan = None;
                }
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The bounded incremental search.
#[derive(Debug)]
struct Scanner {
    slot: Arc<OnceLock<String>>,
    window: Vec<u8>,
    seen: u64,
    limit: u64,
}

enum Found {
    Value(String),
    NeedMore(usize),
    No,
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && b[i].is_ascii_whitespace() {
        i += 1;
    }
    i
}

/// Looks for `"metadata" : { … "user_id" : "…"` in `b`.
fn find(b: &[u8]) -> Found {
    for at in memchr::memmem::find_iter(b, b"\"metadata\"") {
        if at > 0 && b[at - 1] == b'\\' {
            continue; // inside a string
        }
        let i = skip_ws(b, at + 10);
        if i == b.len() {
            return Found::NeedMore(at);
        }
        if b[i] != b':' {
            continue;
        }
        let i = skip_ws(b, i + 1);
        if i == b.len() {
            return Found::NeedMore(at);
        }
        if b[i] != b'{' {
            continue;
        }
        let obj = &b[i..];
        let close = memchr::memchr(b'}', obj).unwrap_or(obj.len());
        let Some(k) = memchr::memmem::find(&obj[..close], b"\"user_id\"") else {
            return if close == obj.len() {
                Found::NeedMore(at)
            } else {
                Found::No
            };
        };
        let j = skip_ws(obj, k + 9);
        if j == obj.len() {
            return Found::NeedMore(at);
        }
        if obj[j] != b':' {
            return Found::No;
        }
        let j = skip_ws(obj, j + 1);
        if j == obj.len() {
            return Found::NeedMore(at);
        }
        let mut values = serde_json::Deserializer::from_slice(&obj[j..]).into_iter::<String>();
        return match values.next() {
            Some(Ok(v)) => Found::Value(v),
            Some(Err(e)) if e.is_eof() => Found::NeedMore(at),
            _ => Found::No,
        };
    }
    Found::No
}

impl Scanner {
    fn new(slot: Arc<OnceLock<String>>, limit: u64) -> Self {
        Self {
            slot,
            window: Vec::new(),
            seen: 0,
            limit,
        }
    }

    /// Feeds a chunk; `true` when the scan is over (found, or past the limit).
    fn feed(&mut self, data: &[u8]) -> bool {
        self.seen += data.len() as u64;
        self.window.extend_from_slice(data);
        match find(&self.window) {
            Found::Value(v) => {
                let _ = self.slot.set(v);
                return true;
            }
            Found::NeedMore(at) if self.window.len() - at <= WINDOW => {
                self.window.drain(..at);
            }
            _ => {
                // keep a tail long enough to hold a split `"metadata"` marker
                let keep = self.window.len().min(16);
                let cut = self.window.len() - keep;
                self.window.drain(..cut);
            }
        }
        self.seen >= self.limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan_chunks(text: &[u8], split: usize) -> Option<String> {
        let slot = Arc::new(OnceLock::new());
        let mut s = Scanner::new(Arc::clone(&slot), 1 << 20);
        for chunk in text.chunks(split.max(1)) {
            if s.feed(chunk) {
                break;
            }
        }
        slot.get().cloned()
    }

    #[test]
    fn finds_user_id_at_any_split() {
        let body = br#"{"model":"claude-haiku-4-5","messages":[{"role":"user","content":"say \"metadata\": {\"user_id\": \"evil\"}"}],"metadata" : { "user_id" : "user-\u00e9-42" },"max_tokens":5}"#;
        for split in 1..body.len() {
            assert_eq!(
                scan_chunks(body, split).as_deref(),
                Some("user-é-42"),
                "split {split}"
            );
        }
        assert_eq!(
            scan_chunks(br#"{"metadata":{"other":1},"user_id":"x"}"#, 3),
            None
        );
        assert_eq!(scan_chunks(br#"{"metadata":null}"#, 4), None);
    }

    #[test]
    fn gives_up_after_the_limit() {
        let slot = Arc::new(OnceLock::new());
        let mut s = Scanner::new(Arc::clone(&slot), 100);
        assert!(!s.feed(&[b' '; 60]));
        assert!(s.feed(&[b' '; 60]));
        assert!(s.window.len() <= 16);
    }
}
