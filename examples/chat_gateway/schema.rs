//! The Anthropic Messages request, typed and validated: every field error at once.

use std::collections::BTreeSet;

use palisade::FieldError;
use palisade::validate::{Validate, Validator};
use serde::Deserialize;
use serde_json::Value;

/// Content block types a message may hold.
pub const BLOCK_TYPES: [&str; 11] = [
    "text",
    "image",
    "document",
    "tool_use",
    "tool_result",
    "thinking",
    "redacted_thinking",
    "search_result",
    "server_tool_use",
    "web_search_tool_result",
    "container_upload",
];

/// The longest `metadata.user_id` (as the Anthropic API allows).
pub const MAX_USER_ID: usize = 256;

/// The limits a request is checked against.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Models allowed.
    pub models: BTreeSet<String>,
    /// The largest `max_tokens`.
    pub max_tokens: u64,
}

/// One message.
#[derive(Debug, Clone, Deserialize)]
pub struct Message {
    /// `user` or `assistant`.
    pub role: String,
    /// A string, or an array of content blocks.
    pub content: Value,
}

impl Validate for Message {
    fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut v = Validator::new();
        v.one_of("role", self.role.as_str(), &["user", "assistant"]);
        match &self.content {
            Value::String(s) => {
                v.check(!s.is_empty(), "content", "must not be empty");
            }
            Value::Array(blocks) => {
                v.check(
                    !blocks.is_empty(),
                    "content",
                    "must hold at least one content block",
                );
                for (i, block) in blocks.iter().enumerate() {
                    let field = format!("content[{i}]");
                    let Some(kind) = block.get("type").and_then(Value::as_str) else {
                        v.error(
                            format!("{field}.type"),
                            "must be a string naming the block type",
                        );
                        continue;
                    };
                    if !BLOCK_TYPES.contains(&kind) {
                        v.error(
                            format!("{field}.type"),
                            format!(
                                "`{kind}` is not a content block type; expected one of {}",
                                BLOCK_TYPES.join(", ")
                            ),
                        );
                    } else if kind == "text" && !block.get("text").is_some_and(Value::is_string) {
                        v.error(
                            format!("{field}.text"),
                            "a text block needs a `text` string",
                        );
                    }
                }
            }
            _ => {
                v.error("content", "must be a string or an array of content blocks");
            }
        }
        v.finish()
    }
}

/// `metadata`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Metadata {
    /// An opaque id of the end user.
    pub user_id: Option<String>,
}

/// The fields of a Messages request the gateway checks; the rest (tools, thinking, ...)
/// passes through untouched.
#[derive(Debug, Clone, Deserialize)]
pub struct MessagesRequest {
    /// The model.
    pub model: String,
    /// The most output tokens.
    pub max_tokens: u64,
    /// The conversation.
    pub messages: Vec<Message>,
    /// 0 to 1.
    pub temperature: Option<f64>,
    /// 0 to 1.
    pub top_p: Option<f64>,
    /// Stream the answer as server-sent events.
    pub stream: Option<bool>,
    /// End-user metadata.
    pub metadata: Option<Metadata>,
    /// The system prompt: a string or text blocks.
    pub system: Option<Value>,
}

impl MessagesRequest {
    /// Every problem with this request under `limits`.
    pub fn check(&self, limits: &Limits) -> Result<(), Vec<FieldError>> {
        let mut v = Validator::new();
        if !limits.models.contains(&self.model) {
            v.error(
                "model",
                format!(
                    "`{}` is not offered here; use one of {}",
                    self.model.chars().take(100).collect::<String>(),
                    limits.models.iter().cloned().collect::<Vec<_>>().join(", ")
                ),
            );
        }
        v.range("max_tokens", self.max_tokens, 1, limits.max_tokens);
        check_messages(&mut v, &self.messages);
        if let Some(t) = self.temperature {
            v.range("temperature", t, 0.0, 1.0);
        }
        if let Some(p) = self.top_p {
            v.range("top_p", p, 0.0, 1.0);
        }
        if let Some(id) = self.metadata.as_ref().and_then(|m| m.user_id.as_deref()) {
            v.length("metadata.user_id", id, 1, MAX_USER_ID);
        }
        if let Some(system) = &self.system {
            check_system(&mut v, system);
        }
        v.finish()
    }
}

/// The checks on `messages` shared by the proxy and bot chat.
pub fn check_messages(v: &mut Validator, messages: &[Message]) {
    v.count("messages", messages.len(), 1, 10_000);
    v.each("messages", messages);
}

fn check_system(v: &mut Validator, system: &Value) {
    match system {
        Value::String(_) => {}
        Value::Array(blocks) => {
            for (i, b) in blocks.iter().enumerate() {
                if b.get("type").and_then(Value::as_str) != Some("text")
                    || !b.get("text").is_some_and(Value::is_string)
                {
                    v.error(
                        format!("system[{i}]"),
                        "must be a text block with a `text` string",
                    );
                }
            }
        }
        _ => {
            v.error("system", "must be a string or an array of text blocks");
        }
    }
}
