//! One typed error for the whole crate, rendered to HTTP in the format you choose.
//!
//! ```
//! use std::time::Duration;
//! use palisade::error::{Error, ErrorFormat, ErrorKind};
//!
//! let err = Error::rate_limited("too many requests for this API key", Duration::from_millis(1500));
//! assert_eq!(err.kind(), ErrorKind::RateLimited);
//! assert!(err.is_retryable());
//!
//! let response = err.to_response(ErrorFormat::Anthropic);
//! assert_eq!(response.status(), 429);
//! assert_eq!(response.headers()["retry-after"], "2"); // 1.5 s, rounded up
//! let body: serde_json::Value = serde_json::from_slice(response.body().as_bytes()).unwrap();
//! assert_eq!(body["error"]["type"], "rate_limit_error");
//! ```
//!
//! Every refusal palisade makes (a rate limit, an open circuit, a budget, an invalid
//! request) is an [`Error`] with an [`ErrorKind`]. The kind decides the HTTP status, whether
//! a client may retry, and the error type name in the response body. An error can also
//! carry:
//!
//! - a `retry_after` delay, rendered as a `retry-after` header in whole seconds, rounded up
//!   and never `0`;
//! - field errors ([`FieldError`]) that say exactly which part of a request to fix;
//! - a `should_retry` hint, rendered as `x-should-retry: true|false` (the header the
//!   Anthropic and OpenAI SDKs read before retrying);
//! - a `source` error that is logged but **never rendered**.
//!
//! Two renderings are built in ([`ErrorFormat`]):
//!
//! - [`ErrorFormat::Anthropic`], a body like
//!   `{"type":"error","error":{"type":"rate_limit_error","message":"..."}}`, with the status codes the Anthropic API uses (400, 401, 403, 404, 413, 429, 500, 529),
//!   so the official SDKs understand a palisade refusal exactly as they would one from the
//!   API itself.
//! - [`ErrorFormat::ProblemJson`]: RFC 9457 `application/problem+json`, with the standard
//!   status codes (502, 503 and 504 included).
//!
//! A server error (500) never shows its message or source: the caller sees a generic
//! sentence, the log sees everything.
//!
//! [`Error::to_response`] renders in the format you pass and
//! [`Error::into_http_response`] in the one chosen with [`Error::with_format`], both as an
//! `http::Response` with palisade's [`ErrorBody`]. With the `axum` feature, `Error` is also
//! axum's `IntoResponse` (whose `into_response` gives an axum `Response`), so handlers can
//! return `Result<_, palisade::Error>`.

use std::borrow::Cow;
use std::error::Error as StdError;
use std::fmt;
use std::time::Duration;

use http::{HeaderValue, StatusCode, header};
use serde::{Deserialize, Serialize};

use crate::body::ErrorBody;

/// A boxed error, as tower uses for type-erased errors.
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// What went wrong, in terms a caller can act on.
///
/// Each kind has a fixed HTTP status ([`ErrorKind::status`]), a retryability
/// ([`ErrorKind::is_retryable`]) and names in both renderings.
///
/// | kind | status | Anthropic status / type | retryable |
/// |---|---|---|---|
/// | `InvalidRequest` | 400 | 400 `invalid_request_error` | no |
/// | `Unauthenticated` | 401 | 401 `authentication_error` | no |
/// | `Forbidden` | 403 | 403 `permission_error` | no |
/// | `NotFound` | 404 | 404 `not_found_error` | no |
/// | `PayloadTooLarge` | 413 | 413 `request_too_large` | no |
/// | `UnsupportedMediaType` | 415 | 400 `invalid_request_error` | no |
/// | `RateLimited` | 429 | 429 `rate_limit_error` | yes |
/// | `BudgetExceeded` | 429 | 429 `rate_limit_error` | no |
/// | `CircuitOpen` | 503 | 529 `overloaded_error` | yes |
/// | `Timeout` | 504 | 500 `api_error` | yes |
/// | `Upstream` | 502 | 500 `api_error` | yes |
/// | `Overloaded` | 529 | 529 `overloaded_error` | yes |
/// | `Unavailable` | 503 | 529 `overloaded_error` | yes |
/// | `Config` | 500 | 500 `api_error` | no |
/// | `Internal` | 500 | 500 `api_error` | no |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorKind {
    /// The request is malformed or fails validation (400).
    InvalidRequest,
    /// No valid credentials were presented (401).
    Unauthenticated,
    /// The credentials are valid but not allowed to do this (403).
    Forbidden,
    /// The route or resource does not exist (404).
    NotFound,
    /// The request body is larger than allowed (413).
    PayloadTooLarge,
    /// The request body is not in a media type the endpoint accepts, for example not JSON
    /// (415).
    UnsupportedMediaType,
    /// A rate limit refused the request; retry after the given delay (429).
    RateLimited,
    /// A spending or token budget refused the request; retrying will not help until the
    /// budget resets (429, `x-should-retry: false` by default).
    BudgetExceeded,
    /// A circuit breaker is open and refused the call without trying the upstream (503).
    CircuitOpen,
    /// The upstream did not answer in time (504).
    Timeout,
    /// The upstream failed or answered with something unusable (502).
    Upstream,
    /// The upstream or this service is overloaded (529, as the Anthropic API uses it).
    Overloaded,
    /// The service is temporarily unavailable, for example a required store is down (503).
    Unavailable,
    /// palisade or the service was configured wrongly (500; details only in logs).
    Config,
    /// An unexpected internal failure (500; details only in logs).
    Internal,
}

