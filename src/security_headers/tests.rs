use std::convert::Infallible;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderMap, HeaderValue, Request, Response};
use proptest::strategy::Strategy as _;
use tower::{Layer, Service, ServiceExt, service_fn};

use super::*;
use crate::config::{Env, Environment};

/// Calls a layer over a handler that sets `handler_headers`, for `req`.
async fn call_with(
    layer: &SecurityHeadersLayer,
    req: Request<()>,
    handler_headers: &[(&'static str, &'static str)],
) -> (HeaderMap, Option<CspNonce>) {
    let handler_headers = handler_headers.to_vec();
    let svc = layer.layer(service_fn(move |req: Request<()>| {
        let handler_headers = handler_headers.clone();
        async move {
            let mut res = Response::new(req.extensions().get::<CspNonce>().copied());
            for (name, value) in handler_headers {
                res.headers_mut()
                    .append(name, HeaderValue::from_static(value));
            }
            Ok::<_, Infallible>(res)
        }
    }));
    let res = svc.oneshot(req).await.unwrap();
    (res.headers().clone(), *res.body())
}

async fn headers(layer: &SecurityHeadersLayer) -> HeaderMap {
    call_with(layer, Request::new(()), &[]).await.0
}

fn text(headers: &HeaderMap, name: &str) -> Option<String> {
    let all: Vec<_> = headers.get_all(name).iter().collect();
    assert!(all.len() <= 1, "{name} sent {} times", all.len());
    all.first().map(|v| v.to_str().unwrap().to_owned())
}

const COMMON: [(&str, &str); 9] = [
    ("x-content-type-options", "nosniff"),
    ("x-frame-options", "DENY"),
    ("cross-origin-opener-policy", "same-origin"),
    ("cross-origin-resource-policy", "same-origin"),
    ("origin-agent-cluster", "?1"),
    ("x-dns-prefetch-control", "off"),
    ("x-permitted-cross-domain-policies", "none"),
    ("x-xss-protection", "0"),
    (
        "permissions-policy",
        "accelerometer=(), autoplay=(), bluetooth=(), camera=(), display-capture=(), \
         encrypted-media=(), fullscreen=(), geolocation=(), gyroscope=(), hid=(), \
         idle-detection=(), magnetometer=(), microphone=(), midi=(), payment=(), \
         picture-in-picture=(), publickey-credentials-get=(), screen-wake-lock=(), serial=(), \
         usb=(), web-share=(), xr-spatial-tracking=()",
    ),
];

#[tokio::test]
async fn api_preset_sends_every_default() {
    let h = headers(&SecurityHeadersLayer::api()).await;
    for (name, value) in COMMON {
        assert_eq!(text(&h, name).as_deref(), Some(value), "{name}");
    }
    assert_eq!(
        text(&h, "content-security-policy").as_deref(),
        Some("default-src 'none'; frame-ancestors 'none'")
    );
    assert_eq!(text(&h, "referrer-policy").as_deref(), Some("no-referrer"));
    for absent in [
        "strict-transport-security",
        "cache-control",
        "cross-origin-embedder-policy",
        "content-security-policy-report-only",
    ] {
        assert!(h.get(absent).is_none(), "{absent}");
    }
    assert_eq!(h.len(), 11);
}

#[tokio::test]
async fn web_preset_sends_every_default_with_a_nonce() {
    let (h, nonce) = call_with(&SecurityHeadersLayer::web(), Request::new(()), &[]).await;
    for (name, value) in COMMON {
        assert_eq!(text(&h, name).as_deref(), Some(value), "{name}");
    }
    assert_eq!(
        text(&h, "referrer-policy").as_deref(),
        Some("strict-origin-when-cross-origin")
    );
    let nonce = nonce.expect("nonce in the request extensions");
    let n = nonce.as_str();
    assert_eq!(
        text(&h, "content-security-policy").unwrap(),
        format!(
            "default-src 'self'; script-src 'self' 'nonce-{n}'; style-src 'self' 'nonce-{n}'; \
             img-src 'self' data:; object-src 'none'; base-uri 'self'; form-action 'self'; \
             frame-ancestors 'none'; upgrade-insecure-requests"
        )
    );
}

#[tokio::test]
async fn nonce_differs_per_request_and_matches_its_header() {
    let layer = SecurityHeadersLayer::web();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..50 {
        let (h, nonce) = call_with(&layer, Request::new(()), &[]).await;
        let nonce = nonce.unwrap();
        let csp = text(&h, "content-security-policy").unwrap();
        assert_eq!(csp.matches(&format!("'nonce-{nonce}'")).count(), 2, "{csp}");
        assert_eq!(nonce.as_str().len(), 24);
        assert!(seen.insert(nonce.as_str().to_owned()), "nonce repeated");
    }
    // Without a nonce policy, no nonce is put in the extensions.
    let (_, nonce) = call_with(&SecurityHeadersLayer::api(), Request::new(()), &[]).await;
    assert!(nonce.is_none());
}

#[tokio::test]
async fn report_only_policy_uses_its_own_header_with_nonce() {
    let csp = ContentSecurityPolicy::web()
        .to_builder()
        .report_only(true)
        .report_uri("/csp")
        .build()
        .unwrap();
    let layer = SecurityHeadersLayerBuilder::web().csp(csp).build().unwrap();
    let (h, nonce) = call_with(&layer, Request::new(()), &[]).await;
    assert!(h.get("content-security-policy").is_none());
    let value = text(&h, "content-security-policy-report-only").unwrap();
    assert!(value.contains(&format!("'nonce-{}'", nonce.unwrap())));
    assert!(value.ends_with("; report-uri /csp"), "{value}");
}

#[tokio::test]
async fn if_not_present_lets_the_handler_win() {
    let handler = [
        ("x-frame-options", "SAMEORIGIN"),
        ("content-security-policy", "default-src 'self'"),
        ("referrer-policy", "same-origin"),
    ];
    for layer in [SecurityHeadersLayer::api(), SecurityHeadersLayer::web()] {
        let (h, _) = call_with(&layer, Request::new(()), &handler).await;
        assert_eq!(text(&h, "x-frame-options").as_deref(), Some("SAMEORIGIN"));
        assert_eq!(
            text(&h, "content-security-policy").as_deref(),
            Some("default-src 'self'")
        );
        assert_eq!(text(&h, "referrer-policy").as_deref(), Some("same-origin"));
        assert_eq!(
            text(&h, "x-content-type-options").as_deref(),
            Some("nosniff")
        );
    }
}

