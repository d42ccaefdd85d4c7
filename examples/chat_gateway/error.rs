//! Errors rendered the way the configured format says (Anthropic's by default).

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use palisade::{Error, ErrorFormat};

/// A [`palisade::Error`] with the format to render it in.
#[derive(Debug)]
pub struct ApiError {
    /// The error.
    pub error: Error,
    /// The format.
    pub format: ErrorFormat,
    /// A status that no error kind maps to (405, 408), replacing the kind's.
    pub status: Option<StatusCode>,
}

impl ApiError {
    /// `error`, rendered in `format`.
    pub fn new(error: Error, format: ErrorFormat) -> Self {
        Self {
            error,
            format,
            status: None,
        }
    }

    /// Answers with `status` instead of the kind's.
    pub fn with_status(mut self, status: StatusCode) -> Self {
        self.status = Some(status);
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match self.status {
            Some(status) => render_with_status(&self.error, self.format, status),
            None => render(&self.error, self.format),
        }
    }
}

/// Renders `error` as an axum response.
pub fn render(error: &Error, format: ErrorFormat) -> Response {
    error.to_response(format).map(Body::new)
}

/// Renders `error` with `status` in place of its kind's (for 405 and 408, which no error
/// kind names); a problem document's `status` and `title` say the same.
pub fn render_with_status(error: &Error, format: ErrorFormat, status: StatusCode) -> Response {
    let mut res = render(error, format);
    *res.status_mut() = status;
    if format == ErrorFormat::ProblemJson {
        let doc = serde_json::json!({
            "type": format!("{}{:?}", palisade::error::PROBLEM_TYPE_BASE, error.kind()),
            "title": status.canonical_reason().unwrap_or("Client error"),
            "status": status.as_u16(),
            "detail": error.public_message(),
            "kind": error.kind().as_str(),
        });
        *res.body_mut() = Body::from(doc.to_string());
        res.headers_mut().remove(http::header::CONTENT_LENGTH);
    }
    res
}

/// A handler's result.
pub type ApiResult<T> = Result<T, ApiError>;

/// Turns a [`palisade::Error`] into an [`ApiError`] in a format.
pub trait WithFormat<T> {
    /// Attaches the format.
    fn fmt_err(self, format: ErrorFormat) -> ApiResult<T>;
}

impl<T> WithFormat<T> for Result<T, Error> {
    fn fmt_err(self, format: ErrorFormat) -> ApiResult<T> {
        self.map_err(|e| ApiError::new(e, format))
    }
}
