//! [`CspError`]: what can be wrong with a policy.

/// A mistake in a Content-Security-Policy, found when it is built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CspError {
    /// A source holds `;` or `,` (which would start a new directive or policy), a space, a
    /// control character or a non-ASCII character.
    #[error(
        "CSP {directive}: source {value:?} holds the forbidden character {character:?}; write one source per list item, without `;`, `,` or spaces"
    )]
    ForbiddenCharacter {
        /// The directive.
        directive: String,
        /// The offending source.
        value: String,
        /// The first forbidden character.
        character: char,
    },
    /// A keyword written without its single quotes (`self` instead of `'self'`), which a
    /// browser would read as a host name.
    #[error("CSP {directive}: keyword {value:?} must be quoted: write '{value}'")]
    UnquotedKeyword {
        /// The directive.
        directive: String,
        /// The unquoted keyword.
        value: String,
    },
    /// A quoted word that is not a CSP keyword or hash.
    #[error(
        "CSP {directive}: {value:?} is not a CSP keyword (expected 'self', 'none', 'unsafe-inline', 'strict-dynamic', a hash such as 'sha256-…', ...)"
    )]
    UnknownKeyword {
        /// The directive.
        directive: String,
        /// The unknown keyword.
        value: String,
    },
    /// A hash source whose digest is not base64 of the right length.
    #[error(
        "CSP {directive}: {value:?} is not a valid hash source ('sha256-' followed by the base64 digest)"
    )]
    InvalidHash {
        /// The directive.
        directive: String,
        /// The hash source.
        value: String,
    },
    /// A fixed `'nonce-…'` source: a nonce must be fresh per response.
    #[error(
        "CSP {directive}: a fixed 'nonce-…' source defeats the nonce; enable per-request nonces instead"
    )]
    StaticNonce {
        /// The directive.
        directive: String,
    },
    /// A source that is neither a keyword, a scheme, a host nor `*`.
    #[error(
        "CSP {directive}: {value:?} is not a valid source (expected a host like https://cdn.example.com, a scheme like https:, or a quoted keyword)"
    )]
    InvalidSource {
        /// The directive.
        directive: String,
        /// The source.
        value: String,
    },
    /// An empty source.
    #[error("CSP {directive}: empty source")]
    EmptySource {
        /// The directive.
        directive: String,
    },
    /// A directive with no sources (write `'none'` to block everything).
    #[error("CSP {directive}: no sources; write 'none' to allow nothing")]
    EmptySourceList {
        /// The directive.
        directive: String,
    },
    /// `'none'` next to other sources, where browsers ignore it.
    #[error("CSP {directive}: 'none' must be the only source in its list")]
    NoneWithOtherSources {
        /// The directive.
        directive: String,
    },
    /// A directive name that is unknown or does not take sources.
    #[error("CSP: unknown directive {name:?}")]
    UnknownDirective {
        /// The name as written.
        name: String,
    },
    /// The same directive twice in a parsed policy (browsers ignore the second).
    #[error("CSP: directive {name} appears twice")]
    DuplicateDirective {
        /// The directive.
        name: String,
    },
    /// A `report-uri` that is not an absolute http(s) URL or a path.
    #[error("CSP report-uri: {value:?} is not an http(s) URL or an absolute path")]
    InvalidReportUri {
        /// The value.
        value: String,
    },
    /// A `report-to` group name that is not a token.
    #[error("CSP report-to: {value:?} is not a valid group name (letters, digits, `-`, `_`)")]
    InvalidReportTo {
        /// The value.
        value: String,
    },
    /// A `sandbox` token that is not one of the `allow-*` keywords.
    #[error("CSP sandbox: {value:?} is not a sandbox token such as allow-scripts")]
    InvalidSandboxToken {
        /// The value.
        value: String,
    },
    /// A policy with no directive at all.
    #[error("CSP: the policy has no directives")]
    Empty,
}
