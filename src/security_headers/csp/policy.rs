//! [`ContentSecurityPolicy`]: a validated policy and how it is written in a header.

use std::fmt;

use super::builder::CspBuilder;
use super::directive::Directive;
use super::source::Source;

/// A Content-Security-Policy, validated and ready to be sent.
///
/// ```
/// use palisade::security_headers::{ContentSecurityPolicy, Source};
///
/// let csp = ContentSecurityPolicy::builder()
///     .default_src([Source::NONE])
///     .frame_ancestors(["'none'"])
///     .build()
///     .unwrap();
/// assert_eq!(csp.to_string(), "default-src 'none'; frame-ancestors 'none'");
///
/// // Mistakes are caught when the policy is built.
/// let err = ContentSecurityPolicy::builder().script_src(["self"]).build().unwrap_err();
/// assert!(err.to_string().contains("must be quoted"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContentSecurityPolicy {
    pub(super) directives: Vec<(Directive, Vec<Source>)>,
    pub(super) upgrade_insecure_requests: bool,
    pub(super) sandbox: Option<Vec<String>>,
    pub(super) report_uri: Vec<String>,
    pub(super) report_to: Option<String>,
    pub(super) report_only: bool,
    pub(super) nonce: bool,
}

impl ContentSecurityPolicy {
    /// A builder for a policy.
    pub fn builder() -> CspBuilder {
        CspBuilder::default()
    }

    /// The API policy: `default-src 'none'; frame-ancestors 'none'`. Nothing may be loaded
    /// from or embed a JSON response.
    pub fn api() -> Self {
        Self {
            directives: vec![
                (Directive::DefaultSrc, vec![Source::NONE]),
                (Directive::FrameAncestors, vec![Source::NONE]),
            ],
            upgrade_insecure_requests: false,
            sandbox: None,
            report_uri: Vec::new(),
            report_to: None,
            report_only: false,
            nonce: false,
        }
    }

    /// The web policy: `default-src 'self'; script-src 'self' 'nonce-…'; style-src 'self'
    /// 'nonce-…'; img-src 'self' data:; object-src 'none'; base-uri 'self'; form-action
    /// 'self'; frame-ancestors 'none'; upgrade-insecure-requests`, with a fresh nonce per
    /// response.
    pub fn web() -> Self {
        Self {
            directives: vec![
                (Directive::DefaultSrc, vec![Source::SELF]),
                (Directive::ScriptSrc, vec![Source::SELF]),
                (Directive::StyleSrc, vec![Source::SELF]),
                (Directive::ImgSrc, vec![Source::SELF, Source::DATA]),
                (Directive::ObjectSrc, vec![Source::NONE]),
                (Directive::BaseUri, vec![Source::SELF]),
                (Directive::FormAction, vec![Source::SELF]),
                (Directive::FrameAncestors, vec![Source::NONE]),
            ],
            upgrade_insecure_requests: true,
            sandbox: None,
            report_uri: Vec::new(),
            report_to: None,
            report_only: false,
            nonce: true,
        }
    }

    /// A builder starting from this policy, to change a few directives.
    pub fn to_builder(&self) -> CspBuilder {
        CspBuilder::from_policy(self.clone())
    }

    /// Whether the policy is sent as `Content-Security-Policy-Report-Only` (violations
    /// are reported, nothing is blocked).
    pub fn is_report_only(&self) -> bool {
        self.report_only
    }

    /// Whether a fresh nonce is added to `script-src` and `style-src` on every response.
    pub fn uses_nonce(&self) -> bool {
        self.nonce
    }

    /// The sources of `directive`, if the policy has it.
    pub fn sources(&self, directive: Directive) -> Option<&[Source]> {
        self.directives
            .iter()
            .find(|(d, _)| *d == directive)
            .map(|(_, s)| s.as_slice())
    }

    /// The header name this policy is sent under.
    pub fn header_name(&self) -> http::HeaderName {
        if self.report_only {
            http::header::CONTENT_SECURITY_POLICY_REPORT_ONLY
        } else {
            http::header::CONTENT_SECURITY_POLICY
        }
    }

    /// The header value split around the nonce: the value is
    /// `parts[0] + nonce + parts[1] + nonce + … + parts[n]`. Without a nonce there is one
    /// part.
    pub(crate) fn template(&self) -> Vec<String> {
        let mut parts = Vec::new();
        let mut current = String::new();
        for (i, (directive, sources)) in self.directives.iter().enumerate() {
            if i > 0 {
                current.push_str("; ");
            }
            current.push_str(directive.name());
            for source in sources {
                current.push(' ');
                current.push_str(source.as_str());
            }
            if self.nonce && matches!(directive, Directive::ScriptSrc | Directive::StyleSrc) {
                current.push_str(" 'nonce-");
                parts.push(std::mem::take(&mut current));
                current.push('\'');
            }
        }
        let mut extra = |text: &str| {
            if !(parts.is_empty() && current.is_empty()) {
                current.push_str("; ");
            }
            current.push_str(text);
        };
        if self.upgrade_insecure_requests {
            extra("upgrade-insecure-requests");
        }
        if let Some(tokens) = &self.sandbox {
            let mut text = String::from("sandbox");
            for t in tokens {
                text.push(' ');
                text.push_str(t);
            }
            extra(&text);
        }
        if !self.report_uri.is_empty() {
            extra(&format!("report-uri {}", self.report_uri.join(" ")));
        }
        if let Some(group) = &self.report_to {
            extra(&format!("report-to {group}"));
        }
        parts.push(current);
        parts
    }
}

/// The policy as configured; a per-request nonce is shown as `'nonce-{nonce}'`.
impl fmt::Display for ContentSecurityPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts = self.template();
        for (i, part) in parts.iter().enumerate() {
            if i > 0 {
                f.write_str("{nonce}")?;
            }
            f.write_str(part)?;
        }
        Ok(())
    }
}
