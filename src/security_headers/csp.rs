//! A typed Content-Security-Policy: directives, validated sources, reporting, report-only
//! mode and per-request nonces.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use rand::Rng;

/// A CSP directive that takes a source list (fetch, document and navigation directives).
///
/// `upgrade-insecure-requests`, `sandbox`, `report-uri` and `report-to` have their own
/// builder methods because they do not take sources.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Directive {
    /// `default-src`: the fallback for every other fetch directive.
    DefaultSrc,
    /// `script-src`.
    ScriptSrc,
    /// `script-src-elem`.
    ScriptSrcElem,
    /// `script-src-attr`.
    ScriptSrcAttr,
    /// `style-src`.
    StyleSrc,
    /// `style-src-elem`.
    StyleSrcElem,
    /// `style-src-attr`.
    StyleSrcAttr,
    /// `img-src`.
    ImgSrc,
    /// `font-src`.
    FontSrc,
    /// `connect-src`.
    ConnectSrc,
    /// `media-src`.
    MediaSrc,
    /// `object-src`.
    ObjectSrc,
    /// `frame-src`.
    FrameSrc,
    /// `child-src`.
    ChildSrc,
    /// `worker-src`.
    WorkerSrc,
    /// `manifest-src`.
    ManifestSrc,
    /// `base-uri`.
    BaseUri,
    /// `form-action`.
    FormAction,
    /// `frame-ancestors`: who may embed the page (the modern X-Frame-Options).
    FrameAncestors,
}

impl Directive {
    /// Every directive, in the order they are written in a policy.
    pub const ALL: [Directive; 19] = [
        Directive::DefaultSrc,
        Directive::ScriptSrc,
        Directive::ScriptSrcElem,
        Directive::ScriptSrcAttr,
        Directive::StyleSrc,
        Directive::StyleSrcElem,
        Directive::StyleSrcAttr,
        Directive::ImgSrc,
        Directive::FontSrc,
        Directive::ConnectSrc,
        Directive::MediaSrc,
        Directive::ObjectSrc,
        Directive::FrameSrc,
        Directive::ChildSrc,
        Directive::WorkerSrc,
        Directive::ManifestSrc,
        Directive::BaseUri,
        Directive::FormAction,
        Directive::FrameAncestors,
    ];

    /// The directive's name as written in the header (`script-src`).
    pub const fn name(self) -> &'static str {
        match self {
            Directive::DefaultSrc => "default-src",
            Directive::ScriptSrc => "script-src",
            Directive::ScriptSrcElem => "script-src-elem",
            Directive::ScriptSrcAttr => "script-src-attr",
            Directive::StyleSrc => "style-src",
            Directive::StyleSrcElem => "style-src-elem",
            Directive::StyleSrcAttr => "style-src-attr",
            Directive::ImgSrc => "img-src",
            Directive::FontSrc => "font-src",
            Directive::ConnectSrc => "connect-src",
            Directive::MediaSrc => "media-src",
            Directive::ObjectSrc => "object-src",
            Directive::FrameSrc => "frame-src",
            Directive::ChildSrc => "child-src",
            Directive::WorkerSrc => "worker-src",
            Directive::ManifestSrc => "manifest-src",
            Directive::BaseUri => "base-uri",
            Directive::FormAction => "form-action",
            Directive::FrameAncestors => "frame-ancestors",
        }
    }

    /// The directive named `name` (ASCII case-insensitive), if it takes a source list.
    pub fn from_name(name: &str) -> Option<Directive> {
        Directive::ALL
            .into_iter()
            .find(|d| d.name().eq_ignore_ascii_case(name))
    }
}

