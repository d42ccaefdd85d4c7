//! The response future of [`SecurityHeaders`](super::SecurityHeaders).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::{HeaderValue, Response};
use pin_project_lite::pin_project;

use super::builder::Policy;

pin_project! {
    /// Waits for the inner service, then applies the security headers to its response.
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        policy: Arc<Policy>,
        hsts: bool,
        csp: Option<HeaderValue>,
    }
}

impl<F> ResponseFuture<F> {
    pub(crate) fn new(inner: F, policy: Arc<Policy>, hsts: bool, csp: Option<HeaderValue>) -> Self {
        Self {
            inner,
            policy,
            hsts,
            csp,
        }
    }
}

impl<F> std::fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("hsts", &self.hsts)
            .finish_non_exhaustive()
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<B>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut response = ready!(this.inner.poll(cx))?;
        this.policy
            .apply(response.headers_mut(), *this.hsts, this.csp.take());
        Poll::Ready(Ok(response))
    }
}
