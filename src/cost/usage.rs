//! Token usage as the upstream reports it, read from Anthropic and OpenAI responses.
//!
//! [`UsageExtractor`] is fed a response incrementally: whole JSON documents
//! ([`UsageExtractor::feed_json`]) or the `data:` payloads of server-sent events
//! ([`UsageExtractor::on_event`]). It knows both wire formats:
//!
//! - **Anthropic Messages**: `usage.input_tokens`, `output_tokens`,
//!   `cache_creation_input_tokens` (split into `cache_creation.ephemeral_5m_input_tokens` /
//!   `ephemeral_1h_input_tokens` when present), `cache_read_input_tokens` and
//!   `server_tool_use.web_search_requests`. In a stream, `message_start` carries the input
//!   side and `message_delta` carries **running totals**, so later values replace earlier
//!   ones, never add to them. The 5m/1h split of cache writes comes with `message_start`
//!   only; a later total keeps that split (extra tokens count as 5-minute writes, fewer are
//!   taken off the 5-minute part first). `event: error` marks the stream as failed upstream.
//! - **OpenAI chat completions**: `usage.prompt_tokens` *includes*
//!   `prompt_tokens_details.cached_tokens`, so input = prompt − cached and cached tokens are
//!   priced as cache reads. Streams report usage in a final chunk when the request set
//!   `stream_options.include_usage`.
//! - **OpenAI Responses** (`/v1/responses`): `usage.input_tokens` includes
//!   `input_tokens_details.cached_tokens` (priced as cache reads) and `output_tokens`
//!   includes the reasoning tokens. Streams carry the response object in the
//!   `response.created` / `response.completed` / `response.incomplete` / `response.failed`
//!   events; usage arrives with the last of them, which also ends the stream.
//!
//! ```
//! use palisade::cost::usage::UsageExtractor;
//!
//! let mut x = UsageExtractor::new();
//! x.on_event(b"message_start", br#"{"type":"message_start","message":{"model":"claude-sonnet-4-5","usage":{"input_tokens":10,"output_tokens":1}}}"#);
//! x.on_event(b"message_delta", br#"{"type":"message_delta","usage":{"output_tokens":40}}"#);
//! x.on_event(b"message_delta", br#"{"type":"message_delta","usage":{"output_tokens":42}}"#);
//! assert_eq!(x.model(), Some("claude-sonnet-4-5"));
//! assert_eq!(x.usage().input_tokens, 10);
//! assert_eq!(x.usage().output_tokens, 42); // running total: replaced, not added
//! ```

use serde::{Deserialize, Serialize};

use super::json_view::View;

/// Token counts of one response, split by how each kind is priced.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default)]
pub struct Usage {
    /// Uncached input tokens (for OpenAI: `prompt_tokens - cached_tokens`).
    pub input_tokens: u64,
    /// Output tokens (reasoning tokens included, as the providers bill them).
    pub output_tokens: u64,
    /// Tokens written to a 5-minute cache (Anthropic's default cache write).
    pub cache_write_5m_tokens: u64,
    /// Tokens written to a 1-hour cache.
    pub cache_write_1h_tokens: u64,
    /// Tokens read from the cache (OpenAI's `cached_tokens`).
    pub cache_read_tokens: u64,
    /// Server-side web searches (Anthropic `server_tool_use.web_search_requests`).
    pub web_search_requests: u64,
}

impl Usage {
    /// Every input-side token: uncached input, cache writes and cache reads. Long-context
    /// price tiers are chosen on this number.
    pub const fn total_input_tokens(&self) -> u64 {
        self.input_tokens
            .saturating_add(self.cache_write_5m_tokens)
            .saturating_add(self.cache_write_1h_tokens)
            .saturating_add(self.cache_read_tokens)
    }

    /// Whether no token at all was counted.
    pub const fn is_empty(&self) -> bool {
        self.total_input_tokens() == 0 && self.output_tokens == 0 && self.web_search_requests == 0
    }

