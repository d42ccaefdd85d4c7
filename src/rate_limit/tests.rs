//! Layer tests with a paused clock.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tower::{Layer, Service, ServiceExt, service_fn};

use super::*;
use crate::body::ResponseBody;
use crate::config::Env;
use crate::error::ErrorFormat;

type Svc = RateLimit<
    tower::util::ServiceFn<
        fn(Request<()>) -> std::future::Ready<Result<Response<Full<Bytes>>, Infallible>>,
    >,
>;

fn ok(_req: Request<()>) -> std::future::Ready<Result<Response<Full<Bytes>>, Infallible>> {
    std::future::ready(Ok(Response::new(Full::new(Bytes::from_static(b"ok")))))
}

fn service(layer: &RateLimitLayer) -> Svc {
    layer.layer(service_fn(ok as fn(_) -> _))
}

async fn send(svc: &mut Svc, req: Request<()>) -> Response<ResponseBody<Full<Bytes>>> {
    svc.ready().await.unwrap().call(req).await.unwrap()
}

fn post(path: &str, key: &str) -> Request<()> {
    Request::post(path)
        .header("x-api-key", key)
        .body(())
        .unwrap()
}

/// The status of a POST to `/` with API key `key`, through a clone of `svc`.
async fn status_of<S, B>(svc: &S, key: &str) -> StatusCode
where
    S: Service<Request<()>, Response = Response<B>> + Clone,
    S::Error: std::fmt::Debug,
{
    svc.clone().oneshot(post("/", key)).await.unwrap().status()
}

/// `peek` and `reset` of a test store that wraps a [`MemoryStore`] as its field `.0`.
macro_rules! peek_and_reset_in_memory {
    () => {
        fn peek(
            &self,
            item: &store::CheckItem<'_>,
        ) -> store::BoxFuture<Result<store::RuleDecision, StoreError>> {
            self.0.peek(item)
        }
        fn reset(
            &self,
            i: u32,
            rule: &str,
            key: &RateKey,
        ) -> store::BoxFuture<Result<(), StoreError>> {
            self.0.reset(i, rule, key)
        }
    };
}

async fn body_json(r: Response<ResponseBody<Full<Bytes>>>) -> serde_json::Value {
    serde_json::from_slice(&r.into_body().collect().await.unwrap().to_bytes()).unwrap()
}

#[tokio::test(start_paused = true)]
async fn refuses_with_429_headers_and_retry_after_then_recovers() {
    let layer = RateLimitLayer::builder()
        .rule(
            Rule::new("chat", Quota::per_minute(2))
                .post("/v1/messages")
                .key(KeySource::ApiKey),
        )
        .error_format(ErrorFormat::Anthropic)
        .legacy_headers(true)
        .build()
        .unwrap();
    let mut svc = service(&layer);
    for remaining in [1, 0] {
        let r = send(&mut svc, post("/v1/messages", "sk-a")).await;
        assert_eq!(r.status(), 200);
        assert_eq!(
            r.headers()["ratelimit"],
            // the units counted in this minute weigh until the end of the next one
            format!("\"chat\";r={remaining};t=120")
        );
        assert_eq!(r.headers()["x-ratelimit-remaining"], remaining.to_string());
    }
    tokio::time::advance(Duration::from_millis(20_500)).await;
    let r = send(&mut svc, post("/v1/messages", "sk-a")).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    // 2 requests at t=0 weigh (60 - e)/60 in the next window; one fits from e = 30 s,
    // 69.5 s from now: rounded up to 70.
    assert_eq!(r.headers()["retry-after"], "70");
    assert_eq!(r.headers()["ratelimit-policy"], "\"chat\";q=2;w=60");
    assert_eq!(r.headers()["ratelimit"], "\"chat\";r=0;t=70");
    assert_eq!(r.headers()["x-ratelimit-limit"], "2");
    let body = body_json(r).await;
    assert_eq!(body["error"]["type"], "rate_limit_error");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`chat`")
    );

    // another key, another route: unaffected
    assert_eq!(
        send(&mut svc, post("/v1/messages", "sk-b")).await.status(),
        200
    );
    let r = send(&mut svc, post("/v1/other", "sk-a")).await;
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("ratelimit").is_none());

    tokio::time::advance(Duration::from_secs(69)).await;
    assert_eq!(
        send(&mut svc, post("/v1/messages", "sk-a")).await.status(),
        429
    );
    tokio::time::advance(Duration::from_millis(500)).await;
    assert_eq!(
        send(&mut svc, post("/v1/messages", "sk-a")).await.status(),
        200
    );

    let counters = layer.limiter().counters();
    assert_eq!(counters[0].allowed, 4);
    assert_eq!(counters[0].limited, 2);
}

#[tokio::test(start_paused = true)]
async fn rules_are_decided_as_a_group() {
    let layer = RateLimitLayer::new([
        Rule::new("per-key", Quota::per_minute(3)).key(KeySource::ApiKey),
        Rule::new("global", Quota::per_minute(4)),
    ])
    .unwrap();
    let mut svc = service(&layer);
    for _ in 0..3 {
        assert_eq!(send(&mut svc, post("/", "sk-a")).await.status(), 200);
    }
    // sk-a is refused by its own rule: the global rule must not be debited
    for _ in 0..5 {
        let r = send(&mut svc, post("/", "sk-a")).await;
        assert_eq!(r.status(), 429);
        let policies: Vec<_> = r.headers().get_all("ratelimit-policy").iter().collect();
        assert_eq!(policies, ["\"per-key\";q=3;w=60", "\"global\";q=4;w=60"]);
        let values: Vec<_> = r.headers().get_all("ratelimit").iter().collect();
        assert_eq!(values[1], "\"global\";r=1;t=120", "nothing was debited");
    }
    assert_eq!(send(&mut svc, post("/", "sk-b")).await.status(), 200);
    let r = send(&mut svc, post("/", "sk-c")).await;
    assert_eq!(r.status(), 429, "the global quota of 4 is now spent");
    let admin = layer.limiter();
    let global = admin.peek("global", &RateKey::Global).await.unwrap();
    assert_eq!(global.remaining, 0);
    let c = admin
        .peek("per-key", &RateKey::api_key("sk-c"))
        .await
        .unwrap();
    assert_eq!(
        c.remaining, 3,
        "the refused request did not count for sk-c either"
    );
}

#[tokio::test(start_paused = true)]
async fn a_cost_above_capacity_is_refused_at_once_as_never_satisfiable() {
    let layer = RateLimitLayer::new([
        Rule::new("tokens", Quota::per_minute(1000)).cost(Cost::Extension { default: 1 })
    ])
    .unwrap();
    let mut svc = service(&layer);
    let mut req = post("/", "k");
    req.extensions_mut().insert(RequestCost(5000));
    let r = send(&mut svc, req).await;
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert!(r.headers().get("retry-after").is_none());
    let body = body_json(r).await;
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("can never be admitted")
    );
    assert_eq!(layer.limiter().counters()[0].never, 1);
    let mut req = post("/", "k");
    req.extensions_mut().insert(RequestCost(1000));
    assert_eq!(send(&mut svc, req).await.status(), 200);
}

