//! [`CircuitBreakerLayer`], its builder, and the [`CircuitBreaker`] service.

use std::borrow::Borrow;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Response;
use tower_layer::Layer;
use tower_service::Service;

use super::config::{CircuitBreakerConfig, CircuitBreakerConfigError, WindowKind};
use super::future::{RespondFuture, ResponseFuture};
use super::state::{Callback, CircuitBreakerHandle, Shared, Transition};
use crate::ErrorFormat;
use crate::body::ResponseBody;
use crate::classify::{Classify, DefaultClassifier};
use crate::config::{ConfigError, Env};

/// Mode marker: a refused call is `Err(E::from(Error))` with kind
/// [`CircuitOpen`](crate::ErrorKind::CircuitOpen) and a `retry_after`.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReturnError;

/// Mode marker: a refused call is answered with a rendered HTTP response (see
/// [`CircuitBreakerLayer::respond_with`]).
#[derive(Debug, Clone, Copy)]
pub struct Respond {
    format: ErrorFormat,
}

/// The former name of [`CircuitBreakerLayerBuilder`].
#[deprecated(
    since = "0.2.0",
    note = "renamed `CircuitBreakerLayerBuilder`, like every layer's builder"
)]
pub type CircuitBreakerBuilder = CircuitBreakerLayerBuilder;

/// Builds [`CircuitBreaker`] services that share one breaker.
///
/// Every service made by one layer (and by its clones) shares the same state; get a
/// [`CircuitBreakerHandle`] with [`handle`](Self::handle) to watch or force it.
///
/// The service's error type is [`BoxError`](crate::BoxError) (any inner error that
/// converts into it passes through, so a hyper-util client needs no `map_err`; the
/// classifier sees the inner error before it is boxed). A refusal is an
/// [`Error`](crate::Error) of kind [`CircuitOpen`](crate::ErrorKind::CircuitOpen) with the
/// time until the next probe as `retry_after`. At the server edge, use
/// [`respond_with`](Self::respond_with) to answer refused calls with a rendered response
/// instead.
#[derive(Debug, Clone)]
#[must_use]
pub struct CircuitBreakerLayer<C = DefaultClassifier, M = ReturnError> {
    handle: CircuitBreakerHandle,
    classifier: C,
    mode: M,
}

impl CircuitBreakerLayer {
    /// A builder starting from [`CircuitBreakerConfig::default`].
    pub fn builder() -> CircuitBreakerLayerBuilder {
        CircuitBreakerLayerBuilder::new(CircuitBreakerConfig::default())
    }

    /// A layer with a new breaker configured by `config` (by value or by reference).
    pub fn from_config(
        config: impl Borrow<CircuitBreakerConfig>,
    ) -> Result<Self, CircuitBreakerConfigError> {
        CircuitBreakerLayerBuilder::new(config.borrow().clone()).build()
    }

    /// A layer with a new breaker configured by the `PALISADE_CIRCUIT_BREAKER_*`
    /// environment variables (see [`CircuitBreakerConfig::from_env`]), with every problem
    /// reported at once.
    ///
    /// ```
    /// # fn main() -> Result<(), palisade::config::ConfigError> {
    /// let layer = palisade::circuit_breaker::CircuitBreakerLayer::from_env()?;
    /// # let _ = layer;
    /// # Ok(())
    /// # }
    /// ```
    pub fn from_env() -> Result<Self, ConfigError> {
        crate::config::layer_from_env(
            Env::from_process(),
            super::config::PREFIX,
            CircuitBreakerConfig::from_env,
            |config: &_| Self::from_config(config),
        )
    }

    /// A layer with a new breaker set for an LLM upstream (see
    /// [`CircuitBreakerConfig::llm_upstream`]).
    ///
    /// ```
    /// use palisade::circuit_breaker::{CircuitBreakerLayer, CircuitState};
    ///
    /// let layer = CircuitBreakerLayer::llm();
    /// assert_eq!(layer.handle().state(), CircuitState::Closed);
    /// ```
    pub fn llm() -> Self {
        Self::from_config(CircuitBreakerConfig::llm_upstream())
            .expect("the LLM upstream preset is valid")
    }

    /// A layer that uses an existing breaker (for example one from a
    /// [`CircuitBreakerRegistry`](super::CircuitBreakerRegistry)).
    pub fn from_handle(handle: CircuitBreakerHandle) -> Self {
        Self {
            handle,
            classifier: DefaultClassifier::new(),
            mode: ReturnError,
        }
    }
}