impl ErrorKind {
    /// Every kind, in declaration order.
    pub const ALL: [ErrorKind; 15] = [
        ErrorKind::InvalidRequest,
        ErrorKind::Unauthenticated,
        ErrorKind::Forbidden,
        ErrorKind::NotFound,
        ErrorKind::PayloadTooLarge,
        ErrorKind::UnsupportedMediaType,
        ErrorKind::RateLimited,
        ErrorKind::BudgetExceeded,
        ErrorKind::CircuitOpen,
        ErrorKind::Timeout,
        ErrorKind::Upstream,
        ErrorKind::Overloaded,
        ErrorKind::Unavailable,
        ErrorKind::Config,
        ErrorKind::Internal,
    ];

    /// The standard HTTP status for this kind (used by [`ErrorFormat::ProblemJson`]).
    pub const fn status(self) -> StatusCode {
        match self {
            ErrorKind::InvalidRequest => StatusCode::BAD_REQUEST,
            ErrorKind::Unauthenticated => StatusCode::UNAUTHORIZED,
            ErrorKind::Forbidden => StatusCode::FORBIDDEN,
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ErrorKind::RateLimited | ErrorKind::BudgetExceeded => StatusCode::TOO_MANY_REQUESTS,
            ErrorKind::CircuitOpen | ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::Timeout => StatusCode::GATEWAY_TIMEOUT,
            ErrorKind::Upstream => StatusCode::BAD_GATEWAY,
            ErrorKind::Overloaded => STATUS_OVERLOADED,
            ErrorKind::Config | ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The status the Anthropic API uses for this kind (used by [`ErrorFormat::Anthropic`]):
    /// always one of 400, 401, 403, 404, 413, 429, 500 and 529.
    pub const fn anthropic_status(self) -> StatusCode {
        match self {
            ErrorKind::CircuitOpen | ErrorKind::Overloaded | ErrorKind::Unavailable => {
                STATUS_OVERLOADED
            }
            ErrorKind::Timeout | ErrorKind::Upstream => StatusCode::INTERNAL_SERVER_ERROR,
            ErrorKind::UnsupportedMediaType => StatusCode::BAD_REQUEST,
            other => other.status(),
        }
    }

    /// The Anthropic error type name (`rate_limit_error`, `overloaded_error`, ...).
    pub const fn anthropic_type(self) -> &'static str {
        match self {
            ErrorKind::InvalidRequest | ErrorKind::UnsupportedMediaType => "invalid_request_error",
            ErrorKind::Unauthenticated => "authentication_error",
            ErrorKind::Forbidden => "permission_error",
            ErrorKind::NotFound => "not_found_error",
            ErrorKind::PayloadTooLarge => "request_too_large",
            ErrorKind::RateLimited | ErrorKind::BudgetExceeded => "rate_limit_error",
            ErrorKind::CircuitOpen | ErrorKind::Overloaded | ErrorKind::Unavailable => {
                "overloaded_error"
            }
            ErrorKind::Timeout | ErrorKind::Upstream | ErrorKind::Config | ErrorKind::Internal => {
                "api_error"
            }
        }
    }

    /// A stable snake_case name (`rate_limited`, `circuit_open`, ...), used in logs and as the
    /// `kind` member of problem documents.
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidRequest => "invalid_request",
            ErrorKind::Unauthenticated => "unauthenticated",
            ErrorKind::Forbidden => "forbidden",
            ErrorKind::NotFound => "not_found",
            ErrorKind::PayloadTooLarge => "payload_too_large",
            ErrorKind::UnsupportedMediaType => "unsupported_media_type",
            ErrorKind::RateLimited => "rate_limited",
            ErrorKind::BudgetExceeded => "budget_exceeded",
            ErrorKind::CircuitOpen => "circuit_open",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Upstream => "upstream",
            ErrorKind::Overloaded => "overloaded",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Config => "config",
            ErrorKind::Internal => "internal",
        }
    }

    /// A short human title (the RFC 9457 `title`).
    pub const fn title(self) -> &'static str {
        match self {
            ErrorKind::InvalidRequest => "Invalid request",
            ErrorKind::Unauthenticated => "Authentication required",
            ErrorKind::Forbidden => "Forbidden",
            ErrorKind::NotFound => "Not found",
            ErrorKind::PayloadTooLarge => "Request too large",
            ErrorKind::UnsupportedMediaType => "Unsupported media type",
            ErrorKind::RateLimited => "Rate limit exceeded",
            ErrorKind::BudgetExceeded => "Budget exceeded",
            ErrorKind::CircuitOpen => "Upstream circuit open",
            ErrorKind::Timeout => "Upstream timeout",
            ErrorKind::Upstream => "Upstream error",
            ErrorKind::Overloaded => "Overloaded",
            ErrorKind::Unavailable => "Service unavailable",
            ErrorKind::Config | ErrorKind::Internal => "Internal server error",
        }
    }

    /// Whether a client may usefully retry the same request later.
    pub const fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorKind::RateLimited
                | ErrorKind::CircuitOpen
                | ErrorKind::Timeout
                | ErrorKind::Upstream
                | ErrorKind::Overloaded
                | ErrorKind::Unavailable
        )
    }

    /// Whether this kind hides its message from callers (server-side faults).
    const fn is_internal(self) -> bool {
        matches!(self, ErrorKind::Config | ErrorKind::Internal)
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// HTTP 529, the status the Anthropic API uses for "overloaded".
pub const STATUS_OVERLOADED: StatusCode = match StatusCode::from_u16(529) {
    Ok(s) => s,
    Err(_) => StatusCode::SERVICE_UNAVAILABLE,
};

/// The JSON shape an [`Error`] is rendered in.
///
/// One setting, `PALISADE_ERROR_FORMAT`, decides it for every layer unless a layer's own
/// setting overrides it: see [`ErrorFormat::from_env`] and
/// [`ErrorFormat::from_env_with_override`]. Parses from `anthropic` or `problem`
/// (also written `problem_json` or `problem+json`), ASCII case-insensitively.
///
/// ```
/// use palisade::ErrorFormat;
///
/// assert_eq!("anthropic".parse(), Ok(ErrorFormat::Anthropic));
/// assert_eq!("problem".parse(), Ok(ErrorFormat::ProblemJson));
/// assert_eq!(ErrorFormat::ProblemJson.to_string(), "problem_json");
/// assert!("xml".parse::<ErrorFormat>().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorFormat {
    /// `{"type":"error","error":{"type":"...","message":"..."}}` with Anthropic's statuses.
    Anthropic,
    /// RFC 9457 `application/problem+json` with standard statuses.
    #[default]
    #[serde(alias = "problem", alias = "problem+json")]
    ProblemJson,
}

