//! The routes, one module per concern. `api()` holds the authenticated routes, `public()`
//! those open to anyone; add a module and a line here for a new concern.

pub mod admin;
pub mod bots;
pub mod health;
pub mod messages;
pub mod orchestrator;
pub mod usage;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http::header::{CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, HeaderName};
use http::request::Parts;
use http::{HeaderMap, StatusCode};
use http_body_util::{BodyExt, Limited};
use palisade::cost::Attribution;
use palisade::{Error, ErrorKind};
use serde::de::DeserializeOwned;
use tower_http::request_id::RequestId;

use crate::app::AppState;
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult, WithFormat};
use crate::upstream::{Call, Forwarded};

/// The routes that need an API key.
pub fn api() -> Router<AppState> {
    Router::new()
        .route("/v1/messages", post(messages::create))
        .route("/v1/bots", post(bots::create).get(bots::list))
        .route("/v1/bots/{id}", get(bots::get).delete(bots::delete))
        .route("/v1/bots/{id}/messages", post(bots::chat))
        .route(
            "/v1/orchestrator/parse-intent",
            post(orchestrator::parse_intent),
        )
        .route("/v1/usage", get(usage::usage))
        .route("/admin/rate-limits/reset", post(admin::reset_rate_limits))
        .route(
            "/admin/budgets/{user}",
            get(admin::get_budget).put(admin::put_budget),
        )
        .method_not_allowed_fallback(method_not_allowed)
}

/// The routes open to anyone.
pub fn public() -> Router<AppState> {
    Router::new()
        .route("/health", get(health::health))
        .method_not_allowed_fallback(method_not_allowed)
}

/// 404 for unknown routes, in the configured error format.
pub fn not_found(format: palisade::ErrorFormat) -> Response {
    crate::error::render(&Error::new(ErrorKind::NotFound, "no such route"), format)
}

/// 405 in the configured error format (axum's own has an empty body): the fallback of
/// every route's methods, the dashboard's too.
pub async fn method_not_allowed(State(state): State<AppState>) -> Response {
    ApiError::new(
        Error::invalid_request("this method is not allowed on this route"),
        state.config.error_format(),
    )
    .with_status(StatusCode::METHOD_NOT_ALLOWED)
    .into_response()
}

/// axum's `Path`, refusing in the configured error format (axum's own rejection is plain
/// text): a path segment that is not valid UTF-8 is a 400 with a JSON body.
pub struct ApiPath<T>(pub T);

impl<T: DeserializeOwned + Send> FromRequestParts<AppState> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> ApiResult<Self> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(value)) => Ok(Self(value)),
            Err(e) => Err(ApiError::new(
                Error::invalid_request(e.body_text()),
                state.config.error_format(),
            )),
        }
    }
}

/// axum's `Query`, refusing in the configured error format (axum's own rejection is plain
/// text).
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned + Send> FromRequestParts<AppState> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> ApiResult<Self> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(value)) => Ok(Self(value)),
            Err(e) => Err(ApiError::new(
                Error::invalid_request(e.body_text()),
                state.config.error_format(),
            )),
        }
    }
}

/// Reads a JSON request body: 415 when it is not JSON, 413 past the configured size.
pub async fn read_json(state: &AppState, headers: &HeaderMap, body: Body) -> ApiResult<Bytes> {
    let format = state.config.error_format();
    let max = state.config.max_body;
    let json = headers
        .get(CONTENT_TYPE)
        .is_some_and(|v| is_json(v.as_bytes()));
    if !json {
        return Err(ApiError::new(
            Error::new(
                ErrorKind::UnsupportedMediaType,
                "send the body as JSON with content-type: application/json",
            ),
            format,
        ));
    }
    let too_large = || {
        ApiError::new(
            Error::new(
                ErrorKind::PayloadTooLarge,
                format!("the request body is larger than {max} bytes"),
            ),
            format,
        )
    };
    if headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|n| n > max as u64)
    {
        return Err(too_large());
    }
    let timeout = state.config.body_timeout;
    let Ok(read) = tokio::time::timeout(timeout, whole(Limited::new(body, max))).await else {
        return Err(ApiError::new(
            Error::invalid_request(format!(
                "the request body did not arrive within {}",
                palisade::config::duration::format(timeout)
            )),
            format,
        )
        .with_status(StatusCode::REQUEST_TIMEOUT));
    };
    match read {
        Ok(bytes) => Ok(bytes),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(e) => Err(ApiError::new(
            Error::invalid_request("the request body could not be read").with_source(e),
            format,
        )),
    }
}

