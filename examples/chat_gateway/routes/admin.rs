//! Admin routes (admin key only, every call audited): reset a user's rate limits; read
//! and set a user's daily budget.

use axum::body::Body;
use axum::extract::State;
use axum::{Extension, Json};
use http::HeaderMap;
use palisade::cost::Money;
use palisade::rate_limit::RateKey;
use palisade::validate::{self, Validate, Validator};
use palisade::{Error, ErrorKind, FieldError};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiPath, read_json};
use crate::app::AppState;
use crate::audit::AuditEntry;
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult, WithFormat};
use crate::store::BudgetView;

/// The body of `POST /admin/rate-limits/reset`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResetLimits {
    /// Whose limits.
    pub user: String,
    /// Which rules (default: all).
    pub rules: Option<Vec<String>>,
}

impl Validate for ResetLimits {
    fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut v = Validator::new();
        v.length("user", &self.user, 1, 256);
        v.finish()
    }
}

/// 404 unless a key belongs to `user`: a change for a mistyped name would answer 200 and
/// change nothing anyone uses.
fn known_user(state: &AppState, user: &str) -> ApiResult<()> {
    if state.keys.key_ids(user).is_empty() {
        let shown: String = user.chars().take(100).collect();
        return Err(ApiError::new(
            Error::new(
                ErrorKind::NotFound,
                format!("no API key belongs to a user named `{shown}`"),
            ),
            state.config.error_format(),
        ));
    }
    Ok(())
}

/// `POST /admin/rate-limits/reset`: every call audited, refused or failed ones too.
pub async fn reset_rate_limits(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<Value>> {
    let res = reset(&state, &caller, &headers, body).await;
    if let Err(e) = &res {
        state.audit.record(
            AuditEntry::new("rate_limits_reset", "failed")
                .actor(&*caller.user)
                .detail(e.error.kind().as_str()),
        );
    }
    res
}

async fn reset(
    state: &AppState,
    caller: &Caller,
    headers: &HeaderMap,
    body: Body,
) -> ApiResult<Json<Value>> {
    let format = state.config.error_format();
    let bytes = read_json(state, headers, body).await?;
    let req: ResetLimits = validate::from_json(&bytes).fmt_err(format)?;
    known_user(state, &req.user)?;
    let Some(limiter) = &state.limiter else {
        return Err(ApiError::new(
            Error::new(
                ErrorKind::NotFound,
                "rate limits are switched off (PALISADE_GATEWAY_LAYERS=off)",
            ),
            format,
        ));
    };
    let known: Vec<String> = limiter.rules().into_iter().map(str::to_owned).collect();
    let rules = req.rules.clone().unwrap_or_else(|| known.clone());
    let unknown: Vec<FieldError> = rules
        .iter()
        .enumerate()
        .filter(|(_, r)| !known.contains(r))
        .map(|(i, r)| {
            FieldError::new(
                format!("rules[{i}]"),
                format!("no rule `{r}`; rules: {}", known.join(", ")),
            )
        })
        .collect();
    if !unknown.is_empty() {
        return Err(ApiError::new(Error::invalid_fields(unknown), format));
    }
    // Rules count a user by name (`principal`) or by each key they hold (`api_key`):
    // reset them all.
    let mut keys = vec![RateKey::principal(req.user.as_str())];
    keys.extend(
        state
            .keys
            .key_ids(&req.user)
            .into_iter()
            .map(RateKey::ApiKey),
    );
    for rule in &rules {
        for key in &keys {
            limiter.reset(rule, key).await.map_err(|e| {
                ApiError::new(
                    Error::new(ErrorKind::Unavailable, "the rate-limit store failed")
                        .with_source(e),
                    format,
                )
            })?;
        }
    }
    state.audit.record(
        AuditEntry::new("rate_limits_reset", "done")
            .actor(&*caller.user)
            .target(req.user.clone())
            .detail(rules.join(",")),
    );
    Ok(Json(json!({ "user": req.user, "reset": rules })))
}

/// `GET /admin/budgets/{user}`.
pub async fn get_budget(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(user): ApiPath<String>,
) -> ApiResult<Json<BudgetView>> {
    let known = known_user(&state, &user);
    state.audit.record(
        AuditEntry::new("budget_read", if known.is_ok() { "done" } else { "failed" })
            .actor(&*caller.user)
            .target(user.clone()),
    );
    known?;
    Ok(Json(state.budgets.view(&user)))
}

/// The body of `PUT /admin/budgets/{user}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PutBudget {
    /// Dollars per UTC day (`"10.00"`), or `null` for no limit. Required: `None` when the
    /// body left it out, `Some(None)` for an explicit `null` (a body that lost its field
    /// must not lift the user's limit).
    #[serde(default, deserialize_with = "present")]
    pub daily_limit_usd: Option<Option<String>>,
}

/// A field that is present, `null` or not.
fn present<'de, D>(d: D) -> Result<Option<Option<String>>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    Option::<String>::deserialize(d).map(Some)
}

impl Validate for PutBudget {
    fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut v = Validator::new();
        match &self.daily_limit_usd {
            None => {
                v.error(
                    "daily_limit_usd",
                    "required: a dollar amount such as \"10.00\", or null for no limit",
                );
            }
            Some(Some(s)) => {
                v.check(
                    Money::parse_dollars(s).is_ok(),
                    "daily_limit_usd",
                    "must be a dollar amount such as \"10.00\", or null",
                );
            }
            Some(None) => {}
        }
        v.finish()
    }
}

/// `PUT /admin/budgets/{user}`.
pub async fn put_budget(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(user): ApiPath<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<BudgetView>> {
    let format = state.config.error_format();
    let refused = |detail: &'static str| {
        state.audit.record(
            AuditEntry::new("budget_set", "failed")
                .actor(&*caller.user)
                .target(user.clone())
                .detail(detail),
        );
    };
    let bytes = read_json(&state, &headers, body)
        .await
        .inspect_err(|_| refused("the body was refused"))?;
    let req: PutBudget = validate::from_json(&bytes)
        .fmt_err(format)
        .inspect_err(|_| refused("invalid body"))?;
    known_user(&state, &user).inspect_err(|_| refused("no key belongs to the user"))?;
    let limit = req
        .daily_limit_usd
        .flatten()
        .and_then(|s| Money::parse_dollars(&s).ok());
    let set = state.budgets.set(&user, limit).await.map_err(|e| {
        state.audit.record(
            AuditEntry::new("budget_set", "failed")
                .actor(&*caller.user)
                .target(user.clone())
                .detail("the shared store failed"),
        );
        ApiError::new(
            Error::new(
                ErrorKind::Unavailable,
                "the budget store is unavailable; the limit was not changed, try again",
            )
            .with_source(e),
            format,
        )
    })?;
    if !set {
        state.audit.record(
            AuditEntry::new("budget_set", "failed")
                .actor(&*caller.user)
                .target(user.clone())
                .detail("no per-user daily budget is configured"),
        );
        return Err(ApiError::new(
            Error::new(
                ErrorKind::InvalidRequest,
                "no per-user `daily` budget is configured (PALISADE_GATEWAY_DAILY_BUDGET is `none`, PALISADE_BUDGET_RULES names none, or the layers are off)",
            ),
            format,
        ));
    }
    state.audit.record(
        AuditEntry::new("budget_set", "done")
            .actor(&*caller.user)
            .target(user.clone())
            .detail(limit.map_or_else(|| "unlimited".to_owned(), Money::dollars_string)),
    );
    Ok(Json(state.budgets.view(&user)))
}