#[tokio::test]
async fn override_replaces_the_handlers_values() {
    let handler = [
        ("x-frame-options", "SAMEORIGIN"),
        ("x-frame-options", "ALLOWALL"),
        ("content-security-policy", "default-src *"),
    ];
    for layer in [
        SecurityHeadersLayerBuilder::api()
            .mode(HeaderMode::Override)
            .build()
            .unwrap(),
        SecurityHeadersLayerBuilder::web()
            .mode(HeaderMode::Override)
            .build()
            .unwrap(),
    ] {
        let (h, _) = call_with(&layer, Request::new(()), &handler).await;
        assert_eq!(text(&h, "x-frame-options").as_deref(), Some("DENY"));
        assert_ne!(
            text(&h, "content-security-policy").as_deref(),
            Some("default-src *")
        );
    }
}

#[tokio::test]
async fn per_header_mode_beats_the_default_mode() {
    let layer = SecurityHeadersLayerBuilder::api()
        .mode(HeaderMode::Override)
        .header_mode(SecurityHeader::XFrameOptions, HeaderMode::IfNotPresent)
        .header_mode(SecurityHeader::XXssProtection, HeaderMode::Off)
        .header_mode(SecurityHeader::ContentSecurityPolicy, HeaderMode::Off)
        .build()
        .unwrap();
    let handler = [
        ("x-frame-options", "SAMEORIGIN"),
        ("referrer-policy", "unsafe-url"),
        ("x-xss-protection", "1"),
    ];
    let (h, _) = call_with(&layer, Request::new(()), &handler).await;
    assert_eq!(text(&h, "x-frame-options").as_deref(), Some("SAMEORIGIN"));
    assert_eq!(text(&h, "referrer-policy").as_deref(), Some("no-referrer"));
    // Off: the layer neither sends nor touches the header.
    assert_eq!(text(&h, "x-xss-protection").as_deref(), Some("1"));
    assert!(h.get("content-security-policy").is_none());
}

#[tokio::test]
async fn off_mode_sends_nothing() {
    let layer = SecurityHeadersLayerBuilder::web()
        .mode(HeaderMode::Off)
        .environment(Environment::Production)
        .remove_headers([""; 0])
        .build()
        .unwrap();
    let (h, nonce) = call_with(&layer, Request::new(()), &[("server", "x")]).await;
    assert_eq!(h.len(), 1);
    // No CSP is sent, so no nonce is made.
    assert!(nonce.is_none());
}

#[tokio::test]
async fn optional_headers_and_alternative_values() {
    let layer = SecurityHeadersLayerBuilder::api()
        .cache_control_no_store(true)
        .cross_origin_embedder_policy(Some(CrossOriginEmbedderPolicy::RequireCorp))
        .cross_origin_opener_policy(CrossOriginOpenerPolicy::SameOriginAllowPopups)
        .cross_origin_resource_policy(CrossOriginResourcePolicy::CrossOrigin)
        .xss_protection(XssProtection::Block)
        .frame_options(FrameOptions::SameOrigin)
        .referrer_policy(ReferrerPolicy::StrictOrigin)
        .permissions_policy(PermissionsPolicy::empty().allow_self("fullscreen"))
        .build()
        .unwrap();
    let h = headers(&layer).await;
    for (name, value) in [
        ("cache-control", "no-store"),
        ("cross-origin-embedder-policy", "require-corp"),
        ("cross-origin-opener-policy", "same-origin-allow-popups"),
        ("cross-origin-resource-policy", "cross-origin"),
        ("x-xss-protection", "1; mode=block"),
        ("x-frame-options", "SAMEORIGIN"),
        ("referrer-policy", "strict-origin"),
        ("permissions-policy", "fullscreen=(self)"),
    ] {
        assert_eq!(text(&h, name).as_deref(), Some(value), "{name}");
    }
    // An empty permissions policy is not sent.
    let layer = SecurityHeadersLayerBuilder::api()
        .permissions_policy(PermissionsPolicy::empty())
        .build()
        .unwrap();
    assert!(headers(&layer).await.get("permissions-policy").is_none());
}

#[tokio::test]
async fn removes_fingerprinting_headers() {
    let handler = [
        ("server", "nginx/1.25.3"),
        ("x-powered-by", "Express"),
        ("x-powered-by", "PHP/8.3"),
        ("x-aspnet-version", "4.0.30319"),
        ("x-request-id", "abc"),
    ];
    let (h, _) = call_with(&SecurityHeadersLayer::api(), Request::new(()), &handler).await;
    for gone in ["server", "x-powered-by", "x-aspnet-version"] {
        assert!(h.get(gone).is_none(), "{gone}");
    }
    assert_eq!(text(&h, "x-request-id").as_deref(), Some("abc"));

    let layer = SecurityHeadersLayerBuilder::api()
        .keep_header("Server")
        .remove_header("X-Request-Id")
        .build()
        .unwrap();
    let (h, _) = call_with(&layer, Request::new(()), &handler).await;
    assert_eq!(text(&h, "server").as_deref(), Some("nginx/1.25.3"));
    assert!(h.get("x-request-id").is_none());
    assert!(h.get("x-powered-by").is_none());

    let layer = SecurityHeadersLayerBuilder::api()
        .remove_headers(["x-request-id"])
        .build()
        .unwrap();
    let (h, _) = call_with(&layer, Request::new(()), &handler).await;
    assert!(h.get("server").is_some());
    assert!(h.get("x-request-id").is_none());
}

#[test]
fn removal_list_is_checked() {
    let err = SecurityHeadersLayerBuilder::api()
        .remove_header("bad header")
        .build()
        .unwrap_err();
    assert!(matches!(
        err,
        SecurityHeadersConfigError::InvalidHeaderName { .. }
    ));
    let err = SecurityHeadersLayerBuilder::api()
        .remove_header("X-Frame-Options")
        .build()
        .unwrap_err();
    assert!(matches!(
        err,
        SecurityHeadersConfigError::RemovesManagedHeader { .. }
    ));
    assert!(err.to_string().contains("mode"), "{err}");
}

