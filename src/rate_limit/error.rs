//! The rate limiter's errors, one type per concern: configuration
//! ([`RateLimitConfigError`]), the admin handle ([`AdminError`]), the store
//! ([`StoreError`]), and parsing a route, key source or network.

use std::error::Error as StdError;

/// A rate-limit configuration mistake, reported when the layer is built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RateLimitConfigError {
    /// Two rules have the same name.
    #[error("two rate-limit rules are named `{rule}`; rule names must be unique")]
    DuplicateRule {
        /// The name.
        rule: String,
    },
    /// A rule name is empty or not printable ASCII without `"` and `\`.
    #[error(
        "rate-limit rule name `{rule}` must be non-empty printable ASCII without spaces, `\"` or `\\`"
    )]
    InvalidName {
        /// The name.
        rule: String,
    },
    /// A quota of 0 units.
    #[error("rate-limit rule `{rule}` has a limit of 0; use at least 1")]
    ZeroLimit {
        /// The rule.
        rule: String,
    },
    /// A window shorter than one microsecond.
    #[error("rate-limit rule `{rule}` has an empty window; use at least 1ms")]
    ZeroWindow {
        /// The rule.
        rule: String,
    },
    /// A GCRA burst of 0.
    #[error("rate-limit rule `{rule}` has a burst of 0; use at least 1")]
    ZeroBurst {
        /// The rule.
        rule: String,
    },
    /// `strict` on an algorithm other than the sliding window.
    #[error("rate-limit rule `{rule}`: `strict` only applies to the sliding_window algorithm")]
    StrictNeedsSlidingWindow {
        /// The rule.
        rule: String,
    },
    /// A route, method, key source or proxy list that does not parse.
    #[error("rate-limit rule `{rule}`: {field} is invalid: {reason}")]
    Invalid {
        /// The rule (or `*` for layer-wide settings).
        rule: String,
        /// The field.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// A memory store with room for no entries.
    #[error("the rate-limit memory store needs max_entries of at least 1")]
    ZeroCapacity,
    /// A memory store's reset retention shorter than a millisecond or longer than a day.
    #[error(
        "the rate-limit memory store's reset retention must be from 1ms to 24h; set it to the longest a request may run (default 1h)"
    )]
    InvalidResetRetention,
}

/// A store could not decide (a network error, a script error). The memory store never
/// fails; remote stores do.
#[derive(Debug, thiserror::Error)]
#[error("rate-limit store failed: {message}")]
pub struct StoreError {
    message: String,
    #[source]
    source: Option<Box<dyn StdError + Send + Sync>>,
}

impl StoreError {
    /// A store error with a message (it may reach logs, never responses).
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            source: None,
        }
    }

    /// With the underlying error.
    #[must_use]
    pub fn with_source(mut self, source: impl Into<Box<dyn StdError + Send + Sync>>) -> Self {
        self.source = Some(source.into());
        self
    }
}

/// An admin call ([`RateLimiter`](super::RateLimiter)) failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    /// The call named a rule the layer does not have.
    #[error("no rate-limit rule is named `{rule}`")]
    UnknownRule {
        /// The name given.
        rule: String,
    },
    /// An override's quota is not valid (a limit, window or burst of 0).
    #[error(transparent)]
    InvalidQuota(#[from] RateLimitConfigError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A route that does not parse (see [`Route::parse`](super::Route::parse)).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ParseRouteError(pub(crate) String);

/// A key source that does not parse (see [`KeySource`](super::KeySource)'s `FromStr`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ParseKeySourceError(pub(crate) String);

/// An IP network or proxy list that does not parse (see [`IpNet`](super::IpNet) and
/// [`TrustedProxies`](super::TrustedProxies)).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ParseIpNetError(pub(crate) String);
