//! The chat_gateway example over real sockets: built in-process from its own modules, served
//! on a free loopback port, called through a hyper client; upstreams are the built-in mock
//! or wiremock.
//!
//! The example's modules are mounted here at the crate root, as `main.rs` mounts them, so
//! their `crate::` paths resolve (one list for every gateway test crate, in
//! `chat_gateway_support/modules.rs`).
#![allow(dead_code)]

include!("chat_gateway_support/modules.rs");

use std::time::Duration;

use bytes::Bytes;
use http::Method;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use palisade::config::Env;
use serde_json::{Value, json};
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use fixture::{ADMIN, FAST_RETRIES, Gateway, OTHER, TLS_CERT, TLS_KEY, USER, chat};

/// The gateway on the built-in mock, retrying in milliseconds, with `vars` on top.
async fn start(vars: &[(&str, &str)]) -> Gateway {
    fixture::start(&fixture::with(FAST_RETRIES, vars)).await
}

fn anthropic_message() -> Value {
    json!({
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
        "content": [{"type": "text", "text": "hi"}], "stop_reason": "end_turn",
        "usage": {"input_tokens": 1000, "output_tokens": 200}
    })
}

#[tokio::test]
async fn plain_chat_through_the_mock_is_metered_and_carries_every_layers_headers() {
    let gw = start(&[]).await;
    let r = gw
        .post("/v1/messages", USER, chat("claude-sonnet-4-5"))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let body = r.json();
    assert_eq!(body["type"], "message");
    assert!(body["usage"]["input_tokens"].as_u64().unwrap() > 0);
    assert!(
        r.header("request-id").unwrap().starts_with("req_mock_"),
        "upstream request-id passed through"
    );
    assert_eq!(r.header("anthropic-ratelimit-requests-limit"), Some("4000"));
    assert!(r.header("x-request-id").unwrap().starts_with("req_"));
    assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
    assert!(
        r.header("x-palisade-cost-usd").is_some(),
        "cost header on a small JSON answer"
    );
    let limits: Vec<&str> = r
        .headers
        .get_all("ratelimit")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert!(
        limits.contains(&"\"global\";r=99;t=60")
            || limits.iter().any(|l| l.starts_with("\"global\";r=99")),
        "{limits:?}"
    );

    let records = gw.usage_records(1).await;
    let rec = &records[0].record;
    assert_eq!(rec.attribution.user.as_deref(), Some("alice"));
    assert_eq!(rec.model.as_deref(), Some("claude-sonnet-4-5"));
    assert!(rec.cost.is_some());
    assert_eq!(rec.request_id.as_deref(), r.header("x-request-id"));

    let usage = gw.get("/v1/usage", USER).await;
    assert_eq!(usage.status, 200);
    assert_eq!(usage.json()["report"]["total"]["requests"], 1);
}

#[tokio::test]
async fn a_client_cannot_choose_the_request_id_that_keys_usage_records() {
    let gw = start(&[]).await;
    let mut ids = Vec::new();
    for _ in 0..2 {
        let r = gw
            .call(
                Method::POST,
                "/v1/messages",
                Some(USER),
                Some(chat("claude-sonnet-4-5")),
                &[("x-request-id", "req_chosen")],
            )
            .await;
        assert_eq!(r.status, 200);
        let id = r.header("x-request-id").unwrap().to_owned();
        assert_ne!(id, "req_chosen");
        ids.push(id);
    }
    assert_ne!(ids[0], ids[1]);
    let records = gw.usage_records(2).await;
    assert!(
        records
            .iter()
            .all(|e| e.record.request_id.as_deref() != Some("req_chosen"))
    );
}

#[tokio::test]
async fn usage_is_private_to_each_user_and_whole_for_admins() {
    let gw = start(&[]).await;
    assert_eq!(
        gw.post("/v1/messages", USER, chat("claude-sonnet-4-5"))
            .await
            .status,
        200
    );
    assert_eq!(
        gw.post("/v1/messages", OTHER, chat("claude-opus-4-1"))
            .await
            .status,
        200
    );
    assert_eq!(
        gw.post("/v1/messages", OTHER, chat("claude-opus-4-1"))
            .await
            .status,
        200
    );
    gw.usage_records(3).await;

    let mine = gw.get("/v1/usage", USER).await.json();
    assert_eq!(mine["user"], "alice");
    assert_eq!(mine["report"]["total"]["requests"], 1);
    gw.get("/v1/usage?user=bob", USER)
        .await
        .anthropic_error(403, "permission_error");
    gw.get("/v1/usage?from=yesterday", USER)
        .await
        .anthropic_error(400, "invalid_request_error");
    let empty = gw
        .get("/v1/usage?from=2020-01-01&to=2020-01-02", USER)
        .await
        .json();
    assert_eq!(empty["report"]["total"]["requests"], 0);

    let all = gw.get("/v1/usage?top=1", ADMIN).await.json();
    assert_eq!(all["report"]["total"]["requests"], 3);
    assert_eq!(all["top"].as_array().unwrap().len(), 1);
    assert_eq!(all["top"][0]["user"], "bob", "opus twice costs more: {all}");
    let bob = gw.get("/v1/usage?user=bob", ADMIN).await.json();
    assert_eq!(bob["report"]["by_model"]["claude-opus-4-1"]["requests"], 2);
}

#[tokio::test]
async fn streamed_chat_passes_every_event_and_records_cache_tokens() {
    let gw = start(&[]).await;
    let mut body = chat("claude-sonnet-4-5");
    body["stream"] = json!(true);
    body["system"] = json!("You are terse.");
    // The mock writes the prompt cache on its first call and reads it after.
    for _ in 0..2 {
        let r = gw.post("/v1/messages", USER, body.clone()).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-type"), Some("text/event-stream"));
        let text = String::from_utf8_lossy(&r.body);
        for event in [
            "message_start",
            "content_block_delta",
            "message_delta",
            "message_stop",
        ] {
            assert!(
                text.contains(&format!("event: {event}")),
                "{event} missing in {text}"
            );
        }
    }
    let records = gw.usage_records(2).await;
    assert!(records.iter().all(|e| e.record.stream));
    assert_eq!(
        records
            .iter()
            .map(|e| e.record.usage.cache_write_5m_tokens)
            .sum::<u64>(),
        1024
    );
    assert_eq!(
        records
            .iter()
            .map(|e| e.record.usage.cache_read_tokens)
            .sum::<u64>(),
        1024
    );
}

