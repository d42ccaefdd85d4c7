//! The split form of [`BudgetLayer`]: [`BudgetStartLayer`] starts a request's reservation
//! and lets it go on at once; [`BudgetGateLayer`], lower in the stack, waits for the
//! store's answer before the upstream call. What lies between them (a rate limiter, its
//! own store call, authorization, validation) runs while the reservation is in flight, so
//! a request pays one store round trip of latency instead of two in a row.
//!
//! ```
//! use std::convert::Infallible;
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use palisade::cost::budget::{Budget, BudgetLayer, BudgetReservation, Period, Scope};
//! use palisade::cost::{Money, Principal};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let budgets = BudgetLayer::builder()
//!     .budget(Budget::new("daily", Scope::User, Period::Day, Money::parse_dollars("5").unwrap()))
//!     .build()
//!     .unwrap();
//! let (start, gate) = budgets.split();
//! let svc = ServiceBuilder::new()
//!     .layer(start)
//!     // ... a rate limiter, authorization: they run while the reservation is in flight
//!     .layer(gate)
//!     .service(service_fn(|req: http::Request<_>| async move {
//!         // the upstream call: reached only with a granted reservation
//!         assert!(req.extensions().get::<BudgetReservation>().is_some());
//!         Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::new())))
//!     }));
//! let mut req = http::Request::post("/v1/messages")
//!     .body(Full::new(Bytes::from(r#"{"model":"claude-3-5-haiku-20241022","max_tokens":100}"#)))
//!     .unwrap();
//! req.extensions_mut().insert(Principal::new("ann")); // set by your authentication
//! assert_eq!(svc.oneshot(req).await.unwrap().status(), 200);
//! # }
//! ```

use std::collections::VecDeque;
use std::fmt;
use std::future::{Future, poll_fn};
use std::pin::{Pin, pin};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use tower_layer::Layer;
use tower_service::Service;

use super::estimate::{BudgetEstimate, estimate};
use super::future::ResponseFuture;
use super::layer::{
    BudgetLayer, BudgetReservation, BudgetService, Outcome, Plan, Prepared, Reserving, Shared,
    check, larger_than_budget, metered_method, pass, plan, prepare, refusal, reserve_and_pass,
};
use super::store::Charge;
use crate::body::ResponseBody;
use crate::cost::pricing::Money;
use crate::error::Error;

tokio::task_local! {
    /// The pending reservations of the request being served, for gates reached through a
    /// request built anew below the start (a handler's own upstream request).
    static PENDING: Scoped;
}

/// A start's pending reservation on its task, and those of the starts around it (each
/// split layer's gate looks for its own).
#[derive(Clone)]
struct Scoped {
    pending: PendingBudget,
    outer: Option<Arc<Scoped>>,
}

impl BudgetLayer {
    /// The split form of this layer, for stacks where another store call (a rate
    /// limiter's) sits between the request's arrival and its upstream call.
    ///
    /// Place the [`BudgetStartLayer`] above that call and the [`BudgetGateLayer`] just
    /// above the upstream (above the cost meter, where this layer would go). The start
    /// reads the body (while the layers below run), begins the reservation and passes the
    /// request on at once; the gate waits for the store's answer and lets the request
    /// through with its [`BudgetReservation`] or answers the refusal this layer would
    /// give. Both share this layer's budgets, store and per-subject limits.
    ///
    /// - A request the layers between refuse (401, 429, a bad body), or whose client goes
    ///   away before the gate or while the gate still reads its body, has its reservation
    ///   released exactly once, never charged.
    /// - The gate lets a request through on its start's reservation only when that covers
    ///   what this layer would reserve for the request as it reaches the gate (the same
    ///   accounts, at least the amount). Otherwise (the start reserved nothing: a body it
    ///   could not read, larger than `max_body` or not JSON; a second upstream call of the
    ///   same request, such as a fallback; a request a handler built anew for other
    ///   accounts or a dearer model) the start's reservation is released and the gate
    ///   checks the request itself, as this layer does. A refusal works the same way: the
    ///   store's refusal of the start is the gate's answer only for a request needing at
    ///   least as much on the same accounts, and a request the start refused on its body
    ///   alone (a bad field, an unpriced model, more than a whole budget) is judged again on
    ///   the body that reaches the gate. So nothing reaches the upstream unchecked, nothing
    ///   is refused that this layer would let through, and what the split saves is only
    ///   the wait.
    /// - The gate is this layer itself: [`BudgetGateLayer`] and this [`BudgetLayer`] build
    ///   the same service, which waits for a pending reservation of its own layer wherever
    ///   it meets one. Until one of them wraps a service, the start refuses every request
    ///   with 500 and logs why: a start without a gate cannot send anything upstream
    ///   unchecked.
    /// - The gate finds the pending reservation in the request extensions
    ///   ([`PendingBudget`]) or, for a request a handler built anew on the same task,
    ///   from the request being served (each split layer's gate finds its own start's,
    ///   split layers nested or not). A handler that calls the upstream from a task of
    ///   its own gets the plain check at the gate (and the start's reservation released).
    pub fn split(&self) -> (BudgetStartLayer, BudgetGateLayer) {
        (
            BudgetStartLayer {
                shared: Arc::clone(&self.shared),
            },
            BudgetGateLayer {
                shared: Arc::clone(&self.shared),
            },
        )
    }
}