impl fmt::Display for Directive {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Keywords that must be written in single quotes.
const KEYWORDS: [&str; 9] = [
    "self",
    "none",
    "unsafe-inline",
    "unsafe-eval",
    "strict-dynamic",
    "unsafe-hashes",
    "report-sample",
    "wasm-unsafe-eval",
    "inline-speculation-rules",
];

/// One validated source expression: a quoted keyword (`'self'`), a scheme (`https:`), a
/// host (`https://cdn.example.com`, `*.example.com:443`), `*`, or a hash
/// (`'sha256-…'`).
///
/// Nonces are not sources you write: they are generated per request (see
/// [`CspBuilder::nonce`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Source(Cow<'static, str>);

impl Source {
    /// `'self'`: the page's own origin.
    pub const SELF: Source = Source(Cow::Borrowed("'self'"));
    /// `'none'`: nothing (must stand alone in its list).
    pub const NONE: Source = Source(Cow::Borrowed("'none'"));
    /// `'unsafe-inline'` (weakens XSS protection; avoid in `script-src`).
    pub const UNSAFE_INLINE: Source = Source(Cow::Borrowed("'unsafe-inline'"));
    /// `'unsafe-eval'` (allows `eval()`; avoid).
    pub const UNSAFE_EVAL: Source = Source(Cow::Borrowed("'unsafe-eval'"));
    /// `'strict-dynamic'`: trust scripts loaded by already trusted (nonced) scripts.
    pub const STRICT_DYNAMIC: Source = Source(Cow::Borrowed("'strict-dynamic'"));
    /// `'wasm-unsafe-eval'`: allow WebAssembly compilation.
    pub const WASM_UNSAFE_EVAL: Source = Source(Cow::Borrowed("'wasm-unsafe-eval'"));
    /// `'report-sample'`: include a sample of the violating code in reports.
    pub const REPORT_SAMPLE: Source = Source(Cow::Borrowed("'report-sample'"));
    /// `https:`: any origin over https.
    pub const HTTPS: Source = Source(Cow::Borrowed("https:"));
    /// `data:` URLs.
    pub const DATA: Source = Source(Cow::Borrowed("data:"));

    /// Validates one source expression. `directive` is only used in the error.
    pub fn parse_for(directive: &str, value: &str) -> Result<Source, CspError> {
        let err =
            |kind: fn(String, String) -> CspError| kind(directive.to_owned(), value.to_owned());
        if value.is_empty() {
            return Err(CspError::EmptySource {
                directive: directive.to_owned(),
            });
        }
        if let Some(character) = value.chars().find(|c| {
            matches!(c, ';' | ',') || c.is_whitespace() || c.is_control() || !c.is_ascii()
        }) {
            return Err(CspError::ForbiddenCharacter {
                directive: directive.to_owned(),
                value: value.to_owned(),
                character,
            });
        }
        if let Some(inner) = value.strip_prefix('\'') {
            let Some(inner) = inner.strip_suffix('\'') else {
                return Err(err(|directive, value| CspError::UnknownKeyword {
                    directive,
                    value,
                }));
            };
            let lower = inner.to_ascii_lowercase();
            if KEYWORDS.contains(&lower.as_str()) {
                return Ok(Source(Cow::Owned(format!("'{lower}'"))));
            }
            if lower.starts_with("nonce-") {
                return Err(CspError::StaticNonce {
                    directive: directive.to_owned(),
                });
            }
            for (prefix, padded, unpadded) in [
                ("sha256-", 44, 43),
                ("sha384-", 64, 64),
                ("sha512-", 88, 86),
            ] {
                if lower.starts_with(prefix) {
                    let digest = &inner[prefix.len()..];
                    let chars_ok = digest.bytes().enumerate().all(|(i, b)| {
                        b.is_ascii_alphanumeric()
                            || matches!(b, b'+' | b'/' | b'-' | b'_')
                            || (b == b'=' && i + 2 >= digest.len())
                    });
                    if chars_ok && (digest.len() == padded || digest.len() == unpadded) {
                        return Ok(Source(Cow::Owned(format!("'{}{digest}'", &prefix))));
                    }
                    return Err(err(|directive, value| CspError::InvalidHash {
                        directive,
                        value,
                    }));
                }
            }
            return Err(err(|directive, value| CspError::UnknownKeyword {
                directive,
                value,
            }));
        }
        if KEYWORDS.iter().any(|k| k.eq_ignore_ascii_case(value)) {
            return Err(err(|directive, value| CspError::UnquotedKeyword {
                directive,
                value,
            }));
        }
        if value == "*" || is_scheme_source(value) || is_host_source(value) {
            return Ok(Source(Cow::Owned(value.to_owned())));
        }
        Err(err(|directive, value| CspError::InvalidSource {
            directive,
            value,
        }))
    }

    /// The source as written in the header.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    fn is_none(&self) -> bool {
        self.0 == "'none'"
    }
}

