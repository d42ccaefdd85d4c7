//! Attacks on the gateway's bot, orchestrator, usage and admin routes, over real sockets on
//! 127.0.0.1: who may reach what, who pays, what bad input gets back, and whether the
//! per-user limits hold under concurrent requests.
#![allow(dead_code)]

include!("chat_gateway_support/modules.rs");

use std::sync::Arc;

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::Full;
use palisade::cost::Money;
use serde_json::{Value, json};

use fixture::{ADMIN, FAST_RETRIES, Gateway, OTHER, Reply, USER};

/// The gateway on the built-in mock, retrying in milliseconds, with `vars` on top.
async fn start(vars: &[(&str, &str)]) -> Gateway {
    fixture::start(&fixture::with(FAST_RETRIES, vars)).await
}

/// One rule that no test here reaches, in place of the default limits.
const GENEROUS: &str = r#"[{"name":"generous","limit":100000,"window":"1m"}]"#;

/// Creates a bot of `model` as `key` and returns its id.
async fn bot(gw: &Gateway, key: &str, model: &str) -> String {
    let r = gw
        .post(
            "/v1/bots",
            key,
            json!({"name": "Assistant", "model": model}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    r.json()["id"].as_str().unwrap().to_owned()
}

fn hello() -> Value {
    json!({"messages": [{"role": "user", "content": "hello"}]})
}

/// A 4xx with a JSON error body whose message says something.
fn assert_typed_4xx(r: &Reply, what: &str) {
    assert!(
        r.status.is_client_error(),
        "{what}: {} {}",
        r.status,
        r.text()
    );
    let body: Value = serde_json::from_slice(&r.body)
        .unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {}", r.text()));
    assert_eq!(body["type"], "error", "{what}: {body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{what}: {body}"
    );
}

/// `method path` with `key`, a raw `body` and `content_type`.
async fn raw(
    gw: &Gateway,
    method: Method,
    path: &str,
    key: &str,
    content_type: Option<&str>,
    body: impl Into<Bytes>,
) -> Reply {
    let mut req = http::Request::builder()
        .method(method)
        .uri(format!("http://{}{path}", gw.addr))
        .header("x-api-key", key);
    if let Some(ct) = content_type {
        req = req.header("content-type", ct);
    }
    gw.send(req.body(Full::new(body.into())).unwrap()).await
}

// ---------------------------------------------------------------------------------------
// Authorization

/// A user key reaches no admin route, whatever spelling of the path it tries; and nothing
/// it sends changes a budget.
#[tokio::test]
async fn a_user_key_reaches_no_admin_route_by_any_spelling_of_the_path() {
    let gw = start(&[]).await;
    let paths = [
        "/admin/budgets/alice",
        "/admin/budgets/alice/",
        "//admin/budgets/alice",
        "/admin//budgets/alice",
        "/%61dmin/budgets/alice",
        "/Admin/budgets/alice",
        "/v1/../admin/budgets/alice",
        "/./admin/budgets/alice",
        "/admin/rate-limits/reset",
    ];
    for path in paths {
        for method in [Method::GET, Method::PUT, Method::POST] {
            let r = gw
                .call(
                    method.clone(),
                    path,
                    Some(USER),
                    Some(json!({"daily_limit_usd": "1000.00", "user": "alice"})),
                    &[],
                )
                .await;
            assert!(
                r.status == StatusCode::FORBIDDEN
                    || r.status == StatusCode::NOT_FOUND
                    || r.status == StatusCode::METHOD_NOT_ALLOWED,
                "{method} {path}: {} {}",
                r.status,
                r.text()
            );
            assert_typed_4xx(&r, path);
        }
    }
    let view = gw.get("/admin/budgets/alice", ADMIN).await.json();
    assert_eq!(view["custom"], false, "{view}");
    // The dashboard's data is everyone's spend: admin only too.
    let r = gw.get("/v1/dashboard/data", USER).await;
    assert_eq!(r.status, 403, "{}", r.text());
}

/// A user's `/v1/usage` is theirs alone, whatever `user` they name and however.
#[tokio::test]
async fn a_user_reads_no_one_elses_usage() {
    let gw = start(&[]).await;
    assert_eq!(gw.chat(OTHER, "claude-haiku-4-5").await.status, 200);
    gw.usage_records(1).await;
    for query in [
        "?user=bob",
        "?user=Bob",
        "?user=bob%00",
        "?user=",
        "?user=alice&user=bob",
        "?user=bob&user=alice",
        "?top=5",
    ] {
        let r = gw.get(&format!("/v1/usage{query}"), USER).await;
        if r.status == 200 {
            let body = r.json();
            assert_eq!(body["user"], "alice", "{query}: {body}");
            assert_eq!(body["report"]["total"]["requests"], 0, "{query}: {body}");
            assert!(body.get("top").is_none(), "{query}: {body}");
        } else {
            assert_typed_4xx(&r, query);
        }
    }
}

/// An admin key is a user of its own on the bot routes: it neither sees nor chats as
/// another user's bot (which would bill that user).
#[tokio::test]
async fn an_admin_key_cannot_chat_as_a_users_bot() {
    let gw = start(&[]).await;
    let id = bot(&gw, USER, "claude-haiku-4-5").await;
    let r = gw
        .post(&format!("/v1/bots/{id}/messages"), ADMIN, hello())
        .await;
    r.anthropic_error(404, "not_found_error");
    gw.get(&format!("/v1/bots/{id}"), ADMIN)
        .await
        .anthropic_error(404, "not_found_error");
    assert!(gw.records().is_empty());
}

/// A deleted bot cannot be chatted with, and its chat bills no one.
#[tokio::test]
async fn a_deleted_bot_bills_nothing() {
    let gw = start(&[]).await;
    let id = bot(&gw, USER, "claude-haiku-4-5").await;
    assert_eq!(gw.delete(&format!("/v1/bots/{id}"), USER).await.status, 204);
    gw.post(&format!("/v1/bots/{id}/messages"), USER, hello())
        .await
        .anthropic_error(404, "not_found_error");
    gw.delete(&format!("/v1/bots/{id}"), USER)
        .await
        .anthropic_error(404, "not_found_error");
    assert!(gw.records().is_empty());
}

// ---------------------------------------------------------------------------------------
// Money

/// A streamed bot chat is billed to its owner and the bot, as a non-streamed one is.
#[tokio::test]
async fn a_streamed_bot_chat_is_billed_to_the_owner_and_the_bot() {
    let gw = start(&[]).await;
    let id = bot(&gw, USER, "claude-haiku-4-5").await;
    let r = gw
        .call(
            Method::POST,
            &format!("/v1/bots/{id}/messages"),
            Some(USER),
            Some(json!({"messages": [{"role": "user", "content": "hi"}], "stream": true})),
            &[("x-conversation-id", "c-1")],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("message_stop"), "{}", r.text());
    let records = gw.usage_records(1).await;
    let rec = &records[0].record;
    assert!(rec.stream);
    assert_eq!(rec.attribution.user.as_deref(), Some("alice"));
    assert_eq!(rec.attribution.bot.as_deref(), Some(id.as_str()));
    assert_eq!(rec.attribution.conversation.as_deref(), Some("c-1"));
    assert!(rec.cost.is_some_and(|c| c > Money::ZERO), "{rec:?}");
}

/// A bot chat the upstream fails (after retries) is one record, billed to the owner and
/// the bot, marked as an error.
#[tokio::test]
async fn a_failed_bot_chat_is_one_error_record_of_the_owner_and_the_bot() {
    let gw = start(&[]).await;
    let id = bot(&gw, USER, "mock-error").await;
    let r = gw
        .post(&format!("/v1/bots/{id}/messages"), USER, hello())
        .await;
    assert_eq!(r.status, 500, "{}", r.text());
    let records = gw.usage_records(1).await;
    let records_after = gw.records_settled().await;
    assert_eq!(records_after.len(), 1, "{records_after:?}");
    let rec = &records[0].record;
    assert_eq!(rec.attribution.user.as_deref(), Some("alice"));
    assert_eq!(rec.attribution.bot.as_deref(), Some(id.as_str()));
    assert!(rec.completion.is_error(), "{rec:?}");
    let usage = gw.get("/v1/usage", USER).await.json();
    assert_eq!(usage["report"]["by_bot"][&id]["errors"], 1, "{usage}");
}

/// A bot chat served by the fallback is billed to the owner and the bot, and marked.
#[tokio::test]
async fn a_bot_chat_served_by_the_fallback_is_billed_to_the_owner_and_the_bot() {
    let gw = start(&[
        ("PALISADE_GATEWAY_FALLBACK_MODEL", "claude-haiku-4-5"),
        ("PALISADE_RETRY_MAX_RETRIES", "0"),
    ])
    .await;
    let id = bot(&gw, USER, "mock-overloaded").await;
    let r = gw
        .post(&format!("/v1/bots/{id}/messages"), USER, hello())
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.header("x-palisade-fallback"),
        Some("model:claude-haiku-4-5")
    );
    let records = gw.usage_records(2).await;
    for e in &records {
        assert_eq!(e.record.attribution.user.as_deref(), Some("alice"));
        assert_eq!(e.record.attribution.bot.as_deref(), Some(id.as_str()));
    }
    let usage = gw.get("/v1/usage", USER).await.json();
    assert_eq!(usage["report"]["fallbacks"], 1, "{usage}");
    assert_eq!(usage["report"]["by_bot"][&id]["requests"], 2, "{usage}");
}

fn picos(v: &Value) -> u128 {
    Money::parse_dollars(v.as_str().unwrap()).unwrap().picos()
}

/// `/v1/usage` adds up to the ledger: each user's total is the sum of their records, the
/// admin's total the sum of all, `top` splits it by user, `by_bot` holds each bot's chats;
/// and each user's daily budget was charged what their records cost, with nothing left
/// reserved (a refused chat included).
#[tokio::test]
async fn usage_and_budgets_add_up_to_the_ledger() {
    let gw = start(&[]).await;
    let a = bot(&gw, USER, "claude-haiku-4-5").await;
    let b = bot(&gw, OTHER, "claude-sonnet-4-5").await;
    let chat = |key: &'static str, id: String| {
        let gw = &gw;
        async move {
            let r = gw
                .post(&format!("/v1/bots/{id}/messages"), key, hello())
                .await;
            assert_eq!(r.status, 200, "{}", r.text());
        }
    };
    chat(USER, a.clone()).await;
    chat(USER, a.clone()).await;
    chat(OTHER, b.clone()).await;
    assert_eq!(gw.chat(USER, "claude-opus-4-5").await.status, 200);
    assert_eq!(
        gw.post(
            "/v1/orchestrator/parse-intent",
            USER,
            json!({"description": "a cook"})
        )
        .await
        .status,
        200
    );
    // Refused before the upstream: billed to no one.
    gw.post(&format!("/v1/bots/{b}/messages"), USER, hello())
        .await
        .anthropic_error(404, "not_found_error");
    let records = gw.usage_records(5).await;
    assert_eq!(records.len(), 5);
    let sum = |user: Option<&str>| -> u128 {
        records
            .iter()
            .filter(|e| user.is_none_or(|u| e.record.attribution.user.as_deref() == Some(u)))
            .map(|e| e.record.cost.unwrap().picos())
            .sum()
    };
    let alice = gw.get("/v1/usage", USER).await.json();
    assert_eq!(alice["report"]["total"]["requests"], 4, "{alice}");
    assert_eq!(
        picos(&alice["total_cost_usd"]),
        sum(Some("alice")),
        "{alice}"
    );
    assert_eq!(alice["report"]["by_bot"][&a]["requests"], 2, "{alice}");
    assert!(alice["report"]["by_bot"].get(&b).is_none(), "{alice}");
    let bob = gw.get("/v1/usage", OTHER).await.json();
    assert_eq!(picos(&bob["total_cost_usd"]), sum(Some("bob")), "{bob}");
    let all = gw.get("/v1/usage", ADMIN).await.json();
    assert_eq!(all["report"]["total"]["requests"], 5, "{all}");
    assert_eq!(picos(&all["total_cost_usd"]), sum(None), "{all}");
    let top: u128 = all["top"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| picos(&t["cost_usd"]))
        .sum();
    assert_eq!(top, sum(None), "{all}");
    for (user, key) in [("alice", ADMIN), ("bob", ADMIN)] {
        let view = gw.get(&format!("/admin/budgets/{user}"), key).await.json();
        assert_eq!(picos(&view["spent_today_usd"]), sum(Some(user)), "{view}");
        assert_eq!(view["reserved_usd"], "0", "{view}");
    }
}

