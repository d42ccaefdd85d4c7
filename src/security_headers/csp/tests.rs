//! Tests of the Content-Security-Policy types.

use super::source::KEYWORDS;
use super::*;

fn err(b: CspBuilder) -> CspError {
    b.build().unwrap_err()
}

#[test]
fn presets_render() {
    assert_eq!(
        ContentSecurityPolicy::api().to_string(),
        "default-src 'none'; frame-ancestors 'none'"
    );
    assert_eq!(
        ContentSecurityPolicy::web().to_string(),
        "default-src 'self'; script-src 'self' 'nonce-{nonce}'; style-src 'self' 'nonce-{nonce}'; \
         img-src 'self' data:; object-src 'none'; base-uri 'self'; form-action 'self'; \
         frame-ancestors 'none'; upgrade-insecure-requests"
    );
    assert_eq!(ContentSecurityPolicy::web().template().len(), 3);
    assert_eq!(ContentSecurityPolicy::api().template().len(), 1);
}

#[test]
fn builder_orders_and_replaces() {
    let csp = ContentSecurityPolicy::builder()
        .frame_ancestors(["'self'"])
        .default_src(["'self'"])
        .script_src([
            "'self'",
            "https://cdn.example.com",
            "'sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU='",
        ])
        .img_src(["*"])
        .default_src([Source::NONE])
        .report_uri("/csp-reports")
        .report_to("csp-endpoint")
        .build()
        .unwrap();
    assert_eq!(
        csp.to_string(),
        "default-src 'none'; script-src 'self' https://cdn.example.com \
         'sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU='; img-src *; \
         frame-ancestors 'self'; report-uri /csp-reports; report-to csp-endpoint"
    );
    assert!(!csp.is_report_only());
    assert_eq!(csp.header_name(), "content-security-policy");
    let ro = csp.to_builder().report_only(true).build().unwrap();
    assert_eq!(ro.header_name(), "content-security-policy-report-only");
    let fewer = ro.to_builder().remove(Directive::ImgSrc).build().unwrap();
    assert!(fewer.sources(Directive::ImgSrc).is_none());
}

#[test]
fn rejects_separators_and_control_characters() {
    for bad in [
        "'self';",
        "a.com,b.com",
        "https://a.com script-src",
        "a\u{7}",
        "ünï.com",
    ] {
        let e = err(ContentSecurityPolicy::builder().script_src([bad]));
        assert!(
            matches!(e, CspError::ForbiddenCharacter { .. }),
            "{bad}: {e}"
        );
    }
}

#[test]
fn rejects_unquoted_and_unknown_keywords() {
    for bad in ["self", "none", "unsafe-inline", "Strict-Dynamic"] {
        let e = err(ContentSecurityPolicy::builder().default_src([bad]));
        assert!(matches!(e, CspError::UnquotedKeyword { .. }), "{bad}: {e}");
        assert!(e.to_string().contains(&format!("'{bad}'")), "{e}");
    }
    for bad in ["'selfie'", "'self", "'unsafe-everything'"] {
        let e = err(ContentSecurityPolicy::builder().default_src([bad]));
        assert!(matches!(e, CspError::UnknownKeyword { .. }), "{bad}: {e}");
    }
    // Keywords are case-insensitive and normalised.
    let csp = ContentSecurityPolicy::builder()
        .default_src(["'SELF'"])
        .build()
        .unwrap();
    assert_eq!(csp.to_string(), "default-src 'self'");
}

#[test]
fn rejects_bad_sources_hashes_and_nonces() {
    type Check = fn(&CspError) -> bool;
    let cases: Vec<(&str, Check)> = vec![
        ("'nonce-abc123'", |e| {
            matches!(e, CspError::StaticNonce { .. })
        }),
        ("'sha256-short'", |e| {
            matches!(e, CspError::InvalidHash { .. })
        }),
        ("'sha512-!!!'", |e| {
            matches!(e, CspError::InvalidHash { .. })
        }),
        ("1http:", |e| matches!(e, CspError::InvalidSource { .. })),
        ("https://exa mple", |e| {
            matches!(e, CspError::ForbiddenCharacter { .. })
        }),
        ("https://a..b", |e| {
            matches!(e, CspError::InvalidSource { .. })
        }),
        ("https://a.com:99999999", |e| {
            matches!(e, CspError::InvalidSource { .. })
        }),
        ("https://a.com/\"x", |e| {
            matches!(e, CspError::InvalidSource { .. })
        }),
        ("", |e| matches!(e, CspError::EmptySource { .. })),
    ];
    for (bad, check) in cases {
        let e = err(ContentSecurityPolicy::builder().script_src([bad]));
        assert!(check(&e), "{bad}: {e:?}");
    }
    let none: [&str; 0] = [];
    assert!(matches!(
        err(ContentSecurityPolicy::builder().script_src(none)),
        CspError::EmptySourceList { .. }
    ));
    assert!(matches!(
        err(ContentSecurityPolicy::builder().script_src(["'none'", "'self'"])),
        CspError::NoneWithOtherSources { .. }
    ));
    assert_eq!(err(ContentSecurityPolicy::builder()), CspError::Empty);
    for good in [
        "https:",
        "wss://*.example.com:*",
        "*.cdn.example.com",
        "example.com/js/",
        "data:",
        "blob:",
    ] {
        ContentSecurityPolicy::builder()
            .script_src([good])
            .build()
            .unwrap_or_else(|e| panic!("{good}: {e}"));
    }
}

