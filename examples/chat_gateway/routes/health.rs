//! `GET /health`: the upstreams' breakers and the usage queue; 503 when no upstream can
//! take a request.

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use serde_json::json;

use crate::app::AppState;

/// The handler.
pub async fn health(State(state): State<AppState>) -> Response {
    let breakers = state.upstreams.health();
    let available = breakers.is_empty() || breakers.iter().any(|b| b.available);
    let usage = state.cost_stats.as_ref().map(|s| {
        let s = s.snapshot();
        json!({
            "queued": s.queued,
            "written": s.written,
            "backlog": s.queued.saturating_sub(s.written + s.failed),
            "dropped": s.dropped_full + s.dropped_closed + s.failed,
        })
    });
    let status = if available { "ok" } else { "unhealthy" };
    let body = json!({
        "status": status,
        "layers": state.config.layers,
        "upstreams": breakers,
        "usage_recorder": usage,
        "ledger_evicted": state.ledger.evicted(),
    });
    let code = if available {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}
