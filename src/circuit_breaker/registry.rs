//! Many breakers by name (one per upstream host, per model), bounded, with a health report.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use http::{HeaderName, Request, Response};
use serde::{Deserialize, Serialize};
use tower_layer::Layer;
use tower_service::Service;

use super::config::{CircuitBreakerConfig, CircuitBreakerConfigError};
use super::future::ResponseFuture;
use super::layer::CircuitBreakerLayer;
use super::state::{
    Callback, CircuitBreakerHandle, CircuitSnapshot, CircuitState, Shared, Transition,
};
use crate::classify::{Classify, DefaultClassifier};

/// Breakers by key, all built from one template configuration, at most `max_breakers` of
/// them.
///
/// When a new key would exceed the bound, the least recently used breaker that is idle
/// (closed, and held by nobody but the registry) is evicted; failing that, the least
/// recently used closed one; failing that, the least recently used of all. An open breaker
/// is thus forgotten last. Cheap to clone; clones share the breakers.
///
/// ```
/// use palisade::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerRegistry, CircuitState};
///
/// let registry = CircuitBreakerRegistry::new(CircuitBreakerConfig::default(), 100).unwrap();
/// let anthropic = registry.handle("api.anthropic.com");
/// registry.handle("api.openai.com").force_open();
/// assert!(anthropic.same_breaker(&registry.handle("api.anthropic.com")));
///
/// let health = registry.health();
/// assert!(!health.healthy);
/// assert_eq!(health.breakers.len(), 2);
/// assert_eq!(health.breakers[1].state, CircuitState::ForcedOpen);
/// let json = serde_json::to_value(&health).unwrap();
/// assert_eq!(json["breakers"][0]["name"], "api.anthropic.com");
/// ```
#[derive(Clone, Debug)]
pub struct CircuitBreakerRegistry {
    inner: Arc<Inner>,
}

struct Inner {
    template: CircuitBreakerConfig,
    max: usize,
    callbacks: Mutex<Vec<Callback>>,
    map: Mutex<HashMap<Arc<str>, Entry>>,
    tick: AtomicU64,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CircuitBreakerRegistry")
            .field("template", &self.template)
            .field("max", &self.max)
            .finish_non_exhaustive()
    }
}

struct Entry {
    handle: CircuitBreakerHandle,
    last_used: u64,
}

/// The health of every breaker in a registry, ready to serve as JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RegistryHealth {
    /// `true` when no breaker refuses calls (none open, half-open or forced open).
    pub healthy: bool,
    /// How many breakers refuse some or all calls.
    pub open: usize,
    /// Every breaker, sorted by name.
    pub breakers: Vec<CircuitSnapshot>,
}

impl CircuitBreakerRegistry {
    /// A registry whose breakers are configured by `template` (its `name` is replaced by
    /// each key), holding at most `max_breakers`.
    pub fn new(
        template: CircuitBreakerConfig,
        max_breakers: usize,
    ) -> Result<Self, CircuitBreakerConfigError> {
        template.validate()?;
        if max_breakers == 0 {
            return Err(CircuitBreakerConfigError::RegistrySize);
        }
        Ok(Self {
            inner: Arc::new(Inner {
                template,
                max: max_breakers,
                callbacks: Mutex::new(Vec::new()),
                map: Mutex::new(HashMap::new()),
                tick: AtomicU64::new(0),
            }),
        })
    }

    /// Calls `callback` on every state change of every breaker created from now on.
    #[must_use]
    pub fn on_transition(self, callback: impl Fn(&Transition) + Send + Sync + 'static) -> Self {
        self.inner
            .callbacks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Arc::new(callback));
        self
    }

    /// The breaker for `key`, created if needed.
    pub fn handle(&self, key: &str) -> CircuitBreakerHandle {
        let tick = self.inner.tick.fetch_add(1, Ordering::Relaxed);
        let mut map = self
            .inner
            .map
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(entry) = map.get_mut(key) {
            entry.last_used = tick;
            return entry.handle.clone();
        }
        if map.len() >= self.inner.max {
            evict(&mut map);
        }
        let mut config = self.inner.template.clone();
        config.name = key.to_owned();
        let callbacks = self
            .inner
            .callbacks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        // The template was validated in `new`; the name plays no part in validity.
        let handle = CircuitBreakerHandle {
            shared: Arc::new(Shared::new(&config, callbacks)),
        };
        map.insert(
            Arc::from(key),
            Entry {
                handle: handle.clone(),
                last_used: tick,
            },
        );
        handle
    }

    /// The breaker for `key`, if the registry holds one.
    pub fn get(&self, key: &str) -> Option<CircuitBreakerHandle> {
        let map = self
            .inner
            .map
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        map.get(key).map(|e| e.handle.clone())
    }

    /// Forgets the breaker for `key` (services already holding it keep using it).
    pub fn remove(&self, key: &str) -> Option<CircuitBreakerHandle> {
        let mut map = self
            .inner
            .map
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        map.remove(key).map(|e| e.handle)
    }

    /// How many breakers the registry holds.
    pub fn len(&self) -> usize {
        self.inner
            .map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Whether the registry holds no breaker.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A layer guarding a service with the breaker for `key`.
    pub fn layer(&self, key: &str) -> CircuitBreakerLayer {
        CircuitBreakerLayer::from_handle(self.handle(key))
    }

    /// A layer that picks the breaker for each request by `key` (for example the
    /// upstream host), so one client stack keeps one breaker per upstream.
    pub fn keyed_layer(&self, key: BreakerKey) -> KeyedCircuitBreakerLayer {
        KeyedCircuitBreakerLayer {
            registry: self.clone(),
            key,
            classifier: DefaultClassifier::new(),
        }
    }

    /// A snapshot of every breaker.
    pub fn health(&self) -> RegistryHealth {
        let handles: Vec<CircuitBreakerHandle> = {
            let map = self
                .inner
                .map
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            map.values().map(|e| e.handle.clone()).collect()
        };
        let mut breakers: Vec<CircuitSnapshot> = handles.iter().map(|h| h.snapshot()).collect();
        breakers.sort_by(|a, b| a.name.cmp(&b.name));
        let open = breakers
            .iter()
            .filter(|s| {
                matches!(
                    s.state,
                    CircuitState::Open | CircuitState::HalfOpen | CircuitState::ForcedOpen
                )
            })
            .count();
        RegistryHealth {
            healthy: open == 0,
            open,
            breakers,
        }
    }
}

