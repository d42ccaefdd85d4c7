//! The rate-limit response headers.
//!
//! palisade writes the IETF draft fields (draft-ietf-httpapi-ratelimit-headers), whose
//! values are structured-field lists (RFC 8941) with one item per policy, named by a
//! string:
//!
//! ```text
//! RateLimit-Policy: "chat";q=20;w=60
//! RateLimit: "chat";r=0;t=12
//! ```
//!
//! `q` is the quota (units per window), `w` the window in seconds, `r` the units remaining
//! and `t` the seconds until the quota is whole again if nothing else arrives (for a refused
//! request, until it would be admitted), rounded up. `t` is honest for every algorithm: a
//! client that waits `t` seconds after `r=0` is admitted. For the sliding window that is the
//! end of the window *after* the last one that counted units, since those units still
//! weigh on the sliding estimate until then. Each applicable rule adds its own field line; a list split over several lines
//! is the same list. The legacy `X-RateLimit-Limit`, `X-RateLimit-Remaining` and
//! `X-RateLimit-Reset` (seconds) are optional and describe the most constrained rule.
//! Shadow rules never show.
//!
//! ```
//! use palisade::rate_limit::{Quota, RateLimitLayer, Rule};
//! use tower::{Layer, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let layer = RateLimitLayer::builder()
//!     .rule(Rule::new("burst", Quota::per_second(10)))
//!     .rule(Rule::new("daily", Quota::per_day(1000)))
//!     .legacy_headers(true)
//!     .build()
//!     .unwrap();
//! let svc = layer.layer(service_fn(|_req: http::Request<()>| async {
//!     Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Empty::<bytes::Bytes>::new()))
//! }));
//! let res = svc.oneshot(http::Request::new(())).await.unwrap();
//! let policies: Vec<_> = res.headers().get_all("ratelimit-policy").iter().collect();
//! assert_eq!(policies, ["\"burst\";q=10;w=1", "\"daily\";q=1000;w=86400"]);
//! let limits: Vec<_> = res.headers().get_all("ratelimit").iter().collect();
//! assert_eq!(limits[0], "\"burst\";r=9;t=2");
//! assert_eq!(res.headers()["x-ratelimit-remaining"], "9"); // the most constrained rule
//! # }
//! ```

use std::time::Duration;

use http::{HeaderName, HeaderValue};

/// `RateLimit-Policy`.
pub const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
/// `RateLimit`.
pub const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
/// `X-RateLimit-Limit` (legacy).
pub const X_RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
/// `X-RateLimit-Remaining` (legacy).
pub const X_RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
/// `X-RateLimit-Reset` (legacy, seconds).
pub const X_RATELIMIT_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");

/// Whole seconds, rounded up (a window of 500 ms is advertised as 1 s).
pub(crate) fn ceil_secs(micros: u64) -> u64 {
    micros.div_ceil(1_000_000)
}

/// `"name";q=limit;w=window_secs`, built once per rule. `name` has been validated as
/// printable ASCII without `"` or `\`, so it needs no escaping.
pub(crate) fn policy_value(name: &str, limit: u64, window: Duration) -> HeaderValue {
    let w = ceil_secs(u64::try_from(window.as_micros()).unwrap_or(u64::MAX)).max(1);
    let s = format!("\"{name}\";q={limit};w={w}");
    HeaderValue::from_str(&s).unwrap_or_else(|_| HeaderValue::from_static("\"policy\""))
}

/// `"name";r=remaining;t=secs`, written by hand into a stack buffer (no `fmt` machinery:
/// this runs for every limited response).
pub(crate) fn ratelimit_value(name: &str, remaining: u64, reset_secs: u64) -> HeaderValue {
    let mut buf = StackBuf::new();
    buf.push(b"\"");
    buf.push(name.as_bytes());
    buf.push(b"\";r=");
    buf.push_u64(remaining);
    buf.push(b";t=");
    buf.push_u64(reset_secs);
    if let Some(bytes) = buf.bytes() {
        if let Ok(v) = HeaderValue::from_bytes(bytes) {
            return v;
        }
    }
    let s = format!("\"{name}\";r={remaining};t={reset_secs}");
    HeaderValue::from_str(&s).unwrap_or_else(|_| HeaderValue::from_static("\"policy\";r=0;t=1"))
}