#[tokio::test]
async fn refusals_401_403_404_in_anthropics_format_and_audited() {
    let gw = start(&[]).await;
    let r = gw
        .call(
            Method::POST,
            "/v1/messages",
            None,
            Some(chat("claude-sonnet-4-5")),
            &[],
        )
        .await;
    r.anthropic_error(401, "authentication_error");
    let wrong = &USER[..USER.len() - 1];
    let r = gw
        .post(
            "/v1/messages",
            &format!("{wrong}X"),
            chat("claude-sonnet-4-5"),
        )
        .await;
    r.anthropic_error(401, "authentication_error");
    let r = gw
        .post(
            "/v1/messages",
            &USER.to_uppercase(),
            chat("claude-sonnet-4-5"),
        )
        .await;
    r.anthropic_error(401, "authentication_error");
    // Bearer works as well as x-api-key.
    let r = gw
        .call(
            Method::GET,
            "/v1/bots",
            None,
            None,
            &[("authorization", &format!("Bearer {USER}"))],
        )
        .await;
    assert_eq!(r.status, 200);
    let r = gw.get("/admin/budgets/alice", USER).await;
    r.anthropic_error(403, "permission_error");
    let r = gw.get("/v1/nothing-here", USER).await;
    r.anthropic_error(404, "not_found_error");
    let r = gw.delete("/v1/messages", USER).await;
    assert_eq!(r.status, 405);
    assert_eq!(r.json()["error"]["type"], "invalid_request_error");
    // Health needs no key.
    let r = gw.call(Method::GET, "/health", None, None, &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["status"], "ok");
}

#[tokio::test]
async fn invalid_messages_request_lists_every_field_error() {
    let gw = start(&[]).await;
    let body = json!({
        "model": "gpt-4o",
        "max_tokens": 0,
        "temperature": 1.5,
        "metadata": {"user_id": "u".repeat(300)},
        "messages": [
            {"role": "system", "content": ""},
            {"role": "user", "content": [{"type": "video"}, {"type": "text"}]}
        ]
    });
    let r = gw.post("/v1/messages", USER, body).await;
    let error = r.anthropic_error(400, "invalid_request_error");
    let fields: Vec<&str> = error["fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["field"].as_str().unwrap())
        .collect();
    for f in [
        "model",
        "max_tokens",
        "messages[0].role",
        "messages[0].content",
        "messages[1].content[0].type",
        "messages[1].content[1].text",
        "temperature",
        "metadata.user_id",
    ] {
        assert!(fields.contains(&f), "{f} missing in {fields:?}");
    }
    // Wrong types and empty messages are 400s naming the field, not 500s.
    let r = gw.post("/v1/messages", USER, json!({"model": "claude-sonnet-4-5", "max_tokens": 10, "messages": [], "stream": "yes"})).await;
    r.anthropic_error(400, "invalid_request_error");
    let r = gw
        .post(
            "/v1/messages",
            USER,
            json!({"model": "claude-sonnet-4-5", "max_tokens": -1, "messages": []}),
        )
        .await;
    let e = r.anthropic_error(400, "invalid_request_error");
    assert_eq!(e["fields"][0]["field"], "max_tokens");
    let r = gw
        .post(
            "/v1/messages",
            USER,
            json!({"model": "claude-sonnet-4-5", "max_tokens": 10, "messages": []}),
        )
        .await;
    let e = r.anthropic_error(400, "invalid_request_error");
    assert_eq!(e["fields"][0]["field"], "messages");
}

#[tokio::test]
async fn oversized_body_is_413_and_non_json_is_415() {
    let gw = start(&[("PALISADE_GATEWAY_MAX_BODY", "2048")]).await;
    let mut body = chat("claude-sonnet-4-5");
    body["messages"][0]["content"] = json!("x".repeat(4096));
    let r = gw.post("/v1/messages", USER, body).await;
    r.anthropic_error(413, "request_too_large");
    // Without a content-length (chunked), the limit holds while reading.
    let stream = http_body_util::StreamBody::new(futures_iter(vec![
        Bytes::from(vec![b' '; 1500]),
        Bytes::from(vec![b' '; 1500]),
    ]));
    let req = http::Request::post(format!("http://{}/v1/messages", gw.addr))
        .header("x-api-key", USER)
        .header("content-type", "application/json")
        .body(stream)
        .unwrap();
    let client: Client<HttpConnector, _> = Client::builder(TokioExecutor::new()).build_http();
    let res = client.request(req).await.unwrap();
    assert_eq!(res.status(), 413);

    let r = gw
        .call(
            Method::POST,
            "/v1/messages",
            Some(USER),
            None,
            &[("content-type", "text/plain")],
        )
        .await;
    // Anthropic has no 415: its format says 400 invalid_request_error.
    r.anthropic_error(400, "invalid_request_error");
    let r = gw
        .call(
            Method::POST,
            "/v1/messages",
            Some(USER),
            None,
            &[("content-type", "text/plain")],
        )
        .await;
    assert!(String::from_utf8_lossy(&r.body).contains("content-type"));
    let problem = start(&[("PALISADE_ERROR_FORMAT", "problem")]).await;
    let r = problem
        .call(
            Method::POST,
            "/v1/messages",
            Some(USER),
            None,
            &[("content-type", "text/plain")],
        )
        .await;
    assert_eq!(r.status, 415);
}

fn futures_iter(
    chunks: Vec<Bytes>,
) -> impl futures_core::Stream<Item = Result<http_body::Frame<Bytes>, std::convert::Infallible>> {
    struct It(std::vec::IntoIter<Bytes>);
    impl futures_core::Stream for It {
        type Item = Result<http_body::Frame<Bytes>, std::convert::Infallible>;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Self::Item>> {
            std::task::Poll::Ready(self.0.next().map(|b| Ok(http_body::Frame::data(b))))
        }
    }
    It(chunks.into_iter())
}

#[tokio::test]
async fn rate_limit_429_with_retry_after_per_user_and_admin_reset() {
    let rules = r#"[{"name":"chat","method":"POST","route":"/v1/messages","key":"principal","limit":2,"window":"1m","skip_anonymous":true}]"#;
    let gw = start(&[("PALISADE_RATE_LIMIT_RULES", rules)]).await;
    for _ in 0..2 {
        assert_eq!(
            gw.post("/v1/messages", USER, chat("claude-sonnet-4-5"))
                .await
                .status,
            200
        );
    }
    let r = gw
        .post("/v1/messages", USER, chat("claude-sonnet-4-5"))
        .await;
    r.anthropic_error(429, "rate_limit_error");
    let wait: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=120).contains(&wait), "{wait}");
    // Another user has their own limit.
    assert_eq!(
        gw.post("/v1/messages", OTHER, chat("claude-sonnet-4-5"))
            .await
            .status,
        200
    );
    // An admin resets alice's limits.
    let r = gw
        .post("/admin/rate-limits/reset", ADMIN, json!({"user": "alice"}))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(
        gw.post("/v1/messages", USER, chat("claude-sonnet-4-5"))
            .await
            .status,
        200
    );
    let r = gw
        .post(
            "/admin/rate-limits/reset",
            ADMIN,
            json!({"user": "alice", "rules": ["nope"]}),
        )
        .await;
    r.anthropic_error(400, "invalid_request_error");
}

