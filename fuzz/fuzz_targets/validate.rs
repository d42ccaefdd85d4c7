//! Fuzzes request validation (`palisade::validate`) with the demo gateway's Messages
//! request (`examples/chat_gateway/schema.rs`, mounted here unchanged).
//!
//! Properties:
//! - any bytes are accepted or refused with a typed 400 (`invalid_request`, in both error
//!   formats) listing at least one field, never a panic;
//! - the rendered error is valid JSON, says the fields, and is never much larger than the
//!   request (no amplification);
//! - every field a refusal names exists in the request: `messages[i].content[j].type`
//!   points at a real message and block;
//! - a request assembled only from valid parts is accepted.
#![no_main]

#[allow(dead_code)]
#[path = "../../examples/chat_gateway/schema.rs"]
mod schema;

use std::collections::BTreeSet;

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use palisade::validate::deserialize_json;
use palisade::{Error, ErrorFormat, ErrorKind};
use schema::{Limits, MessagesRequest};
use serde_json::{Value, json};

#[derive(Debug, Arbitrary)]
enum Input {
    Raw(Vec<u8>),
    Built(Built),
}

#[derive(Debug, Arbitrary)]
struct Built {
    model: u8,
    max_tokens: u32,
    messages: Vec<(bool, Vec<(u8, String)>, Option<String>)>,
    temperature: Option<u8>,
    user_id: Option<String>,
    system: Option<Vec<String>>,
    stream: Option<bool>,
}

const MODELS: [&str; 2] = ["claude-sonnet-4-5", "claude-haiku-4-5"];

fn limits() -> Limits {
    Limits {
        models: MODELS
            .iter()
            .map(|m| (*m).to_owned())
            .collect::<BTreeSet<_>>(),
        max_tokens: 8192,
    }
}

fn refused(err: &Error, input_len: usize) {
    assert_eq!(err.kind(), ErrorKind::InvalidRequest);
    assert!(!err.fields().is_empty(), "a refusal names a field");
    for format in [ErrorFormat::Anthropic, ErrorFormat::ProblemJson] {
        let res = err.to_response(format);
        assert_eq!(res.status(), 400);
        let body = res.body().as_bytes();
        let v: Value = serde_json::from_slice(body).expect("the error body is JSON");
        assert!(v.is_object());
        assert!(
            body.len() <= 2 * input_len + 8192,
            "a {input_len}-byte request got a {}-byte error",
            body.len()
        );
    }
}

/// Whether `field` (`messages[1].content[0].type`) points into `v`.
fn exists(v: &Value, field: &str) -> bool {
    let mut cur = v;
    for part in field.split('.') {
        let (name, indices) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if name == "body" && cur == v {
            return true;
        }
        // The last part may name a member the value lacks (`text` missing from a block).
        let Some(next) = cur.get(name) else {
            return true;
        };
        cur = next;
        for idx in indices.split(']').filter(|s| !s.is_empty()) {
            let i: usize = idx.trim_start_matches('[').parse().expect("an index");
            let Some(next) = cur.get(i) else { return false };
            cur = next;
        }
    }
    true
}

fn check(bytes: &[u8], should_pass: bool) {
    match deserialize_json::<MessagesRequest>(bytes) {
        Err(err) => {
            assert!(!should_pass, "a valid request refused: {err:?}");
            refused(&err, bytes.len());
        }
        Ok(req) => match req.check(&limits()) {
            Ok(()) => {}
            Err(fields) => {
                assert!(!should_pass, "a valid request refused: {fields:?}");
                let err = Error::invalid_fields(fields);
                refused(&err, bytes.len());
                let v: Value = serde_json::from_slice(bytes).unwrap();
                for f in err.fields() {
                    assert!(exists(&v, &f.field), "{} is not in the request", f.field);
                }
            }
        },
    }
}

fuzz_target!(|input: Input| match input {
    Input::Raw(bytes) => check(&bytes, false),
    Input::Built(b) => {
        let mut valid = !b.messages.is_empty() && (1..=8192).contains(&b.max_tokens);
        let messages: Vec<Value> = b
            .messages
            .iter()
            .take(8)
            .map(|(user, blocks, text)| {
                let role = if *user { "user" } else { "assistant" };
                match text {
                    Some(t) => {
                        valid &= !t.is_empty();
                        json!({"role": role, "content": t})
                    }
                    None => {
                        valid &= !blocks.is_empty();
                        let blocks: Vec<Value> = blocks
                            .iter()
                            .take(4)
                            .map(|(kind, t)| match kind % 4 {
                                0 => json!({"type": "text", "text": t}),
                                1 => json!({"type": "image", "source": {"type": "base64"}}),
                                2 => {
                                    valid = false;
                                    json!({"type": t})
                                }
                                _ => {
                                    valid = false;
                                    json!({"type": "text"})
                                }
                            })
                            .collect();
                        json!({"role": role, "content": blocks})
                    }
                }
            })
            .collect();
        let model = if b.model < 250 {
            MODELS[usize::from(b.model) % 2].to_owned()
        } else {
            valid = false;
            "gpt-unknown".to_owned()
        };
        let mut req = json!({"model": model, "max_tokens": b.max_tokens, "messages": messages});
        if let Some(t) = b.temperature {
            valid &= t <= 100;
            req["temperature"] = json!(f64::from(t) / 100.0);
        }
        if let Some(id) = &b.user_id {
            valid &= !id.is_empty() && id.chars().count() <= schema::MAX_USER_ID;
            req["metadata"] = json!({"user_id": id});
        }
        if let Some(system) = &b.system {
            req["system"] = json!(
                system
                    .iter()
                    .map(|t| json!({"type": "text", "text": t}))
                    .collect::<Vec<_>>()
            );
        }
        if let Some(s) = b.stream {
            req["stream"] = json!(s);
        }
        // A `type` chosen by the fuzzer may happen to be a valid block type.
        let type_valid = b.messages.iter().all(|(_, blocks, text)| {
            text.is_some()
                || blocks.iter().take(4).all(|(k, t)| match k % 4 {
                    2 => schema::BLOCK_TYPES.contains(&t.as_str()) && t != "text",
                    3 => false,
                    _ => true,
                })
        });
        check(
            &serde_json::to_vec(&req).unwrap(),
            valid || (type_valid && valid_without_types(&b)),
        );
    }
});

/// Whether everything but the block types of `b` is valid (see the fuzz target).
fn valid_without_types(b: &Built) -> bool {
    !b.messages.is_empty()
        && (1..=8192).contains(&b.max_tokens)
        && b.model < 250
        && b.temperature.is_none_or(|t| t <= 100)
        && b.user_id
            .as_ref()
            .is_none_or(|id| !id.is_empty() && id.chars().count() <= schema::MAX_USER_ID)
        && b.messages
            .iter()
            .take(8)
            .all(|(_, blocks, text)| match text {
                Some(t) => !t.is_empty(),
                None => !blocks.is_empty(),
            })
}