impl AsRef<str> for Source {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Source {
    type Err = CspError;

    fn from_str(s: &str) -> Result<Self, CspError> {
        Source::parse_for("source", s)
    }
}

fn is_scheme(s: &str) -> bool {
    let mut bytes = s.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_alphabetic())
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
}

fn is_scheme_source(s: &str) -> bool {
    s.strip_suffix(':').is_some_and(is_scheme)
}

fn is_host_source(s: &str) -> bool {
    let rest = match s.split_once("://") {
        Some((scheme, rest)) => {
            if !is_scheme(scheme) {
                return false;
            }
            rest
        }
        None => s,
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (authority, None),
    };
    let host_ok = host == "*" || {
        let labels = host.strip_prefix("*.").unwrap_or(host);
        !labels.is_empty()
            && labels.split('.').all(|label| {
                !label.is_empty()
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            })
    };
    let port_ok = port.is_none_or(|p| {
        p == "*" || (!p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()))
    });
    let path_ok = path.bytes().all(|b| {
        b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'/' | b'-'
                    | b'.'
                    | b'_'
                    | b'~'
                    | b'%'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b'='
                    | b':'
                    | b'@'
            )
    });
    host_ok && port_ok && path_ok
}

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
    directives: Vec<(Directive, Vec<Source>)>,
    upgrade_insecure_requests: bool,
    sandbox: Option<Vec<String>>,
    report_uri: Vec<String>,
    report_to: Option<String>,
    report_only: bool,
    nonce: bool,
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
        CspBuilder {
            policy: self.clone(),
            errors: Vec::new(),
        }
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

/// Parses a policy as written in a header (`default-src 'self'; report-uri /csp`).
///
/// `report-uri`, `report-to`, `sandbox` and `upgrade-insecure-requests` are understood;
/// a `'nonce-{nonce}'` source (as [`Display`](fmt::Display) writes it) turns per-request
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
                    }
                    builder = builder.directive(directive, values);
                }
            }
        }
        builder.build()
    }
}

/// Builds a [`ContentSecurityPolicy`]; mistakes are reported by [`CspBuilder::build`].
#[derive(Debug, Clone)]
#[must_use]
pub struct CspBuilder {
    policy: ContentSecurityPolicy,
    errors: Vec<CspError>,
}

impl Default for CspBuilder {
    fn default() -> Self {
        Self {
            policy: ContentSecurityPolicy {
                directives: Vec::new(),
                upgrade_insecure_requests: false,
                sandbox: None,
                report_uri: Vec::new(),
                report_to: None,
                report_only: false,
                nonce: false,
            },
            errors: Vec::new(),
        }
    }
}

