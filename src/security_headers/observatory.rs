//! The MDN HTTP Observatory's header tests, written from its published scoring rules
//! (test names and score modifiers as the Observatory reports them). No network: the
//! checks read a response's headers, so a test can grade what a service really serves.
//!
//! ```
//! use palisade::security_headers::observatory;
//!
//! let mut headers = http::HeaderMap::new();
//! headers.insert("x-content-type-options", "nosniff".parse().unwrap());
//! let grade = observatory::grade(&headers);
//! assert!(grade.score < 100);
//! assert!(grade.failing.iter().any(|f| f.starts_with("content-security-policy")));
//! ```

use http::HeaderMap;

/// One test's verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Verdict {
    result: &'static str,
    modifier: i32,
    pass: bool,
}

fn verdict(result: &'static str, modifier: i32, pass: bool) -> Verdict {
    Verdict {
        result,
        modifier,
        pass,
    }
}

/// The enforced CSP as `(directive, sources)`, `None` when absent; `Err` when it cannot be
/// parsed (duplicate directives, no directive, non-ASCII).
#[allow(clippy::type_complexity)]
fn parse_csp(headers: &HeaderMap) -> Option<Result<Vec<(String, Vec<String>)>, ()>> {
    let value = headers.get(http::header::CONTENT_SECURITY_POLICY)?;
    let Ok(text) = value.to_str() else {
        return Some(Err(()));
    };
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    for directive in text.split(';').map(str::trim).filter(|d| !d.is_empty()) {
        let mut words = directive.split_ascii_whitespace();
        let name = words.next().unwrap_or_default().to_ascii_lowercase();
        if out.iter().any(|(n, _)| *n == name) {
            return Some(Err(()));
        }
        out.push((name, words.map(str::to_ascii_lowercase).collect()));
    }
    if out.is_empty() {
        return Some(Err(()));
    }
    Some(Ok(out))
}

fn sources<'a>(csp: &'a [(String, Vec<String>)], name: &str) -> Option<&'a [String]> {
    csp.iter()
        .find(|(n, _)| n == name)
        .map(|(_, s)| s.as_slice())
}

/// `content-security-policy`: only an enforced policy counts (report-only is ignored).
fn csp_test(headers: &HeaderMap) -> Verdict {
    let csp = match parse_csp(headers) {
        None => return verdict("csp-not-implemented", -25, false),
        Some(Err(())) => return verdict("csp-header-invalid", -25, false),
        Some(Ok(csp)) => csp,
    };
    let default = sources(&csp, "default-src");
    let script = sources(&csp, "script-src").or(default);
    let style = sources(&csp, "style-src").or(default);

    // With a nonce, a hash or 'strict-dynamic', browsers ignore 'unsafe-inline'.
    let script_unsafe_inline = match script {
        None => true,
        Some(list) => {
            let neutralised = list.iter().any(|s| {
                s.starts_with("'nonce-")
                    || s.starts_with("'sha256-")
                    || s.starts_with("'sha384-")
                    || s.starts_with("'sha512-")
                    || s == "'strict-dynamic'"
            });
            list.iter().any(|s| {
                (s == "'unsafe-inline'" && !neutralised)
                    || s == "*"
                    || s == "data:"
                    || s == "http:"
                    || s == "https:"
            })
        }
    };
    let unsafe_eval = script.is_some_and(|l| l.iter().any(|s| s == "'unsafe-eval'"));
    let insecure_active = ["script-src", "object-src", "default-src"]
        .iter()
        .filter_map(|d| sources(&csp, d))
        .flatten()
        .any(|s| s == "http:" || s.starts_with("http://"));
    let style_unsafe_inline = style.is_some_and(|l| l.iter().any(|s| s == "'unsafe-inline'"));

    if script_unsafe_inline {
        verdict("csp-implemented-with-unsafe-inline", -20, false)
    } else if insecure_active {
        verdict("csp-implemented-with-insecure-scheme", -20, false)
    } else if unsafe_eval {
        verdict("csp-implemented-with-unsafe-eval", -10, false)
    } else if style_unsafe_inline {
        verdict(
            "csp-implemented-with-unsafe-inline-in-style-src-only",
            0,
            true,
        )
    } else if default.is_some_and(|d| d == ["'none'"]) {
        verdict("csp-implemented-with-no-unsafe-default-src-none", 10, true)
    } else {
        verdict("csp-implemented-with-no-unsafe", 5, true)
    }
}

