//! The dashboard: `GET /` (a page), its script and style sheet, and the JSON it polls,
//! `GET /v1/dashboard/data` (admin key only: it shows every user's spend).
//!
//! The page is served under `SecurityHeadersLayer::web()`'s policy with a fresh nonce per
//! response and no inline script or style: `app.js` and `app.css` are same-origin files
//! compiled into the binary. The page asks for the admin key once and keeps it in the
//! tab's `sessionStorage`; a link of the form `/#key=<admin key>` fills it in (the part
//! after `#` never reaches the server or its logs, and the page drops it from the address
//! bar). CSP violations the browser reports arrive at `POST /dashboard/csp-reports` and are
//! counted in `/metrics`.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use http::StatusCode;
use http::header::{CACHE_CONTROL, CONTENT_TYPE};
use http_body_util::{BodyExt, Limited};
use palisade::security_headers::{
    ContentSecurityPolicy, CspNonce, DENIED_FEATURES, PermissionsPolicy, SecurityHeadersLayer,
};
use palisade::{BoxError, Error, ErrorKind, FieldError};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::app::AppState;
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};

const PAGE: &str = include_str!("index.html");
const SCRIPT: &str = include_str!("app.js");
const STYLE: &str = include_str!("app.css");

/// Where the browser posts CSP violation reports.
pub const CSP_REPORT_PATH: &str = "/dashboard/csp-reports";

/// Features of palisade's default `Permissions-Policy` that Chromium does not recognise.
const UNKNOWN_TO_CHROMIUM: [&str; 2] = ["bluetooth", "web-share"];

/// How many points each spend series has.
const BUCKETS: u64 = 60;
/// How many user and model series the spend chart draws (the biggest spenders).
const MAX_SERIES: usize = 12;

/// The page, its assets and the CSP report endpoint, under the web security headers.
pub fn public(state: &AppState) -> Result<Router, BoxError> {
    let csp = ContentSecurityPolicy::web()
        .to_builder()
        .report_uri(CSP_REPORT_PATH)
        .build()?;
    // Chromium logs a console error for every feature it does not know; the page's policy
    // leaves those out (they deny nothing there).
    let permissions = DENIED_FEATURES
        .iter()
        .filter(|f| !UNKNOWN_TO_CHROMIUM.contains(f))
        .fold(PermissionsPolicy::empty(), |p, f| p.deny(f));
    let headers = SecurityHeadersLayer::builder()
        .csp(csp)
        .permissions_policy(permissions)
        .environment(state.config.settings.environment)
        .build()?;
    Ok(Router::new()
        .route("/", get(page))
        .route("/dashboard/app.js", get(script))
        .route("/dashboard/app.css", get(style))
        .route(CSP_REPORT_PATH, post(csp_report))
        .route("/metrics", get(crate::metrics::scrape))
        .method_not_allowed_fallback(crate::routes::method_not_allowed)
        .layer(headers)
        .with_state(state.clone()))
}

/// The authenticated route (merged beside the API routes, under authentication alone: no
/// rate limit or budget applies to it).
pub fn api() -> Router<AppState> {
    Router::new()
        .route("/v1/dashboard/data", get(data))
        .method_not_allowed_fallback(crate::routes::method_not_allowed)
}

async fn page(nonce: Option<Extension<CspNonce>>) -> Response {
    let nonce = nonce.map(|Extension(n)| n.to_string()).unwrap_or_default();
    let html = PAGE.replace("{{nonce}}", &nonce);
    (
        [
            (CONTENT_TYPE, "text/html; charset=utf-8"),
            (CACHE_CONTROL, "no-store"),
        ],
        html,
    )
        .into_response()
}

