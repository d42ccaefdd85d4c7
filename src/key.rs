//! API keys as identities: hashed, redacted, compared in constant time.
//!
//! Limits, budgets and usage records are kept per API key, but a key must never sit in a
//! map, a log line or a Redis key in clear. [`ApiKeyId`] is the stable identity of a key:
//! the first 16 bytes of its SHA-256, shown as 32 hex characters. It is the same in every
//! process, so instances that share a Redis agree on it. [`redact`] shows a key in logs the
//! way dashboards do (`sk-ant-…f3a9`), and [`constant_time_eq`] compares secrets without
//! leaking where they differ.
//!
//! ```
//! use palisade::key::{ApiKeyId, redact, constant_time_eq};
//!
//! let id = ApiKeyId::from_key("sk-ant-api03-secret-value-f3a9");
//! assert_eq!(id.to_string().len(), 32);
//! assert!(!id.to_string().contains("secret"));
//! assert_eq!(id, ApiKeyId::from_key("sk-ant-api03-secret-value-f3a9"));
//!
//! assert_eq!(redact("sk-ant-api03-secret-value-f3a9"), "sk-ant-…f3a9");
//! assert!(constant_time_eq(b"abc", b"abc"));
//! assert!(!constant_time_eq(b"abc", b"abd"));
//! ```

use std::fmt;

use http::HeaderMap;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The hashed identity of an API key (16 bytes of SHA-256, shown as hex).
///
/// Aligned to 8 bytes, so an enum that holds it (a rate-limit key) lays it out on word
/// boundaries and copies it with whole-word moves.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(align(8))]
pub struct ApiKeyId([u8; 16]);

impl ApiKeyId {
    /// Hashes `key`. The key itself is not kept.
    pub fn from_key(key: &str) -> Self {
        Self::from_key_bytes(key.as_bytes())
    }

    /// The id of a key given as bytes (the same id as [`ApiKeyId::from_key`] for its text).
    pub(crate) fn from_key_bytes(key: &[u8]) -> Self {
        let digest = Sha256::digest(key);
        let mut id = [0u8; 16];
        id.copy_from_slice(&digest[..16]);
        Self(id)
    }

    /// Reads the caller's API key from `x-api-key` or `authorization: Bearer …` and hashes
    /// it. `None` when neither header holds a key.
    ///
    /// ```
    /// use palisade::key::ApiKeyId;
    /// let mut headers = http::HeaderMap::new();
    /// headers.insert("authorization", "Bearer sk-test-1".parse().unwrap());
    /// assert_eq!(ApiKeyId::from_headers(&headers), Some(ApiKeyId::from_key("sk-test-1")));
    /// ```
    pub fn from_headers(headers: &HeaderMap) -> Option<Self> {
        api_key_from_headers(headers).map(Self::from_key)
    }

    /// An id from its raw 16 bytes (as stored by a sink).
    pub const fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(bytes)
    }

    /// The raw 16 bytes.
    pub const fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl fmt::Display for ApiKeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for ApiKeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKeyId({self})")
    }
}

