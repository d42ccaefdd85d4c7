//! Totals over usage records: per subject, by model and by day, and the top spenders.
//!
//! Used by [`MemorySink`](super::MemorySink); the functions take any iterator of records so
//! other sinks can reuse them.
//!
//! ```
//! use std::time::{Duration, SystemTime};
//! use palisade::cost::summary::{summarize, top, Subject};
//! use palisade::cost::{Attribution, Money, Usage, UsageRecord};
//!
//! let day = SystemTime::UNIX_EPOCH + Duration::from_secs(20_417 * 86_400); // 2025-11-25
//! let usage = Usage { input_tokens: 100, output_tokens: 20, ..Usage::default() };
//! let records = vec![
//!     UsageRecord::new(day, Some("gpt-4o".into()), usage, Some(Money::from_nanos(450)))
//!         .with_attribution(Attribution::default().with_user("ann")),
//!     UsageRecord::new(day, Some("mystery".into()), usage, None)
//!         .with_attribution(Attribution::default().with_user("ann")),
//! ];
//! let to = day + Duration::from_secs(86_400);
//! let s = summarize(&records, &Subject::User("ann".into()), day, to);
//! assert_eq!(s.total.requests, 2);
//! assert_eq!(s.total.unpriced, 1); // tokens counted, cost unknown
//! assert_eq!(s.total.usage.input_tokens, 200);
//! assert_eq!(s.by_day.keys().next().unwrap().to_string(), "2025-11-25");
//! assert_eq!(top(&records, 5, day, to)[0].1.cost, Money::from_nanos(450));
//! ```

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Serialize, Serializer};

use super::pricing::Money;
use super::record::UsageRecord;
use super::usage::Usage;
use crate::key::ApiKeyId;

/// Whose records to total.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "id")]
#[non_exhaustive]
pub enum Subject {
    /// Every record.
    All,
    /// One end user.
    User(String),
    /// One API key.
    ApiKey(#[serde(serialize_with = "hex")] ApiKeyId),
    /// One bot.
    Bot(String),
    /// One conversation.
    Conversation(String),
    /// Records with neither a user nor an API key (only produced by [`top`]).
    Anonymous,
}

fn hex<S: Serializer>(id: &ApiKeyId, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(id)
}

impl Subject {
    /// Whether `record` belongs to this subject.
    pub fn matches(&self, record: &UsageRecord) -> bool {
        let a = &record.attribution;
        match self {
            Subject::All => true,
            Subject::User(u) => a.user.as_deref() == Some(u),
            Subject::ApiKey(k) => a.api_key.as_ref() == Some(k),
            Subject::Bot(b) => a.bot.as_deref() == Some(b),
            Subject::Conversation(c) => a.conversation.as_deref() == Some(c),
            Subject::Anonymous => a.user.is_none() && a.api_key.is_none(),
        }
    }

    /// The subject a record is ranked under by [`top`]: its user, else its API key.
    pub fn of(record: &UsageRecord) -> Subject {
        let a = &record.attribution;
        match (&a.user, a.api_key) {
            (Some(u), _) => Subject::User(u.clone()),
            (None, Some(k)) => Subject::ApiKey(k),
            (None, None) => Subject::Anonymous,
        }
    }
}

/// A calendar day (UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Day {
    /// Year.
    pub year: i32,
    /// Month, 1-12.
    pub month: u8,
    /// Day of month, 1-31.
    pub day: u8,
}

impl Day {
    /// The UTC day of `time`.
    pub fn of(time: SystemTime) -> Day {
        let secs = match time.duration_since(UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX) - 1,
        };
        Day::from_days(secs.div_euclid(86_400))
    }

    /// The day `days` after 1970-01-01 (proleptic Gregorian calendar).
    pub fn from_days(days: i64) -> Day {
        // Howard Hinnant's civil_from_days.
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
        let year = (yoe + era * 400 + i64::from(month <= 2)) as i32;
        Day { year, month, day }
    }
}