    /// Adds `other` to `self` (saturating).
    pub fn add(&mut self, other: &Usage) {
        self.input_tokens = self.input_tokens.saturating_add(other.input_tokens);
        self.output_tokens = self.output_tokens.saturating_add(other.output_tokens);
        self.cache_write_5m_tokens = self
            .cache_write_5m_tokens
            .saturating_add(other.cache_write_5m_tokens);
        self.cache_write_1h_tokens = self
            .cache_write_1h_tokens
            .saturating_add(other.cache_write_1h_tokens);
        self.cache_read_tokens = self
            .cache_read_tokens
            .saturating_add(other.cache_read_tokens);
        self.web_search_requests = self
            .web_search_requests
            .saturating_add(other.web_search_requests);
    }
}

/// Which API a response came from, as recognised from its content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ApiFormat {
    /// Anthropic Messages.
    Anthropic,
    /// OpenAI chat completions.
    OpenAi,
    /// OpenAI Responses (`/v1/responses`).
    OpenAiResponses,
}

/// An error the upstream reported inside the body (Anthropic `event: error`, or an error
/// object in a JSON body).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpstreamError {
    /// The error's `type` (for example `overloaded_error`), or `error` when absent.
    pub kind: String,
}

/// Reads usage from a response as it passes. See the [module docs](self).
#[derive(Debug, Clone, Default)]
pub struct UsageExtractor {
    usage: Usage,
    model: Option<String>,
    format: Option<ApiFormat>,
    seen_usage: bool,
    cache_split_seen: bool,
    finished: bool,
    error: Option<UpstreamError>,
    parse_failures: u64,
}

/// A token count: a non-negative integer, written as one (`2745`) or as an integral
/// float (`2745.0`, `1.59217e5`), which every JSON reader takes for the same number. A
/// count past `u64::MAX` saturates; negative or fractional values are not counts.
fn u(v: Option<&View<'_>>) -> Option<u64> {
    let n = v?.as_number()?;
    n.as_u64().or_else(|| {
        n.as_f64()
            .filter(|f| f.is_finite() && *f >= 0.0 && f.fract() == 0.0)
            // `as` saturates at u64::MAX
            .map(|f| f as u64)
    })
}

impl UsageExtractor {
    /// An extractor that has seen nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The usage seen so far.
    pub fn usage(&self) -> &Usage {
        &self.usage
    }

