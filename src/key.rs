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
        let digest = Sha256::digest(key.as_bytes());
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

/// A key made safe for logs: a recognisable prefix (up to the last `-` within the first 8
/// characters) and the last 4 characters; short keys show nothing at all.
pub fn redact(key: &str) -> String {
    let chars: Vec<char> = key.chars().collect();
    if chars.len() < 12 {
        return "…".to_owned();
    }
    let head: String = chars[..8].iter().collect();
    let prefix = match head.rfind('-') {
        Some(i) => &head[..=i],
        None => "",
    };
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("{prefix}…{tail}")
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
        assert_eq!(redact("abcdefghijklmnop"), "…mnop");
        assert_eq!(redact("short"), "…");
        assert_eq!(redact("ключ-очень-длинный-секрет"), "ключ-…крет");
    }

    #[test]
    fn constant_time() {
        assert!(constant_time_eq(b"", b""));
        assert!(!constant_time_eq(b"a", b""));
        assert!(!constant_time_eq(b"secret1", b"secret2"));
    }
}