impl fmt::Display for Day {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:02}-{:02}", self.year, self.month, self.day)
    }
}

impl Serialize for Day {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Totals of a set of records.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Totals {
    /// Records counted.
    pub requests: u64,
    /// Summed token counts.
    pub usage: Usage,
    /// Summed cost of the priced records.
    pub cost: Money,
    /// Records with tokens or a model but no price (an unknown model, or a stream that
    /// reported no usage): their tokens are in `usage`, their cost is not in `cost`.
    /// Errors without usage are not counted here but in `errors`.
    pub unpriced: u64,
    /// Records cut short: a partial body or a request cancelled before its response.
    pub incomplete: u64,
    /// Records of calls that ended in an error: an upstream error status or in-body
    /// error, or a call that failed without a response.
    pub errors: u64,
}

impl Totals {
    /// Adds one record.
    pub fn add(&mut self, r: &UsageRecord) {
        self.requests += 1;
        self.usage.add(&r.usage);
        match r.cost {
            Some(c) => self.cost = self.cost.saturating_add(c),
            None if r.model.is_some() || !r.usage.is_empty() => self.unpriced += 1,
            None => {}
        }
        if r.completion.is_incomplete() {
            self.incomplete += 1;
        }
        if r.completion.is_error() {
            self.errors += 1;
        }
    }
}

/// Totals for one subject over a time range.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Summary {
    /// Whose records.
    pub subject: Subject,
    /// Everything.
    pub total: Totals,
    /// By model (`"unknown"` when the response named none).
    pub by_model: BTreeMap<String, Totals>,
    /// By UTC day.
    pub by_day: BTreeMap<Day, Totals>,
}

fn in_range(r: &UsageRecord, from: SystemTime, to: SystemTime) -> bool {
    r.time >= from && r.time < to
}

/// Totals of `subject`'s records with `from <= time < to`.
pub fn summarize<'a>(
    records: impl IntoIterator<Item = &'a UsageRecord>,
    subject: &Subject,
    from: SystemTime,
    to: SystemTime,
) -> Summary {
    let mut s = Summary {
        subject: subject.clone(),
        total: Totals::default(),
        by_model: BTreeMap::new(),
        by_day: BTreeMap::new(),
    };
    for r in records
        .into_iter()
        .filter(|r| in_range(r, from, to) && subject.matches(r))
    {
        s.total.add(r);
        let model = r.model.as_deref().unwrap_or("unknown");
        match s.by_model.get_mut(model) {
            Some(t) => t.add(r),
            None => {
                let mut t = Totals::default();
                t.add(r);
                s.by_model.insert(model.to_owned(), t);
            }
        }
        s.by_day.entry(Day::of(r.time)).or_default().add(r);
    }
    s
}

/// The `n` subjects (users, else API keys) with the highest cost with
/// `from <= time < to`, highest first; ties broken by subject.
pub fn top<'a>(
    records: impl IntoIterator<Item = &'a UsageRecord>,
    n: usize,
    from: SystemTime,
    to: SystemTime,
) -> Vec<(Subject, Totals)> {
    let mut by: HashMap<Subject, Totals> = HashMap::new();
    for r in records.into_iter().filter(|r| in_range(r, from, to)) {
        by.entry(Subject::of(r)).or_default().add(r);
    }
    let mut v: Vec<_> = by.into_iter().collect();
    v.sort_by(|(sa, a), (sb, b)| b.cost.cmp(&a.cost).then_with(|| sa.cmp(sb)));
    v.truncate(n);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_days() {
        assert_eq!(Day::from_days(0).to_string(), "1970-01-01");
        assert_eq!(Day::from_days(-1).to_string(), "1969-12-31");
        assert_eq!(Day::from_days(19_782).to_string(), "2024-02-29");
        assert_eq!(Day::from_days(20_417).to_string(), "2025-11-25");
        let t = UNIX_EPOCH + std::time::Duration::from_secs(20_417 * 86_400 + 86_399);
        assert_eq!(Day::of(t).to_string(), "2025-11-25");
    }
}