#[tokio::test(start_paused = true)]
async fn shadow_rules_count_and_log_but_never_refuse() {
    let layer = RateLimitLayer::new([
        Rule::new("trial", Quota::per_minute(1)).shadow(true),
        Rule::new("hard", Quota::per_minute(100)),
    ])
    .unwrap();
    let mut svc = service(&layer);
    for _ in 0..3 {
        let r = send(&mut svc, post("/", "k")).await;
        assert_eq!(r.status(), 200);
        let policies: Vec<_> = r.headers().get_all("ratelimit-policy").iter().collect();
        assert_eq!(
            policies,
            ["\"hard\";q=100;w=60"],
            "shadow rules stay hidden"
        );
    }
    let c = layer.limiter().counters();
    assert_eq!((c[0].allowed, c[0].shadow_limited, c[0].limited), (1, 2, 0));
    layer.limiter().log_counters();
    assert_eq!(c[1].allowed, 3);
}

#[tokio::test(start_paused = true)]
async fn overrides_reset_and_peek() {
    let layer =
        RateLimitLayer::new([Rule::new("p", Quota::per_minute(1)).key(KeySource::Principal)])
            .unwrap();
    let admin = layer.limiter();
    let mut svc = service(&layer);
    let req = |id: &str| {
        let mut r = Request::get("/").body(()).unwrap();
        r.extensions_mut().insert(Principal::new(id));
        r
    };
    let vip = RateKey::principal("vip");
    admin
        .set_override("p", vip.clone(), Quota::per_minute(3))
        .unwrap();
    for _ in 0..3 {
        assert_eq!(send(&mut svc, req("vip")).await.status(), 200);
    }
    assert_eq!(send(&mut svc, req("vip")).await.status(), 429);
    assert_eq!(send(&mut svc, req("pleb")).await.status(), 200);
    assert_eq!(send(&mut svc, req("pleb")).await.status(), 429);
    admin.reset("p", &RateKey::principal("pleb")).await.unwrap();
    assert_eq!(send(&mut svc, req("pleb")).await.status(), 200);
    assert_eq!(
        admin.remove_override("p", &vip).unwrap(),
        Some(Quota::per_minute(3))
    );
    let status = admin.peek("p", &vip).await.unwrap();
    assert_eq!((status.quota, status.remaining), (Quota::per_minute(1), 0));
    assert!(matches!(
        admin.peek("nope", &vip).await,
        Err(AdminError::UnknownRule { .. })
    ));
    assert!(matches!(
        admin.set_override("p", vip.clone(), Quota::per_minute(0)),
        Err(AdminError::InvalidQuota(
            RateLimitConfigError::ZeroLimit { .. }
        ))
    ));
    assert!(matches!(
        admin.set_override("nope", vip, Quota::per_minute(1)),
        Err(AdminError::UnknownRule { .. })
    ));
    // parse errors are types too
    let route_err: ParseRouteError = "v1".parse::<Route>().unwrap_err();
    assert!(route_err.to_string().contains("must start with `/`"));
    let key_err: ParseKeySourceError = "cookie".parse::<KeySource>().unwrap_err();
    assert!(key_err.to_string().contains("unknown key source `cookie`"));
    let net_err: ParseIpNetError = "10.0.0.0/33".parse::<IpNet>().unwrap_err();
    assert!(net_err.to_string().contains("invalid prefix length"));
}

#[tokio::test(start_paused = true)]
async fn settled_quantities_are_reserved_then_corrected() {
    let layer = RateLimitLayer::new([Rule::new("tpm", Quota::per_minute(1000))
        .key(KeySource::ApiKey)
        .cost(Cost::Settled { estimate: 100 })])
    .unwrap();
    let admin = layer.limiter();
    // The handler settles with the tokens actually used.
    let svc = layer.layer(service_fn(|req: Request<()>| async move {
        let reservation = req.extensions().get::<Reservation>().cloned().unwrap();
        assert_eq!(reservation.reserved(), 100);
        reservation.settle(700).await.unwrap();
        reservation.settle(5).await.unwrap(); // ignored
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
    }));
    let r = svc.clone().oneshot(post("/", "sk-a")).await.unwrap();
    assert_eq!(r.headers()["ratelimit"], "\"tpm\";r=900;t=120");
    let key = RateKey::api_key("sk-a");
    assert_eq!(admin.peek("tpm", &key).await.unwrap().remaining, 300);
    // the next estimate still fits, the one after does not
    assert_eq!(status_of(&svc, "sk-a").await, 200);
    assert_eq!(status_of(&svc, "sk-a").await, 429);
}

