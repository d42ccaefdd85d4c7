//! `RateLimit`, the service: decides each request before calling the inner service.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower_service::Service;

use super::future::{ResponseFuture, wait};
use super::limiter::RateLimiter;
use super::shared::{Lean, Outcome, PendingList, Shared};
use crate::body::ResponseBody;
use crate::rate_limit::store::{MemoryStore, Store};

/// The rate-limiting service built by [`RateLimitLayer`](super::RateLimitLayer).
pub struct RateLimit<S, St = MemoryStore> {
    pub(super) inner: S,
    pub(super) shared: Arc<Shared<St>>,
}

impl<S: Clone, St> Clone for RateLimit<S, St> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S: fmt::Debug, St> fmt::Debug for RateLimit<S, St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimit")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S, St: Store> RateLimit<S, St> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// The admin handle.
    pub fn limiter(&self) -> RateLimiter<St> {
        RateLimiter {
            shared: self.shared.clone(),
        }
    }
}

impl<S, St, B, ResBody> Service<Request<B>> for RateLimit<S, St>
where
    S: Service<Request<B>, Response = Response<ResBody>> + Clone,
    St: Store,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, St, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    #[inline]
    fn call(&mut self, req: Request<B>) -> Self::Future {
        if let Some(cost) = self.shared.plain_cost {
            // The request stays with the caller and is read only by inlined code, so it
            // moves into the inner call without a copy; the decision comes back in
            // registers.
            match self.shared.decide_plain(&req, cost) {
                Lean::Pass => return ResponseFuture::passing(self.inner.call(req)),
                Lean::Refuse(response) => return ResponseFuture::refused(response),
                Lean::General => {}
            }
        }
        self.call_general(req)
    }
}

impl<S, St: Store> RateLimit<S, St> {
    /// Every layer but a plain one-rule one (see `CompiledRule::plain_cost`), and a plain
    /// one whose store cannot answer at once.
    #[inline(never)]
    pub(super) fn call_general<B, ResBody>(
        &mut self,
        mut req: Request<B>,
    ) -> ResponseFuture<S, St, B>
    where
        S: Service<Request<B>, Response = Response<ResBody>> + Clone,
    {
        // The request stays in this frame until the inner call: no helper takes it by
        // value, so it is not copied on the way.
        let outcome = if self.shared.rules.len() == 1 {
            // A layer with one rule: no lists are built for it.
            let shared = &self.shared;
            let Some(pending) = shared.pending_for(0, &shared.rules[0], &req) else {
                return ResponseFuture::passing(self.inner.call(req));
            };
            let item = shared.item(&pending);
            match shared.store.check_one_now(&item) {
                Some(Ok(d)) => {
                    let admitted = d.debited || item.shadow;
                    shared.outcome(std::slice::from_ref(&pending), admitted, &[d])
                }
                Some(Err(e)) => shared.store_failed(e),
                None => match shared.store.check_now(std::slice::from_ref(&item)) {
                    Some(decision) => shared.resolve(std::slice::from_ref(&pending), decision),
                    None => {
                        let check = shared.store.check(std::slice::from_ref(&item));
                        let mut list = PendingList::new();
                        list.push(pending);
                        return wait(&mut self.inner, &self.shared, check, list, req);
                    }
                },
            }
        } else {
            let pending = self.shared.pending(&req);
            if pending.is_empty() {
                return ResponseFuture::passing(self.inner.call(req));
            }
            let items = self.shared.items(&pending);
            match self.shared.store.check_now(&items) {
                Some(decision) => {
                    drop(items);
                    self.shared.resolve(&pending, decision)
                }
                None => {
                    let check = self.shared.store.check(&items);
                    drop(items);
                    return wait(&mut self.inner, &self.shared, check, pending, req);
                }
            }
        };
        match outcome {
            Outcome::Admit(headers, reservation) => {
                if let Some(r) = reservation {
                    req.extensions_mut().insert(r);
                }
                ResponseFuture::calling(self.inner.call(req), headers)
            }
            Outcome::Refuse(response) => ResponseFuture::refused(response),
        }
    }
}