macro_rules! directive_methods {
    ($($(#[$doc:meta])* $method:ident => $directive:ident;)*) => {
        $(
            $(#[$doc])*
            pub fn $method<I>(self, sources: I) -> Self
            where
                I: IntoIterator,
                I::Item: AsRef<str>,
            {
                self.directive(Directive::$directive, sources)
            }
        )*
    };
}

impl CspBuilder {
    /// Sets `directive` to `sources` (replacing it if already set). Each source is a
    /// [`Source`] or a string such as `"'self'"` or `"https://cdn.example.com"`.
    pub fn directive<I>(mut self, directive: Directive, sources: I) -> Self
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        let mut parsed = Vec::new();
        for source in sources {
            match Source::parse_for(directive.name(), source.as_ref()) {
                Ok(s) => parsed.push(s),
                Err(e) => self.errors.push(e),
            }
        }
        if parsed.is_empty() && self.errors.is_empty() {
            self.errors.push(CspError::EmptySourceList {
                directive: directive.name().to_owned(),
            });
        }
        if parsed.len() > 1 && parsed.iter().any(Source::is_none) {
            self.errors.push(CspError::NoneWithOtherSources {
                directive: directive.name().to_owned(),
            });
        }
        let list = &mut self.policy.directives;
        match list.iter_mut().find(|(d, _)| *d == directive) {
            Some(slot) => slot.1 = parsed,
            None => {
                list.push((directive, parsed));
                list.sort_by_key(|(d, _)| *d);
            }
        }
        self
    }

    /// Removes `directive` from the policy.
    pub fn remove(mut self, directive: Directive) -> Self {
        self.policy.directives.retain(|(d, _)| *d != directive);
        self
    }

    directive_methods! {
        /// Sets `default-src`.
        default_src => DefaultSrc;
        /// Sets `script-src`.
        script_src => ScriptSrc;
        /// Sets `style-src`.
        style_src => StyleSrc;
        /// Sets `img-src`.
        img_src => ImgSrc;
        /// Sets `font-src`.
        font_src => FontSrc;
        /// Sets `connect-src`.
        connect_src => ConnectSrc;
        /// Sets `object-src`.
        object_src => ObjectSrc;
        /// Sets `frame-src`.
        frame_src => FrameSrc;
        /// Sets `worker-src`.
        worker_src => WorkerSrc;
        /// Sets `base-uri`.
        base_uri => BaseUri;
        /// Sets `form-action`.
        form_action => FormAction;
        /// Sets `frame-ancestors`.
        frame_ancestors => FrameAncestors;
    }

    /// Adds `upgrade-insecure-requests` (browsers fetch http subresources over https).
    pub fn upgrade_insecure_requests(mut self, on: bool) -> Self {
        self.policy.upgrade_insecure_requests = on;
        self
    }

    /// Adds `sandbox` with the given `allow-*` tokens (none: the strictest sandbox).
    pub fn sandbox<I>(mut self, tokens: I) -> Self
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        let mut list = Vec::new();
        for token in tokens {
            let token = token.as_ref();
            let valid = token.len() > "allow-".len()
                && token.starts_with("allow-")
                && token.bytes().all(|b| b.is_ascii_lowercase() || b == b'-');
            if valid {
                list.push(token.to_owned());
            } else {
                self.errors.push(CspError::InvalidSandboxToken {
                    value: token.to_owned(),
                });
            }
        }
        self.policy.sandbox = Some(list);
        self
    }

    /// Adds a `report-uri` (deprecated by browsers in favour of `report-to`, but still the
    /// one most of them honour): an absolute `http(s)://` URL or a path starting with `/`.
    pub fn report_uri(mut self, uri: impl AsRef<str>) -> Self {
        let uri = uri.as_ref();
        match check_report_uri(uri) {
            Ok(()) => self.policy.report_uri.push(uri.to_owned()),
            Err(err) => self.errors.push(err),
        }
        self
    }

    /// Sets `report-to` to a Reporting API group name (declared in a `Reporting-Endpoints`
    /// header that the application sends).
    pub fn report_to(mut self, group: impl AsRef<str>) -> Self {
        let group = group.as_ref();
        match check_report_to(group) {
            Ok(()) => self.policy.report_to = Some(group.to_owned()),
            Err(err) => self.errors.push(err),
        }
        self
    }

    /// Sends the policy as `Content-Security-Policy-Report-Only`: browsers report
    /// violations but block nothing. Useful to try a policy before enforcing it.
    pub fn report_only(mut self, on: bool) -> Self {
        self.policy.report_only = on;
        self
    }

    /// Adds a fresh random nonce (128 bits) to `script-src` and `style-src` on every
    /// response, and puts it in the request extensions as a [`CspNonce`] for handlers to
    /// write into `<script nonce="…">`.
    ///
    /// A missing `script-src` or `style-src` is created from `default-src` (without
    /// `'none'`), so the policy allows exactly what it did before plus nonced elements.
    pub fn nonce(mut self, on: bool) -> Self {
        self.policy.nonce = on;
        self
    }

    /// Validates and returns the policy, or the first mistake found.
    pub fn build(mut self) -> Result<ContentSecurityPolicy, CspError> {
        if let Some(err) = self.errors.into_iter().next() {
            return Err(err);
        }
        let policy = &mut self.policy;
        if policy.directives.is_empty()
            && !policy.upgrade_insecure_requests
            && policy.sandbox.is_none()
        {
            return Err(CspError::Empty);
        }
        if policy.nonce {
            let fallback: Vec<Source> = policy
                .sources(Directive::DefaultSrc)
                .unwrap_or_default()
                .iter()
                .filter(|s| !s.is_none())
                .cloned()
                .collect();
            for target in [Directive::ScriptSrc, Directive::StyleSrc] {
                match policy.directives.iter_mut().find(|(d, _)| *d == target) {
                    // A nonce next to 'none' would be ignored by browsers; the nonce
                    // replaces it.
                    Some((_, sources)) => sources.retain(|s| !s.is_none()),
                    None => policy.directives.push((target, fallback.clone())),
                }
            }
            policy.directives.sort_by_key(|(d, _)| *d);
        }
        Ok(self.policy)
    }
}

/// Checks a `report-uri`: an absolute `http(s)://` URL or a path starting with `/`.
pub(crate) fn check_report_uri(uri: &str) -> Result<(), CspError> {
    let scheme_ok = uri.starts_with('/') && !uri.starts_with("//")
        || uri.starts_with("https://")
        || uri.starts_with("http://");
    let chars_ok = uri
        .bytes()
        .all(|b| b.is_ascii_graphic() && !matches!(b, b';' | b',' | b'\'' | b'"'));
    if scheme_ok && chars_ok && uri.parse::<http::Uri>().is_ok() {
        Ok(())
    } else {
        Err(CspError::InvalidReportUri {
            value: uri.to_owned(),
        })
    }
}

/// Checks a `report-to` group name: letters, digits, `-`, `_` and `.`.
pub(crate) fn check_report_to(group: &str) -> Result<(), CspError> {
    if !group.is_empty()
        && group
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        Ok(())
    } else {
        Err(CspError::InvalidReportTo {
            value: group.to_owned(),
        })
    }
}

