//! What an upstream's answer means: success, failure, or neither, and whether to retry.
//!
//! ```
//! use std::time::Duration;
//! use palisade::classify::{Classify, DefaultClassifier, Outcome, Retry};
//!
//! let response = http::Response::builder()
//!     .status(529)
//!     .header("retry-after", "7")
//!     .body(())
//!     .unwrap();
//! let verdict = DefaultClassifier::new().classify(Ok::<_, &std::io::Error>(&response));
//! assert_eq!(verdict.outcome, Outcome::Failure);
//! assert_eq!(verdict.retry, Retry::Safe);
//! assert_eq!(verdict.retry_after, Some(Duration::from_secs(7)));
//! ```
//!
//! The retry layer and the circuit breaker make the same judgement about every call, so it
//! lives here, once. A [`Classify`] implementation looks at the whole `Result` of a call
//! and returns a [`Classification`]:
//!
//! - an [`Outcome`]: `Success`, `Failure` (counts against the upstream's health),
//!   `Ignored` (the caller's fault, such as a 400: says nothing about the upstream), or
//!   `Rejected` (refused locally before reaching the upstream, such as by an open circuit);
//! - a [`Retry`] verdict: `Never`, `IfIdempotent` (the request may have been processed, so
//!   only safe methods or requests with an idempotency key may be resent), or `Safe` (the
//!   server said the request was not processed: 429, 529, 503 with `retry-after`, or the
//!   connection was never made);
//! - the delay the server asked for, parsed from `retry-after-ms`, `retry-after` (seconds
//!   or HTTP-date), and the `x-should-retry` override.
//!
//! [`DefaultClassifier`] encodes the defaults below; any closure
//! `Fn(Result<&Res, &E>) -> Classification` is a classifier too.
//!
//! | answer | outcome | retry |
//! |---|---|---|
//! | 1xx, 2xx, 3xx | `Success` | `Never` |
//! | 408, 409 | `Ignored` | `IfIdempotent` |
//! | 429 | `Ignored` | `Safe` |
//! | other 4xx | `Ignored` | `Never` |
//! | 500, 502, 504 | `Failure` | `IfIdempotent` |
//! | 503 | `Failure` | `Safe` with `retry-after`, else `IfIdempotent` |
//! | 529 | `Failure` | `Safe` |
//! | other 5xx | `Failure` | `Never` |
//! | connect error (nothing sent) | `Failure` | `Safe` |
//! | timeout | `Failure` | `IfIdempotent` |
//! | other transport error | `Failure` | `IfIdempotent` |
//! | palisade refusal (circuit open, rate limited) | `Rejected` | `Never` |
//!
//! `x-should-retry: false` turns any verdict into `Never`; `x-should-retry: true` on a
//! non-success answer turns it into `Safe`.

use std::error::Error as StdError;
use std::time::{Duration, SystemTime};

use http::{HeaderMap, Response, StatusCode};

use crate::error::{BoxError, Error, ErrorKind};

/// What a call's result says about the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The upstream did its job.
    Success,
    /// The upstream failed; counts against its health.
    Failure,
    /// Neither: the request was at fault (most 4xx), so the upstream's health is unchanged.
    Ignored,
    /// Refused locally before reaching the upstream (an open circuit, a local limit). Not
    /// a failure of the upstream, and a retry layer spends no budget on it.
    Rejected,
}

/// Whether resending the request may help, and when it is safe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Retry {
    /// Do not retry.
    Never,
    /// Retry only if the request is idempotent (safe method, `Idempotency-Key` header, or
    /// the user opted in): the upstream may have processed it.
    IfIdempotent,
    /// Retry whatever the method: the upstream did not process the request.
    Safe,
}

/// The verdict on one call. Build one with [`Classification::new`] and the `with_` methods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Classification {
    /// What the result says about the upstream.
    pub outcome: Outcome,
    /// Whether and when a retry is allowed.
    pub retry: Retry,
    /// The delay the server asked for (`retry-after-ms` or `retry-after`), if any.
    pub retry_after: Option<Duration>,
}

impl Classification {
    /// A verdict with no server-directed delay.
    pub const fn new(outcome: Outcome, retry: Retry) -> Self {
        Self {
            outcome,
            retry,
            retry_after: None,
        }
    }