#[test]
fn rejects_bad_reporting_and_sandbox() {
    for bad in ["csp", "//evil.example/x", "ftp://x", "/a;b", "/a b"] {
        assert!(
            matches!(
                err(ContentSecurityPolicy::builder()
                    .default_src(["'self'"])
                    .report_uri(bad)),
                CspError::InvalidReportUri { .. }
            ),
            "{bad}"
        );
    }
    assert!(matches!(
        err(ContentSecurityPolicy::builder()
            .default_src(["'self'"])
            .report_to("a group")),
        CspError::InvalidReportTo { .. }
    ));
    assert!(matches!(
        err(ContentSecurityPolicy::builder().sandbox(["scripts"])),
        CspError::InvalidSandboxToken { .. }
    ));
    let csp = ContentSecurityPolicy::builder()
        .sandbox(["allow-scripts", "allow-forms"])
        .report_uri("https://reports.example.com/csp")
        .build()
        .unwrap();
    assert_eq!(
        csp.to_string(),
        "sandbox allow-scripts allow-forms; report-uri https://reports.example.com/csp"
    );
}

#[test]
fn nonce_fills_script_and_style_from_default() {
    let csp = ContentSecurityPolicy::builder()
        .default_src(["'self'", "https://cdn.example.com"])
        .nonce(true)
        .build()
        .unwrap();
    assert_eq!(
        csp.to_string(),
        "default-src 'self' https://cdn.example.com; \
         script-src 'self' https://cdn.example.com 'nonce-{nonce}'; \
         style-src 'self' https://cdn.example.com 'nonce-{nonce}'"
    );
    let csp = ContentSecurityPolicy::builder()
        .default_src(["'none'"])
        .script_src(["'none'"])
        .nonce(true)
        .build()
        .unwrap();
    assert_eq!(
        csp.to_string(),
        "default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'"
    );
}

#[test]
fn parse_round_trips() {
    for text in [
        "default-src 'none'; frame-ancestors 'none'",
        "default-src 'self'; script-src 'self' 'nonce-{nonce}'; style-src 'self' 'nonce-{nonce}'; \
         img-src 'self' data:; object-src 'none'; base-uri 'self'; form-action 'self'; \
         frame-ancestors 'none'; upgrade-insecure-requests",
        "default-src 'self'; sandbox allow-forms; report-uri /r https://r.example.com/x; report-to g",
    ] {
        let csp: ContentSecurityPolicy = text.parse().unwrap();
        assert_eq!(csp.to_string(), text);
    }
    assert_eq!(
        ContentSecurityPolicy::web()
            .to_string()
            .parse::<ContentSecurityPolicy>()
            .unwrap(),
        ContentSecurityPolicy::web()
    );
    assert!(matches!(
        "default-src 'self'; default-src 'none'".parse::<ContentSecurityPolicy>(),
        Err(CspError::DuplicateDirective { .. })
    ));
    assert!(matches!(
        "default-src 'self'; script-source 'self'".parse::<ContentSecurityPolicy>(),
        Err(CspError::UnknownDirective { .. })
    ));
    assert!(matches!(
        "default-src self".parse::<ContentSecurityPolicy>(),
        Err(CspError::UnquotedKeyword { .. })
    ));
}

#[test]
fn nonce_is_base64_of_16_bytes() {
    assert_eq!(
        CspNonce::from_bytes([0; 16]).as_str(),
        "AAAAAAAAAAAAAAAAAAAAAA=="
    );
    assert_eq!(
        CspNonce::from_bytes([0xff; 16]).as_str(),
        "/////////////////////w=="
    );
    // RFC 4648 test vector prefix: "foobar" + padding bytes
    let mut raw = [0u8; 16];
    raw[..6].copy_from_slice(b"foobar");
    assert!(CspNonce::from_bytes(raw).as_str().starts_with("Zm9vYmFy"));
    let a = CspNonce::generate();
    let b = CspNonce::generate();
    assert_ne!(a, b);
    assert_eq!(a.as_str().len(), 24);
    assert_eq!(format!("{a:?}"), "CspNonce(..)");
    Source::parse_for("script-src", &format!("'sha256-{}'", &"A".repeat(43))).unwrap();
}

mod proptests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Whatever is given, an accepted source can neither end its directive nor its
        /// policy, and is a valid header value.
        #[test]
        fn accepted_sources_are_safe(raw in "\\PC{0,24}|[a-z'*:/.;, -]{0,24}") {
            if let Ok(source) = Source::parse_for("script-src", &raw) {
                let text = source.as_str();
                prop_assert!(!text.contains([';', ',', ' ']));
                prop_assert!(http::HeaderValue::from_str(text).is_ok());
                prop_assert!(!KEYWORDS.iter().any(|k| k.eq_ignore_ascii_case(text)));
            }
            if raw.contains([';', ',']) {
                prop_assert!(Source::parse_for("script-src", &raw).is_err());
            }
        }

        /// A built policy renders to text that parses back to the same policy.
        #[test]
        fn policies_round_trip(
            hosts in proptest::collection::vec("[a-z]{1,8}(\\.[a-z]{1,8}){0,2}", 0..4),
            nonce in any::<bool>(),
            report_only in any::<bool>(),
            upgrade in any::<bool>(),
        ) {
            let mut sources = vec!["'self'".to_owned()];
            sources.extend(hosts.iter().map(|h| format!("https://{h}")));
            let csp = ContentSecurityPolicy::builder()
                .default_src(&sources)
                .img_src(["'self'", "data:"])
                .frame_ancestors(["'none'"])
                .upgrade_insecure_requests(upgrade)
                .nonce(nonce)
                .build()
                .unwrap();
            let back: ContentSecurityPolicy = csp.to_string().parse().unwrap();
            prop_assert_eq!(&back, &csp);
            let ro = csp.to_builder().report_only(report_only).build().unwrap();
            prop_assert_eq!(ro.is_report_only(), report_only);
            let parts = ro.template();
            prop_assert_eq!(parts.len(), if nonce { 3 } else { 1 });
        }
    }
}
