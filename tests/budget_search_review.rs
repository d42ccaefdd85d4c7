//! Budget reservations for web search and web fetch tools, under hostile input: every
//! new field in every wrong shape, duplicated keys, bodies nested too deeply to read as a
//! map, huge lists of tools, and settlement of what such a request really cost, in memory
//! and in Redis.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use palisade::cost::Money;
use palisade::cost::budget::{
    Budget, BudgetLayer, BudgetLayerBuilder, BudgetReservation, Period, Scope,
};
use tower::{Layer, ServiceExt, service_fn};

#[cfg(feature = "redis")]
mod support;

fn dollars(s: &str) -> Money {
    Money::parse_dollars(s).unwrap()
}

fn builder(limit: Money) -> BudgetLayerBuilder {
    BudgetLayer::builder().budget(Budget::new("daily", Scope::User, Period::Day, limit))
}

fn post(body: impl Into<Bytes>) -> Request<Full<Bytes>> {
    let mut req = Request::post("/v1/messages")
        .body(Full::new(body.into()))
        .unwrap();
    req.extensions_mut()
        .insert(palisade::cost::Principal::new("ann"));
    req
}

/// What a layer answers for `body`: the status, the JSON error (if any) and the amount the
/// upstream saw reserved (`None`: not called, or called with no reservation).
async fn send(
    layer: &BudgetLayer,
    body: impl Into<Bytes>,
) -> (u16, serde_json::Value, Option<Money>) {
    let seen = Arc::new(std::sync::Mutex::new(None));
    let s2 = Arc::clone(&seen);
    let svc = layer.layer(service_fn(move |req: Request<Full<Bytes>>| {
        let s2 = Arc::clone(&s2);
        async move {
            if let Some(r) = req.extensions().get::<BudgetReservation>() {
                *s2.lock().unwrap() = Some(r.amount());
                r.refund();
            }
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
        }
    }));
    let res = svc.oneshot(post(body)).await.unwrap();
    let status = res.status().as_u16();
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    let reserved = *seen.lock().unwrap();
    (status, json, reserved)
}

/// A body with a `tools` list holding `tool` (raw JSON).
fn with_tool(tool: &str) -> String {
    format!(
        r#"{{"model":"claude-sonnet-4-5","max_tokens":10,"messages":[{{"role":"user","content":"hi"}}],"tools":[{tool}]}}"#
    )
}

/// A key given twice inside a tool is as unreadable as one given twice at the top: the
/// 400 names `tools`, where the problem is, not `model`.
#[tokio::test]
async fn a_key_given_twice_inside_a_tool_is_refused_naming_tools() {
    let layer = builder(dollars("1000")).build().unwrap();
    for tool in [
        r#"{"type":"web_search_20250305","name":"web_search","max_uses":1,"max_uses":50}"#,
        r#"{"type":"web_fetch_20250910","name":"web_fetch","max_content_tokens":1,"max_content_tokens":90000}"#,
        r#"{"type":"custom","type":"web_search_20250305","name":"web_search"}"#,
    ] {
        let body = with_tool(tool);
        let (status, json, _) = send(&layer, body.clone()).await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(json["errors"][0]["field"], "tools", "{body}: {json}");
    }
}