fn https_req() -> Request<()> {
    Request::get("https://api.example.com/").body(()).unwrap()
}

fn forwarded(proto: &'static str) -> Request<()> {
    Request::get("/")
        .header("x-forwarded-proto", proto)
        .body(())
        .unwrap()
}

async fn hsts(layer: &SecurityHeadersLayer, req: Request<()>) -> Option<String> {
    text(
        &call_with(layer, req, &[]).await.0,
        "strict-transport-security",
    )
}

#[tokio::test]
async fn hsts_rules() {
    const DEFAULT: &str = "max-age=63072000; includeSubDomains";
    let dev = SecurityHeadersLayer::api();
    assert_eq!(hsts(&dev, Request::new(())).await, None);
    assert_eq!(hsts(&dev, https_req()).await.as_deref(), Some(DEFAULT));
    // X-Forwarded-Proto is ignored unless trusted.
    assert_eq!(hsts(&dev, forwarded("https")).await, None);

    let trusting = SecurityHeadersLayerBuilder::api()
        .trust_forwarded_proto(true)
        .build()
        .unwrap();
    assert_eq!(
        hsts(&trusting, forwarded("https")).await.as_deref(),
        Some(DEFAULT)
    );
    assert_eq!(
        hsts(&trusting, forwarded("HTTPS, http")).await.as_deref(),
        Some(DEFAULT)
    );
    assert_eq!(hsts(&trusting, forwarded("http")).await, None);
    assert_eq!(hsts(&trusting, forwarded("http, https")).await, None);
    let rfc7239 = |value: &'static str| {
        Request::get("/")
            .header("forwarded", value)
            .body(())
            .unwrap()
    };
    for (value, on) in [
        ("for=192.0.2.60;proto=https;by=203.0.113.43", true),
        ("For=\"[2001:db8::1]\";Proto=\"HTTPS\"", true),
        ("for=192.0.2.60;proto=http, for=10.0.0.1;proto=https", false),
        ("for=192.0.2.60", false),
    ] {
        assert_eq!(
            hsts(&trusting, rfc7239(value)).await.is_some(),
            on,
            "{value}"
        );
        assert_eq!(hsts(&dev, rfc7239(value)).await, None, "{value}");
    }

    let prod = SecurityHeadersLayerBuilder::api()
        .environment(Environment::Production)
        .build()
        .unwrap();
    assert_eq!(
        hsts(&prod, Request::new(())).await.as_deref(),
        Some(DEFAULT)
    );

    let never = SecurityHeadersLayerBuilder::api()
        .environment(Environment::Production)
        .hsts_when(HstsWhen::Never)
        .build()
        .unwrap();
    assert_eq!(hsts(&never, https_req()).await, None);

    let always = SecurityHeadersLayerBuilder::api()
        .hsts_when(HstsWhen::Always)
        .hsts(Hsts {
            max_age: Duration::from_secs(31_536_000),
            include_subdomains: true,
            preload: true,
        })
        .build()
        .unwrap();
    assert_eq!(
        hsts(&always, Request::new(())).await.as_deref(),
        Some("max-age=31536000; includeSubDomains; preload")
    );

    // HSTS follows its mode too.
    let off = SecurityHeadersLayerBuilder::api()
        .environment(Environment::Production)
        .header_mode(SecurityHeader::StrictTransportSecurity, HeaderMode::Off)
        .build()
        .unwrap();
    assert_eq!(hsts(&off, https_req()).await, None);
    let (h, _) = call_with(
        &prod,
        Request::new(()),
        &[("strict-transport-security", "max-age=60")],
    )
    .await;
    assert_eq!(
        text(&h, "strict-transport-security").as_deref(),
        Some("max-age=60")
    );
}

#[test]
fn hsts_preload_requirements_are_checked() {
    let err = SecurityHeadersLayerBuilder::api()
        .hsts(Hsts {
            max_age: Duration::from_secs(3600),
            include_subdomains: true,
            preload: true,
        })
        .build()
        .unwrap_err();
    assert!(
        matches!(err, SecurityHeadersConfigError::HstsPreload { .. }),
        "{err}"
    );
}

#[test]
fn builder_errors_are_typed() {
    let err = SecurityHeadersLayerBuilder::api()
        .header_mode_by_name("x-made-up", HeaderMode::Off)
        .build()
        .unwrap_err();
    assert!(matches!(
        err,
        SecurityHeadersConfigError::UnknownHeader { .. }
    ));
    let err = SecurityHeadersLayerBuilder::api()
        .permissions_policy(PermissionsPolicy::empty().allow_origins("camera", ["ftp://x"]))
        .build()
        .unwrap_err();
    assert!(matches!(
        err,
        SecurityHeadersConfigError::PermissionsPolicy { .. }
    ));
    let csp_err = ContentSecurityPolicy::builder()
        .script_src(["'self';"])
        .build()
        .unwrap_err();
    let err: SecurityHeadersConfigError = csp_err.clone().into();
    assert_eq!(err.to_string(), csp_err.to_string());
}

/// A service that is ready only on its second poll, to check `poll_ready` is forwarded.
#[derive(Clone)]
struct SlowReady {
    polls: usize,
}

impl Service<Request<()>> for SlowReady {
    type Response = Response<()>;
    type Error = &'static str;
    type Future = std::future::Ready<Result<Response<()>, &'static str>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.polls += 1;
        if self.polls < 2 {
            cx.waker().wake_by_ref();
            Poll::Pending
        } else {
            Poll::Ready(Ok(()))
        }
    }

    fn call(&mut self, req: Request<()>) -> Self::Future {
        if req.uri().path() == "/fail" {
            std::future::ready(Err("inner failed"))
        } else {
            std::future::ready(Ok(Response::new(())))
        }
    }
}