fn x_content_type_options_test(headers: &HeaderMap) -> Verdict {
    match headers.get(http::header::X_CONTENT_TYPE_OPTIONS) {
        None => verdict("x-content-type-options-not-implemented", -5, false),
        Some(v) if v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"nosniff") => {
            verdict("x-content-type-options-nosniff", 0, true)
        }
        Some(_) => verdict("x-content-type-options-header-invalid", -5, false),
    }
}

fn x_frame_options_test(headers: &HeaderMap) -> Verdict {
    if let Some(Ok(csp)) = parse_csp(headers) {
        if sources(&csp, "frame-ancestors").is_some() {
            return verdict("x-frame-options-implemented-via-csp", 5, true);
        }
    }
    let Some(value) = headers.get(http::header::X_FRAME_OPTIONS) else {
        return verdict("x-frame-options-not-implemented", -20, false);
    };
    let value = value
        .to_str()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    if value == "deny" || value == "sameorigin" {
        verdict("x-frame-options-sameorigin-or-deny", 0, true)
    } else if value.starts_with("allow-from ") {
        verdict("x-frame-options-allow-from-origin", 0, true)
    } else {
        verdict("x-frame-options-header-invalid", -20, false)
    }
}

fn referrer_policy_test(headers: &HeaderMap) -> Verdict {
    let Some(value) = headers.get(http::header::REFERRER_POLICY) else {
        return verdict("referrer-policy-not-implemented", 0, true);
    };
    // A comma-separated list: browsers use the last value they understand.
    let known = [
        "no-referrer",
        "same-origin",
        "strict-origin",
        "strict-origin-when-cross-origin",
        "no-referrer-when-downgrade",
        "origin",
        "origin-when-cross-origin",
        "unsafe-url",
    ];
    let text = value.to_str().unwrap_or_default().to_ascii_lowercase();
    let policy = text.split(',').map(str::trim).rfind(|p| known.contains(p));
    match policy {
        Some(
            "no-referrer" | "same-origin" | "strict-origin" | "strict-origin-when-cross-origin",
        ) => verdict("referrer-policy-private", 5, true),
        Some("no-referrer-when-downgrade") => {
            verdict("referrer-policy-no-referrer-when-downgrade", 0, true)
        }
        Some(_) => verdict("referrer-policy-unsafe", -5, false),
        None => verdict("referrer-policy-header-invalid", -5, false),
    }
}

fn cross_origin_resource_policy_test(headers: &HeaderMap) -> Verdict {
    let Some(value) = headers.get("cross-origin-resource-policy") else {
        return verdict("cross-origin-resource-policy-not-implemented", 0, true);
    };
    match value
        .to_str()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase()
        .as_str()
    {
        "same-origin" => verdict(
            "cross-origin-resource-policy-implemented-with-same-origin",
            0,
            true,
        ),
        "same-site" => verdict(
            "cross-origin-resource-policy-implemented-with-same-site",
            0,
            true,
        ),
        "cross-origin" => verdict(
            "cross-origin-resource-policy-implemented-with-cross-origin",
            0,
            true,
        ),
        _ => verdict("cross-origin-resource-policy-header-invalid", -5, false),
    }
}

fn strict_transport_security_test(headers: &HeaderMap) -> Verdict {
    let Some(value) = headers.get(http::header::STRICT_TRANSPORT_SECURITY) else {
        return verdict("hsts-not-implemented", -20, false);
    };
    let text = value.to_str().unwrap_or_default().to_ascii_lowercase();
    let max_age = text
        .split(';')
        .filter_map(|d| d.trim().strip_prefix("max-age="))
        .find_map(|v| v.trim_matches('"').parse::<u64>().ok());
    match max_age {
        None => verdict("hsts-header-invalid", -20, false),
        Some(age) if age >= 15_768_000 => {
            verdict("hsts-implemented-max-age-at-least-six-months", 0, true)
        }
        Some(_) => verdict("hsts-implemented-max-age-less-than-six-months", -10, false),
    }
}

