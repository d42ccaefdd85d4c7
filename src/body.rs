//! Response bodies shared by the server-side layers.
//!
//! A layer that may answer on its own (a rate limiter refusing with 429, a budget check
//! refusing a request) cannot change the inner service's body type, so its responses use
//! [`ResponseBody<B>`]: either the inner body, passed through untouched, or an
//! [`ErrorBody`] holding a rendered [`Error`](crate::Error). This is the tower-http way: no
//! boxing, and the layer still composes under axum (whose `Body::new` accepts any body).
//!
//! ```
//! use bytes::Bytes;
//! use http_body_util::{BodyExt, Full};
//! use palisade::body::{ErrorBody, ResponseBody};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let passed: ResponseBody<Full<Bytes>> = ResponseBody::inner(Full::new(Bytes::from("hi")));
//! assert_eq!(passed.collect().await.unwrap().to_bytes(), "hi");
//!
//! let refused: ResponseBody<Full<Bytes>> = ResponseBody::error(ErrorBody::from("no"));
//! assert_eq!(refused.collect().await.unwrap().to_bytes(), "no");
//! # }
//! ```

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

/// A complete, in-memory body holding a rendered error (or any small fixed payload).
#[derive(Debug, Clone, Default)]
pub struct ErrorBody {
    data: Option<Bytes>,
}

impl ErrorBody {
    /// A body holding `bytes`.
    pub fn new(bytes: impl Into<Bytes>) -> Self {
        let bytes = bytes.into();
        Self {
            data: (!bytes.is_empty()).then_some(bytes),
        }
    }

    /// The bytes not yet polled out of the body.
    pub fn as_bytes(&self) -> &[u8] {
        self.data.as_deref().unwrap_or_default()
    }
}

impl From<Vec<u8>> for ErrorBody {
    fn from(v: Vec<u8>) -> Self {
        Self::new(v)
    }
}

impl From<&'static str> for ErrorBody {
    fn from(s: &'static str) -> Self {
        Self::new(s)
    }
}

impl From<Bytes> for ErrorBody {
    fn from(b: Bytes) -> Self {
        Self::new(b)
    }
}

impl Body for ErrorBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.data.take().map(|d| Ok(Frame::data(d))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.data.as_ref().map_or(0, |d| d.len() as u64))
    }
}

pin_project! {
    /// Either the inner service's body or a body produced by a palisade layer.
    ///
    /// Match on it with the `body` field of either variant.
    #[project = ResponseBodyProj]
    #[derive(Debug)]
    #[allow(missing_docs)] // the fields are the variants' only content

    pub enum ResponseBody<B> {
        /// The inner service's body, untouched.
        Inner { #[pin] body: B },
        /// A body the layer produced itself (for example a rendered error).
        Error { body: ErrorBody },
    }
}

impl<B> ResponseBody<B> {
    /// Wraps the inner service's body.
    pub fn inner(body: B) -> Self {
        ResponseBody::Inner { body }
    }

    /// A layer-produced body.
    pub fn error(body: ErrorBody) -> Self {
        ResponseBody::Error { body }
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project() {
            ResponseBodyProj::Inner { body } => body.poll_frame(cx),
            ResponseBodyProj::Error { body } => {
                Poll::Ready(body.data.take().map(|d| Ok(Frame::data(d))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Inner { body } => body.is_end_stream(),
            ResponseBody::Error { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Inner { body } => body.size_hint(),
            ResponseBody::Error { body } => body.size_hint(),
        }
    }
}