/// "00" to "99", the two digits of each number below 100.
const DIGIT_PAIRS: &[u8; 200] = b"\
    0001020304050607080910111213141516171819\
    2021222324252627282930313233343536373839\
    4041424344454647484950515253545556575859\
    6061626364656667686970717273747576777879\
    8081828384858687888990919293949596979899";

/// A small fixed buffer that records overflow instead of growing.
struct StackBuf {
    buf: [u8; 128],
    len: usize,
    overflow: bool,
}

impl StackBuf {
    fn new() -> Self {
        Self {
            buf: [0; 128],
            len: 0,
            overflow: false,
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        match self.buf.get_mut(self.len..self.len + bytes.len()) {
            Some(dst) if !self.overflow => {
                dst.copy_from_slice(bytes);
                self.len += bytes.len();
            }
            _ => self.overflow = true,
        }
    }

    fn push_u64(&mut self, mut n: u64) {
        // Two digits per division.
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        while n >= 100 {
            let pair = (n % 100) as usize * 2;
            n /= 100;
            i -= 2;
            digits[i..i + 2].copy_from_slice(&DIGIT_PAIRS[pair..pair + 2]);
        }
        if n >= 10 {
            let pair = n as usize * 2;
            i -= 2;
            digits[i..i + 2].copy_from_slice(&DIGIT_PAIRS[pair..pair + 2]);
        } else {
            i -= 1;
            digits[i] = b'0' + n as u8;
        }
        self.push(&digits[i..]);
    }

    fn bytes(&self) -> Option<&[u8]> {
        (!self.overflow).then_some(&self.buf[..self.len])
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A small RFC 8941 list parser for the shapes we emit: items are sf-strings with
    /// integer parameters.
    pub(crate) fn parse_list(v: &str) -> Vec<(String, Vec<(String, i64)>)> {
        let mut out = Vec::new();
        for member in v.split(',') {
            let member = member.trim();
            let mut pieces = member.split(';');
            let name = pieces.next().unwrap();
            assert!(
                name.starts_with('"') && name.ends_with('"') && name.len() >= 2,
                "not an sf-string: {name}"
            );
            let name = &name[1..name.len() - 1];
            assert!(!name.contains(['"', '\\']));
            let mut params = Vec::new();
            for p in pieces {
                let (k, v) = p.split_once('=').expect("key=value");
                assert!(
                    k.chars().next().unwrap().is_ascii_lowercase()
                        && k.chars().all(|c| c.is_ascii_lowercase()
                            || c.is_ascii_digit()
                            || "_-.*".contains(c)),
                    "bad key {k}"
                );
                assert!(
                    v.len() <= 15 && v.chars().all(|c| c.is_ascii_digit()),
                    "bad integer {v}"
                );
                params.push((k.to_owned(), v.parse().unwrap()));
            }
            out.push((name.to_owned(), params));
        }
        out
    }

    #[test]
    fn values_are_structured_field_lists() {
        let p = policy_value("chat", 20, Duration::from_secs(60));
        assert_eq!(p, "\"chat\";q=20;w=60");
        assert_eq!(
            parse_list(p.to_str().unwrap()),
            vec![("chat".into(), vec![("q".into(), 20), ("w".into(), 60)])]
        );
        let r = ratelimit_value("chat", 0, 12);
        assert_eq!(r, "\"chat\";r=0;t=12");
        assert_eq!(parse_list("\"a\";r=1;t=2, \"b\";r=3;t=4").len(), 2);
        assert_eq!(
            policy_value("fast", 5, Duration::from_millis(500)),
            "\"fast\";q=5;w=1"
        );
    }

    #[test]
    fn ratelimit_values_match_the_formatted_text() {
        for (r, t) in [
            (0, 0),
            (1, 9),
            (10, 100),
            (u64::MAX, 12_345),
            (999_999, u64::MAX),
            (99, 101),
            (999_999_999, 118),
        ] {
            assert_eq!(
                ratelimit_value("n", r, t).to_str().unwrap(),
                format!("\"n\";r={r};t={t}")
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn ratelimit_values_match_the_formatted_text_for_any_numbers(r: u64, t: u64) {
            let value = ratelimit_value("n", r, t);
            proptest::prop_assert_eq!(value.to_str().unwrap(), format!("\"n\";r={r};t={t}"));
        }
    }

    #[test]
    fn long_names_fall_back_to_the_heap() {
        let name = "n".repeat(200);
        let v = ratelimit_value(&name, 1, 2);
        assert_eq!(v.to_str().unwrap(), format!("\"{name}\";r=1;t=2"));
    }
}