/// The API key a request carries in `x-api-key` (Anthropic) or `authorization: Bearer`
/// (OpenAI), trimmed; `None` when absent, empty or not visible ASCII.
pub fn api_key_from_headers(headers: &HeaderMap) -> Option<&str> {
    if let Some(key) = headers.get("x-api-key").and_then(|v| v.to_str().ok()) {
        let key = key.trim();
        if !key.is_empty() {
            return Some(key);
        }
    }
    let auth = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = auth.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Public markers that start well-known API keys. They say which vendor issued a key and
/// nothing about the key itself, so [`redact`] may keep them.
pub const VENDOR_PREFIXES: [&str; 6] = [
    "sk-ant-admin01-",
    "sk-ant-",
    "sk-proj-",
    "sk-svcacct-",
    "sk-admin-",
    "sk-",
];

/// Keys shorter than this many characters are redacted to `…` with nothing shown.
pub const REDACT_MIN_LEN: usize = 20;

/// A key made safe for logs, by one rule:
///
/// - a key shorter than [`REDACT_MIN_LEN`] (20) characters shows nothing: `…`;
/// - a longer key shows its last 4 characters, after its vendor marker when it starts with
///   one of [`VENDOR_PREFIXES`] (`sk-ant-…f3a9`, `sk-proj-…1234`), else after `…` alone.
///
/// So at most 4 characters of the secret part are ever shown, and only of a key at least
/// 20 characters long (a fifth of it at most).
///
/// ```
/// use palisade::key::redact;
///
/// assert_eq!(redact("sk-ant-api03-secret-value-f3a9"), "sk-ant-…f3a9");
/// assert_eq!(redact("0123456789abcdefghijklmnop"), "…mnop");
/// assert_eq!(redact("sk-ant-12345"), "…"); // too short to show anything
/// ```
pub fn redact(key: &str) -> String {
    let len = key.chars().count();
    if len < REDACT_MIN_LEN {
        return "…".to_owned();
    }
    let prefix = VENDOR_PREFIXES
        .iter()
        .find(|p| key.starts_with(**p))
        .copied()
        .unwrap_or("");
    let tail: String = key.chars().skip(len - 4).collect();
    format!("{prefix}…{tail}")
}

/// Query parameters whose values [`redact_url`] hides.
const SECRET_PARAMS: [&str; 10] = [
    "password",
    "pass",
    "passwd",
    "pwd",
    "token",
    "secret",
    "key",
    "api_key",
    "apikey",
    "sslpassword",
];

/// A URL made safe for logs and `Debug`: the password of its user info, any user info
/// without a separate password (it may be a token), and the values of query parameters
/// such as `password`, `token` or `key` become `***`. Scheme, user name, host, port and
/// path stay, so the URL still says where it leads.
///
/// Every `Debug` in palisade that holds a URL (a Redis or PostgreSQL address) prints it
/// through here.
///
/// ```
/// use palisade::key::redact_url;
///
/// assert_eq!(
///     redact_url("redis://default:hunter2@cache.internal:6379/0"),
///     "redis://default:***@cache.internal:6379/0",
/// );
/// assert_eq!(
///     redact_url("postgres://app@db/usage?sslmode=require&password=hunter2"),
///     "postgres://***@db/usage?sslmode=require&password=***",
/// );
/// assert_eq!(redact_url("redis://127.0.0.1:6379/"), "redis://127.0.0.1:6379/");
/// ```
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = match url.find("://") {
        Some(i) => url.split_at(i + 3),
        None => ("", url),
    };
    // The user info ends at the last `@` before any query or fragment, even when an
    // unescaped `/` in a password makes the URL ambiguous: hiding too much beats leaking.
    // A password may also hold an unescaped `?` or `#`: an `@` after one ends the user info
    // too, unless a `=` or `&` before it says it sits in a query (`?email=a@b`).
    let before_query = rest.find(['?', '#']).unwrap_or(rest.len());
    let at = rest[..before_query]
        .rfind('@')
        .or_else(|| {
            let at = rest.rfind('@')?;
            (!rest[before_query..at].contains(['=', '&'])).then_some(at)
        })
        .filter(|_| !scheme.is_empty());
    let host_start = at.map_or(0, |i| i + 1);
    let authority_end = rest[host_start..]
        .find(['/', '?', '#'])
        .map_or(rest.len(), |i| host_start + i);
    let (authority, path) = rest.split_at(authority_end);
    let mut out = String::with_capacity(url.len());
    out.push_str(scheme);
    match at {
        Some(at) => {
            let (userinfo, host) = authority.split_at(at);
            match userinfo.split_once(':') {
                Some((user, _password)) if !user.is_empty() => {
                    out.push_str(user);
                    out.push_str(":***");
                }
                Some(_) => out.push_str(":***"),
                None => out.push_str("***"),
            }
            out.push_str(host);
        }
        _ => out.push_str(authority),
    }
    let (path, fragment) = match path.find('#') {
        Some(i) => path.split_at(i),
        None => (path, ""),
    };
    match path.split_once('?') {
        Some((path, query)) => {
            out.push_str(path);
            out.push('?');
            for (i, pair) in query.split('&').enumerate() {
                if i > 0 {
                    out.push('&');
                }
                match pair.split_once('=') {
                    Some((name, _))
                        if SECRET_PARAMS.iter().any(|s| s.eq_ignore_ascii_case(name)) =>
                    {
                        out.push_str(name);
                        out.push_str("=***");
                    }
                    _ => out.push_str(pair),
                }
            }
        }
        None => out.push_str(path),
    }
    out.push_str(fragment);
    out
}

