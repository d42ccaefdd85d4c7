//! Bots: create (10 an hour per user), list, get, delete, and chat as a bot (20 a minute per
//! user, `x-conversation-id` for attribution). A user sees only their own bots: another
//! user's bot is a 404, exactly like one that does not exist.

use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use http::{HeaderMap, StatusCode};
use palisade::validate::{self, Validate, Validator};
use palisade::{Error, ErrorKind, FieldError};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tower_http::request_id::RequestId;

use super::{
    ApiPath, billed_to, forwarded_headers, json_body, pass_through, read_json, send_upstream,
};
use crate::app::AppState;
use crate::audit::AuditEntry;
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult, WithFormat};
use crate::schema::{Limits, Message, Metadata, check_messages};
use crate::store::Bot;

/// The longest bot name.
pub const MAX_NAME: usize = 100;
/// The longest system prompt.
pub const MAX_SYSTEM_PROMPT: usize = 20_000;

/// A bot as created (and as the orchestrator drafts it).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BotDraft {
    /// Display name.
    pub name: String,
    /// The model.
    pub model: String,
    /// The system prompt.
    #[serde(default)]
    pub system_prompt: String,
    /// `max_tokens` for its answers (default 1024).
    #[serde(default = "default_max_tokens")]
    pub max_tokens: u64,
    /// 0 to 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
}

fn default_max_tokens() -> u64 {
    1024
}

impl BotDraft {
    /// Every problem with this draft under `limits`.
    pub fn check(&self, limits: &Limits) -> Result<(), Vec<FieldError>> {
        let mut v = Validator::new();
        v.length("name", &self.name, 1, MAX_NAME);
        v.not_blank("name", &self.name);
        if !limits.models.contains(&self.model) {
            v.error(
                "model",
                format!(
                    "not offered here; use one of {}",
                    limits.models.iter().cloned().collect::<Vec<_>>().join(", ")
                ),
            );
        }
        v.length("system_prompt", &self.system_prompt, 0, MAX_SYSTEM_PROMPT);
        v.range("max_tokens", self.max_tokens, 1, limits.max_tokens);
        if let Some(t) = self.temperature {
            v.range("temperature", t, 0.0, 1.0);
        }
        v.finish()
    }
}

/// The body of `POST /v1/bots/{id}/messages`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BotChat {
    /// The conversation so far.
    pub messages: Vec<Message>,
    /// Stream the answer.
    #[serde(default)]
    pub stream: bool,
    /// End-user metadata.
    pub metadata: Option<Metadata>,
}

impl Validate for BotChat {
    fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut v = Validator::new();
        check_messages(&mut v, &self.messages);
        if let Some(id) = self.metadata.as_ref().and_then(|m| m.user_id.as_deref()) {
            v.length("metadata.user_id", id, 1, crate::schema::MAX_USER_ID);
        }
        v.finish()
    }
}

fn not_found(state: &AppState) -> ApiError {
    ApiError::new(
        Error::new(ErrorKind::NotFound, "no such bot"),
        state.config.error_format(),
    )
}

/// `POST /v1/bots`.
pub async fn create(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let format = state.config.error_format();
    let bytes = read_json(&state, &headers, body).await?;
    let draft: BotDraft = validate::deserialize_json(&bytes).fmt_err(format)?;
    draft
        .check(&state.limits)
        .map_err(|f| ApiError::new(Error::invalid_fields(f), format))?;
    let bot = state
        .bots
        .create(Bot {
            id: String::new(),
            seq: 0,
            owner: caller.user.clone(),
            name: draft.name,
            model: draft.model,
            system_prompt: draft.system_prompt,
            max_tokens: draft.max_tokens,
            temperature: draft.temperature,
            created_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        })
        .await;
    state.audit.record(
        AuditEntry::new("bot_created", "done")
            .actor(&*caller.user)
            .target(bot.id.clone()),
    );
    Ok((StatusCode::CREATED, Json(bot)).into_response())
}

/// `GET /v1/bots`.
pub async fn list(State(state): State<AppState>, Extension(caller): Extension<Caller>) -> Response {
    let bots = state.bots.list(&caller.user).await;
    Json(json!({ "data": bots })).into_response()
}

/// `GET /v1/bots/{id}`.
pub async fn get(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<Bot>> {
    state
        .bots
        .get(&caller.user, &id)
        .await
        .map(Json)
        .ok_or_else(|| not_found(&state))
}

/// `DELETE /v1/bots/{id}`.
pub async fn delete(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<StatusCode> {
    if state.bots.delete(&caller.user, &id).await {
        state.audit.record(
            AuditEntry::new("bot_deleted", "done")
                .actor(&*caller.user)
                .target(id.clone()),
        );
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(not_found(&state))
    }
}

/// The `x-conversation-id` header, checked: 1 to 128 letters, digits and `-_.:`.
fn conversation_id(state: &AppState, headers: &HeaderMap) -> ApiResult<Option<String>> {
    let Some(v) = headers.get("x-conversation-id") else {
        return Ok(None);
    };
    let ok = v.to_str().ok().filter(|s| {
        (1..=128).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
    });
    match ok {
        Some(s) => Ok(Some(s.to_owned())),
        None => Err(ApiError::new(
            Error::invalid_fields([FieldError::new(
                "x-conversation-id",
                "must be 1 to 128 letters, digits and - _ . :",
            )]),
            state.config.error_format(),
        )),
    }
}

/// `POST /v1/bots/{id}/messages`: chat as the bot.
pub async fn chat(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(request_id): Extension<RequestId>,
    ApiPath(id): ApiPath<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let format = state.config.error_format();
    let bot = state
        .bots
        .get(&caller.user, &id)
        .await
        .ok_or_else(|| not_found(&state))?;
    let conversation = conversation_id(&state, &headers)?;
    let bytes = read_json(&state, &headers, body).await?;
    let chat: BotChat = validate::from_json(&bytes).fmt_err(format)?;
    let mut upstream = json!({
        "model": bot.model,
        "max_tokens": bot.max_tokens,
        "messages": chat.messages.iter().map(|m| json!({"role": m.role, "content": m.content})).collect::<Vec<_>>(),
        "stream": chat.stream,
    });
    if !bot.system_prompt.is_empty() {
        upstream["system"] = json!(bot.system_prompt);
    }
    if let Some(t) = bot.temperature {
        upstream["temperature"] = json!(t);
    }
    if let Some(user_id) = chat.metadata.and_then(|m| m.user_id) {
        upstream["metadata"] = json!({ "user_id": user_id });
    }
    let mut attribution = billed_to(&caller).with_bot(bot.id.clone());
    if let Some(c) = conversation {
        attribution = attribution.with_conversation(c);
    }
    let res = send_upstream(
        &state,
        &request_id,
        json_body(&upstream, format)?,
        forwarded_headers(&headers),
        attribution,
    )
    .await?;
    Ok(pass_through(res))
}
