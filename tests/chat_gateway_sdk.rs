//! The official `anthropic` Python SDK drives the chat_gateway unchanged (only its base URL
//! points at the gateway): `messages.create`, `messages.stream`, and the SDK's error classes
//! for the gateway's 401, 400, 429 and 529 answers.
//!
//! The interpreter is `$PALISADE_TEST_PYTHON` (scripts/test.sh sets it to a virtualenv with
//! the SDK), else `target/test-venv/bin/python`. These tests fail, never skip, when it cannot
//! import `anthropic`.
#![allow(dead_code)]

include!("chat_gateway_support/modules.rs");

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

use fixture::{Gateway, NO_RETRIES, OTHER, USER};

/// The gateway on the built-in mock, without retries, with `vars` on top.
async fn start(vars: &[(&str, &str)]) -> Gateway {
    fixture::start(&fixture::with(NO_RETRIES, vars)).await
}

const SETUP: &str = "run scripts/test.sh, or create the virtualenv: python3 -m venv \
     target/test-venv && target/test-venv/bin/pip install anthropic (or point \
     PALISADE_TEST_PYTHON at an interpreter that has the SDK)";

/// The Python interpreter with the SDK.
fn python() -> PathBuf {
    std::env::var_os("PALISADE_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-venv/bin/python")
        })
}

/// Runs one scenario of tests/sdk/anthropic_sdk.py against `gw`; its JSON result.
async fn sdk(gw: &Gateway, scenario: &str) -> Value {
    let python = python();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/anthropic_sdk.py");
    let mut cmd = tokio::process::Command::new(&python);
    cmd.arg(&script)
        .arg(scenario)
        .env("GATEWAY_URL", format!("http://{}", gw.addr))
        .env("GATEWAY_KEY", USER)
        .env("GATEWAY_OTHER_KEY", OTHER)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .kill_on_drop(true);
    // The SDK reads these when they are set; the scenarios pass everything explicitly.
    for var in [
        "ANTHROPIC_API_KEY",
        "ANTHROPIC_AUTH_TOKEN",
        "ANTHROPIC_BASE_URL",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ] {
        cmd.env_remove(var);
    }
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("the SDK scenario finishes within a minute")
        .unwrap_or_else(|e| {
            panic!(
                "no Python interpreter at {} ({e}); {SETUP}",
                python.display()
            )
        });
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("No module named 'anthropic'"),
        "{} cannot import the anthropic SDK; {SETUP}",
        python.display()
    );
    assert!(
        out.status.success(),
        "the SDK scenario `{scenario}` failed ({}):\n{}\n{stdout}",
        out.status,
        stderr
    );
    let v: Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("the scenario printed no JSON ({e}): {stdout}"));
    v["result"].clone()
}

#[tokio::test]
async fn official_sdk_messages_create_through_the_gateway() {
    let gw = start(&[]).await;
    let r = sdk(&gw, "create").await;
    assert_eq!(r["type"], "message", "{r}");
    assert_eq!(r["role"], "assistant");
    assert_eq!(r["model"], "claude-sonnet-4-5");
    assert_eq!(r["stop_reason"], "end_turn");
    assert!(!r["text"].as_str().unwrap().is_empty(), "{r}");
    assert!(r["id"].as_str().unwrap().starts_with("msg_"), "{r}");
    assert!(r["usage"]["input_tokens"].as_u64().unwrap() > 0, "{r}");
    assert!(r["usage"]["output_tokens"].as_u64().unwrap() > 0, "{r}");
    // The upstream's request-id reaches the SDK.
    assert!(
        r["request_id"].as_str().is_some_and(|id| !id.is_empty()),
        "{r}"
    );

    let entries = gw.usage_records(1).await;
    let rec = &entries[0].record;
    assert_eq!(rec.attribution.user.as_deref(), Some("alice"));
    assert_eq!(rec.model.as_deref(), Some("claude-sonnet-4-5"));
    assert_eq!(
        rec.usage.output_tokens,
        r["usage"]["output_tokens"].as_u64().unwrap(),
        "the gateway metered what the SDK saw"
    );
    assert!(!rec.stream);
}

#[tokio::test]
async fn official_sdk_messages_stream_through_the_gateway() {
    let gw = start(&[]).await;
    let r = sdk(&gw, "stream").await;
    let events: Vec<String> = serde_json::from_value(r["events"].clone()).unwrap();
    for kind in [
        "message_start",
        "content_block_start",
        "text",
        "content_block_stop",
        "message_stop",
    ] {
        assert!(events.iter().any(|e| e == kind), "no {kind} in {events:?}");
    }
    assert_eq!(events.first().map(String::as_str), Some("message_start"));
    assert_eq!(events.last().map(String::as_str), Some("message_stop"));
    let text = r["text"].as_str().unwrap();
    assert!(!text.is_empty());
    assert_eq!(r["final_text"], text, "the SDK assembled the streamed text");
    assert_eq!(r["stop_reason"], "end_turn");
    assert_eq!(r["model"], "claude-haiku-4-5");
    assert!(r["usage"]["output_tokens"].as_u64().unwrap() > 0, "{r}");

    let entries = gw.usage_records(1).await;
    let rec = &entries[0].record;
    assert!(rec.stream, "metered as a stream");
    assert_eq!(rec.model.as_deref(), Some("claude-haiku-4-5"));
    assert_eq!(
        rec.usage.output_tokens,
        r["usage"]["output_tokens"].as_u64().unwrap()
    );
}

#[tokio::test]
async fn official_sdk_raises_its_own_error_classes_for_401_400_429_529() {
    let rules = r#"[{"name":"chat","method":"POST","route":"/v1/messages","key":"principal","limit":3,"window":"1m","skip_anonymous":true}]"#;
    let gw = start(&[("PALISADE_RATE_LIMIT_RULES", rules)]).await;
    let r = sdk(&gw, "errors").await;

    let check = |status: &str, class: &str, kind: &str| {
        let e = &r[status];
        assert_eq!(e["status"], status.parse::<u64>().unwrap(), "{e}");
        assert_eq!(e["class"], class, "{e}");
        assert_eq!(e["type"], kind, "{e}");
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{e}");
        e.clone()
    };
    check("401", "AuthenticationError", "authentication_error");
    let bad = check("400", "BadRequestError", "invalid_request_error");
    let message = bad["message"].as_str().unwrap();
    for field in ["max_tokens", "messages"] {
        assert!(
            message.contains(field),
            "every field error at once: {message}"
        );
    }
    let limited = check("429", "RateLimitError", "rate_limit_error");
    let wait: u64 = limited["retry_after"]
        .as_str()
        .expect("retry-after on a 429")
        .parse()
        .unwrap();
    assert!(wait >= 1, "{limited}");
    let overloaded = check("529", "OverloadedError", "overloaded_error");
    let classes: Vec<String> = serde_json::from_value(overloaded["classes"].clone()).unwrap();
    assert!(
        classes.iter().any(|c| c == "InternalServerError"),
        "{classes:?}"
    );
}
