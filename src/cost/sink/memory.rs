//! An in-memory sink with summaries, for tests, demos and single-process services.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use super::{SinkError, UsageSink};
use crate::cost::record::UsageRecord;
use crate::cost::summary::{self, Subject, Summary, Totals};

/// Keeps the most recent records in memory (bounded; the oldest are evicted and counted).
///
/// ```
/// use std::time::{Duration, SystemTime};
/// use palisade::cost::{Attribution, MemorySink, Subject, UsageRecord, UsageSink, Usage};
/// use palisade::cost::pricing::Money;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let sink = MemorySink::new();
/// let t = SystemTime::UNIX_EPOCH + Duration::from_secs(86_400 * 20_000);
/// let rec = |user: &str, nanos| UsageRecord::new(t, Some("claude-haiku-4-5".into()),
///     Usage { input_tokens: 10, ..Usage::default() }, Some(Money::from_nanos(nanos)))
///     .with_attribution(Attribution::default().with_user(user));
/// sink.record_batch(&[rec("ann", 5), rec("bob", 7), rec("ann", 4)]).await.unwrap();
///
/// let end = t + Duration::from_secs(1);
/// let s = sink.summary(&Subject::User("ann".into()), t, end);
/// assert_eq!(s.total.requests, 2);
/// assert_eq!(s.total.cost, Money::from_nanos(9));
/// assert_eq!(s.by_model["claude-haiku-4-5"].usage.input_tokens, 20);
/// let top = sink.top(1, t, end);
/// assert_eq!(top[0].0, Subject::User("ann".into()));
/// # }
/// ```
#[derive(Debug)]
pub struct MemorySink {
    records: Mutex<VecDeque<UsageRecord>>,
    max_records: usize,
    evicted: AtomicU64,
}

impl Default for MemorySink {
    fn default() -> Self {
        Self::new()
    }
}

impl MemorySink {
    /// A sink keeping up to 100,000 records.
    pub fn new() -> Self {
        Self::with_capacity(100_000)
    }

    /// A sink keeping up to `max_records` records (at least 1).
    pub fn with_capacity(max_records: usize) -> Self {
        Self {
            records: Mutex::new(VecDeque::new()),
            max_records: max_records.max(1),
            evicted: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<UsageRecord>> {
        self.records.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many records are held.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no record is held.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// How many old records were evicted to stay within capacity.
    pub fn evicted(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }

    /// A copy of the records held, oldest first.
    pub fn records(&self) -> Vec<UsageRecord> {
        self.lock().iter().cloned().collect()
    }

    /// Totals, by model and by day, of `subject`'s records with `from <= time < to`.
    pub fn summary(&self, subject: &Subject, from: SystemTime, to: SystemTime) -> Summary {
        summary::summarize(self.lock().iter(), subject, from, to)
    }

    /// The `n` users (or API keys, for records without a user) that cost the most with
    /// `from <= time < to`.
    pub fn top(&self, n: usize, from: SystemTime, to: SystemTime) -> Vec<(Subject, Totals)> {
        summary::top(self.lock().iter(), n, from, to)
    }
}

impl UsageSink for MemorySink {
    async fn record_batch(&self, batch: &[UsageRecord]) -> Result<(), SinkError> {
        let mut records = self.lock();
        for r in batch {
            if records.len() == self.max_records {
                records.pop_front();
                self.evicted.fetch_add(1, Ordering::Relaxed);
            }
            records.push_back(r.clone());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::cost::pricing::Money;
    use crate::cost::record::{Attribution, Completion};
    use crate::cost::usage::Usage;
    use crate::key::ApiKeyId;

    fn rec(day: u64, secs: u64, model: Option<&str>, cost: Option<u128>) -> UsageRecord {
        UsageRecord::new(
            SystemTime::UNIX_EPOCH + Duration::from_secs(day * 86_400 + secs),
            model.map(str::to_owned),
            Usage {
                input_tokens: 100,
                output_tokens: 10,
                ..Usage::default()
            },
            cost.map(Money::from_nanos),
        )
    }

    #[tokio::test]
    async fn summaries_by_model_day_and_top() {
        let sink = MemorySink::new();
        let key = ApiKeyId::from_key("sk-1");
        let ann = Attribution::default().with_user("ann");
        let mut partial = rec(20_001, 5, Some("gpt-4o"), Some(1)).with_attribution(ann.clone());
        partial.completion = Completion::Partial;
        sink.record_batch(&[
            rec(20_000, 10, Some("claude-haiku-4-5"), Some(100)).with_attribution(ann.clone()),
            partial,
            rec(20_001, 6, Some("mystery"), None).with_attribution(ann.clone()),
            rec(20_001, 7, None, Some(1_000))
                .with_attribution(Attribution::default().with_api_key(key)),
            rec(20_001, 8, None, Some(3)),
            rec(20_005, 0, Some("gpt-4o"), Some(1_000_000)).with_attribution(ann.clone()),
        ])
        .await
        .unwrap();
        let from = SystemTime::UNIX_EPOCH + Duration::from_secs(20_000 * 86_400);
        let to = from + Duration::from_secs(2 * 86_400);
        let s = sink.summary(&Subject::User("ann".into()), from, to);
        assert_eq!(s.total.requests, 3);
        assert_eq!(s.total.cost, Money::from_nanos(101));
        assert_eq!(s.total.unpriced, 1);
        assert_eq!(s.total.incomplete, 1);
        assert_eq!(s.total.usage.input_tokens, 300);
        assert_eq!(s.by_model.len(), 3);
        assert_eq!(s.by_model["mystery"].unpriced, 1);
        let days: Vec<String> = s.by_day.keys().map(ToString::to_string).collect();
        assert_eq!(days, ["2024-10-04", "2024-10-05"]);
        assert_eq!(s.by_day.values().map(|t| t.requests).sum::<u64>(), 3);

        let k = sink.summary(&Subject::ApiKey(key), from, to);
        assert_eq!(k.total.cost, Money::from_nanos(1_000));
        assert_eq!(k.by_model["unknown"].requests, 1);

        let top = sink.top(5, from, to);
        assert_eq!(
            top.iter()
                .map(|(s, t)| (s.clone(), t.cost))
                .collect::<Vec<_>>(),
            vec![
                (Subject::ApiKey(key), Money::from_nanos(1_000)),
                (Subject::User("ann".into()), Money::from_nanos(101)),
                (Subject::Anonymous, Money::from_nanos(3)),
            ]
        );
        assert_eq!(sink.top(1, from, to).len(), 1);
        assert_eq!(sink.summary(&Subject::All, from, to).total.requests, 5);
        let json = serde_json::to_value(&s).unwrap();
        assert!(json["by_day"]["2024-10-04"]["requests"] == 1);
    }

    #[tokio::test]
    async fn bounded_with_eviction_count() {
        let sink = MemorySink::with_capacity(2);
        sink.record_batch(&[
            rec(0, 1, None, None),
            rec(0, 2, None, None),
            rec(0, 3, None, None),
        ])
        .await
        .unwrap();
        assert_eq!(sink.len(), 2);
        assert_eq!(sink.evicted(), 1);
        assert_eq!(
            sink.records()[0].time,
            SystemTime::UNIX_EPOCH + Duration::from_secs(2)
        );
    }
}