fn evict(map: &mut HashMap<Arc<str>, Entry>) {
    let closed = |e: &Entry| {
        matches!(
            e.handle.state(),
            CircuitState::Closed | CircuitState::MetricsOnly | CircuitState::ForcedClosed
        )
    };
    let idle = |e: &Entry| closed(e) && Arc::strong_count(&e.handle.shared) == 1;
    let pick = |filter: &dyn Fn(&Entry) -> bool| {
        map.iter()
            .filter(|(_, e)| filter(e))
            .min_by_key(|(_, e)| e.last_used)
            .map(|(k, _)| Arc::clone(k))
    };
    let victim = pick(&idle)
        .or_else(|| pick(&closed))
        .or_else(|| pick(&|_| true));
    if let Some(key) = victim {
        tracing::debug!(breaker = %key, "circuit breaker evicted from a full registry");
        map.remove(&key);
    }
}

/// How a [`KeyedCircuitBreakerLayer`] names the breaker of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum BreakerKey {
    /// The request URI's host (`api.anthropic.com`); requests without one use `"default"`.
    Host,
    /// The request URI's authority (host and port).
    Authority,
    /// The value of a header (for example one that names the model); requests without it
    /// use `"default"`.
    Header(HeaderName),
}

impl BreakerKey {
    fn of<'a, B>(&self, req: &'a Request<B>) -> &'a str {
        let key = match self {
            BreakerKey::Host => req.uri().host(),
            BreakerKey::Authority => req.uri().authority().map(|a| a.as_str()),
            BreakerKey::Header(name) => req.headers().get(name).and_then(|v| v.to_str().ok()),
        };
        key.unwrap_or("default")
    }
}

/// Guards each request with the registry's breaker for its key. Made by
/// [`CircuitBreakerRegistry::keyed_layer`].
///
/// A lookup takes the registry's lock for a hash-map access; use a plain
/// [`CircuitBreakerLayer`] per upstream where the upstreams are known in advance.
#[derive(Debug, Clone)]
#[must_use]
pub struct KeyedCircuitBreakerLayer<C = DefaultClassifier> {
    registry: CircuitBreakerRegistry,
    key: BreakerKey,
    classifier: C,
}

impl<C> KeyedCircuitBreakerLayer<C> {
    /// Judges calls with `classifier` instead of the default.
    pub fn classifier<C2>(self, classifier: C2) -> KeyedCircuitBreakerLayer<C2> {
        KeyedCircuitBreakerLayer {
            registry: self.registry,
            key: self.key,
            classifier,
        }
    }
}

impl<S, C: Clone> Layer<S> for KeyedCircuitBreakerLayer<C> {
    type Service = KeyedCircuitBreaker<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        KeyedCircuitBreaker {
            inner,
            registry: self.registry.clone(),
            key: self.key.clone(),
            classifier: self.classifier.clone(),
        }
    }
}

/// A service whose requests are guarded by one breaker per key.
#[derive(Debug, Clone)]
pub struct KeyedCircuitBreaker<S, C = DefaultClassifier> {
    inner: S,
    registry: CircuitBreakerRegistry,
    key: BreakerKey,
    classifier: C,
}

impl<S, C> KeyedCircuitBreaker<S, C> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, B, ResB, C> Service<Request<B>> for KeyedCircuitBreaker<S, C>
where
    S: Service<Request<B>, Response = Response<ResB>>,
    S::Error: Into<crate::BoxError>,
    C: Classify<Response<ResB>, S::Error> + Clone,
{
    type Response = S::Response;
    type Error = crate::BoxError;
    type Future = ResponseFuture<S::Future, C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let handle = self.registry.handle(self.key.of(&req));
        match handle.shared.acquire() {
            Ok(permit) => {
                ResponseFuture::called(self.inner.call(req), permit, self.classifier.clone())
            }
            Err(retry_after) => ResponseFuture::refused(retry_after, self.classifier.clone()),
        }
    }
}
