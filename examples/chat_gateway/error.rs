//! Errors rendered the way the configured format says (Anthropic's by default).

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use palisade::{Error, ErrorFormat};

/// A [`palisade::Error`] with the format to render it in.
#[derive(Debug)]
pub struct ApiError {
    /// The error.
    pub error: Error,
    /// The format.
    pub format: ErrorFormat,
}

impl ApiError {
    /// `error`, rendered in `format`.
    pub fn new(error: Error, format: ErrorFormat) -> Self {
        Self { error, format }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        render(&self.error, self.format)
    }
}

/// Renders `error` as an axum response.
pub fn render(error: &Error, format: ErrorFormat) -> Response {
    error.to_response(format).map(Body::new)
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
