//! `GET /health`: the upstreams' breakers, Redis (with `REDIS_URL`), PostgreSQL (with
//! `DATABASE_URL`: backlog, last error, dropped and dead-lettered records; and the audit
//! writer's events queued, written, in the backlog and dropped), the alert webhook's
//! queue, and the usage queue; 503 when no upstream can take a request. Every backlog is
//! what was queued less what has been written or given up on; what never joined a queue
//! is counted as dropped only.

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
    #[cfg(feature = "redis")]
    let redis = state.redis.as_ref().map(|r| {
        let h = r.health();
        json!({
            "healthy": h.healthy,
            "unhealthy_for_ms": h.unhealthy_for.map(|d| d.as_millis() as u64),
            "round_trips": h.round_trips,
            "failures": h.failures,
            "degraded_decisions": h.degraded_decisions,
            "lease_answers": h.lease_answers,
            "leased_keys": h.leased_keys,
            "fail_mode": format!("{:?}", h.fail_mode).to_ascii_lowercase(),
            "last_error": h.last_error,
        })
    });
    #[cfg(not(feature = "redis"))]
    let redis: Option<serde_json::Value> = None;
    #[cfg(feature = "postgres")]
    let postgres = state.postgres.as_ref().map(|pg| {
        let h = pg.health();
        json!({
            "backlog": h.backlog,
            "last_error": h.last_error,
            "dropped": h.dropped,
            "dead_lettered": h.dead_lettered,
            "accepted": h.accepted,
            "delivered": h.delivered,
            "duplicates": h.duplicates,
        })
    });
    #[cfg(not(feature = "postgres"))]
    let postgres: Option<serde_json::Value> = None;
    let status = if available { "ok" } else { "unhealthy" };
    let body = json!({
        "redis": redis,
        "postgres": postgres,
        "audit_writer": state.audit.health(),
        "alert_webhook": state.alerts.webhook_stats(),
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