impl<C, M> CircuitBreakerLayer<C, M> {
    /// Judges calls with `classifier` instead of the default (any
    /// `Fn(Result<&Response, &Error>) -> Classification` works). `Ignored` and `Rejected`
    /// outcomes are not counted.
    pub fn classifier<C2>(self, classifier: C2) -> CircuitBreakerLayer<C2, M> {
        CircuitBreakerLayer {
            handle: self.handle,
            classifier,
            mode: self.mode,
        }
    }

    /// Answers refused calls with a rendered [`Error`](crate::Error) response instead of
    /// an error: `503 Service Unavailable` with `retry-after` as an RFC 9457 problem
    /// document, or `529 overloaded_error` (the status the Anthropic SDKs retry on) in
    /// [`ErrorFormat::Anthropic`]. The response body becomes
    /// [`ResponseBody<B>`](crate::body::ResponseBody).
    pub fn respond_with(self, format: ErrorFormat) -> CircuitBreakerLayer<C, Respond> {
        CircuitBreakerLayer {
            handle: self.handle,
            classifier: self.classifier,
            mode: Respond { format },
        }
    }

    /// The control handle of this layer's breaker.
    pub fn handle(&self) -> CircuitBreakerHandle {
        self.handle.clone()
    }
}

impl<S, C: Clone, M: Clone> Layer<S> for CircuitBreakerLayer<C, M> {
    type Service = CircuitBreaker<S, C, M>;

    fn layer(&self, inner: S) -> Self::Service {
        CircuitBreaker {
            inner,
            shared: Arc::clone(&self.handle.shared),
            classifier: self.classifier.clone(),
            mode: self.mode.clone(),
        }
    }
}

/// Configures a [`CircuitBreakerLayer`]; every setter mirrors a
/// [`CircuitBreakerConfig`] field. [`build`](Self::build) validates.
#[must_use]
pub struct CircuitBreakerLayerBuilder {
    config: CircuitBreakerConfig,
    callbacks: Vec<Callback>,
}

impl std::fmt::Debug for CircuitBreakerLayerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CircuitBreakerLayerBuilder")
            .field("config", &self.config)
            .field("callbacks", &self.callbacks.len())
            .finish()
    }
}

impl CircuitBreakerLayerBuilder {
    /// A builder starting from `config`.
    pub fn new(config: CircuitBreakerConfig) -> Self {
        Self {
            config,
            callbacks: Vec::new(),
        }
    }