impl ErrorFormat {
    /// The name written in configuration (`anthropic` or `problem_json`).
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorFormat::Anthropic => "anthropic",
            ErrorFormat::ProblemJson => "problem_json",
        }
    }
}

impl fmt::Display for ErrorFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for ErrorFormat {
    type Err = crate::config::ParseChoiceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "anthropic" => Ok(ErrorFormat::Anthropic),
            "problem" | "problem_json" | "problem+json" => Ok(ErrorFormat::ProblemJson),
            _ => Err(crate::config::ParseChoiceError::new(
                s,
                "`anthropic` or `problem`",
            )),
        }
    }
}

/// One problem with one field of a request.
///
/// `field` is a path into the request, written with dots and indices
/// (`messages[0].content`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldError {
    /// Where the problem is, for example `messages[0].content`.
    pub field: String,
    /// What is wrong and how to fix it, for example `must not be empty`.
    pub message: String,
}

impl FieldError {
    /// A field error for `field` with `message`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// The crate's error: a kind, a message for the caller, and optional details.
///
/// Cheap to move (one pointer wide). See the [module docs](self) for the renderings.
pub struct Error {
    inner: Box<Inner>,
}

struct Inner {
    kind: ErrorKind,
    message: Cow<'static, str>,
    retry_after: Option<Duration>,
    should_retry: Option<bool>,
    fields: Vec<FieldError>,
    source: Option<BoxError>,
    format: Option<ErrorFormat>,
}

impl Error {
    /// An error of `kind` with a message shown to the caller (unless the kind is
    /// `Internal` or `Config`, whose messages only reach the logs).
    pub fn new(kind: ErrorKind, message: impl Into<Cow<'static, str>>) -> Self {
        Self {
            inner: Box::new(Inner {
                kind,
                message: message.into(),
                retry_after: None,
                should_retry: None,
                fields: Vec::new(),
                source: None,
                format: None,
            }),
        }
    }

