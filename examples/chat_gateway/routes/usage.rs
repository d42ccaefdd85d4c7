//! `GET /v1/usage`: the caller's spend over `from`..`to` (totals, by model, day, bot,
//! conversation and fallback). With an admin key: any `user`, or everyone with the `top` N spenders.
//! `complete` is `false` when the in-memory ledger, full, dropped records the range may
//! hold: the totals then leave them out.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::{Extension, Json};
use palisade::cost::Totals;
use palisade::{Error, ErrorKind, FieldError};
use serde::Deserialize;
use serde_json::{Value, json};

use super::ApiQuery;
use crate::app::AppState;
use crate::audit::AuditEntry;
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::store::UsageReport;

/// The query.
#[derive(Debug, Deserialize)]
pub struct UsageQuery {
    /// Start (inclusive): `YYYY-MM-DD` or Unix seconds; default 30 days ago.
    pub from: Option<String>,
    /// End (exclusive): `YYYY-MM-DD` or Unix seconds; default now.
    pub to: Option<String>,
    /// Admin only: one user.
    pub user: Option<String>,
    /// Admin only: how many top spenders to list (default 10).
    pub top: Option<usize>,
}

/// Parses `YYYY-MM-DD` (midnight UTC; a day the month does not have is `None`) or Unix
/// seconds.
pub fn parse_time(s: &str) -> Option<SystemTime> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return UNIX_EPOCH.checked_add(Duration::from_secs(secs));
    }
    let mut parts = s.splitn(3, '-');
    let y: i64 = parts.next()?.parse().ok()?;
    let m: i64 = parts.next()?.parse().ok()?;
    let d: i64 = parts.next()?.parse().ok()?;
    if !(1970..=9999).contains(&y) || !(1..=12).contains(&m) || !(1..=days_in(y, m)).contains(&d) {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    UNIX_EPOCH.checked_add(Duration::from_secs(u64::try_from(days).ok()? * 86_400))
}

/// The days of month `m` of year `y` (Gregorian).
fn days_in(y: i64, m: i64) -> i64 {
    match m {
        4 | 6 | 9 | 11 => 30,
        2 if y % 4 == 0 && (y % 100 != 0 || y % 400 == 0) => 29,
        2 => 28,
        _ => 31,
    }
}

/// The handler.
pub async fn usage(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiQuery(q): ApiQuery<UsageQuery>,
) -> ApiResult<Json<Value>> {
    let format = state.config.error_format();
    let now = SystemTime::now();
    let mut problems = Vec::new();
    let mut time = |name: &str, value: &Option<String>, default: SystemTime| match value {
        None => default,
        Some(v) => parse_time(v).unwrap_or_else(|| {
            problems.push(FieldError::new(name, "must be YYYY-MM-DD or Unix seconds"));
            default
        }),
    };
    let from = time("from", &q.from, now - Duration::from_secs(30 * 86_400));
    let to = time("to", &q.to, now + Duration::from_secs(1));
    if from >= to && problems.is_empty() {
        problems.push(FieldError::new("to", "must be after `from`"));
    }
    if !problems.is_empty() {
        return Err(ApiError::new(Error::invalid_fields(problems), format));
    }
    let user = match (&q.user, caller.is_admin()) {
        (Some(u), true) => Some(u.clone()),
        (None, true) => None,
        (Some(u), false) if **u != *caller.user => {
            state.audit.record(
                AuditEntry::new("forbidden", "refused")
                    .actor(&*caller.user)
                    .target("/v1/usage")
                    .detail("another user's usage with a user key"),
            );
            return Err(ApiError::new(
                Error::new(
                    ErrorKind::Forbidden,
                    "only an admin key may read another user's usage",
                ),
                format,
            ));
        }
        (_, false) => Some(caller.user.to_string()),
    };
    let entries = state.ledger.entries(from, to, |e| match &user {
        Some(u) => e.record.attribution.user.as_deref() == Some(u.as_str()),
        None => true,
    });
    let report = UsageReport::of(&entries);
    let mut body = json!({
        "user": user,
        "from": from.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        "to": to.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        "total_cost_usd": report.total.cost.dollars_string(),
        "complete": !state.ledger.dropped_since(from),
        "report": report,
    });
    if user.is_none() {
        let mut by_user: HashMap<String, Totals> = HashMap::new();
        for e in &entries {
            let who = e
                .record
                .attribution
                .user
                .clone()
                .unwrap_or_else(|| "anonymous".into());
            by_user.entry(who).or_default().add(&e.record);
        }
        let mut top: Vec<(String, Totals)> = by_user.into_iter().collect();
        top.sort_by(|a, b| b.1.cost.cmp(&a.1.cost).then(a.0.cmp(&b.0)));
        top.truncate(q.top.unwrap_or(10));
        body["top"] = top
            .into_iter()
            .map(|(u, t)| json!({"user": u, "cost_usd": t.cost.dollars_string(), "totals": t}))
            .collect();
    }
    Ok(Json(body))
}