/// The nonce of one response's Content-Security-Policy: 128 random bits from a CSPRNG,
/// base64-encoded (24 characters).
///
/// The layer puts it in the request extensions; a handler writes it into its pages:
/// `<script nonce="{nonce}">`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CspNonce([u8; 24]);

impl CspNonce {
    /// A fresh nonce from the thread-local CSPRNG.
    pub fn generate() -> Self {
        let mut raw = [0u8; 16];
        rand::rng().fill_bytes(&mut raw);
        Self::from_bytes(raw)
    }

    /// The nonce for the given 16 bytes (for tests and for callers with their own source
    /// of randomness).
    pub fn from_bytes(raw: [u8; 16]) -> Self {
        const ALPHABET: &[u8; 64] =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = [b'='; 24];
        for (i, chunk) in raw.chunks(3).enumerate() {
            let b0 = chunk[0];
            let b1 = chunk.get(1).copied().unwrap_or(0);
            let b2 = chunk.get(2).copied().unwrap_or(0);
            let n = (u32::from(b0) << 16) | (u32::from(b1) << 8) | u32::from(b2);
            let o = &mut out[i * 4..i * 4 + 4];
            o[0] = ALPHABET[(n >> 18) as usize & 63];
            o[1] = ALPHABET[(n >> 12) as usize & 63];
            if chunk.len() > 1 {
                o[2] = ALPHABET[(n >> 6) as usize & 63];
            }
            if chunk.len() > 2 {
                o[3] = ALPHABET[n as usize & 63];
            }
        }
        Self(out)
    }

    /// The base64 text, as it appears in the header and in `nonce="…"` attributes.
    pub fn as_str(&self) -> &str {
        // Always ASCII: every byte comes from the base64 alphabet or is `=`.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl fmt::Display for CspNonce {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Shows only that a nonce is there: it is a per-response secret.
impl fmt::Debug for CspNonce {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CspNonce(..)")
    }
}

/// With the `axum` feature a handler can take the nonce directly: `async fn page(nonce:
/// CspNonce)`. Without a nonce in the request (the layer is missing, or its policy has no
/// nonce) the request fails with a 500 whose cause is logged.
#[cfg(feature = "axum")]
#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
impl<S: Send + Sync> axum::extract::FromRequestParts<S> for CspNonce {
    type Rejection = crate::Error;

    async fn from_request_parts(
        parts: &mut http::request::Parts,
        _state: &S,
    ) -> Result<Self, crate::Error> {
        parts.extensions.get::<CspNonce>().copied().ok_or_else(|| {
            crate::Error::internal(
                "no CspNonce in the request extensions: put SecurityHeadersLayer with a nonce \
                 policy (web(), or CspBuilder::nonce(true)) in front of this handler",
            )
        })
    }
}

#[cfg(test)]
mod tests {
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
}

#[cfg(test)]
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