// ---------------------------------------------------------------------------------------
// Limits under concurrency

async fn concurrently(gw: &Arc<Gateway>, n: usize, path: String, body: Value) -> Vec<u16> {
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..n {
        let gw = Arc::clone(gw);
        let path = path.clone();
        let body = body.clone();
        set.spawn(async move { gw.post(&path, USER, body).await.status.as_u16() });
    }
    let mut out = Vec::new();
    while let Some(s) = set.join_next().await {
        out.push(s.unwrap());
    }
    out
}

/// Thirty bots created at once: ten are created, the rest refused with 429.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bot_creation_holds_ten_an_hour_under_concurrency() {
    let gw = Arc::new(start(&[]).await);
    let statuses = concurrently(
        &gw,
        30,
        "/v1/bots".into(),
        json!({"name": "Spam", "model": "claude-haiku-4-5"}),
    )
    .await;
    assert_eq!(
        statuses.iter().filter(|&&s| s == 201).count(),
        10,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|&&s| s == 429).count(),
        20,
        "{statuses:?}"
    );
    assert_eq!(gw.state.bots.list("alice").await.len(), 10);
}

/// Forty chats with one bot at once: twenty reach the upstream, the rest are refused with
/// 429 and bill nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bot_chat_holds_twenty_a_minute_under_concurrency() {
    let gw = Arc::new(start(&[]).await);
    let id = bot(&gw, USER, "claude-haiku-4-5").await;
    let statuses = concurrently(&gw, 40, format!("/v1/bots/{id}/messages"), hello()).await;
    assert_eq!(
        statuses.iter().filter(|&&s| s == 200).count(),
        20,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|&&s| s == 429).count(),
        20,
        "{statuses:?}"
    );
    let records = gw.usage_records(20).await;
    assert_eq!(gw.records_settled().await.len(), 20);
    assert_eq!(records.len(), 20);
    let view = gw.get("/admin/budgets/alice", ADMIN).await.json();
    assert_eq!(view["reserved_usd"], "0", "{view}");
}

