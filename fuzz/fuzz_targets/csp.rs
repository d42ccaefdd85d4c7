//! Fuzzes the Content-Security-Policy parser.
//!
//! Properties: any text either parses or is refused with a typed [`CspError`] whose message
//! is not empty; a parsed policy renders to a valid header value that parses back to the
//! same policy (parse(render(p)) = p), and rendering is stable (render(parse(render(p))) =
//! render(p)). Input is either raw text or a policy assembled from CSP words, so that the
//! fuzzer reaches deep into valid policies as well as the refusals.
#![no_main]

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use palisade::security_headers::ContentSecurityPolicy;

#[derive(Debug, Arbitrary)]
enum Input {
    Text(String),
    Words(Vec<(u8, Vec<u8>, Option<String>)>),
}

const NAMES: &[&str] = &[
    "default-src",
    "script-src",
    "style-src",
    "img-src",
    "connect-src",
    "font-src",
    "object-src",
    "frame-ancestors",
    "base-uri",
    "form-action",
    "worker-src",
    "report-uri",
    "report-to",
    "sandbox",
    "upgrade-insecure-requests",
    "Script-Src",
    "unknown-src",
];
const WORDS: &[&str] = &[
    "'self'",
    "'none'",
    "'unsafe-inline'",
    "'unsafe-eval'",
    "'strict-dynamic'",
    "'nonce-{nonce}'",
    "'nonce-abc'",
    "self",
    "https:",
    "data:",
    "blob:",
    "*",
    "https://cdn.example.com",
    "*.example.com",
    "/csp-report",
    "allow-scripts",
    "'sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU='",
    "'sha256-short'",
    "'report-sample'",
];

fn assemble(parts: &[(u8, Vec<u8>, Option<String>)]) -> String {
    let mut out = String::new();
    for (name, words, extra) in parts.iter().take(12) {
        out.push_str(NAMES[usize::from(*name) % NAMES.len()]);
        for w in words.iter().take(6) {
            out.push(' ');
            out.push_str(WORDS[usize::from(*w) % WORDS.len()]);
        }
        if let Some(extra) = extra {
            out.push(' ');
            out.push_str(extra);
        }
        out.push_str("; ");
    }
    out
}

fuzz_target!(|input: Input| {
    let text = match input {
        Input::Text(t) => t,
        Input::Words(parts) => assemble(&parts),
    };
    match text.parse::<ContentSecurityPolicy>() {
        Err(err) => assert!(!err.to_string().is_empty()),
        Ok(policy) => {
            let rendered = policy.to_string();
            assert!(
                http::HeaderValue::from_str(&rendered).is_ok(),
                "{text:?} renders as {rendered:?}, not a header value"
            );
            assert!(
                !rendered.contains(','),
                "{rendered:?} would start a second policy"
            );
            let again: ContentSecurityPolicy = rendered
                .parse()
                .unwrap_or_else(|e| panic!("{text:?} renders as {rendered:?}, refused: {e}"));
            assert_eq!(again, policy, "{text:?} -> {rendered:?}");
            assert_eq!(again.to_string(), rendered);
        }
    }
});