/// Without `PALISADE_RATE_LIMIT_RULES` the limits are palisade's presets (and the
/// gateway's `bot_chat`): `chat` counts per API key, 20 a minute, and an admin reset of the
/// user clears it.
#[tokio::test]
async fn default_limits_are_the_presets_and_an_admin_reset_clears_the_per_key_chat_limit() {
    let defaults = app::default_rules();
    let names: Vec<&str> = defaults.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        names,
        ["global", "chat", "bot_creation", "orchestrator", "bot_chat"]
    );
    for (i, preset) in [
        palisade::rate_limit::Rule::global(),
        palisade::rate_limit::Rule::chat(),
        palisade::rate_limit::Rule::bot_creation(),
        palisade::rate_limit::Rule::orchestrator(),
    ]
    .iter()
    .enumerate()
    {
        assert_eq!(defaults[i], palisade::rate_limit::RuleConfig::from(preset));
    }

    let gw = start(&[]).await;
    for _ in 0..20 {
        let r = gw
            .post("/v1/messages", USER, chat("claude-sonnet-4-5"))
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
    }
    let r = gw
        .post("/v1/messages", USER, chat("claude-sonnet-4-5"))
        .await;
    r.anthropic_error(429, "rate_limit_error");
    assert!(
        r.headers
            .get_all("ratelimit")
            .iter()
            .any(|v| v.to_str().unwrap().starts_with("\"chat\";r=0")),
        "the chat preset refused: {:?}",
        r.headers
    );
    let r = gw
        .post("/admin/rate-limits/reset", ADMIN, json!({"user": "alice"}))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let r = gw
        .post("/v1/messages", USER, chat("claude-sonnet-4-5"))
        .await;
    assert_eq!(
        r.status, 200,
        "the reset cleared the key's count: {:?}",
        r.body
    );
}

#[tokio::test]
async fn default_route_limits_bot_creation_at_ten_an_hour() {
    let gw = start(&[]).await;
    let bot = json!({"name": "Helper", "model": "claude-haiku-4-5"});
    for _ in 0..10 {
        assert_eq!(gw.post("/v1/bots", USER, bot.clone()).await.status, 201);
    }
    let r = gw.post("/v1/bots", USER, bot).await;
    r.anthropic_error(429, "rate_limit_error");
    assert!(r.header("retry-after").unwrap().parse::<u64>().unwrap() > 60);
}

#[tokio::test]
async fn budget_refusal_is_429_without_retry_and_admin_can_lift_it() {
    let gw = start(&[]).await;
    let r = gw
        .put(
            "/admin/budgets/alice",
            ADMIN,
            json!({"daily_limit_usd": "0"}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.json()["daily_limit_usd"], "0");
    let r = gw
        .post("/v1/messages", USER, chat("claude-sonnet-4-5"))
        .await;
    r.anthropic_error(429, "rate_limit_error");
    assert_eq!(r.header("x-should-retry"), Some("false"));
    assert!(r.header("retry-after").unwrap().parse::<u64>().unwrap() > 0);
    // Bob is not affected; lifting alice's limit lets her through.
    assert_eq!(
        gw.post("/v1/messages", OTHER, chat("claude-sonnet-4-5"))
            .await
            .status,
        200
    );
    let r = gw
        .put(
            "/admin/budgets/alice",
            ADMIN,
            json!({"daily_limit_usd": null}),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        gw.post("/v1/messages", USER, chat("claude-sonnet-4-5"))
            .await
            .status,
        200
    );
    let r = gw
        .put(
            "/admin/budgets/alice",
            ADMIN,
            json!({"daily_limit_usd": "ten"}),
        )
        .await;
    r.anthropic_error(400, "invalid_request_error");
}

#[tokio::test]
async fn budget_is_enforced_once_recorded_spend_reaches_it() {
    // One request reserves about $0.00404 (256 output tokens of claude-sonnet-4-5 plus its
    // input): the first fits in $0.00405, the second no longer does once the first settled.
    let gw = start(&[("PALISADE_GATEWAY_DAILY_BUDGET", "0.00405")]).await;
    assert_eq!(
        gw.post("/v1/messages", USER, chat("claude-sonnet-4-5"))
            .await
            .status,
        200
    );
    gw.usage_records(1).await;
    let r = gw
        .post("/v1/messages", USER, chat("claude-sonnet-4-5"))
        .await;
    r.anthropic_error(429, "rate_limit_error");
    assert_eq!(r.header("x-should-retry"), Some("false"));
    let view = gw.get("/admin/budgets/alice", ADMIN).await.json();
    assert_eq!(view["daily_limit_usd"], "0.00405");
    assert_ne!(view["spent_today_usd"], "0");
}

/// A web search tool without `max_uses` reserves `PALISADE_BUDGET_DEFAULT_MAX_USES`
/// searches (10 unless set) and `PALISADE_BUDGET_TOKENS_PER_WEB_SEARCH` input tokens for
/// each: on claude-sonnet-4-5 about $0.70, more than a $0.50 day holds.
#[tokio::test]
async fn a_web_search_without_max_uses_reserves_the_configured_searches() {
    let mut searching = chat("claude-sonnet-4-5");
    searching["tools"] = json!([{"type": "web_search_20250305", "name": "web_search"}]);
    let gw = start(&[("PALISADE_GATEWAY_DAILY_BUDGET", "0.5")]).await;
    let r = gw.post("/v1/messages", USER, searching.clone()).await;
    let error = r.anthropic_error(400, "invalid_request_error");
    let message = error["message"].as_str().unwrap();
    assert!(message.contains("`daily`"), "{message}");
    // with max_uses the request says what it may cost, and fits
    let mut bounded = searching.clone();
    bounded["tools"][0]["max_uses"] = json!(2);
    assert_eq!(gw.post("/v1/messages", USER, bounded).await.status, 200);

    // two searches of 10,000 tokens assumed: about $0.14, which fits
    let gw = start(&[
        ("PALISADE_GATEWAY_DAILY_BUDGET", "0.5"),
        ("PALISADE_BUDGET_DEFAULT_MAX_USES", "2"),
    ])
    .await;
    assert_eq!(gw.post("/v1/messages", USER, searching).await.status, 200);

    let mut env = Env::from_pairs([
        ("PALISADE_GATEWAY_API_KEYS", format!("alice={USER}")),
        ("PALISADE_BUDGET_DEFAULT_MAX_USES", "ten".to_owned()),
        ("PALISADE_BUDGET_TOKENS_PER_WEB_SEARCH", "-5".to_owned()),
        ("PALISADE_BUDGET_TOKENS_PER_WEB_FETCH", "many".to_owned()),
    ]);
    let _ = config::GatewayConfig::from_env(&mut env);
    let err = env.finish().unwrap_err();
    let names: Vec<&str> = err.problems().iter().map(|p| p.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "PALISADE_BUDGET_DEFAULT_MAX_USES",
            "PALISADE_BUDGET_TOKENS_PER_WEB_SEARCH",
            "PALISADE_BUDGET_TOKENS_PER_WEB_FETCH"
        ],
        "{err}"
    );
}

