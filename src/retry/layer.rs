//! `RetryLayer`, its builder, and the `Retry` service.

use std::borrow::Borrow;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::HeaderName;
use tower_layer::Layer;
use tower_service::Service;

use super::backoff::{Backoff, Jitter};
use super::budget::RetryBudget;
use super::config::{RetryConfig, RetryConfigError};
use super::future::ResponseFuture;
use super::policy::{Replay, ReplaySource, RetryResponse};
use crate::classify::{Classify, DefaultClassifier};
use crate::config::{ConfigError, Env};
use crate::error::BoxError;
use crate::jitter::SharedRng;

/// Everything a layer's services share: the schedule, the budget, the classifier.
#[derive(Debug)]
pub(crate) struct Policy<C> {
    pub(crate) backoff: Backoff,
    pub(crate) max_retries: u32,
    pub(crate) deadline: Option<Duration>,
    pub(crate) attempt_timeout: Option<Duration>,
    pub(crate) budget: Option<RetryBudget>,
    pub(crate) body_limit: usize,
    pub(crate) assume_idempotent: bool,
    pub(crate) count_header: Option<HeaderName>,
    pub(crate) rng: SharedRng,
    pub(crate) classifier: C,
}

/// A [`Layer`] that retries failed calls with exponential backoff and jitter, honouring
/// `retry-after`, inside a retry budget. See the [module docs](super).
#[derive(Debug)]
#[must_use]
pub struct RetryLayer<C = DefaultClassifier> {
    policy: Arc<Policy<C>>,
}

impl<C> Clone for RetryLayer<C> {
    fn clone(&self) -> Self {
        Self {
            policy: Arc::clone(&self.policy),
        }
    }
}

impl RetryLayer {
    /// The defaults: 3 retries, 500 ms doubling to 8 s with full jitter, a 20% budget,
    /// bodies kept up to 1 MiB, the default classifier.
    pub fn new() -> Self {
        Self::from_config(RetryConfig::default()).expect("the default configuration is valid")
    }

    /// A builder starting from the defaults.
    pub fn builder() -> RetryLayerBuilder {
        RetryLayerBuilder {
            config: RetryConfig::default(),
            classifier: DefaultClassifier::new(),
            budget: None,
        }
    }

    /// The layer a configuration describes, with the default classifier. Takes the
    /// configuration by value or by reference.
    pub fn from_config(config: impl Borrow<RetryConfig>) -> Result<Self, RetryConfigError> {
        RetryLayerBuilder {
            config: config.borrow().clone(),
            classifier: DefaultClassifier::new(),
            budget: None,
        }
        .build()
    }

    /// The layer the `PALISADE_RETRY_*` environment variables describe (see
    /// [`RetryConfig::from_env`]), with every problem reported at once.
    ///
    /// ```
    /// # fn main() -> Result<(), palisade::config::ConfigError> {
    /// let layer = palisade::retry::RetryLayer::from_env()?;
    /// # let _ = layer;
    /// # Ok(())
    /// # }
    /// ```
    pub fn from_env() -> Result<Self, ConfigError> {
        crate::config::layer_from_env(
            Env::from_process(),
            super::config::PREFIX,
            RetryConfig::from_env,
            |config: &_| Self::from_config(config),
        )
    }

    /// A preset for LLM APIs (Anthropic, OpenAI): the defaults, which follow the official
    /// SDKs' schedule (500 ms doubling to 8 s, full jitter, 3 retries), with a 10-minute
    /// deadline for the whole call, retries and waits included (the SDKs' request timeout:
    /// a non-streamed generation can take minutes). A server that asks for a
    /// longer wait than 8 s gets its answer back at once.
    pub fn llm() -> Self {
        Self::from_config(RetryConfig::llm()).expect("the LLM preset is valid")
    }
}

impl Default for RetryLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl<C> RetryLayer<C> {
    /// The retry budget, if on (shared by every service this layer builds).
    pub fn budget(&self) -> Option<&RetryBudget> {
        self.policy.budget.as_ref()
    }

    /// The backoff schedule.
    pub fn backoff(&self) -> &Backoff {
        &self.policy.backoff
    }

    /// The most retries after the first attempt.
    pub fn max_retries(&self) -> u32 {
        self.policy.max_retries
    }
}

impl<S, C> Layer<S> for RetryLayer<C> {
    type Service = Retry<S, C>;

    fn layer(&self, inner: S) -> Retry<S, C> {
        Retry {
            inner,
            policy: Arc::clone(&self.policy),
        }
    }
}

/// The former name of [`RetryLayerBuilder`].
#[deprecated(
    since = "0.2.0",
    note = "renamed `RetryLayerBuilder`, like every layer's builder"
)]
pub type RetryBuilder<C = DefaultClassifier> = RetryLayerBuilder<C>;

/// Builds a [`RetryLayer`]; every setter takes and returns `self`, and [`build`] checks
/// the whole configuration.
///
/// [`build`]: RetryLayerBuilder::build
#[derive(Debug, Clone)]
#[must_use]
pub struct RetryLayerBuilder<C = DefaultClassifier> {
    config: RetryConfig,
    classifier: C,
    budget: Option<RetryBudget>,
}

impl<C> RetryLayerBuilder<C> {
    /// Most retries after the first attempt.
    pub fn max_retries(mut self, n: u32) -> Self {
        self.config.max_retries = n;
        self
    }

    /// The delay before the first retry, before jitter.
    pub fn base_delay(mut self, delay: Duration) -> Self {
        self.config.base_delay = delay;
        self
    }

    /// The growth factor of the delays (at least 1).
    pub fn factor(mut self, factor: f64) -> Self {
        self.config.factor = factor;
        self
    }