#[tokio::test(start_paused = true)]
async fn spoofed_forwarded_for_does_not_change_the_key() {
    let layer = RateLimitLayer::builder()
        .rule(Rule::new("ip", Quota::per_minute(1)).key(KeySource::PeerIp))
        .trusted_proxies("10.0.0.0/8".parse().unwrap())
        .build()
        .unwrap();
    let mut svc = service(&layer);
    let req = |peer: &str, xff: &str| {
        let mut r = Request::get("/")
            .header("x-forwarded-for", xff)
            .body(())
            .unwrap();
        r.extensions_mut()
            .insert(peer.parse::<SocketAddr>().unwrap());
        r
    };
    for (peer, forwarded_for, status) in [
        ("10.0.0.1:1", "1.1.1.1, 203.0.113.7", 200),
        // the client forges a different leftmost hop: same client, still limited
        ("10.0.0.2:1", "9.9.9.9, 203.0.113.7", 429),
        // an untrusted peer's header is ignored entirely
        ("198.51.100.1:1", "203.0.113.8", 200),
        ("198.51.100.1:2", "203.0.113.9", 429),
        // IPv6 peers are grouped by /64
        ("[2001:db8::1]:1", "", 200),
        ("[2001:db8::ffff]:1", "", 429),
        ("[2001:db8:0:1::1]:1", "", 200),
    ] {
        let r = send(&mut svc, req(peer, forwarded_for)).await;
        assert_eq!(
            r.status(),
            status,
            "peer {peer}, x-forwarded-for {forwarded_for:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn requests_without_a_key_share_one_bucket_or_skip() {
    let layer = RateLimitLayer::new([
        Rule::new("by-header", Quota::per_minute(1))
            .key(KeySource::Header(http::HeaderName::from_static("x-user"))),
        Rule::new("by-key", Quota::per_minute(1))
            .key(KeySource::ApiKey)
            .skip_anonymous(true),
    ])
    .unwrap();
    let mut svc = service(&layer);
    let anon = || Request::get("/").body(()).unwrap();
    let r = send(&mut svc, anon()).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers().get_all("ratelimit").iter().count(), 1);
    assert_eq!(send(&mut svc, anon()).await.status(), 429);
    let r = Request::get("/").header("x-user", "u1").body(()).unwrap();
    assert_eq!(send(&mut svc, r).await.status(), 200);
}

#[tokio::test(start_paused = true)]
async fn templates_and_methods_select_rules() {
    let layer = RateLimitLayer::new([Rule::new("user-msgs", Quota::per_minute(1))
        .method(http::Method::POST)
        .route("/v1/users/{id}/messages".parse().unwrap())])
    .unwrap();
    let mut svc = service(&layer);
    assert_eq!(
        send(&mut svc, post("/v1/users/1/messages", "k"))
            .await
            .status(),
        200
    );
    assert_eq!(
        send(&mut svc, post("/v1/users/2/messages", "k"))
            .await
            .status(),
        429
    );
    let get = Request::get("/v1/users/1/messages").body(()).unwrap();
    assert_eq!(send(&mut svc, get).await.status(), 200);
    assert_eq!(
        send(&mut svc, post("/v1/users/1/files", "k"))
            .await
            .status(),
        200
    );
}

#[test]
fn configuration_mistakes_are_errors() {
    let dup = RateLimitLayer::new([
        Rule::new("a", Quota::per_minute(1)),
        Rule::new("a", Quota::per_minute(2)),
    ]);
    assert_eq!(
        dup.unwrap_err(),
        RateLimitConfigError::DuplicateRule { rule: "a".into() }
    );
    let strict = RateLimitLayer::new([Rule::new("a", Quota::per_minute(1))
        .algorithm(Algorithm::Gcra)
        .strict(true)]);
    assert!(matches!(
        strict,
        Err(RateLimitConfigError::StrictNeedsSlidingWindow { .. })
    ));
    let name = RateLimitLayer::new([Rule::new("a \"b\"", Quota::per_minute(1))]);
    assert!(matches!(
        name,
        Err(RateLimitConfigError::InvalidName { .. })
    ));
    assert!(matches!(
        RateLimitLayer::new([Rule::new("z", Quota::new(1, Duration::ZERO))]),
        Err(RateLimitConfigError::ZeroWindow { .. })
    ));
    assert!(matches!(
        RateLimitLayer::new([Rule::new("b", Quota::per_second(1).with_burst(0))]),
        Err(RateLimitConfigError::ZeroBurst { .. })
    ));
    assert!(matches!(
        RateLimitLayer::new([Rule::new("p", Quota::per_minute(1)).post("v1/messages")]),
        Err(RateLimitConfigError::Invalid { field: "route", .. })
    ));
    assert!(Route::parse("v1").is_err());
    assert!(Route::parse("/a/{*rest}/b").is_err());
    assert!(Route::parse("/a/x{id}").is_err());
    assert!("header:bad header".parse::<KeySource>().is_err());
    assert!("10.0.0.0/33".parse::<IpNet>().is_err());
}

/// `RateLimitLayer::from_env()` builds the memory store. With the Redis store's address
/// set (`PALISADE_RATE_LIMIT_REDIS_URL` or `_CLUSTER_NODES`, which the README lists) it
/// built the memory store all the same: each instance counted alone, with nothing said.
/// The address is now a problem that says how to build the Redis store.
#[test]
fn layer_from_env_refuses_a_redis_address_it_would_ignore() {
    for name in [
        "PALISADE_RATE_LIMIT_REDIS_URL",
        "PALISADE_RATE_LIMIT_REDIS_CLUSTER_NODES",
    ] {
        let env = Env::from_pairs([
            (
                "PALISADE_RATE_LIMIT_RULES",
                r#"[{"name":"chat","key":"api_key","limit":20,"window":"1m"}]"#,
            ),
            (name, "redis://:s3cret@10.0.0.5:6379/"),
        ]);
        let Err(err) = RateLimitLayer::from_env_in(env) else {
            panic!("{name} was ignored: the layer was built on the memory store");
        };
        let text = err.to_string();
        assert_eq!(err.problems().len(), 1, "{text}");
        assert_eq!(err.problems()[0].name, name, "{text}");
        assert!(text.contains("RedisStore::from_config"), "{text}");
        assert!(!text.contains("s3cret"), "{text}");
    }
    let env = Env::from_pairs([(
        "PALISADE_RATE_LIMIT_RULES",
        r#"[{"name":"chat","key":"api_key","limit":20,"window":"1m"}]"#,
    )]);
    let layer = RateLimitLayer::from_env_in(env).unwrap();
    assert_eq!(layer.limiter().rules(), ["chat"]);
}

#[test]
fn config_from_env_reports_every_problem() {
    let mut env = Env::from_pairs([
        (
            "PALISADE_RATE_LIMIT_RULES",
            r#"[{"name":"chat","key":"api_key","limit":20,"window":"1m","method":"post","route":"/v1/messages"},{"name":"bad","key":"cookie"}]"#,
        ),
        ("PALISADE_RATE_LIMIT_MAX_ENTRIES", "lots"),
        (
            "PALISADE_RATE_LIMIT_TRUSTED_PROXIES",
            "10.0.0.0/8, nonsense",
        ),
        ("PALISADE_RATE_LIMIT_LEGACY_HEADERS", "true"),
        ("PALISADE_RATE_LIMIT_CLOCK", "sundial"),
    ]);
    let cfg = RateLimitConfig::from_env(&mut env);
    assert!(cfg.legacy_headers);
    let err = env.finish().unwrap_err();
    let names: Vec<_> = err.problems().iter().map(|p| p.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "PALISADE_RATE_LIMIT_RULES",
            "PALISADE_RATE_LIMIT_MAX_ENTRIES",
            "PALISADE_RATE_LIMIT_CLOCK",
            "PALISADE_RATE_LIMIT_TRUSTED_PROXIES"
        ]
    );
    assert!(err.to_string().contains("cookie"));
    assert!(
        err.to_string()
            .contains("expected `tokio`, `fast` or `coarse`"),
        "{err}"
    );

    let mut env = Env::from_pairs([
        (
            "PALISADE_RATE_LIMIT_RULES",
            r#"[{"name":"chat","algorithm":"gcra","limit":5,"window":"1s","burst":2}]"#,
        ),
        ("PALISADE_RATE_LIMIT_ERROR_FORMAT", "anthropic"),
        ("PALISADE_RATE_LIMIT_CLOCK", "coarse"),
    ]);
    let cfg = RateLimitConfig::from_env(&mut env);
    env.finish().unwrap();
    assert_eq!(cfg.error_format, ErrorFormat::Anthropic);
    assert_eq!(cfg.clock, crate::clock::ClockSource::Coarse);
    assert_eq!(cfg.rules[0].burst, Some(2));
    assert_eq!(cfg.build().unwrap().limiter().rules(), ["chat"]);
    let text = serde_json::to_string(&cfg).unwrap();
    let back: RateLimitConfig = serde_json::from_str(&text).unwrap();
    assert_eq!(back, cfg);
}