#[tokio::test]
async fn bots_create_list_chat_delete_and_stay_private() {
    let gw = start(&[]).await;
    let r = gw
        .post("/v1/bots", USER, json!({"name": "Chef", "model": "claude-haiku-4-5", "system_prompt": "You cook.", "max_tokens": 512, "temperature": 0.3}))
        .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let bot = r.json();
    let id = bot["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("bot_"));

    let list = gw.get("/v1/bots", USER).await.json();
    assert_eq!(list["data"].as_array().unwrap().len(), 1);
    assert_eq!(
        gw.get(&format!("/v1/bots/{id}"), USER).await.json()["name"],
        "Chef"
    );

    // Another user's bot is a 404, for reading, chatting and deleting.
    gw.get(&format!("/v1/bots/{id}"), OTHER)
        .await
        .anthropic_error(404, "not_found_error");
    let msg = json!({"messages": [{"role": "user", "content": "a recipe?"}]});
    gw.post(&format!("/v1/bots/{id}/messages"), OTHER, msg.clone())
        .await
        .anthropic_error(404, "not_found_error");
    gw.delete(&format!("/v1/bots/{id}"), OTHER)
        .await
        .anthropic_error(404, "not_found_error");
    assert!(
        gw.get("/v1/bots", OTHER).await.json()["data"]
            .as_array()
            .unwrap()
            .is_empty()
    );

    let r = gw
        .call(
            Method::POST,
            &format!("/v1/bots/{id}/messages"),
            Some(USER),
            Some(msg.clone()),
            &[("x-conversation-id", "conv-1")],
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.json()["model"], "claude-haiku-4-5");
    let records = gw.usage_records(1).await;
    assert_eq!(
        records[0].record.attribution.bot.as_deref(),
        Some(id.as_str())
    );
    assert_eq!(
        records[0].record.attribution.conversation.as_deref(),
        Some("conv-1")
    );
    let usage = gw.get("/v1/usage", USER).await.json();
    assert_eq!(usage["report"]["by_bot"][&id]["requests"], 1);
    assert_eq!(usage["report"]["by_conversation"]["conv-1"]["requests"], 1);

    let r = gw
        .call(
            Method::POST,
            &format!("/v1/bots/{id}/messages"),
            Some(USER),
            Some(msg),
            &[("x-conversation-id", "bad id\t")],
        )
        .await;
    r.anthropic_error(400, "invalid_request_error");

    let r = gw.delete(&format!("/v1/bots/{id}"), USER).await;
    assert_eq!(r.status, 204);
    gw.get(&format!("/v1/bots/{id}"), USER)
        .await
        .anthropic_error(404, "not_found_error");
    gw.get("/v1/bots/..%2F..%2Fetc", USER)
        .await
        .anthropic_error(404, "not_found_error");

    let r = gw.post("/v1/bots", USER, json!({"name": " ", "model": "gpt", "max_tokens": 0, "temperature": 9, "colour": "red"})).await;
    r.anthropic_error(400, "invalid_request_error");
    let r = gw
        .post(
            "/v1/bots",
            USER,
            json!({"name": "", "model": "gpt", "max_tokens": 0, "temperature": 9}),
        )
        .await;
    let e = r.anthropic_error(400, "invalid_request_error");
    assert!(e["fields"].as_array().unwrap().len() >= 4, "{e}");
}

#[tokio::test]
async fn parse_intent_returns_a_validated_draft_and_502_on_malformed_model_output() {
    let gw = start(&[]).await;
    let r = gw
        .post(
            "/v1/orchestrator/parse-intent",
            USER,
            json!({"description": "Recipe helper for vegetarian cooks"}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let draft = &r.json()["draft"];
    assert_eq!(draft["model"], "claude-haiku-4-5");
    assert!(!draft["name"].as_str().unwrap().is_empty());
    // The draft can be created as it is.
    assert_eq!(gw.post("/v1/bots", USER, draft.clone()).await.status, 201);

    let r = gw
        .post(
            "/v1/orchestrator/parse-intent",
            USER,
            json!({"description": "give me malformed output"}),
        )
        .await;
    assert_eq!(r.status, 502);
    let body = r.json();
    assert_eq!(body["type"], "error");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not a valid bot draft"),
        "{body}"
    );

    let r = gw
        .post(
            "/v1/orchestrator/parse-intent",
            USER,
            json!({"description": ""}),
        )
        .await;
    r.anthropic_error(400, "invalid_request_error");
}

#[tokio::test]
async fn fallback_model_serves_when_the_primary_is_overloaded_and_is_marked() {
    let gw = start(&[
        ("PALISADE_GATEWAY_FALLBACK_MODEL", "claude-haiku-4-5"),
        ("PALISADE_RETRY_MAX_RETRIES", "0"),
    ])
    .await;
    let r = gw.post("/v1/messages", USER, chat("mock-overloaded")).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(
        r.header("x-palisade-fallback"),
        Some("model:claude-haiku-4-5")
    );
    assert_eq!(r.json()["model"], "claude-haiku-4-5");
    let records = gw.usage_records(2).await;
    let served: Vec<_> = records.iter().filter(|e| e.record.status == 200).collect();
    assert_eq!(served.len(), 1);
    assert_eq!(
        served[0].record.fallback.as_deref(),
        Some("model:claude-haiku-4-5")
    );
    let usage = gw.get("/v1/usage", USER).await.json();
    assert_eq!(usage["report"]["fallbacks"], 1);
}

/// The dashboard and `/v1/usage` count the same requests as served by a fallback: those
/// it answered without an error. A fallback that failed too is in `by_fallback` (with its
/// error), not in `fallbacks`; the dashboard used to count it as served.
#[tokio::test]
async fn the_dashboard_and_usage_agree_that_an_errored_fallback_served_nothing() {
    let fallback = fixture::upstream_failing_once(anthropic_message()).await;
    let uri = fallback.uri();
    let gw = start(&[
        ("PALISADE_GATEWAY_FALLBACK_BASE_URL", uri.as_str()),
        ("PALISADE_RETRY_MAX_RETRIES", "0"),
    ])
    .await;
    // The primary (the mock) is overloaded both times; the fallback fails, then serves.
    let failed = gw.post("/v1/messages", USER, chat("mock-overloaded")).await;
    assert_eq!(failed.status, 500, "{:?}", failed.body);
    let served = gw.post("/v1/messages", USER, chat("mock-overloaded")).await;
    assert_eq!(served.status, 200, "{:?}", served.body);
    let records = gw.usage_records(4).await;
    assert_eq!(
        records
            .iter()
            .filter(|e| e.record.fallback.is_some())
            .count(),
        2
    );
    let usage = gw.get("/v1/usage", USER).await.json();
    assert_eq!(usage["report"]["fallbacks"], 1, "{usage}");
    let by_fallback = usage["report"]["by_fallback"].as_object().unwrap();
    let label = format!("upstream:{uri}");
    assert_eq!(by_fallback[&label]["requests"], 2, "{usage}");
    let dashboard = gw.get("/v1/dashboard/data", ADMIN).await.json();
    assert_eq!(dashboard["totals"]["fallbacks"], 1, "{dashboard}");
}

#[tokio::test]
async fn without_fallback_an_overloaded_upstream_answers_529_as_it_was() {
    let gw = start(&[("PALISADE_RETRY_MAX_RETRIES", "0")]).await;
    let r = gw.post("/v1/messages", USER, chat("mock-overloaded")).await;
    r.anthropic_error(529, "overloaded_error");
}

async fn wiremock_gateway(server: &MockServer, extra: &[(&str, &str)]) -> Gateway {
    let uri = server.uri();
    let mut vars = vec![
        ("ANTHROPIC_BASE_URL", uri.as_str()),
        ("ANTHROPIC_API_KEY", "sk-ant-upstream-secret"),
    ];
    vars.extend_from_slice(extra);
    start(&vars).await
}

#[tokio::test]
async fn retries_529_then_answers_and_forwards_headers_both_ways() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/messages"))
        .respond_with(ResponseTemplate::new(529).set_body_json(
            json!({"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}),
        ))
        .up_to_n_times(2)
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/v1/messages"))
        .and(header("x-api-key", "sk-ant-upstream-secret"))
        .and(header("anthropic-version", "2024-01-01"))
        .and(header("anthropic-beta", "prompt-caching-2024-07-31"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(anthropic_message())
                .insert_header("request-id", "req_upstream_1")
                .insert_header("anthropic-ratelimit-tokens-remaining", "12345")
                .insert_header("proxy-authenticate", "Basic realm=x")
                .insert_header("keep-alive", "timeout=5"),
        )
        .with_priority(2)
        .mount(&server)
        .await;
    let gw = wiremock_gateway(&server, &[("PALISADE_RETRY_MAX_RETRIES", "3")]).await;
    let r = gw
        .call(
            Method::POST,
            "/v1/messages",
            Some(USER),
            Some(chat("claude-sonnet-4-5")),
            &[
                ("anthropic-version", "2024-01-01"),
                ("anthropic-beta", "prompt-caching-2024-07-31"),
            ],
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.header("request-id"), Some("req_upstream_1"));
    assert_eq!(
        r.header("anthropic-ratelimit-tokens-remaining"),
        Some("12345")
    );
    assert_eq!(
        r.header("proxy-authenticate"),
        None,
        "hop-by-hop header dropped"
    );
    assert_eq!(r.header("keep-alive"), None, "hop-by-hop header dropped");
    assert_eq!(server.received_requests().await.unwrap().len(), 3);
    // The caller's key never goes upstream.
    for req in server.received_requests().await.unwrap() {
        assert_eq!(
            req.headers.get("x-api-key").unwrap(),
            "sk-ant-upstream-secret"
        );
    }
}

#[tokio::test]
async fn retries_a_500_on_post_like_the_sdks_do() {
    let server = fixture::upstream_failing_once(anthropic_message()).await;
    let gw = wiremock_gateway(&server, &[]).await;
    let r = gw
        .post("/v1/messages", USER, chat("claude-sonnet-4-5"))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(server.received_requests().await.unwrap().len(), 2);
}

/// Each attempt reaches the upstream, which answers after neither attempt's timeout: the
/// timeout is the gateway's own clock on real sockets, so it is generous (2 s, where a
/// loopback request arrives in well under a millisecond on a quiet machine) so that a
/// busy machine still delivers each attempt before the gateway gives up on it.
#[tokio::test]
async fn an_attempt_that_outlives_its_timeout_is_retried_then_reported() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(anthropic_message())
                .set_delay(Duration::from_secs(120)),
        )
        .mount(&server)
        .await;
    let gw = wiremock_gateway(
        &server,
        &[
            ("PALISADE_RETRY_ATTEMPT_TIMEOUT", "2s"),
            ("PALISADE_RETRY_MAX_RETRIES", "1"),
        ],
    )
    .await;
    let r = gw
        .post("/v1/messages", USER, chat("claude-sonnet-4-5"))
        .await;
    r.anthropic_error(500, "api_error");
    assert_eq!(server.received_requests().await.unwrap().len(), 2);
}

#[tokio::test]
async fn open_breaker_answers_529_with_retry_after_and_spares_the_upstream() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(500).set_body_json(
                json!({"type":"error","error":{"type":"api_error","message":"boom"}}),
            ),
        )
        .mount(&server)
        .await;
    let gw = wiremock_gateway(
        &server,
        &[
            ("PALISADE_RETRY_MAX_RETRIES", "0"),
            ("PALISADE_CIRCUIT_BREAKER_CONSECUTIVE_FAILURES", "3"),
            ("PALISADE_CIRCUIT_BREAKER_MINIMUM_CALLS", "3"),
            ("PALISADE_CIRCUIT_BREAKER_OPEN_DURATION", "30s"),
        ],
    )
    .await;
    for _ in 0..3 {
        let r = gw
            .post("/v1/messages", USER, chat("claude-sonnet-4-5"))
            .await;
        r.anthropic_error(500, "api_error");
    }
    let r = gw
        .post("/v1/messages", USER, chat("claude-sonnet-4-5"))
        .await;
    r.anthropic_error(529, "overloaded_error");
    let wait: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&wait), "{wait}");
    assert_eq!(
        server.received_requests().await.unwrap().len(),
        3,
        "the open breaker spared the upstream"
    );
    let health = gw.call(Method::GET, "/health", None, None, &[]).await;
    assert_eq!(health.status, 503);
    assert_eq!(health.json()["upstreams"][0]["available"], false);
}