    /// The cap on any delay, applied after jitter. A server that asks (with `retry-after`)
    /// for a longer wait gets its answer back at once instead of an early retry.
    pub fn max_delay(mut self, delay: Duration) -> Self {
        self.config.max_delay = delay;
        self
    }

    /// How delays are randomised.
    pub fn jitter(mut self, jitter: Jitter) -> Self {
        self.config.jitter = jitter;
        self
    }

    /// An overall time limit for a call, retries and waits included.
    pub fn deadline(mut self, deadline: impl Into<Option<Duration>>) -> Self {
        self.config.deadline = deadline.into();
        self
    }

    /// A time limit for each attempt.
    pub fn attempt_timeout(mut self, timeout: impl Into<Option<Duration>>) -> Self {
        self.config.attempt_timeout = timeout.into();
        self
    }

    /// Turns the retry budget off (it is on by default).
    pub fn without_budget(mut self) -> Self {
        self.config.budget = false;
        self.budget = None;
        self
    }

    /// A budget of its own for this layer: `ratio` retries per request over a sliding
    /// `window`, plus `min_per_sec` retries per second always.
    pub fn budget(mut self, window: Duration, min_per_sec: u32, ratio: f64) -> Self {
        self.config.budget = true;
        self.config.budget_window = window;
        self.config.budget_min_per_sec = min_per_sec;
        self.config.budget_ratio = ratio;
        self.budget = None;
        self
    }

    /// A budget shared with other layers (for example one per upstream host).
    pub fn shared_budget(mut self, budget: RetryBudget) -> Self {
        self.config.budget = true;
        self.budget = Some(budget);
        self
    }

    /// The most request-body bytes kept for replay; larger bodies are sent once.
    pub fn body_limit(mut self, bytes: usize) -> Self {
        self.config.body_limit = bytes;
        self
    }

    /// Treat every request as idempotent: a POST is then retried on 500/502/504 and
    /// transport errors too, not only on 429/529/503-with-retry-after and connect errors.
    pub fn assume_idempotent(mut self, yes: bool) -> Self {
        self.config.assume_idempotent = yes;
        self
    }

    /// Also put the retry count in this response header (checked by [`build`]).
    ///
    /// [`build`]: RetryLayerBuilder::build
    pub fn count_header(mut self, name: impl Into<String>) -> Self {
        self.config.count_header = Some(name.into());
        self
    }

    /// Seeds the jitter generator, for reproducible delays.
    pub fn seed(mut self, seed: u64) -> Self {
        self.config.seed = Some(seed);
        self
    }

    /// Replaces the classifier: a [`Classify`] implementation or a closure
    /// `Fn(Result<&Response, &BoxError>) -> Classification`.
    pub fn classifier<C2>(self, classifier: C2) -> RetryLayerBuilder<C2> {
        RetryLayerBuilder {
            config: self.config,
            classifier,
            budget: self.budget,
        }
    }

    /// The configuration so far.
    pub fn config(&self) -> &RetryConfig {
        &self.config
    }

    /// Checks everything and builds the layer.
    pub fn build(self) -> Result<RetryLayer<C>, RetryConfigError> {
        let config = &self.config;
        let count_header = config.checked()?;
        let budget = match (config.budget, self.budget) {
            (false, _) => None,
            (true, Some(shared)) => Some(shared),
            (true, None) => Some(RetryBudget::new(
                config.budget_window,
                config.budget_min_per_sec,
                config.budget_ratio,
            )?),
        };
        Ok(RetryLayer {
            policy: Arc::new(Policy {
                backoff: Backoff::new(
                    config.base_delay,
                    config.factor,
                    config.max_delay,
                    config.jitter,
                ),
                max_retries: config.max_retries,
                deadline: config.deadline,
                attempt_timeout: config.attempt_timeout,
                budget,
                body_limit: config.body_limit,
                assume_idempotent: config.assume_idempotent,
                count_header,
                rng: SharedRng::new(config.seed),
                classifier: self.classifier,
            }),
        })
    }
}

/// The service [`RetryLayer`] builds: it takes any [`Replay`] request (an
/// `http::Request<B>`, a [`Cloned`](super::Cloned) value, ...) and gives the inner service
/// one attempt at a time.
#[derive(Debug)]
pub struct Retry<S, C = DefaultClassifier> {
    inner: S,
    policy: Arc<Policy<C>>,
}

impl<S: Clone, C> Clone for Retry<S, C> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            policy: Arc::clone(&self.policy),
        }
    }
}

impl<S> Retry<S> {
    /// Wraps `inner` with the default policy.
    pub fn new(inner: S) -> Self {
        RetryLayer::new().layer(inner)
    }

    /// A [`RetryLayer`] with the default policy.
    pub fn layer() -> RetryLayer {
        RetryLayer::new()
    }
}

impl<S, C> Retry<S, C> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, C, Req> Service<Req> for Retry<S, C>
where
    Req: Replay,
    S: Service<Req::Attempt> + Clone,
    S::Error: Into<BoxError>,
    S::Response: RetryResponse,
    C: Classify<S::Response, BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S, Req::Source, C>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, request: Req) -> Self::Future {
        let policy = &self.policy;
        let mut source = request.into_source(policy.body_limit);
        if let Some(budget) = &policy.budget {
            budget.deposit();
        }
        let last = policy.max_retries == 0 || !source.can_replay();
        // Use the service that was driven to readiness; leave a fresh clone in its place.
        let clone = self.inner.clone();
        let service = std::mem::replace(&mut self.inner, clone);
        match source.next_attempt(last) {
            Some(attempt) => ResponseFuture::start(service, attempt, source, Arc::clone(policy)),
            None => ResponseFuture::failed(
                service,
                source,
                Arc::clone(policy),
                "the request could not be prepared for sending".into(),
            ),
        }
    }
}