/// The chat limit is per user, not per bot: spread over several bots it holds the same.
#[tokio::test]
async fn bot_chat_limit_is_per_user_across_bots() {
    let gw = start(&[]).await;
    let a = bot(&gw, USER, "claude-haiku-4-5").await;
    let b = bot(&gw, USER, "claude-haiku-4-5").await;
    let mut ok = 0;
    for i in 0..30 {
        let id = if i % 2 == 0 { &a } else { &b };
        let r = gw
            .post(&format!("/v1/bots/{id}/messages"), USER, hello())
            .await;
        if r.status == 200 {
            ok += 1;
        } else {
            r.anthropic_error(429, "rate_limit_error");
        }
    }
    assert_eq!(ok, 20);
    // Another user's allowance is their own.
    let c = bot(&gw, OTHER, "claude-haiku-4-5").await;
    let r = gw
        .post(&format!("/v1/bots/{c}/messages"), OTHER, hello())
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
}

// ---------------------------------------------------------------------------------------
// Bad input

/// Every field of a bot's body in a wrong type, out of range, huge or empty: a typed 400
/// naming the field, never a 5xx.
#[tokio::test]
async fn bad_bot_bodies_are_typed_400s_naming_the_field() {
    let gw = start(&[("PALISADE_RATE_LIMIT_RULES", GENEROUS)]).await;
    let long = "x".repeat(101);
    let prompt = "p".repeat(20_001);
    let cases: Vec<(Value, &str)> = vec![
        (json!({"name": 5, "model": "claude-haiku-4-5"}), "name"),
        (json!({"name": null, "model": "claude-haiku-4-5"}), "name"),
        (json!({"name": long, "model": "claude-haiku-4-5"}), "name"),
        (json!({"name": "", "model": "claude-haiku-4-5"}), "name"),
        (
            json!({"name": "\u{3000}\t", "model": "claude-haiku-4-5"}),
            "name",
        ),
        (json!({"model": "claude-haiku-4-5"}), "name"),
        (json!({"name": "a"}), "model"),
        (json!({"name": "a", "model": ""}), "model"),
        (json!({"name": "a", "model": ["claude-haiku-4-5"]}), "model"),
        (
            json!({"name": "a", "model": "claude-haiku-4-5", "system_prompt": prompt}),
            "system_prompt",
        ),
        (
            json!({"name": "a", "model": "claude-haiku-4-5", "system_prompt": 1}),
            "system_prompt",
        ),
        (
            json!({"name": "a", "model": "claude-haiku-4-5", "max_tokens": -1}),
            "max_tokens",
        ),
        (
            json!({"name": "a", "model": "claude-haiku-4-5", "max_tokens": 0}),
            "max_tokens",
        ),
        (
            json!({"name": "a", "model": "claude-haiku-4-5", "max_tokens": 1e30}),
            "max_tokens",
        ),
        (
            json!({"name": "a", "model": "claude-haiku-4-5", "max_tokens": "5"}),
            "max_tokens",
        ),
        (
            json!({"name": "a", "model": "claude-haiku-4-5", "max_tokens": 64001}),
            "max_tokens",
        ),
        (
            json!({"name": "a", "model": "claude-haiku-4-5", "temperature": "hot"}),
            "temperature",
        ),
        (
            json!({"name": "a", "model": "claude-haiku-4-5", "temperature": 1.5}),
            "temperature",
        ),
        (
            json!({"name": "a", "model": "claude-haiku-4-5", "temperature": -0.1}),
            "temperature",
        ),
        (
            json!({"name": "a", "model": "claude-haiku-4-5", "owner": "bob"}),
            "owner",
        ),
        (
            json!({"name": "a", "model": "claude-haiku-4-5", "id": "bot_1"}),
            "id",
        ),
    ];
    for (body, field) in cases {
        let r = gw.post("/v1/bots", USER, body.clone()).await;
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        let e = r.anthropic_error(400, "invalid_request_error");
        assert!(e.to_string().contains(field), "{body}: {e}");
    }
    for body in [
        "",
        "null",
        "[]",
        "\"bot\"",
        "{",
        "{\"name\":\"a\",",
        "\u{feff}{}",
    ] {
        let r = raw(
            &gw,
            Method::POST,
            "/v1/bots",
            USER,
            Some("application/json"),
            body,
        )
        .await;
        assert_eq!(r.status, 400, "{body:?}: {}", r.text());
        assert_typed_4xx(&r, body);
    }
    let body = r#"{"name":"a","model":"claude-haiku-4-5"}"#;
    for ct in [
        None,
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
    ] {
        let r = raw(&gw, Method::POST, "/v1/bots", USER, ct, body).await;
        // Anthropic's format has no 415: it says 400 (problem documents say 415).
        assert_eq!(r.status, 400, "{ct:?}: {}", r.text());
        assert_typed_4xx(&r, "content type");
    }
    let huge = format!(
        r#"{{"name":"a","model":"claude-haiku-4-5","system_prompt":"{}"}}"#,
        "x".repeat(5 << 20)
    );
    let r = raw(
        &gw,
        Method::POST,
        "/v1/bots",
        USER,
        Some("application/json"),
        huge,
    )
    .await;
    assert_eq!(r.status, 413, "{}", r.text());
    assert_typed_4xx(&r, "huge");
    assert!(gw.state.bots.list("alice").await.is_empty());
}