#[tokio::test]
async fn poll_ready_and_errors_pass_through() {
    let mut svc = SecurityHeadersLayer::api().layer(SlowReady { polls: 0 });
    let waker = std::task::Waker::noop();
    let mut cx = Context::from_waker(waker);
    assert!(svc.poll_ready(&mut cx).is_pending());
    assert!(svc.poll_ready(&mut cx).is_ready());
    assert_eq!(svc.get_ref().polls, 2);
    let res = svc.call(Request::new(())).await.unwrap();
    assert_eq!(res.headers()["x-content-type-options"], "nosniff");
    let err = svc
        .ready()
        .await
        .unwrap()
        .call(Request::get("/fail").body(()).unwrap())
        .await
        .unwrap_err();
    assert_eq!(err, "inner failed");
    svc.get_mut().polls = 0;
    assert_eq!(svc.into_inner().polls, 0);
}

#[test]
fn config_from_env_reads_every_variable() {
    let mut env = Env::from_pairs([
        ("PALISADE_ENV", "production"),
        ("PALISADE_SECURITY_HEADERS_PRESET", "web"),
        ("PALISADE_SECURITY_HEADERS_MODE", "override"),
        (
            "PALISADE_SECURITY_HEADERS_MODES",
            "x-frame-options=off, x-xss-protection=if-not-present",
        ),
        (
            "PALISADE_SECURITY_HEADERS_CSP",
            "default-src 'self'; img-src *",
        ),
        ("PALISADE_SECURITY_HEADERS_CSP_REPORT_ONLY", "true"),
        ("PALISADE_SECURITY_HEADERS_CSP_NONCE", "true"),
        ("PALISADE_SECURITY_HEADERS_CSP_REPORT_URI", "/csp"),
        ("PALISADE_SECURITY_HEADERS_CSP_REPORT_TO", "csp"),
        ("PALISADE_SECURITY_HEADERS_HSTS", "always"),
        ("PALISADE_SECURITY_HEADERS_HSTS_MAX_AGE", "365d"),
        ("PALISADE_SECURITY_HEADERS_HSTS_INCLUDE_SUBDOMAINS", "true"),
        ("PALISADE_SECURITY_HEADERS_HSTS_PRELOAD", "true"),
        ("PALISADE_SECURITY_HEADERS_TRUST_FORWARDED_PROTO", "true"),
        ("PALISADE_SECURITY_HEADERS_FRAME_OPTIONS", "SAMEORIGIN"),
        ("PALISADE_SECURITY_HEADERS_REFERRER_POLICY", "same-origin"),
        (
            "PALISADE_SECURITY_HEADERS_PERMISSIONS_POLICY",
            "camera=(), fullscreen=(self)",
        ),
        (
            "PALISADE_SECURITY_HEADERS_CROSS_ORIGIN_OPENER_POLICY",
            "unsafe-none",
        ),
        (
            "PALISADE_SECURITY_HEADERS_CROSS_ORIGIN_RESOURCE_POLICY",
            "same-site",
        ),
        (
            "PALISADE_SECURITY_HEADERS_CROSS_ORIGIN_EMBEDDER_POLICY",
            "credentialless",
        ),
        ("PALISADE_SECURITY_HEADERS_XSS_PROTECTION", "1; mode=block"),
        ("PALISADE_SECURITY_HEADERS_CACHE_CONTROL_NO_STORE", "true"),
        ("PALISADE_SECURITY_HEADERS_REMOVE_HEADERS", "server, via"),
    ]);
    let cfg = SecurityHeadersConfig::from_env(&mut env);
    env.finish().unwrap();
    assert_eq!(cfg.preset, Preset::Web);
    assert_eq!(cfg.mode, HeaderMode::Override);
    assert_eq!(cfg.modes["x-frame-options"], HeaderMode::Off);
    assert_eq!(cfg.environment, Environment::Production);
    assert_eq!(cfg.hsts_max_age, Duration::from_secs(365 * 86_400));
    assert_eq!(cfg.csp_nonce, Some(true));
    assert_eq!(cfg.referrer_policy, Some(ReferrerPolicy::SameOrigin));
    assert_eq!(
        cfg.cross_origin_embedder_policy,
        Some(CrossOriginEmbedderPolicy::Credentialless)
    );
    assert_eq!(
        cfg.remove_headers,
        Some(vec!["server".to_owned(), "via".to_owned()])
    );
    assert!(cfg.build().is_ok());

    let mut env = Env::from_pairs([("PALISADE_SECURITY_HEADERS_REMOVE_HEADERS", "none")]);
    assert_eq!(
        SecurityHeadersConfig::from_env(&mut env).remove_headers,
        Some(vec![])
    );
}

#[test]
fn config_from_env_reports_every_problem() {
    let mut env = Env::from_pairs([
        ("PALISADE_ENV", "staging"),
        ("PALISADE_SECURITY_HEADERS_PRESET", "spa"),
        ("PALISADE_SECURITY_HEADERS_MODES", "x-made-up=off"),
        ("PALISADE_SECURITY_HEADERS_CSP", "default-src self"),
        ("PALISADE_SECURITY_HEADERS_HSTS_MAX_AGE", "forever"),
        ("PALISADE_SECURITY_HEADERS_FRAME_OPTIONS", "ALLOWALL"),
        ("PALISADE_SECURITY_HEADERS_PERMISSIONS_POLICY", "camera"),
        ("PALISADE_SECURITY_HEADERS_CACHE_CONTROL_NO_STORE", "maybe"),
    ]);
    // Settings and this layer both read PALISADE_ENV; the problem is reported once.
    let _ = crate::config::Settings::from_env(&mut env);
    let _ = SecurityHeadersConfig::from_env(&mut env);
    let err = env.finish().unwrap_err();
    let names: Vec<&str> = err.problems().iter().map(|p| p.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "PALISADE_ENV",
            "PALISADE_SECURITY_HEADERS_MODES",
            "PALISADE_SECURITY_HEADERS_CSP",
            "PALISADE_SECURITY_HEADERS_PERMISSIONS_POLICY",
            "PALISADE_SECURITY_HEADERS_PRESET",
            "PALISADE_SECURITY_HEADERS_HSTS_MAX_AGE",
            "PALISADE_SECURITY_HEADERS_FRAME_OPTIONS",
            "PALISADE_SECURITY_HEADERS_CACHE_CONTROL_NO_STORE",
        ]
    );
    assert!(err.to_string().contains("must be quoted"), "{err}");
}

