//! [`ServiceBuilderExt`]: every palisade layer built and added in one call on tower's
//! [`ServiceBuilder`], the way tower-http's extension trait adds its middleware.
//!
//! ```
//! use std::sync::Arc;
//! use palisade::ServiceBuilderExt;
//! use palisade::cost::{MemorySink, PriceTable, RecorderConfig, UsageRecorder};
//! use palisade::rate_limit::Rule;
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), palisade::BoxError> {
//! let (recorder, _shutdown) =
//!     UsageRecorder::spawn(Arc::new(MemorySink::new()), RecorderConfig::default());
//! let server = ServiceBuilder::new()
//!     .security_headers_api()
//!     .rate_limit_rules([Rule::chat()])?
//!     .cost_meter(PriceTable::builtin(), recorder)
//!     .service(service_fn(|_req: http::Request<String>| async {
//!         Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
//!     }));
//! let request = http::Request::post("/v1/messages")
//!     .header("x-api-key", "sk-ant-example-key-000000")
//!     .body(String::new())?;
//! let response = server.oneshot(request).await?;
//! assert_eq!(response.status(), 200);
//! assert_eq!(response.headers()["x-content-type-options"], "nosniff");
//! # Ok(())
//! # }
//! ```
//!
//! tower's `ServiceBuilder` has inherent `rate_limit` and `retry` methods (its own
//! middleware) which a trait method of the same name could never override, so palisade's
//! methods carry distinct names: `rate_limit_rules`, `llm_retry`, `retry_config`.

use std::sync::Arc;

use tower::ServiceBuilder;
use tower_layer::Stack;

use crate::circuit_breaker::{
    CircuitBreakerConfig, CircuitBreakerConfigError, CircuitBreakerLayer,
};
use crate::cost::{CostMeterLayer, PriceTable, UsageRecorder};
use crate::rate_limit::store::Store;
use crate::rate_limit::{RateLimitConfigError, RateLimitLayer, Rule};
use crate::retry::{RetryConfig, RetryConfigError, RetryLayer};
use crate::security_headers::SecurityHeadersLayer;

mod sealed {
    pub trait Sealed {}
    impl<L> Sealed for tower::ServiceBuilder<L> {}
}

/// Builds palisade's layers on tower's [`ServiceBuilder`]; see the [module
/// docs](crate::service_builder) for a whole server side in five lines.
///
/// Methods that take settings which can be wrong return `Result` with the layer's own
/// configuration error; presets cannot fail.
pub trait ServiceBuilderExt<L>: sealed::Sealed + Sized {
    /// Adds [`SecurityHeadersLayer::api`], the preset for JSON APIs.
    fn security_headers_api(self) -> ServiceBuilder<Stack<SecurityHeadersLayer, L>>;

    /// Adds [`SecurityHeadersLayer::web`], the preset for pages, with a CSP nonce per
    /// response.
    fn security_headers_web(self) -> ServiceBuilder<Stack<SecurityHeadersLayer, L>>;

    /// Adds a [`RateLimitLayer`] with an in-memory store deciding `rules` (for example the
    /// presets [`Rule::chat`], [`Rule::global`]).
    ///
    /// # Errors
    ///
    /// The rules' mistakes (no rule, two rules of one name), as [`RateLimitLayer::new`].
    fn rate_limit_rules(
        self,
        rules: impl IntoIterator<Item = Rule>,
    ) -> Result<ServiceBuilder<Stack<RateLimitLayer, L>>, RateLimitConfigError>;

    /// Adds a rate-limit layer built elsewhere (for example on a Redis store).
    fn rate_limit_with<St: Store>(
        self,
        layer: RateLimitLayer<St>,
    ) -> ServiceBuilder<Stack<RateLimitLayer<St>, L>>;

    /// Adds a [`CostMeterLayer`] pricing usage with `prices` and recording it through
    /// `recorder`, with the default settings.
    fn cost_meter(
        self,
        prices: impl Into<Arc<PriceTable>>,
        recorder: UsageRecorder,
    ) -> ServiceBuilder<Stack<CostMeterLayer, L>>;

    /// Adds [`RetryLayer::llm`], the retry preset for LLM APIs.
    fn llm_retry(self) -> ServiceBuilder<Stack<RetryLayer, L>>;

    /// Adds a [`RetryLayer`] built from `config`.
    ///
    /// # Errors
    ///
    /// The setting that does not validate, as [`RetryLayer::from_config`].
    fn retry_config(
        self,
        config: RetryConfig,
    ) -> Result<ServiceBuilder<Stack<RetryLayer, L>>, RetryConfigError>;

    /// Adds [`CircuitBreakerLayer::llm`], the breaker preset for LLM upstreams.
    fn llm_circuit_breaker(self) -> ServiceBuilder<Stack<CircuitBreakerLayer, L>>;

    /// Adds a [`CircuitBreakerLayer`] built from `config`.
    ///
    /// # Errors
    ///
    /// The setting that does not validate, as [`CircuitBreakerLayer::from_config`].
    fn circuit_breaker(
        self,
        config: CircuitBreakerConfig,
    ) -> Result<ServiceBuilder<Stack<CircuitBreakerLayer, L>>, CircuitBreakerConfigError>;
}

impl<L> ServiceBuilderExt<L> for ServiceBuilder<L> {
    fn security_headers_api(self) -> ServiceBuilder<Stack<SecurityHeadersLayer, L>> {
        self.layer(SecurityHeadersLayer::api())
    }

    fn security_headers_web(self) -> ServiceBuilder<Stack<SecurityHeadersLayer, L>> {
        self.layer(SecurityHeadersLayer::web())
    }

    fn rate_limit_rules(
        self,
        rules: impl IntoIterator<Item = Rule>,
    ) -> Result<ServiceBuilder<Stack<RateLimitLayer, L>>, RateLimitConfigError> {
        Ok(self.layer(RateLimitLayer::new(rules)?))
    }

    fn rate_limit_with<St: Store>(
        self,
        layer: RateLimitLayer<St>,
    ) -> ServiceBuilder<Stack<RateLimitLayer<St>, L>> {
        self.layer(layer)
    }

    fn cost_meter(
        self,
        prices: impl Into<Arc<PriceTable>>,
        recorder: UsageRecorder,
    ) -> ServiceBuilder<Stack<CostMeterLayer, L>> {
        self.layer(CostMeterLayer::new(prices, recorder))
    }

    fn llm_retry(self) -> ServiceBuilder<Stack<RetryLayer, L>> {
        self.layer(RetryLayer::llm())
    }

    fn retry_config(
        self,
        config: RetryConfig,
    ) -> Result<ServiceBuilder<Stack<RetryLayer, L>>, RetryConfigError> {
        Ok(self.layer(RetryLayer::from_config(config)?))
    }

    fn llm_circuit_breaker(self) -> ServiceBuilder<Stack<CircuitBreakerLayer, L>> {
        self.layer(CircuitBreakerLayer::llm())
    }

    fn circuit_breaker(
        self,
        config: CircuitBreakerConfig,
    ) -> Result<ServiceBuilder<Stack<CircuitBreakerLayer, L>>, CircuitBreakerConfigError> {
        Ok(self.layer(CircuitBreakerLayer::from_config(config)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BoxError;
    use bytes::Bytes;
    use http_body_util::Full;
    use tower::{ServiceExt, service_fn};

    #[tokio::test]
    async fn client_side_presets_stack_over_an_upstream() {
        let upstream = service_fn(
            |_req: http::Request<crate::retry::ReplayBody<Full<Bytes>>>| async {
                Ok::<_, BoxError>(http::Response::new(Full::new(Bytes::from_static(b"ok"))))
            },
        );
        let client = ServiceBuilder::new()
            .llm_retry()
            .llm_circuit_breaker()
            .service(upstream);
        let response = client
            .oneshot(http::Request::new(Full::new(Bytes::new())))
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }

    #[test]
    fn settings_that_can_be_wrong_return_the_layers_own_error() {
        let twice = [Rule::chat(), Rule::chat()];
        let err = ServiceBuilder::new().rate_limit_rules(twice).unwrap_err();
        assert!(
            matches!(err, RateLimitConfigError::DuplicateRule { .. }),
            "{err:?}"
        );
        let breaker = CircuitBreakerConfig {
            failure_rate_threshold: 50.0, // a percentage, not a fraction
            ..CircuitBreakerConfig::default()
        };
        assert!(ServiceBuilder::new().circuit_breaker(breaker).is_err());
    }
}
