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
///
/// One pointer wide (the bytes are boxed): a [`ResponseBody`] around a body of two words,
/// such as axum's, stays two words, so a response keeps the size the inner service's had
/// and moves without a `memcpy` call. Errors are rare; passing responses move on every
/// request.
#[derive(Debug, Clone, Default)]
pub struct ErrorBody {
    data: Option<Box<Bytes>>,
}

impl ErrorBody {
    /// A body holding `bytes`.
    pub fn new(bytes: impl Into<Bytes>) -> Self {
        let bytes = bytes.into();
        Self {
            data: (!bytes.is_empty()).then(|| Box::new(bytes)),
        }
    }

    /// The bytes not yet polled out of the body.
    pub fn as_bytes(&self) -> &[u8] {
        self.data.as_deref().map_or(&[], |b| b.as_ref())
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
        Poll::Ready(self.data.take().map(|d| Ok(Frame::data(*d))))
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
                Poll::Ready(body.data.take().map(|d| Ok(Frame::data(*d))))
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

#[cfg(test)]
mod tests {
    use std::mem::size_of;

    use http_body_util::BodyExt;
    use http_body_util::combinators::UnsyncBoxBody;

    use super::*;

    /// A passing response must not grow: a boxed body (axum's, hyper's boxed bodies) is
    /// two words, and so is the `ResponseBody` around it, so `Response<ResponseBody<B>>`
    /// stays within LLVM's inline-copy size where `Response<B>` was.
    #[test]
    fn wrapping_a_boxed_body_costs_no_space() {
        type Boxed = UnsyncBoxBody<Bytes, Infallible>;
        assert_eq!(size_of::<ErrorBody>(), size_of::<usize>());
        assert_eq!(size_of::<ResponseBody<Boxed>>(), size_of::<Boxed>());
        assert_eq!(
            size_of::<http::Response<ResponseBody<Boxed>>>(),
            size_of::<http::Response<Boxed>>()
        );
    }

    #[tokio::test]
    async fn error_body_yields_its_bytes_once() {
        let body = ErrorBody::from("no");
        assert_eq!(body.as_bytes(), b"no");
        assert_eq!(body.size_hint().exact(), Some(2));
        let collected = body.collect().await.unwrap().to_bytes();
        assert_eq!(collected, "no");

        let empty = ErrorBody::new(Bytes::new());
        assert!(empty.is_end_stream());
        assert_eq!(empty.as_bytes(), b"");

        let wrapped: ResponseBody<ErrorBody> = ResponseBody::error(ErrorBody::from("x"));
        assert_eq!(wrapped.collect().await.unwrap().to_bytes(), "x");
    }
}