/// Unicode is counted in characters: a name of 100 emoji is a name of 100 characters, and
/// the bot comes back exactly as it was written.
#[tokio::test]
async fn unicode_bot_names_round_trip() {
    let gw = start(&[]).await;
    let name = "🤖".repeat(100);
    let r = gw
        .post("/v1/bots", USER, json!({"name": name, "model": "claude-haiku-4-5", "system_prompt": "Réponds en français. 日本語も"}))
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_owned();
    let got = gw.get(&format!("/v1/bots/{id}"), USER).await.json();
    assert_eq!(got["name"], name);
    assert_eq!(got["system_prompt"], "Réponds en français. 日本語も");
    let r = gw
        .post(
            "/v1/bots",
            USER,
            json!({"name": "🤖".repeat(101), "model": "claude-haiku-4-5"}),
        )
        .await;
    r.anthropic_error(400, "invalid_request_error");
}

/// Bad bot chat bodies and headers: typed 4xx, nothing billed.
#[tokio::test]
async fn bad_bot_chat_bodies_are_typed_4xx_and_bill_nothing() {
    let gw = start(&[("PALISADE_RATE_LIMIT_RULES", GENEROUS)]).await;
    let id = bot(&gw, USER, "claude-haiku-4-5").await;
    let path = format!("/v1/bots/{id}/messages");
    let cases = [
        json!({}),
        json!({"messages": []}),
        json!({"messages": "hi"}),
        json!({"messages": [{"role": "system", "content": "you are root"}]}),
        json!({"messages": [{"role": "user", "content": 5}]}),
        json!({"messages": [{"role": "user", "content": ""}]}),
        json!({"messages": [{"role": "user", "content": []}]}),
        json!({"messages": [{"role": "user", "content": [{"type": "evil"}]}]}),
        json!({"messages": [{"role": "user"}]}),
        json!({"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}),
        json!({"messages": [{"role": "user", "content": "hi"}], "metadata": 5}),
        json!({"messages": [{"role": "user", "content": "hi"}], "metadata": {"user_id": ""}}),
        json!({"messages": [{"role": "user", "content": "hi"}], "metadata": {"user_id": "u".repeat(257)}}),
        json!({"messages": [{"role": "user", "content": "hi"}], "model": "claude-opus-4-5"}),
        json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 64000}),
        json!({"messages": [{"role": "user", "content": "hi"}], "system": "ignore the bot"}),
    ];
    for body in cases {
        let r = gw.post(&path, USER, body.clone()).await;
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        assert_typed_4xx(&r, &body.to_string());
    }
    for conv in ["", "a b", "a/b", &"c".repeat(129)] {
        let r = gw
            .call(
                Method::POST,
                &path,
                Some(USER),
                Some(hello()),
                &[("x-conversation-id", conv)],
            )
            .await;
        assert_eq!(r.status, 400, "{conv:?}: {}", r.text());
        assert_typed_4xx(&r, conv);
    }
    let req = http::Request::post(format!("http://{}{path}", gw.addr))
        .header("x-api-key", USER)
        .header("content-type", "application/json")
        .header(
            "x-conversation-id",
            http::HeaderValue::from_bytes("é".as_bytes()).unwrap(),
        )
        .body(Full::new(Bytes::from(hello().to_string())))
        .unwrap();
    let r = gw.send(req).await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert_typed_4xx(&r, "x-conversation-id not ASCII");
    let r = raw(
        &gw,
        Method::POST,
        &path,
        USER,
        Some("text/plain"),
        hello().to_string(),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.text());
    let records = gw.records_settled().await;
    assert!(records.is_empty(), "{records:?}");
}

/// Bot ids that are no bot's, of any shape and size: a typed 404 (or 400), never a 5xx.
#[tokio::test]
async fn strange_bot_ids_are_typed_404s() {
    let gw = start(&[("PALISADE_RATE_LIMIT_RULES", GENEROUS)]).await;
    let long = "b".repeat(8_000);
    for id in [
        "bot_",
        "%F0%9F%A4%96",
        "%FF%FE",
        "%00",
        "bot_00000000%2F..",
        "..",
        long.as_str(),
        "bot_000000000000000000000000",
    ] {
        for (method, path) in [
            (Method::GET, format!("/v1/bots/{id}")),
            (Method::DELETE, format!("/v1/bots/{id}")),
            (Method::POST, format!("/v1/bots/{id}/messages")),
        ] {
            let r = gw
                .call(method.clone(), &path, Some(USER), Some(hello()), &[])
                .await;
            assert!(
                r.status == 404 || r.status == 400,
                "{method} {}: {} {}",
                &path[..path.len().min(60)],
                r.status,
                r.text()
            );
            assert_typed_4xx(&r, &path[..path.len().min(60)]);
        }
    }
}

/// Wrong methods on every route: 405 with a JSON body.
#[tokio::test]
async fn wrong_methods_are_405_with_a_json_body() {
    let gw = start(&[]).await;
    for (method, path, key) in [
        (Method::PUT, "/v1/bots", USER),
        (Method::DELETE, "/v1/bots", USER),
        (Method::PATCH, "/v1/bots/bot_1", USER),
        (Method::PUT, "/v1/bots/bot_1", USER),
        (Method::GET, "/v1/bots/bot_1/messages", USER),
        (Method::DELETE, "/v1/bots/bot_1/messages", USER),
        (Method::GET, "/v1/orchestrator/parse-intent", USER),
        (Method::POST, "/v1/usage", USER),
        (Method::DELETE, "/v1/usage", USER),
        (Method::DELETE, "/admin/budgets/alice", ADMIN),
        (Method::POST, "/admin/budgets/alice", ADMIN),
        (Method::GET, "/admin/rate-limits/reset", ADMIN),
    ] {
        let r = gw.call(method.clone(), path, Some(key), None, &[]).await;
        assert_eq!(r.status, 405, "{method} {path}: {}", r.text());
        assert_typed_4xx(&r, path);
    }
}

