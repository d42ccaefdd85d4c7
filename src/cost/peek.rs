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

use super::json_scan::{ScanState, TopLevelScan};
use super::layer::BodyUserSlot;

/// The largest `metadata` object read (Anthropic allows a short `user_id` there).
const MAX_METADATA: usize = 4096;

/// Wraps the request body so that, as the inner service reads it, the value of the
/// top-level `"metadata": {"user_id": "…"}` (Anthropic Messages) is handed to the enclosing
/// [`CostMeterLayer`](super::CostMeterLayer) (built with `user_from_body(true)`). The body
/// passes unchanged; the scan looks at no more than `limit` bytes and keeps at most the
/// `metadata` object (up to 4 KiB). Only the member of the outermost object counts: a
/// `metadata` inside a message, a tool schema or a `tool_use` input is ignored. Place it *inside* the meter:
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

/// The bounded incremental search for the top-level `metadata` object.
#[derive(Debug)]
struct Scanner {
    slot: Arc<OnceLock<String>>,
    scan: TopLevelScan,
    seen: u64,
    limit: u64,
}

impl Scanner {
    fn new(slot: Arc<OnceLock<String>>, limit: u64) -> Self {
        Self {
            slot,
            scan: TopLevelScan::new(&["metadata"], MAX_METADATA),
            seen: 0,
            limit,
        }
    }

    /// Feeds a chunk; `true` when the scan is over (found, the body's object closed, or
    /// past the limit).
    fn feed(&mut self, data: &[u8]) -> bool {
        self.seen += data.len() as u64;
        self.scan.feed(data);
        if let Some(raw) = self.scan.value(0) {
            let user = serde_json::from_slice::<serde_json::Value>(raw)
                .ok()
                .and_then(|v| v.get("user_id")?.as_str().map(str::to_owned));
            if let Some(user) = user.filter(|u| !u.is_empty()) {
                let _ = self.slot.set(user);
            }
            return true;
        }
        self.seen >= self.limit
            || matches!(
                self.scan.state(),
                ScanState::Closed | ScanState::NotAnObject
            )
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
    fn nested_metadata_decoy_neither_wins_nor_hides_the_top_level_user() {
        // A decoy before the real one: it must not win.
        let body = br#"{"model":"m","tools":[{"name":"t","input_schema":{"type":"object","properties":{"metadata":{"user_id":"decoy"}}}}],"messages":[{"role":"assistant","content":[{"type":"tool_use","id":"x","name":"t","input":{"metadata":{"user_id":"evil"}}}]}],"metadata":{"user_id":"real"}}"#;
        for split in 1..body.len() {
            assert_eq!(
                scan_chunks(body, split).as_deref(),
                Some("real"),
                "split {split}"
            );
        }
        // A nested decoy with no user_id must not hide the real one either.
        let body = br#"{"tools":[{"input_schema":{"metadata":{"type":"object"}}}],"metadata":{"user_id":"real"}}"#;
        assert_eq!(scan_chunks(body, 7).as_deref(), Some("real"));
        // Nested only: nobody.
        let body = br#"{"tools":[{"input_schema":{"metadata":{"user_id":"decoy"}}}]}"#;
        assert_eq!(scan_chunks(body, 5), None);
    }

    #[test]
    fn gives_up_after_the_limit() {
        let slot = Arc::new(OnceLock::new());
        let mut s = Scanner::new(Arc::clone(&slot), 100);
        assert!(!s.feed(b"{"));
        assert!(!s.feed(&[b' '; 60]));
        assert!(s.feed(&[b' '; 60]));
    }
}
