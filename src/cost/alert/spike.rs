//! Spend spikes: a subject's spend in the last window against its trailing average.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::{AlertEvent, AlertKind, AlertSink};
use crate::cost::budget::{Scope, unix_millis};
use crate::cost::pricing::Money;
use crate::cost::record::UsageRecord;
use crate::cost::sink::{SinkError, UsageSink};

/// When spend counts as a spike.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct SpikeConfig {
    /// Whose spend is watched.
    pub scope: Scope,
    /// The recent window (and the length of each trailing window).
    #[serde(with = "crate::config::duration")]
    pub window: Duration,
    /// How many windows before the recent one make the trailing average.
    pub trailing_windows: u32,
    /// The recent window's spend must exceed this many times the trailing average.
    pub multiple: f64,
    /// ... and be at least this much (dollars, decimal text), so a first small request is
    /// no spike.
    pub min_spend: String,
}

impl Default for SpikeConfig {
    fn default() -> Self {
        Self {
            scope: Scope::User,
            window: Duration::from_secs(300),
            trailing_windows: 12,
            multiple: 3.0,
            min_spend: "1".to_owned(),
        }
    }
}

#[derive(Debug, Default)]
struct History {
    /// (window number, spend) of the recent and trailing windows, oldest first.
    windows: Vec<(u64, u128)>,
    /// The window a spike was last raised in.
    fired: Option<u64>,
    /// The first window this subject spent in: the average covers no more than its
    /// history, and a subject without history raises no spike.
    first: u64,
}

/// Watches spend per subject and raises [`AlertKind::Spike`] once per window when the
/// recent window's spend exceeds `multiple` × the trailing average (and `min_spend`).
/// The average covers the trailing windows since the subject's first spend (empty ones
/// count as 0); a subject with no earlier window raises nothing.
///
/// ```
/// use std::sync::Arc;
/// use std::time::{Duration, UNIX_EPOCH};
/// use palisade::cost::alert::{MemoryAlertSink, SpikeConfig, SpikeDetector};
/// use palisade::cost::Money;
///
/// let alerts = Arc::new(MemoryAlertSink::default());
/// let spikes = SpikeDetector::new(SpikeConfig::default(), Arc::clone(&alerts)).unwrap();
/// let t0 = UNIX_EPOCH + Duration::from_secs(1_700_000_100);
/// for w in 0..12u64 { // an hour of $0.50 every five minutes
///     spikes.observe("ann", t0 + Duration::from_secs(300 * w), Money::parse_dollars("0.5").unwrap());
/// }
/// let now = t0 + Duration::from_secs(300 * 12);
/// spikes.observe("ann", now, Money::parse_dollars("2").unwrap()); // 4× the average
/// spikes.observe("ann", now, Money::parse_dollars("2").unwrap()); // same window: no storm
/// assert_eq!(alerts.events().len(), 1);
/// ```
pub struct SpikeDetector {
    scope: Scope,
    window_ms: u64,
    trailing: u64,
    multiple_milli: u128,
    min_spend: u128,
    sink: Arc<dyn AlertSink>,
    subjects: Mutex<Subjects>,
}

/// Subjects held before quiet ones are pruned; past it, pruning runs again only once the
/// map has doubled from what the last pruning kept (amortized O(1) per observation).
const MAX_SUBJECTS: usize = 100_000;

#[derive(Debug)]
struct Subjects {
    map: HashMap<String, History>,
    /// The size at which the next pruning runs.
    prune_at: usize,
    /// Subjects looked at by pruning, all told.
    scanned: u64,
}

impl Subjects {
    fn new(bound: usize) -> Self {
        Self {
            map: HashMap::new(),
            prune_at: bound,
            scanned: 0,
        }
    }
}

impl std::fmt::Debug for SpikeDetector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpikeDetector")
            .field("scope", &self.scope)
            .field("window_ms", &self.window_ms)
            .finish_non_exhaustive()
    }
}

impl SpikeDetector {
    /// A detector raising events to `sink`, or what is wrong with `config`.
    pub fn new(config: SpikeConfig, sink: impl AlertSink) -> Result<Self, String> {
        let window_ms = u64::try_from(config.window.as_millis()).unwrap_or(u64::MAX);
        if window_ms == 0 {
            return Err("window must be longer than 0".into());
        }
        if config.trailing_windows == 0 {
            return Err("trailing_windows must be at least 1".into());
        }
        if !(config.multiple.is_finite() && config.multiple >= 1.0) {
            return Err(format!("multiple {} must be a number ≥ 1", config.multiple));
        }
        let min_spend = Money::parse_dollars(&config.min_spend)
            .map_err(|e| format!("min_spend: {e}"))?
            .picos();
        Ok(Self {
            scope: config.scope,
            window_ms,
            trailing: u64::from(config.trailing_windows),
            multiple_milli: (config.multiple * 1000.0).round() as u128,
            min_spend,
            sink: Arc::new(sink),
            subjects: Mutex::new(Subjects::new(MAX_SUBJECTS)),
        })
    }