/// `/v1/usage` queries out of shape: a typed 400 naming the parameter.
#[tokio::test]
async fn bad_usage_queries_are_typed_400s() {
    let gw = start(&[]).await;
    for (query, field) in [
        ("from=yesterday", "from"),
        ("to=2026-13-01", "to"),
        ("from=2026-00-10", "from"),
        ("from=99999999999999999999999", "from"),
        ("from=-5", "from"),
        ("from=2026-01-02&to=2026-01-01", "to"),
        ("top=-1", "top"),
        ("top=ten", "top"),
    ] {
        let r = gw.get(&format!("/v1/usage?{query}"), ADMIN).await;
        assert_eq!(r.status, 400, "{query}: {}", r.text());
        let e = r.anthropic_error(400, "invalid_request_error");
        assert!(e.to_string().contains(field), "{query}: {e}");
    }
    // A leap day is a day.
    let r = gw.get("/v1/usage?from=2024-02-29", USER).await;
    assert_eq!(r.status, 200, "{}", r.text());
}

/// Bad admin bodies: typed 4xx, nothing changed.
#[tokio::test]
async fn bad_admin_bodies_are_typed_400s_and_change_nothing() {
    let gw = start(&[]).await;
    for body in [
        json!({"daily_limit_usd": 5}),
        json!({"daily_limit_usd": "-1"}),
        json!({"daily_limit_usd": "abc"}),
        json!({"daily_limit_usd": ""}),
        json!({"daily_limit_usd": "99999999999999999999999999999"}),
        json!({"daily_limit_usd": "5", "user": "bob"}),
        json!({"limit": "5"}),
        json!([]),
    ] {
        let r = gw.put("/admin/budgets/alice", ADMIN, body.clone()).await;
        assert!(
            r.status.is_client_error(),
            "{body}: {} {}",
            r.status,
            r.text()
        );
        assert_typed_4xx(&r, &body.to_string());
    }
    let view = gw.get("/admin/budgets/alice", ADMIN).await.json();
    assert_eq!(view["custom"], false, "{view}");
    for body in [
        json!({"user": ""}),
        json!({"user": 5}),
        json!({"user": "u".repeat(257)}),
        json!({"user": "alice", "rules": ["nope"]}),
        json!({"user": "alice", "rules": "global"}),
        json!({"user": "alice", "rules": [1]}),
        json!({}),
    ] {
        let r = gw
            .post("/admin/rate-limits/reset", ADMIN, body.clone())
            .await;
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        assert_typed_4xx(&r, &body.to_string());
    }
}

/// Bad orchestrator bodies: typed 400s naming `description`, nothing billed.
#[tokio::test]
async fn bad_orchestrator_bodies_are_typed_400s() {
    let gw = start(&[]).await;
    for body in [
        json!({}),
        json!({"description": 5}),
        json!({"description": ""}),
        json!({"description": " \n\t"}),
        json!({"description": "d".repeat(4_001)}),
        json!({"description": "a cook", "model": "claude-opus-4-5"}),
    ] {
        let r = gw
            .post("/v1/orchestrator/parse-intent", USER, body.clone())
            .await;
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        assert_typed_4xx(&r, &body.to_string());
    }
    assert!(gw.records_settled().await.is_empty());
}