    /// The name used in logs, callbacks and health reports.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.config.name = name.into();
        self
    }

    /// Judge the last `calls` calls.
    pub fn count_window(mut self, calls: u32) -> Self {
        self.config.window_kind = WindowKind::Count;
        self.config.window_size = calls;
        self
    }

    /// Judge the calls of the last `span` (whole seconds, rounded up).
    pub fn time_window(mut self, span: Duration) -> Self {
        self.config.window_kind = WindowKind::Time;
        let secs = span.as_secs() + u64::from(span.subsec_nanos() > 0);
        self.config.window_size = u32::try_from(secs).unwrap_or(u32::MAX);
        self
    }

    /// Open when at least this fraction (0 to 1) of the calls in the window failed.
    pub fn failure_rate_threshold(mut self, fraction: f64) -> Self {
        self.config.failure_rate_threshold = fraction;
        self
    }

    /// Count calls longer than `duration` as slow, and open when at least this fraction
    /// (0 to 1) of the calls in the window were slow.
    pub fn slow_calls(mut self, duration: Duration, fraction: f64) -> Self {
        self.config.slow_call_duration = Some(duration);
        self.config.slow_call_rate_threshold = fraction;
        self
    }

    /// Judge the rates only once the window holds `calls` calls.
    pub fn minimum_calls(mut self, calls: u32) -> Self {
        self.config.minimum_calls = calls;
        self
    }

    /// Also open after `failures` failures in a row.
    pub fn consecutive_failures(mut self, failures: u32) -> Self {
        self.config.consecutive_failures = Some(failures);
        self
    }

    /// How long the circuit stays open the first time.
    pub fn open_duration(mut self, duration: Duration) -> Self {
        self.config.open_duration = duration;
        self
    }

    /// The cap on the growing open duration.
    pub fn max_open_duration(mut self, duration: Duration) -> Self {
        self.config.max_open_duration = duration;
        self
    }

    /// The factor the open duration grows by after each failed half-open attempt.
    pub fn backoff_multiplier(mut self, multiplier: f64) -> Self {
        self.config.backoff_multiplier = multiplier;
        self
    }

    /// Seeds the open durations' jitter, for reproducible schedules (as
    /// [`RetryLayerBuilder::seed`](crate::retry::RetryLayerBuilder::seed) does for retry
    /// delays).
    pub fn seed(mut self, seed: u64) -> Self {
        self.config.seed = Some(seed);
        self
    }

    /// How open durations are randomised: a spread (`0.2` = ±20 %, `0.0` for none) or any
    /// other [`Jitter`](crate::jitter::Jitter), as retry's delays are.
    pub fn jitter(mut self, jitter: impl Into<crate::jitter::Jitter>) -> Self {
        self.config.jitter = jitter.into();
        self
    }

    /// How many probes half-open admits; all must succeed to close.
    pub fn half_open_probes(mut self, probes: u32) -> Self {
        self.config.half_open_probes = probes;
        self
    }

    /// How long half-open waits for its probes before opening again (`None`: for ever).
    pub fn max_wait_in_half_open(mut self, wait: Option<Duration>) -> Self {
        self.config.max_wait_in_half_open = wait;
        self
    }

    /// Where the breaker reads time (default [`ClockSource::Tokio`], which tests can
    /// pause). [`ClockSource::Coarse`] saves a clock read per call of a time window or
    /// slow-call rule, for times late by up to about a millisecond.
    ///
    /// ```
    /// use std::time::Duration;
    /// use palisade::circuit_breaker::CircuitBreakerLayer;
    /// use palisade::clock::ClockSource;
    ///
    /// let layer = CircuitBreakerLayer::builder()
    ///     .time_window(Duration::from_secs(30))
    ///     .clock(ClockSource::Coarse)
    ///     .build()
    ///     .unwrap();
    /// # drop(layer);
    /// ```
    ///
    /// [`ClockSource::Tokio`]: crate::clock::ClockSource::Tokio
    /// [`ClockSource::Coarse`]: crate::clock::ClockSource::Coarse
    pub fn clock(mut self, source: crate::clock::ClockSource) -> Self {
        self.config.clock = source;
        self
    }

    /// Calls `callback` on every state change (after it happened, outside any lock; it
    /// may use the handle).
    pub fn on_transition(mut self, callback: impl Fn(&Transition) + Send + Sync + 'static) -> Self {
        self.callbacks.push(Arc::new(callback));
        self
    }

    /// Validates the configuration and builds a new breaker's control handle.
    pub fn build_handle(self) -> Result<CircuitBreakerHandle, CircuitBreakerConfigError> {
        self.config.validate()?;
        Ok(CircuitBreakerHandle {
            shared: Arc::new(Shared::new(&self.config, self.callbacks)),
        })
    }

    /// Validates the configuration and builds the layer.
    pub fn build(self) -> Result<CircuitBreakerLayer, CircuitBreakerConfigError> {
        self.build_handle().map(CircuitBreakerLayer::from_handle)
    }
}

/// A service guarded by a circuit breaker. Made by [`CircuitBreakerLayer`].
#[derive(Debug, Clone)]
pub struct CircuitBreaker<S, C = DefaultClassifier, M = ReturnError> {
    inner: S,
    shared: Arc<Shared>,
    classifier: C,
    mode: M,
}

impl<S, C, M> CircuitBreaker<S, C, M> {
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

    /// The control handle of this service's breaker.
    pub fn handle(&self) -> CircuitBreakerHandle {
        CircuitBreakerHandle {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<S, Req, C> Service<Req> for CircuitBreaker<S, C, ReturnError>
where
    S: Service<Req>,
    S::Error: Into<crate::BoxError>,
    C: Classify<S::Response, S::Error> + Clone,
{
    type Response = S::Response;
    type Error = crate::BoxError;
    type Future = ResponseFuture<S::Future, C>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        match self.shared.acquire() {
            Ok(permit) => {
                ResponseFuture::called(self.inner.call(req), permit, self.classifier.clone())
            }
            Err(retry_after) => ResponseFuture::refused(retry_after, self.classifier.clone()),
        }
    }
}

impl<S, Req, C, B> Service<Req> for CircuitBreaker<S, C, Respond>
where
    S: Service<Req, Response = Response<B>>,
    C: Classify<Response<B>, S::Error> + Clone,
{
    type Response = Response<ResponseBody<B>>;
    type Error = S::Error;
    type Future = RespondFuture<S::Future, C, B>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        let format = self.mode.format;
        match self.shared.acquire() {
            Ok(permit) => RespondFuture::called(
                self.inner.call(req),
                permit,
                self.classifier.clone(),
                format,
            ),
            Err(retry_after) => {
                RespondFuture::refused(retry_after, self.classifier.clone(), format)
            }
        }
    }
}