/// Mistakes that only the layer's build used to find (one at a time) are reported by
/// `from_env` together with every other problem.
#[test]
fn from_env_reports_build_time_problems_all_at_once() {
    let mut env = Env::from_pairs([
        (
            "PALISADE_SECURITY_HEADERS_CSP_REPORT_URI",
            "javascript:alert(1)",
        ),
        ("PALISADE_SECURITY_HEADERS_CSP_REPORT_TO", "csp endpoint"),
        (
            "PALISADE_SECURITY_HEADERS_REMOVE_HEADERS",
            "server, bad header, x-frame-options",
        ),
        ("PALISADE_SECURITY_HEADERS_HSTS_PRELOAD", "true"),
        ("PALISADE_SECURITY_HEADERS_HSTS_MAX_AGE", "30d"),
        ("PALISADE_SECURITY_HEADERS_FRAME_OPTIONS", "ALLOWALL"),
    ]);
    let _ = SecurityHeadersConfig::from_env(&mut env);
    let err = env.finish().unwrap_err();
    let mut names: Vec<&str> = err.problems().iter().map(|p| p.name.as_str()).collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "PALISADE_SECURITY_HEADERS_CSP_REPORT_TO",
            "PALISADE_SECURITY_HEADERS_CSP_REPORT_URI",
            "PALISADE_SECURITY_HEADERS_FRAME_OPTIONS",
            "PALISADE_SECURITY_HEADERS_HSTS_PRELOAD",
            "PALISADE_SECURITY_HEADERS_REMOVE_HEADERS",
            "PALISADE_SECURITY_HEADERS_REMOVE_HEADERS",
        ],
        "{err}"
    );
    let text = err.to_string();
    for expected in [
        "\"javascript:alert(1)\" is not an http(s) URL",
        "\"csp endpoint\" is not a valid group name",
        "\"bad header\" is not a valid header name",
        "x-frame-options is set by the security headers layer",
        "preload requires a max-age of at least one year",
    ] {
        assert!(text.contains(expected), "{expected:?} in {text}");
    }
}

#[test]
fn layer_from_env_lists_every_problem_or_builds() {
    let err = SecurityHeadersLayer::from_env_in(Env::from_pairs([
        ("PALISADE_SECURITY_HEADERS_CSP_REPORT_TO", "a b"),
        ("PALISADE_SECURITY_HEADERS_HSTS_PRELOAD", "true"),
        ("PALISADE_SECURITY_HEADERS_HSTS_INCLUDE_SUBDOMAINS", "false"),
    ]))
    .unwrap_err();
    assert_eq!(err.problems().len(), 2, "{err}");
    assert!(
        err.to_string()
            .contains("preload requires includeSubDomains"),
        "{err}"
    );

    let layer = SecurityHeadersLayer::from_env_in(Env::from_pairs([
        ("PALISADE_ENV", "production"),
        ("PALISADE_SECURITY_HEADERS_PRESET", "web"),
        ("PALISADE_SECURITY_HEADERS_CSP_REPORT_URI", "/csp"),
    ]));
    assert!(layer.is_ok());
}