/// Compares two secrets in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// The authenticated caller, put in the request extensions by an authentication layer (or
/// handler) that has checked who is calling. Layers that attribute or limit per caller
/// read it first: the cost meter puts the request's spend on it before an
/// `Attribution`'s user, the body's `metadata.user_id` or any user header, all of which
/// the client can write.
///
/// ```
/// use palisade::key::Principal;
/// let mut req = http::Request::new(());
/// req.extensions_mut().insert(Principal::new("user-42"));
/// assert_eq!(req.extensions().get::<Principal>().unwrap().id(), "user-42");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Principal(std::sync::Arc<str>);

impl Principal {
    /// A principal with this stable id.
    pub fn new(id: impl Into<std::sync::Arc<str>>) -> Self {
        Self(id.into())
    }

    /// The id.
    pub fn id(&self) -> &str {
        &self.0
    }

    /// The id, shared (a rate-limit key takes it without a copy).
    pub(crate) fn shared_id(&self) -> &std::sync::Arc<str> {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashing_is_stable_and_hides_the_key() {
        let id = ApiKeyId::from_key("sk-ant-abc");
        // SHA-256("sk-ant-abc") starts with these bytes in every process.
        let hex = id.to_string();
        assert_eq!(hex.len(), 32);
        assert_eq!(hex, ApiKeyId::from_key("sk-ant-abc").to_string());
        assert_ne!(id, ApiKeyId::from_key("sk-ant-abd"));
        assert!(!format!("{id:?}").contains("abc"));
        assert_eq!(
            ApiKeyId::from_key("").to_string(),
            "e3b0c44298fc1c149afbf4c8996fb924"
        );
    }

    #[test]
    fn keys_from_headers() {
        let mut h = HeaderMap::new();
        assert_eq!(api_key_from_headers(&h), None);
        h.insert("authorization", "Basic abc".parse().unwrap());
        assert_eq!(api_key_from_headers(&h), None);
        h.insert("authorization", "bearer  tok ".parse().unwrap());
        assert_eq!(api_key_from_headers(&h), Some("tok"));
        h.insert("x-api-key", " ".parse().unwrap());
        assert_eq!(api_key_from_headers(&h), Some("tok"));
        h.insert("x-api-key", "sk-ant-1".parse().unwrap());
        assert_eq!(api_key_from_headers(&h), Some("sk-ant-1"));
    }

    #[test]
    fn redaction() {
        assert_eq!(redact("sk-proj-abcdefghijkl1234"), "sk-proj-…1234");
        assert_eq!(redact("abcdefghijklmnopqrstu"), "…rstu");
        assert_eq!(redact("abcdefghijklmnop"), "…");
        assert_eq!(redact("short"), "…");
        assert_eq!(redact(""), "…");
        assert_eq!(redact("ключ-очень-длинный-секрет"), "…крет");
        assert_eq!(
            redact("sk-ant-admin01-0123456789abcdef"),
            "sk-ant-admin01-…cdef"
        );
    }

    #[test]
    fn redact_url_hides_passwords_and_tokens() {
        let cases = [
            (
                "redis://:hunter2@127.0.0.1:6379",
                "redis://:***@127.0.0.1:6379",
            ),
            (
                "rediss://user:p%40ss:word@host:6380/1",
                "rediss://user:***@host:6380/1",
            ),
            ("redis://tokenonly@host/", "redis://***@host/"),
            ("redis://:hunter2/x@host:1/2", "redis://:***@host:1/2"),
            (
                "postgres://app:hunter2@db:5432/usage?sslmode=require",
                "postgres://app:***@db:5432/usage?sslmode=require",
            ),
            (
                "https://example.com/hook?TOKEN=hunter2&x=1#frag",
                "https://example.com/hook?TOKEN=***&x=1#frag",
            ),
            ("unix:///run/redis.sock", "unix:///run/redis.sock"),
            ("redis://[::1]:6379/0", "redis://[::1]:6379/0"),
            (
                "redis://u:hunter2@[::1]:6379/0",
                "redis://u:***@[::1]:6379/0",
            ),
            (
                "https://example.com/hook?email=a@b.example&x=1",
                "https://example.com/hook?email=a@b.example&x=1",
            ),
            ("not a url", "not a url"),
            ("", ""),
        ];
        for (url, expected) in cases {
            assert_eq!(redact_url(url), expected, "{url}");
            assert!(!redact_url(url).contains("hunter2"));
        }
    }

    /// A password holding an unescaped `?` or `#` (generated passwords do) was cut at
    /// that character: the rest of it was read as a query or fragment and printed.
    #[test]
    fn redact_url_hides_passwords_holding_a_question_mark_or_hash() {
        for (url, expected) in [
            (
                "redis://u:hun?ter2@host:6379/0",
                "redis://u:***@host:6379/0",
            ),
            ("redis://:hun#ter2@host:6379", "redis://:***@host:6379"),
            (
                "rediss://default:a/b?c#hunter2@cache:6380",
                "rediss://default:***@cache:6380",
            ),
        ] {
            let shown = redact_url(url);
            assert_eq!(shown, expected, "{url}");
            assert!(
                !shown.contains("ter2") && !shown.contains("hunter2"),
                "{shown}"
            );
        }
    }

    #[test]
    fn redact_hides_short_keys_entirely() {
        for key in [
            "sk-ant-12345",
            "abcdefghijkl",
            "sk-proj-abcdefghijk",
            "0123456789abcdefghi",
        ] {
            assert_eq!(redact(key), "…", "{key}");
        }
    }

    #[test]
    fn redact_never_shows_more_than_four_characters_of_the_secret() {
        let alphabet: Vec<char> = "abcdefghijklmnopqrstuvwxyz0123456789-_".chars().collect();
        for prefix in ["", "sk-", "sk-ant-", "sk-proj-", "ab-cd-", "abcdefg-"] {
            for len in 1..120 {
                let secret: String = (0..len)
                    .map(|i| alphabet[(i * 7) % alphabet.len()])
                    .collect();
                let key = format!("{prefix}{secret}");
                let shown = redact(&key);
                // Public vendor markers may stay; of the rest, at most 4 characters show.
                let visible = ["sk-ant-", "sk-proj-", "sk-svcacct-", "sk-admin-", "sk-"]
                    .iter()
                    .find_map(|p| shown.strip_prefix(p).filter(|_| key.starts_with(p)))
                    .unwrap_or(&shown);
                let secret_chars = visible.chars().filter(|c| *c != '…').count();
                assert!(secret_chars <= 4, "{key} -> {shown}");
                if key.chars().count() < 20 {
                    assert_eq!(shown, "…", "{key}");
                }
            }
        }
    }

    #[test]
    fn constant_time() {
        assert!(constant_time_eq(b"", b""));
        assert!(!constant_time_eq(b"a", b""));
        assert!(!constant_time_eq(b"secret1", b"secret2"));
    }
}
