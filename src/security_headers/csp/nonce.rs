//! [`CspNonce`]: the per-response nonce.

use std::fmt;

use rand::Rng;

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
