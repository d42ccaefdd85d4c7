//! Reading a [`ContentSecurityPolicy`] as written in a header.

use std::str::FromStr;

use super::builder::CspBuilder;
use super::directive::Directive;
use super::error::CspError;
use super::policy::ContentSecurityPolicy;

/// Parses a policy as written in a header (`default-src 'self'; report-uri /csp`).
///
/// `report-uri`, `report-to`, `sandbox` and `upgrade-insecure-requests` are understood;
/// a `'nonce-{nonce}'` source (as [`Display`](std::fmt::Display) writes it) turns per-request
/// nonces on; any other fixed nonce is refused.
impl FromStr for ContentSecurityPolicy {
    type Err = CspError;

    fn from_str(s: &str) -> Result<Self, CspError> {
        let mut builder = CspBuilder::default();
        let mut seen: Vec<String> = Vec::new();
        for directive in s.split(';').map(str::trim).filter(|d| !d.is_empty()) {
            let mut words = directive.split_ascii_whitespace();
            let name = words.next().unwrap_or_default().to_ascii_lowercase();
            if seen.contains(&name) {
                return Err(CspError::DuplicateDirective { name });
            }
            seen.push(name.clone());
            let mut values: Vec<&str> = words.collect();
            match name.as_str() {
                "upgrade-insecure-requests" => builder = builder.upgrade_insecure_requests(true),
                "report-uri" => {
                    for v in values {
                        builder = builder.report_uri(v);
                    }
                }
                "report-to" => builder = builder.report_to(values.first().copied().unwrap_or("")),
                "sandbox" => builder = builder.sandbox(values),
                other => {
                    let directive =
                        Directive::from_name(other).ok_or_else(|| CspError::UnknownDirective {
                            name: other.to_owned(),
                        })?;
                    let before = values.len();
                    values.retain(|v| *v != "'nonce-{nonce}'");
                    if values.len() != before {
                        builder = builder.nonce(true);
                        if values.is_empty() {
                            // Only the per-request nonce: no other source (as `Display`
                            // writes a directive whose list is empty, with the nonce).
                            values.push("'none'");
                        }
                    }
                    builder = builder.directive(directive, values);
                }
            }
        }
        builder.build()
    }
}
