//! What a request must offer to be retried, and what a response records about retries.

use http::{HeaderName, HeaderValue, Method};
use http_body::Body;

use super::body::{BodySource, ReplayBody};
use crate::error::BoxError;

/// The `Idempotency-Key` header: a POST carrying it may be retried like a safe method.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// A request that [`Retry`](super::Retry) can send more than once.
///
/// `http::Request<B>` implements it for any body (the body is recorded up to the layer's
/// limit, see [`ReplayBody`]); [`Cloned`] makes any `Clone` value replayable. Implement it
/// for your own request type if neither fits.
pub trait Replay: Sized {
    /// What the inner service receives for each attempt.
    type Attempt;
    /// Makes the attempts.
    type Source: ReplaySource<Attempt = Self::Attempt>;

    /// Prepares the request for replay; `body_limit` is the most bytes of body to keep.
    fn into_source(self, body_limit: usize) -> Self::Source;
}

/// Makes the attempts of one replayable request.
pub trait ReplaySource {
    /// What the inner service receives for each attempt.
    type Attempt;

    /// Whether the request may be resent when the upstream may already have processed it
    /// (`Retry::IfIdempotent` verdicts).
    fn is_idempotent(&self) -> bool;

    /// Whether an attempt can still be made after the ones made so far (and the next).
    fn can_replay(&self) -> bool;

    /// The next attempt, or `None` if the request cannot be sent again. `last` says no
    /// attempt will follow this one, so the original can be moved in instead of copied.
    fn next_attempt(&mut self, last: bool) -> Option<Self::Attempt>;
}

/// Whether `method` may be resent after the upstream may have processed it (RFC 9110
/// idempotent methods).
///
/// ```
/// use palisade::retry::is_idempotent_method;
/// assert!(is_idempotent_method(&http::Method::PUT));
/// assert!(!is_idempotent_method(&http::Method::POST));
/// ```
pub fn is_idempotent_method(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::PUT | Method::DELETE | Method::OPTIONS | Method::TRACE
    )
}

/// The attempts of an `http::Request<B>`: the head is copied for each attempt but the
/// last (which takes the original), the body replayed from its recording.
pub struct HttpSource<B> {
    parts: Option<http::request::Parts>,
    body: BodySource<B>,
}

/// Shows the method, the URI (through [`redact_url`](crate::key::redact_url)) and the
/// header names, never header values: the head carries the caller's API key.
impl<B> std::fmt::Debug for HttpSource<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("HttpSource");
        if let Some(parts) = &self.parts {
            let names: Vec<&str> = parts.headers.keys().map(http::HeaderName::as_str).collect();
            d.field("method", &parts.method)
                .field("uri", &crate::key::redact_url(&parts.uri.to_string()))
                .field("headers", &names);
        }
        d.finish_non_exhaustive()
    }
}

impl<B> Replay for http::Request<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Attempt = http::Request<ReplayBody<B>>;
    type Source = HttpSource<B>;

    #[inline]
    fn into_source(self, body_limit: usize) -> HttpSource<B> {
        let (parts, body) = self.into_parts();
        HttpSource {
            body: BodySource::new(body, body_limit),
            parts: Some(parts),
        }
    }
}

impl<B> ReplaySource for HttpSource<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Attempt = http::Request<ReplayBody<B>>;

    /// Read only when a retry is considered, so the first-attempt path looks up no header.
    /// Once the head has moved into the last attempt there is nothing left to retry.
    fn is_idempotent(&self) -> bool {
        self.parts.as_ref().is_some_and(|parts| {
            is_idempotent_method(&parts.method) || parts.headers.contains_key(IDEMPOTENCY_KEY)
        })
    }

    #[inline]
    fn can_replay(&self) -> bool {
        self.parts.is_some() && self.body.replayable()
    }

    #[inline]
    fn next_attempt(&mut self, last: bool) -> Option<Self::Attempt> {
        let body = self.body.next()?;
        let parts = if last || !self.body.replayable() {
            self.parts.take()?
        } else {
            self.parts.as_ref()?.clone()
        };
        Some(http::Request::from_parts(parts, body))
    }
}

/// Any `Clone` value as a replayable request: each attempt but the last gets a clone.
///
/// ```
/// use palisade::retry::{Cloned, Replay, ReplaySource};
/// let mut source = Cloned::new("ping".to_owned()).into_source(0);
/// assert!(source.is_idempotent());
/// assert_eq!(source.next_attempt(false).as_deref(), Some("ping"));
/// assert_eq!(source.next_attempt(true).as_deref(), Some("ping"));
/// assert_eq!(source.next_attempt(false), None);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cloned<T> {
    value: Option<T>,
    idempotent: bool,
}

impl<T> Cloned<T> {
    /// A request that is safe to resend on any retryable outcome.
    pub const fn new(value: T) -> Self {
        Self {
            value: Some(value),
            idempotent: true,
        }
    }

