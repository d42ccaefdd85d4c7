//! ```
//! use std::sync::Arc;
//! use palisade::cost::alert::{AlertEvent, AlertKind, AlertSink, MemoryAlertSink};
//! use palisade::cost::Money;
//!
//! let sink = Arc::new(MemoryAlertSink::default());
//! sink.send(AlertEvent::threshold("daily", "user:ann", 800, Money::from_nanos(8), Money::from_nanos(10)));
//! let events = sink.events();
//! assert_eq!(events[0].kind, AlertKind::Threshold { ratio: 0.8 });
//! assert_eq!(events[0].to_json()["spent_usd"], "0.000000008");
//! ```
//!
//! Cost alerts: budget thresholds and spend spikes, raised once per period per subject,
//! delivered through an [`AlertSink`].
//!
//! - **Thresholds**: a [`Budget`](super::budget::Budget) raises an
//!   [`AlertKind::Threshold`] event the first time an account's settled spend reaches each
//!   of its thresholds (50 %, 80 % and 100 % of the limit by default) in a period. A
//!   calendar budget re-arms them when the next day or month starts; a rolling one when
//!   spend falls back below.
//! - **Spikes**: a [`SpikeDetector`] compares each subject's spend in the last few minutes
//!   with its trailing average and raises [`AlertKind::Spike`] once per window.
//! - **Circuit breakers**: [`AlertEvent::circuit_opened`] makes the event a service raises
//!   when a breaker in front of an upstream opens (from its transition callback).
//! - **Sinks**: [`TracingAlertSink`] logs each event; [`WebhookSink`] (feature `hyper-util`, on by default) POSTs it as JSON
//!   from a background task with a timeout, retries and a bounded queue, so a slow or dead
//!   receiver never slows a request (a full queue drops the event and counts it).

mod spike;
#[cfg(feature = "hyper-util")]
mod webhook;

use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

pub use spike::{SpikeConfig, SpikeDetector, SpikeSink};
#[cfg(feature = "hyper-util")]
#[cfg_attr(docsrs, doc(cfg(feature = "hyper-util")))]
pub use webhook::{WebhookConfig, WebhookSink, WebhookStats};

use super::pricing::Money;

/// What an alert is about.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum AlertKind {
    /// Settled spend reached this fraction (0–1) of a budget's limit.
    Threshold {
        /// The threshold, a fraction of the limit.
        ratio: f64,
    },
    /// Spend in the recent window exceeded `multiple` times the trailing average of a
    /// window of the same length.
    Spike {
        /// How many times the trailing average the recent spend was.
        multiple: f64,
    },
    /// A circuit breaker in front of an upstream opened: calls to it stop for a while.
    /// `source` names the breaker; `spent` and `reference` are zero.
    CircuitOpened {
        /// How long the circuit stays open before it probes the upstream, in milliseconds.
        open_for_ms: u64,
    },
}

/// One alert.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct AlertEvent {
    /// What happened.
    pub kind: AlertKind,
    /// The budget's name (threshold alerts) or the spike detector's scope.
    pub source: String,
    /// Whom it is about, `scope:id` (`user:ann`, `api_key:3f…`, `bot:support`, `global:*`).
    pub subject: String,
    /// Spend that triggered it: the period's settled spend, or the recent window's.
    pub spent: Money,
    /// The budget's limit, or the trailing average for a spike.
    pub reference: Money,
    /// When it was raised.
    pub time: SystemTime,
}

impl AlertEvent {
    /// A threshold event: `permille` thousandths of `limit` reached with `spent`.
    pub fn threshold(
        budget: impl Into<String>,
        subject: impl Into<String>,
        permille: u16,
        spent: Money,
        limit: Money,
    ) -> Self {
        Self {
            kind: AlertKind::Threshold {
                ratio: f64::from(permille) / 1000.0,
            },
            source: budget.into(),
            subject: subject.into(),
            spent,
            reference: limit,
            time: SystemTime::now(),
        }
    }

    /// A circuit-opened event: the breaker `breaker` opened for `open_for`.
    pub fn circuit_opened(breaker: impl Into<String>, open_for: std::time::Duration) -> Self {
        let breaker = breaker.into();
        Self {
            kind: AlertKind::CircuitOpened {
                open_for_ms: u64::try_from(open_for.as_millis()).unwrap_or(u64::MAX),
            },
            subject: format!("upstream:{breaker}"),
            source: breaker,
            spent: Money::ZERO,
            reference: Money::ZERO,
            time: SystemTime::now(),
        }
    }

    /// The event as the JSON document the webhook sink posts:
    /// `{"kind":"threshold","ratio":0.8,"source":"daily","subject":"user:ann",
    /// "spent_usd":"4","reference_usd":"5","time_ms":…}`.
    pub fn to_json(&self) -> serde_json::Value {
        let mut doc = serde_json::to_value(self.kind).unwrap_or_default();
        if let Some(map) = doc.as_object_mut() {
            map.insert("source".into(), self.source.clone().into());
            map.insert("subject".into(), self.subject.clone().into());
            map.insert("spent_usd".into(), self.spent.dollars_string().into());
            map.insert(
                "reference_usd".into(),
                self.reference.dollars_string().into(),
            );
            map.insert(
                "time_ms".into(),
                super::budget::unix_millis(self.time).into(),
            );
        }
        doc
    }
}

/// Receives alert events. `send` is called on the request path (when a response settles
/// its budget): it must return at once, handing slow work to a background task.
pub trait AlertSink: Send + Sync + 'static {
    /// Delivers (or queues) one event.
    fn send(&self, event: AlertEvent);
}

impl<S: AlertSink + ?Sized> AlertSink for Arc<S> {
    fn send(&self, event: AlertEvent) {
        (**self).send(event);
    }
}

/// Logs each event at `warn` under the `palisade::cost::alert` target.
#[derive(Debug, Clone, Copy, Default)]
pub struct TracingAlertSink;

impl AlertSink for TracingAlertSink {
    fn send(&self, event: AlertEvent) {
        match event.kind {
            AlertKind::Threshold { ratio } => tracing::warn!(target: "palisade::cost::alert",
                budget = %event.source, subject = %event.subject, ratio,
                spent = %event.spent, limit = %event.reference, "budget threshold reached"),
            AlertKind::Spike { multiple } => tracing::warn!(target: "palisade::cost::alert",
                scope = %event.source, subject = %event.subject, multiple,
                spent = %event.spent, trailing_average = %event.reference, "spend spike"),
            AlertKind::CircuitOpened { open_for_ms } => {
                tracing::warn!(target: "palisade::cost::alert",
                breaker = %event.source, subject = %event.subject, open_for_ms, "circuit breaker opened")
            }
        }
    }
}

/// Keeps every event in memory (for tests and dashboards).
#[derive(Debug, Default)]
pub struct MemoryAlertSink {
    events: Mutex<Vec<AlertEvent>>,
}

impl MemoryAlertSink {
    /// A copy of the events received so far.
    pub fn events(&self) -> Vec<AlertEvent> {
        self.events
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

impl AlertSink for MemoryAlertSink {
    fn send(&self, event: AlertEvent) {
        self.events
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(event);
    }
}