#[tokio::test]
async fn open_breaker_falls_back_to_another_upstream() {
    let primary = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503))
        .mount(&primary)
        .await;
    let fallback = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(anthropic_message()))
        .mount(&fallback)
        .await;
    let url = fallback.uri();
    let gw = wiremock_gateway(
        &primary,
        &[
            ("PALISADE_GATEWAY_FALLBACK_BASE_URL", url.as_str()),
            ("PALISADE_RETRY_MAX_RETRIES", "0"),
            ("PALISADE_CIRCUIT_BREAKER_CONSECUTIVE_FAILURES", "2"),
            ("PALISADE_CIRCUIT_BREAKER_MINIMUM_CALLS", "2"),
        ],
    )
    .await;
    for _ in 0..2 {
        gw.post("/v1/messages", USER, chat("claude-sonnet-4-5"))
            .await;
    }
    let r = gw
        .post("/v1/messages", USER, chat("claude-sonnet-4-5"))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(
        r.header("x-palisade-fallback"),
        Some(format!("upstream:{url}").as_str())
    );
    assert_eq!(primary.received_requests().await.unwrap().len(), 2);
    assert_eq!(fallback.received_requests().await.unwrap().len(), 1);
    let health = gw.call(Method::GET, "/health", None, None, &[]).await;
    assert_eq!(health.status, 200, "the fallback can still serve");
}

