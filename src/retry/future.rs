//! The response future of [`Retry`](super::Retry): a state machine of attempts and waits.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep, sleep_until};
use tower_service::Service;

use super::layer::Policy;
use super::policy::{ReplaySource, RetryResponse};
use crate::classify::{Classification, Classify, Outcome, Retry as Verdict};
use crate::error::{BoxError, Error, ErrorKind};

pin_project! {
    /// The future [`Retry`](super::Retry) returns: it runs attempts, waits between them,
    /// and resolves with the first answer that will not be retried.
    pub struct ResponseFuture<S, R, C>
    where
        S: Service<R::Attempt>,
        R: ReplaySource,
    {
        #[pin]
        state: State<S::Future>,
        // One timer, boxed on first use (no timer, no allocation), then reset for every
        // wait and every bounded attempt.
        timer: Option<Pin<Box<Sleep>>>,
        // Whether the timer bounds the attempt in flight.
        timed: bool,
        service: S,
        source: R,
        policy: Arc<Policy<C>>,
        retries: u32,
        deadline: Option<Instant>,
        previous_delay: Duration,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Calling { #[pin] future: F },
        Waiting,
        Readying,
        Failed { error: Option<BoxError> },
    }
}

impl<S, R, C> std::fmt::Debug for ResponseFuture<S, R, C>
where
    S: Service<R::Attempt>,
    R: ReplaySource,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("retries", &self.retries)
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

impl<S, R, C> ResponseFuture<S, R, C>
where
    S: Service<R::Attempt>,
    R: ReplaySource,
{
    #[inline]
    pub(crate) fn start(
        mut service: S,
        attempt: R::Attempt,
        source: R,
        policy: Arc<Policy<C>>,
    ) -> Self {
        let future = service.call(attempt);
        let (deadline, timer) = if policy.deadline.is_some() || policy.attempt_timeout.is_some() {
            let now = Instant::now();
            let deadline = policy.deadline.map(|d| after(now, d));
            let end = attempt_end(now, policy.attempt_timeout, deadline);
            (deadline, end.map(|at| Box::pin(sleep_until(at))))
        } else {
            (None, None)
        };
        Self {
            state: State::Calling { future },
            timed: timer.is_some(),
            timer,
            service,
            source,
            policy,
            retries: 0,
            deadline,
            previous_delay: Duration::ZERO,
        }
    }

    pub(crate) fn failed(service: S, source: R, policy: Arc<Policy<C>>, error: BoxError) -> Self {
        Self {
            state: State::Failed { error: Some(error) },
            timer: None,
            timed: false,
            service,
            source,
            policy,
            retries: 0,
            deadline: None,
            previous_delay: Duration::ZERO,
        }
    }
}

/// `now + d`, or about 30 years from now when that overflows (`Duration::MAX` means "no
/// limit in practice", never a panic).
fn after(now: Instant, d: Duration) -> Instant {
    const FAR: Duration = Duration::from_secs(86_400 * 365 * 30);
    now.checked_add(d.min(FAR)).unwrap_or(now)
}

fn attempt_end(
    now: Instant,
    timeout: Option<Duration>,
    deadline: Option<Instant>,
) -> Option<Instant> {
    match (timeout.map(|t| after(now, t)), deadline) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn arm(timer: &mut Option<Pin<Box<Sleep>>>, at: Instant) {
    match timer {
        Some(sleep) => sleep.as_mut().reset(at),
        None => *timer = Some(Box::pin(sleep_until(at))),
    }
}

enum Decision {
    /// Hand this result to the caller.
    Return,
    /// Wait this long, then retry.
    Retry(Duration),
    /// The server asked for a longer wait than `max_delay` or the deadline allows: its
    /// answer goes back to the caller, who can come back when it said.
    GiveUp(Duration),
}

struct Attempts<'a, C, R> {
    policy: &'a Policy<C>,
    source: &'a R,
    retries: u32,
    previous_delay: Duration,
    deadline: Option<Instant>,
}

impl<C, R: ReplaySource> Attempts<'_, C, R> {
    fn decide(&self, class: &Classification) -> Decision {
        let policy = self.policy;
        let allowed = match class.retry {
            Verdict::Never => false,
            Verdict::IfIdempotent => policy.assume_idempotent || self.source.is_idempotent(),
            Verdict::Safe => true,
        };
        if !allowed {
            return Decision::Return;
        }
        if self.retries >= policy.max_retries {
            tracing::debug!(retries = self.retries, "retries exhausted");
            return Decision::Return;
        }
        if !self.source.can_replay() {
            tracing::debug!(
                "the request cannot be sent again (body too large or streamed); not retrying"
            );
            return Decision::Return;
        }
        let remaining = self
            .deadline
            .map(|d| d.saturating_duration_since(Instant::now()));
        let delay = match class.retry_after {
            Some(asked) => {
                if remaining.is_some_and(|left| asked >= left) {
                    tracing::debug!(
                        retry_after_ms = asked.as_millis() as u64,
                        "the server asked for a longer wait than the deadline leaves; giving up"
                    );
                    return Decision::GiveUp(asked);
                }
                if asked > policy.backoff.max_delay() {
                    // Retrying earlier than asked would be refused again and spend budget.
                    tracing::debug!(
                        retry_after_ms = asked.as_millis() as u64,
                        max_delay_ms = policy.backoff.max_delay().as_millis() as u64,
                        "the server asked for a longer wait than max_delay; giving up"
                    );
                    return Decision::GiveUp(asked);
                }
                asked
            }
            None => policy
                .rng
                .with(|rng| policy.backoff.delay(self.retries, self.previous_delay, rng)),
        };
        if remaining.is_some_and(|left| delay >= left) {
            tracing::debug!("no time left before the deadline; not retrying");
            return Decision::Return;
        }
        if class.outcome != Outcome::Rejected {
            if let Some(budget) = &policy.budget {
                if !budget.withdraw() {
                    tracing::debug!("retry budget exhausted; not retrying");
                    return Decision::Return;
                }
            }
        }
        Decision::Retry(delay)
    }
}

