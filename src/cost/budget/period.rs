//! Budget periods: a calendar day or month in UTC, or a rolling window.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

const DAY_SECS: u64 = 86_400;

/// The span a budget counts spend over.
///
/// Written `"day"`, `"month"` (calendar, UTC) or a duration such as `"24h"` or `"30m"`
/// (rolling: the spend of the last so long).
///
/// ```
/// use std::time::Duration;
/// use palisade::cost::budget::{ParsePeriodError, Period};
///
/// assert_eq!("day".parse::<Period>(), Ok(Period::Day));
/// assert_eq!("6h".parse::<Period>(), Ok(Period::Rolling(Duration::from_secs(6 * 3600))));
/// assert_eq!(
///     "fortnight".parse::<Period>(),
///     Err(ParsePeriodError::Unknown("fortnight".to_owned()))
/// );
/// assert_eq!("0.5s".parse::<Period>(), Err(ParsePeriodError::TooShort));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Period {
    /// A calendar day, 00:00 to 24:00 UTC.
    Day,
    /// A calendar month, from the 1st 00:00 UTC.
    Month,
    /// The last so long, at any moment, counted in 60 slots of a 60th of the window
    /// each: spend leaves the window when its slot does, up to one slot early.
    Rolling(Duration),
}

/// Seconds since the Unix epoch (0 before it).
pub(crate) fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Milliseconds since the Unix epoch (0 before it).
pub(crate) fn unix_millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The civil date (year, month 1–12) of a day count since 1970-01-01 (H. Hinnant's
/// algorithm, public domain).
fn civil_from_days(days: i64) -> (i64, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, u32::try_from(m).unwrap_or(1))
}

/// Days since 1970-01-01 of the first of `month` (1–12) in `year`.
fn days_from_civil(year: i64, month: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(month);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5; // day 1 of the month
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

impl Period {
    /// For calendar periods: the number of the period `now` falls in (days or months since
    /// 1970) and when the next one starts. `None` for rolling periods.
    pub(crate) fn calendar(self, now: SystemTime) -> Option<(u64, SystemTime)> {
        let secs = unix_secs(now);
        let day = secs / DAY_SECS;
        match self {
            Period::Day => Some((day, UNIX_EPOCH + Duration::from_secs((day + 1) * DAY_SECS))),
            Period::Month => {
                let (y, m) = civil_from_days(i64::try_from(day).unwrap_or(i64::MAX));
                let id = u64::try_from(y * 12 + i64::from(m) - 1).unwrap_or(0);
                let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                let next = u64::try_from(days_from_civil(ny, nm)).unwrap_or(0) * DAY_SECS;
                Some((id, UNIX_EPOCH + Duration::from_secs(next)))
            }
            Period::Rolling(_) => None,
        }
    }
}

/// Why a text is not a [`Period`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParsePeriodError {
    /// A rolling window shorter than one second.
    #[error("a rolling period must be at least 1s")]
    TooShort,
    /// Neither `day`, `month` nor a duration.
    #[error("`{0}` is not a period: use `day`, `month` or a duration such as `24h`")]
    Unknown(String),
}

impl FromStr for Period {
    type Err = ParsePeriodError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "day" | "daily" => Ok(Period::Day),
            "month" | "monthly" => Ok(Period::Month),
            other => match crate::config::duration::parse(other) {
                Ok(d) if d >= Duration::from_secs(1) => Ok(Period::Rolling(d)),
                Ok(_) => Err(ParsePeriodError::TooShort),
                Err(_) => Err(ParsePeriodError::Unknown(other.to_owned())),
            },
        }
    }
}

impl fmt::Display for Period {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Period::Day => f.write_str("day"),
            Period::Month => f.write_str("month"),
            Period::Rolling(d) => f.write_str(&crate::config::duration::format(*d)),
        }
    }
}

impl Serialize for Period {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Period {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn day_and_month_boundaries_are_utc_calendar() {
        // 2024-02-29 23:59:59 UTC (a leap day)
        let t = at(1_709_251_199);
        let (_, next_day) = Period::Day.calendar(t).unwrap();
        assert_eq!(next_day, at(1_709_251_200)); // 2024-03-01 00:00:00
        let (feb, next_month) = Period::Month.calendar(t).unwrap();
        assert_eq!(next_month, at(1_709_251_200));
        let (mar, _) = Period::Month.calendar(at(1_709_251_200)).unwrap();
        assert_eq!(mar, feb + 1);
        // December rolls into January of the next year: 2025-12-31 12:00 -> 2026-01-01
        let (_, next) = Period::Month.calendar(at(1_767_182_400)).unwrap();
        assert_eq!(next, at(1_767_225_600));
    }

    #[test]
    fn civil_round_trips_over_four_centuries() {
        for day in (-200_000i64..200_000).step_by(97) {
            let (y, m) = civil_from_days(day);
            let first = days_from_civil(y, m);
            assert!(first <= day && day - first < 31, "day {day}");
        }
    }

    #[test]
    fn periods_parse_and_print() {
        for s in ["day", "month", "6h", "30m"] {
            let p: Period = s.parse().unwrap();
            assert_eq!(p.to_string().parse::<Period>(), Ok(p));
        }
        assert_eq!("0s".parse::<Period>(), Err(ParsePeriodError::TooShort));
    }
}