    /// A request resent only when the upstream said it did not process it
    /// (`Retry::Safe` verdicts).
    pub const fn not_idempotent(value: T) -> Self {
        Self {
            value: Some(value),
            idempotent: false,
        }
    }
}

impl<T: Clone> Replay for Cloned<T> {
    type Attempt = T;
    type Source = Self;

    fn into_source(self, _body_limit: usize) -> Self {
        self
    }
}

impl<T: Clone> ReplaySource for Cloned<T> {
    type Attempt = T;

    fn is_idempotent(&self) -> bool {
        self.idempotent
    }

    fn can_replay(&self) -> bool {
        self.value.is_some()
    }

    fn next_attempt(&mut self, last: bool) -> Option<T> {
        if last {
            self.value.take()
        } else {
            self.value.clone()
        }
    }
}

/// How many times a call was retried: in the extensions of a response that needed at least
/// one retry. A response without it succeeded (or failed for good) at the first attempt;
/// [`RetryCount::of`] reads either case.
///
/// ```
/// use palisade::retry::RetryCount;
/// let mut response = http::Response::new(());
/// assert_eq!(RetryCount::of(&response), 0);
/// response.extensions_mut().insert(RetryCount(2));
/// assert_eq!(RetryCount::of(&response), 2);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct RetryCount(pub u32);

impl RetryCount {
    /// The number of retries recorded on `response` (0 when none).
    pub fn of<B>(response: &http::Response<B>) -> u32 {
        response
            .extensions()
            .get::<RetryCount>()
            .map_or(0, |count| count.0)
    }
}

/// A response type [`Retry`](super::Retry) can describe in logs and mark with the number
/// of retries. Implemented for `http::Response<B>`; for another type, an empty
/// `impl RetryResponse for MyResponse {}` is enough.
pub trait RetryResponse {
    /// The HTTP status, for logs.
    fn status_code(&self) -> Option<u16> {
        None
    }

    /// Records that the call was retried `retries` times (called only when `retries > 0`);
    /// `header` is the layer's optional count header.
    fn record_retries(&mut self, retries: u32, header: Option<&HeaderName>) {
        let _ = (retries, header);
    }
}

impl<B> RetryResponse for http::Response<B> {
    fn status_code(&self) -> Option<u16> {
        Some(self.status().as_u16())
    }

    fn record_retries(&mut self, retries: u32, header: Option<&HeaderName>) {
        self.extensions_mut().insert(RetryCount(retries));
        if let Some(name) = header {
            // A map at its size limit (thousands of names) goes without it: never a panic.
            let _ = self
                .headers_mut()
                .try_insert(name.clone(), HeaderValue::from(retries));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::Full;

    #[test]
    fn idempotency_rule() {
        for (method, key, expected) in [
            (Method::GET, false, true),
            (Method::HEAD, false, true),
            (Method::PUT, false, true),
            (Method::DELETE, false, true),
            (Method::OPTIONS, false, true),
            (Method::POST, false, false),
            (Method::PATCH, false, false),
            (Method::POST, true, true),
        ] {
            let mut builder = http::Request::builder().method(method.clone());
            if key {
                builder = builder.header("Idempotency-Key", "abc-123");
            }
            let request = builder.body(Full::new(Bytes::new())).unwrap();
            assert_eq!(
                request.into_source(1024).is_idempotent(),
                expected,
                "{method} key={key}"
            );
        }
    }

    #[test]
    fn last_attempt_moves_the_original_head() {
        let mut request = http::Request::builder()
            .uri("http://127.0.0.1/v1/messages")
            .header("x-api-key", "sk-test")
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap();
        request.extensions_mut().insert(7u8);
        let mut source = request.into_source(1024);
        let first = source.next_attempt(false).unwrap();
        assert_eq!(first.headers()["x-api-key"], "sk-test");
        assert_eq!(first.extensions().get::<u8>(), Some(&7));
        assert!(source.can_replay());
        let last = source.next_attempt(true).unwrap();
        assert_eq!(last.uri().path(), "/v1/messages");
        assert!(!source.can_replay());
        assert!(source.next_attempt(false).is_none());
    }

    /// The head's `Debug` printed every header value, the caller's API key among them.
    #[test]
    fn http_source_debug_shows_no_secret() {
        let request = http::Request::builder()
            .method(Method::POST)
            .uri("http://127.0.0.1/v1beta/models?key=hunter2-query")
            .header("x-api-key", "sk-ant-api03-hunter2-header")
            .header("authorization", "Bearer hunter2-bearer")
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap();
        let shown = format!("{:?}", request.into_source(1024));
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(
            shown.contains("x-api-key") && shown.contains("POST"),
            "{shown}"
        );
    }

    #[test]
    fn response_records_count() {
        let mut response = http::Response::new(());
        let header = HeaderName::from_static("x-retry-count");
        response.record_retries(3, Some(&header));
        assert_eq!(RetryCount::of(&response), 3);
        assert_eq!(response.headers()["x-retry-count"], "3");
        assert_eq!(response.status_code(), Some(200));
    }
}