#[tokio::test]
async fn layers_off_is_a_bare_pass_through() {
    let gw = start(&[("PALISADE_GATEWAY_LAYERS", "off")]).await;
    let r = gw
        .post("/v1/messages", USER, chat("claude-sonnet-4-5"))
        .await;
    assert_eq!(r.status, 200);
    assert!(r.header("ratelimit").is_none());
    assert!(r.header("x-content-type-options").is_none());
    assert!(r.header("x-palisade-cost-usd").is_none());
}

#[test]
fn configuration_reports_every_problem_at_once() {
    let mut env = Env::from_pairs([
        ("PALISADE_GATEWAY_ADDR", "localhost"),
        ("PALISADE_GATEWAY_LAYERS", "maybe"),
        ("ANTHROPIC_BASE_URL", "ftp://example.com"),
        ("PALISADE_GATEWAY_API_KEYS", "alice"),
        ("PALISADE_GATEWAY_DAILY_BUDGET", "lots"),
        ("REDIS_URL", "127.0.0.1:6379"),
        // Refused by every build: no `postgres` feature, or not a PostgreSQL URL.
        ("DATABASE_URL", "mysql://u:secret@127.0.0.1/db"),
        ("PALISADE_GATEWAY_ALERT_WEBHOOK", "hooks.example.com/secret"),
    ]);
    let _ = config::GatewayConfig::from_env(&mut env);
    let err = env.finish().unwrap_err();
    let names: Vec<&str> = err.problems().iter().map(|p| p.name.as_str()).collect();
    for name in [
        "PALISADE_GATEWAY_ADDR",
        "PALISADE_GATEWAY_LAYERS",
        "ANTHROPIC_BASE_URL",
        "ANTHROPIC_API_KEY",
        "PALISADE_GATEWAY_API_KEYS",
        "PALISADE_GATEWAY_DAILY_BUDGET",
        "REDIS_URL",
        "DATABASE_URL",
        "PALISADE_GATEWAY_ALERT_WEBHOOK",
    ] {
        assert!(names.contains(&name), "{name} not reported: {err}");
    }
    let text = err.to_string();
    assert!(
        !text.contains("secret"),
        "a URL with a password is not echoed: {text}"
    );
}

/// Without the `postgres` feature, `DATABASE_URL` is refused with the way to build, never
/// ignored.
#[cfg(not(feature = "postgres"))]
#[test]
fn database_url_without_the_postgres_feature_names_the_feature() {
    let mut env = Env::from_pairs([("DATABASE_URL", "postgres://ledger:s3cret@127.0.0.1/db")]);
    let _ = config::GatewayConfig::from_env(&mut env);
    let text = env.finish().unwrap_err().to_string();
    assert!(text.contains("DATABASE_URL"), "{text}");
    assert!(text.contains("--features postgres"), "{text}");
    assert!(!text.contains("s3cret"), "{text}");
}

/// A stream idle timeout is added to the clock on every frame of an upstream answer: one
/// too large to add panicked the request's task (the client got no answer at all), and 0
/// ended every answer at once. Like the server loop's deadlines, it is refused at start-up
/// unless it is above 0 and at most a day.
#[test]
fn a_stream_idle_timeout_beyond_a_day_or_zero_is_refused_at_start_up() {
    for value in ["18446744073709551615s", "25h", "0s"] {
        let mut env = Env::from_pairs([("PALISADE_GATEWAY_STREAM_IDLE_TIMEOUT", value)]);
        let _ = config::GatewayConfig::from_env(&mut env);
        let err = env
            .finish()
            .expect_err(&format!("STREAM_IDLE_TIMEOUT={value} is refused"));
        assert_eq!(
            err.problems()[0].name,
            "PALISADE_GATEWAY_STREAM_IDLE_TIMEOUT",
            "{err}"
        );
    }
    let mut env = Env::from_pairs([("PALISADE_GATEWAY_STREAM_IDLE_TIMEOUT", "24h")]);
    let config = config::GatewayConfig::from_env(&mut env);
    env.finish().unwrap();
    assert_eq!(config.stream_idle_timeout, Duration::from_secs(24 * 3600));
}

/// The shutdown grace and the body timeout are added to the clock like the server loop's
/// timeouts: each is refused past a day (a value too large to add could panic a flush at
/// shutdown), and a body timeout of 0 (every body late, every request a 408) is refused too;
/// a grace of 0 (stop without waiting) is allowed.
#[test]
fn a_shutdown_grace_or_body_timeout_beyond_a_day_is_refused_at_start_up() {
    for (name, value) in [
        ("PALISADE_GATEWAY_SHUTDOWN_GRACE", "18446744073709551615s"),
        ("PALISADE_GATEWAY_SHUTDOWN_GRACE", "25h"),
        ("PALISADE_GATEWAY_BODY_TIMEOUT", "18446744073709551615s"),
        ("PALISADE_GATEWAY_BODY_TIMEOUT", "25h"),
        ("PALISADE_GATEWAY_BODY_TIMEOUT", "0s"),
    ] {
        let mut env = Env::from_pairs([(name, value)]);
        let _ = config::GatewayConfig::from_env(&mut env);
        let err = env
            .finish()
            .expect_err(&format!("{name}={value} is refused"));
        assert_eq!(err.problems()[0].name, name, "{err}");
    }
    let mut env = Env::from_pairs([
        ("PALISADE_GATEWAY_SHUTDOWN_GRACE", "0s"),
        ("PALISADE_GATEWAY_BODY_TIMEOUT", "24h"),
    ]);
    let config = config::GatewayConfig::from_env(&mut env);
    env.finish().unwrap();
    assert_eq!(config.shutdown_grace, Duration::ZERO);
    assert_eq!(config.body_timeout, Duration::from_secs(24 * 3600));
}