/// The upper half of [`BudgetLayer::split`]: starts each request's reservation without
/// waiting for it.
#[derive(Debug, Clone)]
#[must_use]
pub struct BudgetStartLayer {
    shared: Arc<Shared>,
}

/// The lower half of [`BudgetLayer::split`]: waits for the request's reservation before
/// the upstream call. It builds the same [`BudgetService`] as the [`BudgetLayer`] it came
/// from: that service waits for a pending reservation of its own layer wherever it meets
/// one, and checks every other request itself.
#[derive(Debug, Clone)]
#[must_use]
pub struct BudgetGateLayer {
    shared: Arc<Shared>,
}

impl<S> Layer<S> for BudgetStartLayer {
    type Service = BudgetStart<S>;

    fn layer(&self, inner: S) -> BudgetStart<S> {
        BudgetStart {
            inner,
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<S> Layer<S> for BudgetGateLayer {
    type Service = BudgetService<S>;

    fn layer(&self, inner: S) -> BudgetService<S> {
        BudgetLayer {
            shared: Arc::clone(&self.shared),
        }
        .layer(inner)
    }
}

/// The service built by [`BudgetStartLayer`]. Its inner service receives the request
/// with a [`StartBody`] (the body as it arrives, while the start reads it too).
#[derive(Debug, Clone)]
pub struct BudgetStart<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> BudgetStart<S> {
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
}

/// What the start decided for a request, as the gate takes it.
enum Decision {
    /// Granted, on the body the start read (`None`: the request's `BudgetEstimate`).
    Granted(BudgetReservation, Option<Bytes>),
    /// Refused before any store call (the body, or more than a whole budget): the gate
    /// judges the request as it reaches it, as the plain layer does.
    Refused,
    /// The store refused `amount` on `charges` (or failed, and the layer fails closed):
    /// final for a request at the gate needing at least that on the same accounts.
    StoreRefused {
        err: Error,
        charges: Arc<[Charge]>,
        amount: Money,
        read: Option<Bytes>,
    },
    /// The store failed and the layer fails open.
    Pass,
    /// Nothing reserved: the gate checks the request itself.
    CheckAtGate,
}

enum State {
    Waiting(Option<Waker>),
    Ready(Decision),
    /// The gate took the decision (a granted reservation now belongs to the request).
    Taken,
    /// The start is gone (the request was answered or abandoned).
    Closed,
}

/// A request's reservation while the start waits for the store, in the request
/// extensions between [`BudgetStartLayer`] and [`BudgetGateLayer`].
#[derive(Clone)]
pub struct PendingBudget {
    cell: Arc<Mutex<State>>,
    /// The layer that started it (its shared state's address).
    owner: usize,
}

impl fmt::Debug for PendingBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &*self.lock() {
            State::Waiting(_) => "waiting",
            State::Ready(_) => "ready",
            State::Taken => "taken",
            State::Closed => "closed",
        };
        f.debug_struct("PendingBudget")
            .field("state", &state)
            .finish()
    }
}

fn owner(shared: &Arc<Shared>) -> usize {
    Arc::as_ptr(shared) as usize
}

impl PendingBudget {
    fn new(shared: &Arc<Shared>) -> Self {
        Self {
            cell: Arc::new(Mutex::new(State::Waiting(None))),
            owner: owner(shared),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.cell.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn deliver(&self, decision: Decision) {
        let mut state = self.lock();
        match &mut *state {
            State::Waiting(waker) => {
                let waker = waker.take();
                *state = State::Ready(decision);
                drop(state);
                if let Some(w) = waker {
                    w.wake();
                }
            }
            _ => {
                drop(state);
                if let Decision::Granted(r, _) = decision {
                    r.refund(); // nobody will take it
                }
            }
        }
    }

    /// The start is done with the request: a decision the gate did not take is released.
    fn close(&self) {
        let previous = {
            let mut state = self.lock();
            match &*state {
                State::Taken => return,
                _ => std::mem::replace(&mut *state, State::Closed),
            }
        };
        if let State::Ready(Decision::Granted(r, _)) = previous {
            tracing::debug!(target: "palisade::cost::budget", amount = %r.amount(),
                "request answered before its budget gate: reservation released");
            r.refund();
        }
    }

    async fn take(&self) -> Decision {
        poll_fn(|cx| {
            let mut state = self.lock();
            match &mut *state {
                State::Waiting(waker) => {
                    *waker = Some(cx.waker().clone());
                    Poll::Pending
                }
                State::Ready(_) => match std::mem::replace(&mut *state, State::Taken) {
                    State::Ready(d) => Poll::Ready(d),
                    _ => unreachable!("matched Ready above"),
                },
                State::Taken | State::Closed => Poll::Ready(Decision::CheckAtGate),
            }
        })
        .await
    }
}

pin_project_lite::pin_project! {
    /// The request body below a [`BudgetStart`]: the body as it arrives, while the start
    /// reads it (up to the layer's `max_body`) to estimate the request's cost.
    pub struct StartBody<B: Body> {
        #[pin]
        inner: Inner<B>,
    }
}

pin_project_lite::pin_project! {
    #[project = InnerProj]
    enum Inner<B: Body> {
        // The body, untouched (nothing to estimate from it).
        Plain { #[pin] body: B },
        // Shared with the start while it reads.
        Tee { tee: Arc<Mutex<Tee<B>>> },
    }
}

impl<B: Body> StartBody<B> {
    fn plain(body: B) -> Self {
        Self {
            inner: Inner::Plain { body },
        }
    }
}

/// A body made whole (the gate's own check rebuilds the body it read).
impl<B: Body + From<Bytes>> From<Bytes> for StartBody<B> {
    fn from(bytes: Bytes) -> Self {
        Self::plain(B::from(bytes))
    }
}

impl<B: Body> fmt::Debug for StartBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StartBody").finish_non_exhaustive()
    }
}

/// The body shared by the start (reading it) and the layers below (reading what the start
/// has read, then the rest).
struct Tee<B: Body> {
    body: Pin<Box<B>>,
    /// Frames the start has read and the layers below have not.
    frames: VecDeque<Frame<B::Data>>,
    error: Option<B::Error>,
    ended: bool,
    /// The start still reads the body.
    filling: bool,
    /// A reader below waiting for the start.
    waker: Option<Waker>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<B: Body> Body for StartBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        match self.project().inner.project() {
            InnerProj::Plain { body } => body.poll_frame(cx),
            InnerProj::Tee { tee } => {
                let mut t = lock(tee);
                if let Some(frame) = t.frames.pop_front() {
                    return Poll::Ready(Some(Ok(frame)));
                }
                if let Some(e) = t.error.take() {
                    t.ended = true;
                    return Poll::Ready(Some(Err(e)));
                }
                if t.ended {
                    return Poll::Ready(None);
                }
                if t.filling {
                    t.waker = Some(cx.waker().clone());
                    return Poll::Pending;
                }
                t.body.as_mut().poll_frame(cx)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Plain { body } => body.is_end_stream(),
            Inner::Tee { tee } => {
                let t = lock(tee);
                t.frames.is_empty()
                    && t.error.is_none()
                    && (t.ended || (!t.filling && t.body.is_end_stream()))
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Plain { body } => body.size_hint(),
            Inner::Tee { tee } => {
                let t = lock(tee);
                if t.frames.is_empty() && t.error.is_none() && !t.ended && !t.filling {
                    t.body.size_hint()
                } else {
                    SizeHint::default()
                }
            }
        }
    }
}

enum Phase<B: Body> {
    /// Reading the body: what has been read, and its length.
    Reading {
        tee: Arc<Mutex<Tee<B>>>,
        chunks: Vec<Bytes>,
        len: usize,
    },
    /// The store call; dropped unanswered, it releases what the store grants.
    Reserving(Reserving),
    Done,
}

/// The start's work for one request, polled beside the inner service's future; dropped
/// (answered or abandoned), it releases what the gate did not take.
struct Driver<B: Body> {
    shared: Arc<Shared>,
    pending: PendingBudget,
    charges: Option<Vec<Charge>>,
    /// The body estimated, for the gate to know it again.
    read: Option<Bytes>,
    phase: Phase<B>,
}

enum Read {
    Complete,
    /// Larger than `max_body`, or failed: the gate checks the request itself.
    Unread,
}

impl<B> Driver<B>
where
    B: Body<Data = Bytes>,
{
    fn begin(&mut self, amount: Money) {
        let charges: Arc<[Charge]> = self.charges.take().unwrap_or_default().into();
        if larger_than_budget(&charges, amount).is_some() {
            self.finish(Decision::Refused);
            return;
        }
        self.phase = Phase::Reserving(Reserving::new(&self.shared, charges, amount));
    }

    fn finish(&mut self, decision: Decision) {
        self.phase = Phase::Done;
        self.pending.deliver(decision);
    }

    fn poll(&mut self, cx: &mut Context<'_>) {
        loop {
            match &mut self.phase {
                Phase::Reading { tee, chunks, len } => {
                    let read = match poll_read(tee, chunks, len, self.shared.max_body, cx) {
                        Poll::Pending => return,
                        Poll::Ready(read) => read,
                    };
                    let bytes = match (read, chunks.len()) {
                        (Read::Unread, _) => None,
                        (Read::Complete, 1) => Some(chunks[0].clone()),
                        (Read::Complete, _) => Some(Bytes::from(chunks.concat())),
                    };
                    let Some(bytes) = bytes else {
                        self.finish(Decision::CheckAtGate);
                        continue;
                    };
                    let est = estimate(&bytes, &self.shared.prices, &self.shared.assume);
                    match plan(&self.shared, est) {
                        Plan::Pass => self.finish(Decision::CheckAtGate),
                        Plan::Refuse(_) => self.finish(Decision::Refused),
                        Plan::Reserve(amount) => {
                            self.read = Some(bytes);
                            self.begin(amount);
                        }
                    }
                }
                Phase::Reserving(reserving) => {
                    let Poll::Ready(outcome) = Pin::new(&mut *reserving).poll(cx) else {
                        return;
                    };
                    let decision = match outcome {
                        Outcome::Granted(r) => Decision::Granted(r, self.read.take()),
                        Outcome::Refused(err) => {
                            let (charges, amount) = reserving.asked();
                            Decision::StoreRefused {
                                err,
                                charges,
                                amount,
                                read: self.read.take(),
                            }
                        }
                        Outcome::Pass => Decision::Pass,
                    };
                    self.finish(decision);
                }
                Phase::Done => return,
            }
        }
    }
}

fn poll_read<B: Body<Data = Bytes>>(
    tee: &Mutex<Tee<B>>,
    chunks: &mut Vec<Bytes>,
    len: &mut usize,
    max: usize,
    cx: &mut Context<'_>,
) -> Poll<Read> {
    let mut t = lock(tee);
    let read = loop {
        match t.body.as_mut().poll_frame(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(None) => {
                t.ended = true;
                break Read::Complete;
            }
            Poll::Ready(Some(Err(e))) => {
                t.error = Some(e);
                break Read::Unread;
            }
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    *len += data.len();
                    chunks.push(data.clone());
                }
                t.frames.push_back(frame);
                if let Some(w) = t.waker.take() {
                    w.wake();
                }
                if *len > max {
                    break Read::Unread;
                }
            }
        }
    };
    t.filling = false;
    if let Some(w) = t.waker.take() {
        w.wake();
    }
    Poll::Ready(read)
}

impl<B: Body> Drop for Driver<B> {
    fn drop(&mut self) {
        self.pending.close();
        // A body still being read goes on to its reader below, which may outlive the
        // answer (an upload still streaming): it reads the rest itself.
        if let Phase::Reading { tee, .. } = &self.phase {
            let mut t = lock(tee);
            t.filling = false;
            if let Some(w) = t.waker.take() {
                w.wake();
            }
        }
        // a store call still in flight releases, in the background, what the store grants
        self.phase = Phase::Done;
    }
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for BudgetStart<S>
where
    S: Service<Request<StartBody<ReqB>>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqB: Body<Data = Bytes> + Send + 'static,
    ReqB::Error: Send,
    ResB: Send + 'static,
{
    type Response = Response<ResponseBody<ResB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResB, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        if !self.shared.gated.load(Ordering::Acquire) {
            tracing::error!(target: "palisade::cost::budget",
                "BudgetStartLayer without its BudgetGateLayer: requests are refused until the gate wraps the upstream");
            let err = Error::internal("budgets cannot be checked: the gateway is misconfigured");
            super::layer::release_outer(req.extensions());
            return ResponseFuture::boxed(std::future::ready(Ok(refusal(&self.shared, err))));
        }
        // Nothing to reserve: the inner call as it is, no box.
        if !metered_method(req.method()) {
            return ResponseFuture::inner(self.inner.call(req.map(StartBody::plain)));
        }
        let charges = self.shared.charges(&req);
        if charges.is_empty() {
            return ResponseFuture::inner(self.inner.call(req.map(StartBody::plain)));
        }
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        ResponseFuture::boxed(start(Arc::clone(&self.shared), inner, req, charges))
    }
}

/// Begins the reservation of a request with something to reserve on `charges`, and calls
/// `inner` at once.
async fn start<S, ReqB, ResB>(
    shared: Arc<Shared>,
    mut inner: S,
    req: Request<ReqB>,
    charges: Vec<Charge>,
) -> Result<Response<ResponseBody<ResB>>, S::Error>
where
    S: Service<Request<StartBody<ReqB>>, Response = Response<ResB>>,
    ReqB: Body<Data = Bytes>,
{
    let pending = PendingBudget::new(&shared);
    let (mut parts, body) = req.into_parts();
    let mut driver = Driver {
        shared: Arc::clone(&shared),
        pending: pending.clone(),
        charges: Some(charges),
        read: None,
        phase: Phase::Done,
    };
    let body = match parts.extensions.get::<BudgetEstimate>() {
        Some(&BudgetEstimate(amount)) => {
            driver.begin(amount);
            StartBody::plain(body)
        }
        None if body
            .size_hint()
            .upper()
            .is_some_and(|n| n > shared.max_body as u64) =>
        {
            driver.finish(Decision::CheckAtGate);
            StartBody::plain(body)
        }
        None => {
            let tee = Arc::new(Mutex::new(Tee {
                body: Box::pin(body),
                frames: VecDeque::new(),
                error: None,
                ended: false,
                filling: true,
                waker: None,
            }));
            driver.phase = Phase::Reading {
                tee: Arc::clone(&tee),
                chunks: Vec::new(),
                len: 0,
            };
            StartBody {
                inner: Inner::Tee { tee },
            }
        }
    };
    parts.extensions.insert(pending.clone());
    // The pending reservation is the task's while the inner service is called too: a
    // layer below may build the upstream request anew in its `call`.
    let req = Request::from_parts(parts, body);
    let scoped = Scoped {
        pending,
        outer: PENDING.try_with(|outer| Arc::new(outer.clone())).ok(),
    };
    let call = PENDING.sync_scope(scoped.clone(), || inner.call(req));
    let call = PENDING.scope(scoped, call);
    let mut call = pin!(call);
    let res = poll_fn(|cx| {
        // the store call goes out before the inner service's own calls
        driver.poll(cx);
        call.as_mut().poll(cx)
    })
    .await;
    drop(driver);
    res.map(|r| r.map(ResponseBody::inner))
}

/// The pending reservation `req` carries from a start of the layer `shared` belongs to:
/// in its extensions, or of the request being served on this task.
pub(super) fn pending_for<B>(shared: &Arc<Shared>, req: &Request<B>) -> Option<PendingBudget> {
    let mine = owner(shared);
    req.extensions()
        .get::<PendingBudget>()
        .filter(|p| p.owner == mine)
        .cloned()
        .or_else(|| {
            PENDING
                .try_with(|scoped| {
                    let mut at = Some(scoped);
                    while let Some(s) = at {
                        if s.pending.owner == mine {
                            return Some(s.pending.clone());
                        }
                        at = s.outer.as_deref();
                    }
                    None
                })
                .ok()
                .flatten()
        })
}

/// The gate: waits for the start's decision on `pending`. A granted reservation lets the
/// request through when it covers what this layer would reserve for the request as it
/// reaches the gate (the same accounts, at least the amount); otherwise it is released
/// and the request is checked here, as the plain layer checks it.
pub(super) async fn gate<S, ReqB, ResB>(
    shared: Arc<Shared>,
    inner: S,
    req: Request<ReqB>,
    pending: PendingBudget,
) -> Result<Response<ResponseBody<ResB>>, S::Error>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    ReqB: Body + From<Bytes>,
    ReqB::Error: Into<crate::BoxError>,
{
    let unsent_outer = super::layer::OuterUnsent::of(req.extensions());
    let decision = pending.take().await;
    let (granted, read) = match decision {
        Decision::Granted(reservation, read) => (reservation, read),
        Decision::StoreRefused {
            err,
            charges: refused,
            amount: refused_amount,
            read,
        } => {
            unsent_outer.sent();
            let known = read.map(|b| (b, refused_amount));
            return match prepare(&shared, req, known).await {
                Prepared::Reserve {
                    req,
                    charges,
                    amount,
                } => {
                    if amount >= refused_amount && *refused == *charges {
                        super::layer::release_outer(req.extensions());
                        return Ok(refusal(&shared, err));
                    }
                    tracing::debug!(target: "palisade::cost::budget",
                        "the request at the budget gate needs another reservation than its start was refused");
                    reserve_and_pass(shared, inner, req, charges, amount).await
                }
                Prepared::Pass(req) => pass(inner, req).await,
                Prepared::Refuse(err) => Ok(refusal(&shared, err)),
            };
        }
        Decision::Pass => {
            unsent_outer.sent();
            return pass(inner, req).await;
        }
        // refused on the body alone: the gate judges the body it sees
        Decision::Refused | Decision::CheckAtGate => {
            unsent_outer.sent();
            return check(shared, inner, req).await;
        }
    };
    let known = read.map(|b| (b, granted.amount()));
    // Until the upstream call, a gate dropped (its client gone while it reads the body)
    // releases the reservation: nothing was sent.
    let mut unsent = Unsent(Some(granted));
    let prepared = prepare(&shared, req, known).await;
    unsent_outer.sent();
    let Some(granted) = unsent.0.take() else {
        unreachable!("taken only here")
    };
    match prepared {
        Prepared::Reserve {
            req,
            charges,
            amount,
        } => {
            if granted.covers(&charges, amount) {
                // `pass_holding` inlined: one future less to build and move
                let (mut inner, mut req) = (inner, req);
                granted.hold_in(req.extensions_mut());
                return match inner.call(req).await {
                    Ok(res) => Ok(res.map(ResponseBody::inner)),
                    Err(e) => {
                        granted.refund(); // no response, no usage
                        Err(e)
                    }
                };
            }
            tracing::debug!(target: "palisade::cost::budget", reserved = %granted.amount(), needed = %amount,
                "the request at the budget gate needs another reservation than its start made");
            granted.refund();
            reserve_and_pass(shared, inner, req, charges, amount).await
        }
        Prepared::Pass(req) => {
            granted.refund();
            pass(inner, req).await
        }
        Prepared::Refuse(err) => {
            granted.refund();
            Ok(refusal(&shared, err))
        }
    }
}

/// A reservation the gate holds before its upstream call: dropped with it, released.
struct Unsent(Option<BudgetReservation>);

impl Drop for Unsent {
    fn drop(&mut self) {
        if let Some(r) = self.0.take() {
            tracing::debug!(target: "palisade::cost::budget", amount = %r.amount(),
                "request gone at its budget gate: reservation released");
            r.refund();
        }
    }
}