    /// The model the response named, if seen.
    pub fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }

    /// Takes the model out (for the record written last).
    pub(crate) fn take_model_name(&mut self) -> Option<String> {
        self.model.take()
    }

    /// The API format recognised, if any.
    pub fn format(&self) -> Option<ApiFormat> {
        self.format
    }

    /// Whether any usage object was seen.
    pub fn saw_usage(&self) -> bool {
        self.seen_usage
    }

    /// Whether the response said it was finished (`message_stop`, `[DONE]`, a complete
    /// JSON document).
    pub fn finished(&self) -> bool {
        self.finished
    }

    /// The error the upstream reported in the body, if any.
    pub fn upstream_error(&self) -> Option<&UpstreamError> {
        self.error.as_ref()
    }

    /// How many payloads that should have been JSON could not be parsed.
    pub fn parse_failures(&self) -> u64 {
        self.parse_failures
    }

    /// Sets the model when the response never names it (for example from the request).
    pub fn set_model_if_absent(&mut self, model: &str) {
        if self.model.is_none() && !model.is_empty() {
            self.model = Some(model.to_owned());
        }
    }

    /// Whether an SSE event with this name and data needs to be parsed at all. Content
    /// deltas (nearly all of a stream) are skipped without touching JSON.
    pub fn wants_event(&self, event: &[u8], data: &[u8]) -> bool {
        match event {
            b"message_start" | b"message_delta" | b"message_stop" | b"error" => true,
            e if is_response_lifecycle(e) => true,
            b"" | b"message" => {
                if data == b"[DONE]" {
                    return true;
                }
                self.model.is_none()
                    || memchr::memmem::find(data, b"\"error\"").is_some()
                    || usage_object_follows(data)
                    || escapes_a_letter(data)
            }
            _ => false,
        }
    }

    /// Whether the data of an SSE event named `event` can matter (used with
    /// [`SseParser::feed_filtered`](super::sse::SseParser::feed_filtered) so that content
    /// deltas are never copied).
    pub fn wants_data(event: &[u8]) -> bool {
        matches!(
            event,
            b"" | b"message" | b"message_start" | b"message_delta" | b"message_stop" | b"error"
        ) || is_response_lifecycle(event)
    }

    /// Handles one SSE event (`event` empty for unnamed events).
    pub fn on_event(&mut self, event: &[u8], data: &[u8]) {
        if !self.wants_event(event, data) {
            return;
        }
        if data == b"[DONE]" {
            self.finished = true;
            return;
        }
        match View::parse(data) {
            Some(v) => self.apply_value(event, &v),
            None => self.parse_failures += 1,
        }
    }

    /// Handles a whole JSON response body.
    pub fn feed_json(&mut self, body: &[u8]) {
        match View::parse(body) {
            Some(v) => {
                self.apply_value(b"", &v);
                if self.error.is_none() {
                    self.finished = true;
                }
            }
            None => self.parse_failures += 1,
        }
    }

    /// Handles a JSON document already parsed (or assembled from its top-level members):
    /// `complete` says whether the whole document was seen.
    pub(crate) fn feed_value(&mut self, v: &View<'_>, complete: bool) {
        self.apply_value(b"", v);
        if complete && self.error.is_none() {
            self.finished = true;
        }
    }

    fn apply_value(&mut self, event: &[u8], v: &View<'_>) {
        let ty = v.get("type").and_then(View::as_str).unwrap_or_default();
        if event == b"error" || ty == "error" {
            let kind = v
                .get("error")
                .and_then(|e| e.get("type"))
                .and_then(View::as_str)
                .unwrap_or("error");
            self.error = Some(UpstreamError {
                kind: kind.to_owned(),
            });
            self.format.get_or_insert(ApiFormat::Anthropic);
            return;
        }
        match ty {
            "message_start" => {
                self.format = Some(ApiFormat::Anthropic);
                if let Some(msg) = v.get("message") {
                    self.take_model(msg);
                    if let Some(usage) = msg.get("usage") {
                        self.apply_anthropic(usage);
                    }
                }
                return;
            }
            "message_delta" => {
                self.format = Some(ApiFormat::Anthropic);
                if let Some(usage) = v.get("usage") {
                    self.apply_anthropic(usage);
                }
                return;
            }
            "message_stop" => {
                self.finished = true;
                return;
            }
            "message" => {
                self.format = Some(ApiFormat::Anthropic);
                self.take_model(v);
                if let Some(usage) = v.get("usage") {
                    self.apply_anthropic(usage);
                }
                return;
            }
            t if t.starts_with("response.") => {
                // A Responses stream event: the response object rides in `response`.
                self.format = Some(ApiFormat::OpenAiResponses);
                if let Some(r) = v.get("response").filter(|r| r.is_object()) {
                    self.apply_response(r);
                }
                if matches!(
                    t,
                    "response.completed" | "response.incomplete" | "response.failed"
                ) {
                    self.finished = true;
                }
                return;
            }
            _ => {}
        }
        if v.get("object").and_then(View::as_str) == Some("response") {
            self.format = Some(ApiFormat::OpenAiResponses);
            self.apply_response(v);
            return;
        }
        let object = v.get("object").and_then(View::as_str).unwrap_or_default();
        if object.starts_with("chat.completion") || v.get("choices").is_some() {
            self.format = Some(ApiFormat::OpenAi);
            self.take_model(v);
            if let Some(usage) = v.get("usage").filter(|u| u.is_object()) {
                self.apply_openai(usage);
            }
            return;
        }
        if let Some(err) = v.get("error").filter(|e| e.is_object()) {
            let kind = err
                .get("type")
                .and_then(View::as_str)
                .unwrap_or("error")
                .to_owned();
            self.error = Some(UpstreamError { kind });
            return;
        }
        // Unknown shape: still take a usage object if it looks like one of ours.
        self.take_model(v);
        if let Some(usage) = v.get("usage").filter(|u| u.is_object()) {
            if is_responses_usage(usage) {
                self.format.get_or_insert(ApiFormat::OpenAiResponses);
                self.apply_responses_usage(usage);
            } else if usage.get("prompt_tokens").is_some() {
                self.format.get_or_insert(ApiFormat::OpenAi);
                self.apply_openai(usage);
            } else {
                self.format.get_or_insert(ApiFormat::Anthropic);
                self.apply_anthropic(usage);
            }
        }
    }

    fn take_model(&mut self, v: &View<'_>) {
        let model = v.get("model").and_then(View::as_str);
        if let Some(m) = model.filter(|m| !m.is_empty() && self.model.as_deref() != Some(*m)) {
            self.model = Some(m.to_owned());
        }
    }

    /// Anthropic usage: every field present replaces the previous value (running totals).
    fn apply_anthropic(&mut self, usage: &View<'_>) {
        self.seen_usage = true;
        let x = &mut self.usage;
        if let Some(n) = u(usage.get("input_tokens")) {
            x.input_tokens = n;
        }
        if let Some(n) = u(usage.get("output_tokens")) {
            x.output_tokens = n;
        }
        if let Some(n) = u(usage.get("cache_read_input_tokens")) {
            x.cache_read_tokens = n;
        }
        let split = usage.get("cache_creation").filter(|c| c.is_object());
        let w5 = split.and_then(|c| u(c.get("ephemeral_5m_input_tokens")));
        let w1 = split.and_then(|c| u(c.get("ephemeral_1h_input_tokens")));
        let total = u(usage.get("cache_creation_input_tokens"));
        if w5.is_some() || w1.is_some() {
            self.cache_split_seen = true;
            x.cache_write_5m_tokens = w5.unwrap_or(0);
            x.cache_write_1h_tokens = w1.unwrap_or(0);
            if let Some(t) = total {
                reconcile_cache_writes(x, t);
            }
        } else if let Some(t) = total {
            if self.cache_split_seen {
                // `message_delta` carries only the running total: keep the split that
                // `message_start` gave and reconcile the total with it.
                reconcile_cache_writes(x, t);
            } else {
                x.cache_write_5m_tokens = t;
                x.cache_write_1h_tokens = 0;
            }
        }
        if let Some(n) = usage
            .get("server_tool_use")
            .and_then(|s| u(s.get("web_search_requests")))
        {
            x.web_search_requests = n;
        }
    }

    /// A Responses API response object (whole, or inside a `response.*` event).
    fn apply_response(&mut self, r: &View<'_>) {
        self.take_model(r);
        if let Some(usage) = r.get("usage").filter(|u| u.is_object()) {
            self.apply_responses_usage(usage);
        }
        let failed = r.get("status").and_then(View::as_str) == Some("failed");
        if let Some(err) = r.get("error").filter(|e| e.is_object()) {
            let kind = err
                .get("code")
                .or_else(|| err.get("type"))
                .and_then(View::as_str)
                .unwrap_or("error");
            self.error = Some(UpstreamError {
                kind: kind.to_owned(),
            });
        } else if failed {
            self.error = Some(UpstreamError {
                kind: "failed".to_owned(),
            });
        }
    }

    /// Responses usage: `input_tokens` *includes* `input_tokens_details.cached_tokens`;
    /// `output_tokens` includes `output_tokens_details.reasoning_tokens`.
    fn apply_responses_usage(&mut self, usage: &View<'_>) {
        self.seen_usage = true;
        let input = u(usage.get("input_tokens")).unwrap_or(0);
        let cached = usage
            .get("input_tokens_details")
            .and_then(|d| u(d.get("cached_tokens")))
            .unwrap_or(0)
            .min(input);
        let x = &mut self.usage;
        x.input_tokens = input - cached;
        x.cache_read_tokens = cached;
        x.output_tokens = u(usage.get("output_tokens")).unwrap_or(0);
    }

    fn apply_openai(&mut self, usage: &View<'_>) {
        self.seen_usage = true;
        let prompt = u(usage.get("prompt_tokens")).unwrap_or(0);
        let cached = usage
            .get("prompt_tokens_details")
            .and_then(|d| u(d.get("cached_tokens")))
            .unwrap_or(0)
            .min(prompt);
        let x = &mut self.usage;
        x.input_tokens = prompt - cached;
        x.cache_read_tokens = cached;
        x.output_tokens = u(usage.get("completion_tokens")).unwrap_or(0);
    }
}