    /// A success that must not be retried.
    pub const SUCCESS: Classification = Classification::new(Outcome::Success, Retry::Never);

    /// Sets the server-directed delay.
    #[must_use]
    pub const fn with_retry_after(mut self, retry_after: Option<Duration>) -> Self {
        self.retry_after = retry_after;
        self
    }

    /// Whether this outcome counts against the upstream.
    pub const fn is_failure(&self) -> bool {
        matches!(self.outcome, Outcome::Failure)
    }
}

/// Decides what a call's result means. Implemented by [`DefaultClassifier`] and by every
/// closure `Fn(Result<&Res, &E>) -> Classification`.
///
/// ```
/// use palisade::classify::{Classification, Classify, Outcome, Retry};
///
/// // An upstream whose 404s mean "not ready yet, try again".
/// let classifier = |result: Result<&http::Response<()>, &std::io::Error>| match result {
///     Ok(r) if r.status() == 404 => Classification::new(Outcome::Failure, Retry::Safe),
///     Ok(_) => Classification::SUCCESS,
///     Err(_) => Classification::new(Outcome::Failure, Retry::IfIdempotent),
/// };
/// let not_ready = http::Response::builder().status(404).body(()).unwrap();
/// assert_eq!(classifier.classify(Ok(&not_ready)).retry, Retry::Safe);
/// ```
pub trait Classify<Res, E> {
    /// Classifies one result.
    fn classify(&self, result: Result<&Res, &E>) -> Classification;
}

impl<F, Res, E> Classify<Res, E> for F
where
    F: Fn(Result<&Res, &E>) -> Classification,
{
    fn classify(&self, result: Result<&Res, &E>) -> Classification {
        self(result)
    }
}

/// The default judgement for HTTP upstreams (see the [module table](self)).
#[derive(Debug, Clone, Copy, Default)]
pub struct DefaultClassifier {
    _priv: (),
}

impl DefaultClassifier {
    /// The default classifier.
    pub const fn new() -> Self {
        Self { _priv: () }
    }
}

impl<B, E> Classify<Response<B>, E> for DefaultClassifier
where
    E: ClassifyError,
{
    #[inline]
    fn classify(&self, result: Result<&Response<B>, &E>) -> Classification {
        match result {
            Ok(response) => classify_response(response.status(), response.headers()),
            Err(err) => classify_error_class(err.error_class()),
        }
    }
}

/// Classifies an HTTP status and its headers with the default rules.
///
/// ```
/// use palisade::classify::{classify_response, Outcome, Retry};
/// let headers = http::HeaderMap::new();
/// let v = classify_response(http::StatusCode::BAD_REQUEST, &headers);
/// assert_eq!((v.outcome, v.retry), (Outcome::Ignored, Retry::Never));
/// ```
#[inline]
pub fn classify_response(status: StatusCode, headers: &HeaderMap) -> Classification {
    if status.as_u16() < 400 {
        // The hot path, inlined into the layers: a success reads no header and no clock.
        return Classification::SUCCESS;
    }
    classify_error_response(status, headers)
}

/// [`classify_response`] for 4xx and 5xx, out of line.
#[inline(never)]
fn classify_error_response(status: StatusCode, headers: &HeaderMap) -> Classification {
    let code = status.as_u16();
    let retry_after = parse_retry_after(headers);
    let (outcome, retry) = match code {
        408 | 409 => (Outcome::Ignored, Retry::IfIdempotent),
        429 => (Outcome::Ignored, Retry::Safe),
        400..=499 => (Outcome::Ignored, Retry::Never),
        500 | 502 | 504 => (Outcome::Failure, Retry::IfIdempotent),
        503 if retry_after.is_some() => (Outcome::Failure, Retry::Safe),
        503 => (Outcome::Failure, Retry::IfIdempotent),
        529 => (Outcome::Failure, Retry::Safe),
        _ => (Outcome::Failure, Retry::Never),
    };
    let retry = match parse_should_retry(headers) {
        Some(false) => Retry::Never,
        Some(true) => Retry::Safe,
        None => retry,
    };
    Classification {
        outcome,
        retry,
        retry_after,
    }
}