    /// Adds `cost` spent by `subject` at `time`, raising a spike event if it makes one.
    pub fn observe(&self, subject: &str, time: SystemTime, cost: Money) {
        let w = unix_millis(time) / self.window_ms;
        let mut subjects = self
            .subjects
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let s = &mut *subjects;
        if s.map.len() >= s.prune_at {
            let horizon = w.saturating_sub(self.trailing + 1);
            s.scanned += s.map.len() as u64;
            s.map
                .retain(|_, h| h.windows.last().is_some_and(|&(x, _)| x >= horizon));
            s.prune_at = MAX_SUBJECTS.max(s.map.len().saturating_mul(2));
        }
        let h = s.map.entry(subject.to_owned()).or_insert_with(|| History {
            first: w,
            ..History::default()
        });
        match h.windows.iter_mut().find(|(x, _)| *x == w) {
            Some((_, v)) => *v = v.saturating_add(cost.picos()),
            None => {
                h.windows.push((w, cost.picos()));
                h.windows.sort_unstable_by_key(|&(x, _)| x);
            }
        }
        let oldest = w.saturating_sub(self.trailing);
        h.windows.retain(|&(x, _)| x >= oldest);
        let recent: u128 = h
            .windows
            .iter()
            .filter(|&&(x, _)| x == w)
            .map(|&(_, v)| v)
            .sum();
        let trailing: u128 = h
            .windows
            .iter()
            .filter(|&&(x, _)| x < w)
            .map(|&(_, v)| v)
            .sum();
        let trailing_n = u128::from(self.trailing.min(w.saturating_sub(h.first)));
        // recent > multiple × trailing / n, in integers
        let spike = trailing_n > 0
            && recent >= self.min_spend
            && recent.saturating_mul(1000).saturating_mul(trailing_n)
                > self.multiple_milli.saturating_mul(trailing);
        if spike && h.fired != Some(w) {
            h.fired = Some(w);
            let average = trailing / trailing_n;
            let multiple = if average == 0 {
                f64::INFINITY
            } else {
                recent as f64 / average as f64
            };
            drop(subjects);
            self.sink.send(AlertEvent {
                kind: AlertKind::Spike { multiple },
                source: format!("spike:{}", self.scope.as_str()),
                subject: format!("{}:{subject}", self.scope.as_str()),
                spent: Money::from_picos(recent),
                reference: Money::from_picos(average),
                time,
            });
        }
    }

    /// Observes a usage record under the detector's scope (records without a cost or
    /// without a subject of that scope are skipped).
    pub fn observe_record(&self, record: &UsageRecord) {
        let Some(cost) = record.cost else { return };
        let a = &record.attribution;
        let subject = match self.scope {
            Scope::Global => Some("*".to_owned()),
            Scope::User => a.user.clone(),
            Scope::Bot => a.bot.clone(),
            Scope::ApiKey => a.api_key.map(|k| k.to_string()),
        };
        if let Some(s) = subject {
            self.observe(&s, record.time, cost);
        }
    }
}

/// A [`UsageSink`] that passes each batch to an inner sink and, once stored, to a
/// [`SpikeDetector`]: spike detection runs on the recorder's background task, off the
/// request path.
#[derive(Debug)]
pub struct SpikeSink<S> {
    inner: S,
    detector: Arc<SpikeDetector>,
}

impl<S> SpikeSink<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, detector: Arc<SpikeDetector>) -> Self {
        Self { inner, detector }
    }
}

impl<S: UsageSink> UsageSink for SpikeSink<S> {
    async fn record_batch(&self, batch: &[UsageRecord]) -> Result<(), SinkError> {
        self.inner.record_batch(batch).await?;
        batch.iter().for_each(|r| self.detector.observe_record(r));
        Ok(())
    }

    async fn flush(&self) -> Result<(), SinkError> {
        self.inner.flush().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cost::alert::MemoryAlertSink;
    use std::time::UNIX_EPOCH;

    fn d(s: &str) -> Money {
        Money::parse_dollars(s).unwrap()
    }

    #[test]
    fn steady_spend_is_no_spike_and_a_burst_is_one() {
        let alerts = Arc::new(MemoryAlertSink::default());
        let det = SpikeDetector::new(SpikeConfig::default(), Arc::clone(&alerts)).unwrap();
        let t0 = UNIX_EPOCH + Duration::from_secs(1_700_000_100);
        for w in 0..24u64 {
            det.observe("ann", t0 + Duration::from_secs(300 * w), d("1"));
        }
        assert!(alerts.events().is_empty(), "{:?}", alerts.events());
        let now = t0 + Duration::from_secs(300 * 24);
        det.observe("ann", now, d("2.5")); // 2.5 x the average of 1
        assert!(alerts.events().is_empty());
        det.observe("ann", now, d("1")); // 3.5 x
        assert_eq!(alerts.events().len(), 1);
        det.observe("ann", now, d("5"));
        assert_eq!(alerts.events().len(), 1, "once per window");
        let e = &alerts.events()[0];
        assert_eq!(e.subject, "user:ann");
        assert_eq!(e.spent, d("3.5"));
        assert_eq!(e.reference, d("1"));
        // another subject is independent
        det.observe("bob", now, d("0.5"));
        assert_eq!(alerts.events().len(), 1, "below min_spend");
    }

    /// Past 100 000 subjects, every observation scanned them all, even when none was
    /// quiet: O(n) per request under a flood of distinct subjects.
    #[test]
    fn a_flood_of_subjects_is_pruned_in_amortized_constant_time() {
        let det = SpikeDetector::new(SpikeConfig::default(), MemoryAlertSink::default()).unwrap();
        let t0 = UNIX_EPOCH + Duration::from_secs(1_700_000_100);
        let n = MAX_SUBJECTS as u64 + 20_000;
        for i in 0..n {
            det.observe(&format!("u{i}"), t0, d("0.01"));
        }
        let s = det.subjects.lock().unwrap();
        assert_eq!(s.map.len() as u64, n, "every subject is live");
        assert!(
            s.scanned <= 2 * n,
            "{} subjects scanned for {n} observations",
            s.scanned
        );
        drop(s);
        // quiet subjects still go once the map passes the bound again
        let later = t0 + Duration::from_secs(86_400);
        for i in 0..2 * n {
            det.observe(&format!("v{i}"), later, d("0.01"));
        }
        assert!(det.subjects.lock().unwrap().map.len() < 3 * n as usize);
    }
}
