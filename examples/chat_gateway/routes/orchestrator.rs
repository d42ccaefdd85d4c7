//! `POST /v1/orchestrator/parse-intent`: a plain-language description of a bot in, a
//! validated bot draft out. The upstream model is asked for a JSON answer; an answer that is
//! not a valid draft is a 502 saying what was wrong, never a panic.

use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use http_body_util::{BodyExt, Limited};
use palisade::validate::{self, Validate, Validator};
use palisade::{Error, ErrorKind, FieldError};
use serde::Deserialize;
use serde_json::{Value, json};
use tower_http::request_id::RequestId;

use super::{billed_to, json_body, read_json, send_upstream};
use crate::app::AppState;
use crate::auth::Caller;
use crate::error::{ApiResult, WithFormat, render};
use crate::mock::BOT_DRAFT_MARKER;
use crate::routes::bots::BotDraft;
use crate::upstream::Forwarded;

/// The request body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParseIntent {
    /// What the bot should do, in plain language.
    pub description: String,
}

impl Validate for ParseIntent {
    fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut v = Validator::new();
        v.length("description", &self.description, 1, 4_000);
        v.not_blank("description", &self.description);
        v.finish()
    }
}

fn system_prompt() -> String {
    format!(
        "You turn a description of a chat bot into a bot draft. Answer with one JSON object \
         and nothing else ({BOT_DRAFT_MARKER}), with the members name (at most 100 \
         characters), model (claude-haiku-4-5 unless the description needs more), \
         system_prompt, max_tokens (1 to 8192) and temperature (0 to 1)."
    )
}

fn bad_answer(state: &AppState, marks: &[(HeaderName, HeaderValue)], why: String) -> Response {
    tracing::warn!(reason = %why, "orchestrator: the model's answer was not a bot draft");
    let mut res = render(
        &Error::new(
            ErrorKind::Upstream,
            format!("the model's answer was not a valid bot draft: {why}"),
        ),
        state.config.error_format(),
    );
    *res.status_mut() = StatusCode::BAD_GATEWAY;
    res.headers_mut().extend(marks.iter().cloned());
    res
}

/// The handler.
pub async fn parse_intent(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(request_id): Extension<RequestId>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let format = state.config.error_format();
    let bytes = read_json(&state, &headers, body).await?;
    let intent: ParseIntent = validate::from_json(&bytes).fmt_err(format)?;
    let request = json!({
        "model": state.config.orchestrator_model,
        "max_tokens": 1024,
        "system": system_prompt(),
        "messages": [{"role": "user", "content": intent.description}],
    });
    let res = send_upstream(
        &state,
        &request_id,
        json_body(&request, format)?,
        Forwarded::default(),
        billed_to(&caller),
    )
    .await?;
    let status = res.status();
    if !status.is_success() {
        // The upstream's own refusal (overloaded, rate limited) passes through as it was.
        return Ok(super::pass_through(res));
    }
    // The gateway's own marks on the upstream answer (its cost, the fallback that served
    // it) go on the draft's answer too.
    let marks: Vec<(HeaderName, HeaderValue)> = res
        .headers()
        .iter()
        .filter(|(name, _)| name.as_str().starts_with("x-palisade-"))
        .map(|(name, value)| (name.clone(), value.clone()))
        .collect();
    let body = match Limited::new(res.into_body(), 1 << 20).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return Ok(bad_answer(
                &state,
                &marks,
                format!("the answer could not be read ({e})"),
            ));
        }
    };
    let message: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return Ok(bad_answer(
                &state,
                &marks,
                format!("the answer is not JSON ({e})"),
            ));
        }
    };
    let Some(text) = message["content"]
        .as_array()
        .and_then(|blocks| blocks.iter().find(|b| b["type"] == "text"))
        .and_then(|b| b["text"].as_str())
    else {
        return Ok(bad_answer(
            &state,
            &marks,
            "the answer holds no text block".into(),
        ));
    };
    let text = text.trim();
    let text = text
        .strip_prefix("```json")
        .or_else(|| text.strip_prefix("```"))
        .and_then(|t| t.strip_suffix("```"))
        .unwrap_or(text)
        .trim();
    let draft: BotDraft = match validate::deserialize_json(text.as_bytes()) {
        Ok(d) => d,
        Err(e) => {
            let fields: Vec<String> = e
                .fields()
                .iter()
                .map(|f| format!("{}: {}", f.field, f.message))
                .collect();
            let why = if fields.is_empty() {
                e.message().to_owned()
            } else {
                fields.join("; ")
            };
            return Ok(bad_answer(&state, &marks, why));
        }
    };
    if let Err(fields) = draft.check(&state.limits) {
        let why = fields
            .iter()
            .map(|f| format!("{}: {}", f.field, f.message))
            .collect::<Vec<_>>()
            .join("; ");
        return Ok(bad_answer(&state, &marks, why));
    }
    let mut answer = Json(json!({ "draft": draft })).into_response();
    answer.headers_mut().extend(marks);
    Ok(answer)
}