async fn script() -> Response {
    (
        [
            (CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (CACHE_CONTROL, "no-cache"),
        ],
        SCRIPT,
    )
        .into_response()
}

async fn style() -> Response {
    (
        [
            (CONTENT_TYPE, "text/css; charset=utf-8"),
            (CACHE_CONTROL, "no-cache"),
        ],
        STYLE,
    )
        .into_response()
}

/// Counts a violation report (the body is read up to 16 KiB and not kept: it may hold
/// URLs the page visited).
async fn csp_report(State(state): State<AppState>, body: Body) -> StatusCode {
    let _ = Limited::new(body, 16 * 1024).collect().await;
    tracing::warn!(target: "chat_gateway::dashboard", "CSP violation reported by the dashboard page");
    state.metrics.csp_report();
    StatusCode::NO_CONTENT
}

/// The data query.
#[derive(Debug, Deserialize)]
pub struct DataQuery {
    /// How far back the charts go, in minutes (1 to 1440, default 60).
    pub minutes: Option<String>,
}

/// `GET /v1/dashboard/data`: spend per user and model over the window (60 points), the
/// breakers, refusals, and totals. Admin key only.
///
/// Spend points are cumulative micro-dollars (rounded down; for charts); the exact totals
/// are dollar strings (`cost_usd`).
pub async fn data(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Query(q): Query<DataQuery>,
) -> ApiResult<Json<Value>> {
    let format = state.config.error_format();
    if !caller.is_admin() {
        return Err(ApiError::new(
            Error::new(
                ErrorKind::Forbidden,
                "the dashboard shows every user's spend: use an admin key",
            ),
            format,
        ));
    }
    let minutes = match q.minutes.as_deref().map(str::trim) {
        None => 60,
        Some(s) => match s.parse::<u64>() {
            Ok(m) if (1..=1440).contains(&m) => m,
            _ => {
                return Err(ApiError::new(
                    Error::invalid_fields([FieldError::new(
                        "minutes",
                        "must be a whole number of minutes from 1 to 1440",
                    )]),
                    format,
                ));
            }
        },
    };
    Ok(Json(snapshot(&state, SystemTime::now(), minutes)))
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Everything the page draws, for the window of `minutes` ending at `now`. Its
/// `totals.fallbacks` counts the requests a fallback served (answered without an error), as
/// `/v1/usage`'s `fallbacks` does.
pub fn snapshot(state: &AppState, now: SystemTime, minutes: u64) -> Value {
    let bucket = Duration::from_millis(minutes * 60_000 / BUCKETS);
    let from = now - bucket * BUCKETS as u32;
    let entries = state
        .ledger
        .entries(from, now + Duration::from_secs(1), |_| true);

    struct Series {
        points: Vec<u128>,
        cost: palisade::cost::Money,
        requests: u64,
        input: u64,
        output: u64,
    }
    let mut series: HashMap<(String, String), Series> = HashMap::new();
    let mut total_cost = palisade::cost::Money::ZERO;
    let mut fallbacks = 0u64;
    for e in &entries {
        let r = &e.record;
        if crate::store::served_by_fallback(r) {
            fallbacks += 1;
        }
        if r.cost.is_none() && r.usage == palisade::cost::Usage::default() {
            // A failed call that used nothing (a 529, a timeout): counted, not drawn.
            continue;
        }
        let user = r
            .attribution
            .user
            .clone()
            .unwrap_or_else(|| "anonymous".into());
        let model = r.model.clone().unwrap_or_else(|| "unknown".into());
        let s = series.entry((user, model)).or_insert_with(|| Series {
            points: vec![0; BUCKETS as usize],
            cost: palisade::cost::Money::ZERO,
            requests: 0,
            input: 0,
            output: 0,
        });
        let i = r
            .time
            .duration_since(from)
            .map_or(0, |d| (d.as_millis() / bucket.as_millis().max(1)) as usize)
            .min(BUCKETS as usize - 1);
        let picos = r.cost.map_or(0, |c| c.picos());
        s.points[i] += picos;
        s.requests += 1;
        s.input += r.usage.total_input_tokens();
        s.output += r.usage.output_tokens;
        if let Some(c) = r.cost {
            s.cost = s.cost.saturating_add(c);
            total_cost = total_cost.saturating_add(c);
        }
    }
    let mut series: Vec<_> = series.into_iter().collect();
    series.sort_by(|a, b| b.1.cost.cmp(&a.1.cost).then(a.0.cmp(&b.0)));
    let spend: Vec<Value> = series
        .into_iter()
        .take(MAX_SERIES)
        .map(|((user, model), s)| {
            let mut acc = 0u128;
            let points: Vec<u64> = s
                .points
                .iter()
                .map(|p| {
                    acc += p;
                    u64::try_from(acc / 1_000_000).unwrap_or(u64::MAX)
                })
                .collect();
            json!({
                "user": user,
                "model": model,
                "cost_usd": s.cost.dollars_string(),
                "requests": s.requests,
                "input_tokens": s.input,
                "output_tokens": s.output,
                "points_microusd": points,
            })
        })
        .collect();
    let refusals = state.metrics.refusals(now);
    json!({
        "now_ms": unix_ms(now),
        "window": {
            "from_ms": unix_ms(from),
            "to_ms": unix_ms(now),
            "bucket_ms": u64::try_from(bucket.as_millis()).unwrap_or(u64::MAX),
        },
        "totals": {
            "requests": entries.len(),
            "cost_usd": total_cost.dollars_string(),
            "fallbacks": fallbacks,
        },
        "spend": spend,
        "breakers": state.upstreams.health(),
        "refusals": refusals,
    })
}
