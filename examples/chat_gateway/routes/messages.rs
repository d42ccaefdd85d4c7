//! `POST /v1/messages`: the Anthropic-compatible proxy, streamed and not.

use axum::Extension;
use axum::extract::{Request, State};
use axum::response::Response;
use palisade::{Error, validate};
use tower_http::request_id::RequestId;

use super::{billed_to, forwarded_headers, pass_through, read_json, send_upstream};
use crate::app::AppState;
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult, WithFormat};
use crate::schema::MessagesRequest;

/// The handler.
pub async fn create(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(request_id): Extension<RequestId>,
    request: Request,
) -> ApiResult<Response> {
    // The head taken apart rather than extracted as a `HeaderMap`, which would copy it.
    let (parts, body) = request.into_parts();
    let headers = parts.headers;
    let format = state.config.error_format();
    let bytes = read_json(&state, &headers, body).await?;
    let request: MessagesRequest = validate::deserialize_json(&bytes).fmt_err(format)?;
    request
        .check(&state.limits)
        .map_err(|fields| ApiError::new(Error::invalid_fields(fields), format))?;
    tracing::debug!(model = %request.model, stream = request.stream.unwrap_or(false), "messages request");
    let res = send_upstream(
        &state,
        &request_id,
        bytes,
        forwarded_headers(&headers),
        billed_to(&caller),
    )
    .await?;
    Ok(pass_through(res))
}