fn all_tests(headers: &HeaderMap) -> Vec<(&'static str, Verdict)> {
    vec![
        ("content-security-policy", csp_test(headers)),
        (
            "x-content-type-options",
            x_content_type_options_test(headers),
        ),
        ("x-frame-options", x_frame_options_test(headers)),
        ("referrer-policy", referrer_policy_test(headers)),
        (
            "cross-origin-resource-policy",
            cross_origin_resource_policy_test(headers),
        ),
        (
            "strict-transport-security",
            strict_transport_security_test(headers),
        ),
    ]
}

/// What the Observatory's header tests say of a response.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Grade {
    /// 100 plus penalties, plus bonuses from 90 up (the Observatory's rule).
    pub score: i32,
    /// Each test's result name (`csp-implemented-with-no-unsafe-default-src-none`, ...).
    pub results: Vec<&'static str>,
    /// The failing tests, as `test: result (modifier)`.
    pub failing: Vec<String>,
}

impl Grade {
    /// The letter the Observatory gives the score (`A+` from 100 up).
    pub fn letter(&self) -> &'static str {
        match self.score {
            100.. => "A+",
            90..=99 => "A",
            85..=89 => "A-",
            80..=84 => "B+",
            70..=79 => "B",
            65..=69 => "B-",
            60..=64 => "C+",
            50..=59 => "C",
            45..=49 => "C-",
            40..=44 => "D+",
            30..=39 => "D",
            25..=29 => "D-",
            _ => "F",
        }
    }
}

/// Grades a response's headers with the Observatory's header tests (CSP,
/// X-Content-Type-Options, X-Frame-Options, Referrer-Policy, CORP, HSTS).
pub fn grade(headers: &HeaderMap) -> Grade {
    let verdicts = all_tests(headers);
    Grade {
        score: score(&verdicts),
        results: verdicts.iter().map(|(_, v)| v.result).collect(),
        failing: failing(&verdicts),
    }
}