#[tokio::test]
async fn service_builder_methods_add_the_presets() {
    use crate::ServiceBuilderExt;
    let ok = |_req: Request<()>| async { Ok::<_, Infallible>(Response::new(())) };
    let api = tower::ServiceBuilder::new()
        .security_headers_api()
        .service(service_fn(ok));
    let res = api.oneshot(Request::new(())).await.unwrap();
    assert_eq!(res.headers(), &headers(&SecurityHeadersLayer::api()).await);
    let web = tower::ServiceBuilder::new()
        .security_headers_web()
        .service(service_fn(|req: Request<()>| async move {
            assert!(req.extensions().get::<CspNonce>().is_some());
            Ok::<_, Infallible>(Response::new(()))
        }));
    let res = web.oneshot(Request::new(())).await.unwrap();
    let csp = res.headers()["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("'nonce-"), "{csp}");
}

#[tokio::test]
async fn config_files_build_the_layer() {
    let cfg: SecurityHeadersConfig = toml::from_str(
        r#"
        preset = "api"
        cache_control_no_store = true
        csp = "default-src 'none'; frame-ancestors 'none'; report-uri /csp"
        csp_report_only = true
        [modes]
        x-xss-protection = "off"
        "#,
    )
    .unwrap();
    let layer = SecurityHeadersLayer::from_config(cfg.clone()).unwrap();
    let h = headers(&layer).await;
    assert_eq!(text(&h, "cache-control").as_deref(), Some("no-store"));
    assert_eq!(
        text(&h, "content-security-policy-report-only").as_deref(),
        Some("default-src 'none'; frame-ancestors 'none'; report-uri /csp")
    );
    assert!(h.get("x-xss-protection").is_none());

    // Serialize and read back.
    let back: SecurityHeadersConfig = toml::from_str(&toml::to_string(&cfg).unwrap()).unwrap();
    assert_eq!(back, cfg);

    // csp = "off" sends none; mistakes in files are typed errors at build time.
    let off: SecurityHeadersConfig = toml::from_str(r#"csp = "off""#).unwrap();
    assert!(
        headers(&off.build().unwrap())
            .await
            .get("content-security-policy")
            .is_none()
    );
    let bad: SecurityHeadersConfig = toml::from_str(r#"csp = "script-src 'self', x""#).unwrap();
    assert!(matches!(
        bad.build().unwrap_err(),
        SecurityHeadersConfigError::Csp(CspError::ForbiddenCharacter { .. })
    ));
    let bad: SecurityHeadersConfig =
        toml::from_str("hsts_preload = true\nhsts_max_age = \"30d\"").unwrap();
    assert!(matches!(
        bad.build().unwrap_err(),
        SecurityHeadersConfigError::HstsPreload { .. }
    ));
    assert!(toml::from_str::<SecurityHeadersConfig>("unknown_field = 1").is_err());
    // The default configuration is the api() preset.
    let default = SecurityHeadersConfig::default().build().unwrap();
    assert_eq!(
        headers(&default).await,
        headers(&SecurityHeadersLayer::api()).await
    );
}

/// The two ways of applying a policy (merging small maps into the prebuilt one, editing
/// large maps in place) give the same headers, value for value, for every combination of
/// handler headers and modes.
#[test]
fn merge_and_in_place_agree() {
    let candidates: [(&str, &str); 8] = [
        ("x-frame-options", "SAMEORIGIN"),
        ("x-frame-options", "ALLOW-FROM https://a.example"),
        ("server", "nginx"),
        ("strict-transport-security", "max-age=60"),
        ("content-security-policy", "default-src 'self'"),
        ("x-request-id", "1"),
        ("x-request-id", "2"),
        ("content-type", "application/json"),
    ];
    let builders = [
        SecurityHeadersLayerBuilder::api(),
        SecurityHeadersLayerBuilder::api().mode(HeaderMode::Override),
        SecurityHeadersLayerBuilder::api()
            .header_mode(SecurityHeader::XFrameOptions, HeaderMode::Off)
            .header_mode(
                SecurityHeader::StrictTransportSecurity,
                HeaderMode::Override,
            ),
        SecurityHeadersLayerBuilder::web().cache_control_no_store(true),
    ];
    let sorted = |h: &HeaderMap| {
        let mut v: Vec<(String, Vec<String>)> = h
            .keys()
            .map(|k| {
                let values = h
                    .get_all(k)
                    .iter()
                    .map(|v| v.to_str().unwrap().to_owned())
                    .collect();
                (k.as_str().to_owned(), values)
            })
            .collect();
        v.sort();
        v
    };
    for builder in builders {
        let policy = builder.compile().unwrap();
        for mask in 0u32..(1 << candidates.len()) {
            let mut handler = HeaderMap::new();
            for (i, (name, value)) in candidates.iter().enumerate() {
                if mask & (1 << i) != 0 {
                    handler.append(*name, HeaderValue::from_static(value));
                }
            }
            for hsts in [false, true] {
                let mut merged = handler.clone();
                policy.apply_by_merge(&mut merged, hsts);
                let mut in_place = handler.clone();
                policy.apply_in_place(&mut in_place, hsts);
                assert_eq!(
                    sorted(&merged),
                    sorted(&in_place),
                    "mask {mask:b} hsts {hsts}"
                );
                assert!(merged.get("server").is_none());
            }
        }
    }
}

/// A merged response lists the layer's headers first, then the handler's in their own
/// order, each header's values together and in order (what goes on the wire).
#[test]
fn merged_headers_keep_their_order() {
    let policy = SecurityHeadersLayerBuilder::api().compile().unwrap();
    let mut handler = HeaderMap::new();
    for (name, value) in [
        ("content-type", "application/json"),
        ("ratelimit-policy", "a"),
        ("x-frame-options", "SAMEORIGIN"),
        ("server", "nginx"),
        ("ratelimit", "b"),
        ("ratelimit-policy", "c"),
        ("ratelimit", "d"),
        ("x-frame-options", "ALLOW-FROM https://a.example"),
    ] {
        handler.append(name, HeaderValue::from_static(value));
    }
    policy.apply_by_merge(&mut handler, false);
    let got: Vec<(String, String)> = handler
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_owned()))
        .collect();
    let mut want: Vec<(String, String)> = Vec::new();
    for f in policy.fixed.iter() {
        want.push((f.name.to_string(), f.value.to_str().unwrap().to_owned()));
        if f.name == "x-frame-options" {
            // The handler's values take the place of the layer's (if-not-present).
            want.pop();
            want.push(("x-frame-options".into(), "SAMEORIGIN".into()));
            want.push((
                "x-frame-options".into(),
                "ALLOW-FROM https://a.example".into(),
            ));
        }
    }
    for (n, v) in [
        ("content-type", "application/json"),
        ("ratelimit-policy", "a"),
        ("ratelimit-policy", "c"),
        ("ratelimit", "b"),
        ("ratelimit", "d"),
    ] {
        want.push((n.into(), v.into()));
    }
    assert_eq!(got, want);
}

proptest::proptest! {
    /// The quick "not one of ours" test of the merge never passes over a name the policy
    /// removes or sets, whatever the names.
    #[test]
    fn the_name_filter_holds_every_name_added(
        added in proptest::collection::vec("[a-z0-9-]{1,40}", 1..24),
        other in "[a-z0-9-]{1,40}",
    ) {
        let mut filter = super::builder::NameFilter::default();
        let names: Vec<http::HeaderName> = added
            .iter()
            .map(|n| http::HeaderName::from_bytes(n.as_bytes()).unwrap())
            .collect();
        for name in &names {
            filter.add(name);
        }
        for name in &names {
            proptest::prop_assert!(filter.may_hold(name));
        }
        let other = http::HeaderName::from_bytes(other.as_bytes()).unwrap();
        if !filter.may_hold(&other) {
            proptest::prop_assert!(!names.contains(&other));
        }
    }
}

#[test]
fn the_name_filter_passes_every_managed_and_removed_header() {
    for builder in [
        SecurityHeadersLayerBuilder::api(),
        SecurityHeadersLayerBuilder::web().cache_control_no_store(true),
    ] {
        let policy = builder.compile().unwrap();
        let managed = policy
            .fixed
            .iter()
            .chain(&policy.hsts)
            .map(|f| &f.name)
            .chain(policy.remove.iter());
        for name in managed {
            assert!(policy.managed.may_hold(name), "{name}");
        }
        assert_eq!(
            policy.remove.len(),
            super::builder::DEFAULT_REMOVED_HEADERS.len()
        );
    }
}

#[tokio::test]
async fn large_responses_take_the_in_place_path() {
    let names: Vec<String> = (0..40).map(|i| format!("x-custom-{i}")).collect();
    let names2 = names.clone();
    let svc = SecurityHeadersLayer::api().layer(service_fn(move |_req: Request<()>| {
        let names = names2.clone();
        async move {
            let mut res = Response::new(());
            for name in &names {
                res.headers_mut().insert(
                    http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                    HeaderValue::from_static("v"),
                );
            }
            res.headers_mut()
                .insert("server", HeaderValue::from_static("x"));
            res.headers_mut()
                .insert("x-frame-options", HeaderValue::from_static("SAMEORIGIN"));
            Ok::<_, Infallible>(res)
        }
    }));
    let res = svc.oneshot(Request::new(())).await.unwrap();
    let h = res.headers();
    assert_eq!(h.len(), 40 + 11);
    assert!(h.get("server").is_none());
    assert_eq!(h["x-frame-options"], "SAMEORIGIN");
    assert_eq!(h["x-content-type-options"], "nosniff");
    for name in &names {
        assert_eq!(h[name.as_str()], "v");
    }
}

#[test]
fn preset_values_match_their_static_copies() {
    assert_eq!(
        ContentSecurityPolicy::api().to_string(),
        super::builder::STATIC_VALUES[0]
    );
    assert_eq!(
        PermissionsPolicy::deny_all().to_string(),
        super::builder::STATIC_VALUES[1]
    );
}

#[test]
fn layer_service_and_future_are_send_and_sync() {
    fn send_sync<T: Send + Sync + 'static>() {}
    fn send<T: Send>(_: &T) {}
    send_sync::<SecurityHeadersLayer>();
    send_sync::<
        SecurityHeaders<tower::util::BoxCloneSyncService<Request<()>, Response<()>, Infallible>>,
    >();
    send_sync::<CspNonce>();
    let mut svc = SecurityHeadersLayer::web().layer(service_fn(|_req: Request<()>| async {
        Ok::<_, Infallible>(Response::new(()))
    }));
    let fut = svc.call(Request::new(()));
    send(&fut);
    assert!(format!("{fut:?}").starts_with("ResponseFuture"));
}

/// Names a handler may send: every header the layer sets (and the report-only CSP), every
/// fingerprinting header, and ordinary ones, some with several values.
const HANDLER_NAMES: [&str; 30] = [
    "content-security-policy",
    "content-security-policy-report-only",
    "strict-transport-security",
    "x-content-type-options",
    "x-frame-options",
    "referrer-policy",
    "permissions-policy",
    "cross-origin-opener-policy",
    "cross-origin-resource-policy",
    "cross-origin-embedder-policy",
    "origin-agent-cluster",
    "x-dns-prefetch-control",
    "x-permitted-cross-domain-policies",
    "x-xss-protection",
    "cache-control",
    "server",
    "x-powered-by",
    "x-aspnet-version",
    "x-aspnetmvc-version",
    "x-generator",
    "x-runtime",
    "x-backend-server",
    "x-version",
    "set-cookie",
    "x-internal",
    "content-type",
    "content-length",
    "vary",
    "link",
    "x-request-id",
];

/// A policy from generated choices: modes (default and per header), CSP (none, fixed,
/// nonce, report-only), HSTS timing, optional headers and lists of headers to remove.
fn generated_policy(
    default_mode: usize,
    modes: &[Option<usize>],
    csp: usize,
    hsts_when: usize,
    optional: (bool, bool),
    remove: usize,
) -> super::builder::Policy {
    const MODES: [HeaderMode; 3] = [
        HeaderMode::Override,
        HeaderMode::IfNotPresent,
        HeaderMode::Off,
    ];
    let mut b = SecurityHeadersLayerBuilder::api().mode(MODES[default_mode]);
    for (header, mode) in SecurityHeader::ALL.into_iter().zip(modes) {
        if let Some(mode) = mode {
            b = b.header_mode(header, MODES[*mode]);
        }
    }
    b = match csp {
        0 => b.no_csp(),
        1 => b,
        2 => b.csp(ContentSecurityPolicy::web()),
        3 => b.csp(
            ContentSecurityPolicy::web()
                .to_builder()
                .report_only(true)
                .build()
                .unwrap(),
        ),
        _ => b.csp(
            ContentSecurityPolicy::api()
                .to_builder()
                .report_only(true)
                .build()
                .unwrap(),
        ),
    };
    b = b.hsts_when([HstsWhen::Auto, HstsWhen::Always, HstsWhen::Never][hsts_when]);
    b = b.cache_control_no_store(optional.0);
    if optional.1 {
        b = b.cross_origin_embedder_policy(Some(CrossOriginEmbedderPolicy::RequireCorp));
    }
    b = match remove {
        0 => b,
        1 => b.remove_headers(Vec::<String>::new()),
        2 => b.remove_header("Set-Cookie").remove_header(" X-Internal "),
        _ => b.keep_header("SERVER").remove_header("x-internal"),
    };
    b.compile().unwrap()
}

/// A header map as sorted names, each with its values in order.
fn by_name(h: &HeaderMap) -> Vec<(String, Vec<String>)> {
    let mut v: Vec<(String, Vec<String>)> = h
        .keys()
        .map(|k| {
            let values = h
                .get_all(k)
                .iter()
                .map(|v| v.to_str().unwrap().to_owned())
                .collect();
            (k.as_str().to_owned(), values)
        })
        .collect();
    v.sort();
    v
}

/// What the policy's rules say a response with `handler`'s headers gets, written from the
/// rules rather than from either path: removed names go, an overriding header has the
/// layer's value alone, an if-not-present one the handler's values when it sent any, and
/// every other header of the handler stays as it was.
fn by_the_rules(
    policy: &super::builder::Policy,
    handler: &HeaderMap,
    hsts: bool,
) -> Vec<(String, Vec<String>)> {
    let mut out = by_name(handler);
    out.retain(|(name, _)| !policy.remove.iter().any(|r| r.as_str() == name));
    let ours = policy
        .fixed
        .iter()
        .chain(policy.hsts.iter().filter(|_| hsts));
    for f in ours {
        let layer = vec![f.value.to_str().unwrap().to_owned()];
        match out.iter_mut().find(|(name, _)| name == f.name.as_str()) {
            Some((_, values)) if f.overwrite => *values = layer,
            Some(_) => {}
            None => out.push((f.name.as_str().to_owned(), layer)),
        }
    }
    out.sort();
    out
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

    /// For every policy and every set of handler headers (any count, names repeated, the
    /// layer's own headers among them), the merge and the in-place edit give the headers
    /// the rules say, value for value.
    #[test]
    fn merge_and_in_place_follow_the_rules_for_generated_policies_and_headers(
        default_mode in 0usize..3,
        modes in proptest::collection::vec(proptest::option::of(0usize..3), 14),
        csp in 0usize..5,
        hsts_when in 0usize..3,
        optional in (proptest::bool::ANY, proptest::bool::ANY),
        remove in 0usize..4,
        handler in proptest::collection::vec(
            (
                proptest::prop_oneof![
                    3 => proptest::sample::select(&HANDLER_NAMES[..]).prop_map(str::to_owned),
                    1 => "[a-z][a-z0-9-]{0,20}",
                ],
                0u8..4,
            ),
            0..24,
        ),
    ) {
        let policy = generated_policy(default_mode, &modes, csp, hsts_when, optional, remove);
        let mut headers = HeaderMap::new();
        for (name, value) in &handler {
            headers.append(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(&format!("v{value}")).unwrap(),
            );
        }
        for hsts in [false, true] {
            let want = by_the_rules(&policy, &headers, hsts);
            let mut merged = headers.clone();
            policy.apply_by_merge(&mut merged, hsts);
            proptest::prop_assert_eq!(by_name(&merged), want.clone(), "merge, hsts {}", hsts);
            let mut in_place = headers.clone();
            policy.apply_in_place(&mut in_place, hsts);
            proptest::prop_assert_eq!(by_name(&in_place), want.clone(), "in place, hsts {}", hsts);
            // The whole of it, whichever path the count picks, with the nonce CSP last.
            let csp = policy.csp_template.as_ref().map(|t| t.render("bm9uY2U"));
            let mut want = want;
            if let (Some(t), Some(value)) = (&policy.csp_template, &csp) {
                let ours = vec![value.to_str().unwrap().to_owned()];
                match want.iter_mut().find(|(name, _)| name == t.name.as_str()) {
                    Some((_, values)) if t.overwrite => *values = ours,
                    Some(_) => {}
                    None => want.push((t.name.as_str().to_owned(), ours)),
                }
                want.sort();
            }
            let mut applied = headers.clone();
            policy.apply(&mut applied, hsts, csp);
            proptest::prop_assert_eq!(by_name(&applied), want, "{} values, hsts {}", headers.len(), hsts);
        }
    }
}

/// A response map holds at most 24,576 names. One that is full (or nearly) cannot take
/// the layer's headers: the layer replaces what it overrides, adds what fits, and never
/// panics.
#[test]
fn a_response_at_the_header_maps_size_limit_does_not_panic() {
    let policy = SecurityHeadersLayerBuilder::api()
        .header_mode(SecurityHeader::XFrameOptions, HeaderMode::Override)
        .compile()
        .unwrap();
    for missing in [0, 1, 5, 20] {
        let mut headers = HeaderMap::new();
        headers.append("x-frame-options", HeaderValue::from_static("SAMEORIGIN"));
        headers.append("x-frame-options", HeaderValue::from_static("ALLOW-FROM x"));
        headers.append("server", HeaderValue::from_static("nginx"));
        for i in 0.. {
            let name = http::HeaderName::from_bytes(format!("x-h-{i}").as_bytes()).unwrap();
            if headers
                .try_insert(name, HeaderValue::from_static("v"))
                .is_err()
            {
                break;
            }
        }
        let full = headers.keys_len();
        for i in 0..missing {
            headers.remove(format!("x-h-{i}"));
        }
        policy.apply(&mut headers, true, None);
        assert!(headers.get("server").is_none());
        let xfo: Vec<_> = headers.get_all("x-frame-options").iter().collect();
        assert_eq!(xfo, ["DENY"]);
        assert!(headers.keys_len() <= full);
        for i in missing..100 {
            assert_eq!(headers[format!("x-h-{i}").as_str()], "v");
        }
    }
}

/// Through the layer, responses of 8, 9, 16 and 17 header values (either side of the
/// switch from the merge to the in-place edit) get the same headers: the nonce CSP that
/// matches the request's nonce, HSTS over https only, fingerprinting headers removed
/// (every value of them), the handler's repeated headers kept in order.
#[tokio::test]
async fn responses_either_side_of_the_in_place_switch_get_the_same_headers() {
    const HANDLER: [(&str, &str); 17] = [
        ("set-cookie", "a=1"),
        ("server", "nginx"),
        ("set-cookie", "b=2"),
        ("x-frame-options", "SAMEORIGIN"),
        ("content-type", "text/html"),
        ("server", "envoy"),
        ("set-cookie", "c=3"),
        ("x-powered-by", "php"),
        ("vary", "origin"),
        ("x-frame-options", "ALLOW-FROM https://a.example"),
        ("link", "</a>; rel=preload"),
        ("x-request-id", "r1"),
        ("x-runtime", "12ms"),
        ("content-language", "en"),
        ("etag", "\"1\""),
        ("x-custom-1", "1"),
        ("x-custom-2", "2"),
    ];
    let layer = SecurityHeadersLayer::web();
    for n in [8, 9, 16, 17] {
        for req in [Request::new(()), https_req()] {
            let over_https = req.uri().scheme_str() == Some("https");
            let (h, nonce) = call_with(&layer, req, &HANDLER[..n]).await;
            let nonce = nonce.unwrap();
            let csp = text(&h, "content-security-policy").unwrap();
            assert_eq!(csp.matches(&format!("'nonce-{nonce}'")).count(), 2, "{n}");
            assert_eq!(
                h.contains_key("strict-transport-security"),
                over_https,
                "{n}"
            );
            for gone in ["server", "x-powered-by", "x-runtime"] {
                assert!(h.get(gone).is_none(), "{gone} with {n}");
            }
            let cookies: Vec<_> = h.get_all("set-cookie").iter().collect();
            let sent: Vec<_> = HANDLER[..n]
                .iter()
                .filter(|(name, _)| *name == "set-cookie")
                .map(|(_, value)| *value)
                .collect();
            assert_eq!(cookies, sent, "{n}");
            let xfo: Vec<_> = h.get_all("x-frame-options").iter().collect();
            assert_eq!(
                xfo,
                ["SAMEORIGIN", "ALLOW-FROM https://a.example"][..xfo.len()]
            );
            assert_eq!(xfo.len(), if n >= 10 { 2 } else { 1 }, "{n}");
            assert_eq!(h["x-content-type-options"], "nosniff");
            for (name, _) in &HANDLER[..n] {
                let removed = ["server", "x-powered-by", "x-runtime"].contains(name);
                assert_eq!(h.contains_key(*name), !removed, "{name} with {n}");
            }
        }
    }
}