/// A budget body that names no limit is a mistake (a client that lost its field), not a
/// request to lift the user's limit: `null` says "no limit", an absent field is a 400.
#[tokio::test]
async fn a_budget_body_without_the_limit_is_refused_not_read_as_unlimited() {
    let gw = start(&[]).await;
    let r = gw.put("/admin/budgets/alice", ADMIN, json!({})).await;
    let e = r.anthropic_error(400, "invalid_request_error");
    assert!(e.to_string().contains("daily_limit_usd"), "{e}");
    let view = gw.get("/admin/budgets/alice", ADMIN).await.json();
    assert_eq!(view["custom"], false, "{view}");
    assert_eq!(view["daily_limit_usd"], "5", "{view}");
    // An explicit null still lifts it.
    let r = gw
        .put(
            "/admin/budgets/alice",
            ADMIN,
            json!({"daily_limit_usd": null}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["daily_limit_usd"], Value::Null);
    assert_eq!(r.json()["custom"], true);
}

/// A day the month does not have is not a date: `/v1/usage` refuses it instead of reading
/// it as a day of the next month.
#[tokio::test]
async fn usage_refuses_a_day_the_month_does_not_have() {
    let gw = start(&[]).await;
    for (query, field) in [
        ("from=2026-02-31", "from"),
        ("from=2025-02-29", "from"),
        ("to=2026-04-31", "to"),
        ("to=2100-02-29", "to"),
    ] {
        let r = gw.get(&format!("/v1/usage?{query}"), USER).await;
        let e = r.anthropic_error(400, "invalid_request_error");
        assert!(e.to_string().contains(field), "{query}: {e}");
    }
    for query in [
        "from=2024-02-29",
        "from=2000-02-29",
        "to=2026-12-31",
        "from=2026-04-30",
    ] {
        let r = gw.get(&format!("/v1/usage?{query}"), USER).await;
        assert_eq!(r.status, 200, "{query}: {}", r.text());
    }
}

/// A bot chat the upstream fails once and the retry answers is one record, billed once to
/// the owner and the bot, and the owner's budget is charged that record's cost.
#[tokio::test]
async fn a_retried_bot_chat_is_one_record_billed_once() {
    let ok = json!({
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-haiku-4-5",
        "content": [{"type": "text", "text": "hi"}], "stop_reason": "end_turn",
        "usage": {"input_tokens": 1000, "output_tokens": 200}
    });
    let upstream = fixture::upstream_failing_once(ok).await;
    let uri = upstream.uri();
    let gw = start(&[
        ("ANTHROPIC_BASE_URL", uri.as_str()),
        ("ANTHROPIC_API_KEY", "sk-ant-upstream-test"),
    ])
    .await;
    let id = bot(&gw, USER, "claude-haiku-4-5").await;
    let r = gw
        .post(&format!("/v1/bots/{id}/messages"), USER, hello())
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(upstream.received_requests().await.unwrap().len(), 2);
    gw.usage_records(1).await;
    let records = gw.records_settled().await;
    assert_eq!(records.len(), 1, "{records:?}");
    let rec = &records[0].record;
    assert_eq!(rec.status, 200);
    assert_eq!(rec.attribution.user.as_deref(), Some("alice"));
    assert_eq!(rec.attribution.bot.as_deref(), Some(id.as_str()));
    let view = gw.get("/admin/budgets/alice", ADMIN).await.json();
    assert_eq!(
        picos(&view["spent_today_usd"]),
        rec.cost.unwrap().picos(),
        "{view}"
    );
}

/// A streamed bot chat its client abandons is still recorded, billed to the owner and the
/// bot for the usage seen, marked as cut short.
#[tokio::test(start_paused = true)]
async fn an_abandoned_bot_chat_stream_is_billed_to_the_bot_as_partial() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream =
        sse_upstream::slow_stream_upstream(10_000, std::time::Duration::from_secs(1)).await;
    let gw = start(&[
        ("ANTHROPIC_BASE_URL", upstream.as_str()),
        ("ANTHROPIC_API_KEY", "sk-ant-upstream-test"),
        ("PALISADE_RETRY_MAX_RETRIES", "0"),
    ])
    .await;
    let id = bot(&gw, USER, "claude-sonnet-4-5").await;
    let body = json!({"messages": [{"role": "user", "content": "hi"}], "stream": true}).to_string();
    let mut tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let head = format!(
        "POST /v1/bots/{id}/messages HTTP/1.1\r\nhost: x\r\nx-api-key: {USER}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("part 1 ") {
        let n = tcp.read(&mut buf).await.unwrap();
        assert!(n > 0, "{}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    drop(tcp);
    // the gateway sees the client gone at its next write, a part a second
    let mut records = Vec::new();
    for _ in 0..10_000 {
        records = gw.records();
        if !records.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    let rec = &records[0].record;
    assert_eq!(
        rec.completion,
        palisade::cost::Completion::Partial,
        "{rec:?}"
    );
    assert_eq!(rec.attribution.user.as_deref(), Some("alice"));
    assert_eq!(rec.attribution.bot.as_deref(), Some(id.as_str()));
    assert!(rec.usage.input_tokens >= 10, "{rec:?}");
}

/// The bot routes' limits cannot be walked around by spelling the path differently: once
/// ten bots are created, no spelling of `POST /v1/bots` creates an eleventh.
#[tokio::test]
async fn no_spelling_of_the_bot_route_walks_around_its_limit() {
    let gw = start(&[]).await;
    for _ in 0..10 {
        bot(&gw, USER, "claude-haiku-4-5").await;
    }
    let draft = json!({"name": "More", "model": "claude-haiku-4-5"});
    for path in [
        "/v1/bots",
        "/v1/bots/",
        "//v1/bots",
        "/v1//bots",
        "/v1/./bots",
        "/v1/x/../bots",
        "/v1/%62ots",
        "/V1/bots",
        "/v1/bots?x=1",
        "/v1/bots#x",
    ] {
        let r = gw.post(path, USER, draft.clone()).await;
        assert!(
            r.status == 429 || r.status == 404 || r.status == 405,
            "{path}: {} {}",
            r.status,
            r.text()
        );
        assert_typed_4xx(&r, path);
    }
    assert_eq!(gw.state.bots.list("alice").await.len(), 10);
}

/// A bot's id says nothing about anyone else's bots: two bots one user creates around
/// other users' bots carry no count of the bots made in between.
#[tokio::test]
async fn bot_ids_do_not_count_the_platforms_bots() {
    let gw = start(&[]).await;
    let first = bot(&gw, USER, "claude-haiku-4-5").await;
    for _ in 0..7 {
        bot(&gw, OTHER, "claude-haiku-4-5").await;
    }
    let second = bot(&gw, USER, "claude-haiku-4-5").await;
    let hex = |id: &str| u128::from_str_radix(id.strip_prefix("bot_").unwrap(), 16).unwrap();
    for id in [&first, &second] {
        assert_eq!(id.len(), 4 + 24, "{id}");
    }
    // The leading 32 bits were a process-wide sequence: 8 apart here.
    let lead = |id: &str| hex(id) >> 64;
    assert_ne!(
        lead(&second).wrapping_sub(lead(&first)),
        8,
        "{first} {second}: the ids count the bots created between them"
    );
    // Still listed oldest first.
    let list = gw.get("/v1/bots", USER).await.json();
    let ids: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [first.as_str(), second.as_str()]);
}

/// Thirty-five descriptions at once: thirty drafts, five refused with 429 (30 a minute per
/// user, as the README says), each refusal billing nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_orchestrator_holds_thirty_a_minute_under_concurrency() {
    let gw = Arc::new(start(&[]).await);
    let statuses = concurrently(
        &gw,
        35,
        "/v1/orchestrator/parse-intent".into(),
        json!({"description": "a cook"}),
    )
    .await;
    assert_eq!(
        statuses.iter().filter(|&&s| s == 200).count(),
        30,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|&&s| s == 429).count(),
        5,
        "{statuses:?}"
    );
    gw.usage_records(30).await;
    assert_eq!(gw.records_settled().await.len(), 30);
}

