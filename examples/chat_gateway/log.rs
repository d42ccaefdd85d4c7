//! One log line per request, written when the response body ends (so a stream's line has
//! its whole duration): id, user, method, route, status, duration, whether the body was
//! sent whole, and the cost (from `x-palisade-cost-usd` on small JSON answers, or the
//! stream's closing `: palisade-cost` comment). Never a key, never message content.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::response::Response;
use http::Method;
use http_body::{Frame, SizeHint};
use palisade::cost::X_PALISADE_COST_USD;
use pin_project_lite::pin_project;

/// The caller's name, put in the response extensions by authentication for this line.
#[derive(Debug, Clone)]
pub struct LoggedUser(pub Arc<str>);

/// What the line says, filled in as the response goes.
struct Line {
    start: Instant,
    id: String,
    user: Option<Arc<str>>,
    method: Method,
    route: String,
    status: u16,
    cost: Option<String>,
}

impl Line {
    fn emit(&self, complete: bool) {
        tracing::info!(
            target: "chat_gateway::request",
            request_id = %self.id,
            user = self.user.as_deref().unwrap_or("-"),
            method = %self.method,
            route = %self.route,
            status = self.status,
            duration_us = u64::try_from(self.start.elapsed().as_micros()).unwrap_or(u64::MAX),
            complete,
            cost_usd = self.cost.as_deref().unwrap_or("-"),
            "request"
        );
    }
}

/// The request log as a tower layer, outside the router: every answer, routed or not, gets
/// its line. With the request log filtered out (`RUST_LOG=warn`), requests pass through
/// untouched.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestLogLayer;

impl<S> tower::Layer<S> for RequestLogLayer {
    type Service = RequestLog<S>;

    fn layer(&self, inner: S) -> RequestLog<S> {
        RequestLog { inner }
    }
}

/// The service [`RequestLogLayer`] builds.
#[derive(Debug, Clone)]
pub struct RequestLog<S> {
    inner: S,
}

impl<S> tower::Service<Request> for RequestLog<S>
where
    S: tower::Service<Request, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = LogFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let pending = tracing::enabled!(target: "chat_gateway::request", tracing::Level::INFO)
            .then(|| Pending {
                start: Instant::now(),
                id: crate::app::request_id(&req),
                method: req.method().clone(),
                route: req.uri().path().to_owned(),
            });
        LogFuture {
            inner: self.inner.call(req),
            pending,
        }
    }
}

/// What the line knows before the response.
struct Pending {
    start: Instant,
    id: String,
    method: Method,
    route: String,
}

pin_project! {
    /// The response future of [`RequestLog`]: wraps the body so that the line is written
    /// when it ends.
    pub struct LogFuture<F> {
        #[pin]
        inner: F,
        pending: Option<Pending>,
    }
}

impl<F, E> Future for LogFuture<F>
where
    F: Future<Output = Result<Response, E>>,
{
    type Output = Result<Response, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let res = ready!(this.inner.poll(cx))?;
        let Some(p) = this.pending.take() else {
            return Poll::Ready(Ok(res));
        };
        let line = Line {
            start: p.start,
            id: p.id,
            user: res.extensions().get::<LoggedUser>().map(|u| u.0.clone()),
            method: p.method,
            route: p.route,
            status: res.status().as_u16(),
            cost: res
                .headers()
                .get(X_PALISADE_COST_USD)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
        };
        Poll::Ready(Ok(res.map(|body| {
            Body::new(LoggedBody {
                inner: body,
                line: Some(line),
            })
        })))
    }
}

pin_project! {
    /// The response body, writing the line when it ends or is dropped.
    struct LoggedBody {
        #[pin]
        inner: Body,
        line: Option<Line>,
    }

    impl PinnedDrop for LoggedBody {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(line) = this.line.take() {
                // A body whose length says it is done is not polled to its end.
                line.emit(http_body::Body::is_end_stream(&*this.inner));
            }
        }
    }
}

const COST_COMMENT: &[u8] = b": palisade-cost usd=";

impl http_body::Body for LoggedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                // The meter sends the cost comment as a small frame of its own.
                if let (Some(data), Some(line)) = (frame.data_ref(), this.line.as_mut()) {
                    if data.len() < 512 {
                        if let Some(at) = memchr::memmem::find(data, COST_COMMENT) {
                            let rest = &data[at + COST_COMMENT.len()..];
                            let end = rest
                                .iter()
                                .position(|b| b.is_ascii_whitespace())
                                .unwrap_or(rest.len());
                            line.cost = std::str::from_utf8(&rest[..end]).ok().map(str::to_owned);
                        }
                    }
                }
            }
            Poll::Ready(None) => {
                if let Some(line) = this.line.take() {
                    line.emit(true);
                }
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