/// `response.created`, `response.in_progress`, `response.completed`,
/// `response.incomplete`, `response.failed`: the Responses events that carry the response
/// object (its deltas never do).
fn is_response_lifecycle(event: &[u8]) -> bool {
    matches!(
        event,
        b"response.created"
            | b"response.in_progress"
            | b"response.completed"
            | b"response.incomplete"
            | b"response.failed"
            | b"response.queued"
    )
}

/// Whether a usage object has the Responses API's shape (`input_tokens` with
/// `input_tokens_details` / `output_tokens_details`), not Anthropic's.
fn is_responses_usage(usage: &View<'_>) -> bool {
    usage.get("input_tokens_details").is_some() || usage.get("output_tokens_details").is_some()
}

/// Makes the 5-minute / 1-hour cache-write split add up to `total` (the
/// `cache_creation_input_tokens` the upstream reported), keeping the split known so far:
/// tokens beyond the split are priced as 5-minute writes (the default cache), and a total
/// below the split takes the difference off the 5-minute part first, then the 1-hour part.
fn reconcile_cache_writes(x: &mut Usage, total: u64) {
    let split = x
        .cache_write_5m_tokens
        .saturating_add(x.cache_write_1h_tokens);
    if total >= split {
        x.cache_write_5m_tokens += total - split;
    } else {
        let mut excess = split - total;
        let from_5m = excess.min(x.cache_write_5m_tokens);
        x.cache_write_5m_tokens -= from_5m;
        excess -= from_5m;
        x.cache_write_1h_tokens -= excess.min(x.cache_write_1h_tokens);
    }
}