/// The gateway takes its Redis address from `REDIS_URL` alone. `PALISADE_REDIS_URL` (the
/// shared settings' field) and the rate-limit store's own `PALISADE_RATE_LIMIT_REDIS_URL`
/// and `_CLUSTER_NODES` were read and then ignored: an operator who set one got limits
/// and budgets in each instance's memory, with nothing said. Each is refused at start-up,
/// naming `REDIS_URL`, in every build, with `REDIS_URL` set or not.
#[test]
fn redis_addresses_the_gateway_does_not_read_are_refused_naming_redis_url() {
    for name in [
        "PALISADE_REDIS_URL",
        "PALISADE_RATE_LIMIT_REDIS_URL",
        "PALISADE_RATE_LIMIT_REDIS_CLUSTER_NODES",
    ] {
        for redis_url in [None, Some("redis://127.0.0.1:6379/")] {
            let mut pairs = vec![(name, "redis://:s3cret@10.0.0.5:6379/")];
            pairs.extend(redis_url.map(|u| ("REDIS_URL", u)));
            let mut env = Env::from_pairs(pairs);
            let _ = config::GatewayConfig::from_env(&mut env);
            let Err(err) = env.finish() else {
                // A build without Redis refuses REDIS_URL itself; without it, nothing was
                // reported at all.
                panic!("{name} (REDIS_URL {redis_url:?}) was accepted and ignored");
            };
            let text = err.to_string();
            assert!(
                err.problems().iter().any(|p| p.name == name),
                "{name} not reported: {text}"
            );
            assert!(text.contains("REDIS_URL"), "{text}");
            assert!(!text.contains("s3cret"), "{text}");
        }
    }
}

/// One key under two names, or as both a user and an admin key, was accepted: the first
/// entry won every request, so the other name never authenticated (an admin listed after
/// a user with the same key lost the admin routes), with nothing said. It is refused at
/// start-up, naming the entries but never the key.
#[test]
fn a_key_listed_twice_is_refused_at_start_up() {
    const KEY: &str = "sk-shared-0123456789abcdef";
    let cases: [&[(&str, String)]; 2] = [
        &[(
            "PALISADE_GATEWAY_API_KEYS",
            format!("alice={KEY},bob=sk-bob-0123456789abcdef,carol={KEY}"),
        )],
        &[
            ("PALISADE_GATEWAY_API_KEYS", format!("alice={KEY}")),
            ("PALISADE_GATEWAY_ADMIN_KEYS", format!("ops={KEY}")),
        ],
    ];
    for vars in cases {
        let mut env = Env::from_pairs(vars.iter().map(|(k, v)| (*k, v.as_str())));
        let _ = config::GatewayConfig::from_env(&mut env);
        let Err(err) = env.finish() else {
            let names: Vec<&str> = vars.iter().map(|(k, _)| *k).collect();
            panic!("a key listed twice was accepted ({names:?})");
        };
        let text = err.to_string();
        assert!(text.contains("listed twice"), "{text}");
        assert!(
            !text.contains("0123456789abcdef"),
            "the key is not echoed: {text}"
        );
    }
}

/// Setting only the user keys leaves no admin key at all (the demo admin key is not kept),
/// and the other way round: the demo keys stand only when neither is set.
#[test]
fn the_demo_keys_stand_only_when_neither_key_list_is_set() {
    let mut env = Env::from_pairs([("PALISADE_GATEWAY_API_KEYS", "alice=sk-alice-0123456789")]);
    let config = config::GatewayConfig::from_env(&mut env);
    env.finish().unwrap();
    assert!(!config.demo_keys);
    assert_eq!(config.api_keys.len(), 1);
    assert!(config.admin_keys.is_empty());
}

/// A spike window under a millisecond passed the configuration (it is not 0) and then
/// stopped the gateway while it was being built, with "window must be longer than 0":
/// apart from every other problem, and saying something untrue of `500us`. It is a
/// configuration problem, reported with the rest.
#[test]
fn a_spike_window_under_a_millisecond_is_a_configuration_problem() {
    let mut env = Env::from_pairs([
        ("PALISADE_GATEWAY_SPIKE_WINDOW", "500us"),
        ("PALISADE_GATEWAY_LAYERS", "maybe"),
    ]);
    let _ = config::GatewayConfig::from_env(&mut env);
    let Err(err) = env.finish() else {
        panic!("a 500us spike window was accepted");
    };
    let text = err.to_string();
    let names: Vec<&str> = err.problems().iter().map(|p| p.name.as_str()).collect();
    assert!(
        names.contains(&"PALISADE_GATEWAY_SPIKE_WINDOW"),
        "not reported with the rest: {text}"
    );
    assert!(text.contains("at least 1ms"), "{text}");
}

#[test]
fn env_example_lists_every_gateway_variable() {
    let example = include_str!("../examples/chat_gateway/.env.example");
    let source = [include_str!("../examples/chat_gateway/config.rs")].concat();
    let mut missing = Vec::new();
    for (i, _) in source.match_indices("\"PALISADE_GATEWAY_") {
        let name: String = source[i + 1..]
            .chars()
            .take_while(|c| c.is_ascii_uppercase() || *c == '_')
            .collect();
        if !example.contains(&name) {
            missing.push(name);
        }
    }
    assert!(missing.is_empty(), ".env.example lacks {missing:?}");
    for name in [
        "ANTHROPIC_BASE_URL",
        "ANTHROPIC_API_KEY",
        "REDIS_URL",
        "DATABASE_URL",
        "PALISADE_ERROR_FORMAT",
    ] {
        assert!(example.contains(name), ".env.example lacks {name}");
    }
    // load.env parses and is accepted.
    let pairs = config::parse_env_file(include_str!("../examples/chat_gateway/load.env"));
    assert!(pairs.iter().any(|(k, _)| k == "PALISADE_RATE_LIMIT_RULES"));
    let mut env = Env::from_pairs(pairs);
    let _ = config::GatewayConfig::from_env(&mut env);
    env.finish().expect("load.env is a valid configuration");
}

/// The README's table of the gateway's own variables names each one the configuration
/// reads (a family may be written `PALISADE_GATEWAY_SPIKE_ALERTS`, `_WINDOW`).
#[test]
fn readme_table_lists_every_gateway_variable() {
    let readme = include_str!("../README.md");
    let start = readme
        .find("The gateway's own variables")
        .expect("the README has the table");
    let table = &readme[start..];
    let table = &table[table.find("\n|").expect("the table follows")..];
    let table = &table[..table.find("\n\n").unwrap_or(table.len())];
    let source = include_str!("../examples/chat_gateway/config.rs");
    let mut missing = Vec::new();
    for (i, _) in source.match_indices("\"PALISADE_GATEWAY_") {
        let name: String = source[i + 1..]
            .chars()
            .take_while(|c| c.is_ascii_uppercase() || *c == '_')
            .collect();
        let rest = &name["PALISADE_GATEWAY_".len()..];
        let suffix = rest.find('_').map(|j| format!("`{}`", &rest[j..]));
        let listed =
            table.contains(&format!("`{name}`")) || suffix.is_some_and(|s| table.contains(&s));
        if !listed && !missing.contains(&name) {
            missing.push(name);
        }
    }
    assert!(missing.is_empty(), "the README's table lacks {missing:?}");
}