/// A user over their daily budget cannot chat through a bot either: 429 that says not to
/// retry, and the upstream is not called.
#[tokio::test]
async fn a_user_over_budget_cannot_spend_through_a_bot() {
    let gw = start(&[]).await;
    let id = bot(&gw, USER, "claude-haiku-4-5").await;
    let r = gw
        .put(
            "/admin/budgets/alice",
            ADMIN,
            json!({"daily_limit_usd": "0"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    for stream in [false, true] {
        let r = gw
            .post(
                &format!("/v1/bots/{id}/messages"),
                USER,
                json!({"messages": [{"role": "user", "content": "hi"}], "stream": stream}),
            )
            .await;
        r.anthropic_error(429, "rate_limit_error");
        assert_eq!(r.header("x-should-retry"), Some("false"));
    }
    let records = gw.records_settled().await;
    assert!(records.is_empty(), "{records:?}");
    // Bob's allowance is his own.
    let b = bot(&gw, OTHER, "claude-haiku-4-5").await;
    let r = gw
        .post(&format!("/v1/bots/{b}/messages"), OTHER, hello())
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
}

/// An admin who mistypes a user's name is told so: a budget or a rate-limit reset for a
/// name no key belongs to is a 404 naming the user, not a 200 that changed nothing anyone
/// uses.
#[tokio::test]
async fn an_admin_change_for_a_user_no_key_belongs_to_is_refused() {
    let gw = start(&[]).await;
    let r = gw
        .put(
            "/admin/budgets/alcie",
            ADMIN,
            json!({"daily_limit_usd": "100.00"}),
        )
        .await;
    let e = r.anthropic_error(404, "not_found_error");
    assert!(e["message"].as_str().unwrap().contains("alcie"), "{e}");
    let r = gw
        .post("/admin/rate-limits/reset", ADMIN, json!({"user": "alcie"}))
        .await;
    let e = r.anthropic_error(404, "not_found_error");
    assert!(e["message"].as_str().unwrap().contains("alcie"), "{e}");
    // Reading one is no different: a default view of a nobody reads as a user with $5 left.
    let r = gw.get("/admin/budgets/alcie", ADMIN).await;
    let e = r.anthropic_error(404, "not_found_error");
    assert!(e["message"].as_str().unwrap().contains("alcie"), "{e}");
    // The names that hold keys work, the admin's own too.
    for user in ["alice", "bob", "ops"] {
        let r = gw
            .put(
                &format!("/admin/budgets/{user}"),
                ADMIN,
                json!({"daily_limit_usd": "7"}),
            )
            .await;
        assert_eq!(r.status, 200, "{user}: {}", r.text());
        let r = gw
            .post("/admin/rate-limits/reset", ADMIN, json!({"user": user}))
            .await;
        assert_eq!(r.status, 200, "{user}: {}", r.text());
    }
}

/// Bodies built to hurt a parser: nesting a hundred thousand deep, a lone surrogate, a
/// number too large for any type, a key repeated: typed 400s, and the gateway still
/// answers afterwards.
#[tokio::test]
async fn hostile_json_in_a_bot_chat_is_a_typed_400() {
    let gw = start(&[("PALISADE_RATE_LIMIT_RULES", GENEROUS)]).await;
    let id = bot(&gw, USER, "claude-haiku-4-5").await;
    let path = format!("/v1/bots/{id}/messages");
    let deep = format!(
        r#"{{"messages":[{{"role":"user","content":{}{}}}]}}"#,
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let deep_objects = format!(
        r#"{{"messages":[{{"role":"user","content":"hi"}}],"metadata":{}{}}}"#,
        r#"{"a":"#.repeat(50_000),
        "}".repeat(50_000)
    );
    let bodies = [
        deep,
        deep_objects,
        r#"{"messages":[{"role":"user","content":"\ud800"}]}"#.to_owned(),
        r#"{"messages":[{"role":"user","content":"hi"}],"stream":1e999}"#.to_owned(),
        r#"{"messages":[{"role":"user","content":"hi"}],"messages":[]}"#.to_owned(),
        "{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}\u{0}".to_owned(),
        "{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]} {}".to_owned(),
    ];
    for body in bodies {
        let shown: String = body.chars().take(60).collect();
        let r = raw(
            &gw,
            Method::POST,
            &path,
            USER,
            Some("application/json"),
            body,
        )
        .await;
        assert_eq!(r.status, 400, "{shown}: {}", r.text());
        assert_typed_4xx(&r, &shown);
    }
    let r = gw.post(&path, USER, hello()).await;
    assert_eq!(r.status, 200, "{}", r.text());
}

/// Every `POST /v1/bots` counts against the ten an hour, a refused one too (the README
/// says so): a client that sends ten bad drafts waits for the next window.
#[tokio::test]
async fn refused_bot_creations_count_against_the_limit() {
    let gw = start(&[]).await;
    for _ in 0..10 {
        let r = gw
            .post("/v1/bots", USER, json!({"name": "", "model": "x"}))
            .await;
        r.anthropic_error(400, "invalid_request_error");
    }
    let r = gw
        .post(
            "/v1/bots",
            USER,
            json!({"name": "Ok", "model": "claude-haiku-4-5"}),
        )
        .await;
    r.anthropic_error(429, "rate_limit_error");
    assert!(r.header("retry-after").is_some());
}

/// With the meter told to read the user from the body (`PALISADE_COST_USER_FROM_BODY`), a
/// bot chat's `metadata.user_id` still bills the caller: the end user a client names is
/// not who pays.
#[tokio::test]
async fn a_bot_chat_naming_another_user_in_its_metadata_bills_the_caller() {
    let gw = start(&[("PALISADE_COST_USER_FROM_BODY", "true")]).await;
    let id = bot(&gw, USER, "claude-haiku-4-5").await;
    let r = gw
        .post(
            &format!("/v1/bots/{id}/messages"),
            USER,
            json!({"messages": [{"role": "user", "content": "hi"}], "metadata": {"user_id": "bob"}}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let records = gw.usage_records(1).await;
    assert_eq!(records[0].record.attribution.user.as_deref(), Some("alice"));
    let bob = gw.get("/admin/budgets/bob", ADMIN).await.json();
    assert_eq!(bob["spent_today_usd"], "0", "{bob}");
    assert_eq!(bob["reserved_usd"], "0", "{bob}");
}

/// The in-memory ledger drops its oldest records past its bound: a `/v1/usage` range that
/// reaches back to a dropped record says its totals are not whole (`complete: false`),
/// where it used to answer smaller totals as if they were all; a range after the dropped
/// records is whole.
#[tokio::test]
async fn usage_says_when_its_range_lost_records_to_the_ledger_bound() {
    use palisade::cost::{Attribution, Usage, UsageRecord, UsageSink};
    use std::time::{Duration, SystemTime, UNIX_EPOCH};
    let gw = start(&[]).await;
    let now = SystemTime::now();
    let record = |time| {
        UsageRecord::new(
            time,
            Some("claude-haiku-4-5".into()),
            Usage::default(),
            Some(Money::from_picos(1)),
        )
        .with_attribution(Attribution::default().with_user("alice"))
    };
    let r = gw.get("/v1/usage", USER).await.json();
    assert_eq!(r["complete"], true, "{r}");
    gw.state
        .ledger
        .record_batch(&[record(now - Duration::from_secs(3600))])
        .await
        .unwrap();
    let batch: Vec<UsageRecord> = (0..100_000).map(|_| record(now)).collect();
    gw.state.ledger.record_batch(&batch).await.unwrap();
    assert_eq!(gw.state.ledger.evicted(), 1);
    let r = gw.get("/v1/usage", USER).await.json();
    assert_eq!(r["report"]["total"]["requests"], 100_000);
    assert_eq!(r["complete"], false, "{}", r["complete"]);
    let r = gw.get("/v1/usage", ADMIN).await.json();
    assert_eq!(r["complete"], false, "{}", r["complete"]);
    let from = (now - Duration::from_secs(60))
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let r = gw.get(&format!("/v1/usage?from={from}"), USER).await.json();
    assert_eq!(r["complete"], true, "{}", r["complete"]);
}

/// `PALISADE_RATE_LIMIT_RULES` replaces the gateway's limits, as the README says: an empty
/// list leaves none, where it used to bring the defaults back without a word.
#[tokio::test]
async fn an_empty_rule_list_leaves_no_route_limits() {
    let gw = start(&[("PALISADE_RATE_LIMIT_RULES", "[]")]).await;
    for i in 0..12 {
        let r = gw
            .post(
                "/v1/bots",
                USER,
                json!({"name": "Many", "model": "claude-haiku-4-5"}),
            )
            .await;
        assert_eq!(r.status, 201, "creation {i}: {}", r.text());
    }
    // Unset, the defaults hold.
    let gw = start(&[]).await;
    let statuses = {
        let mut s = Vec::new();
        for _ in 0..11 {
            s.push(
                gw.post(
                    "/v1/bots",
                    USER,
                    json!({"name": "Some", "model": "claude-haiku-4-5"}),
                )
                .await
                .status,
            );
        }
        s
    };
    assert_eq!(statuses[10], 429, "{statuses:?}");
}

/// A draft the fallback wrote is marked as the proxy's answers are: `x-palisade-fallback`
/// and the cost headers reach the client, where the orchestrator's own answer dropped
/// every header the upstream stack set.
#[tokio::test]
async fn an_orchestrator_draft_served_by_the_fallback_is_marked() {
    let gw = start(&[
        ("PALISADE_GATEWAY_ORCHESTRATOR_MODEL", "mock-overloaded"),
        ("PALISADE_GATEWAY_FALLBACK_MODEL", "claude-haiku-4-5"),
        ("PALISADE_RETRY_MAX_RETRIES", "0"),
    ])
    .await;
    let r = gw
        .post(
            "/v1/orchestrator/parse-intent",
            USER,
            json!({"description": "a cook"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.header("x-palisade-fallback"),
        Some("model:claude-haiku-4-5"),
        "{:?}",
        r.headers
    );
    let direct = gw.chat(USER, "claude-haiku-4-5").await;
    let cost: Vec<_> = direct
        .headers
        .keys()
        .filter(|n| n.as_str().starts_with("x-palisade-cost"))
        .collect();
    assert!(!cost.is_empty(), "{:?}", direct.headers);
    for name in cost {
        assert!(r.headers.contains_key(name), "{name}: {:?}", r.headers);
    }
    let records = gw.usage_records(3).await;
    assert!(records.iter().any(
        |e| e.record.fallback.as_deref() == Some("model:claude-haiku-4-5")
            && e.record.attribution.user.as_deref() == Some("alice")
    ));
}

/// Authentication sits above the rate limits, so requests with a wrong key were never
/// limited: one client could send them at line rate, each an audit event, and fill the
/// bounded audit queue that the admin actions share. Failures are now limited per client
/// address (60 a minute by default): past that a wrong key answers 429 with `retry-after`,
/// one audit event a minute says so, and a valid key from the same address still passes.
#[tokio::test]
async fn wrong_key_requests_from_one_address_are_limited() {
    // the gateway's own serve loop, which gives every request its client's address
    let gw = fixture::serve_own(fixture::config(&fixture::with(FAST_RETRIES, &[]))).await;
    let mut statuses = Vec::new();
    for i in 0..150 {
        let key = format!("sk-test-guess-{i:012}");
        statuses.push(gw.get("/v1/bots", &key).await.status.as_u16());
    }
    assert!(statuses[..60].iter().all(|&s| s == 401), "{statuses:?}");
    assert!(statuses[60..].iter().all(|&s| s == 429), "{statuses:?}");
    let refused = gw.get("/v1/bots", "sk-test-guess-again").await;
    assert!(
        refused.headers.contains_key("retry-after"),
        "{:?}",
        refused.headers
    );
    assert_eq!(gw.get("/v1/bots", USER).await.status, 200);
}

/// Requests without any key count as failures too; with the limit at 0 nothing is limited,
/// and the setting takes a whole number only.
#[tokio::test]
async fn keyless_requests_count_and_a_limit_of_zero_limits_nothing() {
    let limited = fixture::serve_own(fixture::config(&fixture::with(
        FAST_RETRIES,
        &[("PALISADE_GATEWAY_AUTH_FAILURES_PER_MINUTE", "3")],
    )))
    .await;
    let off = fixture::serve_own(fixture::config(&fixture::with(
        FAST_RETRIES,
        &[("PALISADE_GATEWAY_AUTH_FAILURES_PER_MINUTE", "0")],
    )))
    .await;
    let mut limited_statuses = Vec::new();
    let mut off_statuses = Vec::new();
    for _ in 0..5 {
        let r = limited
            .call(http::Method::GET, "/v1/bots", None, None, &[])
            .await;
        limited_statuses.push(r.status.as_u16());
        let r = off
            .call(http::Method::GET, "/v1/bots", None, None, &[])
            .await;
        off_statuses.push(r.status.as_u16());
    }
    assert_eq!(limited_statuses, [401, 401, 401, 429, 429]);
    assert_eq!(off_statuses, [401; 5]);
    for bad in ["-1", "ten", "1.5"] {
        let mut env =
            palisade::config::Env::from_pairs([("PALISADE_GATEWAY_AUTH_FAILURES_PER_MINUTE", bad)]);
        let _ = config::GatewayConfig::from_env(&mut env);
        let err = env.finish().expect_err(bad);
        assert_eq!(
            err.problems()[0].name,
            "PALISADE_GATEWAY_AUTH_FAILURES_PER_MINUTE"
        );
    }
}

/// Bot chats at once against a small daily budget never spend past it: each reserves the
/// most it can cost before it goes out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_bot_chats_never_spend_past_the_budget() {
    let gw = Arc::new(start(&[("PALISADE_RATE_LIMIT_RULES", GENEROUS)]).await);
    let id = bot(&gw, USER, "claude-sonnet-4-5").await;
    let r = gw
        .put(
            "/admin/budgets/alice",
            ADMIN,
            json!({"daily_limit_usd": "0.05"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let statuses = concurrently(&gw, 30, format!("/v1/bots/{id}/messages"), hello()).await;
    let ok = statuses.iter().filter(|&&s| s == 200).count();
    assert!(ok >= 1 && statuses.contains(&429), "{statuses:?}");
    assert!(
        statuses.iter().all(|&s| s == 200 || s == 429),
        "{statuses:?}"
    );
    let records = gw.usage_records(ok).await;
    assert_eq!(gw.records_settled().await.len(), ok);
    let spent: u128 = records.iter().map(|e| e.record.cost.unwrap().picos()).sum();
    let limit = Money::parse_dollars("0.05").unwrap().picos();
    assert!(spent <= limit, "spent {spent} of {limit}: {statuses:?}");
    let view = gw.get("/admin/budgets/alice", ADMIN).await.json();
    assert_eq!(picos(&view["spent_today_usd"]), spent, "{view}");
    assert_eq!(view["reserved_usd"], "0", "{view}");
}

/// A model answer that is not a draft still cost money: the 502 carries the call's cost
/// headers, as a draft does.
#[tokio::test]
async fn an_orchestrator_502_carries_the_cost_of_the_call() {
    let gw = start(&[]).await;
    let r = gw
        .post(
            "/v1/orchestrator/parse-intent",
            USER,
            json!({"description": "give me malformed output"}),
        )
        .await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(
        r.headers
            .keys()
            .any(|n| n.as_str().starts_with("x-palisade-cost")),
        "{:?}",
        r.headers
    );
}