/// Whether `data` writes a lowercase letter as an escape (`\u0061` to `\u007a`), as a key
/// such as `"us\u0061ge"` or `"\u0065rror"` may: the byte searches above would miss it,
/// and a JSON reader (the whole-body path) decodes it. No encoder escapes ASCII letters
/// in ordinary text, so content deltas almost never get here.
fn escapes_a_letter(data: &[u8]) -> bool {
    memchr::memmem::find(data, b"\\u006").is_some()
        || memchr::memmem::find(data, b"\\u007").is_some()
}

/// Whether `data` holds `"usage"` followed by `:` and an object (not `null`).
fn usage_object_follows(data: &[u8]) -> bool {
    let finder = memchr::memmem::find_iter(data, b"\"usage\"");
    for at in finder {
        let rest = &data[at + 7..];
        let mut it = rest.iter().copied().skip_while(u8::is_ascii_whitespace);
        if it.next() == Some(b':') && it.find(|b| !b.is_ascii_whitespace()) == Some(b'{') {
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_chunks_with_escaped_keys_read_as_the_json_body_reads_them() {
        // A JSON reader decodes escapes in keys (`"us\u0061ge"` is `"usage"`): the stream
        // must count what the same chunk counts as a whole body.
        let chunks: [&[u8]; 3] = [
            br#"{"id":"c","object":"chat.completion.chunk","model":"gpt-4o","choices":[{"index":0,"delta":{"content":"hi"}}]}"#,
            br#"{"id":"c","object":"chat.completion.chunk","model":"gpt-4o","choices":[],"us\u0061ge":{"prompt_tokens":20,"completion_tokens":3,"prompt_tokens_details":{"cached_tokens":8}}}"#,
            br#"{"\u0065rror":{"type":"server_error","message":"x"}}"#,
        ];
        let mut x = UsageExtractor::new();
        x.on_event(b"", chunks[0]);
        x.on_event(b"", chunks[1]);
        let mut whole = UsageExtractor::new();
        whole.feed_json(chunks[1]);
        assert!(x.saw_usage());
        assert_eq!(*x.usage(), *whole.usage());
        assert_eq!(x.usage().input_tokens, 12);
        x.on_event(b"", chunks[2]);
        assert_eq!(
            x.upstream_error().map(|e| e.kind.as_str()),
            Some("server_error")
        );
    }

    #[test]
    fn anthropic_json_with_cache_split() {
        let mut x = UsageExtractor::new();
        x.feed_json(br#"{"id":"msg_1","type":"message","role":"assistant","model":"claude-opus-4-7",
            "content":[{"type":"text","text":"hi"}],
            "usage":{"input_tokens":6,"cache_creation_input_tokens":159217,"cache_read_input_tokens":0,
            "cache_creation":{"ephemeral_5m_input_tokens":159000,"ephemeral_1h_input_tokens":217},
            "output_tokens":2745,"server_tool_use":{"web_search_requests":2}}}"#);
        assert_eq!(x.format(), Some(ApiFormat::Anthropic));
        assert!(x.finished());
        assert_eq!(
            *x.usage(),
            Usage {
                input_tokens: 6,
                output_tokens: 2745,
                cache_write_5m_tokens: 159000,
                cache_write_1h_tokens: 217,
                cache_read_tokens: 0,
                web_search_requests: 2,
            }
        );
    }

    #[test]
    fn streamed_one_hour_cache_write_keeps_split_from_message_start() {
        let mut x = UsageExtractor::new();
        x.on_event(b"message_start", br#"{"type":"message_start","message":{"model":"claude-opus-4-7","usage":{"input_tokens":6,"cache_creation_input_tokens":159217,"cache_read_input_tokens":0,"cache_creation":{"ephemeral_5m_input_tokens":0,"ephemeral_1h_input_tokens":159217},"output_tokens":1}}}"#);
        x.on_event(b"message_delta", br#"{"type":"message_delta","usage":{"input_tokens":6,"cache_creation_input_tokens":159217,"cache_read_input_tokens":0,"output_tokens":2745}}"#);
        assert_eq!(x.usage().cache_write_5m_tokens, 0);
        assert_eq!(x.usage().cache_write_1h_tokens, 159_217);
        let cost = crate::cost::PriceTable::builtin()
            .cost("claude-opus-4-7", x.usage())
            .unwrap();
        assert_eq!(cost, crate::cost::Money::parse_dollars("1.660825").unwrap());
    }

    #[test]
    fn delta_total_that_differs_from_the_split_is_reconciled() {
        let start = br#"{"type":"message_start","message":{"model":"claude-opus-4-7","usage":{"input_tokens":1,"cache_creation_input_tokens":300,"cache_creation":{"ephemeral_5m_input_tokens":100,"ephemeral_1h_input_tokens":200},"output_tokens":1}}}"#;
        let delta = |total: u64| {
            format!(
                r#"{{"type":"message_delta","usage":{{"cache_creation_input_tokens":{total},"output_tokens":2}}}}"#
            )
        };
        let split = |total: u64| {
            let mut x = UsageExtractor::new();
            x.on_event(b"message_start", start);
            x.on_event(b"message_delta", delta(total).as_bytes());
            (
                x.usage().cache_write_5m_tokens,
                x.usage().cache_write_1h_tokens,
            )
        };
        assert_eq!(split(300), (100, 200));
        assert_eq!(split(350), (150, 200)); // extra tokens: the 5-minute rate
        assert_eq!(split(250), (50, 200)); // fewer: off the 5-minute part first
        assert_eq!(split(150), (0, 150)); // then off the 1-hour part
        assert_eq!(split(0), (0, 0));
        // without a split from message_start, a total is all 5-minute writes
        let mut x = UsageExtractor::new();
        x.on_event(b"message_delta", delta(40).as_bytes());
        assert_eq!(x.usage().cache_write_5m_tokens, 40);
    }

    #[test]
    fn integral_float_token_counts_are_counted_not_dropped() {
        // `2745.0` is the same count as `2745` to a JSON reader; dropping it bills $0.
        let mut x = UsageExtractor::new();
        x.feed_json(br#"{"type":"message","model":"claude-opus-4-7","usage":{"input_tokens":6.0,"output_tokens":2745.0,"cache_creation_input_tokens":1.59217e5}}"#);
        assert_eq!(x.usage().input_tokens, 6);
        assert_eq!(x.usage().output_tokens, 2745);
        assert_eq!(x.usage().cache_write_5m_tokens, 159_217);
        let mut x = UsageExtractor::new();
        x.feed_json(br#"{"object":"chat.completion","model":"gpt-4o","choices":[],"usage":{"prompt_tokens":2006.0,"completion_tokens":300.0,"prompt_tokens_details":{"cached_tokens":1920.0}}}"#);
        assert_eq!(
            (
                x.usage().input_tokens,
                x.usage().cache_read_tokens,
                x.usage().output_tokens
            ),
            (86, 1920, 300)
        );
        // A count past u64 saturates (never 0); negative or fractional values are not
        // counts: ignored.
        let mut x = UsageExtractor::new();
        x.feed_json(br#"{"type":"message","model":"m","usage":{"input_tokens":18446744073709551616,"output_tokens":-5,"cache_read_input_tokens":1.5}}"#);
        assert_eq!(x.usage().input_tokens, u64::MAX);
        assert_eq!(x.usage().output_tokens, 0);
        assert_eq!(x.usage().cache_read_tokens, 0);
    }

    #[test]
    fn openai_prompt_includes_cached() {
        let mut x = UsageExtractor::new();
        x.feed_json(br#"{"id":"c","object":"chat.completion","model":"gpt-4o-2024-08-06","choices":[],
            "usage":{"prompt_tokens":2006,"completion_tokens":300,"total_tokens":2306,
            "prompt_tokens_details":{"cached_tokens":1920},"completion_tokens_details":{"reasoning_tokens":0}}}"#);
        assert_eq!(x.format(), Some(ApiFormat::OpenAi));
        assert_eq!(x.usage().input_tokens, 86);
        assert_eq!(x.usage().cache_read_tokens, 1920);
        assert_eq!(x.usage().output_tokens, 300);
        assert_eq!(x.model(), Some("gpt-4o-2024-08-06"));
    }

    #[test]
    fn stream_error_and_filters() {
        let mut x = UsageExtractor::new();
        assert!(!x.wants_event(b"content_block_delta", b"{}"));
        assert!(x.wants_event(b"", b"{\"model\":\"m\"}"));
        x.on_event(
            b"",
            br#"{"object":"chat.completion.chunk","model":"gpt-4o","choices":[],"usage":null}"#,
        );
        assert!(!x.wants_event(b"", br#"{"choices":[],"usage":null}"#));
        assert!(x.wants_event(b"", br#"{"choices":[],"usage" : {"prompt_tokens":1}}"#));
        x.on_event(
            b"error",
            br#"{"type":"error","error":{"type":"overloaded_error","message":"x"}}"#,
        );
        assert_eq!(x.upstream_error().unwrap().kind, "overloaded_error");
        x.on_event(b"message_delta", b"{not json");
        assert_eq!(x.parse_failures(), 1);
    }
}
