//! The response future of `RateLimit`, and the wait for an asynchronous store.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::header::Entry;
use http::{HeaderName, HeaderValue, Request, Response};
use pin_project_lite::pin_project;
use tower_service::Service;

use super::shared::{HeaderBlock, Outcome, PendingList, Shared};
use crate::body::ResponseBody;
use crate::rate_limit::store::Store;

/// Waits for an asynchronous store before calling the inner service.
pub(super) fn wait<S, St, B, ResBody>(
    inner: &mut S,
    shared: &Arc<Shared<St>>,
    check: St::CheckFuture,
    pending: PendingList,
    req: Request<B>,
) -> ResponseFuture<S, St, B>
where
    S: Service<Request<B>, Response = Response<ResBody>> + Clone,
    St: Store,
{
    // The inner service was made ready by `poll_ready`; keep that one for this call.
    let clone = inner.clone();
    let inner = std::mem::replace(inner, clone);
    ResponseFuture {
        state: State::Checking {
            waiting: Box::new(Waiting {
                check: Box::pin(check),
                parts: Some(WaitingParts {
                    req,
                    inner,
                    pending,
                    shared: shared.clone(),
                }),
            }),
        },
    }
}

/// What an asynchronous check holds until the store answers: one box, so every state of
/// the response future is one pointer beside the inner future (the common synchronous
/// path then moves a future no wider than the inner one needs).
pub(super) struct Waiting<S, St: Store, B> {
    pub(super) check: Pin<Box<St::CheckFuture>>,
    pub(super) parts: Option<WaitingParts<S, St, B>>,
}

pub(super) struct WaitingParts<S, St, B> {
    pub(super) req: Request<B>,
    pub(super) inner: S,
    pub(super) pending: PendingList,
    pub(super) shared: Arc<Shared<St>>,
}

pin_project! {
    /// The response future of [`RateLimit`].
    pub struct ResponseFuture<S, St, B>
    where
        S: Service<Request<B>>,
        St: Store,
    {
        #[pin]
        state: State<S, St, B>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, St, B>
    where
        S: Service<Request<B>>,
        St: Store,
    {
        Checking {
            waiting: Box<Waiting<S, St, B>>,
        },
        // Admitted with nothing to add to the response (the common case).
        Passing {
            #[pin]
            fut: S::Future,
        },
        // Admitted, with headers to add (a boxed slice: the list's own allocation, two
        // words in the future).
        Calling {
            #[pin]
            fut: S::Future,
            headers: Box<[(HeaderName, HeaderValue)]>,
        },
        Refused {
            response: Option<Box<Response<crate::body::ErrorBody>>>,
        },
    }
}

impl<S, St, B> ResponseFuture<S, St, B>
where
    S: Service<Request<B>>,
    St: Store,
{
    #[inline]
    pub(super) fn calling(fut: S::Future, headers: HeaderBlock) -> Self {
        if headers.is_empty() {
            return Self::passing(fut);
        }
        Self {
            state: State::Calling {
                fut,
                headers: headers.into_boxed_slice(),
            },
        }
    }

    #[inline]
    pub(super) fn passing(fut: S::Future) -> Self {
        Self {
            state: State::Passing { fut },
        }
    }

    pub(super) fn refused(response: Box<Response<crate::body::ErrorBody>>) -> Self {
        Self {
            state: State::Refused {
                response: Some(response),
            },
        }
    }
}

impl<S, St, B> fmt::Debug for ResponseFuture<S, St, B>
where
    S: Service<Request<B>>,
    St: Store,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<S, St, B, ResBody> Future for ResponseFuture<S, St, B>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
    St: Store,
{
    type Output = Result<Response<ResponseBody<ResBody>>, S::Error>;

    #[inline]
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // The common state first, in a small frame; the others are out of line.
        if let StateProj::Passing { fut } = self.as_mut().project().state.project() {
            let response = ready!(fut.poll(cx))?;
            return Poll::Ready(Ok(response.map(ResponseBody::inner)));
        }
        self.poll_other(cx)
    }
}

/// The inner response with the layer's body type and its headers appended.
#[inline]
pub(super) fn finish<B>(
    response: Response<B>,
    headers: &mut Box<[(HeaderName, HeaderValue)]>,
) -> Response<ResponseBody<B>> {
    let mut response = response.map(ResponseBody::inner);
    let map = response.headers_mut();
    // The block holds each name's values together: one lookup per name. (Reserving room
    // first measured slower than letting the map grow as they go in.)
    let mut headers = std::mem::take(headers).into_vec().into_iter().peekable();
    while let Some((name, value)) = headers.next() {
        // A map at its size limit (an inner service's, with thousands of names) goes
        // without the names that no longer fit: never a panic.
        let mut entry = match map.try_entry(name) {
            Ok(Entry::Occupied(mut entry)) => {
                entry.append(value);
                entry
            }
            Ok(Entry::Vacant(slot)) => match slot.try_insert_entry(value) {
                Ok(entry) => entry,
                Err(_) => continue,
            },
            Err(_) => continue,
        };
        while let Some((_, value)) = headers.next_if(|(next, _)| next == entry.key()) {
            entry.append(value);
        }
    }
    response
}

impl<S, St, B, ResBody> ResponseFuture<S, St, B>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
    St: Store,
{
    /// Waiting for the store, or refused.
    #[inline(never)]
    pub(super) fn poll_other(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Response<ResponseBody<ResBody>>, S::Error>> {
        loop {
            let mut this = self.as_mut().project();
            let next = match this.state.as_mut().project() {
                StateProj::Checking { waiting } => {
                    let decision = ready!(waiting.check.as_mut().poll(cx));
                    let Some(parts) = waiting.parts.take() else {
                        unreachable!("the request is taken once");
                    };
                    let WaitingParts {
                        mut req,
                        mut inner,
                        pending,
                        shared,
                    } = parts;
                    match shared.resolve(&pending, decision) {
                        Outcome::Admit(headers, reservation) => {
                            if let Some(r) = reservation {
                                req.extensions_mut().insert(r);
                            }
                            if headers.is_empty() {
                                State::Passing {
                                    fut: inner.call(req),
                                }
                            } else {
                                State::Calling {
                                    fut: inner.call(req),
                                    headers: headers.into_boxed_slice(),
                                }
                            }
                        }
                        Outcome::Refuse(response) => State::Refused {
                            response: Some(response),
                        },
                    }
                }
                StateProj::Passing { fut } => {
                    let response = ready!(fut.poll(cx))?;
                    return Poll::Ready(Ok(response.map(ResponseBody::inner)));
                }
                StateProj::Calling { fut, headers } => {
                    let response = ready!(fut.poll(cx))?;
                    return Poll::Ready(Ok(finish(response, headers)));
                }
                StateProj::Refused { response } => {
                    let response = response
                        .take()
                        .unwrap_or_else(|| unreachable!("polled after completion"));
                    return Poll::Ready(Ok((*response).map(ResponseBody::error)));
                }
            };
            this.state.set(next);
        }
    }
}