    /// A 400 error.
    pub fn invalid_request(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorKind::InvalidRequest, message)
    }

    /// A 400 error listing every field that needs fixing.
    pub fn invalid_fields(fields: impl IntoIterator<Item = FieldError>) -> Self {
        let fields: Vec<FieldError> = fields.into_iter().collect();
        let message = match fields.len() {
            0 => "the request is invalid".to_owned(),
            1 => format!("invalid request: {}", fields[0]),
            n => format!(
                "invalid request: {n} problems: {}",
                fields
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
        };
        Self::new(ErrorKind::InvalidRequest, message).with_fields(fields)
    }

    /// A 429 error from a rate limit, retryable after `retry_after`.
    pub fn rate_limited(message: impl Into<Cow<'static, str>>, retry_after: Duration) -> Self {
        Self::new(ErrorKind::RateLimited, message).with_retry_after(retry_after)
    }

    /// A 429 refusal from a budget; carries `x-should-retry: false`.
    pub fn budget_exceeded(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorKind::BudgetExceeded, message).with_should_retry(false)
    }

    /// A refusal by an open circuit breaker; retry after `retry_after`.
    pub fn circuit_open(message: impl Into<Cow<'static, str>>, retry_after: Duration) -> Self {
        Self::new(ErrorKind::CircuitOpen, message).with_retry_after(retry_after)
    }