/// Whether a `content-type` value names JSON: `application/json` or `application/*+json`
/// (`application/+json` too), in any case, parameters after `;` aside. A value holding a
/// byte outside visible ASCII and tab, in its parameters too, is not JSON: the rule reads
/// the value as text, as `HeaderValue::to_str` does. Allocates nothing.
pub fn is_json(content_type: &[u8]) -> bool {
    if !content_type
        .iter()
        .all(|&b| b == b'\t' || (b' '..=b'~').contains(&b))
    {
        return false;
    }
    let essence = content_type
        .split(|&b| b == b';')
        .next()
        .unwrap_or_default()
        .trim_ascii();
    let Some(sub) = essence
        .get(..12)
        .filter(|t| t.eq_ignore_ascii_case(b"application/"))
        .map(|_| &essence[12..])
    else {
        return false;
    };
    sub.eq_ignore_ascii_case(b"json")
        || sub.len() >= 5 && sub[sub.len() - 5..].eq_ignore_ascii_case(b"+json")
}

/// A body read to its end: its one data frame as it came (no copy), or its frames joined.
/// Frames that are not data (trailers) are skipped.
pub async fn whole<B>(body: B) -> Result<Bytes, B::Error>
where
    B: http_body::Body<Data = Bytes>,
{
    let mut body = std::pin::pin!(body);
    let mut first: Option<Bytes> = None;
    let mut joined: Option<bytes::BytesMut> = None;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        match (&mut joined, &first) {
            (Some(all), _) => all.extend_from_slice(&data),
            (None, None) => first = Some(data),
            (None, Some(one)) => {
                let mut all = bytes::BytesMut::with_capacity(one.len() + data.len());
                all.extend_from_slice(one);
                all.extend_from_slice(&data);
                joined = Some(all);
            }
        }
    }
    Ok(match joined {
        Some(all) => all.freeze(),
        None => first.unwrap_or_default(),
    })
}

/// What a caller's upstream calls are billed to: the user and the hashed key.
pub fn billed_to(caller: &Caller) -> Attribution {
    Attribution::default()
        .with_user(caller.user.to_string())
        .with_api_key(caller.key_id)
}

/// `value` as a JSON request body for the upstream.
pub fn json_body(value: &serde_json::Value, format: palisade::ErrorFormat) -> ApiResult<Bytes> {
    serde_json::to_vec(value)
        .map(Bytes::from)
        .map_err(|e| ApiError::new(Error::internal("cannot encode").with_source(e), format))
}

/// Sends one `/v1/messages` call upstream (the fallback too, when it is configured),
/// billed to `attribution` under the gateway's `request_id`; a failure answers in the
/// configured error format.
pub async fn send_upstream(
    state: &AppState,
    request_id: &RequestId,
    body: Bytes,
    headers: Forwarded,
    attribution: Attribution,
) -> ApiResult<http::Response<Body>> {
    let call = Call {
        body,
        headers,
        attribution,
        request_id: request_id.header_value().clone(),
    };
    state
        .upstreams
        .send(call)
        .await
        .fmt_err(state.config.error_format())
}

/// The request headers forwarded upstream.
pub fn forwarded_headers(headers: &HeaderMap) -> Forwarded {
    Forwarded(Forwarded::FORWARDED.map(|name| headers.get(name).cloned()))
}

/// The hop-by-hop headers (RFC 9110, section 7.6.1: `proxy-connection` and `keep-alive`
/// among them), as header names so that removing them parses nothing.
const HOP_BY_HOP: [HeaderName; 9] = [
    CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    http::header::PROXY_AUTHENTICATE,
    http::header::PROXY_AUTHORIZATION,
    http::header::TE,
    http::header::TRAILER,
    http::header::TRANSFER_ENCODING,
    http::header::UPGRADE,
];

/// An upstream response with hop-by-hop headers dropped (see [`strip_hop_by_hop`]). The
/// upstream client has done so already, and dropped the upstream's own `x-palisade-*`
/// headers, before the gateway's layers set theirs on the answer (its cost, its fallback
/// mark): the names an upstream's `connection` header lists never take those away, and an
/// upstream never speaks in the gateway's name. An upstream's own `x-request-id` is
/// dropped too: the answer's is the gateway's (set on the way out), the id its log lines
/// and usage records carry; the upstream's `request-id` passes through.
pub fn pass_through(mut res: http::Response<Body>) -> Response {
    const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
    let h = res.headers_mut();
    strip_hop_by_hop(h);
    h.remove(X_REQUEST_ID);
    res
}

/// Drops the hop-by-hop headers of an upstream's answer, and the names its `connection`
/// headers list. A `connection` value is read as bytes: one that holds bytes outside
/// visible ASCII still has every name it lists dropped.
///
/// Most answers hold none of them: one pass over the answer's few names finds that out,
/// where a removal per hop-by-hop name would hash and look up each of them.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    if !h.keys().any(|name| HOP_BY_HOP.contains(name)) {
        return;
    }
    if h.contains_key(CONNECTION) {
        let named: Vec<HeaderName> = h
            .get_all(CONNECTION)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .filter_map(|n| HeaderName::from_bytes(n.trim_ascii()).ok())
            .collect();
        for name in named {
            h.remove(name);
        }
    }
    for name in &HOP_BY_HOP {
        h.remove(name);
    }
}