#[inline]
fn finish<Res: RetryResponse, C>(
    result: Result<Res, BoxError>,
    retries: u32,
    policy: &Policy<C>,
) -> Result<Res, BoxError> {
    match result {
        Ok(mut response) => {
            if retries > 0 {
                response.record_retries(retries, policy.count_header.as_ref());
            }
            Ok(response)
        }
        Err(err) => Err(err),
    }
}

impl<S, R, C> Future for ResponseFuture<S, R, C>
where
    R: ReplaySource,
    S: Service<R::Attempt>,
    S::Error: Into<BoxError>,
    S::Response: RetryResponse,
    C: Classify<S::Response, BoxError>,
{
    type Output = Result<S::Response, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Calling { future } => {
                    let result: Result<S::Response, BoxError> = match future.poll(cx) {
                        Poll::Ready(Ok(response)) => {
                            // The hot path: an answer that is not to be retried goes straight
                            // back, without building the retry decision.
                            let class = this.policy.classifier.classify(Ok(&response));
                            if class.retry == Verdict::Never {
                                return Poll::Ready(finish(
                                    Ok(response),
                                    *this.retries,
                                    this.policy,
                                ));
                            }
                            Ok(response)
                        }
                        Poll::Ready(Err(err)) => Err(err.into()),
                        Poll::Pending => {
                            let expired = *this.timed
                                && this
                                    .timer
                                    .as_mut()
                                    .is_some_and(|t| t.as_mut().poll(cx).is_ready());
                            if !expired {
                                return Poll::Pending;
                            }
                            let past_deadline = this.deadline.is_some_and(|d| Instant::now() >= d);
                            Err(Error::timeout(if past_deadline {
                                "the upstream call did not finish before the retry deadline"
                            } else {
                                "the upstream did not answer within the attempt timeout"
                            })
                            .into())
                        }
                    };
                    *this.timed = false;
                    let class = this.policy.classifier.classify(result.as_ref());
                    let attempts = Attempts {
                        policy: this.policy,
                        source: this.source,
                        retries: *this.retries,
                        previous_delay: *this.previous_delay,
                        deadline: *this.deadline,
                    };
                    match attempts.decide(&class) {
                        Decision::Return => {
                            return Poll::Ready(finish(result, *this.retries, this.policy));
                        }
                        Decision::GiveUp(asked) => {
                            let result = result.map_err(|err| give_up_error(err, asked));
                            return Poll::Ready(finish(result, *this.retries, this.policy));
                        }
                        Decision::Retry(delay) => {
                            *this.retries += 1;
                            match &result {
                                Ok(response) => tracing::info!(
                                    attempt = *this.retries,
                                    delay_ms = delay.as_millis() as u64,
                                    status = response.status_code(),
                                    outcome = ?class.outcome,
                                    "retrying upstream call"
                                ),
                                Err(err) => tracing::info!(
                                    attempt = *this.retries,
                                    delay_ms = delay.as_millis() as u64,
                                    error = %err,
                                    outcome = ?class.outcome,
                                    "retrying upstream call"
                                ),
                            }
                            // The failed answer (and its body) goes now, not after the wait.
                            drop(result);
                            *this.previous_delay = delay;
                            arm(this.timer, after(Instant::now(), delay));
                            this.state.set(State::Waiting);
                        }
                    }
                }
                StateProj::Waiting => {
                    if let Some(timer) = this.timer.as_mut() {
                        ready!(timer.as_mut().poll(cx));
                    }
                    this.state.set(State::Readying);
                }
                StateProj::Readying => {
                    if let Err(err) = ready!(this.service.poll_ready(cx)) {
                        return Poll::Ready(Err(err.into()));
                    }
                    let last = *this.retries >= this.policy.max_retries;
                    let Some(attempt) = this.source.next_attempt(last) else {
                        return Poll::Ready(Err(
                            "the request could not be prepared for another attempt".into(),
                        ));
                    };
                    let future = this.service.call(attempt);
                    if this.policy.attempt_timeout.is_some() || this.deadline.is_some() {
                        let end = attempt_end(
                            Instant::now(),
                            this.policy.attempt_timeout,
                            *this.deadline,
                        );
                        if let Some(end) = end {
                            arm(this.timer, end);
                            *this.timed = true;
                        }
                    }
                    this.state.set(State::Calling { future });
                }
                StateProj::Failed { error } => {
                    return Poll::Ready(Err(error.take().unwrap_or_else(|| {
                        "the retry future was polled after it finished".into()
                    })));
                }
            }
        }
    }
}

/// The error returned when the server's `retry-after` is beyond `max_delay` or the
/// deadline: the original
/// error if it already carries a retry-after, else an upstream error that does.
fn give_up_error(err: BoxError, asked: Duration) -> BoxError {
    if let Some(e) = err.downcast_ref::<Error>() {
        if e.retry_after().is_some() {
            return err;
        }
    }
    Error::new(
        ErrorKind::Unavailable,
        "the upstream asked to retry later than the deadline allows",
    )
    .with_retry_after(asked)
    .with_source(err)
    .into()
}