/// Every field the search reservation reads, in every wrong JSON type: a 400 naming
/// `tools`, never a panic, never passed unchecked. `null` is no value, as for the other
/// fields.
#[tokio::test]
async fn every_tool_field_in_every_wrong_type_is_refused_naming_tools() {
    let layer = builder(dollars("1000")).build().unwrap();
    let wrong = [
        "\"3\"",
        "-1",
        "1.5",
        "1e3",
        "true",
        "{}",
        "[]",
        "[3]",
        "18446744073709551616",
    ];
    let mut bodies = Vec::new();
    for bad in wrong {
        for field in ["max_uses", "max_content_tokens"] {
            for kind in ["web_search_20250305", "web_fetch_20250910"] {
                bodies.push(with_tool(&format!(
                    r#"{{"type":"{kind}","{field}":{bad}}}"#
                )));
            }
        }
        if bad != "\"3\"" {
            bodies.push(with_tool(&format!(r#"{{"type":{bad},"max_uses":3}}"#)));
        }
        if bad != "[]" && bad != "[3]" {
            bodies.push(format!(
                r#"{{"model":"claude-sonnet-4-5","max_tokens":10,"tools":{bad}}}"#
            ));
        }
    }
    for item in ["null", "\"web_search_20250305\"", "3"] {
        bodies.push(with_tool(item));
    }
    for body in bodies {
        let (status, json, _) = send(&layer, body.clone()).await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(json["errors"][0]["field"], "tools", "{body}: {json}");
    }
    // null is no value: the defaults apply
    for tool in [
        r#"{"type":"web_search_20250305","max_uses":null}"#,
        r#"{"type":"web_fetch_20250910","max_uses":null,"max_content_tokens":null}"#,
        r#"{"type":null,"max_uses":3}"#,
    ] {
        let (status, json, reserved) = send(&layer, with_tool(tool)).await;
        assert_eq!(status, 200, "{tool}: {json}");
        assert!(reserved.is_some(), "{tool}");
    }
}

/// JSON nested deeper than serde_json reads into a map of values (128 levels), in a
/// place an upstream accepts it (a `tool_use` block's `input`), must not turn a body the
/// estimate could not read into one it does not meter: refused, never passed unchecked.
#[tokio::test]
async fn a_deeply_nested_body_with_an_unreadable_field_is_never_passed_unchecked() {
    let layer = builder(dollars("1000")).build().unwrap();
    let deep = format!("{}1{}", r#"{"a":"#.repeat(200), "}".repeat(200));
    let messages = format!(
        r#"[{{"role":"user","content":"hi"}},{{"role":"assistant","content":[{{"type":"tool_use","id":"t","name":"f","input":{deep}}}]}}]"#
    );
    for (fields, field) in [
        (
            r#""max_tokens":10,"tools":[{"type":"web_search_20250305","max_uses":1,"max_uses":500}]"#,
            "tools",
        ),
        (
            r#""max_tokens":10,"tools":[{"type":"web_fetch_20250910","max_content_tokens":-1}]"#,
            "tools",
        ),
        (r#""max_tokens":1,"max_tokens":64000"#, "max_tokens"),
        (r#""max_tokens":64000.0"#, "max_tokens"),
    ] {
        let body = format!(r#"{{"model":"claude-sonnet-4-5",{fields},"messages":{messages}}}"#);
        let (status, json, _) = send(&layer, body).await;
        assert_eq!(status, 400, "{fields}: {json}");
        assert_eq!(json["errors"][0]["field"], field, "{fields}: {json}");
    }
    // a deep body that reads well is reserved, searches included
    let body = format!(
        r#"{{"model":"claude-sonnet-4-5","max_tokens":10,"tools":[{{"type":"web_search_20250305","max_uses":2}}],"messages":{messages}}}"#
    );
    let (status, _, reserved) = send(&layer, body).await;
    assert_eq!(status, 200);
    assert!(reserved.unwrap().picos() > 2 * 10_000_000_000);
    // what is not a JSON object naming a model is still not metered, however deep
    let (status, _, reserved) = send(&layer, format!(r#"{{"name":"bot","x":{deep}}}"#)).await;
    assert_eq!((status, reserved), (200, None));
}

/// A body that is one huge list of tools is reserved (saturating, or refused as larger
/// than any budget) without a panic.
#[tokio::test]
async fn a_huge_list_of_tools_is_reserved_or_refused_never_a_panic() {
    let layer = builder(dollars("1000")).build().unwrap();
    let many = |tool: &str, n: usize| {
        format!(
            r#"{{"model":"claude-sonnet-4-5","max_tokens":10,"tools":[{}]}}"#,
            vec![tool; n].join(",")
        )
    };
    // 100,000 search tools at 10 searches each: $10,000 of fees alone
    let (status, json, _) = send(&layer, many(r#"{"type":"web_search_20250305"}"#, 100_000)).await;
    assert_eq!(status, 400, "{json}");
    // 100,000 searches of u64::MAX each: saturates, refused the same way
    let (status, _, _) = send(
        &layer,
        many(
            &format!(
                r#"{{"type":"web_search_20250305","max_uses":{}}}"#,
                u64::MAX
            ),
            1000,
        ),
    )
    .await;
    assert_eq!(status, 400);
    // other tools add nothing but their bytes
    let (status, _, reserved) =
        send(&layer, many(r#"{"type":"custom","name":"f"}"#, 100_000)).await;
    assert_eq!(status, 200);
    assert!(reserved.is_some());
}

/// OpenAI-shaped tools (`function`) are no server search, whatever their name; the
/// reservation is the body's own.
#[tokio::test]
async fn openai_function_tools_named_web_search_reserve_no_searches() {
    let layer = builder(dollars("1000")).build().unwrap();
    let plain = r#"{"model":"gpt-4o","max_tokens":10,"tools":[{"type":"function","function":{"name":"web_search_2025030"}}]}"#;
    let padded = r#"{"model":"gpt-4o","max_tokens":10,"tools":[{"type":"function","function":{"name":"web_search_20250305"}}]}"#;
    let (_, _, a) = send(&layer, plain).await;
    let (_, _, b) = send(&layer, padded).await;
    // one byte more body at most one more input token ($2.50 per million)
    assert!(b.unwrap().picos() - a.unwrap().picos() <= 2_500_000);
}

/// The searching request that reserves its searches and their results is still charged
/// what it really cost, and its hold is freed exactly: nothing counted twice, nothing
/// left reserved. A failed call is refunded whole.
#[tokio::test]
async fn a_searching_request_is_charged_its_actual_cost_and_its_hold_freed() {
    let layer = builder(dollars("10")).build().unwrap();
    let actual = dollars("0.0123");
    let svc = layer.layer(service_fn(move |req: Request<Full<Bytes>>| async move {
        let r = req.extensions().get::<BudgetReservation>().unwrap();
        assert!(r.amount() > dollars("0.1"), "{}", r.amount());
        r.settle(actual);
        // settled twice: the second is ignored
        r.settle(actual);
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
    }));
    let body = with_tool(r#"{"type":"web_search_20250305","name":"web_search"}"#);
    for i in 1..=3u128 {
        let res = svc.clone().oneshot(post(body.clone())).await.unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(
            layer.spend("daily", "ann"),
            Some((Money::from_picos(actual.picos() * i), Money::ZERO))
        );
    }
    let failing = layer.layer(service_fn(|_req: Request<Full<Bytes>>| async {
        Ok::<_, Infallible>(
            Response::builder()
                .status(500)
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
    }));
    let res = failing.oneshot(post(body)).await.unwrap();
    assert_eq!(res.status(), 500);
    let (spent, reserved) = layer.spend("daily", "ann").unwrap();
    assert_eq!(reserved, Money::ZERO);
    assert!(spent >= Money::from_picos(actual.picos() * 3), "{spent}");
}

/// A tool written as a list is no tool an upstream reads: refused like any other tool
/// that is not an object, not read by position (`["web_search_20250305", 50]` as a
/// search tool with `max_uses` 50).
#[tokio::test]
async fn a_tool_written_as_a_list_is_refused_naming_tools() {
    let layer = builder(dollars("1000")).build().unwrap();
    for tool in ["[]", r#"["web_search_20250305", 50]"#] {
        let body = with_tool(tool);
        let (status, json, _) = send(&layer, body.clone()).await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(json["errors"][0]["field"], "tools", "{body}: {json}");
    }
}

/// The same through Redis: a searching request's large hold is settled to its actual
/// cost and nothing stays reserved in the account, however many requests ran.
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_searching_request_through_redis_is_charged_its_actual_cost_and_its_hold_freed() {
    use palisade::cost::budget::RedisBudgetStore;
    let server = support::RedisServer::start()
        .await
        .expect("redis-server is installed");
    let client = redis::Client::open(server.url()).unwrap();
    let conn = redis::aio::ConnectionManager::new(client).await.unwrap();
    let layer = builder(dollars("10"))
        .store(RedisBudgetStore::new(conn.clone()))
        .build()
        .unwrap();
    let actual = dollars("0.0123");
    let svc = layer.layer(service_fn(move |req: Request<Full<Bytes>>| async move {
        let r = req.extensions().get::<BudgetReservation>().unwrap();
        // ten searches at one cent: the hold is more than the actual cost
        assert!(r.amount() > dollars("0.1"), "{}", r.amount());
        r.settle(actual);
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
    }));
    let body = with_tool(r#"{"type":"web_search_20250305","name":"web_search"}"#);
    for _ in 0..5 {
        let res = svc.clone().oneshot(post(body.clone())).await.unwrap();
        assert_eq!(res.status(), 200);
    }
    // the settlements land on background tasks: look until they have (each look a round
    // trip behind the calls sent before it), up to a bound
    let want = (actual.picos() * 5).to_string();
    let mut conn = conn;
    let mut seen = (String::new(), String::new());
    for _ in 0..2000 {
        let fields: Vec<(String, String)> = redis::cmd("HGETALL")
            .arg("palisade:budget:{budget}:daily:ann")
            .query_async(&mut conn)
            .await
            .unwrap();
        let held: u128 = fields
            .iter()
            .filter(|(f, _)| f == "r" || f.starts_with('h'))
            .map(|(_, v)| v.parse::<u128>().unwrap())
            .sum();
        let spent = fields
            .iter()
            .find(|(f, _)| f == "s")
            .map_or_else(|| "0".to_owned(), |(_, v)| v.clone());
        seen = (spent, held.to_string());
        if seen.0 == want && seen.1 == "0" {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(seen, (want, "0".to_owned()));
}

/// The three settings from the environment and from a file: blank is unset (the
/// default), anything but a whole number is reported naming the variable with an example
/// of a good value, and a file without them takes the documented defaults.
#[test]
fn the_search_settings_are_read_or_reported_with_what_to_fix() {
    use palisade::config::Env;
    use palisade::cost::budget::BudgetConfig;
    let vars = [
        ("PALISADE_BUDGET_DEFAULT_MAX_USES", "10"),
        ("PALISADE_BUDGET_TOKENS_PER_WEB_SEARCH", "10000"),
        ("PALISADE_BUDGET_TOKENS_PER_WEB_FETCH", "25000"),
    ];
    for bad in ["none", "1_000", "0x10", "+-1", "1e4", "ten"] {
        let mut env = Env::from_pairs(vars.map(|(name, _)| (name, bad)));
        let _ = BudgetConfig::from_env(&mut env);
        let err = env.finish().unwrap_err();
        let text = err.to_string();
        for (name, example) in vars {
            assert!(text.contains(name), "{bad}: {text}");
            assert!(text.contains(example), "{bad}: {text}");
        }
    }
    let mut env = Env::from_pairs(vars.map(|(name, _)| (name, "")));
    let cfg = BudgetConfig::from_env(&mut env);
    env.finish().unwrap();
    assert_eq!(
        (
            cfg.default_max_uses,
            cfg.tokens_per_web_search,
            cfg.tokens_per_web_fetch
        ),
        (10, 10_000, 25_000)
    );
    let mut env = Env::from_pairs(vars.map(|(name, _)| (name, " 7 ")));
    let cfg = BudgetConfig::from_env(&mut env);
    env.finish().unwrap();
    assert_eq!(
        (
            cfg.default_max_uses,
            cfg.tokens_per_web_search,
            cfg.tokens_per_web_fetch
        ),
        (7, 7, 7)
    );
    let cfg: BudgetConfig = serde_json::from_str(r#"{"status":429}"#).unwrap();
    assert_eq!(
        (
            cfg.default_max_uses,
            cfg.tokens_per_web_search,
            cfg.tokens_per_web_fetch
        ),
        (10, 10_000, 25_000)
    );
    for bad in [
        r#"{"default_max_uses":-1}"#,
        r#"{"tokens_per_web_search":"lots"}"#,
        r#"{"tokens_per_web_fetch":1.5}"#,
    ] {
        let err = serde_json::from_str::<BudgetConfig>(bad).unwrap_err();
        assert!(err.to_string().contains("invalid"), "{bad}: {err}");
    }
}

/// `tools` given twice is refused naming `tools` (an upstream may read either list).
#[tokio::test]
async fn tools_given_twice_is_refused_naming_tools() {
    let layer = builder(dollars("1000")).build().unwrap();
    let body = r#"{"model":"claude-sonnet-4-5","max_tokens":10,"tools":[],"tools":[{"type":"web_search_20250305"}]}"#;
    let (status, json, _) = send(&layer, body).await;
    assert_eq!(status, 400, "{json}");
    assert_eq!(json["errors"][0]["field"], "tools", "{json}");
}

/// Any tool whose type starts with `web_search` counts, OpenAI's `web_search_preview`
/// too: its results are reserved as input at the model's rate, and its searches at the
/// model's price per search in the table (none for OpenAI's models).
#[tokio::test]
async fn an_openai_web_search_tool_reserves_results_at_the_models_rates() {
    let layer = builder(dollars("1000")).build().unwrap();
    let (_, _, plain) = send(
        &layer,
        r#"{"model":"gpt-4o","max_output_tokens":10,"tools":[{"type":"xeb_search_preview"}]}"#,
    )
    .await;
    let (_, _, searching) = send(
        &layer,
        r#"{"model":"gpt-4o","max_output_tokens":10,"tools":[{"type":"web_search_preview"}]}"#,
    )
    .await;
    // ten searches of 10,000 tokens at $2.50 per million, no fee in the table
    assert_eq!(
        searching.unwrap().picos(),
        plain.unwrap().picos() + 10 * 10_000 * 2_500_000
    );
}

/// A request refused because what its tools allow costs more than the whole budget is
/// told of the tools' limits too: with `max_tokens` 1, telling it to lower `max_tokens`
/// fixes nothing.
#[tokio::test]
async fn a_request_whose_searches_outgrow_the_budget_is_told_to_bound_them() {
    let layer = builder(dollars("0.5")).build().unwrap();
    let body = r#"{"model":"claude-sonnet-4-5","max_tokens":1,"tools":[{"type":"web_search_20250305","name":"web_search"}]}"#;
    let (status, json, _) = send(&layer, body).await;
    assert_eq!(status, 400, "{json}");
    let message = json["errors"][0]["message"].as_str().unwrap();
    assert!(message.contains("max_uses"), "{message}");
    // bounded, it fits
    let body = r#"{"model":"claude-sonnet-4-5","max_tokens":1,"tools":[{"type":"web_search_20250305","name":"web_search","max_uses":2}]}"#;
    let (status, json, _) = send(&layer, body).await;
    assert_eq!(status, 200, "{json}");
}

/// Numbers serde_json cannot hold as a float (`1e400`), where an upstream may read them
/// (a `tool_use` block's `input`), do not make the body unmetered.
#[tokio::test]
async fn a_huge_exponent_in_a_tool_input_leaves_the_body_metered() {
    let layer = builder(dollars("1000")).build().unwrap();
    let body = r#"{"model":"claude-sonnet-4-5","max_tokens":10,"tools":[{"type":"web_search_20250305","max_uses":1}],"messages":[{"role":"assistant","content":[{"type":"tool_use","id":"t","name":"f","input":{"x":1e400,"y":-1e400,"z":123456789012345678901234567890}}]}]}"#;
    let (status, json, reserved) = send(&layer, body).await;
    assert_eq!(status, 200, "{json}");
    assert!(reserved.unwrap().picos() > 10_000_000_000);
}

/// A field the estimate reads holding a number too large for any type serde_json reads
/// (`1e400`) made the whole body unreadable to it, so the body passed unmetered: it is
/// refused naming the field, wherever the field is.
#[tokio::test]
async fn a_huge_exponent_in_a_field_the_estimate_reads_is_refused() {
    let layer = builder(dollars("1000")).build().unwrap();
    let body = r#"{"model":"claude-sonnet-4-5","max_tokens":10,"n":1,"tools":[{"type":"web_search_20250305","max_uses":1}],"messages":[{"role":"assistant","content":[{"type":"tool_use","id":"t","name":"f","input":{"x":1e400}}]}]}"#;
    for (from, to, field) in [
        (r#""max_uses":1"#, r#""max_uses":1e400"#, "tools"),
        (
            r#""max_uses":1"#,
            r#""max_uses":1,"max_content_tokens":-1e400"#,
            "tools",
        ),
        (r#"[{"type""#, r#"[1e400,{"type""#, "tools"),
        (r#""max_tokens":10"#, r#""max_tokens":1e400"#, "max_tokens"),
        (r#""n":1"#, r#""n":1e400"#, "n"),
        (r#""claude-sonnet-4-5""#, "1e400", "model"),
    ] {
        let bad = body.replace(from, to);
        let (status, json, _) = send(&layer, bad.clone()).await;
        assert_eq!(status, 400, "{bad}: {json}");
        assert_eq!(json["errors"][0]["field"], field, "{bad}: {json}");
    }
    // no model named: not metered, however unreadable
    let (status, _, reserved) = send(&layer, r#"{"name":"bot","max_tokens":1e400}"#).await;
    assert_eq!((status, reserved), (200, None));
}
