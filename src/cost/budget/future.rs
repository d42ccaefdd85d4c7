//! The response future of [`BudgetService`](super::BudgetService) and
//! [`BudgetStart`](super::BudgetStart).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::Response;
use pin_project_lite::pin_project;

use crate::body::ResponseBody;

/// A boxed future answering with the layer's response.
type Boxed<B, E> = Pin<Box<dyn Future<Output = Result<Response<ResponseBody<B>>, E>> + Send>>;

pin_project! {
    /// The response future of [`BudgetService`](super::BudgetService) and
    /// [`BudgetStart`](super::BudgetStart): the inner service's own future when the
    /// request has nothing to reserve, a boxed one when it reads the body or asks the
    /// store first.
    ///
    /// - `F` is the inner service's future (`S::Future`), polled in place when nothing is
    ///   reserved: this future is [`Unpin`] when `F` is, so pin it (`Box::pin`,
    ///   `std::pin::pin!`) to poll it by hand otherwise.
    /// - `B` is the inner service's response body; the response is a
    ///   [`ResponseBody<B>`](crate::body::ResponseBody): that body, or the layer's own
    ///   error body for a refusal.
    /// - `E` is the inner service's error, passed through.
    pub struct ResponseFuture<F, B, E> {
        #[pin]
        kind: Kind<F, B, E>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, B, E> {
        Inner { #[pin] future: F },
        Boxed { future: Boxed<B, E> },
    }
}

impl<F, B, E> ResponseFuture<F, B, E> {
    /// The inner service's future, its response passed through.
    pub(super) fn inner(future: F) -> Self {
        Self {
            kind: Kind::Inner { future },
        }
    }

    /// A future that reads the body or asks the store before (or instead of) the call.
    pub(super) fn boxed<Fut>(future: Fut) -> Self
    where
        Fut: Future<Output = Result<Response<ResponseBody<B>>, E>> + Send + 'static,
    {
        Self {
            kind: Kind::Boxed {
                future: Box::pin(future),
            },
        }
    }
}

impl<F, B, E> fmt::Debug for ResponseFuture<F, B, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F, B, E> Future for ResponseFuture<F, B, E>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<ResponseBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Inner { future } => future
                .poll(cx)
                .map(|r| r.map(|res| res.map(ResponseBody::inner))),
            KindProj::Boxed { future } => future.as_mut().poll(cx),
        }
    }
}
