//! One log line per request: id, user, route, status, duration and (for small JSON
//! answers) cost. Never a key, never message content.

use std::time::Instant;

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;
use palisade::cost::X_PALISADE_COST_USD;

/// The caller's name, put in the response extensions by authentication for this line.
#[derive(Debug, Clone)]
pub struct LoggedUser(pub std::sync::Arc<str>);

/// The middleware.
pub async fn request_line(req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = req.method().clone();
    let route = req.uri().path().to_owned();
    let id = crate::app::request_id(&req);
    let res = next.run(req).await;
    let user = res.extensions().get::<LoggedUser>().map(|u| u.0.clone());
    let cost = res
        .headers()
        .get(X_PALISADE_COST_USD)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    tracing::info!(
        target: "chat_gateway::request",
        request_id = %id,
        user = user.as_deref().unwrap_or("-"),
        method = %method,
        route = %route,
        status = res.status().as_u16(),
        duration_us = start.elapsed().as_micros() as u64,
        cost_usd = cost.as_deref().unwrap_or("-"),
        "request"
    );
    res
}
