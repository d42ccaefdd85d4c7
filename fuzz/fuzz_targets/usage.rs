//! Fuzzes usage extraction for the three wire formats (Anthropic Messages, OpenAI chat
//! completions, OpenAI Responses), as a JSON body and as a server-sent event stream.
//!
//! Properties:
//! - a response rendered from arbitrary token counts reads back exactly those counts, in
//!   JSON and streamed, however the stream is split (parse(render(x)) = x);
//! - arbitrary bytes never panic, and an SSE stream gives the same usage, model, end and
//!   error whole or split at any step (split input = whole input).
#![no_main]

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use palisade::cost::sse::SseParser;
use palisade::cost::usage::{ApiFormat, Usage, UsageExtractor};
use serde_json::json;

#[derive(Debug, Arbitrary)]
enum Input {
    Rendered(Rendered),
    Raw { step: u8, bytes: Vec<u8> },
}

#[derive(Debug, Arbitrary)]
struct Rendered {
    format: Format,
    model: u8,
    input: u32,
    output: u32,
    cache_write_5m: u32,
    cache_write_1h: u32,
    cache_read: u32,
    searches: u16,
    /// Running totals of output tokens sent before the final one (Anthropic streams).
    deltas: Vec<u32>,
    step: u8,
}

#[derive(Debug, Clone, Copy, Arbitrary)]
enum Format {
    Anthropic,
    OpenAi,
    Responses,
}

const MODELS: [&str; 3] = ["claude-sonnet-4-5", "gpt-4.1-mini", "m\u{e9}\"\\odel"];

/// One extraction: usage, model, whether the response ended, the upstream error.
type Seen = (Usage, Option<String>, bool, Option<String>);

fn seen(x: &UsageExtractor) -> Seen {
    (
        *x.usage(),
        x.model().map(str::to_owned),
        x.finished(),
        x.upstream_error().map(|e| e.kind.clone()),
    )
}

fn stream(bytes: &[u8], step: usize) -> Seen {
    let mut parser = SseParser::new();
    let mut x = UsageExtractor::new();
    for chunk in bytes.chunks(step.max(1)) {
        parser.feed(chunk, |ev| x.on_event(ev.event, ev.data));
    }
    seen(&x)
}

fn sse(events: &[(&str, serde_json::Value)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, data) in events {
        if !name.is_empty() {
            out.extend_from_slice(format!("event: {name}\n").as_bytes());
        }
        match data.as_str() {
            Some(raw) => out.extend_from_slice(format!("data: {raw}\n\n").as_bytes()),
            None => out.extend_from_slice(format!("data: {data}\n\n").as_bytes()),
        }
    }
    out
}