    /// A timeout waiting for the upstream.
    pub fn timeout(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorKind::Timeout, message)
    }

    /// An upstream failure; `source` is logged, never rendered.
    pub fn upstream(message: impl Into<Cow<'static, str>>, source: impl Into<BoxError>) -> Self {
        Self::new(ErrorKind::Upstream, message).with_source(source)
    }

    /// An internal failure. The message and source are logged; callers see a generic 500.
    pub fn internal(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }

    /// Sets the delay after which the caller may retry.
    #[must_use]
    pub fn with_retry_after(mut self, retry_after: Duration) -> Self {
        self.inner.retry_after = Some(retry_after);
        self
    }

    /// Sets the `x-should-retry` hint.
    #[must_use]
    pub fn with_should_retry(mut self, should_retry: bool) -> Self {
        self.inner.should_retry = Some(should_retry);
        self
    }

    /// Adds field errors.
    #[must_use]
    pub fn with_fields(mut self, fields: impl IntoIterator<Item = FieldError>) -> Self {
        self.inner.fields.extend(fields);
        self
    }

    /// Attaches the underlying cause. It is logged when the error is rendered and is
    /// available through [`std::error::Error::source`], but never appears in a response.
    #[must_use]
    pub fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.inner.source = Some(source.into());
        self
    }

    /// Chooses the rendering used by [`Error::into_http_response`] (and by axum's
    /// `IntoResponse`). Without it, [`ErrorFormat::default`] is used.
    #[must_use]
    pub fn with_format(mut self, format: ErrorFormat) -> Self {
        self.inner.format = Some(format);
        self
    }

    /// The kind of error.
    pub fn kind(&self) -> ErrorKind {
        self.inner.kind
    }

    /// The message (for internal kinds, this is the log-only message).
    pub fn message(&self) -> &str {
        &self.inner.message
    }

    /// When the caller may retry, if known.
    pub fn retry_after(&self) -> Option<Duration> {
        self.inner.retry_after
    }

    /// The `x-should-retry` hint, if set.
    pub fn should_retry(&self) -> Option<bool> {
        self.inner.should_retry
    }

    /// The field errors, if any.
    pub fn fields(&self) -> &[FieldError] {
        &self.inner.fields
    }

    /// Whether a retry may succeed: the kind is retryable and no `should_retry(false)` hint
    /// says otherwise.
    pub fn is_retryable(&self) -> bool {
        self.inner.should_retry != Some(false) && self.inner.kind.is_retryable()
    }

    /// The status this error renders with in `format`.
    pub fn status(&self, format: ErrorFormat) -> StatusCode {
        match format {
            ErrorFormat::Anthropic => self.inner.kind.anthropic_status(),
            ErrorFormat::ProblemJson => self.inner.kind.status(),
        }
    }

    /// The message a caller may see: internal kinds get a generic sentence.
    pub fn public_message(&self) -> &str {
        if self.inner.kind.is_internal() {
            "an internal error occurred; it has been logged"
        } else {
            &self.inner.message
        }
    }

    /// Renders the error as an HTTP response in `format`, logging it (with its source) at
    /// a level that fits: `error` for 5xx internal faults, `debug` for refusals.
    pub fn to_response(&self, format: ErrorFormat) -> http::Response<ErrorBody> {
        self.log();
        let status = self.status(format);
        let (content_type, body) = match format {
            ErrorFormat::Anthropic => ("application/json", self.anthropic_json()),
            ErrorFormat::ProblemJson => ("application/problem+json", self.problem_json(status)),
        };
        let mut response = http::Response::new(ErrorBody::from(body));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        let needs_retry_after = matches!(status.as_u16(), 429 | 503 | 529);
        if let Some(delay) = self
            .inner
            .retry_after
            .or(needs_retry_after.then_some(Duration::ZERO))
        {
            headers.insert(
                header::RETRY_AFTER,
                HeaderValue::from(retry_after_secs(delay)),
            );
        }
        if let Some(should) = self.inner.should_retry {
            headers.insert(
                X_SHOULD_RETRY,
                HeaderValue::from_static(if should { "true" } else { "false" }),
            );
        }
        response
    }

    /// Renders the error in the format chosen with [`Error::with_format`] (or the default),
    /// as an `http::Response` with palisade's [`ErrorBody`].
    ///
    /// With the `axum` feature, `Error` also implements axum's `IntoResponse`, whose
    /// `into_response` gives an `axum::response::Response` in the same format; the two
    /// names keep the two body types apart.
    pub fn into_http_response(self) -> http::Response<ErrorBody> {
        self.to_response(self.inner.format.unwrap_or_default())
    }

    fn anthropic_json(&self) -> Vec<u8> {
        let mut error = serde_json::Map::new();
        error.insert("type".into(), self.inner.kind.anthropic_type().into());
        error.insert("message".into(), self.public_message().into());
        if !self.inner.fields.is_empty() {
            error.insert("fields".into(), serde_json::json!(self.inner.fields));
        }
        serde_json::to_vec(&serde_json::json!({ "type": "error", "error": error }))
            .unwrap_or_default()
    }

    fn problem_json(&self, status: StatusCode) -> Vec<u8> {
        let kind = self.inner.kind;
        let mut doc = serde_json::Map::new();
        doc.insert("type".into(), format!("{PROBLEM_TYPE_BASE}{kind:?}").into());
        doc.insert("title".into(), kind.title().into());
        doc.insert("status".into(), status.as_u16().into());
        doc.insert("detail".into(), self.public_message().into());
        doc.insert("kind".into(), kind.as_str().into());
        if let Some(delay) = self.inner.retry_after {
            doc.insert("retry_after".into(), retry_after_secs(delay).into());
        }
        if !self.inner.fields.is_empty() {
            doc.insert("errors".into(), serde_json::json!(self.inner.fields));
        }
        serde_json::to_vec(&doc).unwrap_or_default()
    }

    fn log(&self) {
        let kind = self.inner.kind;
        let source = self
            .inner
            .source
            .as_deref()
            .map(|s| ErrorChain(s).to_string());
        if kind.is_internal() {
            tracing::error!(kind = %kind, message = %self.inner.message, source = ?source, "palisade error");
        } else if kind.status().is_server_error() && source.is_some() {
            tracing::warn!(kind = %kind, message = %self.inner.message, source = ?source, "palisade error");
        } else {
            tracing::debug!(kind = %kind, message = %self.inner.message, source = ?source, "palisade refusal");
        }
    }
}