/// The default verdict for a transport error of the given class.
pub const fn classify_error_class(class: ErrorClass) -> Classification {
    match class {
        ErrorClass::NotSent => Classification::new(Outcome::Failure, Retry::Safe),
        ErrorClass::Timeout | ErrorClass::Transport => {
            Classification::new(Outcome::Failure, Retry::IfIdempotent)
        }
        ErrorClass::Rejected { retry_after } => {
            Classification::new(Outcome::Rejected, Retry::Never).with_retry_after(retry_after)
        }
    }
}

/// What kind of transport-level error a call failed with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The connection was never made (refused, DNS failure, connect timeout): no byte of the
    /// request reached the upstream.
    NotSent,
    /// The call timed out; the upstream may have processed it.
    Timeout,
    /// Refused locally by palisade (an open circuit, a rate limit) without reaching the
    /// upstream.
    Rejected {
        /// When the refusal ends, if known.
        retry_after: Option<Duration>,
    },
    /// Any other transport failure (reset, cut connection, protocol error).
    Transport,
}

/// Errors the default classifier understands. Implemented for the usual transport errors;
/// implement it for your own error type to use [`DefaultClassifier`] with it.
pub trait ClassifyError {
    /// The class of this error.
    fn error_class(&self) -> ErrorClass;
}