fn failing(verdicts: &[(&'static str, Verdict)]) -> Vec<String> {
    verdicts
        .iter()
        .filter(|(_, v)| !v.pass)
        .map(|(name, v)| format!("{name}: {} ({})", v.result, v.modifier))
        .collect()
}

/// The Observatory's score: 100 plus penalties; bonuses only count from 90 up.
fn score(verdicts: &[(&'static str, Verdict)]) -> i32 {
    let penalties: i32 = verdicts.iter().map(|(_, v)| v.modifier.min(0)).sum();
    let bonuses: i32 = verdicts.iter().map(|(_, v)| v.modifier.max(0)).sum();
    let base = 100 + penalties;
    (if base >= 90 { base + bonuses } else { base }).max(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Environment;
    use crate::security_headers::{
        ContentSecurityPolicy, HstsWhen, SecurityHeadersLayer, SecurityHeadersLayerBuilder,
    };

    async fn headers_of(layer: SecurityHeadersLayer) -> HeaderMap {
        use tower::{Layer, ServiceExt, service_fn};
        let svc = layer.layer(service_fn(|_req: http::Request<()>| async {
            let mut res = http::Response::new(());
            res.headers_mut()
                .insert("content-type", "application/json".parse().unwrap());
            Ok::<_, std::convert::Infallible>(res)
        }));
        let req = http::Request::get("https://api.example.com/v1/messages")
            .body(())
            .unwrap();
        svc.oneshot(req).await.unwrap().headers().clone()
    }

    #[tokio::test]
    async fn api_preset_fails_no_observatory_test() {
        let layer = SecurityHeadersLayerBuilder::api()
            .environment(Environment::Production)
            .build()
            .unwrap();
        let verdicts = all_tests(&headers_of(layer).await);
        assert_eq!(failing(&verdicts), Vec::<String>::new());
        let results: Vec<&str> = verdicts.iter().map(|(_, v)| v.result).collect();
        assert_eq!(
            results,
            [
                "csp-implemented-with-no-unsafe-default-src-none",
                "x-content-type-options-nosniff",
                "x-frame-options-implemented-via-csp",
                "referrer-policy-private",
                "cross-origin-resource-policy-implemented-with-same-origin",
                "hsts-implemented-max-age-at-least-six-months",
            ]
        );
        assert_eq!(score(&verdicts), 120);
    }

    #[tokio::test]
    async fn api_preset_passes_over_https_in_development_too() {
        let verdicts = all_tests(&headers_of(SecurityHeadersLayer::api()).await);
        assert_eq!(failing(&verdicts), Vec::<String>::new());
    }

    #[tokio::test]
    async fn web_preset_with_nonces_fails_no_observatory_test() {
        let verdicts = all_tests(&headers_of(SecurityHeadersLayer::web()).await);
        assert_eq!(failing(&verdicts), Vec::<String>::new());
        assert_eq!(verdicts[0].1.result, "csp-implemented-with-no-unsafe");
        assert!(score(&verdicts) >= 100);
    }

    #[tokio::test]
    async fn the_checks_fail_weak_configurations() {
        // No headers at all.
        let bare = all_tests(&HeaderMap::new());
        assert_eq!(failing(&bare).len(), 4, "{:?}", failing(&bare));
        assert_eq!(score(&bare), 30);

        // Report-only CSP does not count; 'unsafe-inline' and 'unsafe-eval' are penalised.
        let report_only = SecurityHeadersLayerBuilder::api()
            .csp(
                ContentSecurityPolicy::api()
                    .to_builder()
                    .report_only(true)
                    .build()
                    .unwrap(),
            )
            .hsts_when(HstsWhen::Never)
            .build()
            .unwrap();
        let verdicts = all_tests(&headers_of(report_only).await);
        assert_eq!(verdicts[0].1.result, "csp-not-implemented");
        assert_eq!(verdicts[2].1.result, "x-frame-options-sameorigin-or-deny");
        assert_eq!(verdicts[5].1.result, "hsts-not-implemented");

        for (csp, expected) in [
            (
                "script-src 'self' 'unsafe-inline'",
                "csp-implemented-with-unsafe-inline",
            ),
            (
                "default-src 'self' 'unsafe-eval'",
                "csp-implemented-with-unsafe-eval",
            ),
            (
                "default-src 'self' http://cdn.example.com",
                "csp-implemented-with-insecure-scheme",
            ),
            ("default-src https:", "csp-implemented-with-unsafe-inline"),
            ("img-src 'self'", "csp-implemented-with-unsafe-inline"),
            (
                "default-src 'self'; style-src 'self' 'unsafe-inline'",
                "csp-implemented-with-unsafe-inline-in-style-src-only",
            ),
            (
                "script-src 'self' 'unsafe-inline' 'sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU='",
                "csp-implemented-with-no-unsafe",
            ),
        ] {
            let mut headers = HeaderMap::new();
            headers.insert("content-security-policy", csp.parse().unwrap());
            assert_eq!(csp_test(&headers).result, expected, "{csp}");
        }
        let mut headers = HeaderMap::new();
        headers.insert(
            "content-security-policy",
            "default-src 'self'; default-src *".parse().unwrap(),
        );
        assert_eq!(csp_test(&headers).result, "csp-header-invalid");

        for (value, expected, pass) in [
            ("unsafe-url", "referrer-policy-unsafe", false),
            ("origin-when-cross-origin", "referrer-policy-unsafe", false),
            ("unsafe-url, strict-origin", "referrer-policy-private", true),
            (
                "no-referrer-when-downgrade",
                "referrer-policy-no-referrer-when-downgrade",
                true,
            ),
            ("whatever", "referrer-policy-header-invalid", false),
        ] {
            let mut headers = HeaderMap::new();
            headers.insert("referrer-policy", value.parse().unwrap());
            let v = referrer_policy_test(&headers);
            assert_eq!((v.result, v.pass), (expected, pass), "{value}");
        }
        let mut headers = HeaderMap::new();
        headers.insert("x-content-type-options", "sniff".parse().unwrap());
        headers.insert("x-frame-options", "ALLOWALL".parse().unwrap());
        headers.insert("cross-origin-resource-policy", "everyone".parse().unwrap());
        headers.insert(
            "strict-transport-security",
            "max-age=86400".parse().unwrap(),
        );
        assert_eq!(
            failing(&all_tests(&headers)).len(),
            5,
            "{:?}",
            failing(&all_tests(&headers))
        );
    }
}
