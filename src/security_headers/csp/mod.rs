//! A typed Content-Security-Policy: directives, validated sources, reporting, report-only
//! mode and per-request nonces, one concern per file:
//!
//! - `directive.rs`: [`Directive`], the directives that take a source list;
//! - `source.rs`: [`Source`], one checked entry of a source list;
//! - `policy.rs`: [`ContentSecurityPolicy`] and how it is written in a header;
//! - `parse.rs`: reading a policy as written in a header;
//! - `builder.rs`: [`CspBuilder`];
//! - `nonce.rs`: [`CspNonce`], the per-response nonce;
//! - `error.rs`: [`CspError`].

mod builder;
mod directive;
mod error;
mod nonce;
mod parse;
mod policy;
mod source;

#[cfg(test)]
mod tests;

pub use builder::CspBuilder;
pub(crate) use builder::{check_report_to, check_report_uri};
pub use directive::Directive;
pub use error::CspError;
pub use nonce::CspNonce;
pub use policy::ContentSecurityPolicy;
pub use source::Source;