/// Walks an error and its sources to find its [`ErrorClass`]: a palisade [`Error`], a
/// hyper-util connect error, an I/O error kind, or a tower / tokio timeout.
pub fn error_class_of(err: &(dyn StdError + 'static)) -> ErrorClass {
    let mut next = Some(err);
    while let Some(err) = next {
        if let Some(e) = err.downcast_ref::<Error>() {
            return match e.kind() {
                ErrorKind::CircuitOpen | ErrorKind::RateLimited | ErrorKind::BudgetExceeded => {
                    ErrorClass::Rejected {
                        retry_after: e.retry_after(),
                    }
                }
                ErrorKind::Timeout => ErrorClass::Timeout,
                _ => ErrorClass::Transport,
            };
        }
        #[cfg(feature = "hyper-util")]
        if let Some(e) = err.downcast_ref::<hyper_util::client::legacy::Error>() {
            if e.is_connect() {
                return ErrorClass::NotSent;
            }
        }
        if err.is::<tower::timeout::error::Elapsed>() || err.is::<tokio::time::error::Elapsed>() {
            return ErrorClass::Timeout;
        }
        if let Some(e) = err.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind as Io;
            match e.kind() {
                Io::ConnectionRefused | Io::AddrNotAvailable | Io::NotFound => {
                    return ErrorClass::NotSent;
                }
                Io::TimedOut => return ErrorClass::Timeout,
                _ => {}
            }
            // An io::Error's `source()` skips the error it wraps; look at it directly.
            if let Some(inner) = e.get_ref() {
                next = Some(inner as &(dyn StdError + 'static));
                continue;
            }
        }
        next = err.source();
    }
    ErrorClass::Transport
}

impl ClassifyError for BoxError {
    fn error_class(&self) -> ErrorClass {
        error_class_of(&**self)
    }
}

impl ClassifyError for Error {
    fn error_class(&self) -> ErrorClass {
        error_class_of(self)
    }
}

impl ClassifyError for std::io::Error {
    fn error_class(&self) -> ErrorClass {
        error_class_of(self)
    }
}

#[cfg(feature = "hyper-util")]
#[cfg_attr(docsrs, doc(cfg(feature = "hyper-util")))]
impl ClassifyError for hyper_util::client::legacy::Error {
    fn error_class(&self) -> ErrorClass {
        error_class_of(self)
    }
}

impl ClassifyError for tower::timeout::error::Elapsed {
    fn error_class(&self) -> ErrorClass {
        ErrorClass::Timeout
    }
}

impl ClassifyError for std::convert::Infallible {
    fn error_class(&self) -> ErrorClass {
        match *self {}
    }
}

/// The `retry-after-ms` header (Anthropic and OpenAI send it beside `retry-after`).
pub const RETRY_AFTER_MS: http::HeaderName = http::HeaderName::from_static("retry-after-ms");

/// The delay a response asks for, reading the wall clock for HTTP-dates.
///
/// `retry-after-ms` (milliseconds, fractions allowed) wins over `retry-after`, which may be
/// whole seconds or an HTTP-date. Unparseable values are ignored. See
/// [`parse_retry_after_at`].
pub fn parse_retry_after(headers: &HeaderMap) -> Option<Duration> {
    parse_retry_after_at(headers, SystemTime::now())
}

/// [`parse_retry_after`] with the current time given, for HTTP-dates. A date in the past
/// means "now" (`Duration::ZERO`).
///
/// ```
/// use std::time::{Duration, SystemTime};
/// use palisade::classify::parse_retry_after_at;
///
/// let mut headers = http::HeaderMap::new();
/// headers.insert("retry-after", "Sun, 06 Nov 1994 08:49:37 GMT".parse().unwrap());
/// let now = httpdate::parse_http_date("Sun, 06 Nov 1994 08:49:07 GMT").unwrap();
/// assert_eq!(parse_retry_after_at(&headers, now), Some(Duration::from_secs(30)));
///
/// headers.insert("retry-after-ms", "1500".parse().unwrap());
/// assert_eq!(parse_retry_after_at(&headers, now), Some(Duration::from_millis(1500)));
/// ```
pub fn parse_retry_after_at(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    if let Some(ms) = headers
        .get(RETRY_AFTER_MS)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_millis)
    {
        return Some(ms);
    }
    let value = headers
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if value.bytes().all(|b| b.is_ascii_digit()) {
        // Delay-seconds: 1*DIGIT. Saturate absurd values rather than fail.
        return value
            .parse::<u64>()
            .ok()
            .map(Duration::from_secs)
            .or_else(|| (!value.is_empty()).then_some(Duration::from_secs(u64::from(u32::MAX))));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(when.duration_since(now).unwrap_or(Duration::ZERO))
}

fn parse_millis(value: &str) -> Option<Duration> {
    let ms: f64 = value.trim().parse().ok()?;
    (ms.is_finite() && ms >= 0.0).then(|| Duration::from_secs_f64((ms / 1000.0).min(1e9)))
}

/// The `x-should-retry` header: `Some(true)`, `Some(false)`, or `None` when absent or not
/// exactly `true` / `false`.
pub fn parse_should_retry(headers: &HeaderMap) -> Option<bool> {
    match headers.get(crate::error::X_SHOULD_RETRY)?.as_bytes() {
        b"true" => Some(true),
        b"false" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.insert(*k, http::HeaderValue::from_static(v));
        }
        map
    }

    fn status(code: u16, pairs: &[(&'static str, &'static str)]) -> Classification {
        classify_response(StatusCode::from_u16(code).unwrap(), &headers(pairs))
    }

    #[test]
    fn default_status_table() {
        use Outcome::*;
        use Retry::*;
        let table = [
            (200, Success, Never),
            (204, Success, Never),
            (301, Success, Never),
            (400, Ignored, Never),
            (401, Ignored, Never),
            (404, Ignored, Never),
            (408, Ignored, IfIdempotent),
            (409, Ignored, IfIdempotent),
            (413, Ignored, Never),
            (429, Ignored, Safe),
            (500, Failure, IfIdempotent),
            (501, Failure, Never),
            (502, Failure, IfIdempotent),
            (503, Failure, IfIdempotent),
            (504, Failure, IfIdempotent),
            (529, Failure, Safe),
        ];
        for (code, outcome, retry) in table {
            let v = status(code, &[]);
            assert_eq!((v.outcome, v.retry), (outcome, retry), "{code}");
        }
        assert_eq!(status(503, &[("retry-after", "2")]).retry, Safe);
    }

    #[test]
    fn should_retry_header_overrides() {
        assert_eq!(
            status(529, &[("x-should-retry", "false")]).retry,
            Retry::Never
        );
        assert_eq!(
            status(500, &[("x-should-retry", "true")]).retry,
            Retry::Safe
        );
        assert_eq!(
            status(400, &[("x-should-retry", "true")]).retry,
            Retry::Safe
        );
        // success is never retried, whatever the header says
        assert_eq!(
            status(200, &[("x-should-retry", "true")]).retry,
            Retry::Never
        );
        // only the exact words count
        assert_eq!(
            status(500, &[("x-should-retry", "TRUE")]).retry,
            Retry::IfIdempotent
        );
    }

    #[test]
    fn retry_after_seconds_ms_and_dates() {
        let now = httpdate::parse_http_date("Wed, 25 Nov 2026 12:00:00 GMT").unwrap();
        let at =
            |pairs: &[(&'static str, &'static str)]| parse_retry_after_at(&headers(pairs), now);
        assert_eq!(
            at(&[("retry-after", "120")]),
            Some(Duration::from_secs(120))
        );
        assert_eq!(at(&[("retry-after", " 3 ")]), Some(Duration::from_secs(3)));
        assert_eq!(at(&[("retry-after", "0")]), Some(Duration::ZERO));
        assert_eq!(
            at(&[("retry-after", "99999999999999999999999")]),
            Some(Duration::from_secs(u64::from(u32::MAX)))
        );
        assert_eq!(
            at(&[("retry-after", "Wed, 25 Nov 2026 12:00:45 GMT")]),
            Some(Duration::from_secs(45))
        );
        // a date in the past means now
        assert_eq!(
            at(&[("retry-after", "Wed, 25 Nov 2026 11:00:00 GMT")]),
            Some(Duration::ZERO)
        );
        // the other two HTTP-date forms
        assert_eq!(
            at(&[("retry-after", "Wednesday, 25-Nov-26 12:01:00 GMT")]),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            at(&[("retry-after", "Wed Nov 25 12:00:10 2026")]),
            Some(Duration::from_secs(10))
        );
        // milliseconds win, fractions allowed
        assert_eq!(
            at(&[("retry-after", "5"), ("retry-after-ms", "250.5")]),
            Some(Duration::from_micros(250_500))
        );
        // garbage is ignored, falling back where possible
        assert_eq!(at(&[("retry-after", "soon")]), None);
        assert_eq!(at(&[("retry-after", "-1")]), None);
        assert_eq!(at(&[("retry-after", "1.5")]), None);
        assert_eq!(at(&[("retry-after", "")]), None);
        assert_eq!(
            at(&[("retry-after-ms", "NaN"), ("retry-after", "4")]),
            Some(Duration::from_secs(4))
        );
        assert_eq!(at(&[("retry-after-ms", "-5")]), None);
        assert_eq!(at(&[("retry-after-ms", "inf")]), None);
        assert_eq!(at(&[]), None);
    }

    #[test]
    fn errors_are_classified_through_their_sources() {
        let refused: BoxError =
            Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(refused.error_class(), ErrorClass::NotSent);
        let reset: BoxError = Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert_eq!(reset.error_class(), ErrorClass::Transport);
        let elapsed: BoxError = Box::new(tower::timeout::error::Elapsed::new());
        assert_eq!(elapsed.error_class(), ErrorClass::Timeout);
        let open = Error::circuit_open("open", Duration::from_secs(3));
        assert_eq!(
            open.error_class(),
            ErrorClass::Rejected {
                retry_after: Some(Duration::from_secs(3))
            }
        );
        let wrapped = Error::upstream(
            "call failed",
            std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        );
        // an upstream error that wraps a refused connection: the palisade kind decides first
        assert_eq!(wrapped.error_class(), ErrorClass::Transport);
        let nested: BoxError = Box::new(std::io::Error::other(Error::timeout("slow")));
        assert_eq!(nested.error_class(), ErrorClass::Timeout);

        let c = DefaultClassifier::new();
        let v = c.classify(Err::<&Response<()>, _>(&refused));
        assert_eq!((v.outcome, v.retry), (Outcome::Failure, Retry::Safe));
        let open: BoxError = Box::new(open);
        let v = c.classify(Err::<&Response<()>, _>(&open));
        assert_eq!(v.outcome, Outcome::Rejected);
        assert_eq!(v.retry_after, Some(Duration::from_secs(3)));
    }

    #[cfg(feature = "hyper-util")]
    #[tokio::test]
    async fn hyper_util_connect_errors_are_not_sent() {
        use hyper_util::client::legacy::Client;
        use hyper_util::rt::TokioExecutor;
        // A port that was free a moment ago: nothing listens there.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let client: Client<_, http_body_util::Empty<bytes::Bytes>> =
            Client::builder(TokioExecutor::new()).build_http();
        let err = client
            .get(format!("http://127.0.0.1:{port}/").parse().unwrap())
            .await
            .unwrap_err();
        assert!(err.is_connect());
        assert_eq!(err.error_class(), ErrorClass::NotSent);
    }
}
