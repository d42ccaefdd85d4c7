//! [`Source`]: one validated entry of a directive's source list.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use super::error::CspError;

/// Keywords that must be written in single quotes.
pub(super) const KEYWORDS: [&str; 9] = [
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
/// [`CspBuilder::nonce`](super::CspBuilder::nonce)).
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

    pub(super) fn is_none(&self) -> bool {
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