#[tokio::test(start_paused = true)]
async fn a_failing_store_fails_closed_or_open() {
    use crate::rate_limit::store::{BoxFuture, CheckItem, Decision, RuleDecision, Settlement};

    #[derive(Clone)]
    struct Down;
    impl Store for Down {
        type CheckFuture = std::future::Ready<Result<Decision, StoreError>>;
        fn check(&self, _: &[CheckItem<'_>]) -> Self::CheckFuture {
            std::future::ready(Err(StoreError::new("connection refused")))
        }
        fn settle(&self, _: &[Settlement<'_>]) -> BoxFuture<Result<(), StoreError>> {
            Box::pin(std::future::ready(Ok(())))
        }
        fn peek(&self, _: &CheckItem<'_>) -> BoxFuture<Result<RuleDecision, StoreError>> {
            Box::pin(std::future::ready(Err(StoreError::new("down"))))
        }
        fn reset(&self, _: u32, _: &str, _: &RateKey) -> BoxFuture<Result<(), StoreError>> {
            Box::pin(std::future::ready(Err(StoreError::new("down"))))
        }
    }
    for (mode, status) in [(FailMode::Closed, 503), (FailMode::Open, 200)] {
        let layer = RateLimitLayer::builder()
            .store(Down)
            .rule(Rule::new("g", Quota::per_minute(1)))
            .on_store_error(mode)
            .build()
            .unwrap();
        let svc = layer.layer(service_fn(ok));
        let r = svc.oneshot(post("/", "k")).await.unwrap();
        assert_eq!(r.status(), status);
        if status == 503 {
            assert_eq!(r.headers()["retry-after"], "1");
            let body = r.into_body().collect().await.unwrap().to_bytes();
            assert!(!String::from_utf8_lossy(&body).contains("connection refused"));
        }
        assert!(layer.limiter().peek("g", &RateKey::Global).await.is_err());
    }
}

#[tokio::test(start_paused = true)]
async fn every_emitted_header_follows_the_draft_syntax_and_retry_after_is_never_zero() {
    use super::headers::tests::parse_list;
    let layer = RateLimitLayer::builder()
        .rules([
            Rule::new("sw", Quota::per_second(3)).key(KeySource::ApiKey),
            Rule::new("fw", Quota::new(5, Duration::from_millis(1500)))
                .algorithm(Algorithm::FixedWindow),
            Rule::new("gcra", Quota::per_second(4).with_burst(2)).algorithm(Algorithm::Gcra),
        ])
        .legacy_headers(true)
        .build()
        .unwrap();
    let mut svc = service(&layer);
    let mut refused = 0;
    for i in 0..200u64 {
        tokio::time::advance(Duration::from_millis((i * 37) % 190)).await;
        let key = if i % 3 == 0 { "sk-a" } else { "sk-b" };
        let r = send(&mut svc, post("/", key)).await;
        let policy: Vec<_> = r
            .headers()
            .get_all("ratelimit-policy")
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect();
        let joined = policy.join(", ");
        let items = parse_list(&joined);
        assert_eq!(items.len(), 3);
        for (_, params) in &items {
            assert_eq!(
                params.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
                ["q", "w"]
            );
            assert!(params.iter().all(|(_, v)| *v >= 1));
        }
        let rl: Vec<_> = r
            .headers()
            .get_all("ratelimit")
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect();
        let items = parse_list(&rl.join(", "));
        assert_eq!(
            items.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
            ["sw", "fw", "gcra"]
        );
        for (_, params) in &items {
            assert_eq!(
                params.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
                ["r", "t"]
            );
        }
        if r.status() == StatusCode::TOO_MANY_REQUESTS {
            refused += 1;
            let retry: u64 = r.headers()["retry-after"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!(retry >= 1);
            // the refusing rule's `t` is the same wait
            assert!(items.iter().any(|(_, p)| p[1].1 as u64 == retry));
        } else {
            assert_eq!(r.status(), 200);
        }
        for name in [
            "x-ratelimit-limit",
            "x-ratelimit-remaining",
            "x-ratelimit-reset",
        ] {
            r.headers()[name].to_str().unwrap().parse::<u64>().unwrap();
        }
    }
    assert!(refused > 10, "{refused}");
}

/// A store that answers asynchronously (as a network store would), to drive the layer's
/// waiting state and its `poll_ready` discipline.
#[derive(Clone)]
struct Deferred(MemoryStore);

impl Store for Deferred {
    type CheckFuture = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<store::Decision, StoreError>> + Send>,
    >;
    fn check(&self, items: &[store::CheckItem<'_>]) -> Self::CheckFuture {
        let decision = self.0.check_at(items, self.0.now_micros());
        Box::pin(async move {
            tokio::task::yield_now().await;
            Ok(decision)
        })
    }
    fn settle(&self, s: &[store::Settlement<'_>]) -> store::BoxFuture<Result<(), StoreError>> {
        self.0.settle(s)
    }
    peek_and_reset_in_memory!();
}

#[tokio::test(start_paused = true)]
async fn an_asynchronous_store_uses_the_ready_inner_service() {
    // An inner service that must be polled ready before each call.
    #[derive(Clone, Default)]
    struct NeedsReady {
        ready: bool,
    }
    impl Service<Request<()>> for NeedsReady {
        type Response = Response<Full<Bytes>>;
        type Error = Infallible;
        type Future = std::future::Ready<Result<Self::Response, Infallible>>;
        fn poll_ready(
            &mut self,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), Infallible>> {
            self.ready = true;
            std::task::Poll::Ready(Ok(()))
        }
        fn call(&mut self, req: Request<()>) -> Self::Future {
            assert!(self.ready, "called without poll_ready");
            self.ready = false;
            let settle = req.extensions().get::<Reservation>().is_some();
            let mut res = Response::new(Full::new(Bytes::from_static(b"ok")));
            if settle {
                res.headers_mut()
                    .insert("x-reserved", http::HeaderValue::from_static("yes"));
            }
            std::future::ready(Ok(res))
        }
    }
    let layer = RateLimitLayer::builder()
        .store(Deferred(MemoryStore::new()))
        .rule(Rule::new("t", Quota::per_minute(10)).cost(Cost::Settled { estimate: 4 }))
        .build()
        .unwrap();
    let mut svc = layer.layer(NeedsReady::default());
    for expected in [200, 200, 429] {
        let r = svc
            .ready()
            .await
            .unwrap()
            .call(Request::new(()))
            .await
            .unwrap();
        assert_eq!(r.status(), expected);
        if expected == 200 {
            assert_eq!(r.headers()["x-reserved"], "yes");
        }
    }
    let status = layer.limiter().peek("t", &RateKey::Global).await.unwrap();
    assert_eq!(status.remaining, 2);
}

/// A synchronous store that answers `check_now` but not `check_one_now` (the default), or
/// fails in `check_one_now`: the single-rule path falls back to the list, and a failure
/// there follows the fail mode.
/// A memory store without the single-rule shortcut: `check_one_now` fails when `.1` is
/// set, else leaves the decision to the list path.
#[derive(Clone)]
struct ListOnly(MemoryStore, bool);

impl Store for ListOnly {
    type CheckFuture = <MemoryStore as Store>::CheckFuture;
    fn check(&self, items: &[store::CheckItem<'_>]) -> Self::CheckFuture {
        self.0.check(items)
    }
    fn check_now(
        &self,
        items: &[store::CheckItem<'_>],
    ) -> Option<Result<store::Decision, StoreError>> {
        self.0.check_now(items)
    }
    fn check_one_now(
        &self,
        _: &store::CheckItem<'_>,
    ) -> Option<Result<store::RuleDecision, StoreError>> {
        self.1.then(|| Err(StoreError::new("connection reset")))
    }
    fn settle(&self, s: &[store::Settlement<'_>]) -> store::BoxFuture<Result<(), StoreError>> {
        self.0.settle(s)
    }
    peek_and_reset_in_memory!();
}

#[tokio::test(start_paused = true)]
async fn the_single_rule_path_falls_back_to_the_list_and_honours_failures() {
    // With headers and without (a refusal carries them, an admission may not).
    for (fails, headers) in [(false, true), (true, true), (false, false), (true, false)] {
        let layer = RateLimitLayer::builder()
            .store(ListOnly(MemoryStore::new(), fails))
            .rule(Rule::new("g", Quota::per_minute(2)))
            .draft_headers(headers)
            .build()
            .unwrap();
        let svc = layer.layer(service_fn(ok));
        let mut statuses = Vec::new();
        for _ in 0..3 {
            let r = svc.clone().oneshot(post("/", "k")).await.unwrap();
            statuses.push(r.status().as_u16());
            assert_eq!(r.headers().contains_key("ratelimit"), !fails && headers);
            if r.status() != 200 {
                assert!(r.headers().contains_key("retry-after"));
            }
        }
        let want = if fails { [503; 3] } else { [200, 200, 429] };
        assert_eq!(statuses, want, "fails: {fails}, headers: {headers}");
        let c = &layer.limiter().counters()[0];
        let counted = if fails { (0, 0) } else { (2, 1) };
        assert_eq!((c.allowed, c.limited), counted);
    }
}

/// A layer with one rule and no headers lets requests the rule does not cover through
/// uncounted, and counts requests without a key in one bucket unless told to skip them.
#[tokio::test(start_paused = true)]
async fn one_rule_layers_pass_what_they_do_not_cover() {
    let user = || KeySource::Header(http::HeaderName::from_static("x-user"));
    for skip in [false, true] {
        let layer = RateLimitLayer::builder()
            .rule(
                Rule::new("msgs", Quota::per_minute(1))
                    .post("/v1/messages")
                    .key(user())
                    .skip_anonymous(skip),
            )
            .draft_headers(false)
            .build()
            .unwrap();
        let mut svc = service(&layer);
        for _ in 0..3 {
            let other = Request::get("/v1/models").body(()).unwrap();
            assert_eq!(send(&mut svc, other).await.status(), 200);
        }
        let anon = || Request::post("/v1/messages").body(()).unwrap();
        let second = if skip { 200 } else { 429 };
        assert_eq!(send(&mut svc, anon()).await.status(), 200);
        assert_eq!(send(&mut svc, anon()).await.status(), second);
        let named = Request::post("/v1/messages")
            .header("x-user", "u1")
            .body(())
            .unwrap();
        assert_eq!(send(&mut svc, named).await.status(), 200);
        let c = &layer.limiter().counters()[0];
        let counted = if skip { (1, 0) } else { (2, 1) };
        assert_eq!((c.allowed, c.limited), counted, "skip: {skip}");
    }
}

/// With every header off, a single-rule layer takes its shortest path for admitted
/// requests: the counters, shadow rules, refusals and reservations behave as with headers.
#[tokio::test(start_paused = true)]
async fn without_headers_single_rules_count_shadow_refuse_and_reserve_as_before() {
    let rules = [
        Rule::new("plain", Quota::per_minute(2)),
        Rule::new("shadow", Quota::per_minute(1)).shadow(true),
        Rule::new("settled", Quota::per_minute(10)).cost(Cost::Settled { estimate: 4 }),
    ];
    for rule in rules {
        let name = rule.name.to_string();
        let layer = RateLimitLayer::builder()
            .rule(rule)
            .draft_headers(false)
            .build()
            .unwrap();
        let admin = layer.limiter();
        let svc = layer.layer(service_fn(|req: Request<()>| async move {
            let reserved = req
                .extensions()
                .get::<Reservation>()
                .map(Reservation::reserved);
            let mut r = Response::new(Full::new(Bytes::new()));
            if let Some(units) = reserved {
                r.headers_mut().insert("x-reserved", units.into());
            }
            Ok::<_, Infallible>(r)
        }));
        let mut statuses = Vec::new();
        for _ in 0..3 {
            let r = svc.clone().oneshot(post("/", "k")).await.unwrap();
            assert!(!r.headers().contains_key("ratelimit"));
            assert!(!r.headers().contains_key("x-ratelimit-remaining"));
            if name == "settled" && r.status() == 200 {
                assert_eq!(r.headers()["x-reserved"], "4");
            } else {
                assert!(!r.headers().contains_key("x-reserved"));
            }
            statuses.push(r.status().as_u16());
        }
        let c = &admin.counters()[0];
        match &*name {
            "plain" => {
                assert_eq!(statuses, [200, 200, 429]);
                assert_eq!((c.allowed, c.limited, c.shadow_limited), (2, 1, 0));
            }
            "shadow" => {
                assert_eq!(statuses, [200, 200, 200]);
                assert_eq!((c.allowed, c.limited, c.shadow_limited), (1, 0, 2));
            }
            _ => {
                assert_eq!(statuses, [200, 200, 429]);
                assert_eq!((c.allowed, c.limited, c.shadow_limited), (2, 1, 0));
            }
        }
    }
}

/// A plain rule (every route, keyed by the peer with no trusted proxy or globally, fixed
/// cost, no headers) is decided on `call`'s plain path; it answers exactly as the same rule
/// on the general path (here forced by a route that matches everything, or a trusted proxy
/// list that matches no peer): statuses, retry-after, overrides, requests without an
/// address (shared bucket or skipped) and counters.
#[tokio::test(start_paused = true)]
async fn plain_rules_answer_as_general_ones() {
    let peer = |ip: &str| -> Request<()> {
        let mut req = Request::get("/v1/messages").body(()).unwrap();
        let addr: SocketAddr = format!("{ip}:4000").parse().unwrap();
        req.extensions_mut().insert(addr);
        req
    };
    let anonymous = || Request::get("/v1/messages").body(()).unwrap();
    for key in [KeySource::PeerIp, KeySource::Global] {
        for skip in [false, true] {
            let rule = Rule::new("r", Quota::per_minute(3))
                .key(key.clone())
                .skip_anonymous(skip);
            let plain = RateLimitLayer::builder()
                .rule(rule.clone())
                .draft_headers(false)
                .build()
                .unwrap();
            let general = RateLimitLayer::builder()
                .rule(rule.route(Route::Prefix("/".into())))
                .trusted_proxies("192.0.2.0/24".parse().unwrap())
                .draft_headers(false)
                .build()
                .unwrap();
            assert!(plain.is_plain() && !general.is_plain(), "{key:?}");
            let mut seen = Vec::new();
            for layer in [&plain, &general] {
                layer
                    .limiter()
                    .set_override(
                        "r",
                        RateKey::ip("10.0.0.2".parse().unwrap()),
                        Quota::per_minute(1),
                    )
                    .unwrap();
                let mut svc = service(layer);
                let mut answers = Vec::new();
                for req in [
                    peer("10.0.0.1"),
                    peer("10.0.0.1"),
                    peer("10.0.0.2"),
                    peer("10.0.0.2"),
                    anonymous(),
                    peer("10.0.0.1"),
                    anonymous(),
                    peer("10.0.0.1"),
                    anonymous(),
                ] {
                    let res = send(&mut svc, req).await;
                    let retry = res.headers().get("retry-after").cloned();
                    answers.push((res.status(), retry));
                }
                let c = &layer.limiter().counters()[0];
                seen.push((answers, c.allowed, c.limited));
            }
            assert_eq!(seen[0], seen[1], "{key:?}, skip {skip}");
            assert!(
                seen[0].0.iter().any(|(s, _)| *s == 429),
                "{key:?}: something refused"
            );
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_shadow_rule_with_a_settled_cost_is_settled() {
    let layer = RateLimitLayer::new([Rule::new("tpm-trial", Quota::per_minute(1000))
        .key(KeySource::ApiKey)
        .cost(Cost::Settled { estimate: 100 })
        .shadow(true)])
    .unwrap();
    let admin = layer.limiter();
    let svc = layer.layer(service_fn(|req: Request<()>| async move {
        // a request over the trial quota is let through unreserved
        if let Some(reservation) = req.extensions().get::<Reservation>() {
            assert_eq!(reservation.reserved(), 100);
            reservation.settle(700).await.unwrap();
        }
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
    }));
    let r = svc.clone().oneshot(post("/", "sk-a")).await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers().get("ratelimit").is_none(),
        "shadow rules stay hidden"
    );
    let key = RateKey::api_key("sk-a");
    // settled: 700 spent, not the estimate of 100
    assert_eq!(admin.peek("tpm-trial", &key).await.unwrap().remaining, 300);
    // over the trial quota: admitted, counted as a shadow refusal
    svc.clone().oneshot(post("/", "sk-a")).await.unwrap();
    let r = svc.clone().oneshot(post("/", "sk-a")).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(admin.counters()[0].shadow_limited, 1);
}

#[tokio::test(start_paused = true)]
async fn a_cost_of_zero_is_admitted_after_a_settlement_overshoots() {
    let layer = RateLimitLayer::new([Rule::new("tpm", Quota::per_minute(1000))
        .key(KeySource::ApiKey)
        .cost(Cost::Settled { estimate: 100 })])
    .unwrap();
    let svc = layer.layer(service_fn(|req: Request<()>| async move {
        if let Some(r) = req.extensions().get::<Reservation>() {
            r.settle(5_000).await.unwrap(); // far past the quota
        }
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
    }));
    assert_eq!(status_of(&svc, "sk-a").await, 200);
    assert_eq!(status_of(&svc, "sk-a").await, 429);
    let mut peek = post("/", "sk-a");
    peek.extensions_mut().insert(RequestCost(0));
    let r = svc.clone().oneshot(peek).await.unwrap();
    assert_eq!(r.status(), 200, "a cost of 0 is a peek, always allowed");
    assert!(r.headers()["ratelimit"].to_str().unwrap().contains("r=0;"));
    let status = layer
        .limiter()
        .peek("tpm", &RateKey::api_key("sk-a"))
        .await
        .unwrap();
    assert_eq!(status.remaining, 0);
}

/// After an admitted response that says `r=0`, waiting `t` seconds admits the same
/// request, whatever the algorithm (the sliding window used to say the current window's
/// end, where the spent units still weigh in full).
#[tokio::test(start_paused = true)]
async fn waiting_t_after_r0_admits_the_same_request() {
    for algorithm in [
        Algorithm::SlidingWindow,
        Algorithm::FixedWindow,
        Algorithm::Gcra,
    ] {
        let layer = RateLimitLayer::new([Rule::new("chat", Quota::per_minute(3))
            .key(KeySource::ApiKey)
            .algorithm(algorithm)])
        .unwrap();
        let mut svc = service(&layer);
        tokio::time::advance(Duration::from_secs(17)).await;
        let mut last = None;
        for _ in 0..3 {
            let r = send(&mut svc, post("/", "sk-t")).await;
            assert_eq!(r.status(), 200, "{algorithm}");
            last = Some(r);
        }
        let value = last.unwrap().headers()["ratelimit"]
            .to_str()
            .unwrap()
            .to_owned();
        let params = headers::tests::parse_list(&value).remove(0).1;
        assert_eq!(params[0], ("r".to_owned(), 0), "{algorithm}: {value}");
        let t = params[1].1;
        tokio::time::advance(Duration::from_secs(t as u64)).await;
        let r = send(&mut svc, post("/", "sk-t")).await;
        assert_eq!(r.status(), 200, "{algorithm}: waited t={t} after {value}");
    }
}

/// The shared `PALISADE_ERROR_FORMAT` decides how the rate limiter renders its refusals,
/// unless `PALISADE_RATE_LIMIT_ERROR_FORMAT` says otherwise.
#[tokio::test(start_paused = true)]
async fn the_shared_error_format_renders_refusals_unless_overridden() {
    let rules = r#"[{"name":"chat","key":"api_key","limit":1,"window":"1m"}]"#;
    let cases = [
        (
            vec![("PALISADE_ERROR_FORMAT", "anthropic")],
            ErrorFormat::Anthropic,
        ),
        (
            vec![("PALISADE_ERROR_FORMAT", "problem")],
            ErrorFormat::ProblemJson,
        ),
        (
            vec![
                ("PALISADE_ERROR_FORMAT", "anthropic"),
                ("PALISADE_RATE_LIMIT_ERROR_FORMAT", "problem"),
            ],
            ErrorFormat::ProblemJson,
        ),
        (
            vec![
                ("PALISADE_ERROR_FORMAT", "problem"),
                ("PALISADE_RATE_LIMIT_ERROR_FORMAT", "anthropic"),
            ],
            ErrorFormat::Anthropic,
        ),
        (vec![], ErrorFormat::ProblemJson),
    ];
    for (vars, want) in cases {
        let mut pairs = vars.clone();
        pairs.push(("PALISADE_RATE_LIMIT_RULES", rules));
        let mut env = Env::from_pairs(pairs);
        let cfg = RateLimitConfig::from_env(&mut env);
        env.finish().unwrap();
        assert_eq!(cfg.error_format, want, "{vars:?}");
        let layer = RateLimitLayer::from_config(cfg).unwrap();
        let mut svc = service(&layer);
        send(&mut svc, post("/", "sk-f")).await;
        let refused = send(&mut svc, post("/", "sk-f")).await;
        assert_eq!(refused.status(), 429);
        let content_type = refused.headers()["content-type"]
            .to_str()
            .unwrap()
            .to_owned();
        let body = body_json(refused).await;
        match want {
            ErrorFormat::Anthropic => {
                assert_eq!(body["type"], "error", "{vars:?}: {body}");
                assert_eq!(body["error"]["type"], "rate_limit_error", "{vars:?}");
            }
            _ => {
                assert_eq!(content_type, "application/problem+json", "{vars:?}");
                assert_eq!(body["status"], 429, "{vars:?}");
            }
        }
    }
    // a bad shared value is reported (once), by name
    let mut env = Env::from_pairs([("PALISADE_ERROR_FORMAT", "xml")]);
    let _ = crate::config::Settings::from_env(&mut env);
    let _ = RateLimitConfig::from_env(&mut env);
    let err = env.finish().unwrap_err();
    let names: Vec<_> = err.problems().iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["PALISADE_ERROR_FORMAT"]);
}

#[test]
fn config_from_env_reports_duplicate_rules_and_an_empty_store() {
    let mut env = Env::from_pairs([
        (
            "PALISADE_RATE_LIMIT_RULES",
            r#"[{"name":"chat","limit":20},{"name":"chat","limit":5}]"#,
        ),
        ("PALISADE_RATE_LIMIT_MAX_ENTRIES", "0"),
    ]);
    let _ = RateLimitConfig::from_env(&mut env);
    let err = env.finish().unwrap_err();
    let names: Vec<_> = err.problems().iter().map(|p| p.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "PALISADE_RATE_LIMIT_RULES",
            "PALISADE_RATE_LIMIT_MAX_ENTRIES"
        ]
    );
    assert!(
        err.to_string()
            .contains("two rate-limit rules are named `chat`"),
        "{err}"
    );
}

/// The reset retention is read from the environment, and one out of range (0, or past a
/// day) is reported with the other problems.
#[test]
fn config_from_env_reads_and_checks_the_reset_retention() {
    let mut env = Env::from_pairs([("PALISADE_RATE_LIMIT_RESET_RETENTION", "15m")]);
    let cfg = RateLimitConfig::from_env(&mut env);
    env.finish().unwrap();
    assert_eq!(cfg.reset_retention, std::time::Duration::from_secs(15 * 60));
    assert!(cfg.build().is_ok());
    assert_eq!(
        RateLimitConfig::default().reset_retention,
        std::time::Duration::from_secs(3600)
    );
    for bad in ["0", "25h"] {
        let mut env = Env::from_pairs([("PALISADE_RATE_LIMIT_RESET_RETENTION", bad)]);
        let cfg = RateLimitConfig::from_env(&mut env);
        let err = env.finish().unwrap_err();
        let names: Vec<_> = err.problems().iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["PALISADE_RATE_LIMIT_RESET_RETENTION"], "{bad}");
        assert!(err.to_string().contains("reset retention"), "{err}");
        assert_eq!(
            cfg.build().unwrap_err(),
            RateLimitConfigError::InvalidResetRetention
        );
    }
}

/// A rule keyed by the client IP on a server that gives no peer address (the `axum`
/// feature off, or no `ConnectInfo`) no longer puts everyone in one bucket silently: each
/// such request is counted (and the first logged at `error`), on every decision path.
#[tokio::test(start_paused = true)]
async fn peer_ip_rules_count_requests_without_a_peer_address() {
    for (headers, skip) in [(true, false), (false, false), (false, true)] {
        let layer = RateLimitLayer::builder()
            .rule(
                Rule::new("per-ip", Quota::per_minute(100))
                    .key(KeySource::PeerIp)
                    .skip_anonymous(skip),
            )
            .draft_headers(headers)
            .build()
            .unwrap();
        let mut svc = service(&layer);
        for _ in 0..3 {
            assert_eq!(send(&mut svc, Request::new(())).await.status(), 200);
        }
        let mut req = Request::new(());
        req.extensions_mut()
            .insert("203.0.113.9:5000".parse::<SocketAddr>().unwrap());
        assert_eq!(send(&mut svc, req).await.status(), 200);
        let c = &layer.limiter().counters()[0];
        assert_eq!(c.no_key, 3, "headers {headers}, skip {skip}");
        assert_eq!(
            c.allowed,
            if skip { 1 } else { 4 },
            "headers {headers}, skip {skip}"
        );
    }
    // several rules: the general path counts too
    let layer = RateLimitLayer::new([
        Rule::new("per-ip", Quota::per_minute(100)).key(KeySource::PeerIp),
        Rule::new("per-user", Quota::per_minute(100)).key(KeySource::Principal),
    ])
    .unwrap();
    let mut svc = service(&layer);
    send(&mut svc, Request::new(())).await;
    let c = layer.limiter().counters();
    assert_eq!((c[0].no_key, c[1].no_key), (1, 1));
}

/// A plain per-IP rule over a store that cannot answer at once (as the Redis store): a
/// request without a peer address is counted in `no_key` once, not once by the plain path
/// and again by the general path it falls back to.
#[tokio::test(start_paused = true)]
async fn a_request_without_a_peer_is_counted_once_when_the_plain_path_falls_back() {
    for skip in [false, true] {
        let layer = RateLimitLayer::builder()
            .store(ListOnly(MemoryStore::new(), false))
            .rule(
                Rule::new("per-ip", Quota::per_minute(100))
                    .key(KeySource::PeerIp)
                    .skip_anonymous(skip),
            )
            .draft_headers(false)
            .build()
            .unwrap();
        assert!(layer.is_plain());
        let svc = layer.layer(service_fn(ok));
        for _ in 0..3 {
            let r = svc.clone().oneshot(Request::new(())).await.unwrap();
            assert_eq!(r.status(), 200);
        }
        let c = &layer.limiter().counters()[0];
        assert_eq!(c.no_key, 3, "skip {skip}");
        assert_eq!(c.allowed, if skip { 0 } else { 3 }, "skip {skip}");
    }
}

/// One request of [`the_plain_path_decides_as_the_general_path`].
#[derive(Debug, Clone)]
struct Arrival {
    after_ms: u64,
    post: bool,
    path: &'static str,
    user: Option<u8>,
    peer: Option<u8>,
    forwarded: Option<u8>,
    cost: Option<u64>,
}

fn arrival() -> impl proptest::strategy::Strategy<Value = Arrival> {
    use proptest::prelude::*;
    (
        prop_oneof![Just(0u64), 0u64..100, 0u64..3_000],
        any::<bool>(),
        prop_oneof![Just("/v1/messages"), Just("/v1/messages/"), Just("/other")],
        proptest::option::of(0u8..3),
        proptest::option::weighted(0.8, 0u8..3),
        proptest::option::of(0u8..3),
        proptest::option::of(0u64..4),
    )
        .prop_map(
            |(after_ms, post, path, user, peer, forwarded, cost)| Arrival {
                after_ms,
                post,
                path,
                user,
                peer,
                forwarded,
                cost,
            },
        )
}

fn arrival_request(a: &Arrival) -> Request<()> {
    let mut req = Request::builder()
        .method(if a.post { "POST" } else { "GET" })
        .uri(a.path);
    if let Some(u) = a.user {
        req = req.header("x-user-id", format!("user-{u}"));
    }
    if let Some(f) = a.forwarded {
        req = req.header("x-forwarded-for", format!("203.0.113.{f}"));
    }
    let mut req = req.body(()).unwrap();
    if let Some(p) = a.peer {
        let peer: SocketAddr = format!("10.0.0.{p}:4000").parse().unwrap();
        req.extensions_mut().insert(peer);
    }
    if let Some(c) = a.cost {
        req.extensions_mut().insert(RequestCost(c));
    }
    req
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

    /// A layer with one rule and no headers decides on the plain path when the rule is on
    /// every route keyed globally or by peer (else on the general one); with a second rule
    /// that never applies, the same rule goes through the general path. Both must answer
    /// every request sequence with the same statuses, `retry-after` and counters.
    #[test]
    fn the_plain_path_decides_as_the_general_path(
        key in 0u8..4,
        on_route: bool,
        post_only: bool,
        algorithm in proptest::prop_oneof![
            proptest::strategy::Just(Algorithm::SlidingWindow),
            proptest::strategy::Just(Algorithm::FixedWindow),
            proptest::strategy::Just(Algorithm::Gcra),
        ],
        limit in 1u64..5,
        window_ms in 500u64..3_000,
        fixed_cost in proptest::option::of(1u64..3),
        skip_anonymous: bool,
        trust_proxies: bool,
        arrivals in proptest::collection::vec(arrival(), 1..40),
    ) {
        let key = match key {
            0 => KeySource::Global,
            1 => KeySource::PeerIp,
            2 => KeySource::Header(http::HeaderName::from_static("x-user-id")),
            _ => KeySource::ApiKey,
        };
        let mut rule = Rule::new("r", Quota::new(limit, Duration::from_millis(window_ms)))
            .key(key)
            .algorithm(algorithm)
            .skip_anonymous(skip_anonymous)
            .cost(match fixed_cost {
                Some(c) => Cost::Fixed(c),
                None => Cost::Extension { default: 1 },
            });
        if on_route {
            rule = rule.route("/v1/messages".parse().unwrap());
        }
        if post_only {
            rule = rule.method(http::Method::POST);
        }
        let proxies = if trust_proxies {
            "10.0.0.0/8".parse().unwrap()
        } else {
            TrustedProxies::none()
        };
        let build = |extra: Option<Rule>| {
            let mut b = RateLimitLayer::builder()
                .rule(rule.clone())
                .draft_headers(false)
                .trusted_proxies(proxies.clone());
            if let Some(extra) = extra {
                b = b.rule(extra);
            }
            b.build().unwrap()
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        runtime.block_on(async {
            let single = build(None);
            let general = build(Some(
                Rule::new("never", Quota::per_second(1))
                    .method(http::Method::PATCH)
                    .route("/never".parse().unwrap()),
            ));
            let (mut a, mut b) = (service(&single), service(&general));
            for arrival in &arrivals {
                tokio::time::advance(Duration::from_millis(arrival.after_ms)).await;
                let ra = send(&mut a, arrival_request(arrival)).await;
                let rb = send(&mut b, arrival_request(arrival)).await;
                proptest::prop_assert_eq!(ra.status(), rb.status(), "{:?}", arrival);
                proptest::prop_assert_eq!(
                    ra.headers().get("retry-after"),
                    rb.headers().get("retry-after"),
                    "{:?}", arrival
                );
                proptest::prop_assert_eq!(ra.headers().len(), rb.headers().len());
            }
            let (ca, cb) = (&single.limiter().counters()[0], &general.limiter().counters()[0]);
            proptest::prop_assert_eq!(ca, cb);
            Ok(())
        })?;
    }
}

/// A header value that is not visible ASCII (`josé`, or raw bytes) is still the client's
/// own key: it neither joins the shared `anonymous` bucket nor, with `skip_anonymous`,
/// escapes the rule.
#[tokio::test(start_paused = true)]
async fn non_ascii_header_values_are_keys_of_their_own() {
    let name = http::HeaderName::from_static("x-user");
    let layer = RateLimitLayer::new([Rule::new("by-user", Quota::per_minute(1))
        .key(KeySource::Header(name.clone()))
        .skip_anonymous(true)])
    .unwrap();
    let mut svc = service(&layer);
    let with = |value: &[u8]| {
        let mut req = Request::get("/").body(()).unwrap();
        req.headers_mut()
            .insert(&name, http::HeaderValue::from_bytes(value).unwrap());
        req
    };
    for value in ["josé".as_bytes(), b"\xff\xfe-raw", "zoë".as_bytes()] {
        assert_eq!(send(&mut svc, with(value)).await.status(), 200, "{value:?}");
        assert_eq!(
            send(&mut svc, with(value)).await.status(),
            429,
            "{value:?}: the second request in the minute is refused"
        );
    }
    assert_eq!(layer.limiter().counters()[0].no_key, 0);
}

/// A store whose first settlement fails, as a network store's can.
#[derive(Clone)]
struct FlakySettle(MemoryStore, std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Store for FlakySettle {
    type CheckFuture = <MemoryStore as Store>::CheckFuture;
    fn check(&self, items: &[store::CheckItem<'_>]) -> Self::CheckFuture {
        self.0.check(items)
    }
    fn settle(&self, s: &[store::Settlement<'_>]) -> store::BoxFuture<Result<(), StoreError>> {
        if self.1.swap(false, std::sync::atomic::Ordering::SeqCst) {
            return Box::pin(async { Err(StoreError::new("connection reset")) });
        }
        self.0.settle(s)
    }
    peek_and_reset_in_memory!();
}

/// A settlement the store failed to apply is not spent: settling again applies it, so
/// the tokens a completion used are not lost to one failed round trip.
#[tokio::test(start_paused = true)]
async fn a_settlement_that_failed_can_be_retried() {
    let fail_next = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let layer = RateLimitLayer::builder()
        .rule(
            Rule::new("tpm", Quota::per_minute(1000))
                .key(KeySource::ApiKey)
                .cost(Cost::Settled { estimate: 100 }),
        )
        .store(FlakySettle(MemoryStore::new(), fail_next))
        .build()
        .unwrap();
    let admin = layer.limiter();
    let svc = layer.layer(service_fn(|req: Request<()>| async move {
        let reservation = req.extensions().get::<Reservation>().unwrap();
        assert!(reservation.settle(700).await.is_err(), "the store failed");
        reservation.settle(700).await.unwrap();
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
    }));
    assert_eq!(svc.oneshot(post("/", "sk-a")).await.unwrap().status(), 200);
    let status = admin.peek("tpm", &RateKey::api_key("sk-a")).await.unwrap();
    assert_eq!(status.remaining, 300, "700 spent, not the estimate of 100");
}

/// Routers such as axum's match the raw path segment by segment and do not resolve `..`:
/// `/v1/messages/%2e%2e` reaches a `/v1/messages/{*rest}` handler. A rule on
/// `/v1/messages/*` must count it too, not only the resolved `/v1`.
#[tokio::test(start_paused = true)]
async fn dot_dot_segments_do_not_step_out_of_a_rule() {
    for route in ["/v1/messages/*", "/v1/messages/{*rest}"] {
        let layer = RateLimitLayer::new([Rule::new("chat", Quota::per_minute(1))
            .post(route)
            .key(KeySource::ApiKey)])
        .unwrap();
        let mut svc = service(&layer);
        assert_eq!(
            send(&mut svc, post("/v1/messages/x", "sk-a"))
                .await
                .status(),
            200
        );
        for path in [
            "/v1/messages/..",
            "/v1/messages/%2e%2e",
            "/v1/messages/%2E./x/..",
        ] {
            assert_eq!(
                send(&mut svc, post(path, "sk-a")).await.status(),
                429,
                "{route}: {path} skipped the rule"
            );
        }
    }
    // the resolved form still matches, as before
    let r: Route = "/v1/messages".parse().unwrap();
    assert!(r.matches("/v1/x/../messages"));
    assert!(!r.matches("/v1/messages/.."));
}

/// 1,000 concurrent requests on a multi-threaded runtime against a limit of 100: exactly
/// 100 pass, on the plain path and the general one, with each algorithm.
#[test]
fn a_limit_is_exact_under_concurrency_on_every_path() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .build()
        .unwrap();
    for algorithm in [
        Algorithm::Gcra,
        Algorithm::SlidingWindow,
        Algorithm::FixedWindow,
    ] {
        for (headers, key) in [
            (false, KeySource::Global),
            (true, KeySource::Global),
            (false, KeySource::PeerIp),
            (true, KeySource::PeerIp),
        ] {
            let layer = RateLimitLayer::builder()
                .rule(
                    Rule::new("r", Quota::per_day(100))
                        .key(key.clone())
                        .algorithm(algorithm),
                )
                .draft_headers(headers)
                .build()
                .unwrap();
            assert_eq!(layer.is_plain(), !headers);
            let svc = layer.layer(service_fn(ok));
            let passed = runtime.block_on(async {
                let tasks: Vec<_> = (0..1_000)
                    .map(|_| {
                        let svc = svc.clone();
                        tokio::spawn(async move {
                            let mut req = Request::new(());
                            req.extensions_mut()
                                .insert("198.51.100.7:4000".parse::<SocketAddr>().unwrap());
                            svc.oneshot(req).await.unwrap().status()
                        })
                    })
                    .collect();
                let mut passed = 0;
                for t in tasks {
                    if t.await.unwrap() == StatusCode::OK {
                        passed += 1;
                    }
                }
                passed
            });
            let what = format!("{algorithm:?}, headers {headers}, {key:?}");
            assert_eq!(passed, 100, "{what}");
            let c = &layer.limiter().counters()[0];
            assert_eq!((c.allowed, c.limited), (100, 900), "{what}");
        }
    }
}