/// Base of the RFC 9457 `type` URI: the kind's variant name is appended, so the URI leads
/// to that variant's documentation.
pub const PROBLEM_TYPE_BASE: &str =
    "https://docs.rs/palisade/latest/palisade/error/enum.ErrorKind.html#variant.";

/// The `x-should-retry` header name.
pub const X_SHOULD_RETRY: header::HeaderName = header::HeaderName::from_static("x-should-retry");

/// `retry-after` in whole seconds: rounded up, and never 0 (a 0 invites a tight loop).
///
/// ```
/// use std::time::Duration;
/// assert_eq!(palisade::error::retry_after_secs(Duration::ZERO), 1);
/// assert_eq!(palisade::error::retry_after_secs(Duration::from_millis(1001)), 2);
/// assert_eq!(palisade::error::retry_after_secs(Duration::from_secs(60)), 60);
/// assert_eq!(palisade::error::retry_after_secs(Duration::MAX), u64::MAX);
/// ```
pub fn retry_after_secs(delay: Duration) -> u64 {
    let secs = delay
        .as_secs()
        .saturating_add(u64::from(delay.subsec_nanos() > 0));
    secs.max(1)
}

struct ErrorChain<'a>(&'a (dyn StdError + 'static));

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut next = self.0.source();
        while let Some(err) = next {
            write!(f, ": {err}")?;
            next = err.source();
        }
        Ok(())
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Error")
            .field("kind", &self.inner.kind)
            .field("message", &self.inner.message)
            .field("retry_after", &self.inner.retry_after)
            .field("should_retry", &self.inner.should_retry)
            .field("fields", &self.inner.fields)
            .field("source", &self.inner.source)
            .finish()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.inner.kind, self.inner.message)?;
        if let Some(delay) = self.inner.retry_after {
            write!(f, " (retry after {delay:?})")?;
        }
        Ok(())
    }
}