fn check_rendered(r: &Rendered) {
    let model = MODELS[usize::from(r.model) % MODELS.len()];
    let (input, output, read) = (
        u64::from(r.input),
        u64::from(r.output),
        u64::from(r.cache_read),
    );
    let (w5, w1) = (u64::from(r.cache_write_5m), u64::from(r.cache_write_1h));
    let expected = match r.format {
        Format::Anthropic => Usage {
            input_tokens: input,
            output_tokens: output,
            cache_write_5m_tokens: w5,
            cache_write_1h_tokens: w1,
            cache_read_tokens: read,
            web_search_requests: u64::from(r.searches),
        },
        // OpenAI counts cached tokens inside the prompt: input = prompt - cached.
        Format::OpenAi | Format::Responses => Usage {
            input_tokens: input,
            output_tokens: output,
            cache_read_tokens: read,
            ..Usage::default()
        },
    };
    let (body, events, format) = match r.format {
        Format::Anthropic => {
            let usage = json!({
                "input_tokens": input,
                "output_tokens": output,
                "cache_creation_input_tokens": w5 + w1,
                "cache_creation": {"ephemeral_5m_input_tokens": w5, "ephemeral_1h_input_tokens": w1},
                "cache_read_input_tokens": read,
                "server_tool_use": {"web_search_requests": r.searches},
            });
            let body = json!({"id": "msg_1", "type": "message", "role": "assistant", "model": model,
                "content": [{"type": "text", "text": "usage: {\"input_tokens\": 99}"}], "usage": usage});
            let mut start_usage = usage.clone();
            start_usage["output_tokens"] = json!(1);
            let mut events = vec![(
                "message_start",
                json!({"type": "message_start", "message": {"id": "msg_1", "type": "message",
                    "model": model, "content": [], "usage": start_usage}}),
            )];
            events.push((
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0,
                    "delta": {"type": "text_delta", "text": "\"usage\":{\"output_tokens\":7}"}}),
            ));
            for d in r.deltas.iter().take(8) {
                events.push((
                    "message_delta",
                    json!({"type": "message_delta", "usage": {"output_tokens": d}}),
                ));
            }
            events.push((
                "message_delta",
                json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                    "usage": {"output_tokens": output, "input_tokens": input,
                        "cache_creation_input_tokens": w5 + w1, "cache_read_input_tokens": read,
                        "server_tool_use": {"web_search_requests": r.searches}}}),
            ));
            events.push(("message_stop", json!({"type": "message_stop"})));
            (body, events, ApiFormat::Anthropic)
        }
        Format::OpenAi => {
            let usage = json!({"prompt_tokens": input + read, "completion_tokens": output,
                "total_tokens": input + read + output,
                "prompt_tokens_details": {"cached_tokens": read}});
            let body = json!({"id": "c1", "object": "chat.completion", "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "{\"usage\":1}"}}],
                "usage": usage});
            let events = vec![
                (
                    "",
                    json!({"id": "c1", "object": "chat.completion.chunk", "model": model,
                    "choices": [{"index": 0, "delta": {"content": "hi"}}]}),
                ),
                (
                    "",
                    json!({"id": "c1", "object": "chat.completion.chunk", "model": model,
                    "choices": [], "usage": usage}),
                ),
                // `data: [DONE]` ends the stream (written raw by `sse`).
                ("", json!("[DONE]")),
            ];
            (body, events, ApiFormat::OpenAi)
        }
        Format::Responses => {
            let usage = json!({"input_tokens": input + read, "output_tokens": output,
                "total_tokens": input + read + output,
                "input_tokens_details": {"cached_tokens": read},
                "output_tokens_details": {"reasoning_tokens": output / 2}});
            let body = json!({"id": "r1", "object": "response", "model": model,
                "status": "completed", "output": [], "usage": usage});
            let events = vec![
                (
                    "response.created",
                    json!({"type": "response.created", "response":
                    {"id": "r1", "object": "response", "model": model, "usage": null}}),
                ),
                (
                    "response.output_text.delta",
                    json!({"type": "response.output_text.delta", "delta": "x"}),
                ),
                (
                    "response.completed",
                    json!({"type": "response.completed", "response": body}),
                ),
            ];
            (body, events, ApiFormat::OpenAiResponses)
        }
    };

    let mut x = UsageExtractor::new();
    x.feed_json(&serde_json::to_vec(&body).unwrap());
    assert_eq!(
        seen(&x),
        (expected, Some(model.to_owned()), true, None),
        "{body}"
    );
    assert_eq!(x.format(), Some(format));
    assert_eq!(x.parse_failures(), 0);

    let bytes = sse(&events);
    let whole = stream(&bytes, bytes.len());
    assert_eq!(whole, (expected, Some(model.to_owned()), true, None));
    assert_eq!(stream(&bytes, usize::from(r.step) + 1), whole);
    if r.format == Format::OpenAi {
        // Without `data: [DONE]` a chat completion stream has not ended.
        let cut = &bytes[..bytes.len() - b"data: [DONE]\n\n".len()];
        assert!(!stream(cut, 5).2);
    }
}

impl PartialEq for Format {
    fn eq(&self, other: &Self) -> bool {
        std::mem::discriminant(self) == std::mem::discriminant(other)
    }
}

fuzz_target!(|input: Input| {
    match input {
        Input::Rendered(r) => check_rendered(&r),
        Input::Raw { step, bytes } => {
            let whole = stream(&bytes, bytes.len());
            assert_eq!(stream(&bytes, usize::from(step % 31) + 1), whole);
            // Whatever the JSON path makes of the bytes, it says so without panicking,
            // and never reports usage from a document it could not parse.
            let mut x = UsageExtractor::new();
            x.feed_json(&bytes);
            if x.parse_failures() > 0 {
                assert!(x.usage().is_empty() && !x.finished());
            }
        }
    }
});
