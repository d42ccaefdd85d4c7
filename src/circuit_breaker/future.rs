//! The breaker's response futures.

use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http::Response;
use pin_project_lite::pin_project;

use super::state::Permit;
use crate::BoxError;
use crate::ErrorFormat;
use crate::body::ResponseBody;
use crate::classify::Classify;

/// The message of a refusal (the breaker's name is in the logs, not the response).
pub(crate) const REFUSED: &str =
    "the upstream is failing and its circuit breaker is open; retry later";

pin_project! {
    #[project = KindProj]
    enum Kind<F> {
        Called {
            #[pin]
            future: F,
            permit: Option<Permit>,
        },
        Refused {
            retry_after: Duration,
        },
    }
}

pin_project! {
    /// The future of [`CircuitBreaker`](super::CircuitBreaker) in its default mode: the
    /// inner response, the inner error boxed, or a
    /// [`CircuitOpen`](crate::ErrorKind::CircuitOpen) [`Error`](crate::Error).
    ///
    /// Dropping it before it completes (a cancelled call) gives a half-open probe slot
    /// back.
    pub struct ResponseFuture<F, C> {
        #[pin]
        kind: Kind<F>,
        classifier: C,
    }
}

impl<F, C> ResponseFuture<F, C> {
    pub(crate) fn called(future: F, permit: Permit, classifier: C) -> Self {
        Self {
            kind: Kind::Called {
                future,
                permit: Some(permit),
            },
            classifier,
        }
    }

    pub(crate) fn refused(retry_after: Duration, classifier: C) -> Self {
        Self {
            kind: Kind::Refused { retry_after },
            classifier,
        }
    }
}

impl<F, C, T, E> Future for ResponseFuture<F, C>
where
    F: Future<Output = Result<T, E>>,
    C: Classify<T, E>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        match this.kind.project() {
            KindProj::Called { future, permit } => {
                let result = ready!(future.poll(cx));
                if let Some(permit) = permit.take() {
                    permit.complete(this.classifier.classify(result.as_ref()).outcome);
                }
                Poll::Ready(result.map_err(Into::into))
            }
            KindProj::Refused { retry_after } => {
                Poll::Ready(Err(crate::Error::circuit_open(REFUSED, *retry_after).into()))
            }
        }
    }
}

pin_project! {
    /// The future of [`CircuitBreaker`](super::CircuitBreaker) in its HTTP-facing mode:
    /// a refusal is a rendered response (503 with `retry-after` in RFC 9457 format, 529
    /// `overloaded_error` in Anthropic format).
    pub struct RespondFuture<F, C, B> {
        #[pin]
        kind: Kind<F>,
        classifier: C,
        format: ErrorFormat,
        _body: PhantomData<fn() -> B>,
    }
}

impl<F, C, B> RespondFuture<F, C, B> {
    pub(crate) fn called(future: F, permit: Permit, classifier: C, format: ErrorFormat) -> Self {
        Self {
            kind: Kind::Called {
                future,
                permit: Some(permit),
            },
            classifier,
            format,
            _body: PhantomData,
        }
    }

    pub(crate) fn refused(retry_after: Duration, classifier: C, format: ErrorFormat) -> Self {
        Self {
            kind: Kind::Refused { retry_after },
            classifier,
            format,
            _body: PhantomData,
        }
    }
}

impl<F, C, B, E> Future for RespondFuture<F, C, B>
where
    F: Future<Output = Result<Response<B>, E>>,
    C: Classify<Response<B>, E>,
{
    type Output = Result<Response<ResponseBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        match this.kind.project() {
            KindProj::Called { future, permit } => {
                let result = ready!(future.poll(cx));
                if let Some(permit) = permit.take() {
                    permit.complete(this.classifier.classify(result.as_ref()).outcome);
                }
                Poll::Ready(result.map(|r| r.map(ResponseBody::inner)))
            }
            KindProj::Refused { retry_after } => {
                Poll::Ready(Ok(crate::Error::circuit_open(REFUSED, *retry_after)
                    .to_response(*this.format)
                    .map(ResponseBody::error)))
            }
        }
    }
}