impl StdError for Error {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.inner
            .source
            .as_deref()
            .map(|s| s as &(dyn StdError + 'static))
    }
}

impl From<ErrorKind> for Error {
    fn from(kind: ErrorKind) -> Self {
        Error::new(kind, kind.title())
    }
}

#[cfg(feature = "axum")]
#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
impl axum::response::IntoResponse for Error {
    fn into_response(self) -> axum::response::Response {
        self.into_http_response().map(axum::body::Body::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn body_json(response: &http::Response<ErrorBody>) -> Value {
        serde_json::from_slice(response.body().as_bytes()).unwrap()
    }

    #[test]
    fn every_kind_has_its_status_and_names() {
        let expected = [
            (
                ErrorKind::InvalidRequest,
                400,
                400,
                "invalid_request_error",
                false,
            ),
            (
                ErrorKind::Unauthenticated,
                401,
                401,
                "authentication_error",
                false,
            ),
            (ErrorKind::Forbidden, 403, 403, "permission_error", false),
            (ErrorKind::NotFound, 404, 404, "not_found_error", false),
            (
                ErrorKind::PayloadTooLarge,
                413,
                413,
                "request_too_large",
                false,
            ),
            (
                ErrorKind::UnsupportedMediaType,
                415,
                400,
                "invalid_request_error",
                false,
            ),
            (ErrorKind::RateLimited, 429, 429, "rate_limit_error", true),
            (
                ErrorKind::BudgetExceeded,
                429,
                429,
                "rate_limit_error",
                false,
            ),
            (ErrorKind::CircuitOpen, 503, 529, "overloaded_error", true),
            (ErrorKind::Timeout, 504, 500, "api_error", true),
            (ErrorKind::Upstream, 502, 500, "api_error", true),
            (ErrorKind::Overloaded, 529, 529, "overloaded_error", true),
            (ErrorKind::Unavailable, 503, 529, "overloaded_error", true),
            (ErrorKind::Config, 500, 500, "api_error", false),
            (ErrorKind::Internal, 500, 500, "api_error", false),
        ];
        assert_eq!(expected.len(), ErrorKind::ALL.len());
        for (kind, status, anthropic, ty, retryable) in expected {
            assert_eq!(kind.status().as_u16(), status, "{kind}");
            assert_eq!(kind.anthropic_status().as_u16(), anthropic, "{kind}");
            assert!(
                [400, 401, 403, 404, 413, 429, 500, 529].contains(&anthropic),
                "{kind}"
            );
            assert_eq!(kind.anthropic_type(), ty, "{kind}");
            assert_eq!(kind.is_retryable(), retryable, "{kind}");
            // serde name and as_str agree
            assert_eq!(serde_json::to_value(kind).unwrap(), json!(kind.as_str()));
        }
    }

    #[test]
    fn anthropic_golden() {
        let err = Error::rate_limited("slow down", Duration::from_millis(2500));
        let response = err.to_response(ErrorFormat::Anthropic);
        assert_eq!(response.status(), 429);
        assert_eq!(response.headers()["content-type"], "application/json");
        assert_eq!(response.headers()["retry-after"], "3");
        assert_eq!(
            response.body().as_bytes(),
            br#"{"error":{"message":"slow down","type":"rate_limit_error"},"type":"error"}"#
        );
    }

    #[test]
    fn problem_golden() {
        let err = Error::invalid_fields([
            FieldError::new("model", "is required"),
            FieldError::new("max_tokens", "must be at least 1"),
        ]);
        let response = err.to_response(ErrorFormat::ProblemJson);
        assert_eq!(response.status(), 400);
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
        assert!(response.headers().get("retry-after").is_none());
        assert_eq!(
            body_json(&response),
            json!({
                "type": "https://docs.rs/palisade/latest/palisade/error/enum.ErrorKind.html#variant.InvalidRequest",
                "title": "Invalid request",
                "status": 400,
                "detail": "invalid request: 2 problems: model: is required; max_tokens: must be at least 1",
                "kind": "invalid_request",
                "errors": [
                    {"field": "model", "message": "is required"},
                    {"field": "max_tokens", "message": "must be at least 1"}
                ]
            })
        );
    }

    #[test]
    fn anthropic_lists_fields() {
        let err = Error::invalid_fields([FieldError::new("messages", "must not be empty")]);
        let body = body_json(&err.to_response(ErrorFormat::Anthropic));
        assert_eq!(
            body,
            json!({"type": "error", "error": {
                "type": "invalid_request_error",
                "message": "invalid request: messages: must not be empty",
                "fields": [{"field": "messages", "message": "must not be empty"}]
            }})
        );
    }

    #[test]
    fn internal_errors_never_show_internals() {
        let err = Error::internal("db password=hunter2 rejected")
            .with_source(std::io::Error::other("connection to 10.0.0.7 refused"));
        for format in [ErrorFormat::Anthropic, ErrorFormat::ProblemJson] {
            let response = err.to_response(format);
            assert_eq!(response.status(), 500);
            let text = std::str::from_utf8(response.body().as_bytes()).unwrap();
            assert!(!text.contains("hunter2"), "{text}");
            assert!(!text.contains("10.0.0.7"), "{text}");
        }
        // still available to logs and callers in code
        assert!(err.source().unwrap().to_string().contains("10.0.0.7"));
        let config = Error::new(ErrorKind::Config, "REDIS_URL is bad");
        let body = body_json(&config.to_response(ErrorFormat::ProblemJson));
        assert!(!body.to_string().contains("REDIS_URL"));
    }

    #[test]
    fn upstream_source_is_not_rendered() {
        let err = Error::upstream(
            "the upstream failed",
            std::io::Error::other("sk-ant-secret leaked"),
        );
        let response = err.to_response(ErrorFormat::ProblemJson);
        assert_eq!(response.status(), 502);
        assert!(!String::from_utf8_lossy(response.body().as_bytes()).contains("sk-ant"));
    }

    #[test]
    fn retry_after_on_429_and_503_is_never_zero() {
        for kind in [
            ErrorKind::RateLimited,
            ErrorKind::CircuitOpen,
            ErrorKind::Unavailable,
            ErrorKind::Overloaded,
        ] {
            for format in [ErrorFormat::Anthropic, ErrorFormat::ProblemJson] {
                let plain = Error::new(kind, "x").to_response(format);
                assert_eq!(plain.headers()["retry-after"], "1", "{kind} {format:?}");
                let zero = Error::new(kind, "x")
                    .with_retry_after(Duration::ZERO)
                    .to_response(format);
                assert_eq!(zero.headers()["retry-after"], "1");
                let tiny = Error::new(kind, "x")
                    .with_retry_after(Duration::from_nanos(1))
                    .to_response(format);
                assert_eq!(tiny.headers()["retry-after"], "1");
                let long = Error::new(kind, "x")
                    .with_retry_after(Duration::from_secs(30))
                    .to_response(format);
                assert_eq!(long.headers()["retry-after"], "30");
            }
        }
    }

    #[test]
    fn budget_refusal_says_do_not_retry() {
        let err = Error::budget_exceeded("monthly budget of $50.00 is spent");
        assert!(!err.is_retryable());
        let response = err.to_response(ErrorFormat::Anthropic);
        assert_eq!(response.status(), 429);
        assert_eq!(response.headers()["x-should-retry"], "false");
    }

    #[test]
    fn should_retry_false_overrides_kind() {
        let err = Error::rate_limited("x", Duration::from_secs(1)).with_should_retry(false);
        assert!(!err.is_retryable());
        assert!(Error::timeout("slow").is_retryable());
    }

    #[test]
    fn display_and_debug() {
        let err = Error::circuit_open("api.anthropic.com is failing", Duration::from_secs(5));
        assert_eq!(
            err.to_string(),
            "circuit_open: api.anthropic.com is failing (retry after 5s)"
        );
        assert!(format!("{err:?}").contains("CircuitOpen"));
        assert_eq!(std::mem::size_of::<Error>(), std::mem::size_of::<usize>());
    }

    #[cfg(feature = "axum")]
    #[tokio::test]
    async fn axum_into_response() {
        use axum::response::IntoResponse;
        let response = IntoResponse::into_response(
            Error::rate_limited("slow down", Duration::from_secs(4))
                .with_format(ErrorFormat::Anthropic),
        );
        assert_eq!(response.status(), 429);
        assert_eq!(response.headers()["retry-after"], "4");
        let bytes = axum::body::to_bytes(response.into_body(), 1024)
            .await
            .unwrap();
        let body: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(body["error"]["type"], "rate_limit_error");
    }

    /// With axum's trait in scope, `err.into_response()` is axum's (it used to resolve to an
    /// inherent method with another body type: E0308 in user code).
    #[cfg(feature = "axum")]
    #[test]
    fn method_call_into_response_is_axums() {
        use axum::response::IntoResponse;
        let response: axum::response::Response = Error::from(ErrorKind::NotFound)
            .with_format(ErrorFormat::Anthropic)
            .into_response();
        assert_eq!(response.status(), 404);
    }

    #[test]
    fn into_http_response_uses_chosen_format() {
        let response = Error::from(ErrorKind::NotFound)
            .with_format(ErrorFormat::Anthropic)
            .into_http_response();
        assert_eq!(response.status(), 404);
        assert_eq!(body_json(&response)["error"]["type"], "not_found_error");
        let response = Error::from(ErrorKind::CircuitOpen).into_http_response();
        assert_eq!(response.status(), 503);
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
    }
}