/// The README's row for `PALISADE_GATEWAY_MODELS` names the default list, so a reader knows
/// which models are refused until they name them (it said "current Claude models", and
/// newer models palisade prices, `claude-opus-4-7` among them, are not in it).
#[test]
fn readme_names_every_default_model() {
    let readme = include_str!("../README.md");
    let row = readme
        .lines()
        .find(|l| l.starts_with("| `PALISADE_GATEWAY_MODELS` |"))
        .expect("the README has the row");
    for model in config::DEFAULT_MODELS
        .iter()
        .chain(&config::MOCK_FAULT_MODELS)
    {
        assert!(
            row.contains(&format!("`{model}`")),
            "the row lacks {model}: {row}"
        );
    }
}

/// Every model the gateway offers by default has a price in palisade's built-in table, so
/// its usage is costed and charged to budgets (an unpriced model would be refused by a
/// budget, or metered at no cost).
#[test]
fn every_default_model_has_a_builtin_price() {
    let prices = palisade::cost::PriceTable::builtin();
    let unpriced: Vec<&str> = config::DEFAULT_MODELS
        .iter()
        .copied()
        .filter(|m| prices.get(m).is_none())
        .collect();
    assert!(unpriced.is_empty(), "no built-in price for {unpriced:?}");
}

#[tokio::test]
async fn serves_https_with_http2_by_alpn_and_shuts_down_gracefully() {
    let config = fixture::config(&[
        ("PALISADE_GATEWAY_TLS_CERT", TLS_CERT),
        ("PALISADE_GATEWAY_TLS_KEY", TLS_KEY),
    ]);
    assert!(config.tls.is_some(), "TLS configured");
    let (gw, server) = fixture::serve_own_stoppable(config).await;
    let addr = gw.addr;
    let client = fixture::https_client(None);
    let req = http::Request::post(format!("https://localhost:{}/v1/messages", addr.port()))
        .header("x-api-key", USER)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(
            chat("claude-sonnet-4-5").to_string(),
        )))
        .unwrap();
    let res = client.request(req).await.expect("https answer");
    assert_eq!(res.status(), 200);
    assert_eq!(res.version(), http::Version::HTTP_2);
    drop(client);
    server.shutdown().await;
}

#[test]
fn tls_needs_both_files_and_files_that_load() {
    let mut env = Env::from_pairs([("PALISADE_GATEWAY_TLS_CERT", TLS_CERT)]);
    let _ = config::GatewayConfig::from_env(&mut env);
    let err = env.finish().unwrap_err();
    assert_eq!(err.problems()[0].name, "PALISADE_GATEWAY_TLS_KEY");

    // A key in the certificate's place.
    let mut env = Env::from_pairs([
        ("PALISADE_GATEWAY_TLS_CERT", TLS_KEY),
        ("PALISADE_GATEWAY_TLS_KEY", TLS_KEY),
    ]);
    let _ = config::GatewayConfig::from_env(&mut env);
    let err = env.finish().unwrap_err();
    assert_eq!(err.problems()[0].name, "PALISADE_GATEWAY_TLS_CERT");
    assert!(err.to_string().contains("no certificate"), "{err}");
}

/// Bot budgets and usage follow the route (`/v1/bots/{id}/messages`, after the ownership
/// check), never a client-sent `x-bot-id`: naming someone else's bot charges it nothing.
#[tokio::test]
async fn a_client_sent_bot_id_naming_another_users_bot_charges_that_bot_nothing() {
    let rules = r#"[{"name":"daily","scope":"user","period":"day","limit":"5"},{"name":"per_bot","scope":"bot","period":"day","limit":"5"}]"#;
    let gw = start(&[("PALISADE_BUDGET_RULES", rules)]).await;
    let helper = json!({"name": "Helper", "model": "claude-haiku-4-5"});
    let bobs = gw.post("/v1/bots", OTHER, helper.clone()).await.json()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let alices = gw.post("/v1/bots", USER, helper).await.json()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let spoof = [("x-bot-id", bobs.as_str()), ("x-user-id", "bob")];

    // The plain proxy with bob's bot named in headers.
    let r = gw
        .call(
            Method::POST,
            "/v1/messages",
            Some(USER),
            Some(chat("claude-haiku-4-5")),
            &spoof,
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    // Chatting as bob's bot through its route is a 404.
    let msg = json!({"messages": [{"role": "user", "content": "hi"}]});
    let r = gw
        .post(&format!("/v1/bots/{bobs}/messages"), USER, msg.clone())
        .await;
    assert_eq!(r.status, 404);
    // Alice's own bot, with bob's bot named in headers: charged to alice's bot.
    let r = gw
        .call(
            Method::POST,
            &format!("/v1/bots/{alices}/messages"),
            Some(USER),
            Some(msg),
            &spoof,
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);

    let entries = gw.usage_records(2).await;
    let bots: Vec<Option<&str>> = entries
        .iter()
        .map(|e| e.record.attribution.bot.as_deref())
        .collect();
    assert!(bots.contains(&None), "{bots:?}");
    assert!(bots.contains(&Some(alices.as_str())), "{bots:?}");
    assert!(!bots.contains(&Some(bobs.as_str())), "{bots:?}");
    assert!(
        entries
            .iter()
            .all(|e| e.record.attribution.user.as_deref() == Some("alice"))
    );
    let budgets = gw.state.budgets.layer().expect("budgets on");
    let spent = |bot: &str| {
        budgets
            .spend("per_bot", bot)
            .map_or(0, |(s, r)| s.picos() + r.picos())
    };
    assert_eq!(spent(&bobs), 0, "bob's bot was charged");
    assert!(spent(&alices) > 0, "alice's bot carries its own spend");
}

/// The client's attribution headers are removed before any layer sees the request: a rule
/// keyed by `x-bot-id` finds no such header, so a client cannot spend a bot's allowance
/// (or anyone's) by naming it.
#[tokio::test]
async fn attribution_headers_never_reach_the_layers() {
    let rules = r#"[{"name":"per_bot","key":"header:x-bot-id","limit":1,"window":"1m","skip_anonymous":true}]"#;
    let gw = start(&[("PALISADE_RATE_LIMIT_RULES", rules)]).await;
    for _ in 0..3 {
        let r = gw
            .call(
                Method::POST,
                "/v1/messages",
                Some(USER),
                Some(chat("claude-haiku-4-5")),
                &[("x-bot-id", "bot_someone_elses")],
            )
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
    }
}
